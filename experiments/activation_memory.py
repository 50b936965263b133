"""What a decoder layer keeps for the backward pass, as XLA compiles the train step, against `jaxlora.cli.memory`.

    python experiments/activation_memory.py --markdown experiments/results/memory_activations.md
    python experiments/activation_memory.py --live-at-peak all-linear     # the buffers behind one row

For each variant (a tiny Llama with one dimension or the adapted projections changed, and two at
SmolLM2-135M's widths), the LoRA/QLoRA train step of `jaxlora.train.step` is compiled with 2 and
with 4 decoder layers; half the difference of XLA's temporary bytes (``memory_analysis()``), per
token, is what one layer keeps: everything else in the step (loss, the working set at the peak) is
the same at both depths. The estimator's per-layer term is computed the same way (its activations at
4 layers minus 2, halved, without the fitted factor).

``--live-at-peak VARIANT`` dumps the compiled HLO of that variant (2 layers), replays its schedule
to find the point where the most bytes are live, and lists those buffers with the JAX operation
that made them: that is how the estimator's list of kept arrays was read (an approximate replay:
it reproduces XLA's temp size to a few bytes for these steps, not a general tool).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16}
SMOLLM2 = {"vocab_size": 24576, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
           "num_key_value_heads": 3, "head_dim": 64}
# name: (model overrides, run settings); run settings: method, targets, rank, batch, seq, dtype
VARIANTS = {
    "all-linear": ({}, {}),
    "intermediate 512": ({"intermediate_size": 512}, {}),
    "hidden 128": ({"hidden_size": 128}, {}),
    "kv heads 4": ({"num_key_value_heads": 4}, {}),
    "heads 8": ({"num_attention_heads": 8}, {}),
    "rank 16": ({}, {"rank": 16}),
    "seq 128": ({}, {"seq": 128}),
    "batch 1": ({}, {"batch": 1}),
    "q_proj, v_proj": ({}, {"targets": ["q_proj", "v_proj"]}),
    "gate_proj, up_proj": ({}, {"targets": ["gate_proj", "up_proj"]}),
    "o_proj": ({}, {"targets": ["o_proj"]}),
    "down_proj": ({}, {"targets": ["down_proj"]}),
    "qlora": ({}, {"method": "qlora"}),
    "bfloat16": ({}, {"dtype": "bfloat16"}),
    "bfloat16, q_proj, v_proj": ({}, {"dtype": "bfloat16", "targets": ["q_proj", "v_proj"]}),
    "full fine-tuning": ({}, {"method": "full"}),
    "SmolLM2 widths, LoRA r=16, 2x256": (SMOLLM2, {"rank": 16, "seq": 256}),
    "SmolLM2 widths, QLoRA r=16, 2x256": (SMOLLM2, {"method": "qlora", "rank": 16, "seq": 256}),
    "SmolLM2 widths, LoRA r=16, 1x512": (SMOLLM2, {"rank": 16, "seq": 512, "batch": 1}),
}
RUN_DEFAULTS = {"method": "lora", "targets": "all-linear", "rank": 8, "batch": 2, "seq": 64, "dtype": "float32"}


def compile_step(overrides: dict, run: dict, layers: int):
    """The compiled train step of a random tiny Llama: ``(compiled, config)``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxlora.models import LlamaConfig, LlamaForCausalLM
    from jaxlora.peft import LoraConfig, get_peft_model
    from jaxlora.train.optim import OptimizerConfig, make_optimizer
    from jaxlora.train.step import make_train_step
    from torch_bridge.checkpoint import build_llama

    config = LlamaConfig(**{**TINY, **overrides, "num_hidden_layers": layers}, tie_word_embeddings=True)
    shapes = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    arrays = {".".join(map(str, path)): rng.standard_normal(v.shape).astype(np.float32) * 0.05
              for path, v in nnx.to_flat_state(nnx.state(shapes, nnx.Param))}
    model = build_llama(config, arrays.__getitem__, arrays.__contains__, dtype=run["dtype"],
                        quantize="nf4" if run["method"] == "qlora" else None)
    wrt = nnx.Param if run["method"] == "full" else nnx.LoRAParam
    if run["method"] != "full":
        model = get_peft_model(model, LoraConfig(r=run["rank"], target_modules=run["targets"]))
    model.train()
    graphdef, trainable, rest = nnx.split(model, wrt, ...)
    tx = make_optimizer(OptimizerConfig(), 10)
    ids = jax.ShapeDtypeStruct((1, run["batch"], run["seq"]), jnp.int32)
    step = make_train_step(graphdef, tx, wrt=wrt)
    batch = {"input_ids": ids, "attention_mask": ids, "labels": ids}
    return step.lower(trainable, rest, tx.init(trainable), batch).compile(), config


