"""code: `python -m egspo.main --config=configs/code.py[:tiny] --workdir=DIR`.

Task 'code', the release's code setting (REFERENCE §5): trains on KodCode-Light-RL-10K (the
release's 90% split, seed 42; `--config.task.train_file=` a local copy in the HF layout) and
evaluates on MBPP (sanitized test, 257) and HumanEval (164), interleaved; both are also
`python -m egspo.eval --task mbpp|humaneval`. Default: the paper's LLaDA-8B setting
(REFERENCE §3.8); ':tiny' is the CPU variant.
"""

from egspo import config as config_lib


def get_config(arg: str = ""):
  c = config_lib.base_config("code", arg)
  c.task.num_eval_examples = 257 + 164  # all of MBPP's sanitized test set and HumanEval
  # Many KodCode prompts exceed the 200-token window: keep their start (template, instructions)
  # and end instead of the release's left cut (':reference' keeps the release's 'left').
  if arg != "reference":
    c.task.prompt_truncation = "middle"
  return c
