"""Training targets: one Gaussian *point map* per landmark and one *edge map* per curve.

One module per algorithm, each with its numpy form (built in the loader workers) and
its torch form (built on the device, batched) side by side; both give the authors' maps
(``tests/test_data_targets.py`` checks them against the authors' numbers and a literal
re-statement of their recipe):

* :mod:`.points`: point maps (``point_maps``, ``point_maps_torch``);
* :mod:`.splines`: the spline through an edge's landmarks (``fit_edge_curve``, ``CurvePlan``);
* :mod:`.edges`: edge maps, those splines rasterised (``edge_maps``, ``edge_maps_torch``).

This package holds :func:`batch_targets`, the one place that puts both kinds of maps
of a training batch on the device, whichever side built them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...definitions import LandmarkDefinition
from .edges import edge_maps_torch
from .points import point_maps_torch

__all__ = ["batch_targets"]


def batch_targets(
    batch: dict, definition: LandmarkDefinition, image_size: int, heatmap_size: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """(point maps, edge maps) of a batch on ``device``: those the loader built (``"pointmaps"`` /
    ``"edgemaps"`` keys) are moved there, the others built there from ``batch["points"]``.

    Where each map is built is a speed choice only: both ways give the same maps.
    """
    built = {k: batch[k].to(device, non_blocking=True) for k in ("pointmaps", "edgemaps") if k in batch}
    if len(built) < 2:
        points = batch["points"].to(device, non_blocking=True)
        if "pointmaps" not in built:
            built["pointmaps"] = point_maps_torch(points, image_size, heatmap_size)
        if "edgemaps" not in built:
            built["edgemaps"] = edge_maps_torch(points, definition, image_size, heatmap_size)
    return built["pointmaps"], built["edgemaps"]
