"""PEFT's names for jaxlora's adapters: `LoraConfig`, `get_peft_model`, `PeftModel` (see `jaxlora.adapters`)."""

from jaxlora.adapters import *  # noqa: F403
from jaxlora.adapters import __all__  # noqa: F401
