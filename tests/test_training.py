"""LoRA training on a frozen llmint8 base with PEFT, on CPU.

Gradients reach the inputs through Int8Linear and never the int8 weights; adapters learn; PEFT's k-bit preparation
works; merge/save/load of adapters work; and train mode runs the same int8 kernels as eval mode (the bitsandbytes
CPU trap of dequantizing the whole weight on every training forward is absent), shown by the ops each mode runs
and by a timing ratio measured side by side. The last test trains SmolLM2 on real text and watches the loss drop.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
import torch
from _tolerance import assert_within, fp32_sum_tolerance
from tiny_models import save_fp_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

import hf_int8
from hf_int8 import Int8Config, Int8Linear
from hf_int8.ops import reference

peft = pytest.importorskip("peft", reason="peft (a test extra) is not installed")
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402

from hf_int8.peft import Int8LoraLinear  # noqa: E402

IDS = torch.arange(4, 44).unsqueeze(0)


@pytest.fixture(scope="module")
def fp_path(tmp_path_factory) -> Path:
    return save_fp_model(tmp_path_factory.mktemp("train") / "fp", outlier_scale=40.0)


def _int8_model(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=Int8Config(), dtype=torch.float32, **kwargs)


def _lora(model, **kwargs):
    kwargs = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], **kwargs}
    return get_peft_model(model, LoraConfig(**kwargs))  # a plain LoraConfig: hf_int8.peft taught PEFT Int8Linear


def test_int8_linear_gradients_reach_the_input_not_the_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    layer = Int8Linear.from_float(linear, threshold=6.0)
    x = torch.randn(3, 5, 96)
    x[..., 7] *= 30  # an outlier column: the fp path must carry gradients too
    x.requires_grad_(True)
    out = layer(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert layer.weight.grad is None and not layer.weight.requires_grad
    assert "weight_scale" not in dict(layer.named_parameters())
    w_deq = layer.dequantize()
    want = grad_out @ w_deq  # d(x W^T)/dx with the weight the layer actually holds
    # Both are fp32 sums of 40 products (the op's backward may sum in another order): the derived bound, not bitwise.
    assert_within(x.grad, want, fp32_sum_tolerance(grad_out.abs().double() @ w_deq.abs().double(), 40), "x.grad")
    assert layer.bias.grad is not None
    # 15 tokens summed in fp32, flattened by the op and by dims (0, 1) here: possibly in another order.
    bias_tol = fp32_sum_tolerance(grad_out.abs().double().sum(dim=(0, 1)), 15)
    assert_within(layer.bias.grad, grad_out.sum(dim=(0, 1)), bias_tol, "bias.grad")


def test_lora_on_llmint8_trains_only_adapters(fp_path):
    model = _int8_model(fp_path)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    codes = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    model = _lora(model)
    wrapped = [m for m in model.modules() if isinstance(m, Int8LoraLinear)]
    assert len(wrapped) == 4 and all(isinstance(m.base_layer, Int8Linear) for m in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)

    # Gradients flow through the int8 layers to the inputs (here the input embeddings) and to the adapters.
    embeds = model.get_input_embeddings()(IDS).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds, labels=IDS).loss
    loss.backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    base = model.get_base_model()
    for name, module in base.named_modules():
        if isinstance(module, Int8Linear):
            key = name.replace(".base_layer", "")
            assert torch.equal(module.weight, codes[key]), f"{key} int8 weight changed during training"
    for name, param in base.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, frozen[name.replace(".base_layer", "")]), name


def test_prepare_model_for_kbit_training(fp_path):
    model = _int8_model(fp_path)
    assert model.is_loaded_in_8bit
    model = prepare_model_for_kbit_training(model)  # gradient checkpointing + input grads + frozen base
    assert model.is_gradient_checkpointing
    assert not any(p.requires_grad for p in model.parameters())
    model = _lora(model)
    model.train()
    loss = model(input_ids=IDS, labels=IDS).loss  # checkpointed: the int8 forward runs again in backward
    loss.backward()
    lora_b = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b)


def test_merge_save_and_load_adapters(fp_path, tmp_path):
    model = _lora(_int8_model(fp_path), init_lora_weights=False)  # random B: the adapter changes the output
    model.eval()
    with torch.no_grad():
        base_out = model.get_base_model()(IDS).logits
        with model.disable_adapter():
            plain = model(IDS).logits
        adapted = model(IDS).logits
    assert not torch.allclose(adapted, plain)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    reloaded = PeftModel.from_pretrained(_int8_model(fp_path), str(tmp_path / "adapter"))
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, adapted)

    with pytest.warns(UserWarning, match="re-quantizes"):
        merged = reloaded.merge_and_unload()
    assert not any(isinstance(m, Int8LoraLinear) for m in merged.modules())
    assert isinstance(merged.model.layers[0].self_attn.q_proj, Int8Linear)
    with torch.no_grad():
        out = merged(IDS).logits
    rel = ((out - adapted).norm() / adapted.norm()).item()
    assert rel < 0.02, rel  # the merged int8 weight is the re-quantized sum: one extra rounding
    assert base_out.shape == out.shape


def test_train_mode_runs_the_same_int8_kernel_as_eval():
    """The ops a training forward dispatches are exactly those of an inference forward: no weight dequantization."""
    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.nn.Linear(256, 192), threshold=6.0)
    x = torch.randn(16, 256)
    x[:, 3] *= 40

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            shapes = [
                tuple(t.shape)
                for t in (out if isinstance(out, (tuple, list)) else [out])
                if isinstance(t, torch.Tensor)
            ]
            self.calls.append((str(func), shapes))
            return out

    layer.eval()
    with torch.no_grad(), Record() as inference:
        layer(x)
    layer.train()
    x_train = x.clone().requires_grad_(True)
    with Record() as training:
        out = layer(x_train)
    assert [c[0] for c in training.calls] == [c[0] for c in inference.calls]
    assert any("hf_int8.int8_linear" in name for name, _ in training.calls)
    full = (192, 256)
    assert not any(full in shapes for _, shapes in training.calls), "a full weight-sized tensor was built"
    with Record() as backward:
        out.sum().backward()
    assert any(full in shapes for _, shapes in backward.calls)  # backward does use the dequantized weight


def test_training_forward_dequantizes_nothing_but_backward_does(fp_path, monkeypatch):
    """Count full-weight dequantizations in a LoRA training step: none in forward, one per int8 layer in backward."""
    model = _lora(_int8_model(fp_path))
    model.train()
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, Int8Linear)}
    calls = []
    original = reference.dequantize_weight

    def spy(codes, scale, dtype=torch.float32):
        calls.append(tuple(codes.shape))
        return original(codes, scale, dtype)

    monkeypatch.setattr(reference, "dequantize_weight", spy)
    loss = model(input_ids=IDS, labels=IDS).loss
    forward_full = [s for s in calls if s in shapes]
    calls.clear()
    loss.backward()
    int8_layers = sum(isinstance(m, Int8Linear) for m in model.modules())
    assert forward_full == []
    # One per int8 layer whose input needs a gradient: all but layer 0's q/k/v, fed by the frozen embeddings.
    assert len([s for s in calls if s in shapes]) == int8_layers - 3


def test_train_forward_costs_the_same_as_eval_forward():
    """Side by side: train-mode forward vs eval-mode forward vs a dequantize-every-call forward (the bnb CPU trap)."""
    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.nn.Linear(2048, 2048), threshold=6.0)
    x = torch.randn(32, 2048)
    x[:, :4] *= 30

    def eval_forward():
        layer.eval()
        with torch.no_grad():
            layer(x)

    x_train = x.clone().requires_grad_(True)

    def train_forward():
        layer.train()
        layer(x_train)  # autograd records the graph; no backward here

    def dequantize_forward():
        with torch.no_grad():
            torch.nn.functional.linear(x, layer.dequantize(), layer.bias)

    timings = {fn.__name__: [] for fn in (eval_forward, train_forward, dequantize_forward)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on shared, oversubscribed cores a 2-thread region waits for its slowest thread
    try:
        for fn in (eval_forward, train_forward, dequantize_forward):
            fn()  # warm up
        functions = [eval_forward, train_forward, dequantize_forward]
        for i in range(45):  # interleaved, in rotating order, so that load and cache state hit all three alike
            for fn in functions[i % 3 :] + functions[: i % 3]:
                start = time.perf_counter()
                fn()
                timings[fn.__name__].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    median = {name: statistics.median(values) for name, values in timings.items()}
    train_ratio = median["train_forward"] / median["eval_forward"]
    trap_ratio = median["dequantize_forward"] / median["eval_forward"]
    kernel = hf_int8.implementations()["int8_linear[cpu]"]
    print(
        f"\n2048x2048, 32 tokens, 1 thread, int8_linear {kernel}: eval {median['eval_forward'] * 1e3:.3f} ms, "
        f"train {median['train_forward'] * 1e3:.3f} ms ({train_ratio:.2f}x), dequantize-every-call "
        f"{median['dequantize_forward'] * 1e3:.3f} ms ({trap_ratio:.2f}x)"
    )
    assert train_ratio < 1.5, median
    assert trap_ratio > 1.5 * train_ratio, median  # the measurement would see the trap if it were there


@pytest.mark.slow
def test_lora_on_smollm2_lowers_the_loss_on_real_text():
    import assets
    from transformers import AutoTokenizer

    path, text = assets.smollm2_path(), assets.lee_background_text()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = _int8_model(path)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # Adapters on the top 8 of 30 layers: the backward pass stops there, which keeps this test short on 2 cores.
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            layers_to_transform=list(range(22, 30)),
            target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        ),
    )
    articles = text.splitlines()
    train_ids = tokenizer(articles[0], return_tensors="pt")["input_ids"][:, :48]
    held_ids = tokenizer(articles[1], return_tensors="pt")["input_ids"][:, :48]

    def loss_on(ids):
        model.eval()
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss.item()

    before, held_before = loss_on(train_ids), loss_on(held_ids)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(4):
        optimizer.zero_grad()
        model(input_ids=train_ids, labels=train_ids).loss.backward()
        optimizer.step()
    after, held_after = loss_on(train_ids), loss_on(held_ids)
    print(
        f"\nSmolLM2 llmint8 + LoRA r=16 (q,v,o,down of layers 22-29), 4 AdamW steps on 48 tokens of "
        f"lee_background article 0: loss {before:.3f} -> {after:.3f}; "
        f"article 1 (held out) {held_before:.3f} -> {held_after:.3f}"
    )
    assert after < 0.85 * before
    assert held_after < held_before * 1.1  # learning one article does not wreck the model
