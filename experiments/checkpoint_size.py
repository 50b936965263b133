"""Size on disk of one training checkpoint: SmolLM2-135M QLoRA with the quickstart's settings.

    python experiments/checkpoint_size.py --steps 2 --out /tmp/ckpt_size.json

Trains ``--steps`` steps with `jaxlora.quickstart.run.train_config` (NF4 + double quant, LoRA r=16 on
every linear layer, 4 packed rows of 256 tokens), saving a checkpoint after every step, then reports
for the latest checkpoint: bytes on disk (all files under ``checkpoints/<step>/``) and the bytes of
the arrays it holds per top-level part (from orbax's metadata: shape x itemsize), plus the size of
the base model's safetensors file for comparison. Works on any jaxlora version whose trainer writes
``checkpoints/<step>/state`` with orbax (before and after checkpoints stopped holding frozen weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def tree_bytes(metadata) -> dict[str, int]:
    """Bytes per top-level key of an orbax state tree's metadata (shape x itemsize of each array)."""
    import jax

    out = {}
    for key, subtree in metadata.items():
        leaves = jax.tree.leaves(subtree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
        out[key] = int(sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in leaves))
    return out


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def main() -> None:
    import orbax.checkpoint as ocp

    from jaxlora.quickstart.run import QuickstartOptions, train_config
    from jaxlora.train.trainer import resolve_model_path, train

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = train_config(QuickstartOptions(steps=args.steps, output_dir=str(Path(tmp) / "run")))
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, save_every=1))
        t0 = time.time()
        train(config)
        wall = time.time() - t0
        checkpoints = Path(tmp) / "run" / "checkpoints"
        step = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
        step_dir = checkpoints / str(step)
        metadata = ocp.StandardCheckpointer().metadata(step_dir / "state")
        tree = getattr(metadata, "item_metadata", metadata)
        base = resolve_model_path("smollm2") / "model.safetensors"
        result = {
            "step": step, "disk_bytes": disk_bytes(step_dir), "array_bytes": tree_bytes(dict(tree)),
            "base_safetensors_bytes": base.stat().st_size, "wall_seconds": wall,
            "files": {str(p.relative_to(step_dir)): p.stat().st_size for p in sorted(step_dir.rglob("*")) if p.is_file()},
            "machine": f"{platform.processor() or platform.machine()}, {platform.platform()}",
        }
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "files"}, indent=2))


if __name__ == "__main__":
    main()
