"""The experiment config: `validate` rejects every bad value of every field the code reads with
one line naming it; config files, variants and override names fail clearly; `egspo.main` turns
all of these into `error: …` (exit 2) before building anything, resolves the workdir once, and
exits 0 on SIGTERM during start-up."""

import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import ml_collections
import pytest

from egspo import config as config_lib
from egspo import main as main_lib
from egspo import paths
from egspo.rl import registry

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p.name for p in (REPO / "configs").glob("*.py"))
INF, NAN = math.inf, math.nan


def tiny(**fields):
  """The countdown ':tiny' config without type safety (so wrong types can be set), `fields` set."""
  c = ml_collections.ConfigDict(config_lib.base_config("countdown", "tiny").to_dict(),
                                type_safe=False)
  for k, v in fields.items():
    *path, last = k.split(".")
    node = c
    for p in path:
      node = node[p]
    node[last] = v
  return c


BAD = [
    ("seed", -1), ("seed", 2**31), ("seed", 1.5), ("seed", True), ("seed", "0"),
    ("variant", "huge"), ("algorithm", "ppo"), ("algorithm", None),
    ("task.name", "chess"), ("task.prompt_style", "fancy"), ("task.eval_source", "web"),
    ("task.num_eval_examples", -1), ("task.num_eval_examples", 2.5), ("task.options", 3),
    ("task.train_file", "/nonexistent/train.jsonl"), ("task.eval_file", "/nonexistent/t.jsonl"),
    ("task.train_file", None),
    ("model.preset", "llada_70b"), ("model.param_dtype", "float8"), ("model.dtype", "int8"),
    ("model.remat", "yes"), ("model.scan_layers", 1), ("model.attention_impl", "flash"),
    ("model.checkpoint", None),
    ("tokenizer", ""), ("tokenizer", "/some/hf_tokenizer"), ("tokenizer", 0),
    ("lora.enabled", "true"), ("lora.rank", 0), ("lora.rank", 8.0), ("lora.alpha", 0.0),
    ("lora.alpha", INF), ("lora.targets", ""), ("lora.targets", "q_proj|("),
    ("lora.targets", "lm_head"), ("lora.targets", "re:("), ("lora.dropout", 1.0),
    ("lora.dropout", -0.1),
    ("mesh.num_devices", 0), ("mesh.num_devices", -2), ("mesh.data", 0), ("mesh.fsdp", -1),
    ("mesh.tensor", 1.0), ("mesh.rules", (("lora_rank",),)), ("mesh.rules", "lora_rank"),
    ("egspo.selection", "max"), ("egspo.num_selected_steps", 0),
    ("egspo.num_selected_steps", 99), ("egspo.adaptive_alpha", 0.0),
    ("egspo.adaptive_alpha", 1.5), ("egspo.lam", -0.1), ("egspo.lam", INF), ("egspo.lam", NAN),
    ("loss.eps", 0.0), ("loss.eps", 1.0), ("loss.eps_high", 0.0), ("loss.eps_high", INF),
    ("loss.beta", -1e-3), ("loss.beta", NAN),
    ("rollout.gen_length", 0), ("rollout.gen_length", 20), ("rollout.block_length", 0),
    ("rollout.steps", 32), ("rollout.steps", 0), ("rollout.temperature", -1.0),
    ("rollout.temperature", INF), ("rollout.remasking", "top_k"), ("rollout.cache", "full"),
    ("rollout.tis_cap", 0.5), ("rollout.tis_cap", INF),
    ("eval.cache", "kv"), ("rollout.cache_refresh", -1), ("rollout.cache_refresh", 2.5),
    ("rollout.cache_refresh", 2), ("eval.cache_refresh", 3), ("eval.cache_refresh", "2"),
    ("rollout.max_prompt_length", 0), ("rollout.max_prompt_length", 250),
    ("eval.gen_length", 20), ("eval.block_length", 0), ("eval.steps", 32),
    ("eval.batch_size", 0), ("eval.before_training", "no"),
    ("batch.num_prompts", 0), ("batch.group_size", 1), ("batch.micro_batch_size", 3),
    ("batch.micro_batch_size", 0),
    ("optim.learning_rate", 0.0), ("optim.learning_rate", INF), ("optim.learning_rate", NAN),
    ("optim.learning_rate", "3e-5"), ("optim.b1", 1.0), ("optim.b2", -0.1),
    ("optim.weight_decay", -1.0), ("optim.max_grad_norm", 0.0), ("optim.warmup_steps", -1),
    ("optim.schedule", "wsd"),
    ("sft.steps", -1), ("sft.batch_size", 0), ("sft.batch_size", -4), ("sft.learning_rate", 0.0),
    ("sft.learning_rate", NAN), ("sft.learning_rate", INF), ("sft.warmup_steps", -1),
    ("sft.warmup_steps", 6000), ("sft.checkpoint_every", 0), ("sft.time_budget_s", -1.0),
    ("sft.time_budget_s", INF), ("sft.schedule", "cosine"), ("sft.schedule_steps", -1),
    ("sft.decay_fraction", 0.0), ("sft.final_lr_fraction", 2.0), ("sft.log_every", 0),
    ("train.num_iterations", -1), ("train.update_schedule", "both"),
    ("train.time_budget_s", -5.0), ("train.log_every", 0), ("train.eval_every", 0),
    ("train.checkpoint_every", 0), ("train.keep_checkpoints", 0),
    ("diffu_grpo.num_iterations", 0), ("diffu_grpo.p_mask_prompt", 1.0),
    ("diffu_grpo.reduction", "mean"), ("diffu_grpo.eps", 0.0), ("diffu_grpo.beta", -1.0),
    ("espo.num_mc", 0), ("espo.coupled", 1), ("espo.beta", INF), ("espo.num_iterations", 0),
    ("gdpo.num_nodes", 0), ("gdpo.normalize", "sideways"), ("gdpo.eps", NAN),
    ("stabledrl.estimator", "exact"), ("stabledrl.clip_iw", 0.0),
    ("stabledrl.normalize_over", "batch"), ("stabledrl.log_iw_scale", 0.0),
    ("stabledrl.num_mc", 0), ("wd1.temperature", 0.0), ("wd1.num_nodes", 0), ("wd1.num_mc", 0),
    ("espo.eps", 1.5), ("gdpo.beta", -0.5), ("gdpo.num_iterations", 0),
    ("stabledrl.num_iterations", -1), ("stabledrl.num_nodes", 0), ("wd1.estimator", "exact"),
    ("wd1.num_iterations", 0), ("train.max_refused_updates", 0),
    ("task.prompt_truncation", "right"),
    ("egspo.pairing", "rank"), ("loss.scale", "x"), ("loss.scale", "-1"),
    ("train.columns_per_update", 0),
    ("egspo.pred_state", "prev"), ("egspo.terminate_at_last_non_eos", 1),
    ("egspo.correctness_step_reward_only", "no"), ("egspo.dynamic_lambda1", None),
    ("egspo.lambda1_update_steps", 0), ("egspo.random_replace", 0),
    ("egspo.normalize_returns", "true"), ("egspo.baseline", "grpo"), ("loss.use_exact_kl", 1),
    ("rollout.cfg_scale", -1.0), ("rollout.cfg_scale", NAN), ("stabledrl.bound", "eubo"),
    ("stabledrl.eubo_beta", 0.0), ("stabledrl.mix_weight", 1.5), ("stabledrl.p_mask_prompt", 1.0),
    ("stabledrl.iw_masks", "shared"),
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_bad_value_is_one_line_naming_the_field(field, value):
  c = tiny(**{field: value})
  section = field.split(".")[0]
  if section in registry.registered():  # a method's section is checked when it is selected
    c.algorithm = section
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith(f"bad config field {field}="), msg
  assert f"={value!r}" in msg or f"={value}" in msg, msg  # the value as given


def test_the_table_covers_every_field_of_the_config():
  """Each leaf of the base config has at least one bad value above (new fields need one)."""
  def leaves(d, prefix=""):
    for k, v in d.items():
      if isinstance(v, dict) and k != "options":
        yield from leaves(v, f"{prefix}{k}.")
      else:
        yield prefix + k
  covered = {f for f, _ in BAD}
  missing = set(leaves(config_lib.base_config("countdown", "tiny").to_dict())) - covered
  assert not missing, sorted(missing)


def test_cross_field_rules():
  # Cosine decays over optimizer steps: 5 iterations × K = 4 (per_step) = 20.
  ok = tiny(**{"optim.schedule": "cosine", "train.num_iterations": 5, "optim.warmup_steps": 19})
  config_lib.validate(ok)
  with pytest.raises(config_lib.ConfigError, match=r"^bad config field optim\.warmup_steps=20: "
                                                   r".*RL stage's 20 optimizer steps"):
    config_lib.validate(tiny(**{"optim.schedule": "cosine", "train.num_iterations": 5,
                                "optim.warmup_steps": 20}))
  # The release's update schedule: an optimizer step takes whole columns of one rollout.
  config_lib.validate(tiny(**{"train.update_schedule": "reference"}))
  with pytest.raises(config_lib.ConfigError,
                     match=r"^bad config field train\.columns_per_update=3: must divide"):
    config_lib.validate(tiny(**{"train.update_schedule": "reference",
                                "train.columns_per_update": 3}))
  with pytest.raises(config_lib.ConfigError, match=r"stabledrl needs whole groups"):
    config_lib.validate(tiny(**{"algorithm": "stabledrl", "batch.micro_batch_size": 4}))
  # The sampler checks its own fields; the reason names the config section's fields.
  with pytest.raises(config_lib.ConfigError, match=r"^bad config field eval\.gen_length=20: must "
                                                   r"be divisible by eval\.block_length=16$"):
    config_lib.validate(tiny(**{"eval.gen_length": 20}))
  # A file that exists is accepted; sampling fits the preset exactly at its length.
  config_lib.validate(tiny(**{"task.train_file": __file__, "rollout.max_prompt_length": 240}))


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_file_and_variant(name):
  path = str(REPO / "configs" / name)
  config_lib.validate(config_lib.load_config(path + ":tiny"))
  for spec in (path, path + ":8b"):  # LLaDA-8B: stops without a checkpoint, named
    c = config_lib.load_config(spec)
    with pytest.raises(config_lib.ConfigError, match=r"^bad config field model\.checkpoint=''"):
      config_lib.validate(c)
    c.model.checkpoint = "/ckpt/llada-8b-instruct"
    config_lib.validate(c)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_reference_variant_is_the_release_and_needs_its_checkpoint(name, tmp_path, monkeypatch):
  """`:reference` = every RELEASE_* value; it names the SFT-merged checkpoint it starts from and,
  for the generator tasks, the dataset file the release trains on, and refuses to start without."""
  for var in ("EGSPO_COUNTDOWN_TRAIN_FILE", "EGSPO_SUDOKU_TRAIN_FILE"):
    monkeypatch.delenv(var, raising=False)
  c = config_lib.load_config(str(REPO / "configs" / name) + ":reference")
  for field, value in {**config_lib.RELEASE_ALGORITHM, **config_lib.RELEASE_RUN}.items():
    node = c
    for part in field.split("."):
      node = node[part]
    assert node == value, field
  if c.task.name in ("countdown", "sudoku"):
    with pytest.raises(config_lib.ConfigError, match=r"^bad config field task\.train_file='': "
                       r"the reference recipe trains"):
      config_lib.validate(c)
    c.task.train_file = str(tmp_path / "train.jsonl")
    (tmp_path / "train.jsonl").write_text("{}\n")
  with pytest.raises(config_lib.ConfigError,
                     match=r"^bad config field model\.checkpoint='': .*LLaDA-sft-s1k-merged"):
    config_lib.validate(c)
  c.model.checkpoint = "/ckpt/LLaDA-sft-s1k-merged"
  config_lib.validate(c)


def test_reference_settings_are_config_fields():
  c = config_lib.base_config("gsm8k")
  config_lib.apply_settings(c, {"egspo.lam": 0.25})
  assert c.egspo.lam == 0.25
  with pytest.raises(config_lib.ConfigError, match=r"unknown config field egspo\.lamda"):
    config_lib.apply_settings(c, {"egspo.lamda": 0.5})


def test_random_8b_only_when_asked_and_with_its_tokenizer():
  c = config_lib.base_config("countdown")
  c.model.checkpoint = "random"
  with pytest.raises(config_lib.ConfigError, match=r"^bad config field tokenizer=''"):
    config_lib.validate(c)
  c.tokenizer = "char"
  with pytest.raises(config_lib.ConfigError, match=r"LLaDA's tokenizer"):
    config_lib.validate(c)
  c.tokenizer = "GSAI-ML/LLaDA-8B-Instruct"
  config_lib.validate(c)
  t = config_lib.base_config("copy", "tiny")
  t.model.checkpoint = "random"  # the tiny preset: the same as ''
  config_lib.validate(t)


def test_load_config_errors_name_the_file(tmp_path):
  cases = {
      "broken.py": "def get_config(:\n",
      "raises.py": "def get_config():\n  raise RuntimeError('no GPU here')\n",
      "noget.py": "X = 1\n",
      "notdict.py": "def get_config():\n  return {'a': 1}\n",
      "badimport.py": "import no_such_module_xyz\n",
  }
  want = {"broken.py": "SyntaxError", "raises.py": "RuntimeError: no GPU here",
          "noget.py": "defines no get_config", "notdict.py": "not a ConfigDict",
          "badimport.py": "no_such_module_xyz"}
  for name, text in cases.items():
    (tmp_path / name).write_text(text)
    with pytest.raises(config_lib.ConfigError) as e:
      config_lib.load_config(str(tmp_path / name))
    assert "\n" not in str(e.value) and name in str(e.value) and want[name] in str(e.value)
  with pytest.raises(config_lib.ConfigError, match=r"config file .*nope\.py not found"):
    config_lib.load_config(str(tmp_path / "nope.py"))
  with pytest.raises(config_lib.ConfigError, match=r"countdown\.py:huge: unknown config variant"):
    config_lib.load_config(str(REPO / "configs" / "countdown.py:huge"))


def test_check_field_lists_known_fields():
  c = config_lib.base_config("countdown", "tiny")
  config_lib.check_field(c, "train.eval_every")
  config_lib.check_field(c, "task.options.num_numbers")
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.check_field(c, "train.foo")
  assert str(e.value).startswith("unknown config field train.foo (known fields of train: ")
  assert "eval_every" in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(config_lib.ConfigError, match=r"did you mean train\.eval_every\?"):
    config_lib.check_field(c, "train.eval_evry")
  with pytest.raises(config_lib.ConfigError, match=r"unknown config field trian \(known fields "
                                                   r"at the top level: .*\); did you mean train"):
    config_lib.check_field(c, "trian.x")


def test_resolve_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert paths.resolve_path("runs/tiny") == str(tmp_path / "runs" / "tiny")
  assert paths.resolve_path(pathlib.Path("runs/../x")) == str(tmp_path / "x")
  assert paths.resolve_path("~/run") == str(tmp_path / "home" / "run")
  assert paths.resolve_path("/abs/run") == "/abs/run"
  assert paths.resolve_path("gs://bucket/run") == "gs://bucket/run"
  with pytest.raises(ValueError, match="empty path"):
    paths.resolve_path("")


def test_config_args():
  argv = ["egspo.main", "--config", "c.py:tiny", "--config.train.foo=1", "--noconfig.lora.enabled",
          "-config.seed=3", "--workdir=w", "--", "--config.x.y=2"]
  assert main_lib.config_args(argv) == ("c.py:tiny", ["train.foo", "lora.enabled", "seed"])
  assert main_lib.config_args(["m", "--config=a.py"]) == ("a.py", [])
  assert main_lib.config_args(["m", "--workdir=w"]) == (None, [])


# ----------------------------------------------------------------------------------------------
# egspo.main as a user runs it


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
  env.pop("XLA_FLAGS", None)
  return env


def _main(args, cwd, timeout=120, **env):
  return subprocess.run([sys.executable, "-m", "egspo.main", *args], cwd=cwd, env=_env(**env),
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,want", [
    (["--config.train.foo=1"], "error: unknown config field train.foo (known fields of train: "),
    (["--config.trian.foo=1"], "did you mean train?"),
    (["--config.seed=abc"], "error: --config.seed=abc: invalid literal for int()"),
    (["--config.train.eval_every=0"], "error: bad config field train.eval_every=0: "),
    (["--config.optim.learning_rate=inf"], "error: bad config field optim.learning_rate=inf"),
    (["--config.sft.learning_rate=nan"], "error: bad config field sft.learning_rate=nan"),
    (["--workdir="], "error: --workdir='': empty path"),
])
def test_main_one_line_errors(tmp_path, args, want):
  base = [f"--config={REPO}/configs/countdown.py:tiny", "--workdir=w"]
  t0 = time.time()
  r = _main(base + args, tmp_path)
  assert r.returncode == 2, r.stderr
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], r.stderr
  assert time.time() - t0 < 60 and not (tmp_path / "w").exists()  # nothing built or written


