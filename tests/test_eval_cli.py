"""``staralign test``: tables, JSON, report files, comparisons, official checkpoints and errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from staralign.cli import main
from staralign.data.annotations import WFLW_TAGS, read_annotations, write_annotations
from staralign.data.testsets import load_test_set
from staralign.engine.evaluate_cli import run_labels
from staralign.engine.report import plot_ced
from staralign.models import save_model

from .conftest import reference_path
from .test_eval import WFLW, make_synth, tiny_model

TAG_PATTERN = [  # one row per face: which of the six WFLW tags it has
    (1, 0, 0, 0, 0, 0),
    (1, 1, 0, 0, 0, 0),
    (0, 1, 1, 0, 0, 1),
    (0, 0, 0, 0, 0, 1),
    (1, 0, 0, 0, 0, 1),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Five synthetic faces whose tags are TAG_PATTERN."""
    root = make_synth(tmp_path_factory.mktemp("synth"), faces=len(TAG_PATTERN), seed=11)
    anns = read_annotations(root / "test.tsv").annotations
    for a, tags in zip(anns, TAG_PATTERN, strict=True):
        a.tags = tags
    write_annotations(root / "test.tsv", anns)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    (d / "b").mkdir()
    return (save_model(tiny_model(seed=0), d / "tinyA.safetensors"),
            save_model(tiny_model(seed=1), d / "tinyB.safetensors"))


