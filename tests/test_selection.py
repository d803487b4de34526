"""Step entropy and step selection against hand-computed cases (REFERENCE §3.2–3.3)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egspo.rl import selection as sel


def test_step_entropy_hand_computed():
  # T = 4. Row 0: step 0 commits positions 0,1 (H 1, 3 → mean 2); step 2 commits 2 (H 5);
  # steps 1 and 3 commit nothing → 0.  Row 1: all four positions at step 3 → mean 2.5.
  ent = jnp.array([[1.0, 3.0, 5.0, 7.0], [1.0, 2.0, 3.0, 4.0]])
  cs = jnp.array([[0, 0, 2, 1], [3, 3, 3, 3]])
  h = sel.step_entropy(ent, cs, 4)
  np.testing.assert_allclose(h, [[2.0, 7.0, 5.0, 0.0], [0.0, 0.0, 0.0, 2.5]])
  np.testing.assert_array_equal(sel.step_counts(cs, 4), [[2, 1, 1, 0], [0, 0, 0, 4]])


def test_entropy_topk_per_sample_ascending():
  h = jnp.array([[0.1, 0.9, 0.3, 0.8, 0.2],
                 [0.5, 0.4, 0.3, 0.2, 0.1]])
  steps, valid = sel.entropy_topk_steps(h, 2)
  np.testing.assert_array_equal(steps, [[1, 3], [0, 1]])
  assert steps.dtype == jnp.int32 and bool(valid.all())


def test_entropy_topk_entropy_rank_order():
  # Columns by entropy rank (the released trainer's torch.topk order): row 0's highest step is 1
  # (0.9), then 3 (0.8), then 2 (0.3); row 1 is already in step order.
  h = jnp.array([[0.1, 0.9, 0.3, 0.8, 0.2],
                 [0.5, 0.4, 0.3, 0.2, 0.1]])
  steps, valid = sel.entropy_topk_steps(h, 3, order="entropy_rank")
  np.testing.assert_array_equal(steps, [[1, 3, 2], [0, 1, 2]])
  assert steps.dtype == jnp.int32 and bool(valid.all())
  np.testing.assert_array_equal(sel.entropy_topk_steps(h, 3, order="time")[0],
                                [[1, 2, 3], [0, 1, 2]])
  # Ties keep the earlier step first in either order.
  tie = jnp.array([[1.0, 2.0, 2.0, 0.0]])
  np.testing.assert_array_equal(sel.entropy_topk_steps(tie, 3, order="entropy_rank")[0],
                                [[1, 2, 0]])
  with pytest.raises(ValueError, match="egspo.pairing"):
    sel.entropy_topk_steps(h, 2, order="rank")


def test_adaptive_entropy_rank_puts_selected_slots_first():
  # Row 0: H ranks 0 (4), 2 (3), 3 (2), 1 (1); α = 0.7 → K = 2. Row 1: K = 1 (all zero → step 0).
  h = jnp.array([[4.0, 1.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
  steps, valid = sel.adaptive_entropy_steps(h, 0.7, 3, order="entropy_rank")
  np.testing.assert_array_equal(steps, [[0, 2, 3], [0, 1, 2]])
  np.testing.assert_array_equal(valid, [[True, True, False], [True, False, False]])
  steps, valid = sel.adaptive_entropy_steps(h, 0.7, 3, order="time")
  np.testing.assert_array_equal(steps, [[0, 2, 3], [0, 1, 2]])
  h2 = jnp.array([[1.0, 4.0, 2.0, 3.0]])  # ranks 1, 3, 2; α 0.7 of 10 → K = 2
  steps, valid = sel.adaptive_entropy_steps(h2, 0.7, 3, order="entropy_rank")
  np.testing.assert_array_equal(steps, [[1, 3, 2]])
  np.testing.assert_array_equal(valid, [[True, True, False]])
  steps, valid = sel.adaptive_entropy_steps(h2, 0.7, 3, order="time")
  np.testing.assert_array_equal(steps, [[1, 2, 3]])
  np.testing.assert_array_equal(valid, [[True, False, True]])


def test_entropy_topk_ties_pick_earlier_step():
  h = jnp.array([[1.0, 2.0, 2.0, 2.0, 0.0]])
  np.testing.assert_array_equal(sel.entropy_topk_steps(h, 2)[0], [[1, 2]])
  np.testing.assert_array_equal(sel.entropy_topk_steps(h, 3)[0], [[1, 2, 3]])


def test_entropy_topk_k_equals_t_and_k_too_large():
  h = jnp.array([[0.3, 0.1, 0.2]])
  np.testing.assert_array_equal(sel.entropy_topk_steps(h, 3)[0], [[0, 1, 2]])
  with pytest.raises(ValueError, match="exceeds the number of denoising steps"):
    sel.entropy_topk_steps(h, 4)
  with pytest.raises(ValueError, match="positive int"):
    sel.entropy_topk_steps(h, 0)


def test_entropy_topk_step_valid_ranks_invalid_last():
  h = jnp.array([[0.0, 0.9, 0.0, 0.5]])
  valid = jnp.array([[True, False, True, True]])
  np.testing.assert_array_equal(sel.entropy_topk_steps(h, 2, valid)[0], [[0, 3]])
  np.testing.assert_array_equal(sel.entropy_topk_steps(h, 4, valid)[0], [[0, 1, 2, 3]])


def test_uniform_steps_hand_computed():
  steps, valid = sel.uniform_steps(10, 4, 3)
  # floor(j * 8 / 2), j = 0, 1, 2 → 0, 4, 8; plus T-1 = 9.
  np.testing.assert_array_equal(steps, [[0, 4, 8, 9]] * 3)
  assert bool(valid.all())
  np.testing.assert_array_equal(sel.uniform_steps(10, 1, 1)[0], [[9]])
  np.testing.assert_array_equal(sel.uniform_steps(10, 2, 1)[0], [[0, 9]])
  np.testing.assert_array_equal(sel.uniform_steps(5, 5, 1)[0], [[0, 1, 2, 3, 4]])
  # 128 steps, K = 8: floor(j * 126 / 6) = 21 j.
  np.testing.assert_array_equal(sel.uniform_steps(128, 8, 1)[0], [[0, 21, 42, 63, 84, 105, 126, 127]])
  with pytest.raises(ValueError, match="exceeds"):
    sel.uniform_steps(5, 6, 1)


def test_random_steps_same_for_batch_distinct_and_include_last():
  for seed in range(20):
    steps, _ = sel.random_steps(jax.random.key(seed), 12, 5, 3)
    s = np.asarray(steps)
    assert (s == s[0]).all()
    assert s[0, -1] == 11
    assert len(set(s[0].tolist())) == 5
    assert (np.diff(s[0]) > 0).all() and s.min() >= 0
  a = sel.random_steps(jax.random.key(3), 12, 5, 2)[0]
  b = sel.random_steps(jax.random.key(3), 12, 5, 2)[0]
  np.testing.assert_array_equal(a, b)
  # K = T with distinct draws must be every step.
  np.testing.assert_array_equal(sel.random_steps(jax.random.key(0), 6, 6, 1)[0], [np.arange(6)])


def test_adaptive_hand_computed():
  # Row 0: sorted H = 4, 3, 2, 1 (total 10). α = 0.7 → cumulative 4, 7 ≥ 7 → K = 2: steps 0, 2.
  # Row 1: H = 1 1 1 1 (total 4); α 0.7 → need 2.8 → K = 3 (ties: earliest steps 0, 1, 2).
  # Row 2: all zero → K = 1.
  h = jnp.array([[4.0, 1.0, 3.0, 2.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
  steps, valid = sel.adaptive_entropy_steps(h, 0.7, 4)
  for b, want in enumerate([{0, 2}, {0, 1, 2}, {0}]):
    got = set(np.asarray(steps[b])[np.asarray(valid[b])].tolist())
    assert got == want, (b, got)
    assert (np.diff(np.asarray(steps[b])) > 0).all()
  # Cap at k_max: row 1 would need 3 steps.
  steps, valid = sel.adaptive_entropy_steps(h, 0.7, 2)
  np.testing.assert_array_equal(valid.sum(-1), [2, 2, 1])
  # Exactly reaching the fraction counts as reached: α = 0.5 on row 1 → K = 2.
  _, valid = sel.adaptive_entropy_steps(h[1:2], 0.5, 4)
  assert int(valid.sum()) == 2


def test_select_steps_dispatch_and_errors():
  h = jnp.array([[0.1, 0.9, 0.3, 0.8]])
  np.testing.assert_array_equal(sel.select_steps("entropy", k=2, num_steps=4, step_entropy=h)[0],
                                [[1, 3]])
  np.testing.assert_array_equal(sel.select_steps("uniform", k=2, num_steps=4, batch_size=2)[0],
                                [[0, 3], [0, 3]])
  s, v = sel.select_steps("adaptive", k=3, num_steps=4, step_entropy=h, alpha=0.5)
  # total 2.1, half 1.05: 0.9 < 1.05 ≤ 0.9 + 0.8 → K = 2 (steps 1, 3).
  assert s.shape == (1, 3) and int(v.sum()) == 2
  np.testing.assert_array_equal(np.asarray(s)[np.asarray(v)], [1, 3])
  assert sel.select_steps("random", k=2, num_steps=4, batch_size=1,
                          key=jax.random.key(0))[0].shape == (1, 2)
  np.testing.assert_array_equal(
      sel.select_steps("entropy", k=2, num_steps=4, step_entropy=h, order="entropy_rank")[0],
      [[1, 3]])
  h3 = jnp.array([[0.1, 0.8, 0.3, 0.9]])
  np.testing.assert_array_equal(
      sel.select_steps("entropy", k=2, num_steps=4, step_entropy=h3, order="entropy_rank")[0],
      [[3, 1]])
  s, v = sel.select_steps("adaptive", k=3, num_steps=4, step_entropy=h3, alpha=0.5,
                          order="entropy_rank")
  np.testing.assert_array_equal(np.asarray(s)[np.asarray(v)], [3, 1])
  with pytest.raises(ValueError, match="egspo.pairing"):
    sel.select_steps("uniform", k=2, num_steps=4, batch_size=1, order="bogus")
  with pytest.raises(ValueError, match="unknown step selection"):
    sel.select_steps("bogus", k=2, num_steps=4, step_entropy=h)
  with pytest.raises(ValueError, match="needs a jax.random key"):
    sel.select_steps("random", k=2, num_steps=4, batch_size=1)
  with pytest.raises(ValueError, match="needs step_entropy"):
    sel.select_steps("entropy", k=2, num_steps=4, batch_size=1)
  with pytest.raises(ValueError, match=r"\[B, T=5\]"):
    sel.select_steps("entropy", k=2, num_steps=5, step_entropy=h)


class SelectionVariantsTest(chex.TestCase):
  """Hand-computed cases traced under `jax.jit` and run eagerly (chex variants), and the
  functions' chex contracts, which fire in both."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_entropy_then_topk_with_empty_steps_last(self):
    ent = jnp.array([[1.0, 3.0, 5.0, 7.0], [1.0, 2.0, 3.0, 4.0]])
    cs = jnp.array([[0, 0, 2, 1], [3, 3, 3, 3]])
    h = self.variant(sel.step_entropy, static_argnums=2)(ent, cs, 4)
    chex.assert_trees_all_close(h, jnp.array([[2.0, 7.0, 5.0, 0.0], [0.0, 0.0, 0.0, 2.5]]))
    counts = self.variant(sel.step_counts, static_argnums=1)(cs, 4)
    # Row 1 commits only at step 3; its second pick is the earliest empty step, 0.
    steps, valid = self.variant(sel.entropy_topk_steps, static_argnums=1)(h, 2, counts > 0)
    chex.assert_trees_all_equal((steps, valid),
                                (jnp.array([[1, 2], [0, 3]], jnp.int32), jnp.ones((2, 2), bool)),
                                strict=True)

  @chex.variants(with_jit=True, without_jit=True)
  def test_adaptive(self):
    h = jnp.array([[4.0, 1.0, 3.0, 2.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    steps, valid = self.variant(sel.adaptive_entropy_steps, static_argnums=2)(h, 0.7, 4)
    chex.assert_trees_all_equal(valid.sum(-1), jnp.array([2, 3, 1]))
    chex.assert_trees_all_equal(steps[0][valid[0]], jnp.array([0, 2], jnp.int32))

  @chex.variants(with_jit=True, without_jit=True)
  def test_contracts(self):
    entropy = self.variant(sel.step_entropy, static_argnums=2)
    topk = self.variant(sel.entropy_topk_steps, static_argnums=1)
    h = jnp.ones((2, 4))
    with self.assertRaisesRegex(AssertionError, "assert_equal_shape"):
      entropy(h, jnp.zeros((2, 3), jnp.int32), 4)
    with self.assertRaisesRegex(AssertionError, "assert_type"):
      entropy(h, jnp.zeros((2, 4)), 4)  # float commit steps
    with self.assertRaisesRegex(AssertionError, "assert_rank"):
      topk(jnp.ones((4,)), 2)
    with self.assertRaisesRegex(AssertionError, "assert_type"):
      topk(h, 2, jnp.ones((2, 4), jnp.int32))  # step_valid must be bool
