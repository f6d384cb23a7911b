"""Known answers: margin problems whose solution an independent convex solver gives.

* ``svm_direction``: the hard-margin SVM without intercept, ``min |w|^2 / 2`` s.t.
  ``y_n <w, x_n> >= 1`` (SciPy's SLSQP on the primal QP): the limit direction of a linear
  model (docs/theory.md item 5) and, on symmetric data, of a two-layer leaky-ReLU net's
  linear part (Lyu et al. 2021).
* ``l1_max_margin``: ``min |b|_1`` s.t. ``y_n <b, x_n> >= 1`` as an LP (HiGHS): the limit
  of a depth-2 diagonal linear network (Gunasekar et al. 2018).
* ``symmetric``: whether a dataset is its own mirror image, ``(x, y)`` in it exactly when
  ``(-x, -y)`` is (the data of Lyu et al. 2021).
"""

from __future__ import annotations

import numpy as np
import scipy.optimize

__all__ = ["svm_direction", "l1_max_margin", "symmetric"]


def svm_direction(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The hard-margin SVM without intercept: ``min |w|^2 / 2`` s.t. ``y_n w.x_n >= 1``
    (``X`` of shape (n, d), ``y`` in {-1, +1}). Raises ``RuntimeError`` when SLSQP fails
    (e.g. the data are not linearly separable)."""
    X, y = np.asarray(X, np.float64).reshape(len(X), -1), np.asarray(y, np.float64)
    res = scipy.optimize.minimize(
        lambda w: 0.5 * w @ w, np.zeros(X.shape[1]), jac=lambda w: w, method="SLSQP",
        constraints=[{"type": "ineq", "fun": lambda w: y * (X @ w) - 1,
                      "jac": lambda w: y[:, None] * X}],
        options=dict(ftol=1e-12, maxiter=2000),
    )  # fmt: skip
    if not res.success or np.min(y * (X @ res.x)) < 1 - 1e-6:
        raise RuntimeError(f"SLSQP failed: {res.message}")
    return res.x


def l1_max_margin(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``min |b|_1`` s.t. ``y_n <b, x_n> >= 1`` as an LP in ``(b+, b-) >= 0`` (HiGHS)."""
    X, y = np.asarray(X, np.float64).reshape(len(X), -1), np.asarray(y, np.float64)
    d = X.shape[1]
    a = -(y[:, None] * X)
    res = scipy.optimize.linprog(
        np.ones(2 * d), A_ub=np.hstack([a, -a]), b_ub=-np.ones(len(y)),
        bounds=[(0, None)] * (2 * d), method="highs",
    )  # fmt: skip
    if res.status != 0:
        raise RuntimeError(f"LP failed: {res.message}")
    return res.x[:d] - res.x[d:]


def symmetric(X: np.ndarray, y: np.ndarray, digits: int = 9) -> bool:
    """Whether every sample's mirror ``(-x, -y)`` is also a sample (inputs compared after
    rounding to ``digits`` significant digits of their largest entry: negation is exact,
    so a set built as ``x`` and ``-x`` matches however it was scaled)."""
    X, y = np.asarray(X, np.float64).reshape(len(X), -1), np.asarray(y)
    scale = float(np.max(np.abs(X))) or 1.0
    keys = np.round(X / scale * 10.0**digits).astype(np.int64)
    have = {(k.tobytes(), int(c)) for k, c in zip(keys, y, strict=True)}
    return all(((-k).tobytes(), -int(c)) in have for k, c in zip(keys, y, strict=True))
