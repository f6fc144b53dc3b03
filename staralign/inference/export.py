"""ONNX export of a STAR network, checked against PyTorch with onnxruntime right away.

The graph takes ``images`` (B, 3, S, S) float32 -- BGR crops scaled as
``(pixel - 127.5) / 127.5``, exactly the PyTorch model's input -- and returns
``landmarks`` (B, N, 2), normalised [-1, 1] (align_corners=False).  With
``with_ambiguity`` it also returns the heatmap moments computed in the graph:
``covariance`` (B, N, 2, 2), ``eigenvalues`` (B, N, 2, ascending) and
``eigenvectors`` (B, N, 2, 2, columns: normal, tangent), in normalised units.

The landmark definition, input size, model config and the landmark conversions
from the model's layout (e.g. WFLW -> 300W) travel in the file's
``metadata_props`` under ``staralign`` (JSON), so the ``.onnx`` file alone is
enough for :class:`~staralign.inference.detector.LandmarkDetector`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import __version__
from .._io import atomic_path
from ..config import to_dict
from ..heatmaps import heatmap_moments
from .onnx_backend import FORMAT_NAME, FORMAT_VERSION, METADATA_KEY

__all__ = ["DEFAULT_OPSET", "ExportReport", "OnnxExportModule", "export_onnx", "onnx_metadata", "verify_onnx"]

DEFAULT_OPSET = 18
TOLERANCE = 1e-4  # largest landmark difference (normalised units) accepted between ORT and PyTorch
EXPORTERS = ("dynamo", "torchscript")


class OnnxExportModule(nn.Module):
    """The exported function: the network's last stack, decoded, plus optional moments."""

    def __init__(self, model: nn.Module, with_ambiguity: bool = False, stacks: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.with_ambiguity = with_ambiguity
        self.stacks = stacks  # early exit: only the first K stacks are in the graph

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.model(images, all_stacks=False, stacks=self.stacks)
        if not self.with_ambiguity:
            return (out.landmarks,)
        m = heatmap_moments(out.heatmaps[-1].float())
        return out.landmarks, m.covariance, m.eigenvalues, m.eigenvectors


def output_names(with_ambiguity: bool) -> list[str]:
    return ["landmarks", "covariance", "eigenvalues", "eigenvectors"] if with_ambiguity else ["landmarks"]


def onnx_metadata(model: nn.Module, with_ambiguity: bool, stacks: int | None = None) -> dict[str, Any]:
    """The JSON record stored in the file: everything inference needs besides the graph."""
    definition = model.definition
    from ..data.landmark_formats import CONVERSIONS, conversion_matrix

    conversions: dict[str, list] = {}
    for src, dst in CONVERSIONS:
        if src == definition.name.upper() and CONVERSIONS[(src, dst)][0] == definition.num_points:
            conversions[dst] = conversion_matrix(src, dst).tolist()
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "staralign_version": __version__,
        "input_size": int(model.config.input_size),
        "input": "images (B, 3, S, S) float32: BGR crop, (pixel - 127.5) / 127.5",
        "outputs": output_names(with_ambiguity),
        "definition": definition.to_dict(),
        "config": to_dict(model.config),
        "conversions": conversions,
        "stacks": int(stacks or model.config.nstack),  # stacks in the graph (early exit: fewer than nstack)
    }


@dataclass
class ExportReport:
    """What an export produced and how closely onnxruntime matched PyTorch."""

    path: Path
    opset: int
    exporter: str
    dynamic_batch: bool
    outputs: list[str]
    max_difference: float = float("nan")  # landmarks, normalised units
    moment_differences: dict[str, float] = field(default_factory=dict)
    tolerance: float = TOLERANCE
    checked_batches: list[int] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.max_difference <= self.tolerance)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "opset": self.opset, "exporter": self.exporter,
                "dynamic_batch": self.dynamic_batch, "outputs": self.outputs,
                "max_landmark_difference": self.max_difference, "moment_differences": self.moment_differences,
                "tolerance": self.tolerance, "checked_batches": self.checked_batches, "passed": self.passed}


