"""egspo: RL post-training of diffusion language models (LLaDA) in JAX/Flax."""

__version__ = "0.1.0"
