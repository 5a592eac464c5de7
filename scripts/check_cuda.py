"""Check the built CUDA extension (hf_int8._C_cuda) from its machine code, without a GPU.

From the cubins and PTX embedded in the extension's shared object:

* ``cuobjdump --list-elf`` / ``--list-ptx``: the architectures with machine code (SASS) and the embedded PTX, which
  the driver JIT-compiles for GPUs newer than every cubin. At least one PTX must be embedded (without it such a GPU
  has no kernel image at all), and sm_80 SASS must be there (the checks below read it);
* ``cuobjdump -sass``: the tensor-core GEMM kernels (``hf_int8_gemm_imma_kernel``) contain integer tensor-core
  instructions (IMMA) for every architecture, ``IMMA.16832.S8.S8`` on sm_80 (which must be built); the decode kernel
  uses ``IDP.4A`` (dp4a); the sm_80+ GEMM stages tiles with ``LDGSTS`` (cp.async) and reads them with ``LDSM``
  (ldmatrix), and runs the outlier columns of fp16 / bf16 activations on tensor cores (``HMMA.16816.F32`` and
  ``HMMA.16816.F32.BF16``); no kernel executes a local-memory load or store (``LDL``/``STL``: where spills would go);
* ``cuobjdump -res-usage`` (the resource report ptxas embeds in each cubin: what ``ptxas -v`` prints at build
  time): every kernel has a zero-byte stack frame and no local memory, i.e. 0 spill bytes.

Every expected kernel must be present for every architecture. Prints one table row per kernel and architecture
and exits 1 (naming each failed check) when anything is off.

    python scripts/check_cuda.py [--so PATH] [--cuobjdump PATH]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_ARCH = "sm_80"
GEMM_KERNEL = "hf_int8_gemm_imma_kernel"
EXPECTED_KERNELS = {
    GEMM_KERNEL: 2,  # 64x64 and 128x128 block tiles
    "hf_int8_gemv_dp4a_kernel": 1,
    "hf_int8_quantize_rows_kernel": 6,  # {fp32, fp16, bf16} x {16-byte vectors, scalar}
    "hf_int8_outlier_columns_kernel": 6,
    "hf_int8_arch_probe_kernel": 1,  # csrc/cuda/arch_probe.cu: asks the driver whether an image runs on a GPU
}
INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


@dataclass
class Kernel:
    arch: str
    mangled: str
    instructions: list[str] = field(default_factory=list)
    resources: dict[str, int] = field(default_factory=dict)

    @property
    def family(self) -> str:
        match = re.search(r"hf_int8_\w+?_kernel", self.mangled)
        return match.group(0) if match else self.mangled

    def count(self, prefix: str) -> int:
        return sum(1 for ins in self.instructions if ins.startswith(prefix))

    def opcode_count(self, opcode: str) -> int:
        return sum(1 for ins in self.instructions if ins.split(".")[0] == opcode)


def find_extension(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    found = sorted(glob.glob(str(ROOT / "hf_int8" / "_C_cuda*.so")))
    if not found:
        sys.exit(f"check_cuda: no hf_int8/_C_cuda*.so under {ROOT}; build it first (make build)")
    return Path(found[0])


def find_cuobjdump(explicit: str | None) -> str:
    candidates = [explicit] if explicit else []
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates += [str(Path(cuda_home) / "bin" / "cuobjdump"), shutil.which("cuobjdump")]
    # CUDA builds of torch depend on triton, which ships cuobjdump (the toolkit's nvcc-only installs do not).
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:
        candidates.append(str(Path(spec.submodule_search_locations[0]) / "backends" / "nvidia" / "bin" / "cuobjdump"))
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    sys.exit(f"check_cuda: cuobjdump not found (looked at {[c for c in candidates if c]}); pass --cuobjdump")


def run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"check_cuda: {' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    pretty = {}
    for name, full in zip(names, out, strict=False):
        full = re.sub(r"hf_int8::cuda::\(anonymous namespace\)::", "", full)
        pretty[name] = re.sub(r"\(.*\)$", "", full).replace("hf_int8::cuda::", "")
    return pretty


def archs_of(so: Path, cuobjdump: str) -> list[str]:
    listing = run([cuobjdump, "-lelf", str(so)])
    return sorted(set(re.findall(r"\.(sm_\d+a?)\.cubin", listing)))


def ptx_of(so: Path, cuobjdump: str) -> list[str]:
    """Virtual architectures with embedded PTX, e.g. ``["compute_90"]`` (cuobjdump names the files ``*.sm_90.ptx``)."""
    listing = run([cuobjdump, "--list-ptx", str(so)])
    found = {f"compute_{n}" for n in re.findall(r"\.sm_(\d+[af]?)\.ptx", listing)}
    return sorted(found, key=lambda a: (int(re.sub(r"\D", "", a[len("compute_") :])), a))


def parse_sass(text: str, arch: str) -> dict[str, Kernel]:
    kernels: dict[str, Kernel] = {}
    current: Kernel | None = None
    for line in text.splitlines():
        head = re.match(r"\s*Function : (\S+)", line)
        if head:
            current = kernels.setdefault(head.group(1), Kernel(arch, head.group(1)))
            continue
        if current is not None:
            ins = INSTRUCTION.search(line)
            if ins:
                current.instructions.append(ins.group(1))
    return kernels


def parse_resources(text: str, kernels: dict[str, Kernel], arch: str) -> None:
    current = None
    for line in text.splitlines():
        head = re.match(r"\s*Function (\S+):", line)
        if head:
            current = head.group(1)
            continue
        if current is not None and "REG:" in line:
            values = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            kernels.setdefault(current, Kernel(arch, current)).resources = values
            current = None


def check(so: Path, cuobjdump: str) -> tuple[list[Kernel], list[str]]:
    failures: list[str] = []
    archs = archs_of(so, cuobjdump)
    if not archs:
        return [], [f"{so.name} holds no cubin (was it built with nvcc?)"]
    if REQUIRED_ARCH not in archs:
        failures.append(
            f"no {REQUIRED_ARCH} cubin (built for {archs}); TORCH_CUDA_ARCH_LIST must include 8.0 for this check"
        )
    if not ptx_of(so, cuobjdump):
        failures.append(
            f"no PTX embedded (SASS only for {archs}): GPUs newer than these have no kernel image; end "
            "TORCH_CUDA_ARCH_LIST with +PTX (e.g. 8.0;9.0+PTX)"
        )
    all_kernels: list[Kernel] = []
    for arch in archs:
        kernels = parse_sass(run([cuobjdump, "-sass", "-arch", arch, str(so)]), arch)
        parse_resources(run([cuobjdump, "-res-usage", "-arch", arch, str(so)]), kernels, arch)
        ours = [k for k in kernels.values() if "hf_int8_" in k.mangled]
        all_kernels += ours
        for family, expected in EXPECTED_KERNELS.items():
            have = sum(1 for k in ours if k.family == family)
            if have != expected:
                failures.append(f"{arch}: expected {expected} {family} instantiation(s), found {have}")
        for k in ours:
            label = f"{arch} {k.mangled}"
            if not k.instructions:
                failures.append(f"{label}: no SASS found")
            if not k.resources:
                failures.append(f"{label}: no resource usage reported")
            stack, local = k.resources.get("STACK", -1), k.resources.get("LOCAL", -1)
            if stack != 0 or local != 0:
                failures.append(f"{label}: stack frame {stack} bytes, local memory {local} bytes (spills)")
            ldl_stl = k.opcode_count("LDL") + k.opcode_count("STL")
            if ldl_stl:
                failures.append(f"{label}: {ldl_stl} local-memory loads/stores (LDL/STL) in the SASS")
            if k.family == GEMM_KERNEL:
                imma = k.count("IMMA")
                if imma == 0:
                    failures.append(f"{label}: no IMMA (integer tensor-core) instruction")
                if arch == REQUIRED_ARCH and k.count("IMMA.16832.S8.S8") == 0:
                    failures.append(f"{label}: no IMMA.16832.S8.S8 (mma.sync m16n8k32 s8) on {arch}")
                sm80_or_newer = _arch_number(arch) >= 80
                if sm80_or_newer and (k.count("LDGSTS") == 0 or k.count("LDSM") == 0):
                    failures.append(f"{label}: expected cp.async (LDGSTS) and ldmatrix (LDSM) on {arch}")
                if sm80_or_newer and (k.count("HMMA.16816.F32.BF16") == 0 or k.count("HMMA.16816.F32") == 0):
                    failures.append(f"{label}: the outlier product has no fp16/bf16 tensor-core MMA (HMMA) on {arch}")
            if k.family == "hf_int8_gemv_dp4a_kernel" and k.count("IDP.4A") == 0:
                failures.append(f"{label}: decode kernel has no IDP.4A (dp4a)")
    return all_kernels, failures


def _arch_number(arch: str) -> int:
    return int(re.sub(r"\D", "", arch.partition("_")[2]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--so", help="path of the built extension (default: hf_int8/_C_cuda*.so)")
    parser.add_argument("--cuobjdump", help="cuobjdump to use (default: CUDA_HOME, PATH, then triton's)")
    args = parser.parse_args(argv)
    so = find_extension(args.so)
    cuobjdump = find_cuobjdump(args.cuobjdump)
    kernels, failures = check(so, cuobjdump)
    names = demangle([k.mangled for k in kernels])
    print(f"extension: {so}")
    print(f"cuobjdump: {cuobjdump}")
    print(f"SASS (cubin) archs: {', '.join(sorted(archs_of(so, cuobjdump), key=_arch_number)) or 'none'}")
    print(f"embedded PTX: {', '.join(ptx_of(so, cuobjdump)) or 'none'} (JIT-compiled by the driver on newer GPUs)")
    header = f"{'arch':6} {'kernel':72} {'REG':>4} {'SHARED':>6} {'STACK':>5} {'LOCAL':>5} {'LDL/STL':>7} {'IMMA':>5}"
    print(header)
    print("-" * len(header))
    for k in sorted(kernels, key=lambda k: (k.arch, names[k.mangled])):
        r = k.resources
        print(
            f"{k.arch:6} {names[k.mangled][:72]:72} {r.get('REG', -1):>4} {r.get('SHARED', -1):>6} "
            f"{r.get('STACK', -1):>5} {r.get('LOCAL', -1):>5} {k.opcode_count('LDL') + k.opcode_count('STL'):>7} "
            f"{k.count('IMMA'):>5}"
        )
    gemm80 = [k for k in kernels if k.arch == REQUIRED_ARCH and k.family == GEMM_KERNEL]
    for k in gemm80:
        kinds = sorted({i for i in k.instructions if i.startswith(("IMMA", "HMMA", "LDSM", "LDGSTS"))})
        print(f"{REQUIRED_ARCH} {names[k.mangled]}: {k.count('IMMA')} IMMA; tensor-core/copy opcodes: {kinds}")
    if failures:
        print(f"\nFAILED ({len(failures)}):")
        for f in failures:
            print(f"  - {f}")
        return 1
    print(
        f"\nOK: {len(kernels)} kernels over {len({k.arch for k in kernels})} architectures; GEMM uses IMMA on every "
        f"architecture (IMMA.16832.S8.S8 on {REQUIRED_ARCH}), outliers on HMMA from sm_80; 0 spill bytes (stack 0, "
        f"local 0, no LDL/STL) everywhere;"
        f" PTX embedded for {', '.join(ptx_of(so, cuobjdump))}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
