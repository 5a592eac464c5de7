"""Hub round trip through the real huggingface_hub client, and what happens when hf_int8 is not imported.

The Hub is ``tests/hub_server.py`` on 127.0.0.1. The client is pointed at it the way a user points it at a private
Hub: ``HF_ENDPOINT`` (and ``HF_TOKEN``) in the environment of a fresh Python process, since huggingface_hub reads
them when it is imported. Nothing of the client is patched. ``HF_HUB_DISABLE_XET=1`` makes the client upload large
files with git-lfs instead of the Xet protocol, which the test server does not speak; downloads are plain HTTP.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hub_server import USER, HubServer
from safetensors import safe_open
from tiny_models import save_fp_model
from transformers import AutoModelForCausalLM

import hf_int8  # noqa: F401
from hf_int8 import Int8Config, Int8Linear
from hf_int8.checkpoint.card import CARD_BEGIN, CARD_END

TOKEN = "hf_int8-test-token"
TIMEOUT = 240


@pytest.fixture(scope="module")
def fp_path(tmp_path_factory) -> Path:
    return save_fp_model(tmp_path_factory.mktemp("fp") / "tiny-llama", outlier_scale=40.0)


@pytest.fixture(scope="module")
def hub():
    with HubServer(TOKEN, max_requests=1000, lifetime_s=TIMEOUT + 60) as server:
        yield server


def _client_env(hub: HubServer, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_TOKEN=TOKEN,
        HF_HOME=str(home),
        HF_HUB_OFFLINE="0",
        TRANSFORMERS_OFFLINE="0",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        NO_PROXY="127.0.0.1,localhost",
        PYTHONPATH=str(Path(__file__).resolve().parent.parent),
    )
    return env


def _run(script: str, args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    return subprocess.run([sys.executable, str(path), *args], env=env, capture_output=True, text=True, timeout=TIMEOUT)


CLIENT = """
    import contextlib, io, json, sys
    import torch
    import hf_int8
    from hf_int8 import cli
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from transformers import AutoModelForCausalLM

    src, out, report = sys.argv[1:4]
    assert constants.ENDPOINT.startswith("http://127.0.0.1:"), constants.ENDPOINT  # never the real Hub
    result = {}

    # 1. push_to_hub, then from_pretrained(repo) with an empty cache: everything comes back through the server.
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=hf_int8.Int8Config(threshold=6.0),
                                                 dtype=torch.float32).eval()
    info = model.push_to_hub("tiny-llama-llmint8")
    again = AutoModelForCausalLM.from_pretrained(info.repo_url.repo_id, dtype=torch.float32).eval()
    ids = torch.arange(4, 40).unsqueeze(0)
    with torch.no_grad():
        result["same_logits"] = torch.equal(model(ids).logits, again(ids).logits)
    a, b = model.state_dict(), again.state_dict()
    result.update(
        repo_id=info.repo_url.repo_id, commit_url=info.commit_url, same_keys=sorted(a) == sorted(b),
        same_tensors=all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a),
        int8_layers=sum(type(m).__name__ == "Int8Linear" for m in again.modules()),
        footprint=again.get_memory_footprint(),
    )
    model.save_pretrained(out + "-saved", push_to_hub=True, repo_id="via-save")  # the other way to push

    # 2. A repo that already has a card: it is kept, the hf_int8 section is added once and refreshed on every push.
    api = HfApi()
    repo_id = api.create_repo("card-merge").repo_id
    user_card = "---" + chr(10) + "license: mit" + chr(10) + "---" + chr(10) * 2 + "My notes." + chr(10)
    api.create_commit(repo_id, [CommitOperationAdd("README.md", user_card.encode())], commit_message="user card")
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=hf_int8.Int8Config(threshold=2.5))
    model.push_to_hub(repo_id)
    model.push_to_hub(repo_id)

    # 3. The CLI, in this process: a successful push (exit 0) and a refused one (exit 5).
    for name, repo in (("cli_ok", "cli-push"), ("cli_refused", "readonly-repo")):
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli.main(["--quiet", "quantize", src, out + "-" + name, "--threshold", "4", "--push-to-hub", repo])
        result[name] = {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}
    json.dump(result, open(report, "w"))
