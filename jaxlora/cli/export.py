"""Export a trained adapter: as a PEFT adapter, merged into an HF checkpoint, or merged and stored in
bitsandbytes' pre-quantized NF4 form.

    export("runs/my-run", "peft", "out/adapter")        # the run's adapter/ (best_adapter/ with best=True)
    export("out/adapter", "merged", "out/merged")       # base (from adapter_config.json) + adapter, merged
    export("runs/my-run", "bnb-4bit", "out/nf4")        # merged, then NF4 + double quant as bitsandbytes stores it

The source is a run directory (it holds ``adapter/``) or a PEFT adapter directory. Every export goes
through loading: the adapter is read strictly into the base model (a key that matches nothing, a
module without weights or a shape mismatch is an error), so a broken adapter is never copied on.
A merge happens in float32 on the dense base weights (an adapter trained on a 4-bit base is merged
into the checkpoint's full-precision weights, which is what PEFT users do to deploy QLoRA adapters).
The merged checkpoints get the base's tokenizer and generation files so they load on their own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from jaxlora.atomic import atomic_open

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


def export(source, kind: str, out, *, model: str | None = None, best: bool = False) -> Path:
    """Write `source`'s adapter to `out` as `kind` ("peft", "merged" or "bnb-4bit"); returns `out`."""
    from torch_bridge import load_llama, load_peft_adapter, save_llama, save_peft_adapter

    if kind not in EXPORT_KINDS:
        raise ExportError(f"unknown export kind {kind!r}; expected one of {EXPORT_KINDS}")
    adapter_dir = adapter_dir_of(source, best=best)
    base_dir = base_model_of(adapter_dir, model)
    out = Path(out)
    base = load_llama(base_dir, dtype="float32")
    peft_model = load_peft_adapter(base, adapter_dir)
    if kind == "peft":
        save_peft_adapter(peft_model, out, base_model_name_or_path=str(base_dir))
        return out
    merged = peft_model.merge_and_unload()
    quantization = "bnb-nf4" if kind == "bnb-4bit" else None
    save_llama(merged, out, quantization=quantization, double_quant=True, overwrite=True)
    for name in _TOKENIZER_FILES:
        if (base_dir / name).is_file():
            with open(base_dir / name, "rb") as src, atomic_open(out / name) as dst:
                shutil.copyfileobj(src, dst)
    return out


__all__ = ["EXPORT_KINDS", "ExportError", "export"]
