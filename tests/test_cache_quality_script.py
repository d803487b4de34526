"""scripts/cache_quality.py (issue 15's cache quality targets): token agreement, the verdicts and
tables, and the run plan with and without a reused ablation folder. No runs."""

import importlib.util
import json
import math
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _script():
  spec = importlib.util.spec_from_file_location("cache_quality_script",
                                                REPO / "scripts" / "cache_quality.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_token_agreement_by_hand():
  cq = _script()
  # "abcd" vs "abxd": 3 of 4; "ab" vs "abc": 2 of 3 (the missing position disagrees); "" vs "": 0 of 0
  got = cq.token_agreement(["abcd", "ab", ""], ["abxd", "abc", ""])
  assert got["token_agreement"] == pytest.approx(5 / 7)
  assert got["identical"] == pytest.approx(1 / 3) and got["num_examples"] == 3
  same = cq.token_agreement(["x+1", "y"], ["x+1", "y"])
  assert same["token_agreement"] == 1.0 and same["identical"] == 1.0
  words = cq.token_agreement(["a b c"], ["a b d"], encode=str.split)  # tokens are the encoder's
  assert words["token_agreement"] == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="2 reference generations, 1 others"):
    cq.token_agreement(["a", "b"], ["a"])


def _row(seed, mode, acc, cells=None, block=16):
  r = {"seed": seed, "block_length": block, "mode": mode, "accuracy": acc,
       "token_agreement": 1.0 if mode == "none" else 0.9, "identical": 0.5}
  if cells is not None:
    r["cell_accuracy"] = cells
  return r


def test_quality_verdict_and_table():
  cq = _script()
  rows = [_row(0, "none", 0.200), _row(0, "prefix", 0.195), _row(0, "dual", 0.212),
          _row(1, "none", 0.100), _row(1, "dual", 0.104)]
  v = cq.quality_verdict(rows)
  assert v["max_abs_diff"] == {"accuracy": pytest.approx(0.012)} and not v["holds"]
  assert cq.quality_verdict(rows[:2] + rows[3:])["holds"]  # largest gap 0.5 point
  md = cq.quality_table(rows).splitlines()
  assert md[1].count("---") == md[0].count("|") - 1 and len(md) == 2 + len(rows)
  assert "| 0 | 16 | dual | 21.2 | +1.2 |" in md[4] and "cell" not in md[0]
  sudoku = [_row(0, "none", 0.30, 0.80), _row(0, "dual", 0.30, 0.789)]
  vs = cq.quality_verdict(sudoku)
  assert vs["max_abs_diff"] == {"accuracy": 0.0, "cell_accuracy": pytest.approx(0.011)}
  assert not vs["holds"]
  assert "| 80.0 | +0.0 |" in cq.quality_table(sudoku).splitlines()[2]
  assert "| 78.9 | -1.1 |" in cq.quality_table(sudoku).splitlines()[3]
  # Δ is against none of the same block length only
  other = [_row(0, "none", 0.2), _row(0, "none", 0.1, block=8), _row(0, "dual", 0.1, block=8)]
  assert cq.quality_verdict(other)["max_abs_diff"] == {"accuracy": 0.0}


