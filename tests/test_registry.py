"""The method registry (egspo.rl.registry): a new method is one registered class plus its config
section. A toy method defined here, in the test file alone, is validated through the registry and
trains one RL iteration through `egspo.train.run`; no library module is edited."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from egspo import config as config_lib
from egspo.diffusion import sampler as sampler_lib
from egspo.rl import registry

TOY = "toy_reinforce"


class ToyReinforce:
  """REINFORCE on the one-step log-likelihood of the completion given the prompt and a fully
  masked canvas: loss = −Σ_i scale·A_i·mean_l log p(x_l), A = r − mean_G r."""

  @classmethod
  def validate_config(cls, f):
    f.real("toy.scale", 0.0, lo_open=True)

  def __init__(self, ctx: registry.Context):
    self.ctx = ctx
    self.scale = float(ctx.config.toy.scale)

  def plan(self, params, frozen, it: registry.Iteration):
    del params, frozen
    c = self.ctx.config
    r = np.asarray(it.rewards, np.float32).reshape(-1, c.batch.group_size)
    adv = (r - r.mean(1, keepdims=True)).reshape(-1)
    ro = it.rollout
    batch = dict(prompt_ids=ro.prompt_ids, prompt_mask=ro.prompt_mask, tokens=ro.tokens,
                 adv=jnp.asarray(adv))
    return ([registry.split_micro(batch, c.batch.micro_batch_size)],
            {"toy_adv_abs_mean": float(np.abs(adv).mean())})

  def loss(self, model, mb, key):
    del key
    tokens = mb["tokens"]
    canvas = jnp.full_like(tokens, self.ctx.mask_token_id)
    ids = jnp.concatenate([mb["prompt_ids"], canvas], axis=1)
    mask = jnp.concatenate([mb["prompt_mask"], jnp.ones(tokens.shape, bool)], axis=1)
    logits = sampler_lib.model_logits_fn(model, tokens.shape[1])(ids, mask)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]
    seq = logp.mean(-1)
    loss_sum = -self.scale * jnp.sum(mb["adv"] * seq)
    return loss_sum, jnp.float32(tokens.shape[0]), {"toy/seq_logp": seq.mean()}


@pytest.fixture
def toy():
  registry.register(TOY)(ToyReinforce)
  yield ToyReinforce
  registry.unregister(TOY)


def toy_config():
  """The `copy` task's tiny config shrunk to one RL iteration, no SFT, 4 evaluation problems; the
  toy's section added on this ConfigDict only."""
  c = config_lib.base_config("copy", "tiny")
  c.algorithm = TOY
  c.toy = ml_collections.ConfigDict({"scale": 1.0})
  c.sft.steps = 0
  c.batch.num_prompts, c.batch.group_size, c.batch.micro_batch_size = 2, 4, 8
  c.rollout.gen_length, c.rollout.block_length, c.rollout.steps = 8, 8, 4
  c.eval.gen_length, c.eval.block_length, c.eval.steps = 8, 8, 4
  c.egspo.num_selected_steps = 2
  c.task.num_eval_examples = 4
  c.eval.before_training = False
  c.train.num_iterations = 1
  c.mesh.num_devices = 1
  c.optim.learning_rate = 1e-3
  return c


def test_register_names_and_refuses_a_taken_name(toy):
  assert registry.get_algorithm(TOY) is toy and TOY in registry.registered()
  assert {"egspo", "egspo_sa", "diffu_grpo", "espo", "gdpo", "stabledrl", "wd1"} <= set(
      registry.registered())
  with pytest.raises(ValueError, match="algorithm 'egspo' is already registered by EGSPO"):
    registry.register("egspo")(ToyReinforce)
  redefined = type("ToyReinforce", (ToyReinforce,), {"__module__": ToyReinforce.__module__})
  registry.register(TOY)(redefined)  # a re-run definition (notebook cell, reload) replaces it
  assert registry.get_algorithm(TOY) is redefined
  with pytest.raises(ValueError, match=r"unknown algorithm 'nope'; registered: \["):
    registry.get_algorithm("nope")


def test_config_validates_through_the_registry(toy):
  c = toy_config()
  config_lib.validate(c)
  c.toy.scale = -1.0
  with pytest.raises(config_lib.ConfigError, match=r"^bad config field toy\.scale=-1\.0: must "
                                                   r"be a finite number > 0$"):
    config_lib.validate(c)
  del c["toy"]
  with pytest.raises(config_lib.ConfigError, match=r"^missing config field toy\.scale"):
    config_lib.validate(c)
  registry.unregister(TOY)  # the choices of `algorithm` are the registered names
  with pytest.raises(config_lib.ConfigError, match=rf"^bad config field algorithm='{TOY}': must "
                                                   r"be one of \("):
    config_lib.validate(toy_config())


def test_split_micro():
  tree = {"a": jnp.arange(12).reshape(6, 2), "b": jnp.arange(6)}
  out = registry.split_micro(tree, 3)
  assert out["a"].shape == (2, 3, 2) and out["b"].tolist() == [[0, 1, 2], [3, 4, 5]]
  with pytest.raises(ValueError, match="batch 6 is not divisible by micro_batch_size 4"):
    registry.split_micro(tree, 4)


def test_a_toy_method_trains_through_egspo_train(toy, tmp_path):
  from egspo import train

  history = train.run(toy_config(), tmp_path)
  recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  rl = [r for r in recs if "rl/loss" in r]
  assert len(rl) == 1
  r = rl[0]
  assert r["rl/update_ok"] == 1.0 and np.isfinite(r["rl/loss"])
  assert np.isfinite(r["rl/toy/seq_logp"]) and r["rl/toy/seq_logp"] < 0  # the toy's own metric
  assert r["rl/toy_adv_abs_mean"] >= 0  # its plan's metric
  assert r["rl/grad_norm"] > 0  # the toy's loss reached the parameters
  assert 0.0 <= history["eval_1"]["accuracy"] <= 1.0  # evaluated after its iteration
