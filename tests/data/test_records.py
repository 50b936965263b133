"""`jaxlora.data.records`: JSON Lines files and the record shapes (alpaca, text, chat messages).

Error paths are checked for the file, line and field they name; the skip report for its counts.
Fixture JSONL files are written in tmp_path.
"""

from __future__ import annotations

import pytest

from jaxlora.data.records import DataError, SkipReport, read_jsonl, record_to_messages
from tests.data.jsonl import CHATS, record, write_jsonl


def test_record_shapes():
    alpaca = {"instruction": "Add.", "input": "2 and 2", "output": "4"}
    assert record_to_messages(record(alpaca)) == [
        {"role": "user", "content": "Add.\n\n2 and 2"},
        {"role": "assistant", "content": "4"},
    ]
    no_input = record({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert record_to_messages(no_input, system_prompt="S")[:2] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Say hi."},
    ]
    assert record_to_messages(record({"text": "plain", "meta": 1})) == "plain"
    chat = record({"messages": CHATS[1], "text": "ignored: messages wins"})
    assert record_to_messages(chat, system_prompt="not used: has one") == CHATS[1]
    assert record_to_messages(record({"instruction": "i", "output": "o", "text": "t"}), format="text") == "t"


@pytest.mark.parametrize(
    "data, fmt, match",
    [
        (
            {"prompt": "p", "completion": "c"},
            "auto",
            r"mem.jsonl:7: unknown record shape.*\['completion', 'prompt'\]",
        ),
        ({"instruction": "i"}, "auto", r"mem.jsonl:7: unknown record shape.*found fields \['instruction'\]"),
        (
            {"instruction": "i"},
            "alpaca",
            r"mem.jsonl:7: field 'output': missing; found fields \['instruction'\]",
        ),
        ({"text": "t"}, "chat", r"mem.jsonl:7: field 'messages': missing; found fields \['text'\]"),
        (
            {"instruction": 3, "output": "o"},
            "auto",
            r"mem.jsonl:7: field 'instruction': expected a string, got int",
        ),
        ({"messages": []}, "auto", r"field 'messages': expected a non-empty list"),
        (
            {"messages": [{"role": "user"}]},
            "auto",
            r"field 'messages\[0\]': expected an object with 'role' and 'content'",
        ),
        ({"messages": [{"role": "bot", "content": "x"}]}, "auto", r"field 'messages\[0\].role': role 'bot'"),
        (
            {"messages": [{"role": "user", "content": None}]},
            "auto",
            r"field 'messages\[0\].content': expected a string",
        ),
        ({"messages": [{"role": "user", "content": "x"}]}, "auto", r"field 'messages': no assistant message"),
    ],
)
def test_record_errors_name_file_line_and_field(data, fmt, match):
    with pytest.raises(DataError, match=match) as info:
        record_to_messages(record(data, line=7), format=fmt)
    assert info.value.line == 7 and info.value.path == "mem.jsonl"
    assert info.value.reason in {"missing_fields", "bad_field"}


# --- reading JSONL ---------------------------------------------------------------------------------------


def test_read_jsonl_errors(tmp_path):
    good = {"text": "ok"}
    path = write_jsonl(tmp_path, [good, good, '{"text": "unterminated', good])
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON") as info:
        read_jsonl(path)
    assert (info.value.line, info.value.reason) == (3, "invalid_json")
    with pytest.raises(DataError, match=rf"{path}:2: expected a JSON object, got list"):
        read_jsonl(write_jsonl(tmp_path, [good, "[1, 2]"]))
    with pytest.raises(DataError, match=r"empty.jsonl: no records: the file is empty"):
        read_jsonl(write_jsonl(tmp_path, [], name="empty.jsonl"))
    with pytest.raises(DataError, match=r"no records: every record was skipped .*1 invalid_json"):
        read_jsonl(write_jsonl(tmp_path, ["nope", " "]), on_error="skip")
    with pytest.raises(ValueError, match="on_error='ignore'"):
        read_jsonl(path, on_error="ignore")


def test_read_jsonl_skip_report(tmp_path):
    lines = [
        {"text": "a"},
        "not json",
        "",
        "7",
        {"text": "b"},
        "{bad",
        '"str"',
        "x",
        "y",
        "z",
        "w",
        {"text": "c"},
    ]
    records, report = read_jsonl(write_jsonl(tmp_path, lines), on_error="skip")
    assert [(r.line, r.data["text"]) for r in records] == [(1, "a"), (5, "b"), (12, "c")]
    assert report.skipped == {"invalid_json": 6, "not_object": 2}
    assert report.first_lines == {"invalid_json": [2, 6, 8, 9, 10], "not_object": [4, 7]}
    assert report.blank_lines == 1 and report.total_skipped == 8
    assert "6 invalid_json (lines [2, 6, 8, 9, 10]...)" in str(report)
