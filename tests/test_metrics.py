"""iqa.metrics against scipy.stats and hand-worked examples; iqa.evaluation's RMSE and NaN rules."""
import csv
import math

import numpy as np
import pytest
import torch
from scipy import optimize, special, stats

from iqa import metrics
from iqa.datasets import Sample
from iqa.evaluation import EvalOptions, EvalSet, evaluate, save_eval_outputs
from iqa.distributed import DistInfo
from iqa.patches import IMAGENET_MEAN, IMAGENET_STD
from iqa.runtime import UserError


@pytest.fixture
def noisy_pair():
    rng = np.random.default_rng(0)
    mos = rng.uniform(1, 5, 200)
    pred = 0.3 * mos + rng.normal(0, 0.4, 200)
    return pred, mos


def test_correlations_equal_scipy(noisy_pair):
    pred, mos = noisy_pair
    assert metrics.srcc(pred, mos) == pytest.approx(stats.spearmanr(pred, mos).statistic, abs=1e-12)
    assert metrics.plcc(pred, mos) == pytest.approx(stats.pearsonr(pred, mos).statistic, abs=1e-12)
    assert metrics.krcc(pred, mos) == pytest.approx(stats.kendalltau(pred, mos).statistic, abs=1e-12)
    assert metrics.rmse(pred, mos) == pytest.approx(math.sqrt(np.mean((pred - mos) ** 2)))
    assert type(metrics.srcc(list(pred), list(mos))) is float


def test_tau_b_with_ties_hand_worked():
    # x = [1,1,2,3], y = [1,2,2,3]: pairs (i<j): (0,1) tie in x; (0,2) C; (0,3) C; (1,2) tie in y;
    # (1,3) C; (2,3) C -> C=4, D=0, x-ties n1=1, y-ties n2=1, n0=6.
    # tau_b = (C - D) / sqrt((n0 - n1)(n0 - n2)) = 4 / 5.
    x, y = [1, 1, 2, 3], [1, 2, 2, 3]
    assert metrics.krcc(x, y) == pytest.approx(0.8)
    assert metrics.krcc(x, y) == pytest.approx(stats.kendalltau(x, y, variant="b").statistic)


def test_ties_match_scipy_on_discrete_scores():
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 5, 300)
    mos = pred + rng.integers(0, 3, 300)
    assert metrics.krcc(pred, mos) == pytest.approx(stats.kendalltau(pred, mos).statistic, abs=1e-12)
    assert metrics.srcc(pred, mos) == pytest.approx(stats.spearmanr(pred, mos).statistic, abs=1e-12)


def test_logistic_fit_recovers_sigmoid_mapping():
    x = np.linspace(-6, 6, 121)
    mos = 1 + 4 / (1 + np.exp(-(x - 0.5) / 0.8))
    # pred is a linear rescale of x: the MOS is an exact logistic of pred, strongly non-linear.
    pred = 10 * x + 3
    raw = metrics.plcc(pred, mos)
    fitted = metrics.plcc_logistic(pred, mos)
    assert raw < 0.95
    assert fitted > 0.9999


def test_logistic_fit_keeps_the_sign_of_a_decreasing_relation():
    # MOS is an exact decreasing logistic of x: the fit is perfect (RMSE 0), the PLCC is -1.
    x = np.linspace(0, 1, 50)
    mos = 5 - 4 / (1 + np.exp(-(x - 0.4) / 0.05))
    assert metrics.plcc(x, mos) < -0.9
    assert metrics.plcc_logistic(x, mos) == pytest.approx(-1.0, abs=1e-6)
    assert metrics.rmse_logistic(x, mos) == pytest.approx(0.0, abs=1e-4)


def independent_logistic_fit(pred, mos):
    """(signed PLCC, RMSE) after a logistic a + b·expit((x − c)/d) fitted on the raw predictions.

    Another parametrisation, unstandardised input and another starting point than iqa.metrics:
    the fitted values agree only if both reach the same least-squares optimum.
    """
    def curve(x, a, b, c, d):
        return a + b * special.expit((x - c) / d)

    slope = np.sign(stats.pearsonr(pred, mos).statistic)
    p0 = [mos.min() if slope > 0 else mos.max(), slope * np.ptp(mos), np.median(pred), pred.std()]
    (a, b, c, d), _ = optimize.curve_fit(curve, pred, mos, p0=p0, maxfev=50000)
    fitted = curve(pred, a, b, c, d)
    increasing = b / d > 0
    r = stats.pearsonr(fitted, mos).statistic
    return (r if increasing else -r), math.sqrt(np.mean((fitted - mos) ** 2))


