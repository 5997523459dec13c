"""Several hosts (a demo): one process per host joins one JAX mesh and runs sharded greedy generation.

Launch recipe (one line per host, same coordinator address, process ids 0..N-1)::

    python -m jaxserve.multihost --coordinator HOST0:1234 --num-processes N --process-id I

Each process then sees every device of every host in ``jax.devices()``; the model is sharded
over all of them in the Megatron layout and greedy generation (``jaxserve.generate.generate``, the
contiguous-cache decoder, not the paged ``LLM`` engine, which runs in one process) runs as one
SPMD program.
On CPUs (tests, laptops) the cross-process collectives use gloo.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def initialize(coordinator: str, num_processes: int, process_id: int, local_devices: int | None = None) -> None:
  """Joins the distributed runtime; call before anything else touches JAX."""
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
  if local_devices:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
  import jax
  if jax.config.jax_platforms in (None, "", "cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxserve.multihost", description=__doc__.split("\n")[0])
  p.add_argument("--coordinator", required=True, help="HOST:PORT of process 0")
  p.add_argument("--num-processes", type=int, required=True)
  p.add_argument("--process-id", type=int, required=True)
  p.add_argument("--local-devices", type=int, default=None, help="virtual CPU devices per process (testing)")
  p.add_argument("--model", default=None, help="model directory (default: the embedded stories260K)")
  p.add_argument("--prompt", default="Once upon a time")
  p.add_argument("--max-tokens", type=int, default=32)
  args = p.parse_args(argv)
  initialize(args.coordinator, args.num_processes, args.process_id, args.local_devices)
  import jax

  from jaxserve.generate import generate
  from jaxserve.loaders import load_model
  from jaxserve.sharding import make_mesh, shard_params
  m = load_model(args.model, dense=True)
  mesh = make_mesh(jax.device_count())
  params = shard_params(m.params, m.cfg, mesh)
  prompt = m.tokenizer.encode(args.prompt, add_bos=True)
  out = generate(params, m.cfg, [prompt], args.max_tokens)[0]
  print(json.dumps({"process_id": jax.process_index(), "processes": jax.process_count(),
                    "devices": jax.device_count(), "tokens": out}), flush=True)
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
