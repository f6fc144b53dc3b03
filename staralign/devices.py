"""Choosing the device a command runs on."""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU if there is one, else the CPU.

    ``cuda`` without an index picks GPU ``local_rank`` (one per process under torchrun).
    Asking for CUDA where there is none is a ValueError with a clear message.
    """
    text = str(name)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(text)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(name)!r} asked for, but no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev
