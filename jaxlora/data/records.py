"""SFT records: JSON Lines read strictly, the three record shapes, and reports of what was skipped.

Records are one JSON object per line, in one of three shapes (detected per record in this order, or
forced with ``format=``):

- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
- alpaca: ``{"instruction": str, "input": str (optional), "output": str}`` -> the chat
  ``[system_prompt?, user: instruction + ("\\n\\n" + input if input), assistant: output]``
- text: ``{"text": str}`` -> one trainable piece (loss on every token), used verbatim.

Nothing is dropped silently: bad lines and records raise a `DataError` naming file, line and field,
or with ``on_error="skip"`` are counted per reason in the `SkipReport`; `DataReport` says where every
record of a file went (`jaxlora.data.sft`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxlora.data.templates import ROLES

ON_ERROR = ("raise", "skip")
FORMATS = ("auto", "chat", "alpaca", "text")
_FIRST_LINES_KEPT = 5


class DataError(ValueError):
    """Bad training data: the message names file, line and field; `reason` is its `SkipReport` key."""

    def __init__(self, message: str, *, reason: str, path=None, line: int | None = None, field=None):
        where = ":".join(str(part) for part in (path, line) if part is not None)
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}{f'field {field!r}: ' if field else ''}{message}")
        self.reason, self.path, self.line, self.field = reason, path, line, field


@dataclasses.dataclass
class SkipReport:
    """What did not make it through unchanged, per reason, with the first few line numbers of each."""

    path: str = ""
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    """Reason ("invalid_json", "not_object", "missing_fields", "bad_field", "template", "too_long",
    "no_trainable_tokens") -> number of lines skipped for it."""
    first_lines: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    """Reason -> the first (up to 5) line numbers skipped for it; "truncated" too."""
    truncated: int = 0
    """Examples longer than max_seq_length whose head was kept (overlong="truncate")."""
    blank_lines: int = 0
    """Whitespace-only lines (not records; counted, never an error)."""

    def count(self, reason: str, line: int) -> None:
        if reason == "truncated":
            self.truncated += 1
        else:
            self.skipped[reason] = self.skipped.get(reason, 0) + 1
        lines = self.first_lines.setdefault(reason, [])
        if len(lines) < _FIRST_LINES_KEPT:
            lines.append(line)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def __str__(self) -> str:
        lines = self.first_lines
        parts = [f"{n} {reason} (lines {lines[reason]}...)" for reason, n in sorted(self.skipped.items())]
        if self.truncated:
            parts.append(f"{self.truncated} truncated (lines {self.first_lines['truncated']}...)")
        return f"{self.path}: " + ("; ".join(parts) if parts else "nothing skipped or truncated")


@dataclasses.dataclass
class DataReport(SkipReport):
    """A file's `SkipReport` plus where its records went (`load_sft_data`, `load_eval_data`).

    ``records = held_out + (records left for training)``; each part's records either become examples
    or are counted in ``skipped`` (reasons other than the line-level "invalid_json" / "not_object").
    """

    records: int = 0
    """Records read (JSON objects; lines that are not records are counted in `skipped`)."""
    held_out: int = 0
    """Records held out of this file for evaluation (eval_fraction / eval_size; all of an eval file)."""
    examples: dict[str, int] = dataclasses.field(default_factory=dict)
    """Part ("train" / "eval") -> examples kept after tokenizing and the overlong policy."""
    rows: dict[str, int] = dataclasses.field(default_factory=dict)
    """Part -> rows of max_seq_length (several examples per row with packing)."""

    @classmethod
    def of(cls, skips: SkipReport) -> DataReport:
        return cls(**{f.name: getattr(skips, f.name) for f in dataclasses.fields(SkipReport)})

    def as_dict(self) -> dict:
        """JSON-ready: path, records, held_out, examples, rows, skipped, truncated, blank_lines, first_lines."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        parts = ", ".join(f"{self.examples.get(part, 0)} {part} examples in {self.rows.get(part, 0)} rows"
                          for part in ("train", "eval") if part in self.examples)
        split = f" ({self.held_out} held out for evaluation)" if self.held_out and "train" in self.examples else ""
        return f"{self.records} records{split} -> {parts}; " + super().__str__()


@dataclasses.dataclass(frozen=True)
class JsonRecord:
    """One JSONL line: the parsed object and where it came from."""

    path: str
    line: int
    data: dict

    def error(self, message: str, *, reason: str, field: str | None = None) -> DataError:
        return DataError(message, reason=reason, path=self.path, line=self.line, field=field)

    def missing(self, field: str) -> DataError:
        return self.error(f"missing; found fields {sorted(self.data)}", reason="missing_fields", field=field)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; expected one of {choices}")


