"""`jaxlora.data.sft` / `templates`: JSONL records -> masked, padded or packed token rows.

The reference is transformers: SmolLM2-135M-Instruct's own chat template rendered and tokenized by
``AutoTokenizer.apply_chat_template`` must give the same ids as ours, and the loss mask must select
exactly the assistant contents and their ``<|im_end|>``. Error paths are checked for the file, line
and field they name. Fixture JSONL files are written in tmp_path; the record shapes and the JSON Lines
reader are tested in test_records.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxlora.data.records import DataError, SkipReport
from jaxlora.data.sft import (
    DataConfig,
    SFTTokenizer,
    TokenizedExample,
    batches,
    build_rows,
    load_eval_data,
    load_sft_data,
    pack_examples,
    split_eval,
    steps_per_epoch,
    tokenize_records,
)
from jaxlora.data.templates import JinjaChatTemplate, chatml_pieces, llama2_pieces, render_messages
from tests.data.jsonl import CHATS, record, write_jsonl
from tests.error_bounds import C_FN, gamma, unit_roundoff
from torch_bridge.smollm2 import ensure_smollm2, hub_offline


@pytest.fixture(scope="module")
def smollm2_dir():
    return ensure_smollm2()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return SFTTokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir):
    with hub_offline():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(smollm2_dir)


def trained_runs(tokenizer, ids, mask):
    """Decoded text of each maximal run of trained tokens."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return [
        tokenizer.tokenizer.decode(ids[a:b].tolist(), skip_special_tokens=False)
        for a, b in zip(edges[::2], edges[1::2], strict=True)
    ]


# --- tokenizer and templates -----------------------------------------------------------------------------


def test_special_tokens_from_the_checkpoint(tokenizer):
    assert (tokenizer.bos_token, tokenizer.bos_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_id) == ("<|im_end|>", 2)
    # Special tokens written as text are the special ids; nothing is added around a piece.
    ids, mask = tokenizer.encode([("<|im_start|>", False), ("user\nHi<|im_end|>", True)])
    assert ids.tolist() == [1, 4093, 198, 26843, 2] and ids.dtype == np.int32
    assert mask.tolist() == [False, True, True, True, True]
    assert tokenizer.encode([])[0].shape == (0,)


@pytest.mark.parametrize("chat", CHATS, ids=["one-turn", "system", "two-turns"])
def test_tokenizer_template_equals_transformers(tokenizer, hf_tokenizer, chat):
    pieces = render_messages(chat, "tokenizer", chat_template=tokenizer.chat_template)
    ids, mask = tokenizer.encode(pieces)
    with hub_offline():
        expected = hf_tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
        text = hf_tokenizer.apply_chat_template(chat, tokenize=False)
        prompt = hf_tokenizer.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
    assert "".join(t for t, _ in pieces) == text
    assert ids.tolist() == list(expected)
    assert tokenizer.chat_template.render(chat[:-1], add_generation_prompt=True) == prompt
    # The loss mask selects exactly each assistant content and its end token.
    answers = [m["content"] + "<|im_end|>" for m in chat if m["role"] == "assistant"]
    assert trained_runs(tokenizer, ids, mask) == answers


