"""The STAR network: a stacked hourglass with CoordConv and the anisotropic attention module.

Per stack ``i`` the features go through an hourglass and a feature block, then
three 1x1 heads:

* heatmaps: instance norm + ReLU, one map per landmark;
* point maps (sigmoid, one per landmark) and edge maps (sigmoid, one per edge
  of the landmark definition) -- the AAM, only with ``use_aam``.

The AAM gates the heatmaps: ``fused = e2h(edgemaps) * pointmaps * heatmaps``,
where ``e2h`` spreads each edge map to the points on that edge.  The landmarks
are the soft-argmax of the fused heatmaps.  Between stacks the features, raw
heatmaps, point maps and edge maps are merged back (1x1 convs) into the next
stack's input, and from the second stack on the hourglass' CoordConv also gets
"boundary" channels guided by the previous stack's last heatmap.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig
from ..definitions import LandmarkDefinition, get_definition
from ..heatmaps import soft_argmax
from .layers import Bottleneck, ConvLayer, CoordConv, EdgeToPoint, Hourglass

__all__ = ["StackedHourglassNet", "StarOutput", "build_model"]

IMAGE_CHANNELS = 3


class StarOutput(NamedTuple):
    """What the network returns (a NamedTuple, so it survives torch.compile and ONNX export).

    ``heatmaps`` are the fused heatmaps (equal to the raw ones without the AAM);
    the per-stack tuples hold one entry per stack, or only the last stack's
    with ``forward(..., all_stacks=False)``; ``pointmaps``/``edgemaps`` are
    empty without the AAM.
    """

    landmarks: Tensor  # (B, N, 2) normalised (x, y) in [-1, 1], last stack
    heatmaps: tuple[Tensor, ...]  # per stack (B, N, H/4, W/4)
    pointmaps: tuple[Tensor, ...]  # per stack (B, N, H/4, W/4)
    edgemaps: tuple[Tensor, ...]  # per stack (B, E, H/4, W/4)


class StackedHourglassNet(nn.Module):
    """STAR's stacked hourglass for one landmark definition.

    ``config`` fixes the shape (stacks, depth, width, AAM, CoordConv); the
    input may be any square or rectangular size whose sides are multiples of
    ``4 * 2 ** nlevels``.
    """

    def __init__(self, config: ModelConfig, definition: LandmarkDefinition) -> None:
        super().__init__()
        config.validate()
        if config.use_aam and definition.num_edges == 0:
            raise ConfigError(
                f"model.use_aam: landmark definition {definition.name!r} has no edges; "
                "the AAM needs at least one (or set use_aam: false)"
            )
        self.config = dataclasses.replace(config)
        self.definition = definition
        self.nstack = config.nstack
        self.use_aam = config.use_aam
        self.add_coord = config.add_coord
        self.size_unit = 4 * 2**config.nlevels

        width = config.channels
        num_points = definition.num_points
        stem_conv = CoordConv if config.add_coord else ConvLayer
        stem1, stem2 = config.stem_channels
        # The stem runs at half and quarter resolution: most of a small model's cost is here.
        self.pre = nn.Sequential(
            stem_conv(IMAGE_CHANNELS, stem1, 7, stride=2, norm=True, act=True),
            Bottleneck(stem1, stem2),
            nn.MaxPool2d(2, 2),
            Bottleneck(stem2, stem2),
            Bottleneck(stem2, width),
        )
        self.hgs = nn.ModuleList(
            Hourglass(
                config.nlevels,
                width,
                CoordConv(width, width, 1, boundary=i > 0) if config.add_coord else None,
            )
            for i in range(config.nstack)
        )
        self.features = nn.ModuleList(
            nn.Sequential(Bottleneck(width, width), ConvLayer(width, width, 1, norm=True, act=True))
            for _ in range(config.nstack)
        )
        self.out_heatmaps = nn.ModuleList(
            ConvLayer(width, num_points) for _ in range(config.nstack)
        )
        if config.use_aam:
            num_edges = definition.num_edges
            self.e2h_transform = EdgeToPoint(definition)
            self.out_edgemaps = nn.ModuleList(
                ConvLayer(width, num_edges) for _ in range(config.nstack)
            )
            self.out_pointmaps = nn.ModuleList(
                ConvLayer(width, num_points) for _ in range(config.nstack)
            )
            self.merge_edgemaps = nn.ModuleList(
                ConvLayer(num_edges, width) for _ in range(config.nstack - 1)
            )
            self.merge_pointmaps = nn.ModuleList(
                ConvLayer(num_points, width) for _ in range(config.nstack - 1)
            )
        self.merge_features = nn.ModuleList(
            ConvLayer(width, width) for _ in range(config.nstack - 1)
        )
        self.merge_heatmaps = nn.ModuleList(
            ConvLayer(num_points, width) for _ in range(config.nstack - 1)
        )

    def _check_input(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != IMAGE_CHANNELS:
            raise ValueError(
                f"expected images of shape (B, {IMAGE_CHANNELS}, H, W), got {tuple(images.shape)}"
            )
        height, width = images.shape[-2:]
        if height % self.size_unit or width % self.size_unit:
            raise ValueError(
                f"image sides must be multiples of {self.size_unit} (4 * 2^nlevels), "
                f"got {height}x{width}"
            )

    def check_stacks(self, stacks: int | None) -> int:
        """The number of stacks to run for ``stacks`` (None: all); ValueError outside 1..nstack."""
        if stacks is None:
            return self.nstack
        if isinstance(stacks, bool) or not isinstance(stacks, int) or not 1 <= stacks <= self.nstack:
            raise ValueError(f"stacks must be an integer from 1 to {self.nstack} (this model's stacks), "
                             f"got {stacks!r}")
        return stacks

    def forward(self, images: Tensor, all_stacks: bool = True, stacks: int | None = None) -> StarOutput:
        """Run the stacks on (B, 3, H, W) images normalised to [-1, 1].

        ``all_stacks=False`` returns only the last stack's maps (what inference
        needs) and skips fusing the earlier ones; training wants every stack.
        ``stacks=K`` is early exit: the K-th stack's heatmaps give the landmarks
        and the later stacks are not run at all (cheaper, less accurate; None: all).
        """
        self._check_input(images)
        run = self.check_stacks(stacks)
        x = self.pre(images)
        fused_maps: list[Tensor] = []
        point_maps: list[Tensor] = []
        edge_maps: list[Tensor] = []
        heatmaps: Tensor | None = None
        for i in range(run):
            is_last = i == run - 1
            # The original guides the boundary channels with the previous stack's
            # *last* heatmap (its AdaptiveWing heritage: there it was a boundary map).
            boundary = heatmaps[:, -1:] if heatmaps is not None and self.add_coord else None
            feature = self.features[i](self.hgs[i](x, boundary))

            heatmaps = F.relu(F.instance_norm(self.out_heatmaps[i](feature)))
            if self.use_aam:
                pointmaps = torch.sigmoid(self.out_pointmaps[i](feature))
                edgemaps = torch.sigmoid(self.out_edgemaps[i](feature))

            if all_stacks or is_last:
                if self.use_aam:
                    fused_maps.append(self.e2h_transform(edgemaps) * pointmaps * heatmaps)
                    point_maps.append(pointmaps)
                    edge_maps.append(edgemaps)
                else:
                    fused_maps.append(heatmaps)

            if not is_last:
                x = x + self.merge_features[i](feature) + self.merge_heatmaps[i](heatmaps)
                if self.use_aam:
                    x = x + self.merge_pointmaps[i](pointmaps) + self.merge_edgemaps[i](edgemaps)

        # Decode in float32 even under autocast: half precision would quantise
        # normalised coordinates to ~1/256 of the image.
        landmarks = soft_argmax(fused_maps[-1])
        return StarOutput(landmarks, tuple(fused_maps), tuple(point_maps), tuple(edge_maps))


def build_model(
    config: ModelConfig, definition: str | Path | LandmarkDefinition | None = None
) -> StackedHourglassNet:
    """A randomly initialised network; ``definition`` (name, file or object) overrides the config's."""
    resolved = get_definition(definition if definition is not None else config.definition)
    return StackedHourglassNet(config, resolved)
