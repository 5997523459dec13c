"""Memory per device for LLaMA-2 7B and 70B under tensor parallelism: weights, KV pool, activations.

Arithmetic from the model configuration (no weights needed): bfloat16 weights and KV cache, a KV pool
sized for 64k cached tokens (e.g. 16 sequences of 4096), a step of 2048 batched tokens. Prints a
table and writes benchmarks/results/memory_plan.json.
"""

import json
import os

from jaxserve.config import ModelConfig

GIB = 1024 ** 3
MODELS = {
    "LLaMA-2-7B": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                              num_heads=32, num_kv_heads=32, head_dim=128, dtype="bfloat16"),
    "LLaMA-2-70B": ModelConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_layers=80,
                               num_heads=64, num_kv_heads=8, head_dim=128, dtype="bfloat16"),
}
KV_TOKENS = 65536
STEP_TOKENS = 2048
BYTES = 2  # bfloat16


def plan(cfg: ModelConfig, tp: int) -> dict:
  weights = cfg.num_parameters() * BYTES
  # norms are replicated; everything else (projections, embeddings, LM head) is split tp ways
  replicated = (2 * cfg.num_layers + 1) * cfg.hidden_size * BYTES
  per_dev_weights = (weights - replicated) / tp + replicated
  kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * BYTES
  # live activations of one layer for a step: residual stream (replicated), q/k/v/attention output and
  # the MLP's gate/up/product (split), plus float32 logits for the sampled rows (<= 256 sequences)
  act = STEP_TOKENS * (2 * cfg.hidden_size + ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
                                            + 3 * cfg.intermediate_size) / tp) * BYTES
  act += 256 * cfg.vocab_size * 4 / tp
  return {"tp": tp, "weights_gib": per_dev_weights / GIB, "kv_pool_gib": KV_TOKENS * kv_per_token / tp / GIB,
          "kv_mib_per_token_per_device": kv_per_token / tp / 2 ** 20, "activations_gib": act / GIB,
          "total_gib": (per_dev_weights + KV_TOKENS * kv_per_token / tp + act) / GIB,
          "kv_heads_per_device": cfg.num_kv_heads / tp}


def main() -> None:
  rows = []
  print(f"{'model':12} {'TP':>3} {'weights GiB':>12} {'KV pool GiB':>12} {'act GiB':>8} {'total GiB':>10} {'KV heads/dev':>13}")
  for name, cfg in MODELS.items():
    for tp in (1, 2, 4, 8):
      r = {"model": name, **plan(cfg, tp)}
      rows.append(r)
      print(f"{name:12} {tp:>3} {r['weights_gib']:>12.1f} {r['kv_pool_gib']:>12.1f} {r['activations_gib']:>8.2f} "
            f"{r['total_gib']:>10.1f} {r['kv_heads_per_device']:>13g}")
  os.makedirs("benchmarks/results", exist_ok=True)
  with open("benchmarks/results/memory_plan.json", "w") as f:
    json.dump({"kv_tokens": KV_TOKENS, "step_tokens": STEP_TOKENS, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
