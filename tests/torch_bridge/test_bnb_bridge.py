"""jaxlora `QuantizedTensor` <-> bitsandbytes (`torch_bridge.bnb`) and the serialized state (`bnb_state`).

bitsandbytes and torch run on the CPU here; bitsandbytes' own functions (dequantize_4bit, quantize_4bit,
QuantState.as_dict, Linear4bit) are the reference. The numeric 4-bit format itself is checked in
tests/torch_bridge/test_bnb_quantize.py and tests/quant/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import torch  # installed with the "torch" extra; the tests below must not skip
import bitsandbytes as bnb
import bitsandbytes.functional as bnbF

import jax.numpy as jnp

from tests.error_bounds import gamma, unit_roundoff  # noqa: E402
from jaxlora.quant import DYNAMIC_MAP, QuantizedTensor, dequantize_4bit, quantize_4bit
from jaxlora.quant.fourbit import unpack_codes
from torch_bridge.bnb import (
    BnbStateError,
    from_bnb,
    quant_state_from_arrays,
    quant_state_keys,
    quant_state_to_arrays,
    to_bnb,
)

REPO = Path(__file__).resolve().parents[2]
JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
JSON_ORDER = [
    "quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset",
]

# (quant_type, double_quant, dtype, shape, blocksize): odd element counts, several nested blocks, 1-D.
# bitsandbytes' native CPU dequantizer has a vectorised AVX512 path, taken when the last dimension is a
# multiple of 16, that assumes every row holds whole blocks: with last_dim % 16 == 0 but
# last_dim % blocksize != 0 it applies the wrong scales (e.g. shape (30, 96) at blocksize 64; even
# bitsandbytes' own quantize -> dequantize round trip is wrong there). The shapes below avoid it.
CASES = [
    ("nf4", False, "float32", (7, 13), 32),
    ("nf4", True, "bfloat16", (64, 100), 64),  # 100 % 16 != 0: the scalar kernel
    ("nf4", True, "float16", (33, 65), 128),  # odd last dimension: bitsandbytes' generic code
    ("fp4", False, "float16", (33, 65), 128),
    ("fp4", True, "float32", (300, 130), 64),  # 610 blocks -> 3 nested blocks, the last partial
    ("fp4", False, "float32", (24, 256), 64),  # the vectorised kernel, rows of whole blocks
    ("nf4", False, "float16", (24, 256), 128),
    ("fp4", False, "bfloat16", (16, 4096), 4096),  # blocksize >= 2048: generic code on AVX512
    ("nf4", True, "float32", (1001,), 64),  # 1-D, odd
    ("fp4", True, "bfloat16", (4096,), 256),  # 1-D, even: bitsandbytes' CPU kernel returns [1, n]
]
CASE_IDS = [f"{qt}-{'dq' if dq else 'plain'}-{dt}-{'x'.join(map(str, s))}-b{b}" for qt, dq, dt, s, b in CASES]


def weight(shape, dtype, seed=0) -> jnp.ndarray:
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return jnp.asarray(x).astype(JAX_DTYPES[dtype])


def torch_bits(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    view = {2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.view(view).numpy().view({2: np.uint16, 4: np.uint32}[t.element_size()])


def jax_bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def assert_dequantize_equal(q: QuantizedTensor, theirs: torch.Tensor):
    """Bit-for-bit, except the sign of FP4 code 8's zero: jaxlora gives -0.0 like bitsandbytes' CUDA
    kernel and its scalar CPU kernel; its generic PyTorch code (odd last dimension, blocksize >= 2048)
    and its vectorised CPU kernel (last dimension a multiple of 16) give +0.0."""
    assert theirs.numel() == q.size
    theirs_bits = torch_bits(theirs).reshape(-1)
    ours = np.asarray(dequantize_4bit(q))
    assert ours.shape == q.shape and ours.dtype == q.dtype
    ours_bits = jax_bits(ours).reshape(-1)
    differ = np.nonzero(ours_bits != theirs_bits)[0]
    if differ.size:
        assert q.quant_type == "fp4", differ[:5]
        codes = np.asarray(unpack_codes(q.packed, q.size))
        assert np.all(codes[differ] == 8)
        sign = np.uint32(1) << np.uint32(8 * ours.dtype.itemsize - 1)
        assert np.all(ours_bits[differ] == sign) and np.all(theirs_bits[differ] == 0)


def linear4bit(packed, q: QuantizedTensor) -> bnb.nn.Linear4bit:
    """A bitsandbytes Linear4bit holding q, loaded the way transformers loads pre-quantized weights."""
    out_features, in_features = q.shape
    stats = {
        k.removeprefix("weight."): torch.from_numpy(np.array(v))
        for k, v in quant_state_to_arrays(q, "weight").items()
        if k != "weight"
    }
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=False, compute_dtype=torch.float32,
        compress_statistics=q.double_quant, quant_type=q.quant_type, device="cpu",
    )
    layer.weight = bnb.nn.Params4bit.from_prequantized(
        data=packed, quantized_stats=stats, requires_grad=False, device="cpu", module=layer
    )
    return layer


def state_dict_arrays(layer) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in layer.state_dict().items()}


def assert_same_quantized_tensor(a: QuantizedTensor, b: QuantizedTensor):
    assert (a.shape, a.dtype, a.blocksize, a.quant_type, a.double_quant) == (
        b.shape, b.dtype, b.blocksize, b.quant_type, b.double_quant)
    for x, y in zip(a.tree_flatten()[0], b.tree_flatten()[0], strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


# --------------------------------------------------------------------------------------------------
# to_bnb: bitsandbytes consumes jaxlora's quantization
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type,double_quant,dtype,shape,blocksize", CASES, ids=CASE_IDS)
def test_to_bnb_dequantizes_bit_for_bit(quant_type, double_quant, dtype, shape, blocksize):
    q = quantize_4bit(weight(shape, dtype), blocksize=blocksize, quant_type=quant_type,
                      double_quant=double_quant)
    packed, state = to_bnb(q)
    n = q.size
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == ((n + 1) // 2, 1)
    np.testing.assert_array_equal(packed.numpy().reshape(-1), np.asarray(q.packed))
    assert tuple(state.shape) == shape and state.dtype == TORCH_DTYPES[dtype]
    assert state.blocksize == blocksize and state.quant_type == quant_type and state.nested == double_quant
    theirs = bnbF.dequantize_4bit(packed, state)
    assert theirs.dtype == TORCH_DTYPES[dtype]
    assert_dequantize_equal(q, theirs)


@pytest.mark.parametrize(
    "quant_type,double_quant,dtype,shape,blocksize", [c for c in CASES if len(c[3]) == 2],
    ids=[i for c, i in zip(CASES, CASE_IDS) if len(c[3]) == 2],
)
def test_linear4bit_forward_and_state_dict(quant_type, double_quant, dtype, shape, blocksize):
    q = quantize_4bit(weight(shape, dtype, seed=1), blocksize=blocksize, quant_type=quant_type,
                      double_quant=double_quant)
    packed, _ = to_bnb(q)
    layer = linear4bit(packed, q)
    layer.train()  # eval mode on an AVX512-BF16 CPU re-packs the weight (formats.md C.4)
    x = np.random.default_rng(2).standard_normal((5, shape[1])).astype(np.float32)
    y = layer(torch.from_numpy(x)).detach().numpy()
    assert y.dtype == np.float32 and y.shape == (5, shape[0])
    # With compute dtype float32 bitsandbytes dequantizes straight to float32 (table * absmax, not
    # rounded to the weight's dtype): that is dequantize_4bit(q, dtype=float32).
    w = np.asarray(dequantize_4bit(q, dtype=jnp.float32)).astype(np.float64)
    ref = x.astype(np.float64) @ w.T
    scale = np.abs(x.astype(np.float64)) @ np.abs(w).T
    # A float32 dot product of length n, in any order, is within gamma(n) of the sum of |terms|
    # (tests/error_bounds.py); 1e-6 was below that worst case for n > 16.
    bound = gamma(shape[1], unit_roundoff(jnp.float32)) * scale
    assert np.all(np.abs(y - ref) <= bound), np.max(np.abs(y - ref) / scale)

    # The layer's state dict is exactly quant_state_to_arrays: keys, dtypes, shapes and values ...
    sd = state_dict_arrays(layer)
    ours = quant_state_to_arrays(q, "weight")
    assert list(sd) == list(ours) == quant_state_keys("weight", quant_type, double_quant)
    for k in ours:
        assert sd[k].dtype == ours[k].dtype and sd[k].shape == ours[k].shape, k
        np.testing.assert_array_equal(sd[k].view(np.uint8), ours[k].view(np.uint8), err_msg=k)
    # ... and reads back to the same QuantizedTensor.
    assert_same_quantized_tensor(quant_state_from_arrays(sd, "weight"), q)


@pytest.mark.parametrize("quant_type,double_quant,dtype,shape,blocksize", CASES, ids=CASE_IDS)
def test_serialized_form_matches_quant_state_as_dict(quant_type, double_quant, dtype, shape, blocksize):
    q = quantize_4bit(weight(shape, dtype, seed=3), blocksize=blocksize, quant_type=quant_type,
                      double_quant=double_quant)
    _, state = to_bnb(q)
    theirs = {k: v.numpy() for k, v in state.as_dict(packed=True).items()}
    ours = quant_state_to_arrays(q, "model.layers.0.mlp.up_proj.weight")
    prefix = "model.layers.0.mlp.up_proj.weight."
    assert set(ours) == {prefix[:-1]} | {prefix + k for k in theirs}
    for k, v in theirs.items():
        assert ours[prefix + k].dtype == v.dtype and ours[prefix + k].shape == v.shape, k
        np.testing.assert_array_equal(ours[prefix + k].view(np.uint8), v.view(np.uint8), err_msg=k)
    json_key = f"quant_state.bitsandbytes__{quant_type}"
    text = ours[prefix + json_key].tobytes()
    assert text == theirs[json_key].tobytes()
    keys = json.loads(text, object_pairs_hook=lambda pairs: [k for k, _ in pairs])
    assert keys == JSON_ORDER[: 7 if double_quant else 4]
    assert json.loads(text)["shape"] == list(shape)
    # Packed codes: uint8 column vector.
    assert ours[prefix[:-1]].dtype == np.uint8 and ours[prefix[:-1]].shape == ((q.size + 1) // 2, 1)
    # arrays -> QuantizedTensor -> arrays is the identity.
    again = quant_state_to_arrays(quant_state_from_arrays(ours, prefix[:-1]), prefix[:-1])
    assert list(again) == list(ours)
    for k in ours:
        assert again[k].dtype == ours[k].dtype and again[k].shape == ours[k].shape
        np.testing.assert_array_equal(again[k].view(np.uint8), ours[k].view(np.uint8), err_msg=k)


def test_b7_json_bytes():
    # formats.md B.7: the packed JSON of the NF4 + double-quant n = 128 example.
    x = np.zeros(128, np.float32)
    x[0], x[1], x[2], x[64], x[65] = 2.0, -0.5, 0.3, -1.0, 0.25
    q = quantize_4bit(jnp.asarray(x), blocksize=64, quant_type="nf4", double_quant=True)
    text = quant_state_to_arrays(q)["weight.quant_state.bitsandbytes__nf4"].tobytes()
    assert text == (
        b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [128], '
        b'"nested_blocksize": 256, '
        b'"nested_dtype": "float32", "nested_offset": 1.5}'
    )


# --------------------------------------------------------------------------------------------------
# from_bnb: jaxlora consumes bitsandbytes' quantization
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type,double_quant,dtype,shape,blocksize", CASES, ids=CASE_IDS)
def test_from_bnb_of_bitsandbytes_quantization(quant_type, double_quant, dtype, shape, blocksize):
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    t = torch.from_numpy(x).to(TORCH_DTYPES[dtype])
    packed, state = bnbF.quantize_4bit(
        t, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    q = from_bnb(packed, state)
    assert isinstance(q, QuantizedTensor)
    assert (q.shape, q.dtype, q.blocksize, q.quant_type, q.double_quant) == (
        shape, jnp.dtype(JAX_DTYPES[dtype]), blocksize, quant_type, double_quant)
    np.testing.assert_array_equal(np.asarray(q.packed), packed.numpy().reshape(-1))
    assert np.asarray(q.absmax).dtype == state.absmax.numpy().dtype
    np.testing.assert_array_equal(np.asarray(q.absmax).view(np.uint8), state.absmax.numpy().view(np.uint8))
    if double_quant:
        nested, offset = np.asarray(q.nested_absmax), np.asarray(q.offset)
        assert nested.dtype == np.float32 and offset.dtype == np.float32 and offset.shape == ()
        np.testing.assert_array_equal(torch_bits(state.state2.absmax), jax_bits(nested))
        np.testing.assert_array_equal(torch_bits(state.offset.reshape(())), jax_bits(offset))
    else:
        assert q.nested_absmax is None and q.offset is None
    assert_dequantize_equal(q, bnbF.dequantize_4bit(packed, state))
    # And back: to_bnb of it is bitsandbytes' state again.
    packed2, state2 = to_bnb(q)
    assert torch.equal(packed2, packed)
    theirs, again = state.as_dict(packed=True), state2.as_dict(packed=True)
    assert list(again) == list(theirs)
    for k, v in theirs.items():
        np.testing.assert_array_equal(again[k].numpy().view(np.uint8), v.numpy().view(np.uint8), err_msg=k)


def test_from_bnb_rejects_a_nested_blocksize_other_than_256():
    t = torch.randn(64, 64)
    packed, state = bnbF.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=True)
    state.state2.blocksize = 128
    with pytest.raises(BnbStateError, match="nested blocksize 128"):
        from_bnb(packed, state)


# --------------------------------------------------------------------------------------------------
# quant_state_from_arrays errors
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dq_arrays():
    w = weight((40, 100), "bfloat16", seed=5)
    q = quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
    return quant_state_to_arrays(q, "w")  # 4000 elements, 63 blocks


def raises(arrays, *substrings):
    with pytest.raises(BnbStateError) as err:
        quant_state_from_arrays(arrays, "w", source="model.safetensors")
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert msg.startswith("model.safetensors: "), msg
    for s in substrings:
        assert s in msg, (s, msg)
    return msg


def test_valid_arrays_read(dq_arrays):
    q = quant_state_from_arrays(dq_arrays, "w")
    assert q.shape == (40, 100) and q.double_quant and q.dtype == jnp.bfloat16


@pytest.mark.parametrize("key", ["w", "w.absmax"])
def test_missing_key(dq_arrays, key):
    a = dict(dq_arrays)
    del a[key]
    raises(a, "missing keys", repr(key), "'w'")


def test_missing_quant_state_key(dq_arrays):
    a = dict(dq_arrays)
    del a["w.quant_state.bitsandbytes__nf4"]
    raises(a, "expected exactly one", "w.quant_state.bitsandbytes__<nf4|fp4>", "found []")


def test_two_quant_state_keys(dq_arrays):
    a = dict(dq_arrays)
    a["w.quant_state.bitsandbytes__fp4"] = a["w.quant_state.bitsandbytes__nf4"]
    raises(a, "expected exactly one", "w.quant_state.bitsandbytes__nf4", "w.quant_state.bitsandbytes__fp4")


def test_wrong_absmax_shape_and_dtype(dq_arrays):
    a = dict(dq_arrays)
    a["w.absmax"] = dq_arrays["w.absmax"][:-1]
    raises(a, "w.absmax", "shape (62,)", "(63,)", "uint8")
    a["w.absmax"] = dq_arrays["w.absmax"].reshape(63, 1)
    raises(a, "w.absmax", "(63, 1)", "(63,)")
    a["w.absmax"] = dq_arrays["w.absmax"].astype(np.float32)  # float32 scales with nested keys present
    raises(a, "w.absmax", "dtype float32", "expected uint8 (63,)")


def test_wrong_nested_absmax_shape(dq_arrays):
    a = dict(dq_arrays)
    a["w.nested_absmax"] = np.zeros(2, np.float32)
    raises(a, "w.nested_absmax", "(2,)", "(1,)")


def test_wrong_absmax_without_double_quant():
    q = quantize_4bit(weight((10, 10), "float32"), blocksize=32, quant_type="fp4")
    a = quant_state_to_arrays(q, "w")  # 100 elements, 4 blocks
    a["w.absmax"] = a["w.absmax"].astype(np.float16)
    raises(a, "w.absmax", "dtype float16", "expected float32 (4,)")


def test_wrong_packed_size(dq_arrays):
    a = dict(dq_arrays)
    a["w"] = dq_arrays["w"][:-1]
    raises(a, "w holds 1999 bytes", "[40, 100]", "needs 2000")


def test_packed_in_another_storage_dtype_is_read_as_bytes(dq_arrays):
    # quant_storage=bfloat16/float32 checkpoints hold the same bytes viewed as that dtype (B.2 step 7).
    a = dict(dq_arrays)
    a["w"] = dq_arrays["w"].reshape(-1).view(np.float32).reshape(-1, 1)
    assert_same_quantized_tensor(quant_state_from_arrays(a, "w"), quant_state_from_arrays(dq_arrays, "w"))


@pytest.mark.parametrize("text", [b'{"quant_type": "nf4", "blocksize": 64', b"\xff\xfe{}", b""])
def test_malformed_json(dq_arrays, text):
    a = dict(dq_arrays)
    a["w.quant_state.bitsandbytes__nf4"] = np.frombuffer(text, np.uint8)
    raises(a, "w.quant_state.bitsandbytes__nf4", "not valid UTF-8 JSON")


def test_quant_type_mismatch_between_key_and_json(dq_arrays):
    a = dict(dq_arrays)
    a["w.quant_state.bitsandbytes__fp4"] = a.pop("w.quant_state.bitsandbytes__nf4")
    raises(a, "w.quant_state.bitsandbytes__fp4", "quant_type 'nf4'", "matching the key")


@pytest.mark.parametrize("field,value,words", [
    ("blocksize", 48, ["blocksize 48", "4096"]),
    ("dtype", "float64", ["dtype 'float64'", "bfloat16"]),
    ("shape", [], ["shape []", "non-empty"]),
    ("shape", [0, 4], ["shape [0, 4]", "non-empty"]),
    ("quant_type", "int4", ["quant_type 'int4'"]),
])
def test_unsupported_json_fields(dq_arrays, field, value, words):
    a = dict(dq_arrays)
    state = json.loads(a["w.quant_state.bitsandbytes__nf4"].tobytes())
    state[field] = value
    a["w.quant_state.bitsandbytes__nf4"] = np.frombuffer(json.dumps(state).encode(), np.uint8)
    raises(a, "w.quant_state.bitsandbytes__nf4", *words)


def test_missing_nested_offset(dq_arrays):
    a = dict(dq_arrays)
    state = json.loads(a["w.quant_state.bitsandbytes__nf4"].tobytes())
    del state["nested_offset"]
    a["w.quant_state.bitsandbytes__nf4"] = np.frombuffer(json.dumps(state).encode(), np.uint8)
    raises(a, "nested_offset", "None")


def test_non_standard_quant_map(dq_arrays):
    a = dict(dq_arrays)
    a["w.quant_map"] = a["w.quant_map"] * np.float32(0.5)
    raises(a, "w.quant_map", "nf4", "custom code books are not supported")
    # The FP4 table under an NF4 state is just as wrong.
    from jaxlora.quant import FP4_CODE

    a["w.quant_map"] = FP4_CODE.copy()
    raises(a, "w.quant_map", "nf4")


def test_non_standard_nested_quant_map(dq_arrays):
    a = dict(dq_arrays)
    a["w.nested_quant_map"] = np.linspace(-1, 1, 256, dtype=np.float32)
    raises(a, "w.nested_quant_map", "dynamic map")


def test_nested_absmax_without_nested_quant_map(dq_arrays):
    a = dict(dq_arrays)
    del a["w.nested_quant_map"]
    raises(a, "missing keys", "'w.nested_quant_map'")


def test_nested_quant_map_copy_is_the_dynamic_map(dq_arrays):
    # quant_state_to_arrays hands out copies: writing into one does not change the shared table.
    a = quant_state_to_arrays(quant_state_from_arrays(dq_arrays, "w"), "w")
    a["w.nested_quant_map"][0] = 5.0
    a["w.quant_map"][0] = 5.0
    assert DYNAMIC_MAP[0] != 5.0
    assert quant_state_to_arrays(quant_state_from_arrays(dq_arrays, "w"), "w")["w.quant_map"][0] == -1.0


@pytest.mark.parametrize("text", [b"[]", b"null", b'"nf4"'])
def test_json_that_is_not_an_object(dq_arrays, text):
    a = dict(dq_arrays)
    a["w.quant_state.bitsandbytes__nf4"] = np.frombuffer(text, np.uint8)
    raises(a, "w.quant_state.bitsandbytes__nf4", "expected an object")


@pytest.mark.parametrize("shape", [None, ["a", 4], [-40, -100], [], [4.0, 16]])
def test_invalid_json_shape(dq_arrays, shape):
    a = dict(dq_arrays)
    state = json.loads(a["w.quant_state.bitsandbytes__nf4"].tobytes())
    state["shape"] = shape
    a["w.quant_state.bitsandbytes__nf4"] = np.frombuffer(json.dumps(state).encode(), np.uint8)
    raises(a, "w.quant_state.bitsandbytes__nf4", "shape")


def test_non_integer_blocksize(dq_arrays):
    a = dict(dq_arrays)
    state = json.loads(a["w.quant_state.bitsandbytes__nf4"].tobytes())
    state["blocksize"] = 64.0
    a["w.quant_state.bitsandbytes__nf4"] = np.frombuffer(json.dumps(state).encode(), np.uint8)
    raises(a, "w.quant_state.bitsandbytes__nf4", "blocksize")


# --------------------------------------------------------------------------------------------------
# Import hygiene
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "modules",
    ["torch_bridge.bnb_state, torch_bridge.bnb, torch_bridge, torch_bridge.merged_checkpoint", "jaxlora, jaxlora.quant, jaxlora.nn"],
)
def test_import_does_not_import_torch(modules):
    code = (
        f"import sys, {modules}; "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
