"""Cross-framework training parity: 20 steps of jaxlora vs a plain PEFT + torch.optim.AdamW loop.

Same tiny random Llama (fp32), same initial LoRA weights (PEFT's, loaded into jaxlora), same
batches, same AdamW hyper-parameters with warmup + cosine, clipping and weight decay. Losses must
agree at every step and final LoRA weights at the end (bounds: `assert_parity`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora.train.optim import OptimizerConfig, make_optimizer, to_memory
from jaxlora.train.step import IGNORE_INDEX, make_train_step, split_trainable
from tests.models.test_llama import hf_model, jax_from_hf

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from torch_bridge import load_llama, load_peft_adapter  # noqa: E402

STEPS = 20
CONFIG = OptimizerConfig(learning_rate=1e-2, weight_decay=0.01, lr_scheduler_type="cosine", warmup_steps=3, max_grad_norm=1.0)


def make_batches(steps, batch=4, seq=16, vocab=97, seed=0, distinct=2):
    """``steps`` batches cycling through ``distinct`` random ones (so that the loss can fall)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(distinct):
        ids = rng.integers(0, vocab, size=(batch, seq))
        labels = ids.copy()
        labels[:, :5] = IGNORE_INDEX  # "prompt" tokens
        labels[1, 12:] = IGNORE_INDEX
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels})
    return [out[i % distinct] for i in range(steps)]


def torch_run(model, batches):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=CONFIG.learning_rate, betas=(CONFIG.adam_beta1, CONFIG.adam_beta2),
                            eps=CONFIG.adam_epsilon, weight_decay=CONFIG.weight_decay)
    sched = transformers.get_scheduler("cosine", opt, num_warmup_steps=CONFIG.warmup_steps, num_training_steps=len(batches))
    losses = []
    for batch in batches:
        out = model(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]),
                    labels=torch.tensor(batch["labels"]))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CONFIG.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    return losses


