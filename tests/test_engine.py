"""Training engine: end to end, resume, kill-and-resume, DDP equivalence, atomic checkpoints, NaN handling."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from staralign.config import TrainConfig, from_dict, load_preset, merge, save_yaml, to_dict
from staralign.engine import state as state_mod
from staralign.engine.trainer import NonFiniteLossError, train
from staralign.models import load_model

REPO = Path(__file__).resolve().parents[1]


def tiny_config(data_dir: Path, **over) -> TrainConfig:
    """A model small enough for a few CPU steps per second."""
    base = {
        "model": {"definition": "WFLW", "nstack": 2, "nlevels": 2, "channels": 16, "input_size": 64},
        "data": {"image_dir": str(data_dir), "annot_dir": str(data_dir), "workers": 0, "val_batch_size": 8},
        "optim": {"epochs": 2, "batch_size": 4, "lr": 2e-3, "milestones": [100], "ema_decay": 0.9},
        "runtime": {"device": "cpu", "seed": 3, "log_every": 2, "tensorboard": True},
    }
    cfg = merge(load_preset("tiny"), base)
    return merge(cfg, over) if over else cfg


def _open_files() -> list[str]:
    """What this process holds open (Linux; empty elsewhere)."""
    out = []
    for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else []:
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
    return out


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    from staralign.data.synth import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, train=16, test=8, ambiguity=0.0, seed=5, size=96)
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path).state_dict()


def _assert_same_weights(a: dict, b: dict, rtol: float, atol: float) -> None:
    """Every tensor: max |a - b| <= atol + rtol * max |a| (same keys required)."""
    assert a.keys() == b.keys()
    excess = {
        k: float((a[k].float() - b[k].float()).abs().max() - (atol + rtol * a[k].float().abs().max()))
        for k in a
        if a[k].numel() and a[k].is_floating_point()
    }
    worst = max(excess, key=excess.get)
    assert excess[worst] <= 0, (worst, float((a[worst].float() - b[worst].float()).abs().max()))


def test_train_end_to_end_resume_and_evaluate(synth_data, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(synth_data, optim={"epochs": 3})
    result = train(cfg, run)
    assert result.epochs_done == 3
    assert str(run / "train.log") not in _open_files(), "train.log still open after the run"
    for name in ("config.yaml", "train.log", "metrics.jsonl", "train_state.pt", "last.safetensors",
                 "best.safetensors", "last_ema.safetensors"):
        assert (run / name).exists(), name
    assert list((run / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert train_losses[-1] < train_losses[0], train_losses
    vals = [r for r in records if r["kind"] == "val"]
    assert [v["epoch"] for v in vals] == [1, 2, 3]
    assert all(v["nme"] > 0 and v["nme_ema"] > 0 for v in vals)
    assert all(0 <= v["data_wait_seconds"] <= v["train_seconds"] for v in vals)
    # The saved config is complete and reloads to the same configuration.
    saved = from_dict(TrainConfig, yaml.safe_load((run / "config.yaml").read_text()))
    assert to_dict(saved) == to_dict(cfg)

    # Resume for two more epochs.
    cfg5 = merge(saved, {"optim": {"epochs": 5}})
    save_yaml(cfg5, run / "config.yaml")
    more = train(cfg5, run, resume=True)
    assert more.epochs_done == 5
    vals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [v["epoch"] for v in vals if v["kind"] == "val"] == [1, 2, 3, 4, 5]

    # The best checkpoint evaluates to the recorded best NME.
    from staralign.data.dataset import LandmarkDataset, collate_samples
    from staralign.engine.evaluator import evaluate_nme, evaluate_nmes

    model = load_model(run / "best.safetensors")
    ds = LandmarkDataset(synth_data / "test.tsv", synth_data, "WFLW", train=False, input_size=64,
                         heatmap_size=16, targets="device")
    loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate_samples)
    nme = evaluate_nme(model, loader, model.definition, torch.device("cpu"))
    assert nme == pytest.approx(more.best_nme, rel=1e-5)
    # Model and EMA are scored in one pass over the loader, each as if alone.
    class Counting:
        passes = 0

        def __iter__(self):
            Counting.passes += 1
            return iter(loader)

    ema = load_model(run / "last_ema.safetensors")
    both = evaluate_nmes({"model": model, "ema": ema}, Counting(), model.definition, torch.device("cpu"))
    assert Counting.passes == 1
    assert both == pytest.approx({"model": nme,
                                  "ema": evaluate_nme(ema, loader, model.definition, torch.device("cpu"))})


def _run_cli(args: list[str], env_extra: dict | None = None, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "staralign", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _cli_args(cfg_path: Path, out: Path) -> list[str]:
    return ["train", "--preset", "tiny", "--config", str(cfg_path), "--out", str(out)]


@pytest.mark.slow  # subprocess training runs killed and resumed: ~13 s on the 2-core VM
def test_kill_and_resume_matches_uninterrupted_run(synth_data, tmp_path):
    cfg = tiny_config(synth_data, optim={"epochs": 2}, runtime={"save_every_steps": 1, "tensorboard": False})
    cfg_path = tmp_path / "cfg.yaml"
    save_yaml(cfg, cfg_path)

    # Reference: an uninterrupted run.
    ref = _run_cli(_cli_args(cfg_path, tmp_path / "ref"))
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out

    # Same run, killed with SIGKILL once it has checkpointed mid-epoch, then resumed.
    run = tmp_path / "killed"
    proc = _run_cli(_cli_args(cfg_path, run))
    deadline = time.monotonic() + 300
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        state_file = run / state_mod.STATE_FILE
        if state_file.exists():
            try:
                st = state_mod.load_state(run)
            except (RuntimeError, ValueError):
                st = None
            if st and (st["epoch"], st["step"]) >= (0, 2):
                proc.send_signal(signal.SIGKILL)
                killed_at = (st["epoch"], st["step"])
                break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed_at is not None, "the run finished before it could be killed; make it longer"
    # The run may have gone on between our read and the signal; whatever the moment, the
    # state it left loads (written atomically) and is no older than what we saw.
    final = state_mod.load_state(run)
    assert (final["epoch"], final["step"]) >= killed_at
    resumed = _run_cli(["train", "--resume", str(run)])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resumed" in (run / "train.log").read_text()
    _assert_same_weights(_weights(tmp_path / "ref" / "last.safetensors"),
                         _weights(run / "last.safetensors"), 1e-5, 1e-6)
    _assert_same_weights(_weights(tmp_path / "ref" / "last_ema.safetensors"),
                         _weights(run / "last_ema.safetensors"), 1e-5, 1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two gloo processes and a single-process run: ~9 s on the 2-core VM
def test_ddp_two_processes_equal_single_process_on_same_global_batch(synth_data, tmp_path):
    # SGD: its update is linear in the gradient, so float-order noise stays small.  (Adam
    # turns the ~1e-9 gradients of conv biases that feed BatchNorm -- zero in exact
    # arithmetic -- into full-size steps of random sign, in any two runs that sum differently.)
    common = {"optim": {"epochs": 1, "ema": False, "optimizer": "sgd", "lr": 1e-4},
              "data": {"aug_prob": 1.0},
              "runtime": {"tensorboard": False, "sync_bn": True}}
    # No CoordConv here: its boundary channels threshold the previous stack's heatmap at
    # 0.05, so float-order noise can flip a pixel and move the batch statistics discretely.
    # And an L2 landmark loss: STAR's eigenvector gradients scale with 1 / (l2 - l1), which
    # on a freshly initialised, nearly isotropic heatmap amplifies that noise a thousandfold.
    common["model"] = {"add_coord": False}
    common["loss"] = {"kind": "l2"}
    single = tiny_config(synth_data, **common)
    single = merge(single, {"optim": {"batch_size": 8}})
    double = merge(single, {"optim": {"batch_size": 4}})
    save_yaml(single, tmp_path / "single.yaml")
    save_yaml(double, tmp_path / "double.yaml")
    p1 = _run_cli(_cli_args(tmp_path / "single.yaml", tmp_path / "one"))
    out1, _ = p1.communicate(timeout=600)
    assert p1.returncode == 0, out1
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "staralign", *_cli_args(tmp_path / "double.yaml",
                                                                            tmp_path / "two")]
    p2 = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p2.returncode == 0, p2.stdout + p2.stderr
    assert "2 processes" in (tmp_path / "two" / "train.log").read_text()
    # Equal up to float summation order (~1e-4 after two steps through BatchNorm).  Without
    # synchronised BatchNorm, or with a different split of the global batch, the same
    # comparison is off by more than 1e-2.
    _assert_same_weights(_weights(tmp_path / "one" / "last.safetensors"),
                         _weights(tmp_path / "two" / "last.safetensors"), 1e-3, 1e-5)


def test_a_crash_during_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    state_mod.save_state(tmp_path, {"epoch": 1, "step": 0, "marker": torch.arange(5)})
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        real_save({"partial": True}, f)  # something lands in the temporary file...
        raise OSError("disk full")  # ...then the writer dies

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError):
        state_mod.save_state(tmp_path, {"epoch": 2, "step": 0, "marker": torch.arange(7)})
    monkeypatch.setattr(torch, "save", real_save)
    st = state_mod.load_state(tmp_path)
    assert st["epoch"] == 1 and st["marker"].tolist() == list(range(5))
    assert [p.name for p in tmp_path.iterdir()] == [state_mod.STATE_FILE]


def test_nonfinite_loss_stops_loudly_or_skips(synth_data, tmp_path, monkeypatch):
    from staralign.losses import recipe

    calls = {"n": 0}
    real_forward = recipe.RecipeLoss.forward

    def sometimes_nan(self, *a, **k):
        total, parts = real_forward(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            total = total * float("nan")
        return total, parts

    monkeypatch.setattr(recipe.RecipeLoss, "forward", sometimes_nan)
    cfg = tiny_config(synth_data, optim={"epochs": 1}, runtime={"tensorboard": False})
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        train(cfg, tmp_path / "stop")
    # Nothing was trained on: no epoch finished, no weights written.
    assert not (tmp_path / "stop" / "last.safetensors").exists()

    calls["n"] = 0
    skip = merge(cfg, {"runtime": {"on_nonfinite": "skip"}})
    result = train(skip, tmp_path / "skip")
    assert result.skipped_batches == 1
    assert result.history[-1]["skipped_batches"] == 1


def test_train_cli_flags_and_aliases(synth_data, tmp_path):
    import argparse

    from staralign.engine.cli import _add_train_arguments, config_from_args

    p = argparse.ArgumentParser()
    _add_train_arguments(p)
    args = p.parse_args(["--preset", "tiny", "--data_definition", "300W", "--image_dir", "I", "--annot_dir", "A",
                         "--batch_size", "7", "--epochs", "3", "--lr", "0.01", "--nstack", "3", "--loss", "awing",
                         "--seed", "9", "--device", "cpu", "--workers", "0", "--out", "x"])
    cfg = config_from_args(args)
    assert cfg.model.definition == "300W" and cfg.model.nstack == 3
    assert (cfg.data.image_dir, cfg.data.annot_dir, cfg.data.workers) == ("I", "A", 0)
    assert (cfg.optim.batch_size, cfg.optim.epochs, cfg.optim.lr) == (7, 3, 0.01)
    assert cfg.loss.kind == "none" and cfg.runtime.seed == 9
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  epochs: many\n")
    from staralign.cli import main

    assert main(["train", "--preset", "tiny", "--config", str(bad), "--out", str(tmp_path / "r"),
                 "--annot-dir", str(synth_data)]) == 2


def test_target_placement_and_8bit_images_do_not_change_training(synth_data, tmp_path):
    # Where the maps are built and how the crops travel is a speed choice only: one epoch
    # with each placement ends at the same weights (targets agree to float rounding).
    weights = {}
    for targets, uint8 in (("worker", False), ("mixed", True), ("device", True)):
        run = tmp_path / f"{targets}_{uint8}"
        cfg = tiny_config(synth_data, optim={"epochs": 1},
                          data={"targets": targets, "uint8_images": uint8},
                          runtime={"tensorboard": False})
        train(cfg, run)
        weights[targets] = _weights(run / "last.safetensors")
    _assert_same_weights(weights["worker"], weights["mixed"], rtol=1e-4, atol=1e-6)
    _assert_same_weights(weights["worker"], weights["device"], rtol=1e-4, atol=1e-6)


def test_maps_are_built_only_for_a_loss_that_scores_them(synth_data):
    from staralign.definitions import get_definition
    from staralign.engine.distributed import DistEnv
    from staralign.engine.loaders import build_loaders

    env = DistEnv(device=torch.device("cpu"))
    for map_weight, keys in ((10.0, {"pointmaps", "edgemaps"}), (0.0, set())):
        cfg = tiny_config(synth_data, loss={"kind": "l2", "map_weight": map_weight}, data={"targets": "worker"})
        train_ds, *_ = build_loaders(cfg, get_definition("WFLW"), env)
        assert keys == {"pointmaps", "edgemaps"} & set(train_ds[0])


def test_target_placement_auto_and_validation():
    from staralign.config import ConfigError
    from staralign.engine.loaders import resolve_targets

    assert resolve_targets("auto", torch.device("cuda", 0)) == "mixed"
    assert resolve_targets("auto", torch.device("cpu")) == "worker"
    assert resolve_targets("device", torch.device("cpu")) == "device"
    with pytest.raises(ConfigError, match="data.targets"):
        merge(load_preset("tiny"), {"data": {"targets": "gpu"}}).validate()


def _tiny_step_parts():
    from staralign.config import LossConfig, ModelConfig
    from staralign.engine.ema import ModelEMA
    from staralign.losses.recipe import RecipeLoss
    from staralign.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(definition="WFLW", nstack=1, nlevels=2, channels=16, input_size=64))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, RecipeLoss(LossConfig(kind="l2", map_weight=0.0)), optimizer, ModelEMA(model, 0.5)


def test_train_step_applies_only_finite_steps():
    from staralign.engine.step import train_step

    model, criterion, optimizer, ema = _tiny_step_parts()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images, landmarks = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 98, 2) * 2 - 1
    before = [p.detach().clone() for p in model.parameters()]
    ema_before = [p.detach().clone() for p in ema.module.parameters()]

    bad = train_step(model, model, criterion, optimizer, scaler, ema, images * float("nan"), landmarks, None, None)
    assert not bad.applied and not math.isfinite(bad.loss)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(torch.equal(a, p) for a, p in zip(ema_before, ema.module.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())

    good = train_step(model, model, criterion, optimizer, scaler, ema, images, landmarks, None, None)
    assert good.applied and math.isfinite(good.loss) and good.grad_norm > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert any(not torch.equal(a, p) for a, p in zip(ema_before, ema.module.parameters(), strict=True))


@pytest.mark.slow  # `staralign bench train` end to end, three times: ~17 s on the shared 2-core VM
@pytest.mark.parametrize("extra", [[], ["--original-style"], ["--targets", "worker"]])
def test_bench_train_times_the_trainers_step(extra, monkeypatch, capsys):
    from staralign.cli import main
    from staralign.engine import step

    calls = []
    real = step.train_step
    monkeypatch.setattr(step, "train_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    status = main(["bench", "train", "--device", "cpu", "--batch-size", "2", "--nstack", "1", "--nlevels", "2",
                   "--channels", "16", "--input-size", "64", "--iters", "2", "--repeats", "1", "--warmup", "1",
                   "--json", *extra])
    assert status == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bench"] == "train" and result["images_per_s"] > 0
    assert result["options"]["original_style"] == ("--original-style" in extra)
    assert result["options"]["targets"] == ("worker" if "worker" in extra else "device")
    assert len(calls) == 3  # warm-up and timed steps all go through the trainer's step


@pytest.mark.slow  # `staralign bench train --profile` end to end: ~5 s on the shared 2-core VM
def test_bench_train_profile_reports_the_step_it_profiles(monkeypatch, capsys):
    from staralign.cli import main
    from staralign.engine import step

    calls = []
    real = step.train_step
    monkeypatch.setattr(step, "train_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(["bench", "train", "--device", "cpu", "--batch-size", "2", "--nstack", "1", "--nlevels", "2",
                 "--channels", "16", "--input-size", "64", "--iters", "1", "--repeats", "1", "--warmup", "1",
                 "--profile", "--json"]) == 0
    profile = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["profile"]
    assert profile["wall_ms_per_step"] > 0 and profile["steps"] == 5
    assert profile["kernel_ms_per_step"] is None  # a CPU has no kernels to count
    assert len(calls) == 2 + 1 + 5  # timing, then one settling call and the profiled steps


def test_resume_refuses_settings_it_would_ignore(synth_data, tmp_path, capsys):
    from staralign.cli import main

    run = tmp_path / "run"
    run.mkdir()
    save_yaml(tiny_config(synth_data), run / "config.yaml")
    status = main(["train", "--resume", str(run), "--nstack", "5", "--lr", "0.1"])
    err = capsys.readouterr().err
    assert status != 0
    assert "--nstack" in err and "--lr" in err and "config.yaml" in err
    # Named as typed on the command line, whatever config field they set.
    status = main(["train", "--resume", str(run), "--no-ema", "--data_definition", "300W", "--loss", "l2",
                   "--preset", "tiny"])
    err = capsys.readouterr().err
    assert status != 0
    assert all(flag in err for flag in ("--no-ema", "--data-definition", "--loss", "--preset")), err
    assert "--use-aam" not in err and "--kind" not in err and "--ema," not in err


def test_graph_training_path_trains_logs_and_resumes_on_cpu(synth_data, tmp_path, monkeypatch):
    # The trainer's --cuda-graphs path with the step run uncaptured (there is no GPU here):
    # the fused optimiser with its learning rate in a tensor, the device-side skip, the
    # checkpoints and a resume that builds the step again after loading.
    from staralign.config import load_yaml
    from staralign.engine import step

    monkeypatch.setattr(step, "_check_graphable", lambda device, world_size: None)
    eager = train(tiny_config(synth_data, optim={"epochs": 2}, runtime={"tensorboard": False}), tmp_path / "eager")
    run = tmp_path / "graphed"
    graphed = train(tiny_config(synth_data, optim={"epochs": 2, "milestones": [1]},
                                runtime={"cuda_graphs": True, "tensorboard": False}), run)
    first = [h["train_loss"] for h in graphed.history]
    # Same first batch from the same weights; after that the fused Adam's rounding, through
    # max-pool routing, moves the two runs apart a little.
    assert first[0] == pytest.approx(eager.history[0]["train_loss"], rel=1e-2)
    # The schedule reached the tensor learning rate (milestone after epoch 1) and logs a float.
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["kind"] == "val"]
    dropped = 2e-3 * load_yaml(TrainConfig, run / "config.yaml").optim.gamma
    assert lrs == pytest.approx([dropped, dropped]) and all(isinstance(v, float) for v in lrs)

    cfg3 = merge(load_yaml(TrainConfig, run / "config.yaml"), {"optim": {"epochs": 3}})
    save_yaml(cfg3, run / "config.yaml")
    more = train(cfg3, run, resume=True)
    assert more.epochs_done == 3 and more.history[-1]["train_loss"] < first[0]
    assert (run / "train.log").read_text().count("captured as a CUDA graph") == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_training_follows_eager_training_and_resumes(synth_data, tmp_path):
    results = {}
    for graphs in (False, True):
        cfg = tiny_config(synth_data, optim={"epochs": 2},
                          runtime={"device": "cuda", "cuda_graphs": graphs, "tensorboard": False})
        results[graphs] = train(cfg, tmp_path / f"graphs_{graphs}")
    losses = {k: [h["train_loss"] for h in r.history] for k, r in results.items()}
    assert losses[True] == pytest.approx(losses[False], rel=0.05)
    assert losses[True][-1] < losses[True][0]
    # Resumed, the step is captured again after the saved state is loaded, and goes on.
    run = tmp_path / "graphs_True"
    from staralign.config import load_yaml

    cfg3 = merge(load_yaml(TrainConfig, run / "config.yaml"), {"optim": {"epochs": 3}})
    save_yaml(cfg3, run / "config.yaml")
    more = train(cfg3, run, resume=True)
    assert more.epochs_done == 3 and math.isfinite(more.history[-1]["train_loss"])
    assert (run / "train.log").read_text().count("captured as a CUDA graph") == 2


def test_a_budget_that_ends_mid_epoch_still_validates_and_saves(synth_data, tmp_path):
    """A time budget spent after one step (a tiny budget, no waiting): the partial epoch is
    validated, best/last weights are written, and the state resumes at that step."""
    run = tmp_path / "run"
    cfg = tiny_config(synth_data, runtime={"time_budget_minutes": 1e-6, "tensorboard": False})
    result = train(cfg, run)
    assert "time budget" in result.stopped_early
    assert (run / "best.safetensors").exists() and (run / "last.safetensors").exists()
    assert math.isfinite(result.best_nme) and result.best_epoch == 1
    (val,) = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in r]
    assert val["partial_steps"] == 1 and math.isfinite(val["nme"])
    state = state_mod.load_state(run)
    assert (state["epoch"], state["step"]) == (0, 1)  # resumes inside the epoch, schedule not stepped
    assert state["scheduler"]["last_epoch"] == 0
    # Resumed with no budget, the epoch finishes and is recorded once (the partial record goes).
    cfg.runtime.time_budget_minutes = 0
    result = train(cfg, run, resume=True)
    assert [h["epoch"] for h in result.history] == list(range(1, cfg.optim.epochs + 1))
    assert not any(h.get("partial_steps") for h in result.history)


def test_training_leaves_anomaly_detection_as_it_found_it(synth_data, tmp_path):
    assert not torch.is_anomaly_enabled()
    cfg = tiny_config(synth_data, optim={"epochs": 1}, runtime={"detect_anomaly": True, "tensorboard": False,
                                                               "time_budget_minutes": 1e-6})
    train(cfg, tmp_path / "run")
    assert not torch.is_anomaly_enabled()
