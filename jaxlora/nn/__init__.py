"""Layers: frozen linear (dense and 4-bit) and LoRA / QLoRA as Flax NNX modules."""

from jaxlora.nn.linear import Linear
from jaxlora.nn.linear4bit import Linear4bit, QuantizedWeight, quantized_matmul
from jaxlora.nn.lora import LoraLinear, lora_scaling

__all__ = ["Linear", "Linear4bit", "LoraLinear", "QuantizedWeight", "lora_scaling", "quantized_matmul"]
