"""A PEFT adapter merged into its base checkpoint, written one tensor at a time (no torch).

    W' = W + s B A                                          LoRA (s = lora_alpha / r, or / sqrt(r) with rsLoRA)
    W' = (m / ||W + s B A||_row)[:, None] * (W + s B A)       DoRA (m: the adapter's magnitude vector)
    b' = b + s b_B                                            lora_bias (PEFT's bias on lora_B)

Each base tensor is read from the safetensors files when the writer reaches it; if the adapter
targets it, it is merged in float32 (a bitsandbytes 4-bit tensor is dequantized to float32 first),
then cast to the output dtype (default: the tensor's own) and, for a bitsandbytes output, quantized.
Host memory holds one shard of the output and the adapter, never the model.

The adapter is loaded by `load_peft_adapter` itself, into a model of the base's config whose weights
take no memory (`shape_only_llama`): it is checked exactly as when loaded into the real model (every
key matches a module, every targeted module has weights, shapes agree). Each merge is that model's own
`LoraLinear.merged_weight`, given the one real base weight it needs, so the numbers are those of
``merge_and_unload`` on the fully loaded model, bit for bit in float32.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.nn import LoraLinear
from jaxlora.quant import QuantizedTensor, dequantize_4bit, quantize_4bit
from torch_bridge.bnb_state import parse_quant_state_json
from torch_bridge.checkpoint import (
    DTYPES,
    QUANTIZABLE,
    SafetensorsReader,
    check_all_used,
    parameter_shapes,
    read_llama_config,
    read_parameter,
    shape_only_llama,
    stored_4bit,
    stored_keys,
)
from torch_bridge.checkpoint_writer import (
    TensorGroup,
    check_write_options,
    dense_group,
    hf_config,
    quantized_group,
    write_checkpoint,
)
from torch_bridge.peft import PREFIX, AdapterFileError, adapter_tensors, load_peft_adapter

# The adapter tensors of a LoRA layer that the merge folds in; any other one (a newer PEFT option)
# is refused rather than dropped.
_MERGED_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector")


def write_merged_checkpoint(base_dir, adapter_dir, out, *, dtype: str | None = None, quantization: str | None = None,
                            double_quant: bool = True, blocksize: int = 64, max_shard_size: int | str = "5GB",
                            extra_files: Iterable[Path] = (), overwrite: bool = False) -> Path:
    """Write base checkpoint ``base_dir`` with the PEFT adapter of ``adapter_dir`` merged in, to ``out``.

    Args:
      base_dir: Hugging Face Llama directory (dense, or bitsandbytes pre-quantized 4-bit).
      adapter_dir: PEFT LoRA adapter directory made for that base.
      out: output directory, written in a temporary sibling and renamed into place.
      dtype: "float32", "bfloat16" or "float16" for every tensor; default: each tensor's own dtype
        (a 4-bit tensor's original dtype).
      quantization: None, or "bnb-nf4" / "bnb-fp4": store the decoder projections in bitsandbytes'
        pre-quantized form (with ``double_quant`` and ``blocksize``), quantized from the merged
        weight in the output dtype.
      max_shard_size: shard above this size (default "5GB").
      extra_files: files copied into ``out`` (e.g. the tokenizer's).
      overwrite: replace an existing non-empty ``out``.

    Raises:
      AdapterFileError / CheckpointError / ConfigError naming the file, key and shapes.
    """
    check_write_options(dtype, quantization)
    base_dir = Path(base_dir)
    config = read_llama_config(base_dir)
    reader = SafetensorsReader(base_dir)
    shapes = parameter_shapes(config)
    used = {k for key in shapes for k in stored_keys(key, reader.__contains__)}
    check_all_used(str(base_dir), reader.keys(), used, config)
    peft_model = load_peft_adapter(shape_only_llama(config), adapter_dir)
    layers, replacements = _split_adapter(peft_model, shapes, Path(adapter_dir))

    merge = _Merge(reader, shapes, layers, replacements, dtype, str(base_dir))
    quant_type = None if quantization is None else quantization.split("-")[1]
    settings = dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    config_dtype = np.dtype(merge.output_dtype("model.embed_tokens.weight")).name
    groups = merge.groups(settings if quant_type else None)
    return write_checkpoint(out, hf_config(config, config_dtype, quantization, double_quant), groups,
                            max_shard_size=max_shard_size, overwrite=overwrite, extra_files=extra_files)


def _split_adapter(peft_model, shapes: dict, adapter_dir: Path) -> tuple[dict[str, LoraLinear], dict[str, np.ndarray]]:
    """``({weight or bias key: LoRA layer}, {base key: modules_to_save value})`` of the active adapter.

    A layer with a lora_B bias is listed under its base bias key too; a base without that bias cannot
    take it (PEFT refuses that merge too).
    """
    name = peft_model.active_adapter
    modules = {module: layer for module, layer in peft_model.lora_layers().items() if name in layer.lora_A}
    merged = {f"{module}.weight": layer for module, layer in modules.items()}
    for module, layer in modules.items():
        if name in layer.lora_B_bias:
            if f"{module}.bias" not in shapes:
                raise AdapterFileError(f"{adapter_dir}: '{PREFIX}{module}.lora_B.bias' (lora_bias) cannot be merged: the "
                                       f"base module {module} has no bias (out_features={layer.out_features}); export "
                                       "the adapter with --peft instead")
            merged[f"{module}.bias"] = layer
    replacements = {}
    for key, value in adapter_tensors(peft_model, name).items():
        module_key = key[len(PREFIX):]
        module = next((m for m in modules if module_key.startswith(m + ".")), None)
        if module is not None:
            if module_key[len(module) + 1:] not in _MERGED_SUFFIXES:
                raise AdapterFileError(f"{adapter_dir}: '{key}' cannot be merged by this export (it merges "
                                       f"{', '.join(_MERGED_SUFFIXES)}); export the adapter with --peft instead")
            continue
        if module_key not in shapes:
            raise AdapterFileError(f"{adapter_dir}: modules_to_save tensor '{key}' has no base parameter '{module_key}'")
        replacements[module_key] = value
    return merged, replacements


class _Merge:
    """The output tensors of a merged export, each computed from the base checkpoint on demand."""

    def __init__(self, reader: SafetensorsReader, shapes: dict, layers: dict, replacements: dict, dtype, source: str):
        self.reader, self.shapes, self.layers, self.replacements = reader, shapes, layers, replacements
        self.target = None if dtype is None else np.dtype(DTYPES[dtype])
        self.source = source
        self._dtypes: dict[str, np.dtype] = {}

    def output_dtype(self, key: str) -> np.dtype:
        """The dtype ``key`` is written in: the requested one, else as stored (a 4-bit tensor's original)."""
        if self.target is not None:
            return self.target
        if key not in self._dtypes:
            if stored_4bit(key, self.reader.__contains__):
                json_key = stored_keys(key, self.reader.__contains__)[-1]
                state = parse_quant_state_json(self.reader.get(json_key), json_key, source=self.source)
                self._dtypes[key] = np.dtype(jnp.dtype(state["dtype"]))
            else:
                self._dtypes[key] = self.reader.stored_dtype(key)
        return self._dtypes[key]

    def groups(self, settings: dict | None) -> Iterator[TensorGroup]:
        """One group per parameter, in state-dict order; ``settings`` quantize the decoder projections."""
        for key, shape in self.shapes.items():
            if settings is None or not QUANTIZABLE.match(key):
                yield dense_group(key, shape, self.output_dtype(key), lambda key=key: self.dense(key))
            else:
                yield quantized_group(key, shape, lambda key=key: self.quantized(key, settings))

    def stored(self, key: str) -> np.ndarray | QuantizedTensor:
        return read_parameter(key, self.shapes[key], self.reader.get, self.reader.__contains__, source=self.source)

    def quantized(self, key: str, settings: dict) -> QuantizedTensor:
        """Output tensor ``key`` in 4 bits: a base tensor stored with these settings and not changed by
        the adapter or a dtype is copied as it is; anything else is quantized from `dense`."""
        stored = self.stored(key)
        unchanged = key not in self.layers and key not in self.replacements and self.target is None
        if unchanged and isinstance(stored, QuantizedTensor) and (stored.quant_type, stored.blocksize, stored.double_quant) == (
                settings["quant_type"], settings["blocksize"], settings["double_quant"]):
            return stored
        return quantize_4bit(self.dense(key, stored), **settings, name=key)

    def dense(self, key: str, stored: np.ndarray | QuantizedTensor | None = None) -> np.ndarray:
        """Output tensor ``key``: merged if an adapter targets it, a modules_to_save copy, or the base's."""
        out_dtype = self.output_dtype(key)
        if key in self.replacements:
            return np.asarray(self.replacements[key]).astype(out_dtype)
        stored = self.stored(key) if stored is None else stored
        layer = self.layers.get(key)
        if layer is None:
            if isinstance(stored, QuantizedTensor):
                stored = np.asarray(dequantize_4bit(jax.device_put(stored)))
            return stored.astype(out_dtype, copy=False)
        if isinstance(stored, QuantizedTensor):
            value = dequantize_4bit(jax.device_put(stored), jnp.float32)
        else:
            value = jnp.asarray(stored).astype(jnp.float32)
        if key.endswith(".bias"):
            return np.asarray(_merged(layer, "bias", value, layer.merged_bias)).astype(out_dtype)
        return np.asarray(_merged(layer, "weight", value, layer.merged_weight)).astype(out_dtype)


def _merged(layer: LoraLinear, which: str, value: jax.Array, merge) -> jax.Array:
    """``merge()`` (the layer's merged_weight or merged_bias) with ``value`` (float32) as the base's
    ``which`` ("weight" or "bias") for this one call: the shape-only base holds stand-ins."""
    variable = getattr(layer.base, which)
    stand_in = variable.get_value()
    variable.set_value(value)
    try:
        return merge()
    finally:
        variable.set_value(stand_in)


__all__ = ["write_merged_checkpoint"]
