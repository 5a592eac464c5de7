"""Int8Config: defaults, validation of every field, and (de)serialization round trips."""

from __future__ import annotations

import json
import math

import pytest
from transformers.utils.quantization_config import QuantizationConfigMixin

import hf_int8  # noqa: F401  (registers llmint8)
from hf_int8 import Int8Config
from hf_int8.checkpoint.format import FORMAT_VERSION


def test_defaults():
    cfg = Int8Config()
    assert isinstance(cfg, QuantizationConfigMixin)
    assert cfg.quant_method == "llmint8"
    assert cfg.threshold == 6.0
    assert cfg.skip_modules is None
    assert cfg.format_version == FORMAT_VERSION


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"threshold": -1.0}, "-1.0"),
        ({"threshold": math.nan}, "nan"),
        ({"threshold": math.inf}, "inf"),
        ({"threshold": "6"}, "'6'"),
        ({"threshold": True}, "True"),
        ({"threshold": None}, "None"),
        ({"skip_modules": "lm_head"}, "'lm_head'"),
        ({"skip_modules": ["ok", 3]}, "3"),
        ({"skip_modules": [""]}, "''"),
        ({"format_version": 0}, "0"),
        ({"format_version": "1"}, "'1'"),
        ({"format_version": FORMAT_VERSION + 1}, str(FORMAT_VERSION + 1)),
        ({"quant_method": "bitsandbytes_8bit"}, "bitsandbytes_8bit"),
        ({"llm_int8_threshold": 6.0}, "llm_int8_threshold"),
    ],
)
def test_bad_values_name_the_value(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        Int8Config(**kwargs)
    assert fragment in str(info.value)


def test_integer_threshold_is_accepted_as_float():
    assert Int8Config(threshold=0).threshold == 0.0
    assert isinstance(Int8Config(threshold=3).threshold, float)


def test_round_trips():
    cfg = Int8Config(threshold=4.5, skip_modules=["mlp.down_proj"])
    as_dict = cfg.to_dict()
    assert as_dict == {
        "quant_method": "llmint8",
        "threshold": 4.5,
        "skip_modules": ["mlp.down_proj"],
        "format_version": 1,
    }
    assert Int8Config.from_dict(as_dict) == cfg
    assert Int8Config.from_dict(json.loads(cfg.to_json_string())) == cfg
    assert Int8Config.from_dict(json.loads(cfg.to_json_string(use_diff=False))) == cfg


def test_auto_config_dispatches_to_int8config():
    from transformers.quantizers.auto import AutoHfQuantizer, AutoQuantizationConfig

    cfg = AutoQuantizationConfig.from_dict({"quant_method": "llmint8", "threshold": 2.0})
    assert isinstance(cfg, Int8Config) and cfg.threshold == 2.0
    quantizer = AutoHfQuantizer.from_config(cfg, pre_quantized=False)
    assert type(quantizer).__name__ == "Int8HfQuantizer"


def test_example_configs_load(tmp_path):
    from pathlib import Path

    files = sorted((Path(__file__).parent.parent / "configs").glob("*.json"))
    assert files, "configs/ should hold example configs"
    for path in files:
        cfg = Int8Config.from_dict(json.loads(path.read_text()))
        assert cfg.quant_method == "llmint8"
