"""CPU speed paths: early exit (--stacks), int8 ONNX export with its accuracy check, thread
resolution under restricted affinity and cgroup quotas, bench infer --weights, and predict's
batching of faces across images."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from staralign import LandmarkDetector
from staralign.cli import main
from staralign.config import ModelConfig
from staralign.heatmaps import soft_argmax
from staralign.models import build_model, save_model
from staralign.threads import cgroup_cpu_limit, resolve_threads

ROOT = Path(__file__).resolve().parents[1]


def tiny(nstack: int = 3, size: int = 64):
    torch.manual_seed(0)
    return build_model(ModelConfig(nstack=nstack, channels=16, input_size=size, nlevels=2,
                                   stem_channels=(8, 16)), "WFLW").eval()


def faces_input(batch: int, size: int = 64) -> torch.Tensor:
    from staralign.inference.quantize import synthetic_crops

    return torch.from_numpy(synthetic_crops(batch, size, seed=5)[0])


def run_cli(args: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(args)
    return rc, buf.getvalue()


# --------------------------------------------------------------------------- early exit


def test_stacks_equal_to_all_is_todays_output_exactly():
    model, x = tiny(), faces_input(2)
    with torch.inference_mode():
        today = model(x, all_stacks=False)
        k_all = model(x, all_stacks=False, stacks=3)
    assert torch.equal(today.landmarks, k_all.landmarks)
    assert all(torch.equal(a, b) for a, b in zip(today.heatmaps, k_all.heatmaps, strict=True))


@pytest.mark.parametrize("k", [1, 2])
def test_early_exit_uses_kth_stack_and_skips_the_rest(k):
    model, x = tiny(), faces_input(2)
    calls: list[int] = []
    for i, hg in enumerate(model.hgs):
        hg.register_forward_hook(lambda *_, i=i: calls.append(i))
    with torch.inference_mode():
        full = model(x, all_stacks=True)
        calls.clear()
        early = model(x, all_stacks=False, stacks=k)
    assert calls == list(range(k))  # later stacks never ran
    # Stack k does not depend on later ones: its fused heatmaps are those of the full run.
    torch.testing.assert_close(early.heatmaps[-1], full.heatmaps[k - 1], rtol=0, atol=0)
    torch.testing.assert_close(early.landmarks, soft_argmax(full.heatmaps[k - 1]), rtol=0, atol=0)
    assert not torch.equal(early.landmarks, full.landmarks)


@pytest.mark.parametrize("bad", [0, 4, -1, True, 1.5])
def test_stacks_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="stacks must be an integer from 1 to 3"):
        tiny()(faces_input(1), stacks=bad)


def test_detector_and_predict_take_stacks(tmp_path):
    import cv2

    model = tiny()
    weights = save_model(model, tmp_path / "m.safetensors")
    crop = ((faces_input(1)[0].numpy().transpose(1, 2, 0) * 127.5) + 127.5).round().astype(np.uint8)
    cv2.imwrite(str(tmp_path / "face.png"), crop)
    default = LandmarkDetector.from_checkpoint(weights, device="cpu", detector="none").detect(crop)
    same = LandmarkDetector.from_checkpoint(weights, device="cpu", detector="none", stacks=3).detect(crop)
    one = LandmarkDetector.from_checkpoint(weights, device="cpu", detector="none", stacks=1).detect(crop)
    np.testing.assert_array_equal(default[0].landmarks, same[0].landmarks)
    assert not np.array_equal(default[0].landmarks, one[0].landmarks)
    rc = main(["predict", str(tmp_path / "face.png"), "--weights", str(weights), "--detector", "none",
               "--device", "cpu", "--stacks", "1", "--json", str(tmp_path / "out.json")])
    assert rc == 0
    got = np.array(json.loads((tmp_path / "out.json").read_text())["inputs"][0]["faces"][0]["landmarks"])
    np.testing.assert_allclose(got, one[0].landmarks, atol=1e-3)


# --------------------------------------------------------------------------- ONNX: stacks and int8

pytest_onnx = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None for m in ("onnx", "onnxruntime")),
    reason="needs onnx and onnxruntime")


@pytest_onnx
def test_export_with_stacks_keeps_only_k_stacks(tmp_path):
    model = tiny()
    weights = save_model(model, tmp_path / "m.safetensors")
    out = tmp_path / "k1.onnx"
    rc, text = run_cli(["export", "--weights", str(weights), "--onnx", str(out), "--stacks", "1",
                        "--exporter", "torchscript"])
    assert rc == 0 and "OK" in text, text  # parity checked against PyTorch at stacks=1
    det = LandmarkDetector.from_onnx(out, detector="none")
    assert det.backend.stacks == 1
    x = faces_input(1)
    with torch.inference_mode():
        want = model(x, all_stacks=False, stacks=1).landmarks.numpy()
    got, _ = det.backend.run(x.numpy(), ambiguity=False)
    np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(ValueError, match="exported with 1 stack"):
        LandmarkDetector.from_onnx(out, detector="none", stacks=3)


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8")
    model = tiny(nstack=2)
    weights = save_model(model, folder / "m.safetensors")
    out = folder / "m.int8.onnx"
    rc, text = run_cli(["export", "--weights", str(weights), "--onnx", str(out), "--exporter", "torchscript",
                        "--dynamic-batch", "--quantize", "int8"])
    return {"rc": rc, "text": text, "onnx": out, "weights": weights, "model": model}


@pytest_onnx
def test_int8_export_round_trip_with_accuracy_check(int8_export):
    import onnx

    from staralign.inference.onnx_backend import OnnxBackend
    from staralign.inference.quantize import CROP_PX, synthetic_crops

    assert int8_export["rc"] == 0, int8_export["text"]
    out = int8_export["onnx"]
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # really quantised, not a float32 copy
    backend = OnnxBackend(out)
    q = backend.quantization
    assert q["mode"] == "int8" and q["held_out_crops"] == 32 and q["calibration_crops"] == 64
    assert q["ops"] == "body" and q["float_tail"] > 0 and q["batchnorms_as_conv"] > 0  # today's default
    assert "network body in int8, soft-argmax tail float32" in int8_export["text"]
    text = int8_export["text"]
    assert f"max {q['max_px']:.3f} px" in text and f"mean {q['mean_px']:.3f} px" in text
    # The stored check is what the file does: recompute it against PyTorch float32 on the
    # same held-out crops (float32 ONNX equals PyTorch to 1e-4, i.e. 0.013 px).
    held, _ = synthetic_crops(32, 64, seed=1)
    got, _ = backend.run(held, ambiguity=False)
    with torch.inference_mode():
        want = int8_export["model"](torch.from_numpy(held), all_stacks=False).landmarks.numpy()
    px = np.linalg.norm(got - want, axis=-1) * CROP_PX / 2
    assert abs(px.max() - q["max_px"]) < 0.05 and abs(px.mean() - q["mean_px"]) < 0.05
    assert 0 < q["mean_px"] <= q["max_px"]
    # And a LandmarkDetector runs it like any exported file.
    faces = LandmarkDetector.from_onnx(out, detector="none").detect(
        ((held[0].transpose(1, 2, 0) * 127.5) + 127.5).astype(np.uint8))
    assert faces[0].landmarks.shape == (98, 2)


@pytest_onnx
def test_keep_heads_fp32_finds_the_last_output_convolutions(int8_export, tmp_path):
    import onnx

    from staralign.inference.quantize import head_conv_nodes, quantize_onnx, synthetic_crops, tail_nodes

    fp32 = tmp_path / "fp32.onnx"
    rc, _ = run_cli(["export", "--weights", str(int8_export["weights"]), "--onnx", str(fp32),
                     "--exporter", "torchscript"])
    assert rc == 0
    proto = onnx.load(str(fp32))
    heads = head_conv_nodes(proto)
    weights = {i.name: i for i in proto.graph.initializer}
    shapes = sorted(tuple(weights[n.input[1]].dims) for n in proto.graph.node if n.name in heads)
    # heatmaps (98), point maps (98), edge maps (WFLW's edges): 1x1 convolutions from 16 channels
    edges = int8_export["model"].definition.num_edges
    assert shapes == sorted([(98, 16, 1, 1), (98, 16, 1, 1), (edges, 16, 1, 1)])
    cal, _ = synthetic_crops(4, 64, seed=0)
    held, labels = synthetic_crops(4, 64, seed=1)
    report = quantize_onnx(fp32, tmp_path / "q.onnx", cal, held, labels=labels, keep_heads_fp32=True,
                           quant_format="qoperator")
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert sorted(report.fp32_nodes) == sorted(heads)
    # The rest are QLinearConv, but for the fixed 0/1 edge-to-point spread behind the heads: it is
    # in the float32 tail of the default operator set.
    tail_convs = {n.name for n in proto.graph.node if n.op_type == "Conv" and n.name in tail_nodes(proto)}
    assert len(tail_convs) == 1
    assert {n.name for n in q.graph.node if n.op_type == "Conv"} == set(heads) | tail_convs
    assert report.nme_fp32 is not None and report.nme_int8 is not None


def _fp32_export(int8_export, tmp_path) -> Path:
    fp32 = tmp_path / "fp32.onnx"
    rc, text = run_cli(["export", "--weights", str(int8_export["weights"]), "--onnx", str(fp32),
                        "--exporter", "torchscript", "--dynamic-batch", "--with-ambiguity"])
    assert rc == 0, text
    return fp32


@pytest_onnx
def test_batchnorm_as_depthwise_conv_computes_the_same(tmp_path):
    import onnx
    import onnxruntime as ort

    from staralign.inference.export import export_onnx
    from staralign.inference.quantize import batchnorm_as_depthwise_conv

    model = tiny(nstack=2)
    g = torch.Generator().manual_seed(0)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        # trained-looking statistics: a fresh model's are the identity (mean 0, var 1, scale 1)
        c = bn.num_features
        bn.weight.data = torch.rand(c, generator=g) * 3 - 1.5  # negative scales too
        bn.bias.data = torch.rand(c, generator=g) * 2 - 1
        bn.running_mean = torch.rand(c, generator=g) * 2 - 1
        bn.running_var = torch.rand(c, generator=g) * 3 + 0.2
    before = tmp_path / "bn.onnx"
    export_onnx(model, before, exporter="torchscript", dynamic_batch=True, with_ambiguity=True)
    proto = onnx.load(str(before))
    norms = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    assert norms > 0  # the pre-activation batch norms of the residual blocks
    assert batchnorm_as_depthwise_conv(proto) == norms
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    after = tmp_path / "dw.onnx"
    onnx.save(proto, str(after))
    x = faces_input(3).numpy()
    want, got = (ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]).run(None, {"images": x})
                 for f in (before, after))
    assert np.abs(want[0] - got[0]).max() < 1e-5  # landmarks
    assert np.abs(want[1] - got[1]).max() < 1e-5  # covariances
    with torch.inference_mode():  # and the statistics really moved the output
        plain = tiny(nstack=2)(torch.from_numpy(x), all_stacks=False).landmarks.numpy()
    assert np.abs(plain - got[0]).max() > 1e-3


@pytest_onnx
def test_default_int8_keeps_the_tail_float_and_the_body_int8(int8_export, tmp_path):
    import onnx

    from staralign.inference.quantize import quantize_onnx, synthetic_crops, tail_nodes

    fp32 = _fp32_export(int8_export, tmp_path)
    proto = onnx.load(str(fp32))
    tail = set(tail_nodes(proto))
    tail_ops = {n.op_type for n in proto.graph.node if n.name in tail}
    # the attention product and the soft-argmax (sums and the division), and the moments
    assert {"Mul", "ReduceSum", "Div", "InstanceNormalization", "Sigmoid"} <= tail_ops
    cal, _ = synthetic_crops(4, 64, seed=0)
    held, labels = synthetic_crops(4, 64, seed=1)
    out = tmp_path / "q.onnx"
    report = quantize_onnx(fp32, out, cal, held, labels=labels)
    assert report.ops == "body" and report.float_tail == len(tail)
    q = onnx.load(str(out))
    consumers: dict[str, list[str]] = {}
    for n in q.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    quantised = {n.name for n in q.graph.node if any(c == "QuantizeLinear" for o in n.output
                                                       for c in consumers.get(o, []))}
    assert not tail & quantised  # nothing after the heads is rounded to int8
    body_adds = [n.name for n in proto.graph.node if n.op_type == "Add" and n.name not in tail
                 and n.name in {m.name for m in q.graph.node}]
    assert body_adds and set(body_adds) <= quantised  # the residual sums stay int8 between convolutions
    assert not any(n.op_type == "BatchNormalization" for n in q.graph.node)
    conv_only = quantize_onnx(fp32, tmp_path / "c.onnx", cal, held, labels=labels, ops="conv")
    assert conv_only.float_tail == 0 and conv_only.batchnorms_as_conv == 0
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(tmp_path / "c.onnx")).graph.node) > 0
    with pytest.raises(ValueError, match="ops must be one of"):
        quantize_onnx(fp32, tmp_path / "x.onnx", cal, held, ops="everything")


def test_int8_warning_names_the_cost():
    from staralign.inference.quantize import QuantizationReport

    ok = QuantizationReport("x", held_out_crops=32, nme_bound=0.5, nme_fp32=4.0, nme_int8=4.05)
    assert ok.warning is None  # the labelled cost (0.05) decides, not the looser bound
    bad = QuantizationReport("x", held_out_crops=32, nme_bound=0.5, nme_fp32=4.0, nme_int8=4.2)
    assert "0.200 points" in bad.warning and "more than 0.1" in bad.warning
    unlabelled = QuantizationReport("x", held_out_crops=8, nme_bound=0.3)
    assert "NME bound of 0.300" in unlabelled.warning


# --------------------------------------------------------------------------- threads


def test_threads_follow_a_restricted_affinity():
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this OS")
    script = textwrap.dedent("""
        import json, os
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        from staralign.threads import resolve_threads
        import torch
        from staralign.inference.torch_backend import TorchBackend
        from staralign.models import build_model
        from staralign.config import ModelConfig
        TorchBackend(build_model(ModelConfig(nstack=1, channels=8, input_size=32, nlevels=1,
                                             stem_channels=(8, 8)), "WFLW"), "cpu")
        print(json.dumps({**resolve_threads(), "torch": torch.get_num_threads(),
                          "explicit": resolve_threads(3)["threads"]}))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["threads"] == 1 and got["affinity_cpus"] == 1 and got["torch"] == 1
    assert got["explicit"] == 3  # --threads overrides


