#!/usr/bin/env bash
# The CUDA checks and GPU benchmarks, as one script for a lent GPU machine (see experiments/gpu/README.md):
#
#   bash experiments/gpu/run_checks.sh            # results go to $OUT (or ./gpu-out)
#
# That machine has torch, jax, flax, optax, peft and pytest but no bitsandbytes: a bitsandbytes wheel for
# Python 3.12 travels in .whl/ and is installed into /tmp/site first.
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/bitsandbytes-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 - <<'PY'
import importlib
for name in ["jax", "jaxlib", "flax", "optax", "torch", "bitsandbytes", "peft", "transformers", "numpy"]:
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as err:  # noqa: BLE001
        print(f"{name}: {type(err).__name__}: {err}")
import jax, torch
print("jax devices:", jax.devices(), "| torch cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
} 2>&1 | tee "$out/environment.txt"

# 1. The cross-checks: every test in these files, the CUDA-parametrized ones included (jaxlora itself runs on
#    the GPU here: JAX's default device is the GPU).
timeout 330 python3 -m pytest -q -p no:cacheprovider --tb=short -rs \
  tests/torch_bridge/test_bnb_quantize.py tests/nn/test_qlora_vs_bnb.py tests/nn/test_linear4bit.py \
  2>&1 | tee "$out/cuda_tests.txt" | tail -40
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$out/cuda_tests.txt"

# 2. Quantize / dequantize throughput on the GPU, jaxlora vs bitsandbytes' CUDA kernels.
timeout 120 python3 experiments/gpu/bench_quant_gpu.py 2>&1 | tee "$out/bench_quant_gpu.txt"
