"""Building blocks of the STAR stacked hourglass.

Attribute names (``conv``, ``bn``, ``bn1``..``conv3``, ``skip_layer``, ``up1``,
``low1``..``low3``, ``coordconv``) are chosen so that a model's ``state_dict``
has exactly the keys of the authors' published checkpoints, which therefore
load strictly, without any key renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..definitions import LandmarkDefinition
from ..heatmaps import coordinate_axes

__all__ = [
    "BOUNDARY_THRESHOLD",
    "Bottleneck",
    "ConvLayer",
    "CoordConv",
    "EdgeToPoint",
    "Hourglass",
    "UnusedSkip",
    "coordinate_channels",
]

# A pixel belongs to the "boundary" when the guiding heatmap exceeds this value
# (AdaptiveWingLoss' CoordConv, which STAR inherits).
BOUNDARY_THRESHOLD = 0.05


class ConvLayer(nn.Module):
    """Convolution with bias, then optional BatchNorm and ReLU ("same" padding for odd kernels)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        norm: bool = False,
        act: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=(kernel_size - 1) // 2
        )
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.act = nn.ReLU(inplace=True) if act else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.act is not None:
            x = self.act(x)
        return x


def coordinate_channels(height: int, width: int, device=None, dtype=None) -> Tensor:
    """The three CoordConv channels for an (height, width) map, shape (1, 3, height, width).

    Channel 0 varies down the rows and channel 1 across the columns, both from
    -1 to 1; channel 2 is the distance from the centre divided by its maximum.
    This order is the original's: its channel named "x" is built with a
    transpose and ends up holding the *row* coordinate.  Trained weights depend
    on it, so it is kept (the grid is computed in float32 as the original does,
    then cast).
    """
    cols, rows = coordinate_axes(height, width, device)  # float32, as the original
    row_channel = rows.view(height, 1).expand(height, width)
    col_channel = cols.view(1, width).expand(height, width)
    radius = torch.sqrt(row_channel.pow(2) + col_channel.pow(2))
    radius = radius / radius.max()
    grid = torch.stack([row_channel, col_channel, radius]).unsqueeze(0)
    return grid if dtype is None else grid.to(dtype)


class CoordConv(ConvLayer):
    """A ConvLayer that sees its input plus coordinate channels (CoordConv, with radius).

    With ``boundary=True`` it also takes a (B, 1, H, W) guide map and adds two
    more channels: the row and column coordinates where the guide exceeds
    ``BOUNDARY_THRESHOLD``, zero elsewhere.  Input order of the convolution:
    features, row, column, radius, boundary row, boundary column.

    The grid is sized from the feature map itself (the original fixes it at
    construction from ``image size / nstack``, right only for 4 stacks at 256 px)
    and cached per (size, device, dtype), so forward never syncs with the host.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        norm: bool = False,
        act: bool = False,
        boundary: bool = False,
    ) -> None:
        extra = 3 + (2 if boundary else 0)
        super().__init__(in_channels + extra, out_channels, kernel_size, stride, norm, act)
        self.boundary = boundary
        self._grids: dict[tuple, Tensor] = {}

    def _grid(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        if torch.compiler.is_compiling():
            # Let the compiler see (and constant-fold) the construction.
            return coordinate_channels(height, width, x.device, x.dtype)
        key = (height, width, x.device, x.dtype)
        grid = self._grids.get(key)
        if grid is None:
            grid = coordinate_channels(height, width, x.device, x.dtype)
            self._grids[key] = grid
        return grid

    def forward(self, x: Tensor, boundary: Tensor | None = None) -> Tensor:
        if self.boundary != (boundary is not None):
            raise ValueError(
                "CoordConv: a boundary map is required exactly when the layer was built "
                f"with boundary=True (built with boundary={self.boundary})"
            )
        grid = self._grid(x)
        batch = x.shape[0]
        parts = [x, grid.expand(batch, -1, -1, -1)]
        if boundary is not None:
            coords = grid[:, :2]
            parts.append(torch.where(boundary > BOUNDARY_THRESHOLD, coords, 0.0))
        return super().forward(torch.cat(parts, dim=1))

    def extra_repr(self) -> str:
        return f"boundary={self.boundary}"


class _ConvWeights(nn.Module):
    """A 1x1 conv's weight and bias held as buffers (saved and loaded, never trained)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(out_channels, in_channels, 1, 1))
        self.register_buffer("bias", torch.zeros(out_channels))


