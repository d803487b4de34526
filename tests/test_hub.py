"""Checkpoint locations (egspo.hub): local directories and hub repo ids, and output paths; the
entry points that take them (convert, generate, eval, trainer.build_model).

Hub repo ids are tested OFFLINE against a cache in the hub's own layout that the tests build
under a temporary HF_HOME (models--ORG--NAME/{blobs,refs/main,snapshots/<commit>/…}, snapshot
files symlinked to blobs), holding a tiny LLaDA in the HF layout (tests/test_convert.py).
"""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import huggingface_hub
import jax
import numpy as np
import pytest
from huggingface_hub import constants as hub_constants

import torch_llada
from test_convert import HF_CFG, inputs, jax_logits, torch_logits, write_hf
from test_tokenizer import build as build_tokenizer

from egspo import generate as generate_cli
from egspo import hub
from egspo.convert import main as convert_main
from egspo.model import export_hf, from_pretrained, llada, pretrained
from egspo.tokenizer import CharTokenizer, HFTokenizer, load_tokenizer

REPO_ID = "GSAI-ML/LLaDA-8B-Instruct"
COMMIT = "a" * 40


def hub_cache(hf_home: pathlib.Path, repo_id: str, src: pathlib.Path, *, commit: str = COMMIT,
              ref: str = "main") -> pathlib.Path:
  """Put the files of `src` into the hub cache under `hf_home` as snapshot `commit` of `repo_id`
  (`ref` pointing at it); returns the snapshot directory."""
  repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
  snap = repo / "snapshots" / commit
  snap.mkdir(parents=True)
  (repo / "blobs").mkdir(exist_ok=True)
  for f in sorted(src.iterdir()):
    data = f.read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data)
    (snap / f.name).symlink_to(os.path.relpath(blob, snap))
  (repo / "refs").mkdir(exist_ok=True)
  (repo / "refs" / ref).write_text(commit)
  return snap


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
  """(state dict, HF dir with tokenizer files) of a tiny random LLaDA."""
  root = tmp_path_factory.mktemp("tiny_hf")
  sd = torch_llada.random_state_dict(HF_CFG, seed=11)
  hf = write_hf(root / "hf", sd, n_shards=2)
  build_tokenizer(hf)  # tokenizer files beside the weights, as in LLaDA's HF repo
  return sd, hf


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
  """An empty hub cache under a temporary HF_HOME, offline (env + the hub's read constants)."""
  hf_home = tmp_path / "hf_home"
  monkeypatch.setenv("HF_HOME", str(hf_home))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  # huggingface_hub reads its environment once, at import (transformers imported it already).
  monkeypatch.setattr(hub_constants, "HF_HOME", str(hf_home))
  monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
  monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
  return hf_home


# ---------------------------------------------------------------------------------------------
# resolve_checkpoint


def test_parse_repo_id():
  assert hub.parse_repo_id(REPO_ID) == (REPO_ID, None)
  assert hub.parse_repo_id("org/name@v1.0") == ("org/name", "v1.0")
  for bad in ("name", "a/b/c", "org/na--me", "org/..", "/abs/x", "org/name@", "gs://b/x", ""):
    assert hub.parse_repo_id(bad) is None, bad


def test_local_directories_resolve_and_win(tiny_hf, tmp_path, monkeypatch, offline_hub):
  _, hf = tiny_hf
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  (tmp_path / "home").mkdir()
  (tmp_path / "home" / "ck").symlink_to(hf)
  assert hub.resolve_checkpoint("~/ck") == tmp_path / "home" / "ck"
  assert hub.resolve_checkpoint(str(hf)) == hf
  # A local directory named like a repo id wins over the hub cache entry of that id.
  snap = hub_cache(offline_hub, REPO_ID, hf)
  assert hub.resolve_checkpoint(REPO_ID) == snap
  local = tmp_path / "GSAI-ML" / "LLaDA-8B-Instruct"
  local.mkdir(parents=True)
  assert hub.resolve_checkpoint(REPO_ID) == local and local.is_absolute()


def test_repo_id_from_the_offline_cache(tiny_hf, offline_hub):
  sd, hf = tiny_hf
  snap = hub_cache(offline_hub, REPO_ID, hf)
  hub_cache(offline_hub, REPO_ID, hf, commit="b" * 40, ref="v2")
  assert hub.resolve_checkpoint(REPO_ID) == snap
  assert hub.resolve_checkpoint(REPO_ID + "@" + COMMIT) == snap
  assert hub.resolve_checkpoint(REPO_ID + "@v2").name == "b" * 40
  # The model loads from the id: parameters and logits equal the PyTorch reference's.
  model = from_pretrained(REPO_ID)
  np.testing.assert_array_equal(np.asarray(model.wte.embedding[...]),
                                sd["model.transformer.wte.weight"].numpy())
  ids, mask = inputs()
  np.testing.assert_allclose(jax_logits(model, ids, mask)[mask], torch_logits(sd, ids, mask)[mask],
                             atol=1e-4, rtol=0)
  tok = load_tokenizer(REPO_ID)
  assert isinstance(tok, HFTokenizer) and tok.encode("hello world") == [7, 8]
  assert tok.mask_id == HF_CFG["mask_token_id"]


