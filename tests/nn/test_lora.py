"""LoraLinear against PEFT's lora.Linear: forward and gradients (fp32), rsLoRA, DoRA, lora_bias,
dropout, initialisation, merge / unmerge, and parameter selection by type."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora.nn import Linear, LoraLinear
from tests.error_bounds import assert_within, exact, gamma, unit_roundoff
from tests.nn.lora_reference import exact_and_bounds

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


class _Tiny(torch.nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


class _FixedMask(torch.nn.Module):
    """Stands in for PEFT's dropout with a given (already scaled) mask, to compare train-mode runs."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask if self.training else x


def peft_layer(base: torch.nn.Module, **lora_kwargs):
    torch.manual_seed(0)
    config = peft.LoraConfig(target_modules=["proj"], init_lora_weights=False, **lora_kwargs)
    model = peft.get_peft_model(_Tiny(base), config)
    return model, model.base_model.model.proj


def jax_copy(peft_proj, base, **lora_kwargs) -> LoraLinear:
    """A LoraLinear with PEFT's exact weights."""
    layer = LoraLinear(base, init_lora_weights=False, rngs=nnx.Rngs(params=1, dropout=123), **lora_kwargs)
    layer.lora_A["default"][...] = jnp.asarray(peft_proj.lora_A["default"].weight.detach().numpy())
    layer.lora_B["default"][...] = jnp.asarray(peft_proj.lora_B["default"].weight.detach().numpy())
    if layer.use_dora["default"]:
        layer.lora_magnitude_vector["default"][...] = jnp.asarray(peft_proj.lora_magnitude_vector["default"].weight.detach().numpy())
    if layer.lora_bias["default"]:
        layer.lora_B_bias["default"][...] = jnp.asarray(peft_proj.lora_B["default"].bias.detach().numpy())
    return layer


def torch_linear(in_f, out_f, bias, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    base = Linear.from_weight(jnp.asarray(lin.weight.detach().numpy()), None if not bias else jnp.asarray(lin.bias.detach().numpy()))
    return lin, base


def peft_weights(lin: torch.nn.Linear, proj) -> dict:
    """The weights of a PEFT layer as `lora_reference.exact_and_bounds` takes them."""
    def numpy(t):  # a copy: PEFT's merge changes the base weight in place
        return None if t is None else t.detach().numpy().copy()

    dora = "default" in proj.lora_magnitude_vector
    return dict(w=numpy(lin.weight), bias=numpy(lin.bias), a=numpy(proj.lora_A["default"].weight),
                b=numpy(proj.lora_B["default"].weight), scaling=proj.scaling["default"],
                m=numpy(proj.lora_magnitude_vector["default"].weight) if dora else None,
                b_bias=numpy(proj.lora_B["default"].bias))


def assert_both_match_exact(ours: dict, theirs: dict, expected: dict, what: str = "") -> None:
    """jaxlora's and PEFT's values each within the float32 rounding bound of the exact value: then they
    agree with each other to twice that (tests/nn/lora_reference.py)."""
    assert ours.keys() == theirs.keys() == expected.keys()
    for name, (value, bound) in expected.items():
        label = f"{what} {name}".strip()
        assert_within(ours[name], value, bound, f"{label} (jaxlora)", sharp=1e-3)
        assert_within(theirs[name], value, bound, f"{label} (PEFT)", sharp=1e-3)


def grads_jax(layer: LoraLinear, x, g):
    def loss(model, x):
        return jnp.sum(model(x) * g)

    return nnx.grad(loss, argnums=(nnx.DiffState(0, nnx.LoRAParam), 1))(layer, x)


VARIANTS = [
    dict(r=4, lora_alpha=12),
    dict(r=8, lora_alpha=16, use_rslora=True),
    dict(r=4, lora_alpha=8, use_dora=True),
    dict(r=2, lora_alpha=5, use_rslora=True, use_dora=True),
    dict(r=4, lora_alpha=6, lora_bias=True),
]


@pytest.mark.parametrize("kwargs", VARIANTS, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()))
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_gradients_match_peft(kwargs, bias):
    in_f, out_f = 48, 40
    lin, base = torch_linear(in_f, out_f, bias)
    model, proj = peft_layer(lin, **kwargs)
    layer = jax_copy(proj, base, **kwargs)
    assert layer.scaling["default"] == pytest.approx(proj.scaling["default"], rel=1e-15)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, in_f)).astype(np.float32)
    g = rng.standard_normal((3, 5, out_f)).astype(np.float32)

    xt = torch.tensor(x, requires_grad=True)
    out_t = model(xt)
    (out_t * torch.tensor(g)).sum().backward()
    out_j = layer(jnp.asarray(x))
    param_grads, x_grad = grads_jax(layer, jnp.asarray(x), jnp.asarray(g))
    ours = {"output": out_j, "dL/dx": x_grad, "dL/dA": param_grads["lora_A"]["default"][...],
            "dL/dB": param_grads["lora_B"]["default"][...]}
    theirs = {"output": out_t, "dL/dx": xt.grad, "dL/dA": proj.lora_A["default"].weight.grad,
              "dL/dB": proj.lora_B["default"].weight.grad}
    if kwargs.get("use_dora"):
        ours["dL/dm"] = param_grads["lora_magnitude_vector"]["default"][...]
        theirs["dL/dm"] = proj.lora_magnitude_vector["default"].weight.grad
    elif kwargs.get("lora_bias"):
        assert np.abs(proj.lora_B["default"].bias.detach().numpy()).max() > 0  # init False: a random bias
        ours["dL/db_B"] = param_grads["lora_B_bias"]["default"][...]
        theirs["dL/db_B"] = proj.lora_B["default"].bias.grad
    else:
        assert set(param_grads.keys()) == {"lora_A", "lora_B"} and "default" in param_grads["lora_A"]
    assert_both_match_exact(ours, theirs, exact_and_bounds(x, g, **peft_weights(lin, proj)))


