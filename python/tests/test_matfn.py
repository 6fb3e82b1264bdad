"""Batched matrix functions of the C ABI against SciPy, and the status-code protocol."""

import ctypes

import numpy as np
import pytest
import scipy.linalg

import elra
from conftest import phi1_frechet_ref, phi1_ref


def rel(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def random_batch(rng, batch, r, norm):
    z = rng.uniform(-1, 1, (batch, r, r))
    return z * (norm / np.abs(z).sum(axis=1).max(axis=1))[:, None, None]


@pytest.mark.parametrize("r", [1, 2, 5, 8])
@pytest.mark.parametrize("norm", [1e-3, 0.5, 3.0, 20.0])
def test_expm_phi1_match_scipy_f64(rng, r, norm):
    z = random_batch(rng, 6, r, norm)
    e, p = elra.expm_phi1(z)
    for b in range(6):
        # Both are backward stable to ~u; with ‖Z‖₁ ≤ 20 and r ≤ 8 the relative condition
        # numbers stay below ~1e2, so 1e-12 leaves a 10x margin over the observed error.
        assert rel(e[b], scipy.linalg.expm(z[b])) < 1e-12
        assert rel(p[b], phi1_ref(z[b])) < 1e-12
    np.testing.assert_array_equal(elra.expm(z), e)
    np.testing.assert_array_equal(elra.phi1(z), p)


def test_f32_matches_scipy_within_f32_accuracy(rng):
    z = random_batch(rng, 4, 6, 2.0).astype(np.float32)
    p = elra.phi1(z)
    assert p.dtype == np.float32
    for b in range(4):
        # f32 unit roundoff 6e-8; a conditioning factor ≲ 1e2 gives the 1e-5 bound.
        assert rel(p[b].astype(np.float64), phi1_ref(z[b].astype(np.float64))) < 1e-5


def test_adjoints_match_independent_references(rng):
    z = random_batch(rng, 5, 4, 1.5)
    g = rng.standard_normal((5, 4, 4))
    ea = elra.expm_frechet_adjoint(z, g)
    pa = elra.phi1_frechet_adjoint(z, g)
    for b in range(5):
        want_e = scipy.linalg.expm_frechet(z[b].T, g[b], compute_expm=False)
        assert rel(ea[b], want_e) < 1e-12
        assert rel(pa[b], phi1_frechet_ref(z[b].T, g[b])) < 1e-12
        # Gradient identity: <L*(G), E> = d/dh <φ1(Z + hE), G> (central difference, h = 1e-6:
        # truncation ~1e-12, rounding ~1e-10 relative).
        e = rng.standard_normal((4, 4))
        h = 1e-6
        fd = np.sum((phi1_ref(z[b] + h * e) - phi1_ref(z[b] - h * e)) * g[b]) / (2 * h)
        assert abs(fd - np.sum(pa[b] * e)) < 1e-7 * (1 + abs(fd))


def test_strided_views_are_passed_without_copy_and_gaps_untouched(rng):
    big = rng.uniform(-1, 1, (7, 9, 11))
    view = big[::2, 1:5, 3:7]  # batch 4 of 4x4, ld 11, stride 2*9*11
    _, batch, r, ld, stride, _ = elra._as_batch(view)
    assert (batch, r, ld, stride) == (4, 4, 11, 198)
    p = elra.phi1(view)
    for b in range(4):
        assert rel(p[b], phi1_ref(view[b])) < 1e-12
    # A transposed (column-major) view is copied, with the same result.
    np.testing.assert_array_equal(elra.phi1(view.transpose(0, 2, 1)), elra.phi1(np.ascontiguousarray(view.transpose(0, 2, 1))))


def test_errors_raise_with_status_and_message(rng):
    z = rng.uniform(-1, 1, (3, 3))
    z[1, 2] = np.nan
    with pytest.raises(elra.ElraError) as e:
        elra.phi1(z)
    assert e.value.status == elra.Status.NON_FINITE
    assert "`z`" in e.value.message
    with pytest.raises(elra.ElraError) as e:
        elra.expm(np.array([[200.0]], dtype=np.float32))
    assert e.value.status == elra.Status.OVERFLOW
    # A success clears the thread's message.
    elra.phi1(np.eye(2))
    assert elra.last_error_message() == ""


def test_raw_abi_rejects_bad_arguments_and_leaves_outputs_untouched():
    f = elra.lib.elra_phi1_f64
    dp = ctypes.POINTER(ctypes.c_double)
    z = np.eye(3)
    out = np.full((3, 3), -7.0)
    zp, op = z.ctypes.data_as(dp), out.ctypes.data_as(dp)
    cases = [
        ((1, 3, None, 3, 0, op, 3, 0), elra.Status.NULL_POINTER, "`z`"),
        ((1, 3, zp, 3, 0, None, 3, 0), elra.Status.NULL_POINTER, "`out`"),
        ((0, 3, zp, 3, 0, op, 3, 0), elra.Status.INVALID_ARGUMENT, "zero dimension"),
        ((1, 0, zp, 3, 0, op, 3, 0), elra.Status.INVALID_ARGUMENT, "`r`"),
        ((1, 3, zp, 2, 0, op, 3, 0), elra.Status.INVALID_ARGUMENT, "leading dimension"),
        ((1, 3, zp, 3, 0, op, 1, 0), elra.Status.INVALID_ARGUMENT, "leading dimension"),
        ((2, 3, zp, 3, 3, op, 3, 9), elra.Status.INVALID_ARGUMENT, "overlap"),
        ((2**62, 3, zp, 3, 9, op, 3, 9), elra.Status.INVALID_ARGUMENT, "address space"),
    ]
    for args, status, needle in cases:
        assert f(*args) == status, args
        msg = elra.last_error_message()
        assert needle in msg, (args, msg)
    assert (out == -7.0).all()
    # Misaligned pointer.
    raw = np.zeros(20, dtype=np.uint8)
    mis = ctypes.cast(raw.ctypes.data + 1, dp)
    assert f(1, 1, mis, 1, 0, op, 1, 0) == elra.Status.INVALID_ARGUMENT
    assert "aligned" in elra.last_error_message()


def test_last_error_message_truncates_on_utf8_boundaries():
    elra.lib.elra_phi1_f64(1, 0, None, 1, 0, None, 1, 0)
    full = elra.lib.elra_last_error_message(None, 0)
    text = elra.last_error_message()
    assert len(text.encode()) == full > 0
    for n in range(1, full + 2):
        buf = ctypes.create_string_buffer(b"\x55" * (n + 4), n + 4)
        assert elra.lib.elra_last_error_message(buf, n) == full
        raw = buf.raw
        nul = raw.index(b"\x00")
        assert nul < n and raw[n:] == b"\x55" * 4
        assert text.encode().startswith(raw[:nul])
        raw[:nul].decode("utf-8")  # valid UTF-8
