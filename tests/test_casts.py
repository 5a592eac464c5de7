"""One rule for dtype casts (issue 13): every spelling of a dtype cast is refused, with one message, before anything
changes; device moves are fine; ``save_pretrained`` never writes a checkpoint that does not load back.

The rule holds for llmint8 models loaded by transformers and for a bare ``Int8Linear``. Models: a GPT-2 (Conv1D
layers with biases) loaded in fp32 and a Llama loaded in bf16 (fp32 scales next to bf16 norms and embeddings).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from tiny_models import gpt2_config, save_fp_model, tiny_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM

from hf_int8 import Int8Config, Int8Linear
from hf_int8.nn import guard_dtype_casts, unguard_dtype_casts

IDS = torch.tensor([[2, 5, 9, 14, 7, 30, 11, 3]])
RULE = "llmint8 keeps its weights int8 and their scales float32"
NO_CUDA = "no CUDA device present (torch.cuda.is_available() is False)"

# Every way to ask an nn.Module for another dtype, and the dtype each one asks for.
SPELLINGS = {
    "to(dtype)": (lambda m: m.to(torch.float16), torch.float16),
    "to(dtype=)": (lambda m: m.to(dtype=torch.bfloat16), torch.bfloat16),
    "to(device, dtype)": (lambda m: m.to("cpu", torch.float16), torch.float16),
    "to(tensor)": (lambda m: m.to(torch.zeros(1, dtype=torch.float64)), torch.float64),
    "to(own dtype)": (lambda m: m.to(m.lm_head.weight.dtype), None),
    "nn.Module.to": (lambda m: nn.Module.to(m, torch.float16), torch.float16),
    "type(dtype)": (lambda m: m.type(torch.float16), torch.float16),
    "type(str)": (lambda m: m.type("torch.DoubleTensor"), torch.float64),
    "half": (lambda m: m.half(), torch.float16),
    "float": (lambda m: m.float(), torch.float32),
    "double": (lambda m: m.double(), torch.float64),
    "bfloat16": (lambda m: m.bfloat16(), torch.bfloat16),
    "nn.Module.half": (lambda m: nn.Module.half(m), torch.float16),
    "_apply(floats)": (lambda m: m._apply(lambda t: t.half() if t.is_floating_point() else t), torch.float16),
    "_apply(all)": (lambda m: m._apply(lambda t: t.to(torch.float16)), torch.float16),
}
# "to(own dtype)" asks for the dtype the model's head already has: a cast is refused even when it would be a no-op
# for some tensors (transformers' rule for bitsandbytes models too); the dtype it names is the head's.


def _requested(spelling: str, model: nn.Module) -> torch.dtype:
    dtype = SPELLINGS[spelling][1]
    return model.lm_head.weight.dtype if dtype is None else dtype


@pytest.fixture(scope="module", params=["gpt2-fp32", "llama-bf16"])
def checkpoint(request, tmp_path_factory) -> tuple[Path, torch.dtype]:
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "gpt2-fp32":
        return save_fp_model(root / "fp", config=gpt2_config(len(tiny_tokenizer())), outlier_scale=20.0), torch.float32
    return save_fp_model(root / "fp", dtype=torch.bfloat16, outlier_scale=20.0), torch.bfloat16


def _load(path: Path, dtype: torch.dtype | None = None, **kwargs) -> nn.Module:
    if dtype is not None:
        kwargs["dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def _int8(checkpoint) -> nn.Module:
    path, dtype = checkpoint
    return _load(path, dtype, quantization_config=Int8Config(threshold=6.0))


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not), as stored now."""
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return {name: t.detach().clone() for name, t in named}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].device == b[name].device, name
        assert torch.equal(a[name], b[name]), name


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_every_cast_spelling_is_refused_and_changes_nothing(checkpoint, spelling):
    model = _int8(checkpoint)
    before, logits = _snapshot(model), _logits(model)
    requested = _requested(spelling, model)
    with pytest.raises(ValueError, match=RULE) as excinfo:
        SPELLINGS[spelling][0](model)
    message = str(excinfo.value)
    assert f"to {requested!r}:" in message and type(model).__name__ in message
    _assert_same(before, _snapshot(model))
    assert torch.equal(_logits(model), logits)


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_save_after_any_cast_attempt_reloads_bit_for_bit(checkpoint, spelling, tmp_path):
    model = _int8(checkpoint)
    with pytest.raises(ValueError, match=RULE):
        SPELLINGS[spelling][0](model)
    model.save_pretrained(tmp_path / "int8")
    reloaded = _load(tmp_path / "int8")
    _assert_same(_snapshot(model), _snapshot(reloaded))
    assert torch.equal(_logits(reloaded), _logits(model))


