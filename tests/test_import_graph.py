"""The package's layers import only downwards, and private transformers/PEFT names are used in one module.

Layers, lowest first: ops < nn < checkpoint < integration < the top (cli, peft, analysis, metrics, the package's
``__init__``). Every import of every hf_int8 module is read with ``ast``, module-level and inside functions alike.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hf_int8"
LAYERS = {"ops": 0, "_extension": 0, "_version": 0, "nn": 1, "checkpoint": 2, "integration": 3}
TOP = 4
COMPAT = "hf_int8.integration._compat"
# transformers/PEFT modules and names that are not public API although their names do not start with "_"
PRIVATE_MODULES = (
    "transformers.core_model_loading",
    "transformers.quantizers.quantizers_utils",
    "transformers.pytorch_utils",
    "transformers.distributed.tensor_parallel",
    "transformers.distributed.parallel_utils",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], TOP) if len(parts) > 1 else TOP


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, absolute module, imported names)`` of every import statement in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [alias.name for alias in node.names]
            # "from . import x" / "from .. import x" import submodules: check each as a module
            if not node.module and node.level:
                found.extend((node.lineno, f"{module}.{name}", []) for name in names)
            else:
                found.append((node.lineno, module, names))
    return found


def _all_imports() -> list[tuple[str, int, str, list[str]]]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20, files  # the walk found the package
    return [(_module_name(path), *imp) for path in files for imp in _imports(path)]


def test_relative_imports_are_resolved():
    resolved = {(mod, target) for mod, _, target, _ in _all_imports()}
    assert ("hf_int8.integration.quantizer", "hf_int8.checkpoint.format") in resolved
    assert ("hf_int8.nn.int8_linear", "hf_int8.ops") in resolved
    assert ("hf_int8", "hf_int8.integration.quantizer") in resolved


def test_no_layer_imports_a_higher_one():
    upward = [
        f"{mod}:{line} imports {target}"
        for mod, line, target, _ in _all_imports()
        if target.startswith("hf_int8") and _layer(target) > _layer(mod)
    ]
    assert upward == []


def test_the_checkpoint_layer_never_imports_transformers():
    offending = [
        f"{mod}:{line} imports {target}"
        for mod, line, target, _ in _all_imports()
        if mod.startswith("hf_int8.checkpoint") and target.split(".")[0] in ("transformers", "peft")
    ]
    assert offending == []


def _private(target: str, names: list[str]) -> bool:
    if target.split(".")[0] not in ("transformers", "peft"):
        return False
    if any(part.startswith("_") for part in target.split(".")) or target.startswith(PRIVATE_MODULES):
        return True
    return any(name.startswith("_") for name in names)


def test_private_transformers_and_peft_names_are_imported_only_in_compat():
    offending = [
        f"{mod}:{line} imports {target} {names}"
        for mod, line, target, names in _all_imports()
        if mod != COMPAT and _private(target, names)
    ]
    assert offending == []


@pytest.mark.parametrize(
    "target, names, private",
    [
        ("transformers.core_model_loading", ["ConversionOps"], True),
        ("transformers.quantizers.quantizers_utils", ["get_module_from_name"], True),
        ("transformers.utils._private", [], True),
        ("peft.tuners.tuners_utils", ["_maybe_include_all_linear_layers"], True),
        ("transformers", ["AutoConfig"], False),
        ("transformers.quantizers", ["HfQuantizer"], False),
        ("torch.utils._python_dispatch", ["_disable_current_modes"], False),
    ],
)
def test_the_private_name_rule(target, names, private):
    assert _private(target, names) is private
