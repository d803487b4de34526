"""HF safetensors ⇄ orbax conversion, from_pretrained and export_hf (REFERENCE §1).

Checkpoints are written by the `safetensors` library's torch front-end from the PyTorch reference
`tests/torch_llada.py`; exports are read back the same way (the converter reads through the
library's numpy front-end and writes with its own streaming writer).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.torch import load_file, save_file

import torch_llada
from egspo import convert as convert_cli
from egspo.hub import CheckpointError
from egspo.model import LLaDA, export_hf, from_pretrained, pretrained, save_pretrained_orbax
from egspo.model import safetensors_io

HF_CFG = {"d_model": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 96,
          "vocab_size": 100, "embedding_size": 104, "mask_token_id": 99, "eos_token_id": 1,
          "pad_token_id": 1, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
          "max_sequence_length": 64, "weight_tying": False}


def write_hf(path: pathlib.Path, sd: dict, cfg: dict = HF_CFG, n_shards: int = 3,
             torch_dtype: str | None = None) -> pathlib.Path:
  """Save `sd` in the HF layout: n_shards safetensors files + index (or one model.safetensors)."""
  path.mkdir(parents=True, exist_ok=True)
  cfg = dict(cfg)
  if torch_dtype:
    cfg["torch_dtype"] = torch_dtype
  (path / "config.json").write_text(json.dumps(cfg))
  names = list(sd)
  if n_shards == 1:
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
  weight_map = {}
  for k, chunk in enumerate(np.array_split(np.arange(len(names)), n_shards)):
    fname = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
    save_file({names[i]: sd[names[i]] for i in chunk}, str(path / fname), metadata={"format": "pt"})
    weight_map.update({names[i]: fname for i in chunk})
  (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {},
                                                                 "weight_map": weight_map}))
  return path


@pytest.fixture(scope="module")
def f32_ckpt(tmp_path_factory):
  """(state dict, HF dir, converted orbax dir) of a random f32 model."""
  root = tmp_path_factory.mktemp("f32")
  sd = torch_llada.random_state_dict(HF_CFG, seed=3)
  hf = write_hf(root / "hf", sd)
  pretrained.convert_hf_to_orbax(hf, root / "orbax")
  return sd, hf, root / "orbax"


def inputs():
  ids = np.random.default_rng(0).integers(0, HF_CFG["vocab_size"], (2, 12))
  mask = np.ones((2, 12), bool)
  mask[1, :5] = False  # left padding in row 1
  return ids, mask


def torch_logits(sd, ids, mask=None):
  m = None if mask is None else torch.tensor(mask)
  return torch_llada.forward(sd, HF_CFG, torch.tensor(ids), m).numpy()


def jax_logits(model, ids, mask=None):
  m = None if mask is None else jnp.asarray(mask)
  return np.asarray(model(jnp.asarray(ids), m))


def test_hf_layout_has_several_shards(f32_ckpt):
  _, hf, out = f32_ckpt
  assert len(list(hf.glob("model-*-of-00003.safetensors"))) == 3
  manifest = json.loads((out / "egspo_checkpoint.json").read_text())
  assert manifest["groups"] == ["embed", "layer_00000", "layer_00001", "layer_00002", "final"]
  assert json.loads((out / "config.json").read_text())["embedding_size"] == 104


@pytest.mark.parametrize("source", ["orbax", "hf"])
@pytest.mark.parametrize("scan", [False, True])
def test_logits_match_torch(f32_ckpt, source, scan):
  sd, hf, out = f32_ckpt
  model = from_pretrained(out if source == "orbax" else hf, scan_layers=scan)
  assert model.cfg.scan_layers == scan and model.cfg.param_dtype == "float32"
  ids, mask = inputs()
  got, want = jax_logits(model, ids), torch_logits(sd, ids)
  assert got.shape == (2, 12, HF_CFG["vocab_size"])
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  got_m, want_m = jax_logits(model, ids, mask), torch_logits(sd, ids, mask)
  np.testing.assert_allclose(got_m[mask], want_m[mask], atol=1e-4, rtol=0)
  # The padding mask changes row 1 (otherwise the masked comparison would prove nothing).
  assert np.abs(got_m[1, 5:] - got[1, 5:]).max() > 1e-3


def test_kernels_are_transposed_weights(f32_ckpt):
  sd, _, out = f32_ckpt
  model = from_pretrained(out)
  np.testing.assert_array_equal(np.asarray(model.blocks[1].ff_proj.kernel[...]),
                                sd["model.transformer.blocks.1.ff_proj.weight"].numpy().T)
  np.testing.assert_array_equal(np.asarray(model.wte.embedding[...]),
                                sd["model.transformer.wte.weight"].numpy())
  scanned = from_pretrained(out, scan_layers=True)
  np.testing.assert_array_equal(np.asarray(scanned.blocks.k_proj.kernel[...])[2],
                                sd["model.transformer.blocks.2.k_proj.weight"].numpy().T)


def test_single_file_layout(tmp_path):
  sd = torch_llada.random_state_dict(HF_CFG, seed=5)
  hf = write_hf(tmp_path / "hf", sd, n_shards=1)
  ids, mask = inputs()
  np.testing.assert_allclose(jax_logits(from_pretrained(hf), ids, mask)[mask],
                             torch_logits(sd, ids, mask)[mask], atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_tensor_in_row_chunks(tmp_path, dtype):
  t = torch.randn(37, 11).to(dtype)
  save_file({"w": t, "v": torch.randn(29).to(dtype), "s": torch.tensor(2.5).to(dtype)},
            str(tmp_path / "x.safetensors"))
  entries = safetensors_io.read_header(tmp_path / "x.safetensors")
  want = t.float().numpy()
  assert entries["w"].shape == (37, 11) and entries["s"].shape == ()
  for chunk_bytes in (1, 5 * 11 * t.element_size(), 2**20):  # one row, 5 rows, everything
    for transpose in (False, True):
      for cast in (None, np.float32):
        got = safetensors_io.read_tensor(entries["w"], transpose=transpose, dtype=cast,
                                         chunk_bytes=chunk_bytes)
        assert got.dtype == (entries["w"].dtype if cast is None else np.float32)
        assert got.flags.writeable and got.flags.c_contiguous
        np.testing.assert_array_equal(got.astype(np.float32), want.T if transpose else want)
    np.testing.assert_array_equal(
        safetensors_io.read_tensor(entries["v"], chunk_bytes=chunk_bytes).astype(np.float32),
        safetensors_io.read_tensor(entries["v"], dtype=np.float32))
  assert float(safetensors_io.read_tensor(entries["s"], dtype=np.float32)) == 2.5
  with pytest.raises(ValueError, match="transpose needs a 2-D tensor"):
    safetensors_io.read_tensor(entries["v"], transpose=True)


def test_read_header_errors_name_the_file(tmp_path):
  save_file({"ids": torch.arange(4)}, str(tmp_path / "int.safetensors"))
  with pytest.raises(CheckpointError, match=r"int\.safetensors: tensor ids has unsupported dtype "
                                            r"'I64'; supported: \['BF16', 'F16', 'F32', 'F64'\]"):
    safetensors_io.read_header(tmp_path / "int.safetensors")
  (tmp_path / "junk.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{not json}      ")
  with pytest.raises(CheckpointError, match=r"junk\.safetensors: cannot read safetensors file"):
    safetensors_io.read_header(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("scan", [False, True])
def test_export_is_bit_identical(f32_ckpt, tmp_path, scan):
  sd, _, out = f32_ckpt
  model = from_pretrained(out, scan_layers=scan)
  files = export_hf(model, tmp_path / "export", max_shard_bytes=40_000)
  assert len(files) >= 2 and all(f.name.endswith(f"-of-{len(files):05d}.safetensors")
                                 for f in files)
  index = json.loads((tmp_path / "export" / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"]) == set(sd)
  back = {}
  for f in files:
    assert f.stat().st_size <= 40_000 + 4096  # shard bound (+ header)
    back.update(load_file(str(f)))  # the official reader
  assert set(back) == set(sd)
  for name, t in sd.items():
    assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
  cfg = json.loads((tmp_path / "export" / "config.json").read_text())
  assert {k: cfg[k] for k in HF_CFG} == HF_CFG
  # LLaDA's modeling code builds this model only with these fields (its defaults: no RoPE,
  # LayerNorm, fused projections); the values are GSAI-ML/LLaDA-8B-Instruct's config.json.
  assert {k: cfg[k] for k in LLADA_8B_ARCHITECTURE} == LLADA_8B_ARCHITECTURE
  # No modeling code in the source: auto_map names the hub repo's.
  assert cfg["auto_map"]["AutoModel"] == "GSAI-ML/LLaDA-8B-Instruct--modeling_llada.LLaDAModelLM"
  assert not (tmp_path / "export" / "modeling_llada.py").exists()


# Architecture fields of GSAI-ML/LLaDA-8B-Instruct's config.json, written out by hand.
LLADA_8B_ARCHITECTURE = {
    "activation_type": "silu", "alibi": False, "attention_layer_norm": False,
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
    "include_bias": False, "include_qkv_bias": False, "input_emb_norm": False,
    "layer_norm_type": "rms", "layer_norm_with_affine": True, "multi_query_attention": None,
    "rope": True, "scale_logits": False, "weight_tying": False, "attention_dropout": 0.0,
    "residual_dropout": 0.0, "embedding_dropout": 0.0, "flash_attention": False,
    "rope_full_precision": True, "use_cache": False}


def test_modeling_code_travels_with_the_checkpoint(tmp_path):
  """configuration_llada.py / modeling_llada.py of the source go into the orbax dir and from
  there into an export, whose auto_map then names the local files."""
  sd = torch_llada.random_state_dict(HF_CFG, seed=5)
  hf = write_hf(tmp_path / "hf", sd, n_shards=1)
  for name in ("configuration_llada.py", "modeling_llada.py"):
    (hf / name).write_text(f"# {name} of the source\n")
  pretrained.convert_hf_to_orbax(hf, tmp_path / "orbax")
  assert (tmp_path / "orbax" / "modeling_llada.py").read_text() == "# modeling_llada.py of the source\n"
  export_hf(from_pretrained(tmp_path / "orbax"), tmp_path / "export", tokenizer=tmp_path / "orbax")
  cfg = json.loads((tmp_path / "export" / "config.json").read_text())
  assert cfg["auto_map"] == {"AutoConfig": "configuration_llada.LLaDAConfig",
                             "AutoModel": "modeling_llada.LLaDAModelLM",
                             "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}
  assert (tmp_path / "export" / "configuration_llada.py").is_file()


@pytest.mark.parametrize("field,value", [("block_type", "sequential"), ("rope", False),
                                         ("layer_norm_type", "default"), ("include_bias", True),
                                         ("activation_type", "swiglu"),
                                         ("multi_query_attention", True)])
def test_other_architectures_are_refused(tmp_path, field, value):
  hf = write_hf(tmp_path / "hf", _small_sd(), cfg={**HF_CFG, field: value}, n_shards=1)
  with pytest.raises(CheckpointError) as e:
    from_pretrained(hf)
  msg = str(e.value)
  assert "\n" not in msg and f"{field}={value!r}" in msg and "does not implement" in msg
  # LLaDA-8B's own values (and fields left out) load.
  write_hf(tmp_path / "ok", _small_sd(), cfg={**HF_CFG, **LLADA_8B_ARCHITECTURE}, n_shards=1)
  from_pretrained(tmp_path / "ok")


def test_save_pretrained_orbax_round_trip(f32_ckpt, tmp_path):
  sd, _, out = f32_ckpt
  model = from_pretrained(out, scan_layers=True)
  save_pretrained_orbax(model, tmp_path / "again")
  again = from_pretrained(tmp_path / "again")  # list layout from a scanned save
  original = from_pretrained(out)
  flat_a = nnx.to_flat_state(nnx.state(again, nnx.Param))
  flat_o = dict(nnx.to_flat_state(nnx.state(original, nnx.Param)))
  assert len(flat_a) == len(flat_o) == 3 * 9 + 3
  for path, v in flat_a:
    np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(flat_o[path][...]), str(path))


def test_bf16_checkpoint(tmp_path):
  sd = torch_llada.random_state_dict(HF_CFG, seed=7, dtype=torch.bfloat16)
  hf = write_hf(tmp_path / "hf", sd, n_shards=2, torch_dtype="bfloat16")
  pretrained.convert_hf_to_orbax(hf, tmp_path / "orbax")
  model = from_pretrained(tmp_path / "orbax")
  assert model.cfg.param_dtype == "bfloat16"
  assert model.blocks[0].q_proj.kernel[...].dtype == jnp.bfloat16
  # bf16 → bf16 is exact: compare the bit patterns.
  got = np.asarray(model.blocks[0].q_proj.kernel[...]).view(np.uint16)
  want = sd["model.transformer.blocks.0.q_proj.weight"].view(torch.int16).numpy().view(np.uint16).T
  np.testing.assert_array_equal(got, want)
  # Upcast to f32 on load: logits equal the torch forward on the f32-upcast weights.
  sd32 = {k: v.float() for k, v in sd.items()}
  ids, mask = inputs()
  for src in (tmp_path / "orbax", hf):
    m32 = from_pretrained(src, param_dtype="float32")
    np.testing.assert_allclose(jax_logits(m32, ids, mask)[mask], torch_logits(sd32, ids, mask)[mask],
                               atol=1e-4, rtol=0)
  files = export_hf(model, tmp_path / "export", max_shard_bytes=30_000)
  back = {}
  for f in files:
    back.update(load_file(str(f)))
  for name, t in sd.items():
    assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], t), name


def test_param_dtype_defaults_to_stored_tensors(tmp_path):
  # No torch_dtype in config.json: the safetensors dtype decides (a bf16 8B model stays bf16).
  sd = torch_llada.random_state_dict(HF_CFG, seed=9, dtype=torch.bfloat16)
  hf = write_hf(tmp_path / "hf", sd, n_shards=2)
  assert "torch_dtype" not in json.loads((hf / "config.json").read_text())
  assert from_pretrained(hf).cfg.param_dtype == "bfloat16"
  assert pretrained.convert_hf_to_orbax(hf, tmp_path / "o").param_dtype == "bfloat16"
  assert from_pretrained(tmp_path / "o").ln_f.weight[...].dtype == jnp.bfloat16


def test_convert_to_float32(tmp_path):
  sd = torch_llada.random_state_dict(HF_CFG, seed=8, dtype=torch.bfloat16)
  hf = write_hf(tmp_path / "hf", sd, n_shards=2, torch_dtype="bfloat16")
  assert convert_cli.main(["--checkpoint", str(hf), "--output", str(tmp_path / "o"),
                           "--param_dtype", "float32", "--quiet"]) == 0
  model = from_pretrained(tmp_path / "o")
  assert model.cfg.param_dtype == "float32"
  np.testing.assert_array_equal(np.asarray(model.ln_f.weight[...]),
                                sd["model.transformer.ln_f.weight"].float().numpy())


def test_sharded_load_on_8_devices(f32_ckpt):
  sd, hf, out = f32_ckpt
  assert jax.device_count() == 8
  mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = {"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
           "vocab": "tensor", "norm": None}
  ids, mask = inputs()
  want = torch_logits(sd, ids, mask)
  for scan in (False, True):
    cfg = pretrained.load_config(out, scan_layers=scan)
    abstract = nnx.eval_shape(lambda: LLaDA(cfg, rngs=nnx.Rngs(0)))

    def to_sharding(v):
      spec = tuple(rules[a] for a in v.get_metadata()["logical_axes"])
      spec = ((None,) * (len(v.shape) - len(spec))) + spec  # scanned stacks: leading layer axis
      return NamedSharding(mesh, P(*spec))

    shardings = jax.tree.map(to_sharding, nnx.state(abstract, nnx.Param),
                             is_leaf=lambda x: isinstance(x, nnx.Variable))
    for src in ((hf,) if scan else (out,)):  # both sources, both layouts, kept fast
      model = from_pretrained(src, mesh=mesh, shardings=shardings, scan_layers=scan)
      kernel = model.blocks.ff_proj.kernel if scan else model.blocks[0].ff_proj.kernel
      assert kernel[...].sharding.spec == (P(None, "fsdp", "tensor") if scan else P("fsdp", "tensor"))
      assert len(kernel[...].sharding.device_set) == 8
      got = jax_logits(model, ids, mask)
      np.testing.assert_allclose(got[mask], want[mask], atol=1e-4, rtol=0)
  replicated = from_pretrained(out, shardings=NamedSharding(mesh, P()))
  assert replicated.wte.embedding[...].sharding.spec == P()
  np.testing.assert_array_equal(np.asarray(replicated.blocks[2].v_proj.kernel[...]),
                                sd["model.transformer.blocks.2.v_proj.weight"].numpy().T)
  # A mesh alone: the logical-axis rules of egspo.sharding (embed → fsdp, mlp → tensor, …).
  from egspo import sharding

  mesh3 = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  ruled = from_pretrained(out, mesh=mesh3, scan_layers=True)
  assert ruled.blocks.up_proj.kernel[...].sharding.spec == P(None, "fsdp", "tensor")
  assert ruled.ff_out.kernel[...].sharding.spec == P("fsdp", "tensor")
  np.testing.assert_array_equal(np.asarray(ruled.blocks.up_proj.kernel[...])[1],
                                sd["model.transformer.blocks.1.up_proj.weight"].numpy().T)


# ----------------------------------------------------------------------------------------------
# Errors name the problem


def _small_sd():
  return torch_llada.random_state_dict(HF_CFG, seed=1)


def test_error_missing_tensor(tmp_path):
  sd = _small_sd()
  del sd["model.transformer.blocks.2.up_proj.weight"]
  hf = write_hf(tmp_path / "hf", sd)
  with pytest.raises(CheckpointError,
                     match=r"missing tensor model\.transformer\.blocks\.2\.up_proj\.weight"):
    pretrained.convert_hf_to_orbax(hf, tmp_path / "out")
  assert not (tmp_path / "out").exists()  # checked before anything is written
  with pytest.raises(CheckpointError, match="missing tensor"):
    from_pretrained(hf)


def test_error_unexpected_tensor(tmp_path):
  sd = _small_sd()
  sd["model.transformer.blocks.3.q_proj.weight"] = torch.zeros(64, 64)
  hf = write_hf(tmp_path / "hf", sd)
  with pytest.raises(CheckpointError,
                     match=r"unexpected tensor model\.transformer\.blocks\.3\.q_proj\.weight"):
    pretrained.convert_hf_to_orbax(hf, tmp_path / "out")


def test_error_shape_mismatch(tmp_path):
  sd = _small_sd()
  sd["model.transformer.blocks.1.ff_out.weight"] = torch.zeros(64, 95)
  hf = write_hf(tmp_path / "hf", sd)
  with pytest.raises(CheckpointError,
                     match=r"shape mismatch for tensor model\.transformer\.blocks\.1\.ff_out\.weight"
                           r": checkpoint has \(64, 95\), config expects \(64, 96\)"):
    pretrained.convert_hf_to_orbax(hf, tmp_path / "out")


def test_error_config(tmp_path):
  hf = write_hf(tmp_path / "hf", _small_sd(), n_shards=2)
  (hf / "config.json").unlink()
  with pytest.raises(CheckpointError, match=r"config\.json not found"):
    pretrained.convert_hf_to_orbax(hf, tmp_path / "out")
  (hf / "config.json").write_text("{not json")
  with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
    from_pretrained(hf)
  (hf / "config.json").write_text(json.dumps({"d_model": 64}))
  with pytest.raises(CheckpointError, match="missing LLaDA keys"):
    pretrained.convert_hf_to_orbax(hf, tmp_path / "out")
  with pytest.raises(CheckpointError, match="does not exist"):
    from_pretrained(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="neither an egspo orbax checkpoint"):
    from_pretrained(tmp_path / "empty")


def test_error_index_points_to_missing_shard(tmp_path):
  hf = write_hf(tmp_path / "hf", _small_sd(), n_shards=3)
  (hf / "model-00002-of-00003.safetensors").unlink()
  with pytest.raises(CheckpointError,
                     match=r"to shard model-00002-of-00003\.safetensors, which does not exist"):
    pretrained.convert_hf_to_orbax(hf, tmp_path / "out")


def test_error_corrupt_safetensors(tmp_path):
  hf = write_hf(tmp_path / "hf", _small_sd(), n_shards=2)
  shard = hf / "model-00001-of-00002.safetensors"
  shard.write_bytes(shard.read_bytes()[:1000])  # truncated
  with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
    from_pretrained(hf)


def test_error_corrupt_orbax(f32_ckpt, tmp_path):
  import shutil

  _, _, out = f32_ckpt
  bad = tmp_path / "bad"
  shutil.copytree(out, bad)
  (bad / "egspo_checkpoint.json").unlink()  # conversion that never finished
  with pytest.raises(CheckpointError, match="unfinished or corrupt conversion"):
    from_pretrained(bad)
  shutil.rmtree(bad)
  shutil.copytree(out, bad)
  shutil.rmtree(bad / "params" / "layer_00001")
  with pytest.raises(CheckpointError, match="orbax group layer_00001 is missing"):
    from_pretrained(bad)
  shutil.rmtree(bad)
  shutil.copytree(out, bad)
  for f in (bad / "params" / "final").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  with pytest.raises(CheckpointError, match="cannot restore orbax group final"):
    from_pretrained(bad)
  shutil.rmtree(bad)
  shutil.copytree(out, bad)
  (bad / "egspo_checkpoint.json").write_text("{")
  with pytest.raises(CheckpointError, match="corrupt manifest"):
    from_pretrained(bad)
  # The orbax group holds 3 layers; a config asking for 2 does not fit.
  with pytest.raises(CheckpointError, match="do not match the config"):
    from_pretrained(out, n_layers=2)


def test_cli_reports_errors(tmp_path, capsys):
  assert convert_cli.main(["--checkpoint", str(tmp_path / "nope"), "--output",
                           str(tmp_path / "o")]) == 2
  assert "does not exist" in capsys.readouterr().err


def test_output_dir_not_overwritten(f32_ckpt, tmp_path):
  _, hf, out = f32_ckpt
  with pytest.raises(FileExistsError, match="not empty"):
    pretrained.convert_hf_to_orbax(hf, out)


def test_cli_to_hf(f32_ckpt, tmp_path):
  sd, _, out = f32_ckpt
  assert convert_cli.main(["--checkpoint", str(out), "--output", str(tmp_path / "hf"), "--to_hf",
                           "--quiet"]) == 0
  back = load_file(str(tmp_path / "hf" / "model.safetensors"))  # < 5 GiB: one file, no index
  assert not (tmp_path / "hf" / "model.safetensors.index.json").exists()
  assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_tokenizer_travels_with_the_weights(tmp_path):
  from test_tokenizer import build

  from egspo.tokenizer import CharTokenizer, HFTokenizer, load_tokenizer

  hf = write_hf(tmp_path / "hf", _small_sd(), n_shards=2)
  build(hf)  # tokenizer files beside the weights, as in LLaDA's HF repo
  pretrained.convert_hf_to_orbax(hf, tmp_path / "orbax")
  tok = load_tokenizer(tmp_path / "orbax")
  assert isinstance(tok, HFTokenizer) and tok.encode("hello world") == [7, 8]
  assert (tok.mask_id, tok.eos_id) == (HF_CFG["mask_token_id"], HF_CFG["eos_token_id"])
  model = from_pretrained(tmp_path / "orbax")
  assert convert_cli.main(["--checkpoint", str(tmp_path / "orbax"), "--output",
                           str(tmp_path / "back"), "--to_hf", "--quiet"]) == 0
  assert load_tokenizer(tmp_path / "back").encode("the answer") == [9, 10]
  # A CPU-preset model saved with the built-in tokenizer loads it back by directory.
  save_pretrained_orbax(model, tmp_path / "char", tokenizer=CharTokenizer())
  assert isinstance(load_tokenizer(tmp_path / "char"), CharTokenizer)
  export_hf(model, tmp_path / "char_hf", tokenizer=tmp_path / "char")
  assert isinstance(load_tokenizer(tmp_path / "char_hf"), CharTokenizer)
