"""Runs the serving workload on vLLM's CPU backend (in vLLM's own venv; called by benchmarks/serving.py).

Usage: VLLM_ENABLE_V1_MULTIPROCESSING=0 python _vllm_serving.py MODEL_DIR WORKLOAD.json OUT.json MAX_MODEL_LEN
"""

import json
import sys
import time

if __name__ == "__main__":
  model_dir, workload_path, out_path, max_len = sys.argv[1:5]
  import vllm
  from vllm import LLM, SamplingParams

  with open(workload_path) as f:
    workload = json.load(f)
  llm = LLM(model=model_dir, skip_tokenizer_init=True, max_model_len=int(max_len), dtype="float32", seed=0)
  prompts = [{"prompt_token_ids": w["prompt_token_ids"]} for w in workload]
  params = [SamplingParams(temperature=0, max_tokens=w["max_tokens"], ignore_eos=True, detokenize=False)
            for w in workload]
  t0 = time.perf_counter()
  llm.generate(prompts, params, use_tqdm=False)  # warm-up, as for jaxserve
  warmup = time.perf_counter() - t0
  llm.reset_prefix_cache()
  t0 = time.perf_counter()
  outs = llm.generate(prompts, params, use_tqdm=False)
  elapsed = time.perf_counter() - t0
  import torch
  with open(out_path, "w") as f:
    json.dump(dict(elapsed_s=elapsed, warmup_s=warmup, version=vllm.__version__, torch_threads=torch.get_num_threads(),
                   tokens=[list(o.outputs[0].token_ids) for o in outs]), f)
