"""`LoraConfig`: every field of PEFT 0.21's ``LoraConfig`` (same names, same defaults), and what jaxlora
does with each.

Each key PEFT writes to adapter_config.json is a field here, in one of three classes:

- implemented (`IMPLEMENTED`): the LoRA math and the matching rules, exactly as PEFT.
- metadata (`METADATA`): names, versions and bookkeeping that change no number.
- unsupported (`UNSUPPORTED`): options that change the numbers (a different forward pass, base weights
  changed at initialisation, other trainable tensors) and that jaxlora does not implement. Setting one
  to anything but its default is an `AdapterError` naming the option: an adapter made with it must
  never be run as plain LoRA.

Validation follows ``LoraConfig.__post_init__`` of PEFT: ``layers_to_transform`` / ``layers_pattern``
with a string ``target_modules`` and ``layers_pattern`` without ``layers_to_transform`` are errors, as
are ``lora_bias`` with DoRA or with an initialisation other than True/False.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# PEFT's per-architecture default targets (transformers' Llama): q_proj and v_proj.
DEFAULT_TARGETS = ("q_proj", "v_proj")
INIT_METHODS = (True, False, "gaussian")
"""``init_lora_weights`` values jaxlora implements; PEFT's others (pissa, olora, loftq, eva, corda,
lora_ga, orthogonal, mica) change the base weights or what trains."""

IMPLEMENTED = ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform",
               "layers_pattern", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "init_lora_weights",
               "bias", "modules_to_save", "lora_bias", "fan_in_fan_out", "use_qalora", "ensure_weight_tying")
"""Fields whose every supported value jaxlora computes as PEFT does. ``bias`` only as "none",
``fan_in_fan_out`` and ``use_qalora`` only as False (PEFT itself resets fan_in_fan_out to False for
``nn.Linear``, so a Llama adapter never carries True); ``ensure_weight_tying`` changes nothing unless a
modules_to_save module is tied (checked when the adapter is injected)."""
METADATA = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "megatron_core", "qalora_group_size")
"""Fields that change no number (``megatron_core`` is read only with ``megatron_config``,
``qalora_group_size`` only with ``use_qalora``)."""
UNSUPPORTED = {
    "megatron_config": "LoRA on Megatron's parallel linear layers",
    "trainable_token_indices": "trainable rows of the embedding (TrainableTokens)",
    "loftq_config": "LoftQ: the base weights were re-quantized to fit the adapter",
    "eva_config": "EVA data-driven initialisation (with rank redistribution)",
    "corda_config": "CorDA: the base weights were replaced by a residual at initialisation",
    "lora_ga_config": "LoRA-GA: the base weights were changed at initialisation",
    "velora_config": "VeLoRA: a different backward pass",
    "alora_invocation_tokens": "activated LoRA: the adapter runs only from the invocation tokens on",
    "monteclora_config": "MonteCLoRA: sampled adapter weights",
    "layer_replication": "decoder layers repeated to build a deeper model",
    "target_parameters": "LoRA on bare parameters (MoE experts)",
    "use_bdlora": "block-diagonal LoRA factors",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "KaSA: the base weights were truncated by an SVD",
}
"""Fields that change the numbers and that jaxlora does not implement -> what each one does."""


class AdapterError(ValueError):
    """An adapter configuration that cannot be applied to the model."""


@dataclasses.dataclass
class LoraConfig:
    """PEFT's ``LoraConfig`` (0.21): the same fields and defaults (``runtime_config`` aside, which PEFT
    does not save). See the module docstring for what jaxlora implements."""

    r: int = 8
    """Rank of the update."""
    target_modules: list[str] | str | None = None
    """Exact names or ``.``-suffixes, a regex (full match on the module path), "all-linear" (every linear
    layer except the output layer), or None for the architecture default (q_proj, v_proj)."""
    exclude_modules: list[str] | str | None = None
    """Modules never targeted: a regex (full match) or names / ``.``-suffixes."""
    lora_alpha: float = 8
    """Scaling numerator: scaling = lora_alpha / r (or / sqrt(r) with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    fan_in_fan_out: bool = False
    """Weights stored [in, out] (GPT-2's Conv1D); False for Llama (PEFT resets it for nn.Linear)."""
    bias: str = "none"
    """Base biases that train: only "none" is supported."""
    use_rslora: bool = False
    """Scaling lora_alpha / sqrt(r)."""
    modules_to_save: list[str] | None = None
    """Modules trained in full, one copy per adapter, saved with the adapter (e.g. ["lm_head"]); a module
    is chosen when its path ends with an entry (PEFT's plain string suffix test)."""
    init_lora_weights: bool | str = True
    """True (A kaiming-uniform, B = 0), "gaussian" (A ~ N(0, 1/r), B = 0) or False (B random: not a no-op)."""
    layers_to_transform: int | list[int] | None = None
    """Only these decoder layer indices (list targets only; an exact full name in target_modules is not filtered)."""
    layers_pattern: str | list[str] | None = None
    """Name(s) of the layer list in module paths; None or "" accept any ``x.<name>.<N>.`` segment."""
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    """{pattern: r} overrides, first match wins: re.match(r"(.*\\.)?(" + pattern + r")$", name)."""
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    """{pattern: lora_alpha} overrides, same matching."""
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: Any = None
    loftq_config: dict = dataclasses.field(default_factory=dict)
    eva_config: Any = None
    corda_config: Any = None
    lora_ga_config: Any = None
    use_dora: bool = False
    """Weight-decomposed LoRA (a trainable magnitude per output row)."""
    velora_config: Any = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Any = None
    layer_replication: list | None = None
    lora_bias: bool = False
    """A trainable bias on lora_B ``[out]`` (zero at init, scaled with the update); merging adds
    ``scaling * bias`` to the base bias (a base without bias cannot be merged)."""
    target_parameters: list[str] | None = None
    use_bdlora: Any = None
    arrow_config: Any = None
    kasa_config: Any = None
    ensure_weight_tying: bool = False
    """Tied layers share one modules_to_save copy; jaxlora refuses tied modules_to_save with it."""
    task_type: str | None = None
    """PEFT task type (e.g. "CAUSAL_LM"); informational."""
    base_model_name_or_path: str | None = None
    """Where the base model came from; written to adapter_config.json."""
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self):
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple, frozenset)):
                setattr(self, name, sorted(value))
        if isinstance(self.init_lora_weights, str) and self.init_lora_weights.lower() == "gaussian":
            self.init_lora_weights = "gaussian"  # PEFT compares in lower case
        self._check_supported()
        for where, r in [("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
                raise AdapterError(f"{where} must be a positive integer (the LoRA rank), got {r!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise AdapterError("layers_to_transform cannot be used when target_modules is a str (a regex); "
                               f"got target_modules={self.target_modules!r}, layers_to_transform={self.layers_to_transform!r}")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise AdapterError("layers_pattern cannot be used when target_modules is a str (a regex); "
                               f"got target_modules={self.target_modules!r}, layers_pattern={self.layers_pattern!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise AdapterError(f"layers_pattern={self.layers_pattern!r} needs layers_to_transform (the layer indices to adapt)")
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise AdapterError(f"lora_bias=True needs init_lora_weights True or False, got {self.init_lora_weights!r}")
        if self.lora_bias and self.use_dora:
            raise AdapterError("lora_bias=True cannot be combined with use_dora=True (as in PEFT)")

    def _check_supported(self) -> None:
        problems = [f"{name}={getattr(self, name)!r} ({what})" for name, what in UNSUPPORTED.items() if getattr(self, name)]
        if self.init_lora_weights not in INIT_METHODS:
            problems.append(f"init_lora_weights={self.init_lora_weights!r} (an initialisation that changes the base "
                            f"weights or what trains; jaxlora implements {list(INIT_METHODS)})")
        if self.bias != "none":
            problems.append(f"bias={self.bias!r} (base biases that train; jaxlora trains none: bias='none')")
        if self.fan_in_fan_out:
            problems.append("fan_in_fan_out=True (weights stored [in, out], as GPT-2's Conv1D; Llama's are [out, in])")
        if self.use_qalora:
            problems.append("use_qalora=True (QA-LoRA: pooled LoRA input for GPTQ bases)")
        if problems:
            raise AdapterError("adapter options that change the numbers and that jaxlora does not implement: "
                               + "; ".join(problems))

    def replace(self, **changes) -> LoraConfig:
        """A copy with ``changes`` applied (and validated again)."""
        return dataclasses.replace(self, **changes)


__all__ = ["AdapterError", "DEFAULT_TARGETS", "IMPLEMENTED", "INIT_METHODS", "LoraConfig", "METADATA", "UNSUPPORTED"]