class UnusedSkip(nn.Module):
    """Placeholder for the skip conv of a block whose input and output widths agree.

    The original builds a 1x1 skip conv in every block and uses it only when the
    widths differ; its checkpoints therefore carry ``skip_layer.conv.*`` for
    every block.  Holding those as buffers keeps the state dict identical while
    the optimiser, weight decay and DDP's unused-parameter check never see them.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = _ConvWeights(in_channels, out_channels)


class Bottleneck(nn.Module):
    """Pre-activation residual bottleneck: (BN, ReLU, conv) x 3 with 1x1 / 3x3 / 1x1 kernels.

    The middle width is half the output width; the shortcut is a 1x1 conv when
    the widths differ and the identity otherwise.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = ConvLayer(in_channels, mid, 1)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = ConvLayer(mid, mid, 3)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = ConvLayer(mid, out_channels, 1)
        self.identity_shortcut = in_channels == out_channels
        self.skip_layer: nn.Module = (
            UnusedSkip(in_channels, out_channels)
            if self.identity_shortcut
            else ConvLayer(in_channels, out_channels, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.identity_shortcut else self.skip_layer(x)
        out = self.conv1(F.relu(self.bn1(x), inplace=True))
        out = self.conv2(F.relu(self.bn2(out), inplace=True))
        out = self.conv3(F.relu(self.bn3(out), inplace=True))
        return out + shortcut


class Hourglass(nn.Module):
    """One hourglass: a full-resolution branch plus a pooled branch that recurses ``depth`` times.

    ``up1`` keeps the resolution; ``low1`` -> ``low2`` (the next level, or a
    block at the bottom) -> ``low3`` runs at half resolution and is upsampled
    (nearest) back before the sum.  An optional ``coordconv`` (1x1) at the top
    mixes coordinate channels into the input first.
    """

    def __init__(self, depth: int, channels: int, coordconv: CoordConv | None = None) -> None:
        super().__init__()
        self.coordconv = coordconv
        self.up1 = Bottleneck(channels, channels)
        self.low1 = Bottleneck(channels, channels)
        self.low2: nn.Module = (
            Hourglass(depth - 1, channels) if depth > 1 else Bottleneck(channels, channels)
        )
        self.low3 = Bottleneck(channels, channels)

    def forward(self, x: Tensor, boundary: Tensor | None = None) -> Tensor:
        if self.coordconv is not None:
            x = self.coordconv(x, boundary)
        full = self.up1(x)
        low = self.low3(self.low2(self.low1(F.max_pool2d(x, 2, 2))))
        return full + F.interpolate(low, scale_factor=2.0, mode="nearest")


class EdgeToPoint(nn.Module):
    """Maps edge maps to per-point weights: each point sums the maps of the edges it lies on.

    A fixed 1x1 convolution whose weight (N, E, 1, 1) is the point/edge
    incidence of the landmark definition; points on no edge get a bias of 1 so
    the AAM leaves them ungated by edges.
    """

    def __init__(self, definition: LandmarkDefinition) -> None:
        super().__init__()
        incidence = torch.tensor(definition.edge_point_matrix(), dtype=torch.float32).reshape(
            definition.num_points, definition.num_edges
        )
        on_no_edge = (incidence.sum(dim=1) < 0.5).float()
        self.register_buffer("weight", incidence[:, :, None, None].clone())
        self.register_buffer("bias", on_no_edge)

    def forward(self, edgemaps: Tensor) -> Tensor:
        return F.conv2d(edgemaps, self.weight.to(edgemaps.dtype), self.bias.to(edgemaps.dtype))
