"""jaxlora: LoRA and QLoRA for JAX / Flax NNX, compatible with PEFT and bitsandbytes."""

from jaxlora.peft import LoraConfig, PeftModel, get_peft_model, merge_and_unload

__version__ = "0.1.0"

__all__ = ["LoraConfig", "PeftModel", "get_peft_model", "merge_and_unload"]
