"""Test configuration: float64 on (gflow turns it on at import), strict dtype promotion."""

import jax
import numpy as np
import pytest

import gflow  # noqa: F401  (enables float64)

jax.config.update("jax_numpy_dtype_promotion", "strict")


def rel_err(a, b) -> float:
    """Relative error of a against reference b, in the max norm."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    scale = np.max(np.abs(b))
    return float(np.max(np.abs(a - b)) / (scale if scale > 0 else 1.0))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