@pytest.mark.parametrize("use_dora", [False, True])
def test_train_mode_dropout_matches_peft_with_the_same_mask(use_dora):
    in_f, out_f, p = 32, 24, 0.3
    lin, base = torch_linear(in_f, out_f, bias=True)
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=p, use_dora=use_dora)
    model, proj = peft_layer(lin, **kwargs)
    layer = jax_copy(proj, base, **kwargs)
    x = np.random.default_rng(1).standard_normal((6, in_f)).astype(np.float32)
    # The mask our layer will draw: the same dropout stream (seed 123), first call.
    dropped = nnx.Dropout(p, rngs=nnx.Rngs(dropout=123))(jnp.ones_like(jnp.asarray(x)))
    layer.train()
    out_j = layer(jnp.asarray(x))
    assert not np.allclose(np.asarray(dropped), 1.0)
    proj.lora_dropout["default"] = _FixedMask(torch.tensor(np.asarray(dropped)))
    model.train()
    out_t = model(torch.tensor(x))
    g = np.ones((6, out_f), np.float32)  # only the outputs are compared here
    weights = peft_weights(lin, proj)
    train = exact_and_bounds(x, g, mask=np.asarray(dropped), **weights)["output"]
    assert_both_match_exact({"output": out_j}, {"output": out_t}, {"output": train}, "train-mode forward with dropout")
    layer.eval()
    model.eval()
    evaluation = exact_and_bounds(x, g, **weights)["output"]
    assert_both_match_exact({"output": layer(jnp.asarray(x))}, {"output": model(torch.tensor(x))}, {"output": evaluation},
                            "eval-mode forward (dropout off)")
    assert not np.allclose(np.asarray(layer(jnp.asarray(x))), np.asarray(out_j))


