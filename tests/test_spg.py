"""SPG's sandwiched bound as StableDRL releases it (egspo/diffusion/spg.py) and the released
StableDRL loss on it (`losses.stabledrl_loss(bound=...)`): hand-computed cases, the block-random
forward process's structure, common random numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egspo.diffusion import spg
from egspo.rl import losses as loss_lib


def _release_bound_terms(lp, masked, valid, beta):
  """The release's `_get_per_seq_logps_spg` arithmetic transcribed in NumPy (p^β, not log space)."""
  hit = masked & valid[None]
  den = np.maximum(hit.sum(-1), 1e-8)
  elbo = ((lp * hit).sum(-1) / den).mean(0)
  t = hit.sum(-1) / np.maximum(valid.sum(-1), 1e-8)[None]
  avg = (np.exp(lp) ** beta * hit / np.maximum(t, 1e-8)[..., None]).mean(0)
  keep = avg > 0
  eubo = (np.log(np.where(keep, avg, 1.0)) * keep).sum(-1) / np.maximum(keep.sum(-1), 1e-8) / beta
  return elbo, eubo


def test_bound_terms_hand_computed():
  # One row, L = 3, two draws; token 1 is masked in both, token 2 only in draw 1.
  lp = np.array([[[-1.0, -2.0, -3.0]], [[-0.5, -1.0, -4.0]]], np.float32)
  masked = np.array([[[True, True, False]], [[False, True, True]]])
  valid = np.ones((1, 3), bool)
  elbo, eubo = spg.bound_terms(jnp.asarray(lp), jnp.asarray(masked), jnp.asarray(valid), 1.0)
  # ELBO: draw 0 mean(-1, -2) = -1.5, draw 1 mean(-1, -4) = -2.5 → -2.
  assert float(elbo[0]) == pytest.approx(-2.0)
  # t = 2/3 in both draws; a_i = mean_j p_ij · 1[masked] / t: 0.75 e^-1, 0.75 (e^-2 + e^-1),
  # 0.75 e^-4; EUBO = mean log a_i (β = 1).
  a = 0.75 * np.array([np.exp(-1), np.exp(-2) + np.exp(-1), np.exp(-4)])
  assert float(eubo[0]) == pytest.approx(float(np.mean(np.log(a))), rel=1e-6)


def test_bound_terms_match_the_release_arithmetic_with_padding_and_empty_draws():
  rng = np.random.default_rng(0)
  d, n, l = 3, 4, 6
  lp = np.log(rng.uniform(0.05, 1.0, (d, n, l))).astype(np.float32)
  masked = rng.uniform(size=(d, n, l)) < 0.5
  masked[1, 0] = False  # a draw that masks nothing in row 0: its ELBO counts 0
  valid = np.ones((n, l), bool)
  valid[2, 4:] = False  # row 2 ends at its EOS (position 3)
  got = spg.bound_terms(jnp.asarray(lp), jnp.asarray(masked), jnp.asarray(valid), 1.5)
  want = _release_bound_terms(lp, masked, valid, 1.5)
  np.testing.assert_allclose(np.asarray(got[0]), want[0], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got[1]), want[1], rtol=1e-5)


def test_sandwich_takes_the_elbo_only_for_positive_advantages():
  elbo = jnp.array([-1.0, -2.0, -3.0])
  eubo = jnp.array([-0.5, -0.5, -1.0])
  adv = jnp.array([0.5, 0.0, -1.0])
  got = spg.sandwich(elbo, eubo, adv, mix_weight=0.25)
  np.testing.assert_allclose(np.asarray(got), [-1.0, 0.25 * -0.5 + 0.75 * -2.0,
                                               0.25 * -1.0 + 0.75 * -3.0])


def _blocks(mask_row, bl):
  return mask_row.reshape(-1, bl)


