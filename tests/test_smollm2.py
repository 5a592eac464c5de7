"""LLM.int8() on a real pretrained model and real text: SmolLM2-135M-Instruct on lee_background.cor.

Figures to compare with (shared NOTES, issue 2): fp32 perplexity 29.07 on the first 8192 tokens in 512-token windows;
bitsandbytes 8-bit on the same model and text: footprint 0.408x of fp32, perplexity +1.55% at threshold 6.0 and
+3.3% at threshold 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from hf_int8 import Int8Config, Int8Linear, memory_report
from hf_int8.metrics import perplexity_details
from hf_int8.nn import FloatLinear

pytestmark = pytest.mark.slow

MAX_TOKENS = 8192
WINDOW = 512
MAX_FOOTPRINT_RATIO = 0.41  # bitsandbytes 8-bit on this model: 219.6 MB / 538.1 MB = 0.408
MAX_PPL_INCREASE_T6 = 0.02  # issue 2: within 2% of fp32 at threshold 6.0
MIN_T0_PENALTY = 0.01  # threshold 0 must be at least 1% worse than threshold 6.0 (bitsandbytes: 1.7%)
NOTES_FP32_PPL = 29.1  # shared NOTES: fp32 SmolLM2, same text and protocol
OUTLIER_THRESHOLD = 6.0


def _load(path: Path, threshold: float | None) -> nn.Module:
    config = None if threshold is None else Int8Config(threshold=threshold)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=config, device_map="auto" if config else None
    )
    return model.eval()


@pytest.fixture(scope="module")
def fp32_model(smollm2_path):
    return _load(smollm2_path, None)


@pytest.fixture(scope="module")
def int8_model(smollm2_path):
    return _load(smollm2_path, 6.0)


@pytest.fixture(scope="module")
def fp32_ppl(fp32_model, smollm2_tokenizer, lee_text):
    return perplexity_details(fp32_model, smollm2_tokenizer, lee_text, MAX_TOKENS, WINDOW)


@pytest.fixture(scope="module")
def int8_ppl(int8_model, smollm2_tokenizer, lee_text):
    return perplexity_details(int8_model, smollm2_tokenizer, lee_text, MAX_TOKENS, WINDOW)


@pytest.fixture(scope="module")
def prompt_ids(smollm2_tokenizer, lee_text):
    """A 128-token slice of real text, batch of 2 (different offsets) to exercise batching."""
    ids = smollm2_tokenizer(lee_text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return torch.stack([ids[1000:1128], ids[5000:5128]])


def _int8_modules(model: nn.Module) -> list[tuple[str, Int8Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Int8Linear)]


def _linear_names(model: nn.Module, cls: type) -> list[str]:
    return [name for name, module in model.named_modules() if type(module) is cls]


def test_every_linear_but_lm_head_is_int8(fp32_model, int8_model):
    fp32_linears = _linear_names(fp32_model, nn.Linear)
    assert len(fp32_linears) == 211  # 30 layers x 7 projections + lm_head
    assert _linear_names(int8_model, nn.Linear) == []
    assert _linear_names(int8_model, FloatLinear) == ["lm_head"]  # floating point, hf_int8's CPU decode kernel
    assert _linear_names(int8_model, Int8Linear) == [n for n in fp32_linears if n != "lm_head"]
    for name, module in int8_model.named_modules():
        if isinstance(module, Int8Linear):
            assert module.weight.dtype == torch.int8, name
            assert module.weight_scale.dtype == torch.float32, name
            assert module.threshold == 6.0, name
    # lm_head stays tied to the (floating-point) input embedding, as in the fp32 model.
    assert int8_model.lm_head.weight is int8_model.model.embed_tokens.weight
    assert int8_model.lm_head.weight.dtype == torch.float32
    assert int8_model.config.quantization_config.to_dict()["quant_method"] == "llmint8"


def test_footprint_at_most_041_of_fp32(fp32_model, int8_model):
    fp32_bytes = fp32_model.get_memory_footprint()
    int8_bytes = int8_model.get_memory_footprint()
    ratio = int8_bytes / fp32_bytes
    assert ratio <= MAX_FOOTPRINT_RATIO, f"int8 footprint {int8_bytes:,} B is {ratio:.4f}x of fp32 {fp32_bytes:,} B"
    report = memory_report(int8_model)
    assert report.total == int8_bytes
    assert report.num_int8_layers == 210
    assert report.float_linear_layers == ["lm_head"]
    quantized_numel = sum(
        m.weight.numel() for name, m in fp32_model.named_modules() if type(m) is nn.Linear and name != "lm_head"
    )
    assert report.int8_weights == quantized_numel  # one byte per quantized weight
    assert report.scales == 4 * sum(m.out_features for m in int8_model.modules() if isinstance(m, Int8Linear))
    # What stays in floating point is the tied embedding / lm_head plus the norms: counted once, not twice.
    embed_bytes = int8_model.model.embed_tokens.weight.numel() * 4
    assert embed_bytes < report.float_layers < embed_bytes * 1.01


def test_fp32_perplexity_reproduces_the_reference_protocol(fp32_ppl):
    # Guards the assets and the protocol (8192 tokens, 16 independent windows of 512) against silent drift.
    assert (fp32_ppl.num_tokens, fp32_ppl.num_windows, fp32_ppl.num_predicted) == (8192, 16, 16 * 511)
    assert fp32_ppl.perplexity == pytest.approx(NOTES_FP32_PPL, rel=0.005)


def test_int8_threshold6_perplexity_within_2_percent(fp32_ppl, int8_ppl):
    increase = int8_ppl.perplexity / fp32_ppl.perplexity - 1
    print(f"\nperplexity fp32 {fp32_ppl.perplexity:.3f}  llmint8 t=6 {int8_ppl.perplexity:.3f} ({increase:+.2%})")
    assert abs(increase) <= MAX_PPL_INCREASE_T6
    assert int8_ppl.num_predicted == fp32_ppl.num_predicted
    # The int8 model is a different model: identical perplexity would mean nothing was quantized.
    assert int8_ppl.nll_sum != fp32_ppl.nll_sum


def test_outlier_columns_are_real_in_smollm2(int8_model, prompt_ids):
    """On real text many layers see |x| >= 6: the mixed-precision path is exercised, not just present."""
    hits: dict[str, float] = {}

    def hook(name):
        def record(module, args):
            hits[name] = float(args[0].abs().amax())

        return record

    handles = [
        m.register_forward_pre_hook(hook(n)) for n, m in int8_model.named_modules() if isinstance(m, Int8Linear)
    ]
    try:
        with torch.inference_mode():
            int8_model(input_ids=prompt_ids[:1], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    with_outliers = [name for name, amax in hits.items() if amax >= OUTLIER_THRESHOLD]
    assert len(hits) == 210
    assert len(with_outliers) >= 30, f"only {len(with_outliers)} of 210 int8 layers saw |x| >= {OUTLIER_THRESHOLD}"
    assert max(hits.values()) > 100  # NOTES: largest |x| ~3090 on this model


def test_threshold0_is_measurably_worse(smollm2_path, smollm2_tokenizer, lee_text, int8_model, int8_ppl, fp32_ppl):
    model = _load(smollm2_path, 0.0)
    assert all(m.threshold == 0.0 for m in model.modules() if isinstance(m, Int8Linear))
    # Same int8 weights and scales as at threshold 6: only the outlier path differs.
    t6_state = int8_model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, t6_state[name]), name
    t0 = perplexity_details(model, smollm2_tokenizer, lee_text, MAX_TOKENS, WINDOW)
    print(
        f"\nperplexity fp32 {fp32_ppl.perplexity:.3f}  t=6 {int8_ppl.perplexity:.3f}  t=0 {t0.perplexity:.3f} "
        f"({t0.perplexity / int8_ppl.perplexity - 1:+.2%} vs t=6)"
    )
    assert t0.perplexity > int8_ppl.perplexity * (1 + MIN_T0_PENALTY)


@pytest.fixture(scope="module")
def saved_dir(int8_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2_llmint8")
    int8_model.save_pretrained(out)
    return out


def test_saved_checkpoint_is_int8_safetensors(saved_dir, int8_model):
    config = json.loads((saved_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "llmint8"
    assert config["quantization_config"]["threshold"] == 6.0
    files = sorted(saved_dir.glob("*.safetensors"))
    assert files and not list(saved_dir.glob("*.bin"))
    dtypes = {}
    for file in files:
        with safe_open(file, "pt") as handle:
            for key in handle.keys():
                dtypes[key] = handle.get_slice(key).get_dtype()
    for name, _ in _int8_modules(int8_model):
        assert dtypes[f"{name}.weight"] == "I8", name
        assert dtypes[f"{name}.weight_scale"] == "F32", name
    assert "lm_head.weight" not in dtypes  # tied: stored once, as the embedding
    assert dtypes["model.embed_tokens.weight"] == "F32"


@pytest.mark.parametrize("dtype", [None, torch.float32], ids=["no-dtype", "dtype-float32"])
def test_reload_is_int8_and_bit_identical(saved_dir, int8_model, prompt_ids, dtype):
    kwargs = {} if dtype is None else {"dtype": dtype}
    again = AutoModelForCausalLM.from_pretrained(saved_dir, device_map="auto", **kwargs).eval()
    classes = {name: type(m) for name, m in int8_model.named_modules()}
    assert {name: type(m) for name, m in again.named_modules()} == classes
    reloaded = dict(_int8_modules(again))
    assert len(reloaded) == 210
    for name, module in _int8_modules(int8_model):
        other = reloaded[name]
        assert other.weight.dtype == torch.int8, name
        assert torch.equal(other.weight, module.weight), name
        assert torch.equal(other.weight_scale, module.weight_scale), name
        assert other.threshold == module.threshold, name
    state, other_state = int8_model.state_dict(), again.state_dict()
    assert other_state.keys() == state.keys()
    for key, tensor in state.items():
        assert other_state[key].dtype == tensor.dtype and torch.equal(other_state[key], tensor), key
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert again.get_memory_footprint() == int8_model.get_memory_footprint()
    with torch.inference_mode():
        expected = int8_model(input_ids=prompt_ids, use_cache=False).logits
        got = again(input_ids=prompt_ids, use_cache=False).logits
    assert torch.equal(got, expected)
