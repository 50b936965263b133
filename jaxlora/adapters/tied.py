"""Tied input and output embeddings under ``modules_to_save``, as PEFT handles them.

A tied jaxlora Llama has no output-layer module: its logits read ``model.embed_tokens.weight``.
transformers' tied model has an ``lm_head`` module holding the same parameter, and PEFT's
modules_to_save copies break the tie:

- a copy of ``embed_tokens``: the input runs the copy, ``lm_head`` keeps the original (PEFT warns);
- a copy of ``lm_head``: the output runs the copy, ``embed_tokens`` keeps the original.

(``ensure_weight_tying=True`` ties both to one copy instead; jaxlora refuses that.) jaxlora does the
same with an explicit output layer whose weight is the very variable of the input embedding
(`untie_output`), made before either module is wrapped, and removed again (`restore_tie`) when no
copy is left. Its logits are those of the tied path: both compute ``linear_matmul(hidden, weight)``.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from jaxlora.adapters.modules_to_save import ModulesToSaveWrapper
from jaxlora.nn import Linear

INPUT_EMBEDDING = "model.embed_tokens"
OUTPUT_LAYER = "lm_head"


def ties_embeddings(model: nnx.Module) -> bool:
    """Whether the model's config ties the output layer to the input embedding."""
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def pending_output_layer(model: nnx.Module) -> list[str]:
    """``["lm_head"]`` for a tied model without an output-layer module (modules_to_save can select it:
    `untie_output` makes it), else ``[]``."""
    return [OUTPUT_LAYER] if ties_embeddings(model) and getattr(model, OUTPUT_LAYER, 0) is None else []


def _embedding(model: nnx.Module) -> nnx.Module:
    embed = model.model.embed_tokens
    return embed.original_module if isinstance(embed, ModulesToSaveWrapper) else embed


def untie_output(model: nnx.Module) -> None:
    """Give a tied model an explicit ``lm_head`` holding the input embedding's weight variable itself."""
    if not pending_output_layer(model):
        return
    embedding = _embedding(model)
    head = Linear.from_weight(embedding.weight.get_value())
    head.weight = embedding.weight
    model.lm_head = head


def restore_tie(model: nnx.Module) -> None:
    """Remove the explicit ``lm_head`` of `untie_output` once neither side is wrapped."""
    head = getattr(model, OUTPUT_LAYER, None)
    if (ties_embeddings(model) and type(head) is Linear and not isinstance(model.model.embed_tokens, ModulesToSaveWrapper)
            and head.weight is model.model.embed_tokens.weight):
        model.lm_head = None


def settle_after_merge(model: nnx.Module) -> None:
    """After merge_and_unload: the tie back if both sides kept the original, else an untied config."""
    restore_tie(model)
    if ties_embeddings(model) and getattr(model, OUTPUT_LAYER, None) is not None:
        model.config = dataclasses.replace(model.config, tie_word_embeddings=False)


__all__ = ["INPUT_EMBEDDING", "OUTPUT_LAYER", "pending_output_layer", "restore_tie", "settle_after_merge",
           "ties_embeddings", "untie_output"]
