"""RL post-training: the method registry (`registry`) and the built-in methods, registered on
import (`algorithms`: EGSPO / EGSPO-SA; `baselines`: diffu-GRPO, ESPO, GDPO, StableDRL, wd1)."""

from egspo.rl import algorithms, baselines  # noqa: F401  (registers the built-in methods)
