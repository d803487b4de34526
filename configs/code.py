"""code: `python -m egspo.main --config=configs/code.py[:tiny] --workdir=DIR`.

Trains on KodCode-Light-RL-10K (task 'kodcode'; REFERENCE §5); MBPP and HumanEval are the
held-out sets (`python -m egspo.eval --task mbpp|humaneval`). Default: the paper's LLaDA-8B
setting (REFERENCE §3.8); ':tiny' is the CPU variant.
"""

from egspo import config as config_lib


def get_config(arg: str = ""):
  return config_lib.base_config("kodcode", arg)
