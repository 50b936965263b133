"""The quickstart end to end on the real model, shortened (2 steps, 3 held-out examples): it measures
before and after, writes the adapter, plot and report, and PEFT on transformers' bitsandbytes model
gives the same greedy answers as jaxlora."""

from __future__ import annotations

import json

import pytest

from jaxlora.quickstart.run import QuickstartOptions, quickstart

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")


def test_quickstart_short_run(tmp_path, capsys):
    out = tmp_path / "qs"
    (out / "checkpoints").mkdir(parents=True)  # a stale run directory is replaced, not resumed
    report = quickstart(QuickstartOptions(steps=2, output_dir=str(out), heldout_limit=3))
    printed = capsys.readouterr().out

    assert report["steps"] == 2 and report["heldout_examples"] == 3
    for when in ("before", "after"):
        evaluation = report[when]
        assert 0 < evaluation["loss"] < 10 and len(evaluation["answers"]) == 3
        assert 0 <= evaluation["right_values"] <= 1 and 0 <= evaluation["exact_match"] <= evaluation["right_values"]
    assert report["after"]["loss"] < report["before"]["loss"]
    assert report["peft"]["same_as_jaxlora"] == [True, True, True], (report["peft"], report["after"]["answers"])
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    assert json.loads((out / "quickstart.json").read_text()) == json.loads(json.dumps(report))
    assert "PEFT reproduces jaxlora's answers on 3/3 examples" in printed
    assert printed.count("expected:") == 3