def test_only_weights_config_modeling_code_and_tokenizer_are_fetched(monkeypatch, tmp_path):
  calls = []

  def fake_snapshot_download(repo_id, **kwargs):
    calls.append((repo_id, kwargs))
    return str(tmp_path)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  assert hub.resolve_checkpoint("org/model@main") == tmp_path
  hub.resolve_checkpoint("org/model", what="tokenizer", weights=False)
  (repo, kw), (_, kw_tok) = calls
  assert repo == "org/model" and kw["revision"] == "main"
  llada_repo = ["config.json", "configuration_llada.py", "modeling_llada.py", "README.md",
                "generation_config.json", "model-00001-of-00006.safetensors",
                "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json",
                "tokenizer_config.json", "pytorch_model.bin", ".gitattributes"]
  pick = lambda patterns: sorted(huggingface_hub.utils.filter_repo_objects(
      llada_repo, allow_patterns=patterns))
  code = ["configuration_llada.py", "modeling_llada.py"]  # what config.json's auto_map names
  assert pick(kw["allow_patterns"]) == sorted(
      ["config.json", "generation_config.json", "model-00001-of-00006.safetensors",
       "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json",
       "tokenizer_config.json"] + code)
  assert pick(kw_tok["allow_patterns"]) == sorted(
      ["config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.json",
       "tokenizer_config.json"] + code)


def test_errors_are_one_clear_line(tmp_path, offline_hub):
  cache = str(offline_hub / "hub")
  with pytest.raises(hub.CheckpointNotFoundError) as e:
    hub.resolve_checkpoint("nobody/nothing")
  msg = str(e.value)
  assert "\n" not in msg and "'nobody/nothing'" in msg and "HF_HUB_OFFLINE=1" in msg
  assert cache in msg
  with pytest.raises(FileNotFoundError, match="does not exist .*not a hub repo id"):
    hub.resolve_checkpoint(str(tmp_path / "missing"))
  (tmp_path / "file").write_text("x")
  with pytest.raises(hub.CheckpointNotFoundError, match="is a file"):
    hub.resolve_checkpoint(str(tmp_path / "file"))
  with pytest.raises(hub.CheckpointNotFoundError, match="tokenizer is empty"):
    hub.resolve_checkpoint("", what="tokenizer")
  with pytest.raises(hub.CheckpointNotFoundError, match="is a URL"):
    load_tokenizer("gs://bucket/tok")
  with pytest.raises(ValueError, match="model.checkpoint=random.*has no tokenizer"):
    load_tokenizer("random")
  # from_pretrained and convert raise the same error (a CheckpointError).
  with pytest.raises(hub.CheckpointError, match="nobody/nothing"):
    from_pretrained("nobody/nothing")


# ---------------------------------------------------------------------------------------------
# egspo.convert


