"""A fingerprint of the frozen base model a run trains on, recorded in every training checkpoint.

Checkpoints hold what trains (adapters, optimizer state, dropout RNG, step), not the base: a resumed
run reloads the base from where the run took it. The fingerprint makes sure it is the same base:

- ``path``: where the base was loaded from (informative: a moved base with the same content resumes);
- ``config``: the content of its config.json;
- ``files``: per safetensors file the loader reads (``model.safetensors``, or the shards named by
  ``model.safetensors.index.json``): its size in bytes, the SHA-256 of its JSON header (names, dtypes,
  shapes, offsets of every tensor) and per tensor its dtype, shape and a SHA-256 of a sample of its
  bytes (the first and the last ``SAMPLE_BYTES`` of the tensor's data);
- ``load``: the load settings that change the frozen weights (dtype; quantize, and with it
  double_quant and blocksize).

Cost: one header read plus two ``SAMPLE_BYTES`` reads per tensor (~8 KiB; 6 MB for a 70B model's
~700 tensors), never the tensors themselves. The sample catches a rewritten checkpoint (a fine-tuned
or re-quantized copy changes the leading bytes of every tensor) but not a single changed value in the
middle of a tensor; the header and size catch any change of names, dtypes or shapes.

`compare_fingerprints` lists the fields that differ; `check_fingerprint` raises
`BaseModelMismatchError` naming both fingerprints' paths and every difference.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

SAMPLE_BYTES = 4096
"""Bytes hashed at each end of every tensor's data."""

_HEADER_LIMIT = 100 * 2**20  # safetensors' own limit on the header size


class BaseModelMismatchError(ValueError):
    """A checkpoint's base model fingerprint differs from the base model there now.

    Attributes: ``recorded`` / ``current`` (the two fingerprints), ``differences`` (one line per field).
    """

    def __init__(self, message: str, *, recorded: dict, current: dict, differences: list[str]):
        super().__init__(message)
        self.recorded, self.current, self.differences = recorded, current, differences


class FingerprintError(ValueError):
    """A base model directory whose safetensors files cannot be fingerprinted (missing or malformed)."""


def weight_files(model_dir: Path) -> list[str]:
    """The safetensors files the loader reads: the index's shards, or model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise FingerprintError(f"{index}: no readable 'weight_map' ({err!r})") from err
    if (model_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise FingerprintError(f"{model_dir}: neither model.safetensors nor model.safetensors.index.json")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_fingerprint(path: Path) -> dict[str, Any]:
    """``{"bytes", "header_sha256", "tensors": {name: {"dtype", "shape", "sample_sha256"}}}`` of a safetensors file.

    Format: 8 bytes little-endian header length n, n bytes of JSON header, then the data; each
    tensor's ``data_offsets`` are relative to the end of the header.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise FingerprintError(f"{path}: {size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(_HEADER_LIMIT, size - 8):
            raise FingerprintError(f"{path}: header length {length} does not fit in the file ({size} bytes)")
        raw = f.read(length)
        try:
            header = json.loads(raw)
        except ValueError as err:
            raise FingerprintError(f"{path}: the header is not JSON ({err})") from err
        tensors = {}
        for name, info in sorted(header.items()):
            if name == "__metadata__":
                continue
            try:
                start, end = (8 + length + int(offset) for offset in info["data_offsets"])
                dtype, shape = str(info["dtype"]), [int(n) for n in info["shape"]]
            except (KeyError, TypeError, ValueError) as err:
                raise FingerprintError(f"{path}: tensor {name!r} has no valid dtype/shape/data_offsets") from err
            sample = hashlib.sha256()
            for offset in sorted({start, max(start, end - SAMPLE_BYTES)}):
                f.seek(offset)
                sample.update(f.read(min(SAMPLE_BYTES, end - offset)))
            tensors[name] = {"dtype": dtype, "shape": shape, "sample_sha256": sample.hexdigest()[:16]}
    return {"bytes": size, "header_sha256": _digest(raw), "tensors": tensors}


def load_settings(dtype: str, quantize: str | None, double_quant: bool, blocksize: int) -> dict[str, Any]:
    """The load settings that change the frozen weights (double_quant and blocksize only when quantized)."""
    settings: dict[str, Any] = {"dtype": dtype, "quantize": quantize}
    if quantize is not None:
        settings.update(double_quant=double_quant, blocksize=blocksize)
    return settings


def base_fingerprint(model_dir, settings: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint (module docstring) of the HF model directory ``model_dir`` loaded with ``settings``."""
    model_dir = Path(model_dir).absolute()
    config_path = model_dir / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise FingerprintError(f"{config_path}: cannot be read as JSON ({err})") from err
    files = {name: file_fingerprint(model_dir / name) for name in weight_files(model_dir)}
    return {"path": str(model_dir), "config": config, "files": files, "load": dict(settings)}


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _compare_dicts(recorded: dict, current: dict, where: str) -> list[str]:
    out = []
    for key in sorted(set(recorded) | set(current), key=str):
        if key not in current:
            out.append(f"{where}.{key}: recorded {_short(recorded[key])}, now absent")
        elif key not in recorded:
            out.append(f"{where}.{key}: not recorded, now {_short(current[key])}")
        elif recorded[key] != current[key]:
            out.append(f"{where}.{key}: recorded {_short(recorded[key])}, now {_short(current[key])}")
    return out


def compare_fingerprints(recorded: dict, current: dict) -> list[str]:
    """One line per differing field (``load.quantize: recorded "nf4", now null``); [] if the same base.

    The path is not compared: the same files elsewhere are the same base.
    """
    differences = _compare_dicts(recorded.get("load", {}), current.get("load", {}), "load")
    differences += _compare_dicts(recorded.get("config", {}), current.get("config", {}), "config")
    old_files, new_files = recorded.get("files", {}), current.get("files", {})
    if sorted(old_files) != sorted(new_files):
        differences.append(f"files: recorded {sorted(old_files)}, now {sorted(new_files)}")
    for name in sorted(set(old_files) & set(new_files)):
        old, new = old_files[name], new_files[name]
        if old == new:
            continue
        tensor_lines = _compare_dicts(old.get("tensors", {}), new.get("tensors", {}), f"files[{name}].tensors")
        differences += tensor_lines
        if old.get("bytes") != new.get("bytes"):
            differences.append(f"files[{name}].bytes: recorded {old.get('bytes')}, now {new.get('bytes')}")
        if old.get("header_sha256") != new.get("header_sha256") and not tensor_lines:
            differences.append(f"files[{name}].header_sha256: recorded {old.get('header_sha256')}, "
                               f"now {new.get('header_sha256')} (same tensors; metadata or layout changed)")
    return differences


def check_fingerprint(recorded: dict, current: dict, *, checkpoint: str) -> None:
    """Raise `BaseModelMismatchError` if ``current`` is not the base ``recorded`` in ``checkpoint``."""
    differences = compare_fingerprints(recorded, current)
    if differences:
        shown = differences[:10] + ([f"... and {len(differences) - 10} more"] if len(differences) > 10 else [])
        raise BaseModelMismatchError(
            f"{checkpoint} was trained on the base model at {recorded.get('path')}, but the base model at "
            f"{current.get('path')} differs from it ({len(differences)} field(s)): " + "; ".join(shown)
            + ". Resume with the base the checkpoint recorded (model.path and its load settings), or start a new "
              "run.output_dir.", recorded=recorded, current=current, differences=differences)


__all__ = ["BaseModelMismatchError", "FingerprintError", "base_fingerprint", "check_fingerprint",
           "compare_fingerprints", "file_fingerprint", "load_settings", "weight_files"]
