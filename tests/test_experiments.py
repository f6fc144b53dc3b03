"""The demo and the ambiguity experiment, at toy scale (their real scale is minutes, not seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from staralign.cli import main
from staralign.data.synth import GENERATOR_VERSION
from staralign.experiments.ambiguity import _same_data, format_results, run_ambiguity_experiment, split_errors
from staralign.experiments.demo import (
    MARKER,
    DemoResult,
    Measurement,
    pick_weights,
    plan_demo,
    prepare_out,
    run_demo,
    thread_candidates,
    verdict,
)

SMALL = {
    "model": {"nstack": 1, "nlevels": 2, "channels": 16, "stem_channels": [8, 16], "input_size": 64},
    "optim": {"epochs": 2, "batch_size": 8},
    "data": {"workers": 0},
}


@pytest.mark.slow  # the demo end to end (draw, train, evaluate, report): ~3-5 s on the shared 2-core VM
def test_demo_end_to_end_writes_its_report(tmp_path):
    result = run_demo(tmp_path, minutes=5, train=24, test=8, workers=0, quiet=True, overrides=SMALL)
    report = tmp_path / "report"
    for name in ("metrics.json", "demo.json", "per_sample.csv", "per_landmark.csv"):
        assert (report / name).exists(), name
    for name in ("ced.png", "predictions.png", "per_landmark_nme.png"):
        image = cv2.imread(str(report / name))
        assert image is not None and image.size > 0, name
    demo = json.loads((report / "demo.json").read_text())
    assert demo["nme"] == pytest.approx(result.nme)
    assert 0 < demo["mean_shape_baseline_nme"] < 1
    assert demo["epochs"] == 2
    assert (tmp_path / "run" / "best.safetensors").exists()
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["runs"]["tiny"]["count"] == 8


def test_split_errors_separates_tangent_and_normal():
    gt = np.zeros((2, 98, 2))
    tangents = np.zeros((2, 98, 2))
    tangents[..., 0] = 1.0  # every contour tangent along +x
    kinds = np.zeros(98, np.int8)
    kinds[[60, 72]] = 1
    along = gt + np.array([0.5, 0.0])
    across = gt + np.array([0.0, 0.25])
    iod = np.array([10.0, 10.0])
    a = split_errors(along, gt, tangents, kinds, iod)
    b = split_errors(across, gt, tangents, kinds, iod)
    assert a["tangent"] == pytest.approx(0.05) and a["normal"] == pytest.approx(0.0)
    assert b["tangent"] == pytest.approx(0.0) and b["normal"] == pytest.approx(0.025)
    assert a["corner_nme"] == pytest.approx(0.05)


def test_demo_refuses_a_budget_too_small_before_drawing(tmp_path, capsys):
    with pytest.raises(ValueError, match="no time to train"):
        run_demo(tmp_path / "a", minutes=1.2, train=4, test=2, workers=0, quiet=True)
    assert not (tmp_path / "a").exists()
    # On the command line: a user error, no traceback.
    assert main(["demo", "--out", str(tmp_path / "b"), "--minutes", "1"]) == 2
    assert "no time to train" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.slow  # two trainings, evaluation and a resumed rerun: ~5 s on the shared 2-core VM
def test_ambiguity_experiment_runs_reports_and_resumes_without_redoing_work(tmp_path):
    kw = dict(sigma=0.05, train=16, test=6, epochs=1, methods=("star", "l2"), workers=0, overrides=SMALL,
              quiet=True)
    first = run_ambiguity_experiment(tmp_path, seeds=1, **kw)
    image = next(p for p in (tmp_path / "data" / "images").rglob("*") if p.is_file())
    weights = tmp_path / "runs" / "l2_seed0" / "last.safetensors"
    stamps = image.stat().st_mtime_ns, weights.stat().st_mtime_ns
    result = run_ambiguity_experiment(tmp_path, seeds=2, resume=True, **kw)
    # Data and the finished runs are reused as they are; only the new seed trains.
    assert (image.stat().st_mtime_ns, weights.stat().st_mtime_ns) == stamps
    assert len(result["runs"]) == 4
    for k in range(2):  # seed 0's runs come first, in the same order
        assert result["runs"][k]["nme"] == pytest.approx(first["runs"][k]["nme"], rel=1e-6)
        assert result["runs"][k]["train_seconds"] == pytest.approx(first["runs"][k]["train_seconds"])
        assert result["runs"][k]["train_seconds"] > 0
    assert (tmp_path / "runs" / "l2_seed1" / "last.safetensors").exists()
    # The report covers every run.
    assert set(result["summary"]) == {"star", "l2"}
    for stats in result["summary"].values():
        assert stats["tangent"]["mean"] > 0 and stats["normal"]["mean"] > 0
    text = (tmp_path / "results.md").read_text()
    assert "| star |" in text and "| l2 |" in text and "Wall time" in text
    assert format_results(result["summary"], 2).count("\n") >= 3
    with pytest.raises(ValueError, match="unknown method"):
        run_ambiguity_experiment(tmp_path / "x", methods=("nope",), quiet=True)
    # Data is reused only when its synth.yaml matches: other parameters or generator versions are drawn again.
    data = tmp_path / "data"
    want = {"version": GENERATOR_VERSION, "train": 16, "test": 6, "ambiguity": 0.05, "seed": 0, "size": 128}
    assert _same_data(data, want)
    assert not _same_data(data, {**want, "train": 17})
    assert not _same_data(data, {**want, "version": GENERATOR_VERSION + 1})
    assert not _same_data(tmp_path / "nothing", want)
    run_ambiguity_experiment(tmp_path / "other", seeds=1, resume=True, **{**kw, "methods": ("l2",)})
    assert yaml.safe_load((tmp_path / "other" / "data" / "synth.yaml").read_text())["train"] == 16


# --------------------------------------------------------------------------- the demo's budget

IDLE = Measurement(draw_face=0.01, train_step=0.5, eval_face=0.01)  # about the reference 2-core VM, idle


def _plan(minutes, m=IDLE, train=None):
    return plan_demo(minutes * 60, m, train, 200, 8, [6, 7], 16)


def test_demo_plan_keeps_the_default_where_it_fits():
    plan = _plan(10)
    assert (plan.train, plan.test, plan.epochs, plan.milestones, plan.shrunk) == (1500, 200, 8, [6, 7], "")
    assert plan.estimate["total"] <= 600


def test_demo_plan_shrinks_the_data_then_the_epochs_on_a_busy_machine():
    busy = Measurement(draw_face=0.02, train_step=0.5, eval_face=0.02)
    plan = _plan(3, busy)
    assert plan.epochs == 8 and 320 <= plan.train < 1500 and 100 <= plan.test < 200
    assert plan.estimate["total"] <= 180 and "training faces instead of 1500" in plan.shrunk
    crawling = Measurement(draw_face=0.05, train_step=5.0, eval_face=0.1)
    plan = _plan(3, crawling)
    assert plan.train == 320 and 1 <= plan.epochs < 8 and "instead of 8" in plan.shrunk
    assert all(m <= plan.epochs for m in plan.milestones)
    # A user's own --train is never shrunk: only the epochs are.
    plan = _plan(3, busy, train=1500)
    assert plan.train == 1500 and plan.epochs < 8


def _result(**kw):
    base = dict(out_dir=Path("."), nme=0.05, fr=0.0, auc=0.5, baseline_nme=0.15, threshold=0.1, epochs=1,
                stopped_early="", steps_per_epoch=93)
    return DemoResult(**{**base, **kw})


def test_demo_says_how_much_it_trained_in_plain_words():
    assert _result().trained() == "trained 1 epoch"
    assert _result(epochs=3).trained() == "trained 3 epochs"
    assert _result(epochs=2, partial_steps=40).trained() == "trained 2 epochs and 40 of 93 steps of epoch 3"
    assert _result(epochs=0, partial_steps=54).trained() == "trained 54 of 93 steps of epoch 1"


def test_demo_says_plainly_when_the_model_did_not_beat_the_baseline():
    assert "beats the mean-shape baseline" in verdict(_result(), 10)
    text = verdict(_result(nme=0.1777, baseline_nme=0.1483), 3)
    assert "did NOT beat the mean-shape baseline" in text and "17.77%" in text and "--minutes 8" in text
    assert "it trained 1 epoch, too little" in text
    assert "--minutes 53 (the full demo needs about 53 min" in verdict(_result(nme=0.2), 10, needed=52.4)
    assert "did NOT beat" in verdict(_result(nme=float("nan")), 10)


def test_demo_uses_the_last_weights_when_there_is_no_best(tmp_path):
    (tmp_path / "last.safetensors").write_bytes(b"x")
    assert pick_weights(tmp_path).name == "last.safetensors"
    (tmp_path / "best.safetensors").write_bytes(b"x")
    assert pick_weights(tmp_path).name == "best.safetensors"
    with pytest.raises(ValueError, match="more --minutes"):
        pick_weights(tmp_path / "none", "time budget reached")


def test_demo_out_starts_clean_or_refuses(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not made by staralign demo"):
        prepare_out(other)
    assert (other / "notes.txt").read_text() == "keep"
    demo = tmp_path / "demo"
    for name in ("data/images", "run", "report"):
        (demo / name).mkdir(parents=True)
    (demo / "run" / "best.safetensors").write_bytes(b"old")
    (demo / "train_config.yaml").write_text("old")
    (demo / "notes.txt").write_text("keep")
    (demo / MARKER).write_text("{}")
    assert sorted(prepare_out(demo)) == ["data", "report", "run", "train_config.yaml"]
    assert sorted(p.name for p in demo.iterdir()) == ["notes.txt"]  # the user's own file stays
    # A demo folder written before the marker existed is recognised by its report and data.
    (demo / "report").mkdir()
    (demo / "report" / "demo.json").write_text("{}")
    (demo / "data").mkdir()
    with pytest.raises(ValueError, match="not made by staralign demo"):
        prepare_out(demo)  # a report alone is not enough
    (demo / "data" / "synth.yaml").write_text("generator: staralign.data.synth")
    assert sorted(prepare_out(demo)) == ["data", "report"]


@pytest.mark.slow  # two demos end to end: ~4-5 s on the shared 2-core VM
def test_demo_ending_mid_epoch_still_evaluates_and_reports(tmp_path, capsys):
    """A budget spent after one step (tiny budget, no waiting): validated, saved, evaluated, reported;
    a second demo into the same folder starts clean."""
    over = {**SMALL, "runtime": {"time_budget_minutes": 1e-6}}
    result = run_demo(tmp_path, minutes=5, train=24, test=8, workers=0, overrides=over)
    out = capsys.readouterr().out
    assert result.partial_steps == 1 and result.epochs == 0 and result.weights == "best.safetensors"
    assert "trained 1 of 3 steps of epoch 1 (time budget" in out
    assert ("did NOT beat" in out) == (not result.beat_baseline) and "[5/5] writing the report" in out
    demo = json.loads((tmp_path / "report" / "demo.json").read_text())
    assert demo["partial_epoch_steps"] == 1 and demo["verdict"] in out and demo["plan"]["train"] == 24
    (tmp_path / "run" / "stale.txt").write_text("from the first demo")
    run_demo(tmp_path, minutes=5, train=24, test=8, workers=0, quiet=True, overrides=over)
    assert not (tmp_path / "run" / "stale.txt").exists()


def test_demo_uses_the_cores_other_work_leaves_free():
    assert thread_candidates(2, 0.2, 2) == [1, 2]  # idle: both timed, the faster kept
    assert thread_candidates(2, 1.0, 2) == [1, 2]  # one core busy (or a lagging load average): measured
    assert thread_candidates(2, 16.0, 2) == [1]  # a busy machine: the larger count is not even tried
    assert thread_candidates(1, 0.0, 2) == [1]
    assert thread_candidates(8, 2.0, 16) == [1, 8]  # never more than torch's own choice


def test_demo_ends_with_a_model_and_a_report_when_the_budget_is_spent_early(tmp_path, capsys):
    """A fake clock that races ahead (a machine far slower than planned): no error, a model anyway."""
    now = [0.0]

    def clock() -> float:
        now[0] += 15.0
        return now[0]

    result = run_demo(tmp_path, minutes=2, train=24, test=8, workers=0, overrides=SMALL, clock=clock)
    out = capsys.readouterr().out
    assert "training at least one step (this overruns --minutes 2" in out
    assert result.weights == "best.safetensors" and (tmp_path / "report" / "demo.json").exists()
    assert "did NOT beat" in out or result.beat_baseline


def test_the_probe_keeps_the_faster_thread_count(tmp_path):
    import torch

    from staralign.experiments.common import tiny_config
    from staralign.experiments.demo import measure_machine

    now = [0.0]

    def clock() -> float:  # a machine where two threads take ten times as long as one
        now[0] += 1.0 if torch.get_num_threads() == 2 else 0.1
        return now[0]

    config = tiny_config(tmp_path / "data", 0, "cpu", 0, SMALL)
    before = torch.get_num_threads()
    try:
        measured = measure_machine(config, "cpu", tmp_path, clock, [1, 2])
        assert measured.threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
