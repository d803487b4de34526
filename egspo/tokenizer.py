"""Tokenizers with one interface: the LLaDA Hugging Face tokenizer and a built-in one for CPU presets.

Both provide `vocab_size`, `pad_id`, `eos_id`, `mask_id`, `encode`, `decode`, `chat_prompt`
and `encode_batch` (left-padded numpy arrays with an attention mask).
"""

from __future__ import annotations

import json
import pathlib
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

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    """Text of `ids`; special tokens dropped unless skip_special=False."""
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


class CharTokenizer(TokenizerBase):
  """Character-level tokenizer for the CPU presets (printable ASCII + newline).

  Ids: 0 pad, 1 eos, 2 mask, 3 bos, then the four answer-format tags as single tokens, then
  characters. Special tokens are dropped by `decode` (kept with skip_special=False); unknown
  characters raise.
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

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    first = len(self.SPECIALS) if skip_special else 0
    return "".join(self._id_to_piece[i] for i in ids if first <= int(i) < self.vocab_size)

  def chat_prompt(self, user_message: str, assistant_prefill: str = "") -> str:
    return user_message + assistant_prefill


# LLaDA's chat turn (REFERENCE §1), used when a tokenizer directory has no chat template.
LLADA_CHAT_TEMPLATE = ("<|start_header_id|>user<|end_header_id|>\n\n{msg}<|eot_id|>"
                       "<|start_header_id|>assistant<|end_header_id|>\n\n")
LLADA_MASK_TOKEN = "<|mdm_mask|>"


class HFTokenizer(TokenizerBase):
  """A Hugging Face tokenizer from a local directory (no hub access), e.g. LLaDA-8B-Instruct's.

  Ids (REFERENCE §1): `mask_id` = `mask_token_id` of the model's config.json, else the id of the
  `<|mdm_mask|>` token; `eos_id` = the config's `eos_token_id` (126081 for LLaDA, which is also
  its padding token), else the tokenizer's; `pad_id` = the config's `pad_token_id`, else the
  tokenizer's, else `eos_id`. `config` is a config.json dict or a path to one or to its
  directory; by default the tokenizer directory's own config.json is used when present.
  """

  def __init__(self, path, config=None):
    path = pathlib.Path(path)
    if not path.is_dir():
      raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                              "tokenizer.model", "vocab.json")):
      raise FileNotFoundError(f"{path} has no tokenizer files (tokenizer.json / "
                              "tokenizer_config.json)")
    import transformers  # local: slow import, and only needed for HF tokenizers

    try:
      self.tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot load a Hugging Face tokenizer from {path}: {e}") from e
    cfg = self._read_config(path if config is None else config, required=config is not None)
    self.path = path
    self.vocab_size = len(self.tok)
    self.mask_id = self._pick_id("mask_token_id", cfg.get("mask_token_id"),
                                 self._token_id(LLADA_MASK_TOKEN))
    self.eos_id = self._pick_id("eos_token_id", cfg.get("eos_token_id"), self.tok.eos_token_id)
    pad = cfg.get("pad_token_id", self.tok.pad_token_id)
    self.pad_id = self.eos_id if pad is None else self._pick_id("pad_token_id", pad, None)

  @staticmethod
  def _read_config(config, required: bool) -> dict:
    if isinstance(config, dict):
      return config
    p = pathlib.Path(config)
    if p.is_dir():
      p = p / "config.json"
    if not p.is_file():
      if required:
        raise FileNotFoundError(f"model config {p} does not exist")
      return {}
    try:
      return json.loads(p.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{p} is not valid JSON: {e}") from e

  def _token_id(self, token: str) -> int | None:
    i = self.tok.convert_tokens_to_ids(token)
    return None if i is None or i == self.tok.unk_token_id else int(i)

  def _pick_id(self, name: str, *candidates) -> int:
    for c in candidates:
      if c is not None:
        c = int(c[0] if isinstance(c, (list, tuple)) else c)  # HF configs may list several EOS
        if c < 0:
          raise ValueError(f"{name}={c} is not a valid token id")
        return c
    raise ValueError(f"cannot determine {name}: not in the model config and no matching token in "
                     f"the tokenizer at {getattr(self, 'path', '?')}")

  def encode(self, text: str) -> list[int]:
    # Special tokens written in the text (e.g. <|eot_id|> from the chat template) are parsed as
    # such; nothing is added around the text.
    return list(self.tok.encode(text, add_special_tokens=False))

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

  def chat_prompt(self, user_message: str, assistant_prefill: str = "") -> str:
    """One user turn through the tokenizer's chat template (generation prompt added), else
    LLaDA's template (preceded by the BOS token when the tokenizer has one), then the prefill."""
    if getattr(self.tok, "chat_template", None):
      text = self.tok.apply_chat_template([{"role": "user", "content": user_message}],
                                          tokenize=False, add_generation_prompt=True)
    else:
      text = (self.tok.bos_token or "") + LLADA_CHAT_TEMPLATE.format(msg=user_message)
    return text + assistant_prefill


def load_tokenizer(spec, config=None) -> TokenizerBase:
  """`"char"` → the built-in CharTokenizer; anything else is a local directory or a hub repo id.

  A hub repo id (`ORG/NAME`, e.g. GSAI-ML/LLaDA-8B-Instruct) is fetched into the Hugging Face
  cache without its weights (`egspo.hub.resolve_checkpoint`). A directory whose config.json
  says `"egspo_tokenizer": "char"` (a checkpoint of a CPU preset saved with its tokenizer, see
  `egspo.model.pretrained.save_tokenizer`) gives the CharTokenizer; otherwise the directory must
  hold a Hugging Face tokenizer.
  """
  from egspo import hub

  if str(spec) == "char":
    return CharTokenizer()
  if str(spec) == "random":
    raise ValueError("tokenizer 'random': a random model init (model.checkpoint=random) has no "
                     "tokenizer; set tokenizer to a directory, a hub repo id or 'char'")
  path = hub.resolve_checkpoint(spec, what="tokenizer", weights=False)
  cfg_file = path / "config.json"
  if cfg_file.is_file():
    try:
      if json.loads(cfg_file.read_text()).get("egspo_tokenizer") == "char":
        return CharTokenizer()
    except (json.JSONDecodeError, AttributeError):
      pass  # HFTokenizer reports an unreadable config.json
  return HFTokenizer(path, config=config)
