"""hf_int8.checkpoint.format: the weight-file predicate, the code layout and the one tensor rule."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hf_int8 import ops
from hf_int8.checkpoint import format as fmt


@pytest.mark.parametrize(
    "name, default, shards, any_framework",
    [
        ("model.safetensors", True, True, True),
        ("model-00001-of-00002.safetensors", True, True, True),
        ("model.safetensors.index.json", True, False, True),
        ("pytorch_model.bin", True, False, True),
        ("pytorch_model-00001-of-00002.bin.index.json", True, False, True),
        ("modelcard.safetensors", False, False, True),  # not a Transformers weight name, still a weight file
        ("tf_model.h5", False, False, True),
        ("model.gguf", False, False, True),
        ("tokenizer.json", False, False, False),
        ("README.md", False, False, False),
    ],
)
def test_is_weight_file(name, default, shards, any_framework):
    assert fmt.is_weight_file(name) is default
    assert fmt.is_weight_file(name, shards_only=True) is shards
    assert fmt.is_weight_file(name, any_framework=True) is any_framework


def test_codes_are_stored_flat_and_come_back_as_a_view():
    codes = torch.arange(-6, 6, dtype=torch.int8).reshape(3, 4)
    flat = fmt.flatten_codes(codes)
    assert flat.shape == (12,)
    back = fmt.unflatten_codes(flat, 3, 4)
    assert torch.equal(back, codes) and back.data_ptr() == flat.data_ptr()
    assert fmt.unflatten_codes(flat, 4, 4) is flat  # a wrong size is left for the checks to report


def _layer(out_f=4, in_f=8):
    return ops.quantize_weight(torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)))


def test_a_quantized_layer_has_no_problem():
    codes, scale = _layer()
    assert fmt.layer_problems("l", codes, scale, 4, 8) == []
    fmt.check_layer_tensors("l", codes, scale, 4, 8)


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda c, s: (c.half(), s), "l.weight must be int8, got torch.float16"),
        (lambda c, s: (c.t().contiguous(), s), "l.weight must have shape [4, 8], got [8, 4]"),
        (lambda c, s: (c.reshape(-1), s), "l.weight must have shape [4, 8], got [32]"),  # tensors: unflatten first
        (lambda c, s: (c, s.double()), "l.weight_scale must be float32, got torch.float64"),
        (lambda c, s: (c, s[:3]), "l.weight_scale must have shape [4], got [3]"),
        (lambda c, s: (c, s.index_fill(0, torch.tensor([1]), float("nan"))), "1 NaN, infinite or negative"),
        (lambda c, s: (c.index_fill(1, torch.tensor([0]), -128), s), "the code -128"),
        (lambda c, s: (torch.where(c.abs() == 127, 0, c).to(torch.int8), s), "no code reaches +-127"),
        (lambda c, s: (c, s.index_fill(0, torch.tensor([2]), 0.0)), "weight_scale is 0 but the row's codes"),
    ],
)
def test_each_broken_rule_is_named(damage, says):
    codes, scale = damage(*_layer())
    problems = fmt.layer_problems("l", codes, scale, 4, 8)
    assert len(problems) >= 1 and says in problems[0], problems
    with pytest.raises(ValueError, match="^l\\.weight"):
        fmt.check_layer_tensors("l", codes, scale, 4, 8)


def test_check_codes_false_skips_only_the_pass_over_the_codes():
    codes, scale = _layer()
    codes[0, 0] = -128
    assert fmt.layer_problems("l", codes, scale, 4, 8, check_codes=False) == []
    assert fmt.layer_problems("l", codes, -scale, 4, 8, check_codes=False) != []


def test_header_entries_are_checked_by_dtype_and_shape_and_may_be_flat():
    entry = SimpleNamespace
    assert fmt.layer_problems("l", entry(dtype="I8", shape=(32,)), entry(dtype="F32", shape=(4,)), 4, 8) == []
    assert fmt.layer_problems("l", entry(dtype="I8", shape=(4, 8)), entry(dtype="F32", shape=(4,)), 4, 8) == []
    assert fmt.layer_problems("l", entry(dtype="F16", shape=(32,)), entry(dtype="F32", shape=(4,)), 4, 8) == [
        "l.weight must be int8, got F16"
    ]
    assert fmt.layer_problems("l", entry(dtype="I8", shape=(32,)), entry(dtype="BF16", shape=(4,)), 4, 8) == [
        "l.weight_scale must be float32, got BF16"
    ]


def test_safetensors_metadata_names_the_format():
    meta = fmt.safetensors_metadata()
    assert meta["quant_method"] == fmt.QUANT_METHOD == "llmint8"
    assert meta["llmint8_format_version"] == str(fmt.FORMAT_VERSION)
    assert all(isinstance(v, str) for v in meta.values())
