"""End to end on a CUDA device: the real SmolLM2-135M quantized on load to llmint8, run on the hf_int8 CUDA kernels.

* quantizing on the GPU gives the very int8 weights and scales quantizing on the CPU gives (bit for bit);
* the CUDA int8 model reproduces the int8 model computed on the CPU: its log-probabilities on real text differ from
  the CPU's by at most a tenth of what int8 quantization itself changes (against fp32);
* in fp16, greedy generation runs prefill on the tensor-core GEMM and decoding on the dp4a decode kernel (seen in the
  profiler), is deterministic, and the perplexity on real text stays within 3% of the fp16 model's.

Skipped only when no CUDA device is present (``make test-gpu`` runs it, with tests/test_kernels.py's CUDA half).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

import hf_int8
from hf_int8 import Int8Config, Int8Linear
from hf_int8.metrics import perplexity_details

NO_CUDA = "no CUDA device present (torch.cuda.is_available() is False)"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]

THRESHOLD = 6.0
PPL_TOKENS = 4096
PPL_WINDOW = 512
MAX_PPL_INCREASE = 0.03  # fp16 llmint8 vs fp16, same GPU, same text
DEVICE_VS_QUANT_ERROR = 0.1  # CUDA-vs-CPU int8 difference must be under a tenth of the int8-vs-fp32 difference


def _load(path, dtype: torch.dtype, device: str, threshold: float | None) -> nn.Module:
    config = None if threshold is None else Int8Config(threshold=threshold)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=config, device_map=device)
    return model.eval()


def _int8_layers(model: nn.Module) -> dict[str, Int8Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}


@pytest.fixture(scope="module")
def text_ids(smollm2_tokenizer, lee_text) -> torch.Tensor:
    ids = smollm2_tokenizer(lee_text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return ids[2000:2256].unsqueeze(0)


@pytest.fixture(scope="module")
def cpu_int8(smollm2_path):
    return _load(smollm2_path, torch.float32, "cpu", THRESHOLD)


@pytest.fixture(scope="module")
def cuda_int8(smollm2_path):
    return _load(smollm2_path, torch.float32, "cuda", THRESHOLD)


def test_native_cuda_kernels_serve_every_op():
    assert hf_int8.extension_status()["hf_int8._C_cuda"] == "loaded", hf_int8.extension_status()
    impls = hf_int8.implementations()
    assert all(impls[f"{op}[cuda]"] == "native" for op in hf_int8.ops.CUDA_OP_NAMES), impls


def test_gpu_quantization_is_bit_identical_to_cpu(cpu_int8, cuda_int8):
    cpu_layers, cuda_layers = _int8_layers(cpu_int8), _int8_layers(cuda_int8)
    assert cpu_layers.keys() == cuda_layers.keys() and len(cuda_layers) > 0
    for name, layer in cuda_layers.items():
        assert layer.weight.device.type == "cuda" and layer.weight.dtype == torch.int8, name
        assert torch.equal(layer.weight.cpu(), cpu_layers[name].weight), f"{name}: int8 codes differ"
        assert torch.equal(layer.weight_scale.cpu(), cpu_layers[name].weight_scale), f"{name}: scales differ"


@torch.inference_mode()
def test_cuda_int8_model_reproduces_the_cpu_int8_model(smollm2_path, cpu_int8, cuda_int8, text_ids):
    fp32 = _load(smollm2_path, torch.float32, "cpu", None)
    lp_fp32 = torch.log_softmax(fp32(text_ids).logits.double(), -1)
    lp_cpu = torch.log_softmax(cpu_int8(text_ids).logits.double(), -1)
    lp_cuda = torch.log_softmax(cuda_int8(text_ids.cuda()).logits.double().cpu(), -1)
    quant_change = (lp_cpu - lp_fp32).abs().mean().item()
    device_change = (lp_cuda - lp_cpu).abs().mean().item()
    print(f"\nmean |dlogprob|: int8 vs fp32 {quant_change:.3e}; CUDA int8 vs CPU int8 {device_change:.3e}")
    assert quant_change > 0, "nothing was quantized"
    assert device_change < DEVICE_VS_QUANT_ERROR * quant_change
    top1 = (lp_cuda.argmax(-1) == lp_cpu.argmax(-1)).double().mean().item()
    assert top1 >= 0.98, f"top-1 agreement CUDA vs CPU int8: {top1:.3f}"


@pytest.fixture(scope="module")
def fp16_pair(smollm2_path):
    return _load(smollm2_path, torch.float16, "cuda", None), _load(smollm2_path, torch.float16, "cuda", THRESHOLD)


def _cuda_kernel_names(prof) -> set[str]:
    return {evt.key for evt in prof.key_averages() if "hf_int8" in evt.key}


@torch.inference_mode()
def test_fp16_generate_uses_tensor_cores_for_prefill_and_dp4a_for_decode(fp16_pair, smollm2_tokenizer):
    _, int8 = fp16_pair
    prompt = smollm2_tokenizer(["The history of the city of London"] * 2, return_tensors="pt").to("cuda")
    prompt = {k: v.repeat(1, 12) for k, v in prompt.items()}  # > 64 prefill tokens per row: the 128x128 tiles
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        first = int8.generate(
            **prompt, max_new_tokens=24, do_sample=False, pad_token_id=smollm2_tokenizer.eos_token_id
        )
        torch.cuda.synchronize()
    names = " ".join(_cuda_kernel_names(prof))
    for kernel in ("hf_int8_quantize_rows_kernel", "hf_int8_gemm_imma_kernel", "hf_int8_gemv_dp4a_kernel"):
        assert kernel in names, f"{kernel} did not run; hf_int8 CUDA kernels seen: {names}"
    assert first.shape == (2, prompt["input_ids"].shape[1] + 24)
    again = int8.generate(**prompt, max_new_tokens=24, do_sample=False, pad_token_id=smollm2_tokenizer.eos_token_id)
    assert torch.equal(first, again), "greedy generation on the CUDA kernels is not deterministic"
    text = smollm2_tokenizer.decode(first[0, prompt["input_ids"].shape[1] :])
    print(f"\nllmint8 fp16 on {torch.cuda.get_device_name()}: {text!r}")


def test_fp16_perplexity_within_3_percent_of_fp16(fp16_pair, smollm2_tokenizer, lee_text):
    fp16, int8 = fp16_pair
    base = perplexity_details(fp16, smollm2_tokenizer, lee_text, PPL_TOKENS, PPL_WINDOW).perplexity
    quant = perplexity_details(int8, smollm2_tokenizer, lee_text, PPL_TOKENS, PPL_WINDOW).perplexity
    print(f"\nperplexity on {torch.cuda.get_device_name()}: fp16 {base:.3f}, llmint8 t=6 fp16 {quant:.3f}")
    assert quant != base, "identical perplexity: nothing was quantized"
    assert quant / base - 1 <= MAX_PPL_INCREASE
