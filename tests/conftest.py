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
