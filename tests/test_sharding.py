"""egspo.sharding on the 8 fake CPU devices of conftest.py.

For several mesh shapes: parameters are created directly in the shardings the logical-axis
rules ask for, the sharded forward equals the unsharded one, and a jitted gradient step with
in/out shardings equals the single-device step.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from egspo import sharding
from egspo.model import llada
from egspo.model.init import create_sharded_model


def small_config(**kw):
  base = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=64, vocab_size=50,
              embedding_size=52, mask_token_id=49, eos_token_id=1, pad_token_id=0,
              rope_theta=10000.0, max_sequence_length=64)
  base.update(kw)
  return llada.ModelConfig(**base)


def test_eight_devices():
  assert jax.device_count() == 8


def test_make_mesh_shapes_and_errors():
  mesh = sharding.make_mesh()
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(sharding.make_mesh(2, -1, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding.make_mesh(1, 2, 4).shape) == {"data": 1, "fsdp": 2, "tensor": 4}
  with pytest.raises(ValueError, match=r"= 12 devices, but 8 devices are available"):
    sharding.make_mesh(2, 3, 2)
  with pytest.raises(ValueError, match="not divisible by the fixed axes' product 3"):
    sharding.make_mesh(-1, 3, 1)
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    sharding.make_mesh(-1, -1, 2)
  with pytest.raises(ValueError, match="mesh axis tensor=0"):
    sharding.make_mesh(8, 1, 0)
  assert dict(sharding.make_mesh(devices=jax.devices()[:2], tensor=2).shape)["tensor"] == 2


def test_rules_override_and_errors(caplog):
  rules = sharding.merge_rules(sharding.RULES, [["mlp", ["fsdp", "tensor"]], ("embed", None)])
  table = dict(rules)
  assert table["mlp"] == ("fsdp", "tensor") and table["embed"] is None
  assert table["vocab"] == "tensor"  # untouched
  assert sharding.merge_rules(sharding.RULES, {"heads": ["tensor"]}) == sharding.RULES
  mesh = sharding.make_mesh(2, 2, 2)
  assert sharding.logical_to_mesh_axes(("embed", "mlp"), rules, mesh, (32, 64)) == \
      P(None, ("fsdp", "tensor"))
  assert sharding.logical_to_mesh_axes(("batch", "length"), sharding.RULES, mesh, (8, 3)) == \
      P(("data", "fsdp"))
  # The same mesh axis twice in one array: the later dimension is replicated.
  assert sharding.logical_to_mesh_axes(("mlp", "heads"), sharding.RULES, mesh, (8, 8)) == \
      P("tensor")
  # Not divisible: replicated, and the debug log says so.
  with caplog.at_level(logging.DEBUG, logger="egspo.partitioning"):
    spec = sharding.logical_to_mesh_axes(("vocab", "embed"), sharding.RULES, mesh, (51, 32),
                                         name="wte")
  assert spec == P(None, "fsdp")
  assert "wte dim 0 (vocab) of size 51 is not divisible" in caplog.text
  with pytest.raises(ValueError, match="no sharding rule for logical axis 'experts'"):
    sharding.logical_to_mesh_axes(("experts",), sharding.RULES, mesh, (4,))
  with pytest.raises(ValueError, match="names mesh axes \\['model'\\] not in the mesh"):
    sharding.logical_to_mesh_axes(("mlp",), [("mlp", "model")], mesh, (4,))
  with pytest.raises(ValueError, match="must be a \\(logical_name, mesh_axes\\) pair"):
    sharding.merge_rules([("mlp", "tensor", "x")])
  with pytest.raises(ValueError, match="mesh axes must be None"):
    sharding.merge_rules([("mlp", 3)])


def expected_spec(name: str, mesh, scanned: bool) -> P:
  """Hand-written table of the default rules for the small config (all dims divisible)."""
  f = "fsdp" if mesh.shape["fsdp"] > 1 else None
  t = "tensor" if mesh.shape["tensor"] > 1 else None
  leaf = name.split(".")[-2]
  table = {"embedding": (t, f), "weight": (), "q_proj": (f, t), "k_proj": (f, t), "v_proj": (f, t),
           "ff_proj": (f, t), "up_proj": (f, t), "attn_out": (t, f), "ff_out": (t, f)}
  if name == "wte.embedding":
    axes = table["embedding"]
  elif name.endswith("weight"):
    axes = ()
  elif name == "ff_out.kernel":  # LM head [embed, vocab]
    axes = (f, t)
  else:
    axes = table[leaf]
  if scanned and name.startswith("blocks"):
    axes = (None,) + axes
  axes = list(axes)
  while axes and axes[-1] is None:
    axes.pop()
  return P(*axes)


def _loss(model, ids, mask, targets):
  logits = model(ids, mask)
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1)), logits


def _grad_step(graphdef, params_shardings=None, batch_sharding=None):
  """jit(params, ids, mask, targets) → ((loss, logits), grads); sharded when shardings are given."""
  def step(params, ids, mask, targets):
    return jax.value_and_grad(lambda p: _loss(nnx.merge(graphdef, p), ids, mask, targets),
                              has_aux=True)(params)

  if params_shardings is None:
    return jax.jit(step)
  rep = NamedSharding(batch_sharding.mesh, P())
  return jax.jit(step, in_shardings=(params_shardings,) + (batch_sharding,) * 3,
                 out_shardings=((rep, batch_sharding), params_shardings))


@pytest.fixture(scope="module")
def batch():
  k1, k2 = jax.random.split(jax.random.key(0))
  ids = np.asarray(jax.random.randint(k1, (8, 12), 2, 50))
  mask = np.ones((8, 12), np.int32)
  mask[1, :5] = 0  # some left padding
  mask[6, :9] = 0
  targets = np.asarray(jax.random.randint(k2, (8, 12), 0, 50))
  return ids, mask, targets


def scanned_copy(model, cfg):
  """The same weights as a list-of-blocks `model`, in a scanned-stack model of config `cfg`."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: llada.LLaDA(cfg, rngs=nnx.Rngs(0))))
  src = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}
  flat = []
  for path, var in nnx.to_flat_state(abstract):
    if path[0] == "blocks":
      value = jnp.stack([src[("blocks", i) + path[1:]] for i in range(cfg.n_layers)])
    else:
      value = src[path]
    flat.append((path, var.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.fixture(scope="module")
def reference(batch):
  """Per scan_layers: (config, unsharded model, single-device (loss, logits), grads)."""
  out = {}
  base = llada.init_model(small_config(), seed=1)
  for scan in (False, True):
    cfg = small_config(scan_layers=scan, remat=scan)
    ref = scanned_copy(base, cfg) if scan else base
    params = jax.device_put(nnx.state(ref, nnx.Param), jax.devices()[0])
    (loss, logits), grads = _grad_step(nnx.graphdef(ref))(params, *batch)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3
    out[scan] = cfg, ref, (loss, logits), grads
  return out


# create_sharded_model (init straight into shardings) on one mesh; the others move the reference
# model with shard_model (same shardings; an init jit costs seconds of compile on 2 CPU cores).
@pytest.mark.parametrize("shape, scan, create", [((8, 1, 1), False, False),
                                                 ((2, 4, 1), True, False),
                                                 ((2, 2, 2), False, True),
                                                 ((1, 2, 4), True, False)])
def test_sharded_model_equals_unsharded(shape, scan, create, batch, reference):
  cfg, ref, (ref_loss, ref_logits), ref_grads = reference[scan]
  mesh = sharding.make_mesh(*shape)
  if create:
    model = create_sharded_model(cfg, mesh, seed=1)
  else:
    model = sharding.shard_model(nnx.clone(ref), mesh)

  # Parameters: same values as the unsharded init, placed as the rules say.
  params = nnx.state(model, nnx.Param)
  n_sharded = 0
  for (path, var), (_, ref_var) in zip(nnx.to_flat_state(params),
                                       nnx.to_flat_state(nnx.state(ref, nnx.Param))):
    name = ".".join(map(str, path if scan or path[0] != "blocks" else (path[0],) + path[2:]))
    x = var.get_value()
    want = expected_spec(name, mesh, scan)
    assert x.sharding.spec == want, (name, x.sharding.spec, want)
    shard_shape = x.sharding.shard_shape(x.shape)
    divisor = [1] * x.ndim
    for d, axes in enumerate(want):
      for a in (axes,) if isinstance(axes, str) else axes or ():
        divisor[d] *= mesh.shape[a]
    assert shard_shape == tuple(s // k for s, k in zip(x.shape, divisor)), name
    n_sharded += int(shard_shape != x.shape)
    np.testing.assert_allclose(x, ref_var.get_value(), atol=1e-7, rtol=0, err_msg=name)
  if shape != (8, 1, 1):  # pure data parallelism replicates everything
    assert n_sharded >= 8

  # A jitted gradient step with in/out shardings, on a batch split over (data, fsdp), equals the
  # single-device step: loss, logits and every gradient (placed like its parameter).
  ids_s, mask_s, targets_s = sharding.shard_batch(batch, mesh)
  assert ids_s.sharding.spec == P(("data", "fsdp"))
  p_shardings = sharding.model_shardings(model, mesh)
  step = _grad_step(nnx.graphdef(model), p_shardings, sharding.data_sharding(mesh))
  if shape == (8, 1, 1):  # without a mesh context: no activation constraints, XLA propagates
    (loss, logits), grads = step(params, ids_s, mask_s, targets_s)
  else:  # under the mesh and its rules the model pins activation shardings (llada.constrain)
    with sharding.use_mesh(mesh):
      (loss, logits), grads = step(params, ids_s, mask_s, targets_s)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)
  np.testing.assert_allclose(loss, ref_loss, atol=0, rtol=2e-6)
  for (path, g), (_, rg), (_, s) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads),
                                        nnx.to_flat_state(p_shardings)):
    assert g.get_value().sharding.is_equivalent_to(s.get_value(), g.get_value().ndim), path
    np.testing.assert_allclose(g.get_value(), rg.get_value(), atol=2e-6, rtol=1e-4,
                               err_msg=str(path))