@pytest.mark.parametrize("direction", [1, -1])
def test_logistic_metrics_equal_an_independent_fit_for_both_signs(direction):
    rng = np.random.default_rng(2)
    quality = rng.uniform(-3, 3, 300)
    mos = 1 + 4 * special.expit(1.5 * quality) + rng.normal(0, 0.25, 300)
    pred = 0.5 + direction * 0.1 * quality + rng.normal(0, 0.02, 300)  # a score; reversed for direction -1
    expected_plcc, expected_rmse = independent_logistic_fit(pred, mos)
    assert np.sign(expected_plcc) == direction and abs(expected_plcc) > 0.8
    assert metrics.plcc_logistic(pred, mos) == pytest.approx(expected_plcc, abs=1e-6)
    assert metrics.rmse_logistic(pred, mos) == pytest.approx(expected_rmse, rel=1e-6)
    block = metrics.all_metrics(pred, mos)
    assert (block["plcc_logistic"], block["rmse_logistic"]) == (pytest.approx(expected_plcc, abs=1e-6),
                                                                 pytest.approx(expected_rmse, rel=1e-6))
    assert np.sign(block["srcc"]) == np.sign(block["plcc"]) == np.sign(block["krcc"]) == direction


def test_a_reversed_predictor_gets_the_negated_correlations(noisy_pair):
    pred, mos = noisy_pair
    good, reversed_ = metrics.all_metrics(pred, mos), metrics.all_metrics(-pred, mos)
    assert good["plcc_logistic"] > 0.5
    for key in ("srcc", "plcc", "plcc_logistic", "krcc"):
        assert reversed_[key] == pytest.approx(-good[key], abs=1e-6), key
    assert reversed_["rmse_logistic"] == pytest.approx(good["rmse_logistic"], rel=1e-6)


def test_constant_predictions_give_zero_not_nan():
    mos = [1.0, 2.0, 3.0, 4.0]
    pred = [0.5, 0.5, 0.5, 0.5]
    out = metrics.all_metrics(pred, mos, on_mos_scale=True)
    assert out["srcc"] == out["plcc"] == out["krcc"] == out["plcc_logistic"] == 0.0
    assert out["rmse"] == pytest.approx(math.sqrt(np.mean((np.array(pred) - mos) ** 2)))
    # The best mapping of a constant is the mean MOS (2.5): RMSE = sqrt((1.5² + 0.5² + 0.5² + 1.5²) / 4).
    assert out["rmse_logistic"] == pytest.approx(math.sqrt(1.25))
    assert out["n"] == 4


def test_all_metrics_keys_and_types(noisy_pair):
    out = metrics.all_metrics(*noisy_pair)
    assert set(out) == {"srcc", "plcc", "plcc_logistic", "krcc", "rmse_logistic", "n"}
    assert all(type(out[k]) is float for k in ("srcc", "plcc", "plcc_logistic", "krcc", "rmse_logistic"))
    on_scale = metrics.all_metrics(*noisy_pair, on_mos_scale=True)
    assert set(on_scale) == set(out) | {"rmse"} and on_scale["rmse"] == metrics.rmse(*noisy_pair)
    assert {k: v for k, v in on_scale.items() if k != "rmse"} == out


@pytest.mark.parametrize("pred, mos", [([1, 2, 3], [1, 2]), ([1.0], [2.0]), ([1, float("nan")], [1, 2])])
def test_bad_inputs_raise(pred, mos):
    with pytest.raises(ValueError):
        metrics.srcc(pred, mos)


def test_non_finite_values_are_counted():
    pred = [0.1, float("nan"), 0.3, float("inf"), 0.5, -float("inf"), 0.7, 0.8, 0.9, 1.0]
    with pytest.raises(ValueError, match="3 of 10 predictions are NaN/inf"):
        metrics.all_metrics(pred, range(10))
    with pytest.raises(ValueError, match="1 of 10 MOS values are NaN/inf"):
        metrics.plcc_logistic(range(10), [*range(9), float("nan")])


def test_too_few_samples_map_with_a_line():
    # 3 samples < 4 logistic parameters: least-squares line from pred onto MOS, by hand:
    # slope = Σ(x−1)(y−7/3) / Σ(x−1)² = 3/2, fitted = [5/6, 7/3, 23/6], residuals [1/6, −1/3, 1/6].
    pred, mos = [0.0, 1.0, 2.0], [1.0, 2.0, 4.0]
    assert metrics.rmse_logistic(pred, mos) == pytest.approx(math.sqrt(1 / 18))
    assert metrics.plcc_logistic(pred, mos) == metrics.plcc(pred, mos)
    assert metrics.plcc_logistic(pred[::-1], mos) == pytest.approx(-metrics.plcc(pred, mos))


