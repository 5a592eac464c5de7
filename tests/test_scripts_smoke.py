"""Smoke tests of the evaluation scripts (scripts/eval_quality.py, bench_e2e.py, plots.py) on tiny random models.

The real runs take minutes to hours (``make eval`` / ``make bench``); these check, in seconds, that each script runs
end to end and writes its JSON, markdown and PNG charts with the expected fields and columns, that a method that
cannot load is reported as an error row instead of stopping the run, and that the naive int8 baseline computes what
it claims. Jobs run in-process (``--in-process``) except one, which goes through the real worker subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"  # on sys.path: tests/conftest.py puts it there

import _common as C  # noqa: E402
import bench_e2e  # noqa: E402
import eval_quality  # noqa: E402

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
NEEDS_MATPLOTLIB = "matplotlib is not installed (make eval / make bench install it); charts not checked"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WORDS = "the cat sat on a mat while dogs ran far away from home . it was late and cold ! who knew ?".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny random llama (causal) and bert (encoder) sharing a character-level tokenizer, and a small text."""
    from tiny_models import tiny_bert_config, tiny_llama_config
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModel, AutoModelForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    vocab = ["[PAD]", "[UNK]", " "] + [chr(c) for c in range(33, 127)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[PAD]"
    )
    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_config(tiny_llama_config(len(vocab), max_position_embeddings=512))
    with torch.no_grad():  # one large input feature, so the outlier path and its statistics get exercised
        llama.model.layers[0].input_layernorm.weight[5] = 40.0
    llama.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    bert = AutoModel.from_config(tiny_bert_config(len(vocab), max_position_embeddings=512))
    bert.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(40)]
    (root / "text.txt").write_text("\n".join(lines), encoding="utf-8")
    (root / "empty_model").mkdir()
    return {"llama": root / "llama", "bert": root / "bert", "text": root / "text.txt", "broken": root / "empty_model"}


def _check_pngs(paths: list[str], names: list[str]) -> None:
    assert sorted(Path(p).name for p in paths) == sorted(names)
    for p in paths:
        data = Path(p).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, p


def _table_header(markdown: str, first_column: str) -> list[str]:
    for line in markdown.splitlines():
        if line.startswith(f"| {first_column} |"):
            return [cell.strip() for cell in line.strip("|").split("|")]
    raise AssertionError(f"no table starting with {first_column!r} in:\n{markdown}")