def test_convert_from_repo_id_to_relative_and_home_outputs(tiny_hf, tmp_path, monkeypatch,
                                                           offline_hub, capsys):
  sd, hf = tiny_hf
  hub_cache(offline_hub, REPO_ID, hf)
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert convert_main(["--checkpoint", REPO_ID, "--output", "out/rel", "--quiet"]) == 0
  rel = tmp_path / "out" / "rel"
  assert pretrained.checkpoint_layout(rel) == "orbax"
  assert load_tokenizer(rel).encode("the answer") == [9, 10]  # the tokenizer came along
  ids, mask = inputs()
  np.testing.assert_allclose(jax_logits(from_pretrained(rel), ids, mask)[mask],
                             torch_logits(sd, ids, mask)[mask], atol=1e-4, rtol=0)
  # Back to HF from the relative dir, written under ~ (orbax is given absolute paths only).
  assert convert_main(["--checkpoint", "out/rel", "--output", "~/hf", "--to_hf", "--quiet"]) == 0
  back = tmp_path / "home" / "hf"
  assert pretrained.index_hf_checkpoint(back).keys() == set(sd)
  # An id that is not cached: one line on stderr, exit 2.
  assert convert_main(["--checkpoint", "nobody/nothing", "--output", "x", "--quiet"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "nobody/nothing" in err and "HF_HUB_OFFLINE=1" in err


def test_convert_cli_honours_hf_home_in_a_fresh_process(tiny_hf, tmp_path):
  """HF_HOME and HF_HUB_OFFLINE as a user sets them, read by huggingface_hub at import."""
  _, hf = tiny_hf
  hub_cache(tmp_path / "hf_home", REPO_ID, hf)
  env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
  env.pop("HF_HUB_CACHE", None)
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "-m", "egspo.convert", "--checkpoint", REPO_ID,
                      "--output", "converted", "--quiet"], cwd=tmp_path, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  manifest = json.loads((tmp_path / "converted" / "egspo_checkpoint.json").read_text())
  assert manifest["source"].endswith(f"snapshots/{COMMIT}")


def test_export_to_a_gs_url(tiny_hf, tmp_path):
  """`--to_hf --output gs://…` writes through etils.epath (here a local directory stands in for
  the bucket); the export is the same as a local one."""
  from etils.epath import testing as epath_testing

  sd, hf = tiny_hf
  bucket = tmp_path / "bucket"

  def remap(p):
    s = os.fspath(p)
    return str(bucket) + s[len("gs://bucket"):] if s.startswith("gs://bucket") else s

  one = lambda orig, p, *a, **k: orig(remap(p), *a, **k)
  two = lambda orig, p, dst, *a, **k: orig(remap(p), remap(dst), *a, **k)
  fns = {n: one for n in ("exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open",
                          "remove", "rmtree", "stat")}
  fns.update({n: two for n in ("copy", "rename", "replace")})
  with epath_testing.mock_epath(**fns):
    assert convert_main(["--checkpoint", str(hf), "--output", "gs://bucket/export", "--to_hf",
                         "--quiet"]) == 0
  out = bucket / "export"
  assert pretrained.index_hf_checkpoint(out).keys() == set(sd)
  assert load_tokenizer(out).encode("hello") == [7]
  ids, mask = inputs()
  np.testing.assert_allclose(jax_logits(from_pretrained(out), ids, mask)[mask],
                             torch_logits(sd, ids, mask)[mask], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# egspo.generate / egspo.eval without tokenizer files


@pytest.fixture(scope="module")
def tokenizerless_ckpt(tmp_path_factory):
  """The tiny preset (seed 4) exported without any tokenizer: config.json + weights only."""
  d = tmp_path_factory.mktemp("notok") / "ckpt"
  export_hf(llada.init_model(llada.get_config("tiny", vocab=CharTokenizer()), 4), d)
  assert not any((d / f).exists() for f in hub.TOKENIZER_FILES)
  return d


GEN = ["--gen_length", "16", "--steps", "4", "--block_length", "8", "--json"]


def test_generate_prompt_ids_without_tokenizer(tokenizerless_ckpt, capsys):
  got = generate_cli.main(["--checkpoint", str(tokenizerless_ckpt), "--prompt_ids", "10,11,12"]
                          + GEN)
  want = generate_cli.main(["--preset", "tiny", "--seed", "4", "--prompt_ids", "10,11,12"] + GEN)
  capsys.readouterr()
  assert "text" not in got
  assert got["completion_ids"] == want["completion_ids"] and len(got["completion_ids"]) == 16


def test_generate_text_prompt_needs_a_tokenizer(tokenizerless_ckpt, capsys):
  with pytest.raises(SystemExit):
    generate_cli.main(["--checkpoint", str(tokenizerless_ckpt), "--prompt", "Hi"] + GEN)
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert "--prompt needs a tokenizer" in err and str(tokenizerless_ckpt) in err
  assert "--prompt_ids" in err
  with pytest.raises(SystemExit):
    generate_cli.main(["--checkpoint", "nobody/nothing", "--prompt_ids", "1"] + GEN)
  assert "nobody/nothing" in capsys.readouterr().err


def test_eval_checkpoint_without_tokenizer_is_one_line(tokenizerless_ckpt, capsys):
  import argparse

  from egspo import eval as eval_cli

  parser = argparse.ArgumentParser(prog="egspo.eval")
  args = argparse.Namespace(preset=None, checkpoint=str(tokenizerless_ckpt))
  with pytest.raises(SystemExit):
    eval_cli._load_model(args, parser)
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert str(tokenizerless_ckpt) in err and "no tokenizer files" in err


# ---------------------------------------------------------------------------------------------
# trainer.build_model: a repo id, and the explicit random init


def test_build_model_from_repo_id_and_random(tmp_path, offline_hub):
  from egspo import config as config_lib
  from egspo import sharding as shard_lib
  from egspo import trainer

  src = tmp_path / "char_model"
  init = llada.init_model(llada.get_config("tiny", vocab=CharTokenizer()), 7)
  export_hf(init, src, tokenizer=CharTokenizer())
  hub_cache(offline_hub, "me/tiny-char", src)
  c = config_lib.base_config("copy", "tiny")
  mesh = shard_lib.make_mesh(data=1, devices=jax.devices()[:1])
  rules = shard_lib.RULES
  c.tokenizer = ""
  c.model.checkpoint = "me/tiny-char"
  tok = load_tokenizer(c.tokenizer or c.model.checkpoint)  # as Trainer.create looks it up
  assert isinstance(tok, CharTokenizer)
  loaded = trainer.build_model(c, tok, mesh, rules)
  np.testing.assert_array_equal(np.asarray(loaded.wte.embedding[...]),
                                np.asarray(init.wte.embedding[...]))
  # 'random' is the seeded random init of model.preset, exactly as an empty checkpoint.
  c.tokenizer = "char"
  c.model.checkpoint = "random"
  r1 = trainer.build_model(c, CharTokenizer(), mesh, rules)
  c.model.checkpoint = ""
  r0 = trainer.build_model(c, CharTokenizer(), mesh, rules)
  np.testing.assert_array_equal(np.asarray(r1.wte.embedding[...]), np.asarray(r0.wte.embedding[...]))
  assert not np.array_equal(np.asarray(r1.wte.embedding[...]), np.asarray(init.wte.embedding[...]))
