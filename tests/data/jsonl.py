"""Test helpers for JSONL data: sample chats, files written in tmp_path, in-memory records."""

from __future__ import annotations

import json

from jaxlora.data.records import JsonRecord

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ],
    [
        {"role": "user", "content": " Leading and trailing spaces "},
        {"role": "assistant", "content": "\nA newline first, then 日本語 and émojis 🎉."},
        {"role": "user", "content": "And code?\n```py\nprint(1)\n```"},
        {"role": "assistant", "content": "`print(1)` prints 1.  "},
    ],
]


def write_jsonl(tmp_path, lines, name="data.jsonl"):
    """Write raw lines (dicts are JSON-encoded, strings written as they are)."""
    path = tmp_path / name
    path.write_text(
        "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines), encoding="utf-8"
    )
    return path


def record(data, line=1):
    return JsonRecord("mem.jsonl", line, data)
