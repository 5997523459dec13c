"""Tokenizers: sentencepiece ``.model``, llama2.c ``tokenizer.bin`` and Hugging Face directories."""

from __future__ import annotations

import functools
import os
import re
import shutil
import struct
import threading
from typing import Any, Protocol, Sequence

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class Tokenizer(Protocol):
  """What the engine, the evaluator and the server need from a tokenizer."""

  bos_id: int | None
  eos_id: int | None
  vocab_size: int

  def encode(self, text: str, add_bos: bool = False, *, parse_special: bool = False) -> list[int]:
    """Token ids of ``text``; special-token text (``"</s>"``) is plain text unless ``parse_special``."""
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...

  def save(self, out_dir: str) -> list[str]:
    """Writes the tokenizer files into ``out_dir``; returns the names written."""
    ...


def _with_bos(ids: list[int], bos_id: int | None, add_bos: bool) -> list[int]:
  return ([bos_id] + ids) if add_bos and bos_id is not None else ids


class SentencePieceTokenizer:
  """A sentencepiece model file (e.g. llama2.c's ``tok512.model``)."""

  def __init__(self, path: str):
    import sentencepiece as spm
    self.path = path
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(path)
    except Exception as e:  # sentencepiece raises OSError/RuntimeError with little context
      raise ValueError(f"{path}: not a valid sentencepiece model ({e})") from e
    self.vocab_size = self._sp.GetPieceSize()
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
    self.chat_template = None

  def encode(self, text: str, add_bos: bool = False, *, parse_special: bool = False) -> list[int]:
    # sentencepiece encodes control-symbol text ("</s>") as plain pieces either way
    return _with_bos(list(self._sp.EncodeAsIds(text)) if text else [], self.bos_id, add_bos)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.DecodeIds([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

  def id_to_piece(self, i: int) -> str:
    return self._sp.IdToPiece(int(i))

  def save(self, out_dir: str) -> list[str]:
    shutil.copyfile(self.path, os.path.join(out_dir, "tokenizer.model"))
    return ["tokenizer.model"]


class Llama2cTokenizer:
  """llama2.c's ``tokenizer.bin``: scores and pieces, encoded by greedy best-score BPE merges.

  Layout: int32 max_token_length, then per token: float32 score, int32 byte length, bytes.
  Ids 0 ``<unk>``, 1 BOS, 2 EOS, 3..258 byte fallback.
  """

  def __init__(self, path: str, vocab_size: int | None = None):
    self.path = path
    with open(path, "rb") as f:
      data = f.read()
    if len(data) < 4:
      raise ValueError(f"{path}: truncated llama2.c tokenizer (no header)")
    self.pieces: list[bytes] = []
    self.scores: list[float] = []
    off = 4
    while off < len(data) and (vocab_size is None or len(self.pieces) < vocab_size):
      if off + 8 > len(data):
        raise ValueError(f"{path}: truncated llama2.c tokenizer at token {len(self.pieces)}")
      score, n = struct.unpack_from("<fi", data, off)
      if n < 0 or off + 8 + n > len(data):
        raise ValueError(f"{path}: bad piece length {n} at token {len(self.pieces)}")
      self.scores.append(score)
      self.pieces.append(data[off + 8:off + 8 + n])
      off += 8 + n
    if vocab_size is not None and len(self.pieces) != vocab_size:
      raise ValueError(f"{path}: holds {len(self.pieces)} tokens, the model expects {vocab_size}")
    self.vocab_size = len(self.pieces)
    self.bos_id, self.eos_id = 1, 2
    self.chat_template = None
    self._ids = {p: i for i, p in enumerate(self.pieces)}
    # Merges cannot cross a space when no piece holds a space past its first byte: then each
    # space-led word encodes independently (and is cached), which is exact and fast.
    self._split_words = all(b" " not in p[1:] for p in self.pieces)

  def _merge(self, ids: list[int]) -> list[int]:
    while True:
      best, best_i = None, -1
      for i in range(len(ids) - 1):
        j = self._ids.get(self.pieces[ids[i]] + self.pieces[ids[i + 1]])
        if j is not None and (best is None or self.scores[j] > self.scores[best]):
          best, best_i = j, i
      if best is None:
        return ids
      ids[best_i:best_i + 2] = [best]

  @functools.lru_cache(maxsize=65536)
  def _encode_word(self, word: str) -> tuple[int, ...]:
    ids: list[int] = []
    for ch in word:
      b = ch.encode("utf-8")
      j = self._ids.get(b)
      ids.extend([j] if j is not None else [x + 3 for x in b])
    return tuple(self._merge(ids))

  def encode(self, text: str, add_bos: bool = False, *, parse_special: bool = False) -> list[int]:
    # special-token text ("</s>") is encoded as plain pieces either way
    if not text:
      return _with_bos([], self.bos_id, add_bos)
    text = " " + text  # sentencepiece's dummy prefix, as llama2.c adds it
    if not self._split_words:
      return _with_bos(list(self._encode_word(text)), self.bos_id, add_bos)
    ids: list[int] = []
    for word in re.findall(r" ?[^ ]+| ", text):
      ids.extend(self._encode_word(word))
    return _with_bos(ids, self.bos_id, add_bos)

  def decode(self, ids: Sequence[int]) -> str:
    out = bytearray()
    prev = None
    for i in ids:
      i = int(i)
      if i in (self.bos_id, self.eos_id) or not 0 <= i < self.vocab_size:
        prev = i
        continue
      piece = self.pieces[i]
      m = _BYTE_PIECE.match(piece.decode("latin-1"))
      if m:
        piece = bytes([int(m.group(1), 16)])
      elif (prev is None or prev == self.bos_id) and piece.startswith(b" "):
        piece = piece[1:]
      out += piece
      prev = i
    return out.decode("utf-8", errors="replace")

  def save(self, out_dir: str) -> list[str]:
    shutil.copyfile(self.path, os.path.join(out_dir, "tokenizer.bin"))
    return ["tokenizer.bin"]


class HFTokenizer:
  """A Hugging Face tokenizer loaded offline from a model directory.

  User text is encoded without parsing special tokens (the text ``"</s>"`` is not the EOS id, as in
  vLLM); :meth:`encode` with ``parse_special=True`` parses them (text a chat template rendered).
  One instance may be used from several threads (the server's event loop and engine thread):
  every call holds a lock, and encoding uses private copies of the fast tokenizer with truncation
  and padding switched off once at load, so no call mutates shared state.
  """

  def __init__(self, path: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    try:
      self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
      # AutoTokenizer also validates the directory's config.json, which a structurally pruned model's
      # (per-layer head counts) can fail; a tokenizer.json loads without it
      if not os.path.exists(os.path.join(path, "tokenizer.json")):
        raise ValueError(f"{path}: could not load a Hugging Face tokenizer ({e})") from e
      try:
        self._tok = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
      except Exception as e2:
        raise ValueError(f"{path}: could not load a Hugging Face tokenizer ({e}; from tokenizer.json: {e2})") from e2
    self._lock = threading.Lock()
    self.vocab_size = len(self._tok)
    self.bos_id = self._tok.bos_token_id
    self.eos_id = self._tok.eos_token_id
    self.chat_template = getattr(self._tok, "chat_template", None)
    self._encoders = None
    if getattr(self._tok, "is_fast", False):  # {parse_special: backend copy}
      self._encoders = {parse: _plain_backend(self._tok.backend_tokenizer, parse) for parse in (False, True)}

  def encode(self, text: str, add_bos: bool = False, *, parse_special: bool = False) -> list[int]:
    with self._lock:
      if self._encoders is not None:
        ids = self._encoders[parse_special].encode(text, add_special_tokens=False).ids
      else:
        ids = self._tok(text, add_special_tokens=False, split_special_tokens=not parse_special)["input_ids"]
    return _with_bos(list(ids), self.bos_id, add_bos)

  def decode(self, ids: Sequence[int]) -> str:
    with self._lock:
      return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    with self._lock:
      return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

  def save(self, out_dir: str) -> list[str]:
    with self._lock:
      return [os.path.basename(p) for p in self._tok.save_pretrained(out_dir)]


def _plain_backend(backend: Any, parse_special: bool) -> Any:
  """A private copy of a ``tokenizers.Tokenizer`` that never truncates or pads, parsing special
  tokens in the text or not."""
  from tokenizers import Tokenizer as FastTokenizer
  copy = FastTokenizer.from_str(backend.to_str())
  copy.no_truncation()
  copy.no_padding()
  copy.encode_special_tokens = not parse_special
  return copy


def load_tokenizer(path: str, vocab_size: int | None = None) -> Tokenizer:
  """Loads a tokenizer from a ``.model`` file, a llama2.c ``.bin`` file or a directory."""
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, "tokenizer.json")) or os.path.exists(os.path.join(path, "tokenizer_config.json")):
      if not os.path.exists(os.path.join(path, "tokenizer.model")) or os.path.exists(os.path.join(path, "tokenizer.json")):
        return HFTokenizer(path)
    for name in ("tokenizer.model", "tokenizer.bin"):
      if os.path.exists(os.path.join(path, name)):
        return load_tokenizer(os.path.join(path, name), vocab_size)
    raise ValueError(f"{path}: no tokenizer found (expected tokenizer.json, tokenizer.model or tokenizer.bin)")
  if not os.path.exists(path):
    raise ValueError(f"{path}: tokenizer file does not exist")
  if path.endswith(".model"):
    return SentencePieceTokenizer(path)
  if path.endswith(".bin"):
    return Llama2cTokenizer(path, vocab_size)
  raise ValueError(f"{path}: unknown tokenizer format (expected a .model, a llama2.c .bin, or a directory)")
