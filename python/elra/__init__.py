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
    "Adapter",
    "Config",
    "default_config",
    "save",
    "save_merged",
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
    OUT_OF_MEMORY = 13


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


# ---------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------

#: ``ElraVariant`` values by name.
VARIANTS = {"general": 0, "psd": 1, "hyb": 2, "lora": 3}
#: ``ElraSchedule`` values by name.
SCHEDULES = {"exponential": 0, "cosine": 1, "linear": 2, "constant": 3}
#: ``ElraEtaMultiplier`` values by name.
ETA_MULTIPLIERS = {"none": 0, "cosine": 1}
_PARAMS = {"A": 0, "B": 1, "eta": 2, "W0": 3}
_DTYPES = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}


class Config(ctypes.Structure):
    """``ElraAdapterConfig`` of ``elra.h``."""

    _fields_ = [
        ("variant", ctypes.c_uint32),
        ("dtype", ctypes.c_uint32),
        ("d", ctypes.c_size_t),
        ("k", ctypes.c_size_t),
        ("r", ctypes.c_size_t),
        ("eta", ctypes.c_double),
        ("lambda_", ctypes.c_double),
        ("tau", ctypes.c_double),
        ("schedule", ctypes.c_uint32),
        ("warmup_steps", ctypes.c_size_t),
        ("gamma", ctypes.c_double),
        ("alpha", ctypes.c_double),
        ("eta_multiplier", ctypes.c_uint32),
        ("total_steps", ctypes.c_size_t),
        ("seed", ctypes.c_uint64),
        ("lora_alpha", ctypes.c_double),
    ]

    def as_dict(self):
        return {name: getattr(self, name) for name, _ in self._fields_}


_H = ctypes.c_void_p
_pcfg = ctypes.POINTER(Config)
_szp = ctypes.POINTER(ctypes.c_size_t)
_dp = ctypes.POINTER(ctypes.c_double)
_strs = ctypes.POINTER(ctypes.c_char_p)
_hs = ctypes.POINTER(_H)

lib.elra_adapter_config_default.argtypes = [ctypes.c_uint32, ctypes.c_uint32] + [_size] * 4 + [_pcfg]
lib.elra_adapter_create.argtypes = [_pcfg, ctypes.c_void_p, _size, ctypes.POINTER(_H)]
lib.elra_adapter_destroy.argtypes = [_H]
lib.elra_adapter_destroy.restype = None
lib.elra_adapter_get_config.argtypes = [_H, _pcfg]
lib.elra_adapter_param_shape.argtypes = [_H, ctypes.c_uint32, _szp, _szp]
lib.elra_adapter_param_count.argtypes = [_H, _szp, _szp]
lib.elra_adapter_set_step.argtypes = [_H, _size]
lib.elra_adapter_get_step.argtypes = [_H, _szp, _dp]
lib.elra_adapter_energy.argtypes = [_H, _dp, _dp]
lib.elra_adapter_save.argtypes = [_size, _hs, _strs, ctypes.c_char_p]
lib.elra_adapter_save_merged.argtypes = [_size, _hs, _strs, ctypes.c_char_p]
lib.elra_adapter_load.argtypes = [
    ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint32, _size, _size, ctypes.c_void_p, _size,
    ctypes.POINTER(_H),
]
for _f in [
    "elra_adapter_config_default", "elra_adapter_create", "elra_adapter_get_config",
    "elra_adapter_param_shape", "elra_adapter_param_count", "elra_adapter_set_step",
    "elra_adapter_get_step", "elra_adapter_energy", "elra_adapter_save",
    "elra_adapter_save_merged", "elra_adapter_load",
]:
    getattr(lib, _f).restype = _status
for _dt, _ct in _CT.items():
    _sx = _SUFFIX[_dt]
    _p = ctypes.POINTER(_ct)
    getattr(lib, f"elra_adapter_set_param_{_sx}").argtypes = [_H, ctypes.c_uint32, _p, _size, _size, _size]
    getattr(lib, f"elra_adapter_get_param_{_sx}").argtypes = [_H, ctypes.c_uint32, _p, _size, _size, _size]
    getattr(lib, f"elra_adapter_forward_{_sx}").argtypes = [_H, _size, _p, _size, _p, _size]
    getattr(lib, f"elra_adapter_backward_{_sx}").argtypes = [_H, _size] + [_p, _size] * 5 + [_p]
    getattr(lib, f"elra_adapter_merge_{_sx}").argtypes = [_H, _p, _size]
    getattr(lib, f"elra_adapter_unmerge_{_sx}").argtypes = [_H, _p, _size, _p, _size]
    for _op in ["set_param", "get_param", "forward", "backward", "merge", "unmerge"]:
        getattr(lib, f"elra_adapter_{_op}_{_sx}").restype = _status