def test_main_config_file_errors(tmp_path):
  (tmp_path / "broken.py").write_text("def get_config(:\n")
  for spec, want in [("configs/nope.py", "error: config file configs/nope.py not found"),
                     ("broken.py", "error: config file broken.py failed to load: SyntaxError"),
                     (f"{REPO}/configs/countdown.py:huge", "unknown config variant 'huge'"),
                     (f"{REPO}/configs/countdown.py", "bad config field model.checkpoint=''")]:
    r = _main([f"--config={spec}", "--workdir=w"], tmp_path)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and want in lines[0], (spec, r.stderr)


MICRO = ["--config.sft.steps=2", "--config.sft.checkpoint_every=1", "--config.sft.batch_size=8",
         "--config.sft.warmup_steps=1", "--config.batch.num_prompts=2", "--config.batch.group_size=4",
         "--config.batch.micro_batch_size=8", "--config.rollout.block_length=8",
         "--config.egspo.num_selected_steps=2", "--config.task.num_eval_examples=4",
         "--config.eval.batch_size=4", "--config.train.num_iterations=1",
         "--config.mesh.num_devices=1"]


def test_main_relative_and_home_workdirs(tmp_path):
  """The README's form `--workdir=runs/…` (orbax refuses relative paths) and `~/…`."""
  home = tmp_path / "home"
  r = _main([f"--config={REPO}/configs/copy.py:tiny", "--workdir=runs/rel"] + MICRO, tmp_path,
            timeout=600, HOME=str(home))
  assert r.returncode == 0, r.stderr[-3000:]
  run = tmp_path / "runs" / "rel"
  assert (run / "checkpoints" / "sft" / "2").is_dir() and (run / "history.json").is_file()
  assert f"workdir {run}" in r.stderr
  r = _main([f"--config={REPO}/configs/copy.py:tiny", "--workdir=~/runs/h",
             "--config.train.num_iterations=0", "--config.eval.before_training=False"] + MICRO[:-2],
            tmp_path, timeout=600, HOME=str(home))
  assert r.returncode == 0, r.stderr[-3000:]
  assert (home / "runs" / "h" / "checkpoints" / "sft" / "2").is_dir()


