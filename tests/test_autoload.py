"""The start-up hook (hf_int8_autoload.pth + hf_int8_autoload.py) in this environment's own install (editable here).

Each check runs a new interpreter, since the hook acts at interpreter start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = (
    "import json, sys; "
    "print(json.dumps({'heavy': sorted(m for m in ('torch', 'transformers', 'peft', 'hf_int8') if m in sys.modules), "
    "'finders': [type(f).__name__ for f in sys.meta_path if type(f).__name__ == 'AutoloadFinder']}))"
)


def _python(code: str, **env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if k != "HF_INT8_NO_AUTOLOAD"}
    full.update(env, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_start_up_imports_nothing_heavy_and_installs_one_finder():
    assert _python(PROBE) == {"heavy": [], "finders": ["AutoloadFinder"]}


def test_environment_variable_turns_the_hook_off():
    assert _python(PROBE, HF_INT8_NO_AUTOLOAD="1") == {"heavy": [], "finders": []}


REGISTERED = (
    "; import json, sys; from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING; "
    "from peft.tuners.lora.model import LoraModel; "
    "print(json.dumps({'llmint8': 'llmint8' in AUTO_QUANTIZER_MAPPING, "
    "'lora': getattr(LoraModel._create_new_module, '_hf_int8_patched', False), "
    "'finder_left': any(type(f).__name__ == 'AutoloadFinder' for f in sys.meta_path)}))"
)


@pytest.mark.parametrize(
    "first",
    ["from transformers import AutoModelForCausalLM", "import peft", "import hf_int8", "import hf_int8.peft"],
)
def test_registration_happens_whatever_is_imported_first(first):
    """No import cycle whichever module comes first; once both triggers fired the finder leaves sys.meta_path."""
    assert _python(first + REGISTERED) == {"llmint8": True, "lora": True, "finder_left": False}


def test_transformers_alone_does_not_import_peft_support():
    out = _python(
        "import json, sys, transformers.quantizers.auto; "
        "print(json.dumps({'hf_int8': 'hf_int8' in sys.modules, 'peft': 'hf_int8.peft' in sys.modules}))"
    )
    assert out == {"hf_int8": True, "peft": False}
