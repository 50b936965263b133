"""Export a trained adapter: as a PEFT adapter, merged into an HF checkpoint, or merged and stored in
bitsandbytes' pre-quantized NF4 form.

    export("runs/my-run", "peft", "out/adapter")        # the run's adapter/ (best_adapter/ with best=True)
    export("out/adapter", "merged", "out/merged")       # base (from adapter_config.json) + adapter, merged
    export("runs/my-run", "bnb-4bit", "out/nf4")        # merged, then NF4 + double quant as bitsandbytes stores it

The source is a run directory (it holds ``adapter/``) or a PEFT adapter directory. Every export goes
through loading: the adapter is read strictly against the base model's config (a key that matches
nothing, a module without weights or a shape mismatch is an error), so a broken adapter is never
copied on.

A merged export streams (`torch_bridge.merged_checkpoint`): each base tensor is read, merged in float32
if the adapter targets it (a 4-bit base tensor is dequantized first; an adapter trained on a 4-bit
base is merged into the checkpoint's weights, which is what PEFT users do to deploy QLoRA adapters),
cast to the checkpoint's own dtype unless ``dtype`` says otherwise, and written shard by shard: host
memory holds one shard, not the model. The merged checkpoints get the base's tokenizer and generation
files so they load on their own.
"""

from __future__ import annotations

import json
from pathlib import Path

EXPORT_KINDS = ("peft", "merged", "bnb-4bit")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                    "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")


class ExportError(ValueError):
    """The source is not a run or adapter directory, or the base model cannot be found."""


def adapter_dir_of(source, *, best: bool = False) -> Path:
    """The PEFT adapter directory of a run directory or of an adapter directory itself."""
    source = Path(source)
    if (source / "adapter_config.json").is_file():
        return source
    name = "best_adapter" if best else "adapter"
    if (source / name / "adapter_config.json").is_file():
        return source / name
    if not source.exists():
        raise ExportError(f"{source}: no such run or adapter directory")
    raise ExportError(f"{source}: neither a PEFT adapter directory (adapter_config.json) nor a run directory "
                      f"with {name}/adapter_config.json")


def base_model_of(adapter_dir: Path, model: str | None) -> Path:
    if model is None:
        model = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not model:
            raise ExportError(f"{adapter_dir / 'adapter_config.json'}: no base_model_name_or_path; pass the base model")
    from jaxlora.train.trainer import ModelPathError, resolve_model_path

    try:
        return resolve_model_path(model)
    except ModelPathError as err:
        raise ExportError(f"base model {err}") from None


def export(source, kind: str, out, *, model: str | None = None, best: bool = False, dtype: str | None = None,
           max_shard_size: int | str = "5GB") -> Path:
    """Write `source`'s adapter to `out` as `kind` ("peft", "merged" or "bnb-4bit"); returns `out`.

    ``dtype`` ("float32", "bfloat16" or "float16") converts a merged export's tensors (default: each as
    the base checkpoint stores it); ``max_shard_size`` splits it into shards.
    """
    from torch_bridge import save_peft_adapter
    from torch_bridge.checkpoint import read_llama_config, shape_only_llama
    from torch_bridge.checkpoint_writer import parse_size
    from torch_bridge.merged_checkpoint import write_merged_checkpoint
    from torch_bridge.peft import load_peft_adapter

    if kind not in EXPORT_KINDS:
        raise ExportError(f"unknown export kind {kind!r}; expected one of {EXPORT_KINDS}")
    try:
        parse_size(max_shard_size)
    except ValueError as err:
        raise ExportError(str(err)) from None
    adapter_dir = adapter_dir_of(source, best=best)
    base_dir = base_model_of(adapter_dir, model)
    out = Path(out)
    if kind == "peft":
        if dtype is not None:
            raise ExportError("dtype applies to merged exports; a PEFT adapter is written as stored")
        # The adapter needs the base's structure, not its weights.
        peft_model = load_peft_adapter(shape_only_llama(read_llama_config(base_dir)), adapter_dir)
        save_peft_adapter(peft_model, out, base_model_name_or_path=str(base_dir))
        return out
    extra = [base_dir / name for name in _TOKENIZER_FILES if (base_dir / name).is_file()]
    return write_merged_checkpoint(base_dir, adapter_dir, out, dtype=dtype,
                                   quantization="bnb-nf4" if kind == "bnb-4bit" else None, double_quant=True,
                                   max_shard_size=max_shard_size, extra_files=extra, overwrite=True)


__all__ = ["EXPORT_KINDS", "ExportError", "export"]