def estimated_activations(config, run: dict) -> float:
    from jaxlora.cli.memory import ACTIVATION_FACTOR, ModelShape, estimate_memory

    est = estimate_memory(ModelShape.from_config(config), method=run["method"], rank=run["rank"], targets=run["targets"],
                          batch=run["batch"], seq=run["seq"], dtype=run["dtype"], platform="cpu")
    return est.activations / ACTIVATION_FACTOR["cpu"]


def measure(name: str) -> dict:
    overrides, settings = VARIANTS[name]
    run = {**RUN_DEFAULTS, **settings}
    temp, ours = {}, {}
    for layers in (2, 4):
        compiled, config = compile_step(overrides, run, layers)
        temp[layers] = compiled.memory_analysis().temp_size_in_bytes
        ours[layers] = estimated_activations(config, run)
    tokens = run["batch"] * run["seq"]
    row = {"variant": name, **run, **overrides, "xla_temp_2_layers": temp[2], "xla_temp_4_layers": temp[4],
           "xla_per_layer_token": (temp[4] - temp[2]) / 2 / tokens, "ours_per_layer_token": (ours[4] - ours[2]) / 2 / tokens}
    if run["method"] == "full":  # XLA's temporaries hold the weight gradients too; the estimator counts them apart
        from jaxlora.cli.memory import ModelShape

        shape = ModelShape.from_config(config)
        per_layer_weights = sum(o * i for o, i in shape.projection_shapes().values()) + 2 * shape.hidden_size
        row["gradients_per_layer_token"] = per_layer_weights * 4 / tokens
    return row


# -- the buffers live at the peak --------------------------------------------------------------
_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "u8": 1, "s8": 1, "pred": 1, "f64": 8, "s64": 8}
_NO_BUFFER = {"bitcast", "get-tuple-element", "tuple", "parameter", "constant"}


def _shape_bytes(shape: str) -> int:
    total = 0
    for dtype, dims in re.findall(r"\b(f32|s32|u32|bf16|f16|u8|s8|pred|f64|s64)\[([0-9,]*)\]", shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES[dtype]
    return total


def live_at_peak(hlo_text: str) -> tuple[int, list[tuple[int, str, str]]]:
    """Replay the largest computation's schedule: ``(peak bytes, [(bytes, shape, JAX op name)])`` of
    the buffers live at the peak. A buffer lives from its instruction to its last use (through
    bitcasts and tuple elements, which alias it)."""
    computations, current = {}, None
    for line in hlo_text.splitlines():
        if re.match(r"^(ENTRY )?%?[\w.\-]+ .*\{$", line):
            current = computations.setdefault(line.split("(")[0], [])
        elif line.startswith("}"):
            current = None
        elif current is not None and " = " in line:
            current.append(line.strip())
    lines = max(computations.values(), key=len)
    defined, last_use, info, alias = {}, {}, {}, {}
    for index, line in enumerate(lines):
        match = re.match(r"(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$", line)
        if not match:
            continue
        name, shape, op, rest = match.groups()
        operands = re.findall(r"%([\w.\-]+)", rest.split("kind=")[0] if op == "fusion" else rest.split("), ")[0])
        source = [alias.get(o, o) for o in operands]
        if op in ("bitcast", "get-tuple-element") and source:
            alias[name] = source[0]
        for buffer in source:
            last_use[buffer] = index
        defined[name] = index
        op_name = re.search(r'op_name="([^"]*)"', line)
        info[name] = (0 if op in _NO_BUFFER else _shape_bytes(shape), shape.split("{")[0],
                      op_name[1].split("closed_call/")[-1] if op_name else op)
    change = collections.Counter()
    for name, start in defined.items():
        change[start] += info[name][0]
        change[max(last_use.get(name, start), start) + 1] -= info[name][0]
    live, peak, at = 0, 0, 0
    for index in range(len(lines) + 1):
        live += change[index]
        if live > peak:
            peak, at = live, index
    buffers = [info[n] for n, start in defined.items() if info[n][0] and start <= at <= max(last_use.get(n, start), start)]
    return peak, sorted(buffers, key=lambda b: -b[0])


def show_live_at_peak(name: str) -> None:
    overrides, settings = VARIANTS[name]
    run = {**RUN_DEFAULTS, **settings}
    with tempfile.TemporaryDirectory() as dump:
        code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'experiments')!r}); "
                f"from activation_memory import compile_step; "
                f"print(compile_step(json.loads({json.dumps(json.dumps(overrides))}), "
                f"json.loads({json.dumps(json.dumps(run))}), 2)[0].memory_analysis().temp_size_in_bytes)")
        env = {**os.environ, "XLA_FLAGS": f"--xla_dump_to={dump}", "PYTHONPATH": str(ROOT)}
        temp = int(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                                  text=True).stdout.split()[-1])
        texts = sorted(Path(dump).glob("*jit_step*after_optimizations.txt"))
        peak, buffers = live_at_peak(texts[-1].read_text())
    print(f"{name}, 2 layers: XLA temp {temp:,d} B; replayed peak {peak:,d} B; {len(buffers)} buffers live there:")
    for size, shape, op in buffers:
        print(f"  {size:>9,d}  {shape:<24} {op}")


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def markdown(rows: list[dict], command: str, note: str) -> str:
    import jax

    lines = ["# What a decoder layer keeps for the backward pass: XLA vs `jaxlora.cli.memory`", "",
             f"Generated {datetime.date.today()} by `{command}`. Machine: {machine()}; jax {jax.__version__}, CPU "
             "backend." + (f" {note}" if note else ""), "",
             ("Per decoder layer and token, in bytes: half the difference of XLA's temporary bytes between the "
              "compiled train step with 4 and with 2 layers, and the same difference of the estimator's activations "
              "(without its fitted factor). Tiny Llama: hidden 64, intermediate 256, 4 heads, 2 KV heads, head_dim "
              "16, vocab 256; LoRA r=8 on all linear layers, float32, batch 2 x 64 tokens, unless the row says "
              "otherwise."), "",
             "| variant | XLA bytes per layer and token | estimate | estimate / XLA |", "|---|---|---|---|"]
    for row in rows:
        xla, ours = row["xla_per_layer_token"], row["ours_per_layer_token"]
        extra = ""
        if "gradients_per_layer_token" in row:
            ours += row["gradients_per_layer_token"]
            extra = " (with the layer's weight gradients, which XLA's temporaries hold)"
        lines.append(f"| {row['variant']}{extra} | {xla:,.1f} | {ours:,.1f} | {ours / xla:.3f} |")
    return "\n".join(lines + [""] + NOTES) + "\n"


