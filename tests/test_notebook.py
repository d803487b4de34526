"""notebooks/small_model_ablation.ipynb runs top to bottom with its 'test' size (nbclient,
kernel python3) and writes its plots as PNG next to it; its install and settings cells;
`egspo.ablation`'s helpers (issues 6, 11)."""

import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT
from egspo import ablation

NOTEBOOK = REPO_ROOT / "notebooks" / "small_model_ablation.ipynb"
_FIND_SPEC = importlib.util.find_spec


def _code_cells():
  return [c["source"] for c in json.loads(NOTEBOOK.read_text())["cells"]
          if c["cell_type"] == "code"]


def _source(cell) -> str:
  return "".join(cell) if isinstance(cell, list) else cell


def _write_metrics(workdir, records):
  workdir.mkdir(parents=True)
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_moving_average_hand_computed():
  np.testing.assert_allclose(ablation.moving_average([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
  np.testing.assert_allclose(ablation.moving_average([5, 1], 1), [5, 1])
  with pytest.raises(ValueError, match="window"):
    ablation.moving_average([1.0], 0)


def test_set_fields_copies_and_rejects_unknown_fields():
  c = ablation.ablation_config("test")
  d = ablation.set_fields(c, {"egspo.lam": 0.25, "algorithm": "egspo_sa"})
  assert (d.egspo.lam, d.algorithm) == (0.25, "egspo_sa")
  assert c.egspo.lam == 0.5 and c.algorithm == "egspo_sa"  # the original is untouched
  with pytest.raises(ValueError, match="egspo.lamda"):
    ablation.set_fields(c, {"egspo.lamda": 0.1})


def test_variants_ablate_selection_and_lambda_only():
  c = ablation.ablation_config("test")
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


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
  with pytest.raises(ImportError, match=r"needs matplotlib \(pip install -e \"\.\[notebook\]\"\)"):
    ablation.plot_curves({}, "rl/reward", tmp_path / "r.png")


def test_run_variant_needs_a_warm_start(tmp_path):
  with pytest.raises(ValueError, match="no SFT checkpoint"):
    ablation.run_variant(ablation.ablation_config("test"), tmp_path / "none", tmp_path / "run")


def test_sizes_keep_the_tiny_warm_start_and_differ_in_rl_length():
  from egspo import config as config_lib

  tiny = config_lib.base_config("countdown", "tiny")
  test, colab, full = (ablation.ablation_config(s) for s in ("test", "colab", "full"))
  # The default shares the measured tiny SFT warm start and rollout shape, with fewer RL
  # iterations; 'test' is the short check; 'full' is the tiny schedule as configured.
  for field in ("steps", "batch_size", "learning_rate", "schedule", "decay_fraction"):
    assert colab.sft[field] == tiny.sft[field] == full.sft[field], field
  assert (colab.batch.num_prompts, colab.batch.group_size) == (16, 8)
  assert colab.task.num_eval_examples == tiny.task.num_eval_examples
  assert test.train.num_iterations < colab.train.num_iterations < full.train.num_iterations
  assert full.train.num_iterations == tiny.train.num_iterations
  assert colab.train.num_iterations // colab.train.eval_every >= 5  # a curve, not two points
  assert test.sft.steps < 100 and test.train.num_iterations < 10
  with pytest.raises(ValueError, match="unknown ablation size 'huge'; known: test, colab, full"):
    ablation.ablation_config("huge")


def test_relative_run_directories_are_made_absolute(tmp_path, monkeypatch):
  from egspo import train

  calls = []
  monkeypatch.setattr(train, "run", lambda config, workdir: calls.append((config, workdir)) or {})
  monkeypatch.chdir(tmp_path)
  config = ablation.ablation_config("test")
  assert ablation.warm_start(config, "runs/sft") == tmp_path / "runs" / "sft"
  c, workdir = calls[-1]
  assert workdir == str(tmp_path / "runs" / "sft") and c.train.num_iterations == 0
  (tmp_path / "runs" / "sft" / "checkpoints" / "sft" / "60").mkdir(parents=True)
  runs = ablation.run_variants(config, "runs/sft", "runs", {"uniform, λ=0.5": {"egspo.lam": 0.5}})
  assert runs == {"uniform, λ=0.5": tmp_path / "runs" / "uniform_lam0.5"}
  c, workdir = calls[-1]
  assert workdir == str(tmp_path / "runs" / "uniform_lam0.5") and c.egspo.lam == 0.5
  assert (tmp_path / "runs" / "uniform_lam0.5" / "checkpoints" / "sft" / "60").is_dir()
  assert ablation.local_dir("~/x") == pathlib.Path.home() / "x"
  with pytest.raises(ValueError, match="local"):
    ablation.local_dir("gs://bucket/runs")


def test_settings_cell_defaults_to_the_colab_size(tmp_path, monkeypatch):
  """Without the test's environment variables the notebook runs the meaningful size."""
  settings = next(_source(c) for c in _code_cells() if _source(c).startswith("# Settings"))
  monkeypatch.delenv("EGSPO_ABLATION_SIZE", raising=False)
  monkeypatch.delenv("EGSPO_ABLATION_WORKDIR", raising=False)
  monkeypatch.chdir(tmp_path)
  ns = {}
  exec(settings, ns)  # pylint: disable=exec-used
  assert ns["SIZE"] == "colab" and ns["SMOOTH"] > 1
  assert ns["WORKDIR"] == tmp_path / "ablation_runs"  # relative default, made absolute
  monkeypatch.setenv("EGSPO_ABLATION_SIZE", "test")
  exec(settings, ns)  # pylint: disable=exec-used
  assert ns["SIZE"] == "test"


def _run_install_cell(monkeypatch, *, colab: bool, installed: bool):
  """Executes the first code cell with subprocess.run recorded instead of run."""
  install = _source(_code_cells()[0])
  commands = []
  monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: commands.append(cmd))
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: (_FIND_SPEC(name, *a)
                                        if installed or name != "egspo" else None))
  for k in [k for k in os.environ if k.startswith("COLAB_")]:
    monkeypatch.delenv(k)
  if colab:
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab_20260101-060000_RC00")
  ns = {}
  exec(install, ns)  # pylint: disable=exec-used
  return commands, ns


def test_install_cell_installs_from_the_repository_only_in_colab(monkeypatch):
  commands, ns = _run_install_cell(monkeypatch, colab=True, installed=False)
  src = ns["SRC_DIR"]
  assert commands[0] == ["git", "clone", "--depth", "1", ns["REPO_URL"], src]
  assert commands[1][1:] == ["-m", "pip", "install", "-q", "-c",
                             f"{src}/requirements/constraints.txt", f"{src}[notebook]"]
  assert len(commands) == 2
  # Installed already (a second run in Colab, or a local checkout): nothing is run.
  assert _run_install_cell(monkeypatch, colab=True, installed=True)[0] == []
  assert _run_install_cell(monkeypatch, colab=False, installed=True)[0] == []
  with pytest.raises(ModuleNotFoundError, match="egspo is not installed: run `pip install"):
    _run_install_cell(monkeypatch, colab=False, installed=False)


def test_colab_link_and_repo_url_name_the_same_repository():
  """The placeholder owner/repo is the same in REPO_URL, the notebook's and README's links."""
  repo_url = re.search(r'REPO_URL = "https://github.com/([^"]+)"', _source(_code_cells()[0]))[1]
  colab = r"colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/main/notebooks/" + NOTEBOOK.name
  readme = re.findall(colab, (REPO_ROOT / "notebooks" / "README.md").read_text())
  in_notebook = re.findall(colab, NOTEBOOK.read_text())
  assert readme and in_notebook
  assert set(readme) == set(in_notebook) == {repo_url}


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_and_writes_pngs(tmp_path):
  """Executes a copy of the notebook in tmp_path (so its PNGs land next to the copy)."""
  import nbclient
  import nbformat

  nb_path = tmp_path / NOTEBOOK.name
  shutil.copy(NOTEBOOK, nb_path)
  nb = nbformat.read(nb_path, as_version=4)
  # The default, relative run directory: taken from the kernel's directory (tmp_path).
  env = {"EGSPO_ABLATION_SIZE": "test", "EGSPO_ABLATION_WORKDIR": None,
         "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  old = {k: os.environ.get(k) for k in env}
  for k, v in env.items():  # the kernel inherits this process's environment
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
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
  runs = {n: tmp_path / "ablation_runs" / ablation.slug(n) for n in ablation.VARIANTS}
  for name, workdir in runs.items():
    steps, reward = ablation.load_curve(workdir, ablation.REWARD)
    assert len(reward) == 6 and np.all((reward >= 0) & (reward <= 1)), name
    assert (workdir / "checkpoints" / "rl" / "6").is_dir(), name
  # Same SFT start and seed: the first rollout (before any RL update) is the same for every
  # variant, so its reward is too; the λ=0 variants' rewards then depend on the selection only.
  first = {n: ablation.load_curve(w, ablation.REWARD)[1][0] for n, w in runs.items()}
  assert len(set(first.values())) == 1, first