def test_indivisible_dims_fall_back_to_replication(caplog):
  cfg = small_config(embedding_size=50, n_kv_heads=1)  # 50 % 4 != 0; kv width 8 % 4 == 0
  mesh = sharding.make_mesh(1, 2, 4)
  abstract = nnx.eval_shape(lambda: llada.LLaDA(cfg, rngs=nnx.Rngs(0)))  # no memory, no compute
  with caplog.at_level(logging.DEBUG, logger="egspo.partitioning"):
    shardings = sharding.logical_to_mesh_sharding(nnx.state(abstract), mesh)
  assert shardings["wte"]["embedding"].get_value().spec == P(None, "fsdp")
  assert shardings["ff_out"]["kernel"].get_value().spec == P("fsdp")
  assert shardings["blocks"][0]["k_proj"]["kernel"].get_value().spec == P("fsdp", "tensor")
  assert "(vocab) of size 50 is not divisible by mesh axes ('tensor',)" in caplog.text
  # Every spec is valid for its array (what jax.device_put / jit would reject otherwise).
  for (_, var), (_, sh) in zip(nnx.to_flat_state(nnx.state(abstract)),
                               nnx.to_flat_state(shardings)):
    sh.get_value().shard_shape(var.get_value().shape)


def test_activation_constraints_follow_the_rules():
  cfg = small_config()
  model = nnx.eval_shape(lambda: llada.LLaDA(cfg, rngs=nnx.Rngs(0)))
  mesh = sharding.make_mesh(2, 2, 2)
  x = jnp.zeros((8, 12, 32))
  assert llada.constrain(x, ("batch", "length", "act_embed")) is x  # no mesh: identity
  graphdef, state = nnx.split(model)
  ids = jax.ShapeDtypeStruct((8, 12), jnp.int32)

  def constraints(context):
    with context:
      hlo = jax.jit(lambda s, i: nnx.merge(graphdef, s).hidden_states(i)).lower(state, ids)
    return [l for l in hlo.as_text().splitlines() if "sharding_constraint" in l]

  # The rules reach the model from flax's rules context only: a mesh alone pins nothing.
  assert not constraints(jax.set_mesh(mesh))
  # Overridden rules (a config's mesh.rules) apply to activations too.
  lines = constraints(sharding.use_mesh(mesh, sharding.merge_rules(sharding.RULES,
                                                                   [("act_embed", "tensor")])))
  assert sum('[{"data", "fsdp"}, {}, {"tensor"}]> : tensor<8x12x32xf32>' in l for l in lines) == 3
  lines = constraints(sharding.use_mesh(mesh))
  # Embedding output + per layer (q, k, v, MLP hidden, block output).
  assert len(lines) == 1 + 5 * cfg.n_layers
  # Residual stream [8,12,32] split over data×fsdp; heads [8,12,4,8] also over tensor.
  assert sum('[{"data", "fsdp"}, {}, {}]> : tensor<8x12x32xf32>' in l for l in lines) == 3
  assert sum('[{"data", "fsdp"}, {}, {"tensor"}, {}]> : tensor<8x12x4x8xf32>' in l
             for l in lines) == 2
  assert sum('[{"data", "fsdp"}, {}, {"tensor"}]> : tensor<8x12x64xf32>' in l for l in lines) == 2


