"""Runs the serving workload on vLLM's CPU backend (in vLLM's own venv; called by benchmarks/serving.py).

Usage: VLLM_ENABLE_V1_MULTIPROCESSING=0 python _vllm_serving.py MODEL_DIR WORKLOAD.json OUT.json MAX_MODEL_LEN [REPEATS [DTYPE]]

Construction (timed), one first pass (``warmup_s``), then REPEATS (default 1) timed passes, prefix cache reset before each;
``elapsed_s`` is their median.
"""

import json
import sys
import time

if __name__ == "__main__":
  model_dir, workload_path, out_path, max_len = sys.argv[1:5]
  repeats = int(sys.argv[5]) if len(sys.argv) > 5 else 1
  dtype = sys.argv[6] if len(sys.argv) > 6 else "float32"
  import vllm
  from vllm import LLM, SamplingParams

  with open(workload_path) as f:
    workload = json.load(f)
  t0 = time.perf_counter()
  llm = LLM(model=model_dir, skip_tokenizer_init=True, max_model_len=int(max_len), dtype=dtype, seed=0)
  construction = time.perf_counter() - t0  # vLLM compiles and profiles here
  prompts = [{"prompt_token_ids": w["prompt_token_ids"]} for w in workload]
  params = [SamplingParams(temperature=0, max_tokens=w["max_tokens"], ignore_eos=True, detokenize=False)
            for w in workload]
  t0 = time.perf_counter()
  llm.generate(prompts, params, use_tqdm=False)  # warm-up, as for jaxserve
  warmup = time.perf_counter() - t0
  from serving import timed_passes  # this script's folder is on sys.path
  outs, runs = timed_passes(lambda: llm.generate(prompts, params, use_tqdm=False), llm.reset_prefix_cache, repeats)
  import torch
  with open(out_path, "w") as f:
    json.dump(dict(elapsed_s=sorted(runs)[len(runs) // 2], runs_s=runs, warmup_s=warmup, construction_s=construction,
                   version=vllm.__version__,
                   torch_threads=torch.get_num_threads(), tokens=[list(o.outputs[0].token_ids) for o in outs]), f)
