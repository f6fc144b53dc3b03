"""Static int8 quantisation of an exported STAR ``.onnx`` file, checked against float32.

Why: on a CPU with VNNI (AVX-512 or AVX-VNNI) onnxruntime runs 8-bit convolutions
several times faster than float32 ones, and the stacked hourglass is almost all
convolutions.  Static quantisation fixes each activation's int8 range ahead of
time from *calibration* crops: synthetic faces (:mod:`staralign.data.synth`) by
default, or a folder of face crops.

The result is checked right away on *held-out* crops (never the calibration
ones): the largest and mean landmark difference against the float32 file, in
pixels of a 256 px crop, and an NME bound: the NME of the int8 landmarks taken
against the float32 ones as ground truth (normalised by the definition's default
distance on the float32 landmarks), in percent.  By the triangle inequality the
int8 model's NME on any labelled set is within that bound of the float32
model's; where the held-out crops have exact labels (synthetic faces of a WFLW
model), the true NME of both is given too.  The check is stored in the file's
``staralign`` metadata under ``quantization`` and printed by ``staralign export``.

What is quantised (``ops``, QDQ format by default, per-channel weight scales,
uint8 activations and int8 weights, the fast pair on x86):

* ``"body"`` (the default): the convolutions and every operator between them
  (ReLU, the residual additions, max-pooling, the nearest upsampling, the
  CoordConv concatenations), so that one int8 convolution feeds the next without
  a round trip through float32 and onnxruntime's NHWC layout needs no transposes
  in between.  The pre-activation batch norms, which cannot be folded into a
  neighbouring convolution (their input is also the residual shortcut), are first
  rewritten as the per-channel 1x1 (depthwise) convolutions they are
  (:func:`batchnorm_as_depthwise_conv`, exact), so that they run in int8 too.
  The *tail* -- everything downstream of the last stack's output heads: instance
  norm, the sigmoids, the attention product and the soft-argmax, and the
  covariance outputs -- stays float32 (:func:`tail_nodes`).  A sensitivity pass on
  the trained demo model found the cost there: quantising the attention product
  (``Mul``) or the soft-argmax's sums and division costs 1-3 NME points, while the
  whole body costs nothing measurable (docs/benchmarks.md).
* ``"conv"``: the convolutions only (the default before; slower: every
  convolution converts its input from float32 and its output back).
* ``"all"``: every operator onnxruntime can quantise, the tail included (fast,
  but costs NME points: the export check says so).

``keep_heads_fp32`` also keeps the last stack's 1x1 output heads in float32
(they feed the soft-argmax directly, where an int8 step is a landmark shift).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_path
from .onnx_backend import METADATA_KEY

__all__ = ["NME_WARN_POINTS", "QUANT_FORMATS", "QUANT_OPS", "QuantizationReport", "batchnorm_as_depthwise_conv",
           "constant_nodes", "folder_crops", "head_conv_nodes", "quantize_onnx", "synthetic_crops", "tail_nodes"]

QUANT_FORMATS = ("qdq", "qoperator")
# Operator sets for ``ops``: None quantises every operator onnxruntime can.
QUANT_OPS: dict[str, tuple[str, ...] | None] = {
    "body": ("Conv", "Relu", "Add", "MaxPool", "Resize", "Concat"),
    "conv": ("Conv",),
    "all": None,
}
NME_WARN_POINTS = 0.1  # NME points (percent of the normalising distance) above which int8 is flagged
CROP_PX = 256  # landmark differences are reported in pixels of a crop this size
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class QuantizationReport:
    """What quantisation produced and how far the int8 file moved the landmarks."""

    path: str
    mode: str = "int8"
    quant_format: str = "qdq"
    per_channel: bool = True
    ops: str = "body"  # the operator set (QUANT_OPS)
    op_types: list[str] | None = None  # quantised operators (None: all onnxruntime can)
    fp32_nodes: list[str] = field(default_factory=list)  # convolutions kept in float32 (heads, exclude)
    float_tail: int = 0  # nodes after the last stack's heads left in float32 (ops="body" only)
    batchnorms_as_conv: int = 0  # batch norms rewritten as depthwise 1x1 convolutions to run in int8
    calibration: str = ""
    calibration_crops: int = 0
    held_out_crops: int = 0
    max_px: float = float("nan")  # largest landmark difference, px of a 256 px crop
    mean_px: float = float("nan")
    nme_bound: float = float("nan")  # percent: NME of int8 against float32 landmarks
    nme_fp32: float | None = None  # percent, against exact labels (synthetic WFLW only)
    nme_int8: float | None = None

    @property
    def nme_cost(self) -> float:
        """int8 NME minus float32 NME where labels are known, else the bound (both in points)."""
        if self.nme_fp32 is not None and self.nme_int8 is not None:
            return self.nme_int8 - self.nme_fp32
        return self.nme_bound

    @property
    def warning(self) -> str | None:
        """A sentence for the export output when int8 costs more than :data:`NME_WARN_POINTS`."""
        if not self.nme_cost > NME_WARN_POINTS:
            return None
        kind = "NME" if self.nme_fp32 is not None else "an NME bound"
        return (f"int8 costs {kind} of {self.nme_cost:.3f} points against float32 on {self.held_out_crops} "
                f"held-out crops (more than {NME_WARN_POINTS}): check it on your data, or use the float32 file")

    @property
    def ops_text(self) -> str:
        """What runs in int8, in words for the export output."""
        return {"body": "network body in int8, soft-argmax tail float32", "conv": "convolutions only",
                "all": "all operators"}[self.ops]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["nme_cost"] = self.nme_cost
        out["warning"] = self.warning
        return out


# --------------------------------------------------------------------------- crops


def synthetic_crops(count: int, size: int, seed: int = 0, render_size: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``count`` synthetic faces cropped as the training crops are: network input (B, 3, S, S)
    float32 and their exact WFLW landmarks (B, 98, 2), normalised [-1, 1] like the model's."""
    from ..data.synth import render_face
    from . import geometry

    images, points = [], []
    for i in range(count):
        rng = np.random.default_rng([seed, 7, i])  # stream 7: not a dataset split's
        image, landmarks, info = render_face(rng, render_size or max(size, 128))
        matrix = geometry.crop_matrix(info["scale"], info["center"], size)
        images.append(geometry.crop_image(image, matrix, size))
        pts = np.c_[landmarks, np.ones(len(landmarks))] @ matrix.T
        points.append((pts[:, :2] + 0.5) / size * 2 - 1)  # crop pixels -> normalised (align_corners=False)
    return geometry.crops_to_input(images), np.asarray(points, np.float64)


