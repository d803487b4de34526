"""Policy losses against hand-computed values, on both sides of the clip, with gradients."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egspo.rl import losses as L

E = math.exp


def test_k3_and_k2_values():
  # d = ref − logp = −0.5: k3 = e^−0.5 + 0.5 − 1.
  np.testing.assert_allclose(L.k3_kl(jnp.float32(-1.0), jnp.float32(-1.5)), E(-0.5) - 0.5, rtol=1e-6)
  np.testing.assert_allclose(L.k3_kl(jnp.float32(-1.0), jnp.float32(-1.0)), 0.0, atol=1e-7)
  np.testing.assert_allclose(L.k2_kl(jnp.float32(-1.0), jnp.float32(-1.5)), 0.125, rtol=1e-6)
  g = jax.grad(lambda lp: L.k3_kl(lp, -1.5))(jnp.float32(-1.0))
  np.testing.assert_allclose(g, 1 - E(-0.5), rtol=1e-6)  # d/dlogp = 1 − e^(ref − logp)


# Six slots: (log-ratio, A) on each side of the clip, ε = 0.2, ε_high = 0.5.
LOG_RATIO = np.array([0.1, 0.6, -0.5, -0.5, 0.6, 0.1], np.float32)
ADV = np.array([1.0, 1.0, 1.0, -1.0, -1.0, -1.0], np.float32)
# −min(rA, clip(r)A): A > 0: r inside → −r; r > 1.5 → −1.5 (clipped); r < 0.8 → −r (unclipped).
#                    A < 0: r < 0.8 → 0.8 (clipped); r > 1.5 → r (unclipped); inside → r.
WANT = np.array([-E(0.1), -1.5, -E(-0.5), 0.8, E(0.6), E(0.1)])
# d loss / d logp = −A·r where unclipped, 0 where the clipped branch is chosen.
WANT_GRAD = np.array([-E(0.1), 0.0, -E(-0.5), 0.0, E(0.6), E(0.1)])


def test_egspo_step_loss_k3_term_and_valid_mask():
  logp = jnp.array([[-1.0, 1000.0]])  # second slot: garbage padding that would overflow exp()
  old = jnp.array([[-1.0, -5.0]])
  ref = jnp.array([[-1.5, jnp.nan]])
  adv = jnp.array([[0.5, 3.0]])
  valid = jnp.array([[True, False]])
  f = lambda lp: L.egspo_step_loss(lp, old, adv, valid, ref, beta=0.04)
  loss_sum, denom, m = f(logp)
  k3 = E(-0.5) + 0.5 - 1
  np.testing.assert_allclose(loss_sum, -0.5 + 0.04 * k3, rtol=1e-6)
  assert float(denom) == 1
  np.testing.assert_allclose(m["kl"], k3, rtol=1e-6)
  grad = jax.grad(lambda lp: f(lp)[0])(logp)
  np.testing.assert_allclose(grad, [[-0.5 + 0.04 * (1 - E(-0.5)), 0.0]], rtol=1e-6)
  # loss_scale reproduces the reference's 1/tokens_per_step.
  np.testing.assert_allclose(L.egspo_step_loss(logp, old, adv, valid, ref, loss_scale=0.5)[0],
                             0.5 * loss_sum, rtol=1e-6)


def test_step_loss_scale_from_config():
  # The release: each per-step loss / (max_completion_length // diffusion_steps).
  assert L.step_loss_scale("tokens_per_step", gen_length=256, steps=128) == 0.5
  assert L.step_loss_scale("tokens_per_step", gen_length=16, steps=5) == 1 / 3  # integer division
  assert L.step_loss_scale("none", gen_length=256, steps=128) == 1.0
  assert L.step_loss_scale(0.25, gen_length=256, steps=128) == 0.25
  assert L.step_loss_scale("0.25", gen_length=256, steps=128) == 0.25  # a command-line override
  for bad in ("x", 0, -1.0, "nan", float("inf"), True, None):
    with pytest.raises(ValueError, match="tokens_per_step"):
      L.step_loss_scale(bad, gen_length=256, steps=128)
  with pytest.raises(ValueError, match="gen_length=4 >= rollout.steps=8"):
    L.step_loss_scale("tokens_per_step", gen_length=4, steps=8)
  # The scale multiplies loss, metric and gradient alike; the denominator is unchanged.
  logp, old, adv = jnp.array([[-1.0, -2.0]]), jnp.array([[-1.2, -1.5]]), jnp.array([[1.0, -0.5]])
  f = lambda lp, s: L.egspo_step_loss(lp, old, adv, None, old - 0.3, loss_scale=s)
  (s1, d1, m1), (s2, d2, m2) = f(logp, 1.0), f(logp, 0.5)
  np.testing.assert_allclose([s2, m2["loss"]], [0.5 * s1, 0.5 * m1["loss"]], rtol=1e-6)
  assert float(d1) == float(d2) == 2
  g1, g2 = (jax.grad(lambda lp, s=s: f(lp, s)[0])(logp) for s in (1.0, 0.5))
  np.testing.assert_allclose(g2, 0.5 * g1, rtol=1e-6)


def test_micro_batches_aggregate_exactly():
  key = jax.random.key(0)
  k1, k2, k3 = jax.random.split(key, 3)
  logp = -jax.random.uniform(k1, (6, 4))
  old = logp + 0.5 * jax.random.normal(k2, (6, 4))
  adv = jax.random.normal(k3, (6, 4))
  valid = jnp.arange(24).reshape(6, 4) % 5 != 0
  full = L.egspo_step_loss(logp, old, adv, valid, logp - 0.1)
  parts = [L.egspo_step_loss(logp[s], old[s], adv[s], valid[s], logp[s] - 0.1)
           for s in (slice(0, 2), slice(2, 6))]
  np.testing.assert_allclose(sum(p[0] for p in parts) / sum(p[1] for p in parts),
                             full[0] / full[1], rtol=1e-6)
  np.testing.assert_allclose(sum(p[2]["kl"] * p[1] for p in parts) / full[1], full[2]["kl"],
                             rtol=1e-5)


def test_completion_mask_through_eos():
  toks = jnp.array([[5, 2, 7, 2], [1, 1, 1, 1], [2, 3, 3, 3]])
  np.testing.assert_array_equal(L.completion_mask_through_eos(toks, 2),
                                [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])


def _token_loss_loop(lp, old, ref, adv, mask, eps, beta):
  """Obvious per-token loop, independent of the vectorised code."""
  tot, n, per_seq = 0.0, 0, []
  for i in range(lp.shape[0]):
    s, c = 0.0, 0
    for k in range(lp.shape[1]):
      if not mask[i, k]:
        continue
      r = math.exp(lp[i, k] - old[i, k])
      rc = min(max(r, 1 - eps), 1 + eps)
      d = ref[i, k] - lp[i, k]
      val = -min(r * adv[i], rc * adv[i]) + beta * (math.exp(d) - d - 1)
      s, c = s + val, c + 1
    tot, n = tot + s, n + c
    per_seq.append(s / c)
  return tot, n, np.mean(per_seq)


def test_espo_sequence_loss_inside_normalisation():
  # ratio = exp((−10 + 12) / 4) = e^0.5 ≈ 1.65 > 1.2.
  logl, old, ref = jnp.array([-10.0, -10.0]), jnp.array([-12.0, -12.0]), jnp.array([-11.0, -11.0])
  adv = jnp.array([1.0, -1.0])
  f = lambda x: L.espo_loss(x, old, adv, 4, ref, beta=0.01)
  loss_sum, denom, m = f(logl)
  kl = 0.5 * 1.0 / 4  # k2 = ½ (ELBO − ref)² / L
  np.testing.assert_allclose(loss_sum, -1.2 + E(0.5) + 2 * 0.01 * kl, rtol=1e-6)
  assert float(denom) == 2
  np.testing.assert_allclose(m["kl"], kl, rtol=1e-6)
  g = jax.grad(lambda x: f(x)[0])(logl)
  # A > 0 clipped: only the KL gradient β (ELBO − ref)/L; A < 0: r/L + the same.
  np.testing.assert_allclose(g, [0.01 * 0.25, E(0.5) / 4 + 0.01 * 0.25], rtol=1e-6)


def test_gdpo_outside_and_none_normalisation():
  logl, old, adv = jnp.array([-10.0]), jnp.array([-12.0]), jnp.array([-1.0])
  out = L.gdpo_loss(logl, old, adv, 4, normalize="outside")
  np.testing.assert_allclose(out[0], E(2.0) / 4, rtol=1e-6)  # ratio e², unclipped for A < 0
  g = jax.grad(lambda x: L.gdpo_loss(x, old, adv, 4, normalize="outside")[0])(logl)
  np.testing.assert_allclose(g, [E(2.0) / 4], rtol=1e-6)
  np.testing.assert_allclose(L.gdpo_loss(logl, old, adv, 4, normalize="none")[0], E(2.0), rtol=1e-6)
  np.testing.assert_allclose(L.gdpo_loss(logl, old, adv, 4)[0], E(0.5), rtol=1e-6)
  # Per-sample lengths.
  np.testing.assert_allclose(
      L.gdpo_loss(jnp.array([-10.0, -10.0]), jnp.array([-12.0, -12.0]), jnp.array([-1.0, -1.0]),
                  jnp.array([4.0, 2.0]))[0], E(0.5) + E(1.0), rtol=1e-6)
  with pytest.raises(ValueError, match="normalize must be"):
    L.gdpo_loss(logl, old, adv, 4, normalize="bogus")


def test_stabledrl_self_normalised_unconditional_clip():
  logl, old, adv = jnp.array([-1.0, -2.0]), jnp.array([-1.5, -1.0]), jnp.array([1.0, -1.0])
  w = np.array([E(0.5), E(-1.0)]) / (E(0.5) + E(-1.0))  # softmax of log-iw (0.5, −1)
  f = lambda x: L.stabledrl_loss(x, old, adv, 2)
  loss_sum, denom, m = f(logl)
  np.testing.assert_allclose(loss_sum, -(w[0] * 1 * -1 + w[1] * -1 * -2), rtol=1e-6)
  assert float(denom) == 1
  # The weights are detached: d/dlogl_i = −w_i A_i.
  np.testing.assert_allclose(jax.grad(lambda x: f(x)[0])(logl), [-w[0], w[1]], rtol=1e-6)
  np.testing.assert_allclose(m["iw/ess_frac"], 1 / np.sum(w * w) / 2, rtol=1e-6)
  # Unconditional clip: log-iw 4 > log 5 is clipped whether A is positive or negative.
  old2 = jnp.array([-5.0, -1.0])
  wc = np.array([5.0, E(-1.0)]) / (5.0 + E(-1.0))
  for a0 in (1.0, -1.0):
    adv2 = jnp.array([a0, -1.0])
    g = jax.grad(lambda x: L.stabledrl_loss(x, old2, adv2, 2)[0])(logl)
    np.testing.assert_allclose(g, [-wc[0] * a0, wc[1]], rtol=1e-6)
  np.testing.assert_allclose(L.stabledrl_loss(logl, old2, adv, 2)[2]["iw/clip_frac"], 0.5)
  # Two groups normalise separately.
  ls4 = L.stabledrl_loss(jnp.tile(logl, 2), jnp.tile(old, 2), jnp.tile(adv, 2), 2)
  np.testing.assert_allclose(ls4[0], 2 * loss_sum, rtol=1e-6)
  assert float(ls4[1]) == 2


def test_gather_step_logprobs_sum_and_mean():
  commit = jnp.array([[0, 1, 1, 2]])
  steps = jnp.array([[1, 2, 3]])  # step 3 commits nothing
  per_state = jnp.arange(12, dtype=jnp.float32).reshape(1, 3, 4) * -0.1
  # k = 0 (t = 1): positions 1, 2 of row 0 → −0.1 − 0.2; k = 1 (t = 2): position 3 of row 1 → −0.7.
  np.testing.assert_allclose(L.gather_step_logprobs(per_state, commit, steps),
                             [[-0.3, -0.7, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(L.gather_step_logprobs(per_state, commit, steps, "mean"),
                             [[-0.15, -0.7, 0.0]], rtol=1e-6)
  rollout_logp = jnp.array([[-1.0, -2.0, -3.0, -4.0]])  # [B, G]
  np.testing.assert_allclose(L.gather_step_logprobs(rollout_logp, commit, steps),
                             [[-5.0, -4.0, 0.0]])


class LossVariantsTest(chex.TestCase):
  """Losses, metrics and gradients against hand-computed values, traced under `jax.jit` and run
  eagerly (chex variants), and the losses' chex contracts."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_egspo_step_loss_both_sides_of_clip_and_grads(self):
    old = jnp.full((2, 3), -2.0)
    logp = old + LOG_RATIO.reshape(2, 3)
    adv = jnp.asarray(ADV.reshape(2, 3))
    loss = self.variant(functools.partial(L.egspo_step_loss, beta=0.0))
    chex.assert_trees_all_close(loss(logp, old, adv), (WANT.sum(), 6.0, {
        "clip/low_frac": 1 / 6, "clip/high_frac": 1 / 6, "clip/frac": 2 / 6,
        "ratio/mean": np.exp(LOG_RATIO).mean(), "loss": WANT.sum() / 6}), rtol=1e-5)
    grad = self.variant(jax.grad(lambda lp: L.egspo_step_loss(lp, old, adv, beta=0.0)[0]))(logp)
    chex.assert_trees_all_close(grad.reshape(-1), WANT_GRAD, rtol=1e-5, atol=1e-7)
    # logp_old never receives gradient.
    g_old = self.variant(jax.grad(lambda o: L.egspo_step_loss(logp, o, adv, beta=0.0)[0]))(old)
    chex.assert_trees_all_equal(g_old, jnp.zeros_like(old))

  @chex.variants(with_jit=True, without_jit=True)
  def test_diffu_grpo_token_loss_matches_loop(self):
    rng = np.random.default_rng(0)
    lp = -rng.uniform(0.1, 3, (3, 5)).astype(np.float32)
    old = (lp + rng.normal(0, 0.6, lp.shape)).astype(np.float32)
    ref = (lp + rng.normal(0, 0.3, lp.shape)).astype(np.float32)
    adv = np.array([1.0, -0.5, 2.0], np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
    tot, n, seq_mean = _token_loss_loop(lp, old, ref, adv, mask, 0.5, 0.04)
    assert n == 9
    token = self.variant(L.diffu_grpo_token_loss)
    loss_sum, denom, _ = token(jnp.asarray(lp), old, adv, mask, ref)
    chex.assert_trees_all_close((loss_sum, denom), (tot, float(n)), rtol=1e-5)
    sequence = self.variant(functools.partial(L.diffu_grpo_token_loss, reduction="sequence"))
    loss_sum, denom, _ = sequence(jnp.asarray(lp), old, adv, mask, ref)
    chex.assert_trees_all_close(loss_sum / denom, seq_mean, rtol=1e-5)
    # Masked tokens get no gradient.
    grad = self.variant(jax.grad(lambda x: L.diffu_grpo_token_loss(x, old, adv, mask, ref)[0]))
    g = np.asarray(grad(jnp.asarray(lp)))
    assert np.all(g[~mask] == 0) and np.all(g[mask] != 0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_wd1_hand_computed(self):
    logl, adv = jnp.array([-1.0, -2.0]), jnp.array([1.0, -1.0])
    p = E(1) / (E(1) + E(-1))
    loss_sum = (1 - p - p) * -1 + (p - (1 - p)) * -2
    loss = self.variant(L.wd1_loss, static_argnums=2)
    chex.assert_trees_all_close(loss(logl, adv, 2), (loss_sum, 1.0, {"loss": loss_sum}),
                                rtol=1e-6)
    grad = self.variant(jax.grad(lambda x: L.wd1_loss(x, adv, 2)[0]))(logl)
    chex.assert_trees_all_close(grad, jnp.array([(1 - p) - p, p - (1 - p)]), rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_contracts(self):
    step_loss = self.variant(L.egspo_step_loss)
    x = jnp.zeros((2, 3))
    with self.assertRaisesRegex(AssertionError, "assert_equal_shape"):
      step_loss(x, x, jnp.zeros((2, 2)))
    with self.assertRaisesRegex(AssertionError, "assert_rank"):
      step_loss(x[0], x[0], x[0])  # [B, K] expected
    with self.assertRaisesRegex(AssertionError, "assert_type"):
      step_loss(x.astype(jnp.int32), x, x)
    with self.assertRaisesRegex(AssertionError, "assert_rank"):
      self.variant(L.diffu_grpo_token_loss)(x, x, x, x > 0)  # adv must be [N]
    with self.assertRaisesRegex(AssertionError, "assert_rank"):
      self.variant(L.stabledrl_loss, static_argnums=3)(x, x, x, 2)  # [B] expected
    steps = jnp.zeros((2, 3), jnp.int32)
    with self.assertRaisesRegex(AssertionError, "assert_rank"):
      self.variant(L.gather_step_logprobs)(x[0], steps, steps)  # [B, G] or [B, K, G]