def test_merge_with_hand_picked_weights():
    w = jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, -1.0]])  # [out=3, in=2]
    layer = LoraLinear(Linear.from_weight(w), r=1, lora_alpha=2, rngs=nnx.Rngs(0))  # scaling 2
    layer.lora_A["default"][...] = jnp.array([[1.0, 2.0]])
    layer.lora_B["default"][...] = jnp.array([[1.0], [0.0], [-0.5]])
    # W + 2 * B A = W + 2 * [[1, 2], [0, 0], [-0.5, -1]]
    expected = jnp.array([[3.0, 4.0], [0.0, 2.0], [2.0, -3.0]])
    x = jnp.array([[1.0, 1.0], [2.0, -1.0]])
    before = layer(x)
    layer.merge()
    np.testing.assert_array_equal(np.asarray(layer.base.weight[...]), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(x @ expected.T))
    np.testing.assert_array_equal(np.asarray(before), np.asarray(x @ expected.T))
    layer.unmerge()
    np.testing.assert_array_equal(np.asarray(layer.base.weight[...]), np.asarray(w))
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize("variant", ["lora", "dora", "lora_bias"])
def test_merge_matches_peft_and_unmerge_restores_exactly(variant):
    lin, base = torch_linear(40, 24, bias=True, seed=3)
    kwargs = dict(r=4, lora_alpha=8, use_dora=variant == "dora", lora_bias=variant == "lora_bias")
    model, proj = peft_layer(lin, **kwargs)
    layer = jax_copy(proj, base, **kwargs)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((7, 40)).astype(np.float32))
    unmerged_out = layer(x)
    w0 = np.asarray(layer.base.weight[...]).copy()
    weights = peft_weights(lin, proj)
    layer.merge()
    merged_t = model.merge_and_unload().proj
    # The merged weight W + s B A (DoRA: times m / ||W + s B A||_row), exactly; its float32 evaluation in
    # any order is within gamma(D) of the same on absolute values (lora_reference), with D counting the
    # r-term product, the scaling and the sum, and for DoRA the norm over ``in``, the square root, the
    # division and the product: D = 2 (in + r) + 10 covers both.
    a, b, w = (exact(weights[k]) for k in ("a", "b", "w"))
    s = weights["scaling"]
    merged_exact, merged_magnitude = w + s * b @ a, np.abs(w) + s * np.abs(b) @ np.abs(a)
    if variant == "dora":
        scale = exact(weights["m"])[:, None] / np.linalg.norm(merged_exact, axis=1)[:, None]
        merged_exact, merged_magnitude = scale * merged_exact, scale * merged_magnitude
    merged_bound = gamma(2 * (40 + 4) + 10, unit_roundoff(jnp.float32)) * merged_magnitude
    # The merged bias b + s b_B (lora_bias; else b itself): two roundings.
    bias, bias_magnitude = exact(weights["bias"]), np.abs(exact(weights["bias"]))
    if variant == "lora_bias":
        bias, bias_magnitude = bias + s * exact(weights["b_bias"]), bias_magnitude + s * np.abs(exact(weights["b_bias"]))
    bias_bound = gamma(2, unit_roundoff(jnp.float32)) * bias_magnitude
    assert_both_match_exact({"merged weight": layer.base.weight[...], "merged bias": layer.base.bias[...]},
                            {"merged weight": merged_t.weight.detach().numpy(), "merged bias": merged_t.bias.detach().numpy()},
                            {"merged weight": (merged_exact, merged_bound), "merged bias": (bias, bias_bound)})
    # The merged forward x W'^T + b' against the exact output: the merged weight's and bias's bounds carried
    # through, plus the product's own gamma(in + 1); the unmerged output within the layer's bound.
    output, output_bound = exact_and_bounds(x, np.ones((7, 24)), **weights)["output"]
    merged_forward_bound = (np.abs(exact(x)) @ merged_bound.T + bias_bound[None, :]
                            + gamma(40 + 1, unit_roundoff(jnp.float32)) * (np.abs(exact(x)) @ merged_magnitude.T
                                                                           + bias_magnitude[None, :]))
    assert_within(layer(x), output, merged_forward_bound, "merged forward", sharp=1e-3)
    assert_within(unmerged_out, output, output_bound, "unmerged forward", sharp=1e-3)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    layer.unmerge()
    np.testing.assert_array_equal(np.asarray(layer.base.weight[...]).view(np.uint32), w0.view(np.uint32))
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(unmerged_out))


def test_initialisation_follows_peft():
    in_f, out_f, r = 256, 128, 16
    base = Linear(in_f, out_f, rngs=nnx.Rngs(0))
    default = LoraLinear(base, r=r, rngs=nnx.Rngs(1))
    a = np.asarray(default.lora_A["default"][...])
    bound = 1 / math.sqrt(in_f)  # kaiming_uniform(a=sqrt(5)) on [r, in]
    assert np.all(np.abs(a) <= bound) and np.abs(a).max() > 0.95 * bound
    assert np.std(a) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert not np.any(np.asarray(default.lora_B["default"][...]))
    x = jnp.ones((2, in_f))
    np.testing.assert_array_equal(np.asarray(default(x)), np.asarray(base(x)))  # a no-op at init

    gaussian = LoraLinear(base, r=r, init_lora_weights="gaussian", rngs=nnx.Rngs(2))
    assert np.std(np.asarray(gaussian.lora_A["default"][...])) == pytest.approx(1 / r, rel=0.05)
    assert not np.any(np.asarray(gaussian.lora_B["default"][...]))

    random_b = LoraLinear(base, r=r, init_lora_weights=False, rngs=nnx.Rngs(3))
    b = np.asarray(random_b.lora_B["default"][...])
    assert np.all(np.abs(b) <= 1 / math.sqrt(r)) and np.std(b) == pytest.approx(1 / math.sqrt(r) / math.sqrt(3), rel=0.05)

    dora = LoraLinear(base, r=r, use_dora=True, rngs=nnx.Rngs(4))
    # B = 0: m = ||W||_row, a sum of 256 positive squares (relative error gamma(257) in float32) and a square
    # root (halves it, rounds once): within gamma(258) of the exact norm.
    norms = np.linalg.norm(exact(base.weight[...]), axis=1)
    assert_within(dora.lora_magnitude_vector["default"][...], norms, gamma(in_f + 2, unit_roundoff(jnp.float32)) * norms,
                  "DoRA initial magnitude", sharp=1e-4)


