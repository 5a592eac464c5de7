"""Build of hf_int8's native kernels with torch.utils.cpp_extension.

* ``hf_int8._C``: CPU kernels (``csrc/cpu/*.cpp``). Always built. ISA-specific code is compiled with per-function
  ``target`` attributes and chosen at run time, so no ``-march`` flag is passed and one build runs on any x86-64.
* ``hf_int8._C_cuda``: CUDA kernels (``csrc/cuda/*.cu`` + ``*.cpp``). Built when torch is a CUDA build and nvcc is
  found (``CUDA_HOME``), whether or not a GPU is present; ``HF_INT8_BUILD_CUDA=0`` turns it off. A toolkit that cannot
  build them (no headers, nvcc of another CUDA major than torch's, a failing compile) skips them with one line and the
  CPU kernels are still installed; ``HF_INT8_BUILD_CUDA=1`` makes that an error instead.
  ``TORCH_CUDA_ARCH_LIST`` defaults to ``DEFAULT_CUDA_ARCHS`` whenever it is unset, GPU visible or not: SASS for
  sm_75 (Turing, the oldest GPU with int8 tensor cores) through sm_120, the newest nvcc 13.0 builds, plus PTX of the
  highest so that newer GPUs JIT it. To build for your own GPU only (much faster), set it, e.g.
  ``TORCH_CUDA_ARCH_LIST=8.6``. The targets actually built are compiled into the module
  (``hf_int8._C_cuda.built_arch_list()``), which the run-time arch check reads.
``HF_INT8_BUILD_CPU=0`` skips the CPU one (for CUDA-only rebuilds); ``HF_INT8_BUILD_NATIVE=0`` skips both: the package
then runs on its reference kernels.

The kernels are compiled against the torch of the environment being installed into, also when pip's build isolation
hides it (``setup_helpers.import_torch``); the package also installs the start-up hook ``hf_int8_autoload.pth``.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # setup_helpers.py sits next to this file
import setup_helpers  # noqa: E402

DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE_DIRS = [os.path.join(ROOT, "csrc", "include")]


def _flag(name: str, default: str = "1") -> bool:
    return os.environ.get(name, default) not in ("0", "", "false", "False", "no")


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_targets() -> str:
    """The nvcc ``code=`` targets torch derives from ``TORCH_CUDA_ARCH_LIST``, e.g. ``"sm_80,sm_90,compute_90"``.

    Passed to ``csrc/cuda/cuda_module.cpp`` as a compile definition (letters, digits, ``_`` and ``,`` only: safe in
    the shell command lines ninja runs), so the module can say at run time which GPUs it has machine code for.
    """
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    codes = set()
    for flag in _get_cuda_arch_flags():
        codes.update(re.findall(r"code=((?:sm|compute)_\d+[af]?)", flag))

    def order(code: str) -> tuple[int, int]:
        kind, _, number = code.partition("_")
        return int(re.sub(r"\D", "", number)), kind == "compute"

    return ",".join(sorted(codes, key=order))


def extensions() -> tuple[list, dict]:
    if not _flag("HF_INT8_BUILD_NATIVE"):
        print("hf_int8: HF_INT8_BUILD_NATIVE=0, building no native kernels (reference only)")
        return [], {"build_py": setup_helpers.with_autoload_pth(build_py)}
    torch = setup_helpers.import_torch()
    if torch is None:  # sdist / metadata only: nothing is compiled
        return [], {"build_py": setup_helpers.with_autoload_pth(build_py)}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    exts = []
    cpu_sources = _sources("csrc/cpu/*.cpp")
    if cpu_sources and _flag("HF_INT8_BUILD_CPU"):
        exts.append(
            CppExtension(
                "hf_int8._C",
                cpu_sources,
                include_dirs=INCLUDE_DIRS,
                extra_compile_args=cxx_flags,
                extra_link_args=["-fopenmp"],
            )
        )
    cuda_mode = setup_helpers.cuda_mode()
    cuda_problem = (
        "HF_INT8_BUILD_CUDA=0" if cuda_mode == "off" else setup_helpers.cuda_problem(torch.version.cuda, CUDA_HOME)
    )
    if cuda_problem and cuda_mode == "required":
        raise SystemExit(f"hf_int8: HF_INT8_BUILD_CUDA={os.environ['HF_INT8_BUILD_CUDA']} but {cuda_problem}")
    build_cuda = cuda_problem is None
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    if build_cuda and cuda_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        targets = _cuda_targets()
        print(
            f"hf_int8: building CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
            f"(targets {targets})"
        )
        exts.append(
            CUDAExtension(
                "hf_int8._C_cuda",
                cuda_sources,
                include_dirs=INCLUDE_DIRS,
                extra_compile_args={
                    "cxx": ["-O3", f"-DHF_INT8_CUDA_TARGETS={targets}"],
                    # No --use_fast_math: its approximate division and flush-to-zero would change the int8
                    # codes and scales, which must match the reference bit for bit (csrc/include/hf_int8).
                    "nvcc": ["-O3", "-lineinfo", "-Xptxas=-v"],
                },
            )
        )
    else:
        print(f"hf_int8: not building the CUDA kernels: {cuda_problem or 'no csrc/cuda sources'}")
    jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
    os.environ.setdefault("MAX_JOBS", jobs)
    build_ext = setup_helpers.with_cpu_fallback(BuildExtension, strict=cuda_mode == "required")
    return exts, {
        "build_ext": build_ext.with_options(use_ninja=shutil.which("ninja") is not None),
        "build_py": setup_helpers.with_autoload_pth(build_py),
    }


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
