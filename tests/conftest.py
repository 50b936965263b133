"""Test configuration: loud dtype/rank promotion, float32 matmuls at full precision."""

import jax
import pytest

# Silent rank promotion hides shape bugs; make it an error everywhere in the tests.
jax.config.update("jax_numpy_rank_promotion", "raise")
# CPU matmuls are exact float32 anyway; this keeps GPU runs of the same tests comparable.
jax.config.update("jax_default_matmul_precision", "highest")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


CUDA = pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=CUDA)])
def torch_device(request):
    """Run a bitsandbytes/torch check on the CPU, and again on CUDA when a GPU is present."""
    return request.param