def test_device_moves_and_non_casting_apply_are_allowed(checkpoint):
    model = _int8(checkpoint)
    before = _snapshot(model)
    assert model.to("cpu") is model
    assert model.to(torch.device("cpu")) is model
    assert model.to(device="cpu", non_blocking=True) is model
    assert model.cpu() is model
    assert model._apply(lambda t: t) is model
    assert model.share_memory() is model
    _assert_same(before, _snapshot(model))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks how a missing CUDA device is reported")
def test_move_to_a_missing_device_reports_the_device_not_a_cast(checkpoint):
    model = _int8(checkpoint)
    before = _snapshot(model)
    with pytest.raises((RuntimeError, AssertionError)) as excinfo:
        model.to("cuda")
    assert RULE not in str(excinfo.value)
    _assert_same(before, _snapshot(model))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_round_trip_is_allowed_and_casts_on_the_device_are_refused(checkpoint):
    model = _int8(checkpoint)
    before = _snapshot(model)
    assert model.cuda() is model and model.to("cuda:0") is model
    on_device = _snapshot(model)
    assert {t.device.type for t in on_device.values()} == {"cuda"}
    for spelling in sorted(SPELLINGS):
        with pytest.raises(ValueError, match=RULE):
            SPELLINGS[spelling][0](model)
        _assert_same(on_device, _snapshot(model))
    assert model.cpu() is model
    _assert_same(before, _snapshot(model))


def test_deep_copy_keeps_the_rule_for_itself(checkpoint):
    model = _int8(checkpoint)
    clone = copy.deepcopy(model)
    with pytest.raises(ValueError, match=RULE):
        clone.half()
    assert clone.to("cpu") is clone  # the guard is bound to the copy, not to the original
    _assert_same(_snapshot(model), _snapshot(clone))


def test_casts_are_allowed_again_once_dequantized(checkpoint):
    model = _int8(checkpoint).dequantize()
    assert model.half() is model
    assert all(t.dtype == torch.float16 for t in model.parameters())
    assert model.double().lm_head.weight.dtype == torch.float64
    assert model.type(torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def _layer(bias_dtype: torch.dtype = torch.bfloat16) -> Int8Linear:
    torch.manual_seed(0)
    linear = nn.Linear(40, 24).to(bias_dtype)
    return Int8Linear.from_float(linear, threshold=6.0)


@pytest.mark.parametrize("spelling", sorted(set(SPELLINGS) - {"to(own dtype)"}))
def test_a_bare_int8_linear_follows_the_same_rule(spelling):
    layer = _layer()
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(1)).bfloat16()
    before, out = _snapshot(layer), layer(x)
    with pytest.raises(ValueError, match=RULE) as excinfo:
        SPELLINGS[spelling][0](layer)
    assert f"cannot cast an Int8Linear layer to {SPELLINGS[spelling][1]!r}:" in str(excinfo.value)
    _assert_same(before, _snapshot(layer))
    assert torch.equal(layer(x), out)
    assert layer.to("cpu") is layer and layer.cpu() is layer  # device moves stay fine


