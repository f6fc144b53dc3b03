"""Checkpoints: the authors' files, our safetensors format, and clear errors for bad files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from staralign.config import ModelConfig
from staralign.definitions import get_definition
from staralign.models import CheckpointError, build_model, load_model, save_model

from .conftest import reference_path


def small_model(seed: int = 0, **changes):
    config = {"nstack": 2, "nlevels": 2, "channels": 32, "input_size": 64}
    config.update(changes)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**config)).eval()
    # Random BatchNorm statistics, so eval-mode outputs depend on every saved tensor.
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.uniform_(0.5, 1.5)
    return model


def outputs(model, size: int = 64):
    images = torch.linspace(-1, 1, 3 * size * size).view(1, 3, size, size)
    with torch.inference_mode():
        return model(images)


def assert_same_outputs(a, b, size: int = 64):
    out_a, out_b = outputs(a, size), outputs(b, size)
    torch.testing.assert_close(out_a.landmarks, out_b.landmarks, rtol=0, atol=0)
    for x, y in zip(out_a.heatmaps + out_a.edgemaps, out_b.heatmaps + out_b.edgemaps, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_round_trip_of_our_format(tmp_path):
    model = small_model()
    path = save_model(model, tmp_path / "model.safetensors")
    loaded = load_model(path)
    assert not loaded.training
    assert loaded.config == model.config
    assert loaded.definition == model.definition
    assert_same_outputs(model, loaded)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left


def test_file_records_config_and_definition(tmp_path):
    model = small_model(use_aam=False)
    path = save_model(model, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        info = json.loads(fh.metadata()["staralign"])
        keys = set(fh.keys())  # noqa: SIM118 (not a dict)
    assert info["config"]["use_aam"] is False and info["config"]["nstack"] == 2
    assert info["definition"] == model.definition.to_dict()
    assert keys == set(model.state_dict())


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(small_model(seed=1), path)
    newer = small_model(seed=2)
    save_model(newer, path)
    assert_same_outputs(newer, load_model(path))


def test_official_checkpoint_converted_to_our_format(tmp_path):
    official = load_model(reference_path("wflw_random.pkl"))
    assert {p.dtype for p in official.state_dict().values() if p.is_floating_point()} == {
        torch.float32
    }
    path = save_model(official, tmp_path / "wflw.safetensors")
    converted = load_model(path)
    assert converted.config == official.config
    converted_state = converted.state_dict()
    for key, value in official.state_dict().items():
        assert torch.equal(converted_state[key], value), key
    assert_same_outputs(official, converted)


def test_custom_definition_survives_without_its_file(tmp_path):
    yaml_path = tmp_path / "five.yaml"
    yaml_path.write_text(yaml.safe_dump({
        "name": "FivePoints",
        "num_points": 5,
        "edges": [{"closed": False, "indices": [0, 1, 2], "name": "brow"},
                  {"closed": True, "indices": [2, 3, 4]}],
        "flip_pairs": [[0, 4], [1, 3]],
        "nme_default": {"left": 0, "right": 4},
        "fr_auc_threshold": 0.08,
    }))
    model = build_model(ModelConfig(definition=str(yaml_path), nstack=1, nlevels=2,
                                    channels=32, input_size=64)).eval()
    path = save_model(model, tmp_path / "five.safetensors")
    yaml_path.unlink()  # the checkpoint alone must rebuild the model
    loaded = load_model(path)
    assert loaded.definition == model.definition
    assert loaded.definition.num_points == 5 and loaded.definition.fr_auc_threshold == 0.08
    assert_same_outputs(model, loaded)


@pytest.mark.parametrize("layout", ["net", "module-prefix", "bare", "bare-safetensors"])
def test_loads_official_style_files(tmp_path, layout):
    model = small_model()
    state = model.state_dict()
    path = tmp_path / "ckpt.pth"
    if layout == "net":
        torch.save({"net": state, "epoch": 3}, path)
    elif layout == "module-prefix":
        torch.save({"net": {f"module.{k}": v for k, v in state.items()}}, path)
    elif layout == "bare":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = load_model(path)
    for field in ("nstack", "nlevels", "channels", "use_aam", "add_coord"):
        assert getattr(loaded.config, field) == getattr(model.config, field), field
    assert loaded.definition.name == "WFLW"  # inferred from 98 points
    assert_same_outputs(model, loaded)


def test_infers_variants_without_aam_or_coordconv(tmp_path):
    model = small_model(use_aam=False, add_coord=False)
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    loaded = load_model(tmp_path / "plain.pth")
    assert loaded.config.use_aam is False and loaded.config.add_coord is False
    assert_same_outputs(model, loaded)


def test_infers_a_narrow_stem_and_round_trips_it(tmp_path):
    model = small_model(stem_channels=(16, 24))
    torch.save(model.state_dict(), tmp_path / "narrow.pth")
    loaded = load_model(tmp_path / "narrow.pth")
    assert tuple(loaded.config.stem_channels) == (16, 24)
    assert_same_outputs(model, loaded)
    ours = load_model(save_model(model, tmp_path / "narrow.safetensors"))
    assert ours.config == model.config
    assert_same_outputs(model, ours)


def test_float16_weights_are_cast_to_float32(tmp_path):
    model = small_model()
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"net": half}, tmp_path / "half.pth")
    loaded = load_model(tmp_path / "half.pth")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    out = outputs(loaded)
    assert out.landmarks.dtype == torch.float32


def test_ema_weights_are_selected(tmp_path):
    plain, averaged = small_model(seed=1), small_model(seed=2)
    path = tmp_path / "train.pth"
    torch.save({"net": plain.state_dict(), "net_ema": averaged.state_dict()}, path)
    assert_same_outputs(load_model(path), plain)
    assert_same_outputs(load_model(path, ema=True), averaged)

    torch.save({"net": plain.state_dict()}, tmp_path / "no_ema.pth")
    with pytest.raises(CheckpointError, match="net_ema"):
        load_model(tmp_path / "no_ema.pth", ema=True)


def test_file_needing_full_unpickling_is_refused_unless_allowed(tmp_path):
    model = small_model()
    path = tmp_path / "with_args.pth"
    torch.save({"net": model.state_dict(), "args": argparse.Namespace(lr=1e-3)}, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert str(path) in message
    assert "arbitrary code" in message
    assert "allow_pickle=True" in message and "--allow-pickle" in message
    assert_same_outputs(load_model(path, allow_pickle=True), model)


def test_wrong_shape_names_file_and_key(tmp_path):
    state = small_model().state_dict()
    key = "hgs.1.low1.conv2.conv.weight"
    state[key] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save({"net": state}, path)
    with pytest.raises(CheckpointError, match=rf"{path}.*{key}.*\[3, 3, 3, 3\]"):
        load_model(path)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = small_model().state_dict()
    del state["features.1.1.bn.running_var"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing key 'features\.1\.1\.bn\.running_var'"):
        load_model(tmp_path / "missing.pth")

    state = small_model().state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected key 'extra\.weight'"):
        load_model(tmp_path / "extra.pth")


@pytest.mark.parametrize("content", ["text", "list", "empty-dict", "foreign-weights"])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "thing.pth"
    if content == "text":
        path.write_text("hello, I am not a checkpoint\n")
    elif content == "list":
        torch.save([1, 2, 3], path)
    elif content == "empty-dict":
        torch.save({}, path)
    else:
        torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match=str(path)):
        load_model(path)
    with pytest.raises(CheckpointError, match="no such"):
        load_model(tmp_path / "absent.pth")


def test_definition_must_match_the_network(tmp_path):
    path = tmp_path / "wflw.pth"
    torch.save({"net": small_model().state_dict()}, path)
    with pytest.raises(CheckpointError, match="98 points"):
        load_model(path, definition="300W")
    # Same point and edge counts as WFLW, different edges: the stored edge-to-point map disagrees.
    wflw = get_definition("WFLW").to_dict()
    wflw["name"] = "Shuffled"
    wflw["edges"] = [wflw["edges"][-1]] + wflw["edges"][:-1]
    shuffled = tmp_path / "shuffled.json"
    shuffled.write_text(json.dumps(wflw))
    with pytest.raises(CheckpointError, match="e2h_transform.weight.*Shuffled"):
        load_model(path, definition=shuffled)
    assert load_model(path, definition="wflw").definition.name == "WFLW"


def test_model_moves_to_map_location(tmp_path):
    path = save_model(small_model(), tmp_path / "m.safetensors")
    model = load_model(Path(path), map_location=torch.device("cpu"))
    assert {t.device.type for t in model.state_dict().values()} == {"cpu"}


@pytest.mark.parametrize("version, why", [(None, "positive integer, got None"), ("missing", "is missing"),
                                          (2, "newer than this staralign"), (True, "positive integer"),
                                          ("1", "positive integer")])
def test_stored_record_version_must_be_one_we_read(tmp_path, version, why):
    """A bad 'version' in a weights file is a CheckpointError naming the file and the field."""
    info = {"format": "staralign.model", "config": {}, "definition": {}}
    if version != "missing":
        info["version"] = version
    path = tmp_path / "odd.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"staralign": json.dumps(info)})
    with pytest.raises(CheckpointError, match=rf"odd\.safetensors.*'version'.*{why}"):
        load_model(path)


def test_one_metadata_parser_for_weights_and_onnx_files():
    from staralign.metadata import parse_record

    def parse(text, **kw):
        return parse_record(text, source="m.bin", key="staralign", format_name="f", max_version=1, **kw)

    assert parse('{"format": "f", "version": 1, "x": 2}') == {"format": "f", "version": 1, "x": 2}
    for text, why in [("{", "not valid JSON"), ("[]", "not a f record"), ('{"format": "g", "version": 1}', "not a f"),
                      ('{"format": "f"}', "'version' is missing"), ('{"format": "f", "version": null}', "got None"),
                      ('{"format": "f", "version": 0}', "got 0"), ('{"format": "f", "version": 7}', "newer")]:
        with pytest.raises(CheckpointError, match=rf"m\.bin: metadata 'staralign'.*{why}"):
            parse(text, error=CheckpointError)
    with pytest.raises(ValueError, match="m.bin"):
        parse(None)


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    from staralign._io import atomic_path, atomic_write

    target = tmp_path / "sub" / "file.txt"
    assert atomic_write(target, "old") == target and target.read_text() == "old"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer dies")
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]  # no temporary left behind
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_follow_the_users_umask(tmp_path, umask):
    """safetensors creates its files 0600; ours get what any new file gets under the umask."""
    import os

    from staralign._io import atomic_write

    old = os.umask(umask)
    try:
        weights = save_model(small_model(), tmp_path / "m.safetensors")
        report = atomic_write(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    for path in (weights, report):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, path