def folder_crops(folder: str | os.PathLike, size: int) -> np.ndarray:
    """Every image under ``folder`` (sorted, recursive) as a face crop resized to ``size``: (B, 3, S, S)."""
    import cv2

    from .geometry import crops_to_input
    from .inputs import ImageReadError, load_image

    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{root}: --calibration needs a folder of face crops")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    crops = []
    for p in files:
        try:
            image = load_image(p)
        except ImageReadError:
            continue
        crops.append(cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA))
    if len(crops) < 2:
        raise ValueError(f"{root}: found {len(crops)} readable image(s); calibration needs at least 2 face crops")
    return crops_to_input(crops)


# --------------------------------------------------------------------------- graph


def _is_incidence(node: Any, constants: dict[str, np.ndarray]) -> bool:
    """A Conv with a constant 0/1 weight: the AAM's fixed edge-to-point spread, not a learned layer."""
    w = constants.get(node.input[1]) if len(node.input) > 1 else None
    return w is not None and bool(np.isin(w, (0.0, 1.0)).all())


def head_conv_nodes(model: Any, outputs: Iterable[str] = ("landmarks",)) -> list[str]:
    """Names of the learned convolutions nearest ``outputs`` (the last stack's heads).

    Walks back from ``outputs`` through every node but a convolution; stops at the
    first learned Conv on each path, and walks on through the fixed 0/1 edge-to-point
    Conv (the edge-map head is behind it).
    """
    from onnx import numpy_helper

    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    found: dict[str, None] = {}
    seen: set[str] = set()
    todo = list(outputs)
    while todo:
        name = todo.pop()
        node = producer.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "Conv" and not _is_incidence(node, constants):
            found[node.name] = None
            continue
        todo.extend(i for i in node.input if i)
    return list(found)


