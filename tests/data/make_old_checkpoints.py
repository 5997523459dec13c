"""Writes tests/data/old_checkpoints/: directories in the checkpoint formats before the one native format.

Run once with the code of commit 8c4bbd1 (``jaxprune-pruned-v2`` via ``jaxprune.checkpoint.save``, with and
without a config; ``jaxprune-pruned-v1`` as that save without compression, its JSON edited back to v1;
``jaxserve-native-v1`` via ``jaxserve.loaders.save_native``)::

  git archive 8c4bbd1 jaxprune jaxserve kernels_pallas | tar -x -C /tmp/old
  PYTHONPATH=/tmp/old python tests/data/make_old_checkpoints.py tests/data/old_checkpoints

``expected.npz`` holds the dense parameters and masks each directory must load back as.
"""

import json
import os
import sys

import jax
import numpy as np

from jaxprune import PruneConfig, checkpoint, prune
from jaxprune._tree import leaves_with_paths
from jaxserve.loaders import save_native
from jaxserve.testing import tiny_model

SMALL = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_heads=2, num_kv_heads=1, head_dim=8)


def main(out: str) -> None:
  cfg, params = tiny_model(seed=0, **SMALL)
  res = prune(params, cfg, PruneConfig(method="magnitude", pattern="2:4"))
  masks = jax.tree.map(lambda x: x, res.masks)
  embed = params["embed_tokens"]["embedding"]
  masks["embed_tokens"]["embedding"] = np.asarray(np.abs(embed) > np.median(np.abs(embed)))  # masked, kept dense
  pruned = jax.tree.map(lambda x: x, res.params)
  pruned["embed_tokens"]["embedding"] = embed * masks["embed_tokens"]["embedding"]
  meta = {"method": "magnitude", "pattern": "2:4"}
  checkpoint.save(os.path.join(out, "pruned_v2"), pruned, masks, cfg=cfg, metadata=meta)
  checkpoint.save(os.path.join(out, "pruned_v2_nocfg"), pruned, masks, metadata=meta)
  v1 = checkpoint.save(os.path.join(out, "pruned_v1"), pruned, masks, cfg=cfg, metadata=meta, compress=False)
  with open(os.path.join(v1, checkpoint.METADATA_FILE)) as f:  # v1: every leaf dense, every mask stored
    info = json.load(f)
  info["format"] = "jaxprune-pruned-v1"
  info.pop("compressed")
  with open(os.path.join(v1, checkpoint.METADATA_FILE), "w") as f:
    json.dump(info, f)
  with open(os.path.join(v1, "model_config.json")) as f:  # v1 wrote no "weights" section
    native = json.load(f)
  assert native.pop("weights") == {}
  with open(os.path.join(v1, "model_config.json"), "w") as f:
    json.dump(native, f)
  small, narrow = tiny_model(seed=1, **SMALL, layer_num_heads=(2, 2), layer_num_kv_heads=(1, 1),
                             layer_intermediate_size=(24, 8))
  save_native(small, narrow, os.path.join(out, "native_v1"), extra={"pruning": {"ratio": 0.5}, "source": "tiny"})
  flat = {f"pruned/{p}": np.asarray(x) for p, x in leaves_with_paths(pruned)}
  flat.update({f"masks/{p}": np.asarray(m) for p, m in leaves_with_paths(masks) if m is not None})
  flat.update({f"native/{p}": np.asarray(x) for p, x in leaves_with_paths(narrow)})
  np.savez(os.path.join(out, "expected.npz"), **flat)


if __name__ == "__main__":
  main(sys.argv[1])