def test_response_starting_with_spaces_is_tokenized_as_at_inference(tokenizer, hf_tokenizer):
    """Tokenizing piece by piece is what generation sees: the prompt (ending in the header's newline)
    then the response. Tokenizing the whole text instead would merge that newline with the response's
    leading spaces (SmolLM2 has a "\\n " token), which is where HF's whole-text ids differ."""
    chat = [{"role": "user", "content": "Indent it."}, {"role": "assistant", "content": "  indented"}]
    ids, mask = tokenizer.encode(tokenizer.chat_template.pieces(chat))
    with hub_offline():
        prompt = hf_tokenizer.apply_chat_template(chat[:1], add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
        whole = hf_tokenizer.apply_chat_template(chat, return_dict=True)["input_ids"]
        response = hf_tokenizer("  indented<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == list(prompt) + list(response) != list(whole)
    assert trained_runs(tokenizer, ids, mask) == ["  indented<|im_end|>"]


def test_chatml_template(tokenizer):
    chat = CHATS[1]
    pieces = chatml_pieces(chat)
    assert "".join(t for t, _ in pieces) == (
        "<|im_start|>system\nYou answer in one word.<|im_end|>\n"
        "<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis<|im_end|>\n"
    )
    assert [t for t, trained in pieces if trained] == ["Paris<|im_end|>"]
    # With a system message SmolLM2's template is plain ChatML: same ids, same mask.
    theirs = tokenizer.encode(tokenizer.chat_template.pieces(chat))
    ours = tokenizer.encode(pieces)
    assert ours[0].tolist() == theirs[0].tolist() and ours[1].tolist() == theirs[1].tolist()
    assert chatml_pieces(chat[:2], add_generation_prompt=True)[-1] == ("<|im_start|>assistant\n", False)


def test_llama2_template(tokenizer):
    chat = [{"role": "system", "content": "Be brief."}, *CHATS[2]]
    pieces = llama2_pieces(chat)
    assert pieces == [
        ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Leading and trailing spaces  [/INST]", False),
        (" \nA newline first, then 日本語 and émojis 🎉. </s>", True),
        ("<s>[INST] And code?\n```py\nprint(1)\n``` [/INST]", False),
        (" `print(1)` prints 1.   </s>", True),
    ]
    assert llama2_pieces(CHATS[0][:1]) == [("<s>[INST] What is 2+2? [/INST]", False)]
    # Piece boundaries fall on token boundaries: piecewise ids equal the whole text's (not across a
    # literal "</s><s>", which SmolLM2's tokenizer merges into "><": those are special only for Llama's).
    for aligned in (chat[:3], CHATS[0], CHATS[1]):
        pieces = llama2_pieces(aligned)
        whole = tokenizer.tokenizer.encode("".join(t for t, _ in pieces), add_special_tokens=False).ids
        assert tokenizer.encode(pieces)[0].tolist() == whole
    with pytest.raises(ValueError, match=r"message 1 .* role 'user', expected 'assistant'"):
        llama2_pieces([CHATS[0][0], CHATS[0][0]])


def test_checkpoint_without_jinja_file_or_pad_token(tmp_path, smollm2_dir, tokenizer):
    """The template from tokenizer_config.json (string or named list), bos from config.json, pad = eos."""
    (tmp_path / "tokenizer.json").symlink_to(smollm2_dir / "tokenizer.json")
    source = (smollm2_dir / "chat_template.jinja").read_text()
    tagged = source.replace(
        "{{'<|im_start|>' + message['role']", "{% generation %}{{'<|im_start|>' + message['role']"
    )
    tagged = tagged.replace(
        "{% endfor %}", "{% endgeneration %}{% endfor %}"
    )  # transformers' {% generation %} tag
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    for chat_template in (
        tagged,
        [{"name": "tool_use", "template": "x"}, {"name": "default", "template": source}],
    ):
        config = {"eos_token": {"content": "<|im_end|>", "special": True}, "chat_template": chat_template}
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
        other = SFTTokenizer(tmp_path)
        assert (other.bos_token, other.bos_id, other.eos_id, other.pad_token, other.pad_id) == (
            "<|im_start|>",
            1,
            2,
            "<|im_end|>",
            2,
        )
        assert other.chat_template.pieces(CHATS[2]) == tokenizer.chat_template.pieces(CHATS[2])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "tool_use"}]}))
    with pytest.raises(
        ValueError, match=r"tokenizer_config\.json: chat_template is a list without a 'default'"
    ):
        SFTTokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: pad_token '<pad>' is not in the vocab"):
        SFTTokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    without_template = SFTTokenizer(tmp_path)
    assert without_template.chat_template is None
    with pytest.raises(ValueError, match="the checkpoint has no chat template"):
        tokenize_records([record({"text": "t"})], without_template, DataConfig(), SkipReport())
    with pytest.raises(ValueError, match='template="tokenizer" needs the checkpoint'):
        render_messages(CHATS[0], "tokenizer", chat_template=None)


