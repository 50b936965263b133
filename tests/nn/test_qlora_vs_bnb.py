"""QLoRA (Linear4bit + LoraLinear) against bitsandbytes Linear4bit + PEFT LoRA, same quantized weight.

Both sides compute the base product as ``x @ dequantize(W_q)^T`` in the compute dtype; the weights
are bit-identical (to_bnb), so in fp32 the only differences are summation order: bound 1e-6
relative. With bf16 compute, both round x and W to bf16 and accumulate differently; the bound is a
few bf16 ulps (2**-8 = 3.9e-3 relative) of the output scale: 2e-2.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora.nn import Linear4bit, LoraLinear
from jaxlora.quant import block_scales, quantize_4bit
from jaxlora.quant.fourbit import unpack_codes
from tests.helpers import assert_rel_close

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
            assert_rel_close(layer._weight_norm("default"), m, 1e-6, "DoRA initial magnitude")
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
    rel = 1e-6 if compute_dtype == jnp.float32 else 2e-2
    assert_rel_close(out_j, out_t, rel, "forward")
    assert_rel_close(dx, xt.grad, rel, "dL/dx")
    assert_rel_close(grads["lora_A"]["default"][...], proj.lora_A["default"].weight.grad, rel, "dL/dA")
    assert_rel_close(grads["lora_B"]["default"][...], proj.lora_B["default"].weight.grad, rel, "dL/dB")
    if lora.get("use_dora"):
        assert_rel_close(grads["lora_magnitude_vector"]["default"][...], proj.lora_magnitude_vector["default"].weight.grad, rel, "dL/dm")


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
    # Re-quantization error is 4-bit error: the merged forward is close, not equal.
    assert_rel_close(layer(x), before, 0.1, "merged forward")
    layer.unmerge()
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(before))

    layer.merge(requantize=False)
    np.testing.assert_array_equal(np.asarray(layer.base.weight[...]), merged_dense)