@pytest.fixture
def restore_threads():
    """The scripts run with ``--threads 1`` in this process (the in-process worker sets torch's thread count for the
    whole process); the count is put back after the test so that the tests after it run at full speed."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_eval_quality_writes_json_markdown_and_charts(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    argv = [
        "--models",
        f"tl={tiny['llama']},tb={tiny['bert']}:encoder,broken={tiny['broken']}",
        "--methods",
        "fp32,bf16,llmint8-t6,llmint8-t0,naive-int8",
        "--text",
        str(tiny["text"]),
        "--max-tokens",
        "300",
        "--window",
        "100",
        "--sentences",
        "6",
        "--out-dir",
        str(out),
        "--in-process",
    ]
    if not HAS_MATPLOTLIB:
        argv.append("--no-plots")
    assert eval_quality.main(argv) == 0
    data = json.loads((out / "quality.json").read_text())
    assert data["meta"]["kernels"]["implementations"]["int8_linear[cpu]"]
    assert data["settings"]["max_tokens"] == {"tl": 300, "tb": 300, "broken": 300}
    rows = {(r["model"], r["method"]): r for r in data["results"]}
    assert len(rows) == 15

    fp32 = rows[("tl", "fp32")]
    assert fp32["status"] == "ok" and fp32["num_tokens"] == 300 and fp32["num_windows"] == 3
    assert fp32["ppl_delta_pct"] == 0.0 and fp32["storage_vs_fp32"] == 1.0
    assert fp32["window_num_predicted"] == [99, 99, 99]
    assert sum(fp32["window_nll_sums"]) == pytest.approx(fp32["nll_sum"], rel=1e-12)
    for method in ("bf16", "llmint8-t6@fp32", "llmint8-t0@fp32", "naive-int8@fp32"):
        row = rows[("tl", method)]
        assert row["status"] == "ok", row
        assert row["perplexity"] > 1 and row["storage_bytes"] < fp32["storage_bytes"]
        assert row["ppl_delta_pct"] == pytest.approx(100 * (row["perplexity"] / fp32["perplexity"] - 1))
    outliers = rows[("tl", "llmint8-t6@fp32")]["outliers"]
    assert outliers["int8_layers"] == 14 and outliers["layers_with_outliers"] >= 1  # the planted feature
    assert 0 < outliers["value_fraction"] < 1 and len(outliers["per_layer"]) == 14
    assert "outliers" not in rows[("tl", "llmint8-t0@fp32")]  # no outlier path at threshold 0

    for method in ("bf16", "llmint8-t6@fp32", "naive-int8@fp32"):
        row = rows[("tb", method)]
        assert row["status"] == "ok" and row["num_sentences"] == 6 and 0.9 < row["mean_cosine"] <= 1.0 + 1e-9
        assert row["min_cosine"] <= row["mean_cosine"]
    assert rows[("tb", "fp32")]["mean_cosine"] == pytest.approx(1.0)
    assert all("embeddings" not in r for r in data["results"])  # kept out of the committed JSON

    broken = rows[("broken", "llmint8-t6@fp32")]
    assert broken["status"] == "error" and broken["error"]  # reported, not fatal

    markdown = (out / "quality.md").read_text()
    assert markdown.strip() in capsys.readouterr().out  # the table is also printed
    header = _table_header(markdown, "method")
    assert header[:4] == ["method", "dtype", "perplexity", "vs fp32"] and header[-1] == "llmint8 kernel"
    impl = rows[("tl", "llmint8-t6@fp32")]["kernels"]["implementations"]["int8_linear[cpu]"]
    assert f"| {impl} |" in markdown  # each llmint8 row names the kernel its worker ran
    assert "| method | dtype | mean cosine | min cosine |" in markdown
    assert "error: " in markdown and "(trimmed with --max-tokens: 300" in markdown
    assert "| tl | llmint8-t6@fp32 | 14 |" in markdown
    assert "hf_int8 CPU kernels:" in markdown
    if HAS_MATPLOTLIB:
        _check_pngs(data["charts"], ["quality_vs_memory.png", "quality_outliers.png"])


def test_bench_e2e_writes_json_markdown_and_charts(tiny, tmp_path):
    out = tmp_path / "b"
    argv = [
        "--models",
        f"tl={tiny['llama']},tb={tiny['bert']}:encoder",
        "--methods",
        "fp32,bf16,llmint8-t6",
        "--text",
        str(tiny["text"]),
        "--prompt-tokens",
        "64",
        # Decode speed is t(n tokens) - t(1 token), medians of 3: on a loaded 2-core machine one run can stall for
        # ~40 ms, more than 16 of this model's tokens take (t(16) <= t(1) was seen); 64 tokens stay well above that.
        "--new-tokens",
        "64",
        "--repeats",
        "3",
        "--decode-repeats",
        "3",
        "--out-dir",
        str(out),
        "--in-process",
    ]
    if not HAS_MATPLOTLIB:
        argv.append("--no-plots")
    assert bench_e2e.main(argv) == 0
    data = json.loads((out / "bench.json").read_text())
    rows = {(r["model"], r["method"]): r for r in data["results"]}
    assert set(rows) == {(m, k) for m in ("tl", "tb") for k in ("fp32", "bf16", "llmint8-t6@bf16")}
    for (model, method), row in rows.items():
        assert row["status"] == "ok", row
        for key in (
            "load_s",
            "peak_rss_load_bytes",
            "peak_anon_load_bytes",
            "footprint_bytes",
            "storage_bytes",
            "prefill_tps",
        ):
            assert row[key] > 0, (model, method, key)
        assert row["peak_anon_load_bytes"] - row["anon_before_load_bytes"] == row["load_anon_increase_bytes"] >= 0
        # Prefill as generate runs it: a causal LM computes the last position's logits only.
        assert row["prefill_logits"] == ("last position" if model == "tl" else "all positions")
        if model == "tl":
            assert row["decode_b1_tps"] > 0 and row["decode_b8_tps"] > 0
            assert row["ratio_bf16"]["decode_b8_tps"] == pytest.approx(
                row["decode_b8_tps"] / rows[("tl", "bf16")]["decode_b8_tps"]
            )
        else:
            assert "decode_b1_tps" not in row  # an encoder does not decode
        assert row["ratio_fp32"]["footprint_bytes"] == pytest.approx(
            row["footprint_bytes"] / rows[(model, "fp32")]["footprint_bytes"]
        )
    assert rows[("tl", "fp32")]["ratio_fp32"]["prefill_tps"] == 1.0
    assert rows[("tl", "llmint8-t6@bf16")]["footprint_bytes"] < rows[("tl", "bf16")]["footprint_bytes"]
    assert data["fp16_checkpoint_bytes"]["tl"] == 2 * sum(p.numel() for p in _load_params(tiny["llama"]))
    targets = {c["target"]: c for c in data["checks"] if c["model"] == "tl"}
    assert {
        "decode b1 >= 2x bf16 (ratio)",
        "prefill >= 1.5x bf16 (ratio)",
        "peak RSS while loading < fp16 checkpoint (MB)",
    } <= set(targets)
    decode = targets["decode b8 >= 2x bf16 (ratio)"]
    assert decode["pass"] == (decode["value"] >= 2.0) and decode["value"] == pytest.approx(
        rows[("tl", "llmint8-t6@bf16")]["ratio_bf16"]["decode_b8_tps"]
    )

    markdown = (out / "bench.md").read_text()
    assert _table_header(markdown, "method") == [
        "method",
        "load s",
        "peak RSS load MB",
        "peak anon load MB",
        "footprint MB",
        "storage MB",
        "prefill tok/s",
        "decode b1 tok/s",
        "decode b8 tok/s",
        "llmint8 kernel",
    ]
    assert "## Targets" in markdown and "in-process run" in markdown
    if HAS_MATPLOTLIB:
        _check_pngs(data["charts"], ["bench_speed.png", "bench_memory.png"])
        import plots

        assert plots.main([str(out / "bench.json")]) == 0  # the charts redraw from the saved JSON


def _load_params(folder: Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    return list(load_file(str(folder / "model.safetensors")).values())


def test_worker_subprocess_round_trip(tiny):
    """One job through the real path: a fresh interpreter, a job file in, a result file out."""
    job = {
        "model_arg": f"tl={tiny['llama']}:causal",
        "method": "llmint8-t6@fp32",
        "text": str(tiny["text"]),
        "max_tokens": 64,
        "window": 32,
        "sentences": 2,
        "no_outlier_stats": True,
    }
    row = C.run_worker(SCRIPTS / "eval_quality.py", job, timeout=300)
    assert row["status"] == "ok", row
    assert row["num_tokens"] == 64 and row["perplexity"] > 1 and "in_process" not in row
    assert row["kernels"]["implementations"]["int8_linear[cpu]"]


def test_reference_kernel_control_runs_on_the_reference_kernels(tiny):
    """llmint8-t6-ref gets a worker with the extension switched off, and refuses to run anywhere else."""
    [method] = C.parse_methods("llmint8-t6-ref", "fp32")
    assert method.reference_kernels and method.threshold == 6.0 and method.worker_env == {C.NATIVE_OFF_VARIABLE: "1"}
    job = {
        "model_arg": f"tl={tiny['llama']}:causal",
        "method": method.key,
        "text": str(tiny["text"]),
        "max_tokens": 64,
        "window": 32,
        "sentences": 2,
        "no_outlier_stats": True,
        "env": method.worker_env,
    }
    row = C.run_worker(SCRIPTS / "eval_quality.py", job, timeout=300)
    assert row["status"] == "ok", row
    assert row["kernels"]["implementations"]["int8_linear[cpu]"] == "reference"
    in_process = C.run_worker(SCRIPTS / "eval_quality.py", job, timeout=300, in_process=eval_quality.worker)
    assert in_process["status"] == "error" and C.NATIVE_OFF_VARIABLE in in_process["error"]


def test_paired_window_difference():
    ours = {"window_nll_sums": [10.0, 12.0], "window_num_predicted": [5, 5]}
    other = {"window_nll_sums": [9.0, 12.0], "window_num_predicted": [5, 5]}
    # per-token differences 0.2 and 0.0: mean 0.1, sample variance 0.02, SE sqrt(0.02 / 2) = 0.1
    got = eval_quality.paired_window_difference(ours, other)
    assert got == pytest.approx({"delta_log_ppl": 0.1, "delta_se": 0.1, "windows_worse": 1, "num_windows": 2})
    assert eval_quality.paired_window_difference(ours, {**other, "window_num_predicted": [5, 4]}) == {}
    assert eval_quality.paired_window_difference({"perplexity": 3.0}, other) == {}


def test_bench_linear_breakdown_table(tmp_path, capsys):
    import bench_linear

    out = tmp_path / "bench.json"
    argv = [
        "--shapes",
        "83x100",
        "--tokens",
        "1,7",
        "--rounds",
        "1",
        "--repeats",
        "1",
        "--cold-mb",
        "1",
        "--breakdown",
        "--json",
        str(out),
    ]
    assert bench_linear.main(argv) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [(r["k"], r["n"], r["tokens"]) for r in rows] == [(83, 100, 1), (83, 100, 7)]
    for r in rows:
        stages = {
            name: ms
            for name, ms in r["ms"].items()
            if name.startswith(bench_linear.STAGE_PREFIX) and name != bench_linear.WEIGHT_READ
        }
        assert len(stages) == 3 and all(ms > 0 for ms in stages.values()), r["ms"]
        assert r["ms"]["hf_int8 native"] > 0 and r["ms"]["bf16 Linear"] > 0
        # few tokens: the plain read of the same weights is timed too, and the native time is compared with it
        assert r["ms"][bench_linear.WEIGHT_READ] > 0
        assert r["read_fraction"] == pytest.approx(r["ms"][bench_linear.WEIGHT_READ] / r["ms"]["hf_int8 native"])
    main_header = _table_header(printed, "layer (in x out)")
    assert "hf_int8 native ms" in main_header and not any("stage" in h for h in main_header)
    assert main_header[-2:] == ["% of BW bound", "% of weight read"]
    assert "| quantize x | GEMM int32 | dequant epilogue | outliers + rest |" in printed
    assert "| 83x100 | 7 |" in printed.split("Where the native time goes")[1]
    # the layer target: one PASS/FAIL row per timed row, its ratio bf16 time / native time
    targets = json.loads(out.read_text())["targets"]
    assert [(t["k"], t["n"], t["tokens"]) for t in targets] == [(83, 100, 1), (83, 100, 7)]
    for t, r in zip(targets, rows, strict=True):
        assert t["ratio"] == pytest.approx(r["ms"]["bf16 Linear"] / r["ms"]["hf_int8 native"])
        assert t["pass"] == (t["ratio"] >= 1.0)
        assert f"| 83x100 | {t['tokens']} | {t['ratio']:.2f} | {'PASS' if t['pass'] else 'FAIL'} |" in printed
    assert f"{sum(t['pass'] for t in targets)} of 2 rows pass" in printed


@pytest.mark.parametrize("isa", [None, "none"])
def test_bench_linear_bandwidth_probe_is_built_by_the_script(isa, monkeypatch):
    """The read-bandwidth probe is development code: bench_linear.py builds it from scripts/csrc, hf_int8._C lacks it.
    It reads the buffer's bytes (a checksum they change), with AVX2 loads or, when the kernels are capped, without."""
    import bench_linear

    from hf_int8._extension import cpu_module

    if isa is not None:
        monkeypatch.setenv("HF_INT8_CPU_ISA", isa)
    native = cpu_module()
    assert native is None or not hasattr(native, "stream_read")
    probe = bench_linear.stream_read_probe()
    assert probe is not None  # the machine that builds the kernels builds the probe
    assert probe.keywords == {"avx2": isa is None and (native is None or native.cpu_isa() != "none")}
    buf = torch.zeros(1 << 20, dtype=torch.uint8)  # two of the probe's 512 KiB work items
    assert probe(buf) == 0
    buf[0] = 1
    assert probe(buf) != 0
    with pytest.raises(ValueError, match="contiguous"):
        probe(torch.zeros(1 << 20)[::2])
    bandwidth, how = bench_linear.measure_bandwidth("cpu", 8 << 20, lambda: None, repeats=1)
    assert bandwidth > 0 and how in (bench_linear.PROBE_NAME, "torch.sum")


