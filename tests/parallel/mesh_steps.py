"""Run by tests/parallel/test_mesh_training.py in a process of its own, with JAX_NUM_CPU_DEVICES=8 set
before jax starts: 4 training steps of a tiny Llama (LoRA or QLoRA, layers stacked and scanned) on one
device and on each mesh given, the same seed and global batch; prints one JSON object of results.

    python -m tests.parallel.mesh_steps KIND OFFLOAD MESH...     # MESH: data,fsdp,tensor, e.g. 2,4,1
    python -m tests.parallel.mesh_steps gathers MESH...          # the all-gathers of the compiled QLoRA step
"""

from __future__ import annotations

import json
import math
import re
import sys
import warnings

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxlora.models.scan import stack_layers
from jaxlora.parallel import (ParallelConfig, make_mesh, place_batch, place_optimizer_state, shard_model,
                              step_shardings)
from jaxlora.parallel.rules import ShardingWarning, rule_for, variable_path
from jaxlora.quant import QuantizedTensor
from jaxlora.train.optim import to_memory
from jaxlora.train.step import make_train_step, split_trainable
from tests.models.test_scan import CONFIG, make_model

STEPS, BATCH, SEQ = 4, 8, 16


def batches():
    """Two batches, alternating (steps 1 and 3 see the same one)."""
    rng = np.random.default_rng(0)
    two = []
    for _ in range(2):
        ids = rng.integers(0, CONFIG.vocab_size, size=(1, BATCH, SEQ)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[0, 1, -5:] = 0  # right padding in one row
        two.append({"input_ids": ids, "attention_mask": mask, "labels": np.where(mask > 0, ids, -100)})
    for step in range(STEPS):
        yield two[step % 2]


def frozen_split(rest, mesh) -> list[dict]:
    """Per frozen weight that a rule splits: its bytes on one device against its total bytes."""
    out = []
    flat = jax.tree_util.tree_flatten_with_path(rest, is_leaf=lambda x: isinstance(x, QuantizedTensor))[0]
    for path, leaf in flat:
        name = variable_path(path)
        if rule_for(name) is None or "embed_tokens" in name or "lm_head" in name:
            continue
        arrays = [leaf.packed, leaf.absmax] if isinstance(leaf, QuantizedTensor) else [leaf]
        on_one = sum(a.addressable_shards[0].data.nbytes for a in arrays)
        out.append({"name": name, "device_bytes": on_one, "total_bytes": sum(a.nbytes for a in arrays)})
    return out


def run(kind: str, offload: bool, sizes):
    model = make_model(kind)
    stack_layers(model)
    tx = optax.adamw(1e-2)
    mesh = None
    caught = []
    if sizes is not None:
        mesh = make_mesh(ParallelConfig(*sizes))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ShardingWarning)
            shard_model(model, mesh)
    graphdef, trainable, rest = split_trainable(model)
    opt_state = tx.init(trainable)
    if mesh is not None:
        opt_state = place_optimizer_state(tx, opt_state, trainable, mesh)
    if offload:
        opt_state = to_memory(opt_state, "pinned_host")
    shardings = None if mesh is None else step_shardings(trainable, rest, opt_state, mesh)
    step = make_train_step(graphdef, tx, offload=offload, out_shardings=shardings)
    losses = []
    for batch in batches():
        micro = place_batch(batch, mesh) if mesh is not None else batch
        trainable, rest, opt_state, metrics = step(trainable, rest, opt_state, micro)
        losses.append(float(metrics["loss"]))
    kinds = sorted({x.sharding.memory_kind for x in jax.tree.leaves(opt_state) if getattr(x, "ndim", 0) > 0})
    moment_specs = sorted({str(getattr(x.sharding, "spec", None)) for x in jax.tree.leaves(opt_state) if getattr(x, "ndim", 0) > 1})
    return {"losses": losses, "trainable": [np.asarray(x).tolist() for x in jax.tree.leaves(trainable)],
            "frozen": frozen_split(rest, mesh) if mesh is not None else [],
            "warnings": [str(w.message) for w in caught], "moment_memory": kinds, "moment_specs": moment_specs,
            "devices": len(jax.devices()), "scalars_finite": all(math.isfinite(x) for x in losses)}


def zero_specs() -> dict:
    """AdamW's moments of parameters split over the mesh (full fine-tuning's case) after
    `place_optimizer_state`: each moment's spec, against its parameter's."""
    mesh = make_mesh(ParallelConfig(2, 2, 2))
    params = {"w": jax.device_put(np.ones((8, 16), np.float32), NamedSharding(mesh, PartitionSpec("tensor", "fsdp"))),
              "b": jax.device_put(np.ones((16,), np.float32), NamedSharding(mesh, PartitionSpec()))}
    tx = optax.adamw(1e-3)
    state = place_optimizer_state(tx, tx.init(params), params, mesh)
    mu, nu = state[0].mu, state[0].nu
    return {"w": [str(mu["w"].sharding.spec), str(nu["w"].sharding.spec)], "b": [str(mu["b"].sharding.spec)],
            "count": str(state[0].count.sharding.spec), "count_devices": len(state[0].count.sharding.device_set)}


def gathers(sizes) -> list[list]:
    """``[dtype, shape]`` of every all-gather in the compiled QLoRA step on the mesh ``sizes``. Batch 8 x 12
    tokens and r=6 there, so no activation or LoRA shape looks like a piece of a projection weight (all
    of whose dimensions are powers of two)."""
    mesh = make_mesh(ParallelConfig(*sizes))
    model = make_model("qlora", r=6, lora_alpha=12)
    stack_layers(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ShardingWarning)  # the vocabulary, 97
        shard_model(model, mesh)
    graphdef, trainable, rest = split_trainable(model)
    tx = optax.adamw(1e-2)
    opt_state = place_optimizer_state(tx, tx.init(trainable), trainable, mesh)
    step = make_train_step(graphdef, tx, out_shardings=step_shardings(trainable, rest, opt_state, mesh))
    batch = {k: v[:, :, :12] for k, v in next(batches()).items()}
    hlo = step.lower(trainable, rest, opt_state, place_batch(batch, mesh)).compile().as_text()
    found = re.findall(r"= (\w+)\[([\d,]*)\]\S* all-gather(?:-start)?\(", hlo)
    return [[dtype, [int(d) for d in shape.split(",") if d]] for dtype, shape in found]


def main():
    if sys.argv[1] == "gathers":
        print(json.dumps({mesh: gathers(tuple(int(s) for s in mesh.split(","))) for mesh in sys.argv[2:]}))
        return
    kind, offload, meshes = sys.argv[1], sys.argv[2] == "offload", sys.argv[3:]
    results = {"zero": zero_specs(), "single": run(kind, offload, None)}
    for mesh in meshes:
        results[mesh] = run(kind, offload, tuple(int(s) for s in mesh.split(",")))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
