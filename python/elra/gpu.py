"""GPU adapters on PyTorch CUDA tensors through the CUDA half of the C ABI (``ElraGpuAdapter``,
declared in ``elra.h`` under ``ELRA_FEATURE_CUDA``; needs a ``libelra.so`` built with
``cargo build --release --features cuda``).

Tensors travel as device pointers (``t.data_ptr()``), never copied to the host; every call is
ordered on a CUDA stream — by default PyTorch's current stream of the tensor's device
(``torch.cuda.current_stream().cuda_stream``), or the ``stream=`` given (a ``torch.cuda.Stream``
or a raw ``CUstream`` as int). Outputs are allocated by PyTorch on the current stream, so run a
call on another stream inside ``with torch.cuda.stream(s):`` (or pass tensors allocated there).

The library uses the device's primary context, which PyTorch uses too. ``torch`` is imported
only when a GPU function is first called, never at module import.

The overflow rule: the CPU calls always report finite inputs with a non-finite result as
``Status.OVERFLOW``; on the GPU the check is on request (it costs one more read of each output
and a host wait): ``GpuAdapter(..., check_finite=True)`` (or the ``check_finite`` property) makes
forward, backward, merge and unmerge scan their outputs, synchronise and raise ``OVERFLOW`` naming
the output, and :func:`check_finite` ORs 1 into a device flag for any tensor, without waiting.
"""

from __future__ import annotations

import ctypes

import numpy as np

from . import (
    ETA_MULTIPLIERS,
    SCHEDULES,
    ElraError,
    Status,
    check,
    default_config,
    lib,
)
from . import Config as _Config

__all__ = ["GpuAdapter", "available", "check_finite", "device_count", "DTYPES"]

#: ``ElraGpuDtype`` values by torch dtype name.
DTYPES = {"float32": 0, "float16": 2, "bfloat16": 3}
_PARAMS = {"A": 0, "B": 1, "eta": 2}
_H = ctypes.c_void_p
_size = ctypes.c_size_t
_u32 = ctypes.c_uint32
_vp = ctypes.c_void_p
_fp = ctypes.POINTER(ctypes.c_float)
_declared = False


def available() -> bool:
    """Whether the loaded library was built with the ``cuda`` feature."""
    return hasattr(lib, "elra_gpu_adapter_create")


def _declare() -> None:
    global _declared
    if _declared:
        return
    if not available():
        raise ElraError(
            Status.NO_DEVICE,
            "this libelra was built without the `cuda` feature (cargo build --features cuda)",
        )
    pc = ctypes.POINTER(_Config)
    szp = ctypes.POINTER(_size)
    dp = ctypes.POINTER(ctypes.c_double)
    sig = {
        "elra_cuda_device_count": [szp],
        "elra_gpu_adapter_create": [pc, _size, _vp, _size, _vp, ctypes.POINTER(_H)],
        "elra_gpu_adapter_get_config": [_H, pc],
        "elra_gpu_adapter_param_shape": [_H, ctypes.c_uint32, szp, szp],
        "elra_gpu_adapter_set_step": [_H, _size],
        "elra_gpu_adapter_get_step": [_H, szp, dp],
        "elra_gpu_adapter_set_param": [_H, ctypes.c_uint32, _fp, _size, _size, _size],
        "elra_gpu_adapter_get_param": [_H, ctypes.c_uint32, _fp, _size, _size, _size],
        "elra_gpu_adapter_get_grads": [_H, _fp, _size, _fp, _size, _fp],
        "elra_gpu_adapter_energy": [_H, dp, dp],
        "elra_gpu_adapter_synchronize": [_H],
        "elra_gpu_adapter_forward": [_H, _size, _vp, _size, _vp, _size, _vp],
        "elra_gpu_adapter_backward": [
            _H, _size, _vp, _size, _vp, _size, _vp, _size, ctypes.c_uint32, _vp,
        ],
        "elra_gpu_adapter_merge": [_H, _vp, _size, _vp],
        "elra_gpu_adapter_unmerge": [_H, _vp, _size, _vp, _size, _vp],
        "elra_gpu_adapter_set_check_finite": [_H, ctypes.c_uint32],
        "elra_gpu_check_finite": [ctypes.c_uint32, _vp, _size, _size, _size, _vp, _vp],
        # The functional calls (elra.torch's CUDA path): desc and step are pointers to the
        # ElraOpDesc / ElraOpStep structures; every buffer and η are device pointers.
        "elra_gpu_op_sizes": [_vp, _size, szp, szp],
        "elra_gpu_op_forward": [
            _vp, _vp, _u32, _size, _vp, _size, _u32, _vp, _vp, _size, _vp, _size, _vp, _vp,
            _size, _vp, _size, _vp, _vp, _size, _vp,
        ],
        "elra_gpu_op_backward": [
            _vp, _vp, _u32, _size, _vp, _size, _u32, _vp, _size, _vp, _size, _vp, _vp, _size,
            _vp, _vp, _size, _vp, _size, _vp, _size, _vp, _size, _vp, _u32, _vp, _size, _vp,
        ],
        "elra_gpu_op_forward_out": [
            _vp, _vp, _u32, _size, _vp, _size, _vp, _size, _vp, _vp, _size, _vp, _size, _vp, _vp,
            _size, _vp,
        ],
        "elra_gpu_op_backward_out": [
            _vp, _vp, _u32, _size, _vp, _size, _vp, _size, _vp, _vp, _size, _vp, _vp, _size, _vp,
            _size, _vp, _size, _vp, _size, _vp, _u32, _vp, _size, _vp,
        ],
        "elra_gpu_op_merge": [
            _vp, _vp, _u32, _vp, _size, _vp, _size, _vp, _vp, _size, _u32, _u32, _vp, _size, _vp,
            _size, _vp,
        ],
        "elra_gpu_op_energy": [
            _vp, _vp, _vp, _size, _vp, _size, _vp, _vp, _vp, _size, _vp, _size, _vp, _u32, _vp,
            _size, _vp,
        ],
        # The multi-adapter forward: `adapters` points to ElraGpuMultiAdapter descriptions.
        "elra_gpu_op_multi_sizes": [_vp, _size, _size, _size, szp],
        "elra_gpu_op_multi_forward": [
            _u32, _vp, _size, _vp, _size, _vp, _size, _size, _size, _vp, _vp, _size, _vp, _size,
            _vp, _size, _vp,
        ],
    }
    for name, args in sig.items():
        f = getattr(lib, name)
        f.argtypes = args
        f.restype = ctypes.c_int
    lib.elra_gpu_adapter_destroy.argtypes = [_H]
    lib.elra_gpu_adapter_destroy.restype = None
    _declared = True


