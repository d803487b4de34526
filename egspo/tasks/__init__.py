"""Tasks: prompts, answer parsing, rewards and metrics (REFERENCE §5). No JAX in here.

    task = get_task("countdown", number_range=(1, 12), target_range=(1, 150))
    text = task.prompt(example, style="plain")
    r = task.rewards(completions, examples)        # np.ndarray [B]

The interface is documented in `egspo.tasks.base`.
"""

from __future__ import annotations

import importlib

from egspo.tasks.base import Task, extract_answer, last_boxed

# name -> (module, class); imported lazily so a task's optional dependencies load on first use.
_REGISTRY = {
    "countdown": ("egspo.tasks.countdown", "CountdownTask"),
    "sudoku": ("egspo.tasks.sudoku", "SudokuTask"),
    "gsm8k": ("egspo.tasks.gsm8k", "GSM8KTask"),
    "math500": ("egspo.tasks.math500", "Math500Task"),
    "mbpp": ("egspo.tasks.code", "MBPPTask"),
    "humaneval": ("egspo.tasks.code", "HumanEvalTask"),
    "kodcode": ("egspo.tasks.code", "KodCodeTask"),
    # The release's code setting: KodCode training, MBPP + HumanEval evaluation.
    "code": ("egspo.tasks.code", "CodeRLTask"),
    "copy": ("egspo.tasks.copy", "CopyTask"),  # synthetic sanity task (dense reward)
}
_ALIASES = {"math": "math500", "gsm": "gsm8k", "human_eval": "humaneval", "ctd": "countdown"}


def task_names() -> list[str]:
  return sorted(_REGISTRY)


def get_task(name: str, **options) -> Task:
  """The task called `name` (see `task_names()`), built with task-specific `options`
  (e.g. `reference_rewards=True`, generator ranges, `data_path`)."""
  key = _ALIASES.get(name.lower(), name.lower())
  if key not in _REGISTRY:
    raise ValueError(f"unknown task {name!r}; known: {', '.join(task_names())}")
  module, cls = _REGISTRY[key]
  return getattr(importlib.import_module(module), cls)(**options)


__all__ = ["Task", "get_task", "task_names", "extract_answer", "last_boxed"]
