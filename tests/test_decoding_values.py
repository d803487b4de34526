"""scripts/decoding_values.py: the comparison it prints (issue 12, item 10)."""

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
import decoding_values  # noqa: E402


def test_compare_hand_computed():
  out = decoding_values.compare(np.array([0.0, 1.0, 0.5, 2.0]), np.array([0.0, 0.9, 0.5, 1.0]))
  assert out["n"] == 4 and out["differ_frac"] == 0.5
  np.testing.assert_allclose(out["mean_abs_diff"], (0.1 + 1.0) / 4)
  np.testing.assert_allclose(out["max_abs_diff"], 1.0)
  same = decoding_values.compare(np.ones(3), np.ones(3))
  assert same["differ_frac"] == 0.0 and same["max_abs_diff"] == 0.0