def device_count() -> int:
    """Number of CUDA devices the library sees (raises :class:`ElraError` ``NO_DEVICE``)."""
    _declare()
    n = ctypes.c_size_t()
    check(lib.elra_cuda_device_count(ctypes.byref(n)))
    return n.value


def _torch():
    import torch  # deferred: importing elra never imports torch

    return torch


def _stream_handle(stream, device, *tensors):
    """The raw ``CUstream`` of ``stream`` (default: the current stream of ``device``). Tensors
    used on a ``torch.cuda.Stream`` other than the current one are marked with
    ``record_stream`` so that the caching allocator does not reuse their memory too early."""
    torch = _torch()
    if stream is None:
        return torch.cuda.current_stream(device).cuda_stream
    if isinstance(stream, int):
        return stream
    if stream != torch.cuda.current_stream(device):
        for t in tensors:
            t.record_stream(stream)
    return stream.cuda_stream


def check_finite(t, flag, stream=None):
    """ORs 1 into ``flag`` (a one-element int32 CUDA tensor the caller zeroes) when the 2-D CUDA
    tensor ``t`` (float32, float16 or bfloat16; rows may be padded, ``t.stride(1) == 1``) holds
    NaN or ±Inf: the overflow rule of the CPU calls, on request (``elra_gpu_check_finite``). One
    read of ``t``, ordered on ``stream``, no host wait: read ``flag`` when you synchronise."""
    _declare()
    torch = _torch()
    name = str(t.dtype).replace("torch.", "")
    if not (isinstance(t, torch.Tensor) and t.is_cuda and t.dim() == 2) or name not in DTYPES:
        raise ValueError("t must be a 2-D float32, float16 or bfloat16 CUDA tensor")
    if t.stride(1) != 1 and t.shape[1] > 1:
        raise ValueError("the rows of t must be contiguous (t.stride(1) == 1)")
    flag_dtypes = (torch.int32, getattr(torch, "uint32", torch.int32))
    if not (isinstance(flag, torch.Tensor) and flag.is_cuda and flag.device == t.device
            and flag.dtype in flag_dtypes and flag.numel() == 1):
        raise ValueError(f"flag must be a one-element int32 CUDA tensor on {t.device}")
    rows, cols = t.shape
    ld = t.stride(0) if rows > 1 else cols
    check(lib.elra_gpu_check_finite(
        DTYPES[name], t.data_ptr(), rows, cols, ld, flag.data_ptr(),
        _stream_handle(stream, t.device, t, flag)))