def test_lora_parameters_are_selected_by_type():
    base = Linear(64, 32, use_bias=True, rngs=nnx.Rngs(0))
    layer = LoraLinear(base, r=8, rngs=nnx.Rngs(1))
    lora_state = nnx.state(layer, nnx.LoRAParam)
    count = sum(v.size for v in jax.tree.leaves(lora_state))
    assert count == 8 * (64 + 32)
    all_params = sum(v.size for v in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    assert all_params == count + 64 * 32 + 32  # LoRAParam is a Param subtype; the base is selectable for full FT

    import optax

    optimizer = nnx.Optimizer(layer, optax.sgd(0.1), wrt=nnx.LoRAParam)
    w_before = np.asarray(base.weight[...]).copy()
    x = jnp.ones((4, 64))

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)

    b_before = np.asarray(layer.lora_B["default"][...]).copy()
    step(layer, optimizer)
    np.testing.assert_array_equal(np.asarray(layer.base.weight[...]), w_before)  # frozen
    assert not np.array_equal(np.asarray(layer.lora_B["default"][...]), b_before)  # trained


def test_bad_arguments_raise():
    base = Linear(8, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank r"):
        LoraLinear(base, r=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="lora_dropout"):
        LoraLinear(base, r=2, lora_dropout=1.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoraLinear(base, r=2, init_lora_weights="pissa", rngs=nnx.Rngs(0))


def test_named_adapters_add_set_disable_delete():
    base = Linear(16, 8, rngs=nnx.Rngs(0))
    layer = LoraLinear(base, r=2, init_lora_weights=False, rngs=nnx.Rngs(1))
    layer.add_adapter("other", r=4, lora_alpha=16, init_lora_weights=False, rngs=nnx.Rngs(2))
    assert layer.adapter_names == ["default", "other"] and layer.active_adapter == "default"
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32))

    def expected(name):
        a, b = layer.lora_A[name][...], layer.lora_B[name][...]
        return base(x) + layer.scaling[name] * (x @ a.T) @ b.T

    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(expected("default")), rtol=1e-6)
    layer.set_adapter("other")
    assert layer.scaling["other"] == 4.0
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(expected("other")), rtol=1e-6)
    layer.disable_adapters = True
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(base(x)))
    layer.disable_adapters = False
    with pytest.raises(ValueError, match="is active"):
        layer.delete_adapter("other")
    layer.set_adapter("default")
    layer.delete_adapter("other")
    assert layer.adapter_names == ["default"] and "other" not in layer.scaling
    assert set(nnx.state(layer, nnx.LoRAParam)["lora_A"].keys()) == {"default"}
    with pytest.raises(ValueError, match="not found"):
        layer.set_adapter("other")
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("default", r=2, rngs=nnx.Rngs(0))


def test_lora_bias_init_and_merge_without_base_bias():
    base = Linear(16, 8, rngs=nnx.Rngs(0))  # no bias, like Llama's projections
    layer = LoraLinear(base, r=4, lora_bias=True, rngs=nnx.Rngs(1))
    assert not np.any(np.asarray(layer.lora_B_bias["default"][...]))  # PEFT zeroes it with B
    x = jnp.ones((2, 16))
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(base(x)))
    random = LoraLinear(base, r=4, lora_bias=True, init_lora_weights=False, rngs=nnx.Rngs(2))
    bias = np.asarray(random.lora_B_bias["default"][...])
    assert np.all(np.abs(bias) <= 0.5) and np.abs(bias).max() > 0  # nn.Linear(r, out) bias: U(-1/sqrt(r), 1/sqrt(r))
    with pytest.raises(ValueError, match="without bias"):
        random.merge()
    with pytest.raises(ValueError, match="use_dora"):
        LoraLinear(base, r=4, lora_bias=True, use_dora=True, rngs=nnx.Rngs(0))


def test_only_the_active_adapter_is_trainable():
    """As PEFT's requires_grad: the active adapter's weights are nnx.LoRAParam, the others plain nnx.Param."""
    layer = LoraLinear(Linear(16, 8, use_bias=True, rngs=nnx.Rngs(0)), r=2, lora_bias=True, rngs=nnx.Rngs(1))
    layer.add_adapter("other", r=4, use_dora=True, rngs=nnx.Rngs(2))

    def trainable():
        return {(k, a) for k, d in nnx.state(layer, nnx.LoRAParam).items() if k != "base" for a in d.keys()}

    assert trainable() == {("lora_A", "default"), ("lora_B", "default"), ("lora_B_bias", "default")}
    layer.set_adapter("other")
    assert trainable() == {("lora_A", "other"), ("lora_B", "other"), ("lora_magnitude_vector", "other")}
    total = sum(v.size for v in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    assert total == 16 * 8 + 8 + 2 * (16 + 8) + 8 + 4 * (16 + 8) + 8  # frozen adapters still count in "all params"
