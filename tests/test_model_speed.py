"""Inference speed paths agree with the float32 eager model, and ``bench infer`` reports them."""

from __future__ import annotations

import copy
import gc
import json

import pytest
import torch

from staralign.cli import main
from staralign.config import ModelConfig
from staralign.models import build_model
from staralign.models.speed import CudaGraphRunner, make_inference_fn, max_landmark_difference

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_model(device="cpu", **changes):
    config = {"nstack": 2, "nlevels": 2, "channels": 32, "input_size": 64}
    config.update(changes)
    torch.manual_seed(0)
    return build_model(ModelConfig(**config)).to(device).eval()


def images(batch=2, size=64, device="cpu"):
    gen = torch.Generator().manual_seed(1)
    return (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(device)


def test_channels_last_matches_default():
    reference = tiny_model()
    fn = make_inference_fn(copy.deepcopy(reference), channels_last=True)
    x = images()
    with torch.inference_mode():
        fast, slow = fn(x), reference(x, all_stacks=False)
    torch.testing.assert_close(fast.landmarks, slow.landmarks, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.heatmaps[-1], slow.heatmaps[-1], rtol=1e-4, atol=1e-4)


def test_bf16_autocast_on_cpu_stays_close():
    reference = tiny_model()
    fn = make_inference_fn(copy.deepcopy(reference), amp="bf16")
    with torch.inference_mode():
        out = fn(images())
        diff = max_landmark_difference(fn, reference, images())
    assert out.landmarks.dtype == torch.float32  # decoded in float32 even under autocast
    # bf16 keeps ~3 significant digits; a random tiny net is measured at ~0.04 here.
    assert diff < 0.1


def test_cuda_graphs_need_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        CudaGraphRunner(lambda x: tiny_model()(x), images())
    with pytest.raises(ValueError, match="example"):
        make_inference_fn(tiny_model(), cuda_graphs=True)


@pytest.mark.slow  # inductor's C++ compile takes ~40 s on 2 CPU cores
def test_torch_compile_matches_eager():
    reference = tiny_model(nlevels=1, channels=16, input_size=32)
    fn = make_inference_fn(copy.deepcopy(reference), compile=True)
    with torch.inference_mode():
        assert max_landmark_difference(fn, reference, images(1, 32)) < 1e-5


@needs_cuda
@pytest.mark.parametrize("amp, tolerance", [(None, 1e-5), ("bf16", 0.1), ("fp16", 0.05)])
def test_cuda_graphs_and_autocast_match_eager(amp, tolerance, monkeypatch):
    # Exact float32 convolutions, so the float32 case checks the graph replay itself
    # (cuDNN's default TF32 would differ between memory formats by far more than 1e-5).
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    reference = tiny_model("cuda")
    x = images(1, device="cuda")
    # A copy nobody else holds: the runner must keep the weights its graph reads alive
    # (it once did not, and replayed NaN from freed memory).
    fn = make_inference_fn(copy.deepcopy(reference), channels_last=True, amp=amp,
                           cuda_graphs=True, example=x)
    gc.collect()
    torch.cuda.empty_cache()
    with torch.inference_mode():
        assert max_landmark_difference(fn, reference, x) < tolerance
        other = images(1, device="cuda") * 0.5
        assert max_landmark_difference(fn, reference, other) < tolerance  # replays new input
        with pytest.raises(ValueError, match="captured"):
            fn(images(2, device="cuda"))


def test_bench_infer_reports_latency(capsys):
    status = main(["bench", "infer", "--device", "cpu", "--batch-size", "1", "--nstack", "1",
                   "--channels", "32", "--input-size", "64", "--json",
                   "--iters", "2", "--repeats", "2", "--warmup", "1"])
    assert status == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bench"] == "infer" and result["device"] == "cpu"
    assert result["input_shape"] == [1, 3, 64, 64]
    assert result["model"]["nstack"] == 1 and result["model"]["channels"] == 32
    assert result["model"]["parameters"] > 0
    latency = result["latency_ms"]
    assert 0 < latency["ms_min"] <= latency["ms_median"] <= latency["ms_max"]
    assert result["images_per_s"] == pytest.approx(1000 / latency["ms_median"])
    assert result["options"] == {"channels_last": False, "amp": None, "compile": False,
                                 "cuda_graphs": False}
    assert result["max_abs_landmark_diff"] is None


def test_bench_infer_checks_speed_paths_against_eager(capsys):
    status = main(["bench", "infer", "--device", "cpu", "--nstack", "1", "--channels", "32",
                   "--input-size", "64", "--points", "12", "--channels-last", "--json",
                   "--iters", "2", "--repeats", "2", "--warmup", "1"])
    assert status == 0
    result = json.loads(capsys.readouterr().out)
    assert result["options"]["channels_last"] is True
    assert result["model"]["definition"] == "synthetic12"
    assert 0 <= result["max_abs_landmark_diff"] < 1e-4
    assert result["speedup_vs_eager_fp32"] > 0
