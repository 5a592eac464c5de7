"""Every invalid configuration value is rejected with an error naming it: in code, in a saved config.json, and in
the layer and op arguments the config ends up in.

A saved checkpoint's ``config.json`` is edited the way people and tools damage it (unknown keys, a newer format,
wrong types, skip lists that do not match the model or the weights); loading must refuse each with a ``ValueError``
that names the offending value, never load something else.
"""

from __future__ import annotations

import json
import math
import shutil
from fractions import Fraction

import numpy as np
import pytest
import torch
from tiny_models import save_fp_model, small_llama_config
from transformers import AutoModelForCausalLM

import hf_int8  # noqa: F401  (registers llmint8)
from hf_int8 import Int8Config, Int8Linear, ops
from hf_int8.checkpoint.format import FORMAT_VERSION

# ---------------------------------------------------------------------------------------------------------------
# Int8Config in code
# ---------------------------------------------------------------------------------------------------------------
BAD_VALUES = [
    ({"threshold": -1.0}, "-1.0"),
    ({"threshold": -1e-30}, "-1e-30"),
    ({"threshold": math.nan}, "nan"),
    ({"threshold": math.inf}, "inf"),
    ({"threshold": -math.inf}, "-inf"),
    ({"threshold": np.float32("nan")}, "nan"),
    ({"threshold": "6.0"}, "'6.0'"),
    ({"threshold": None}, "None"),
    ({"threshold": False}, "False"),
    ({"threshold": [6.0]}, "[6.0]"),
    ({"threshold": 6 + 0j}, "(6+0j)"),
    ({"threshold": torch.tensor(6.0)}, "tensor(6.)"),
    # Compared in float32: a positive value that rounds to 0 there, or one past float32's range, is refused.
    ({"threshold": 1e-50}, "1e-50"),
    ({"threshold": 1e39}, "1e+39"),
    ({"threshold": 10**400}, "1000000000"),
    ({"skip_modules": "lm_head"}, "'lm_head'"),
    ({"skip_modules": {"lm_head"}}, "{'lm_head'}"),
    ({"skip_modules": {"lm_head": True}}, "{'lm_head': True}"),
    ({"skip_modules": 3}, "3"),
    ({"skip_modules": ["ok", None]}, "None"),
    ({"skip_modules": ["ok", 3]}, "3"),
    ({"skip_modules": [""]}, "''"),
    ({"skip_modules": ["   "]}, "'   '"),
    ({"format_version": 0}, "0"),
    ({"format_version": -1}, "-1"),
    ({"format_version": 1.0}, "1.0"),
    ({"format_version": "1"}, "'1'"),
    ({"format_version": True}, "True"),
    ({"format_version": None}, "None"),
    ({"format_version": FORMAT_VERSION + 1}, f"format_version {FORMAT_VERSION + 1}"),
    ({"format_version": 10**6}, str(10**6)),
    ({"quant_method": "bitsandbytes_8bit"}, "'bitsandbytes_8bit'"),
    ({"quant_method": None}, "None"),
    ({"load_in_8bit": True}, "load_in_8bit"),
    ({"llm_int8_threshold": 6.0}, "llm_int8_threshold"),
    ({"threshhold": 6.0}, "threshhold"),
]


