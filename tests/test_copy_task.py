"""The synthetic copy task's dense reward (hand-computed cases)."""

import numpy as np
import pytest

from egspo.tasks import get_task


def test_copy_reward_hand_cases():
  t = get_task("copy")
  ex = {"digits": "4021"}
  assert t.reward("4021", ex) == 1.0
  assert t.reward("  4021 trailing", ex) == 1.0  # stripped, extra text ignored
  assert t.reward("4x2y", ex) == pytest.approx(0.5 * 2 / 4 + 0.5 * 2 / 4)
  assert t.reward("9999", ex) == pytest.approx(0.5)  # all digits, none in place
  assert t.reward("", ex) == 0.0
  assert t.score("4021", ex)["correct"] and not t.score("4020", ex)["correct"]
  np.testing.assert_allclose(t.rewards(["4021", "abcd"], [ex, ex]), [1.0, 0.0])


def test_copy_generator_is_seeded_and_bounded():
  t = get_task("copy", min_length=3, max_length=5)
  a = [t.sample_example(np.random.default_rng([1, i])) for i in range(20)]
  b = [t.sample_example(np.random.default_rng([1, i])) for i in range(20)]
  assert a == b and all(3 <= len(e["digits"]) <= 5 and e["digits"].isdigit() for e in a)
  assert t.sft_target(a[0], "plain") == a[0]["digits"]
  assert t.prompt(a[0], "plain") == f"Copy: {a[0]['digits']}\n"
  with pytest.raises(ValueError):
    get_task("copy", min_length=5, max_length=3)
