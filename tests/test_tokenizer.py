"""HFTokenizer / load_tokenizer on a small tokenizer built with the `tokenizers` library."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import PreTrainedTokenizerFast

from egspo.tokenizer import (LLADA_CHAT_TEMPLATE, CharTokenizer, HFTokenizer, load_tokenizer)

SPECIALS = ["<unk>", "<|startoftext|>", "<|endoftext|>", "<|eot_id|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|mdm_mask|>"]
WORDS = ["hello", "world", "the", "answer", "is", "4", "user", "assistant", "2+2?", "what"]
# Ids: specials 0..6, words 7..16.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
            "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
            "{% endif %}")


def build(path, chat_template=TEMPLATE, config=None, with_mask=True):
  vocab = {t: i for i, t in enumerate(SPECIALS + WORDS) if with_mask or t != "<|mdm_mask|>"}
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                 bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                 additional_special_tokens=[t for t in SPECIALS[3:] if t in vocab])
  if chat_template:
    fast.chat_template = chat_template
  fast.save_pretrained(str(path))
  if config is not None:
    (path / "config.json").write_text(json.dumps(config))
  return path


@pytest.fixture
def tok(tmp_path):
  # The LLaDA convention: EOS and pad share one id that differs from the tokenizer's <|endoftext|>.
  return HFTokenizer(build(tmp_path / "tok", config={"mask_token_id": 6, "eos_token_id": 3,
                                                     "pad_token_id": 3}))


def test_ids_from_config(tok):
  assert (tok.vocab_size, tok.mask_id, tok.eos_id, tok.pad_id) == (17, 6, 3, 3)


def test_ids_from_tokens_without_config(tmp_path):
  t = HFTokenizer(build(tmp_path / "tok"))
  assert t.mask_id == 6  # <|mdm_mask|>
  assert t.eos_id == 2  # the tokenizer's eos_token <|endoftext|>
  assert t.pad_id == 2  # no pad token: falls back to EOS
  # An explicit config (dict) wins.
  t2 = HFTokenizer(tmp_path / "tok", config={"mask_token_id": 5, "eos_token_id": 4})
  assert (t2.mask_id, t2.eos_id, t2.pad_id) == (5, 4, 4)


def test_encode_decode_round_trip(tok):
  ids = tok.encode("hello world the answer is 4")
  assert ids == [7, 8, 9, 10, 11, 12]
  assert tok.decode(ids) == "hello world the answer is 4"
  # Special tokens in the text are parsed as single tokens and dropped by decode.
  assert tok.encode("hello <|eot_id|> world") == [7, 3, 8]
  assert tok.decode([1, 7, 3, 8, 6, 6]) == "hello world"


def test_encode_batch_left_pads(tok):
  ids, mask = tok.encode_batch(["hello world the", "is"])
  np.testing.assert_array_equal(ids, [[7, 8, 9], [3, 3, 11]])
  np.testing.assert_array_equal(mask, [[True, True, True], [False, False, True]])
  ids, mask = tok.encode_batch(["is"], pad_to=4)
  np.testing.assert_array_equal(ids, [[3, 3, 3, 11]])
  with pytest.raises(ValueError, match="text 0 has 3 tokens, more than max_length=2"):
    tok.encode_batch(["hello world the"], max_length=2)


def test_chat_prompt_uses_template(tok):
  text = tok.chat_prompt("what is 2+2?", "the answer")
  assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nwhat is 2+2?"
                  "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nthe answer")
  assert tok.encode(text) == [1, 4, 13, 5, 16, 11, 15, 3, 4, 14, 5, 9, 10]


def test_chat_prompt_falls_back_to_llada_template(tmp_path):
  t = HFTokenizer(build(tmp_path / "tok", chat_template=None))
  assert not t.tok.chat_template
  assert t.chat_prompt("hello", "the") == ("<|startoftext|>" + LLADA_CHAT_TEMPLATE.format(
      msg="hello") + "the")
  assert LLADA_CHAT_TEMPLATE.format(msg="m") == (
      "<|start_header_id|>user<|end_header_id|>\n\nm<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_load_tokenizer(tmp_path):
  assert isinstance(load_tokenizer("char"), CharTokenizer)
  assert load_tokenizer("char").mask_id == CharTokenizer().mask_id == 2
  t = load_tokenizer(str(build(tmp_path / "tok")))
  assert isinstance(t, HFTokenizer) and t.encode("hello") == [7]


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer directory .*nowhere does not exist"):
    HFTokenizer(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_tokenizer(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="has no tokenizer files"):
    HFTokenizer(tmp_path / "empty")
  path = build(tmp_path / "tok")
  with pytest.raises(FileNotFoundError, match="model config .* does not exist"):
    HFTokenizer(path, config=tmp_path / "missing.json")
  (tmp_path / "bad.json").write_text("{")
  with pytest.raises(ValueError, match="not valid JSON"):
    HFTokenizer(path, config=tmp_path / "bad.json")
  no_mask = build(tmp_path / "nomask", with_mask=False)
  with pytest.raises(ValueError, match="cannot determine mask_token_id"):
    HFTokenizer(no_mask)
  assert HFTokenizer(no_mask, config={"mask_token_id": 16, "eos_token_id": 2}).mask_id == 16
