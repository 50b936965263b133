"""jaxlora `QuantizedTensor` <-> bitsandbytes ``(packed, QuantState)``, so either side consumes the other's.

torch and bitsandbytes are imported inside the functions: importing this module needs neither.
The numpy-only serialized form (state-dict keys) is in `torch_bridge.bnb_state`, re-exported here.
"""

from __future__ import annotations

import numpy as np

from jaxlora.quant import DYNAMIC_MAP, QuantizedTensor
from jaxlora.quant.codebooks import CODE_4BIT, NESTED_BLOCKSIZE
from torch_bridge.bnb_state import (
    BnbStateError,
    quant_state_from_arrays,
    quant_state_json,
    quant_state_keys,
    quant_state_to_arrays,
)

__all__ = [
    "BnbStateError",
    "from_bnb",
    "quant_state_from_arrays",
    "quant_state_json",
    "quant_state_keys",
    "quant_state_to_arrays",
    "to_bnb",
]


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def to_bnb(q: QuantizedTensor, device="cpu"):
    """bitsandbytes' form of ``q``: ``(packed uint8 tensor [(n+1)//2, 1], QuantState)`` on ``device``.

    ``bitsandbytes.functional.dequantize_4bit(packed, state)`` and ``Linear4bit`` consume it as if
    bitsandbytes had quantized the weight itself.
    """
    import torch
    from bitsandbytes.functional import QuantState

    def tensor(a, dtype=None):
        return torch.from_numpy(np.array(a, dtype=dtype, copy=True)).to(device)

    packed = tensor(q.packed, np.uint8).reshape(-1, 1)
    code = tensor(CODE_4BIT[q.quant_type])
    common = dict(shape=torch.Size(q.shape), code=code, blocksize=q.blocksize, quant_type=q.quant_type, dtype=_torch_dtype(q.dtype.name))
    if not q.double_quant:
        return packed, QuantState(absmax=tensor(q.absmax, np.float32), **common)
    state2 = QuantState(absmax=tensor(q.nested_absmax, np.float32), code=tensor(DYNAMIC_MAP), blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
    offset = tensor(np.float32(np.asarray(q.offset))).reshape(())
    return packed, QuantState(absmax=tensor(q.absmax, np.uint8), offset=offset, state2=state2, **common)


def from_bnb(packed, quant_state) -> QuantizedTensor:
    """A `QuantizedTensor` holding exactly bitsandbytes' packed codes and statistics.

    Raises:
      BnbStateError: a custom code book, an unsupported blocksize or inconsistent sizes.
    """
    import torch

    def array(t):
        return t.detach().cpu().contiguous().numpy()

    qs = quant_state
    arrays = {
        "weight": array(packed.reshape(-1).view(torch.uint8)),
        "weight.absmax": array(qs.absmax),
        "weight.quant_map": array(qs.code.float()),
    }
    offset = None
    if qs.state2 is not None:
        if qs.state2.blocksize != NESTED_BLOCKSIZE:
            raise BnbStateError(f"QuantState: nested blocksize {qs.state2.blocksize}; only {NESTED_BLOCKSIZE} is supported")
        arrays["weight.nested_absmax"] = array(qs.state2.absmax.float())
        arrays["weight.nested_quant_map"] = array(qs.state2.code.float())
        offset = array(qs.offset.float())
    dtype = str(qs.dtype).removeprefix("torch.")
    text = quant_state_json(qs.quant_type, qs.blocksize, dtype, tuple(qs.shape), offset)
    arrays[f"weight.quant_state.bitsandbytes__{qs.quant_type}"] = np.frombuffer(text, dtype=np.uint8)
    return quant_state_from_arrays(arrays, "weight", source="bitsandbytes QuantState")
