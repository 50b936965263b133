"""`QuantizedTensor`: a 4-bit blockwise-quantized array as a JAX pytree.

The array leaves are what a checkpoint stores (formats.md C.1); the static metadata (shape, dtype,
blocksize, quant_type, double_quant) lives in the pytree's aux data, so a `QuantizedTensor` passes
through `jax.jit`, `jax.grad` and Flax NNX state like any other pytree.

Leaves:
- ``packed``: uint8 ``[(n + 1) // 2]``, two codes per byte, element 2k in the high nibble.
- ``absmax``: float32 ``[nblocks]`` (no double quantization) or uint8 ``[nblocks]`` (8-bit codes into
  the dynamic map, with double quantization).
- ``nested_absmax``: float32 ``[ceil(nblocks / 256)]``, double quantization only, else ``None``.
- ``offset``: float32 scalar (the mean subtracted before the 8-bit step), double quantization only.

The code tables (16 values, 256 values) are shared constants (`jaxlora.quant.codebooks`) and are not
counted in ``nbytes``; a checkpoint repeats them per tensor (64 + 1024 bytes).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.quant.codebooks import NESTED_BLOCKSIZE


@jax.tree_util.register_pytree_node_class
class QuantizedTensor:
    """A tensor stored as NF4/FP4 codes with per-block float32 (or double-quantized) scales."""

    __slots__ = ("packed", "absmax", "nested_absmax", "offset", "shape", "dtype", "blocksize", "quant_type")

    def __init__(
        self,
        packed: Any,
        absmax: Any,
        nested_absmax: Any = None,
        offset: Any = None,
        *,
        shape: tuple[int, ...],
        dtype: Any,
        blocksize: int,
        quant_type: str,
    ):
        self.packed = packed
        self.absmax = absmax
        self.nested_absmax = nested_absmax
        self.offset = offset
        self.shape = tuple(int(d) for d in shape)
        self.dtype = jnp.dtype(dtype)
        self.blocksize = int(blocksize)
        self.quant_type = str(quant_type)

    # -- pytree protocol -------------------------------------------------------------------------
    def tree_flatten(self):
        children = (self.packed, self.absmax, self.nested_absmax, self.offset)
        aux = (self.shape, self.dtype, self.blocksize, self.quant_type)
        return children, aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        shape, dtype, blocksize, quant_type = aux
        # Leaves may be tracers, ShapeDtypeStructs or sharding specs here: no validation.
        obj = object.__new__(cls)
        obj.packed, obj.absmax, obj.nested_absmax, obj.offset = children
        obj.shape, obj.dtype, obj.blocksize, obj.quant_type = shape, dtype, blocksize, quant_type
        return obj

    # -- derived facts ---------------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        """True when the block scales are themselves 8-bit quantized (formats.md B.6)."""
        return self.nested_absmax is not None

    @property
    def size(self) -> int:
        """Number of quantized elements ``n``."""
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return -(-self.size // self.blocksize)

    @property
    def nested_nblocks(self) -> int:
        return -(-self.nblocks // NESTED_BLOCKSIZE)

    @property
    def nbytes(self) -> int:
        """Bytes of storage this tensor needs: packed codes plus its statistics (tables excluded)."""
        packed = (self.size + 1) // 2
        if not self.double_quant:
            return packed + 4 * self.nblocks
        return packed + self.nblocks + 4 * self.nested_nblocks + 4

    @property
    def bits_per_parameter(self) -> float:
        """Storage in bits per element: 4.5 at blocksize 64, about 4.127 with double quantization."""
        return 8.0 * self.nbytes / self.size

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"QuantizedTensor(shape={self.shape}, dtype={self.dtype.name}, quant_type={self.quant_type!r}, "
            f"blocksize={self.blocksize}{dq}, {self.bits_per_parameter:.3f} bits/param)"
        )

    def to_numpy(self) -> "QuantizedTensor":
        """The same tensor with numpy leaves (host copies), e.g. for writing to a file."""
        return jax.tree.map(np.asarray, self)
