"""python experiments/bench_export.py --before /tmp/before --markdown experiments/results/export.md

Peak RSS of ``jaxlora export ADAPTER --merged OUT`` on SmolLM2-135M-Instruct (float32 safetensors,
538 MB), with the code of another checkout (``--before``, e.g. ``git archive 3c5af6c | tar -x -C
/tmp/before``) and with this one, interleaved (before, after, before, after, ...), each run a fresh
process under ``/usr/bin/time -v`` (its "Maximum resident set size" is the exact peak RSS). The
adapter is a random LoRA (r=16, all-linear, B nonzero) saved with save_peft_adapter. The outputs of
both checkouts are compared tensor for tensor at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAIN = "import sys; from jaxlora.cli import main; sys.exit(main())"
BASELINE = "import jax.numpy as jnp, jaxlora.cli.export, torch_bridge; jnp.zeros(1).block_until_ready()"


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())


def memory_gib() -> float:
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemTotal")).split()[1]) / 2**20


def make_adapter(out: Path) -> Path:
    """A random r=16 all-linear LoRA for SmolLM2 (B nonzero), made on a shape-only base (no weights read)."""
    import jaxlora
    from torch_bridge import save_peft_adapter
    from torch_bridge.checkpoint import read_llama_config, shape_only_llama
    from torch_bridge.smollm2 import ensure_smollm2

    base = ensure_smollm2()
    config = jaxlora.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    peft_model = jaxlora.get_peft_model(shape_only_llama(read_llama_config(base)), config)
    return save_peft_adapter(peft_model, out, base_model_name_or_path=str(base))


def run(tree: Path, args: list[str], cwd: Path) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of ``python -c MAIN *args`` importing jaxlora from ``tree``.

    ``cwd`` must hold no jaxlora: ``python -c`` puts the working directory before PYTHONPATH.
    """
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu")
    where = subprocess.run([sys.executable, "-c", "import jaxlora, torch_bridge; print(jaxlora.__file__, torch_bridge.__file__)"],
                           env=env, cwd=cwd, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(f).is_relative_to(tree) for f in where), (tree, where)
    command = ["/usr/bin/time", "-v", sys.executable, "-c", MAIN if args else BASELINE, *args]
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) / 1024
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", done.stderr).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(clock.split(":"))))
    return rss, seconds


def compare(before: Path, after: Path, bf16: Path) -> str:
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import load_file

    def read(directory):
        out = {}
        for f in sorted(directory.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a, b, c = read(before), read(after), read(bf16)
    shards = {name: read(after.parent / f"after-{name}") for name in ("100MB", "20MB")}
    assert a.keys() == b.keys() == c.keys() == shards["100MB"].keys() == shards["20MB"].keys(), "different tensors"
    same = all(a[k].dtype == x[k].dtype and a[k].tobytes() == x[k].tobytes() for k in a for x in (b, *shards.values()))
    rounded = all(c[k].tobytes() == a[k].astype(ml_dtypes.bfloat16).tobytes() for k in a)
    peft = [read(after.parent / f"{name}-peft") for name in ("before", "after")]
    same_peft = peft[0].keys() == peft[1].keys() and all(peft[0][k].tobytes() == peft[1][k].tobytes() for k in peft[0])
    return (f"{len(a)} tensors: after (one file, 100MB and 20MB shards) == before byte for byte: {same}; "
            f"--dtype bfloat16 == before rounded to bfloat16: {rounded}; --peft after == before: {same_peft}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout of the code before the change")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/jaxlora-bench-export"))
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    started = time.time()
    load_before = os.getloadavg()
    args.work.mkdir(parents=True, exist_ok=True)
    adapter = args.work / "adapter"
    if not (adapter / "adapter_config.json").exists():
        make_adapter(adapter)
    cases = {  # name: (tree, export arguments); in run order within a round
        "baseline: imports + jax CPU backend (after)": (ROOT, []),
        "before: --merged": (args.before, ["--merged", str(args.work / "before")]),
        "after: --merged": (ROOT, ["--merged", str(args.work / "after")]),
        "after: --merged --max-shard-size 100MB": (ROOT, ["--merged", str(args.work / "after-100MB"), "--max-shard-size", "100MB"]),
        "after: --merged --max-shard-size 20MB": (ROOT, ["--merged", str(args.work / "after-20MB"), "--max-shard-size", "20MB"]),
        "after: --merged --dtype bfloat16": (ROOT, ["--merged", str(args.work / "after-bf16"), "--dtype", "bfloat16"]),
        "before: --peft": (args.before, ["--peft", str(args.work / "before-peft")]),
        "after: --peft": (ROOT, ["--peft", str(args.work / "after-peft")]),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (tree, extra) in cases.items():
            argv = ["export", str(adapter), *extra] if extra else []
            results[name].append(run(tree, argv, args.work))
            print(name, results[name][-1], flush=True)
    check = compare(args.work / "before", args.work / "after", args.work / "after-bf16")
    load_after = os.getloadavg()
    lines = [
        "# Peak memory of a merged export of SmolLM2-135M-Instruct, before and after streaming",
        "",
        "Command: `python experiments/bench_export.py --before /tmp/before --markdown experiments/results/export.md`, "
        "with `/tmp/before` = `git archive 3c5af6c` (the commit before the streaming export).",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, {memory_gib():.1f} GiB RAM (shared: other jobs, tests and "
        f"benchmarks of other work in progress, ran throughout; load average {load_before[0]:.1f} at the start, "
        f"{load_after[0]:.1f} at the end), "
        f"Linux {platform.release()}, python {platform.python_version()}; backend cpu.",
        "",
        "Each export: `jaxlora export ADAPTER --merged OUT [options]` in a fresh process under `/usr/bin/time -v` "
        "(peak RSS = its maximum resident set size, exact); ADAPTER = a random LoRA r=16 on all 7 projections of "
        "the 30 layers (B nonzero), base = the float32 SmolLM2 checkpoint (538 MB); "
        f"{args.rounds} rounds, interleaved in the order of the table. MiB = 2^20 bytes.",
        "",
        "| case | peak RSS MiB per run | median | wall s per run |",
        "|---|---|---|---|",
    ]
    for name, runs in results.items():
        rss = ", ".join(f"{r:.0f}" for r, _ in runs)
        wall = ", ".join(f"{s:.1f}" for _, s in runs)
        lines.append(f"| {name} | {rss} | {statistics.median(r for r, _ in runs):.0f} | {wall} |")
    lines += ["", f"Outputs: {check}.", "", f"Benchmark wall time: {time.time() - started:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
