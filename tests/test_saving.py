"""Saving never loses or corrupts a checkpoint: existing folders, read-only folders, failures and kills mid-save.

Two different llmint8 models of the same architecture are used throughout: A (threshold 6.0) is what the target
folder holds before the save, B (threshold 4.0, other weights) is what is being saved. After any save, successful or
not, the folder must load as exactly A or exactly B (same tensors bit for bit, same threshold), or fail with a clear
error; and files that are not weights (tokenizer, README notes) must still be there.

The kill tests run the saves in a helper process that imports torch and transformers once and forks one child per
scenario; each child SIGKILLs itself at a chosen point of the save (inside a shard write, while sealing, before and
after the final swap, ...) or after a delay. The children inherit the loaded models from the helper, so each
scenario costs one save.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tiny_models import save_fp_model, sized_llama_config
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_int8  # noqa: F401  (registers llmint8)
from hf_int8 import Int8Config, Int8Linear
from hf_int8.checkpoint.staging import STAGING_MARK

TOKENIZER = '{"fake": "tokenizer file the user keeps next to the model"}'
USER_NOTES = "Notes written by the user, which a save must keep."


def _quantized(root: Path, seed: int, threshold: float, config: LlamaConfig):
    fp_dir = save_fp_model(root / f"fp{seed}", config, seed=seed, with_tokenizer=False)
    return AutoModelForCausalLM.from_pretrained(
        fp_dir, quantization_config=Int8Config(threshold=threshold), dtype=torch.float32
    )


def _signature(model) -> tuple[dict[str, torch.Tensor], set[float]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, {m.threshold for m in model.modules() if isinstance(m, Int8Linear)}


def _same(sig_a, sig_b) -> bool:
    (sa, ta), (sb, tb) = sig_a, sig_b
    return ta == tb and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _load_signature(folder: Path):
    return _signature(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    a = _quantized(root, 1, 6.0, sized_llama_config())
    b = _quantized(root, 2, 4.0, sized_llama_config())
    a.save_pretrained(root / "A")
    (root / "A" / "tokenizer.json").write_text(TOKENIZER)
    readme = root / "A" / "README.md"
    readme.write_text(readme.read_text() + f"\n{USER_NOTES}\n")
    b.save_pretrained(root / "B", max_shard_size="30KB")
    return {"a": a, "b": b, "A": root / "A", "B": root / "B", "sig_a": _signature(a), "sig_b": _signature(b)}


def _target_with_a(models, tmp_path: Path, name: str = "target") -> Path:
    target = tmp_path / name
    shutil.copytree(models["A"], target)
    return target


def _user_files_kept(folder: Path) -> None:
    assert (folder / "tokenizer.json").read_text() == TOKENIZER
    assert USER_NOTES in (folder / "README.md").read_text()


def _no_leftovers(parent: Path) -> None:
    left = [p.name for p in parent.iterdir() if STAGING_MARK in p.name]
    assert not left, f"staging folders left behind: {left}"


# ---------------------------------------------------------------------------------------------------------------
# Existing folders
# ---------------------------------------------------------------------------------------------------------------
def test_save_into_new_nested_folder(models, tmp_path):
    target = tmp_path / "a" / "b" / "model"
    models["b"].save_pretrained(target)
    assert _same(_load_signature(target), models["sig_b"])
    _no_leftovers(target.parent)


@pytest.mark.parametrize("shard", [None, "30KB"], ids=["single", "sharded"])
def test_save_into_existing_folder_keeps_user_files(models, tmp_path, shard):
    target = _target_with_a(models, tmp_path)
    (target / "extra").mkdir()
    (target / "extra" / "data.txt").write_text("kept")
    kwargs = {"max_shard_size": shard} if shard else {}
    models["b"].save_pretrained(target, **kwargs)
    assert _same(_load_signature(target), models["sig_b"])
    _user_files_kept(target)
    assert (target / "extra" / "data.txt").read_text() == "kept"
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("old_shard, new_shard", [(None, "30KB"), ("30KB", None), ("30KB", "60KB")])
def test_stale_differently_sharded_checkpoint_is_replaced(models, tmp_path, old_shard, new_shard):
    """A stale model.safetensors next to new shards would be preferred by the loader; stale shards would linger."""
    target = tmp_path / "target"
    models["a"].save_pretrained(target, **({"max_shard_size": old_shard} if old_shard else {}))
    models["b"].save_pretrained(target, **({"max_shard_size": new_shard} if new_shard else {}))
    files = sorted(p.name for p in target.glob("model*"))
    if new_shard is None:
        assert files == ["model.safetensors"]
    else:
        index = json.loads((target / "model.safetensors.index.json").read_text())
        assert sorted(set(index["weight_map"].values()) | {"model.safetensors.index.json"}) == files
    assert _same(_load_signature(target), models["sig_b"])


def test_stale_pickle_weights_are_removed(models, tmp_path):
    target = _target_with_a(models, tmp_path)
    torch.save({"junk": torch.zeros(1)}, target / "pytorch_model.bin")
    models["b"].save_pretrained(target)
    assert not (target / "pytorch_model.bin").exists()
    assert _same(_load_signature(target), models["sig_b"])


def test_save_over_itself_after_loading_from_it(models, tmp_path):
    """Loading from a folder and saving back into it (memory-mapped tensors and all) works."""
    target = _target_with_a(models, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    model.save_pretrained(target)
    assert _same(_load_signature(target), models["sig_a"])
    _user_files_kept(target)


def test_a_deep_copy_saves_and_moves_itself_not_the_original(models, tmp_path):
    """The instance-level save/to hooks must follow copy.deepcopy: saving an edited copy once wrote the original."""
    import copy

    clone = copy.deepcopy(models["b"])
    with torch.no_grad():
        clone.model.norm.weight.fill_(7.0)
    assert clone.to("cpu") is clone
    clone.save_pretrained(tmp_path / "clone")
    assert _same(_load_signature(tmp_path / "clone"), _signature(clone))
    assert not _same(_signature(clone), models["sig_b"])
    assert float(models["b"].model.norm.weight[0]) != 7.0


def test_failure_during_save_leaves_the_old_checkpoint(models, tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    target = _target_with_a(models, tmp_path)
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    calls = []

    def disk_full(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", filename)
        return original(tensors, filename, metadata=metadata)

    original = mu.safe_save_file
    monkeypatch.setattr(mu, "safe_save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        models["b"].save_pretrained(target, max_shard_size="30KB")
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before
    _no_leftovers(tmp_path)
    assert _same(_load_signature(target), models["sig_a"])


# ---------------------------------------------------------------------------------------------------------------
# Folders that cannot be written
# ---------------------------------------------------------------------------------------------------------------
@contextmanager
def _read_only(path: Path):
    """Make ``path`` unwritable in a way that also binds root: chattr +i (root) or chmod (other users)."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: no way to make a folder read-only for root here")
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"running as root and chattr +i is refused on this file system: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_read_only_folder_is_refused_and_untouched(models, tmp_path):
    target = _target_with_a(models, tmp_path)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with _read_only(target):
        with pytest.raises(PermissionError) as info:
            models["b"].save_pretrained(target)
    assert str(target) in str(info.value) and "not writable" in str(info.value)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    _no_leftovers(tmp_path)
    assert _same(_load_signature(target), models["sig_a"])