def test_shard_model_moves_existing_model():
  cfg = small_config()
  model = llada.init_model(cfg, seed=2)
  before = np.asarray(model.blocks[1].ff_proj.kernel.get_value())
  mesh = sharding.make_mesh(2, 2, 2)
  sharding.shard_model(model, mesh)
  k = model.blocks[1].ff_proj.kernel.get_value()
  assert k.sharding.spec == P("fsdp", "tensor")
  np.testing.assert_array_equal(k, before)


def test_batch_helpers_and_single_process_multihost():
  mesh = sharding.make_mesh(2, 2, 2)
  assert sharding.batch_size_multiple(mesh) == 4
  with pytest.raises(ValueError, match="not divisible by the data×fsdp device count 4"):
    sharding.shard_batch(np.zeros((6, 3)), mesh)
  x = np.arange(24, dtype=np.float32).reshape(8, 3)
  g = sharding.host_local_to_global({"x": x}, mesh)["x"]  # one process holds all rows
  assert g.shape == (8, 3) and g.sharding.spec == P(("data", "fsdp"))
  assert g.addressable_shards[0].data.shape == (2, 3)
  np.testing.assert_array_equal(sharding.process_allgather(g), x)
  assert sharding.is_main_process()
  sharding.sync_global_devices("test")  # no-op with one process
  assert "P(('data', 'fsdp'),)" in sharding.describe({"x": g})


