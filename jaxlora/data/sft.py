"""Supervised fine-tuning data: JSONL records -> tokenized, masked, padded (or packed) numpy batches.

The pipeline, one pure step each (numpy, ``tokenizers`` and ``jinja2``; no jax, no transformers)::

    read_jsonl -> split_eval -> record_to_messages -> render_messages (templates.py)
        -> SFTTokenizer.encode -> fit_length -> build_rows (padding or packing) -> batches

`load_sft_data` runs it from a `DataConfig` (`load_eval_data` for a separate evaluation file, used
whole); its `DataReport` says where every record went. Reading and the record shapes (chat, alpaca,
text) are `jaxlora.data.records`.

Targets, in HF's convention (the shift is the loss's, `jaxlora.train.step.token_cross_entropy`:
``logits[t]`` predicts ``labels[t + 1]``). With ``loss_mask[t]`` true for tokens of trainable pieces
(all tokens if ``train_on_prompt``), per example::

    labels[t] = input_ids[t] if loss_mask[t] and t > 0 else -100

The first token of an example is never a target: it has no predecessor in its example, and in a
packed row the position before it is the previous example's last token.

Rows are ``max_seq_length`` long, right-padded with the pad id; ``segment_ids`` number the examples
of a row 1, 2, ... (0 on padding) and ``position_ids`` restart at 0 for each example, so a model
restricts attention to ``segment_ids[q] == segment_ids[k] > 0`` and ``k <= q``.

Nothing is dropped silently: bad lines and records raise a `DataError` naming file, line and field,
or with ``on_error="skip"`` are counted per reason in the `SkipReport`; so are truncated examples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from jaxlora.data.records import (FORMATS, ON_ERROR, DataError, DataReport, JsonRecord, SkipReport, _check_choice,
                                  read_jsonl, record_to_messages)
from jaxlora.data.templates import TEMPLATES, SFTTokenizer, TemplateError, render_messages

IGNORE_INDEX = -100
OVERLONG = ("truncate", "skip", "raise")
ROW_FIELDS = ("input_ids", "attention_mask", "labels", "position_ids", "segment_ids")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How records become training rows (every field has a default)."""

    template: str = "tokenizer"
    """Prompt template: "tokenizer" (the checkpoint's chat template), "chatml" or "llama2" (templates.py)."""
    format: str = "auto"
    """Record shape: "auto" (detected per record), "chat", "alpaca" or "text"."""
    system_prompt: str | None = None
    """Prepended to alpaca records and to chats without a system message."""
    max_seq_length: int = 2048
    """Tokens per row."""
    train_on_prompt: bool = False
    """Loss on every token, not only the responses."""
    overlong: str = "truncate"
    """Examples over max_seq_length: "truncate" (keep the head, counted), "skip" (counted) or "raise"."""
    on_error: str = "raise"
    """Bad lines or records: "raise" a DataError, or "skip" and count them per reason."""
    packing: bool = False
    """Concatenate several examples per row (greedy first-fit in order; none split across rows)."""
    eval_fraction: float = 0.0
    """Share of the records held out for evaluation (rounded half up)."""
    eval_size: int | None = None
    """Number of records held out instead of eval_fraction."""
    split_seed: int = 0
    """Seed of the (training-seed independent) choice of the eval records."""

    def __post_init__(self):
        _check_choice("template", self.template, TEMPLATES)
        _check_choice("format", self.format, FORMATS)
        _check_choice("overlong", self.overlong, OVERLONG)
        _check_choice("on_error", self.on_error, ON_ERROR)
        if self.max_seq_length < 2:
            raise ValueError(f"max_seq_length={self.max_seq_length}; need at least 2 (an input and a target)")


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """One example: ``input_ids`` int32 ``[n]``, ``loss_mask`` bool ``[n]``, and its source line."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    line: int


def tokenize_record(record: JsonRecord, tokenizer: SFTTokenizer, config: DataConfig) -> TokenizedExample:
    """Record -> messages -> pieces -> tokens (not yet fitted to max_seq_length)."""
    sample = record_to_messages(record, format=config.format, system_prompt=config.system_prompt)
    try:
        if isinstance(sample, str):
            pieces = [(sample, True)]
        else:
            pieces = render_messages(sample, config.template, chat_template=tokenizer.chat_template)
    except TemplateError as e:
        raise record.error(str(e), reason="template") from e
    input_ids, loss_mask = tokenizer.encode(pieces)
    if config.train_on_prompt:
        loss_mask = np.ones_like(loss_mask)
    return TokenizedExample(input_ids, loss_mask, record.line)


def fit_length(example: TokenizedExample, record: JsonRecord, config: DataConfig, report: SkipReport):
    """Apply the overlong policy; None if the example is skipped (counted in `report`).

    An example left without a target (``loss_mask[1:]`` all false, e.g. a prompt longer than
    max_seq_length) is a "no_trainable_tokens" record error.
    """
    n, limit = len(example.input_ids), config.max_seq_length
    if n > limit:
        if config.overlong == "raise":
            raise record.error(f"{n} tokens, more than max_seq_length={limit}", reason="too_long")
        if config.overlong == "skip":
            report.count("too_long", record.line)
            return None
        example = TokenizedExample(example.input_ids[:limit], example.loss_mask[:limit], example.line)
    if not example.loss_mask[1:].any():
        kept = len(example.input_ids)
        message = f"no trainable token to predict in the {kept} tokens kept (max_seq_length={limit})"
        raise record.error(message, reason="no_trainable_tokens")
    if n > limit:
        report.count("truncated", record.line)
    return example


def tokenize_records(records, tokenizer: SFTTokenizer, config: DataConfig, report: SkipReport):
    """Tokenize and fit every record; record errors raise or (on_error="skip") are counted in `report`."""
    if config.template == "tokenizer" and tokenizer.chat_template is None:
        raise ValueError('template="tokenizer" but the checkpoint has no chat template (try "chatml")')
    examples = []
    for record in records:
        try:
            example = fit_length(tokenize_record(record, tokenizer, config), record, config, report)
        except DataError as e:
            if config.on_error == "raise" or e.reason == "too_long":
                raise
            report.count(e.reason, record.line)
            continue
        if example is not None:
            examples.append(example)
    return examples


def pack_examples(lengths: Sequence[int], max_seq_length: int) -> list[list[int]]:
    """Greedy first-fit in order: each example goes to the first row with room, else a new row.

    Returns the example indices of each row (in order). O(examples x rows), vectorized over rows.
    """
    remaining = np.zeros(len(lengths), np.int64)
    rows: list[list[int]] = []
    for index, length in enumerate(lengths):
        if length > max_seq_length:
            raise ValueError(f"example {index} has {length} tokens, over max_seq_length={max_seq_length}")
        fits = np.flatnonzero(remaining[: len(rows)] >= length)
        row = int(fits[0]) if fits.size else len(rows)
        if row == len(rows):
            rows.append([])
            remaining[row] = max_seq_length
        rows[row].append(index)
        remaining[row] -= length
    return rows


@dataclasses.dataclass(frozen=True)
class SFTDataset:
    """Training rows: each of `ROW_FIELDS` an int32 array ``[rows, max_seq_length]`` (module docstring)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    segment_ids: np.ndarray
    pad_id: int
    report: DataReport | None = dataclasses.field(default=None, compare=False, repr=False)
    """Where the rows came from (set by `load_sft_data` / `load_eval_data`)."""

    def __len__(self) -> int:
        return len(self.input_ids)


