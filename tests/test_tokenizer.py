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
