"""egspo.stats: the paired hierarchical bootstrap against hand-checkable cases, an exhaustive
enumeration of a 2 × 2 case, and the closed-form variance of the resampled mean."""

import collections
import itertools

import numpy as np
import pytest

from egspo import stats


def test_identical_arms_give_a_zero_interval():
  a = np.random.default_rng(0).integers(0, 2, size=(5, 64))
  r = stats.paired_bootstrap(a, a.copy(), num_resamples=2000)
  assert (r["mean"], r["lo"], r["hi"], r["significant"]) == (0.0, 0.0, 0.0, False)
  assert r["per_seed"] == [0.0] * 5


def test_a_constant_shift_is_its_own_interval():
  b = np.random.default_rng(1).random((3, 40))
  r = stats.paired_bootstrap(b + 0.25, b, num_resamples=2000)
  assert r["mean"] == pytest.approx(0.25)
  assert r["lo"] == pytest.approx(0.25) and r["hi"] == pytest.approx(0.25)
  assert r["significant"]
  assert r["per_seed"] == pytest.approx([0.25] * 3)
  r = stats.paired_bootstrap(b, b + 0.25, num_resamples=2000)
  assert r["hi"] == pytest.approx(-0.25) and r["significant"]


def test_pairing_removes_the_shared_variation():
  """Arms that differ on one problem of 100 in every seed, while seeds and problems vary a lot:
  the paired interval only sees the one problem (mean 0.01, never below 0)."""
  rng = np.random.default_rng(2)
  b = rng.integers(0, 2, size=(5, 100)).astype(float) + rng.normal(0, 1, size=(5, 1))
  a = b.copy()
  a[:, 7] += 1.0
  r = stats.paired_bootstrap(a, b, num_resamples=4000)
  assert r["mean"] == pytest.approx(0.01)
  assert r["lo"] >= 0.0 and r["hi"] <= 0.06


def test_resampled_distribution_matches_exhaustive_enumeration():
  """S = 2 seeds, N = 2 problems: 4 ordered seed draws × 4 × 4 problem draws, 64 equally likely
  resamples. The bootstrap's frequencies match their probabilities, and its interval the exact
  quantiles."""
  d = np.array([[0.0, 1.0], [2.0, 4.0]])
  exact = collections.Counter()
  for s1, s2 in itertools.product(range(2), repeat=2):
    for p in itertools.product(range(2), repeat=4):
      exact[(d[s1, p[0]] + d[s1, p[1]]) / 4 + (d[s2, p[2]] + d[s2, p[3]]) / 4] += 1 / 64
  n = 200_000
  got = stats.hierarchical_bootstrap(d, num_resamples=n, seed=3)
  values, counts = np.unique(got, return_counts=True)
  assert set(values.tolist()) == set(exact)
  for v, c in zip(values, counts):
    p = exact[v]
    assert abs(c / n - p) < 5 * np.sqrt(p * (1 - p) / n), (v, c / n, p)
  atoms = sorted(exact)
  cdf = np.cumsum([exact[v] for v in atoms])
  lo_exact = atoms[int(np.searchsorted(cdf, 0.025))]
  hi_exact = atoms[int(np.searchsorted(cdf, 0.975))]
  assert min(abs(cdf - 0.025).min(), abs(cdf - 0.975).min()) > 0.005  # no atom on the edge
  r = stats.paired_bootstrap(d, np.zeros_like(d), num_resamples=n, seed=3)
  assert (r["lo"], r["hi"]) == (lo_exact, hi_exact)


def test_spread_matches_the_hierarchical_variance():
  """Var of the resampled mean = (Var_s(μ_s) + mean_s(σ_s²) / N) / S (population variances): a
  drawn seed contributes its mean plus the sampling error of N problems drawn from it."""
  rng = np.random.default_rng(4)
  s, n = 5, 50
  d = rng.normal(0, 1, size=(s, 1)) + rng.normal(0, 2, size=(s, n))
  want = np.sqrt((d.mean(1).var() + d.var(1).mean() / n) / s)
  got = stats.hierarchical_bootstrap(d, num_resamples=20_000, seed=5)
  assert got.std() == pytest.approx(want, rel=0.03)
  assert got.mean() == pytest.approx(d.mean(), abs=4 * want / np.sqrt(20_000))


def test_fixed_seed_reproduces_and_shares_draws():
  a = np.random.default_rng(6).random((4, 30))
  assert np.array_equal(stats.hierarchical_bootstrap(a, 1500, seed=9),
                        stats.hierarchical_bootstrap(a, 1500, seed=9))
  # The same draws for every difference of one study: the resampled mean is linear in d.
  b = np.random.default_rng(7).random((4, 30))
  np.testing.assert_allclose(stats.hierarchical_bootstrap(a + b, 1500, seed=9),
                             stats.hierarchical_bootstrap(a, 1500, seed=9)
                             + stats.hierarchical_bootstrap(b, 1500, seed=9))


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match=r"same \[seeds, problems\] shape, got \(2, 3\) and \(2, 4\)"):
    stats.paired_bootstrap(np.zeros((2, 3)), np.zeros((2, 4)))
  with pytest.raises(ValueError, match=r"values must be \[seeds, problems\]"):
    stats.hierarchical_bootstrap(np.zeros(3))
  with pytest.raises(ValueError, match="num_resamples must be >= 1"):
    stats.hierarchical_bootstrap(np.zeros((1, 1)), 0)
  with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
    stats.paired_bootstrap(np.zeros((1, 2)), np.zeros((1, 2)), level=1.0)