def example_labels(input_ids: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """``labels[t] = input_ids[t] if loss_mask[t] and t > 0 else -100`` (unshifted, HF's convention)."""
    labels = np.where(loss_mask, input_ids, IGNORE_INDEX).astype(np.int32)
    labels[:1] = IGNORE_INDEX
    return labels


def build_rows(examples: Sequence[TokenizedExample], max_seq_length: int, pad_id: int, *, packing: bool):
    """Lay examples out in rows of `max_seq_length`: one per row, or packed (`pack_examples`)."""
    lengths = [len(example.input_ids) for example in examples]
    layout = pack_examples(lengths, max_seq_length) if packing else [[i] for i in range(len(examples))]
    shape = (len(layout), max_seq_length)
    input_ids = np.full(shape, pad_id, np.int32)
    labels = np.full(shape, IGNORE_INDEX, np.int32)
    position_ids, segment_ids = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    for row, members in enumerate(layout):
        start = 0
        for segment, index in enumerate(members, start=1):
            example, span = examples[index], slice(start, start + lengths[index])
            input_ids[row, span] = example.input_ids
            labels[row, span] = example_labels(example.input_ids, example.loss_mask)
            position_ids[row, span] = np.arange(lengths[index])
            segment_ids[row, span] = segment
            start += lengths[index]
    attention_mask = (segment_ids > 0).astype(np.int32)
    return SFTDataset(input_ids, attention_mask, labels, position_ids, segment_ids, pad_id)


def split_eval(items: Sequence, *, eval_fraction: float = 0.0, eval_size: int | None = None, seed: int = 0):
    """Hold out ``eval_size`` items (or ``round_half_up(eval_fraction * n)``) chosen by a permutation
    from `seed`, independent of the training seed. Returns ``(train, eval)``, both in input order."""
    if eval_size is not None and eval_fraction:
        raise ValueError("give eval_fraction or eval_size, not both")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction}; expected 0 <= eval_fraction < 1")
    n = len(items)
    n_eval = eval_size if eval_size is not None else int(eval_fraction * n + 0.5)
    if not 0 <= n_eval < n:
        raise ValueError(f"an eval split of {n_eval} out of {n} items leaves no training data")
    is_eval = np.zeros(n, bool)
    is_eval[np.random.default_rng(seed).permutation(n)[:n_eval]] = True
    train = [item for item, held in zip(items, is_eval, strict=True) if not held]
    return train, [item for item, held in zip(items, is_eval, strict=True) if held]