def test_failed_fit_falls_back_to_raw_plcc_and_a_line(noisy_pair, monkeypatch):
    def no_convergence(*args, **kwargs):
        raise RuntimeError("Optimal parameters not found")

    pred, mos = noisy_pair
    slope, intercept = np.polyfit(pred, mos, 1)
    line_rmse = math.sqrt(np.mean((slope * pred + intercept - mos) ** 2))
    monkeypatch.setattr(metrics.optimize, "curve_fit", no_convergence)
    assert metrics.plcc_logistic(pred, mos) == metrics.plcc(pred, mos)
    assert metrics.plcc_logistic(-pred, mos) == metrics.plcc(-pred, mos) < 0
    assert metrics.rmse_logistic(pred, mos) == pytest.approx(line_rmse, rel=1e-9)


# ----------------------------------------------------------------------------- iqa.evaluation.evaluate

GREYS = (30, 60, 90, 120, 150, 180)
MOS = (1.5, 1.0, 2.5, 3.0, 4.5, 4.0)


def grey_set(bounds):
    """Six flat grey 20×20 images; the scorer below reads a pixel back, so image k scores GREYS[k]/255."""
    images = [torch.full((3, 20, 20), g, dtype=torch.uint8) for g in GREYS]
    samples = [Sample(f"grey_{g}.png", m, "val", f"scores.csv:{k + 2}") for k, (g, m) in enumerate(zip(GREYS, MOS))]
    return EvalSet("val", samples, bounds, list(range(len(images))), images)


def red_value(x):
    """Undo the ImageNet normalisation of the red channel: the pixel value / 255 of each crop."""
    return x[:, 0, 0, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]


OPTS = EvalOptions(patch_num=2, patch_size=16, batch_size=4)


def test_in_domain_set_reports_raw_and_logistic_rmse():
    metrics_, pred = evaluate(red_value, grey_set((1.0, 5.0)), DistInfo(), OPTS)
    expected = 1.0 + 4.0 * np.array(GREYS) / 255.0  # the [0, 1] score on the 1..5 training scale
    np.testing.assert_allclose(pred, expected, rtol=1e-6)
    assert set(metrics_) == {"srcc", "plcc", "plcc_logistic", "krcc", "rmse", "rmse_logistic", "n"}
    assert metrics_["rmse"] == pytest.approx(math.sqrt(np.mean((expected - np.array(MOS)) ** 2)), rel=1e-6)
    assert metrics_["srcc"] == pytest.approx(stats.spearmanr(GREYS, MOS).statistic)
    assert metrics_["n"] == 6


def test_out_of_domain_set_reports_only_the_logistic_rmse():
    metrics_, pred = evaluate(red_value, grey_set(None), DistInfo(), OPTS)
    scores = np.array(GREYS) / 255.0
    np.testing.assert_allclose(pred, scores, rtol=1e-6)  # the model's own scores, not mapped to any MOS range
    assert set(metrics_) == {"srcc", "plcc", "plcc_logistic", "krcc", "rmse_logistic", "n"}
    assert metrics_["rmse_logistic"] == pytest.approx(metrics.rmse_logistic(scores, MOS), rel=1e-6)
    assert metrics_["plcc"] == pytest.approx(stats.pearsonr(scores, MOS).statistic, abs=1e-6)


@pytest.mark.parametrize("bounds, column", [((1.0, 5.0), "pred"), (None, "score")])
def test_prediction_csv_names_the_scale(tmp_path, bounds, column):
    eval_set = grey_set(bounds)
    block, pred = evaluate(red_value, eval_set, DistInfo(), OPTS)
    save_eval_outputs(str(tmp_path), "spaq", eval_set, block, pred)
    with open(tmp_path / "predictions_spaq.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "mos", column]
    assert [float(r[1]) for r in rows[1:]] == list(MOS)
    np.testing.assert_allclose([float(r[2]) for r in rows[1:]], pred, atol=1e-6)
    assert (tmp_path / "scatter_spaq.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_non_finite_predictions_are_a_user_error_naming_the_set():
    def diverged(x):  # NaN for the two brightest images, +inf for the darkest
        value = red_value(x)
        value = torch.where(value > 140 / 255, torch.nan, value)
        return torch.where(value < 40 / 255, torch.inf, value)

    with pytest.raises(UserError, match=r"^3 of 6 predictions on 'val' are NaN/inf: the model diverged"):
        evaluate(diverged, grey_set((1.0, 5.0)), DistInfo(), OPTS)