def read_jsonl(path, *, on_error: str = "raise") -> tuple[list[JsonRecord], SkipReport]:
    """Read a JSON Lines file: one JSON object per line (UTF-8; line numbers start at 1).

    A line that is not JSON or not an object raises `DataError` (reason "invalid_json" /
    "not_object"), or with ``on_error="skip"`` is counted and skipped. A file without records
    (empty, or every line skipped) always raises.
    """
    _check_choice("on_error", on_error, ON_ERROR)
    path = Path(path)
    report, records = SkipReport(path=str(path)), []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                report.blank_lines += 1
                continue
            try:
                records.append(JsonRecord(str(path), line_no, _parse_line(raw, path, line_no)))
            except DataError as e:
                if on_error == "raise":
                    raise
                report.count(e.reason, line_no)
    if not records:
        detail = f"every record was skipped ({report})" if report.skipped else "the file is empty"
        raise DataError(f"no records: {detail}", reason="empty", path=path)
    return records, report


def _parse_line(raw: bytes, path, line: int) -> dict:
    try:
        value = json.loads(raw.decode("utf-8-sig" if line == 1 else "utf-8"))
    except UnicodeDecodeError as e:
        message = f"not valid UTF-8 ({e.reason} at byte {e.start})"
        raise DataError(message, reason="invalid_json", path=path, line=line) from None
    except json.JSONDecodeError as e:
        message = f"not valid JSON ({e.msg} at column {e.colno})"
        raise DataError(message, reason="invalid_json", path=path, line=line) from None
    if not isinstance(value, dict):
        message = f"expected a JSON object, got {type(value).__name__}"
        raise DataError(message, reason="not_object", path=path, line=line)
    return value


def detect_format(record: JsonRecord) -> str:
    """The record's shape: chat if it has "messages", alpaca if "instruction" and "output", text if "text"."""
    keys = record.data.keys()
    for fmt, required in (("chat", {"messages"}), ("alpaca", {"instruction", "output"}), ("text", {"text"})):
        if required <= keys:
            return fmt
    raise record.error(
        f"unknown record shape: expected 'messages' (chat), 'instruction' + 'output' (alpaca) or 'text'; "
        f"found fields {sorted(keys)}", reason="missing_fields")


def record_to_messages(record: JsonRecord, *, format: str = "auto", system_prompt: str | None = None):
    """A record as a chat (list of role/content dicts) or, for the text shape, a string.

    `system_prompt`, if given, becomes the first message of alpaca records and of chats that
    have no system message.
    """
    _check_choice("format", format, FORMATS)
    fmt = detect_format(record) if format == "auto" else format
    if fmt == "text":
        return _string_field(record, "text")
    if fmt == "alpaca":
        user = _string_field(record, "instruction")
        if record.data.get("input"):
            user += "\n\n" + _string_field(record, "input")
        output = _string_field(record, "output")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    else:
        messages = _chat_messages(record)
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _string_field(record: JsonRecord, name: str) -> str:
    if name not in record.data:
        raise record.missing(name)
    value = record.data[name]
    if not isinstance(value, str):
        raise record.error(f"expected a string, got {type(value).__name__}", reason="bad_field", field=name)
    return value


def _chat_messages(record: JsonRecord) -> list[dict]:
    """The validated ``messages`` of a chat record: role in ROLES, string content, an assistant turn."""
    if "messages" not in record.data:
        raise record.missing("messages")
    messages = record.data["messages"]
    if not isinstance(messages, list) or not messages:
        message = f"expected a non-empty list, got {messages!r:.60}"
        raise record.error(message, reason="bad_field", field="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
            problem = f"expected an object with 'role' and 'content', got {message!r:.80}"
            raise record.error(problem, reason="missing_fields", field=f"messages[{i}]")
        if message["role"] not in ROLES:
            problem = f"role {message['role']!r} is not one of {ROLES}"
            raise record.error(problem, reason="bad_field", field=f"messages[{i}].role")
        if not isinstance(message["content"], str):
            problem = f"expected a string, got {type(message['content']).__name__}"
            raise record.error(problem, reason="bad_field", field=f"messages[{i}].content")
    if not any(message["role"] == "assistant" for message in messages):
        message = "no assistant message: nothing to train on"
        raise record.error(message, reason="missing_fields", field="messages")
    return [{"role": message["role"], "content": message["content"]} for message in messages]