def tail_nodes(model: Any, outputs: Iterable[str] = ("landmarks",)) -> list[str]:
    """Names of the nodes downstream of the last stack's heads (:func:`head_conv_nodes`).

    That is the part of the graph after the last learned convolution: instance norm,
    sigmoids, the fixed edge-to-point spread, the attention product, the soft-argmax
    and (with ``--with-ambiguity``) the heatmap moments.  Its values feed the
    landmarks directly, so an int8 step there is a landmark shift.
    """
    heads = set(head_conv_nodes(model, outputs))
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: dict[str, None] = {}
    todo = [o for n in model.graph.node if n.name in heads for o in n.output]
    while todo:
        for node in consumers.get(todo.pop(), []):
            if node.name not in found:
                found[node.name] = None
                todo.extend(node.output)
    return list(found)


def constant_nodes(model: Any) -> list[str]:
    """Nodes whose inputs are all constants (the CoordConv grid): onnxruntime folds them at load."""
    known = {i.name for i in model.graph.initializer} | {""}
    names = []
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        if all(i in known for i in node.input):
            known.update(node.output)
            names.append(node.name)
    return names


def _constant_arrays(model: Any) -> dict[str, np.ndarray]:
    """Initializers, ``Constant`` outputs and ``Identity`` copies of either (the TorchScript exporter
    shares equal buffers, e.g. a fresh batch norm's mean and bias, through ``Identity``), by name."""
    from onnx import numpy_helper

    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            arrays[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in arrays:
            arrays[node.output[0]] = arrays[node.input[0]]
    return arrays


def batchnorm_as_depthwise_conv(model: Any) -> int:
    """Rewrite each inference ``BatchNormalization`` on a 4-d map as the 1x1 depthwise ``Conv``
    it computes (weight ``scale / sqrt(var + eps)``, bias ``B - mean * weight``), in place.

    Why: onnxruntime has no int8 batch norm, so each pre-activation batch norm of
    the residual blocks would leave int8 between two convolutions (dequantise, batch
    norm, quantise, and the layout transposes around them); as a convolution it is
    quantised like the others -- one scale a channel, held exactly by a per-channel
    int8 weight -- and the ReLU after it folds into its output range.  The float32
    result is the same up to rounding.  Returns the number of nodes rewritten.
    """
    from onnx import helper, numpy_helper, shape_inference

    constants = _constant_arrays(model)
    inferred = shape_inference.infer_shapes(model).graph
    shapes = {v.name: v.type.tensor_type.shape for v in [*inferred.value_info, *inferred.input]}
    nodes, count = [], 0
    for node in model.graph.node:
        params = list(node.input[1:5])
        shape = shapes.get(node.input[0]) if node.input else None
        rank = len(shape.dim) if shape is not None else None
        if (node.op_type != "BatchNormalization" or len(node.output) != 1 or len(params) != 4
                or not all(p in constants for p in params) or rank != 4):
            nodes.append(node)
            continue
        scale, bias, mean, var = (constants[p].astype(np.float64) for p in params)
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        weight = scale / np.sqrt(var + eps)
        base = node.name or f"batchnorm_{count}"
        w = numpy_helper.from_array(weight.astype(np.float32).reshape(-1, 1, 1, 1), f"{base}.depthwise_weight")
        b = numpy_helper.from_array((bias - mean * weight).astype(np.float32), f"{base}.depthwise_bias")
        model.graph.initializer.extend([w, b])
        nodes.append(helper.make_node("Conv", [node.input[0], w.name, b.name], list(node.output),
                                      name=f"{base}.depthwise", group=len(weight), kernel_shape=[1, 1]))
        count += 1
    if count:
        used = {i for n in nodes for i in n.input}
        keep = [i for i in model.graph.initializer if i.name in used]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return count


def _name_nodes(model: Any) -> None:
    """Give every unnamed node a unique name: exclusion lists address nodes by name."""
    used = {n.name for n in model.graph.node}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


class _Reader:
    """onnxruntime's calibration reader protocol over an array of crops, one at a time."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int) -> None:
        self.input_name, self.images, self.batch, self.pos = input_name, images, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos + self.batch > len(self.images):
            return None
        chunk = self.images[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return {self.input_name: np.ascontiguousarray(chunk, np.float32)}

    def rewind(self) -> None:
        self.pos = 0


def _run(path: Path, images: np.ndarray, threads: int | None) -> np.ndarray:
    from .onnx_backend import OnnxBackend

    return OnnxBackend(path, threads=threads).run(images, ambiguity=False)[0].astype(np.float64)


def _nme_percent(pred: np.ndarray, ref: np.ndarray, definition: Any) -> float:
    idx = definition.norm_indices("default")
    d = np.linalg.norm(ref[:, list(idx.left)].mean(1) - ref[:, list(idx.right)].mean(1), axis=-1)
    return float((np.linalg.norm(pred - ref, axis=-1).mean(1) / np.maximum(d, 1e-9)).mean() * 100)


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime's quantiser logs a warning for each rank-1 tensor it cannot split per channel
    (e.g. a batch norm's scale with ``ops="all"``) on the root logger: noise in the export output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_onnx(fp32_path: str | os.PathLike, out_path: str | os.PathLike, calibration: np.ndarray,
                  held_out: np.ndarray, *, labels: np.ndarray | None = None, calibration_source: str = "",
                  quant_format: str = "qdq", per_channel: bool = True, keep_heads_fp32: bool = False,
                  exclude: Sequence[str] = (), threads: int | None = None,
                  ops: str = "body") -> QuantizationReport:
    """Write the int8 version of ``fp32_path`` to ``out_path`` (atomically) and check it.

    ``calibration``/``held_out``: network inputs (B, 3, S, S); ``labels``: exact
    normalised landmarks of ``held_out`` in the model's layout, if known.  The
    check's results go into the output file's metadata and the returned report.
    ``ops``: which operators run in int8 (:data:`QUANT_OPS`; see the module text).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .onnx_backend import OnnxBackend

    if ops not in QUANT_OPS:
        raise ValueError(f"ops must be one of {', '.join(QUANT_OPS)}, got {ops!r}")
    op_types = QUANT_OPS[ops]
    if quant_format not in QUANT_FORMATS:
        raise ValueError(f"quant_format must be one of {', '.join(QUANT_FORMATS)}, got {quant_format!r}")
    if len(calibration) < 1 or len(held_out) < 1:
        raise ValueError("quantisation needs at least one calibration and one held-out crop")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    fp32 = OnnxBackend(fp32_path, threads=threads)
    proto = onnx.load(str(fp32_path))
    _name_nodes(proto)
    fixed = fp32.fixed_batch
    excluded = list(dict.fromkeys([*exclude, *(head_conv_nodes(proto) if keep_heads_fp32 else [])]))
    tail = tail_nodes(proto) if ops == "body" else []  # "conv" is the earlier default, as it was
    folded = batchnorm_as_depthwise_conv(proto) if ops != "conv" else 0
    with tempfile.TemporaryDirectory(prefix="staralign-quant-") as tmp:
        source = Path(tmp) / "fp32.onnx"
        onnx.save(proto, str(source))
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
        q = Path(tmp) / "int8.onnx"
        constant = constant_nodes(proto) if ops != "conv" else []  # folded at load: nothing to gain
        skip = list(dict.fromkeys([*excluded, *tail, *constant]))
        with _quiet_quantizer():
            quantize_static(
                str(pre), str(q), _Reader(fp32.input_name, calibration, fixed or 1),
                quant_format=QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator,
                op_types_to_quantize=list(op_types) if op_types else None, per_channel=per_channel,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=skip or None, calibrate_method=CalibrationMethod.MinMax,
            )
        report = QuantizationReport(str(out_path), quant_format=quant_format, per_channel=per_channel,
                                    ops=ops, op_types=list(op_types) if op_types else None,
                                    fp32_nodes=excluded, float_tail=len(tail), batchnorms_as_conv=folded,
                                    calibration=calibration_source,
                                    calibration_crops=len(calibration), held_out_crops=len(held_out))
        want = fp32.run(held_out, ambiguity=False)[0].astype(np.float64)  # the session opened above
        got = _run(q, held_out, threads)
        diff_px = np.linalg.norm(got - want, axis=-1) * CROP_PX / 2  # [-1, 1] spans the crop
        report.max_px, report.mean_px = float(diff_px.max()), float(diff_px.mean())
        report.nme_bound = _nme_percent(got, want, fp32.definition)
        if labels is not None:
            report.nme_fp32 = _nme_percent(want, labels, fp32.definition)
            report.nme_int8 = _nme_percent(got, labels, fp32.definition)
        model = onnx.load(str(q))
        props = {p.key: p.value for p in model.metadata_props}
        meta = json.loads(props[METADATA_KEY])
        meta["quantization"] = {k: v for k, v in report.to_dict().items() if k != "path"}
        props[METADATA_KEY] = json.dumps(meta)
        onnx.helper.set_model_props(model, props)
        with atomic_path(out_path) as dest:
            onnx.save(model, str(dest))
    return report
