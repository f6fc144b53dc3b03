"""The CUDA-graph training step: same updates as the eager step, decided on the device.

On a CPU the step runs its device-side body eagerly (``capture=False``); the capture itself
is checked by the GPU-only test at the end."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from staralign.config import ConfigError, LossConfig, ModelConfig, OptimConfig, load_preset, merge
from staralign.data.targets import batch_targets
from staralign.data.transforms import network_input, normalize_points
from staralign.definitions import get_definition
from staralign.engine.ema import ModelEMA
from staralign.engine.step import GraphedTrainStep, build_optimizer, train_step
from staralign.losses.recipe import RecipeLoss
from staralign.models import build_model

DEFINITION = get_definition("WFLW")


def _parts(device: str = "cpu"):
    torch.manual_seed(0)
    model = build_model(ModelConfig(definition="WFLW", nstack=2, nlevels=2, channels=16, input_size=64),
                        DEFINITION).to(device)
    model.train()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3), graphable=True)
    return model, RecipeLoss(LossConfig()), optimizer, ModelEMA(model, 0.9)


def _batch(seed: int, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (2, 3, 64, 64), generator=gen, dtype=torch.uint8)
    points = torch.rand(2, 98, 2, generator=gen) * 40 + 12
    pm, em = batch_targets({"points": points}, DEFINITION, 64, 16, torch.device("cpu"))
    return [t.to(device) for t in (images, normalize_points(points, 64), pm, em)]


def _state(model, ema, optimizer) -> list[torch.Tensor]:
    adam = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return [t.detach().clone() for t in [*model.state_dict().values(), *ema.state_dict().values(), *adam]]


def _assert_close(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 1e-6) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        assert float((x.double() - y.double()).abs().max()) <= atol


def test_device_side_step_matches_the_eager_step():
    eager = _parts()
    graphed = _parts()
    step = GraphedTrainStep(graphed[0], graphed[0], graphed[1], graphed[2], graphed[3], *_batch(0),
                            grad_clip=1.0, capture=False)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for seed in range(3):
        images, landmarks, pm, em = _batch(seed)
        a = train_step(eager[0], eager[0], eager[1], eager[2], scaler, eager[3], network_input(images), landmarks,
                       pm, em, grad_clip=1.0)
        b = step(images, landmarks, pm, em)
        assert a.applied and b.applied
        assert math.isclose(a.loss, b.loss, rel_tol=1e-5) and math.isclose(a.grad_norm, b.grad_norm, rel_tol=1e-5)
    _assert_close(_state(eager[0], eager[3], eager[2]), _state(graphed[0], graphed[3], graphed[2]))


def test_a_nonfinite_step_changes_nothing_but_batchnorm_statistics():
    model, criterion, optimizer, ema = _parts()
    step = GraphedTrainStep(model, model, criterion, optimizer, ema, *_batch(0), capture=False)
    assert step(*_batch(1)).applied
    params = [p.detach().clone() for p in model.parameters()]
    averaged = [t.detach().clone() for t in ema.state_dict().values()]
    adam = copy.deepcopy(optimizer.state_dict()["state"])

    images, landmarks, pm, em = _batch(2)
    bad = step(images, landmarks * float("nan"), pm, em)
    assert not bad.applied and not math.isfinite(bad.loss)
    # The eager step's rule, taken on the device: no parameter, EMA or Adam moment moved.
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters(), strict=True))
    assert all(torch.equal(a, t) for a, t in zip(averaged, ema.state_dict().values(), strict=True))
    for k, s in optimizer.state_dict()["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s[name], adam[k][name]), name

    good = step(*_batch(3))
    assert good.applied
    assert any(not torch.equal(a, p) for a, p in zip(params, model.parameters(), strict=True))
    assert all(int(s["step"]) == 2 for s in optimizer.state.values())


def test_the_schedule_reaches_a_captured_step_and_inputs_are_checked():
    model, criterion, optimizer, ema = _parts()
    lr = optimizer.param_groups[0]["lr"]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1], gamma=0.1)
    with warnings.catch_warnings():  # no step was taken on purpose: only the schedule is under test
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
        scheduler.step()
    # The graph reads the learning rate from this tensor: the schedule must change it in place.
    assert optimizer.param_groups[0]["lr"] is lr and math.isclose(float(lr), 1e-4, rel_tol=1e-6)

    step = GraphedTrainStep(model, model, criterion, optimizer, ema, *_batch(0), capture=False)
    images, landmarks, pm, em = _batch(1)
    with pytest.raises(ValueError, match="landmarks: the step was captured for"):
        step(images, landmarks[:1], pm, em)
    with pytest.raises(ValueError, match="graphable=True"):
        GraphedTrainStep(model, model, criterion, torch.optim.Adam(model.parameters()), ema, *_batch(0),
                         capture=False)
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedTrainStep(model, model, criterion, optimizer, ema, *_batch(0))


def test_ema_update_with_a_device_flag():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    plain, flagged = ModelEMA(model, 0.75), ModelEMA(model, 0.75)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model[1].num_batches_tracked += 4
    before = copy.deepcopy(flagged.state_dict())
    flagged.update(model, skip=torch.ones(()))
    assert all(torch.equal(before[k], v) for k, v in flagged.state_dict().items())
    plain.update(model)
    flagged.update(model, skip=torch.zeros(()))
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(flagged.state_dict()[k], v, rtol=0, atol=1e-7)
    assert int(flagged.state_dict()["1.num_batches_tracked"]) == 4


def test_ema_follows_a_model_whose_weights_change_layout():
    model = torch.nn.Conv2d(3, 4, 3)
    ema = ModelEMA(model, 0.5)
    ema.update(model)  # binds to the model's tensors
    before = ema.module.weight.detach().clone()
    model.to(memory_format=torch.channels_last)  # swaps each parameter's data
    with torch.no_grad():
        model.weight.fill_(10.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.5 * before + 5.0)


def test_cuda_graph_settings_are_validated():
    base = load_preset("tiny")
    with pytest.raises(ConfigError, match="fp16"):
        merge(base, {"runtime": {"cuda_graphs": True, "amp": "fp16"}}).validate()
    with pytest.raises(ConfigError, match="sgd"):
        merge(base, {"runtime": {"cuda_graphs": True}, "optim": {"optimizer": "sgd"}}).validate()
    merge(base, {"runtime": {"cuda_graphs": True, "amp": "bf16"}}).validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_step_matches_the_uncaptured_one_on_cuda():
    eager = _parts("cuda")
    graphed = _parts("cuda")
    plain = GraphedTrainStep(eager[0], eager[0], eager[1], eager[2], eager[3], *_batch(0, "cuda"), capture=False)
    captured = GraphedTrainStep(graphed[0], graphed[0], graphed[1], graphed[2], graphed[3], *_batch(0, "cuda"))
    # Capturing did not train: weights, EMA and BatchNorm statistics are where they started.
    n = len(eager[0].state_dict())
    _assert_close(_state(eager[0], eager[3], eager[2])[:n], _state(graphed[0], graphed[3], graphed[2])[:n], atol=0.0)

    # One step from the same weights.  Adam's first update is +-lr for every weight whatever
    # its gradient's size, so a weight whose gradient is at the GPU's rounding level may move
    # the other way: nearly all must agree.
    a, b = plain(*_batch(1, "cuda")), captured(*_batch(1, "cuda"))
    assert a.applied and b.applied
    assert math.isclose(a.loss, b.loss, rel_tol=1e-4) and math.isclose(a.grad_norm, b.grad_norm, rel_tol=1e-3)
    moved_apart = sum(int(((x - y).abs() > 1e-6).sum()) for x, y in
                      zip(eager[0].parameters(), graphed[0].parameters(), strict=True))
    assert moved_apart <= 0.01 * sum(p.numel() for p in eager[0].parameters())

    # A non-finite batch: the replay decides on the device and nothing moves.
    before = _state(graphed[0], graphed[3], graphed[2])
    images, landmarks, pm, em = _batch(2, "cuda")
    bad = captured(images, landmarks * float("nan"), pm, em)
    assert not bad.applied and not math.isfinite(bad.loss)
    after = _state(graphed[0], graphed[3], graphed[2])
    buffers = {i for i, (k, _) in enumerate(graphed[0].state_dict().items()) if "running" in k or "num_batches" in k}
    assert all(torch.equal(x, y) for i, (x, y) in enumerate(zip(before, after, strict=True)) if i not in buffers)

    # The next replay reads its new batch and applies again.
    c, d = plain(*_batch(3, "cuda")), captured(*_batch(3, "cuda"))
    assert d.applied and math.isclose(c.loss, d.loss, rel_tol=1e-2) and not math.isclose(d.loss, b.loss, rel_tol=1e-3)
    assert all(int(s["step"]) == 2 for s in graphed[2].state.values())
