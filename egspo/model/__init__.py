"""The LLaDA policy: Flax NNX model, presets, and HF ⇄ orbax checkpoint conversion."""

from egspo.model.convert import export_hf, from_pretrained, save_pretrained_orbax
from egspo.model.llada import LLaDA, ModelConfig, get_config, init_model
from egspo.hub import resolve_checkpoint

__all__ = ["LLaDA", "ModelConfig", "get_config", "init_model", "from_pretrained",
           "save_pretrained_orbax", "export_hf", "resolve_checkpoint"]

from egspo.model.lora import apply_lora, merge_lora  # noqa: E402  (LoRA adapters, issue 2/4)

__all__ += ["apply_lora", "merge_lora"]
