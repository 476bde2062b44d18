"""iqa.metrics against scipy.stats and hand-worked examples."""
import math

import numpy as np
import pytest
from scipy import stats

from iqa import metrics


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


def test_logistic_fit_absorbs_a_decreasing_relation():
    # VQEG semantics: the fitted curve may decrease, so fitted values track MOS positively.
    x = np.linspace(0, 1, 50)
    mos = 5 - 4 / (1 + np.exp(-(x - 0.4) / 0.05))
    assert metrics.plcc(x, mos) < -0.9
    assert metrics.plcc_logistic(x, mos) > 0.999


def test_constant_predictions_give_zero_not_nan():
    mos = [1.0, 2.0, 3.0, 4.0]
    pred = [0.5, 0.5, 0.5, 0.5]
    out = metrics.all_metrics(pred, mos)
    assert out["srcc"] == out["plcc"] == out["krcc"] == out["plcc_logistic"] == 0.0
    assert out["rmse"] == pytest.approx(math.sqrt(np.mean((np.array(pred) - mos) ** 2)))
    assert out["n"] == 4


def test_all_metrics_keys_and_types(noisy_pair):
    out = metrics.all_metrics(*noisy_pair)
    assert set(out) == {"srcc", "plcc", "plcc_logistic", "krcc", "rmse", "n"}
    assert all(type(out[k]) is float for k in ("srcc", "plcc", "plcc_logistic", "krcc", "rmse"))


@pytest.mark.parametrize("pred, mos", [([1, 2, 3], [1, 2]), ([1.0], [2.0]), ([1, float("nan")], [1, 2])])
def test_bad_inputs_raise(pred, mos):
    with pytest.raises(ValueError):
        metrics.srcc(pred, mos)


def test_failed_fit_falls_back_to_raw_plcc(noisy_pair, monkeypatch):
    def no_convergence(*args, **kwargs):
        raise RuntimeError("Optimal parameters not found")

    monkeypatch.setattr(metrics.optimize, "curve_fit", no_convergence)
    assert metrics.plcc_logistic(*noisy_pair) == metrics.plcc(*noisy_pair)
