"""Tokenizers: llama2.c tokenizer.bin vs the sentencepiece model of the same vocabulary."""

import os
import re

import pytest

from jaxserve.loaders import ASSETS, EVAL_TEXT
from jaxserve.tokenizer import Llama2cTokenizer, SentencePieceTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def toks():
  return (Llama2cTokenizer(os.path.join(ASSETS, "tok512.bin"), 512),
          SentencePieceTokenizer(os.path.join(ASSETS, "tok512.model")))


def test_bin_and_sentencepiece_agree_on_real_text(toks):
  bin_tok, sp_tok = toks
  text = open(EVAL_TEXT, encoding="utf-8").read()[:30000]
  # sentencepiece collapses runs of spaces and strips the ends; llama2.c's run.c does not.
  text = re.sub(r" +", " ", text).strip()
  paragraphs = [p.strip() for p in text.split("\n") if p.strip()]
  for p in paragraphs[:200]:
    assert bin_tok.encode(p, add_bos=True) == sp_tok.encode(p, add_bos=True)
  ids = sp_tok.encode(paragraphs[0])
  assert bin_tok.decode(ids) == sp_tok.decode(ids) == paragraphs[0]


def test_byte_fallback_roundtrip(toks):
  bin_tok, sp_tok = toks
  text = "Café ☃ naïve"  # characters outside the 512-token vocabulary use byte pieces 3..258
  ids = bin_tok.encode(text)
  assert any(3 <= i <= 258 for i in ids)
  assert bin_tok.decode(ids) == text
  assert ids == sp_tok.encode(text)


def test_truncated_tokenizer_bin(tmp_path):
  data = open(os.path.join(ASSETS, "tok512.bin"), "rb").read()
  bad = tmp_path / "tok.bin"
  bad.write_bytes(data[:3000])
  with pytest.raises(ValueError, match=r"tok\.bin: (truncated|bad piece length|holds)"):
    Llama2cTokenizer(str(bad), 512)


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    load_tokenizer(str(tmp_path / "missing.model"))
  with pytest.raises(ValueError, match="no tokenizer found"):
    load_tokenizer(str(tmp_path))
  (tmp_path / "x.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a valid sentencepiece model"):
    load_tokenizer(str(tmp_path / "x.model"))


# ---------------------------------------------------------------- Hugging Face export and HF tokenizer use
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """stories260K exported with ``save_hf``: the directory and the original sentencepiece tokenizer."""
  from jaxserve.loaders import load_model, save_hf
  m = load_model()
  out = save_hf(m.cfg, m.params, str(tmp_path_factory.mktemp("hf")), m.tokenizer)
  return out, m.tokenizer


def test_save_hf_writes_a_fast_tokenizer_that_loading_uses(exported):
  from jaxserve.tokenizer import HFTokenizer
  out, sp_tok = exported
  assert os.path.exists(os.path.join(out, "tokenizer.json"))
  tok = load_tokenizer(out)
  assert isinstance(tok, HFTokenizer) and tok._encoders is not None  # the fast (Rust) tokenizer
  text = open(EVAL_TEXT, encoding="utf-8").read()[:4000]
  for line in [ln.strip() for ln in text.split("\n") if ln.strip()][:40] + ["Café ☃ naïve"]:
    assert tok.encode(line, add_bos=True) == sp_tok.encode(line, add_bos=True)
    ids = sp_tok.encode(line)
    assert tok.decode(ids) == sp_tok.decode(ids)
  assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (sp_tok.bos_id, sp_tok.eos_id, sp_tok.vocab_size)
  from jaxserve.loaders import load_model
  assert isinstance(load_model(out).tokenizer, HFTokenizer)  # what `jaxserve serve DIR` serves with


def test_tokenizer_json_loads_beside_a_config_transformers_rejects(exported, tmp_path):
  """A structurally pruned export's config.json (per-layer heads) fails transformers' validation; its tokenizer loads."""
  import json
  import shutil
  out, sp_tok = exported
  d = tmp_path / "pruned"
  shutil.copytree(out, d)
  cfg = json.loads((d / "config.json").read_text())
  cfg.update(hidden_size=64, num_attention_heads=6)  # not a multiple: transformers' config validation refuses it
  (d / "config.json").write_text(json.dumps(cfg))
  tok = load_tokenizer(str(d))
  assert tok.encode("Once upon a time", add_bos=True) == sp_tok.encode("Once upon a time", add_bos=True)
  assert (tok.bos_id, tok.eos_id) == (sp_tok.bos_id, sp_tok.eos_id)


def test_special_token_text_in_user_text_is_not_parsed(exported):
  out, sp_tok = exported
  tok = load_tokenizer(out)
  text = "hello </s> world <s>"
  ids = tok.encode(text, add_bos=True)
  assert tok.eos_id not in ids and ids.count(tok.bos_id) == 1  # only the BOS we asked for
  assert ids == sp_tok.encode(text, add_bos=True)
  assert tok.decode(ids) == text
  # text a chat template rendered is parsed: its special tokens are the real ids
  assert tok.encode("hi </s>", parse_special=True)[-1] == tok.eos_id


def test_truncation_and_padding_in_tokenizer_json_are_ignored_and_left_alone(exported, tmp_path):
  import json
  import shutil
  out, _ = exported
  d = tmp_path / "tok"
  shutil.copytree(out, d, ignore=shutil.ignore_patterns("*.safetensors"))
  spec = json.loads((d / "tokenizer.json").read_text())
  spec["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}
  spec["padding"] = {"strategy": {"Fixed": 32}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                     "pad_type_id": 0, "pad_token": "<unk>"}
  (d / "tokenizer.json").write_text(json.dumps(spec))
  tok = load_tokenizer(str(d))
  shared = tok._tok.backend_tokenizer
  before = (shared.truncation, shared.padding)
  text = "Once upon a time there was a little girl"
  ids = tok.encode(text)
  assert len(ids) > 3 and 0 not in ids and tok.decode(ids) == text  # neither truncated nor padded
  assert (shared.truncation, shared.padding) == before  # the shared tokenizer was not mutated


def test_hf_tokenizer_is_safe_from_two_threads(exported):
  import threading
  out, _ = exported
  tok = load_tokenizer(out)
  lines = [ln.strip() for ln in open(EVAL_TEXT, encoding="utf-8").read()[:20000].split("\n") if ln.strip()][:60]
  want = [tok.encode(ln, add_bos=True) for ln in lines]
  errors = []

  def encoder():
    for _ in range(5):
      for ln, w in zip(lines, want):
        if tok.encode(ln, add_bos=True) != w:
          errors.append(("encode", ln))

  def decoder():
    for _ in range(5):
      for ln, w in zip(lines, want):
        if tok.decode(w) != ln:
          errors.append(("decode", ln))

  threads = [threading.Thread(target=f) for f in (encoder, decoder, encoder, decoder)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert errors == []
