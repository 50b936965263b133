"""Prompt templates (a conversation -> ``(text, trainable)`` pieces) and the tokenizer that encodes them.

A rendered example is a list of pieces rather than one string so that loss masking is exact at the
token level: `SFTTokenizer` (below) tokenizes piece by piece, so no token straddles a prompt/response
boundary, and the prompt's tokens are those generation starts from. Boundaries sit where tokenizers
split anyway (before a special token, a newline, or a space that starts a word), so the ids usually
equal those of the whole text tokenized at once (transformers' ``apply_chat_template``; checked for
SmolLM2). They differ where a tokenizer would merge across a boundary: a response starting with
spaces right after a header's newline (SmolLM2 has a "\\n " token), or llama2's "</s><s>" with a
tokenizer for which these are not special tokens.

A conversation is a list of ``{"role": "system" | "user" | "assistant", "content": str}``.
Templates (``template=`` in `render_messages`):

- ``"llama2"``: ``<s>[INST] {user} [/INST]`` + trainable `` {assistant} </s>`` per exchange; a system
  prompt goes inside the first [INST] as ``<<SYS>>\\n{system}\\n<</SYS>>\\n\\n``. ``<s>``/``</s>`` are
  literal text (special tokens only for tokenizers that declare them).
- ``"chatml"``: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message; an assistant's
  ``{content}<|im_end|>`` is trainable, its header and the trailing newline are not.
- ``"tokenizer"``: the checkpoint's own Jinja chat template (`JinjaChatTemplate`), rendered the
  way transformers' ``apply_chat_template`` renders it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

Piece = tuple[str, bool]
"""``(text, trainable)``: a span of the rendered example and whether its tokens are loss targets."""

ROLES = ("system", "user", "assistant")
TEMPLATES = ("llama2", "chatml", "tokenizer")


class TemplateError(ValueError):
    """A conversation the template cannot render, or a chat template that cannot be used."""


def render_messages(
    messages, template: str, *, chat_template: JinjaChatTemplate | None = None
) -> list[Piece]:
    """Render a conversation with a named template (see the module docstring) into pieces."""
    if template == "llama2":
        return llama2_pieces(messages)
    if template == "chatml":
        return chatml_pieces(messages)
    if template == "tokenizer":
        if chat_template is None:
            raise TemplateError('template="tokenizer" needs the checkpoint\'s chat template; none was found')
        return chat_template.pieces(messages)
    raise TemplateError(f"unknown template {template!r}; expected one of {TEMPLATES}")


def llama2_pieces(messages) -> list[Piece]:
    """Llama-2 chat: ``<s>[INST] [<<SYS>>\\n{system}\\n<</SYS>>\\n\\n]{user} [/INST] {assistant} </s>``...

    An optional system message first, then user/assistant strictly alternating; a final user
    message without an answer renders as an untrained ``<s>[INST] {user} [/INST]``.
    """
    system = ""
    if messages and messages[0]["role"] == "system":
        system = f"<<SYS>>\n{messages[0]['content']}\n<</SYS>>\n\n"
        messages = messages[1:]
    pieces: list[Piece] = []
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise TemplateError(
                f"llama2 template: message {i} (after the system) has role {message['role']!r}, expected "
                f"{expected!r} (an optional system message, then user/assistant alternating)"
            )
        if expected == "user":
            pieces.append((f"<s>[INST] {system if i == 0 else ''}{message['content']} [/INST]", False))
        else:
            pieces.append((f" {message['content']} </s>", True))
    return pieces


def chatml_pieces(messages, *, add_generation_prompt: bool = False) -> list[Piece]:
    """ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message (no default system prompt).

    Trainable: each assistant's ``{content}<|im_end|>``. With `add_generation_prompt`, an untrained
    ``<|im_start|>assistant\\n`` is appended.
    """
    pieces: list[Piece] = []
    for message in messages:
        header = f"<|im_start|>{message['role']}\n"
        if message["role"] == "assistant":
            pieces += [(header, False), (message["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            pieces.append((header + message["content"] + "<|im_end|>\n", False))
    if add_generation_prompt:
        pieces.append(("<|im_start|>assistant\n", False))
    return pieces


def load_chat_template(checkpoint_dir) -> str | None:
    """The Jinja source of a checkpoint's chat template, or None.

    Looked up in ``chat_template.jinja`` (transformers >= 4.50 writes it there), else
    ``tokenizer_config.json["chat_template"]`` (a string, or a list of ``{"name", "template"}`` of
    which the one named "default" is used).
    """
    checkpoint_dir = Path(checkpoint_dir)
    jinja_file = checkpoint_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config_file = checkpoint_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    source = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(source, list):
        named = {entry.get("name"): entry.get("template") for entry in source if isinstance(entry, dict)}
        source = named.get("default")
        if source is None:
            raise TemplateError(
                f"{config_file}: chat_template is a list without a 'default' entry: {sorted(named)}"
            )
    return source


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    """Compile like transformers' ``apply_chat_template``: a sandboxed environment with trim_blocks,
    lstrip_blocks, loop controls, ``raise_exception``, a non-escaping ``tojson``, and the
    ``{% generation %}`` tag accepted (rendered as its body; masking here does not need it)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


