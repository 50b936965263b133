"""Supervised fine-tuning data: records, chat templates and loss masks, tokenization, packing, batching
(`sft`, `templates`), and prompts for generation (`prompting`). numpy, tokenizers and jinja2 only."""

from jaxlora.data.sft import (
    IGNORE_INDEX,
    DataConfig,
    DataError,
    DataReport,
    SFTDataset,
    SkipReport,
    batches,
    load_eval_data,
    load_sft_data,
    steps_per_epoch,
)
from jaxlora.data.templates import SFTTokenizer, TemplateError

__all__ = ["IGNORE_INDEX", "DataConfig", "DataError", "DataReport", "SFTDataset", "SFTTokenizer", "SkipReport",
           "TemplateError", "batches", "load_eval_data", "load_sft_data", "steps_per_epoch"]
