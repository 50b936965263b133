"""The quickstart's output directory (only its own files are ever removed), and the quickstart end to
end on the real model, shortened (2 steps, 3 held-out examples): it measures before and after, writes
the adapter, plot and report, and PEFT on transformers' bitsandbytes model gives the same greedy
answers as jaxlora."""

from __future__ import annotations

import json
import os

import pytest

from jaxlora.cli.commands import main
from jaxlora.quickstart.run import (QUICKSTART_OUTPUTS, QuickstartDirectoryError, QuickstartOptions, prepare_output_dir,
                                    quickstart)


def snapshot(directory):
    """Every path under ``directory`` with its bytes (files) or None (directories and links)."""
    found = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            regular = os.path.isfile(path) and not os.path.islink(path)
            found[os.path.relpath(path, directory)] = open(path, "rb").read() if regular else None
    return found


def earlier_run(directory, report=None):
    """A directory as an earlier (possibly interrupted) quickstart run left it."""
    (directory / "checkpoints" / "5").mkdir(parents=True)
    (directory / "checkpoints" / "5" / "state").write_bytes(b"old state")
    (directory / "adapter").mkdir()
    (directory / "adapter" / "adapter_model.safetensors").write_bytes(b"old adapter")
    for name in ("metrics.jsonl", "loss.png", "summary.json"):
        (directory / name).write_text("old")
    (directory / ".loss.png.0123456789ab.tmp").write_text("half-written")
    (directory / "quickstart.json").write_text(json.dumps(report or {"written_by": "jaxlora quickstart", "status": "running"}))


def test_missing_or_empty_directory_is_used(tmp_path):
    assert prepare_output_dir(tmp_path / "new" / "run") == [] and (tmp_path / "new" / "run").is_dir()
    (tmp_path / "empty").mkdir()
    assert prepare_output_dir(tmp_path / "empty") == []


@pytest.mark.parametrize("contents", [
    {"notes.txt": "mine"},
    {"checkpoints/1/state": "looks like a run, but no quickstart.json"},
    {"quickstart.json": '{"something": "else"}', "data.csv": "1,2"},
    {"quickstart.json": "not json", "loss.png": "x"},
])
def test_foreign_directory_is_refused_and_untouched(tmp_path, contents):
    for name, text in contents.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    before = snapshot(tmp_path)
    with pytest.raises(QuickstartDirectoryError, match=rf"{tmp_path} is not empty and is not an earlier quickstart run"):
        prepare_output_dir(tmp_path)
    assert snapshot(tmp_path) == before


def test_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("a file")
    with pytest.raises(QuickstartDirectoryError, match="not a directory"):
        prepare_output_dir(tmp_path / "run")
    assert (tmp_path / "run").read_text() == "a file"


@pytest.mark.parametrize("report", [None, {"steps": 40, "heldout_examples": 100, "before": {}, "after": {}, "adapter": "x"}],
                         ids=["marked", "report-of-an-older-version"])
def test_earlier_run_loses_only_its_own_files(tmp_path, report):
    earlier_run(tmp_path, report)
    (tmp_path / "notes.txt").write_text("the user's")
    (tmp_path / "my_data").mkdir()
    (tmp_path / "my_data" / "adapter").write_text("a user's file that shares a name, one level down")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "keep").write_text("outside")
    (tmp_path / "best_adapter").symlink_to(outside, target_is_directory=True)
    removed = prepare_output_dir(tmp_path)
    assert removed == sorted([".loss.png.0123456789ab.tmp", "adapter", "best_adapter", "checkpoints", "loss.png",
                              "metrics.jsonl", "quickstart.json", "summary.json"])
    assert snapshot(tmp_path) == {"notes.txt": b"the user's", "my_data": None,
                                  "my_data/adapter": b"a user's file that shares a name, one level down"}
    assert (outside / "keep").read_text() == "outside"  # the link was removed, not followed


def test_cli_refuses_a_foreign_directory_in_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code = main(["quickstart", "--output-dir", str(tmp_path), "--skip-peft-check"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"jaxlora: error: --output-dir {tmp_path} is not empty")
    assert snapshot(tmp_path) == {"notes.txt": b"mine"}


def test_quickstart_short_run(tmp_path, capsys):
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qs"
    out.mkdir()
    earlier_run(out)  # an interrupted run: its checkpoint is removed, not resumed
    (out / "notes.txt").write_text("the user's")
    report = quickstart(QuickstartOptions(steps=2, output_dir=str(out), heldout_limit=3))
    printed = capsys.readouterr().out
    assert (out / "notes.txt").read_text() == "the user's"
    assert {p.name for p in out.iterdir()} - {"notes.txt"} <= set(QUICKSTART_OUTPUTS), "a file the quickstart would not remove"

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
