"""math500: `python -m egspo.main --config=configs/math500.py[:tiny] --workdir=DIR`.

Default: the paper's LLaDA-8B setting (REFERENCE §3.8); ':tiny' is the CPU variant.
"""

from egspo import config as config_lib


def get_config(arg: str = ""):
  return config_lib.base_config("math500", arg)
