"""The README's commands, as written: the set-up block parses into the two commands CI runs, and
every "Using it" example that needs no checkpoint (`--preset`, `--generations`) runs literally,
in order, from a fresh directory (a `--generations` file that no earlier example writes is
written here first, in d1's layout, at the path the README names)."""

import importlib.util
import json
import os
import pathlib
import shlex
import subprocess

import pytest

from egspo.tasks import get_task

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("readme_commands", ROOT / "scripts" / "readme_commands.py")
readme = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme)


def test_setup_block_is_install_and_run_then_tests():
  first, tests = readme.setup_commands()
  assert first.startswith("pip install -c requirements/constraints.txt -e ")
  assert "python -m egspo.main --config=configs/countdown.py:tiny --workdir=" in first
  assert tests == "python -m pytest -n 2"


def test_parser_joins_continuations_and_drops_comments():
  text = ("## Set-up\n\n```bash\nA && B\nC\n```\n\n## Using it\n\n```bash\n# c\n"
          "python -m egspo.eval --x 1 \\\n    --y 2   # trailing\nls\n```\n")
  assert readme.setup_commands(text) == ["A && B", "C"]
  assert readme.usage_commands(text) == ["python -m egspo.eval --x 1 --y 2"]


def _flag(argv, name):
  return argv[argv.index(name) + 1] if name in argv else None


def _write_d1_file(path: pathlib.Path, task_name: str) -> None:
  task = get_task(task_name)
  try:
    examples = task.load_examples("test")[:3]
  except (OSError, ValueError):  # no test file here: generated problems of the same layout
    import numpy as np
    rng = np.random.default_rng(0)
    examples = [task.sample_example(rng) for _ in range(3)]
  items = [{"question": task.question(ex), "generations": "<answer>\nnot solved\n</answer>",
            "ground_truth": task.ground_truth(ex)} for ex in examples]
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"generations": items, "gen_length": 256}, default=list))


def _runnable():
  cmds = [c for c in readme.usage_commands() if "--preset" in c or "--generations" in c]
  return cmds


def test_readme_has_checkpoint_free_examples():
  cmds = _runnable()
  assert any("egspo.generate" in c and "--preset" in c for c in cmds), cmds
  assert any("egspo.eval" in c and "--preset" in c for c in cmds), cmds
  assert any("egspo.eval" in c and "--generations" in c for c in cmds), cmds


def test_readme_examples_run_as_written(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  for cmd in _runnable():
    argv = shlex.split(cmd)
    gens = _flag(argv, "--generations")
    if gens and not (tmp_path / gens).exists():
      _write_d1_file(tmp_path / gens, _flag(argv, "--task"))
    proc = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{cmd}\n{proc.stderr[-3000:]}"
    if "--json" in argv or "egspo.eval" in cmd:
      json.loads(proc.stdout[proc.stdout.index("{"):])  # machine-readable output
    out = _flag(argv, "--output")
    if out:
      assert (tmp_path / os.path.expanduser(out)).exists(), f"{cmd} wrote no {out}"
