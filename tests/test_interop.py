"""llmint8 <-> bitsandbytes 8-bit checkpoint conversion, checked against bitsandbytes itself on CPU.

bitsandbytes quantizes fp32 weights after casting them to fp16, so the models here are saved in fp16: then both
libraries start from the same numbers and their int8 codes and scales can be compared bit for bit. Run with ``-s``
to see the measured agreement.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import gpt2_config, llama_config, save_fp_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import hf_int8  # noqa: F401
from hf_int8 import Int8Config, Int8Linear
from hf_int8.integration import interop
from hf_int8.nn import FloatLinear
from hf_int8.ops.constants import INT8_MAX

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (a test extra) is not installed")

LAYER = "model.layers.0.mlp.up_proj"
IDS = torch.arange(4, 36).unsqueeze(0)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """fp16 source, bitsandbytes' own 8-bit save of it, and hf_int8's own llmint8 save of it."""
    root = tmp_path_factory.mktemp("interop")
    fp = save_fp_model(root / "fp16", dtype=torch.float16, outlier_scale=40.0)
    bnb_model = AutoModelForCausalLM.from_pretrained(
        fp, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
    bnb_model.save_pretrained(root / "bnb")
    int8 = AutoModelForCausalLM.from_pretrained(fp, quantization_config=Int8Config(), dtype=torch.float16)
    int8.save_pretrained(root / "llmint8")
    return {"root": root, "fp": fp, "bnb": root / "bnb", "llmint8": root / "llmint8"}


def _codes_agree(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of int8 codes that differ (never by more than one step)."""
    diff = (a.reshape(-1).int() - b.reshape(-1).int()).abs()
    assert int(diff.max()) <= 1
    return float((diff != 0).float().mean())


def test_bnb_to_llmint8_keeps_bitsandbytes_codes_and_gives_hf_int8_scales(folders):
    out = folders["root"] / "from-bnb"
    report = interop.convert(folders["bnb"], out, "llmint8")
    assert len(report.int8_layers) == 14 and report.kept_float == ["lm_head"] and report.dequantized == []
    converted, source, native = _tensors(out), _tensors(folders["bnb"]), _tensors(folders["llmint8"])
    assert sorted(converted) == sorted(native)
    differing = 0.0
    for key, want in native.items():
        got = converted[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        if key.endswith(".weight") and got.dtype == torch.int8:
            assert torch.equal(got, source[key].reshape(-1)), key  # bitsandbytes' codes, bit for bit
            # hf_int8 rounds x * (127 / absmax) with a correctly rounded multiplier, bitsandbytes with a
            # reciprocal times 127: the same code except at rounding ties, one step apart.
            differing = max(differing, _codes_agree(got, want))
        else:  # weight_scale = fp32(SCB / 127) is exactly hf_int8's scale; float tensors are copied
            assert torch.equal(got, want), key
    assert differing < 1e-3, differing
    print(f"\nbnb -> llmint8: codes differing from hf_int8's own quantization: {differing:.2e} (max over layers)")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == Int8Config(threshold=6.0).to_dict()
    with safe_open(out / "model.safetensors", "pt") as handle:
        assert handle.metadata()["quant_method"] == "llmint8"
        assert "hf_int8.seal" in handle.metadata()  # sealed like a folder save_pretrained wrote
    assert "import hf_int8" in (out / "README.md").read_text()

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16)
    direct = AutoModelForCausalLM.from_pretrained(folders["llmint8"], dtype=torch.float16)
    assert isinstance(model.get_submodule(LAYER), Int8Linear)
    with torch.no_grad():
        got, want = model(IDS).logits.float(), direct(IDS).logits.float()
    assert ((got - want).norm() / want.norm()).item() < 2e-3


