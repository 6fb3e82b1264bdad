"""Shared helpers: an independent NumPy + SciPy reference for the matrix functions, and an
independent safetensors reader."""

import json
import struct

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


def read_safetensors(path):
    """A minimal independent safetensors reader: 8-byte little-endian header length, JSON header,
    raw little-endian data. Returns ``({key: array in the file's dtype}, metadata)``."""
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    meta = header.pop("__metadata__", None)
    out = {}
    for key, v in header.items():
        dt = {"F64": "<f8", "F32": "<f4"}[v["dtype"]]
        s, e = v["data_offsets"]
        out[key] = np.frombuffer(data[s:e], dtype=dt).reshape(v["shape"])
    return out, meta
