"""Supervised fine-tuning data: records (`records`), chat templates and loss masks (`templates`),
tokenization, packing, batching (`sft`), and prompts for generation (`prompting`). numpy, tokenizers and jinja2 only."""

from jaxlora.data.records import DataError, DataReport, SkipReport, read_jsonl
from jaxlora.data.sft import (
    IGNORE_INDEX,
    DataConfig,
    SFTDataset,
    batches,
    load_eval_data,
    load_sft_data,
    steps_per_epoch,
)
from jaxlora.data.templates import SFTTokenizer, TemplateError

__all__ = ["IGNORE_INDEX", "DataConfig", "DataError", "DataReport", "SFTDataset", "SFTTokenizer", "SkipReport",
           "TemplateError", "batches", "load_eval_data", "load_sft_data", "read_jsonl", "steps_per_epoch"]
