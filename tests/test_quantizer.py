"""The llmint8 quantizer end to end on small random-weight models of several architectures.

Each architecture is saved as a normal fp32 safetensors checkpoint, loaded with ``Int8Config`` (quantized while
loading), run, saved, and reloaded without a ``quantization_config``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from tiny_models import tiny_bert_config, tiny_decoder_config, tiny_gpt2_config, tiny_llama_config
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    GemmaConfig,
    OPTConfig,
    Qwen2Config,
    T5Config,
)
from transformers.pytorch_utils import Conv1D

import hf_int8
from hf_int8 import Int8Config, Int8Linear
from hf_int8.nn import FloatLinear

VOCAB = 128
TOKENS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))


def _llama():
    return AutoModelForCausalLM, tiny_llama_config(VOCAB)


def _gpt2():
    return AutoModelForCausalLM, tiny_gpt2_config(VOCAB)


def _opt():
    return AutoModelForCausalLM, OPTConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        ffn_dim=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=64,
    )


def _qwen2():
    return AutoModelForCausalLM, tiny_decoder_config(Qwen2Config, VOCAB, tie_word_embeddings=True)


def _gemma():
    return AutoModelForCausalLM, tiny_decoder_config(GemmaConfig, VOCAB, num_key_value_heads=1, head_dim=16)


def _bert():
    return AutoModelForSequenceClassification, tiny_bert_config(VOCAB, num_labels=3, max_position_embeddings=64)


def _t5():
    return AutoModelForSeq2SeqLM, T5Config(
        vocab_size=VOCAB,
        d_model=64,
        d_ff=96,
        d_kv=16,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
    )


ARCHS = {"llama": _llama, "gpt2": _gpt2, "opt": _opt, "qwen2": _qwen2, "gemma": _gemma, "bert": _bert, "t5": _t5}
# Modules that must stay floating point in each architecture (output heads, tied embeddings, _keep_in_fp32_modules).
STAYS_FLOAT = {
    "llama": ["lm_head"],
    "gpt2": ["lm_head"],
    "opt": ["lm_head"],
    "qwen2": ["lm_head"],
    "gemma": ["lm_head"],
    "bert": ["classifier"],
    "t5": ["lm_head", "encoder.block.0.layer.1.DenseReluDense.wo", "decoder.block.1.layer.2.DenseReluDense.wo"],
}


def _forward(model, arch):
    with torch.no_grad():
        if arch == "t5":
            return model(input_ids=TOKENS, decoder_input_ids=TOKENS[:, :5]).logits
        return model(input_ids=TOKENS).logits


def _save_fp(arch, tmp_path_factory):
    auto_cls, config = ARCHS[arch]()
    torch.manual_seed(0)
    model = auto_cls.from_config(config, dtype=torch.float32).eval()
    path = tmp_path_factory.mktemp(f"fp-{arch}")
    model.save_pretrained(path)
    return arch, auto_cls, model, path


@pytest.fixture(scope="module", params=sorted(ARCHS))
def saved_fp_model(request, tmp_path_factory):
    """Every architecture under test, saved as an fp32 checkpoint."""
    return _save_fp(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama_fp(tmp_path_factory):
    """One architecture for behaviour that does not depend on the architecture (dtype, sharding, offload...)."""
    return _save_fp("llama", tmp_path_factory)


@pytest.fixture(scope="module")
def gpt2_fp(tmp_path_factory):
    return _save_fp("gpt2", tmp_path_factory)


def _load_int8(auto_cls, path, **kwargs):
    kwargs.setdefault("dtype", torch.float32)
    return auto_cls.from_pretrained(path, quantization_config=Int8Config(threshold=6.0), **kwargs).eval()


def _linear_like(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def test_quantized_load_forward_save_reload(saved_fp_model, tmp_path):
    arch, auto_cls, fp_model, path = saved_fp_model
    model = _load_int8(auto_cls, path, device_map="auto")

    # Every linear layer is int8 except the ones that must stay floating point.
    float_left = set(_linear_like(model))
    int8_layers = {name for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert int8_layers, "no layer was quantized"
    assert set(_linear_like(fp_model)) == float_left | int8_layers
    for name in STAYS_FLOAT[arch]:
        assert name in float_left, f"{name} should stay floating point, float layers: {sorted(float_left)}"
    for name in float_left:  # the nn.Linear ones run hf_int8's floating-point kernel on CPU
        if type(fp_model.get_submodule(name)) is nn.Linear:
            assert type(model.get_submodule(name)) is FloatLinear, name
    for name in int8_layers:
        assert model.get_submodule(name).weight.dtype == torch.int8
        assert model.get_submodule(name).weight_scale.dtype == torch.float32

    # Outputs close to the fp32 model (random weights, random tokens: relative error of a few percent at most).
    ref, out = _forward(fp_model, arch), _forward(model, arch)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert torch.isfinite(out).all()
    assert rel < 0.05, f"{arch}: relative error {rel:.4f} vs fp32"

    # Save (safetensors only) and reload with no quantization_config: same classes, same bits, same logits.
    out_dir = tmp_path / "int8"
    model.save_pretrained(out_dir)
    files = sorted(os.listdir(out_dir))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    qcfg = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "llmint8" and qcfg["threshold"] == 6.0 and qcfg["format_version"] == 1
    with safe_open(out_dir / "model.safetensors", "pt") as f:
        some = sorted(int8_layers)[0]
        assert f.get_tensor(f"{some}.weight").dtype == torch.int8
        assert f.get_tensor(f"{some}.weight_scale").dtype == torch.float32

    again = auto_cls.from_pretrained(out_dir, dtype=torch.float32).eval()
    for name in int8_layers:
        a, b = model.get_submodule(name), again.get_submodule(name)
        assert type(b) is Int8Linear
        assert torch.equal(a.weight, b.weight) and torch.equal(a.weight_scale, b.weight_scale)
    assert torch.equal(_forward(again, arch), out)


def test_gpt2_conv1d_weights_are_transposed_to_out_in(gpt2_fp):
    arch, auto_cls, fp_model, path = gpt2_fp
    model = _load_int8(auto_cls, path)
    conv = fp_model.transformer.h[0].mlp.c_fc  # Conv1D weight is [in, out]
    q = model.transformer.h[0].mlp.c_fc
    assert tuple(q.weight.shape) == (conv.weight.shape[1], conv.weight.shape[0])
    assert q.weight.is_contiguous()
    err = (q.dequantize() - conv.weight.t()).abs()
    assert (err <= q.weight_scale[:, None] / 2 + 1e-7).all()


def test_dequantize_returns_working_float_model(saved_fp_model):
    arch, auto_cls, fp_model, path = saved_fp_model
    model = _load_int8(auto_cls, path)
    int8_out = _forward(model, arch)
    model = model.dequantize()
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert not getattr(model, "is_quantized", False)
    assert set(_linear_like(model)) == set(_linear_like(fp_model))
    out = _forward(model, arch)
    ref = _forward(fp_model, arch)
    # The dequantized model runs fp activations on rounded weights: closer to fp32 than int8 x int8 is.
    assert ((out - ref).norm() / ref.norm()).item() < 0.05
    assert ((out - int8_out).norm() / int8_out.norm()).item() < 0.05
    model.to(torch.float16)  # casting is allowed again once dequantized


def test_dtype_casts_are_refused(saved_fp_model):
    arch, auto_cls, _, path = saved_fp_model
    model = _load_int8(auto_cls, path)
    for cast in (
        lambda: model.half(),
        lambda: model.float(),
        lambda: model.to(torch.bfloat16),
        lambda: model.to("cpu", torch.float16),
        lambda: model.to(dtype=torch.float16),
    ):
        with pytest.raises(ValueError):
            cast()
    assert model.to("cpu") is model  # moving devices is fine


def test_memory_footprint_and_report(saved_fp_model):
    arch, auto_cls, fp_model, path = saved_fp_model
    model = _load_int8(auto_cls, path)
    report = hf_int8.memory_report(model)
    assert report.total == model.get_memory_footprint()
    int8_modules = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert report.num_int8_layers == len(int8_modules)
    assert report.int8_weights == sum(m.weight.numel() for m in int8_modules)
    assert report.scales == 4 * sum(m.out_features for m in int8_modules)
    assert model.get_memory_footprint() < fp_model.get_memory_footprint()
    assert sorted(STAYS_FLOAT[arch])[0] in report.float_linear_layers or arch == "t5"
    assert "int8 weights" in str(report)


def test_bf16_load_keeps_fp32_scales_and_bf16_outputs(llama_fp, tmp_path):
    arch, auto_cls, _, path = llama_fp
    model = _load_int8(auto_cls, path, dtype=torch.bfloat16)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert _forward(model, arch).dtype == torch.bfloat16
    model.save_pretrained(tmp_path)
    again = auto_cls.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert again.model.layers[0].mlp.up_proj.weight_scale.dtype == torch.float32
    assert torch.equal(again.model.layers[0].mlp.up_proj.weight_scale, layer.weight_scale)


def test_sharded_save_reloads(llama_fp, tmp_path):
    arch, auto_cls, _, path = llama_fp
    model = _load_int8(auto_cls, path)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    again = auto_cls.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(_forward(again, arch), _forward(model, arch))


def test_cpu_and_disk_offload_device_maps(llama_fp, tmp_path):
    arch, auto_cls, _, path = llama_fp
    plain = _load_int8(auto_cls, path)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    offloaded = _load_int8(auto_cls, path, device_map=device_map, offload_folder=tmp_path / "offload")
    assert offloaded.hf_device_map["model.layers.1"] == "disk"
    # The offload folder holds the int8 codes, not the fp checkpoint tensor (transformers' core bug worked around).
    with safe_open(tmp_path / "offload" / "model.layers.1.mlp.up_proj.weight.safetensors", "pt") as f:
        assert f.get_tensor(f.keys()[0]).dtype == torch.int8
    assert torch.equal(_forward(offloaded, arch), _forward(plain, arch))
    # Saved from an offloaded model, reloaded pre-quantized with disk offload again.
    offloaded.save_pretrained(tmp_path / "saved")
    again = auto_cls.from_pretrained(
        tmp_path / "saved", dtype=torch.float32, device_map=device_map, offload_folder=tmp_path / "offload2"
    )
    assert torch.equal(_forward(again, arch), _forward(plain, arch))


def test_skip_modules_add_to_defaults(llama_fp):
    arch, auto_cls, _, path = llama_fp
    model = auto_cls.from_pretrained(
        path,
        quantization_config=Int8Config(skip_modules=["down_proj", "model.layers.1.self_attn"]),
        dtype=torch.float32,
    )
    assert type(model.lm_head) is FloatLinear  # the default skip survives a user list
    assert type(model.model.layers[0].mlp.down_proj) is FloatLinear
    assert type(model.model.layers[1].self_attn.q_proj) is FloatLinear
    assert type(model.model.layers[0].self_attn.q_proj) is Int8Linear


def test_unknown_skip_module_is_refused(llama_fp):
    arch, auto_cls, _, path = llama_fp
    with pytest.raises(ValueError, match="mlp.not_a_layer"):
        auto_cls.from_pretrained(path, quantization_config=Int8Config(skip_modules=["mlp.not_a_layer"]))


def test_missing_scale_in_checkpoint_is_refused(llama_fp, tmp_path):
    arch, auto_cls, _, path = llama_fp
    from safetensors.torch import load_file, save_file

    model = _load_int8(auto_cls, path)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight_scale"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises((ValueError, RuntimeError), match="up_proj"):
        auto_cls.from_pretrained(tmp_path, dtype=torch.float32)


def test_bare_encoder_quantizes_its_pooler(tmp_path):
    """A base model without a head (BertModel) has no output layer to protect: its pooler is quantized like bnb's."""
    from transformers import AutoModel

    _, config = _bert()
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path, quantization_config=Int8Config(), dtype=torch.float32)
    assert type(model.pooler.dense) is Int8Linear
    assert not _linear_like(model)
