"""hf_int8 installs like a Python package.

Fast tests: the build's decisions (which toolkit can build the CUDA kernels, the fallback to the CPU kernels when the
CUDA build fails, what ``setup.py`` prints and refuses). The slow test does what a user does in a fresh virtualenv
that already has torch (a CPU torch from a local wheel when this machine has one): ``python -m build --sdist``, ``pip
wheel`` of that sdist under pip's default build isolation (it must compile against the venv's torch, not download a
second one), ``pip install`` of the wheel, then checks the kernels load, the start-up hook loads an llmint8
checkpoint with no ``import hf_int8``, and the hook loads exactly one module at start-up.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import setup_helpers  # noqa: E402

sys.path.remove(str(ROOT))
import bench_startup  # noqa: E402  (scripts/ is on sys.path: tests/conftest.py)


def _fake_toolkit(root: Path, release: str | None = "13.0", header: bool = False, exit_code: int = 0) -> Path:
    """A CUDA_HOME whose bin/nvcc prints ``release`` (a shell script), with or without include/cuda_runtime.h."""
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    text = f"Cuda compilation tools, release {release}, V{release}.1" if release else "nvcc: something went wrong"
    nvcc.write_text(f"#!/bin/sh\necho {shlex.quote(text)}\nexit {exit_code}\n")
    nvcc.chmod(0o755)
    if header:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime.h").write_text("/* fake */\n")
    return root


def test_cuda_problem_names_what_is_wrong_with_the_toolkit(tmp_path):
    assert setup_helpers.cuda_problem(None, "/usr/local/cuda") == "torch is a CPU-only build"
    assert "no CUDA toolkit found" in setup_helpers.cuda_problem("13.0", None)
    assert "no nvcc" in setup_helpers.cuda_problem("13.0", str(tmp_path / "nothing"))
    # nvcc present but no runtime headers: the reported `fatal error: cuda_runtime.h` install failure
    headerless = _fake_toolkit(tmp_path / "headerless")
    problem = setup_helpers.cuda_problem("13.0", str(headerless))
    assert "incomplete" in problem and "cuda_runtime.h" in problem, problem
    other_major = _fake_toolkit(tmp_path / "cuda12", release="12.4", header=True)
    problem = setup_helpers.cuda_problem("13.0", str(other_major))
    assert "CUDA 12.4" in problem and "13.0" in problem, problem
    broken = _fake_toolkit(tmp_path / "broken", release=None, header=True, exit_code=3)
    assert "failed (exit 3" in setup_helpers.cuda_problem("13.0", str(broken))
    assert setup_helpers.cuda_problem("13.0", str(_fake_toolkit(tmp_path / "good", header=True))) is None
    minor = _fake_toolkit(tmp_path / "minor", release="13.0", header=True)
    assert setup_helpers.cuda_problem("13.2", str(minor)) is None  # torch only warns about a minor mismatch


def test_cuda_mode_reads_the_switch():
    assert setup_helpers.cuda_mode({}) == "auto"
    assert setup_helpers.cuda_mode({"HF_INT8_BUILD_CUDA": "0"}) == "off"
    assert setup_helpers.cuda_mode({"HF_INT8_BUILD_CUDA": "false"}) == "off"
    assert setup_helpers.cuda_mode({"HF_INT8_BUILD_CUDA": "1"}) == "required"


class _Ext:
    def __init__(self, name: str) -> None:
        self.name, self.extra_compile_args = name, ["-O3"]


class _FakeBuildExt:
    """Stands in for torch's BuildExtension: adds a flag to each extension, as the real one does, and fails on the
    CUDA one (``fail_on``) or before compiling anything (``fail_on=None``, like its CUDA version check)."""

    fail_on: str | None = setup_helpers.CUDA_EXTENSION
    fail_early = False

    def __init__(self, names: list[str]) -> None:
        self.extensions = [_Ext(n) for n in names]
        self.built: list[list[str]] = []

    def build_extension(self, ext) -> None:
        if ext.name == self.fail_on:
            raise RuntimeError(f"Error compiling objects for extension {ext.name}\nmore detail")

    def build_extensions(self) -> None:
        for ext in self.extensions:
            ext.extra_compile_args.append("-DADDED")
        if self.fail_early and any(e.name == setup_helpers.CUDA_EXTENSION for e in self.extensions):
            raise RuntimeError("The current installed version of g++ (99.0) is greater than the maximum required")
        for ext in self.extensions:
            self.build_extension(ext)
        self.built.append([e.name for e in self.extensions])


@pytest.mark.parametrize("fail_early", [False, True])
def test_a_failing_cuda_build_installs_the_cpu_kernels_with_one_line(capsys, fail_early):
    base = type("Base", (_FakeBuildExt,), {"fail_early": fail_early})
    cmd = setup_helpers.with_cpu_fallback(base, strict=False)(["hf_int8._C", setup_helpers.CUDA_EXTENSION])
    cmd.build_extensions()
    assert cmd.built == [["hf_int8._C"]]
    assert [e.name for e in cmd.extensions] == ["hf_int8._C"]  # what gets copied/installed afterwards
    assert cmd.extensions[0].extra_compile_args == ["-O3", "-DADDED"]  # retried from a pristine copy
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("hf_int8:")]
    assert len(lines) == 1 and "CPU kernels only" in lines[0] and "HF_INT8_BUILD_CUDA=1" in lines[0], lines


def test_a_failing_build_is_an_error_when_cuda_is_required_or_the_cpu_kernels_fail():
    strict = setup_helpers.with_cpu_fallback(_FakeBuildExt, strict=True)(["hf_int8._C", setup_helpers.CUDA_EXTENSION])
    with pytest.raises(RuntimeError, match="_C_cuda"):
        strict.build_extensions()
    cpu_fails = type("CpuFails", (_FakeBuildExt,), {"fail_on": "hf_int8._C"})
    cmd = setup_helpers.with_cpu_fallback(cpu_fails, strict=False)(["hf_int8._C", setup_helpers.CUDA_EXTENSION])
    with pytest.raises(RuntimeError, match=r"hf_int8\._C\b"):
        cmd.build_extensions()


def _setup_py(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """``python setup.py --version`` (decides what to build, compiles nothing) with ``env`` added."""
    full = {k: v for k, v in os.environ.items() if k not in ("HF_INT8_BUILD_CUDA", "HF_INT8_BUILD_NATIVE")}
    full.update(env)
    return subprocess.run(
        [sys.executable, str(ROOT / "setup.py"), "--version"],
        cwd=tmp_path,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_setup_py_skips_cuda_with_one_clear_line_for_a_headerless_toolkit(tmp_path):
    import torch

    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch never builds the CUDA kernels: the toolkit is not consulted")
    home = _fake_toolkit(tmp_path / "cuda", release=torch.version.cuda)
    done = _setup_py(tmp_path, CUDA_HOME=str(home))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if "CUDA" in line]
    assert len(lines) == 1 and "not building the CUDA kernels" in lines[0] and "cuda_runtime.h" in lines[0], lines
    required = _setup_py(tmp_path, CUDA_HOME=str(home), HF_INT8_BUILD_CUDA="1")
    assert required.returncode != 0 and "HF_INT8_BUILD_CUDA=1 but" in required.stderr, required.stderr[-2000:]


def test_version_is_written_once():
    import hf_int8

    done = _setup_py(ROOT, HF_INT8_BUILD_NATIVE="0")
    assert done.stdout.strip().splitlines()[-1] == hf_int8.__version__
    project = (ROOT / "pyproject.toml").read_text().split("\n[project]\n", 1)[1].split("\n[", 1)[0]
    assert not re.search(r"(?m)^version\s*=", project) and re.search(r'(?m)^dynamic = \["version"\]', project)
    assert (
        "Apache License" in (ROOT / "LICENSE").read_text()
        and 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
    )


# ---- the fresh virtualenv -------------------------------------------------------------------------------------
def _local_torch_wheel() -> str | None:
    """A CPU torch wheel for this Python lying on this machine (pip's find-links), or ``HF_INT8_TEST_TORCH_WHEEL``."""
    if os.environ.get("HF_INT8_TEST_TORCH_WHEEL"):
        return os.environ["HF_INT8_TEST_TORCH_WHEEL"]
    folders = os.environ.get("PIP_FIND_LINKS", "").split()
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    for line in listed.splitlines():
        if "find-links" in line:
            folders += line.split("=", 1)[1].strip("'\" ").split()
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for folder in dict.fromkeys(folders):
        folder = folder.removeprefix("file://")
        found = sorted(glob.glob(os.path.join(folder, f"torch-*+cpu-{tag}-{tag}-*linux*x86_64.whl")))
        if found:
            return found[-1]
    return None


def _venv_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "HF_INT8_NO_AUTOLOAD")}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 1)),
    )
    return env


