"""ONNX export: parity with PyTorch, self-describing files, and inference without torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from staralign import LandmarkDetector  # noqa: E402
from staralign.cli import main  # noqa: E402
from staralign.config import ModelConfig  # noqa: E402
from staralign.data.synth import render_face  # noqa: E402
from staralign.heatmaps import heatmap_moments  # noqa: E402
from staralign.inference.onnx_backend import OnnxModelError  # noqa: E402
from staralign.models import build_model, load_model, save_model  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model exported with the default (dynamo) exporter, dynamic batch, with moments."""
    folder = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = build_model(ModelConfig(nstack=2, channels=32, input_size=64, nlevels=2), "WFLW").eval()
    weights = save_model(model, folder / "tiny.safetensors")
    out = folder / "tiny.onnx"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["export", "--weights", str(weights), "--onnx", str(out), "--dynamic-batch", "--with-ambiguity"])
    return {"weights": weights, "onnx": out, "rc": rc, "stdout": buf.getvalue(), "folder": folder}


def test_export_reports_parity_within_1e_4(exported):
    assert exported["rc"] == 0, exported["stdout"]
    match = re.search(r"max landmark difference ([0-9.e+-]+)", exported["stdout"])
    assert match, exported["stdout"]
    assert float(match.group(1)) <= 1e-4 and "OK" in exported["stdout"]


def test_onnx_outputs_match_pytorch_on_any_batch(exported):
    model = load_model(exported["weights"])
    session = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["landmarks", "covariance", "eigenvalues", "eigenvectors"]
    for batch in (1, 4):
        x = torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch)) * 2 - 1
        landmarks, cov, evals, _ = session.run(None, {"images": x.numpy()})
        with torch.inference_mode():
            out = model(x, all_stacks=False)
            moments = heatmap_moments(out.heatmaps[-1])
        assert landmarks.shape == (batch, 98, 2)
        assert np.abs(landmarks - out.landmarks.numpy()).max() <= 1e-4
        assert np.abs(cov - moments.covariance.numpy()).max() <= 1e-5
        assert np.abs(evals - moments.eigenvalues.numpy()).max() <= 1e-5