def test_layer_and_model_refuse_with_the_same_message(checkpoint):
    model, layer = _int8(checkpoint), _layer()
    with pytest.raises(ValueError) as from_model:
        model.half()
    with pytest.raises(ValueError) as from_layer:
        layer.half()
    assert str(from_model.value).split(":", 1)[1] == str(from_layer.value).split(":", 1)[1]


def test_guarded_container_is_left_whole_by_a_refused_cast():
    # A model of one's own: nn.Module._apply walks the children in order, so without the guard the plain Linear in
    # front would be cast before the Int8Linear refuses. guard_dtype_casts refuses at the root, before any child.
    unguarded = nn.Sequential(nn.Linear(24, 40), _layer(torch.float32))
    with pytest.raises(ValueError, match=RULE):
        unguarded.half()
    assert unguarded[0].weight.dtype == torch.float16  # the documented gap the guard closes
    assert unguarded[1].weight.dtype == torch.int8 and unguarded[1].bias.dtype == torch.float32

    model = guard_dtype_casts(nn.Sequential(nn.Linear(24, 40), _layer(torch.float32)))
    before = _snapshot(model)
    for spelling in sorted(set(SPELLINGS) - {"to(own dtype)"}):
        with pytest.raises(ValueError, match=RULE):
            SPELLINGS[spelling][0](model)
        _assert_same(before, _snapshot(model))
    assert model.to("cpu") is model
    unguard_dtype_casts(model)
    with pytest.raises(ValueError, match="an Int8Linear layer"):  # the layer itself still refuses
        model.half()


# ---- save_pretrained never writes a checkpoint that does not load back --------------------------------------------
def _first_int8(model: nn.Module) -> Int8Linear:
    """The first int8 layer that is not square (so that a transposed weight has the wrong shape)."""
    return next(m for m in model.modules() if isinstance(m, Int8Linear) and m.in_features != m.out_features)


TAMPERING = {
    "weight as fp16": (
        lambda layer: setattr(layer.weight, "data", layer.weight.data.half()),
        "must be int8, got torch.float16",
    ),
    "weight transposed": (lambda layer: setattr(layer.weight, "data", layer.weight.data.t().contiguous()), "shape"),
    "scale as bf16": (lambda layer: setattr(layer, "weight_scale", layer.weight_scale.bfloat16()), "float32"),
    "scale as fp64": (lambda layer: setattr(layer, "weight_scale", layer.weight_scale.double()), "float32"),
    "negative scale": (lambda layer: layer.weight_scale.data[0].fill_(-1.0), "negative"),
}


@pytest.mark.parametrize("tampering", sorted(TAMPERING))
def test_save_refuses_int8_layers_that_would_not_load_back(checkpoint, tampering, tmp_path):
    model = _int8(checkpoint)
    target = tmp_path / "int8"
    model.save_pretrained(target)
    files = {p.name: p.read_bytes() for p in target.iterdir()}
    damage, says = TAMPERING[tampering]
    damage(_first_int8(model))
    with pytest.raises(ValueError, match="refusing to save") as excinfo:
        model.save_pretrained(target)
    assert says in str(excinfo.value)
    with pytest.raises(ValueError, match="refusing to save"):
        model.save_pretrained(tmp_path / "new")
    # Nothing was written: the existing checkpoint is untouched, the new folder was never created.
    assert {p.name: p.read_bytes() for p in target.iterdir()} == files
    assert not (tmp_path / "new").exists()
    assert sorted(os.listdir(tmp_path)) == ["int8"]  # no staging folder left behind either


@pytest.mark.parametrize("tampering", sorted(TAMPERING))
def test_what_save_refuses_really_would_not_load_back(checkpoint, tampering, tmp_path):
    # The premise of the refusal above: written anyway (transformers' own save_pretrained, without hf_int8's
    # wrapper), each of these checkpoints is refused by the loader.
    model = _int8(checkpoint)
    TAMPERING[tampering][0](_first_int8(model))
    type(model).save_pretrained(model, tmp_path / "written-anyway")
    with pytest.raises(ValueError):
        _load(tmp_path / "written-anyway")
