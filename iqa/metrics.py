"""Correlation metrics between per-image predictions and MOS.

``srcc`` (Spearman), ``plcc`` (Pearson), ``krcc`` (Kendall tau-b), ``rmse`` and
``plcc_logistic`` (Pearson after the 4-parameter logistic mapping recommended by VQEG, which
removes the monotone non-linearity between a model's scale and the MOS scale).  Every metric
takes ``(pred, mos)`` as sequences / arrays of equal length >= 2 and returns a Python float.

Constant predictions (or constant MOS) have no defined correlation; instead of NaN the
correlation metrics return 0.0 (no association), so results JSON and model selection never
see NaN.  Non-finite inputs raise ``ValueError``: a NaN prediction is a bug to surface.
"""
import warnings

import numpy as np
from scipy import optimize, special, stats

__all__ = ["srcc", "plcc", "krcc", "rmse", "plcc_logistic", "logistic_4p", "all_metrics"]


def _pair(pred, mos):
    pred = np.asarray(pred, dtype=np.float64).ravel()
    mos = np.asarray(mos, dtype=np.float64).ravel()
    if pred.shape != mos.shape:
        raise ValueError(f"pred has {pred.size} values but mos has {mos.size}; they must match")
    if pred.size < 2:
        raise ValueError(f"metrics need at least 2 samples, got {pred.size}")
    if not (np.isfinite(pred).all() and np.isfinite(mos).all()):
        raise ValueError("pred and mos must be finite (found NaN or inf)")
    return pred, mos


def _is_constant(x):
    return np.ptp(x) == 0.0


def _pearson(x, y):
    if _is_constant(x) or _is_constant(y):
        return 0.0
    xc, yc = x - x.mean(), y - y.mean()
    r = np.dot(xc, yc) / np.sqrt(np.dot(xc, xc) * np.dot(yc, yc))
    return float(np.clip(r, -1.0, 1.0))


def plcc(pred, mos):
    """Pearson linear correlation of the raw predictions."""
    return _pearson(*_pair(pred, mos))


def srcc(pred, mos):
    """Spearman rank correlation: Pearson of average ranks (ties share their mean rank)."""
    pred, mos = _pair(pred, mos)
    return _pearson(stats.rankdata(pred), stats.rankdata(mos))


def krcc(pred, mos):
    """Kendall tau-b (tie-corrected), as IQA papers report it."""
    pred, mos = _pair(pred, mos)
    if _is_constant(pred) or _is_constant(mos):
        return 0.0
    return float(stats.kendalltau(pred, mos, variant="b").statistic)


def rmse(pred, mos):
    """Root mean squared error on the scales given (no fitting); pass both on the same scale."""
    pred, mos = _pair(pred, mos)
    return float(np.sqrt(np.mean((pred - mos) ** 2)))


def logistic_4p(x, b1, b2, b3, b4):
    """VQEG 4-parameter logistic: (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2."""
    # expit is the overflow-free 1 / (1 + exp(-z)); the tiny epsilon keeps |b4| -> 0 finite.
    return (b1 - b2) * special.expit((x - b3) / (np.abs(b4) + 1e-12)) + b2


def plcc_logistic(pred, mos):
    """PLCC after fitting ``logistic_4p`` from predictions onto MOS (least squares).

    Predictions are standardised before the fit so that the initial guess (b1 = max MOS,
    b2 = min MOS, b3 = 0, b4 = 1) is well scaled for any model output range.  If the fit
    does not converge or yields a non-finite / constant mapping, or there are fewer samples than
    the curve's 4 parameters, the raw PLCC is returned.
    As in VQEG practice the mapping absorbs the sign: a score that falls as MOS rises is fitted
    by a decreasing curve and its fitted PLCC is positive.
    """
    pred, mos = _pair(pred, mos)
    if _is_constant(pred) or _is_constant(mos):
        return 0.0
    if pred.size < 4:
        return _pearson(pred, mos)
    x = (pred - pred.mean()) / pred.std()
    # Start with the orientation of the linear trend so a negatively related score can fit too.
    hi, lo = (mos.max(), mos.min()) if _pearson(x, mos) >= 0 else (mos.min(), mos.max())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            params, _ = optimize.curve_fit(logistic_4p, x, mos, p0=[hi, lo, 0.0, 1.0], maxfev=20000)
    except (RuntimeError, ValueError, optimize.OptimizeWarning):
        return _pearson(pred, mos)
    fitted = logistic_4p(x, *params)
    if not np.isfinite(fitted).all() or _is_constant(fitted):
        return _pearson(pred, mos)
    return _pearson(fitted, mos)


def all_metrics(pred, mos):
    """The results-JSON block: ``{srcc, plcc, plcc_logistic, krcc, rmse, n}``."""
    pred, mos = _pair(pred, mos)
    return {
        "srcc": srcc(pred, mos),
        "plcc": plcc(pred, mos),
        "plcc_logistic": plcc_logistic(pred, mos),
        "krcc": krcc(pred, mos),
        "rmse": rmse(pred, mos),
        "n": int(pred.size),
    }