def _catches_sigterm(pid: int) -> bool:
  """Whether the process has a handler for SIGTERM (Linux: SigCgt in /proc/PID/status)."""
  for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
    if line.startswith("SigCgt:"):
      return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
  return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("when", ["imports", "set-up"])
def test_sigterm_during_start_up_exits_0(tmp_path, when):
  """SIGTERM while importing JAX and the trainer (egspo.main's handler), or once set-up has begun
  (model build, compilation, the pre-RL evaluation of 64 problems; train.run's guard)."""
  args = [sys.executable, "-m", "egspo.main", f"--config={REPO}/configs/copy.py:tiny",
          "--workdir=w", "--config.sft.steps=0", "--config.task.num_eval_examples=64",
          "--config.eval.batch_size=4", "--config.mesh.num_devices=1"]
  proc = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 120
    while not _catches_sigterm(proc.pid):
      assert proc.poll() is None and time.time() < deadline, "never installed a SIGTERM handler"
      time.sleep(0.02)
    if when == "set-up":  # the first log line comes after the imports, before the model is built
      line = ""
      while "JAX process" not in line:
        line = proc.stderr.readline()
        assert line or proc.poll() is None, "ended before set-up"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  if when == "imports":  # egspo.main's handler; once train.run starts, its guard takes over
    assert "received SIGTERM before training started" in err, err[-3000:]
  assert not (tmp_path / "w" / "checkpoints" / "rl").exists() or not any(
      (tmp_path / "w" / "checkpoints" / "rl").iterdir())
