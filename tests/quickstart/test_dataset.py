"""The quickstart dataset: the shipped files are what the seeded generator writes, the held-out split
shares no sentence with the training split, and every answer is the exact JSON of its sentence."""

from __future__ import annotations

import json
import re

from jaxlora.quickstart import dataset


def test_shipped_files_are_reproducible(tmp_path):
    dataset.write(tmp_path)
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == (dataset.DATA_DIR / name).read_bytes(), name


def test_sizes_and_disjoint_splits():
    train, heldout = dataset.generate()
    assert len(train) == dataset.TRAIN_SIZE and len(heldout) == dataset.HELDOUT_SIZE
    sentences = [{r["messages"][0]["content"].split("\n\n", 1)[1] for r in part} for part in (train, heldout)]
    assert len(sentences[0]) == len(train) and len(sentences[1]) == len(heldout)  # no duplicates either
    assert not sentences[0] & sentences[1]


def test_answers_are_the_facts_of_the_sentence():
    train, heldout = dataset.generate()
    for record in train + heldout:
        user, assistant = record["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        facts = json.loads(assistant["content"])
        assert list(facts) == ["name", "age", "city"] and isinstance(facts["age"], int)
        assert assistant["content"] == json.dumps(facts)  # one line, default separators
        sentence = user["content"].split("\n\n", 1)[1]
        assert facts["name"] in sentence and facts["city"] in sentence
        assert re.search(rf"\b{facts['age']}\b", sentence)


def test_seed_changes_the_data():
    assert dataset.generate(seed=1, train_size=5, heldout_size=2) != dataset.generate(seed=2, train_size=5, heldout_size=2)