def test_unusable_chat_templates():
    def template(source):
        return JinjaChatTemplate(source, {"eos_token": "</s>"}, end_text="</s>")

    reversed_order = template("{% for m in messages|reverse %}{{ m['content'] }}|{% endfor %}")
    with pytest.raises(ValueError, match="not prefix-stable: rendering messages up to index 1"):
        reversed_order.pieces(CHATS[0])
    header_after = template(
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    with pytest.raises(
        ValueError, match=r"rendering messages\[:2\] does not start with the generation prompt"
    ):
        header_after.pieces(CHATS[0])
    refusing = template("{{ raise_exception('only one message') if messages|length > 1 }}")
    with pytest.raises(ValueError, match="chat template failed: only one message"):
        refusing.pieces(CHATS[0])
    plain = template(
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% if m.role == 'assistant' %}"
        "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    assert plain.pieces(CHATS[0]) == [
        ("[user] What is 2+2?\n", False),
        ("[assistant] ", False),
        ("It is 4.</s>", True),
        ("\n", False),
    ]
    with pytest.raises(ValueError, match="unknown template 'alpaca'"):
        render_messages(CHATS[0], "alpaca")


# --- tokenized examples: masks, lengths, errors ----------------------------------------------------------


def tokenize(tokenizer, datas, **config):
    report = SkipReport(path="mem.jsonl")
    config = DataConfig(**{"max_seq_length": 512, **config})
    records = [record(d, line=i + 1) for i, d in enumerate(datas)]
    return tokenize_records(records, tokenizer, config, report), report


def test_alpaca_and_text_masks(tokenizer):
    alpaca = {"instruction": "Add.", "input": "2 and 2", "output": "Four."}
    (example, text), _ = tokenize(
        tokenizer, [alpaca, {"text": "Just text."}], template="chatml", system_prompt="S"
    )
    assert trained_runs(tokenizer, example.input_ids, example.loss_mask) == ["Four.<|im_end|>"]
    assert tokenizer.tokenizer.decode(example.input_ids.tolist(), skip_special_tokens=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nAdd.\n\n2 and 2<|im_end|>\n"
        "<|im_start|>assistant\nFour.<|im_end|>\n"
    )
    assert text.loss_mask.all() and tokenizer.tokenizer.decode(text.input_ids.tolist()) == "Just text."
    (everything,), _ = tokenize(tokenizer, [alpaca], template="chatml", train_on_prompt=True)
    assert everything.loss_mask.all()


def test_overlong_policies(tokenizer):
    short, long = {"messages": CHATS[0]}, {"messages": CHATS[2]}
    n_long = len(tokenize(tokenizer, [long])[0][0].input_ids)
    limit = 60
    assert len(tokenize(tokenizer, [short])[0][0].input_ids) <= limit < n_long

    examples, report = tokenize(tokenizer, [short, long, short], max_seq_length=limit)
    assert [len(e.input_ids) for e in examples][1] == limit and report.truncated == 1
    assert report.first_lines == {"truncated": [2]} and report.total_skipped == 0
    full = tokenize(tokenizer, [long])[0][0]
    assert examples[1].input_ids.tolist() == full.input_ids[:limit].tolist()  # the head is kept

    examples, report = tokenize(tokenizer, [short, long, short], max_seq_length=limit, overlong="skip")
    assert [e.line for e in examples] == [1, 3] and report.skipped == {"too_long": 1}
    assert report.first_lines == {"too_long": [2]}

    for on_error in ("raise", "skip"):  # an explicit overlong="raise" wins over on_error="skip"
        with pytest.raises(
            DataError, match=rf"mem.jsonl:2: {n_long} tokens, more than max_seq_length={limit}"
        ):
            tokenize(tokenizer, [short, long], max_seq_length=limit, overlong="raise", on_error=on_error)


