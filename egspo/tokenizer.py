"""Tokenizers with one interface: the LLaDA Hugging Face tokenizer and a built-in one for CPU presets.

Both provide `vocab_size`, `pad_id`, `eos_id`, `mask_id`, `encode`, `decode`, `chat_prompt`
and `encode_batch` (left-padded numpy arrays with an attention mask).
"""

from __future__ import annotations

import string
from typing import Sequence

import numpy as np


class TokenizerBase:
  """Shared behaviour; subclasses set the ids and implement encode/decode."""

  vocab_size: int
  pad_id: int
  eos_id: int
  mask_id: int

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    raise NotImplementedError

  def chat_prompt(self, user_message: str, assistant_prefill: str = "") -> str:
    """The text the model sees for one user turn, ready for `encode`."""
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str], max_length: int | None = None,
                   pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids [B, P] int32 and attention mask [B, P] bool (True = real token).

    P = the longest text (or `pad_to` if given). A text longer than `max_length` is an error
    naming its index, never a silent truncation.
    """
    if len(texts) == 0:
      raise ValueError("encode_batch got an empty list of texts")
    encoded = [self.encode(t) for t in texts]
    for i, ids in enumerate(encoded):
      if not ids:
        raise ValueError(f"text {i} encodes to zero tokens")
      if max_length is not None and len(ids) > max_length:
        raise ValueError(f"text {i} has {len(ids)} tokens, more than max_length={max_length}")
    width = max(len(ids) for ids in encoded)
    if pad_to is not None:
      if pad_to < width:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest text ({width} tokens)")
      width = pad_to
    out = np.full((len(texts), width), self.pad_id, dtype=np.int32)
    mask = np.zeros((len(texts), width), dtype=bool)
    for i, ids in enumerate(encoded):
      out[i, width - len(ids):] = ids
      mask[i, width - len(ids):] = True
    return out, mask

  def decode_batch(self, ids: np.ndarray) -> list[str]:
    return [self.decode(row) for row in np.asarray(ids).tolist()]


class CharTokenizer(TokenizerBase):
  """Character-level tokenizer for the CPU presets (printable ASCII + newline).

  Ids: 0 pad, 1 eos, 2 mask, 3 bos, then the four answer-format tags as single tokens, then
  characters. Special tokens are dropped by `decode`; unknown characters raise.
  """

  SPECIALS = ("<pad>", "<eos>", "<mask>", "<bos>")
  TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")
  CHARS = "\n" + "".join(c for c in string.printable if c.isprintable())

  def __init__(self):
    self._id_to_piece = list(self.SPECIALS) + list(self.TAGS) + list(self.CHARS)
    self._piece_to_id = {p: i for i, p in enumerate(self._id_to_piece)}
    self.vocab_size = len(self._id_to_piece)
    self.pad_id, self.eos_id, self.mask_id, self.bos_id = 0, 1, 2, 3
    self._first_char = len(self.SPECIALS) + len(self.TAGS)

  def encode(self, text: str) -> list[int]:
    ids, i = [], 0
    while i < len(text):
      for tag in self.TAGS:
        if text.startswith(tag, i):
          ids.append(self._piece_to_id[tag])
          i += len(tag)
          break
      else:
        ch = text[i]
        if ch not in self._piece_to_id or self._piece_to_id[ch] < self._first_char:
          raise ValueError(f"CharTokenizer cannot encode character {ch!r} at offset {i}")
        ids.append(self._piece_to_id[ch])
        i += 1
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    n_special = len(self.SPECIALS)
    return "".join(self._id_to_piece[i] for i in ids
                   if n_special <= int(i) < self.vocab_size)

  def chat_prompt(self, user_message: str, assistant_prefill: str = "") -> str:
    return user_message + assistant_prefill
