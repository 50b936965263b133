"""Numerics: NF4/FP4 blockwise 4-bit quantization and 8-bit double quantization (pure JAX)."""

from jaxlora.quant.codebooks import (
    DYNAMIC_MAP,
    FP4_CODE,
    NF4_CODE,
    SUPPORTED_BLOCKSIZES,
    SUPPORTED_QUANT_TYPES,
)
from jaxlora.quant.fourbit import block_scales, dequantize_4bit, quantize_4bit
from jaxlora.quant.tensor import QuantizedTensor

__all__ = [
    "DYNAMIC_MAP",
    "FP4_CODE",
    "NF4_CODE",
    "SUPPORTED_BLOCKSIZES",
    "SUPPORTED_QUANT_TYPES",
    "QuantizedTensor",
    "block_scales",
    "dequantize_4bit",
    "quantize_4bit",
]
