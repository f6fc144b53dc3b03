"""Mixed precision: the one ``autocast`` that training, evaluation and PyTorch inference share.

The precisions a user can ask for are :data:`staralign.config.AMP_MODES` ("none", "bf16",
"fp16"); here each mixed one is mapped to its torch dtype and entered as ``torch.autocast``.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["AMP_DTYPES", "autocast"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device | str, amp: str | None) -> contextlib.AbstractContextManager:
    """Mixed precision for ``amp`` in ``AMP_DTYPES`` (or nothing when None or "none").

    The weight-cast cache is off: each weight is used once per forward, so it
    saves nothing, and a cache filled during CUDA graph capture would be freed
    under the graph.
    """
    if amp in (None, "", "none"):
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=AMP_DTYPES[amp], cache_enabled=False)