NOTES = [
    "## Notes", "",
    ("- **What is kept** (`--live-at-peak all-linear` lists the buffers): per layer the layer input and the "
     "residual after attention, the rotated queries, keys and values, the float32 attention probabilities, the "
     "RMSNorm statistics, sigmoid(gate), silu(gate) and up, plus the float32 input of each adapted projection, "
     "up's LoRA output beside its base output when up_proj is adapted, and x A^T of each LoRA branch. The "
     "SwiGLU custom gradient (`jaxlora.models.llama.swiglu`) keeps gate and up as residuals and recomputes the "
     "sigmoid, but XLA merges that recomputation with the forward's (same expression, same input), so "
     "sigmoid(gate) and silu(gate) stay alive instead of gate; the sum base + LoRA of an adapted projection is "
     "fused into its consumers, so both addends stay alive. Five intermediate-size arrays per layer with all "
     "linear layers adapted, three with none of the MLP's."),
    ("- **Float32 rows match to the byte** except where XLA's heap adds fragmentation or buffers that do not "
     "grow with the tokens (hidden 128, QLoRA's dequantization constants): under 1 %."),
    ("- **Batch 1, tiny model:** with a unit batch axis XLA kept the attention's exponentiated scores as well as "
     "the probabilities, one more float32 [heads, seq] array per token and layer (the same length at batch 2 "
     "matches exactly, and so does batch 1 x 512 at SmolLM2's widths): a fusion choice of this small shape, "
     "left out of the formula."),
    ("- **bfloat16 on the CPU:** XLA's CPU backend computes 16-bit elementwise operations in float32 and, "
     "allowed excess precision, keeps some results (residual stream, queries, keys, values) in float32: the "
     "formula, which counts them in the compute dtype (as a GPU stores them), is up to ~15 % low here."),
    ("- **Full fine-tuning:** XLA's temporaries hold the weight gradients too (the estimator counts them as "
     "gradients, apart); the row adds them to the estimate. The remaining gap is the optimizer update's "
     "working set."),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="variants to measure (default: all)")
    parser.add_argument("--live-at-peak", choices=list(VARIANTS), help="list the buffers live at the peak of one variant")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--save-json", type=Path, help="write the raw rows here")
    parser.add_argument("--note", default="", help="a sentence for the markdown (what else ran on the machine)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.live_at_peak:
        show_live_at_peak(args.live_at_peak)
        return
    rows = []
    for name in args.only or VARIANTS:
        rows.append(measure(name))
        print(json.dumps(rows[-1]), flush=True)
        if args.save_json:
            args.save_json.write_text(json.dumps(rows, indent=1) + "\n")
    if args.markdown:
        command = "python experiments/activation_memory.py " + shlex.join(sys.argv[1:])
        args.markdown.write_text(markdown(rows, command, args.note))


if __name__ == "__main__":
    main()