def test_no_trainable_tokens_after_truncation(tokenizer):
    chat = {"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]}
    expected = r"mem.jsonl:1: no trainable token to predict in the 32 tokens kept \(max_seq_length=32\)"
    with pytest.raises(DataError, match=expected):
        tokenize(tokenizer, [chat], max_seq_length=32)
    examples, report = tokenize(tokenizer, [chat, {"text": "fine text"}], max_seq_length=32, on_error="skip")
    assert len(examples) == 1 and report.skipped == {"no_trainable_tokens": 1} and report.truncated == 0


def test_record_and_template_errors_skip_or_raise(tokenizer):
    datas = [{"messages": CHATS[0]}, {"foo": 1}, {"messages": [CHATS[0][0], CHATS[0][0], CHATS[0][1]]}]
    with pytest.raises(DataError, match=r"mem.jsonl:2: unknown record shape"):
        tokenize(tokenizer, datas, template="llama2")
    examples, report = tokenize(tokenizer, datas, template="llama2", on_error="skip")
    assert [e.line for e in examples] == [1]
    assert report.skipped == {"missing_fields": 1, "template": 1}
    assert report.first_lines == {"missing_fields": [2], "template": [3]}
    with pytest.raises(DataError, match=r"mem.jsonl:1: llama2 template: message 1"):
        tokenize(tokenizer, [datas[2]], template="llama2")


# --- rows: labels, padding, packing ----------------------------------------------------------------------


def make_example(ids, mask, line=0):
    return TokenizedExample(np.asarray(ids, np.int32), np.asarray(mask, bool), line)


def test_padded_rows_and_labels():
    """HF's labels: the input ids where trained, -100 elsewhere; the loss shifts them."""
    example = make_example([10, 11, 12, 13, 14], [0, 0, 1, 1, 1])
    rows = build_rows([example], 8, pad_id=2, packing=False)
    assert rows.input_ids.tolist() == [[10, 11, 12, 13, 14, 2, 2, 2]]
    assert rows.labels.tolist() == [[-100, -100, 12, 13, 14, -100, -100, -100]]
    text = build_rows([make_example([10, 11, 12], [1, 1, 1])], 4, pad_id=2, packing=False)
    assert text.labels.tolist() == [[-100, 11, 12, -100]]  # the first token has nothing to be predicted from
    assert rows.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 0, 0]]
    assert rows.segment_ids.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]
    assert {a.dtype for a in (rows.input_ids, rows.labels, rows.attention_mask)} == {np.dtype(np.int32)}


def test_pack_examples_first_fit():
    assert pack_examples([5, 3, 4, 2, 6], 8) == [[0, 1], [2, 3], [4]]
    assert pack_examples([6, 5, 2, 3], 8) == [[0, 2], [1, 3]]
    assert pack_examples([], 8) == []
    with pytest.raises(ValueError, match="example 1 has 9 tokens"):
        pack_examples([1, 9], 8)


def test_packing_keeps_examples_whole(tokenizer):
    datas = [{"messages": c} for c in CHATS] * 3 + [{"text": "short " * n} for n in range(1, 8)]
    examples, _ = tokenize(tokenizer, datas)
    limit = 128
    packed = build_rows(examples, limit, tokenizer.pad_id, packing=True)
    unpacked = build_rows(examples, limit, tokenizer.pad_id, packing=False)
    assert len(packed) < len(unpacked) == len(examples)
    assert (
        packed.attention_mask.sum()
        == unpacked.attention_mask.sum()
        == sum(len(e.input_ids) for e in examples)
    )
    assert (packed.labels != -100).sum() == (unpacked.labels != -100).sum()
    # Every target (label t+1, predicted at position t) lies in the same example as its position.
    targets = packed.labels[:, 1:] != -100
    assert (packed.segment_ids[:, :-1][targets] == packed.segment_ids[:, 1:][targets]).all()
    seen = []
    for row in range(len(packed)):
        segments = packed.segment_ids[row]
        n_segments = segments.max()
        used = int((segments > 0).sum())
        assert (segments[:used] > 0).all() and (segments[used:] == 0).all()  # padding only at the end
        assert (packed.input_ids[row, used:] == tokenizer.pad_id).all()
        for s in range(1, n_segments + 1):
            span = np.flatnonzero(segments == s)
            assert (np.diff(span) == 1).all()  # contiguous
            assert packed.position_ids[row, span].tolist() == list(range(len(span)))
            assert packed.labels[row, span[0]] == -100  # not predicted from the previous example
            seen.append((packed.input_ids[row, span].tolist(), packed.labels[row, span].tolist()))
    real = unpacked.attention_mask.astype(bool)
    rows = zip(unpacked.input_ids, unpacked.labels, real, strict=True)
    expected = [(ids[m].tolist(), lab[m].tolist()) for ids, lab, m in rows]
    assert sorted(seen) == sorted(expected)  # every example exactly once, whole, with its labels


