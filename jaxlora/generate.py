"""Text generation with a KV cache: one jitted prefill over the prompts, then one jitted decode step
(``[batch, 1]`` input and the cache) per new token.

    generator = Generator(model)                     # LlamaForCausalLM, or a PeftModel around one
    tokens = generator(prompts, GenerationConfig(max_new_tokens=32, eos_token_id=2))
    ... train ...
    tokens = generator(prompts, config)              # same compiled functions, the new weights

Semantics follow transformers' ``generate``: greedy decoding or sampling with, in this order,
repetition penalty, temperature, top-k and top-p (`process_logits`); each row stops at its first EOS
(not returned) or after ``max_new_tokens``.

Batch layout. Prompts of different lengths share one batch, left-padded to a common width, with
positions ``cumsum(mask) - 1``: every row computes what it computes alone (padding is masked, and
the model's cache masks causally by cache slot while positions only rotate keys and queries). All
rows append at the same cache slot, so one batched ``[b, 1]`` step decodes every row. Prefill and
decode compute logits for the last position only (``[b, vocab]``, not ``[b, P, vocab]``).

Compilation. The model is split once per structure (``nnx.split``); the structure is closed over
and the weights are a jit argument, so new weights (training, ``nnx.update``) reuse the compiled
functions. Prompt lengths are padded up to a multiple of ``bucket`` and the output buffer to a
multiple of ``bucket`` too, so prompts and ``max_new_tokens`` of similar size share one compilation.
Generation always runs the model in eval mode (no LoRA dropout), whatever mode it is in. A model
whose layers are stacked (`jaxlora.models.scan.stack_layers`) runs them as one scanned body over one
stacked KV cache, so prefill and decoding compile in about the same time at any depth.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.models import KVCache, LlamaConfig
from jaxlora.models.scan import StackedLayers

DECODE_LOOPS = ("while_loop", "python")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _padded_eos(eos_ids: tuple[int, ...]) -> list[int]:
    return list(eos_ids) + [-1] * (_round_up(max(len(eos_ids), 1), 4) - len(eos_ids))


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How to generate (transformers' ``GenerationConfig`` names and meanings)."""

    max_new_tokens: int = 64
    """Most tokens generated per prompt."""
    do_sample: bool = False
    """Sample from the processed distribution; greedy (argmax) when False."""
    temperature: float = 1.0
    """Logits are divided by it (sampling only)."""
    top_k: int = 0
    """Keep the k highest logits (ties with the k-th kept); 0 = off (sampling only)."""
    top_p: float = 1.0
    """Keep the smallest set of most probable tokens whose probability reaches top_p; 1.0 = off."""
    repetition_penalty: float = 1.0
    """Logits of tokens seen so far (prompt included): positive ones divided by it, negative ones
    multiplied; 1.0 = off. Applied in greedy mode too, as transformers does."""
    seed: int = 0
    """Sampling seed: the same seed gives the same tokens."""
    eos_token_id: int | tuple[int, ...] | None = None
    """A row stops when it emits one of these (not included in the output)."""
    pad_token_id: int = 0
    """Fills prompt padding and finished rows."""

    def __post_init__(self):
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return (self.eos_token_id,) if isinstance(self.eos_token_id, int) else tuple(self.eos_token_id)


# -- logits processing: logits [batch, vocab] float32 -> same, transformers' definitions ---------------


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty) -> jax.Array:
    """Seen tokens (``seen [b, vocab]`` bool): ``l / penalty`` if ``l >= 0`` else ``l * penalty``."""
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def apply_temperature(logits: jax.Array, temperature) -> jax.Array:
    return logits / temperature


def apply_top_k(logits: jax.Array, top_k) -> jax.Array:
    """Logits below the k-th largest become -inf (ties with it stay); ``top_k`` may be traced, >= 1."""
    k = jnp.clip(jnp.asarray(top_k, jnp.int32), 1, logits.shape[-1])
    descending = -jnp.sort(-logits, axis=-1)
    kth = jax.lax.dynamic_index_in_dim(descending, k - 1, axis=-1, keepdims=True)  # [b, 1]
    return jnp.where(logits < kth, -jnp.inf, logits)


