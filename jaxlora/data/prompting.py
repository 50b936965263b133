"""Prompts in, text out: a checkpoint's tokenizer and chat template as generation needs them.

`PromptCodec.encode_prompt` renders a user message (or a whole conversation) with the checkpoint's
chat template and the generation prompt (transformers' ``apply_chat_template(...,
add_generation_prompt=True)``), or tokenizes raw text with the tokenizer's own special tokens;
`decode` drops special tokens; `stop_ids` are every end-of-sequence id the checkpoint names (the
tokenizer's eos token, ``config.json`` and ``generation_config.json``'s ``eos_token_id``).
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxlora.data.templates import SFTTokenizer, TemplateError


class PromptCodec:
    def __init__(self, model_dir, *, chat: bool = True):
        self.model_dir = Path(model_dir)
        self.tokenizer = SFTTokenizer(self.model_dir)
        self.chat = chat and self.tokenizer.chat_template is not None
        self.pad_id = int(self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0)
        stop = [] if self.tokenizer.eos_id is None else [self.tokenizer.eos_id]
        for name in ("config.json", "generation_config.json"):
            path = self.model_dir / name
            if path.is_file():
                value = json.loads(path.read_text()).get("eos_token_id")
                stop += value if isinstance(value, list) else [] if value is None else [value]
        self.stop_ids = tuple(dict.fromkeys(int(i) for i in stop))

    def prompt_text(self, prompt) -> str:
        """The text the model sees: `prompt` (a string or a list of chat messages) rendered."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not self.chat:
            if not isinstance(prompt, str):
                raise TemplateError(f"{self.model_dir}: no chat template to render a conversation with")
            return prompt
        return self.tokenizer.chat_template.render(messages, add_generation_prompt=True)

    def encode_prompt(self, prompt) -> list[int]:
        """Token ids of `prompt` ready for generation (chat template applied unless raw)."""
        text = self.prompt_text(prompt)
        # A rendered chat template writes its special tokens as text; raw text gets the tokenizer's own.
        encoding = self.tokenizer.tokenizer.encode(text, add_special_tokens=not self.chat)
        return list(encoding.ids)

    def decode(self, ids) -> str:
        return self.tokenizer.tokenizer.decode(list(ids), skip_special_tokens=True)


__all__ = ["PromptCodec"]
