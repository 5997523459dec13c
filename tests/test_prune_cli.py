"""The prune / finetune / demo subcommands end to end on the embedded stories260K, and their input checks."""

import json

import numpy as np
import pytest

from jaxprune import checkpoint
from jaxprune.cli import main
from jaxserve import LLM, SamplingParams, weights
from jaxserve.engine import _cpu_kernels
from jaxserve.loaders import EVAL_TEXT, load_model


def _json(capsys):
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_prune_then_eval_then_finetune(tmp_path, capsys):
  out = str(tmp_path / "p")
  assert main(["prune", "--method", "wanda", "--pattern", "2:4", "--nsamples", "4", "--seq-len", "64",
               "--out", out, "--json"]) == 0
  rep = _json(capsys)
  assert rep["sparsity"] == 0.5 and rep["pattern"] == "2:4" and rep["dense_leaves"] == []
  assert main(["eval", "--model", out, "--max-windows", "4", "--json"]) == 0
  ppl = _json(capsys)["perplexity"]
  assert 4.5 < ppl < 1000
  ck = checkpoint.restore(out)
  w = np.asarray(ck.params["layers_2"]["mlp"]["gate_proj"]["kernel"])
  np.testing.assert_array_equal((w.reshape(-1, 4, w.shape[1]) != 0).sum(1), 2)
  # the directory holds the kernels compressed, and jaxserve serves them so
  assert isinstance(load_model(out).params["layers_2"]["mlp"]["gate_proj"]["kernel"], weights.NMSparse)
  llm = LLM(model=out, max_model_len=64, num_kv_blocks=16, max_num_seqs=2)
  if _cpu_kernels.available():
    # per block: q/k/v joined, o, gate, up, down (gate/up have 172 columns, not a multiple of the
    # 16-lane panel, so they cannot be joined)
    assert llm.stats()["weight_formats"]["2:4"] == 5 * 5
  text = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
  assert len(text.outputs[0].token_ids) == 8
  ft_out = str(tmp_path / "ft")
  assert main(["finetune", "--model", out, "--finetune-steps", "30", "--finetune-batch-size", "4",
               "--finetune-seq-len", "64", "--out", ft_out, "--json"]) == 0
  ft = _json(capsys)
  assert ft["sparsity"] == 0.5
  back = load_model(ft_out, dense=True)
  w2 = np.asarray(back.params["layers_2"]["mlp"]["gate_proj"]["kernel"])
  assert (w2[w == 0] == 0).all() and not np.array_equal(w2, w)  # trained, zeros kept
  assert checkpoint.restore(ft_out).metadata["method"] == "wanda"


@pytest.mark.parametrize("argv,match", [
    (["--method", "magnitude", "--sparsity", "1.2"], "sparsity must be in"),
    (["--method", "sparsegpt", "--pattern", "4:4"], "0 < N < M"),
    (["--method", "sparsegpt", "--pattern", "2:4", "--calib", "/nonexistent.txt"], "cannot read"),
    (["--method", "magnitude", "--sparsity", "0.5", "--eval", "--calib", EVAL_TEXT, "--finetune-steps", "5"],
     "same file"),
    (["--method", "magnitude", "--sparsity", "0.5", "--finetune-steps", "-1"], "finetune-steps"),
])
def test_bad_arguments_fail_before_work(tmp_path, capsys, argv, match):
  assert main(["prune", *argv, "--out", str(tmp_path / "o")]) == 2
  assert match in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


def test_demo_prints_the_table(capsys):
  assert main(["demo", "--nsamples", "4", "--seq-len", "64", "--eval-windows", "2", "--max-new-tokens", "4",
               "--json"]) == 0
  rows = _json(capsys)["rows"]
  assert [r["model"] for r in rows] == ["dense", "sparsegpt 50%", "sparsegpt 2:4"]
  assert rows[0]["sparsity"] == 0 and rows[1]["sparsity"] == 0.5 and rows[2]["sparsity"] == 0.5
  assert rows[0]["perplexity"] < rows[1]["perplexity"]
  assert all(r["text"].startswith("Once upon a time") for r in rows)
  assert all(r["decode_tok_s"] > 0 for r in rows)
  assert rows[1]["weight_bytes"] < rows[0]["weight_bytes"] and rows[2]["weight_bytes"] < rows[0]["weight_bytes"]
