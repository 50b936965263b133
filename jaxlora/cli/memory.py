"""How much memory a jaxlora training run needs: exact storage plus a calibrated activation model.

    estimate_memory(ModelShape.preset("65b"), method="qlora", rank=64, seq=512, grad_ckpt=True,
                    offload=True, dtype="bfloat16", platform="gpu").total()

Storage (exact, bytes; ``n`` = elements of one decoder projection, per tensor):
- dense parameters: ``n * itemsize(dtype)``; 4-bit projections: ``ceil(n / 2)`` packed codes, plus
  quantization constants ``4 * nblocks`` (float32 absmax, ``nblocks = ceil(n / blocksize)``) or,
  with double quantization, ``nblocks`` (uint8 codes) ``+ 4 * ceil(nblocks / 256)`` (float32
  nested absmax) ``+ 4`` (float32 offset), as `jaxlora.quant.QuantizedTensor.nbytes` (formats.md B.6).
  jaxlora shares one copy of the 16-entry 4-bit table and the 256-entry 8-bit map (program
  constants); bitsandbytes keeps both per tensor (64 + 1024 bytes): ``per_tensor_code_tables=True``.
- LoRA: ``r * (in + out)`` float32 values per adapted projection (PEFT's adapter dtype).
- gradients: one per trainable value, in its dtype; AdamW (optax, `jaxlora.train.optim`): two
  moments in the trainable dtype plus two int32 step counters (8 bytes).
- frozen-state copies: a train step that returned ``rest`` (every variable that does not train: the
  base weights and their quantization constants) wrote it as new buffers each step, and driven as
  the trainer drives it two extra copies were alive at the peak (``frozen_state_copies=2``, measured
  in experiments/results/memory.md before the fix). `make_train_step` now returns only what changes
  (the dropout RNG state): 0, the default.

Activations (bytes), ``T = batch * seq`` tokens, ``c`` = itemsize of the compute dtype, ``a`` = 4
(float32 LoRA weights and inputs, PEFT's adapter dtype), ``H`` hidden, ``I`` intermediate,
``q = heads * head_dim``, ``kv = kv_heads * head_dim``, ``V`` vocab, ``A`` the adapted projections:

    layer, per token:  c * (2 H + q + 2 kv + 3 I)     always kept (below)
                     + c * q + 4 * heads + 16          attention output and float32 row logsumexp (blockwise
                                                       attention); RMSNorm statistics
                       (attention="dense": 4 * heads * seq, the float32 probabilities, instead of the
                       attention terms above)
                     + a * H   if A has q/k/v_proj     their input (input_layernorm's output)
                     + a * q   if A has o_proj         its input (the attention output)
                     + a * H   if A has gate/up_proj   their input (post_attention_layernorm's output)
                     + a * I   if A has up_proj        up's LoRA output, kept beside the base output
                     + a * I   if A has down_proj      its input, silu(gate) * up
                     + a * r   per adapted projection  x A^T of each LoRA branch
    (full fine-tuning: every projection's input, c * (2 H + q + I), for its weight gradient, and the
    two normalised values before the norm weights, 2 c H, for theirs; no LoRA terms)
    first layer:       c * H + 8 less                  (its input and input_layernorm's statistics:
                                                        no gradient flows into a frozen embedding)
    loss:              4 * chunk * V + 2 * c * H * T   `jaxlora.train.step.chunked_cross_entropy`:
                                                       one [chunk, V] float32 block of logits (XLA
                                                       writes their gradient in place), the final
                                                       hidden states and their gradient (chunk = 256,
                                                       T rounded up to chunks)
                       T * (2 * 4 * V + c * V) if lm_head carries LoRA (whole logits, no chunking)
    transient:         one dequantized projection in the compute dtype (QLoRA), or one cast copy when
                       the parameter dtype is not the compute dtype
    without checkpointing:  factor * (L * T * layer - T * first-layer saving + loss + transient)
    with checkpointing:     factor * (L * T * c * H + max((1 + w) * T * layer, loss) + transient)
                            (w = ``RECOMPUTED_LAYER_WORKING_SET``: the cotangents a recomputed layer's
                            backward pass holds beside its activations, as a share of them)

What XLA keeps from a decoder layer for the backward pass, read from the live buffers at the peak of the
compiled step and confirmed by how XLA's temporary bytes grow with each dimension and each set of
adapted projections (experiments/activation_memory.py, experiments/results/memory_activations.md;
float32: the formula above to the byte with the dense attention kernel, which those results were
measured with; with the blockwise kernel XLA's per-layer growth on the tiny model is within 0.1 % of it
at 64, 256, 512 and 1024 tokens): the layer input and the residual after attention (H each, for the
RMSNorms' backward), the rotated queries (q), keys and values (kv each), the attention output in its
head-major layout (q) and the float32 logsumexp of each head's scores (the residuals of
`jaxlora.nn.attention.blockwise_attention`; the dense kernel, `jaxlora.nn.dense_attention`, keeps the float32
softmax probabilities ``[heads, seq]`` per token instead). Then the RMSNorms' 1/rms
and mean square (4 float32 per token), and in the MLP three intermediate-size arrays: sigmoid(gate) and
silu(gate), and up. `jaxlora.models.llama.swiglu`'s custom gradient keeps only gate and up as its
residuals and recomputes the sigmoid, but XLA merges that recomputation with the forward pass's
identical one (common-subexpression elimination), so the forward's sigmoid(gate) and silu(gate) stay
alive instead of gate; and an adapted up_proj's output ``base + lora`` is never one buffer: the sum is
fused into its consumers, which keeps both addends. A LoRA branch keeps its (float32) input for the
gradient of A and ``x A^T`` for the gradient of B; frozen projections keep nothing
(`jaxlora.nn.linear4bit.quantized_matmul` keeps the 4-bit weight, which is stored anyway). With a 16-bit
compute dtype XLA's CPU backend keeps some of these in float32 (excess precision): up to 15 % above the
formula in the measurements.

``factor`` (``ACTIVATION_FACTOR``) covers what XLA holds at the peak beyond what is kept: fitted, as
the geometric mean of XLA's own memory analysis (temporary buffers of the compiled step) over the
formula, on the SmolLM2-135M runs without checkpointing of experiments/results/memory.md: 1.001
with XLA's default scheduler (1.038 with the memory-optimized one the step used before, which also
held the last layer's backward working set, ~50 MiB). Those runs' temporaries, checkpointed runs
included, are 1.00-1.05 times the fitted estimate. The GPU uses the same factor, unmeasured.

Gradient checkpointing: each checkpointed decoder layer keeps only its input, and its recomputation
runs behind a data dependency on its output's cotangent (`jaxlora.models.recompute`), so one
layer's activations exist at a time, on XLA's CPU backend too (XLA's temporary bytes per added layer:
the layer input, experiments/results/big_model.md). The SmolLM2 runs of experiments/results/memory.md
predate that: they used ``nnx.remat``, whose barrier XLA's CPU compiler removes before scheduling,
and checkpointing saved little there.

Runtime (per platform): CPU: a constant fitted on the peak RSS of 8 SmolLM2-135M runs
(`experiments/calibrate_memory.py`, the middle of the range of peak minus every other term): the
Python process with jax imported (~160 MiB), the loader's leftovers, the compiler's heap kept by the
allocator, the executable, and the allocator's fragmentation. It grows with the compiled program
(checkpointed QLoRA programs leave ~300 MiB more than the others on SmolLM2); the Llama-2-7B-shaped
QLoRA run of experiments/results/big_model.md (32 layers, bf16) is within 3 % of the estimate.
GPU: an assumption, not a measurement: the CUDA context, XLA's 32 MiB matmul workspace (measured on
an H100, experiments/results/gpu.md) and the executable, rounded up to 1 GiB. JAX preallocates 75 %
of a GPU by default; the estimate is what the run needs, not what JAX reserves.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from jaxlora.models.llama import ATTENTION_IMPLEMENTATIONS
from jaxlora.models.llama_config import LlamaConfig
from jaxlora.quant.codebooks import NESTED_BLOCKSIZE, SUPPORTED_BLOCKSIZES, SUPPORTED_QUANT_TYPES
from jaxlora.train.step import LOSS_CHUNK_TOKENS

GIB = 2**30
METHODS = ("full", "lora", "qlora")
PLATFORMS = ("cpu", "gpu")
PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu"}  # jax device platforms that mean a GPU
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Fitted on experiments/results/memory.md (CPU) / assumed (GPU); see the module docstring.
RUNTIME_BYTES = {"cpu": 1190 * 2**20, "gpu": 1 * GIB}
OPTIMIZER_COUNTERS = 8  # int32 step counts of scale_by_adam and of the learning-rate schedule
ADAPTER_BYTES = 4  # LoRA weights are float32 (PEFT's autocast_adapter_dtype)

# What every decoder layer keeps per token, in rows of each width, whatever is adapted (module docstring):
# the layer input and the residual after attention; rotated queries; keys and values; sigmoid(gate),
# silu(gate) and up.
KEPT_HIDDEN, KEPT_QUERY, KEPT_KEY_VALUE, KEPT_INTERMEDIATE = 2, 1, 2, 3
NORM_STATISTICS_BYTES = 16  # float32 1/rms and mean square of both RMSNorms
LOSS_CHUNK_COPIES = 1  # one [chunk, V] float32 block: XLA writes the softmax gradient over the logits
LOGITS_COPIES = 2  # unchunked: the whole logits (kept for the backward pass) and their gradient
# What XLA holds at the peak beyond what the layers keep (the last layer's backward working set):
# fitted on the XLA memory analysis of the 4 SmolLM2 runs without checkpointing in
# experiments/results/memory.md (CPU); the GPU uses the same factor (not measured).
ACTIVATION_FACTOR = {"cpu": 1.001, "gpu": 1.001}
# With checkpointing, the peak is one recomputed layer's backward pass: its activations and, at the
# same time, cotangents worth this share of them. Fitted on the checkpointed SmolLM2 runs of
# experiments/results/memory.md at 8x256 tokens (XLA's temporaries 311 and 314 MiB: 0.61 on both; at 2x256 the loss
# term is the larger one).
RECOMPUTED_LAYER_WORKING_SET = 0.61


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a Llama config (transformers' names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    """Biases on q/k/v/o (not in Llama; kept so that any `LlamaConfig` is counted exactly)."""
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config: LlamaConfig) -> ModelShape:
        return cls(config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.tie_word_embeddings,
                   config.attention_bias, config.mlp_bias)

    @classmethod
    def preset(cls, name: str) -> ModelShape:
        """A published architecture: "135m" (SmolLM2-135M), "7b", "13b", "70b" (Llama 2), "65b" (Llama 1),
        "8b" (Llama 3 8B)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[name]

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """``(out_features, in_features)`` of each decoder projection."""
        h, q, kv, i = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim, self.intermediate_size
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    def dense_parameter_count(self) -> int:
        """Elements outside the decoder projections' weights: embeddings, norms, lm_head, biases."""
        biases = 0
        for name, (out, _) in self.projection_shapes().items():
            if (self.attention_bias and name in PROJECTIONS[:4]) or (self.mlp_bias and name in PROJECTIONS[4:]):
                biases += out
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_hidden_layers * (2 * self.hidden_size + biases) + self.hidden_size

    def parameter_count(self) -> int:
        projections = sum(o * i for o, i in self.projection_shapes().values())
        return self.dense_parameter_count() + self.num_hidden_layers * projections