def apply_top_p(logits: jax.Array, top_p) -> jax.Array:
    """Nucleus filtering: in ascending order, tokens whose cumulative probability is ``<= 1 - top_p``
    become -inf; the most probable token always stays."""
    order = jnp.argsort(logits, axis=-1)
    ascending = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove_sorted = (cumulative <= 1 - top_p).at[:, -1].set(False)
    rows = jnp.arange(logits.shape[0])[:, None]
    remove = jnp.zeros(logits.shape, bool).at[rows, order].set(remove_sorted)
    return jnp.where(remove, -jnp.inf, logits)


class SamplingParams(NamedTuple):
    """The traced (non-recompiling) part of a `GenerationConfig`."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    repetition_penalty: jax.Array
    key: jax.Array
    eos_ids: jax.Array  # [4 * k] int32, padded with -1 (never a token) so that 1 to 4 ids share a shape
    pad_token_id: jax.Array
    max_new_tokens: jax.Array

    @classmethod
    def from_config(cls, config: GenerationConfig) -> SamplingParams:
        return cls(jnp.float32(config.temperature), jnp.int32(config.top_k), jnp.float32(config.top_p),
                   jnp.float32(config.repetition_penalty), jax.random.key(config.seed),
                   jnp.asarray(_padded_eos(config.eos_ids), jnp.int32), jnp.int32(config.pad_token_id),
                   jnp.int32(config.max_new_tokens))


class Switches(NamedTuple):
    """The static (compiled-in) part of a `GenerationConfig`."""

    do_sample: bool
    use_top_k: bool
    use_top_p: bool

    @classmethod
    def from_config(cls, config: GenerationConfig) -> Switches:
        return cls(config.do_sample, config.do_sample and config.top_k > 0, config.do_sample and config.top_p < 1.0)


def process_logits(logits, seen, params: SamplingParams, *, do_sample: bool, use_top_k: bool, use_top_p: bool):
    """transformers' order: repetition penalty; then, when sampling, temperature, top-k, top-p."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if do_sample:
        logits = apply_temperature(logits, params.temperature)
        if use_top_k:
            logits = apply_top_k(logits, params.top_k)
        if use_top_p:
            logits = apply_top_p(logits, params.top_p)
    return logits


def next_tokens(logits, seen, params: SamplingParams, switches: Switches, step):
    """``[b]`` int32: argmax of the processed logits, or a draw from them with a key fixed by (seed, step)."""
    logits = process_logits(logits, seen, params, **switches._asdict())
    if not switches.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(jax.random.fold_in(params.key, step), logits, axis=-1).astype(jnp.int32)


# -- the decoding state --------------------------------------------------------------------------------


class DecodeState(NamedTuple):
    """What the decode loop carries."""

    cache: KVCache
    position: jax.Array  # [b] int32: the position of the next token of each row (its length so far)
    last: jax.Array  # [b] the token emitted last (input of the next step)
    seen: jax.Array  # [b, vocab] bool: tokens so far, for the repetition penalty
    done: jax.Array  # [b] bool: the row has emitted EOS
    out: jax.Array  # [b, out_len] int32 emitted tokens (pad after EOS)
    step: jax.Array  # int32: number of tokens emitted


def _emit(state: DecodeState, token, params: SamplingParams) -> DecodeState:
    token = jnp.where(state.done, params.pad_token_id, token)
    out = jax.lax.dynamic_update_slice(state.out, token[:, None], (0, state.step))
    done = state.done | jnp.any(token[:, None] == params.eos_ids[None, :], axis=-1)
    seen = state.seen.at[jnp.arange(token.shape[0]), token].set(True)
    return state._replace(last=token, seen=seen, done=done, out=out, step=state.step + 1)


def find_llama(model: nnx.Module) -> nnx.Module:
    """The module inside ``model`` (or ``model`` itself) whose ``config`` is a `LlamaConfig`."""
    for _, node in nnx.iter_graph(model):
        if isinstance(getattr(node, "config", None), LlamaConfig):
            return node
    raise TypeError(f"{type(model).__name__} holds no module with a LlamaConfig `.config`; "
                    "generation needs a LlamaForCausalLM (or a PeftModel around one)")


def _eval_graphdef(graphdef, state):
    copy = nnx.merge(graphdef, state)
    copy.eval()
    return nnx.graphdef(copy)