def test_llmint8_to_bnb_matches_bitsandbytes_own_checkpoint(folders):
    out = folders["root"] / "to-bnb"
    interop.convert(folders["llmint8"], out, "bnb")
    converted, native, source = _tensors(out), _tensors(folders["bnb"]), _tensors(folders["llmint8"])
    assert sorted(converted) == sorted(native)
    scb_rows = same_rows = 0
    for key, want in native.items():
        got = converted[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        if key.endswith(".SCB"):
            # fp32(weight_scale * 127) is bitsandbytes' absmax, or one ulp away from it.
            ulps = (got.view(torch.int32) - want.view(torch.int32)).abs()
            assert int(ulps.max()) <= 1, key
            scb_rows += got.numel()
            same_rows += int((ulps == 0).sum())
        elif key.endswith(".weight") and got.dtype == torch.int8:
            assert torch.equal(got.reshape(-1), source[key]), key  # hf_int8's codes, bit for bit
            assert _codes_agree(got, want) < 1e-3, key
        else:  # weight_format, every floating-point tensor: bit for bit
            assert torch.equal(got, want), key
    assert same_rows / scb_rows > 0.95, f"only {same_rows}/{scb_rows} SCB rows exact"
    print(f"\nllmint8 -> bnb: SCB equal to bitsandbytes' own in {same_rows}/{scb_rows} rows, the rest 1 ulp")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["load_in_8bit"] and qcfg["llm_int8_threshold"] == 6.0 and qcfg["llm_int8_skip_modules"] == ["lm_head"]

    # transformers + bitsandbytes load it as their 8-bit model, and it computes what bitsandbytes' own one does.
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    own = AutoModelForCausalLM.from_pretrained(folders["bnb"], device_map="cpu")
    assert isinstance(model.get_submodule(LAYER), bnb.nn.Linear8bitLt)
    with torch.no_grad():
        got, want = model(IDS).logits.float(), own(IDS).logits.float()
    assert ((got - want).norm() / want.norm()).item() < 2e-3


def test_llmint8_and_bnb_models_agree_numerically(folders):
    """Same checkpoint, two LLM.int8() implementations on CPU: both close to fp16, and to each other."""
    fp = AutoModelForCausalLM.from_pretrained(folders["fp"], dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(folders["llmint8"], dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(
        interop.convert(folders["llmint8"], folders["root"] / "agree", "bnb").output, device_map="cpu"
    )
    with torch.no_grad():
        ref, a, b = fp(IDS).logits, ours(IDS).logits, theirs(IDS).logits.float()
    rel = lambda x, y: ((x - y).norm() / y.norm()).item()  # noqa: E731
    assert rel(a, ref) < 0.02 and rel(b, ref) < 0.02 and rel(a, b) < 0.02, (rel(a, ref), rel(b, ref), rel(a, b))
    print(
        f"\nlogits relative error: llmint8 vs fp16 {rel(a, ref):.2e}, converted-to-bnb vs fp16 {rel(b, ref):.2e}, "
        f"llmint8 vs bnb {rel(a, b):.2e}"
    )


def test_round_trips(folders):
    root = folders["root"]
    there = interop.convert(folders["llmint8"], root / "rt-bnb", "bnb").output
    back = interop.convert(there, root / "rt-llmint8", "llmint8").output
    original, returned = _tensors(folders["llmint8"]), _tensors(Path(back))
    assert sorted(original) == sorted(returned)
    assert all(torch.equal(original[k], returned[k]) for k in original)  # llmint8 -> bnb -> llmint8: exact

    again = interop.convert(back, root / "rt-bnb2", "bnb").output
    first, second = _tensors(Path(there)), _tensors(Path(again))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_scale_conversion_exactness():
    """weight_scale -> SCB -> weight_scale is exact for every scale hf_int8 produces (absmax / 127 in fp32)."""
    absmax = torch.arange(1, 0x7C00, dtype=torch.int16).view(torch.float16).float()  # every positive finite fp16
    random = torch.rand(1_000_000, generator=torch.Generator().manual_seed(0)) * 100 + 1e-6
    for values in (absmax, random):
        scale = values / INT8_MAX
        scb = (scale.double() * INT8_MAX).float()
        assert torch.equal((scb.double() / INT8_MAX).float(), scale)
        # and SCB is the original absmax for almost every row, one ulp away otherwise
        ulps = (scb.view(torch.int32) - values.view(torch.int32)).abs()
        assert int(ulps.max()) <= 1 and float((ulps == 0).float().mean()) > 0.99


def test_skip_modules_survive_both_directions(tmp_path):
    tokenizer = tiny_tokenizer()
    fp = save_fp_model(tmp_path / "fp", config=llama_config(len(tokenizer)), dtype=torch.float16)
    model = AutoModelForCausalLM.from_pretrained(
        fp, quantization_config=Int8Config(skip_modules=["down_proj"]), dtype=torch.float16
    )
    model.save_pretrained(tmp_path / "q")
    interop.convert(tmp_path / "q", tmp_path / "b", "bnb")
    skip = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert skip == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "b", device_map="cpu")
    assert type(loaded.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(loaded.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)

    # bitsandbytes with a user skip list quantizes lm_head too (its list replaces the defaults); llmint8 keeps the
    # output head in floating point, so the converter dequantizes it and says so.
    theirs = AutoModelForCausalLM.from_pretrained(
        fp,
        quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["mlp.down_proj"]),
        device_map="cpu",
    )
    assert isinstance(theirs.lm_head, bnb.nn.Linear8bitLt)
    theirs.save_pretrained(tmp_path / "bnb")
    report = interop.convert(tmp_path / "bnb", tmp_path / "l", "llmint8")
    assert report.dequantized == ["lm_head"]
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "l", dtype=torch.float16)
    assert type(ours.lm_head) is FloatLinear and type(ours.model.layers[1].mlp.down_proj) is FloatLinear
    assert isinstance(ours.model.layers[1].mlp.up_proj, Int8Linear)
    head = theirs.lm_head
    want = (head.weight.data.float() * head.weight.SCB.float().unsqueeze(1) / INT8_MAX).half()
    assert torch.equal(ours.lm_head.weight.data, want)


def test_refusals_name_what_is_wrong(folders, tmp_path):
    with pytest.raises(interop.ConversionError, match="'float' checkpoint, not an llmint8"):
        interop.convert(folders["fp"], tmp_path / "a", "bnb")
    with pytest.raises(interop.ConversionError, match="not a bitsandbytes 8-bit"):
        interop.convert(folders["llmint8"], tmp_path / "b", "llmint8")
    with pytest.raises(ValueError, match="to must be one of"):
        interop.convert(folders["bnb"], tmp_path / "c", "gguf")
    # A layout bitsandbytes no longer writes (weight_format != 0) is refused, naming the tensor.
    bad = tmp_path / "bad"
    bad.mkdir()
    for entry in folders["bnb"].iterdir():
        (bad / entry.name).write_bytes(entry.read_bytes())
    tensors = load_file(bad / "model.safetensors")
    tensors[f"{LAYER}.weight_format"] = torch.tensor(2, dtype=torch.uint8)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(interop.ConversionError, match=rf"{LAYER}.weight_format .* is 2"):
        interop.convert(bad, tmp_path / "d", "llmint8")
    assert not (tmp_path / "d").exists()  # nothing half-written
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        interop.convert(folders["bnb"], tmp_path / "e", "llmint8")
    assert (tmp_path / "e" / "keep.txt").read_text() == "user data"


def test_gpt2_conv1d_layers_convert_both_ways(tmp_path):
    """GPT-2 keeps its projections as transformers Conv1D ([in, out]); both formats store them as [out, in]."""
    tokenizer = tiny_tokenizer()
    fp = save_fp_model(tmp_path / "fp", config=gpt2_config(len(tokenizer)), dtype=torch.float16, outlier_scale=20.0)
    ours = AutoModelForCausalLM.from_pretrained(fp, quantization_config=Int8Config(), dtype=torch.float16)
    ours.save_pretrained(tmp_path / "q")
    theirs = AutoModelForCausalLM.from_pretrained(
        fp, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
    theirs.save_pretrained(tmp_path / "b")
    as_bnb = AutoModelForCausalLM.from_pretrained(
        interop.convert(tmp_path / "q", tmp_path / "qb", "bnb").output, device_map="cpu"
    )
    as_int8 = AutoModelForCausalLM.from_pretrained(
        interop.convert(tmp_path / "b", tmp_path / "bq", "llmint8").output, dtype=torch.float16
    )
    assert isinstance(as_bnb.transformer.h[0].mlp.c_fc, bnb.nn.Linear8bitLt)
    assert isinstance(as_int8.transformer.h[0].mlp.c_fc, Int8Linear)
    rel = lambda x, y: ((x.float() - y.float()).norm() / y.float().norm()).item()  # noqa: E731
    with torch.no_grad():
        assert rel(as_bnb(IDS).logits, theirs(IDS).logits) < 1e-2
        assert rel(as_int8(IDS).logits, ours(IDS).logits) < 1e-2
