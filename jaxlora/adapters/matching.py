"""Which modules an adapter touches: PEFT 0.21's matching rules, on module paths.

A module path is the dotted attribute path inside the model; for `LlamaForCausalLM` these are
transformers' names (``model.layers.0.self_attn.q_proj``), so a PEFT config selects the same modules
on both sides. The rules (PEFT's ``check_target_module_exists``), for a path ``key``:

1. ``exclude_modules``: a str excludes ``key`` when it fullmatches it as a regex; a list when ``key``
   equals an entry or ends with ``"." + entry``.
2. A module under a ``modules_to_save`` entry ``m`` (``re.match(r"(^|.*\\.)" + m + r"($|\\..*)", key)``)
   is never a LoRA target.
3. ``target_modules`` a str: a regex that must fullmatch ``key``; no layer filter.
4. ``target_modules`` a list: ``key`` equal to an entry is a target, with no layer filter. Otherwise it
   is a target when it ends with ``"." + entry`` and, if ``layers_to_transform`` is set (an int, or a
   non-empty list), its layer index is in it. The index is the number of the first
   ``<pattern>.<digits>.`` segment, the pattern at the start of ``key`` or after a dot (patterns tried
   in order, each a regex); with ``layers_pattern`` None, "" or [] it is the first
   ``.<anything>.<digits>.`` segment. A key without one is not a target.

``"all-linear"`` (any case) stands for the full paths of all linear layers except the output layer.
``rank_pattern`` / ``alpha_pattern``: the first pattern ``p`` (in dict order) with
``re.match(r"(.*\\.)?(" + p + r")$", key)`` gives the value. ``modules_to_save`` selects every module
whose path ends with an entry: a plain string suffix test, so ``"head"`` also selects ``lm_head``.

Not reproduced: PEFT rewrites a target list of 20 or more entries into the shortest suffixes that
select the same modules; with exact full names and ``layers_to_transform`` together that rewrite can
change what the layer filter sees.
"""

from __future__ import annotations

import re

from flax import nnx

from jaxlora.adapters.config import DEFAULT_TARGETS, AdapterError, LoraConfig
from jaxlora.adapters.modules_to_save import ModulesToSaveWrapper
from jaxlora.nn import Linear, Linear4bit, LoraLinear

ALL_LINEAR = "all-linear"
OUTPUT_LAYER_NAMES = ("lm_head",)
"""Paths of the output layer, which "all-linear" leaves out (PEFT: the model's output embeddings)."""
LINEAR_TYPES = (Linear, Linear4bit, LoraLinear)


class Excluded:
    """`target_module_matches` result for a module that exclude_modules or modules_to_save rule out."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "Excluded"


EXCLUDED = Excluded()


def layer_index(key: str, layers_pattern: str | list[str] | None) -> int | None:
    """The decoder-layer index in module path ``key`` (rule 4 of the module docstring), or None."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return None if match is None else int(match.group("idx"))


def _selects(spec: list[str] | str | None, key: str) -> bool:
    """Rule 1's test: a str fullmatches as a regex; a list matches exactly or as a "."-suffix."""
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return key in spec or any(key.endswith("." + entry) for entry in spec)


def under_modules_to_save(modules_to_save: list[str] | None, key: str) -> bool:
    """Rule 2: ``key`` is, or is inside, a module named by a modules_to_save entry (entries are regexes)."""
    return any(re.match(rf"(^|.*\.){entry}($|\..*)", key) for entry in modules_to_save or ())


def target_module_matches(config: LoraConfig, key: str, targets=None) -> bool | Excluded:
    """Whether module path ``key`` gets LoRA under ``config`` (rules 1-4); `EXCLUDED` when ruled out.

    ``targets`` replaces ``config.target_modules`` (e.g. "all-linear" resolved by `resolve_targets`).
    """
    targets = config.target_modules if targets is None else targets
    if _selects(config.exclude_modules, key) or under_modules_to_save(config.modules_to_save, key):
        return EXCLUDED
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith("." + entry) for entry in targets):
        return False
    wanted = config.layers_to_transform
    if wanted is None or (isinstance(wanted, list) and not wanted):
        return True
    index = layer_index(key, config.layers_pattern)
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


