"""Paired, hierarchical bootstrap of a difference in held-out accuracy (numpy only).

Two arms A and B are evaluated on the same problems under the same seeds (same SFT checkpoint,
same held-out set), giving per-example scores a, b of shape [S seeds, N problems]. The
difference d = a − b is resampled hierarchically, the two sources of variation in turn:

  1. S seeds with replacement (the run-to-run variation of training),
  2. within each drawn seed, N problems with replacement (the finite held-out set);

the statistic of one resample is the mean over its S drawn seeds of the mean over their N drawn
problems. Resampling d rather than a and b separately keeps the pairing: both arms see the same
drawn seeds and problems. The interval is the percentile interval of the resampled statistics.
A fixed `seed` makes every call with the same shapes draw the same indices, so the differences of
one study share their resamples.
"""

from __future__ import annotations

import numpy as np

NUM_RESAMPLES = 10_000
LEVEL = 0.95
CHUNK = 1000  # resamples drawn at once: [CHUNK, N] indices per drawn seed bound the memory


def _scores(x, name: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or 0 in x.shape:
    raise ValueError(f"{name} must be [seeds, problems] with both > 0, got shape {x.shape}")
  return x


def hierarchical_bootstrap(values, num_resamples: int = NUM_RESAMPLES, seed: int = 0) -> np.ndarray:
  """[S, N] per-seed, per-problem values → [num_resamples] resampled grand means (seeds drawn
  with replacement, then problems with replacement within each drawn seed)."""
  v = _scores(values, "values")
  if num_resamples < 1:
    raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
  s, n = v.shape
  rng = np.random.default_rng(seed)
  out = np.empty(num_resamples)
  for lo in range(0, num_resamples, CHUNK):
    r = min(CHUNK, num_resamples - lo)
    seeds = rng.integers(0, s, size=(r, s))
    total = np.zeros(r)
    for j in range(s):
      problems = rng.integers(0, n, size=(r, n))
      total += v[seeds[:, j, None], problems].mean(axis=1)
    out[lo:lo + r] = total / s
  return out


def paired_bootstrap(a, b, num_resamples: int = NUM_RESAMPLES, seed: int = 0,
                     level: float = LEVEL) -> dict:
  """Mean of a − b ([S, N] each, paired by seed and problem) and its hierarchical-bootstrap
  percentile interval → {mean, lo, hi, significant (the interval excludes 0), per_seed (mean
  difference of each seed), num_resamples, level, seed}."""
  a, b = _scores(a, "a"), _scores(b, "b")
  if a.shape != b.shape:
    raise ValueError(f"paired arms need the same [seeds, problems] shape, got {a.shape} and {b.shape}")
  if not 0 < level < 1:
    raise ValueError(f"level must be in (0, 1), got {level}")
  d = a - b
  stats = hierarchical_bootstrap(d, num_resamples, seed)
  lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
  return {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi),
          "significant": bool(lo > 0 or hi < 0), "per_seed": [float(x) for x in d.mean(axis=1)],
          "num_resamples": int(num_resamples), "level": float(level), "seed": int(seed)}


__all__ = ["NUM_RESAMPLES", "LEVEL", "hierarchical_bootstrap", "paired_bootstrap"]
