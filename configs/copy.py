"""copy: a synthetic sanity task (repeat a digit string; dense reward) for smoke tests of the RL
plumbing: `python -m egspo.main --config=configs/copy.py:tiny --workdir=DIR`."""

from egspo import config as config_lib


def get_config(arg: str = ""):
  return config_lib.base_config("copy", arg)
