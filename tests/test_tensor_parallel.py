"""llmint8 under transformers' tensor parallelism: two processes on gloo (CPU), one ``torchrun`` launch.

The launch (this file run as a script, see ``_worker``) loads a tiny llama on 2 ranks with ``tp_plan="auto"``
(quantize on load), runs a forward and a greedy ``generate``, saves with ``save_pretrained`` from both ranks, then
loads a checkpoint saved by one process with ``tp_plan="auto"``. The test compares all of it with one process:

* every rank holds exactly its slice of the single-process int8 codes and scales (rows for colwise layers, columns
  and all scales for rowwise ones), i.e. about half of the int8 bytes of the sharded layers;
* the checkpoint saved from the two ranks holds the same tensors, bit for bit, as the single-process checkpoint;
* logits: rowwise shards quantize their activations over their own slice of the input, so logits differ from one
  process; the difference must be no larger than the quantization error itself (llmint8 vs fp32, same input);
* the generated token ids equal the single-process ones.

The model has an odd intermediate size (uneven shards: 49 + 48) and biases on every projection (the rowwise bias
must be added once, after the sum). Skipped only when torch.distributed or its gloo backend is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
PROMPT_IDS = [[2, 10, 11, 12, 13, 14, 15, 16, 17], [2, 20, 21, 22, 23, 24, 25, 26, 27]]
NEW_TOKENS = 8
WORLD = 2
LAUNCH_TIMEOUT_S = 150  # the launch takes ~25 s on 2 cores; this only bounds a hang


def _distributed_ok() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


pytestmark = pytest.mark.skipif(not _distributed_ok(), reason="torch.distributed with the gloo backend is unavailable")


def _tiny_config():
    sys.path.insert(0, str(HERE))
    from tiny_models import llama_config, tiny_tokenizer

    return llama_config(vocab_size=len(tiny_tokenizer()), intermediate_size=97, attention_bias=True, mlp_bias=True)


# ---- the worker: runs on every rank under torchrun ----------------------------------------------------------------
def _worker(fp_dir: str, sp_saved: str, out: str) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import hf_int8  # noqa: F401
    from hf_int8 import Int8Config, Int8Linear
    from hf_int8.integration import tp

    out_dir = Path(out)
    model = AutoModelForCausalLM.from_pretrained(
        fp_dir, quantization_config=Int8Config(), tp_plan="auto", dtype=torch.float32
    )
    rank = dist.get_rank()
    ids = torch.tensor(PROMPT_IDS)
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    shards = {
        name: {
            "codes": m.weight.detach().clone(),
            "scale": m.weight_scale.clone(),
            "shard": None if tp.shard_of(m) is None else (tp.shard_of(m).dim, tp.shard_of(m).offset),
        }
        for name, m in model.named_modules()
        if isinstance(m, Int8Linear)
    }
    model.save_pretrained(out_dir / "tp_saved")

    reloaded = AutoModelForCausalLM.from_pretrained(sp_saved, tp_plan="auto", dtype=torch.float32)
    with torch.no_grad():
        reloaded_logits = reloaded(ids).logits
    reloaded_shards = {
        name: (m.weight.detach().clone(), m.weight_scale.clone())
        for name, m in reloaded.named_modules()
        if isinstance(m, Int8Linear)
    }
    refusals = {}
    try:
        reloaded.dequantize()
    except ValueError as exc:
        refusals["dequantize"] = str(exc)
    # A custom plan naming transformers' own style for an int8 layer is refused by name; the llmint8_ one works.
    from transformers.distributed import DistributedConfig

    for style in ("rowwise", "llmint8_rowwise"):
        plan = DistributedConfig(tp_plan={"model.layers.*.mlp.down_proj": style})
        try:
            custom = AutoModelForCausalLM.from_pretrained(sp_saved, distributed_config=plan, dtype=torch.float32)
            with torch.no_grad():
                refusals[style] = torch.equal(custom(ids).logits, reloaded_logits)
        except ValueError as exc:
            refusals[style] = str(exc)
    torch.save(
        {
            "logits": logits,
            "generated": generated,
            "shards": shards,
            "int8_bytes": tp.int8_bytes(model),
            "reloaded_logits": reloaded_logits,
            "reloaded_shards": reloaded_shards,
            "refusals": refusals,
        },
        out_dir / f"rank{rank}.pt",
    )
    dist.barrier()
    dist.destroy_process_group()


# ---- the test -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    """Single-process references, then one 2-rank launch; returns both."""
    from safetensors.torch import load_file
    from tiny_models import save_fp_model
    from transformers import AutoModelForCausalLM

    import hf_int8  # noqa: F401
    from hf_int8 import Int8Config, Int8Linear

    root = tmp_path_factory.mktemp("tp")
    fp_dir = save_fp_model(root / "fp", config=_tiny_config(), outlier_scale=20.0)
    ids = torch.tensor(PROMPT_IDS)
    fp_model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32)
    single = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=Int8Config(), dtype=torch.float32)
    with torch.no_grad():
        ref = {
            "fp_logits": fp_model(ids).logits,
            "logits": single(ids).logits,
            "generated": single.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False),
            "layers": {n: m for n, m in single.named_modules() if isinstance(m, Int8Linear)},
        }
    single.save_pretrained(root / "sp_saved")

    out = root / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
        str(Path(__file__)), "--worker", str(fp_dir), str(root / "sp_saved"), str(out),
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, f"torchrun failed ({elapsed:.0f} s):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    saved = {
        "tp": load_file(root / "out" / "tp_saved" / "model.safetensors"),
        "sp": load_file(root / "sp_saved" / "model.safetensors"),
        "tp_config": json.loads((out / "tp_saved" / "config.json").read_text()),
        "sp_config": json.loads((root / "sp_saved" / "config.json").read_text()),
        "tp_dir": out / "tp_saved",
    }
    return ref, ranks, saved


def test_each_rank_holds_its_slice_of_the_single_process_int8_layers(tp_run):
    ref, ranks, _ = tp_run
    for rank_result in ranks:
        for name, got in rank_result["shards"].items():
            layer = ref["layers"][name]
            assert got["shard"] is not None, f"{name} was not sharded"
            dim, offset = got["shard"]
            size = got["codes"].shape[dim]
            want_codes = layer.weight.detach().narrow(dim, offset, size)
            want_scale = layer.weight_scale.narrow(0, offset, size) if dim == 0 else layer.weight_scale
            assert torch.equal(got["codes"], want_codes), name
            assert torch.equal(got["scale"], want_scale), name
    # colwise (rows) for q/k/v/gate/up, rowwise (columns) for o/down: what tp_plan="auto" says for llama
    dims = {name.rsplit(".", 1)[1]: got["shard"][0] for name, got in ranks[0]["shards"].items()}
    assert dims == {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 0, "up_proj": 0, "down_proj": 1}
    # the odd intermediate size splits 49 + 48 (gate/up rows, down columns)
    sizes = [r["shards"]["model.layers.0.mlp.down_proj"]["codes"].shape[1] for r in ranks]
    assert sizes == [49, 48]


def test_each_rank_holds_about_half_of_the_int8_bytes(tp_run):
    ref, ranks, _ = tp_run
    total = sum(m.weight.numel() for m in ref["layers"].values())
    per_rank = [r["int8_bytes"]["sharded_codes"] for r in ranks]
    assert sum(per_rank) == total
    for held in per_rank:
        assert abs(held - total / WORLD) <= 0.02 * total, (per_rank, total)
    assert all(r["int8_bytes"]["unsharded_codes"] == 0 for r in ranks)


def test_logits_differ_from_one_process_by_less_than_the_quantization_error(tp_run):
    ref, ranks, _ = tp_run
    logits = ranks[0]["logits"]
    assert torch.equal(logits, ranks[1]["logits"]), "the ranks disagree after the all-reduce"

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    tp_vs_single = rel(logits, ref["logits"])
    quant_error = rel(ref["logits"], ref["fp_logits"])
    assert quant_error > 0
    assert tp_vs_single <= quant_error, (tp_vs_single, quant_error)
    # and sharding changes the numbers at all only through the rowwise layers (not an identity by accident)
    assert tp_vs_single > 0


def test_generate_equals_single_process_greedy(tp_run):
    ref, ranks, _ = tp_run
    for rank_result in ranks:
        assert rank_result["generated"].tolist() == ref["generated"].tolist()


def test_save_from_tp_is_the_single_process_checkpoint(tp_run):
    _, _, saved = tp_run
    tp_sd, sp_sd = saved["tp"], saved["sp"]
    assert tp_sd.keys() == sp_sd.keys()
    for key in sp_sd:
        assert tp_sd[key].dtype == sp_sd[key].dtype and torch.equal(tp_sd[key], sp_sd[key]), key
    assert saved["tp_config"] == saved["sp_config"]
    # no scratch or staging folders left next to it, and it loads in one process bit for bit
    assert not [p.name for p in saved["tp_dir"].parent.iterdir() if p.name.startswith(".")]


def test_tp_saved_checkpoint_loads_in_one_process(tp_run):
    from transformers import AutoModelForCausalLM

    ref, _, saved = tp_run
    model = AutoModelForCausalLM.from_pretrained(saved["tp_dir"], dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor(PROMPT_IDS)).logits
    assert torch.equal(logits, ref["logits"])


def test_single_process_checkpoint_loads_sharded(tp_run):
    _, ranks, _ = tp_run
    for rank_result in ranks:
        # the same codes and scales as quantizing on load, so the same logits bit for bit
        for name, (codes, scale) in rank_result["reloaded_shards"].items():
            assert torch.equal(codes, rank_result["shards"][name]["codes"]), name
            assert torch.equal(scale, rank_result["shards"][name]["scale"]), name
        assert torch.equal(rank_result["reloaded_logits"], rank_result["logits"])


def test_refusals_and_custom_plans(tp_run):
    _, ranks, _ = tp_run
    for rank_result in ranks:
        refusals = rank_result["refusals"]
        assert "cannot dequantize a tensor-parallel llmint8 model" in refusals["dequantize"]
        assert (
            "model.layers.0.mlp.down_proj is an llmint8 layer sharded by a tensor-parallel style"
            in refusals["rowwise"]
        )
        assert refusals["llmint8_rowwise"] is True  # loads, and gives the logits of the default plan


def test_plan_rewrite_covers_int8_layers_only():
    """Without launching anything: which rules of llama's plan are pointed at hf_int8's styles."""
    from transformers import AutoModelForCausalLM

    import hf_int8  # noqa: F401
    from hf_int8.integration import tp
    from hf_int8.integration.quantizer import replace_with_int8_linear

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_tiny_config())
    replace_with_int8_linear(model, ["lm_head", "model.layers.1.mlp.down_proj"], 6.0)
    plan = dict(model.tp_plan)
    tp.rewrite_plan(model, plan)
    assert plan["model.layers.*.self_attn.q_proj"] == "llmint8_colwise"
    assert plan["model.layers.*.mlp.down_proj"] == "llmint8_rowwise"  # layer 0's is int8; layer 1's keeps rowwise
    assert plan["lm_head"] == "colwise_gather_output"  # a floating-point layer: transformers' own style
    assert plan["model.embed_tokens"] == "embedding_rowwise"


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "--worker":
        raise SystemExit(f"usage: torchrun ... {sys.argv[0]} --worker FP_DIR SP_SAVED OUT, got {sys.argv[1:]!r}")
    _worker(*sys.argv[2:])