def test_onnx_file_carries_definition_and_input_size(exported):
    proto = onnx.load(str(exported["onnx"]), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    info = json.loads(props["staralign"])
    assert info["format"] == "staralign.onnx" and info["input_size"] == 64
    assert info["definition"]["name"] == "WFLW" and info["definition"]["num_points"] == 98
    assert np.asarray(info["conversions"]["300W"]).shape == (68, 98)
    assert not list(exported["folder"].glob("*.data"))  # one self-contained file


def test_detector_on_onnx_matches_pytorch(exported):
    image, _, info = render_face(np.random.default_rng(5), 256)
    box = info["face_box"]
    by_torch = LandmarkDetector.from_checkpoint(exported["weights"], detector="none").detect(image, box=box)[0]
    by_ort = LandmarkDetector.from_checkpoint(exported["onnx"], detector="none").detect(image, box=box)[0]
    assert by_ort.landmarks.shape == (98, 2)
    # 1e-4 normalised is scale * 100 * 1e-4 pixels: ~0.02 px for this face.
    np.testing.assert_allclose(by_ort.landmarks, by_torch.landmarks, atol=0.02)
    np.testing.assert_allclose(by_ort.ambiguity.major, by_torch.ambiguity.major, rtol=1e-3)


def test_onnx_path_never_imports_torch(exported, tmp_path):
    image, _, info = render_face(np.random.default_rng(6), 128)
    import cv2

    cv2.imwrite(str(tmp_path / "face.png"), image)
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys

        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None

        sys.meta_path.insert(0, NoTorch())
        from staralign import LandmarkDetector
        det = LandmarkDetector.from_onnx({str(exported["onnx"])!r}, detector="none", format="68")
        faces = det.detect({str(tmp_path / "face.png")!r})
        assert faces[0].landmarks.shape == (68, 2), faces[0].landmarks.shape
        from staralign.cli import main
        rc = main(["predict", {str(tmp_path / "face.png")!r}, "--weights", {str(exported["onnx"])!r},
                   "--detector", "none", "--json", {str(tmp_path / "out.json")!r}, "--ambiguity"])
        assert rc == 0, rc
        assert "torch" not in sys.modules
        print(json.dumps(faces[0].to_dict()))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    face = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(face["landmarks"]) == 68 and len(face["ambiguity"]["major_std"]) == 68
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["backend"] == "onnxruntime" and len(report["inputs"][0]["faces"][0]["landmarks"]) == 98
    # With torch installed and importable, the ONNX path (the web app's format list included)
    # still does not load it.
    script = textwrap.dedent(f"""
        import sys
        from staralign import LandmarkDetector
        det = LandmarkDetector.from_onnx({str(exported["onnx"])!r}, detector="none")
        assert "68" in det.formats()
        det.detect({str(tmp_path / "face.png")!r}, format="68")
        print("torch" in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_fixed_batch_export_and_failing_check(exported, tmp_path, capsys):
    out = tmp_path / "fixed.onnx"
    rc = main(["export", "--weights", str(exported["weights"]), "--onnx", str(out), "--exporter", "torchscript",
               "--tolerance=-1"])
    assert rc == 1 and "FAILED" in capsys.readouterr().out
    det = LandmarkDetector.from_onnx(out, detector="none")
    assert not det.backend.has_ambiguity
    image = render_face(np.random.default_rng(1), 128)[0]
    faces = det.detect(image, box=[(10, 10, 100, 100), (20, 20, 110, 110), (0, 0, 90, 90)])
    assert len(faces) == 3 and all(f.ambiguity is None for f in faces)


def test_export_of_a_bad_file_names_it(tmp_path, capsys):
    bad = tmp_path / "broken.pkl"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", "--weights", str(bad), "--onnx", str(tmp_path / "x.onnx")]) == 2
    assert "broken.pkl" in capsys.readouterr().err


def test_onnx_without_metadata_is_refused(tmp_path):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["images"], ["landmarks"])], "g",
        [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1, 2])],
        [onnx.helper.make_tensor_value_info("landmarks", onnx.TensorProto.FLOAT, [1, 2])])
    path = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(OnnxModelError, match="foreign.onnx.*not exported by staralign"):
        LandmarkDetector.from_onnx(path)


@pytest.mark.parametrize("version, why", [(None, "positive integer, got None"), ("missing", "is missing"),
                                          (2, "newer than this staralign"), ("1", "positive integer")])
def test_onnx_record_version_must_be_one_we_read(tmp_path, capsys, version, why):
    """The same record checks as weights files: an OnnxModelError naming the file and the field,
    and a one-line error (not a traceback) from the command line."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["images"], ["landmarks"])], "g",
        [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1, 2])],
        [onnx.helper.make_tensor_value_info("landmarks", onnx.TensorProto.FLOAT, [1, 2])])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    info = {"format": "staralign.onnx", "input_size": 64, "definition": {}}
    if version != "missing":
        info["version"] = version
    onnx.helper.set_model_props(proto, {"staralign": json.dumps(info)})
    path = tmp_path / "odd.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(OnnxModelError, match=rf"odd\.onnx.*'version'.*{why}"):
        LandmarkDetector.from_onnx(path)
    import cv2

    cv2.imwrite(str(tmp_path / "x.png"), np.zeros((32, 32, 3), np.uint8))
    assert main(["predict", str(tmp_path / "x.png"), "--weights", str(path), "--detector", "none"]) == 2
    err = capsys.readouterr().err
    assert "odd.onnx" in err and "version" in err and "Traceback" not in err


def test_asking_for_ambiguity_an_onnx_file_lacks_is_an_error_that_says_how_to_export(exported, tmp_path, capsys):
    import cv2

    plain = tmp_path / "plain.onnx"
    assert main(["export", "--weights", str(exported["weights"]), "--onnx", str(plain),
                 "--exporter", "torchscript"]) == 0
    image = tmp_path / "face.png"
    cv2.imwrite(str(image), render_face(np.random.default_rng(1), 128)[0])
    capsys.readouterr()
    for flag in ("--ambiguity", "--draw-ambiguity"):
        assert main(["predict", str(image), "--weights", str(plain), "--box", "10,10,100,100", flag]) == 2
        err = capsys.readouterr().err
        assert "plain.onnx has no ambiguity outputs" in err and "--with-ambiguity" in err and "Traceback" not in err
    # The same file without the flag, and a file exported with ambiguity, still predict.
    assert main(["predict", str(image), "--weights", str(plain), "--box", "10,10,100,100"]) == 0
    assert main(["predict", str(image), "--weights", str(exported["onnx"]), "--box", "10,10,100,100",
                 "--ambiguity"]) == 0
