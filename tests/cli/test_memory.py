"""The memory estimator: exact storage terms against real jaxlora objects, the activation model
against XLA's own analysis of the compiled train step, published parameter counts, and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora.models import LlamaConfig, LlamaForCausalLM, count_parameters
from jaxlora.nn import Linear4bit
from jaxlora.peft import LoraConfig, get_peft_model
from jaxlora.quant import QuantizedTensor, quantize_4bit
from jaxlora.cli.memory import ModelShape, estimate_memory, format_estimate, quantized_storage
from jaxlora.train.optim import OptimizerConfig, make_optimizer, to_memory
from jaxlora.train.step import make_train_step
from torch_bridge.checkpoint import build_llama

# Odd widths on purpose: tensors whose sizes are not multiples of the block sizes.
TINY = {"vocab_size": 97, "hidden_size": 40, "intermediate_size": 72, "num_hidden_layers": 2, "num_attention_heads": 5,
            "num_key_value_heads": 1, "head_dim": 8}


def tiny_model(quantize=None, *, dtype="float32", double_quant=True, blocksize=64, **overrides):
    config = LlamaConfig(**{**TINY, **overrides})
    shapes = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    arrays = {".".join(map(str, path)): rng.standard_normal(v.shape).astype(np.float32) * 0.05
              for path, v in nnx.to_flat_state(nnx.state(shapes, nnx.Param))}
    model = build_llama(config, arrays.__getitem__, arrays.__contains__, dtype=dtype, quantize=quantize,
                        double_quant=double_quant, blocksize=blocksize)
    return config, model


def tree_bytes(tree) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def quantized_tensors(model) -> list[QuantizedTensor]:
    return [node.quantized for _, node in nnx.iter_graph(model) if isinstance(node, Linear4bit)]


# -- exact storage ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tie", [True, False])
def test_dense_weights_are_the_model_arrays(dtype, tie):
    config, model = tiny_model(dtype=dtype, tie_word_embeddings=tie)
    est = estimate_memory(ModelShape.from_config(config), method="lora", dtype=dtype, targets=["q_proj"])
    assert est.weights == tree_bytes(nnx.state(model)) and est.quant_constants == 0


@pytest.mark.parametrize("quant, double_quant, blocksize", [
    ("nf4", True, 64), ("nf4", False, 64), ("fp4", True, 64), ("nf4", True, 32), ("nf4", False, 128), ("nf4", True, 256),
])
def test_quantized_weights_and_constants_are_exact(quant, double_quant, blocksize):
    config, model = tiny_model(quant, double_quant=double_quant, blocksize=blocksize, tie_word_embeddings=False)
    est = estimate_memory(ModelShape.from_config(config), method="qlora", quant=quant, double_quant=double_quant,
                          blocksize=blocksize)
    tensors = quantized_tensors(model)
    assert len(tensors) == 7 * config.num_hidden_layers
    packed = sum(int(q.packed.nbytes) for q in tensors)
    dense = tree_bytes(nnx.state(model, nnx.Param))
    assert est.weights == dense + packed
    assert est.quant_constants == sum(q.nbytes for q in tensors) - packed
    assert est.weights + est.quant_constants == tree_bytes(nnx.state(model))  # nothing else is stored
    tables = estimate_memory(ModelShape.from_config(config), method="qlora", quant=quant, double_quant=double_quant,
                             blocksize=blocksize, per_tensor_code_tables=True)
    assert tables.quant_constants - est.quant_constants == len(tensors) * 4 * (16 + (256 if double_quant else 0))


@pytest.mark.parametrize("numel", [1, 2, 63, 64, 65, 64 * 256, 64 * 256 + 2, 64 * 257 * 3])
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantized_storage_matches_quantized_tensor(numel, double_quant):
    q = quantize_4bit(jnp.linspace(-1.0, 1.0, numel, dtype=jnp.float32), blocksize=64, double_quant=double_quant)
    packed, constants = quantized_storage(numel, 64, double_quant)
    assert packed == q.packed.nbytes and packed + constants == q.nbytes
    assert packed + constants == tree_bytes(q)  # the leaves hold exactly that


@pytest.mark.parametrize("targets, rank", [("all-linear", 16), (["q_proj", "v_proj"], 8), (["o_proj", "down_proj", "gate_proj"], 1),
                                           (["lm_head", "k_proj"], 4), (["up_proj"], 3)])
def test_adapter_and_gradient_bytes_match_peft_model(targets, rank):
    config, model = tiny_model("nf4", tie_word_embeddings=False)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    est = estimate_memory(ModelShape.from_config(config), method="qlora", rank=rank, targets=targets)
    trainable = nnx.state(peft_model, nnx.LoRAParam)
    assert est.adapters == 4 * count_parameters(peft_model, nnx.LoRAParam) == tree_bytes(trainable)
    assert est.gradients == est.adapters
    assert est.weights + est.quant_constants == tree_bytes(nnx.state(peft_model)) - tree_bytes(trainable)


@pytest.mark.parametrize("method, dtype", [("lora", "float32"), ("full", "float32"), ("full", "bfloat16")])
def test_optimizer_state_bytes_match_optax(method, dtype):
    config, model = tiny_model(dtype=dtype)
    wrt = nnx.Param if method == "full" else nnx.LoRAParam
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=6, target_modules="all-linear"))
    trainable = nnx.state(model, wrt)
    opt_state = make_optimizer(OptimizerConfig(weight_decay=0.1), 10).init(trainable)
    shape = ModelShape.from_config(config)
    est = estimate_memory(shape, method=method, rank=6, dtype=dtype)
    assert est.optimizer_states == tree_bytes(opt_state) and est.optimizer_states_host == 0
    assert est.gradients == tree_bytes(trainable)
    offloaded = estimate_memory(shape, method=method, rank=6, dtype=dtype, offload=True)
    assert offloaded.optimizer_states == 0
    assert offloaded.optimizer_states_host == tree_bytes(to_memory(opt_state, "pinned_host"))


# -- presets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, published", [("7b", 6_738_415_616), ("13b", 13_015_864_320), ("70b", 68_976_648_192),
                                             ("135m", 134_515_008)])
def test_preset_parameter_counts_are_the_published_ones(name, published):
    assert ModelShape.preset(name).parameter_count() == published


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True}, {"attention_bias": True, "mlp_bias": True},
                                       {"num_key_value_heads": 5, "head_dim": 12}])
def test_parameter_count_matches_the_model(overrides):
    config = LlamaConfig(**{**TINY, **overrides})
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    assert ModelShape.from_config(config).parameter_count() == count_parameters(model)


def test_smollm2_preset_is_its_config():
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    assert ModelShape.from_config(config) == ModelShape.preset("135m")


# -- activation model ------------------------------------------------------------------------------
def test_activations_grow_with_batch_sequence_and_rank():
    shape = ModelShape.preset("135m")
    act = lambda **kw: estimate_memory(shape, method="lora", **kw).activations
    assert act(batch=1) < act(batch=2) < act(batch=4)
    assert act(seq=128) < act(seq=256) < act(seq=1024)
    assert act(rank=8) < act(rank=64)
    # The attention term is quadratic in seq: doubling seq more than doubles the activations.
    assert act(seq=2048) > 2 * act(seq=1024)
    assert estimate_memory(shape, batch=8).total() > estimate_memory(shape, batch=1).total()


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_checkpointing_lowers_activations_on_gpu_only(method):
    shape = ModelShape.preset("7b")
    kw = {"method": method, "batch": 4, "seq": 1024, "dtype": "bfloat16"}
    gpu = [estimate_memory(shape, platform="gpu", grad_ckpt=c, **kw).activations for c in (False, True)]
    assert gpu[1] < gpu[0] / 5
    cpu = [estimate_memory(shape, platform="cpu", grad_ckpt=c, **kw).activations for c in (False, True)]
    assert cpu[0] == cpu[1]  # XLA's CPU scheduler undoes the recomputation (module docstring)


def _xla_temp_bytes(method: str, batch: int, seq: int):
    # SmolLM2's widths, two layers: the regime the counts of the activation model were read in.
    config, model = tiny_model("nf4" if method == "qlora" else None, hidden_size=576, intermediate_size=1536,
                               num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=24576,
                               num_hidden_layers=2, tie_word_embeddings=True)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    graphdef, trainable, rest = nnx.split(peft_model, nnx.LoRAParam, ...)
    tx = make_optimizer(OptimizerConfig(), 10)
    ids = jax.ShapeDtypeStruct((1, batch, seq), jnp.int32)
    step = make_train_step(graphdef, tx)
    compiled = step.lower(trainable, rest, tx.init(trainable), {"input_ids": ids, "attention_mask": ids, "labels": ids}).compile()
    estimate = estimate_memory(ModelShape.from_config(config), method=method, rank=8, batch=batch, seq=seq)
    return compiled.memory_analysis().temp_size_in_bytes, estimate.activations


def test_activation_model_against_xla_memory_analysis():
    """The activation estimate against XLA's temporary buffers of the compiled step (CPU). XLA's
    buffer assignment is not linear in the tokens (the SmolLM2 runs spread +-25 % around the fitted
    factor), so the band is wide; it still fails if a term is missing or counted for all tokens
    instead of per chunk (e.g. unchunked logits would more than double the estimate)."""
    small, small_est = _xla_temp_bytes("lora", 2, 256)
    large, large_est = _xla_temp_bytes("lora", 4, 256)
    quantized, quantized_est = _xla_temp_bytes("qlora", 2, 256)
    print(f"XLA temp {small} -> {large}, QLoRA {quantized}; estimate {small_est} -> {large_est}, QLoRA {quantized_est}")
    for xla, ours in ((small, small_est), (large, large_est), (quantized, quantized_est)):
        assert 0.7 < ours / xla < 1.5
    assert 0.65 < (large_est - small_est) / (large - small) < 1.35


# -- totals, printing, errors ----------------------------------------------------------------------
def test_total_counts_host_state_on_cpu_only():
    shape = ModelShape.preset("135m")
    cpu, gpu = (estimate_memory(shape, offload=True, platform=p) for p in ("cpu", "gpu"))
    assert cpu.optimizer_states == gpu.optimizer_states == 0 and cpu.optimizer_states_host > 0
    parts = lambda e: e.weights + e.quant_constants + e.adapters + e.gradients + e.runtime + e.frozen_copies
    assert cpu.total() == parts(cpu) + cpu.optimizer_states_host + max(cpu.activations, cpu.optimizer_transient)
    assert gpu.total() == parts(gpu) + max(gpu.activations, gpu.optimizer_transient)
    rows = dict(gpu.rows())
    assert rows["total"] == pytest.approx(gpu.total() / 2**30) and rows["weights"] == pytest.approx(gpu.weights / 2**30)
    text = format_estimate(gpu, "65b")
    assert text.startswith("65b") and "total" in text and f"{gpu.total() / 2**30:.3f}" in text


def test_frozen_copies_scale_with_the_frozen_state():
    shape = ModelShape.preset("7b")
    for method in ("lora", "qlora"):
        est = [estimate_memory(shape, method=method, frozen_state_copies=n) for n in (0, 2)]
        assert est[0].frozen_copies == 0 and est[1].frozen_copies == 2 * (est[1].weights + est[1].quant_constants)
    assert estimate_memory(shape, method="full").frozen_copies == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "prefix"}, "method 'prefix'"),
    ({"targets": ["q_proj", "qkv_proj"]}, r"\['qkv_proj'\]"),
    ({"targets": []}, "empty"),
    ({"targets": "lm_head"}, "tied"),
    ({"platform": "tpu"}, "platform 'tpu'"),
    ({"platform": "metal"}, "platform 'metal'"),
    ({"dtype": "float64"}, "dtype 'float64'"),
    ({"blocksize": 100}, "blocksize 100"),
    ({"quant": "int4"}, "quant 'int4'"),
    ({"batch": 0}, "batch must be a positive integer"),
    ({"rank": -1}, "rank must be a positive integer"),
])
def test_bad_arguments_raise_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        estimate_memory(ModelShape.preset("135m"), **kwargs)


def test_unknown_preset_lists_the_names():
    with pytest.raises(ValueError, match=r"'7B'.*\['135m', '13b', '65b', '70b', '7b', '8b'\]"):
        ModelShape.preset("7B")
