import numpy as np
import pytest
import torch

from staralign.definitions import get_definition
from staralign.metrics import ced_curve, fr_auc, nme, normalising_distance, point_errors, summarize

from .conftest import load_reference


def test_fr_auc_matches_reference():
    for case in load_reference("fr_auc.pt"):
        fr, auc = fr_auc(case["nmes"].numpy(), case["thresh"])
        assert fr == case["fr"], case["definition"]
        assert abs(auc - case["auc"]) <= 1e-6, case["definition"]
        # Thresholds default to the definition's.
        assert get_definition(case["definition"]).fr_auc_threshold == case["thresh"]


def test_perfect_predictor():
    gt = np.random.default_rng(0).uniform(0, 256, (5, 98, 2))
    errs = nme(gt, gt, "WFLW")
    assert np.all(errs == 0)
    assert fr_auc(errs, 0.1) == (0.0, 1.0)


@pytest.mark.parametrize("norm", ["ocular", "pupil", "default", "box"])
def test_known_shift_gives_expected_nme(norm):
    rng = np.random.default_rng(1)
    gt = rng.uniform(0, 256, (4, 98, 2))
    pred = gt + np.array([3.0, 4.0])  # every point off by 5 pixels
    d = normalising_distance(gt, "WFLW", norm)
    np.testing.assert_allclose(nme(pred, gt, "WFLW", norm), 5.0 / d)


def test_index_groups_are_averaged_for_300w_pupils():
    gt = np.zeros((1, 68, 2))
    gt[0, 36:42] = [10.0, 0.0]
    gt[0, 42:48] = [40.0, 0.0]
    gt[0, 36] = [4.0, 0.0]  # left group mean: (4 + 5*10)/6 = 9
    assert normalising_distance(gt, "300W", "pupil")[0] == pytest.approx(31.0)
    assert normalising_distance(gt, "300W", "ocular")[0] == pytest.approx(36.0)


def test_torch_and_numpy_agree_and_stay_on_device():
    rng = np.random.default_rng(2)
    gt = rng.uniform(0, 1, (3, 29, 2))
    pred = gt + rng.normal(0, 0.01, gt.shape)
    a = nme(pred, gt, "COFW")
    b = nme(torch.tensor(pred), torch.tensor(gt), "COFW")
    assert isinstance(b, torch.Tensor)
    np.testing.assert_allclose(a, b.numpy())
    assert point_errors(pred, gt, "COFW").shape == (3, 29)


def test_ced_and_summary():
    nmes = np.array([0.01, 0.02, 0.2])
    xs, ys = ced_curve(nmes, 0.1)
    assert xs[0] == 0 and ys[-1] == pytest.approx(2 / 3)
    assert np.all(np.diff(ys) >= 0)
    s = summarize(nmes, [0.05, 0.1])
    assert s["count"] == 3 and s["by_threshold"]["0.1"]["fr"] == pytest.approx(0.3333)
    with pytest.raises(ValueError):
        ced_curve([], 0.1)
    with pytest.raises(ValueError, match="unknown normalisation"):
        nme(nmes.reshape(1, 3, 1).repeat(2, -1), nmes.reshape(1, 3, 1).repeat(2, -1), "WFLW", "chin")
