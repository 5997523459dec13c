"""What a benchmark records about the machine it ran on (CPU model, cores, load average), and how it writes its results."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
  """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


# The instruction sets the CPU kernels choose among at run time, as /proc/cpuinfo names them: one
# model name ("Intel(R) Xeon(R) Processor" in a VM) has come both with and without AMX.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def isa() -> list[str] | None:
  """Which of :data:`ISA_FLAGS` the CPU reports (None where ``/proc/cpuinfo`` has no flags line)."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        have = set(line.split(":", 1)[1].split())
        return [f for f in ISA_FLAGS if f in have]
  except OSError:
    pass
  return None


def machine() -> dict[str, Any]:
  """CPU model, its instruction sets (:func:`isa`), core count, platform, Python and the load average now
  (``loadavg_at_start``)."""
  return dict(cpu=cpu_model(), isa=isa(), cpus=os.cpu_count(), platform=platform.platform(),
              python=platform.python_version(), loadavg_at_start=list(os.getloadavg()))


def git_commit() -> str | None:
  """The short commit of the checkout the benchmark runs from (None outside git)."""
  import subprocess
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                         cwd=Path(__file__).resolve().parents[1])
    return out.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def file_at(rev: str, path: str) -> bytes:
  """The bytes of ``path`` (relative to the repository root) at git revision ``rev`` (a baseline to compare with)."""
  import subprocess
  return subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "show", f"{rev}:{path}"],
                        check=True, capture_output=True).stdout


def write_results(path: str | os.PathLike, res: dict[str, Any]) -> None:
  """Writes ``res`` as JSON to ``path`` with the machine it ran on (CPU model, instruction sets, cores, load average
  now) added."""
  res = dict(res, loadavg=list(os.getloadavg()), cpus=os.cpu_count(), cpu=cpu_model(), isa=isa())
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  Path(path).write_text(json.dumps(res, indent=1))
  print(f"wrote {path}")
