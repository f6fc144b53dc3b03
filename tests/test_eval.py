"""Evaluation API: perfect and shifted predictors in both spaces, subsets, metric aggregation."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from staralign.config import ModelConfig
from staralign.data.annotations import WFLW_TAGS, Annotation
from staralign.data.testsets import TestSet, load_test_set, tag_subsets
from staralign.definitions import get_definition
from staralign.engine.evaluator import evaluate_model, predict_batch
from staralign.engine.scoring import crop_to_image_space, score
from staralign.metrics import summarize
from staralign.models import build_model

WFLW = get_definition("WFLW")
NUM_FACES = 6
TINY = ModelConfig(nstack=1, channels=32, input_size=64, nlevels=2)


def make_synth(root, faces: int = NUM_FACES, seed: int = 5):
    from staralign.data.synth import generate_dataset

    generate_dataset(root, train=0, test=faces, seed=seed, size=256)
    return root


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synth(tmp_path_factory.mktemp("synth"))


def tiny_model(definition: str = "WFLW", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(TINY, definition).eval()


def _key(image: torch.Tensor) -> str:
    return hashlib.sha1(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _mirror(landmarks: torch.Tensor, definition) -> torch.Tensor:
    """Landmarks of the mirrored crop, written out here (not the evaluator's flip_normalized_landmarks_torch)."""
    perm = list(range(definition.num_points))
    for a, b in definition.flip_pairs:
        perm[a], perm[b] = b, a
    out = landmarks[perm].clone()
    out[:, 0] = -out[:, 0]  # x -> -x in align-corners=False normalised coordinates
    return out


class Oracle(nn.Module):
    """A 'network' that knows the answer: it looks each crop up by its pixels and returns the
    landmarks stored for it (plus ``offset``), so the evaluation pipeline around it is what a
    test measures.  Mirrored crops are known too, with mirrored landmarks (for flip tests)."""

    def __init__(self, dataset, offset=(0.0, 0.0), clamped: bool = True) -> None:
        super().__init__()
        self.definition = dataset.definition
        self.config = SimpleNamespace(input_size=dataset.input_size)
        self.offset = torch.tensor(offset, dtype=torch.float32)
        self.table: dict[str, torch.Tensor] = {}
        size = dataset.input_size
        for i in range(len(dataset)):
            s = dataset[i]
            lm = s["landmarks"] if clamped else (s["points"] * 2 + 1) / size - 1
            self.table[_key(s["image"])] = lm
            self.table[_key(torch.flip(s["image"], dims=[-1]))] = _mirror(lm, self.definition)

    def forward(self, images: torch.Tensor):
        found = torch.stack([self.table[_key(im)] for im in images])
        return SimpleNamespace(landmarks=found + self.offset)


def _eval(model, test_set, **kw):
    return evaluate_model(model, test_set, WFLW, "cpu", batch_size=4, workers=0, **kw)


def test_perfect_predictor_scores_zero_everywhere(synth):
    ts = load_test_set("WFLW", synth, synth)
    oracle = Oracle(ts.dataset(WFLW, 256))
    for flip in (False, True):
        result = _eval(oracle, ts, flip_test=flip)
        m = result.metrics([0.1, 0.08])
        assert m["count"] == NUM_FACES
        assert (m["nme"], m["fr"], m["auc"]) == (0.0, 0.0, 1.0)
        assert m["by_threshold"]["0.08"] == {"fr": 0.0, "auc": 1.0}
        for name, sub in m["subsets"].items():
            if sub["count"]:
                assert (sub["nme"], sub["fr"], sub["auc"]) == (0.0, 0.0, 1.0), name


def test_perfect_predictor_in_image_space(synth):
    ts = load_test_set("WFLW", synth, synth)
    oracle = Oracle(ts.dataset(WFLW, 256), clamped=False)
    result = _eval(oracle, ts, space="image")
    # Exact up to float32 rounding of the crop coordinates, against the file's own landmarks.
    np.testing.assert_allclose(result.gt, np.stack([a.landmarks for a in ts.annotations]))
    assert result.nmes.max() < 1e-5
    assert result.metrics([0.1])["fr"] == 0.0


def _norm_distance(points: np.ndarray, norm: str) -> np.ndarray:
    """Independent of staralign.metrics: numpy on the definition's index groups."""
    if norm == "box":
        span = points.max(axis=1) - points.min(axis=1)
        return np.sqrt(span[:, 0] * span[:, 1])
    idx = WFLW.norm_indices(norm)
    left = points[:, list(idx.left)].mean(axis=1)
    right = points[:, list(idx.right)].mean(axis=1)
    return np.linalg.norm(left - right, axis=1)


@pytest.mark.parametrize("norm", ["ocular", "pupil", "default", "box"])
def test_known_shift_gives_expected_nme(synth, norm):
    ts = load_test_set("WFLW", synth, synth)
    dx, dy = 0.03, -0.04  # every landmark 0.05 off in normalised crop units
    oracle = Oracle(ts.dataset(WFLW, 256), offset=(dx, dy), clamped=False)

    crop = _eval(oracle, ts, space="crop", norm=norm)
    np.testing.assert_allclose(crop.nmes, 0.05 / _norm_distance(crop.gt, norm), rtol=1e-5)

    # In the photo the shift is 0.05 * half the crop, undone by the crop's zoom 256 / (200 * scale).
    image = _eval(oracle, ts, space="image", norm=norm)
    scale = np.array([a.scale for a in ts.annotations])
    gt = np.stack([a.landmarks for a in ts.annotations]).astype(np.float64)
    np.testing.assert_allclose(image.nmes, 0.05 * 100 * scale / _norm_distance(gt, norm), rtol=1e-4)
    np.testing.assert_allclose(image.metrics([0.1])["nme"], image.nmes.mean())


def test_image_and_crop_nme_agree_for_a_pure_scale_crop(synth):
    ts = load_test_set("WFLW", synth, synth)
    model = tiny_model()
    crop = _eval(model, ts, space="crop")
    image = _eval(model, ts, space="image")
    m = crop.predictions.matrices
    assert np.allclose(m[:, 0, 1], 0) and np.allclose(m[:, 0, 0], m[:, 1, 1])  # no rotation, one scale
    assert np.abs(crop.gt).max() < 1  # nothing clamped, so the two ground truths are the same points
    np.testing.assert_allclose(image.nmes, crop.nmes, rtol=1e-4)
    np.testing.assert_allclose(image.per_landmark(), crop.per_landmark(), rtol=1e-4)
    assert crop.nmes.min() > 0.01  # a random network: the agreement is not 0 == 0


def test_crop_to_image_space_inverts_the_crop():
    from staralign.data.transforms import compose_rotate_scale, normalize_points, transform_points

    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 300, (2, 5, 2))
    mats = np.stack([compose_rotate_scale(a, z, (0, 0), (150, 150), (31.5, 31.5)) for a, z in ((0.3, 0.2), (0, 0.4))])
    crop = transform_points(pts, mats)
    back = crop_to_image_space((crop * 2 + 1) / 64 - 1, mats, 64)
    np.testing.assert_allclose(back, pts, atol=1e-9)
    assert np.abs(normalize_points(crop, 64)).max() <= 1


