"""pipeline("text-generation") on llmint8 models, and torch.compile through Int8Linear without graph breaks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import save_fp_model
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import hf_int8  # noqa: F401
from hf_int8 import Int8Config, Int8Linear

PROMPT = "the committee met on tuesday to review"


@pytest.fixture(scope="module")
def saved_int8(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipe")
    fp = save_fp_model(root / "fp", outlier_scale=40.0)
    model = AutoModelForCausalLM.from_pretrained(fp, quantization_config=Int8Config(), dtype=torch.float32)
    model.save_pretrained(root / "int8")
    AutoTokenizer.from_pretrained(fp).save_pretrained(root / "int8")
    return root / "int8"


def test_text_generation_pipeline_from_a_model(saved_int8):
    model = AutoModelForCausalLM.from_pretrained(saved_int8, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(saved_int8)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = generator(PROMPT, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    assert out == tokenizer.decode(expected, skip_special_tokens=True)
    assert len(expected) == 8


def test_text_generation_pipeline_from_a_path(saved_int8):
    generator = pipeline("text-generation", model=str(saved_int8), dtype=torch.float32)
    layers = [m for m in generator.model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 14  # the pipeline's own from_pretrained loads the llmint8 checkpoint as int8
    out = generator([PROMPT, "several residents asked"], max_new_tokens=5, do_sample=False)
    assert len(out) == 2
    assert out[0][0]["generated_text"].startswith(PROMPT) and out[1][0]["generated_text"].startswith("several")


def test_int8_linear_compiles_fullgraph():
    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.nn.Linear(64, 48), threshold=6.0)
    x = torch.randn(2, 5, 64)
    x[..., 2] *= 30  # outlier column: the fp path is inside the op, not Python control flow
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    graph = explained.graphs[0]
    targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    assert any("hf_int8.int8_linear" in t for t in targets), targets  # one opaque op with a fake implementation
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)  # inductor, the default backend
    torch.testing.assert_close(compiled(x), layer(x))
    x2 = torch.randn(7, 64)  # another shape and no outlier: recompiles or reuses, never breaks
    torch.testing.assert_close(compiled(x2), layer(x2))


def test_compiled_model_forward_has_no_graph_break(saved_int8):
    model = AutoModelForCausalLM.from_pretrained(saved_int8, dtype=torch.float32).eval()
    assert model.hf_quantizer.is_compileable
    ids = torch.arange(4, 30).unsqueeze(0)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=ids)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")  # traces through the fake impls and the autograd formula
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits)
    torch._dynamo.reset()