def test_block_random_masks_structure():
  n, p, l, bl, num_t = 3, 4, 8, 2, 2
  prompt_mask = np.ones((n, p), bool)
  prompt_mask[1, :2] = False  # left padding
  valid = np.ones((n, l), bool)
  valid[2, 3:] = False  # row 2: valid completion of length 3 (2 valid blocks)
  for seed in range(20):
    pm, cm = spg.block_random_masks(jax.random.key(seed), jnp.asarray(prompt_mask),
                                    jnp.asarray(valid), block_length=bl, num_t=num_t,
                                    p_mask_prompt=0.0)
    pm, cm = np.asarray(pm), np.asarray(cm)
    assert pm.shape == (num_t, n, p) and cm.shape == (num_t, n, l)
    assert not pm.any()  # p = 0: the prompt is clean
    for i in range(n):
      chosen = []
      for j in range(num_t):
        m = cm[j, i]
        assert m[~valid[i]].all()  # past the valid completion: always masked
        hit = m & valid[i]
        b = int(np.argmax(_blocks(hit, bl).any(-1)))  # the first block with a masked token
        chosen.append(b)
        assert not hit[:b * bl].any()  # earlier blocks clean (p = 0)
        assert hit[(b + 1) * bl:][valid[i][(b + 1) * bl:]].all()  # later blocks fully masked
        count = valid[i][b * bl:(b + 1) * bl].sum()
        assert 1 <= hit[b * bl:(b + 1) * bl].sum() <= count
      assert max(chosen) < (valid[i].sum() - 1) // bl + 1
      if valid[i].all():  # one permutation of the 4 blocks: the two draws differ
        assert chosen[0] != chosen[1]
  pm, cm = spg.block_random_masks(jax.random.key(0), jnp.asarray(prompt_mask), jnp.asarray(valid),
                                  block_length=bl, num_t=num_t, p_mask_prompt=1.0 - 1e-7)
  np.testing.assert_array_equal(np.asarray(pm), np.broadcast_to(prompt_mask, pm.shape))
  # p ≈ 1: blocks before the chosen one are masked too; what stays is inside one block.
  for row in np.asarray(cm).reshape(num_t * n, l):
    assert len(set(np.flatnonzero(~row) // bl)) <= 1


def test_block_random_masks_count_covers_the_block():
  """m ~ U{1 … count}: every count appears (one row, one block of 4 valid tokens)."""
  counts = set()
  for seed in range(60):
    _, cm = spg.block_random_masks(jax.random.key(seed), jnp.ones((1, 2), bool),
                                   jnp.ones((1, 4), bool), block_length=4, num_t=1,
                                   p_mask_prompt=0.0)
    counts.add(int(np.asarray(cm).sum()))
  assert counts == {1, 2, 3, 4}
  with pytest.raises(ValueError, match="num_t=2 draws"):
    spg.block_random_masks(jax.random.key(0), jnp.ones((1, 2), bool), jnp.ones((1, 4), bool),
                           block_length=4, num_t=2, p_mask_prompt=0.0)


def _toy_logits_fn(vocab=7, mask_id=6):
  """Logits of every position from the canvas's token counts (sees masks and the prompt)."""
  w = jax.random.normal(jax.random.key(5), (vocab, vocab))

  def fn(ids, attn):
    onehot = jax.nn.one_hot(ids, vocab) * attn[..., None]
    ctx = onehot.mean(1, keepdims=True)
    return (onehot + ctx) @ w

  return fn


def test_spg_estimate_is_bound_terms_of_its_draws_and_a_function_of_the_key():
  fn = _toy_logits_fn()
  prompt = jnp.array([[1, 2, 3], [0, 4, 5]], jnp.int32)
  pmask = jnp.array([[True] * 3, [False, True, True]])
  comp = jnp.array([[1, 2, 3, 4], [5, 1, 0, 0]], jnp.int32)
  valid = loss_lib.completion_mask_through_eos(comp, 0)
  kw = dict(mask_token_id=6, block_length=2, num_t=2, p_mask_prompt=0.15, eubo_beta=1.5)
  key = jax.random.key(3)
  got = spg.spg_estimate(fn, key, prompt, pmask, comp, valid, **kw)
  assert got.shape == (2, 2)
  pm, cm = spg.block_random_masks(key, pmask, valid, block_length=2, num_t=2, p_mask_prompt=0.15)
  lp = spg.draw_logprobs(fn, prompt, pmask, comp, pm, cm, 6)
  want = spg.bound_terms(lp, cm, valid, 1.5)
  np.testing.assert_allclose(np.asarray(got), np.stack(want, -1), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(spg.spg_estimate(fn, key, prompt, pmask, comp, valid,
                                                            **kw)), np.asarray(got))
  assert not np.allclose(np.asarray(spg.spg_estimate(fn, jax.random.key(4), prompt, pmask, comp,
                                                     valid, **kw)), np.asarray(got))


def test_draw_logprobs_by_hand():
  fn = _toy_logits_fn()
  prompt = jnp.array([[1, 2]], jnp.int32)
  pmask = jnp.ones((1, 2), bool)
  comp = jnp.array([[3, 4]], jnp.int32)
  pm = jnp.array([[[True, False]]])
  cm = jnp.array([[[False, True]]])
  got = spg.draw_logprobs(fn, prompt, pmask, comp, pm, cm, 6)
  ids = jnp.array([[6, 2, 3, 6]], jnp.int32)
  logp = jax.nn.log_softmax(fn(ids, jnp.ones((1, 4), bool))[0, 2:])
  np.testing.assert_allclose(np.asarray(got)[0, 0], [logp[0, 3], logp[1, 4]], rtol=1e-6)


def test_stabledrl_loss_with_the_spg_bound_hand_computed():
  """The released loss −Σ w_i A_i L_i: w from the (clipped, self-normalised) ELBO ratio, the
  gradient through the bound only."""
  logl = jnp.array([-1.0, -2.0])
  old = jnp.array([-1.5, -1.0])
  adv = jnp.array([1.0, -1.0])
  bound = jnp.array([-1.0, -3.0])
  w = np.exp([0.5, -1.0]) / np.exp([0.5, -1.0]).sum()
  loss, n, m = loss_lib.stabledrl_loss(logl, old, adv, 2, clip_iw=5.0, bound=bound)
  assert float(n) == 1.0
  assert float(loss) == pytest.approx(w[0] * 1.0 - 3.0 * w[1], rel=1e-6)
  g_logl, g_bound = jax.grad(
      lambda a, b: loss_lib.stabledrl_loss(a, old, adv, 2, bound=b)[0], argnums=(0, 1))(logl, bound)
  np.testing.assert_allclose(np.asarray(g_bound), -w * np.array([1.0, -1.0]), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(g_logl), [0.0, 0.0])
  # Without a bound the ELBO carries the gradient (the default).
  loss_e, _, _ = loss_lib.stabledrl_loss(logl, old, adv, 2)
  assert float(loss_e) == pytest.approx(w[0] * 1.0 - 2.0 * w[1], rel=1e-6)
  # The clip bites at log 5 whatever the advantage's sign.
  _, _, m = loss_lib.stabledrl_loss(jnp.array([3.0, 0.0]), jnp.zeros(2), adv, 2, bound=bound)
  assert float(m["iw/clip_frac"]) == 0.5