def steps_per_epoch(dataset: SFTDataset, batch_size: int) -> int:
    """ceil(rows / batch_size): the last batch is filled with empty rows, so no row is dropped."""
    return -(-len(dataset) // batch_size)


def batches(dataset: SFTDataset, batch_size: int, *, seed: int, epoch: int, start_step: int = 0,
            shuffle: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{field: int32 [batch_size, max_seq_length]}`` for each of `ROW_FIELDS`.

    The row order is ``default_rng([seed, epoch]).permutation(rows)`` (identity without shuffle),
    so batches depend only on (seed, epoch); ``start_step=k`` yields exactly the batches k, k+1, ...
    of an uninterrupted epoch (checkpoint resume). The last batch is completed with empty rows
    (pad ids, attention_mask 0, labels -100, position_ids 0, segment_ids 0).
    """
    if batch_size < 1 or min(seed, epoch, start_step) < 0:
        raise ValueError(f"need batch_size >= 1 and seed, epoch, start_step >= 0; got {batch_size}, {seed}, "
                         f"{epoch}, {start_step}")
    n = len(dataset)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    fill = {"input_ids": dataset.pad_id, "labels": IGNORE_INDEX}
    for step in range(start_step, steps_per_epoch(dataset, batch_size)):
        rows = order[step * batch_size:(step + 1) * batch_size]
        empty_shape = (batch_size - len(rows), dataset.input_ids.shape[1])
        empty = {name: np.full(empty_shape, fill.get(name, 0), np.int32) for name in ROW_FIELDS}
        yield {name: np.concatenate([getattr(dataset, name)[rows], empty[name]]) for name in ROW_FIELDS}


def _build_part(records, tokenizer: SFTTokenizer, config: DataConfig, report: DataReport, part: str):
    """Tokenize and lay out one part's records; its counts go to `report`. Raises if no example is left."""
    examples = tokenize_records(records, tokenizer, config, report)
    if not examples:
        what = "training" if part == "train" else "evaluation"
        raise DataError(f"no {what} example left of {len(records)} records ({report})", reason="empty",
                        path=report.path)
    dataset = build_rows(examples, config.max_seq_length, tokenizer.pad_id, packing=config.packing)
    report.examples[part], report.rows[part] = len(examples), len(dataset)
    return dataclasses.replace(dataset, report=report)


def load_sft_data(path, tokenizer: SFTTokenizer, config: DataConfig = DataConfig()):
    """Read `path`, hold out the eval records (eval_fraction / eval_size), tokenize both parts and lay
    them out in rows.

    Returns ``(train: SFTDataset, eval: SFTDataset | None, report: DataReport)``; eval is None when
    nothing is held out. Every record is accounted for in the report: held out, trained on, or skipped
    (per reason). A part left without any example raises `DataError`.
    """
    records, skips = read_jsonl(path, on_error=config.on_error)
    report = DataReport.of(skips)
    train_records, eval_records = split_eval(records, eval_fraction=config.eval_fraction,
                                             eval_size=config.eval_size, seed=config.split_seed)
    report.records, report.held_out = len(records), len(eval_records)
    train = _build_part(train_records, tokenizer, config, report, "train")
    held = _build_part(eval_records, tokenizer, config, report, "eval") if eval_records else None
    return train, held, report


def load_eval_data(path, tokenizer: SFTTokenizer, config: DataConfig = DataConfig()):
    """Read an evaluation file: all of its records are the eval set (nothing is split off).

    Returns ``(eval: SFTDataset, report: DataReport)``. ``config``'s eval_fraction / eval_size must be
    unset (a split of an eval file is ambiguous: ValueError naming both).
    """
    if config.eval_fraction or config.eval_size is not None:
        raise ValueError(f"{path}: an evaluation file is used whole; eval_fraction={config.eval_fraction} / "
                         f"eval_size={config.eval_size} would split it (they split the training file instead)")
    records, skips = read_jsonl(path, on_error=config.on_error)
    report = DataReport.of(skips)
    report.records = report.held_out = len(records)
    return _build_part(records, tokenizer, config, report, "eval"), report
