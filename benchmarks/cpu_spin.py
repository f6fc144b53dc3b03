"""onnxruntime's thread spin-waiting on a shared CPU, interleaved.

The same int8 file at 1 thread, 2 threads spinning (onnxruntime's default) and 2 threads not
spinning (staralign's default), with the fp32 file and PyTorch 1-thread fp32 and bf16 beside
them.  Usage::

    python benchmarks/cpu_spin.py MODEL.safetensors MODEL.onnx MODEL.int8.onnx

(the files: a model, its ``staralign export`` and its ``--quantize int8`` export).
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time


def main() -> None:
    import onnxruntime as ort
    import torch

    from staralign.inference.quantize import synthetic_crops
    from staralign.models import load_model
    from staralign.models.speed import make_inference_fn

    weights, fp32_file, int8_file = sys.argv[1:4]
    model = load_model(weights).eval()
    size = int(model.config.input_size)
    x, _ = synthetic_crops(1, size, seed=3)
    xt = torch.from_numpy(x)
    bf16 = make_inference_fn(copy.deepcopy(model), channels_last=True, amp="bf16")
    paths = {}
    for name, threads, spin in [("int8_1t", 1, True), ("int8_2t_spin", 2, True), ("int8_2t_nospin", 2, False),
                                ("fp32_2t_nospin", 2, False), ("fp32_1t", 1, True)]:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(int8_file if "int8" in name else fp32_file, options,
                                       providers=["CPUExecutionProvider"])
        paths[name] = (0, lambda s=session: s.run(["landmarks"], {"images": x}))

    def torch_bf16():
        with torch.inference_mode():
            bf16(xt)

    def torch_fp32():
        with torch.inference_mode():
            model(xt, all_stacks=False)

    paths["torch_bf16_cl_1t"] = (1, torch_bf16)
    paths["torch_fp32_1t"] = (1, torch_fp32)
    for _, fn in paths.values():
        fn()
    results = {k: [] for k in paths}
    loads = []
    for _ in range(3):
        loads.append(os.getloadavg()[0])
        for name, (threads, fn) in paths.items():
            torch.set_num_threads(threads or 2)
            t0 = time.perf_counter()
            fn()
            fn()
            results[name].append((time.perf_counter() - t0) * 500)
    print("load averages", loads)
    for name, ms in results.items():
        print(name, round(statistics.median(ms)), [round(v) for v in ms])


if __name__ == "__main__":
    main()
