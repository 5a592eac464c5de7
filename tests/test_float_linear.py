"""``FloatLinear``: the layers an llmint8 model keeps in floating point, with hf_int8's CPU decode kernel for bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _tolerance import assert_within, fp32_sum_tolerance
from tiny_models import llama_config, save_fp_model, tiny_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM

import hf_int8
from hf_int8 import Int8Config, ops
from hf_int8.nn import FloatLinear, Int8Linear

NATIVE = torch._C._dispatch_has_kernel_for_dispatch_key("hf_int8::float_linear", "CPU")
needs_native = pytest.mark.skipif(not NATIVE, reason=f"native CPU kernels not built: {hf_int8.extension_status()}")


def _layer(k: int = 96, n: int = 70, dtype: torch.dtype = torch.bfloat16, bias: bool = True) -> FloatLinear:
    torch.manual_seed(0)
    layer = FloatLinear(k, n, bias=bias, dtype=dtype)
    layer.requires_grad_(False)  # as a loaded model's head in inference; see the gradient test for the other case
    return layer


def _tolerance(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    magnitude = x.double().abs().reshape(-1, x.shape[-1]) @ layer.weight.double().abs().t()
    if layer.bias is not None:
        magnitude += layer.bias.double().abs()
    return fp32_sum_tolerance(magnitude, x.shape[-1] + 1, x.dtype).reshape(*x.shape[:-1], layer.out_features)


@needs_native
@pytest.mark.parametrize("tokens", [(1,), (3,), (2, 8), (17,)], ids=str)
def test_bf16_forward_runs_the_op_and_matches_nn_linear(tokens, monkeypatch):
    layer = _layer()
    x = torch.randn(*tokens, 96).bfloat16()
    calls = []
    real = ops.float_linear
    monkeypatch.setattr(ops, "float_linear", lambda *a: calls.append(a) or real(*a))
    got = layer(x)
    assert len(calls) == 1  # the kernel served it (it hands more than 16 tokens to torch's linear itself)
    want = nn.functional.linear(x, layer.weight, layer.bias)
    assert_within(got, want, _tolerance(x, layer), f"tokens {tokens}")


@pytest.mark.parametrize(
    "case", ["fp32", "fp16", "x-requires-grad", "weight-requires-grad", "native-unavailable", "fp32-bias"]
)
def test_everything_else_is_nn_linear_forward(case, monkeypatch):
    dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(case, torch.bfloat16)
    layer = _layer(dtype=dtype)
    x = torch.randn(3, 96).to(dtype)
    if case == "x-requires-grad":
        x.requires_grad_(True)
    if case == "weight-requires-grad":
        layer.weight.requires_grad_(True)
    if case == "native-unavailable":  # reference-only build, or native kernels that failed their self-check
        monkeypatch.setattr(ops, "float_linear_is_native", lambda: False)
    if case == "fp32-bias":  # mixed dtypes: nn.Linear's own behaviour (an error), not a silent upcast
        layer.bias.data = layer.bias.data.float()
    monkeypatch.setattr(ops, "float_linear", lambda *a: pytest.fail(f"the op ran for case {case}"))
    if case == "fp32-bias":
        with pytest.raises(RuntimeError):
            nn.functional.linear(x, layer.weight, layer.bias)
        with pytest.raises(RuntimeError):
            layer(x)
        return
    got = layer(x)
    assert torch.equal(got, nn.functional.linear(x, layer.weight, layer.bias))
    if case.endswith("requires-grad"):
        got.sum().backward()  # nn.Linear's autograd
        grad = x.grad if case == "x-requires-grad" else layer.weight.grad
        assert grad is not None and grad.abs().sum() > 0


@needs_native
def test_compiles_without_graph_break():
    layer = _layer()
    x = torch.randn(2, 96).bfloat16()
    with torch.no_grad():
        torch._dynamo.reset()
        explained = torch._dynamo.explain(layer)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        targets = [str(n.target) for n in explained.graphs[0].graph.nodes if n.op == "call_function"]
        assert any("hf_int8.float_linear" in t for t in targets), targets
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True)
        assert torch.equal(compiled(x), layer(x))
        torch._dynamo.reset()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    vocab = len(tiny_tokenizer())
    return save_fp_model(tmp_path_factory.mktemp("float_linear") / "fp", llama_config(vocab_size=vocab))


def _load(path: Path, **config) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, device_map="cpu", quantization_config=Int8Config(**config)
    ).eval()


def test_llmint8_model_keeps_its_float_layers_as_float_linear(tiny, tmp_path):
    model = _load(tiny, skip_modules=["down_proj"])
    float_layers = {name for name, m in model.named_modules() if type(m) is FloatLinear}
    assert "lm_head" in float_layers and any(name.endswith("mlp.down_proj") for name in float_layers)
    assert all(m.weight.dtype == torch.bfloat16 for m in model.modules() if type(m) is FloatLinear)
    assert not any(type(m) is nn.Linear for m in model.modules())
    # The same parameters and checkpoint as an nn.Linear: save, reload, same layers and tensors.
    model.save_pretrained(tmp_path / "int8")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "int8", dtype=torch.bfloat16, device_map="cpu").eval()
    assert {name for name, m in again.named_modules() if type(m) is FloatLinear} == float_layers
    state, state_again = model.state_dict(), again.state_dict()
    assert state.keys() == state_again.keys()
    assert all(torch.equal(state[key], state_again[key]) for key in state)
    # Logits: the head's kernel agrees with nn.Linear's forward on the same hidden states.
    ids = torch.tensor([[2, 5, 9, 14, 20, 7, 30, 11]])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[:, -1:]
        got = model.lm_head(hidden)
        want = nn.functional.linear(hidden, model.lm_head.weight, model.lm_head.bias)
    assert_within(got, want, _tolerance(hidden, model.lm_head), "lm_head")
    # dequantize() gives back plain nn.Linear layers.
    model.dequantize()
    assert not any(type(m) in (FloatLinear, Int8Linear) for m in model.modules())
    assert type(model.lm_head) is nn.Linear


class _ShardLike(torch.Tensor):
    """A tensor subclass standing in for tensor parallelism's DTensor parameters."""


def test_layers_with_non_plain_parameters_run_torchs_linear(monkeypatch):
    from hf_int8.integration.quantizer import keep_distributed_on_torch

    plain, sharded = _layer(), _layer()
    sharded.weight = nn.Parameter(sharded.weight.detach().as_subclass(_ShardLike), requires_grad=False)
    keep_distributed_on_torch(nn.Sequential(plain, sharded))
    assert plain.native_forward and not sharded.native_forward
    monkeypatch.setattr(ops, "float_linear", lambda *a: pytest.fail("the op ran for a non-plain weight"))
    x = torch.randn(2, 96).bfloat16()
    assert torch.equal(sharded(x), nn.functional.linear(x, sharded.weight, sharded.bias))