def _run(cmd: list, timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    started = time.monotonic()
    done = subprocess.run(
        [str(c) for c in cmd],
        env=kwargs.pop("env", _venv_env()),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )
    print(f"[{time.monotonic() - started:6.1f} s] {' '.join(map(str, cmd))[:160]}")
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def _source_copy(dest: Path) -> Path:
    """The checkout's files (tracked and new, not ignored), so that building leaves the working tree alone."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A new virtualenv with torch, hf_int8 built from an sdist of this checkout under build isolation, installed."""
    root = tmp_path_factory.mktemp("fresh")
    timings = {}
    started = time.monotonic()
    _run([sys.executable, "-m", "venv", root / "venv"])
    py = root / "venv" / "bin" / "python"
    wheel = _local_torch_wheel()
    import torch

    torch_spec = wheel or f"torch=={torch.__version__.split('+')[0]}"
    _run([py, "-m", "pip", "install", "-q", torch_spec, "build"])
    timings["venv + torch"] = time.monotonic() - started
    src = _source_copy(root / "src")

    started = time.monotonic()
    _run([py, "-m", "build", "--sdist", "--outdir", root / "dist", src])
    sdist = next((root / "dist").glob("hf_int8-*.tar.gz"))
    timings["sdist"] = time.monotonic() - started

    started = time.monotonic()
    built = _run([py, "-m", "pip", "wheel", "-v", "--no-deps", "-w", root / "wheelhouse", sdist])
    wheel_file = next((root / "wheelhouse").glob("hf_int8-*.whl"))
    timings["wheel from sdist (isolated build)"] = time.monotonic() - started

    started = time.monotonic()
    _run([py, "-m", "pip", "install", "-q", wheel_file])
    timings["install wheel + deps"] = time.monotonic() - started
    print("fresh venv timings (s):", {k: round(v, 1) for k, v in timings.items()})
    return {
        "root": root,
        "py": py,
        "sdist": sdist,
        "wheel": wheel_file,
        "build_log": built.stdout + built.stderr,
        "torch": torch_spec,
    }


@pytest.mark.slow
def test_sdist_and_wheel_hold_what_an_install_needs(fresh_venv):
    with tarfile.open(fresh_venv["sdist"]) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for needed in (
        "setup.py",
        "setup_helpers.py",
        "pyproject.toml",
        "LICENSE",
        "hf_int8_autoload.py",
        "csrc/include/hf_int8/quant_math.h",
        "csrc/cpu/module.cpp",
        "hf_int8/__init__.py",
    ):
        assert needed in names, needed
    with zipfile.ZipFile(fresh_venv["wheel"]) as whl:
        names = set(whl.namelist())
        assert "hf_int8_autoload.pth" in names and "hf_int8_autoload.py" in names
        assert whl.read("hf_int8_autoload.pth").decode().startswith("import hf_int8_autoload")
        assert any(n.startswith("hf_int8/_C.") and n.endswith(".so") for n in names), sorted(names)
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    log = fresh_venv["build_log"]
    # Built against the venv's own torch, found through build isolation, not a second one downloaded for the build.
    assert "hf_int8: building against torch" in log and "Collecting torch" not in log


SMOKE = """
import json, sys
heavy_at_start = sorted(m for m in ("torch", "transformers", "hf_int8", "peft") if m in sys.modules)
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
layer = type(model.model.layers[0].self_attn.q_proj).__name__
import torch
import hf_int8  # only now, to read what it loaded
print(json.dumps({"heavy_at_start": heavy_at_start, "layer": layer, "torch": torch.__version__,
                  "status": hf_int8.extension_status(), "impl": hf_int8.implementations(),
                  "file": hf_int8.__file__}))
"""


@pytest.mark.slow
def test_fresh_venv_loads_native_kernels_and_llmint8_without_import(fresh_venv, tmp_path):
    import torch
    from tiny_models import save_fp_model
    from transformers import AutoModelForCausalLM

    from hf_int8 import Int8Config

    fp = save_fp_model(tmp_path / "fp")
    AutoModelForCausalLM.from_pretrained(fp, quantization_config=Int8Config(), dtype=torch.float32).save_pretrained(
        tmp_path / "int8"
    )
    (tmp_path / "smoke.py").write_text(SMOKE)
    out = json.loads(
        _run([fresh_venv["py"], tmp_path / "smoke.py", tmp_path / "int8"], cwd=tmp_path)
        .stdout.strip()
        .splitlines()[-1]
    )
    print(out)
    assert out["heavy_at_start"] == []
    assert out["layer"] == "Int8Linear"
    assert str(fresh_venv["root"]) in out["file"]  # the installed copy, not this checkout
    if fresh_venv["torch"].endswith(".whl"):  # the kernels were compiled against, and loaded into, the venv's torch
        assert out["torch"] == Path(fresh_venv["torch"]).name.split("-")[1], out["torch"]
    assert out["status"]["hf_int8._C"] == "loaded", out["status"]
    assert out["impl"]["int8_linear[cpu]"].startswith("native"), out["impl"]


@pytest.mark.slow
def test_start_up_hook_loads_one_module_and_its_cost_is_measured(fresh_venv, tmp_path):
    """The hook's cost is what it imports: the interpreter with the .pth must hold exactly one module more than without
    it (``hf_int8_autoload``, which imports only what start-up already loaded). That is exact on any machine; wall
    times are figures printed by ``scripts/bench_startup.py`` (smoke-run here), never a pass/fail check."""
    py = str(fresh_venv["py"])
    pth = bench_startup._pth_of(py)
    probe = "import json, sys; print(json.dumps(sorted(sys.modules)))"
    with_hook = set(json.loads(_run([py, "-c", probe]).stdout))
    pth.rename(pth.with_name(pth.name + ".parked"))
    try:
        without = set(json.loads(_run([py, "-c", probe]).stdout))
    finally:
        pth.with_name(pth.name + ".parked").rename(pth)
    assert with_hook - without == {"hf_int8_autoload"}, sorted(with_hook ^ without)
    assert without - with_hook == set()
    out = tmp_path / "startup.json"
    assert bench_startup.main(["--python", py, "--runs", "3", "--self-check-runs", "1", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["runs"] == 3 and figures["hook import median us (-X importtime)"] > 0, figures
    assert figures["CPU self-check runs"] == 1 and figures["CPU self-check median ms"] > 0, figures
    assert pth.is_file()  # the script put the .pth back