def test_rl_verdict_and_table():
  cq = _script()
  rng = np.random.default_rng(0)
  none = (rng.random((3, 1024)) < 0.2).astype(float)
  same = cq.rl_verdict({"none": none, "dual": none.copy()}, "dual", 200, 0)
  assert same["mean"] == 0.0 and same["within_noise"] and same["within_2se"]
  assert same["binomial_se_run"] == pytest.approx(math.sqrt(none.mean() * (1 - none.mean()) / 1024))
  assert same["binomial_se_mean_diff"] == pytest.approx(same["binomial_se_run"] * math.sqrt(2 / 3))
  better = np.maximum(none, (rng.random((3, 1024)) < 0.2).astype(float))  # ~16 points more
  worse = cq.rl_verdict({"none": better, "dual": none}, "dual", 200, 0)
  assert worse["mean"] < -0.1 and not worse["within_noise"] and not worse["within_2se"]
  # one problem in 1024 fewer on one seed of three: tiny, well within 2 SE
  one = none.copy()
  one[0, np.argmax(one[0])] = 0.0
  assert cq.rl_verdict({"none": none, "dual": one}, "dual", 200, 0)["within_2se"]
  rows = [{"seed": 0, "mode": "dual", "sft_accuracy": 0.128, "accuracy": 0.2, "source": "x",
           "seconds_per_iteration": 0.61, "rl_train_seconds": 300.0,
           "phase_seconds": {"rollout": 0.1, "plan": 0.2, "update": 0.3},
           "rl/tis/logp_gap": 0.01234, "rl/tis/capped_frac": 0.0},
          {"seed": 0, "mode": "none", "sft_accuracy": 0.128, "accuracy": 0.19, "source": "x",
           "seconds_per_iteration": 0.55, "rl_train_seconds": 280.0,
           "phase_seconds": {"rollout": 0.2, "plan": 0.1, "update": math.nan},
           "rl/tis/logp_gap": math.nan, "rl/tis/capped_frac": math.nan}]
  md = cq.rl_table(rows).splitlines()
  assert "| 0 | dual | 12.8 | 20.0 | 0.61 | 0.100 / 0.200 / 0.300 | 300 | 0.0123 | 0.0000 |" in md[2]
  assert "| 0.55 | 0.200 / 0.100 / nan | 280 | – | – |" in md[3]
  logged = [{"rl/time/rollout": 1.0, "rl/time/plan": 5.0}, {"rl/time/rollout": 3.0},
            {"rl/time/rollout": 2.0, "rl/time/plan": 1.0}, {"sft/loss": 0.1}]
  med = cq.median_phase_seconds(logged)
  assert med["rollout"] == 2.0 and med["plan"] == 3.0 and math.isnan(med["update"])
  assert cq.mean_logged([{"a": 1.0}, {"b": 2.0}, {"a": 3.0}], "a") == 2.0
  assert math.isnan(cq.mean_logged([{"b": 1.0}], "a"))


def test_plan_reuses_a_finished_ablation_folder(tmp_path):
  cq = _script()
  src, runs = tmp_path / "ablation", tmp_path / "runs"
  arm = src / "seed0" / cq.cm.slug(cq.METHOD)
  for d in (src / "seed0" / "sft", arm):
    d.mkdir(parents=True)
    (d / "history.json").write_text(json.dumps({}))
  plan = lambda: cq.plan(runs, src, [0], [0], ["none", "dual"], [None, 8], ["dual", "none"],
                         cq.METHOD, [])
  unchecked = plan()["rl"][1]
  assert unchecked.workdir == runs / "seed0" / "rl_none"  # no config.json: not known to match
  resolved = json.loads(cq.cm.resolved_config(list(unchecked.args)).to_json_best_effort())
  other = json.loads(json.dumps(resolved))
  other["train"]["num_iterations"] = 100  # the ablation's arms: not this comparison's reference
  (arm / "config.json").write_text(json.dumps(other))
  assert plan()["rl"][1].workdir == runs / "seed0" / "rl_none"
  (arm / "config.json").write_text(json.dumps(resolved))
  p = plan()
  assert p["sft"][0].workdir == src / "seed0" / "sft" and p["sft"][0].done
  names = [r.method for _, r in p["eval"]]
  assert names == ["eval/none", "eval/dual", "eval/none/b8", "eval/dual/b8"]
  assert all(r.sft_dir == src / "seed0" / "sft" for _, r in p["eval"])
  b8 = p["eval"][3][1]
  assert "--config.eval.block_length=8" in b8.args and "--config.eval.cache=dual" in b8.args
  dual, none = p["rl"]
  assert dual.workdir == runs / "seed0" / "rl_dual" and "--config.rollout.cache=dual" in dual.args
  assert none.workdir == arm  # the ablation's finished cache-none arm
  (runs / "seed0" / "rl_none").mkdir(parents=True)
  (runs / "seed0" / "rl_none" / "history.json").write_text("{}")
  again = cq.plan(runs, src, [0], [0], ["none"], [None], ["dual", "none"], cq.METHOD, [])
  assert again["rl"][1].workdir == runs / "seed0" / "rl_none"  # a finished own run comes first
  r2 = cq.plan(runs, src, [0], [0], ["none"], [None], ["dual", "none"], cq.METHOD, [],
               rl_refreshes=(0, 2))["rl"]
  assert [r.method for r in r2] == ["rl/dual", "rl/dual/r2", "rl/none"]
  assert r2[1].workdir == runs / "seed0" / "rl_dual_r2"
  assert "--config.rollout.cache_refresh=2" in r2[1].args
  assert [cq.rl_mode(r) for r in r2] == ["dual", "dual r2", "none"]
  only = cq.plan(runs, src, [0], [0], ["none"], [None], ["dual", "none"], cq.METHOD, [],
                 rl_refreshes=(2,))["rl"]
  assert [r.method for r in only] == ["rl/dual/r2", "rl/none"]
  assert "--config.eval.before_training=False" in dual.args
  assert "--config.eval.cache=dual" not in dual.args  # evaluation stays at the default none
  with pytest.raises(SystemExit, match="seed1/sft holds no finished SFT run"):
    cq.plan(runs, src, [1], [], ["none"], [None], ["none"], cq.METHOD, [])
  own = cq.plan(runs, None, [0], [0], ["none"], [None], ["none"], cq.METHOD,
                ["--config.train.num_iterations=3"])
  assert own["sft"][0].workdir == runs / "seed0" / "sft"
  assert "--config.train.num_iterations=0" in own["sft"][0].args
  assert "--config.train.num_iterations=3" not in own["sft"][0].args
  assert own["rl"][0].workdir == runs / "seed0" / "rl_none"


