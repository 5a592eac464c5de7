"""Build llama.cpp's ``llama-bench`` and ``llama-quantize`` and make Q8_0 GGUFs of the benchmark models.

llama.cpp is the 8-bit CPU peer hf_int8 is measured against (its Q8_0 format: int8 weights, one fp16 scale per
32 weights). Nothing here is needed by hf_int8 itself or by ``make test``; ``scripts/bench_e2e.py --llamacpp`` uses
what this script leaves in the cache.

Where everything comes from (the package registry is the only network access):

* llama.cpp's sources: the ``llama-cpp-python==0.3.36`` sdist (``pip download --no-deps``) vendors them under
  ``vendor/llama.cpp``; they are built with cmake (``-DGGML_NATIVE=ON``: the kernels this CPU supports).
* the weights: the same GGUF files ``scripts/assets.py`` converts for Transformers (SmolLM2's Q4_1, Qwen2.5's Q4_K_M
  assembled from 22 chunks), requantized to Q8_0 with ``llama-quantize --allow-requantize``: the same rounded
  weights the Transformers models are made from, in llama.cpp's Q8_0 layout.

Cache: ``$HF_INT8_LLAMACPP_CACHE``, else ``~/.cache/hf_int8/llamacpp/<version>`` (outside the repository), holding
``bin/`` (static binaries) and ``models/<name>-q8_0.gguf``. Every item is built in a temporary folder and renamed
into place, so an interrupted run leaves nothing half-written.

Usage::

    python scripts/build_llamacpp.py                  # binaries + SmolLM2 Q8_0 (build: 10-20 min on 2 cores)
    python scripts/build_llamacpp.py --models smollm2,qwen
    python scripts/build_llamacpp.py --print-cache    # the cache folder, nothing built
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CACHE_ENV = "HF_INT8_LLAMACPP_CACHE"
BINARIES = ("llama-bench", "llama-quantize")
MODELS = ("smollm2", "qwen")


def _log(message: str) -> None:
    print(f"[build_llamacpp] {message}", file=sys.stderr, flush=True)


def cache_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The llama.cpp cache: ``$HF_INT8_LLAMACPP_CACHE``, else ``~/.cache/hf_int8/llamacpp/<version>``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "hf_int8" / "llamacpp" / version


def binary(name: str, cache: Path | None = None) -> Path | None:
    """Path of a built llama.cpp binary (``llama-bench``, ``llama-quantize``), or None when it is not built."""
    path = (cache or cache_dir()) / "bin" / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def q8_0_gguf(model: str, cache: Path | None = None) -> Path | None:
    """Path of the Q8_0 GGUF of ``model`` (``smollm2`` or ``qwen``), or None when it is not made yet."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS!r}, got {model!r}")
    path = (cache or cache_dir()) / "models" / f"{model}-q8_0.gguf"
    return path if path.is_file() else None


def _run(cmd: list[str], cwd: Path | None = None, nice: bool = False) -> None:
    """Run ``cmd``, streaming its output; raise with the command line when it fails."""
    full = (["nice", "-n", "19"] if nice else []) + cmd
    _log("$ " + " ".join(full))
    result = subprocess.run(full, cwd=cwd)
    if result.returncode != 0:
        raise RuntimeError(f"command failed with exit code {result.returncode}: {' '.join(full)}")


def build_binaries(cache: Path, version: str, jobs: int) -> Path:
    """Download the sdist, build the binaries with cmake under ``nice -n 19`` and install them in ``cache/bin``."""
    if all(binary(b, cache) for b in BINARIES):
        return cache / "bin"
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake is not installed (Debian/Ubuntu: apt-get install -y cmake)")
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    try:
        start = time.perf_counter()
        spec = f"llama-cpp-python=={version}"
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
              "--dest", str(work), spec])  # fmt: skip
        archives = sorted(work.glob("llama_cpp_python-*.tar.gz"))
        if len(archives) != 1:
            raise RuntimeError(f"pip download {spec} left {[a.name for a in work.iterdir()]!r}, not one sdist")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(work, filter="data")
        sources = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
        if sources is None or not (sources / "CMakeLists.txt").is_file():
            raise RuntimeError(f"{archives[0].name} holds no vendor/llama.cpp/CMakeLists.txt")
        build = work / "build"
        # Static binaries: they run from bin/ alone, without the build tree's shared libraries.
        flags = ["-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF"]  # fmt: skip
        _run(["cmake", "-S", str(sources), "-B", str(build), *flags], nice=True)
        _run(["cmake", "--build", str(build), f"-j{jobs}", "--target", *BINARIES], nice=True)
        staged = work / "bin"
        staged.mkdir()
        for name in BINARIES:
            shutil.copy2(build / "bin" / name, staged / name)
        final = cache / "bin"
        if final.exists():
            shutil.rmtree(final)
        os.rename(staged, final)
        _log(f"built {', '.join(BINARIES)} in {time.perf_counter() - start:.0f} s -> {final}")
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _source_gguf(model: str, scratch: Path) -> Path:
    """The GGUF scripts/assets.py converts for ``model``; Qwen's chunks are concatenated into ``scratch``."""
    import assets

    if model == "smollm2":
        return assets.SMOLLM2_PKG.install() / assets.SMOLLM2_GGUF
    target = scratch / assets.QWEN_GGUF
    with open(target, "wb") as out:
        for i, package in enumerate(assets.QWEN_PART_PKGS, start=1):
            chunk = package.install() / "data" / f"part{i:02d}.bin"
            if not chunk.is_file():
                raise RuntimeError(f"{package.name}=={package.version} has no data/part{i:02d}.bin")
            with open(chunk, "rb") as src:
                shutil.copyfileobj(src, out, 16 * 1024 * 1024)
    with open(target, "rb") as handle:
        magic = handle.read(4)
    if magic != assets.GGUF_MAGIC:
        raise RuntimeError(f"the concatenated Qwen chunks start with {magic!r}, not {assets.GGUF_MAGIC!r}")
    return target


def make_q8_0(model: str, cache: Path) -> Path:
    """Requantize ``model``'s GGUF to Q8_0 into ``cache/models/<model>-q8_0.gguf`` (kept when it exists)."""
    existing = q8_0_gguf(model, cache)
    if existing is not None:
        return existing
    quantize = binary("llama-quantize", cache)
    if quantize is None:
        raise RuntimeError(f"llama-quantize is not built in {cache / 'bin'}")
    models = cache / "models"
    models.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".q8-", dir=models))
    try:
        source = _source_gguf(model, scratch)
        out = scratch / f"{model}-q8_0.gguf"
        start = time.perf_counter()
        _run([str(quantize), "--allow-requantize", str(source), str(out), "Q8_0"])
        final = models / out.name
        os.rename(out, final)
        _log(f"{model}: Q8_0 GGUF ({final.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s")
        return final
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2", help=f"comma list of {MODELS} (default: smollm2)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    parser.add_argument("--version", default=LLAMA_CPP_PYTHON_VERSION, help="llama-cpp-python sdist version")
    parser.add_argument("--print-cache", action="store_true", help="print the cache folder and exit")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for model in models:
        if model not in MODELS:
            raise ValueError(f"--models entries must be in {MODELS!r}, got {model!r}")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs!r}")
    cache = cache_dir(args.version)
    if args.print_cache:
        print(cache)
        return 0
    print(f"bin        {build_binaries(cache, args.version, args.jobs)}")
    for model in models:
        print(f"{model:<11}{make_q8_0(model, cache)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
