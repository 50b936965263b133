"""The ``jaxlora`` command: train, generate, export, memory, quickstart.

    jaxlora train CONFIG [--preset qv|attention|all-linear] [--set section.key=value ...] [--dry-run]
    jaxlora generate --model HF_DIR [--adapter PEFT_DIR ...] [--quantize nf4] --prompt TEXT [sampling options]
    jaxlora export RUN_OR_ADAPTER (--peft OUT | --merged OUT | --bnb-4bit OUT) [--model HF_DIR] [--dtype D]
    jaxlora memory --model HF_DIR_OR_SIZE --method full|lora|qlora [--rank --targets --batch --seq --grad-ckpt --offload]
    jaxlora quickstart [--steps N | --full] [--output-dir DIR]

A user's mistake (a missing file, a bad config key, an adapter that does not fit the model) ends the
command with one ``jaxlora: error: ...`` line on stderr and exit status 2; ``JAXLORA_DEBUG=1`` shows the
traceback. Anything else is a bug and keeps its traceback.

The file formats come from `torch_bridge`'s torch-free modules (safetensors and JSON); nothing here
imports torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class UserError(Exception):
    """A mistake in the command line or its inputs; reported as one line."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from jaxlora.models.llama_config import ConfigError
    from jaxlora.peft import AdapterError
    from jaxlora.train.config import TrainConfigError
    from jaxlora.data.records import DataError
    from jaxlora.cli.export import ExportError
    from jaxlora.data.templates import TemplateError
    from jaxlora.train.trainer import ModelPathError, TrainingError
    from jaxlora.quickstart.run import QuickstartDirectoryError
    from jaxlora.train.fingerprint import BaseModelMismatchError, FingerprintError
    from jaxlora.parallel import MeshConfigError
    from torch_bridge.checkpoint import CheckpointError
    from torch_bridge.peft import AdapterFileError

    return (UserError, ConfigError, AdapterError, ExportError, ModelPathError, TrainingError, TrainConfigError,
            DataError, TemplateError, CheckpointError, AdapterFileError, QuickstartDirectoryError,
            BaseModelMismatchError, FingerprintError, MeshConfigError,
            FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


# -- train ---------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from jaxlora.train.config import apply_overrides, config_from_dict, read_config_tree
    from jaxlora.cli.preflight import apply_preset, preflight
    from jaxlora.train.trainer import resolve_model_path, train

    tree = read_config_tree(args.config)
    if args.preset:
        try:
            tree = apply_preset(tree, args.preset)
        except ValueError as e:
            raise UserError(str(e)) from None
    mesh_flags = [f"parallel.{key}={value}" for key in ("data", "fsdp", "tensor", "num_processes", "process_id")
                  if (value := getattr(args, key)) is not None]
    if args.coordinator is not None:
        mesh_flags.append(f'parallel.coordinator="{args.coordinator}"')
    config = config_from_dict(apply_overrides(tree, [*mesh_flags, *args.set]), source=str(args.config))
    from jaxlora.parallel import start_processes

    start_processes(config.parallel)  # before the pre-flight report asks JAX for its devices
    model_dir = resolve_model_path(config.model.path)
    print(preflight(config, model_dir).report(), file=sys.stderr)
    if args.dry_run:
        return 0
    summary = train(config)
    print(f"run directory: {config.run.output_dir}  (steps {summary['steps']}, final loss {summary['final_loss']:.4f})")
    return 0


# -- generate ------------------------------------------------------------------------------------
def load_for_generation(model_dir: Path, adapters: list[str], quantize: str | None, dtype: str):
    """The model with `adapters` applied: each but the last merged in turn, the last kept as an adapter."""
    from torch_bridge import load_llama, load_peft_adapter

    model = load_llama(model_dir, dtype=dtype, quantize=quantize)
    for index, adapter in enumerate(adapters):
        model = load_peft_adapter(model, adapter, adapter_name=f"adapter{index}")
        model.eval()
        if index + 1 < len(adapters):
            model = model.merge_and_unload()
    return model


def cmd_generate(args) -> int:
    from jaxlora.generate import GenerationConfig, Generator
    from jaxlora.data.prompting import PromptCodec
    from jaxlora.train.trainer import resolve_model_path

    model_dir = resolve_model_path(args.model)
    codec = PromptCodec(model_dir, chat=not args.raw)
    try:
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  repetition_penalty=args.repetition_penalty, seed=args.seed,
                                  eos_token_id=codec.stop_ids, pad_token_id=codec.pad_id)
    except ValueError as e:
        raise UserError(str(e)) from None
    model = load_for_generation(model_dir, args.adapter, args.quantize, args.dtype)
    if args.scan_layers:
        from jaxlora.models.scan import stack_layers

        stack_layers(model)  # one scanned body and one stacked KV cache; layers that differ stay a loop (warned)
    try:
        outputs = Generator(model)([codec.encode_prompt(p) for p in args.prompt], config)
    except ValueError as e:
        raise UserError(str(e)) from None
    for prompt, tokens in zip(args.prompt, outputs, strict=True):
        if len(args.prompt) > 1:
            print(f"### {prompt}")
        print(codec.decode(tokens))
    return 0


# -- export --------------------------------------------------------------------------------------
def cmd_export(args) -> int:
    from jaxlora.cli.export import export

    targets = [(kind, getattr(args, kind)) for kind in ("peft", "merged", "bnb_4bit") if getattr(args, kind)]
    if len(targets) != 1:
        raise UserError("give exactly one of --peft OUT, --merged OUT, --bnb-4bit OUT")
    kind, out = targets[0]
    written = export(args.source, kind.replace("_", "-"), out, model=args.model, best=args.best, dtype=args.dtype,
                     max_shard_size=args.max_shard_size)
    print(f"wrote {written}")
    return 0


