"""Shared test setup: markers (gpu, slow) and where the shared assets are."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
STORIES260K = SHARED / "models" / "stories260K"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow; run with --runslow")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def stories260k() -> Path:
    if not (STORIES260K / "model.safetensors").is_file():
        pytest.skip(f"{STORIES260K} not present")
    return STORIES260K


# Make helper modules in tests/ (tiny_models.py) importable from every test folder.
import sys as _sys

_sys.path.insert(0, str(Path(__file__).resolve().parent))
