#!/usr/bin/env bash
# One prepared run for a lent GPU machine (H100/H200; torch, jax, flax, optax, peft, transformers, pytest,
# no bitsandbytes, no network), about 8 minutes:
#
#   bash experiments/gpu/run.sh OUT_DIR        # carry .whl (the bitsandbytes wheel, see README.md here)
#
# 1. the CUDA bitsandbytes cross-checks: NF4/FP4 packing and absmax byte for byte against bitsandbytes'
#    CUDA kernel, dequantization of its stored state, double quantization, Linear4bit + PEFT against
#    jaxlora's QLoRA logits, pre-quantized checkpoints both ways (every test parametrized with
#    torch_device="cuda");
# 2. the training benchmark on the GPU: jaxlora LoRA / QLoRA against PEFT and PEFT + bitsandbytes on CUDA,
#    SmolLM2-135M's architecture with random weights (the checkpoint cannot be fetched there);
# 3. quantize / dequantize throughput, jaxlora against bitsandbytes' CUDA kernels.
# Everything is written to OUT_DIR; record the figures in experiments/results/.
set -uo pipefail
out=${1:?usage: bash experiments/gpu/run.sh OUT_DIR}
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
PY
} 2>&1 | tee "$out/environment.txt"

# 1. CUDA cross-checks (-k cuda: the torch_device="cuda" parametrizations; jaxlora runs on the GPU too).
timeout 240 python3 -m pytest -q -p no:cacheprovider --tb=short -rs -k cuda \
  tests/torch_bridge/test_bnb_quantize.py tests/torch_bridge/test_bnb_bridge.py tests/nn/test_qlora_vs_bnb.py \
  tests/nn/test_linear4bit.py tests/torch_bridge/test_checkpoint.py tests/torch_bridge/test_peft.py \
  tests/train/test_parity.py 2>&1 | tee "$out/cuda_tests.txt" | tail -30
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$out/cuda_tests.txt"

# 2. Training benchmark on the GPU (random weights in SmolLM2-135M's shape; batch 4 x 256 as on CPU).
#    On cuda bench_train.py runs the main pairs first and keeps to a 270 s budget (configurations that no
#    longer fit are listed as not run, each one has at most 120 s); without bitsandbytes the PEFT+bnb
#    configurations are reported as skipped. The random checkpoint is float32 safetensors, no tokenizer.
python3 - "$out/random-smollm2" <<'PY'
import json, sys, torch, transformers
cfg = json.load(open("experiments/gpu/smollm2_config.json"))
torch.manual_seed(0)
transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).save_pretrained(sys.argv[1])
PY
timeout 300 python3 experiments/bench_train.py --device cuda --model "$out/random-smollm2" --train-only \
  --markdown "$out/train_gpu.md" 2>&1 | tee "$out/bench_train_gpu.txt" | tail -30
rm -rf "$out/random-smollm2"

# 3. Quantize / dequantize throughput.
timeout 90 python3 experiments/gpu/bench_quant_gpu.py 2>&1 | tee "$out/bench_quant_gpu.txt" | tail -20