def pattern_key(patterns, key: str) -> str:
    """The first of ``patterns`` with ``re.match(r"(.*\\.)?(" + p + r")$", key)``, else ``key`` itself."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def rank_and_alpha(config: LoraConfig, key: str) -> tuple[int, float]:
    """``(r, lora_alpha)`` of module ``key`` after rank_pattern / alpha_pattern (formats.md A.6)."""
    r = config.rank_pattern.get(pattern_key(config.rank_pattern, key), config.r)
    alpha = config.alpha_pattern.get(pattern_key(config.alpha_pattern, key), config.lora_alpha)
    return r, alpha


def _path_key(path) -> tuple:
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in path)


def named_modules(model: nnx.Module) -> dict[str, nnx.Module]:
    """Path -> module, parents before children, without the root and without the inside of adapter
    layers (`LoraLinear`, `ModulesToSaveWrapper`), which PEFT's matching skips too."""
    found = sorted(((path, node) for path, node in nnx.iter_graph(model) if path and isinstance(node, nnx.Module)),
                   key=lambda item: _path_key(item[0]))
    modules: dict[str, nnx.Module] = {}
    sealed: list[str] = []
    for path, node in found:
        name = ".".join(str(p) for p in path)
        if any(name.startswith(prefix + ".") for prefix in sealed):
            continue
        modules[name] = node
        if isinstance(node, (LoraLinear, ModulesToSaveWrapper)):
            sealed.append(name)
    return modules


def resolve_targets(config: LoraConfig, modules: dict[str, nnx.Module]):
    """``target_modules`` with None -> the architecture default and "all-linear" -> the full paths of the
    linear layers except the output layer (a sorted list)."""
    targets = config.target_modules
    if targets is None:
        return list(DEFAULT_TARGETS)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return sorted(n for n, m in modules.items() if isinstance(m, LINEAR_TYPES) and n not in OUTPUT_LAYER_NAMES)
    return targets


def target_names(model: nnx.Module, config: LoraConfig) -> list[str]:
    """The module paths that ``config`` gives LoRA in ``model`` (PEFT's rules), parents first.

    Raises:
      AdapterError: nothing matches (the message lists the linear layers), or a match is not a linear
        layer (PEFT refuses those too; LoRA on embeddings is not implemented here).
    """
    modules = named_modules(model)
    targets = resolve_targets(config, modules)
    chosen, excluded = [], []
    for name, module in modules.items():
        result = target_module_matches(config, name, targets)
        if result is EXCLUDED:
            excluded.append(name)
        elif result:
            if not isinstance(module, LINEAR_TYPES):
                raise AdapterError(f"target_modules {config.target_modules!r} selects {name}, a {type(module).__name__}: "
                                   "LoRA applies to linear layers only")
            chosen.append(name)
    if not chosen:
        linear = [n for n, m in modules.items() if isinstance(m, LINEAR_TYPES)]
        raise AdapterError(
            f"target_modules {config.target_modules!r} (layers_to_transform={config.layers_to_transform}, "
            f"layers_pattern={config.layers_pattern!r}, exclude_modules={config.exclude_modules!r}) match no linear layer "
            f"of the model{f' ({len(excluded)} excluded)' if excluded else ''}; "
            f"available: {sorted({n.split('.')[-1] for n in linear})} e.g. {linear[:4]}")
    return chosen


def modules_to_save_names(model: nnx.Module, entries: list[str] | None, pending: tuple[str, ...] = ()) -> list[str]:
    """The module paths that ``modules_to_save`` selects: every path that ends with an entry.
    ``pending``: paths of modules made before wrapping (a tied model's ``lm_head``, `jaxlora.adapters.tied`).

    Raises:
      AdapterError: an entry that selects nothing, a selected module inside another selected one, or a
        selected LoRA layer.
    """
    if not entries:
        return []
    modules = named_modules(model)
    chosen = [name for name in [*pending, *modules] if any(name.endswith(entry) for entry in entries)]
    for entry in entries:
        if not any(name.endswith(entry) for name in chosen):
            raise AdapterError(f"modules_to_save entry {entry!r} matches no module of the model; "
                               f"modules: {[n for n in modules if n.count('.') <= 1][:8]} ...")
    for name in chosen:
        if isinstance(modules.get(name), LoraLinear):
            raise AdapterError(f"modules_to_save selects {name}, which carries LoRA: a module cannot be both")
        inner = [other for other in chosen if other.startswith(name + ".")]
        if inner:
            raise AdapterError(f"modules_to_save selects {name} and modules inside it ({inner[:3]}); select one or the other")
    return chosen


__all__ = ["ALL_LINEAR", "EXCLUDED", "OUTPUT_LAYER_NAMES", "layer_index", "modules_to_save_names", "named_modules",
           "pattern_key", "rank_and_alpha", "resolve_targets", "target_module_matches", "target_names",
           "under_modules_to_save"]
