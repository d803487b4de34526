"""sudoku: `python -m egspo.main --config=configs/sudoku.py[:tiny] --workdir=DIR`.

Default: the paper's LLaDA-8B setting (REFERENCE §3.8); ':tiny' is the CPU variant.
"""

from egspo import config as config_lib


def get_config(arg: str = ""):
  return config_lib.base_config("sudoku", arg)