class _Compiled:
    """The jitted prefill / decode functions of one model structure."""

    def __init__(self, graphdef, config: LlamaConfig, cache_dtype, counts: dict[str, int]):
        self.graphdef = graphdef

        def last_logits(model, ids, mask, positions, cache):
            llama = find_llama(model)
            hidden, cache = llama.hidden_states(ids, mask, position_ids=positions, cache=cache)
            return llama.logits(hidden[:, -1]), cache

        def prefill(state, ids, mask, lengths, params, *, cache_len, out_len, switches):
            counts["prefill"] += 1
            model = nnx.merge(graphdef, state)
            b = ids.shape[0]
            positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
            cache = KVCache.create(config, b, cache_len, cache_dtype,
                                   stacked=isinstance(find_llama(model).model.layers, StackedLayers))
            logits, cache = last_logits(model, ids, mask, positions, cache)  # left-padded: last slot = last token
            vocab = logits.shape[-1]
            # Padding indexes the extra column vocab, which is dropped (it is never a token).
            marked = jnp.where(mask, ids, vocab)
            seen = jnp.zeros((b, vocab + 1), bool).at[jnp.arange(b)[:, None], marked].set(True)[:, :vocab]
            start = DecodeState(cache, lengths, jnp.zeros((b,), jnp.int32), seen, jnp.zeros((b,), bool),
                                jnp.full((b, out_len), params.pad_token_id, jnp.int32), jnp.int32(0))
            return _emit(start, next_tokens(logits, seen, params, switches, 0), params)

        def step(model, dstate: DecodeState, params, switches) -> DecodeState:
            b = dstate.last.shape[0]
            logits, cache = last_logits(model, dstate.last[:, None], jnp.ones((b, 1), bool), dstate.position[:, None],
                                        dstate.cache)
            token = next_tokens(logits, dstate.seen, params, switches, dstate.step)
            return _emit(dstate._replace(cache=cache, position=dstate.position + 1), token, params)

        def decode_step(state, dstate, params, *, switches):
            counts["decode"] += 1
            return step(nnx.merge(graphdef, state), dstate, params, switches)

        def decode_loop(state, dstate, params, *, switches):
            counts["decode"] += 1
            model = nnx.merge(graphdef, state)

            def running(d):
                return (d.step < params.max_new_tokens) & ~jnp.all(d.done)

            return jax.lax.while_loop(running, lambda d: step(model, d, params, switches), dstate)

        static = ("switches",)
        self.prefill = jax.jit(prefill, static_argnames=("cache_len", "out_len", "switches"))
        self.decode_step = jax.jit(decode_step, static_argnames=static, donate_argnums=1)
        self.decode_loop = jax.jit(decode_loop, static_argnames=static, donate_argnums=1)