"""


@pytest.fixture(scope="module")
def client_run(hub, fp_path, tmp_path_factory):
    """One fresh Python process (HF_ENDPOINT -> the test server) runs every Hub scenario; returns its report."""
    tmp = tmp_path_factory.mktemp("client")
    report, out = tmp / "report.json", tmp / "out"
    proc = _run(CLIENT, [str(fp_path), str(out), str(report)], _client_env(hub, tmp / "hf_home"), tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(report.read_text()), out


def test_push_to_hub_then_from_pretrained_repo(hub, client_run):
    result, _ = client_run
    repo_id = f"{USER}/tiny-llama-llmint8"
    assert result["repo_id"] == repo_id
    assert result["commit_url"].startswith(hub.endpoint)
    assert result["same_keys"] and result["same_tensors"] and result["same_logits"]
    assert result["int8_layers"] == 14

    # What reached the Hub: one commit with the weights through LFS and the config and card as regular files.
    files = hub.files(repo_id)
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md"} <= set(files)
    assert files["model.safetensors"].lfs and not files["config.json"].lfs and not files["README.md"].lfs
    assert len(hub.repos[repo_id].commits) == 1
    assert hub.requests("PUT", "/_lfs/") and hub.requests("POST", "/info/lfs/objects/batch")
    sha = hub.repos[repo_id].commits[-1][0]
    assert hub.requests("GET", f"/{repo_id}/resolve/{sha}/model.safetensors")  # downloaded, not read locally
    unknown = [r for r in hub.log if r[2] == 404 and "/resolve/" not in r[1]]
    assert not unknown, f"the client called endpoints the server lacks: {unknown}"
    qcfg = json.loads(files["config.json"].data)["quantization_config"]
    assert qcfg == {"quant_method": "llmint8", "threshold": 6.0, "skip_modules": None, "format_version": 1}

    # The generated model card: metadata, method, threshold, footprint, format version, usage starting with import.
    card = files["README.md"].data.decode()
    assert card.startswith("---\n") and re.search(r"(?m)^- llmint8$", card) and "library_name: transformers" in card
    assert CARD_BEGIN in card and CARD_END in card
    assert "`llmint8`" in card and "| outlier threshold | 6.0 |" in card
    assert "| checkpoint format version | 1 |" in card
    footprint_mib = float(re.search(r"\| memory footprint \| ([0-9.]+) MiB", card).group(1))
    assert footprint_mib == pytest.approx(result["footprint"] / 1024**2, abs=0.006)
    snippet = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    assert snippet.splitlines()[0].startswith("import hf_int8")
    assert f'from_pretrained("{repo_id}"' in snippet


def test_save_pretrained_push_to_hub_uploads_the_card(hub, client_run):
    _, out = client_run
    files = hub.files(f"{USER}/via-save")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    card = files["README.md"].data.decode()
    assert CARD_BEGIN in card and f'from_pretrained("{USER}/via-save"' in card
    assert CARD_BEGIN in (Path(f"{out}-saved") / "README.md").read_text()  # and the local folder has it too


def test_push_keeps_an_existing_card_and_refreshes_its_section(hub, client_run):
    card = hub.files(f"{USER}/card-merge")["README.md"].data.decode()
    assert "license: mit" in card and "My notes." in card  # the user's card survives
    assert card.count(CARD_BEGIN) == 1 and "| outlier threshold | 2.5 |" in card
    assert len(hub.repos[f"{USER}/card-merge"].commits) == 3


def test_cli_quantize_push_to_hub(hub, client_run):
    result, out = client_run
    ok = result["cli_ok"]
    assert ok["code"] == 0, ok["stderr"][-3000:]
    assert f"pushed to cli-push: {hub.endpoint}/{USER}/cli-push/commit/" in ok["stdout"]
    files = hub.files(f"{USER}/cli-push")
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json"} <= set(files)
    local = Path(f"{out}-cli_ok")
    assert files["model.safetensors"].data == (local / "model.safetensors").read_bytes()
    assert json.loads(files["config.json"].data)["quantization_config"]["threshold"] == 4.0


def test_cli_refused_upload_exits_5_and_keeps_local_output(hub, client_run):
    result, out = client_run
    refused = result["cli_refused"]
    assert refused["code"] == 5, refused
    assert "upload of" in refused["stderr"] and "readonly-repo" in refused["stderr"] and "403" in refused["stderr"]
    assert (Path(f"{out}-cli_refused") / "model.safetensors").is_file()
    assert hub.repos[f"{USER}/readonly-repo"].commits == []


# ---------------------------------------------------------------------------------------------------------------
# Loading without `import hf_int8`
# ---------------------------------------------------------------------------------------------------------------
WITHOUT_IMPORT = """
    import json, sys
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from safetensors.torch import load_file
    assert "hf_int8" not in sys.modules
    path, report = sys.argv[1:3]
    outcome = {}
    for how in ("from_pretrained", "load_state_dict"):
        try:
            if how == "from_pretrained":
                AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            else:  # a plain PyTorch user: build the float model, load the state dict by hand
                config = AutoConfig.from_pretrained(path)
                del config.quantization_config
                model = AutoModelForCausalLM.from_config(config)
                model.load_state_dict(load_file(path + "/model.safetensors"), strict=False)
            outcome[how] = "LOADED"
        except RuntimeError as exc:
            outcome[how] = "REFUSED: " + str(exc)[:3000]
    json.dump(outcome, open(report, "w"))
