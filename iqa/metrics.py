"""Correlation metrics between per-image predictions and MOS.

``srcc`` (Spearman), ``plcc`` (Pearson), ``krcc`` (Kendall tau-b), ``rmse``, and two metrics
after the 4-parameter logistic mapping recommended by VQEG (which removes the monotone
non-linearity between a model's scale and the MOS scale): ``plcc_logistic`` and
``rmse_logistic``.  Every metric takes ``(pred, mos)`` as sequences / arrays of equal length
>= 2 and returns a Python float.

Every correlation keeps the sign of the association: a score that falls as MOS rises gets a
negative SRCC, PLCC, KRCC and ``plcc_logistic``, so a reversed model cannot look good.

Constant predictions (or constant MOS) have no defined correlation; instead of NaN the
correlation metrics return 0.0 (no association), so results JSON and model selection never
see NaN.  Non-finite inputs raise ``ValueError`` saying how many values were NaN/inf: a NaN
prediction is a bug to surface.
"""
import warnings

import numpy as np
from scipy import optimize, special, stats

__all__ = ["srcc", "plcc", "krcc", "rmse", "plcc_logistic", "rmse_logistic", "logistic_4p", "all_metrics"]


def _require_finite(values, what):
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise ValueError(f"{bad} of {values.size} {what} are NaN/inf; metrics need finite values")


def _pair(pred, mos):
    pred = np.asarray(pred, dtype=np.float64).ravel()
    mos = np.asarray(mos, dtype=np.float64).ravel()
    if pred.shape != mos.shape:
        raise ValueError(f"pred has {pred.size} values but mos has {mos.size}; they must match")
    if pred.size < 2:
        raise ValueError(f"metrics need at least 2 samples, got {pred.size}")
    _require_finite(pred, "predictions")
    _require_finite(mos, "MOS values")
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


def _rmse(fitted, mos):
    return float(np.sqrt(np.mean((fitted - mos) ** 2)))


def rmse(pred, mos):
    """Root mean squared error on the scales given (no fitting); pass both on the same scale."""
    return _rmse(*_pair(pred, mos))


def logistic_4p(x, b1, b2, b3, b4):
    """VQEG 4-parameter logistic: (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2."""
    # expit is the overflow-free 1 / (1 + exp(-z)); the tiny epsilon keeps |b4| -> 0 finite.
    return (b1 - b2) * special.expit((x - b3) / (np.abs(b4) + 1e-12)) + b2


def _logistic_fit(pred, mos):
    """MOS values fitted by ``logistic_4p`` of the predictions (least squares), or None.

    None when there are fewer samples than the curve's 4 parameters, the fit does not converge,
    or it gives a non-finite / constant mapping.  Predictions are standardised first so that
    the initial guess (b1 = max MOS, b2 = min MOS, b3 = 0, b4 = 1) suits any output range.
    """
    if pred.size < 4 or _is_constant(pred) or _is_constant(mos):
        return None
    x = (pred - pred.mean()) / pred.std()
    # Start with the orientation of the linear trend so a negatively related score can fit too.
    hi, lo = (mos.max(), mos.min()) if _pearson(x, mos) >= 0 else (mos.min(), mos.max())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            params, _ = optimize.curve_fit(logistic_4p, x, mos, p0=[hi, lo, 0.0, 1.0], maxfev=20000)
    except (RuntimeError, ValueError, optimize.OptimizeWarning):
        return None
    fitted = logistic_4p(x, *params)
    if not np.isfinite(fitted).all() or _is_constant(fitted):
        return None
    return fitted


def _linear_fit(pred, mos):
    """MOS values fitted by a least-squares line of the predictions (the mean for constant ones)."""
    if _is_constant(pred):
        return np.full_like(mos, mos.mean())
    pc = pred - pred.mean()
    slope = np.dot(pc, mos - mos.mean()) / np.dot(pc, pc)
    return mos.mean() + slope * pc


def _after_mapping(pred, mos):
    """(PLCC, RMSE) of the predictions mapped onto MOS by ``logistic_4p`` (a line if it cannot fit)."""
    fitted = _logistic_fit(pred, mos)
    if fitted is None:
        # A line keeps the raw PLCC (sign included) exactly.
        return _pearson(pred, mos), _rmse(_linear_fit(pred, mos), mos)
    # A least-squares fit correlates positively with MOS; the sign is the curve's direction
    # (fitted values fall with the predictions for a decreasing curve).
    direction = 1.0 if _pearson(fitted, pred) >= 0 else -1.0
    return direction * _pearson(fitted, mos), _rmse(fitted, mos)


def plcc_logistic(pred, mos):
    """PLCC after fitting ``logistic_4p`` from predictions onto MOS, with the sign of the association.

    An increasing fitted curve gives a positive value, a decreasing one (a score that falls as MOS
    rises) a negative value of the same size: the fit handles the non-linearity, not the sign.
    With fewer than 4 samples or a fit that fails, the raw PLCC is returned.
    """
    return _after_mapping(*_pair(pred, mos))[0]


def rmse_logistic(pred, mos):
    """RMSE in MOS units after the same ``logistic_4p`` mapping as ``plcc_logistic``.

    Meaningful for any score scale (a model trained on another dataset, a zero-shot score); when
    the curve cannot be fitted, the least-squares line from predictions onto MOS is used.
    """
    return _after_mapping(*_pair(pred, mos))[1]


def all_metrics(pred, mos, *, on_mos_scale=False):
    """The results-JSON block: ``{srcc, plcc, plcc_logistic, krcc, rmse_logistic, n}``.

    ``on_mos_scale=True`` (predictions already on this MOS scale, e.g. a model evaluated on its
    own training dataset) adds the raw ``rmse``; otherwise a raw RMSE would compare two scales.
    """
    pred, mos = _pair(pred, mos)
    plcc_fitted, rmse_fitted = _after_mapping(pred, mos)
    block = {"srcc": srcc(pred, mos), "plcc": plcc(pred, mos), "plcc_logistic": plcc_fitted,
             "krcc": krcc(pred, mos)}
    if on_mos_scale:
        block["rmse"] = rmse(pred, mos)
    block["rmse_logistic"] = rmse_fitted
    block["n"] = int(pred.size)
    return block
