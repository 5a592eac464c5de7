"""One shared llmint8 model used from several threads gives the same results as using it one call at a time.

A server shares one model between request threads; a quantizer that kept per-call state on the module (outlier
columns, scratch buffers) would mix requests up. Also: two models loaded at the same time in two threads (one
quantized on load, one pre-quantized, in different dtypes) come out exactly as when loaded one after the other, and
concurrent saves never produce a folder that is neither of the saved models.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_int8  # noqa: F401  (registers llmint8)
from hf_int8 import Int8Config, Int8Linear
from hf_int8.checkpoint.staging import STAGING_MARK

THREADS = 4
ROUNDS = 2


def _config(seed_hidden: int = 64) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128,
        hidden_size=seed_hidden,
        intermediate_size=seed_hidden + 32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        max_position_embeddings=128,
    )


def _fp_checkpoint(root: Path, name: str, seed: int, hidden: int = 64) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(hidden), dtype=torch.float32)
    with torch.no_grad():  # a few large activations so that the outlier path runs
        model.model.embed_tokens.weight[:, :3] *= 40
    model.save_pretrained(root / name)
    return root / name


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("concurrency")
    fp_a = _fp_checkpoint(root, "fp_a", 0)
    fp_b = _fp_checkpoint(root, "fp_b", 1, hidden=96)
    int8_b = root / "int8_b"
    AutoModelForCausalLM.from_pretrained(fp_b, quantization_config=Int8Config(), dtype=torch.float32).save_pretrained(
        int8_b
    )
    return {"fp_a": fp_a, "fp_b": fp_b, "int8_b": int8_b}


@pytest.fixture(scope="module")
def shared_model(checkpoints):
    model = AutoModelForCausalLM.from_pretrained(
        checkpoints["fp_a"], quantization_config=Int8Config(threshold=6.0), dtype=torch.float32
    ).eval()
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    return model


def _prompts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    # Different lengths and batch sizes: each request has its own outlier columns and row scales.
    return [torch.randint(0, 128, (1 + i % 3, 5 + 3 * i), generator=g) for i in range(THREADS * 2)]


def _run_concurrently(fn, args: list) -> list:
    """Call ``fn`` on every argument from ``THREADS`` threads that start together, ``ROUNDS`` times over."""
    barrier = threading.Barrier(THREADS)

    def worker(index: int) -> list:
        barrier.wait()
        return [[fn(a) for a in args[index::THREADS]] for _ in range(ROUNDS)]

    with ThreadPoolExecutor(THREADS) as pool:
        per_thread = list(pool.map(worker, range(THREADS)))
    results: list = [None] * len(args)
    for index, rounds in enumerate(per_thread):
        for round_results in rounds:
            for offset, value in enumerate(round_results):
                position = index + offset * THREADS
                if results[position] is None:
                    results[position] = value
                else:
                    assert _equal(results[position], value), f"request {position} changed between rounds"
    return results


def _equal(a, b) -> bool:
    # Bitwise on purpose: both sides are the same model, the same inputs and shapes, the same ops and thread count
    # (torch gives every thread the intra-op thread count), so nothing but shared per-call state could change a bit.
    return torch.equal(a, b)


def test_forward_from_many_threads_equals_sequential(shared_model):
    prompts = _prompts()

    def forward(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return shared_model(ids).logits

    sequential = [forward(p) for p in prompts]
    concurrent = _run_concurrently(forward, prompts)
    for i, (s, c) in enumerate(zip(sequential, concurrent, strict=True)):
        assert torch.equal(s, c), f"prompt {i}: concurrent logits differ from sequential"


def test_generate_from_many_threads_equals_sequential(shared_model):
    prompts = _prompts()

    def generate(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return shared_model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0
            )

    sequential = [generate(p) for p in prompts]
    concurrent = _run_concurrently(generate, prompts)
    for i, (s, c) in enumerate(zip(sequential, concurrent, strict=True)):
        assert torch.equal(s, c), f"prompt {i}: concurrent generation differs from sequential"


def test_forward_and_generate_mixed_with_training_style_backward(shared_model):
    """Inference threads next to a thread that runs backward through the frozen int8 layers."""
    prompts = _prompts()
    with torch.no_grad():
        expected = [shared_model(p).logits for p in prompts]
    embeds = shared_model.get_input_embeddings()(prompts[0]).detach()
    errors: list[BaseException] = []
    stop = threading.Event()

    def backward_loop() -> None:
        try:
            while not stop.is_set():
                x = embeds.clone().requires_grad_(True)
                shared_model(inputs_embeds=x).logits.float().pow(2).mean().backward()
                assert x.grad is not None and torch.isfinite(x.grad).all()
        except BaseException as exc:  # reported below
            errors.append(exc)

    trainer = threading.Thread(target=backward_loop)
    trainer.start()
    try:

        def forward(ids):
            with torch.no_grad():
                return shared_model(ids).logits

        got = _run_concurrently(forward, prompts)
    finally:
        stop.set()
        trainer.join()
    assert not errors, errors
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)
    assert all(p.grad is None for p in shared_model.parameters() if p.dtype == torch.int8)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_two_models_load_at_once_in_two_threads(checkpoints):
    """One quantized while it loads, one pre-quantized, loaded together: each equals its sequential load.

    In torch's default dtype (fp32). transformers switches the process-wide default dtype while it builds a model in
    another dtype, so concurrent loads with dtype=bf16/fp16 race inside transformers itself: reproduced with two
    plain (unquantized) bf16 models, 6 of 20 concurrent loads got some fp32 parameters, and the process default
    dtype could stay bf16 afterwards. A documented limitation (README "Guarantees"), not something a quantizer can
    fix: load such models one at a time (e.g. under a lock).
    """
    dtype = torch.float32
    fp_a, int8_b = checkpoints["fp_a"], checkpoints["int8_b"]
    jobs = {
        "quantize-on-load": lambda: AutoModelForCausalLM.from_pretrained(
            fp_a, quantization_config=Int8Config(threshold=5.0), dtype=dtype
        ),
        "pre-quantized": lambda: AutoModelForCausalLM.from_pretrained(int8_b, dtype=dtype),
    }
    sequential = {name: _state(job()) for name, job in jobs.items()}
    default_dtype = torch.get_default_dtype()
    # transformers 5.23 also disables PreTrainedModel.tie_weights / init_weights while it builds a model by swapping
    # the class attributes and putting back what it found: with two loads interleaved, the second one can "restore"
    # the first one's no-op, which then stays in place for the whole process (every later load of a tied-embedding
    # model comes out untied). The models here are untied, so the loads above are unaffected; put the class
    # attributes back so this test does not break the rest of the process (README "Known limits").
    from transformers.modeling_utils import PreTrainedModel

    class_state = {name: PreTrainedModel.__dict__[name] for name in ("tie_weights", "init_weights")}
    try:
        for _ in range(3):
            barrier = threading.Barrier(len(jobs))

            def run(job, barrier=barrier):
                barrier.wait()
                return _state(job())

            with ThreadPoolExecutor(len(jobs)) as pool:
                concurrent = dict(zip(jobs, pool.map(run, jobs.values()), strict=True))
            for name in jobs:
                assert _same_state(concurrent[name], sequential[name]), f"{name} loaded differently in a thread"
    finally:
        torch.set_default_dtype(default_dtype)
        for name, original in class_state.items():
            setattr(PreTrainedModel, name, original)
    for state in sequential.values():
        assert {v.dtype for k, v in state.items() if k.endswith("norm.weight")} == {dtype}


def test_concurrent_saves_of_two_models_into_one_folder_leave_one_of_them(shared_model, checkpoints, tmp_path):
    other = AutoModelForCausalLM.from_pretrained(checkpoints["int8_b"], dtype=torch.float32)
    states = {"a": _state(shared_model), "b": _state(other)}
    for attempt in range(3):
        target = tmp_path / f"race{attempt}"
        barrier = threading.Barrier(2)

        def save(model, barrier=barrier, target=target):
            barrier.wait()
            model.save_pretrained(target)

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(save, [shared_model, other]))
        loaded = _state(AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32))
        assert _same_state(loaded, states["a"]) or _same_state(loaded, states["b"])
        assert not [p for p in tmp_path.iterdir() if STAGING_MARK in p.name]