class Generator:
    """Holds the jitted prefill and decode functions for one model structure, so that repeated calls
    (e.g. before and after training, same graph, new weights) do not recompile.

    Args:
      model: a `LlamaForCausalLM` or anything callable like it with a reachable `LlamaConfig`
        (a `jaxlora.PeftModel`, a 4-bit model). Its weights are read at each call.
      bucket: prompt lengths and the output buffer are padded to multiples of this (default 32).
      decode_loop: "while_loop" (default: the decode loop is one jitted ``lax.while_loop`` that stops
        when every row is done) or "python" (a Python loop over a jitted step, checking for the end
        after every token).

    ``trace_counts`` counts how often the prefill and decode functions were traced (compiled).
    """

    def __init__(self, model: nnx.Module, *, bucket: int = 32, decode_loop: str = "while_loop"):
        if decode_loop not in DECODE_LOOPS:
            raise ValueError(f"decode_loop {decode_loop!r}; expected one of {DECODE_LOOPS}")
        if bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {bucket}")
        self.model = model
        self.bucket = bucket
        self.decode_loop = decode_loop
        llama = find_llama(model)
        self.config: LlamaConfig = llama.config
        self.cache_dtype = jnp.dtype(getattr(llama, "compute_dtype", jnp.float32))
        self.trace_counts = {"prefill": 0, "decode": 0}
        self._by_graphdef: list[tuple[object, _Compiled]] = []  # graphdefs are unhashable: a list

    def _compiled(self, graphdef, state) -> _Compiled:
        for known, compiled in self._by_graphdef:
            if known == graphdef:
                return compiled
        eval_graphdef = _eval_graphdef(graphdef, state)  # a train-mode model shares the eval one's functions
        compiled = next((c for _, c in self._by_graphdef if c.graphdef == eval_graphdef), None)
        if compiled is None:
            compiled = _Compiled(eval_graphdef, self.config, self.cache_dtype, self.trace_counts)
        self._by_graphdef.append((graphdef, compiled))
        return compiled

    def batch(self, prompts: Sequence[Sequence[int]], pad_token_id: int):
        """``(ids, mask, lengths)``: ``[b, P]`` int32 with each prompt at the end of its row (left
        padding), P the longest prompt rounded up to ``bucket``."""
        if len(prompts) == 0:
            raise ValueError("prompts is empty; expected at least one prompt")
        vocab = self.config.vocab_size
        lengths = [len(p) for p in prompts]
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty; each prompt needs at least one token")
            bad = [int(t) for t in prompt if not 0 <= int(t) < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token ids {bad[:5]} outside [0, {vocab}) (vocab_size)")
        if not 0 <= pad_token_id < vocab:
            raise ValueError(f"pad_token_id {pad_token_id} is outside [0, {vocab}) (vocab_size)")
        width = _round_up(max(lengths), self.bucket)
        ids = np.full((len(prompts), width), pad_token_id, np.int32)
        for i, prompt in enumerate(prompts):
            ids[i, width - lengths[i]:] = np.asarray(prompt, np.int32)
        mask = np.arange(width)[None, :] >= width - np.asarray(lengths)[:, None]
        return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(lengths, jnp.int32)

    def __call__(self, prompts: Sequence[Sequence[int]], config: GenerationConfig, model: nnx.Module | None = None,
                 ) -> list[list[int]]:
        """Per prompt, the generated token ids (without the prompt and without the EOS).

        ``model``: another model of the same architecture to generate with (e.g. a trained copy);
        default: the one given at construction, with its current weights.
        """
        prompts = list(prompts)
        ids, mask, lengths = self.batch(prompts, config.pad_token_id)
        longest = max(len(p) for p in prompts)
        if longest + config.max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(f"prompt length {longest} + max_new_tokens {config.max_new_tokens} = "
                             f"{longest + config.max_new_tokens} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if model is not None and find_llama(model).config != self.config:
            raise ValueError(f"model has config {find_llama(model).config}, "
                             f"but this Generator was built for {self.config}")
        graphdef, state = nnx.split(self.model if model is None else model)
        compiled = self._compiled(graphdef, state)
        out_len = _round_up(config.max_new_tokens, self.bucket)
        switches = Switches.from_config(config)
        params = SamplingParams.from_config(config)
        dstate = compiled.prefill(state, ids, mask, lengths, params, cache_len=ids.shape[1] + out_len,
                                  out_len=out_len, switches=switches)
        dstate = self._decode(compiled, state, dstate, params, switches, config.max_new_tokens)
        return _cut(np.asarray(dstate.out)[:, : config.max_new_tokens], config.eos_ids)

    def _decode(self, compiled: _Compiled, state, dstate: DecodeState, params, switches, max_new_tokens: int):
        if self.decode_loop == "while_loop":
            return compiled.decode_loop(state, dstate, params, switches=switches)
        for _ in range(1, max_new_tokens):
            if bool(jnp.all(dstate.done)):
                break
            dstate = compiled.decode_step(state, dstate, params, switches=switches)
        return dstate


def _cut(out: np.ndarray, eos_ids: tuple[int, ...]) -> list[list[int]]:
    rows = []
    for row in out.tolist():
        stops = [i for i, t in enumerate(row) if t in eos_ids]
        rows.append(row[: stops[0]] if stops else row)
    return rows


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], config: GenerationConfig,
             **kwargs) -> list[list[int]]:
    """One-shot `Generator` ``(model, **kwargs)(prompts, config)``; compiles on every call."""
    return Generator(model, **kwargs)(prompts, config)


__all__ = ["GenerationConfig", "Generator", "SamplingParams", "Switches", "apply_repetition_penalty",
           "apply_temperature", "apply_top_k", "apply_top_p", "find_llama", "generate", "next_tokens",
           "process_logits"]
