"""The memory estimator: exact storage terms against real jaxlora objects, the activation model
against XLA's own analysis of the compiled train step, published parameter counts, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora.models import LlamaConfig, LlamaForCausalLM, count_parameters
from jaxlora.nn import Linear4bit
from jaxlora.peft import LoraConfig, get_peft_model
from jaxlora.quant import QuantizedTensor, quantize_4bit
from jaxlora.cli.memory import ACTIVATION_FACTOR, ModelShape, estimate_memory, format_estimate, quantized_storage
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
    # The dense kernel's attention term is quadratic in seq: doubling seq more than doubles the activations;
    # the blockwise kernel's is linear (and the loss chunk does not grow).
    assert act(seq=2048, attention="dense") > 2 * act(seq=1024, attention="dense")
    assert 1.9 * act(seq=2048) < act(seq=4096) <= 2 * act(seq=2048)
    assert estimate_memory(shape, batch=8).total() > estimate_memory(shape, batch=1).total()


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_checkpointing_lowers_activations(method):
    shape = ModelShape.preset("7b")
    kw = {"method": method, "batch": 4, "seq": 1024, "dtype": "bfloat16"}
    for platform in ("gpu", "cpu"):
        plain, ckpt = (estimate_memory(shape, platform=platform, grad_ckpt=c, **kw).activations for c in (False, True))
        assert ckpt < plain / 5, platform


def _compiled_temp_bytes(overrides: dict, method: str, batch: int, seq: int, rank: int, targets="all-linear"):
    """``(XLA's temporary bytes of the compiled train step, the model's config)``: float32 LoRA or
    QLoRA on `tiny_model` with ``overrides``; the activations live in those temporaries."""
    config, model = tiny_model("nf4" if method == "qlora" else None, tie_word_embeddings=True, **overrides)
    peft_model = get_peft_model(model, LoraConfig(r=rank, target_modules=targets))
    graphdef, trainable, rest = nnx.split(peft_model, nnx.LoRAParam, ...)
    tx = make_optimizer(OptimizerConfig(), 10)
    ids = jax.ShapeDtypeStruct((1, batch, seq), jnp.int32)
    step = make_train_step(graphdef, tx)
    compiled = step.lower(trainable, rest, tx.init(trainable), {"input_ids": ids, "attention_mask": ids, "labels": ids}).compile()
    return compiled.memory_analysis().temp_size_in_bytes, config


def _xla_temp_bytes(method: str, batch: int, seq: int):
    # SmolLM2's widths, two layers.
    temp, config = _compiled_temp_bytes({"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                                         "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 24576,
                                         "num_hidden_layers": 2}, method, batch, seq, 8)
    return temp, estimate_memory(ModelShape.from_config(config), method=method, rank=8, batch=batch, seq=seq).activations


def test_activation_model_against_xla_memory_analysis():
    """The activation estimate against XLA's temporary buffers of the compiled step (CPU), SmolLM2's
    widths with 2 layers. Above: the formula counts what the backward pass keeps (to the byte per
    layer, next test), so it exceeds XLA only by the factor (1.001) and the loss chunk's padding:
    < 1.1. Below: XLA also holds the working set of the last layer's backward pass at the peak, which
    the formula leaves to the factor (fitted on 30 layers); with 2 layers that is up to a third of
    the total: > 0.7. Doubling the tokens adds what the formula adds per token (the working set
    does not grow with them): the slope within 0.9-1.15. Unchunked logits would more than double
    the estimate; a missing intermediate-size array per layer would move the slope by 9 %."""
    small, small_est = _xla_temp_bytes("lora", 2, 256)
    large, large_est = _xla_temp_bytes("lora", 4, 256)
    quantized, quantized_est = _xla_temp_bytes("qlora", 2, 256)
    print(f"XLA temp {small} -> {large}, QLoRA {quantized}; estimate {small_est} -> {large_est}, QLoRA {quantized_est}")
    for xla, ours in ((small, small_est), (large, large_est), (quantized, quantized_est)):
        assert 0.7 < ours / xla < 1.1
    assert 0.9 < (large_est - small_est) / (large - small) < 1.15


PER_LAYER_SHAPE = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 16}


@pytest.mark.parametrize("method, targets, overrides", [
    ("lora", "all-linear", {}),
    ("lora", ["q_proj", "v_proj"], {}),
    ("lora", ["gate_proj", "up_proj"], {}),
    ("lora", ["o_proj", "down_proj"], {"intermediate_size": 160}),
    ("qlora", "all-linear", {"num_key_value_heads": 4}),
], ids=["all-linear", "qv", "gate-up", "o-down", "qlora"])
def test_what_a_layer_keeps_is_what_xla_keeps(method, targets, overrides):
    """Per decoder layer: XLA's temporary bytes with 4 layers minus those with 2, halved, against the
    estimate's difference (unscaled by the factor). Everything else in the step (loss, the working
    set at the peak) is the same for both depths and cancels. The formula counts every array that
    grows with the tokens; the 2 % are for what it leaves out because it does not (QLoRA's
    dequantization scalars and block-scale vectors) and for 64-byte buffer
    alignment, together below 1 % of a layer's ~1 MiB here. The earlier formula (five
    intermediate-size arrays and every projection's input, whatever is adapted) is 23-47 % too high
    for the three partial target sets."""
    batch, seq, rank = 2, 64, 8
    measured, estimated = {}, {}
    for layers in (2, 4):
        measured[layers], config = _compiled_temp_bytes({**PER_LAYER_SHAPE, **overrides, "num_hidden_layers": layers},
                                                        method, batch, seq, rank, targets)
        estimated[layers] = estimate_memory(ModelShape.from_config(config), method=method, rank=rank, targets=targets,
                                            batch=batch, seq=seq).activations / ACTIVATION_FACTOR["cpu"]
    per_layer_xla = (measured[4] - measured[2]) / 2
    per_layer_ours = (estimated[4] - estimated[2]) / 2
    assert per_layer_ours == pytest.approx(per_layer_xla, rel=0.02), (per_layer_ours, per_layer_xla)


# -- against the measured runs -------------------------------------------------------------------
MEASURED_RUNS = Path(__file__).resolve().parents[2] / "experiments" / "results" / "memory_runs.json"
MIB = 2**20


def _measured_runs():
    """(spec, measurements, estimate) of the SmolLM2-135M runs of experiments/calibrate_memory.py, measured
    with the dense attention kernel (before the blockwise one was the default): estimated as such."""
    runs = json.loads(MEASURED_RUNS.read_text())
    assert len(runs) == 8
    return [(spec, m, estimate_memory(ModelShape.preset("135m"), method=spec["method"], rank=16, targets="all-linear",
                                      batch=spec["batch"], seq=spec["seq"], grad_ckpt=spec["grad_ckpt"], dtype="float32",
                                      quant="nf4", double_quant=True, blocksize=64, platform="cpu", attention="dense"))
            for spec, m in runs]


def test_storage_terms_are_the_measured_runs_arrays():
    for spec, m, est in _measured_runs():
        assert est.weights + est.quant_constants == m["rest_bytes"], spec
        assert est.adapters == est.gradients == m["trainable_bytes"], spec
        assert est.optimizer_states == m["opt_bytes"], spec


def test_activations_are_within_six_percent_of_xla_in_the_measured_runs():
    """XLA's temporaries of each SmolLM2 run against the activation estimate. The formula's per-layer
    part is exact (previous tests); what the factor stands for, the last layer's working set, is
    about the same amount (~50 MiB) at 2x256 and 8x256 tokens, so a factor fitted on both misses the
    smaller run by up to 50 MiB / 870 MiB = 6 %. Checkpointed runs are counted as unchecked on CPU
    (module docstring); their temporaries are within the same band."""
    for spec, m, est in _measured_runs():
        assert est.activations == pytest.approx(m["xla_temp"], rel=0.06), spec


def test_totals_are_within_the_spread_of_the_measured_runs():
    """Each run's peak RSS against the estimate's total. The tolerance is what one runtime constant
    cannot follow, taken from the runs themselves: half the range across runs of the compiler heap
    left after compiling and of the loader's leftovers (QLoRA's and checkpointed programs are bigger),
    plus the largest growth of the peak between step 1 and 3 and the largest distance of XLA's
    temporaries from the activation estimate (~320 MiB here, 19 % of the smallest peak). The guard
    against a vacuous tolerance is 20 % of the smallest peak (was 15 %): with checkpointing that works
    the checkpointed runs' peaks fell to 1.7-2.0 GiB, so 20 % of the smallest (342 MiB) allows less than 15 %
    of the earlier smallest peak, 2,309 MiB, did (346 MiB), while the tolerance itself fell (330 -> 320 MiB)."""
    runs = _measured_runs()
    spread = lambda values: (max(values) - min(values)) / 2
    compiler = spread([m["rss_compiled"] - m["rss_loaded"] for _, m, _ in runs])
    loader = spread([m["rss_loaded"] - m["rss_imports"] - m["rest_bytes"] - m["trainable_bytes"] - m["opt_bytes"]
                     for _, m, _ in runs])
    creep = max(m["peak_steps"][-1] - m["peak_steps"][0] for _, m, _ in runs)
    activations = max(abs(m["xla_temp"] - est.activations) for _, m, est in runs)
    tolerance = compiler + loader + creep + activations
    assert tolerance < 0.2 * min(m["peak"] for _, m, _ in runs), f"{tolerance / MIB:.0f} MiB: the check would be vacuous"
    for spec, m, est in runs:
        assert abs(est.total() - m["peak"]) <= tolerance, (spec, est.total() / MIB, m["peak"] / MIB, tolerance / MIB)


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


def test_printed_estimate_says_what_it_assumes():
    shape = ModelShape.preset("7b")
    gpu = format_estimate(estimate_memory(shape, dtype="bfloat16", platform="cuda"))
    assert "device: GPU (runtime 1.00 GiB" in gpu and "an assumption, not measured on a GPU" in gpu
    assert "dtypes: parameters bfloat16, activations bfloat16, LoRA weights float32" in gpu
    cpu = format_estimate(estimate_memory(shape, dtype="bfloat16", compute_dtype="float32", platform="cpu"))
    assert "device: CPU, host RAM (runtime and activation factor fitted" in cpu and "assumption" not in cpu
    assert "dtypes: parameters bfloat16, activations float32" in cpu


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
    ({"attention": "flash"}, "attention 'flash'"),
    ({"batch": 0}, "batch must be a positive integer"),
    ({"rank": -1}, "rank must be a positive integer"),
])
def test_bad_arguments_raise_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        estimate_memory(ModelShape.preset("135m"), **kwargs)


def test_unknown_preset_lists_the_names():
    with pytest.raises(ValueError, match=r"'7B'.*\['135m', '13b', '65b', '70b', '7b', '8b'\]"):
        ModelShape.preset("7B")
