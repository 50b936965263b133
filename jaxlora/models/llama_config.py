"""`LlamaConfig`: the fields of a Hugging Face Llama ``config.json`` that the model needs (formats.md E.1)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


class ConfigError(ValueError):
    """A config.json that does not describe a Llama model jaxlora can build."""


_ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama decoder, with transformers' ``LlamaConfig`` names and defaults."""

    vocab_size: int = 32000
    """Rows of the token embedding."""
    hidden_size: int = 4096
    """Width of the residual stream."""
    intermediate_size: int = 11008
    """Width of the SwiGLU MLP."""
    num_hidden_layers: int = 32
    """Decoder layers."""
    num_attention_heads: int = 32
    """Query heads."""
    num_key_value_heads: int | None = None
    """Key/value heads (grouped-query attention); None means num_attention_heads."""
    head_dim: int | None = None
    """Per-head width; None means hidden_size // num_attention_heads."""
    rms_norm_eps: float = 1e-6
    """Epsilon inside RMSNorm's square root."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_type: str = "default"
    """"default" or "llama3" (frequency-dependent scaling)."""
    rope_factor: float = 8.0
    """llama3 scaling: the factor long wavelengths are divided by."""
    rope_low_freq_factor: float = 1.0
    """llama3 scaling: low-frequency boundary factor."""
    rope_high_freq_factor: float = 4.0
    """llama3 scaling: high-frequency boundary factor."""
    rope_original_max_position_embeddings: int = 8192
    """llama3 scaling: context length the model was pre-trained with."""
    max_position_embeddings: int = 2048
    """Longest sequence the model is meant for (informational; positions are not capped)."""
    tie_word_embeddings: bool = False
    """lm_head shares the embedding matrix."""
    attention_bias: bool = False
    """Biases on q/k/v/o projections."""
    mlp_bias: bool = False
    """Biases on gate/up/down projections."""
    hidden_act: str = "silu"
    """MLP activation; only "silu" is supported."""
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads {self.num_key_value_heads}"
            )
        if self.rope_type not in _ROPE_TYPES:
            raise ConfigError(f"rope type {self.rope_type!r} is not supported; expected one of {_ROPE_TYPES}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; expected 'silu'")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @classmethod
    def from_hf_dict(cls, config: dict[str, Any], *, source: str = "config.json") -> "LlamaConfig":
        """Build from a transformers ``config.json`` dict (v5 ``rope_parameters`` or legacy
        ``rope_theta``/``rope_scaling``). Raises `ConfigError` for another architecture."""
        model_type = config.get("model_type")
        if model_type != "llama":
            raise ConfigError(f"{source}: model_type is {model_type!r}; jaxlora builds 'llama' models")
        rope = dict(config.get("rope_parameters") or {})
        if not rope:
            rope = dict(config.get("rope_scaling") or {})
            if "rope_theta" in config:
                rope.setdefault("rope_theta", config["rope_theta"])
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in fields and not k.startswith("rope_")}
        kwargs["rope_theta"] = float(rope.get("rope_theta", 10000.0))
        kwargs["rope_type"] = rope_type
        if rope_type == "llama3":
            try:
                kwargs["rope_factor"] = float(rope["factor"])
                kwargs["rope_low_freq_factor"] = float(rope["low_freq_factor"])
                kwargs["rope_high_freq_factor"] = float(rope["high_freq_factor"])
                kwargs["rope_original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
            except KeyError as err:
                raise ConfigError(f"{source}: llama3 rope parameters lack {err.args[0]!r}") from err
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise ConfigError(f"{source}: {err}") from err

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "LlamaConfig":
        """Read a transformers ``config.json`` file. Raises `ConfigError` naming `path` if it cannot be
        read, is not a JSON object, or does not describe a Llama model (see `from_hf_dict`)."""
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except OSError as err:
            raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from err
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(config, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(config).__name__}")
        return cls.from_hf_dict(config, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict for ``LlamaForCausalLM`` with RoPE in both of transformers' forms.

        transformers 5 reads ``rope_parameters``; readers that know only the legacy keys
        (transformers 4, mlx-lm, converters) read top-level ``rope_theta`` and ``rope_scaling``
        (None, or the llama3 parameters) and would silently fall back to theta 10000 without them.
        """
        scaling: dict[str, Any] | None = None
        if self.rope_type == "llama3":
            scaling = {
                "rope_type": "llama3",
                "factor": self.rope_factor,
                "low_freq_factor": self.rope_low_freq_factor,
                "high_freq_factor": self.rope_high_freq_factor,
                "original_max_position_embeddings": self.rope_original_max_position_embeddings,
            }
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **(scaling or {})}
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("rope_")}
        out.update(architectures=["LlamaForCausalLM"], model_type="llama", rope_parameters=rope,
                   rope_theta=self.rope_theta, rope_scaling=scaling)
        return out