def default_config(variant="general", dtype=np.float64, d=1, k=1, r=1, total_steps=100) -> Config:
    """The paper's defaults (App. H) as filled by ``elra_adapter_config_default``."""
    c = Config()
    check(lib.elra_adapter_config_default(
        VARIANTS[variant], _DTYPES[np.dtype(dtype)], d, k, r, total_steps, ctypes.byref(c)))
    return c


def _matrix(a, dtype, shape=None, name="array"):
    a = np.ascontiguousarray(np.asarray(a, dtype=dtype))
    if a.ndim != 2 or (shape is not None and a.shape != tuple(shape)):
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    return a


class Adapter:
    """An ELRA (general, psd, hyb) or LoRA adapter of a frozen weight ``W0`` (d×k), owning an
    ``ElraAdapter`` handle. ``Adapter(w0, "hyb", r=4, eta=0.01, schedule="constant", alpha=0.3)``
    starts from :func:`default_config` and overrides its fields by keyword (``lambda_`` for λ,
    ``tau=0`` for no clipping, ``schedule`` / ``eta_multiplier`` by name)."""

    def __init__(self, w0, variant="general", r=1, dtype=None, total_steps=100, **fields):
        w0 = np.asarray(w0)
        dtype = np.dtype(dtype or (w0.dtype if w0.dtype in _CT else np.float64))
        w0 = _matrix(w0, dtype, name="w0")
        d, k = w0.shape
        cfg = default_config(variant, dtype, d, k, r, total_steps)
        for key, value in fields.items():
            if key == "schedule":
                value = SCHEDULES[value]
            elif key == "eta_multiplier":
                value = ETA_MULTIPLIERS[value]
            if not hasattr(cfg, key):
                raise TypeError(f"unknown config field {key!r}")
            setattr(cfg, key, value)
        h = _H()
        check(lib.elra_adapter_create(ctypes.byref(cfg), w0.ctypes.data, k, ctypes.byref(h)))
        self._init(h)

    def _init(self, h):
        self._h = h
        c = Config()
        check(lib.elra_adapter_get_config(h, ctypes.byref(c)))
        self.config = c
        self.dtype = np.dtype(np.float32) if c.dtype == 0 else np.dtype(np.float64)
        self.d, self.k, self.r = c.d, c.k, c.r
        self.variant = {v: n for n, v in VARIANTS.items()}[c.variant]
        self._sx = _SUFFIX[self.dtype]

    @classmethod
    def load(cls, directory, module, w0, dtype=np.float64):
        """Loads ``module`` of an adapter directory (ELRA or PEFT LoRA) onto ``w0``."""
        dtype = np.dtype(dtype)
        w0 = _matrix(w0, dtype, name="w0")
        h = _H()
        check(lib.elra_adapter_load(
            os.fsencode(directory), module.encode(), _DTYPES[dtype], w0.shape[0], w0.shape[1],
            w0.ctypes.data, w0.shape[1], ctypes.byref(h)))
        self = cls.__new__(cls)
        self._init(h)
        return self

    def close(self):
        """Frees the handle (also done on garbage collection)."""
        h, self._h = getattr(self, "_h", None), None
        if h:
            lib.elra_adapter_destroy(h)

    def __del__(self):
        self.close()

    @property
    def handle(self):
        """The raw ``ElraAdapter *`` (for direct calls through :data:`lib`)."""
        return self._h

    def _fn(self, op):
        return getattr(lib, f"elra_adapter_{op}_{self._sx}")

    def _ptr(self, a):
        return a.ctypes.data_as(ctypes.POINTER(_CT[self.dtype]))

    def param_shape(self, which):
        rows, cols = ctypes.c_size_t(), ctypes.c_size_t()
        check(lib.elra_adapter_param_shape(self._h, _PARAMS[which], ctypes.byref(rows), ctypes.byref(cols)))
        return rows.value, cols.value

    def get(self, which):
        """Parameter ``"A"``, ``"B"``, ``"eta"`` or ``"W0"`` (η as a float)."""
        shape = self.param_shape(which)
        out = np.empty(shape, dtype=self.dtype)
        check(self._fn("get_param")(self._h, _PARAMS[which], self._ptr(out), *shape, shape[1]))
        return float(out[0, 0]) if which == "eta" else out

    def set(self, which, value):
        """Sets parameter ``"A"``, ``"B"``, ``"eta"`` or ``"W0"``."""
        shape = self.param_shape(which)
        v = _matrix(np.reshape(value, shape) if which == "eta" else value, self.dtype, name=which)
        check(self._fn("set_param")(self._h, _PARAMS[which], self._ptr(v), v.shape[0], v.shape[1], v.shape[1]))

    @property
    def step(self):
        s, a = ctypes.c_size_t(), ctypes.c_double()
        check(lib.elra_adapter_get_step(self._h, ctypes.byref(s), ctypes.byref(a)))
        return s.value

    @step.setter
    def step(self, value):
        check(lib.elra_adapter_set_step(self._h, value))

    @property
    def alpha(self):
        """α at the current step (eq. 19)."""
        s, a = ctypes.c_size_t(), ctypes.c_double()
        check(lib.elra_adapter_get_step(self._h, ctypes.byref(s), ctypes.byref(a)))
        return a.value

    def forward(self, x):
        """``Y = X W_newᵀ`` for rows ``x`` (n×k)."""
        x = _matrix(x, self.dtype, name="x")
        if x.shape[1] != self.k:
            raise ValueError(f"x must have {self.k} columns, got {x.shape[1]}")
        y = np.empty((x.shape[0], self.d), dtype=self.dtype)
        check(self._fn("forward")(self._h, x.shape[0], self._ptr(x), self.k, self._ptr(y), self.d))
        return y

    def backward(self, x, dy):
        """Gradients of ``L = ⟨forward(x), dy⟩ (+ λ‖G‖²_F for ELRA)``: a dict with ``dx``,
        ``dA``, ``dB`` (None for PSD) and ``deta`` (None for LoRA)."""
        x = _matrix(x, self.dtype, name="x")
        n = x.shape[0]
        dy = _matrix(dy, self.dtype, (n, self.d), name="dy")
        if x.shape[1] != self.k:
            raise ValueError(f"x must have {self.k} columns, got {x.shape[1]}")
        dx = np.empty_like(x)
        ash = self.param_shape("A")
        da = np.empty(ash, dtype=self.dtype)
        has_b = self.variant != "psd"
        db = np.empty(self.param_shape("B"), dtype=self.dtype) if has_b else None
        deta = np.zeros(1, dtype=self.dtype)
        check(self._fn("backward")(
            self._h, n, self._ptr(x), self.k, self._ptr(dy), self.d, self._ptr(dx), self.k,
            self._ptr(da), ash[1], self._ptr(db) if has_b else None, db.shape[1] if has_b else 1,
            self._ptr(deta)))
        return {"dx": dx, "dA": da, "dB": db, "deta": None if self.variant == "lora" else float(deta[0])}

    def merge(self):
        """``W_new`` (d×k)."""
        w = np.empty((self.d, self.k), dtype=self.dtype)
        check(self._fn("merge")(self._h, self._ptr(w), self.k))
        return w

    def unmerge(self, w_new):
        """``W0`` recovered from ``w_new`` with the current parameters."""
        w_new = _matrix(w_new, self.dtype, (self.d, self.k), name="w_new")
        out = np.empty_like(w_new)
        check(self._fn("unmerge")(self._h, self._ptr(w_new), self.k, self._ptr(out), self.k))
        return out

    def energy(self):
        """``(‖G‖²_F, λ‖G‖²_F)`` (eq. 20–21)."""
        e, p = ctypes.c_double(), ctypes.c_double()
        check(lib.elra_adapter_energy(self._h, ctypes.byref(e), ctypes.byref(p)))
        return e.value, p.value

    def param_count(self):
        """``(matrix entries, scalars)`` (Remark 1)."""
        m, s = ctypes.c_size_t(), ctypes.c_size_t()
        check(lib.elra_adapter_param_count(self._h, ctypes.byref(m), ctypes.byref(s)))
        return m.value, s.value


def _named(adapters):
    names = list(adapters)
    hs = (_H * len(names))(*[adapters[n].handle for n in names])
    cs = (ctypes.c_char_p * len(names))(*[n.encode() for n in names])
    return len(names), hs, cs


def save(directory, adapters):
    """Saves ``{module name: Adapter}`` as one adapter directory (PEFT layout)."""
    n, hs, cs = _named(adapters)
    check(lib.elra_adapter_save(n, hs, cs, os.fsencode(directory)))


def save_merged(path, adapters):
    """Writes the merged weights ``{module}.weight`` of ``{module name: Adapter}`` to ``path``."""
    n, hs, cs = _named(adapters)
    check(lib.elra_adapter_save_merged(n, hs, cs, os.fsencode(path)))
