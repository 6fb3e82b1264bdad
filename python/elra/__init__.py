"""Python client of the elra C ABI (``include/elra.h``), with ctypes and NumPy only.

The shared library is found through ``$ELRA_LIB`` (a path to ``libelra.so``), else the
repository's ``target/release`` next to this package, else the system's library path.

Matrix functions take one ``r×r`` matrix or a batch shaped ``(batch, r, r)``, ``float32`` or
``float64`` (other dtypes are converted to ``float64``), and return new arrays of the same dtype
and shape. Row-major arrays with gaps (e.g. slices of a larger array) are passed with their
leading dimension and batch stride, without copying. Failures raise :class:`ElraError` carrying
the :class:`Status` code and the library's message.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import os
import pathlib

import numpy as np

__all__ = [
    "ABI_VERSION",
    "ElraError",
    "Status",
    "expm",
    "expm_frechet_adjoint",
    "expm_phi1",
    "last_error_message",
    "lib",
    "phi1",
    "phi1_frechet_adjoint",
]

#: The ABI version this client was written for (``ELRA_ABI_VERSION`` in ``elra.h``).
ABI_VERSION = 1


class Status(enum.IntEnum):
    """``ElraStatus`` of ``elra.h``."""

    OK = 0
    NULL_POINTER = 1
    INVALID_ARGUMENT = 2
    SHAPE_MISMATCH = 3
    NON_FINITE = 4
    OVERFLOW = 5
    NUMERICAL = 6
    TRAINING = 7
    IO = 8
    FORMAT = 9
    NO_DEVICE = 10
    CUDA = 11
    PANIC = 12


class ElraError(Exception):
    """A call into the library failed: ``status`` is the :class:`Status`, ``message`` its text."""

    def __init__(self, status: int, message: str):
        try:
            status = Status(status)
        except ValueError:
            pass
        self.status = status
        self.message = message
        super().__init__(f"{getattr(status, 'name', status)}: {message}")


def _find_library() -> str:
    env = os.environ.get("ELRA_LIB")
    if env:
        return env
    names = ["libelra.so", "libelra.dylib", "elra.dll"]
    root = pathlib.Path(__file__).resolve().parents[2]
    for n in names:
        p = root / "target" / "release" / n
        if p.exists():
            return str(p)
    found = ctypes.util.find_library("elra")
    if found:
        return found
    raise ImportError(
        "libelra not found: set ELRA_LIB or run `cargo build --release` in the repository"
    )


#: The loaded ``ctypes.CDLL``.
lib = ctypes.CDLL(_find_library())

_size = ctypes.c_size_t
_status = ctypes.c_int

lib.elra_version.argtypes = []
lib.elra_version.restype = ctypes.c_uint32
lib.elra_last_error_message.argtypes = [ctypes.c_char_p, _size]
lib.elra_last_error_message.restype = _size

if lib.elra_version() != ABI_VERSION:
    raise ImportError(
        f"libelra ABI version {lib.elra_version()} does not match this client ({ABI_VERSION})"
    )

_CT = {np.dtype(np.float64): ctypes.c_double, np.dtype(np.float32): ctypes.c_float}
_SUFFIX = {np.dtype(np.float64): "f64", np.dtype(np.float32): "f32"}


def _declare(name: str, n_in: int, n_out: int) -> None:
    for dt, ct in _CT.items():
        f = getattr(lib, f"elra_{name}_{_SUFFIX[dt]}")
        ptr = ctypes.POINTER(ct)
        f.argtypes = [_size, _size] + [ptr, _size, _size] * (n_in + n_out)
        f.restype = _status


for _name, _nin, _nout in [
    ("expm", 1, 1),
    ("phi1", 1, 1),
    ("expm_phi1", 1, 2),
    ("expm_frechet_adjoint", 2, 1),
    ("phi1_frechet_adjoint", 2, 1),
]:
    _declare(_name, _nin, _nout)


def last_error_message() -> str:
    """The calling thread's last error message (empty after a successful call)."""
    n = lib.elra_last_error_message(None, 0)
    buf = ctypes.create_string_buffer(n + 1)
    lib.elra_last_error_message(buf, n + 1)
    return buf.value.decode("utf-8", errors="replace")


def check(status: int) -> None:
    """Raises :class:`ElraError` with the library's message unless ``status`` is ``OK``."""
    if status != Status.OK:
        raise ElraError(status, last_error_message())


def _as_batch(a, dtype=None):
    """Returns ``(array, batch, r, ld, stride, single)`` for a ``(r, r)`` or ``(batch, r, r)``
    array, keeping row-major strided views (unit column stride) without copying."""
    a = np.asarray(a)
    if dtype is None:
        dtype = a.dtype if a.dtype in _CT else np.dtype(np.float64)
    a = a.astype(dtype, copy=False)
    single = a.ndim == 2
    if single:
        a = a[None]
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
        raise ValueError(f"expected an r×r matrix or a (batch, r, r) array, got shape {a.shape}")
    isz = a.itemsize
    s0, s1, s2 = a.strides
    span = (a.shape[1] - 1) * s1 + a.shape[2] * isz
    ok = s2 == isz and s1 >= a.shape[2] * isz and s1 % isz == 0 and s0 % isz == 0
    ok = ok and a.flags.aligned and (a.shape[0] == 1 or s0 >= span)
    if not ok:
        a = np.ascontiguousarray(a)
        s0, s1, s2 = a.strides
    batch, r = a.shape[0], a.shape[1]
    stride = s0 // isz if batch > 1 else 0
    return a, batch, r, s1 // isz, stride, single


def _ptr(a):
    return a.ctypes.data_as(ctypes.POINTER(_CT[a.dtype]))


def _run(name: str, inputs, n_out: int):
    z, batch, r, ldz, sz, single = _as_batch(inputs[0])
    args = [batch, r, _ptr(z), ldz, sz]
    keep = [z]
    for other in inputs[1:]:
        g, gb, gr, ldg, sg, _ = _as_batch(other, z.dtype)
        if (gb, gr) != (batch, r):
            raise ValueError(f"shape mismatch: {other.shape} vs {inputs[0].shape}")
        args += [_ptr(g), ldg, sg]
        keep.append(g)
    outs = [np.empty((batch, r, r), dtype=z.dtype) for _ in range(n_out)]
    for o in outs:
        args += [_ptr(o), r, r * r]
    check(getattr(lib, f"elra_{name}_{_SUFFIX[z.dtype]}")(*args))
    if single:
        outs = [o[0] for o in outs]
    return outs[0] if n_out == 1 else tuple(outs)


def expm(z):
    """``e^Z`` (Padé scaling and squaring, Al-Mohy & Higham 2009) of one matrix or a batch."""
    return _run("expm", [z], 1)


def phi1(z):
    """``φ1(Z) = Σ Zⁿ/(n+1)!``, the factor of ``exp(AC) = I + A φ1(CA) C`` (Prop. 1, eq. 4)."""
    return _run("phi1", [z], 1)


def expm_phi1(z):
    """``(e^Z, φ1(Z))`` from one factorisation."""
    return _run("expm_phi1", [z], 2)


def expm_frechet_adjoint(z, g):
    """``L_exp(Zᵀ, G)``: the gradient of ``⟨e^Z, G⟩`` with respect to ``Z``."""
    return _run("expm_frechet_adjoint", [z, g], 1)


def phi1_frechet_adjoint(z, g):
    """``L_φ1(Zᵀ, G)``: the gradient of ``⟨φ1(Z), G⟩`` with respect to ``Z``."""
    return _run("phi1_frechet_adjoint", [z, g], 1)
