"""QLoRA (Linear4bit + LoraLinear) against bitsandbytes Linear4bit + PEFT LoRA, same quantized weight.

Both sides compute the base product as ``x @ dequantize(W_q)^T`` in the compute dtype; the weights
are bit-identical (to_bnb), so each side is compared with the exact output and gradients of the same
layer (tests/nn/lora_reference.py, with W the dequantized weight), within its float32 rounding bound.
With bf16 compute, each side also rounds to bfloat16 (u = 2^-8, see `bfloat16_bounds`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora.nn import Linear4bit, LoraLinear
from jaxlora.quant import NF4_CODE, block_scales, dequantize_4bit, quantize_4bit
from jaxlora.quant.fourbit import unpack_codes
from tests.error_bounds import assert_within, exact, gamma, unit_roundoff
from tests.helpers import assert_rel_close
from tests.nn.lora_reference import exact_and_magnitudes, float32_roundoff, row_norms

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

from torch_bridge.bnb import from_bnb, to_bnb  # noqa: E402

TORCH_DTYPE = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16}


class _Tiny(torch.nn.Module):
    is_loaded_in_4bit = True  # what transformers sets on a 4-bit model; PEFT then wraps Linear4bit layers

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def bnb_qlora(q, bias, compute_dtype, device, **lora_kwargs):
    out_f, in_f = q.shape
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=TORCH_DTYPE[compute_dtype],
                            quant_type=q.quant_type, compress_statistics=q.double_quant)
    packed, state = to_bnb(q, device=device)
    lin.weight = bnb.nn.Params4bit(data=packed, requires_grad=False, quant_state=state, blocksize=q.blocksize,
                                   compress_statistics=q.double_quant, quant_type=q.quant_type, bnb_quantized=True, module=lin)
    if bias is not None:
        lin.bias = torch.nn.Parameter(torch.tensor(np.asarray(bias), device=device), requires_grad=False)
    lin = lin.to(device)
    torch.manual_seed(0)
    config = peft.LoraConfig(target_modules=["proj"], init_lora_weights=False, **lora_kwargs)
    model = peft.get_peft_model(_Tiny(lin), config)
    proj = model.base_model.model.proj
    assert isinstance(proj, peft.tuners.lora.bnb.Linear4bit)
    return model, proj


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("compute_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("lora", [dict(r=8, lora_alpha=16), dict(r=4, lora_alpha=8, use_dora=True)], ids=["lora", "dora"])
def test_qlora_matches_bitsandbytes_and_peft(quant_type, double_quant, compute_dtype, lora, torch_device):
    in_f, out_f = 128, 96
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((out_f, in_f)) * 0.05).astype(np.float32)
    bias = (rng.standard_normal(out_f) * 0.1).astype(np.float32)
    q = quantize_4bit(jnp.asarray(w), quant_type=quant_type, double_quant=double_quant)
    model, proj = bnb_qlora(q, bias, compute_dtype, torch_device, **lora)
    layer = LoraLinear(Linear4bit(q, jnp.asarray(bias), compute_dtype=compute_dtype), init_lora_weights=False, rngs=nnx.Rngs(0), **lora)
    layer.lora_A["default"][...] = jnp.asarray(proj.lora_A["default"].weight.detach().cpu().numpy())
    layer.lora_B["default"][...] = jnp.asarray(proj.lora_B["default"].weight.detach().cpu().numpy())
    if lora.get("use_dora"):
        m = proj.lora_magnitude_vector["default"].weight.detach().cpu().numpy()
        if compute_dtype == jnp.float32:
            # Both: the row norm of W + s B A in float32. Each element of W + s B A is an r-term product,
            # scaled and added (r + 2 roundings); its square and the in-term sum of squares add in + 1; the
            # square root halves the relative error and rounds once: within gamma(in + r + 4) of the
            # norm of |W| + s |B| |A| (the same on absolute values), for either side.
            a, b = (exact(t.weight) for t in (proj.lora_A["default"], proj.lora_B["default"]))
            w_exact, s = exact(layer.base.dense_weight(jnp.float32)), layer.scaling["default"]
            norm = np.linalg.norm(w_exact + s * b @ a, axis=1)
            magnitude = np.linalg.norm(np.abs(w_exact) + s * np.abs(b) @ np.abs(a), axis=1)
            bound = gamma(in_f + 8 + 4, unit_roundoff(jnp.float32)) * magnitude
            assert_within(layer._weight_norm("default"), norm, bound, "DoRA initial magnitude (jaxlora)", sharp=1e-4)
            assert_within(m, norm, bound, "DoRA initial magnitude (PEFT)", sharp=1e-4)
        else:
            # PEFT's DoRA init on a bf16-compute 4-bit layer forms B @ A in bf16 (jaxlora keeps float32):
            # its magnitude is exactly ||W + s * bf16(bf16(B) @ bf16(A))||_row.
            a, b = (t.detach().cpu().to(torch.bfloat16) for t in (proj.lora_A["default"].weight, proj.lora_B["default"].weight))
            w = torch.tensor(np.asarray(layer.base.dense_weight(jnp.float32)), device="cpu")
            expected = torch.linalg.norm(w + layer.scaling["default"] * (b @ a).float(), dim=1)
            assert_rel_close(expected, m, 1e-6, "PEFT's bf16 DoRA initial magnitude")
        layer.lora_magnitude_vector["default"][...] = jnp.asarray(m)

    x = rng.standard_normal((2, 5, in_f)).astype(np.float32)
    g = rng.standard_normal((2, 5, out_f)).astype(np.float32)
    model.train()  # bitsandbytes' CPU eval-mode path repacks weights (formats.md C.4); train mode is the QLoRA case
    xt = torch.tensor(x, device=torch_device, requires_grad=True)
    out_t = model(xt)
    (out_t.float() * torch.tensor(g, device=torch_device)).sum().backward()

    def loss(model, x):
        return jnp.sum(model(x).astype(jnp.float32) * jnp.asarray(g))

    out_j = layer(jnp.asarray(x))
    grads, dx = nnx.grad(loss, argnums=(nnx.DiffState(0, nnx.LoRAParam), 1))(layer, jnp.asarray(x))
    ours = {"output": out_j, "dL/dx": dx, "dL/dA": grads["lora_A"]["default"][...], "dL/dB": grads["lora_B"]["default"][...]}
    theirs = {"output": out_t, "dL/dx": xt.grad, "dL/dA": proj.lora_A["default"].weight.grad,
              "dL/dB": proj.lora_B["default"].weight.grad}
    if lora.get("use_dora"):
        ours["dL/dm"] = grads["lora_magnitude_vector"]["default"][...]
        theirs["dL/dm"] = proj.lora_magnitude_vector["default"].weight.grad
    weights = dict(w=np.asarray(layer.base.dense_weight(jnp.float32)), bias=bias, a=proj.lora_A["default"].weight,
                   b=proj.lora_B["default"].weight, scaling=layer.scaling["default"],
                   m=np.asarray(layer.lora_magnitude_vector["default"][...]) if lora.get("use_dora") else None)
    magnitudes = exact_and_magnitudes(x, g, **weights)
    relative = float32_roundoff(x, weights["w"], weights["a"])
    extra = bfloat16_bounds(x, g, magnitudes, **weights) if compute_dtype == jnp.bfloat16 else {}
    expected = {name: (value, relative * magnitude + extra.get(name, 0.0))
                for name, (value, magnitude) in magnitudes.items()}
    # float32: rounding bounds of ~1e-3 of the scale at most. bfloat16: rounding x to 8 bits before a
    # 128-term product moves it by up to 2^-8 sum |x_i W_i|, ~10x |x W^T| for random data: the bounds
    # reach 20% of the scale (40% for DoRA's dL/dm, a sum of such products over the tokens); the
    # float32 runs check the formulas, these check that bfloat16 compute stays within its rounding.
    sharp = 1e-3 if compute_dtype == jnp.float32 else 0.5
    for name, (value, bound) in expected.items():
        assert_within(ours[name], value, bound, f"{name} (jaxlora)", sharp=sharp)
        assert_within(theirs[name], value, bound, f"{name} (PEFT + bitsandbytes)", sharp=sharp)


def bfloat16_bounds(x, g, magnitudes, *, w, bias, a, b, scaling, m):
    """What bfloat16 compute adds to the float32 bounds, per output (u = 2^-8, exact values in float64).

    Forward: x and W rounded before the base product (2u |x||W|^T), its result and the bias addition
    (u |x W^T| + u |x W^T + b|), the LoRA branch cast and the sum (u |lora| + u |y|); DoRA: the base
    output without its bias (u |x W^T|) and PEFT's norms of a bfloat16 W (u |m/n| (|x W^T| + |lora|)).
    Gradients: the bfloat16 output's cotangent g is rounded (u of each gradient's magnitude p~), DoRA's
    norms again (u p~); dL/dx's base product rounds W and its result (2u |g||W|); DoRA's dL/dm sees the
    forward's base output errors (x and W: 2u |x||W|^T; the product, the bias added and taken off:
    u (2 |x W^T| + |x W^T + b|)) times |g| / n, summed over the tokens.
    """
    u = unit_roundoff(jnp.bfloat16)
    dora = m is not None
    x, g, w, a, b = (exact(v) for v in (x, g, w, a, b))
    bias = exact(bias)
    xw_magnitude, xw = np.abs(x) @ np.abs(w).T, x @ w.T
    lora = scaling * (x @ a.T) @ b.T
    y = magnitudes["output"][0]
    extra = {"output": u * (2 * xw_magnitude + np.abs(xw) + np.abs(xw + bias) + np.abs(lora) + np.abs(y))}
    for name in ("dL/dx", "dL/dA", "dL/dB", "dL/dm"):
        if name in magnitudes:
            extra[name] = (1 + dora) * u * magnitudes[name][1]
    extra["dL/dx"] = extra["dL/dx"] + 2 * u * np.abs(g) @ np.abs(w)
    if dora:
        norms = row_norms(w, a, b, scaling)
        scale = np.abs(exact(m)) / norms
        extra["output"] = extra["output"] + u * (np.abs(xw) + scale * (np.abs(xw) + np.abs(lora)))
        tokens = (-1, g.shape[-1])
        base_error = u * (2 * xw_magnitude + 2 * np.abs(xw) + np.abs(xw + bias)).reshape(tokens)
        extra["dL/dm"] = extra["dL/dm"] + np.sum(np.abs(g).reshape(tokens) * base_error, axis=0) / norms
    return extra


def test_merge_on_4bit_base_requantizes_like_peft():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((64, 128)) * 0.05).astype(np.float32)
    q = quantize_4bit(jnp.asarray(w), double_quant=True)
    model, proj = bnb_qlora(q, None, jnp.float32, "cpu", r=4, lora_alpha=8)
    layer = LoraLinear(Linear4bit(q, compute_dtype=jnp.float32), r=4, lora_alpha=8, init_lora_weights=False, rngs=nnx.Rngs(0))
    layer.lora_A["default"][...] = jnp.asarray(proj.lora_A["default"].weight.detach().numpy())
    layer.lora_B["default"][...] = jnp.asarray(proj.lora_B["default"].weight.detach().numpy())
    x = jnp.asarray(rng.standard_normal((3, 128)).astype(np.float32))
    before = layer(x)
    merged_dense = np.asarray(layer.merged_weight())

    layer.merge()  # requantize=True, like PEFT
    assert isinstance(layer.base, Linear4bit) and layer.base.quantized.double_quant
    proj.merge()
    theirs_q = from_bnb(proj.base_layer.weight.data, proj.base_layer.weight.quant_state)
    ours_q = layer.base.quantized
    # The same merged weight quantized again: the 4-bit codes agree except where a merged value lies
    # within float rounding (PEFT adds in another order) of a threshold.
    codes_equal = np.mean(np.asarray(unpack_codes(ours_q.packed, ours_q.size)) == np.asarray(unpack_codes(theirs_q.packed, theirs_q.size)))
    assert codes_equal > 0.999, codes_equal
    # The block scales agree to the double-quantization step (8-bit codes are chosen differently on CPU, B.6.2).
    assert_rel_close(block_scales(ours_q), block_scales(theirs_q), 1e-2, "re-quantized block scales")
    # Re-quantization error is 4-bit error: each merged weight is rounded to the nearest NF4 code of its
    # block, at most half the code book's largest gap times the block's absmax away, and the block's
    # absmax is itself stored as an 8-bit code (its error is measured from the stored scale).
    merged = merged_dense.astype(np.float64).reshape(-1, q.blocksize)
    absmax = np.abs(merged).max(axis=1, keepdims=True)
    scale_error = np.abs(np.asarray(block_scales(ours_q), np.float64)[:, None] - absmax)
    per_weight = np.broadcast_to(np.diff(np.sort(NF4_CODE)).max() / 2 * absmax + scale_error, merged.shape)
    per_weight = per_weight.reshape(merged_dense.shape)
    requantized = np.asarray(dequantize_4bit(ours_q, jnp.float32), np.float64)
    assert np.all(np.abs(requantized - merged_dense) <= per_weight * (1 + 1e-6)), "a weight is not at a nearest code"
    # And the merged layer computes with that weight: x W_q^T within float32 rounding (a 128-term product).
    x64 = np.asarray(x, np.float64)
    bound = gamma(128, unit_roundoff(jnp.float32)) * (np.abs(x64) @ np.abs(requantized).T)
    assert_within(layer(x), x64 @ requantized.T, bound, "merged forward", sharp=1e-4)
    layer.unmerge()
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(before))

    layer.merge(requantize=False)
    np.testing.assert_array_equal(np.asarray(layer.base.weight[...]), merged_dense)
