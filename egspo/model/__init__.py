"""The LLaDA policy: Flax NNX model and presets, LoRA adapters, checkpoint loading and export."""

from egspo.model.llada import LLaDA, ModelConfig, get_config, init_model
from egspo.model.lora import apply_lora, merge_lora
from egspo.model.pretrained import export_hf, from_pretrained, save_pretrained_orbax

__all__ = ["LLaDA", "ModelConfig", "get_config", "init_model", "apply_lora", "merge_lora",
           "from_pretrained", "save_pretrained_orbax", "export_hf"]
