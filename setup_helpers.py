"""Build-time helpers for ``setup.py`` (not installed): which torch to build against, whether the CUDA toolkit can
build the CUDA kernels, a ``build_ext`` that falls back to the CPU kernels, and a ``build_py`` that installs the
start-up hook ``hf_int8_autoload.pth``. Standard library only at import time, so the tests can import it cheaply.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import sysconfig

CUDA_EXTENSION = "hf_int8._C_cuda"
CUDA_ENV = "HF_INT8_BUILD_CUDA"
AUTOLOAD_PTH = "hf_int8_autoload.pth"
# site.py executes a .pth line that starts with "import"; the module it names imports only sys and os.
AUTOLOAD_PTH_LINE = "import hf_int8_autoload; hf_int8_autoload.install()\n"
# setup.py commands that compile the kernels, so need torch (sdist, egg_info, dist_info only write metadata/sources)
BUILDING_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop", "bdist_egg"}
FALSY = ("0", "", "false", "False", "no", "off")


def import_torch(argv: list[str] | None = None):
    """The torch module to compile against, or ``None`` when the command builds nothing (sdist, metadata).

    ``pip install <checkout>`` builds in an isolated environment that hides the packages of the environment it
    installs into. The kernels must be compiled against the torch they will run with, not a second copy that build
    isolation would download, so when torch is not importable this looks in the target interpreter's own
    site-packages (pip runs the build with that interpreter) and uses the torch installed there.
    """
    try:
        import torch

        return torch
    except ImportError:
        pass
    paths = sysconfig.get_paths()
    for site in dict.fromkeys((paths["platlib"], paths["purelib"])):
        if os.path.isdir(os.path.join(site, "torch")) and site not in sys.path:
            sys.path.append(site)  # appended: the build environment's setuptools/wheel/ninja keep precedence
            import torch

            print(
                f"hf_int8: building against torch {torch.__version__} of {sys.prefix} (the environment being "
                "installed into, hidden by pip's build isolation)"
            )
            return torch
    argv = sys.argv[1:] if argv is None else argv
    if BUILDING_COMMANDS.isdisjoint(argv):
        return None
    raise SystemExit(
        f"hf_int8: torch is not installed in {sys.prefix}. hf_int8 compiles its kernels against the torch it will run "
        "with, so install torch first (pip install torch), then install hf_int8 again. Building from an isolated "
        "environment that has no torch (python -m build) needs --no-isolation there; HF_INT8_BUILD_NATIVE=0 installs "
        "without native kernels."
    )


def cuda_mode(environ: dict[str, str] | None = None) -> str:
    """``"off"`` (``HF_INT8_BUILD_CUDA=0``), ``"required"`` (set to anything else) or ``"auto"`` (unset)."""
    value = (os.environ if environ is None else environ).get(CUDA_ENV)
    if value is None:
        return "auto"
    return "off" if value.strip() in FALSY else "required"


def nvcc_release(nvcc: str, timeout: float = 60.0) -> tuple[int, int] | str:
    """``(major, minor)`` from ``nvcc --version``, or a string saying why it could not be read."""
    try:
        done = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{nvcc} does not run ({exc})"
    found = re.search(r"release (\d+)\.(\d+)", done.stdout)
    if done.returncode != 0 or found is None:
        output = (done.stdout + done.stderr).strip().splitlines()
        return f"{nvcc} --version failed (exit {done.returncode}: {output[-1] if output else 'no output'})"
    return int(found.group(1)), int(found.group(2))


def cuda_problem(torch_cuda: str | None, cuda_home: str | None) -> str | None:
    """Why the CUDA kernels cannot be built with this torch and toolkit, or ``None`` when they can.

    ``cuda_home`` is the toolkit root torch's build uses (``torch.utils.cpp_extension.CUDA_HOME``: ``CUDA_HOME``, or a
    guess from the ``nvcc`` on PATH). Checked: nvcc exists and runs, the CUDA runtime headers are where torch's build
    looks for them, and nvcc's major version is torch's (torch refuses to build otherwise).
    """
    if torch_cuda is None:
        return "torch is a CPU-only build"
    if not cuda_home:
        return "no CUDA toolkit found (no nvcc on PATH; set CUDA_HOME)"
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not os.path.isfile(nvcc):
        return f"no nvcc in CUDA_HOME={cuda_home!r} (set CUDA_HOME to a CUDA toolkit)"
    header = os.path.join(cuda_home, "include", "cuda_runtime.h")
    if not os.path.isfile(header):
        return f"the CUDA toolkit in CUDA_HOME={cuda_home!r} is incomplete: no {header} (set CUDA_HOME to a full one)"
    release = nvcc_release(nvcc)
    if isinstance(release, str):
        return release
    if str(release[0]) != torch_cuda.split(".")[0]:
        return (
            f"nvcc in CUDA_HOME={cuda_home!r} is CUDA {release[0]}.{release[1]} but torch was built with CUDA "
            f"{torch_cuda} (the major versions must match)"
        )
    return None


def with_cpu_fallback(build_ext_cls: type, strict: bool) -> type:
    """A subclass of ``build_ext_cls`` that, unless ``strict``, drops the CUDA extension when it fails to build.

    The toolkit checks of :func:`cuda_problem` catch the usual broken set-ups before compiling anything; this covers
    the rest (an unsupported host compiler, a toolkit that cannot compile the kernels): the CPU kernels are built and
    installed either way, and the one line printed says why the CUDA ones are missing.
    """

    class BuildExtWithCpuFallback(build_ext_cls):
        def build_extension(self, ext) -> None:
            self._hf_int8_building = ext.name
            super().build_extension(ext)

        def build_extensions(self) -> None:
            pristine = copy.deepcopy(self.extensions)  # the base class adds flags to the extensions it is given
            self._hf_int8_building = None
            try:
                super().build_extensions()
            except Exception as exc:
                failed = self._hf_int8_building
                has_cuda = any(ext.name == CUDA_EXTENSION for ext in self.extensions)
                # failed is None: the error came before any compile, from torch's CUDA version/compiler checks
                if strict or not has_cuda or failed not in (None, CUDA_EXTENSION):
                    raise
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                print(
                    f"hf_int8: the CUDA kernels failed to build ({first_line}); installing the CPU kernels only "
                    f"(set {CUDA_ENV}=1 to make this an error)"
                )
                self.extensions = [ext for ext in pristine if ext.name != CUDA_EXTENSION]
                super().build_extensions()

    return BuildExtWithCpuFallback


def with_autoload_pth(build_py_cls: type) -> type:
    """A subclass of ``build_py_cls`` that also writes ``hf_int8_autoload.pth`` at the root of what gets installed.

    A regular wheel installs ``build_lib`` into site-packages. An editable wheel (``pip install -e``) installs only
    the files put directly into its unpacked tree, which setuptools' ``editable_wheel`` sets as ``install_lib``.
    """

    class BuildPyWithAutoload(build_py_cls):
        def run(self) -> None:
            super().run()
            folders = [self.build_lib]
            if getattr(self, "editable_mode", False):
                folders.append(self.get_finalized_command("install").install_lib)
            for folder in folders:
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, AUTOLOAD_PTH), "w", encoding="utf-8") as f:
                    f.write(AUTOLOAD_PTH_LINE)

        def get_outputs(self, *args, **kwargs) -> list[str]:
            return [*super().get_outputs(*args, **kwargs), os.path.join(self.build_lib, AUTOLOAD_PTH)]

    return BuildPyWithAutoload
