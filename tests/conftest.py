"""Shared fixtures: the authors' reference values and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The authors' reference values: ../shared/reference beside the checkout, or $STARALIGN_REFERENCE_DIR.
REFERENCE_DIR = Path(
    os.environ.get("STARALIGN_REFERENCE_DIR")
    or Path(__file__).resolve().parents[1].parent / "shared" / "reference"
)


def reference_path(name: str) -> Path:
    """Path of a file in ../shared/reference, or skip the test with a clear message."""
    path = REFERENCE_DIR / name
    if not path.exists():
        pytest.skip(f"reference values not available: {path} is absent "
                    "(the authors' numbers live in ../shared/reference)")
    return path


def load_reference(name: str):
    return torch.load(reference_path(name), weights_only=True)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Small tests run faster single-threaded on 2 cores and are reproducible.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(autouse=True)
def _no_downloads(tmp_path_factory, monkeypatch):
    # Tests never reach beyond 127.0.0.1: every test starts with an empty download cache
    # and STARALIGN_OFFLINE set; tests of downloads (tests/test_hub.py) lift it and serve
    # files from a local server.  A test needing a cached file copies it into the cache.
    monkeypatch.setenv("STARALIGN_CACHE", str(tmp_path_factory.mktemp("staralign_cache")))
    monkeypatch.setenv("STARALIGN_OFFLINE", "1")
    monkeypatch.delenv("STARALIGN_MIRROR", raising=False)


SHARED_MODELS_DIR = REFERENCE_DIR.parent / "models"


@pytest.fixture
def yunet_cached() -> Path:
    """The YuNet file (from ../shared/models) in the test's download cache; skips if absent."""
    from staralign.hub import cached_path

    source = SHARED_MODELS_DIR / "face_detection_yunet_2026may.onnx"
    if not source.is_file():
        pytest.skip(f"YuNet test file not available: {source} is absent")
    target = cached_path("yunet")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())
    return target


@pytest.fixture(scope="session")
def tiny_wflw_weights(tmp_path_factory):
    """A tiny WFLW network (1 stack, 32 channels, 64 px, seed 0) saved as safetensors: the
    model the web, video and CLI tests run (read-only)."""
    from staralign.config import ModelConfig
    from staralign.models import build_model, save_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(nstack=1, channels=32, input_size=64, nlevels=2), "WFLW").eval()
    return save_model(model, tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture(scope="session")
def nan_wflw_weights(tmp_path_factory):
    """The tiny WFLW network with every parameter NaN (a diverged run), as ``diverged.safetensors``."""
    from staralign.config import ModelConfig
    from staralign.models import build_model, save_model

    model = build_model(ModelConfig(nstack=1, channels=32, input_size=64, nlevels=2), "WFLW").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return save_model(model, tmp_path_factory.mktemp("nan_model") / "diverged.safetensors")