def test_bench_linear_methods_reading_the_same_weights_take_the_next_copy():
    """Methods timed one after the other on the same int8 weight copies must not read the copies the previous method
    just pulled into the cache: they share one cursor over the copies; methods with copies of their own do not."""
    import bench_linear

    seen = []
    calls = [lambda i=i: seen.append(i) for i in range(3)]
    shared = [0]
    a, b = bench_linear.Method("a", calls, cursor=shared), bench_linear.Method("b", calls, cursor=shared)
    a.call(), a.call(), b.call(), b.call()
    assert seen == [0, 1, 2, 0]
    bench_linear.Method("c", calls).call()
    assert seen[-1] == 0

    args = bench_linear.parse_args(["--shapes", "83x100", "--tokens", "1", "--cold-mb", "1"])
    methods, _ = bench_linear.build_methods(args, 83, 100, [1], 1 << 20, None)
    cursor = {m.name: m.cursor for m in methods}
    assert cursor["_int_mm"] is cursor["hf_int8 ref"] is cursor["hf_int8 native"] is cursor[bench_linear.WEIGHT_READ]
    assert cursor["fp32 Linear"] is not cursor["hf_int8 native"]
    assert cursor["bf16 Linear"] is not cursor["fp32 Linear"]


def test_bench_linear_outlier_fraction(tmp_path, capsys):
    """--outlier-fraction puts that share of the columns on the outlier path (Qwen2.5's down_proj case: most columns),
    and bad values are refused with the value named."""
    import bench_linear

    x = bench_linear.activations(5, 200, torch.float32, "cpu", 0.4)
    assert int((x.abs() >= 6.0).any(dim=0).sum()) > 40  # 80 columns scaled x20; most cross the threshold
    out = tmp_path / "bench.json"
    argv = [
        "--shapes",
        "300x40",
        "--tokens",
        "3",
        "--rounds",
        "1",
        "--repeats",
        "1",
        "--cold-mb",
        "1",
        "--outlier-fraction",
        "0.4",
        "--json",
        str(out),
    ]
    assert bench_linear.main(argv) == 0
    assert "40.0% outlier columns" in capsys.readouterr().out
    assert json.loads(out.read_text())["outlier_fraction"] == 0.4
    with pytest.raises(SystemExit):
        bench_linear.parse_args(["--outlier-fraction", "1.5"])
    assert "got 1.5" in capsys.readouterr().err