PRESETS = {
    "135m": ModelShape(49152, 576, 1536, 30, 9, 3, 64, True),
    "7b": ModelShape(32000, 4096, 11008, 32, 32, 32, 128, False),
    "13b": ModelShape(32000, 5120, 13824, 40, 40, 40, 128, False),
    "65b": ModelShape(32000, 8192, 22016, 80, 64, 64, 128, False),
    "70b": ModelShape(32000, 8192, 28672, 80, 64, 8, 128, False),
    "8b": ModelShape(128256, 4096, 14336, 32, 32, 8, 128, False),
}


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component. ``total()`` is the memory the run needs on its device.

    On "cpu" host and device memory are the same RAM, so ``total()`` includes the offloaded
    optimizer state; on "gpu" it is the accelerator's share and ``optimizer_states_host`` is
    host RAM on top.
    """

    weights: int
    """Base weights as stored: dense parameters plus packed 4-bit codes."""
    quant_constants: int
    """absmax / double-quantization constants of the 4-bit weights."""
    adapters: int
    """LoRA A and B."""
    gradients: int
    """Gradients of the trainable parameters."""
    optimizer_states: int
    """AdamW moments (and step counters) on the device; 0 when offloaded."""
    optimizer_states_host: int
    """The same in host memory when offloaded."""
    activations: int
    """Saved for the backward pass plus the peak transient (activation model)."""
    runtime: int
    """Fixed overhead of the process and backend (per platform)."""
    frozen_copies: int = 0
    """Copies of the frozen state that the train step writes (see ``frozen_state_copies``)."""
    optimizer_transient: int = 0
    """Offloaded moments brought to the device for the update (activations are freed by then)."""
    platform: str = "cpu"
    """The device kind the estimate is for: "cpu" (host RAM is the device) or "gpu"."""
    dtype: str = "float32"
    """Parameter dtype of the dense base weights."""
    compute_dtype: str = "float32"
    """Dtype of the activations."""

    def total(self) -> int:
        """Every resident term, plus the larger of the activations and the optimizer transient (the
        activations are freed before the update)."""
        resident = (self.weights + self.quant_constants + self.adapters + self.gradients + self.optimizer_states
                    + self.runtime + self.frozen_copies)
        if self.platform == "cpu":
            resident += self.optimizer_states_host
        return resident + max(self.activations, self.optimizer_transient)

    def rows(self) -> list[tuple[str, float]]:
        """``(component, GiB)`` in display order, the total last."""
        names = ("weights", "quant_constants", "adapters", "gradients", "optimizer_states", "optimizer_states_host",
                 "activations", "frozen_copies", "optimizer_transient", "runtime")
        return [(n, getattr(self, n) / GIB) for n in names] + [("total", self.total() / GIB)]


def quantized_storage(numel: int, blocksize: int, double_quant: bool) -> tuple[int, int]:
    """``(packed code bytes, constant bytes)`` of one 4-bit tensor of ``numel`` elements."""
    nblocks = -(-numel // blocksize)
    if not double_quant:
        return (numel + 1) // 2, 4 * nblocks
    return (numel + 1) // 2, nblocks + 4 * (-(-nblocks // NESTED_BLOCKSIZE)) + 4


def resolve_targets(shape: ModelShape, targets: str | Sequence[str]) -> tuple[str, ...]:
    """The module names LoRA adapts in every layer (and "lm_head"): "all-linear" = the 7 projections."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return PROJECTIONS
        targets = [targets]
    names = tuple(dict.fromkeys(targets))
    valid = PROJECTIONS + (() if shape.tie_word_embeddings else ("lm_head",))
    unknown = [t for t in names if t not in valid]
    if unknown or not names:
        tied = " (lm_head is tied to the embedding here)" if shape.tie_word_embeddings else ""
        raise ValueError(f"LoRA targets {list(names)!r}: {unknown or 'empty'} not a linear module of a Llama layer{tied}; "
                         f"expected 'all-linear' or names from {list(valid)}")
    return names


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} {value!r} is not supported; expected one of {list(allowed)}")


