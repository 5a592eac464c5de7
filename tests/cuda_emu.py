"""Build and run hf_int8's CUDA emulator (csrc/cuda_emu), and the problems the emulation tests feed it.

The emulator compiles the unchanged kernel sources of ``csrc/cuda`` with the host compiler against a stand-in of the
CUDA dialect (``csrc/cuda_emu/include``), links them with the emulator's runtime (fibers, warp collectives, cp.async
groups) and a driver that calls the kernels' launch functions (``csrc/cuda/launch.h``) on problems written to disk.
Builds are cached under ``build/cuda_emu/<hash of sources and flags>``. A *variant* can replace the text of source
files (mutation tests) or build for sm_75 (register copies and ``mma.m8n8k16``) instead of sm_80+.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
BUILD_ROOT = ROOT / "build" / "cuda_emu"
SOURCE_DIRS = ("cuda", "cuda_emu", "include")
KERNEL_SOURCES = ("cuda/gemm_kernels.cu", "cuda/quantize_kernels.cu")
SANITIZERS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
RACE_DETECTOR = ["-fsanitize=thread"]
DTYPE_TAGS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
SANITIZER_ENV = {
    # The driver allocates its buffers once per problem and frees them; fibers' stacks are mmapped (not leaks).
    "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    "TSAN_OPTIONS": "halt_on_error=1:exitcode=66:report_signal_unsafe=0",
}


def compiler() -> str | None:
    """The host C++ compiler the emulator is built with (g++: its _Float16 and sanitizers), or None."""
    return shutil.which(os.environ.get("HF_INT8_EMU_CXX", "g++"))


def supported() -> tuple[bool, str]:
    """Whether this machine can build and run the emulator, and why not."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return False, f"the emulator's fiber switch is x86-64 assembly; this machine is {platform.machine()!r}"
    if compiler() is None:
        return False, "no g++ on PATH"
    return True, ""


@dataclass(frozen=True)
class Variant:
    """One build of the emulator: target architecture, sanitizers, and text replacements in the sources.

    ``sanitize``: AddressSanitizer + UndefinedBehaviorSanitizer. ``race``: ThreadSanitizer instead, with every CUDA
    thread a fiber of its own, so that shared memory used by two threads with no barrier between them is reported.
    """

    sm: int = 800
    sanitize: bool = True
    race: bool = False
    # (path relative to csrc/, old text, new text): the old text must occur exactly once.
    mutations: tuple[tuple[str, str, str], ...] = field(default=())


def _copy_sources(dest: Path, mutations: tuple[tuple[str, str, str], ...]) -> None:
    for sub in SOURCE_DIRS:
        shutil.copytree(CSRC / sub, dest / sub)
    for rel, old, new in mutations:
        path = dest / rel
        text = path.read_text()
        count = text.count(old)
        if count != 1:
            raise ValueError(f"mutation of {rel}: the text to replace must occur exactly once, found {count}: {old!r}")
        path.write_text(text.replace(old, new))