def test_read_only_parent_of_new_folder_is_refused(models, tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    with _read_only(parent):
        with pytest.raises(PermissionError) as info:
            models["b"].save_pretrained(parent / "model")
    assert "not writable" in str(info.value)
    assert list(parent.iterdir()) == []


def test_read_only_parent_of_existing_folder_saves_in_place(models, tmp_path):
    """The target is writable but its parent is not (a mount point, say): saved through the in-place fallback."""
    parent = tmp_path / "parent"
    parent.mkdir()
    target = _target_with_a(models, parent)
    with _read_only(parent):
        models["b"].save_pretrained(target, max_shard_size="30KB")
    assert _same(_load_signature(target), models["sig_b"])
    _user_files_kept(target)
    assert not [p for p in target.iterdir() if p.name.startswith(STAGING_MARK)]


def test_path_under_a_file_is_refused(models, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError) as info:
        models["b"].save_pretrained(blocker / "model")
    assert str(blocker) in str(info.value)
    assert blocker.read_text() == "not a folder"


def test_target_that_is_a_file_is_refused(models, tmp_path):
    """transformers alone only logs an error and returns, saving nothing: a silent failure."""
    target = tmp_path / "model"
    target.write_text("a file")
    with pytest.raises(NotADirectoryError) as info:
        models["b"].save_pretrained(target)
    assert str(target) in str(info.value)
    assert target.read_text() == "a file"


# ---------------------------------------------------------------------------------------------------------------
# Saves killed midway (SIGKILL, so no cleanup code runs)
# ---------------------------------------------------------------------------------------------------------------
HELPER = textwrap.dedent(
    r'''
    import json, os, signal, sys, threading, time

    import torch
    import transformers.modeling_utils as mu
    from transformers import AutoModelForCausalLM

    import hf_int8
    from hf_int8.checkpoint import integrity, staging


    def die():
        os.kill(os.getpid(), signal.SIGKILL)


    def arm(point):
        """Make the save SIGKILL this process at ``point``."""
        kind, _, arg = point.partition(":")
        if kind == "shard":  # inside the N-th shard write: the file is on disk, but only half of it
            original, calls = mu.safe_save_file, []

            def write(tensors, filename, metadata=None):
                calls.append(filename)
                original(tensors, filename, metadata=metadata)
                if len(calls) == int(arg):
                    with open(filename, "r+b") as f:
                        f.truncate(os.path.getsize(filename) // 2)
                    die()

            mu.safe_save_file = write
        elif kind == "seal":  # while rewriting the N-th file with its seal
            original, calls = integrity._write_with_metadata, []

            def write(header, metadata):
                calls.append(header.path)
                if len(calls) == int(arg):
                    with open(header.path + ".hf_int8-sealing", "wb") as f:
                        f.write(b"partial")
                    die()
                original(header, metadata)

            integrity._write_with_metadata = write
        elif kind in ("carry", "fsync"):  # entering the post-save carry-over / the fsync of the staging folder
            name = {"carry": "_carry_over", "fsync": "_fsync_tree"}[kind]
            original = getattr(staging, name)

            def hooked(*args, **kwargs):
                if kind == "fsync" or not kwargs.get("precopy", True):
                    die()
                return original(*args, **kwargs)

            setattr(staging, name, hooked)
        elif kind in ("swap", "swapped"):  # just before / just after the atomic exchange or rename
            exchange, rename = staging._exchange, os.rename

            def hooked_exchange(a, b):
                if kind == "swap":
                    die()
                if not exchange(a, b):
                    return False  # no atomic exchange here: the fallback renames below are hooked instead
                die()

            def hooked_rename(a, b):
                if staging.STAGING_MARK not in os.path.basename(a):
                    return rename(a, b)
                if kind == "swap":
                    die()
                rename(a, b)
                die()

            staging._exchange = hooked_exchange
            staging.os.rename = hooked_rename
        elif kind == "after":  # a plain timed kill, wherever the save happens to be
            threading.Thread(target=lambda: (time.sleep(float(arg)), die()), daemon=True).start()


    # Models are loaded here, once, and inherited by the forked children. One intra-op thread: a fork after a
    # multi-threaded OpenMP region is not safe. No progress bars either: tqdm's monitor thread holds tqdm's write
    # lock now and then, and a child forked at that moment deadlocks in its first progress bar (seen in CI).
    torch.set_num_threads(1)
    import tqdm
    import transformers

    tqdm.tqdm.monitor_interval = 0
    transformers.utils.logging.disable_progress_bar()
    loaded = {}


    def run(scenario):
        model = loaded[scenario["source"]]
        kwargs = {"max_shard_size": scenario["shard"]} if scenario.get("shard") else {}
        arm(scenario["kill"])
        if scenario.get("raw"):  # transformers' own save, for comparison
            type(model).save_pretrained(model, scenario["target"], **kwargs)
        else:
            model.save_pretrained(scenario["target"], **kwargs)


    scenarios = json.load(open(sys.argv[1]))
    for source in sorted({s["source"] for s in scenarios}):
        loaded[source] = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    results = []
    for scenario in scenarios:
        pid = os.fork()
        if pid == 0:
            try:
                run(scenario)
            except BaseException as exc:  # reported to the test, which fails on it
                print(f"scenario {scenario} raised {exc!r}", file=sys.stderr, flush=True)
                os._exit(3)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        results.append({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
                        "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None})
    json.dump(results, open(sys.argv[2], "w"))
    '''
)

KILL_POINTS = ["shard:1", "shard:3", "seal:1", "seal:2", "carry", "fsync", "swap", "swapped"]
NEW_FOLDER_KILL_POINTS = [p for p in KILL_POINTS if p != "carry"]  # nothing to carry over into a new folder
TIMED = [f"after:{d}" for d in (0.0, 0.01, 0.03, 0.06, 0.1, 0.2)]


@pytest.fixture(scope="module")
def killed_saves(models, tmp_path_factory):
    """Run every kill scenario once (one helper process), return ``{scenario id: (scenario, result)}``."""
    if not hasattr(os, "fork"):
        pytest.skip("the kill tests fork a helper process (POSIX only)")
    root = tmp_path_factory.mktemp("killed")
    big = root / "big"
    _quantized(root, 3, 4.0, sized_llama_config(hidden=256, layers=4)).save_pretrained(big)
    scenarios = {}
    for point in KILL_POINTS:
        scenarios[f"existing-{point}"] = {"source": str(models["B"]), "shard": "30KB", "kill": point}
    for point in NEW_FOLDER_KILL_POINTS:
        scenarios[f"new-{point}"] = {"source": str(models["B"]), "shard": "30KB", "kill": point, "new": True}
    for point in TIMED:
        scenarios[f"timed-{point}"] = {"source": str(big), "shard": "200KB", "kill": point}
    scenarios["raw-shard:2"] = {"source": str(models["B"]), "shard": "30KB", "kill": "shard:2", "raw": True}
    for name, scenario in scenarios.items():
        target = root / name.replace(":", "_") / "model"
        if scenario.get("new"):
            target.parent.mkdir()
        else:
            shutil.copytree(models["A"], target)
        scenario["target"] = str(target)
    (root / "helper.py").write_text(HELPER)
    (root / "scenarios.json").write_text(json.dumps(list(scenarios.values())))
    done = subprocess.run(
        [sys.executable, str(root / "helper.py"), str(root / "scenarios.json"), str(root / "results.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((root / "results.json").read_text())
    return {name: (s, r) for (name, s), r in zip(scenarios.items(), results, strict=True)}, big


def _outcome(folder: Path, allowed: dict) -> str:
    """``"A"``/``"B"``/... when the folder loads as one of ``allowed``, ``"refused"`` when it fails clearly."""
    if not folder.exists():
        return "absent"
    try:
        signature = _load_signature(folder)
    except (ValueError, OSError) as exc:
        assert str(folder) in str(exc) or folder.name in str(exc), f"unclear error: {exc}"
        return "refused"
    for name, expected in allowed.items():
        if _same(signature, expected):
            return name
    return "wrong model"


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_save_into_existing_folder_leaves_old_or_new(killed_saves, models, point):
    runs, _ = killed_saves
    scenario, result = runs[f"existing-{point}"]
    assert result["signal"] == 9, f"the save was not killed at {point}: {result}"
    target = Path(scenario["target"])
    outcome = _outcome(target, {"A": models["sig_a"], "B": models["sig_b"]})
    assert outcome in ("A", "B"), outcome
    # The swap is the only step that changes the target: before it, A; after it, B.
    assert outcome == ("B" if point == "swapped" else "A")
    _user_files_kept(target)


@pytest.mark.parametrize("point", NEW_FOLDER_KILL_POINTS)
def test_killed_save_into_new_folder_leaves_nothing_or_new(killed_saves, models, point):
    runs, _ = killed_saves
    scenario, result = runs[f"new-{point}"]
    assert result["signal"] == 9, f"the save was not killed at {point}: {result}"
    outcome = _outcome(Path(scenario["target"]), {"B": models["sig_b"]})
    assert outcome == ("B" if point == "swapped" else "absent")


@pytest.mark.parametrize("point", TIMED)
def test_save_killed_at_random_times_leaves_old_or_new(killed_saves, models, point):
    runs, big = killed_saves
    scenario, result = runs[f"timed-{point}"]
    assert result["signal"] == 9 or result["exit"] == 0, result
    sig_big = _load_signature(big)
    target = Path(scenario["target"])
    assert _outcome(target, {"A": models["sig_a"], "B": sig_big}) in ("A", "B")
    _user_files_kept(target)


def test_transformers_own_save_killed_midway_loads_a_wrong_model(killed_saves, models):
    """Why the atomic save exists: the same kill during transformers' in-place save leaves B's config.json next to
    A's complete model.safetensors, which the loader prefers over B's half-written shards: A's weights with B's
    threshold, a model that was never saved. (If transformers ever makes this safe, delete this test.)"""
    runs, _ = killed_saves
    scenario, result = runs["raw-shard:2"]
    assert result["signal"] == 9
    assert _outcome(Path(scenario["target"]), {"A": models["sig_a"], "B": models["sig_b"]}) == "wrong model"
