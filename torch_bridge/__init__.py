"""torch_bridge: jaxlora <-> the Hugging Face stack (bitsandbytes 4-bit state, PEFT, transformers).

Importing this package does not import torch: file formats are handled with numpy and safetensors;
torch is imported only by the functions that build torch objects (`torch_bridge.bnb.to_bnb`, ...).
"""

from torch_bridge.checkpoint import CheckpointError, load_llama
from torch_bridge.checkpoint_writer import save_llama

__all__ = ["CheckpointError", "load_llama", "save_llama"]

from torch_bridge.peft import AdapterFileError, load_peft_adapter, save_peft_adapter  # noqa: E402

__all__ += ["AdapterFileError", "load_peft_adapter", "save_peft_adapter"]
