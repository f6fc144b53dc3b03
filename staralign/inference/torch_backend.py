"""Running the network with PyTorch for :class:`~staralign.inference.detector.LandmarkDetector`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..definitions import LandmarkDefinition
from ..devices import resolve_device
from ..heatmaps import heatmap_moments
from ..models import load_model

__all__ = ["TorchBackend", "resolve_device"]


class TorchBackend:
    """A STAR network on a device: (B, 3, S, S) float32 crops -> normalised landmarks and
    heatmap covariances (numpy)."""

    name = "torch"

    def __init__(self, model: nn.Module, device: str | torch.device = "auto", *, stacks: int | None = None,
                 amp: str | None = None, channels_last: bool = False, threads: int | None = None) -> None:
        """``stacks``: early exit at the K-th stack; ``amp`` ("bf16", "fp16") with ``channels_last``: the
        speed paths of :mod:`staralign.models.speed`; ``threads``: torch's intra-op threads on a CPU
        (default: torch's own count, capped at the CPUs this process may use,
        :func:`staralign.threads.resolve_threads`; the setting is process-wide)."""
        from ..threads import apply_torch_threads

        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.stacks = model.check_stacks(stacks) if stacks is not None else None
        self.amp = None if amp in (None, "", "none") else amp
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.device.type == "cpu":
            apply_torch_threads(threads)
        self.threads = torch.get_num_threads() if self.device.type == "cpu" else None
        self.definition: LandmarkDefinition = model.definition
        self.input_size: int = int(model.config.input_size)
        self.conversions: dict[str, np.ndarray] = {}  # none stored: the data package has them
        self.has_ambiguity = True

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto", allow_pickle: bool = False,
                        ema: bool = False, definition: str | Path | LandmarkDefinition | None = None,
                        **speed) -> TorchBackend:
        """Load an official ``.pkl``/``.pth`` or a staralign ``.safetensors`` file; ``speed``: see ``__init__``."""
        model = load_model(path, map_location="cpu", ema=ema, definition=definition, allow_pickle=allow_pickle)
        return cls(model, device, **speed)

    def run(self, batch: np.ndarray, ambiguity: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Landmarks (B, N, 2) and, with ``ambiguity``, covariances (B, N, 2, 2), normalised units."""
        from ..precision import autocast

        with torch.inference_mode():
            images = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.amp):
                out = self.model(images, all_stacks=False, stacks=self.stacks)
            landmarks = out.landmarks.float().cpu().numpy()
            cov = heatmap_moments(out.heatmaps[-1].float()).covariance.cpu().numpy() if ambiguity else None
        return landmarks, cov
