"""Adapters with PEFT's names and semantics: config, target matching, modules_to_save, the adapted model."""

from jaxlora.adapters.model import *  # noqa: F403
from jaxlora.adapters.model import __all__  # noqa: F401
