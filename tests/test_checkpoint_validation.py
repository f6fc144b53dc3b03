"""Crafted checkpoints are refused from their claims, before anything is built; a file that is
no checkpoint is called that (never a hint to --allow-pickle); train_state.pt goes through
the same safe loader and fails in one line."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from staralign.cli import main
from staralign.config import ModelConfig, save_yaml, to_dict
from staralign.models import build_model, load_model, save_model
from staralign.models.checkpoint import ARCH_LIMITS, CheckpointError

from .test_engine import tiny_config

TINY = ModelConfig(definition="WFLW", nstack=1, nlevels=1, channels=8, stem_channels=(4, 8), input_size=32)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    return save_model(build_model(TINY), tmp_path_factory.mktemp("w") / "tiny.safetensors")


def _with_claims(src: Path, dst: Path, **config) -> Path:
    """``src``'s tensors under metadata whose model config is changed by ``config``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as fh:
        info = json.loads(fh.metadata()["staralign"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    info["config"].update(config)
    save_file(tensors, str(dst), metadata={"staralign": json.dumps(info)})
    return dst


@pytest.fixture
def deadline():
    """Fail (instead of building for minutes) if a load takes more than 20 s."""
    def boom(*_):
        raise TimeoutError("the loader built the claimed model instead of refusing it")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("claims, word", [
    ({"nstack": 10000}, "nstack 10000"),
    ({"input_size": 2 ** 20}, "input_size"),
    ({"channels": 1 << 20}, "channels"),
    ({"nlevels": 40, "input_size": 4 * 2 ** 40}, "nlevels"),
    ({"nlevels": 2 ** 62}, "nlevels"),  # 2 ** nlevels alone never finishes
    ({"nstack": 3}, "claims 3 stack(s) but holds weights for 1"),
])
def test_claims_beyond_bounds_or_the_weights_are_refused_before_building(tiny_file, tmp_path, deadline, claims,
                                                                         word):
    crafted = _with_claims(tiny_file, tmp_path / "crafted.safetensors", **claims)
    with pytest.raises(CheckpointError) as info:
        load_model(crafted)
    assert word in str(info.value) and str(crafted) in str(info.value)


def test_bounds_admit_the_papers_model():
    paper = ModelConfig()  # the authors' recipe
    assert paper.nstack <= ARCH_LIMITS["nstack"] and paper.channels <= ARCH_LIMITS["channels"]
    assert paper.input_size <= ARCH_LIMITS["input_size"] and ARCH_LIMITS["num_points"] >= 98


def test_a_real_file_still_loads(tiny_file):
    assert to_dict(load_model(tiny_file).config) == to_dict(TINY)


@pytest.mark.parametrize("head", [b"", b"\x80\x02", b"PK\x03\x04"])
def test_random_bytes_are_not_a_checkpoint_and_never_suggest_allow_pickle(tmp_path, head):
    path = tmp_path / "junk.pth"
    path.write_bytes(head + os.urandom(4096))
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    text = str(info.value)
    assert "not a checkpoint" in text and "pickle" not in text.lower() and "\n" not in text


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_of_objects_is_refused_and_runs_nothing(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"net": _Evil()}, path)
    with pytest.raises(CheckpointError, match="allow-pickle"):
        load_model(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from staralign.data.synth import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, train=8, test=4, ambiguity=0.0, seed=5, size=96)
    return out


@pytest.mark.parametrize("content", ["evil", "random", "foreign", "incomplete", "other model"])
def test_a_bad_train_state_is_one_line_on_resume(data, tmp_path, capsys, content):
    run = tmp_path / "run"
    run.mkdir()
    save_yaml(tiny_config(data, optim={"epochs": 1}, runtime={"tensorboard": False}), run / "config.yaml")
    state = run / "train_state.pt"
    if content == "evil":
        torch.save({"version": 1, "model": _Evil()}, state)
    elif content == "random":
        state.write_bytes(os.urandom(2048))
    elif content == "foreign":
        torch.save({"version": 99}, state)
    elif content == "incomplete":
        torch.save({"version": 1, "model": {}}, state)
    else:  # a complete state of another network
        from staralign.engine.trainer import train

        other = tmp_path / "other"
        train(tiny_config(data, optim={"epochs": 1}, model={"channels": 8}, runtime={"tensorboard": False}), other)
        (other / "train_state.pt").rename(state)
    status = main(["train", "--resume", str(run)])
    err = capsys.readouterr().err
    assert status != 0
    lines = [x for x in err.splitlines() if "error:" in x]
    assert len(lines) == 1 and "train_state.pt" in lines[0], err
    assert "Traceback" not in err and "allow-pickle" not in err
    assert not list(run.glob("*.safetensors")), "training went ahead from a state it could not read"


def test_mutated_files_are_refused_in_one_line_and_quickly(tiny_file, tmp_path, deadline):
    """A seeded fuzz: crafted claims, flipped or truncated bytes, random bytes -- every file
    loads or is a one-line CheckpointError, and none hangs (the deadline fixture)."""
    import random

    rng = random.Random(15)
    raw = tiny_file.read_bytes()
    values = [0, -1, 3, 10000, 2 ** 20, 2 ** 62, 1.5, "8", None, []]
    outcomes = {"refused": 0, "loaded": 0}
    for trial in range(45):
        path = tmp_path / f"f{trial}.safetensors"
        if trial % 3 == 0:
            claims = {rng.choice(["nstack", "nlevels", "channels", "input_size", "stem_channels"]): rng.choice(values)
                      for _ in range(rng.randint(1, 3))}
            _with_claims(tiny_file, path, **claims)
        elif trial % 3 == 1:
            data = bytearray(raw)
            for _ in range(rng.randint(1, 20)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            path.write_bytes(bytes(data[: rng.randrange(len(data))] if rng.random() < 0.3 else data))
        else:
            path.write_bytes(rng.choice([b"", b"\x80\x02", b"PK\x03\x04", raw[:64]]) + rng.randbytes(2000))
        try:
            load_model(path)
            outcomes["loaded"] += 1
        except CheckpointError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
            outcomes["refused"] += 1
    assert outcomes["refused"] >= 40, outcomes