def _fake_cgroup(tmp_path: Path, files: dict[str, str], proc: str) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (tmp_path / "proc_cgroup").write_text(proc)
    return root, tmp_path / "proc_cgroup"


def test_cgroup_v2_quota_on_an_ancestor_limits_threads(tmp_path):
    root, proc = _fake_cgroup(tmp_path, {"cpu.max": "max 100000\n", "box/cpu.max": "50000 100000\n",
                                         "box/job/cpu.max": "max 100000\n"}, "0::/box/job\n")
    assert cgroup_cpu_limit(root, proc) == pytest.approx(0.5)
    choice = resolve_threads(cgroup_root=root, proc_cgroup=proc)
    assert choice["threads"] == 1 and choice["cgroup_cpus"] == 0.5
    assert choice["source"] == ("cgroup" if choice["affinity_cpus"] > 1 else "affinity")
    assert resolve_threads(4, cgroup_root=root, proc_cgroup=proc)["threads"] == 4


def test_cgroup_v1_quota_and_no_limit(tmp_path):
    root, proc = _fake_cgroup(tmp_path, {"cpu,cpuacct/app/cpu.cfs_quota_us": "250000\n",
                                         "cpu,cpuacct/app/cpu.cfs_period_us": "100000\n"},
                              "4:cpu,cpuacct:/app\n0::/\n")
    assert cgroup_cpu_limit(root, proc) == pytest.approx(2.5)
    root2, proc2 = _fake_cgroup(tmp_path / "none", {"cpu.max": "max 100000\n"}, "0::/\n")
    assert cgroup_cpu_limit(root2, proc2) is None
    assert resolve_threads(cgroup_root=root2, proc_cgroup=proc2)["threads"] == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError):
        resolve_threads(0)