def jax_run(peft_model, batches, *, accumulation=1, offload=False, grad_norms=None):
    """Train on ``batches``; returns the losses (and appends each step's gradient norm to ``grad_norms``)."""
    tx = make_optimizer(CONFIG, len(batches))
    graphdef, trainable, rest = split_trainable(peft_model)
    opt_state = tx.init(trainable)
    if offload:
        opt_state = to_memory(opt_state, "pinned_host")
    step = make_train_step(graphdef, tx, offload=offload)
    losses = []
    for batch in batches:
        micro = {k: jnp.asarray(v).reshape(accumulation, v.shape[0] // accumulation, *v.shape[1:]) for k, v in batch.items()}
        trainable, rest, opt_state, metrics = step(trainable, rest, opt_state, micro)
        losses.append(float(metrics["loss"]))
        if grad_norms is not None:
            grad_norms.append(float(metrics["grad_norm"]))
    nnx.update(peft_model, trainable)
    return losses


def lora_weights_of_peft(model):
    return {n.replace(".default", ""): p.detach().numpy() for n, p in model.named_parameters() if "lora_" in n}


def lora_weights_of_jax(peft_model):
    out = {}
    for name, layer in peft_model.lora_layers().items():
        out[f"base_model.model.{name}.lora_A.weight"] = np.asarray(layer.lora_A["default"].get_value())
        out[f"base_model.model.{name}.lora_B.weight"] = np.asarray(layer.lora_B["default"].get_value())
    return out


def assert_parity(ours_losses, torch_losses, ours_weights, torch_weights):
    """Losses at every step within 1e-4 relative; final LoRA weights within 1e-3 of the total learning rate.

    Both sides run the same float32 math in their own summation orders. A loss is a mean of token
    losses over a smooth function of the weights: orders change it by ~sqrt(K) u per product
    (~1e-6 here), so 1e-4 (measured: < 1e-6) is far below what a wrong schedule, clipping or decay
    gives (the loss must also fall by 0.05 for the comparison to mean something). A weight moves by
    Adam updates of at most ~lr_t each, whatever its gradient's size: a gradient element that nearly
    cancels carries a summation error large relative to itself, which Adam's normalization turns into
    an O(lr_t) difference of the update. So the weights are compared in units of the total learning
    rate applied, sum(lr_t) (as in the accumulation test below): 1e-3 of it (measured: 4e-5 of it),
    far below the O(sum(lr_t)) that a missing step or a wrong bias correction gives.
    """
    from jaxlora.train.optim import learning_rate_schedule

    for i, (a, b) in enumerate(zip(ours_losses, torch_losses, strict=True)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {i}: loss {a} vs {b}"
    assert torch_losses[-1] < torch_losses[0] - 0.05, "the loss should fall: otherwise the comparison is weak"
    assert set(ours_weights) == set(torch_weights)
    schedule = learning_rate_schedule(CONFIG, len(ours_losses))
    lr_total = sum(float(schedule(step)) for step in range(len(ours_losses)))
    for key, expected in torch_weights.items():
        diff = float(np.abs(ours_weights[key] - expected).max())
        assert diff <= 1e-3 * lr_total, f"{key}: differs by {diff:.2e} (sum of learning rates {lr_total:.2e})"


def test_lora_training_matches_peft_and_torch_adamw(tmp_path):
    batches = make_batches(STEPS)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(hf_model("gqa-untied"), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    theirs.save_pretrained(tmp_path / "init")  # jaxlora starts from PEFT's initial A (and B = 0)
    ours = load_peft_adapter(jax_from_hf(hf_model("gqa-untied")), tmp_path / "init")
    theirs.train()
    torch_losses = torch_run(theirs, batches)
    jax_losses = jax_run(ours, batches)
    assert_parity(jax_losses, torch_losses, lora_weights_of_jax(ours), lora_weights_of_peft(theirs))


def test_qlora_training_matches_bitsandbytes_and_peft(tmp_path):
    """Both sides run on the same stored NF4 + double-quant weights (fp32 compute), so the only
    differences are float summation orders, as in the LoRA case: the same bounds hold."""
    hf_model("gqa-64").save_pretrained(tmp_path / "hf")
    qconfig = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                              bnb_4bit_compute_dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", quantization_config=qconfig)
    base.save_pretrained(tmp_path / "bnb")
    torch.manual_seed(0)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    theirs.save_pretrained(tmp_path / "init")
    ours = load_peft_adapter(load_llama(tmp_path / "bnb"), tmp_path / "init")
    batches = make_batches(STEPS)
    theirs.train()
    torch_losses = torch_run(theirs, batches)
    jax_losses = jax_run(ours, batches, offload=True)
    assert_parity(jax_losses, torch_losses, lora_weights_of_jax(ours), lora_weights_of_peft(theirs))


def test_gradient_accumulation_four_by_one_equals_one_batch_of_four():
    """4 micro-batches of 1 give the update of one batch of 4, up to float32 summation order.

    Bounds, from an error analysis rather than one run: the loss and the gradient are sums of ~64
    token terms added in another order, so they agree to a few float32 ulps of their magnitude
    (rtol 1e-5). A LoRA weight moves by Adam updates of at most ~lr_t each; a gradient element that
    is a near-cancelling sum can differ by far more than its own ulps (its relative error is the
    summation error of its terms over its value), and Adam normalizes it to an O(lr) update, so the
    weights are compared in units of the total learning rate applied, sum(lr_t): a difference of
    1e-3 of that is 50x above what summation order gives (1.8e-7 seen, sum(lr_t) = 1e-2) and far
    below what any real accumulation bug (a missing micro-batch, a wrong denominator) gives.
    """
    import jaxlora
    from jaxlora.train.optim import learning_rate_schedule

    batches = make_batches(3)

    def fresh():
        return jaxlora.get_peft_model(jax_from_hf(hf_model("gqa-untied")),
                                      jaxlora.LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear"))

    whole, split = fresh(), fresh()
    start = lora_weights_of_jax(whole)
    norms_whole, norms_split = [], []
    loss_whole = jax_run(whole, batches, accumulation=1, grad_norms=norms_whole)
    loss_split = jax_run(split, batches, accumulation=4, grad_norms=norms_split)
    np.testing.assert_allclose(loss_split, loss_whole, rtol=1e-5)
    np.testing.assert_allclose(norms_split, norms_whole, rtol=1e-5)
    schedule = learning_rate_schedule(CONFIG, len(batches))
    lr_total = sum(float(schedule(step)) for step in range(len(batches)))
    ours, theirs = lora_weights_of_jax(split), lora_weights_of_jax(whole)
    assert ours.keys() == theirs.keys() == start.keys() and ours
    moved = max(float(np.abs(theirs[k] - start[k]).max()) for k in start)
    assert moved > 0.1 * lr_total, "the weights should move by O(lr): otherwise the comparison is weak"
    for key, value in theirs.items():
        diff = float(np.abs(ours[key] - value).max())
        assert diff <= 1e-3 * lr_total, f"{key}: differs by {diff:.2e} (sum of learning rates {lr_total:.2e})"
