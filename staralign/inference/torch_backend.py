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

    def __init__(self, model: nn.Module, device: str | torch.device = "auto") -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.definition: LandmarkDefinition = model.definition
        self.input_size: int = int(model.config.input_size)
        self.conversions: dict[str, np.ndarray] = {}  # none stored: the data package has them
        self.has_ambiguity = True

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto", allow_pickle: bool = False,
                        ema: bool = False, definition: str | Path | LandmarkDefinition | None = None
                        ) -> TorchBackend:
        """Load an official ``.pkl``/``.pth`` or a staralign ``.safetensors`` file."""
        model = load_model(path, map_location="cpu", ema=ema, definition=definition, allow_pickle=allow_pickle)
        return cls(model, device)

    def run(self, batch: np.ndarray, ambiguity: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Landmarks (B, N, 2) and, with ``ambiguity``, covariances (B, N, 2, 2), normalised units."""
        with torch.inference_mode():
            images = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device)
            out = self.model(images, all_stacks=False)
            landmarks = out.landmarks.float().cpu().numpy()
            cov = heatmap_moments(out.heatmaps[-1].float()).covariance.cpu().numpy() if ambiguity else None
        return landmarks, cov