def estimate_memory(shape: ModelShape, *, method: str = "qlora", rank: int = 16, targets: str | Sequence[str] = "all-linear",
                    batch: int = 1, seq: int = 512, grad_ckpt: bool = False, offload: bool = False,
                    dtype: str = "float32", compute_dtype: str | None = None, quant: str = "nf4",
                    double_quant: bool = True, blocksize: int = 64, platform: str = "cpu",
                    frozen_state_copies: int = 0, per_tensor_code_tables: bool = False,
                    attention: str = "blockwise") -> MemoryEstimate:
    """Memory of one training step of a Llama model with jaxlora (formulas in the module docstring).

    Args:
      shape: the architecture (`ModelShape.from_config` or `ModelShape.preset`).
      method: "full" (every parameter trains), "lora" (dense frozen base) or "qlora" (4-bit base).
      rank, targets: LoRA rank and adapted modules ("all-linear" or names such as ["q_proj", "v_proj"]).
      batch, seq: rows and tokens per row of one micro-batch.
      grad_ckpt: gradient checkpointing (recompute each decoder layer in the backward pass).
      offload: AdamW moments in host memory between steps (`jaxlora.train.optim.to_memory`).
      dtype: parameter dtype of the base ("float32", "bfloat16", "float16"); compute_dtype: the
        activations' dtype (default ``dtype``, as `torch_bridge.load_llama`).
      quant, double_quant, blocksize: 4-bit settings for "qlora".
      platform: "cpu" or "gpu" ("cuda"/"rocm" mean "gpu"): the runtime constant, the checkpointing
        behaviour and what total() counts.
      frozen_state_copies: extra copies of the frozen state alive at a step's peak (0 with
        `make_train_step`; 2 with a step that returns the frozen state, see the module docstring).
      per_tensor_code_tables: count bitsandbytes' per-tensor code tables (64 + 1024 bytes).
      attention: the model's attention kernel (`LlamaForCausalLM.attention_implementation`):
        "blockwise" (memory linear in seq) or "dense" (keeps the ``[heads, seq, seq]`` probabilities).
    """
    _check("method", method, METHODS)
    _check("attention", attention, ATTENTION_IMPLEMENTATIONS)
    platform = PLATFORM_ALIASES.get(platform, platform)
    _check("platform", platform, PLATFORMS)
    _check("dtype", dtype, DTYPE_BYTES)
    compute_dtype = compute_dtype or dtype
    _check("compute_dtype", compute_dtype, DTYPE_BYTES)
    if method == "qlora":
        _check("quant", quant, SUPPORTED_QUANT_TYPES)
        _check("blocksize", blocksize, SUPPORTED_BLOCKSIZES)
    for name, value in (("rank", rank), ("batch", batch), ("seq", seq)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if frozen_state_copies < 0:
        raise ValueError(f"frozen_state_copies must be >= 0, got {frozen_state_copies}")
    names = () if method == "full" else resolve_targets(shape, targets)
    param_bytes, c = DTYPE_BYTES[dtype], DTYPE_BYTES[compute_dtype]
    projections = shape.projection_shapes()
    layers = shape.num_hidden_layers

    weights, constants = shape.dense_parameter_count() * param_bytes, 0
    for out_f, in_f in projections.values():
        if method == "qlora":
            packed, consts = quantized_storage(out_f * in_f, blocksize, double_quant)
            tables = (16 + (256 if double_quant else 0)) * 4 if per_tensor_code_tables else 0
            weights, constants = weights + layers * packed, constants + layers * (consts + tables)
        else:
            weights += layers * out_f * in_f * param_bytes

    adapted = {n: projections.get(n, (shape.vocab_size, shape.hidden_size)) for n in names}
    lora_values = sum(rank * (o + i) * (1 if n == "lm_head" else layers) for n, (o, i) in adapted.items())
    adapters = lora_values * ADAPTER_BYTES
    trainable = weights if method == "full" else adapters
    moments = 2 * trainable + OPTIMIZER_COUNTERS
    frozen = 0 if method == "full" else frozen_state_copies * (weights + constants)

    activations = _activations(shape, names, rank, batch, seq, c, grad_ckpt, method == "full", attention)
    if method == "qlora" or param_bytes != c:  # one dequantized (or cast) projection at a time
        activations += max(o * i for o, i in projections.values()) * c
    activations = math.ceil(ACTIVATION_FACTOR[platform] * activations)
    return MemoryEstimate(
        weights=weights, quant_constants=constants, adapters=adapters, gradients=trainable,
        optimizer_states=0 if offload else moments, optimizer_states_host=moments if offload else 0,
        activations=activations, runtime=RUNTIME_BYTES[platform], frozen_copies=frozen,
        optimizer_transient=moments if offload else 0, platform=platform, dtype=dtype, compute_dtype=compute_dtype)


def _layer_bytes_per_token(shape: ModelShape, names: tuple[str, ...], rank: int, seq: int, c: int, full: bool,
                           attention: str) -> int:
    """What one decoder layer keeps for the backward pass, per token (module docstring)."""
    h, heads = shape.hidden_size, shape.num_attention_heads
    q, kv, i = heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim, shape.intermediate_size
    kept = c * (KEPT_HIDDEN * h + KEPT_QUERY * q + KEPT_KEY_VALUE * kv + KEPT_INTERMEDIATE * i)
    adapted = set(names) - {"lm_head"}
    if attention == "dense":
        kept += 4 * heads * seq
    else:
        kept += c * q + 4 * heads
    kept += NORM_STATISTICS_BYTES
    if full:  # every projection's input for its weight gradient; the norms' inputs times 1/rms for theirs
        return kept + c * (h + q + h + i) + 2 * c * h
    inputs = {"attention input": (h, {"q_proj", "k_proj", "v_proj"}), "attention output": (q, {"o_proj"}),
              "mlp input": (h, {"gate_proj", "up_proj"}), "up's LoRA output": (i, {"up_proj"}),
              "mlp product": (i, {"down_proj"})}
    kept += ADAPTER_BYTES * sum(width for width, readers in inputs.values() if adapted & readers)
    return kept + ADAPTER_BYTES * rank * len(adapted)


def _first_layer_saving(shape: ModelShape, c: int) -> int:
    """Per token: the first layer keeps neither its input nor input_layernorm's statistics (the
    embedding is frozen, so no gradient flows below it)."""
    return c * shape.hidden_size + NORM_STATISTICS_BYTES // 2


def _loss_bytes(shape: ModelShape, names: tuple[str, ...], rank: int, tokens: int, c: int) -> int:
    """The output layer and cross-entropy: chunked unless the output layer carries LoRA."""
    v, h = shape.vocab_size, shape.hidden_size
    if "lm_head" not in names:  # `chunked_cross_entropy`: [chunk, V] float32 pieces, hidden and its gradient whole
        padded = -(-tokens // LOSS_CHUNK_TOKENS) * LOSS_CHUNK_TOKENS
        return LOSS_CHUNK_COPIES * 4 * LOSS_CHUNK_TOKENS * v + 2 * c * h * padded
    per_token = LOGITS_COPIES * 4 * v + (c * v if c != 4 else 0) + ADAPTER_BYTES * rank
    return tokens * per_token


def _activations(shape: ModelShape, names: tuple[str, ...], rank: int, batch: int, seq: int, c: int, checkpointed: bool,
                 full: bool, attention: str) -> int:
    tokens = batch * seq
    layer = tokens * _layer_bytes_per_token(shape, names, rank, seq, c, full, attention)
    loss = _loss_bytes(shape, names, rank, tokens, c)
    if checkpointed:  # layer inputs saved; one layer recomputed at a time, after the loss is done
        recomputed = math.ceil((1 + RECOMPUTED_LAYER_WORKING_SET) * layer)
        return tokens * shape.num_hidden_layers * c * shape.hidden_size + max(recomputed, loss)
    first_layer_saving = 0 if full else tokens * _first_layer_saving(shape, c)  # full: the embedding trains
    return shape.num_hidden_layers * layer - first_layer_saving + loss


def format_estimate(est: MemoryEstimate, title: str = "") -> str:
    """A GiB table of the estimate, for printing, with the device kind and dtypes it assumes."""
    lines = [title] if title else []
    lines += [f"  {name:<22} {gib:10.3f} GiB" for name, gib in est.rows() if gib or name == "total"]
    where = "host RAM = device" if est.platform == "cpu" else "device; host-offloaded state not included"
    lines.append(f"  (total: {where})")
    if est.platform == "cpu":
        lines.append("  device: CPU, host RAM (runtime and activation factor fitted on SmolLM2-135M runs on a CPU)")
    else:
        lines.append(f"  device: GPU (runtime {est.runtime / GIB:.2f} GiB for the CUDA context, workspace and executable: "
                     "an assumption, not measured on a GPU; activation factor fitted on CPU runs)")
    lines.append(f"  dtypes: parameters {est.dtype}, activations {est.compute_dtype}, LoRA weights float32")
    return "\n".join(lines)


__all__ = [
    "PRESETS",
    "PROJECTIONS",
    "MemoryEstimate",
    "ModelShape",
    "estimate_memory",
    "format_estimate",
    "quantized_storage",
    "resolve_targets",
]