@pytest.mark.parametrize("kwargs, fragment", BAD_VALUES, ids=[repr(k) for k, _ in BAD_VALUES])
def test_every_bad_value_is_rejected_naming_it(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        Int8Config(**kwargs)
    assert fragment in str(info.value)
    with pytest.raises(ValueError) as info:
        Int8Config.from_dict({"quant_method": "llmint8", **kwargs})
    assert fragment in str(info.value)


@pytest.mark.parametrize("value", [0, 0.0, 6, 6.0, 1e6, np.float32(6.0), np.int64(3), Fraction(13, 2)])
def test_real_numbers_are_accepted_and_stored_as_float(value):
    cfg = Int8Config(threshold=value)
    assert type(cfg.threshold) is float and cfg.threshold == float(value)
    assert json.loads(cfg.to_json_string())["threshold"] == float(value)  # stays JSON-serializable


def test_skip_modules_tuple_becomes_a_list_and_round_trips():
    cfg = Int8Config(skip_modules=("mlp.down_proj", "self_attn.o_proj"))
    assert cfg.skip_modules == ["mlp.down_proj", "self_attn.o_proj"]
    assert Int8Config.from_dict(json.loads(cfg.to_json_string())) == cfg


def test_a_changed_field_is_checked_again_on_post_init():
    cfg = Int8Config()
    cfg.threshold = -3.0
    with pytest.raises(ValueError, match="-3.0"):
        cfg.post_init()


# ---------------------------------------------------------------------------------------------------------------
# The same values inside a saved config.json
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg")
    save_fp_model(root / "fp", small_llama_config(), with_tokenizer=False)
    model = AutoModelForCausalLM.from_pretrained(root / "fp", quantization_config=Int8Config(), dtype=torch.float32)
    model.save_pretrained(root / "int8")
    return root


def _with_quantization_config(saved, tmp_path, edit):
    target = tmp_path / "edited"
    shutil.copytree(saved / "int8", target)
    config = json.loads((target / "config.json").read_text())
    edit(config["quantization_config"])
    (target / "config.json").write_text(json.dumps(config))  # json writes NaN/Infinity, as Python tools do
    return target


SAVED_CASES = {
    "unknown key": (lambda q: q.update(block_size=64), "block_size"),
    "bitsandbytes key": (lambda q: q.update(llm_int8_threshold=6.0), "llm_int8_threshold"),
    "newer format": (lambda q: q.update(format_version=FORMAT_VERSION + 1), "upgrade hf_int8"),
    "format as string": (lambda q: q.update(format_version="1"), "'1'"),
    "negative threshold": (lambda q: q.update(threshold=-6.0), "-6.0"),
    "NaN threshold": (lambda q: q.update(threshold=math.nan), "nan"),
    "infinite threshold": (lambda q: q.update(threshold=math.inf), "inf"),
    "threshold as string": (lambda q: q.update(threshold="6"), "'6'"),
    "threshold null": (lambda q: q.update(threshold=None), "None"),
    "threshold rounding to 0 in float32": (lambda q: q.update(threshold=1e-50), "1e-50"),
    "threshold past float32's range": (lambda q: q.update(threshold=1e39), "1e+39"),
    "skip as string": (lambda q: q.update(skip_modules="lm_head"), "'lm_head'"),
    "skip entry not a string": (lambda q: q.update(skip_modules=[1]), "1"),
    "skip matches no module": (lambda q: q.update(skip_modules=["mlp.not_a_layer"]), "mlp.not_a_layer"),
    "skip names an int8 layer": (lambda q: q.update(skip_modules=["down_proj"]), "down_proj"),
}


@pytest.mark.parametrize("case", sorted(SAVED_CASES))
def test_bad_saved_config_is_refused_naming_the_value(saved, tmp_path, case):
    edit, fragment = SAVED_CASES[case]
    target = _with_quantization_config(saved, tmp_path, edit)
    with pytest.raises(ValueError) as info:
        AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    assert fragment in str(info.value)


def test_saved_config_holds_exactly_the_known_keys(saved):
    q = json.loads((saved / "int8" / "config.json").read_text())["quantization_config"]
    assert q == {"quant_method": "llmint8", "threshold": 6.0, "skip_modules": None, "format_version": FORMAT_VERSION}


def test_threshold_edited_in_config_json_is_used(saved, tmp_path):
    """The threshold only concerns activations: a valid edit applies to every int8 layer (defined behaviour)."""
    target = _with_quantization_config(saved, tmp_path, lambda q: q.update(threshold=2.5))
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    thresholds = {m.threshold for m in model.modules() if isinstance(m, Int8Linear)}
    assert thresholds == {2.5}


def test_config_passed_at_load_does_not_silently_override_a_saved_checkpoint(saved):
    """transformers keeps the checkpoint's quantization_config and warns that the one passed is ignored."""
    with pytest.warns(UserWarning, match="quantization_config"):
        model = AutoModelForCausalLM.from_pretrained(
            saved / "int8", quantization_config=Int8Config(threshold=1.0), dtype=torch.float32
        )
    assert {m.threshold for m in model.modules() if isinstance(m, Int8Linear)} == {6.0}


def test_unknown_skip_module_is_refused_when_quantizing(saved):
    with pytest.raises(ValueError, match="'mlp.nope'"):
        AutoModelForCausalLM.from_pretrained(saved / "fp", quantization_config=Int8Config(skip_modules=["mlp.nope"]))


# ---------------------------------------------------------------------------------------------------------------
# Layer and op arguments
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"in_features": 0}, "in_features"),
        ({"in_features": -4}, "-4"),
        ({"in_features": 3.0}, "3.0"),
        ({"in_features": True}, "True"),
        ({"out_features": "8"}, "'8'"),
        ({"out_features": None}, "None"),
        ({"threshold": -0.5}, "-0.5"),
        ({"threshold": math.nan}, "nan"),
        ({"threshold": math.inf}, "inf"),
        ({"threshold": "6"}, "'6'"),
    ],
)
def test_int8_linear_constructor_rejects_bad_arguments(kwargs, fragment):
    args = {"in_features": 4, "out_features": 8, **kwargs}
    with pytest.raises(ValueError) as info:
        Int8Linear(**args)
    assert fragment in str(info.value)


@pytest.mark.parametrize("threshold", [-1.0, math.nan, math.inf, "6", None, True, 1e-50, 7e-46, 1e39])
def test_ops_reject_bad_thresholds(threshold):
    codes, scale = ops.quantize_weight(torch.randn(8, 4))
    for call in (
        lambda: ops.int8_linear(torch.randn(2, 4), codes, scale, threshold=threshold),
        lambda: ops.quantize_activation(torch.randn(2, 4), threshold),
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert repr(threshold) in str(info.value)
