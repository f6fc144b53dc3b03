"""Which operators' int8 quantisation costs the accuracy: a per-operator-type and per-group pass.

Usage (from the repository root)::

    python benchmarks/cpu_int8_sensitivity.py --weights RUN/best.safetensors --data DATA_DIR [--out result.json]

The model is exported to float32 ONNX and quantised many ways with
:func:`staralign.inference.quantize.quantize_onnx` (QDQ, per-channel, 64 synthetic
calibration faces, as ``staralign export --quantize int8``):

* ``all``: every operator onnxruntime can quantise; ``all-minus-G``: all but a group G
  of nodes -- ``tail`` (everything after the last stack's heads: attention product,
  soft-argmax), ``coord`` (the CoordConv concatenations and the boundary channels),
  ``heads`` (the last stack's 1x1 output convolutions);
* ``conv+T``: the convolutions and one more operator type T (every type in the graph);
* the operator sets of :data:`~staralign.inference.quantize.QUANT_OPS` (``body``, the
  default, ``conv``, ``all``).

Each row: NME on the model's test set (crop space, the definition's default
normalisation, percent), its difference from float32 ONNX (``cost``), the NME of
the int8 landmarks taken against float32's (``between``), the largest and mean
landmark shift in pixels of a 256 px crop, and the export check's own NME cost
on its 32 held-out synthetic faces.  Selection is by excluding nodes
(``exclude=``) from ``ops="all"``, which also rewrites the batch norms as depthwise
convolutions, so ``conv+T`` counts those as convolutions.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True, help="folder with test.tsv and the images")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import onnx
    from cpu_accuracy import trained_model_and_test_faces  # this folder's sibling script

    from staralign.inference.export import export_onnx
    from staralign.inference.onnx_backend import OnnxBackend
    from staralign.inference.quantize import (
        CROP_PX,
        QUANT_OPS,
        constant_nodes,
        head_conv_nodes,
        quantize_onnx,
        synthetic_crops,
        tail_nodes,
    )
    from staralign.metrics import nme

    model, images, gt = trained_model_and_test_faces(args.weights, args.data)
    definition, size = model.definition, int(model.config.input_size)

    def score(pred: np.ndarray, ref: np.ndarray = gt) -> float:
        return float(nme(pred, ref, definition).mean() * 100)

    cal, _ = synthetic_crops(64, size, seed=0)
    held, labels = synthetic_crops(32, size, seed=1)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32_file = Path(tmp) / "fp32.onnx"
        export_onnx(model, fp32_file)
        fp32 = OnnxBackend(fp32_file).run(images, ambiguity=False)[0].astype(np.float64)
        base = score(fp32)
        proto = onnx.load(str(fp32_file))
        constant = set(constant_nodes(proto))
        nodes = [n for n in proto.graph.node if n.name not in constant]
        tail = set(tail_nodes(proto))
        coord = set()
        producer = {o: n for n in proto.graph.node for o in n.output}
        known = {i.name for i in proto.graph.initializer} | {o for n in proto.graph.node if n.name in constant
                                                              for o in n.output}
        for n in nodes:  # a concatenation with a constant input (the grid), and what makes the boundary
            if n.op_type == "Concat" and any(i in known for i in n.input):
                coord.add(n.name)
                coord.update(producer[i].name for i in n.input if i in producer and producer[i].op_type == "Where")
        coord.update(n.name for n in nodes if n.op_type == "Greater")
        groups = {"tail": tail, "coord": coord, "heads": set(head_conv_nodes(proto))}
        types = sorted({n.op_type for n in nodes} - {"Conv"})
        variants: dict[str, dict] = {f"ops={k}": {"ops": k} for k in QUANT_OPS}
        for g, members in groups.items():
            variants[f"all-minus-{g}"] = {"ops": "all", "exclude": sorted(members)}
        for t in types:
            variants[f"conv+{t}"] = {"ops": "all", "exclude": sorted(n.name for n in nodes
                                                                     if n.op_type not in ("Conv", t))}
        for name, kw in variants.items():
            q = Path(tmp) / "q.onnx"
            t0 = time.perf_counter()
            report = quantize_onnx(fp32_file, q, cal, held, labels=labels, **kw)
            got = OnnxBackend(q).run(images, ambiguity=False)[0].astype(np.float64)
            px = np.linalg.norm(got - fp32, axis=-1) * CROP_PX / 2
            rows[name] = {"nme": score(got), "cost": score(got) - base, "between": score(got, fp32),
                          "max_px": float(px.max()), "mean_px": float(px.mean()),
                          "check_nme_cost": report.nme_cost, "excluded_nodes": len(kw.get("exclude", ()))}
            print(f"{name:30s} NME {rows[name]['nme']:.3f} cost {rows[name]['cost']:+.3f} "
                  f"between {rows[name]['between']:.3f} max {px.max():6.2f} px mean {px.mean():.3f} px "
                  f"check {report.nme_cost:+.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    out = {"weights": args.weights, "test_faces": len(images), "fp32_onnx_nme": base,
           "groups": {g: len(m) for g, m in groups.items()}, "rows": rows}
    text = json.dumps(out, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
