"""Shared helpers: an independent NumPy + SciPy reference for the matrix functions."""

import numpy as np
import pytest
import scipy.linalg


def phi1_ref(z):
    """φ1(Z) as the top-right block of expm([[Z, I], [0, 0]]) (SciPy's expm, not elra's)."""
    r = z.shape[0]
    big = np.zeros((2 * r, 2 * r))
    big[:r, :r] = z
    big[:r, r:] = np.eye(r)
    return scipy.linalg.expm(big)[:r, r:]


def phi1_frechet_ref(x, e):
    """L_φ1(X, E): top-right block of φ1([[X, E], [0, X]]) (block-triangular rule)."""
    r = x.shape[0]
    big = np.zeros((2 * r, 2 * r))
    big[:r, :r] = x
    big[:r, r:] = e
    big[r:, r:] = x
    return phi1_ref(big)[:r, r:]


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
