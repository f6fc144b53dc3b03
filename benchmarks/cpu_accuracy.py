"""NME of the CPU speed paths on a trained model's test set: early exit per K, ONNX float32,
int8 variants and PyTorch bf16, all against the same float32 PyTorch model.

Usage (from the repository root)::

    python benchmarks/cpu_accuracy.py --weights RUN/best.safetensors --data DATA_DIR [--out result.json]

NME here is in crop space (normalised landmarks), divided by the definition's
default distance (inter-ocular for WFLW), in percent, over the whole test set;
"vs fp32" is the NME difference from PyTorch float32 on the same crops, and
``nme_between`` the NME of a path's landmarks taken against float32's (a bound on
the difference, by the triangle inequality).  int8 files are quantised here with
``staralign.inference.quantize`` on synthetic calibration faces, as
``staralign export --quantize int8`` does.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import numpy as np


def trained_model_and_test_faces(weights: str, data: str):
    """(float32 model in eval mode, its test crops (B, 3, S, S) float32, their normalised
    landmarks (B, N, 2) float64): what every accuracy script here scores against."""
    from staralign.data.testsets import load_test_set
    from staralign.models import load_model

    model = load_model(weights).float().eval()
    definition, size = model.definition, int(model.config.input_size)
    ds = load_test_set(definition, data, data).dataset(definition, size)
    images = np.stack([ds[i]["image"].numpy() for i in range(len(ds))]).astype(np.float32)
    gt = np.stack([ds[i]["landmarks"].numpy() for i in range(len(ds))]).astype(np.float64)
    return model, images, gt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True, help="folder with test.tsv and the images")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import torch

    from staralign.inference.export import export_onnx
    from staralign.inference.onnx_backend import OnnxBackend
    from staralign.inference.quantize import quantize_onnx, synthetic_crops
    from staralign.metrics import nme
    from staralign.models.speed import make_inference_fn

    model, images, gt = trained_model_and_test_faces(args.weights, args.data)
    definition, size = model.definition, int(model.config.input_size)
    x = torch.from_numpy(images)

    def score(pred: np.ndarray, ref: np.ndarray | None = None) -> float:
        return float(nme(pred, gt if ref is None else ref, definition).mean() * 100)

    rows: dict[str, dict] = {}
    with torch.inference_mode():
        fp32 = model(x, all_stacks=False).landmarks.double().numpy()
    rows["torch_fp32"] = {"nme": score(fp32)}
    for k in range(1, model.config.nstack):
        with torch.inference_mode():
            got = model(x, all_stacks=False, stacks=k).landmarks.double().numpy()
        rows[f"torch_fp32_stacks{k}"] = {"nme": score(got), "nme_between": score(got, fp32)}
    fn = make_inference_fn(copy.deepcopy(model), channels_last=True, amp="bf16")
    with torch.inference_mode():
        got = fn(x).landmarks.double().numpy()
    rows["torch_bf16_channels_last"] = {"nme": score(got), "nme_between": score(got, fp32)}

    cal, _ = synthetic_crops(64, size, seed=0)
    held, labels = synthetic_crops(32, size, seed=1)
    default = "int8_body_qdq_per_channel"  # staralign export --quantize int8
    variants = {default: {}, "int8_conv_qdq_per_channel": {"ops": "conv"},  # the earlier default
                "int8_body_qdq_per_tensor": {"per_channel": False},
                "int8_body_qoperator_per_channel": {"quant_format": "qoperator"},
                "int8_body_qdq_heads_fp32": {"keep_heads_fp32": True},
                "int8_all_qdq_per_channel": {"ops": "all"}}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(1, model.config.nstack + 1):
            f = Path(tmp) / f"fp32_k{k}.onnx"
            export_onnx(model, f, dynamic_batch=True, exporter="torchscript",
                        stacks=None if k == model.config.nstack else k)
            tag = "" if k == model.config.nstack else f"_stacks{k}"
            got = OnnxBackend(f).run(images, ambiguity=False)[0].astype(np.float64)
            rows[f"onnx_fp32{tag}"] = {"nme": score(got), "nme_between": score(got, fp32)}
            for name, kw in variants.items():
                if tag and name != default:
                    continue
                q = Path(tmp) / f"{name}{tag}.onnx"
                report = quantize_onnx(f, q, cal, held, labels=labels, **kw)
                got = OnnxBackend(q).run(images, ambiguity=False)[0].astype(np.float64)
                rows[f"onnx_{name}{tag}"] = {"nme": score(got), "nme_between": score(got, fp32),
                                             "export_check": {k2: report.to_dict()[k2] for k2 in
                                                              ("max_px", "mean_px", "nme_bound", "nme_fp32",
                                                               "nme_int8", "nme_cost", "warning")}}
    for row in rows.values():
        row["vs_fp32"] = row["nme"] - rows["torch_fp32"]["nme"]
    out = {"weights": args.weights, "test_faces": len(images), "definition": definition.name,
           "nstack": model.config.nstack, "input_size": size, "rows": rows}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