def test_trainer_loss_counts_exactly_the_assistant_tokens(tokenizer):
    """The rows' labels under `jaxlora.train.step.token_cross_entropy` (HF's shift)."""
    from jaxlora.train.step import token_cross_entropy

    examples, _ = tokenize(tokenizer, [{"messages": c} for c in CHATS])
    rows = build_rows(examples, 256, tokenizer.pad_id, packing=True)
    assistant = [tokenizer.tokenizer.encode(m["content"] + "<|im_end|>", add_special_tokens=False).ids
                 for c in CHATS for m in c if m["role"] == "assistant"]
    logits = np.zeros((*rows.input_ids.shape, 8), np.float32)  # uniform: each counted token costs log 8
    total, count = token_cross_entropy(logits, np.clip(rows.labels, -100, 7))
    assert int(count) == sum(map(len, assistant))
    # Each counted token costs fl(log 8) (exp(0) = 1 and a sum of eight ones are exact; log rounds within
    # a few ulps), and the float32 sum over all positions adds gamma(positions) of the total at most.
    u = unit_roundoff(np.float32)
    rtol = gamma(rows.labels.size, u) + C_FN * u
    np.testing.assert_allclose(float(total), int(count) * np.log(8), rtol=rtol)


# --- eval split, shuffling, resume -----------------------------------------------------------------------


def test_split_eval():
    items = list(range(100))
    train, held = split_eval(items, eval_fraction=0.1, seed=3)
    assert len(held) == 10 and sorted(train + held) == items and not set(train) & set(held)
    assert split_eval(items, eval_fraction=0.1, seed=3) == (train, held)  # stable
    assert split_eval(items, eval_fraction=0.1, seed=4)[1] != held
    assert train == sorted(train) and held == sorted(held)  # input order kept
    assert len(split_eval(items, eval_size=7)[1]) == 7
    assert split_eval(items) == (items, [])
    assert len(split_eval(list(range(5)), eval_fraction=0.1)[1]) == 1  # 0.5 rounds up
    with pytest.raises(ValueError, match="not both"):
        split_eval(items, eval_fraction=0.1, eval_size=3)
    with pytest.raises(ValueError, match="leaves no training data"):
        split_eval(items, eval_size=100)


def row_dataset(n_rows, length=4):
    examples = [make_example(np.arange(length) + 10 * i, np.ones(length)) for i in range(n_rows)]
    return build_rows(examples, length + 2, pad_id=0, packing=False)


def test_batches_deterministic_complete_and_resumable():
    dataset = row_dataset(11)
    run = list(batches(dataset, 4, seed=5, epoch=2))
    assert len(run) == steps_per_epoch(dataset, 4) == 3
    assert all(
        set(b) == {"input_ids", "attention_mask", "labels", "position_ids", "segment_ids"} for b in run
    )
    assert all(a.shape == (4, 6) and a.dtype == np.int32 for b in run for a in b.values())
    again = list(batches(dataset, 4, seed=5, epoch=2))
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(run, again, strict=True) for k in a)
    firsts = sorted(int(b["input_ids"][i, 0]) for b in run for i in range(4) if b["attention_mask"][i, 0])
    assert firsts == [10 * i for i in range(11)]  # every row exactly once
    last = run[-1]
    assert (
        last["attention_mask"][3:].sum() == 0 and (last["labels"][3:] == -100).all()
    )  # one empty filler row
    order = [int(b["input_ids"][i, 0]) for b in run for i in range(4) if b["attention_mask"][i, 0]]
    other_epoch = [
        int(b["input_ids"][i, 0])
        for b in batches(dataset, 4, seed=5, epoch=3)
        for i in range(4)
        if b["attention_mask"][i, 0]
    ]
    assert order != other_epoch and order != sorted(order)
    for k in range(4):  # resume after k steps: the same remaining batches
        resumed = list(batches(dataset, 4, seed=5, epoch=2, start_step=k))
        assert len(resumed) == len(run) - k
        assert all(np.array_equal(a[f], b[f]) for a, b in zip(run[k:], resumed, strict=True) for f in a)
    unshuffled = next(batches(dataset, 4, seed=0, epoch=0, shuffle=False))
    assert unshuffled["input_ids"][:, 0].tolist() == [0, 10, 20, 30]
    with pytest.raises(ValueError, match="batch_size >= 1"):
        next(batches(dataset, 0, seed=0, epoch=0))