def test_tags_make_subsets():
    def ann(tags):
        return Annotation("x.jpg", np.zeros((98, 2), np.float32), 1.0, (0.0, 0.0), tags=tags)

    rows = [ann((1, 0, 0, 0, 0, 1)), ann((0, 0, 0, 0, 0, 1)), ann(()), ann((1, 1, 1, 1, 1, 1))]
    subsets = tag_subsets(rows)
    assert list(subsets) == list(WFLW_TAGS)
    assert [int(subsets[t].sum()) for t in WFLW_TAGS] == [2, 1, 1, 1, 1, 3]
    assert not any(subsets[t][2] for t in WFLW_TAGS)  # no tags: in no subset
    assert list(tag_subsets([ann((1, 0))])) == ["tag0", "tag1"]
    assert tag_subsets([ann(())]) == {}


def test_score_aggregates_subsets_and_thresholds():
    nmes = np.array([0.01, 0.02, 0.2, 0.06])
    subsets = {"a": np.array([True, True, False, False]), "b": np.array([False, False, True, True]),
               "empty": np.zeros(4, bool)}
    m = score(nmes, subsets, [0.1, 0.05], "ocular")
    assert m["count"] == 4 and m["nme"] == pytest.approx(nmes.mean())
    assert (m["threshold"], m["norm"]) == (0.1, "ocular")
    assert m["fr"] == 0.25 and m["by_threshold"]["0.05"]["fr"] == 0.5
    assert m["subsets"]["a"]["count"] == 2 and m["subsets"]["a"]["nme"] == pytest.approx(0.015)
    assert m["subsets"]["a"]["fr"] == 0.0 and m["subsets"]["b"]["fr"] == 0.5
    assert m["subsets"]["empty"] == summarize([], [0.1, 0.05], "ocular")
    assert m["subsets"]["empty"]["nme"] is None and m["subsets"]["empty"]["count"] == 0
    with pytest.raises(ValueError):
        score(nmes, {"bad": np.ones(3, bool)}, [0.1], "ocular")


