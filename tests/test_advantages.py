"""Group baselines, leave-one-out and stepwise advantages against hand-computed values (REFERENCE §3.6)."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from egspo.rl import advantages as adv
from egspo.rl import selection as sel

# Two groups of G = 2, K = 2 selected steps.
R_FINAL = jnp.array([1.0, 0.0, 0.1, 0.1])
VALUES = jnp.array([[0.0, 1.0], [0.5, 0.0], [0.1, 0.1], [1.0, 1.0]])


def test_group_baseline_and_std():
  r = jnp.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 6.0])
  np.testing.assert_allclose(adv.group_baseline_advantages(r, 4),
                             [0.5, -0.5, -0.5, 0.5, -1, -1, -1, 3], atol=1e-6)
  std = np.sqrt(1 / 3)  # ddof = 1 std of (1, 0, 0, 1)
  np.testing.assert_allclose(adv.group_baseline_advantages(r[:4], 4, normalize_std=True),
                             np.array([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4), rtol=1e-5)
  # Trailing axes are handled column by column.
  r2 = jnp.stack([r, 2 * r], axis=1)
  np.testing.assert_allclose(adv.group_baseline_advantages(r2, 4)[:, 1],
                             2 * adv.group_baseline_advantages(r, 4), atol=1e-6)
  with pytest.raises(ValueError, match="not a whole number of groups"):
    adv.group_baseline_advantages(r, 3)


def test_leave_one_out():
  r = jnp.array([1.0, 0.0, 0.0, 1.0])
  np.testing.assert_allclose(adv.leave_one_out_advantages(r, 4),
                             [2 / 3, -2 / 3, -2 / 3, 2 / 3], atol=1e-6)
  with pytest.raises(ValueError, match="group_size ≥ 2"):
    adv.leave_one_out_advantages(r, 1)


def test_stepwise_lambda_zero_is_group_baseline_in_every_column():
  a = adv.stepwise_advantages(R_FINAL, VALUES, 2, 0.0)
  want = np.array([0.5, -0.5, 0.0, 0.0])
  np.testing.assert_allclose(a, np.stack([want, want], 1), atol=1e-6)


def test_stepwise_lambda_half_hand_computed():
  # R = (r + 0.5 (r − V)) / 1.5.  Group 0: col 0 R = (1, −1/6) → mean 5/12 → ±7/12;
  # col 1 R = (2/3, 0) → ±1/3.  Group 1: R = (1/15, −7/30) in both columns → ±0.15.
  a = adv.stepwise_advantages(R_FINAL, VALUES, 2, 0.5)
  want = [[7 / 12, 1 / 3], [-7 / 12, -1 / 3], [0.15, 0.15], [-0.15, -0.15]]
  np.testing.assert_allclose(a, want, atol=1e-6)
  # Without the 1/(1+λ) normalisation everything scales by 1.5.
  np.testing.assert_allclose(adv.stepwise_advantages(R_FINAL, VALUES, 2, 0.5,
                                                     normalize_returns=False),
                             1.5 * np.array(want), atol=1e-6)


def test_stepwise_variants_of_reference_trainer():
  # λ_t = λ t / T: column 0 at t = 0 → λ 0; column 1 at t = T → λ 0.5.
  steps = jnp.array([[0, 8]] * 4)
  a = adv.stepwise_advantages(R_FINAL, VALUES, 2, 0.5, steps=steps, num_steps=8,
                              lambda_schedule="linear")
  np.testing.assert_allclose(a, [[0.5, 1 / 3], [-0.5, -1 / 3], [0, 0.15], [0, -0.15]], atol=1e-6)
  # standard_grpo: (r − mean_G r + λ (r − V)) / (1 + λ), stepwise term uncentred.
  a = adv.stepwise_advantages(R_FINAL, VALUES, 2, 0.5, baseline="standard_grpo")
  np.testing.assert_allclose(a[:2], [[2 / 3, 1 / 3], [-0.5, -1 / 3]], atol=1e-6)
  np.testing.assert_allclose(a[2:], [[0, 0], [-0.3, -0.3]], atol=1e-6)
  with pytest.raises(ValueError, match="needs steps"):
    adv.stepwise_advantages(R_FINAL, VALUES, 2, 0.5, lambda_schedule="linear")
  with pytest.raises(ValueError, match="unknown baseline"):
    adv.stepwise_advantages(R_FINAL, VALUES, 2, 0.5, baseline="x")


def test_pairing_entropy_rank_vs_time_hand_computed():
  """The EGSPO-SA group mean pairs the rows' steps column by column, so the column order of the
  selection (egspo.pairing) changes the advantages (REFERENCE §3.6)."""
  # One group of G = 2, T = 3, K = 2. Row 0: top-2 entropy steps 0 (0.9), 2 (0.5);
  # row 1: steps 2 (0.8), 1 (0.3). Values V(s_t) by step; r_final = (1, 0); λ = 0.5.
  h = jnp.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])
  v_by_step = jnp.array([[0.0, 0.7, 1.0], [0.9, 0.5, 0.0]])
  r = jnp.array([1.0, 0.0])
  # R = (r + λ (r − V)) / (1 + λ): row 0 step 0 → 1, step 2 → 2/3; row 1 step 1 → −1/6, step 2 → 0.
  want = {
      # time: columns (step 0 | step 1) and (step 2 | step 2): means 5/12 and 1/3.
      "time": ([[0, 2], [1, 2]], [[7 / 12, 1 / 3], [-7 / 12, -1 / 3]]),
      # entropy_rank: columns (step 0 | step 2) and (step 2 | step 1): means 1/2 and 1/4.
      "entropy_rank": ([[0, 2], [2, 1]], [[1 / 2, 5 / 12], [-1 / 2, -5 / 12]]),
  }
  by_step = {}
  for order, (want_steps, want_adv) in want.items():
    steps, valid = sel.entropy_topk_steps(h, 2, order=order)
    np.testing.assert_array_equal(steps, want_steps)
    values = jnp.take_along_axis(v_by_step, steps, axis=1)
    a = adv.stepwise_advantages(r, values, 2, 0.5, valid)
    np.testing.assert_allclose(a, want_adv, atol=1e-6)
    by_step[order] = {(b, int(steps[b, k])): float(a[b, k]) for b in range(2) for k in range(2)}
  # The same (row, step) gets a different advantage under the two pairings.
  assert by_step["time"].keys() == by_step["entropy_rank"].keys()
  assert all(abs(by_step["time"][s] - by_step["entropy_rank"][s]) > 0.05 for s in by_step["time"])


def test_stepwise_invalid_slots():
  # Slot (0, 1) invalid with V = 0: it must act as V = r_final (R = 2/3), not V = 0 (R = 1).
  values = VALUES.at[0, 1].set(0.0)
  valid = jnp.ones((4, 2), bool).at[0, 1].set(False)
  a = adv.stepwise_advantages(R_FINAL, values, 2, 0.5, valid)
  np.testing.assert_allclose(a[:2], [[7 / 12, 0.0], [-7 / 12, -1 / 3]], atol=1e-6)


class AdvantagesVariantsTest(chex.TestCase):
  """The hand-computed advantages traced under `jax.jit` and run eagerly (chex variants)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_group_baseline_and_leave_one_out(self):
    r = jnp.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 6.0])
    chex.assert_trees_all_close(
        self.variant(adv.group_baseline_advantages, static_argnums=1)(r, 4),
        jnp.array([0.5, -0.5, -0.5, 0.5, -1, -1, -1, 3]), atol=1e-6)
    chex.assert_trees_all_close(
        self.variant(adv.leave_one_out_advantages, static_argnums=1)(r[:4], 4),
        jnp.array([2 / 3, -2 / 3, -2 / 3, 2 / 3]), atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_stepwise_lambda_half_and_invalid_slot(self):
    f = self.variant(adv.stepwise_advantages, static_argnums=(2, 3))
    want = jnp.array([[7 / 12, 1 / 3], [-7 / 12, -1 / 3], [0.15, 0.15], [-0.15, -0.15]])
    chex.assert_trees_all_close(f(R_FINAL, VALUES, 2, 0.5), want, atol=1e-6)
    valid = jnp.ones((4, 2), bool).at[0, 1].set(False)
    out = f(R_FINAL, VALUES.at[0, 1].set(0.0), 2, 0.5, valid)
    chex.assert_trees_all_close(out, want.at[0, 1].set(0.0), atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_stepwise_contracts(self):
    f = self.variant(adv.stepwise_advantages, static_argnums=(2, 3))
    with self.assertRaisesRegex(AssertionError, "assert_rank"):
      f(R_FINAL[:, None], VALUES, 2, 0.5)
    with self.assertRaisesRegex(AssertionError, "assert_equal_shape_prefix"):
      f(R_FINAL[:2], VALUES, 2, 0.5)
    with self.assertRaisesRegex(AssertionError, "assert_equal_shape"):
      f(R_FINAL, VALUES, 2, 0.5, jnp.ones((4, 3), bool))
