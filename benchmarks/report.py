"""Writes the README's figures from the committed results files (`benchmarks/results/*.json`).

Usage:
  python benchmarks/report.py            # rewrite the generated blocks of README.md in place
  python benchmarks/report.py --check    # exit 1 (and print a diff) if README.md differs from the files

Every table or sentence of figures in the README sits between `<!-- report:NAME -->` and
`<!-- /report:NAME -->`; the text between is what the block function `NAME` below renders from the
results files, so no figure in the README is typed by hand. `tests/test_readme_report.py` checks that
the committed README equals what this script writes.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"

_BLOCK = re.compile(r"(<!-- report:([a-z0-9-]+) -->\n)(.*?)(<!-- /report:\2 -->)", re.S)
BLOCKS: dict[str, Callable[[], str]] = {}


def block(fn: Callable[[], str]) -> Callable[[], str]:
  """Registers ``fn`` as the renderer of the README block named like it (underscores -> hyphens)."""
  BLOCKS[fn.__name__.replace("_", "-")] = fn
  return fn


def load(name: str) -> Any:
  """The parsed results file ``benchmarks/results/NAME``."""
  return json.loads((RESULTS / name).read_text())


def table(header: list[str], rows: list[list[Any]]) -> str:
  """A Markdown table."""
  lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def x(v: float, digits: int = 2) -> str:
  """A ratio as ``1.23x``."""
  return f"{v:.{digits}f}x"


def pct(v: float, digits: int = 1) -> str:
  return f"{100 * v:.{digits}f}%"


def span(values: list[float], fmt: str = "{:.2f}") -> str:
  """``lo-hi`` of ``values`` (one value when they agree at this precision)."""
  lo, hi = fmt.format(min(values)), fmt.format(max(values))
  return lo if lo == hi else f"{lo}-{hi}"


def _sentence(text: str) -> str:
  """``text`` with a capital first letter and a full stop."""
  return text[:1].upper() + text[1:] + "."


def machine_line(m: dict[str, Any]) -> str:
  """The machine a results file was measured on, from what it recorded."""
  cpu = m.get("cpu") or "CPU model not recorded"
  load = m.get("loadavg_at_start") or m.get("loadavg_before") or m.get("loadavg")
  end = m.get("loadavg_at_end") or m.get("loadavg_after")
  text = f"{cpu}"
  if m.get("isa") is not None:
    have = set(m["isa"])
    names = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512 BF16")) if flag in have]
    text += " (" + ", ".join((names or ["no AVX-512"]) + ["AMX" if "amx_bf16" in have else "no AMX"]) + ")"
  text += f", {m.get('cpus', m.get('cores', '?'))} cores"
  if load:
    text += f", load average {load[0]:.1f}" + (f" at the start, {end[0]:.1f} at the end" if end else "")
  return text


# Pruning ------------------------------------------------------------------------------------------


@block
def pruning() -> str:
  d = load("pruning.json")
  by = {(r["method"], r["target"]): r for r in d["table"]}
  methods = list(dict.fromkeys(r["method"] for r in d["table"]))
  targets = ["50%", "2:4", "4:8"]
  rows = [["dense", f"{d['dense']['perplexity']:.2f}", "", ""]]
  for m in methods:
    rows.append([m] + [f"{by[m, t]['perplexity']:.2f} ({by[m, t]['seconds']:.1f})" for t in targets])
  head = f"Measured on {d['machine']}; the whole run took {d['total_seconds'] / 60:.0f} minutes.\n\n"
  return head + table(["method", "50% ppl (s)", "2:4 ppl (s)", "4:8 ppl (s)"], rows)


@block
def pruning_notes() -> str:
  d = load("pruning.json")
  by = {(r["method"], r["target"]): r for r in d["table"]}
  return (f"SparseGPT's and Wanda's increase over dense at 50% is {by['sparsegpt', '50%']['increase_vs_magnitude']:.2f} "
          f"and {by['wanda', '50%']['increase_vs_magnitude']:.2f} of magnitude's; SparseGPT 2:4's is "
          f"{by['sparsegpt', '2:4']['increase_vs_magnitude']:.2f} of magnitude 2:4's. At 4:8 the MLP down projections "
          f"(172 inputs) stay dense, so the achieved sparsity is {by['sparsegpt', '4:8']['sparsity']:.3f}.\n")


@block
def recovery() -> str:
  d = load("pruning.json")
  r0 = d["recovery"][0]
  head = (f"Recovery (masked fine-tuning on the train text, AdamW with cosine decay, {r0['steps']} steps of "
          f"{r0['batch']} x {r0['seq_len']} tokens at learning rate {r0['lr']:g}, masks fixed):\n\n")
  rows = [[f"{r['method']} {r['target']}", f"{r['perplexity_before']:.2f}", f"{r['perplexity']:.2f}",
           f"{r['ratio_to_dense']:.3f}", r["pruned_weights_exactly_zero"]] for r in d["recovery"]]
  return head + table(["model", "before", "after", "after / dense", "pruned weights exactly zero"], rows)


@block
def hutchinson() -> str:
  h = load("pruning.json")["hutchinson_cost"]
  vec = max(h["vectorized"], key=int)
  return (f"Hutchinson's diagonal costs {h['vectorized'][vec]['per_probe']:.2f} gradient evaluations per probe "
          f"(vectorised over {vec} probes; {h['sequential']['1']['per_probe']:.2f} with one probe, "
          f"{h['sequential'][vec]['per_probe']:.2f} per probe for {vec} probes one at a time), measured against "
          f"the time of one gradient ({1000 * h['grad_seconds']:.0f} ms).\n")


@block
def structured() -> str:
  d = load("structured.json")["perplexity"]
  rows, by = d["rows"], {}
  for r in rows:
    by.setdefault(r["importance"], {})[r["ratio"]] = r
  ratios = sorted({r["ratio"] for r in rows})
  best = {q: min(r["perplexity_pruned"] for r in rows if r["ratio"] == q) for q in ratios}
  params = {q: next(r["parameters"] for r in rows if r["ratio"] == q) for q in ratios}

  def cell(r: dict[str, Any]) -> str:
    p = f"{r['perplexity_pruned']:.2f}"
    return (f"**{p}**" if r["perplexity_pruned"] == best[r["ratio"]] else p) + f" -> {r['perplexity_recovered']:.2f}"

  head = (f"Dense perplexity {d['dense']['perplexity']:.2f} with {d['dense']['parameters']:,} parameters; "
          + ", ".join(f"{params[q]:,} left at {100 * q:.0f}%" for q in ratios) + ". Bold: the best pruned "
          "perplexity at each ratio.\n\n")
  return head + table(["importance"] + [f"{100 * q:.0f}%: pruned -> LoRA" for q in ratios],
                      [[imp] + [cell(by[imp][q]) for q in ratios] for imp in by])


@block
def structured_reference() -> str:
  ref = load("structured.json")["reference"]
  parts = [f"{name} {span(v)}" + (f" over {len(v)} runs" if len(v) > 1 else "") for name, v in ref.items()]
  return ("With the issue's reference protocol (20% of MLP channels, 10 windows of 64 tokens; calibration "
          "draws or seeds varied): " + ", ".join(parts) + ".\n")


@block
def structured_throughput() -> str:
  d = load("structured_throughput.json")
  rows = [[r["model"], f"{r['dense_tokens_per_s']:.0f}", f"{r['pruned_tokens_per_s']:.0f}", x(r["speedup"]),
           x(r["speedup_cpu_time"])] for r in d["throughput"]]
  notes = " ".join(
      f"The {r['rounds']} turns of {r['model']} ranged {span(r['dense_tokens_per_s_runs'], '{:.0f}')} (dense) and "
      f"{span(r['pruned_tokens_per_s_runs'], '{:.0f}')} tok/s (pruned), load average "
      f"{r['loadavg'][0]:.1f} at the end." for r in d["throughput"])
  return (f"Measured on {d['machine']}.\n\n"
          + table(["model", "dense tok/s", "pruned tok/s", "speedup (wall)", "speedup (tokens per CPU second)"],
                  rows) + "\n" + notes + "\n")


# Serving ------------------------------------------------------------------------------------------


@block
def serving() -> str:
  d = load("serving.json")
  j, t, v = d["jaxserve"], d.get("transformers", {}), d.get("vllm", {})
  base = t.get("tok_s")

  def vs_hf(tok_s: float) -> str:
    return x(tok_s / base, 1) if base else "-"

  rows = [["jaxserve, float32 (paged; C++ attention and matmul kernels on CPU)", f"{j['tok_s']:.0f}", vs_hf(j["tok_s"])]]
  bf = d.get("jaxserve_bfloat16")
  if bf:
    rows.append(["jaxserve, bfloat16", f"{bf['tok_s']:.0f}", vs_hf(bf["tok_s"])])
  if base:
    rows.append([f"transformers `generate`, float32 (padded batches of {t['batch_size']})", f"{base:.0f}", "1.0x"])
  if "tok_s" in v:
    binds = ", ".join(f"{k}: {s:.0f}" for k, s in v.get("tok_s_by_bind", {}).items())
    rows.append([f"vLLM {v['version']} CPU backend, float32 (threads {binds})", f"{v['tok_s']:.0f}", vs_hf(v["tok_s"])])
  vb = d.get("vllm_bfloat16", {})
  if "tok_s" in vb:
    rows.append([f"vLLM {v['version']} CPU backend, bfloat16 (threads {vb['threads_bind']})", f"{vb['tok_s']:.0f}",
                 vs_hf(vb["tok_s"])])
  m = d["machine"]
  head = (f"Measured on {machine_line(m)}" + (f", code of commit {d['git_commit']}" if d.get("git_commit") else "")
          + "; greedy tokens equal to jaxserve's float32: "
          + (", ".join(f"{k} {100 * s:.0f}%" for k, s in d["greedy_match_vs_jaxserve"].items()) or "no other engine")
          + ".\n\n")
  out = head + table(["engine", "steady output tok/s", "x transformers"], rows)
  notes = []
  if "tok_s" in v:
    notes.append(f"jaxserve made {x(j['tok_s'] / v['tok_s'])} vLLM's steady throughput; the timed passes took "
                 f"{span(j['runs_s'])} s (jaxserve) and {span(v['runs_s'])} s (vLLM).")
  else:
    notes.append(f"vLLM did not run in this measurement ({v.get('error', 'no result')}), so there is no vLLM figure "
                 f"from this run of the code.")
  if bf:
    notes.append(f"bfloat16 made {x(d['bfloat16_over_float32'])} float32's throughput; its greedy tokens equal "
                 f"float32's for {100 * bf['greedy_match_vs_float32']:.0f}% of the requests"
                 + (f" and transformers' bfloat16 (one request at a time) for "
                    f"{bf['greedy_equal_to_transformers_bfloat16']} of {d['num_requests']}"
                    if "greedy_equal_to_transformers_bfloat16" in bf else "")
                 + (f" and vLLM's bfloat16 for {bf['greedy_equal_to_vllm_bfloat16']} of {d['num_requests']}"
                    if "greedy_equal_to_vllm_bfloat16" in bf else "") + ".")
    hb = d.get("transformers_bfloat16", {})
    if "greedy_equal_to_transformers_bfloat16" in vb or any(
        k in hb for k in ("greedy_equal_to_transformers_float32", "batch16_greedy_equal_to_batch1")):
      notes.append("For scale, the reference engines agree no better in bfloat16 on this random-weight model: "
                   + " and ".join(
                       (([f"vLLM's bfloat16 tokens equal transformers' bfloat16 for "
                          f"{vb['greedy_equal_to_transformers_bfloat16']} of {d['num_requests']}"]
                         if "greedy_equal_to_transformers_bfloat16" in vb else [])
                        + ([f"transformers' own bfloat16 tokens equal its float32 ones for "
                            f"{hb['greedy_equal_to_transformers_float32']} of {d['num_requests']}"]
                           if "greedy_equal_to_transformers_float32" in hb else [])
                        + ([f"transformers' bfloat16 tokens in batches of 16 (left-padded) equal its own one "
                            f"request at a time for {hb['batch16_greedy_equal_to_batch1']} of {d['num_requests']}"]
                           if "batch16_greedy_equal_to_batch1" in hb else []))) + ".")
    if "tok_s" in vb:
      notes.append(f"jaxserve in bfloat16 made {x(bf['tok_s'] / vb['tok_s'])} vLLM's bfloat16 throughput.")
  out += "\n" + " ".join(notes) + "\n"
  tl = d.get("timeline")
  if tl:
    trow = []
    for name, r in tl.items():
      def f(k: str, fmt: str = "{:.1f}") -> str:
        return fmt.format(r[k]) if r.get(k) is not None else "-"
      trow.append([name.replace("_", " "), f("construction_s"), f("first_pass_s", "{:.2f}"),
                   f("first_pass_tok_s", "{:.0f}"), f("steady_tok_s", "{:.0f}"), f("first_over_steady", "{:.2f}"),
                   f("construction_plus_first_s")])
    out += ("\nThe timeline of the same run (seconds; the first process starts with an empty compilation cache, the "
            "second process with the first one's):\n\n"
            + table(["engine", "construction s", "first pass s", "first pass tok/s", "steady tok/s", "first / steady",
                     "construction + first pass s"], trow))
    sp = tl.get("jaxserve_second_process")
    if sp:
      out += (f"\nThe second process loaded {sp['cache_hits']} programs from the cache and took "
              f"{x(sp['over_first_process'])} the first process's construction + first pass; same tokens: "
              f"{sp['same_tokens']}.\n")
  return out


@block
def serving_amx() -> str:
  d = load("serving_amx.json")
  j, v, bf, vb = d["jaxserve"], d.get("vllm", {}), d.get("jaxserve_bfloat16", {}), d.get("vllm_bfloat16", {})
  tl = d["timeline"]
  parts = [f"float32 jaxserve {j['tok_s']:.0f} tok/s"]
  if "tok_s" in v:
    parts[-1] += f" against vLLM's {v['tok_s']:.0f} ({x(j['tok_s'] / v['tok_s'])})"
  if "tok_s" in bf:
    parts.append(f"bfloat16 {bf['tok_s']:.0f}" + (f" against {vb['tok_s']:.0f} ({x(bf['tok_s'] / vb['tok_s'])})"
                                                  if "tok_s" in vb else "")
                 + f", {x(d['bfloat16_over_float32'])} its float32")
  if "vllm" in tl:
    a, b = tl["jaxserve"]["construction_plus_first_s"], tl["vllm"]["construction_plus_first_s"]
    parts.append(f"construction + first pass {a:.1f} s against {b:.1f} s ({x(a / b)})")
  if "jaxserve_second_process" in tl:
    parts.append(f"a second process {x(tl['jaxserve_second_process']['over_first_process'])} the first's")
  if "greedy_equal_to_transformers_bfloat16" in bf:
    parts.append(f"bfloat16 greedy tokens equal to transformers' bfloat16 for {bf['greedy_equal_to_transformers_bfloat16']}"
                 f" of {d['num_requests']}")
  return (f"The same benchmark on the Xeon VM with AMX (`benchmarks/results/serving_amx.json`: "
          f"{machine_line(d['machine'])}, code of commit {d['git_commit']}): " + "; ".join(parts) + ".\n")


@block
def step_breakdown() -> str:
  cols = ["C++ kernel", "XLA loops", "no attention", "no attention, no KV write"]
  rows, tails, head = [], [], ""
  for name in ("step_breakdown.json", "step_breakdown_bfloat16.json"):
    if not (RESULTS / name).exists():
      continue
    d = load(name)
    dt = d.get("dtype", "float32")
    dec, pre, mm = d["decode_ms"], d["prefill_ms"], d["decode_matmul_ms"]
    rows += [[f"{dt}: decode, batch 64, mean context {d['decode_mean_context']:.0f}"] + [f"{dec[c]:.1f} ms" for c in cols],
             [f"{dt}: prefill, 2048 tokens"] + [f"{pre[c]:.0f} ms" if c in pre else "-" for c in cols]]
    head += (f"{dt}: median of {d['reps']}, measured on {d.get('cpu', 'a CPU whose model the file does not record')}, "
             f"load average {d['loadavg'][0]:.1f}. ")
    tails.append(
        f"In {dt}, attention reads the decodes' {d['kv_bytes'] / 1e6:.0f} MB of K/V at "
        f"{d['attention_read_GBps']['C++ kernel']:.1f} GB/s with the kernel (including its K/V write) and "
        f"{d['attention_read_GBps']['XLA loops']:.1f} GB/s with XLA's loops (a plain read of the same bytes: "
        f"{d['plain_read_GBps']:.1f} GB/s); "
        + f"the prefill step without attention or K/V write runs its matmuls at "
        f"{d['prefill_matmul_GFLOPs']:.0f} GFLOP/s (the elementwise work between them included); "
        "a decode step of " + ", ".join(mm) + " sequences takes "
        + " / ".join(f"{mm[b]['packed C++ matmul']:.1f}" for b in mm) + " ms with the packed matmul and "
        + " / ".join(f"{mm[b]['XLA matmul']:.1f}" for b in mm) + " ms with XLA's.")
  return head.strip() + "\n\n" + table(["step (serving model)"] + cols, rows) + "\n" + " ".join(tails) + "\n"


@block
def attention_cpu() -> str:
  d = load("attention_cpu.json")
  head = (f"Measured on {d['cpu']}, {d['cpus']} cores, load average {d['loadavg'][0]:.1f}; the fused K/V-write and "
          f"attention call of a decode step alone, batch {d['batch']}, mean context {d['mean_context']:.0f}, "
          f"{d['layers']} layers, {d['threads'] or 'XLA pool'} threads, median of {d['reps']} interleaved runs"
          + (f", against the kernel of `{d['baseline_commit']}`" if d.get("baseline_commit") else "") + ":")
  rows = []
  for dt, r in d["results"].items():
    old = r["ms"].get("old")
    rows.append([dt, f"{r['kv_bytes'] / 1e6:.0f} MB", f"{old:.1f} ms" if old else "-", f"{r['ms']['new']:.1f} ms",
                 x(r["old_over_new"]) if "old_over_new" in r else "-", f"{r['GBps']['new']:.1f} GB/s",
                 f"{r['GBps']['plain read']:.1f} GB/s",
                 f"{r['max_abs_diff_old_new']:.1e}" if "max_abs_diff_old_new" in r else "-"])
  return head + "\n\n" + table(["pools", "K/V read", "old kernel", "this kernel", "old / this", "this kernel reads",
                                  "plain read of the same bytes", "largest output difference"], rows)


@block
def sampler_cpu() -> str:
  d = load("sampler_cpu.json")
  m = d["machine"]
  head = (f"Measured on {machine_line(m)}, code at `{d['commit']}`; temperature {d['temperature']}, every row sampling "
          f"with the case's settings, median of {d['reps']} calls"
          + (f", against the sampler of `{d['baseline_rev']}` in the same process" if d.get(
              "baseline_rev") else "") + ":")
  vocabs = sorted({r["vocab"] for r in d["rows"]})
  cases = list(dict.fromkeys(r["case"] for r in d["rows"]))
  rows = []
  for case in cases:
    for n in sorted({r["rows"] for r in d["rows"] if r["case"] == case}):
      line = [case, str(n)]
      for v in vocabs:
        r = next((r for r in d["rows"] if (r["case"], r["rows"], r["vocab"]) == (case, n, v)), None)
        if r is None:
          line += ["-", "-"]
          continue
        old = r.get("baseline_ms")
        line += [f"{old:.1f} -> {r['ms']:.1f} ms" if old is not None else f"{r['ms']:.1f} ms",
                 x(r["speedup"]) if "speedup" in r else "-"]
      rows.append(line)
  same = all(r.get("same_tokens", r["rows"]) == r["rows"] for r in d["rows"])
  header = ["case", "rows"] + [h for v in vocabs for h in (f"V = {v:,}: old -> new", "speed-up")]
  return (head + "\n\n" + table(header, rows) + "\n"
          + ("The sampled tokens were the same in every case." if same else
             "The sampled tokens differed in some cases (see the JSON).") + "\n")


@block
def kv_memory() -> str:
  d = load("serving.json")
  s, p, b, n4 = d["jaxserve"]["stats"], d["kv_waste_paper_lengths"], d["kv_budget"], d["n4_sharing"]
  rows = [
      [f"waste (allocated slots holding no token), block size {s['kv_block_size']}", pct(s["kv_waste_fraction"]),
       f"{pct(s['kv_contiguous_waste_fraction'])} (reserved for {d['max_model_len']} tokens)"],
      ["waste, block size 8", pct(d["kv_waste_block8"]), "-"],
      [f"waste, block size {p['block_size']}, the vLLM paper's ShareGPT lengths (mean {p['mean_prompt_len']:.0f} in, "
       f"{p['mean_output_len']:.0f} out; {p['num_requests']} requests)", pct(p["kv_waste_fraction"]),
       f"{pct(p['kv_contiguous_waste_fraction'])} (reserved for {p['max_model_len']})"],
      [f"sequences running at once in {b['budget_tokens']:,} KV slots", b["paged_peak_running_seqs"], b["contiguous_seqs"]],
      [f"`n=4` on a {n4['prompt_len']}-token prompt: blocks after prefill", n4["n4"]["blocks_after_prefill"],
       f"{n4['separate']['blocks_after_prefill']} (four requests): {n4['ratio_after_prefill']:.2f}"],
  ]
  tail = (f"\nA live sequence of this workload holds {s['kv_mean_tokens_per_seq']:.0f} tokens on average; "
          f"`kv_waste_floor_fraction` (the waste if only blocks holding a token were allocated) is "
          f"{pct(s['kv_waste_floor_fraction'])}, equal to the measured waste.\n")
  return table(["KV figure", "paged", "contiguous reservation"], rows) + tail


def _sparse_rows(d: dict[str, Any]) -> list[list[str]]:
  rows = []
  for name, v in d["variants"].items():
    dense = name == "dense"
    label = {"50%": "50% unstructured", "70%": "70% unstructured"}.get(name, name)

    def rel(ms: float, sp: float) -> str:
      return f"{ms:.2f} ms" + ("" if dense else f" ({x(sp)})")

    rows.append([label, x(v["kernel_bytes_vs_dense"], 3), x(v["weight_bytes_vs_dense"], 3), x(v["disk_bytes_vs_dense"], 3),
                 rel(v["step_b1_ms"], v["speedup_b1"]), rel(v["step_b8_ms"], v["speedup_b8"]),
                 f"{v['tok_s']:.0f}" + ("" if dense else f" ({x(v['speedup_serving'])})"),
                 v.get("same_tokens_as_dense_run", "-")])
  if "no_blocks_step_b1_ms" in d:
    rows.append(["no blocks", "-", "-", "-", f"{d['no_blocks_step_b1_ms']:.2f} ms", f"{d['no_blocks_step_b8_ms']:.2f} ms",
                 "-", "-"])
  return rows


@block
def sparse_serving() -> str:
  d = load("sparse_serving.json")
  head = f"Measured on {machine_line(d['machine'])}, with the benchmark running:\n\n"
  t = table(["model", "block kernels, bytes", "all weights", "on disk", "decode step, batch 1", "batch 8",
             "serving tok/s", "tokens = dense run"], _sparse_rows(d))
  v = d["variants"]
  share = []
  for b in ("b1", "b8"):
    nb = d[f"no_blocks_step_{b}_ms"]
    dense = v["dense"][f"step_{b}_ms"] - nb
    share.append(f"{dense:.2f} ms dense, " + ", ".join(
        f"{v[k][f'step_{b}_ms'] - nb:.2f} ms {k} ({x(dense / (v[k][f'step_{b}_ms'] - nb))})" for k in v if k != "dense")
        + f" at batch {b[1:]}")
  tail = (f"\nWithout the no-blocks part, the blocks' share of a decode step is {share[0]}; and {share[1]}. "
          f"A second run (`benchmarks/results/sparse_serving_repeat.json`, {_sparse_run(load('sparse_serving_repeat.json'))}"
          f") gave {_sparse_ratios(load('sparse_serving_repeat.json'))} (decode batch 1 / batch 8 / serving).\n")
  return head + t + tail


def _sparse_ratios(r: dict[str, Any]) -> str:
  return "; ".join(f"{k} " + " / ".join(x(r["variants"][k][f]) for f in ("speedup_b1", "speedup_b8", "speedup_serving"))
                   for k in r["variants"] if k != "dense")


def _sparse_run(r: dict[str, Any]) -> str:
  return machine_line(r["machine"]) + (f", commit {r['git_commit']}" if r.get("git_commit") else "")


@block
def sparse_serving_amx() -> str:
  runs = [(name, load(name)) for name in ("sparse_serving_amx.json", "sparse_serving_amx_repeat.json")]
  return ("Two earlier runs on the Xeon VM with AMX (" + " and ".join(
      f"`benchmarks/results/{name}`: {_sparse_run(r)}" for name, r in runs) + ") gave, decode batch 1 / batch 8 / "
      "serving: " + " and ".join(_sparse_ratios(r) for _, r in runs) + "; kernel bytes: "
      + ", ".join(f"{k} {x(v['kernel_bytes_vs_dense'], 3)}" for k, v in runs[0][1]["variants"].items() if k != "dense")
      + ".\n")


@block
def sparse_matmul() -> str:
  d = load("sparse_matmul_cpu.json")
  forms = ["dense", "2:4", "bitmask 50%", "bitmask 70%"]
  rows = []
  for r in d["rows"]:
    if r["threads"] != 0 or r["mode"] != "rotating":  # threads 0: XLA's intra-op pool, as in the engine
      continue
    rows.append([f"{r['K']} x {r['N']}, {r['M']}", f"{r['us']['dense']:.1f}"]
                + [f"{r['us'][f]:.1f} ({x(r['speedup'][f])})" for f in forms[1:]])
  head = (f"Measured on {d['cpu']}, {d['cores']} cores, load average {d['loadavg_before'][0]:.1f} before and "
          f"{d['loadavg_after'][0]:.1f} after; median of {d['calls']} calls, microseconds, speedup over the dense "
          "packed kernel, XLA's thread pool, kernels called in turn (\"rotating\"):\n\n")
  return head + table(["K x N, rows"] + forms, rows)


@block
def server_load() -> str:
  d = load("server_load.json")
  env = d["env"]

  def ms(p: dict[str, Any], k: str) -> str:
    return " / ".join(f"{p[f'{k}_p{q}_ms']:.0f}" if k == "ttft" else f"{p[f'{k}_p{q}_ms']:.1f}" for q in (50, 90, 99))

  cpu_col = any("server_cpu_ms_per_output_token" in p for p in d["server_passes"])

  def cpu(p: dict[str, Any]) -> list[str]:
    return [f"{p['server_cpu_ms_per_output_token']:.2f}" if "server_cpu_ms_per_output_token" in p else "-"] if cpu_col else []

  rows = []
  for i, p in enumerate(d["server_passes"]):
    rows.append([f"server, timed pass {i + 1}", f"{p['requests_per_s']:.1f}", f"{p['output_tokens_per_s']:.0f}",
                 ms(p, "ttft"), ms(p, "itl")] + cpu(p) + [f"{p['equal_to_offline']}/{d['requests']}"])
  for i, p in enumerate(d["offline_passes"]):
    rows.append([f"offline `LLM.generate`, pass {i + 1}", f"{p['requests_per_s']:.1f}", f"{p['output_tokens_per_s']:.0f}",
                 "-", "-"] + (["-"] if cpu_col else []) + [f"{p['equal_to_first_pass']}/{d['requests']}"])
  head = (f"{d['clients']} streaming clients, {d['requests']} requests, {d['model']}, {d['workload']['sampling']}; "
          f"measured on {machine_line(env)}, code of "
          f"commit {env['git_commit']}:\n\n")
  return head + table(["", "req/s", "out tok/s", "TTFT p50/p90/p99 ms", "ITL p50/p90/p99 ms"]
                      + (["server CPU ms / token"] if cpu_col else []) + ["equal to offline greedy"], rows)


@block
def abuse() -> str:
  d = load("abuse.json")
  rows = [[f"`{c['case']}`", c["status"], "yes" if c["expected"] else "**no**",
           f"{c['streams_equal']}/{c['streams']}", f"{c['longest_gap_s']:.2f}", "yes" if c["healthy_after"] else "**no**",
           c["detail"][:90].replace("|", "/")] for c in d["cases"]]
  head = (f"{d['streams']} greedy streams of {d['stream_max_tokens']} tokens in flight during each case; {d['model']}; "
          f"measured on {d['cpu']}, {d['cpu_count']} cores, load average {d['load_average_before'][0]:.1f} before and "
          f"{d['load_average_after'][0]:.1f} after, code of commit {d['commit']}; tracebacks in the server log: "
          f"{d['tracebacks_in_server_log']}.\n\n")
  return head + table(["case", "status", "as expected", "streams equal to `LLM.generate`", "longest gap between chunks s",
                       "/health after", "detail"], rows)


@block
def online_serving() -> str:
  d = load("online_serving.json")
  w = d["workload"]
  rows = [[r["server"], r["concurrency"], f"{r['output_throughput']:.0f}",
           " / ".join(f"{r[k]:.0f}" for k in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms")), f"{r['mean_tpot_ms']:.1f}",
           " / ".join(f"{r[k]:.1f}" for k in ("median_itl_ms", "p99_itl_ms")),
           ", ".join(f"{t:.0f}" for t in r["warmup_output_throughput"]), "yes" if r["chunks_equal_tokens"] else "**no**"]
          for r in d["rows"]]
  by = {(r["server"], r["concurrency"]): r for r in d["rows"]}
  ratios = [f"at concurrency {c}: jaxserve {x(by['jaxserve', c]['output_throughput'] / by['vllm', c]['output_throughput'])} "
            f"vLLM's output tok/s, TTFT mean {x(by['jaxserve', c]['mean_ttft_ms'] / by['vllm', c]['mean_ttft_ms'])}, "
            f"TPOT mean {x(by['jaxserve', c]['mean_tpot_ms'] / by['vllm', c]['mean_tpot_ms'])}"
            for c in d["concurrency"] if ("jaxserve", c) in by and ("vllm", c) in by]
  head = (f"`vllm bench serve` ({d['client']} client), random dataset, {w['num_prompts']} prompts of {w['input_len']} "
          f"tokens, {w['output_len']} output tokens, ignore_eos, {d['dtype']}; {d['warmups']} warm-up run, then the median "
          f"of {d['runs_per_row']} runs; jaxserve {d['versions']['jaxserve']}, vLLM {d['versions'].get('vllm', '-')}; "
          f"measured on {machine_line(d)}, code of commit {d['git_commit']}:\n\n")
  return (head + table(["server", "concurrency", "output tok/s", "TTFT mean / median / p99 ms", "TPOT mean ms",
                        "ITL median / p99 ms", "warm-up run tok/s", "a chunk per token"], rows)
          + (f"\n{_sentence('; '.join(ratios))}\n" if ratios else ""))


# GPU ----------------------------------------------------------------------------------------------


@block
def kernel_gpu() -> str:
  d = load("kernel_gpu.json")
  s, env = d["env"]["setup"], d["env"]
  rows, faster_op = [], []
  for r in d["decode"]:
    k, xr, op = r["kernel"], r["xla_reference"], r["jax_op"]
    rows.append([r["batch"], r["context"], f"{k['us']:.1f}", f"{k['GBps']:.0f} ({k['GBps'] / d['copy_bandwidth']['GBps']:.0%})",
                 f"{xr['us']:.1f}", f"{op['us']:.1f}", x(xr["us"] / k["us"])])
    faster_op.append(k["us"] <= op["us"])
  checks = sum(c["ok"] for c in d["correctness"])
  head = (f"Measured on one {env['device_kind']} (jax {env['jax']}; {s['num_heads']} query heads, {s['num_kv_heads']} KV "
          f"heads, head_dim {s['head_dim']}, page size {s['page_size']}, {s['dtype']}; {checks} of "
          f"{len(d['correctness'])} correctness checks passed; copy bandwidth {d['copy_bandwidth']['GBps']:.0f} GB/s "
          f"read + write). Time per decode call, median of {s['reps']}, microseconds:\n\n")
  tail = (f"\nThe kernel is faster than JAX's own Pallas op in {sum(faster_op)} of {len(faster_op)} cases and faster "
          f"than XLA's gather path in {sum(r['xla_reference']['us'] > r['kernel']['us'] for r in d['decode'])} of "
          f"{len(d['decode'])}.\n")
  return head + table(["batch", "context", "Pallas kernel", "GB/s (% of copy)", "XLA reference", "`jax.experimental` op",
                       "kernel vs XLA"], rows) + tail


@block
def engine_gpu() -> str:
  d = load("engine_gpu.json")
  rows = {r["engine"]: r for r in d["rows"]}
  p, xl, t = rows["jaxserve pallas"], rows["jaxserve xla"], rows["transformers (batch 1)"]
  head = (f"On one {d['env']['device']} (jax {d['env']['jax']}), {p['tok_s'] * p['elapsed_s']:,.0f} output tokens, the "
          f"Pallas backend ran {x(p['tok_s'] / xl['tok_s'], 1)} faster than XLA attention; greedy tokens equal "
          + ", ".join(f"{k.replace('_vs_', ' vs ')} {100 * v:.0f}%" for k, v in d["match"].items()) + ":\n\n")
  return head + table(["engine", "output tok/s", "warm-up (compiles) s"], [
      ["jaxserve, `attention_backend=\"pallas\"` (the default on GPU)", f"{p['tok_s']:.0f}", f"{p['warmup_s']:.0f}"],
      ["jaxserve, `attention_backend=\"xla\"`", f"{xl['tok_s']:.0f}", f"{xl['warmup_s']:.0f}"],
      ["`transformers` `generate`, one request at a time", f"{t['tok_s']:.0f}", "-"]])


@block
def memory_plan() -> str:
  d = load("memory_plan.json")
  rows = [[r["model"], r["tp"], f"{r['weights_gib']:.1f}", f"{r['kv_pool_gib']:.1f}", f"{r['activations_gib']:.2f}",
           f"{r['total_gib']:.1f}", f"{r['kv_heads_per_device']:.0f}"] for r in d["rows"]]
  return (f"A KV pool for {d['kv_tokens']:,} cached tokens, a step of {d['step_tokens']:,} batched tokens, bfloat16:\n\n"
          + table(["model", "TP", "weights GiB", "KV pool GiB", "activations GiB", "total GiB", "KV heads / device"], rows))


# Driver -------------------------------------------------------------------------------------------


def render(text: str) -> str:
  """``text`` with every generated block re-rendered; an unknown block name is an error."""

  def sub(m: re.Match[str]) -> str:
    name = m.group(2)
    if name not in BLOCKS:
      raise KeyError(f"README block {name!r} has no renderer; known: {sorted(BLOCKS)}")
    return m.group(1) + BLOCKS[name]() + m.group(4)

  return _BLOCK.sub(sub, text)


def blocks_in(text: str) -> list[str]:
  return [m.group(2) for m in _BLOCK.finditer(text)]


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--check", action="store_true", help="only compare; exit 1 when README.md differs")
  ap.add_argument("--readme", type=Path, default=README)
  args = ap.parse_args(argv)
  old = args.readme.read_text()
  new = render(old)
  missing = sorted(set(BLOCKS) - set(blocks_in(old)))
  if missing:
    print(f"blocks not placed in {args.readme}: {missing}", file=sys.stderr)
  if args.check:
    if new != old:
      sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), "README.md", "generated"))
      return 1
    return 1 if missing else 0
  args.readme.write_text(new)
  print(f"wrote {len(blocks_in(new))} blocks into {args.readme}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