def test_ab_cpu_isa_times_two_levels_in_one_process(tmp_path, capsys, monkeypatch):
    """scripts/ab_cpu_isa.py: the machine's best level against the portable one, on the same tensors (bench_linear's
    activations, whose outlier share test_bench_linear_outlier_fraction checks); the cap is lifted afterwards; a
    level the CPU cannot run and a wrong number of levels are refused by name."""
    import ab_cpu_isa

    from hf_int8._extension import cpu_module

    module = cpu_module()
    if module is None:
        pytest.skip("the native CPU kernels are not built: the script compares their levels")
    monkeypatch.delenv("HF_INT8_CPU_ISA", raising=False)
    best = module.cpu_isa()
    out = tmp_path / "ab.json"
    argv = ["--levels", f"{best},none", "--shapes", "200x40", "--tokens", "9", "--fractions", "0.5"]
    assert ab_cpu_isa.main(argv + ["--rounds", "2", "--calls", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["shape"] == "200x40" and row["outlier_fraction"] == 0.5
    assert row[f"{best}_ms"] > 0 and row["none_ms"] > 0
    assert row["ratio"] == pytest.approx(row["none_ms"] / row[f"{best}_ms"])
    assert "HF_INT8_CPU_ISA" not in os.environ and module.cpu_isa() == best
    with pytest.raises(SystemExit):
        ab_cpu_isa.main(["--levels", "avx2,none,amx"])
    assert "exactly two levels" in capsys.readouterr().err
    if best != "amx":
        with pytest.raises(SystemExit, match="cannot run 'amx'"):
            ab_cpu_isa.main(["--levels", "amx,none", "--shapes", "64x8", "--tokens", "1", "--fractions", "0"])
        assert "HF_INT8_CPU_ISA" not in os.environ  # restored on the way out, error or not


def test_naive_int8_is_per_tensor_and_hurt_by_one_outlier():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    naive = C.NaiveInt8Linear(linear)
    assert naive.weight.dtype == torch.int8 and naive.weight_scale.shape == ()
    assert naive.weight.abs().max() == C.INT8_MAX
    x = torch.randn(5, 64)
    with torch.no_grad():
        ref = linear(x)
        assert (naive(x) - ref).abs().max() < 0.05 * ref.abs().max()
        x_out = x.clone()
        x_out[0, 3] = 300.0  # one outlier sets the activation scale of every token
        err_clean_rows = (naive(x_out)[1:] - linear(x_out)[1:]).abs().max()
    assert err_clean_rows > 5 * (naive(x)[1:] - ref[1:]).abs().max()
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    assert C.swap_naive_int8(model) == 2 and isinstance(model[2], C.NaiveInt8Linear)


def test_method_and_model_parsing_reject_bad_values(tmp_path):
    specs = C.parse_methods("fp32,llmint8-t6@bf16,bnb-t0", "fp32")
    assert [(s.key, s.dtype, s.threshold) for s in specs] == [
        ("fp32", "fp32", None),
        ("llmint8-t6@bf16", "bf16", 6.0),
        ("bnb-t0@fp32", "fp32", 0.0),
    ]
    with pytest.raises(ValueError, match="'int4'"):
        C.parse_methods("int4", "fp32")
    with pytest.raises(ValueError, match="'fp8'"):
        C.parse_methods("llmint8-t6@fp8", "fp32")
    with pytest.raises(ValueError, match="'nope'"):
        C.parse_models("nope")
    with pytest.raises(ValueError, match="missing"):
        C.parse_models(f"x={tmp_path / 'missing'}")


def test_eval_quality_resume_reuses_rows_of_the_same_text_slice(tiny, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    common = [
        "--models",
        f"tl={tiny['llama']}",
        "--methods",
        "fp32,naive-int8",
        "--text",
        str(tiny["text"]),
        "--window",
        "50",
        "--in-process",
        "--no-plots",
        "--no-outlier-stats",
    ]
    assert eval_quality.main([*common, "--max-tokens", "100", "--out-dir", str(first)]) == 0
    before = {r["method"]: r for r in json.loads((first / "quality.json").read_text())["results"]}
    assert (
        eval_quality.main(
            [*common, "--max-tokens", "100", "--out-dir", str(second), "--resume-from", str(first / "quality.json")]
        )
        == 0
    )
    after = {r["method"]: r for r in json.loads((second / "quality.json").read_text())["results"]}
    assert after["naive-int8@fp32"]["perplexity"] == before["naive-int8@fp32"]["perplexity"]
    assert after["naive-int8@fp32"]["measured_in"]["command"].startswith("python scripts/eval_quality.py")
    assert "\\* measured in an earlier run" in (second / "quality.md").read_text()
    # another text slice is measured again, not reused
    assert (
        eval_quality.main(
            [*common, "--max-tokens", "60", "--out-dir", str(second), "--resume-from", str(first / "quality.json")]
        )
        == 0
    )
    again = json.loads((second / "quality.json").read_text())["results"]
    assert all("measured_in" not in r and r["num_tokens"] == 60 for r in again)


def test_eval_quality_resumes_encoder_rows_only_as_a_whole(tiny, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    common = [
        "--models",
        f"tb={tiny['bert']}:encoder",
        "--text",
        str(tiny["text"]),
        "--sentences",
        "3",
        "--in-process",
        "--no-plots",
    ]
    assert eval_quality.main([*common, "--methods", "fp32,naive-int8", "--out-dir", str(first)]) == 0
    resume = ["--resume-from", str(first / "quality.json")]
    assert eval_quality.main([*common, "--methods", "naive-int8", "--out-dir", str(second), *resume]) == 0
    rows = json.loads((second / "quality.json").read_text())["results"]
    assert len(rows) == 2 and all("measured_in" in r for r in rows)
    assert eval_quality.main([*common, "--methods", "naive-int8,llmint8-t6", "--out-dir", str(second), *resume]) == 0
    rows = json.loads((second / "quality.json").read_text())["results"]
    assert len(rows) == 3 and not any("measured_in" in r for r in rows)  # a new row needs this run's fp32


def test_eval_quality_only_resumed_measures_nothing_new(tiny, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    common = [
        "--models",
        f"tl={tiny['llama']}",
        "--text",
        str(tiny["text"]),
        "--window",
        "50",
        "--max-tokens",
        "60",
        "--in-process",
        "--no-plots",
        "--no-outlier-stats",
    ]
    assert eval_quality.main([*common, "--methods", "fp32", "--out-dir", str(first)]) == 0
    assert (
        eval_quality.main(
            [
                *common,
                "--methods",
                "fp32,naive-int8",
                "--out-dir",
                str(second),
                "--only-resumed",
                "--resume-from",
                str(first / "quality.json"),
            ]
        )
        == 0
    )
    rows = {r["method"]: r for r in json.loads((second / "quality.json").read_text())["results"]}
    assert rows["fp32"]["status"] == "ok" and "measured_in" in rows["fp32"]
    assert rows["naive-int8@fp32"]["status"] == "not run" and "perplexity" not in rows["naive-int8@fp32"]
    assert "| naive-int8@fp32 | fp32 | not run |" in (second / "quality.md").read_text()


def test_decode_outliers_counts_prefill_and_decoded_tokens(tiny, tmp_path, capsys):
    """scripts/decode_outliers.py: one prefill call and one call per decoded token for every llmint8 layer, with the
    outlier columns the layer saw; the tiny llama's large input feature makes layer 0's q/k/v see some."""
    import decode_outliers

    out = tmp_path / "outliers.json"
    argv = [
        "--models",
        f"tiny={tiny['llama']}:causal",
        "--text",
        str(tiny["text"]),
        "--prompt-tokens",
        "40",
        "--new-tokens",
        "4",
        "--json",
        str(out),
    ]
    assert decode_outliers.main(argv) == 0
    printed = capsys.readouterr().out
    rows = {r["projection"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for r in rows.values():
        assert r["layers_x_calls_prefill"] == 2  # 2 layers, one prefill forward
        assert r["decode_calls"] == 2 * 3  # 2 layers x 3 decoded tokens after the one the prefill produced
        assert 0 <= r["decode_median"] <= r["decode_max"] <= r["in_features"]
    assert rows["q_proj"]["prefill_mean"] >= 0.5  # layer 0 sees the scaled feature in its prompt
    assert _table_header(printed, "projection")[:2] == ["projection", "K"]
    with pytest.raises(SystemExit):
        decode_outliers.parse_args(["--new-tokens", "0"])
    assert "got 0" in capsys.readouterr().err


def test_bench_e2e_attn_implementation_reaches_every_transformers_model(tiny, tmp_path):
    base = ["--models", f"tl={tiny['llama']}", "--methods", "bf16,llmint8-t6", "--text", str(tiny["text"])]
    base += ["--no-speed", "--no-plots", "--in-process"]
    for choice, expected in ((None, "sdpa"), ("eager", "eager")):
        out = tmp_path / str(choice)
        argv = base + ["--out-dir", str(out)] + (["--attn-implementation", choice] if choice else [])
        assert bench_e2e.main(argv) == 0
        data = json.loads((out / "bench.json").read_text())
        assert data["settings"]["attn_implementation"] == choice
        assert [r["attn_implementation"] for r in data["results"]] == [expected, expected]
        assert (f"attention `{choice}`" in (out / "bench.md").read_text()) == (choice is not None)
    with pytest.raises(SystemExit):
        bench_e2e.main(base + ["--attn-implementation", "flash"])


FAKE_LLAMA_BENCH = """#!{python}
# A stand-in for llama.cpp's llama-bench: checks the arguments bench_e2e passes and prints -o json entries.
import json, sys
args = sys.argv[1:]
opt = dict(zip(args[::2], args[1::2]))
assert opt["-o"] == "json" and opt["-t"] == "{threads}", args
print(json.dumps([
    {{"n_prompt": int(opt["-p"]), "n_gen": 0, "avg_ts": 1000.0, "stddev_ts": 5.0}},
    {{"n_prompt": 0, "n_gen": int(opt["-n"]), "avg_ts": {decode}, "stddev_ts": 0.5}},
]))
"""


def test_bench_e2e_llamacpp_rows_and_issue14_targets(tiny, tmp_path, monkeypatch, restore_threads):
    """A llama.cpp row from a (fake) llama-bench in build_llamacpp's cache; its figures feed the issue-14 targets."""
    cache = tmp_path / "llamacpp"
    (cache / "bin").mkdir(parents=True)
    (cache / "models").mkdir()
    (cache / "models" / "smollm2-q8_0.gguf").write_bytes(b"GGUF" + bytes(100))
    fake = cache / "bin" / "llama-bench"
    fake.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable, threads=1, decode=3.25))
    fake.chmod(0o755)
    (cache / "bin" / "llama-quantize").write_text("#!/bin/sh\nexit 1\n")
    (cache / "bin" / "llama-quantize").chmod(0o755)
    monkeypatch.setenv("HF_INT8_LLAMACPP_CACHE", str(cache))
    out = tmp_path / "b"
    # The tiny llama under the name "smollm2": the name picks the GGUF in the cache.
    argv = [
        "--models",
        f"smollm2={tiny['llama']}",
        "--methods",
        "bf16,llmint8-t6,llmint8-t6-int8head",
        "--text",
        str(tiny["text"]),
        "--prompt-tokens",
        "64",
        "--new-tokens",
        "64",  # see test_bench_e2e_writes_json_markdown_and_charts
        "--repeats",
        "3",
        "--decode-repeats",
        "3",
        "--threads",
        "1",
        "--out-dir",
        str(out),
        "--in-process",
        "--no-plots",
    ]
    # One thread keeps the tiny decode timings measurable on a machine whose cores are busy (restore_threads puts the
    # count back afterwards).
    assert bench_e2e.main(argv) == 0
    data = json.loads((out / "bench.json").read_text())
    rows = {r["method"]: r for r in data["results"]}
    assert list(rows) == ["llamacpp-q8_0", "bf16", "llmint8-t6@bf16", "llmint8-t6-int8head@bf16"]
    llama = rows["llamacpp-q8_0"]
    assert llama["status"] == "ok", llama
    assert (llama["prefill_tps"], llama["decode_b1_tps"], llama["threads"]) == (1000.0, 3.25, 1)
    assert llama["storage_bytes"] == 104 and "decode_b8_tps" not in llama
    targets = {c["target"]: c for c in data["checks"]}
    peer = targets["speed target: decode b1 >= 1.0x llama.cpp Q8_0 (ratio)"]
    assert peer["value"] == pytest.approx(rows["llmint8-t6@bf16"]["decode_b1_tps"] / 3.25)
    assert peer["pass"] == (peer["value"] >= 1.0)
    for batch, bound in ((1, 2.5), (8, 1.8)):
        check = targets[f"speed target: decode b{batch} >= {bound}x bf16 (ratio)"]
        assert check["bound"] == bound and check["pass"] == (check["value"] >= bound)
    head = targets["speed target: decode b1 >= 1.0x llama.cpp Q8_0 (ratio), int8 lm_head"]
    assert head["value"] == pytest.approx(rows["llmint8-t6-int8head@bf16"]["decode_b1_tps"] / 3.25)
    assert "| llamacpp-q8_0 |" in (out / "bench.md").read_text()

    # --llamacpp off leaves it out; --llamacpp on without a build reports why in the row.
    assert bench_e2e.main(argv + ["--llamacpp", "off", "--prefix", "off"]) == 0
    assert "llamacpp-q8_0" not in {r["method"] for r in json.loads((out / "off.json").read_text())["results"]}
    monkeypatch.setenv("HF_INT8_LLAMACPP_CACHE", str(tmp_path / "empty"))
    assert bench_e2e.main(argv + ["--llamacpp", "on", "--prefix", "on", "--methods", "bf16"]) == 0
    row = json.loads((out / "on.json").read_text())["results"][0]
    assert row["method"] == "llamacpp-q8_0" and row["status"] == "error" and "build_llamacpp.py" in row["error"]


def test_parse_llama_bench_needs_both_figures():
    entries = [
        {"n_prompt": 512, "n_gen": 0, "avg_ts": 40.5, "stddev_ts": 1.0},
        {"n_prompt": 0, "n_gen": 128, "avg_ts": 17.25, "stddev_ts": 0.1},
    ]
    assert bench_e2e.parse_llama_bench(entries, 512, 128) == {
        "prefill_tps": 40.5,
        "prefill_tps_stddev": 1.0,
        "decode_b1_tps": 17.25,
        "decode_b1_tps_stddev": 0.1,
    }
    with pytest.raises(RuntimeError, match="decode_b1_tps"):
        bench_e2e.parse_llama_bench(entries[:1], 512, 128)
    with pytest.raises(RuntimeError, match="prefill_tps"):
        bench_e2e.parse_llama_bench(entries, 256, 128)


def test_int8_head_method_asks_for_an_int8_lm_head():
    head, plain, bnb = C.parse_methods("llmint8-t6-int8head,llmint8-t6,bnb-t6", "bf16")
    assert (head.key, head.threshold, head.quantize_lm_head) == ("llmint8-t6-int8head@bf16", 6.0, True)
    assert not plain.quantize_lm_head and not bnb.quantize_lm_head
    assert C._quantization_config(head).quantize_lm_head is True
    assert C._quantization_config(plain).quantize_lm_head is False
    assert not head.compiled_decode and not plain.compiled_decode


def test_compiled_method_is_the_int8_head_decoding_under_torch_compile():
    (compiled,) = C.parse_methods("llmint8-t6-int8head-compiled", "bf16")
    assert (compiled.key, compiled.threshold) == ("llmint8-t6-int8head-compiled@bf16", 6.0)
    assert compiled.quantize_lm_head and compiled.compiled_decode
    assert C._quantization_config(compiled).quantize_lm_head is True


def test_bench_static_compile_eager_and_static_cache(tiny, tmp_path, capsys, restore_threads):
    """The static-cache path runs and is compared with eager (the compile mode is measured by hand, not here)."""
    import bench_static_compile

    out = tmp_path / "sc.json"
    argv = [
        "--model",
        f"tl={tiny['llama']}",
        "--modes",
        "eager,static",
        "--new-tokens",
        "6",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--text",
        str(tiny["text"]),
        "--out",
        str(out),
    ]
    assert bench_static_compile.main(argv) == 0
    data = json.loads(out.read_text())
    assert list(data["modes"]) == ["eager", "static"]
    for row in data["modes"].values():
        assert isinstance(row["same_tokens_as_eager"], bool) and row["compile_s"] is None
    assert data["modes"]["eager"]["same_tokens_as_eager"] is True
    assert "| static |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="'static'"):
        bench_static_compile.main(["--model", f"tl={tiny['llama']}", "--modes", "static"])


def test_profile_decode_splits_a_step_into_parts(tiny, tmp_path, capsys, restore_threads):
    """One decode step of a tiny llmint8 model, split by part, against the weight-read bound of the same run."""
    import profile_decode

    out = tmp_path / "profile.json"
    argv = [
        "--model",
        f"tl={tiny['llama']}",
        "--prompt-tokens",
        "8",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--probe-mib",
        "16",
        "--text",
        str(tiny["text"]),
        "--out",
        str(out),
    ]
    assert profile_decode.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["steps"] == 2 and data["step_s"] > 0 and data["tokens_per_s"] > 0
    parts = data["breakdown_s"]
    assert all(v >= 0 for v in parts.values()) and sum(parts.values()) > 0
    assert data["weight_bytes"]["linear layers"] > 0 and data["weight_read_bound_s"] > 0
    assert "Bound:" in capsys.readouterr().out
    assert data["batch"] == 1

    batched = tmp_path / "profile_b2.json"
    assert profile_decode.main([*argv[:-1], str(batched), "--batch", "2"]) == 0
    data = json.loads(batched.read_text())
    assert data["batch"] == 2 and data["tokens_per_s"] == pytest.approx(2 / data["step_s"])
    assert "Batch 2," in capsys.readouterr().out
    with pytest.raises(ValueError, match="--batch"):
        profile_decode.main([*argv, "--batch", "0"])

    prefill = tmp_path / "profile_prefill.json"
    assert profile_decode.main([*argv[:-1], str(prefill), "--prefill"]) == 0
    data = json.loads(prefill.read_text())
    assert data["mode"] == "prefill" and data["tokens_per_s"] == pytest.approx(8 / data["step_s"])
    parts, projections = data["breakdown_s"], data["linear_by_projection_s"]
    assert parts["linear layers"] > 0 and sum(projections.values()) == pytest.approx(parts["linear layers"])
    assert {"q_proj", "down_proj"} <= set(projections) and data["weight_read_bound_s"] is None
    printed = capsys.readouterr().out
    assert "One prefill forward" in printed and "by projection" in printed and "Bound:" not in printed


def test_roofline_cuda_prints_old_and_new_estimates(capsys):
    import roofline_cuda as roofline

    assert roofline.main(["--gpu", "a100-80gb", "--outlier-fraction", "0.065"]) == 0
    rows = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("| Qwen") or line.startswith("| 7B")
    ]
    assert len(rows) == len(roofline.SHAPES) * len(roofline.TOKENS)
    # The fp16 tensor-core outlier product costs less than the CUDA-core one it replaced, on every row.
    gpu = roofline.GPUS["a100-80gb"]
    for n, k in roofline.SHAPES.values():
        old = roofline.estimate_us(gpu, 512, n, k, 100, new_design=False)
        new = roofline.estimate_us(gpu, 512, n, k, 100, new_design=True)
        assert new["outlier_math"] < old["outlier_math"] and new["total"] <= old["total"], (n, k)
    with pytest.raises(SystemExit):
        roofline.main(["--outlier-fraction", "1.5"])


def test_bench_float_linear_layers_and_decode(tiny, tmp_path, capsys, restore_threads):
    import bench_float_linear

    import hf_int8

    if not hf_int8.ops.float_linear_is_native():
        pytest.skip(
            f"native CPU kernels not built ({hf_int8.extension_status()}): the script refuses to time the "
            "fp32 reference"
        )

    out = tmp_path / "layers.json"
    argv = ["--shapes", "83x100", "--tokens", "1,17", "--rounds", "1", "--repeats", "1", "--threads", "1"]
    assert bench_float_linear.main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["k"], r["n"], r["tokens"]) for r in rows] == [(83, 100, 1), (83, 100, 17)]
    assert all(r["ms"][bench_float_linear.BF16] > 0 and r["ms"][bench_float_linear.OURS] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert _table_header(printed, "layer (in x out)")[4] == "x bf16 Linear"
    ratio = rows[0]["ms"][bench_float_linear.BF16] / rows[0]["ms"][bench_float_linear.OURS]
    assert "| 83x100 | 1 | " in printed and f"| {ratio:.2f}x |" in printed

    out = tmp_path / "decode.json"
    argv = ["--decode", f"tiny={tiny['llama']}", "--batches", "1,3", "--steps", "6", "--threads", "1"]
    assert bench_float_linear.main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert all(
            r[k] > 0 for k in ("step_ms_torch", "step_ms_float_linear", "head_ms_torch", "head_ms_float_linear")
        )
    assert "step speed-up" in _table_header(capsys.readouterr().out, "model")
