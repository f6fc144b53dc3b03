"""The STAR network: official layout, the original's outputs, and our generalisations."""

from __future__ import annotations

import json

import pytest
import torch

from staralign.config import ConfigError, ModelConfig
from staralign.definitions import LandmarkDefinition, get_definition
from staralign.heatmaps import soft_argmax
from staralign.models import StarOutput, build_model, load_model
from staralign.models.layers import BOUNDARY_THRESHOLD, CoordConv, coordinate_channels

from .conftest import load_reference, reference_path

PARITY_TOLERANCE = 1e-4  # from ../shared/reference/README.md


def small_config(**changes) -> ModelConfig:
    base = {"nstack": 1, "nlevels": 2, "channels": 32, "input_size": 64}
    base.update(changes)
    return ModelConfig(**base)


def tiny_definition() -> LandmarkDefinition:
    return LandmarkDefinition.from_dict({
        "name": "tiny",
        "num_points": 5,
        "edges": [{"closed": False, "indices": [0, 1, 2]}, {"closed": True, "indices": [2, 3, 0]}],
        "nme_default": {"left": 0, "right": 1},
    })


@pytest.mark.parametrize("dataset", ["WFLW", "300W", "COFW"])
def test_state_dict_matches_official_layout(dataset):
    layout = json.loads(reference_path("official_state_dict_layout.json").read_text())[dataset]
    model = build_model(ModelConfig(definition=dataset))
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert sorted(set(ours) - set(layout)) == []
    assert sorted(set(layout) - set(ours)) == []
    wrong = {k: (ours[k], layout[k]) for k in layout if ours[k] != layout[k]}
    assert wrong == {}


def test_reproduces_original_outputs():
    expected = load_reference("wflw_outputs.pt")
    model = load_model(reference_path("wflw_random.pkl"))
    assert model.definition.name == expected["definition"]
    assert model.config.nstack == expected["nstack"]
    with torch.inference_mode():
        out = model(expected["input"])

    def max_diff(a, b):
        assert a.shape == b.shape
        return (a - b).abs().max().item()

    assert max_diff(out.landmarks, expected["landmarks"]) <= PARITY_TOLERANCE
    per_stack = tuple(soft_argmax(h) for h in out.heatmaps)  # every stack's landmarks
    assert len(per_stack) == len(expected["landmarks_per_stack"])
    for ours, theirs in zip(per_stack, expected["landmarks_per_stack"], strict=True):
        assert max_diff(ours, theirs) <= PARITY_TOLERANCE
    assert max_diff(out.pointmaps[-1], expected["last_pointmaps"]) <= PARITY_TOLERANCE
    assert max_diff(out.edgemaps[-1], expected["last_edgemaps"]) <= PARITY_TOLERANCE
    assert max_diff(out.heatmaps[-1], expected["last_fusion"]) <= PARITY_TOLERANCE


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(nstack=1, nlevels=4, channels=64, input_size=128),
        ModelConfig(nstack=2, nlevels=3, channels=64, input_size=128),
        small_config(nstack=2, use_aam=False),
        small_config(nstack=2, add_coord=False),
        small_config(nstack=2, use_aam=False, add_coord=False),
    ],
    ids=["1stack-64ch-128px", "2stack", "no-aam", "no-coord", "plain"],
)
def test_forward_shapes_and_backward(config):
    definition = get_definition("WFLW")
    model = build_model(config, definition).train()
    batch, size = 2, config.input_size
    images = torch.rand(batch, 3, size, size) * 2 - 1
    out = model(images)
    assert isinstance(out, StarOutput)
    n, e, s = definition.num_points, definition.num_edges, config.heatmap_size
    assert out.landmarks.shape == (batch, n, 2)
    assert out.landmarks.abs().max() <= 1
    assert [h.shape for h in out.heatmaps] == [(batch, n, s, s)] * config.nstack
    stacks_with_aam = config.nstack if config.use_aam else 0
    assert [p.shape for p in out.pointmaps] == [(batch, n, s, s)] * stacks_with_aam
    assert [m.shape for m in out.edgemaps] == [(batch, e, s, s)] * stacks_with_aam

    loss = out.landmarks.square().sum() + sum(h.mean() for h in out.heatmaps)
    loss = loss + sum(m.mean() for m in out.pointmaps + out.edgemaps)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(param.grad).all(), name