# -- memory --------------------------------------------------------------------------------------
def cmd_memory(args) -> int:
    from jaxlora.models.llama_config import LlamaConfig
    from jaxlora.cli.memory import ModelShape, estimate_memory, format_estimate
    from jaxlora.train.trainer import resolve_model_path

    if Path(args.model).is_dir() or args.model == "smollm2":
        shape = ModelShape.from_config(LlamaConfig.from_file(resolve_model_path(args.model) / "config.json"))
    else:
        try:
            shape = ModelShape.preset(args.model.lower())
        except ValueError as e:
            raise UserError(f"--model {args.model}: not a directory, and {e}") from None
    targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    try:
        estimate = estimate_memory(shape, method=args.method, rank=args.rank, targets=targets, batch=args.batch,
                                   seq=args.seq, grad_ckpt=args.grad_ckpt, offload=args.offload, dtype=args.dtype,
                                   compute_dtype=args.compute_dtype, platform=args.platform)
    except ValueError as e:
        raise UserError(str(e)) from None
    title = (f"{args.model}, {args.method}, r={args.rank}, {args.targets}, batch {args.batch} x {args.seq}, "
             f"grad-ckpt {'on' if args.grad_ckpt else 'off'}, optimizer {'offloaded' if args.offload else 'on device'}")
    print(format_estimate(estimate, title))
    return 0


# -- quickstart ----------------------------------------------------------------------------------
def cmd_quickstart(args) -> int:
    from jaxlora.quickstart.run import QuickstartOptions, quickstart

    quickstart(QuickstartOptions(steps=args.steps, full=args.full, output_dir=args.output_dir,
                                 peft_check=not args.skip_peft_check))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlora", description="LoRA and QLoRA fine-tuning in JAX, PEFT-compatible.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train adapters from a TOML/YAML config",
                       description="Train LoRA/QLoRA adapters (or the full model) as a config file says.")
    p.add_argument("config", help="TOML or YAML training config (see experiments/train/*.toml)")
    p.add_argument("--preset", help="LoRA preset: qv, attention, all-linear (file and --set win)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--dry-run", action="store_true", help="print the pre-flight report and stop")
    for axis, what in (("data", "data-parallel replicas"), ("fsdp", "devices the weights are sharded over (-1: the rest)"),
                       ("tensor", "devices each projection is split over")):
        p.add_argument(f"--{axis}", type=int, metavar="N", help=f"mesh axis: {what} (parallel.{axis}; --set wins)")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, for a run over several processes")
    p.add_argument("--num-processes", type=int, metavar="N", help="processes in the run (parallel.num_processes)")
    p.add_argument("--process-id", type=int, metavar="I", help="this process, 0 to N-1 (parallel.process_id)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate text with a model and adapters",
                       description="Generate from a prompt (greedy unless --sample), with a KV cache.")
    p.add_argument("--model", required=True, help='HF Llama directory, or "smollm2"')
    p.add_argument("--adapter", action="append", default=[], help="PEFT adapter directory (repeat to stack)")
    p.add_argument("--quantize", choices=["nf4", "fp4"], help="load the base in 4 bits")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-scan-layers", dest="scan_layers", action="store_false",
                   help="run the decoder layers in a Python loop instead of one scanned body (compiles slower)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write a PEFT adapter, a merged checkpoint or a bitsandbytes 4-bit one",
                       description="Export a run directory or a PEFT adapter directory.")
    p.add_argument("source", help="run directory (with adapter/) or PEFT adapter directory")
    p.add_argument("--peft", metavar="OUT", help="PEFT adapter directory")
    p.add_argument("--merged", metavar="OUT", help="HF checkpoint with the adapter merged in")
    p.add_argument("--bnb-4bit", dest="bnb_4bit", metavar="OUT",
                   help="merged HF checkpoint in bitsandbytes' pre-quantized NF4 (double quant)")
    p.add_argument("--model", help="base model directory (default: the adapter's base_model_name_or_path)")
    p.add_argument("--best", action="store_true", help="a run's best_adapter/ instead of adapter/")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of a merged export's tensors (default: as the base checkpoint stores each)")
    p.add_argument("--max-shard-size", default="5GB", help='split a merged export into shards of this size (default "5GB")')
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("memory", help="estimate training memory",
                       description="Break down training memory: weights, adapters, gradients, optimizer, activations.")
    p.add_argument("--model", required=True, help="HF Llama directory, smollm2, or a size: 135m, 7b, 8b, 13b, 65b, 70b")
    p.add_argument("--method", required=True, choices=["full", "lora", "qlora"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="all-linear", help="all-linear, or comma-separated module names")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--offload", action="store_true", help="optimizer states in host memory")
    p.add_argument("--dtype", default="bfloat16", help="parameter dtype of the dense parts")
    p.add_argument("--compute-dtype", default=None)
    p.add_argument("--platform", default="gpu", choices=["gpu", "cpu"])
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("quickstart", help="QLoRA on SmolLM2-135M-Instruct, before and after, checked in PEFT",
                       description="Fine-tune SmolLM2-135M-Instruct (NF4, QLoRA r=16) on the shipped extraction "
                                   "dataset; print held-out loss, exact match and examples before and after; "
                                   "reproduce the result with PEFT.")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 40)")
    p.add_argument("--full", action="store_true", help="one whole epoch over the training set")
    p.add_argument("--output-dir", default="runs/quickstart")
    p.add_argument("--skip-peft-check", action="store_true", help="do not reproduce the outputs with PEFT")
    p.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("jaxlora: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - user mistakes become one line; the rest re-raise
        if os.environ.get("JAXLORA_DEBUG") or not isinstance(e, _user_errors()):
            raise
        print(f"jaxlora: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
