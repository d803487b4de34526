"""notebooks/small_model_ablation.ipynb runs top to bottom with its small settings (nbclient,
kernel python3) and writes its plots as PNG next to it; `egspo.ablation`'s helpers (issue 6)."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import REPO_ROOT
from egspo import ablation

NOTEBOOK = REPO_ROOT / "notebooks" / "small_model_ablation.ipynb"


def _write_metrics(workdir, records):
  workdir.mkdir(parents=True)
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_moving_average_hand_computed():
  np.testing.assert_allclose(ablation.moving_average([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
  np.testing.assert_allclose(ablation.moving_average([5, 1], 1), [5, 1])
  with pytest.raises(ValueError, match="window"):
    ablation.moving_average([1.0], 0)


def test_set_fields_copies_and_rejects_unknown_fields():
  c = ablation.ablation_config(small=True)
  d = ablation.set_fields(c, {"egspo.lam": 0.25, "algorithm": "egspo_sa"})
  assert (d.egspo.lam, d.algorithm) == (0.25, "egspo_sa")
  assert c.egspo.lam == 0.5 and c.algorithm == "egspo_sa"  # the original is untouched
  with pytest.raises(ValueError, match="egspo.lamda"):
    ablation.set_fields(c, {"egspo.lamda": 0.1})


def test_variants_ablate_selection_and_lambda_only():
  c = ablation.ablation_config(small=True)
  cfgs = {n: ablation.set_fields(c, o) for n, o in ablation.VARIANTS.items()}
  assert {x.egspo.selection for x in cfgs.values()} == {"entropy", "uniform", "random"}
  lams = {n: (0.0 if x.algorithm == "egspo" else x.egspo.lam) for n, x in cfgs.items()}
  assert sorted(set(lams.values())) == [0.0, 0.5]
  assert len({ablation.slug(n) for n in cfgs}) == len(cfgs)


def test_curves_summary_and_plot_from_metrics_jsonl(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  _write_metrics(a, [{"step": 10, "eval/accuracy": 0.25}, {"step": 11, "rl/reward": 0.5},
                     {"step": 12, "rl/reward": None}, {"step": 13, "rl/reward": 1.0},
                     {"step": 13, "eval/accuracy": 0.5}])
  _write_metrics(b, [{"step": 11, "rl/reward": 0.0}])
  steps, values = ablation.load_curve(a, "rl/reward")
  assert steps.tolist() == [11, 13] and values.tolist() == [0.5, 1.0]  # null skipped
  rows = {r["variant"]: r for r in ablation.summary({"a": a, "b": b}, last=2)}
  assert rows["a"]["reward_last"] == 0.75
  assert (rows["a"]["accuracy_first"], rows["a"]["accuracy_final"]) == (0.25, 0.5)
  assert np.isnan(rows["b"]["accuracy_final"])
  png = ablation.plot_curves({"a": a, "b": b}, "rl/reward", tmp_path / "r.png", offset_steps=10)
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="no run has metric"):
    ablation.plot_curves({"b": b}, "eval/accuracy", tmp_path / "x.png")


def test_run_variant_needs_a_warm_start(tmp_path):
  with pytest.raises(ValueError, match="no SFT checkpoint"):
    ablation.run_variant(ablation.ablation_config(), tmp_path / "none", tmp_path / "run")


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_and_writes_pngs(tmp_path):
  """Executes a copy of the notebook in tmp_path (so its PNGs land next to the copy)."""
  import nbclient
  import nbformat

  nb_path = tmp_path / NOTEBOOK.name
  shutil.copy(NOTEBOOK, nb_path)
  nb = nbformat.read(nb_path, as_version=4)
  env = {"EGSPO_ABLATION_SMALL": "1", "EGSPO_ABLATION_WORKDIR": str(tmp_path / "runs"),
         "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel inherits this process's environment
  try:
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors, errors
  for name in ("ablation_reward.png", "ablation_accuracy.png"):
    data = (tmp_path / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
  # Every variant trained for the configured iterations from the shared SFT checkpoint.
  runs = {n: tmp_path / "runs" / ablation.slug(n) for n in ablation.VARIANTS}
  for name, workdir in runs.items():
    steps, reward = ablation.load_curve(workdir, ablation.REWARD)
    assert len(reward) == 6 and np.all((reward >= 0) & (reward <= 1)), name
    assert (workdir / "checkpoints" / "rl" / "6").is_dir(), name
  # Same SFT start and seed: the first rollout (before any RL update) is the same for every
  # variant, so its reward is too; the λ=0 variants' rewards then depend on the selection only.
  first = {n: ablation.load_curve(w, ablation.REWARD)[1][0] for n, w in runs.items()}
  assert len(set(first.values())) == 1, first
