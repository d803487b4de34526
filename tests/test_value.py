"""The one-step value estimator: the gather and the batched, deduplicated host-side scoring."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from egspo.rl import value


def test_one_step_guesses_gathers_per_sample_steps():
  b, t, g = 3, 5, 4
  x0_hat = jnp.arange(b * t * g, dtype=jnp.int32).reshape(b, t, g)
  steps = jnp.array([[0, 4], [2, 2], [3, 1]])
  out = value.one_step_guesses(x0_hat, steps)
  assert out.shape == (b, 2, g)
  for i in range(b):
    for j in range(2):
      np.testing.assert_array_equal(out[i, j], x0_hat[i, int(steps[i, j])])


class _Counter:
  """Toy task: text = letters of the ids; reward = weight · (# of 'a') / length."""

  def __init__(self):
    self.calls, self.decoded = 0, 0

  def decode(self, ids):
    self.decoded += len(ids)
    return ["".join(chr(97 + int(c)) for c in row) for row in ids]

  def reward(self, texts, examples):
    self.calls += 1
    return np.array([ex["w"] * t.count("a") / len(t) for t, ex in zip(texts, examples)])


def test_one_step_values_hand_computed_and_deduplicated():
  ex0, ex1 = {"w": 1.0}, {"w": 2.0}
  guesses = np.array([
      [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]],  # row 0: first two equal
      [[0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]],  # row 1: same first guess as row 0, other example
  ])
  final = np.array([[0, 0, 0, 1], [0, 1, 1, 1]])
  c = _Counter()
  vals, fin, m = value.one_step_values(guesses, c.reward, c.decode, [ex0, ex1], final_tokens=final)
  np.testing.assert_allclose(vals, [[0.5, 0.5, 0.75], [1.0, 0.0, 0.0]])
  np.testing.assert_allclose(fin, [0.75, 0.5])
  assert c.calls == 1
  # Row 0: {0011, 0001} (final 0001 is a repeat); row 1: {0011, 1111, 0111}.
  assert m["value/unique_evals"] == 5 and c.decoded == 5
  assert m["value/requested_evals"] == 8


def test_one_step_values_shared_example_object_dedups_across_rows_and_valid_mask():
  ex = {"w": 1.0}
  guesses = np.array([[[0, 1]], [[0, 1]]])
  c = _Counter()
  vals, fin, m = value.one_step_values(guesses, c.reward, c.decode, [ex, ex])
  np.testing.assert_allclose(vals, [[0.5], [0.5]])
  assert fin is None and m["value/unique_evals"] == 1
  vals, _, m = value.one_step_values(guesses, c.reward, c.decode, [ex, ex],
                                     valid=np.array([[True], [False]]))
  np.testing.assert_allclose(vals, [[0.5], [0.0]])
  assert m["value/requested_evals"] == 1


def test_one_step_values_errors():
  c = _Counter()
  with pytest.raises(ValueError, match="examples has 1 entries for B=2"):
    value.one_step_values(np.zeros((2, 1, 3), int), c.reward, c.decode, [{"w": 1}])
  with pytest.raises(ValueError, match=r"\[B, K, G\]"):
    value.one_step_values(np.zeros((2, 3), int), c.reward, c.decode, [{}, {}])
  with pytest.raises(ValueError, match="reward_fn returned 1 rewards for 2"):
    value.one_step_values(np.array([[[0]], [[1]]]), lambda t, e: [0.0], c.decode, [{}, {}])


class GuessesVariantsTest(chex.TestCase):
  """The gather traced under `jax.jit` and run eagerly (chex variants), and its contract."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_gather_and_contract(self):
    gather = self.variant(value.one_step_guesses.__wrapped__)  # the function under jax.jit
    x0_hat = jnp.arange(2 * 3 * 2, dtype=jnp.int32).reshape(2, 3, 2)
    steps = jnp.array([[2, 0], [1, 1]])
    want = jnp.stack([x0_hat[0][jnp.array([2, 0])], x0_hat[1][jnp.array([1, 1])]])
    chex.assert_trees_all_equal(gather(x0_hat, steps), want)
    with self.assertRaisesRegex(AssertionError, "assert_rank"):
      gather(x0_hat[0], steps)
    with self.assertRaisesRegex(AssertionError, "assert_equal_shape_prefix"):
      gather(x0_hat, steps[:1])
    with self.assertRaisesRegex(AssertionError, "assert_type"):
      gather(x0_hat, steps.astype(jnp.float32))


# ----------------------------------------------------------------------------------------------
# egspo.correctness_step_reward_only: the one-step guesses scored with the correctness term alone.


def test_require_step_reward_fn():
  fn = lambda texts, examples: np.zeros(len(texts))  # noqa: E731
  assert value.require_step_reward_fn(fn) is fn
  with pytest.raises(ValueError, match="correctness_step_reward_only needs"):
    value.require_step_reward_fn(None)


def test_task_correctness_rewards_are_the_releases_last_reward_function():
  """GSM8K: `correctness_reward_func` (2.0) without the four format terms; MATH:
  `correctness_reward_func_math` (2.0) without the boxed-format term; code: `coding_reward_func`
  without xmlcount (only `reference_rewards` adds it); Countdown: its single function."""
  from egspo import tasks  # pylint: disable=import-outside-toplevel

  gsm = tasks.get_task("gsm8k")
  text = "<reasoning>\nx\n</reasoning>\n<answer>\n72\n</answer>\n"
  assert gsm.reward(text, {"answer": "72"}) == 4.0  # 0.5 × 4 format terms + 2.0
  np.testing.assert_array_equal(
      gsm.correctness_rewards([text, text], [{"answer": "72"}, {"answer": "7"}]), [2.0, 0.0])
  math = tasks.get_task("math500")
  text = "<reasoning>\nx\n</reasoning>\n<answer>\n\\boxed{3}\n</answer>\n"
  assert math.reward(text, {"answer": "4"}) == 1.0  # the format term alone
  assert math.correctness_reward(text, {"answer": "3"}) == 2.0
  assert math.correctness_reward(text, {"answer": "4"}) == 0.0
  mbpp = tasks.get_task("mbpp", reference_rewards=True)
  text, ex = "<reasoning>\nno code\n</reasoning>\n<answer>\nnone\n</answer>", {
      "tests": ["assert f(1) == 1"], "entry_point": "f"}
  assert float(mbpp.rewards([text], [ex])[0]) > 0  # xmlcount only
  np.testing.assert_array_equal(mbpp.correctness_rewards([text], [ex]), [0.0])
  cd = tasks.get_task("countdown")
  texts = ["<answer>1+2</answer>", "<answer>1*2</answer>", "none"]
  exs = [{"numbers": [1, 2], "target": 3}] * 3
  np.testing.assert_array_equal(cd.correctness_rewards(texts, exs), cd.rewards(texts, exs))
