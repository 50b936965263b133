"""Small shared helpers for the tests (comparisons with explicit, relative tolerances)."""

from __future__ import annotations

import numpy as np


def to_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().float().numpy()
    return np.asarray(a, dtype=np.float32)


def assert_rel_close(actual, expected, rel: float, what: str = "") -> float:
    """max |actual - expected| <= rel * max |expected|; returns the measured relative error."""
    actual, expected = to_numpy(actual), to_numpy(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = float(np.max(np.abs(expected)))
    err = float(np.max(np.abs(actual - expected))) / (scale if scale > 0 else 1.0)
    assert err <= rel, f"{what}: relative error {err:.3e} > {rel:.1e}"
    return err
