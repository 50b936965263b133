"""jaxlora: LoRA and QLoRA for JAX / Flax NNX, compatible with PEFT and bitsandbytes."""

__version__ = "0.1.0"