class GpuAdapter:
    """An ELRA (general, psd, hyb) or LoRA adapter of a frozen CUDA weight ``w0`` (d×k, float32,
    float16 or bfloat16), owning an ``ElraGpuAdapter`` handle. ``W0`` is copied once into
    library memory. Fields of :func:`elra.default_config` are overridden by keyword as for
    :class:`elra.Adapter`; ``tau`` defaults to 0 (the GPU layer has no spectral clip).
    Parameters and gradients are exchanged as float32 NumPy arrays on the host.
    ``check_finite=True`` turns the overflow rule on (the :attr:`check_finite` property)."""

    def __init__(self, w0, variant="general", r=1, total_steps=100, stream=None,
                 check_finite=False, **fields):
        _declare()
        torch = _torch()
        if not (isinstance(w0, torch.Tensor) and w0.is_cuda and w0.dim() == 2):
            raise ValueError("w0 must be a 2-D CUDA tensor")
        name = str(w0.dtype).replace("torch.", "")
        if name not in DTYPES:
            raise ValueError(f"w0 dtype {w0.dtype} is not float32, float16 or bfloat16")
        w0 = w0.contiguous()
        d, k = w0.shape
        cfg = default_config(variant, np.float32, d, k, r, total_steps)
        cfg.dtype = DTYPES[name]
        cfg.tau = 0.0
        for key, value in fields.items():
            if key == "schedule":
                value = SCHEDULES[value]
            elif key == "eta_multiplier":
                value = ETA_MULTIPLIERS[value]
            if not hasattr(cfg, key):
                raise TypeError(f"unknown config field {key!r}")
            setattr(cfg, key, value)
        self.device = w0.device
        self.dtype = w0.dtype
        h = _H()
        s = _stream_handle(stream, self.device, w0)
        check(lib.elra_gpu_adapter_create(
            ctypes.byref(cfg), self.device.index, w0.data_ptr(), k, s, ctypes.byref(h)))
        self._h = h
        c = _Config()
        check(lib.elra_gpu_adapter_get_config(h, ctypes.byref(c)))
        self.config = c
        self.d, self.k, self.r = c.d, c.k, c.r
        self.variant = {0: "general", 1: "psd", 2: "hyb", 3: "lora"}[c.variant]
        self._check_finite = False
        self.check_finite = check_finite

    @property
    def check_finite(self):
        """Whether forward, backward (``dx`` and the gradients), merge and unmerge scan their
        outputs for NaN/±Inf — the CPU's overflow rule, opt-in on the GPU (default ``False``).
        When on, those calls synchronise and raise :class:`ElraError` ``OVERFLOW`` naming the
        first non-finite output (``elra_gpu_adapter_set_check_finite``)."""
        return self._check_finite

    @check_finite.setter
    def check_finite(self, on):
        check(lib.elra_gpu_adapter_set_check_finite(self._h, 1 if on else 0))
        self._check_finite = bool(on)

    def close(self):
        """Frees the handle (also done on garbage collection)."""
        h, self._h = getattr(self, "_h", None), None
        if h:
            lib.elra_gpu_adapter_destroy(h)

    def __del__(self):
        self.close()

    @property
    def handle(self):
        """The raw ``ElraGpuAdapter *`` (for direct calls through :data:`elra.lib`)."""
        return self._h

    def _act(self, t, rows, cols, name):
        torch = _torch()
        if not isinstance(t, torch.Tensor) or not t.is_cuda or t.device != self.device:
            raise ValueError(f"{name} must be a CUDA tensor on {self.device}")
        if t.dtype != self.dtype or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D {self.dtype} tensor, got {t.dtype} {tuple(t.shape)}")
        if (rows is not None and t.shape[0] != rows) or t.shape[1] != cols:
            raise ValueError(f"{name} must have shape ({rows}, {cols}), got {tuple(t.shape)}")
        return t.contiguous()

    def _new(self, rows, cols):
        return _torch().empty((rows, cols), dtype=self.dtype, device=self.device)

    def param_shape(self, which):
        rows, cols = ctypes.c_size_t(), ctypes.c_size_t()
        check(lib.elra_gpu_adapter_param_shape(
            self._h, _PARAMS[which], ctypes.byref(rows), ctypes.byref(cols)))
        return rows.value, cols.value

    def get(self, which):
        """Parameter ``"A"``, ``"B"`` or ``"eta"`` (η as a float), float32 on the host."""
        shape = self.param_shape(which)
        out = np.empty(shape, dtype=np.float32)
        check(lib.elra_gpu_adapter_get_param(
            self._h, _PARAMS[which], out.ctypes.data_as(_fp), shape[0], shape[1], shape[1]))
        return float(out[0, 0]) if which == "eta" else out

    def set(self, which, value):
        """Sets parameter ``"A"``, ``"B"`` or ``"eta"`` from host values (rounded to float32)."""
        shape = self.param_shape(which)
        v = np.ascontiguousarray(np.reshape(np.asarray(value, dtype=np.float32), shape))
        check(lib.elra_gpu_adapter_set_param(
            self._h, _PARAMS[which], v.ctypes.data_as(_fp), shape[0], shape[1], shape[1]))

    @property
    def step(self):
        s, a = ctypes.c_size_t(), ctypes.c_double()
        check(lib.elra_gpu_adapter_get_step(self._h, ctypes.byref(s), ctypes.byref(a)))
        return s.value

    @step.setter
    def step(self, value):
        check(lib.elra_gpu_adapter_set_step(self._h, value))

    @property
    def alpha(self):
        """α at the current step (eq. 19)."""
        s, a = ctypes.c_size_t(), ctypes.c_double()
        check(lib.elra_gpu_adapter_get_step(self._h, ctypes.byref(s), ctypes.byref(a)))
        return a.value

    def forward(self, x, stream=None):
        """``y = x W_newᵀ`` (n×d) for rows ``x`` (n×k), a new tensor."""
        x = self._act(x, None, self.k, "x")
        n = x.shape[0]
        y = self._new(n, self.d)
        check(lib.elra_gpu_adapter_forward(
            self._h, n, x.data_ptr(), self.k, y.data_ptr(), self.d,
            _stream_handle(stream, self.device, x, y)))
        return y

    def backward(self, x, dy, reuse_forward=False, stream=None):
        """``dx`` for ``L = ⟨forward(x), dy⟩`` (+ λ‖G‖²_F for ELRA); the adapter gradients stay
        in the handle (:meth:`grads`). ``reuse_forward`` reuses the tape of the last
        :meth:`forward` of the same ``x`` instead of recomputing it."""
        x = self._act(x, None, self.k, "x")
        n = x.shape[0]
        dy = self._act(dy, n, self.d, "dy")
        dx = self._new(n, self.k)
        check(lib.elra_gpu_adapter_backward(
            self._h, n, x.data_ptr(), self.k, dy.data_ptr(), self.d, dx.data_ptr(), self.k,
            1 if reuse_forward else 0, _stream_handle(stream, self.device, x, dy, dx)))
        return dx

    def grads(self):
        """``{"dA", "dB" (None for PSD), "deta" (None for LoRA)}`` of the last backward, float32
        host arrays (synchronises the library's stream)."""
        ash = self.param_shape("A")
        da = np.empty(ash, dtype=np.float32)
        has_b = self.variant != "psd"
        db = np.empty(self.param_shape("B"), dtype=np.float32) if has_b else None
        deta = np.zeros(1, dtype=np.float32)
        check(lib.elra_gpu_adapter_get_grads(
            self._h, da.ctypes.data_as(_fp), ash[1],
            db.ctypes.data_as(_fp) if has_b else None, db.shape[1] if has_b else 1,
            deta.ctypes.data_as(_fp)))
        return {"dA": da, "dB": db, "deta": None if self.variant == "lora" else float(deta[0])}

    def merge(self, stream=None):
        """``W_new`` (d×k), a new tensor."""
        w = self._new(self.d, self.k)
        check(lib.elra_gpu_adapter_merge(
            self._h, w.data_ptr(), self.k, _stream_handle(stream, self.device, w)))
        return w

    def unmerge(self, w_new, stream=None):
        """``W0`` recovered from ``w_new`` with the current parameters, a new tensor."""
        w_new = self._act(w_new, self.d, self.k, "w_new")
        out = self._new(self.d, self.k)
        check(lib.elra_gpu_adapter_unmerge(
            self._h, w_new.data_ptr(), self.k, out.data_ptr(), self.k,
            _stream_handle(stream, self.device, w_new, out)))
        return out

    def energy(self):
        """``(‖G‖²_F, λ‖G‖²_F)`` (eq. 20–21)."""
        e, p = ctypes.c_double(), ctypes.c_double()
        check(lib.elra_gpu_adapter_energy(self._h, ctypes.byref(e), ctypes.byref(p)))
        return e.value, p.value

    def synchronize(self):
        """Waits for the library's stream and reports deferred errors (r×r kernel statuses)."""
        check(lib.elra_gpu_adapter_synchronize(self._h))
