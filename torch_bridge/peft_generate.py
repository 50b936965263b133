"""Greedy answers of transformers + PEFT for given prompt token ids: the reference side of a jaxlora
generation cross-check.

    python -m torch_bridge.peft_generate --model HF_DIR --adapter PEFT_DIR [--quantize nf4] \\
        --request request.json --out result.json

``request.json``: ``{"prompts": [[ids...], ...], "stop_ids": [ids...], "max_new_tokens": N}``;
``result.json``: ``{"outputs": [[new ids...], ...]}``, each answer without its stop token. With
``--quantize nf4`` the model is loaded through bitsandbytes (NF4, double quantization, float32
compute), which stores the same 4-bit weights as ``torch_bridge.load_llama(..., quantize="nf4")``.
On the CPU the quantized layers are then dequantized by bitsandbytes into float32 ``nn.Linear``
layers (transformers' ``model.dequantize()``): the same weights and the same float32 product as
bitsandbytes' CPU 4-bit forward, without its per-call dequantization, which makes greedy decoding
several times slower. On CUDA bitsandbytes' 4-bit kernels run as they are.
Each prompt runs alone (batch 1), so no padding enters the comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxlora.atomic import atomic_write_json


def load_model(model_dir: Path, adapter_dir: Path | None, quantize: str | None, device: str):
    import torch
    import transformers

    kwargs = {"dtype": torch.float32}
    if quantize:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
        kwargs["device_map"] = device
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if not quantize:
        model = model.to(device)
    elif device == "cpu":
        model = model.dequantize(dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


def greedy(model, prompts: list[list[int]], stop_ids: list[int], max_new_tokens: int, device: str) -> list[list[int]]:
    import torch

    outputs = []
    for ids in prompts:
        input_ids = torch.tensor([ids], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=stop_ids or None,
                                 pad_token_id=stop_ids[0] if stop_ids else 0)
        new = out[0, len(ids):].tolist()
        for position, token in enumerate(new):
            if token in stop_ids:
                new = new[:position]
                break
        outputs.append(new)
    return outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_bridge.peft_generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--quantize", choices=["nf4", "fp4"])
    parser.add_argument("--request", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    import torch
    import transformers

    from torch_bridge.smollm2 import hub_offline

    transformers.utils.logging.disable_progress_bar()

    request = json.loads(args.request.read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with hub_offline():
        model = load_model(args.model, args.adapter, args.quantize, device)
    outputs = greedy(model, request["prompts"], list(request.get("stop_ids", [])), int(request["max_new_tokens"]), device)
    atomic_write_json(args.out, {"outputs": outputs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