def _test(args, capsys) -> tuple[int, str, str]:
    rc = main(["test", "--no-progress", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _good_png(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    assert image is not None and image.ndim == 3 and min(image.shape[:2]) > 32, path
    return image


def test_subset_counts_from_tags_and_report_files(data, weights, tmp_path, capsys):
    report = tmp_path / "report"
    rc, out, err = _test(["--weights", weights[0], "--data-definition", "WFLW", "--annot-dir", data,
                          "--image-dir", data, "--json", tmp_path / "m.json", "--report-dir", report,
                          "--thresholds", "0.1", "0.5"], capsys)
    assert rc == 0, err
    summary = json.loads((tmp_path / "m.json").read_text())
    run = summary["runs"]["tinyA"]
    expected = np.array(TAG_PATTERN).sum(axis=0)
    assert summary["sets"] == ["full", *WFLW_TAGS]
    assert run["count"] == len(TAG_PATTERN)
    assert {t: run["subsets"][t]["count"] for t in WFLW_TAGS} == dict(zip(WFLW_TAGS, expected.tolist(), strict=True))
    assert run["subsets"]["make-up"]["nme"] is None  # empty subset: null, not NaN
    for key in ("nme", "fr", "auc", "threshold", "norm", "count"):
        assert key in run and key in run["subsets"]["pose"]
    assert run["threshold"] == 0.1 and set(run["by_threshold"]) == {"0.1", "0.5"}
    assert summary["space"] == "crop" and run["norm"] == "default"
    # The table: every set with its count, both thresholds.
    for name, count in [("full", len(TAG_PATTERN)), *zip(WFLW_TAGS, expected, strict=True)]:
        assert any(line.split()[:2] == [name, str(count)] for line in out.splitlines()), name
    assert "FR@0.5 %" in out and "AUC@0.1" in out

    # The report: valid PNGs, CSVs and JSON, nothing half-written left behind.
    assert json.loads((report / "metrics.json").read_text()) == summary
    for name in ("ced.png", "per_landmark_nme.png", "worst_tinyA.png"):
        _good_png(report / name)
    with open(report / "per_sample.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(TAG_PATTERN)
    assert [int(r["pose"]) for r in rows] == [t[0] for t in TAG_PATTERN]
    nmes = np.array([float(r["nme_tinyA"]) for r in rows])
    assert nmes.mean() == pytest.approx(run["nme"], rel=1e-6)
    blur = np.array([t[5] for t in TAG_PATTERN], bool)
    assert nmes[blur].mean() == pytest.approx(run["subsets"]["blur"]["nme"], rel=1e-6)
    with open(report / "per_landmark.csv", newline="") as fh:
        per_landmark = list(csv.DictReader(fh))
    assert len(per_landmark) == WFLW.num_points
    assert np.mean([float(r["nme_tinyA"]) for r in per_landmark]) == pytest.approx(run["nme"], rel=1e-6)
    assert not [p.name for p in report.iterdir() if p.name.startswith(".")]


def test_two_checkpoints_are_compared(data, weights, tmp_path, capsys):
    report = tmp_path / "report"
    rc, out, err = _test(["--weights", *weights, "--annot-dir", data, "--image-dir", data,
                          "--json", tmp_path / "m.json", "--report-dir", report, "--norm", "pupil"], capsys)
    assert rc == 0, err
    runs = json.loads((tmp_path / "m.json").read_text())["runs"]
    assert list(runs) == ["tinyA", "tinyB"]
    assert runs["tinyA"]["nme"] != runs["tinyB"]["nme"]  # two networks, two results
    assert all(r["norm"] == "pupil" for r in runs.values())
    title = out.splitlines()[1]
    assert "tinyA" in title and "tinyB" in title
    full = next(line for line in out.splitlines() if line.startswith("full"))
    assert full.count("|") == 2  # one column group per run
    header = (report / "per_sample.csv").read_text().splitlines()[0].split(",")
    assert header[-2:] == ["nme_tinyA", "nme_tinyB"]
    for name in ("ced.png", "per_landmark_nme.png", "worst_tinyA.png", "worst_tinyB.png"):
        _good_png(report / name)


def test_ced_plot_holds_every_run(data, weights, tmp_path):
    from staralign.engine.evaluator import evaluate_model
    from staralign.models import load_model

    ts = load_test_set("WFLW", data, data)
    results = [evaluate_model(load_model(w), ts, label=w.stem, workers=0) for w in weights]
    legend = plot_ced(results, tmp_path / "ced.png", 0.1)
    assert [entry.split(":")[0] for entry in legend] == ["tinyA", "tinyB"]
    _good_png(tmp_path / "ced.png")


def test_300w_reports_common_challenge_full(data, tmp_path, capsys):
    from staralign.data.landmark_formats import convert_landmarks

    anns = read_annotations(data / "test.tsv").annotations
    for a in anns:
        a.landmarks = convert_landmarks(a.landmarks.astype(np.float64), "WFLW", "300W").astype(np.float32)
        a.five_points, a.tags = None, ()
    annot = tmp_path / "annot"
    write_annotations(annot / "test_common.tsv", anns[:3])
    write_annotations(annot / "test_challenge.tsv", anns[3:])
    write_annotations(annot / "test.tsv", anns)
    w = save_model(tiny_model("300W"), tmp_path / "w300.safetensors")
    rc, out, err = _test(["--weights", w, "--data-definition", "300W", "--annot-dir", annot, "--image-dir", data,
                          "--json", tmp_path / "m.json", "--report-dir", tmp_path / "r"], capsys)
    assert rc == 0, err
    summary = json.loads((tmp_path / "m.json").read_text())
    run = summary["runs"]["w300"]
    assert summary["sets"] == ["common", "challenge", "full"]
    assert (run["subsets"]["common"]["count"], run["subsets"]["challenge"]["count"], run["count"]) == (3, 2, 5)
    assert run["threshold"] == 0.05  # 300W's own threshold by default
    full = (3 * run["subsets"]["common"]["nme"] + 2 * run["subsets"]["challenge"]["nme"]) / 5
    assert run["nme"] == pytest.approx(full)
    with open(tmp_path / "r" / "per_sample.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 5  # each face once
    assert [line.split()[0] for line in out.splitlines()[4:]] == ["common", "challenge", "full"]


@pytest.mark.slow  # the full-size network tested twice with flip test: ~7 s on the shared 2-core VM
def test_official_checkpoint_end_to_end(tmp_path, capsys):
    pkl = reference_path("wflw_random.pkl")
    data = make_synth(tmp_path / "synth", faces=2, seed=3)
    results = {}
    for space in ("crop", "image"):
        out_json = tmp_path / f"{space}.json"
        rc, out, err = _test(["--weights", pkl, "--data-definition", "WFLW", "--annot-dir", data,
                              "--space", space, "--flip-test", "--json", out_json], capsys)
        assert rc == 0, err
        summary = json.loads(out_json.read_text())
        assert summary["space"] == space and summary["flip_test"] is True
        assert summary["definition"] == "WFLW" and summary["runs"]["wflw_random"]["count"] == 2
        results[space] = summary["runs"]["wflw_random"]["nme"]
        assert "wflw_random" in out
    assert np.isfinite(results["crop"]) and results["crop"] > 0
    # The same predictions scored in the photo: NME is scale-invariant, the crop has no rotation.
    assert results["image"] == pytest.approx(results["crop"], rel=1e-4)


def _assert_user_error(rc: int, err: str, *words: str) -> None:
    assert rc == 2
    assert "staralign test: error:" in err and "Traceback" not in err
    for w in words:
        assert w in err, err


def test_bad_inputs_are_clear_errors(data, weights, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _test(["--weights", weights[0], "--annot-dir", empty, "--image-dir", data], capsys)
    _assert_user_error(rc, err, "test.tsv")
    rc, _, err = _test(["--weights", weights[0], "--annot-dir", data, "--test-file", "missing.tsv"], capsys)
    _assert_user_error(rc, err, "missing.tsv")
    rc, _, err = _test(["--weights", tmp_path / "nope.safetensors", "--annot-dir", data], capsys)
    _assert_user_error(rc, err, "nope.safetensors")
    # A 98-point checkpoint asked to score 300W.
    rc, _, err = _test(["--weights", weights[0], "--data-definition", "300W", "--annot-dir", data], capsys)
    _assert_user_error(rc, err, "98", "300W", "68")
    # A 300W checkpoint on a 98-point file: the row and the count are named.
    w300 = save_model(tiny_model("300W"), tmp_path / "w300.safetensors")
    rc, _, err = _test(["--weights", w300, "--annot-dir", data], capsys)
    _assert_user_error(rc, err, "test.tsv:2", "landmarks_target", "300W")
    rc, _, err = _test(["--weights", weights[0], "--annot-dir", data, "--image-dir", empty], capsys)
    _assert_user_error(rc, err, "images not found", "000000.jpg", "test.tsv:2", "--image-dir")
    rc, _, err = _test(["--weights", weights[0], "--annot-dir", data, "--thresholds", "0"], capsys)
    _assert_user_error(rc, err, "--thresholds")
    not_a_ckpt = tmp_path / "junk.pkl"
    not_a_ckpt.write_bytes(b"not a checkpoint")
    rc, _, err = _test(["--weights", not_a_ckpt, "--annot-dir", data], capsys)
    _assert_user_error(rc, err, "junk.pkl")


def test_official_checkpoint_with_the_wrong_definition(data, capsys):
    pkl = reference_path("wflw_random.pkl")
    rc, _, err = _test(["--weights", pkl, "--data-definition", "COFW", "--annot-dir", data], capsys)
    _assert_user_error(rc, err, "98", "COFW")


def test_run_labels_are_unique():
    assert run_labels(["a/x.pkl", "b/y.pkl"]) == ["x", "y"]
    assert run_labels(["a/x.pkl", "b/x.pkl"]) == ["a/x", "b/x"]
    assert run_labels(["a/x.pkl", "a/x.pkl"]) == ["a/x", "a/x#2"]


def test_runs_are_named_after_their_run_folder_not_the_checkpoint_file():
    assert run_labels(["runs/wflw/best.safetensors", "runs/300w/best.safetensors"]) == ["wflw", "300w"]
    assert run_labels(["runs/wflw/best.safetensors", "runs/wflw/last.safetensors"]) == ["wflw", "wflw/last"]
    assert run_labels(["a/run/best.safetensors", "b/run/best.safetensors"]) == ["a/run", "b/run"]
    assert run_labels(["models/WFLW_STARLoss.pkl"]) == ["WFLW_STARLoss"]


@pytest.mark.parametrize(("flag", "value"), [("--norm", "inter-pupil"), ("--space", "photo")])
def test_test_command_refuses_an_unknown_norm_or_space(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["test", "--test-file", "t.tsv", flag, value])
    assert exc.value.code == 2 and f"invalid choice: '{value}'" in capsys.readouterr().err


def test_building_the_parser_does_not_load_torch():
    # --norm and --space take their choices from definitions.NORMS and scoring.SPACES: modules without torch.
    import subprocess
    import sys

    code = "import sys; from staralign.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"


def test_report_names_a_run_after_its_folder_with_a_legend(data, tmp_path, capsys):
    run = tmp_path / "wflw_tiny"
    save_model(tiny_model(seed=0), run / "best.safetensors")
    report = tmp_path / "report"
    rc, out, err = _test(["--weights", run / "best.safetensors", "--data-definition", "WFLW", "--annot-dir", data,
                          "--image-dir", data, "--report-dir", report], capsys)
    assert rc == 0, err
    assert "wflw_tiny" in out and " best " not in out
    assert not (report / "worst_best.png").exists()
    grid = _good_png(report / "worst_wflw_tiny.png")
    from staralign.viz import GROUND_TRUTH_COLOR, PREDICTION_COLOR

    band = grid[:30]  # the legend band on top: white, with one mark of each colour
    assert (band == 255).all(-1).mean() > 0.5
    for color in (GROUND_TRUTH_COLOR, PREDICTION_COLOR):
        assert (np.abs(band.astype(int) - color).max(-1) < 40).any(), color
