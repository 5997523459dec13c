"""Bad input to structured pruning: a clear ValueError before any gradient is computed or any file is written."""

import subprocess
import sys

import numpy as np
import pytest

import jaxprune.structured._strategy as strategy
from jaxprune.structured import Importance, StructuredConfig, prune_structured
from jaxserve.testing import tiny_model


@pytest.fixture
def no_work(monkeypatch):
  """Fails the test if any calibration gradient or scoring starts."""
  def boom(*args, **kwargs):
    raise AssertionError("work started before the input was checked")
  monkeypatch.setattr(strategy, "calibration_gradients", boom)
  monkeypatch.setattr(strategy, "unit_scores", boom)


def _windows(cfg):
  w = np.random.default_rng(0).integers(3, cfg.vocab_size, (4, 9)).astype(np.int32)
  w[:, 0] = 1
  return w


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1, float("nan"), "half"])
def test_ratio_outside_unit_interval(ratio):
  with pytest.raises(ValueError, match=r"pruning ratio must be .*\[0, 1\)"):
    StructuredConfig(ratio=ratio)


@pytest.mark.parametrize("kwargs,message", [
    (dict(attention_layers=(0, 5)), r"attention layer range \[0, 5\) is outside the model's layers \[0, 3\]"),
    (dict(mlp_layers=(2, 1)), r"MLP layer range \[2, 1\) is outside"),
    (dict(mlp_layers=(-1, 2)), r"MLP layer range \[-1, 2\) is outside"),
    (dict(ratio=0.9), r"would remove every one of the 4 KV groups .* of layer 0"),
    (dict(ratio=0.1), r"incompatible with the GQA grouping of layer 0: .* removes less than one"),
    (dict(ratio=0.6, attention_unit="query_head", num_kv_heads=8),
     r"would remove every one of the 1 query heads per KV group"),
    (dict(ratio=0.6, mode="channel", round_to=64), r"every one of the 64 hidden channels"),
    (dict(ratio=0.5, mode="layer", keep_layers=0), r"keep_layers must be in \[1, 3\]"),
    (dict(ratio=0.9, mode="layer"), r"every one of the 3 blocks"),
    (dict(ratio=0.99, mlp_layers=(0, 0), scope="global", attention_layers=None), r"global ranking would remove"),
])
def test_infeasible_requests_fail_before_work(no_work, kwargs, message):
  kv = kwargs.pop("num_kv_heads", 4)
  cfg, params = tiny_model(num_heads=8, num_kv_heads=kv, num_layers=3)
  sc = StructuredConfig(**{"ratio": 0.5, "importance": Importance(kind="taylor"), **kwargs})
  with pytest.raises(ValueError, match=message):
    prune_structured(params, cfg, sc, _windows(cfg))


@pytest.mark.parametrize("windows,message", [
    (None, "Taylor importance needs calibration data"),
    (np.zeros((0, 9), np.int32), "non-empty integer array"),
    (np.zeros((4, 9), np.float32), "non-empty integer array"),
    (np.full((4, 9), 999, np.int32), r"token ids must be in \[0, 128\)"),
])
def test_bad_calibration_fails_before_work(no_work, windows, message):
  cfg, params = tiny_model(num_heads=8, num_kv_heads=4)
  with pytest.raises(ValueError, match=message):
    prune_structured(params, cfg, StructuredConfig(ratio=0.5), windows)


def test_nan_weights_and_bad_options(no_work):
  cfg, params = tiny_model(num_heads=8, num_kv_heads=4)
  params["layers_0"]["mlp"]["up_proj"]["kernel"] = params["layers_0"]["mlp"]["up_proj"]["kernel"].at[0, 0].set(np.nan)
  with pytest.raises(ValueError, match="NaN"):
    prune_structured(params, cfg, StructuredConfig(ratio=0.5, importance=Importance(kind="l2")))
  with pytest.raises(ValueError, match="mode must be one of"):
    StructuredConfig(ratio=0.5, mode="neurons")
  with pytest.raises(ValueError, match="keep_layers applies to mode='layer' only"):
    StructuredConfig(ratio=0.5, keep_layers=2)
  with pytest.raises(ValueError, match="scope='global' .* mode='block' only"):
    StructuredConfig(ratio=0.5, mode="channel", scope="global")


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "jaxprune.cli", "prune-structured", *args], capture_output=True,
                        text=True)


@pytest.mark.parametrize("args,message", [
    (["--pruning-ratio", "1.5"], r"pruning ratio must be in \[0, 1\), got 1.5"),
    (["--pruning-ratio", "0.25", "--block-attention-layer-end", "9"], r"attention layer range \[0, 9\) is outside"),
    (["--pruning-ratio", "0.25", "--block-mlp-layer-start", "1", "--block-mlp-layer-end", "3",
      "--hf-out", "HF"], "a Hugging Face config needs every layer"),
    (["--pruning-ratio", "0.9"], "would remove every one of the 4 KV groups"),
    (["--pruning-ratio", "0.25", "--calib", "/nonexistent.txt"], "cannot read calibration text"),
])
def test_cli_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, args, message):
  out = tmp_path / "out"
  args = [a.replace("HF", str(tmp_path / "hf")) for a in args]
  result = _cli(*args, "--out", str(out))
  assert result.returncode == 2, result.stderr
  assert "jaxprune prune-structured: error:" in result.stderr
  assert __import__("re").search(message, result.stderr), result.stderr
  assert not out.exists() and not (tmp_path / "hf").exists()