def _example(size: int, batch: int, seed: int = 0) -> Tensor:
    """Face-like test input: smooth random blobs in [-1, 1] (pure noise decodes to flat heatmaps)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, max(2, size // 32), max(2, size // 32), generator=g) * 2 - 1
    smooth = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (smooth + 0.1 * torch.randn(batch, 3, size, size, generator=g)).clamp(-1, 1)


def _export_graph(module: nn.Module, example: Tensor, path: Path, opset: int, dynamic_batch: bool,
                  exporter: str, names: list[str]) -> None:
    quiet = io.StringIO()
    # The exporter narrates on stdout and logs "torchvision is not installed" warnings: noise here.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.ExitStack() as stack:
        stack.callback(logger.setLevel, level)
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dynamic = {"images": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None
            torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=opset,
                              input_names=["images"], output_names=names, dynamic_shapes=dynamic,
                              external_data=False, verbose=False)
        else:
            axes = {n: {0: "batch"} for n in ["images", *names]} if dynamic_batch else None
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=["images"], output_names=names, dynamic_axes=axes)


def verify_onnx(path: str | os.PathLike, model: nn.Module, images: Tensor, with_ambiguity: bool = False,
                stacks: int | None = None) -> tuple[float, dict[str, float]]:
    """Largest |ORT - PyTorch| of the landmarks (normalised units), and of each moment output."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = output_names(with_ambiguity)
    got = session.run(names, {session.get_inputs()[0].name: images.numpy()})
    with torch.inference_mode():
        want = [t.float().numpy() for t in OnnxExportModule(model, with_ambiguity, stacks).eval()(images)]
    diffs = {n: float(np.abs(g - w).max()) for n, g, w in zip(names, got, want, strict=True)}
    if "eigenvectors" in diffs:  # a column's sign is arbitrary: compare up to sign
        g, w = got[names.index("eigenvectors")], want[names.index("eigenvectors")]
        sign = np.sign(np.sum(g * w, axis=-2, keepdims=True))
        diffs["eigenvectors"] = float(np.abs(g * np.where(sign == 0, 1, sign) - w).max())
    return diffs.pop("landmarks"), diffs


def export_onnx(model: nn.Module, path: str | os.PathLike, *, dynamic_batch: bool = False,
                opset: int = DEFAULT_OPSET, with_ambiguity: bool = False, exporter: str = "dynamo",
                check: bool = True, tolerance: float = TOLERANCE, stacks: int | None = None) -> ExportReport:
    """Write ``model`` (float32, CPU, eval) as one self-contained ``.onnx`` file and check it.

    The file is written beside ``path`` and renamed over it.  With ``check``
    (onnxruntime needed), ORT and PyTorch run the same face-like inputs (batch 1,
    and 1 and 3 with ``dynamic_batch``) and :attr:`ExportReport.max_difference`
    holds the largest landmark difference; the caller decides what a failure means.
    ``stacks=K`` exports the early exit at the K-th stack (the later stacks are left out).
    """
    import onnx

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    path = Path(path)
    model = copy.deepcopy(model).float().cpu().eval()  # the caller's model stays where it is
    size = int(model.config.input_size)
    names = output_names(with_ambiguity)
    model.check_stacks(stacks)
    module = OnnxExportModule(model, with_ambiguity, stacks).eval()
    with atomic_path(path) as tmp:
        # A batch of 2 keeps the exporter from specialising the batch dimension to 1.
        _export_graph(module, _example(size, 2 if dynamic_batch else 1), tmp, opset, dynamic_batch,
                      exporter, names)
        proto = onnx.load(str(tmp))
        meta = onnx_metadata(model, with_ambiguity, stacks)
        props = {p.key: p.value for p in proto.metadata_props}
        props[METADATA_KEY] = json.dumps(meta)
        onnx.helper.set_model_props(proto, props)
        proto.doc_string = (f"staralign {__version__}: STAR facial landmarks ({model.definition.name}, "
                            f"{model.definition.num_points} points, input {size}x{size})")
        onnx.save(proto, str(tmp))
        for extra in tmp.parent.glob(f"{tmp.name}.data"):  # external data, if an exporter left any
            extra.unlink()
    report = ExportReport(path, opset, exporter, dynamic_batch, names, tolerance=tolerance)
    if check:
        worst, moments = 0.0, {}
        for batch in ([1, 3] if dynamic_batch else [1]):
            diff, mom = verify_onnx(path, model, _example(size, batch, seed=batch + 1), with_ambiguity, stacks)
            worst = max(worst, diff)
            for k, v in mom.items():
                moments[k] = max(moments.get(k, 0.0), v)
            report.checked_batches.append(batch)
        report.max_difference, report.moment_differences = worst, moments
    return report
