"""Adapters with PEFT's names and semantics.

- `config`: `LoraConfig` (PEFT's fields and defaults; what jaxlora implements, ignores, refuses);
- `matching`: which modules get LoRA or a modules_to_save copy (PEFT's rules on module paths);
- `modules_to_save`: the per-adapter trainable copies of whole modules (`tied`: with tied embeddings);
- `model`: `get_peft_model`, `PeftModel` (named adapters, counting, merge/unload).
"""

from jaxlora.adapters.config import AdapterError, LoraConfig
from jaxlora.adapters.matching import target_names
from jaxlora.adapters.model import (PeftModel, get_peft_model, get_submodule, merge_and_unload, planned_parameter_counts,
                                   set_submodule)
from jaxlora.adapters.modules_to_save import ModulesToSaveParam, ModulesToSaveWrapper

__all__ = ["AdapterError", "LoraConfig", "ModulesToSaveParam", "ModulesToSaveWrapper", "PeftModel", "get_peft_model",
           "get_submodule", "merge_and_unload", "planned_parameter_counts", "set_submodule", "target_names"]