def test_last_stack_only_matches_full_output():
    model = build_model(small_config(nstack=3)).eval()
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        full = model(images)
        last = model(images, all_stacks=False)
    assert len(full.heatmaps) == 3
    assert len(last.heatmaps) == len(last.pointmaps) == len(last.edgemaps) == 1
    torch.testing.assert_close(last.landmarks, full.landmarks, rtol=0, atol=0)
    torch.testing.assert_close(last.heatmaps[0], full.heatmaps[-1], rtol=0, atol=0)
    torch.testing.assert_close(full.landmarks, soft_argmax(full.heatmaps[-1]), rtol=0, atol=0)


def test_custom_definition_and_non_square_input():
    definition = tiny_definition()
    model = build_model(small_config(nstack=2), definition).eval()
    assert model.definition == definition
    with torch.inference_mode():
        out = model(torch.rand(1, 3, 64, 128))
    assert out.landmarks.shape == (1, 5, 2)
    assert out.heatmaps[-1].shape == (1, 5, 16, 32)
    assert out.edgemaps[-1].shape == (1, 2, 16, 32)


def test_rejects_bad_input_and_config():
    model = build_model(small_config())
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.rand(1, 3, 72, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 1, 64, 64))
    with pytest.raises(ConfigError, match="input_size"):
        build_model(small_config(input_size=40))
    edgeless = LandmarkDefinition.from_dict({
        "name": "dots", "num_points": 3, "edges": [], "nme_default": {"left": 0, "right": 1},
    })
    with pytest.raises(ConfigError, match="no edges"):
        build_model(small_config(), edgeless)
    assert build_model(small_config(use_aam=False), edgeless) is not None


def test_coordinate_channels_follow_the_original_axes():
    grid = coordinate_channels(4, 6)
    assert grid.shape == (1, 3, 4, 6)
    rows, cols, radius = grid[0]
    # Channel 0 (the original's "x") runs down the rows, channel 1 across the columns.
    torch.testing.assert_close(rows[:, 0], torch.linspace(-1, 1, 4))
    assert (rows == rows[:, :1]).all()
    torch.testing.assert_close(cols[0], torch.linspace(-1, 1, 6))
    assert (cols == cols[:1]).all()
    assert radius.max() == 1 and radius[0, 0] == 1
    torch.testing.assert_close(radius, torch.sqrt(rows**2 + cols**2) / 2**0.5)


def test_coordconv_boundary_channels_mask_coordinates():
    layer = CoordConv(1, 6, 1, boundary=True)
    with torch.no_grad():  # an identity conv exposes the layer's input channels
        layer.conv.weight.copy_(torch.eye(6).view(6, 6, 1, 1))
        layer.conv.bias.zero_()
    features = torch.rand(2, 1, 8, 8)
    boundary = torch.rand(2, 1, 8, 8) * 2 * BOUNDARY_THRESHOLD
    out = layer(features, boundary)
    grid = coordinate_channels(8, 8).expand(2, -1, -1, -1)
    inside = boundary > BOUNDARY_THRESHOLD
    torch.testing.assert_close(out[:, :1], features)
    torch.testing.assert_close(out[:, 1:4], grid)
    torch.testing.assert_close(out[:, 4:], torch.where(inside, grid[:, :2], 0.0))
    assert inside.any() and (~inside).any()
    with pytest.raises(ValueError, match="boundary"):
        layer(features)


def test_trains_after_evaluating_under_inference_mode():
    # The engine evaluates under inference_mode and then trains the same model;
    # anything cached during evaluation must not poison autograd.
    model = build_model(small_config(nstack=2)).eval()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        model(images)
    out = model.train()(images)
    (out.landmarks.sum() + sum(h.mean() for h in out.heatmaps)).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_identity_shortcut_weights_are_saved_but_not_trained():
    model = build_model(small_config())
    key = "hgs.0.up1.skip_layer.conv.weight"
    assert key in model.state_dict()
    assert key not in dict(model.named_parameters())
    assert "pre.1.skip_layer.conv.weight" in dict(model.named_parameters())  # 64 -> 128: used