def test_load_sft_data_end_to_end(tmp_path, tokenizer):
    lines = [{"messages": c} for c in CHATS] * 4
    lines += [{"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i)))} for i in range(1, 9)]
    lines += ["{oops", {"text": "raw text " * 3}]
    path = write_jsonl(tmp_path, lines)
    config = DataConfig(max_seq_length=256, packing=True, eval_size=4, on_error="skip", split_seed=1)
    train, held, report = load_sft_data(path, tokenizer, config)
    assert report.skipped == {"invalid_json": 1} and report.first_lines["invalid_json"] == [21]
    assert held is not None and held.segment_ids.max(axis=1).sum() == 4
    assert train.segment_ids.max(axis=1).sum() == len(lines) - 1 - 4
    assert train.input_ids.shape[1] == 256 and len(train) < len(lines) - 5
    # Every record is accounted for: 21 records (one line is not JSON), 4 held out, 17 trained on.
    assert (report.records, report.held_out) == (len(lines) - 1, 4)
    assert report.examples == {"train": len(lines) - 1 - 4, "eval": 4}
    assert report.rows == {"train": len(train), "eval": len(held)}
    assert train.report is report and held.report is report
    assert str(report).startswith(f"21 records (4 held out for evaluation) -> 17 train examples in {len(train)} rows, "
                                  f"4 eval examples in {len(held)} rows; {path}: 1 invalid_json")
    assert report.as_dict()["examples"] == report.examples
    again = load_sft_data(path, tokenizer, config)
    assert np.array_equal(again[0].input_ids, train.input_ids) and np.array_equal(
        again[1].labels, held.labels
    )
    with pytest.raises(DataError, match=rf"{path}:21: not valid JSON"):
        load_sft_data(path, tokenizer, DataConfig(max_seq_length=256))
    with pytest.raises(ValueError, match="overlong='cut'"):
        DataConfig(overlong="cut")
    with pytest.raises(ValueError, match="template='alpaca'"):
        DataConfig(template="alpaca")


def test_load_eval_data_uses_the_whole_file_and_accounts_for_every_record(tmp_path, tokenizer):
    good = [{"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i)))} for i in range(1, 7)]
    no_answer = {"messages": [{"role": "user", "content": "Hello?"}]}
    path = write_jsonl(tmp_path, good + [no_answer], name="eval.jsonl")
    config = DataConfig(max_seq_length=256, on_error="skip")
    held, report = load_eval_data(path, tokenizer, config)
    assert held.segment_ids.max(axis=1).sum() == 6 and held.report is report
    assert (report.records, report.held_out, report.examples, report.rows) == (7, 7, {"eval": 6}, {"eval": len(held)})
    assert report.skipped == {"missing_fields": 1} and report.first_lines["missing_fields"] == [7]
    assert str(report).startswith(f"7 records -> 6 eval examples in {len(held)} rows; {path}: 1 missing_fields")
    with pytest.raises(ValueError, match=r"eval.jsonl: an evaluation file is used whole; eval_fraction=0.0 / eval_size=2"):
        load_eval_data(path, tokenizer, DataConfig(max_seq_length=256, eval_size=2))
    empty = write_jsonl(tmp_path, [no_answer, no_answer], name="empty_eval.jsonl")
    with pytest.raises(DataError, match=r"empty_eval.jsonl: no evaluation example left of 2 records"):
        load_eval_data(empty, tokenizer, config)
    # Without a split, load_sft_data holds nothing out.
    train, none, train_report = load_sft_data(path, tokenizer, config)
    assert none is None and train_report.held_out == 0 and train_report.examples == {"train": 6}
