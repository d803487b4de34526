"""Forward noising, SFT loss and ELBO estimators against an exactly enumerated toy model.

Exact ELBO (see egspo/diffusion/masking.py): for a completion y of length L,
    S_k  = mean over the C(L, k) subsets M with |M| = k of Σ_{i∈M} log p(y_i | y with M masked)
    f(t) = Σ_{k=1}^{L} C(L, k) t^(k−1) (1 − t)^(L−k) S_k        (= E[(1/t) Σ_masked log p])
    ELBO = ∫_0^1 f(t) dt = Σ_{k=1}^{L} S_k / k                  (Beta integral B(k, L−k+1))
Estimators are checked against it (or against ∫ of f over their own t-range) with many independent
keys: |mean − exact| < 4.5 standard errors.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egspo.diffusion import masking as M

V, MASK, P, L, D = 5, 4, 3, 4, 6  # tokens 0..3 real, 4 = mask


def _toy_logits_fn():
  rng = np.random.default_rng(0)
  emb = jnp.asarray(rng.normal(0, 1, (V, D)), jnp.float32)
  mix = jnp.asarray(rng.normal(0, 0.6, (P + L, P + L)), jnp.float32)
  out = jnp.asarray(rng.normal(0, 1, (D, V)), jnp.float32)
  pos = jnp.asarray(rng.normal(0, 0.5, (P + L, V)), jnp.float32)

  def logits_fn(ids, attn):
    h = emb[ids] * attn[..., None]                      # padded keys contribute nothing
    h = jnp.tanh(jnp.einsum("ij,njd->nid", mix, h))     # bidirectional mixing
    return h @ out + pos
  return logits_fn


LOGITS_FN = _toy_logits_fn()
PROMPTS = jnp.array([[1, 2, 3], [0, 3, 1], [2, 2, 0]], jnp.int32)
PMASK = jnp.array([[1, 1, 1], [0, 1, 1], [1, 1, 1]], bool)  # row 1 left-padded
COMPS = jnp.array([[0, 1, 2, 3], [3, 3, 0, 1], [2, 0, 0, 2]], jnp.int32)


def _subset_sums():
  """S_k for each row: [N, L+1] (S_0 = 0), by enumerating all 2^L masks."""
  n = COMPS.shape[0]
  s = np.zeros((n, L + 1))
  cnt = np.zeros(L + 1)
  for bits in itertools.product([False, True], repeat=L):
    m = jnp.asarray(np.broadcast_to(np.array(bits), (n, L)))
    noisy = jnp.where(m, MASK, COMPS)
    ids = jnp.concatenate([PROMPTS, noisy], -1)
    attn = jnp.concatenate([PMASK, jnp.ones((n, L), bool)], -1)
    lp = jax.nn.log_softmax(LOGITS_FN(ids, attn)[:, P:], -1)
    lp = np.take_along_axis(np.asarray(lp), np.asarray(COMPS)[..., None], -1)[..., 0]
    k = sum(bits)
    s[:, k] += (lp * np.array(bits)).sum(-1)
    cnt[k] += 1
  return s / cnt


S = _subset_sums()
EXACT_ELBO = sum(S[:, k] / k for k in range(1, L + 1))


def f_exact(t):
  return sum(math.comb(L, k) * t ** (k - 1) * (1 - t) ** (L - k) * S[:, k] for k in range(1, L + 1))


def integral_f(a, b):
  x, w = np.polynomial.legendre.leggauss(10)  # exact for f (degree L−1)
  t = (b - a) / 2 * x + (a + b) / 2
  return sum(wi * (b - a) / 2 * f_exact(ti) for wi, ti in zip(w, t))


def test_exact_elbo_forms_agree():
  np.testing.assert_allclose(integral_f(0.0, 1.0), EXACT_ELBO, rtol=1e-10)
  assert np.all(EXACT_ELBO < 0)


@functools.lru_cache(maxsize=None)
def _replicate_cached(estimator, reps, kw_items):
  return _replicate_uncached(estimator, reps, **dict(kw_items))


def _replicate(estimator, reps, **kw):
  # Cached: the same (estimator, settings) serves several tests with one compilation.
  return _replicate_cached(estimator, reps, tuple(sorted(kw.items())))


def _replicate_uncached(estimator, reps, **kw):
  keys = jax.random.split(jax.random.key(123), reps)
  fn = jax.jit(jax.vmap(lambda k: estimator(LOGITS_FN, k, PROMPTS, PMASK, COMPS,
                                            mask_token_id=MASK, **kw)))
  return np.asarray(fn(keys))  # [reps, N]


def _assert_unbiased(est, target):
  mean, se = est.mean(0), est.std(0, ddof=1) / np.sqrt(est.shape[0])
  assert np.all(np.abs(mean - target) < 4.5 * se + 1e-6), (mean, target, se)


def test_double_mc_unbiased_for_its_target():
  eps = 0.1
  est = _replicate(M.elbo_double_mc, 6000, num_samples=2, eps=eps)
  _assert_unbiased(est, integral_f(eps, 1.0) / (1 - eps))


def test_espo_coupled_and_uncoupled_unbiased():
  _assert_unbiased(_replicate(M.elbo_espo, 4000, num_mc=2), EXACT_ELBO)
  _assert_unbiased(_replicate(M.elbo_espo, 4000, num_mc=1, coupled=False), EXACT_ELBO)


def test_gauss_legendre_unbiased_when_exact_and_biased_by_quadrature_otherwise():
  # N = 2 nodes integrate degree 3 = L − 1 exactly → unbiased.
  est2 = _replicate(M.elbo_gauss_legendre, 4000, num_nodes=2)
  _assert_unbiased(est2, EXACT_ELBO)
  # N = 1 (t = ½, w = 1): the expectation is f(½), not the ELBO.
  est1 = _replicate(M.elbo_gauss_legendre, 4000, num_nodes=1)
  _assert_unbiased(est1, f_exact(0.5))
  assert np.all(np.abs(f_exact(0.5) - EXACT_ELBO) > 1e-3)


def test_gauss_legendre_lower_variance_than_double_mc_at_equal_budget():
  # Both use 2 forwards per estimate; plain MC with LLaDA's ε = 1e-3.
  var_gl = _replicate(M.elbo_gauss_legendre, 4000, num_nodes=2).var(0)
  var_mc = _replicate(M.elbo_double_mc, 4000, num_samples=2, eps=1e-3).var(0)
  assert np.all(var_gl < 0.5 * var_mc), (var_gl, var_mc)


def test_gauss_legendre_nodes():
  t, w = M.gauss_legendre_nodes(2)
  np.testing.assert_allclose(t, [0.5 - 0.5 / np.sqrt(3), 0.5 + 0.5 / np.sqrt(3)])
  np.testing.assert_allclose(w, [0.5, 0.5])
  t, w = M.gauss_legendre_nodes(3)
  np.testing.assert_allclose(sorted(w), [5 / 18, 5 / 18, 8 / 18])


def test_espo_mask_counts_stratified():
  for seed in range(5):
    k = np.asarray(M.espo_mask_counts(jax.random.key(seed), 5, 4))  # L + 1 = N = 5
    assert sorted(k.tolist()) == [0, 1, 2, 3, 4]
  # Marginally uniform over {0 … L}.
  keys = jax.random.split(jax.random.key(0), 3000)
  ks = np.asarray(jax.vmap(lambda k: M.espo_mask_counts(k, 3, 4))(keys)).reshape(-1)
  freq = np.bincount(ks, minlength=5) / ks.size
  np.testing.assert_allclose(freq, 0.2, atol=0.02)


def test_forward_noise_rates_and_maskable():
  ids = jnp.zeros((400, 50), jnp.int32)
  maskable = jnp.arange(50)[None, :] < 30
  noisy, m = M.forward_noise(jax.random.key(0), ids, 0.3, 9, jnp.broadcast_to(maskable, ids.shape))
  assert not bool(m[:, 30:].any())
  np.testing.assert_allclose(m[:, :30].mean(), 0.3, atol=0.01)
  np.testing.assert_array_equal(noisy == 9, m)


def test_sft_loss_unbiased_and_prompt_untouched():
  eps = 0.2
  keys = jax.random.split(jax.random.key(7), 6000)
  fn = jax.jit(jax.vmap(lambda k: M.sft_loss(LOGITS_FN, k, PROMPTS, PMASK, COMPS,
                                             mask_token_id=MASK, eps=eps)[0]))
  # The loss sums rows: E = −Σ_rows (1/(1−ε)) ∫_ε^1 f / L.
  target = -(integral_f(eps, 1.0) / (1 - eps)).sum() / L
  est = np.asarray(fn(keys))[:, None]
  _assert_unbiased(est, np.array([target]))
  _, denom, metrics = M.sft_loss(LOGITS_FN, keys[0], PROMPTS, PMASK, COMPS, mask_token_id=MASK)
  assert float(denom) == 3


def test_sft_loss_completion_mask_normalises_by_answer_length():
  # Only position 0 is part of the answer: with ε = 1 it is always masked, loss = CE_0 / 1.
  cm = jnp.array([[1, 0, 0, 0]] * 3, bool)
  loss_sum, _, _ = M.sft_loss(LOGITS_FN, jax.random.key(0), PROMPTS, PMASK, COMPS, cm,
                              mask_token_id=MASK, eps=1.0)
  noisy = COMPS.at[:, 0].set(MASK)
  ids = jnp.concatenate([PROMPTS, noisy], -1)
  attn = jnp.concatenate([PMASK, jnp.ones((3, L), bool)], -1)
  lp = jax.nn.log_softmax(LOGITS_FN(ids, attn)[:, P], -1)
  want = -np.take_along_axis(np.asarray(lp), np.asarray(COMPS[:, :1]), -1).sum()
  np.testing.assert_allclose(loss_sum, want, rtol=1e-5)


def test_diffu_grpo_one_step_logprobs_share_masks_and_match_manual():
  key = jax.random.key(5)
  ids, attn = M.one_step_noised_inputs(key, PROMPTS, PMASK, COMPS, mask_token_id=MASK,
                                       p_mask_prompt=0.5)
  ids2, _ = M.one_step_noised_inputs(key, PROMPTS, PMASK, COMPS, mask_token_id=MASK,
                                     p_mask_prompt=0.5)
  np.testing.assert_array_equal(ids, ids2)
  assert bool((ids[:, P:] == MASK).all())
  assert not bool((ids[1, 0] == MASK))  # padding never masked
  lp = M.one_step_token_logprobs(LOGITS_FN, key, PROMPTS, PMASK, COMPS, mask_token_id=MASK,
                                 p_mask_prompt=0.5)
  want = np.take_along_axis(np.asarray(jax.nn.log_softmax(LOGITS_FN(ids, attn)[:, P:], -1)),
                            np.asarray(COMPS)[..., None], -1)[..., 0]
  np.testing.assert_allclose(lp, want, rtol=1e-5)
  # A second policy (different logits_fn) with the same key sees the same perturbed prompt:
  # its log-probs equal those computed on `ids` directly.
  other = lambda i, a: 2.0 * LOGITS_FN(i, a)
  lp_other = M.one_step_token_logprobs(other, key, PROMPTS, PMASK, COMPS, mask_token_id=MASK,
                                       p_mask_prompt=0.5)
  want_other = np.take_along_axis(np.asarray(jax.nn.log_softmax(other(ids, attn)[:, P:], -1)),
                                  np.asarray(COMPS)[..., None], -1)[..., 0]
  np.testing.assert_allclose(lp_other, want_other, rtol=1e-5)
  # Prompt masking rate ≈ p over many keys, on real prompt tokens only.
  big = jnp.tile(PROMPTS, (400, 1))
  ids_b, _ = M.one_step_noised_inputs(jax.random.key(1), big, jnp.tile(PMASK, (400, 1)),
                                      jnp.tile(COMPS, (400, 1)), mask_token_id=MASK)
  real = np.asarray(jnp.tile(PMASK, (400, 1)))
  rate = (np.asarray(ids_b[:, :P]) == MASK)[real].mean()
  np.testing.assert_allclose(rate, 0.15, atol=0.02)
  assert not (np.asarray(ids_b[:, :P]) == MASK)[~real].any()


def test_common_random_numbers_across_policies():
  # Same key → same masks: an estimator is then a deterministic function of the policy, so the
  # current/old difference is exactly zero when the policies coincide.
  for est in (M.elbo_espo, M.elbo_gauss_legendre, M.elbo_double_mc):
    fn = jax.jit(lambda k: est(LOGITS_FN, k, PROMPTS, PMASK, COMPS, mask_token_id=MASK))
    a, b, c = fn(jax.random.key(9)), fn(jax.random.key(9)), fn(jax.random.key(10))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_bad_inputs():
  with pytest.raises(ValueError, match="prompt_mask"):
    M.elbo_espo(LOGITS_FN, jax.random.key(0), PROMPTS, PMASK[:, :2], COMPS, mask_token_id=MASK)
  with pytest.raises(ValueError, match="num_nodes"):
    M.gauss_legendre_nodes(0)


def test_estimators_differentiable_through_logits_fn():
  # With the key fixed the estimate is a smooth function of the policy: jax.grad matches a
  # central finite difference in a logit temperature α.
  def value(alpha, est):
    fn = lambda i, a: alpha * LOGITS_FN(i, a)
    return est(fn, jax.random.key(3), PROMPTS, PMASK, COMPS, mask_token_id=MASK).sum()
  for est in (M.elbo_espo,):
    g = jax.jit(jax.grad(lambda a: value(a, est)))(1.0)
    h = 1e-2
    fd = (value(1.0 + h, est) - value(1.0 - h, est)) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-3)