# --------------------------------------------------------------------------- bench infer --weights


@pytest_onnx
@pytest.mark.parametrize("kind", ["safetensors", "onnx"])
def test_bench_infer_times_a_model_file(int8_export, kind, capsys):
    path = int8_export["weights"] if kind == "safetensors" else int8_export["onnx"]
    rc = main(["bench", "infer", "--weights", str(path), "--batch-size", "3", "--iters", "1", "--repeats", "1",
               "--warmup", "0", "--threads", "1", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["batch_size"] == 3 and result["batch_1"]["batch_size"] == 1
    for run in (result, result["batch_1"]):
        assert 0 < run["latency_ms"]["ms_min"] <= run["latency_ms"]["ms_median"] <= run["latency_ms"]["ms_max"]
        assert run["images_per_s"] > 0 and run["gflop_per_s"] > 0
    assert result["thread_settings"]["threads"] == 1 and result["thread_settings"]["source"] == "requested"
    assert result["precision"] == ("int8" if kind == "onnx" else "fp32")
    assert result["gflop_per_image"] > 0


def test_every_bench_records_its_threads(capsys):
    rc = main(["bench", "infer", "--nstack", "1", "--nlevels", "1", "--channels", "8", "--input-size", "32",
               "--iters", "1", "--repeats", "1", "--warmup", "0", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["thread_settings"]["threads"] == resolve_threads()["threads"]
    assert result["thread_settings"]["source"] in ("affinity", "cgroup")


# --------------------------------------------------------------------------- predict batching


def test_predict_batches_faces_across_images_with_the_same_results(tmp_path, monkeypatch):
    import cv2

    from staralign.inference.torch_backend import TorchBackend

    model = tiny(nstack=1)
    weights = save_model(model, tmp_path / "m.safetensors")
    folder = tmp_path / "faces"
    folder.mkdir()
    crops = faces_input(7)
    for i, c in enumerate(crops):
        cv2.imwrite(str(folder / f"{i}.png"), ((c.numpy().transpose(1, 2, 0) * 127.5) + 127.5).round()
                    .astype(np.uint8))
    sizes: list[int] = []
    real_run = TorchBackend.run

    def spy(self, batch, ambiguity=True):
        sizes.append(len(batch))
        return real_run(self, batch, ambiguity)

    monkeypatch.setattr(TorchBackend, "run", spy)
    results = {}
    for b in (1, 3):
        sizes.clear()
        out = tmp_path / f"b{b}.json"
        assert main(["predict", str(folder), "--weights", str(weights), "--detector", "none", "--device", "cpu",
                     "--batch-size", str(b), "--json", str(out)]) == 0
        results[b] = json.loads(out.read_text())["inputs"]
        assert max(sizes) <= b and sum(sizes) == 7
        if b == 3:
            assert len(sizes) == 3  # 7 one-face images in batches of 3, 3 and 1: across images
    # Same faces, boxes and crops; landmarks equal up to float rounding (oneDNN may pick
    # another convolution algorithm for another batch size).
    for one, batched in zip(results[1], results[3], strict=True):
        assert one["path"] == batched["path"] and len(one["faces"]) == len(batched["faces"]) == 1
        a, b = one["faces"][0], batched["faces"][0]
        assert a["box"] == b["box"] and a["crop"] == b["crop"]
        np.testing.assert_allclose(a["landmarks"], b["landmarks"], atol=0.01)


def test_bf16_cpu_path_of_the_detector_stays_close_to_fp32(tmp_path):
    from staralign.inference.torch_backend import TorchBackend

    model = tiny()
    crops = faces_input(2).numpy()
    fp32, _ = TorchBackend(model, "cpu").run(crops, ambiguity=False)
    fast = TorchBackend(tiny(), "cpu", amp="bf16", channels_last=True)
    assert fast.model.pre[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    bf16, cov = fast.run(crops)
    assert bf16.dtype == np.float32 and cov is not None
    # bf16 keeps ~3 significant digits; a random tiny net moves landmarks by a few 1e-2 at most.
    assert 0 < np.abs(bf16 - fp32).max() < 0.1


@pytest_onnx
def test_int8_calibration_folder_and_bad_folder(int8_export, tmp_path, capsys):
    import cv2

    from staralign.inference.onnx_backend import OnnxBackend

    crops = tmp_path / "crops"
    crops.mkdir()
    for i, c in enumerate(faces_input(5)):
        cv2.imwrite(str(crops / f"{i}.png"), ((c.numpy().transpose(1, 2, 0) * 127.5) + 127.5).round()
                    .astype(np.uint8))
    out = tmp_path / "cal.onnx"
    rc, text = run_cli(["export", "--weights", str(int8_export["weights"]), "--onnx", str(out),
                        "--exporter", "torchscript", "--quantize", "int8", "--calibration", str(crops)])
    assert rc == 0, text
    q = OnnxBackend(out).quantization
    assert q["calibration_crops"] == 4 and q["held_out_crops"] == 1 and str(crops) in q["calibration"]
    assert q["nme_fp32"] is None  # no labels for a folder of crops: only the bound
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", "--weights", str(int8_export["weights"]), "--onnx", str(tmp_path / "x.onnx"),
                 "--exporter", "torchscript", "--quantize", "int8", "--calibration", str(empty)]) != 0
    err = capsys.readouterr().err
    assert "found 0 readable image(s)" in err and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists()
