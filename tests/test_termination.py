"""`egspo.terminate_at_last_non_eos` (egspo/rl/termination.py): the release's last non-EOS step
and the selectors capped at it, hand-computed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egspo.rl import termination as term

EOS = 1


def test_last_non_eos_steps_hand_computed():
  # T = 4 steps of 2 tokens. Row 0: steps 2, 3 commit only EOS → last = 1. Row 1: step 3 commits
  # one EOS and one token → 3. Row 2: every step EOS-only → T − 1 (the release's argmin of an
  # all-True row). Row 3: step 1 is EOS-only but step 2 is not → 2.
  tokens = jnp.array([[5, 6, 7, 8, EOS, EOS, EOS, EOS],
                      [5, 6, 7, 8, 9, 9, EOS, 4],
                      [EOS] * 8,
                      [5, 6, EOS, EOS, 7, EOS, EOS, EOS]], jnp.int32)
  commit = jnp.array([[0, 0, 1, 1, 2, 2, 3, 3]] * 4, jnp.int32)
  got = term.last_non_eos_steps(tokens, commit, EOS, 4)
  np.testing.assert_array_equal(np.asarray(got), [1, 3, 3, 2])


def test_last_non_eos_steps_follows_commit_order_not_position():
  tokens = jnp.array([[EOS, 5, EOS, EOS]], jnp.int32)
  commit = jnp.array([[3, 0, 1, 2]], jnp.int32)  # the only real token is committed first
  assert int(term.last_non_eos_steps(tokens, commit, EOS, 4)[0]) == 0


def test_capped_uniform_is_the_releases_linspace_in_integers():
  last = jnp.array([7, 10, 3, 0])
  steps, valid = term.capped_uniform_steps(last, 4)
  # torch.linspace(0, last, 4).long(): [0, 2, 4, 7], [0, 3, 6, 10], [0, 1, 2, 3], [0, 0, 0, 0].
  np.testing.assert_array_equal(np.asarray(steps), [[0, 2, 4, 7], [0, 3, 6, 10], [0, 1, 2, 3],
                                                    [0, 0, 0, 0]])
  assert np.asarray(valid).all()
  np.testing.assert_array_equal(np.asarray(term.capped_uniform_steps(last, 1)[0]), [[0]] * 4)


def test_capped_random_with_and_without_replacement():
  last = jnp.array([2, 9, 0])
  for seed in range(10):
    steps, valid = term.capped_random_steps(jax.random.key(seed), last, 4, 10, replace=True)
    s = np.asarray(steps)
    assert np.asarray(valid).all()
    assert (s >= 0).all() and (s <= np.asarray(last)[:, None]).all()
    assert (s[2] == 0).all()
    steps, valid = term.capped_random_steps(jax.random.key(seed), last, 4, 10, replace=False)
    s, v = np.asarray(steps), np.asarray(valid)
    # Distinct; row 0 has 3 steps for 4 slots (one invalid), row 2 one step.
    assert all(len(set(r)) == 4 for r in s)
    np.testing.assert_array_equal(v.sum(1), [3, 4, 1])
    assert sorted(s[0][v[0]]) == [0, 1, 2] and s[2][v[2]].tolist() == [0]
  # With replacement a step repeats in some row of some draw (4 draws from 3 steps: always).
  s, _ = term.capped_random_steps(jax.random.key(0), jnp.array([2]), 4, 10, replace=True)
  assert len(set(np.asarray(s)[0])) < 4


def test_select_capped_entropy_ranks_only_steps_up_to_last():
  ent = jnp.array([[0.1, 0.9, 0.5, 0.8, 0.7, 1.0],
                   [0.9, 0.1, 0.2, 0.3, 0.4, 0.5]])
  last = jnp.array([3, 1])
  steps, valid = term.select_capped("entropy", k=3, last=last, num_steps=6, step_entropy=ent,
                                    order="entropy_rank")
  s, v = np.asarray(steps), np.asarray(valid)
  np.testing.assert_array_equal(s[0], [1, 3, 2])  # top-3 of steps 0..3 by entropy
  assert v[0].all()
  # Row 1: only steps 0, 1 qualify; the third slot is a step beyond `last`, invalid.
  np.testing.assert_array_equal(s[1][:2], [0, 1])
  np.testing.assert_array_equal(v[1], [True, True, False])
  steps, _ = term.select_capped("entropy", k=3, last=last, num_steps=6, step_entropy=ent,
                                order="time")
  np.testing.assert_array_equal(np.asarray(steps)[0], [1, 2, 3])


def test_select_capped_errors():
  with pytest.raises(ValueError, match="unknown step selection method"):
    term.select_capped("best", k=1, last=jnp.array([0]), num_steps=2)
  with pytest.raises(ValueError, match="needs a jax.random key"):
    term.select_capped("random", k=1, last=jnp.array([0]), num_steps=2)
