"""The released trainer's per-step log-probability variants (egspo/rl/step_variants.py):
pred_state='final' and the exact full-vocabulary KL, against one state at a time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egspo.model import llada
from egspo.rl import losses as loss_lib
from egspo.rl import step_variants as sv
from egspo.rl import update as U
from egspo.tokenizer import CharTokenizer

B, P, G, T = 2, 4, 6, 3


@pytest.fixture(scope="module")
def model():
  return llada.init_model(llada.get_config("tiny", vocab=CharTokenizer(), n_layers=1), seed=3)


def _record(seed=0):
  rng = np.random.default_rng(seed)
  prompt = jnp.asarray(rng.integers(10, 90, (B, P)), jnp.int32)
  pmask = jnp.ones((B, P), bool).at[0, :1].set(False)
  tokens = jnp.asarray(rng.integers(10, 90, (B, G)), jnp.int32)
  commit = jnp.asarray(np.stack([rng.permutation(np.repeat(np.arange(T), 2)) for _ in range(B)]),
                       jnp.int32)
  return prompt, pmask, tokens, commit


def _state_logp(model, prompt, pmask, tokens, commit, b, t):
  """log softmax of the model at state x_t of row b: [G, V]."""
  mask_id = model.cfg.mask_token_id
  comp = jnp.where(commit[b] < t, tokens[b], mask_id)
  ids = jnp.concatenate([prompt[b], comp])[None]
  am = jnp.concatenate([pmask[b], jnp.ones(G, bool)])[None]
  return jax.nn.log_softmax(model(ids, am)[0, -G:])


def test_next_equals_update_step_logprobs_and_final_sums_the_masked_positions(model):
  prompt, pmask, tokens, commit = _record()
  steps = jnp.array([[0, 2], [1, 1]])
  kw = dict(mask_token_id=model.cfg.mask_token_id, max_commit=2)
  nxt = sv.step_forward(model, prompt, pmask, tokens, commit, steps, pred_state="next", **kw)
  ref = U.step_logprobs(model, prompt, pmask, tokens, commit, steps, **kw)
  np.testing.assert_allclose(np.asarray(nxt), np.asarray(ref), atol=1e-6)
  fin = np.asarray(sv.step_forward(model, prompt, pmask, tokens, commit, steps,
                                   pred_state="final", **kw))
  for b in range(B):
    for k in range(2):
      t = int(steps[b, k])
      logp = _state_logp(model, prompt, pmask, tokens, commit, b, t)
      want = sum(float(logp[i, tokens[b, i]]) for i in range(G) if int(commit[b, i]) >= t)
      assert fin[b, k] == pytest.approx(want, abs=2e-5)
  # At step 0 every position is masked: 'final' sums all G; at the last step it equals 'next'.
  last = jnp.full((B, 1), T - 1)
  np.testing.assert_allclose(
      np.asarray(sv.step_forward(model, prompt, pmask, tokens, commit, last, pred_state="final",
                                 **kw)),
      np.asarray(U.step_logprobs(model, prompt, pmask, tokens, commit, last, **kw)), atol=1e-5)


def test_step_positions_errors():
  with pytest.raises(ValueError, match="pred_state must be one of"):
    sv.step_positions(jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 1), jnp.int32), "prev", 1)


def test_exact_step_kl_hand_computed():
  p = np.array([0.5, 0.25, 0.25])
  q = np.array([0.25, 0.25, 0.5])
  lp = jnp.log(jnp.asarray(np.stack([p, q])))[None, None]  # [1, 1, M=2, V=3]
  lq = jnp.log(jnp.asarray(np.stack([q, q])))[None, None]
  kl_pq = float(np.sum(p * np.log(p / q)))  # by hand: 0.5 ln 2 + 0 − 0.25 ln 2
  assert kl_pq == pytest.approx(0.25 * np.log(2))
  got = sv.exact_step_kl(lp, lq, jnp.array([[[True, True]]]))
  assert float(got[0, 0]) == pytest.approx(kl_pq, rel=1e-6)  # second position: KL(q‖q) = 0
  got = sv.exact_step_kl(lp, lq, jnp.array([[[False, True]]]))
  assert float(got[0, 0]) == pytest.approx(0.0, abs=1e-7)


def test_policy_terms_exact_kl_equals_per_state_sum_and_its_gradient_is_the_kl_gradient(model):
  prompt, pmask, tokens, commit = _record(1)
  steps = jnp.array([[1], [0]])
  mb = dict(prompt_ids=prompt, prompt_mask=pmask, tokens=tokens, commit_step=commit, steps=steps)
  kw = dict(mask_token_id=model.cfg.mask_token_id, max_commit=2)
  ref_model = llada.init_model(model.cfg, seed=4)
  _, ref_vocab = sv.no_grad_pass(U.split_policy(ref_model)[0], 1, pred_state="next",
                                 with_vocab=True, **kw)(*U.split_policy(ref_model)[1:], mb)
  logp, kl = sv.policy_terms(model, dict(mb, ref_vocab=ref_vocab), pred_state="next",
                             exact_kl=True, **kw)
  np.testing.assert_allclose(np.asarray(logp), np.asarray(
      U.step_logprobs(model, prompt, pmask, tokens, commit, steps, **kw)), atol=1e-6)
  for b in range(B):
    t = int(steps[b, 0])
    lp = _state_logp(model, prompt, pmask, tokens, commit, b, t)
    lq = _state_logp(ref_model, prompt, pmask, tokens, commit, b, t)
    pos = [i for i in range(G) if int(commit[b, i]) == t]
    want = sum(float(jnp.sum(jnp.exp(lp[i]) * (lp[i] - lq[i]))) for i in pos)
    assert float(kl[b, 0]) == pytest.approx(want, rel=1e-4)
    assert want > 0
  # Against itself the exact KL is 0.
  _, self_vocab = sv.no_grad_pass(U.split_policy(model)[0], 2, pred_state="next",
                                  with_vocab=True, **kw)(*U.split_policy(model)[1:], mb)
  _, kl0 = sv.policy_terms(model, dict(mb, ref_vocab=self_vocab), pred_state="next",
                           exact_kl=True, **kw)
  np.testing.assert_allclose(np.asarray(kl0), 0.0, atol=1e-5)


def test_egspo_step_loss_takes_a_given_kl_in_place_of_k3():
  logp = jnp.array([[-1.0, -2.0]])
  old = jnp.array([[-1.0, -2.5]])
  adv = jnp.array([[1.0, -1.0]])
  kl = jnp.array([[0.3, 0.7]])
  valid = jnp.array([[True, False]])
  s, d, m = loss_lib.egspo_step_loss(logp, old, adv, valid, None, beta=0.1, kl=kl)
  # Only slot 0: ratio 1, −A + β·kl.
  assert float(d) == 1.0 and float(s) == pytest.approx(-1.0 + 0.1 * 0.3)
  assert float(m["kl"]) == pytest.approx(0.3)
  g = jax.grad(lambda x: loss_lib.egspo_step_loss(logp, old, adv, valid, None, beta=0.1,
                                                  kl=x)[0])(kl)
  np.testing.assert_allclose(np.asarray(g), [[0.1, 0.0]])
  # β = 0 drops it.
  s0, _, m0 = loss_lib.egspo_step_loss(logp, old, adv, valid, None, beta=0.0, kl=kl)
  assert float(s0) == pytest.approx(-1.0) and "kl" not in m0
