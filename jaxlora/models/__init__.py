"""Models: the Llama decoder."""

from jaxlora.models.llama import KVCache, LlamaForCausalLM, count_parameters
from jaxlora.models.llama_config import ConfigError, LlamaConfig

__all__ = ["ConfigError", "KVCache", "LlamaConfig", "LlamaForCausalLM", "count_parameters"]