_WORKER = r"""
import json, sys
import jax
pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=pid)
import numpy as np
from egspo import sharding
mesh = sharding.make_mesh()  # 2 processes × 2 CPU devices
local = np.arange(6, dtype=np.float32).reshape(2, 3) + 100 * pid  # this process's rows
g = sharding.host_local_to_global(local, mesh)
total = float(jax.jit(lambda x: x.sum())(g))
full = np.asarray(sharding.process_allgather(g))
sharding.sync_global_devices("done")
print("RESULT " + json.dumps({"devices": jax.device_count(), "shape": list(g.shape),
                              "total": total, "full": full.tolist(),
                              "main": sharding.is_main_process()}), flush=True)
"""


def test_two_process_loopback_helpers(tmp_path):
  """host_local_to_global / process_allgather / is_main_process across 2 real processes."""
  import json
  import os
  import socket
  import subprocess
  import sys

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  results = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, err[-2000:]
    # raw_decode: the JSON object only; Gloo's C++ logging shares stdout and was once seen
    # glued to the end of the RESULT line.
    results.append(json.JSONDecoder().raw_decode(out.split("RESULT ", 1)[1])[0])
  rows = np.concatenate([np.arange(6).reshape(2, 3) + 100 * i for i in range(2)]).tolist()
  for pid, r in enumerate(results):
    assert r["devices"] == 4 and r["shape"] == [4, 3]
    assert r["total"] == float(np.sum(rows)) == 630.0
    assert r["full"] == rows
    assert r["main"] == (pid == 0)


def test_llada_8b_plan_shards_every_parameter_evenly():
  """The real LLaDA-8B, abstractly: on fsdp=4 × tensor=2 every matrix is split 8 ways."""
  cfg = llada.get_config("llada_8b")
  abstract = nnx.eval_shape(lambda: llada.LLaDA(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(abstract, nnx.Param)
  mesh = sharding.make_mesh(1, 4, 2)
  shardings = sharding.logical_to_mesh_sharding(state, mesh)
  total = per_device = 0
  for (path, var), (_, sh) in zip(nnx.to_flat_state(state), nnx.to_flat_state(shardings)):
    x, s = var.get_value(), sh.get_value()
    shard = s.shard_shape(x.shape)
    n = int(np.prod(x.shape)) * x.dtype.itemsize
    total += n
    per_device += int(np.prod(shard)) * x.dtype.itemsize
    if x.ndim == 2:
      assert int(np.prod(shard)) * 8 == int(np.prod(x.shape)), path  # split over all 8 devices
  assert total == 2 * 8_015_581_184  # bf16
  # Only the 65 norm vectors (4096 each) are replicated.
  assert per_device == (total - 65 * 4096 * 2) // 8 + 65 * 4096 * 2


def test_optimizer_state_is_sharded_like_the_parameters():
  """nnx.Optimizer moments inherit `logical_axes`, so they get their parameter's sharding."""
  import optax

  cfg = small_config()
  opt = nnx.eval_shape(lambda: nnx.Optimizer(llada.LLaDA(cfg, rngs=nnx.Rngs(0)),
                                             optax.adamw(1e-3), wrt=nnx.Param))
  mesh = sharding.make_mesh(2, 2, 2)
  sh = {p: v.get_value() for p, v in
        nnx.to_flat_state(sharding.logical_to_mesh_sharding(nnx.state(opt), mesh))}
  model = nnx.eval_shape(lambda: llada.LLaDA(cfg, rngs=nnx.Rngs(0)))
  params = {p: v.get_value() for p, v in
            nnx.to_flat_state(sharding.logical_to_mesh_sharding(nnx.state(model), mesh))}
  n = 0
  for path, s in sh.items():
    if path[-1] in ("count", "step"):  # scalars: replicated
      assert s.spec == P()
    elif path[2] in ("mu", "nu"):
      assert s.spec == params[path[3:]].spec, path
      n += 1
  assert n == 2 * len(params)
  assert sh[("opt_state", 0, "mu", "blocks", 0, "q_proj", "kernel")].spec == P("fsdp", "tensor")