def test_refresh_runs_and_seed_means(tmp_path):
  """--refreshes adds the cached modes with eval.cache_refresh at the config's block length; a
  row's mode names its refresh (read from the evaluation's protocol), and the seed means give
  each mode's Δ against none of the same seeds."""
  cq = _script()
  src = tmp_path / "ablation"
  (src / "seed0" / "sft").mkdir(parents=True)
  (src / "seed0" / "sft" / "history.json").write_text("{}")
  p = cq.plan(tmp_path / "runs", src, [0], [], ["none", "dual"], [None, 8], ["none"], cq.METHOD,
              [], refreshes=(2,))
  names = [r.method for _, r in p["eval"]]
  assert names == ["eval/none", "eval/dual", "eval/none/b8", "eval/dual/b8", "eval/dual/r2"]
  evals = [p["eval"][i] for i in (0, 1, 4)]  # the config's block length
  r2 = evals[2][1]
  assert "--config.eval.cache_refresh=2" in r2.args and "--config.eval.cache=dual" in r2.args
  assert not any(a.startswith("--config.eval.block_length") for a in r2.args)
  for (_, run), (refresh, text) in zip(evals, [(0, "ab"), (0, "xb"), (2, "ab")]):
    ev = {"protocol": {"cache": run.method.split("/")[1], "block_length": 16,
                       "cache_refresh": refresh},
          "results": {"16": {"metrics": {"accuracy": 0.5 if text == "ab" else 0.25},
                             "generations": [{"generations": text}]}}}
    (run.workdir / "eval").mkdir(parents=True)
    (run.workdir / "eval" / "eval_0.json").write_text(json.dumps(ev))
  rows = cq.quality_rows(evals)
  assert [r["mode"] for r in rows] == ["none", "dual", "dual r2"]
  assert [r["token_agreement"] for r in rows] == [1.0, 0.5, 1.0]
  more = rows + [_row(1, "none", 0.4), _row(1, "dual", 0.1), _row(2, "dual r2", 0.9)]
  means = {m["mode"]: m for m in cq.mode_means(more)}
  assert means["dual"]["seeds"] == [0, 1]
  assert means["dual"]["accuracy"] == pytest.approx(0.175)
  assert means["dual"]["delta_accuracy"] == pytest.approx(-0.275)  # (−0.25 − 0.3) / 2
  assert means["dual r2"]["seeds"] == [0]  # seed 2 has no none to compare with
  assert "| 16 | dual r2 | 1 | 50.0 | +0.0 | 100.0 |" in cq.means_table(list(means.values()))