@dataclasses.dataclass(frozen=True)
class JinjaChatTemplate:
    """A Hugging Face chat template (Jinja source) and the special-token strings it may reference.

    Pieces come from rendering prefixes of the conversation (the template must be prefix-stable:
    rendering ``messages[:k+1]`` extends the rendering of ``messages[:k]``). For a non-assistant
    message the added text is untrained. For assistant message k the added text is split into
    ``render(messages[:k], add_generation_prompt=True)``'s addition (the header, untrained), then
    the rest up to and including the last `end_text` in it (trained), then what follows (untrained,
    e.g. ChatML's newline). Without `end_text` in it, all of the rest is trained.
    """

    source: str
    special_tokens: dict = dataclasses.field(default_factory=dict)
    """Template variables such as ``{"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}``."""
    end_text: str | None = None
    """The text that closes an assistant turn and is trained on (usually the eos token)."""

    def render(self, messages, *, add_generation_prompt: bool = False) -> str:
        """The template's text for `messages` (transformers' ``apply_chat_template(tokenize=False)``)."""
        import jinja2

        try:
            return _compile(self.source).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except jinja2.exceptions.TemplateError as e:
            raise TemplateError(f"chat template failed: {e}") from e

    def pieces(self, messages) -> list[Piece]:
        """Pieces of `messages` rendered prefix by prefix (see the class docstring)."""
        pieces: list[Piece] = []
        done = ""
        for k, message in enumerate(messages):
            full = self._extension(messages, k, done)
            if message["role"] != "assistant":
                pieces.append((full[len(done):], False))
            else:
                header = self._extension(messages, k, done, add_generation_prompt=True)
                if not full.startswith(header):
                    raise TemplateError(
                        f"chat template: rendering messages[:{k + 1}] does not start with the generation "
                        f"prompt of messages[:{k}]; cannot tell message {k}'s header from its content"
                    )
                body = full[len(header):]
                cut = self._trained_length(body)
                pieces += [(header[len(done):], False), (body[:cut], True), (body[cut:], False)]
            done = full
        return [piece for piece in pieces if piece[0]]

    def _trained_length(self, body: str) -> int:
        """How much of an assistant turn's text is trained: through the last `end_text`, else all."""
        if self.end_text is None or self.end_text not in body:
            return len(body)
        return body.rfind(self.end_text) + len(self.end_text)

    def _extension(self, messages, k, done, *, add_generation_prompt=False) -> str:
        """Render ``messages[:k+1]`` (or ``messages[:k]`` + generation prompt), checking it extends `done`."""
        prefix = messages[:k] if add_generation_prompt else messages[:k + 1]
        text = self.render(prefix, add_generation_prompt=add_generation_prompt)
        if not text.startswith(done):
            raise TemplateError(
                f"chat template is not prefix-stable: rendering messages up to index {k} changes the text of "
                "the earlier messages, so the prompt/response split cannot be exact"
            )
        return text


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class SFTTokenizer:
    """A checkpoint's ``tokenizer.json`` (``tokenizers`` library) plus its special tokens and chat template.

    bos/eos/pad come from ``tokenizer_config.json`` (``"<name>_token"``, a string or an
    ``{"content": ...}`` object) else ``config.json`` (``"<name>_token_id"``, the first if a list);
    without a pad token the eos token pads (padding is never attended to nor trained).
    """

    def __init__(self, checkpoint_dir):
        from tokenizers import Tokenizer

        checkpoint_dir = Path(checkpoint_dir)
        self.tokenizer = Tokenizer.from_file(str(checkpoint_dir / "tokenizer.json"))
        tokenizer_config = _read_json(checkpoint_dir / "tokenizer_config.json")
        model_config = _read_json(checkpoint_dir / "config.json")
        self.bos_token, self.bos_id = self._special("bos", tokenizer_config, model_config, checkpoint_dir)
        self.eos_token, self.eos_id = self._special("eos", tokenizer_config, model_config, checkpoint_dir)
        self.pad_token, self.pad_id = self._special("pad", tokenizer_config, model_config, checkpoint_dir)
        if self.pad_id is None:
            self.pad_token, self.pad_id = self.eos_token, self.eos_id
        source = load_chat_template(checkpoint_dir)
        special = {f"{name}_token": getattr(self, f"{name}_token") for name in ("bos", "eos", "pad")}
        special["unk_token"] = _token_text(tokenizer_config.get("unk_token"))
        special = {key: value for key, value in special.items() if value is not None}
        self.chat_template = None if source is None else JinjaChatTemplate(source, special, self.eos_token)

    def _special(self, name, tokenizer_config, model_config, checkpoint_dir) -> tuple[str | None, int | None]:
        text = _token_text(tokenizer_config.get(f"{name}_token"))
        if text is not None:
            token_id = self.tokenizer.token_to_id(text)
            if token_id is None:
                raise ValueError(
                    f"{checkpoint_dir / 'tokenizer_config.json'}: {name}_token {text!r} is not in the vocab"
                )
            return text, token_id
        token_id = model_config.get(f"{name}_token_id")
        token_id = token_id[0] if isinstance(token_id, list) else token_id
        return (None, None) if token_id is None else (self.tokenizer.id_to_token(token_id), token_id)

    def encode(self, pieces: Sequence[Piece]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize piece by piece, adding no special tokens (templates write them as text).

        Returns ``input_ids`` int32 ``[n]`` and ``loss_mask`` bool ``[n]`` (true on the tokens of
        trainable pieces).
        """
        encodings = self.tokenizer.encode_batch([text for text, _ in pieces], add_special_tokens=False)
        ids = [np.asarray(encoding.ids, np.int32) for encoding in encodings]
        masks = [np.full(len(x), trainable, bool) for x, (_, trainable) in zip(ids, pieces, strict=True)]
        return np.concatenate([np.zeros(0, np.int32), *ids]), np.concatenate([np.zeros(0, bool), *masks])


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value
