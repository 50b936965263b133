"""Before the first step: LoRA presets, and a report of what a training config will cost and where it
looks wrong.

Presets (``jaxlora train CONFIG --preset NAME``) set the ``[lora]`` section to a usual setup; the
config file and ``--set`` overrides still apply on top:

- ``qv``: q_proj and v_proj, r=16, alpha=32 (the LoRA paper's choice of matrices);
- ``attention``: q, k, v, o projections, r=32, alpha=64;
- ``all-linear``: every attention and MLP projection, r=64, alpha=16, dropout 0.05 (the QLoRA paper's
  setting: adapters on all linear layers are what match full fine-tuning).

`preflight` computes the trainable share of parameters and a memory estimate (`jaxlora.cli.memory`)
from the model's config.json alone (no weights are loaded) and lists warnings for the classic
mistakes. The share is counted on the model the trainer builds, as shapes only
(`abstract_base_model`: ``nnx.eval_shape`` of the model; `jaxlora.adapters.planned_parameter_counts`
with the run's LoRA config), so it follows the same matching as the run (regexes, layers_to_transform,
exclude_modules, rank_pattern) and counts what the run trains (DoRA magnitudes, lora_bias,
modules_to_save copies): a full-fine-tuning learning rate with LoRA, lora_alpha equal to r, a 4-bit run that would
fit only with gradient checkpointing, a chat model trained without its own prompt template, and an
estimate above the memory available.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from flax import nnx

from jaxlora.adapters import planned_parameter_counts, target_names
from jaxlora.models.llama import LlamaForCausalLM, count_parameters
from jaxlora.models.llama_config import LlamaConfig
from jaxlora.train.config import TrainConfig
from jaxlora.cli.memory import MemoryEstimate, ModelShape, estimate_memory, format_estimate

PRESETS: dict[str, dict] = {
    "qv": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
    "attention": {"r": 32, "lora_alpha": 64, "lora_dropout": 0.05,
                  "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "all-linear": {"r": 64, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"},
}
LORA_MIN_LEARNING_RATE = 5e-5
"""Below this, a LoRA run is almost certainly using a full-fine-tuning rate (those are 1e-5 to 5e-5;
LoRA's usual rates are 1e-4 to 1e-3, because B starts at zero and the update is scaled by alpha/r)."""


def apply_preset(tree: dict, name: str) -> dict:
    """The config tree with the ``[lora]`` section set from preset `name` (keys in the tree win)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return {**tree, "lora": {**PRESETS[name], **tree.get("lora", {})}}


@dataclasses.dataclass(frozen=True)
class Preflight:
    trainable: int
    total: int
    estimate: MemoryEstimate
    available_bytes: int | None
    warnings: tuple[str, ...]

    def report(self) -> str:
        share = 100 * self.trainable / self.total
        lines = [f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {share:.4f}",
                 format_estimate(self.estimate, "memory estimate")]
        if self.available_bytes is not None:
            lines.append(f"memory available: {self.available_bytes / 2**30:.2f} GiB "
                         f"(estimate {self.estimate.total() / 2**30:.2f} GiB)")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def available_memory_bytes() -> int | None:
    """Memory the run can use: the accelerator's limit if jax has one, else the host's available RAM."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}  # this process's own (several processes: the others' are not addressable)
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def abstract_base_model(model_config: LlamaConfig) -> LlamaForCausalLM:
    """The base model of ``model_config`` as shapes and dtypes only (``nnx.eval_shape``): nothing is
    allocated or loaded."""
    return nnx.eval_shape(lambda: LlamaForCausalLM(model_config, rngs=nnx.Rngs(0)))


def parameter_counts(config: TrainConfig, base) -> tuple[int, int]:
    """``(trainable, all)`` of the run, as the trainer's `PeftModel.get_nb_trainable_parameters` (everything
    trains in full fine-tuning), from the same matching (`planned_parameter_counts`).

    Raises:
      AdapterError: the LoRA config does not fit the model (e.g. targets that match nothing).
    """
    if config.run.full_finetune:
        total = count_parameters(base, nnx.Param)
        return total, total
    return planned_parameter_counts(base, config.lora)


def adapted_projections(config: TrainConfig, base) -> list[str]:
    """The short names (``q_proj``, ``lm_head``) of the layers the run gives LoRA, for the memory estimate."""
    if config.run.full_finetune:
        return []
    return sorted({name.rsplit(".", 1)[-1] for name in target_names(base, config.lora)})


def estimate_for(config: TrainConfig, model_config: LlamaConfig, platform: str, targets=None) -> MemoryEstimate:
    """The memory estimate of the run; ``targets``: the adapted projections (default: from the abstract model)."""
    method = "full" if config.run.full_finetune else ("qlora" if config.model.quantize else "lora")
    if targets is None:
        targets = adapted_projections(config, abstract_base_model(model_config))
    return estimate_memory(
        ModelShape.from_config(model_config), method=method, rank=config.lora.r, targets=targets or "all-linear",
        batch=config.run.batch_size, seq=config.data.max_seq_length,
        grad_ckpt=config.model.gradient_checkpointing, offload=config.optim.offload_optimizer_state,
        dtype=config.model.dtype, compute_dtype=config.model.compute_dtype,
        quant=config.model.quantize or "nf4", double_quant=config.model.double_quant,
        blocksize=config.model.blocksize, platform=platform)


def preflight(config: TrainConfig, model_dir, *, available_bytes: int | None = None,
              platform: str | None = None) -> Preflight:
    """What `config` will train and cost on the model in `model_dir`, and what looks wrong."""
    import jax

    model_dir = Path(model_dir)
    model_config = LlamaConfig.from_file(model_dir / "config.json")
    platform = platform or jax.devices()[0].platform
    base = abstract_base_model(model_config)
    targets = adapted_projections(config, base)
    estimate = estimate_for(config, model_config, platform, targets)
    trainable, total = parameter_counts(config, base)
    if available_bytes is None:
        available_bytes = available_memory_bytes()

    warnings = []
    if not config.run.full_finetune:
        if config.optim.learning_rate < LORA_MIN_LEARNING_RATE:
            warnings.append(f"learning_rate={config.optim.learning_rate:g} is a full-fine-tuning rate; LoRA usually "
                            f"needs 1e-4 to 3e-4 (B starts at zero and updates are scaled by alpha/r)")
        if config.lora.lora_alpha == config.lora.r and not config.lora.use_rslora:
            warnings.append(f"lora_alpha == r == {config.lora.r}: the scaling alpha/r is 1, so raising r later changes "
                            "the effective learning rate; the usual choice is lora_alpha = 2 * r (or use_rslora)")
    if available_bytes is not None and estimate.total() > available_bytes:
        hint = ""
        if not config.model.gradient_checkpointing:
            with_ckpt = estimate_for(_with(config, "model", gradient_checkpointing=True), model_config, platform, targets)
            if with_ckpt.total() <= available_bytes:
                hint = (f"; with model.gradient_checkpointing = true it needs {with_ckpt.total() / 2**30:.2f} GiB "
                        "and fits")
        what = "4-bit base without gradient checkpointing" if config.model.quantize and hint else "this run"
        warnings.append(f"{what}: estimated {estimate.total() / 2**30:.2f} GiB, more than the "
                        f"{available_bytes / 2**30:.2f} GiB available{hint}")
    has_template = _has_chat_template(model_dir)
    if has_template and config.data.template != "tokenizer":
        warnings.append(f"{model_dir.name} has a chat template but data.template = {config.data.template!r}: "
                        "a chat model trained on another prompt format loses its instruction following; "
                        'use data.template = "tokenizer"')
    return Preflight(trainable, total, estimate, available_bytes, tuple(warnings))


def _with(config: TrainConfig, section: str, **changes) -> TrainConfig:
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})


def _has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    path = model_dir / "tokenizer_config.json"
    return path.is_file() and bool(json.loads(path.read_text()).get("chat_template"))


__all__ = ["PRESETS", "Preflight", "abstract_base_model", "adapted_projections", "apply_preset",
           "available_memory_bytes", "estimate_for", "parameter_counts", "preflight"]
