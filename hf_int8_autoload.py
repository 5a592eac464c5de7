"""hf_int8's start-up hook: ``llmint8`` works in a program that never writes ``import hf_int8``.

``hf_int8_autoload.pth``, installed into site-packages next to this module, imports it when the interpreter starts.
Importing it puts one finder at the front of ``sys.meta_path`` and nothing else: it imports no module that is not
already loaded at start-up (``sys``, ``os``), so torch and transformers are not loaded by it. The finder ignores every
import except those named in :data:`TRIGGERS`; when one of those modules has finished executing, it imports the
hf_int8 module that registers hf_int8 with it:

* ``transformers.quantizers.auto`` (transformers' quantizer registry) -> ``import hf_int8``, which registers the
  ``llmint8`` quantization config and quantizer;
* ``peft`` -> ``import hf_int8.peft``, which lets PEFT's LoRA wrap :class:`hf_int8.Int8Linear` layers.

A program that imports neither never imports hf_int8. ``HF_INT8_NO_AUTOLOAD=1`` in the environment turns the hook off
(then ``import hf_int8`` / ``import hf_int8.peft`` do the same by hand). ``import hf_int8`` first keeps working: every
registration is idempotent.
"""

# No `from __future__ import annotations`: it would load the __future__ module into every interpreter.
import os
import sys

ENV_VAR = "HF_INT8_NO_AUTOLOAD"
# module whose import completes -> hf_int8 module to import right after it
TRIGGERS = {"transformers.quantizers.auto": "hf_int8", "peft": "hf_int8.peft"}


def disabled() -> bool:
    """True when ``HF_INT8_NO_AUTOLOAD`` is set to anything but an empty string or ``0``."""
    return os.environ.get(ENV_VAR, "") not in ("", "0")


class _RegisterAfterLoad:
    """Loader wrapper: executes the module with its real loader, then imports the hf_int8 module that registers."""

    def __init__(self, loader, spec, finder: "AutoloadFinder", action: str) -> None:
        self._loader, self._spec, self._finder, self._action = loader, spec, finder, action

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        # Put the real loader back first: the imported module must look as if no hook had been there (reload(),
        # inspect and importlib.resources go through __loader__ / __spec__.loader).
        module.__loader__ = self._spec.loader = self._loader
        self._loader.exec_module(module)  # an error here propagates: the user's import fails as it would anyway
        self._finder.fired(self._spec.name)
        try:
            __import__(self._action)
        except Exception as exc:  # never break the user's import of transformers/peft because of hf_int8
            import warnings

            warnings.warn(
                f"hf_int8 autoload: importing {self._action} after {self._spec.name} failed ({exc!r}); llmint8 is not "
                f"registered. Set {ENV_VAR}=1 to turn the hook off, or import {self._action} yourself to see why.",
                RuntimeWarning,
                stacklevel=2,
            )

    def __getattr__(self, name: str):  # get_source, get_filename, is_package, ... of the real loader
        return getattr(self._loader, name)


class AutoloadFinder:
    """``sys.meta_path`` finder that answers ``None`` (no opinion) for every module but the pending triggers."""

    def __init__(self, triggers: dict[str, str]) -> None:
        self.pending = dict(triggers)

    def find_spec(self, fullname: str, path=None, target=None):
        action = self.pending.get(fullname)
        if action is None:
            return None  # the common case: one dict lookup per import
        for finder in sys.meta_path:
            if finder is self or getattr(finder, "find_spec", None) is None:
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _RegisterAfterLoad(spec.loader, spec, self, action)
        return spec

    def fired(self, fullname: str) -> None:
        """Forget a trigger that has run; leave ``sys.meta_path`` once none is left."""
        self.pending.pop(fullname, None)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)

    def __repr__(self) -> str:
        return f"<hf_int8 AutoloadFinder waiting for {sorted(self.pending)}>"


def install() -> AutoloadFinder | None:
    """Put the finder on ``sys.meta_path`` (once); returns it, or ``None`` when turned off by ``HF_INT8_NO_AUTOLOAD``.

    A trigger module that is already imported is not waited for (it would never be imported again).
    """
    if disabled():
        return None
    for finder in sys.meta_path:
        if isinstance(finder, AutoloadFinder):
            return finder
    finder = AutoloadFinder({name: action for name, action in TRIGGERS.items() if name not in sys.modules})
    if finder.pending:
        sys.meta_path.insert(0, finder)
    return finder