"""


@pytest.fixture(scope="module")
def saved_int8(fp_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "model"
    model = AutoModelForCausalLM.from_pretrained(fp_path, quantization_config=Int8Config(), dtype=torch.float32)
    model.save_pretrained(out)
    return out


def test_checkpoint_is_refused_loudly_without_import(saved_int8, tmp_path):
    # The start-up hook would register llmint8 (test_autoload.py): turn it off, as where hf_int8 is not installed.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_INT8_NO_AUTOLOAD="1")
    report = tmp_path / "outcome.json"
    proc = _run(WITHOUT_IMPORT, [str(saved_int8), str(report)], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    outcome = json.loads(report.read_text())
    # transformers: it names the method it does not know, then refuses every int8 layer with a size mismatch
    assert outcome["from_pretrained"].startswith("REFUSED: You set `ignore_mismatched_sizes` to `False`")
    assert "Unknown quantization type, got llmint8" in proc.stderr
    assert re.search(r"self_attn.q_proj.weight .*MISMATCH .*torch.Size\(\[4096\]\)", proc.stderr)
    # plain PyTorch: load_state_dict refuses too, naming the layer (even with strict=False)
    assert outcome["load_state_dict"].startswith("REFUSED: Error(s) in loading state_dict")
    assert "size mismatch for model.layers.0.self_attn.q_proj.weight" in outcome["load_state_dict"]


def test_what_protects_a_checkpoint_on_disk(saved_int8):
    with safe_open(saved_int8 / "model.safetensors", "pt") as handle:
        meta = handle.metadata()
        codes = handle.get_tensor("model.layers.0.self_attn.q_proj.weight")
        scale = handle.get_tensor("model.layers.0.self_attn.q_proj.weight_scale")
    assert meta["format"] == "pt" and meta["quant_method"] == "llmint8" and meta["llmint8_format_version"] == "1"
    assert "import hf_int8" in meta["loader"]
    assert codes.dtype == torch.int8 and codes.dim() == 1 and codes.numel() == 64 * 64 and scale.shape == (64,)
    card = (saved_int8 / "README.md").read_text()
    assert "Load it with `import hf_int8` first" in card and "ignore_mismatched_sizes" in card
    # And with the import, the same folder loads as int8, identical to what was saved.
    again = AutoModelForCausalLM.from_pretrained(saved_int8, dtype=torch.float32)
    layer = again.model.layers[0].self_attn.q_proj
    assert isinstance(layer, Int8Linear) and torch.equal(layer.weight.reshape(-1), codes)
    assert torch.equal(layer.weight_scale, scale)


def test_saving_a_reloaded_model_round_trips(saved_int8, tmp_path):
    first = AutoModelForCausalLM.from_pretrained(saved_int8, dtype=torch.float32)
    first.save_pretrained(tmp_path / "again", max_shard_size="30KB")
    assert len(list((tmp_path / "again").glob("*.safetensors"))) > 1
    second = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32)
    a, b = first.state_dict(), second.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_dequantized_model_saves_as_plain_float(saved_int8, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved_int8, dtype=torch.float32).dequantize()
    model.save_pretrained(tmp_path / "fp")
    assert not (tmp_path / "fp" / "README.md").exists()  # not an llmint8 model any more: no llmint8 card
    assert "quantization_config" not in json.loads((tmp_path / "fp" / "config.json").read_text())