def _tree_digest(root: Path, suffixes: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for sub in SOURCE_DIRS:
        for path in sorted((root / sub).rglob("*")):
            if path.is_file() and path.suffix in suffixes:
                h.update(str(path.relative_to(root)).encode())
                h.update(path.read_bytes())
    return h.hexdigest()


def build(variant: Variant = Variant()) -> Path:
    """Compile (or reuse) the emulator binary for ``variant``; raises ``RuntimeError`` with the compiler's output.

    Objects are cached by (flags, the unit's text, every header's text), so mutants of one kernel file recompile
    that file only; binaries by the digest of their objects.
    """
    cxx = compiler()
    common = ["-std=c++17", "-g", "-fno-omit-frame-pointer", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas"]
    common.append(f"-DHF_INT8_EMU_SM={variant.sm}")
    if variant.sanitize and variant.race:
        raise ValueError("AddressSanitizer and ThreadSanitizer cannot be combined: choose sanitize or race")
    link_flags = SANITIZERS if variant.sanitize else RACE_DETECTOR if variant.race else []
    kernel_flags = ["-O1"] + link_flags
    runtime_flags = ["-O2"]
    if variant.sanitize:
        runtime_flags.append("-DHF_INT8_EMU_ASAN_FIBERS=1")
    if variant.race:
        runtime_flags.append("-DHF_INT8_EMU_TSAN=1")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    obj_dir = BUILD_ROOT / "obj"
    obj_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BUILD_ROOT) as tmp:
        src = Path(tmp) / "src"
        _copy_sources(src, variant.mutations)
        headers = _tree_digest(src, (".h", ".cuh"))
        includes = [f"-I{src / 'cuda_emu' / 'include'}", f"-I{src / 'include'}", f"-I{src / 'cuda'}"]
        units = [
            (src / "cuda_emu" / "runtime.cpp", runtime_flags, []),
            (src / "cuda_emu" / "driver.cpp", kernel_flags, []),
        ]
        units += [(src / rel, kernel_flags, ["-x", "c++"]) for rel in KERNEL_SOURCES]

        def compile_unit(unit: tuple[Path, list[str], list[str]]) -> Path:
            path, flags, lang = unit
            cmd_flags = [*common, *flags, *lang]
            key = hashlib.sha256(repr((cmd_flags, version, headers, path.name)).encode() + path.read_bytes())
            obj = obj_dir / f"{path.stem}-{key.hexdigest()[:20]}.o"
            if obj.exists():
                return obj
            staged = Path(tmp) / (path.name + ".o")
            cmd = [cxx, *cmd_flags, *includes, "-c", str(path), "-o", str(staged)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                command = " ".join(cmd)
                raise RuntimeError(f"compiling {path.name} for the CUDA emulator failed:\n{command}\n{proc.stderr}")
            os.replace(staged, obj)  # atomic: a concurrent build finds a whole object or none
            return obj

        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            objects = list(pool.map(compile_unit, units))
        key = hashlib.sha256(repr((link_flags, [o.name for o in objects])).encode()).hexdigest()[:20]
        binary = BUILD_ROOT / key / "hf_int8_cuda_emu"
        if binary.exists():
            return binary
        staged = Path(tmp) / "hf_int8_cuda_emu"
        link = [cxx, *link_flags, *map(str, objects), "-o", str(staged), "-lpthread"]
        proc = subprocess.run(link, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"linking the CUDA emulator failed:\n{' '.join(link)}\n{proc.stderr}")
        binary.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, binary)
    return binary


# ----------------------------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------------------------
def _write(path: Path, t: torch.Tensor) -> None:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    path.write_bytes(t.numpy().tobytes())


def _read(path: Path, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8).copy()
    if dtype == torch.bfloat16:
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).reshape(shape)
    np_dtype = {
        torch.float32: np.float32,
        torch.float16: np.float16,
        torch.int32: np.int32,
        torch.int8: np.int8,
        torch.bool: np.bool_,
    }[dtype]
    return torch.from_numpy(raw.view(np_dtype)).reshape(shape)


@dataclass
class Problem:
    """One call of a launch function: its inputs (written to ``dir``), its outputs' dtypes and shapes."""

    op: str
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    params: dict[str, object]
    name: str = ""
    results: dict[str, torch.Tensor] = field(default_factory=dict)

    def manifest_line(self, directory: Path) -> str:
        items = " ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.op} {directory} {items}"


def run(
    binary: Path,
    problems: list[Problem],
    workdir: Path,
    schedule: str = "forward",
    seed: int = 0,
    timeout: float = 900,
) -> subprocess.CompletedProcess:
    """Run ``problems`` in one emulator process; fills each problem's ``results`` when the process succeeds."""
    lines = []
    for i, problem in enumerate(problems):
        directory = workdir / f"p{i:04d}"
        directory.mkdir(parents=True, exist_ok=True)
        for name, tensor in problem.inputs.items():
            _write(directory / f"{name}.bin", tensor)
        lines.append(problem.manifest_line(directory))
    manifest = workdir / "manifest.txt"
    manifest.write_text("\n".join(lines) + "\n")
    env = {**os.environ, **SANITIZER_ENV}
    proc = subprocess.run(
        [str(binary), "--schedule", schedule, "--seed", str(seed), str(manifest)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode == 0:
        for i, problem in enumerate(problems):
            directory = workdir / f"p{i:04d}"
            problem.results = {
                name: _read(directory / f"{name}.bin", dtype, shape)
                for name, (dtype, shape) in problem.outputs.items()
            }
    return proc
