"""save_llama's streaming writer: the same files as collecting every tensor and then splitting, with one
shard in host memory at a time. (Round trips through transformers are in test_checkpoint.py.)"""

from __future__ import annotations

import json
import weakref

import numpy as np
import pytest

from tests.models.test_llama import hf_model

safetensors_numpy = pytest.importorskip("safetensors.numpy")

from torch_bridge import checkpoint_writer, load_llama, save_llama  # noqa: E402
from torch_bridge.checkpoint_writer import checkpoint_tensors, parse_size  # noqa: E402


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    hf_model("gqa-untied").save_pretrained(directory)
    return directory


def collect_then_split(model, limit, dtype=None, quantization=None, double_quant=True, blocksize=64):
    """The files of the writer before it streamed: every tensor converted first, then split greedily
    (a tensor goes to a new shard when it would pass the limit), each shard serialized whole."""
    shards = [{}]
    size = 0
    for key, array in checkpoint_tensors(model, dtype, quantization, double_quant, blocksize):
        if shards[-1] and size + array.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = np.ascontiguousarray(array)
        size += array.nbytes
    if len(shards) == 1:
        return {"model.safetensors": safetensors_numpy.save(shards[0], metadata={"format": "pt"})}
    files, weight_map, total = {}, {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        files[name] = safetensors_numpy.save(shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(a.nbytes for a in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    files["model.safetensors.index.json"] = json.dumps(index, indent=2, sort_keys=True).encode()
    return files


CASES = {
    "one-file": dict(),
    "20KB-shards": dict(max_shard_size="20KB"),
    "1-byte-shards": dict(max_shard_size=1),
    "bfloat16-30KB": dict(dtype="bfloat16", max_shard_size="30KB"),
    "nf4-7KB": dict(quantization="bnb-nf4", max_shard_size="7KB"),
    "fp4-no-double-quant-5KB": dict(quantization="bnb-fp4", double_quant=False, max_shard_size="5KB"),
}


@pytest.mark.parametrize("quantized_model", [False, True], ids=["dense-model", "nf4-model"])
@pytest.mark.parametrize("case", CASES)
def test_streamed_files_equal_collecting_then_splitting(tmp_path, source, case, quantized_model):
    model = load_llama(source, quantize="nf4" if quantized_model else None)
    options = dict(CASES[case])
    out = save_llama(model, tmp_path / "out", **options)
    limit = parse_size(options.pop("max_shard_size", "5GB"))
    expected = collect_then_split(model, limit, **options)
    written = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "config.json"}
    assert sorted(written) == sorted(expected)
    for name in expected:
        assert written[name] == expected[name], f"{name} differs"
    assert not list(tmp_path.glob(".out.*")), "temporary directories left behind"


class LiveArrays:
    """Weak references to every array a writer's tensor groups produce: what is still alive, in bytes."""

    def __init__(self):
        self.refs: list[tuple[weakref.ref, int]] = []
        self.peak = 0

    def bytes_alive(self) -> int:
        return sum(n for ref, n in self.refs if ref() is not None)

    def observe(self) -> None:
        self.peak = max(self.peak, self.bytes_alive())

    def wrap(self, group):
        def compute():
            arrays = group.compute()
            self.refs += [(weakref.ref(a), a.nbytes) for a in arrays.values()]
            self.observe()
            return arrays

        return checkpoint_writer.TensorGroup(group.first_nbytes, compute)


@pytest.mark.parametrize("quantization", [None, "bnb-nf4"])
def test_save_llama_holds_one_shard_at_a_time(tmp_path, source, monkeypatch, quantization):
    model = load_llama(source)
    limit = 25_000  # above the largest tensor (the 97 x 64 float32 embedding, 24832 bytes)
    groups = list(checkpoint_writer.model_tensor_groups(model, None, quantization, True, 64))
    sizes = [[a.nbytes for a in g.compute().values()] for g in groups]
    total = sum(map(sum, sizes))
    # A 4-bit weight's statistics (absmax, tables, JSON) are made together with its packed codes: the
    # one allowance over the shard limit.
    statistics = max(sum(s[1:]) for s in sizes)
    bound = limit + statistics
    assert total > 3 * bound and max(map(max, sizes)) <= limit  # holding everything would fail the bound

    live = LiveArrays()
    original_groups, original_save = checkpoint_writer.model_tensor_groups, safetensors_numpy.save_file
    monkeypatch.setattr(checkpoint_writer, "model_tensor_groups", lambda *a: map(live.wrap, original_groups(*a)))

    def save_file(tensors, filename, metadata=None):
        live.observe()
        assert sum(a.nbytes for a in tensors.values()) <= limit or len(tensors) == 1
        original_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors_numpy, "save_file", save_file)
    out = save_llama(model, tmp_path / "out", quantization=quantization, max_shard_size=limit)
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == sum(map(len, sizes))
    assert 0 < live.peak <= bound, (live.peak, bound, total)
    assert live.bytes_alive() == 0


def test_a_failed_write_leaves_nothing_behind(tmp_path, source, monkeypatch):
    model = load_llama(source)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_numpy, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_llama(model, tmp_path / "out", max_shard_size="20KB", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out" / "keep.txt").read_text() == "old"