def test_subset_metrics_follow_the_faces(synth):
    ts = load_test_set("WFLW", synth, synth)
    result = _eval(tiny_model(seed=1), ts)
    m = result.metrics([0.1])
    for name in WFLW_TAGS:
        mask = np.array([a.tags[WFLW_TAGS.index(name)] == 1 for a in ts.annotations])
        assert m["subsets"][name]["count"] == mask.sum()
        if mask.any():
            assert m["subsets"][name]["nme"] == pytest.approx(result.nmes[mask].mean())


def test_300w_common_and_challenge_are_read_once(tmp_path, synth):
    from staralign.data.annotations import read_annotations, write_annotations
    from staralign.data.landmark_formats import convert_landmarks

    anns = read_annotations(synth / "test.tsv").annotations
    for a in anns:
        a.landmarks = convert_landmarks(a.landmarks.astype(np.float64), "WFLW", "300W").astype(np.float32)
        a.five_points, a.tags = None, ()
    write_annotations(tmp_path / "300W" / "test_common.tsv", anns[:4])
    write_annotations(tmp_path / "300W" / "test_challenge.tsv", anns[4:])
    write_annotations(tmp_path / "300W" / "test.tsv", anns)
    ts = load_test_set("300W", tmp_path, synth)  # the original's <annot_dir>/<definition>/ layout
    assert len(ts) == len(anns) and ts.rows() == ["common", "challenge", "full"]
    assert ts.subsets["common"].sum() == 4 and ts.subsets["challenge"].sum() == len(anns) - 4
    # An explicit file is one set.
    one = load_test_set("300W", tmp_path, synth, "test_challenge.tsv")
    assert len(one) == len(anns) - 4 and one.rows() == ["full"]


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="test.tsv"):
        load_test_set("WFLW", tmp_path, tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        load_test_set("WFLW", tmp_path, tmp_path, "nope.tsv")


def test_micro_batches_and_channels_last_give_the_same_landmarks():
    model = tiny_model(seed=2)
    x = torch.randn(5, 3, 64, 64)
    whole = predict_batch(model, x, WFLW)
    chunked = predict_batch(model, x, WFLW, micro_batch=2)
    assert chunked.shape == whole.shape
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    model.to(memory_format=torch.channels_last)
    nhwc = predict_batch(model, x.contiguous(memory_format=torch.channels_last), WFLW, flip_test=True)
    model.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(nhwc, predict_batch(model, x, WFLW, flip_test=True), atol=1e-5, rtol=0)


def test_validation_takes_8bit_crops_and_channels_last_models(synth):
    # Validation prepares batches as training does: 8-bit crops normalised on the device,
    # NHWC for a channels-last model; the scores equal the float32, NCHW ones.
    from staralign.data.dataset import LandmarkDataset, collate_samples
    from staralign.engine.evaluator import evaluate_nmes

    def loader(dtype: str):
        ds = LandmarkDataset(synth / "test.tsv", synth, "WFLW", train=False, input_size=64, heatmap_size=16,
                             targets="device", image_dtype=dtype)
        return torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_samples)

    model = tiny_model(seed=1)
    ema = tiny_model(seed=2)
    expected = evaluate_nmes({"model": model, "ema": ema}, loader("float32"), WFLW, torch.device("cpu"))
    got = evaluate_nmes({"model": model, "ema": ema}, loader("uint8"), WFLW, torch.device("cpu"))
    assert got == pytest.approx(expected, rel=1e-5)
    for m in (model, ema):
        m.to(memory_format=torch.channels_last)
    nhwc = evaluate_nmes({"model": model, "ema": ema}, loader("uint8"), WFLW, torch.device("cpu"), channels_last=True)
    assert nhwc == pytest.approx(expected, rel=1e-4)


def test_evaluate_model_leaves_the_model_as_it_was(synth):
    ts = TestSet(load_test_set("WFLW", synth, synth).annotations[:2], str(synth), ["t"])
    model = tiny_model()
    model.train()
    _eval(model, ts)
    assert model.training
    conv = next(p for p in model.parameters() if p.dim() == 4)
    assert conv.is_contiguous()
