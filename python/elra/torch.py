"""ELRA for PyTorch: custom operators with autograd over the functional C ABI (``elra_op_*``),
``ElraLinear``, and PEFT-like model functions (``inject``, ``merge_and_unload``, ``save_adapter``,
``load_adapter``, ``print_trainable_parameters``).

The parameters are ordinary ``nn.Parameter``\\ s (A, B, ``log_eta``) that any torch optimizer
updates and that DDP/FSDP shard or reduce like any other; elra only computes. CPU tensors of
float32 or float64 go through the functional C ABI on host memory (``elra_op_*``); CUDA tensors
(activations float32, float16 or bfloat16; A, B, η float32) through its GPU twin
(``elra_gpu_op_*``, a library built with ``--features cuda``) on torch's current stream, with the
saved values and the workspace allocated by torch. The ops are registered with ``torch.library``
(fake kernels for ``torch.compile``/``opcheck``, autograd formulas from elra's reverse mode).

Three ops carry the computation (all on 2-D row-major tensors), and a fourth serves many adapters
at once (``elra::multi_forward``, :class:`ElraMultiLinear`, inference):

* ``elra::delta(x, w0, a, b, eta, step, dropout, cfg) -> (delta, saved)`` — the increment
  ``Δ(x) = D∘(((x Pᵀ) φ1(Z)ᵀ) Aᵀ)``, ``P = C W0`` (eq. 5 reassociated, Prop. 1). The frozen
  layer ``x W0ᵀ + bias`` stays a plain ``F.linear`` (torch's BLAS), so ``y = linear(x) + delta``.
  What it keeps for backward: ``x`` (which the engine keeps anyway) and ``saved`` = N·r + 2r²
  values — LoRA's activation memory plus two r×r matrices.
* ``elra::rows(u, a, b, eta, step, dropout, cfg) -> (y, saved)`` — the output-side form
  ``y = u + D∘(((u Cᵀ) φ1(Z)ᵀ) Aᵀ)`` for any base layer's output ``u`` (without bias); its backward
  needs ``u`` (N×d).
* ``elra::energy(a, b, eta, step, cfg) -> e`` — ``λ‖G‖²_F`` (eq. 20–21), to add to the loss.

``cfg`` packs the generator config (variant, α schedule, η multiplier, τ, λ); ``step`` is a 0-dim
int64 tensor, so α and the η multiplier of the step (eq. 19, eq. 75, App. H) are computed inside
the op (``elra_schedule_at``) and ``torch.compile(fullgraph=True)`` sees no Python scalar.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import (
    ETA_MULTIPLIERS,
    SCHEDULES,
    VARIANTS,
    Config,
    ElraError,
    check,
    lib,
)

__all__ = [
    "ElraLinear",
    "inject",
    "merge",
    "unmerge",
    "merge_and_unload",
    "advance",
    "energy",
    "save_adapter",
    "load_adapter",
    "print_trainable_parameters",
    "trainable_parameters",
    "layers",
    "saved_bytes",
    "ga_initialise",
    "ElraMultiLinear",
    "inject_multi",
    "set_adapter_index",
    "multi_layers",
]

# ---------------------------------------------------------------------------------------------
# The functional C ABI
# ---------------------------------------------------------------------------------------------


class OpDesc(ctypes.Structure):
    """``ElraOpDesc`` of ``elra.h``."""

    _fields_ = [("variant", ctypes.c_uint32), ("d", ctypes.c_size_t), ("k", ctypes.c_size_t),
                ("r", ctypes.c_size_t)]


class OpStep(ctypes.Structure):
    """``ElraOpStep`` of ``elra.h``."""

    _fields_ = [("alpha", ctypes.c_double), ("eta_mult", ctypes.c_double),
                ("tau", ctypes.c_double), ("lambda_", ctypes.c_double)]


_sz = ctypes.c_size_t
_u32 = ctypes.c_uint32
_vp = ctypes.c_void_p
_pdesc = ctypes.POINTER(OpDesc)
_pstep = ctypes.POINTER(OpStep)
lib.elra_schedule_at.argtypes = [ctypes.POINTER(Config), _sz, _pstep]
lib.elra_op_sizes.argtypes = [_pdesc, _sz, ctypes.POINTER(_sz), ctypes.POINTER(_sz)]
_SCALAR = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
for _dt, _sx in _SUFFIX.items():
    _s = _SCALAR[_dt]
    getattr(lib, f"elra_op_forward_{_sx}").argtypes = (
        [_pdesc, _pstep, _sz, _vp, _sz, _u32, _vp, _vp, _sz, _vp, _sz, _s, _vp, _sz, _vp, _vp, _sz,
         _vp, _vp, _sz])
    getattr(lib, f"elra_op_backward_{_sx}").argtypes = (
        [_pdesc, _pstep, _sz, _vp, _sz, _u32, _vp, _sz, _vp, _sz, _s, _vp, _sz, _vp, _vp, _vp, _sz,
         _vp, _sz, _vp, _sz, _vp, _sz, _vp, _u32, _vp, _sz])
    getattr(lib, f"elra_op_forward_out_{_sx}").argtypes = (
        [_pdesc, _pstep, _sz, _vp, _sz, _vp, _sz, _s, _vp, _sz, _vp, _vp, _sz, _vp, _vp, _sz])
    getattr(lib, f"elra_op_backward_out_{_sx}").argtypes = (
        [_pdesc, _pstep, _sz, _vp, _sz, _vp, _sz, _s, _vp, _sz, _vp, _vp, _vp, _sz, _vp, _sz, _vp,
         _sz, _vp, _sz, _vp, _u32, _vp, _sz])
    getattr(lib, f"elra_op_merge_{_sx}").argtypes = (
        [_pdesc, _pstep, _vp, _sz, _vp, _sz, _s, _vp, _sz, _u32, _u32, _vp, _sz])
    getattr(lib, f"elra_op_energy_{_sx}").argtypes = (
        [_pdesc, _pstep, _vp, _sz, _vp, _sz, _s, _vp, _vp, _sz, _vp, _sz, _vp, _u32])


class MultiAdapterDesc(ctypes.Structure):
    """``ElraMultiAdapter`` of ``elra.h``."""

    _fields_ = [("variant", ctypes.c_uint32), ("r", ctypes.c_size_t), ("a", ctypes.c_void_p),
                ("ld_a", ctypes.c_size_t), ("b", ctypes.c_void_p), ("ld_b", ctypes.c_size_t),
                ("eta", ctypes.c_double), ("step", OpStep)]


lib.elra_op_multi_workspace.argtypes = [_sz, _sz, _sz, _sz, ctypes.POINTER(_sz)]
lib.elra_op_multi_workspace.restype = ctypes.c_int
for _sx in ("f32", "f64"):
    _f = getattr(lib, f"elra_op_multi_forward_{_sx}")
    _f.argtypes = [ctypes.POINTER(MultiAdapterDesc), _sz, _vp, _sz, _vp, _sz, _sz, _sz, _vp, _vp,
                   _sz, _vp, _sz, _vp, _sz]
    _f.restype = ctypes.c_int
for _f in ["elra_schedule_at", "elra_op_sizes"] + [
    f"elra_op_{op}_{sx}" for op in ["forward", "backward", "forward_out", "backward_out", "merge",
                                    "energy"] for sx in ("f32", "f64")
]:
    getattr(lib, _f).restype = ctypes.c_int

#: Positions in the packed generator config ``cfg`` (a list of floats) of the ops.
_CFG = ["variant", "schedule", "warmup_steps", "gamma", "alpha", "eta_multiplier", "total_steps",
        "tau", "lambda_"]


def _config(cfg: Sequence[float], d: int, k: int, r: int) -> Config:
    c = Config()
    c.variant = int(cfg[0])
    c.dtype = 1
    c.d, c.k, c.r = d, k, r
    c.eta = 1.0
    c.schedule = int(cfg[1])
    c.warmup_steps = int(cfg[2])
    c.gamma = float(cfg[3])
    c.alpha = float(cfg[4])
    c.eta_multiplier = int(cfg[5])
    c.total_steps = int(cfg[6])
    c.tau = float(cfg[7])
    c.lambda_ = float(cfg[8])
    c.lora_alpha = float(r)
    return c


def _step(cfg: Sequence[float], step: Tensor, d: int, k: int, r: int) -> OpStep:
    """α, η multiplier, τ, λ of the step (``elra_schedule_at``)."""
    out = OpStep()
    t = int(step)
    if t < 0:
        raise ValueError(f"elra: `step` must be ≥ 0, got {t}")
    check(lib.elra_schedule_at(ctypes.byref(_config(cfg, d, k, r)), t, ctypes.byref(out)))
    return out


def _p(t: Optional[Tensor]):
    return None if t is None else t.data_ptr()


def _check(name: str, t: Tensor, dtype=None, shape=None, ndim=None, device=None):
    """Bad input is a Python exception naming the argument (before any memory is touched).
    ``device`` ``None``: a CPU tensor of float32 or float64 (the host ABI); a CUDA device: a
    tensor on it, of ``dtype`` or, with ``dtype`` ``None``, any activation type of the GPU calls."""
    if not isinstance(t, Tensor):
        raise TypeError(f"elra: `{name}` must be a tensor, got {type(t).__name__}")
    gpu = device is not None
    if gpu and t.device != device:
        raise ValueError(f"elra: `{name}` is on {t.device}, expected {device} (as the input)")
    if not gpu and t.device.type != "cpu":
        raise ValueError(f"elra: `{name}` is on {t.device}, expected cpu (as the input; CUDA "
                         "inputs take every tensor on their device)")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"elra: `{name}` has dtype {t.dtype}, expected {dtype}" + (
            " on the GPU (A, B, η, gradients and saved values are float32)" if gpu else ""))
    if gpu and dtype is None and t.dtype not in _GPU_DTYPES:
        raise TypeError(f"elra: `{name}` has dtype {t.dtype}; on the GPU activations are "
                        "float32, float16 or bfloat16")
    if not gpu and t.dtype not in _SUFFIX:
        raise TypeError(f"elra: `{name}` has dtype {t.dtype}; ELRA runs in float32 or float64")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"elra: `{name}` must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"elra: `{name}` must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _desc(cfg, d, k, r):
    return OpDesc(int(cfg[0]), d, k, r)


def _sizes(desc: OpDesc, n: int):
    s, w = _sz(), _sz()
    check(lib.elra_op_sizes(ctypes.byref(desc), n, ctypes.byref(s), ctypes.byref(w)))
    return s.value, w.value


def _saved_len(n, r):
    return n * r + 2 * r * r


def _inputs(x, a, b, eta, dropout, cfg, x_name):
    _check(x_name, x, ndim=2)
    dt = x.dtype
    _check("a", a, dt, ndim=2)
    d, r = a.shape
    has_b = int(cfg[0]) != VARIANTS["psd"]
    if has_b:
        if b is None:
            raise ValueError(f"elra: `b` is required by variant {int(cfg[0])} (general or hyb)")
        _check("b", b, dt, (r, d))
    _check("eta", eta, dt, ())
    if dropout is not None:
        _check("dropout", dropout, dt, (x.shape[0], d))
    return dt, d, r, has_b


# ---------------------------------------------------------------------------------------------
# CUDA tensors: the functional GPU ABI (elra_gpu_op_*)
# ---------------------------------------------------------------------------------------------

#: ``ElraGpuDtype`` of the activation types the GPU calls take.
_GPU_DTYPES = {torch.float32: 0, torch.float16: 2, torch.bfloat16: 3}
_F32 = torch.float32


def _gpu():
    """The library with its GPU calls declared; a clear error when it lacks them."""
    from . import gpu

    gpu._declare()  # raises ElraError NO_DEVICE for a library built without `--features cuda`
    return lib


def _gpu_inputs(x, a, b, eta, dropout, cfg, x_name):
    """Checks the CUDA path's inputs; ``(activation dtype, d, r, has_b)``."""
    dev = x.device
    _check(x_name, x, None, None, 2, dev)
    _check("a", a, _F32, None, 2, dev)
    d, r = a.shape
    has_b = int(cfg[0]) != VARIANTS["psd"]
    if has_b:
        if b is None:
            raise ValueError(f"elra: `b` is required by variant {int(cfg[0])} (general or hyb)")
        _check("b", b, _F32, (r, d), None, dev)
    _check("eta", eta, _F32, (), None, dev)
    if dropout is not None:
        raise ValueError("elra: `dropout` masks are not taken by the GPU calls (ElraLinear "
                         "applies adapter dropout outside the op on CUDA tensors)")
    return x.dtype, d, r, has_b


def _gpu_sizes(desc: OpDesc, n: int):
    s, w = _sz(), _sz()
    check(_gpu().elra_gpu_op_sizes(ctypes.byref(desc), n, ctypes.byref(s), ctypes.byref(w)))
    return s.value, w.value


def _stream(t: Tensor) -> int:
    """torch's current stream on ``t``'s device (the GPU calls are ordered on it)."""
    return torch.cuda.current_stream(t.device).cuda_stream


def _empty(shape, dtype, like: Tensor) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=like.device)


def _delta_cuda(x, w0, a, b, eta, step, dropout, cfg):
    dt, d, r, has_b = _gpu_inputs(x, a, b, eta, dropout, cfg, "x")
    n, k = x.shape
    _check("w0", w0, dt, (d, k), None, x.device)
    x, w0, a, eta = x.contiguous(), w0.contiguous(), a.contiguous(), eta.contiguous()
    b = b.contiguous() if has_b else None
    desc = _desc(cfg, d, k, r)
    sl, wl = _gpu_sizes(desc, n)
    st = _step(cfg, step, d, k, r)
    y, saved, ws = _empty((n, d), dt, x), _empty((sl,), _F32, x), _empty((wl,), _F32, x)
    check(_gpu().elra_gpu_op_forward(
        ctypes.byref(desc), ctypes.byref(st), _GPU_DTYPES[dt], n, w0.data_ptr(), k, 0, None,
        a.data_ptr(), r, _p(b), d, eta.data_ptr(), x.data_ptr(), k, y.data_ptr(), d,
        saved.data_ptr(), ws.data_ptr(), wl, _stream(x)))
    return y, saved


def _delta_backward_cuda(dy, x, w0, a, b, eta, step, dropout, saved, cfg):
    dt, d, r, has_b = _gpu_inputs(x, a, b, eta, dropout, cfg, "x")
    n, k = x.shape
    _check("w0", w0, dt, (d, k), None, x.device)
    _check("dy", dy, dt, (n, d), None, x.device)
    desc = _desc(cfg, d, k, r)
    sl, wl = _gpu_sizes(desc, n)
    _check("saved", saved, _F32, (sl,), None, x.device)
    dy, x, w0, a = dy.contiguous(), x.contiguous(), w0.contiguous(), a.contiguous()
    eta, saved = eta.contiguous(), saved.contiguous()
    b = b.contiguous() if has_b else None
    st = _step(cfg, step, d, k, r)
    dx, da, ws = _empty((n, k), dt, x), _empty((d, r), _F32, x), _empty((wl,), _F32, x)
    db = _empty((r, d), _F32, x) if has_b else a.new_empty((0,))
    deta = _empty((), _F32, x)
    check(_gpu().elra_gpu_op_backward(
        ctypes.byref(desc), ctypes.byref(st), _GPU_DTYPES[dt], n, w0.data_ptr(), k, 0,
        a.data_ptr(), r, _p(b), d, eta.data_ptr(), x.data_ptr(), k, saved.data_ptr(),
        dy.data_ptr(), d, dx.data_ptr(), k, da.data_ptr(), r, _p(db) if has_b else None, d,
        deta.data_ptr(), 0, ws.data_ptr(), wl, _stream(x)))
    return dx, da, db, deta


def _rows_cuda(u, a, b, eta, step, dropout, cfg):
    dt, d, r, has_b = _gpu_inputs(u, a, b, eta, dropout, cfg, "u")
    n = u.shape[0]
    _check("u", u, dt, (n, d), None, u.device)
    u, a, eta = u.contiguous(), a.contiguous(), eta.contiguous()
    b = b.contiguous() if has_b else None
    desc = _desc(cfg, d, d, r)
    sl, wl = _gpu_sizes(desc, n)
    st = _step(cfg, step, d, d, r)
    y, saved, ws = _empty((n, d), dt, u), _empty((sl,), _F32, u), _empty((wl,), _F32, u)
    check(_gpu().elra_gpu_op_forward_out(
        ctypes.byref(desc), ctypes.byref(st), _GPU_DTYPES[dt], n, a.data_ptr(), r, _p(b), d,
        eta.data_ptr(), u.data_ptr(), d, y.data_ptr(), d, saved.data_ptr(), ws.data_ptr(), wl,
        _stream(u)))
    return y, saved


def _rows_backward_cuda(dy, u, a, b, eta, step, dropout, saved, cfg):
    dt, d, r, has_b = _gpu_inputs(u, a, b, eta, dropout, cfg, "u")
    n = u.shape[0]
    _check("u", u, dt, (n, d), None, u.device)
    _check("dy", dy, dt, (n, d), None, u.device)
    desc = _desc(cfg, d, d, r)
    sl, wl = _gpu_sizes(desc, n)
    _check("saved", saved, _F32, (sl,), None, u.device)
    dy, u, a, eta, saved = dy.contiguous(), u.contiguous(), a.contiguous(), eta.contiguous(), \
        saved.contiguous()
    b = b.contiguous() if has_b else None
    st = _step(cfg, step, d, d, r)
    du, da, ws = _empty((n, d), dt, u), _empty((d, r), _F32, u), _empty((wl,), _F32, u)
    db = _empty((r, d), _F32, u) if has_b else a.new_empty((0,))
    deta = _empty((), _F32, u)
    check(_gpu().elra_gpu_op_backward_out(
        ctypes.byref(desc), ctypes.byref(st), _GPU_DTYPES[dt], n, a.data_ptr(), r, _p(b), d,
        eta.data_ptr(), u.data_ptr(), d, saved.data_ptr(), dy.data_ptr(), d, du.data_ptr(), d,
        da.data_ptr(), r, _p(db) if has_b else None, d, deta.data_ptr(), 0, ws.data_ptr(), wl,
        _stream(u)))
    return du, da, db, deta


def _energy_cuda(a, b, eta, step, cfg, grads: bool):
    """``λ‖G‖²_F`` and, with ``grads``, its gradients ``(e, da, db, deta)`` on the GPU."""
    _, d, r, has_b = _gpu_inputs(a, a, b, eta, None, cfg, "a")
    a, eta = a.contiguous(), eta.contiguous()
    b = b.contiguous() if has_b else None
    desc = _desc(cfg, d, d, r)
    _, wl = _gpu_sizes(desc, 1)
    st = _step(cfg, step, d, d, r)
    e, ws = _empty((), _F32, a), _empty((wl,), _F32, a)
    da = _empty((d, r), _F32, a) if grads else None
    db = (_empty((r, d), _F32, a) if has_b else a.new_empty((0,))) if grads else None
    deta = _empty((), _F32, a) if grads else None
    check(_gpu().elra_gpu_op_energy(
        ctypes.byref(desc), ctypes.byref(st), a.data_ptr(), r, _p(b), d, eta.data_ptr(),
        e.data_ptr(), _p(da), r, _p(db) if grads and has_b else None, d, _p(deta), 0,
        ws.data_ptr(), wl, _stream(a)))
    return e, da, db, deta


@torch.library.custom_op("elra::delta", mutates_args=())
def delta(x: Tensor, w0: Tensor, a: Tensor, b: Optional[Tensor], eta: Tensor, step: Tensor,
          dropout: Optional[Tensor], cfg: List[float]) -> Tuple[Tensor, Tensor]:
    """The adapter's increment ``Δ(x) = D∘(((x Pᵀ) φ1(Z)ᵀ) Aᵀ)`` of the fused layer (eq. 5 with
    ``P = C W0``; ``elra_op_forward`` with ``base = 0``) and the values its backward needs."""
    if x.is_cuda:
        return _delta_cuda(x, w0, a, b, eta, step, dropout, cfg)
    dt, d, r, has_b = _inputs(x, a, b, eta, dropout, cfg, "x")
    n, k = x.shape
    _check("w0", w0, dt, (d, k))
    x, w0, a = x.contiguous(), w0.contiguous(), a.contiguous()
    b = b.contiguous() if has_b else None
    dropout = dropout.contiguous() if dropout is not None else None
    desc = _desc(cfg, d, k, r)
    sl, wl = _sizes(desc, n)
    st = _step(cfg, step, d, k, r)
    y = x.new_empty((n, d))
    saved = x.new_empty((sl,))
    ws = x.new_empty((wl,))
    check(getattr(lib, f"elra_op_forward_{_SUFFIX[dt]}")(
        ctypes.byref(desc), ctypes.byref(st), n, w0.data_ptr(), k, 0, None, a.data_ptr(), r,
        _p(b), d, float(eta), x.data_ptr(), k, _p(dropout), y.data_ptr(), d, saved.data_ptr(),
        ws.data_ptr(), wl))
    return y, saved


def _saved_dtype(x: Tensor):
    """The saved values' dtype: the activations' on the CPU, float32 on the GPU."""
    return _F32 if x.device.type == "cuda" else x.dtype


@delta.register_fake
def _(x, w0, a, b, eta, step, dropout, cfg):
    n = x.shape[0]
    d, r = a.shape
    return x.new_empty((n, d)), x.new_empty((_saved_len(n, r),), dtype=_saved_dtype(x))


@torch.library.custom_op("elra::delta_backward", mutates_args=())
def delta_backward(dy: Tensor, x: Tensor, w0: Tensor, a: Tensor, b: Optional[Tensor], eta: Tensor,
                   step: Tensor, dropout: Optional[Tensor], saved: Tensor,
                   cfg: List[float]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reverse mode of :func:`delta` (``elra_op_backward`` with ``base = 0``): ``(dx, da, db,
    deta)``; ``db`` is empty for PSD."""
    if x.is_cuda:
        return _delta_backward_cuda(dy, x, w0, a, b, eta, step, dropout, saved, cfg)
    dt, d, r, has_b = _inputs(x, a, b, eta, dropout, cfg, "x")
    n, k = x.shape
    _check("dy", dy, dt, (n, d))
    _check("saved", saved, dt, (_saved_len(n, r),))
    dy, x, w0, a, saved = dy.contiguous(), x.contiguous(), w0.contiguous(), a.contiguous(), saved.contiguous()
    b = b.contiguous() if has_b else None
    dropout = dropout.contiguous() if dropout is not None else None
    desc = _desc(cfg, d, k, r)
    _, wl = _sizes(desc, n)
    st = _step(cfg, step, d, k, r)
    dx = x.new_empty((n, k))
    da = a.new_empty((d, r))
    db = a.new_empty((r, d)) if has_b else a.new_empty((0,))
    deta = a.new_zeros(())
    ws = x.new_empty((wl,))
    check(getattr(lib, f"elra_op_backward_{_SUFFIX[dt]}")(
        ctypes.byref(desc), ctypes.byref(st), n, w0.data_ptr(), k, 0, a.data_ptr(), r, _p(b), d,
        float(eta), x.data_ptr(), k, _p(dropout), saved.data_ptr(), dy.data_ptr(), d,
        dx.data_ptr(), k, da.data_ptr(), r, _p(db) if has_b else None, d, deta.data_ptr(), 0,
        ws.data_ptr(), wl))
    return dx, da, db, deta


@delta_backward.register_fake
def _(dy, x, w0, a, b, eta, step, dropout, saved, cfg):
    return (x.new_empty(x.shape), a.new_empty(a.shape),
            b.new_empty(b.shape) if b is not None else a.new_empty((0,)), eta.new_empty(()))


def _delta_setup(ctx, inputs, output):
    x, w0, a, b, eta, step, dropout, cfg = inputs
    ctx.save_for_backward(x, w0, a, b, eta, step, dropout, output[1])
    ctx.cfg = cfg
    ctx.mark_non_differentiable(output[1])


def _delta_grad(ctx, dy, _dsaved):
    x, w0, a, b, eta, step, dropout, saved = ctx.saved_tensors
    dx, da, db, deta = torch.ops.elra.delta_backward(dy, x, w0, a, b, eta, step, dropout, saved,
                                                     ctx.cfg)
    return dx, None, da, (db if b is not None else None), deta, None, None, None


torch.library.register_autograd("elra::delta", _delta_grad, setup_context=_delta_setup)


@torch.library.custom_op("elra::rows", mutates_args=())
def rows(u: Tensor, a: Tensor, b: Optional[Tensor], eta: Tensor, step: Tensor,
         dropout: Optional[Tensor], cfg: List[float]) -> Tuple[Tensor, Tensor]:
    """The output-side form ``y = u + D∘(((u Cᵀ) φ1(Z)ᵀ) Aᵀ)`` (``elra_op_forward_out``) for a
    base layer's output ``u`` (N×d, without bias): ELRA around any base layer."""
    if u.is_cuda:
        return _rows_cuda(u, a, b, eta, step, dropout, cfg)
    dt, d, r, has_b = _inputs(u, a, b, eta, dropout, cfg, "u")
    n = u.shape[0]
    _check("u", u, dt, (n, d))
    u, a = u.contiguous(), a.contiguous()
    b = b.contiguous() if has_b else None
    dropout = dropout.contiguous() if dropout is not None else None
    desc = _desc(cfg, d, d, r)
    sl, wl = _sizes(desc, n)
    st = _step(cfg, step, d, d, r)
    y = u.new_empty((n, d))
    saved = u.new_empty((sl,))
    ws = u.new_empty((wl,))
    check(getattr(lib, f"elra_op_forward_out_{_SUFFIX[dt]}")(
        ctypes.byref(desc), ctypes.byref(st), n, a.data_ptr(), r, _p(b), d, float(eta),
        u.data_ptr(), d, _p(dropout), y.data_ptr(), d, saved.data_ptr(), ws.data_ptr(), wl))
    return y, saved


@rows.register_fake
def _(u, a, b, eta, step, dropout, cfg):
    n = u.shape[0]
    return u.new_empty(u.shape), u.new_empty((_saved_len(n, a.shape[1]),), dtype=_saved_dtype(u))


@torch.library.custom_op("elra::rows_backward", mutates_args=())
def rows_backward(dy: Tensor, u: Tensor, a: Tensor, b: Optional[Tensor], eta: Tensor, step: Tensor,
                  dropout: Optional[Tensor], saved: Tensor,
                  cfg: List[float]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reverse mode of :func:`rows` (``elra_op_backward_out``): ``(du, da, db, deta)``."""
    if u.is_cuda:
        return _rows_backward_cuda(dy, u, a, b, eta, step, dropout, saved, cfg)
    dt, d, r, has_b = _inputs(u, a, b, eta, dropout, cfg, "u")
    n = u.shape[0]
    _check("dy", dy, dt, (n, d))
    _check("saved", saved, dt, (_saved_len(n, r),))
    dy, u, a, saved = dy.contiguous(), u.contiguous(), a.contiguous(), saved.contiguous()
    b = b.contiguous() if has_b else None
    dropout = dropout.contiguous() if dropout is not None else None
    desc = _desc(cfg, d, d, r)
    _, wl = _sizes(desc, n)
    st = _step(cfg, step, d, d, r)
    du = u.new_empty((n, d))
    da = a.new_empty((d, r))
    db = a.new_empty((r, d)) if has_b else a.new_empty((0,))
    deta = a.new_zeros(())
    ws = u.new_empty((wl,))
    check(getattr(lib, f"elra_op_backward_out_{_SUFFIX[dt]}")(
        ctypes.byref(desc), ctypes.byref(st), n, a.data_ptr(), r, _p(b), d, float(eta),
        u.data_ptr(), d, _p(dropout), saved.data_ptr(), dy.data_ptr(), d, du.data_ptr(), d,
        da.data_ptr(), r, _p(db) if has_b else None, d, deta.data_ptr(), 0, ws.data_ptr(), wl))
    return du, da, db, deta


@rows_backward.register_fake
def _(dy, u, a, b, eta, step, dropout, saved, cfg):
    return (u.new_empty(u.shape), a.new_empty(a.shape),
            b.new_empty(b.shape) if b is not None else a.new_empty((0,)), eta.new_empty(()))


def _rows_setup(ctx, inputs, output):
    u, a, b, eta, step, dropout, cfg = inputs
    ctx.save_for_backward(u, a, b, eta, step, dropout, output[1])
    ctx.cfg = cfg
    ctx.mark_non_differentiable(output[1])


def _rows_grad(ctx, dy, _dsaved):
    u, a, b, eta, step, dropout, saved = ctx.saved_tensors
    du, da, db, deta = torch.ops.elra.rows_backward(dy, u, a, b, eta, step, dropout, saved, ctx.cfg)
    return du, da, (db if b is not None else None), deta, None, None, None


torch.library.register_autograd("elra::rows", _rows_grad, setup_context=_rows_setup)


@torch.library.custom_op("elra::energy", mutates_args=())
def energy_op(a: Tensor, b: Optional[Tensor], eta: Tensor, step: Tensor, cfg: List[float]) -> Tensor:
    """The penalty ``λ‖G‖²_F`` of the step's generator (eq. 20–21, ``elra_op_energy``)."""
    if a.is_cuda:
        return _energy_cuda(a, b, eta, step, cfg, grads=False)[0]
    dt, d, r, has_b = _inputs(a, a, b, eta, None, cfg, "a")
    a = a.contiguous()
    b = b.contiguous() if has_b else None
    desc = _desc(cfg, d, d, r)
    st = _step(cfg, step, d, d, r)
    e = a.new_zeros(())
    check(getattr(lib, f"elra_op_energy_{_SUFFIX[dt]}")(
        ctypes.byref(desc), ctypes.byref(st), a.data_ptr(), r, _p(b), d, float(eta),
        e.data_ptr(), None, r, None, d, None, 0))
    return e


@energy_op.register_fake
def _(a, b, eta, step, cfg):
    return a.new_empty(())


@torch.library.custom_op("elra::energy_backward", mutates_args=())
def energy_backward(de: Tensor, a: Tensor, b: Optional[Tensor], eta: Tensor, step: Tensor,
                    cfg: List[float]) -> Tuple[Tensor, Tensor, Tensor]:
    """``de · ∂(λ‖G‖²_F)/∂(A, B, η)`` (``elra_op_energy``)."""
    if a.is_cuda:
        _, da, db, deta = _energy_cuda(a, b, eta, step, cfg, grads=True)
        return da * de, db * de, deta * de
    dt, d, r, has_b = _inputs(a, a, b, eta, None, cfg, "a")
    a = a.contiguous()
    b = b.contiguous() if has_b else None
    desc = _desc(cfg, d, d, r)
    st = _step(cfg, step, d, d, r)
    e = a.new_zeros(())
    da = a.new_empty((d, r))
    db = a.new_empty((r, d)) if has_b else a.new_empty((0,))
    deta = a.new_zeros(())
    check(getattr(lib, f"elra_op_energy_{_SUFFIX[dt]}")(
        ctypes.byref(desc), ctypes.byref(st), a.data_ptr(), r, _p(b), d, float(eta),
        e.data_ptr(), da.data_ptr(), r, _p(db) if has_b else None, d, deta.data_ptr(), 0))
    return da * de, db * de, deta * de


@energy_backward.register_fake
def _(de, a, b, eta, step, cfg):
    return (a.new_empty(a.shape), b.new_empty(b.shape) if b is not None else a.new_empty((0,)),
            eta.new_empty(()))


def _energy_setup(ctx, inputs, output):
    a, b, eta, step, cfg = inputs
    ctx.save_for_backward(a, b, eta, step)
    ctx.cfg = cfg


def _energy_grad(ctx, de):
    a, b, eta, step = ctx.saved_tensors
    da, db, deta = torch.ops.elra.energy_backward(de, a, b, eta, step, ctx.cfg)
    return da, (db if b is not None else None), deta, None, None


torch.library.register_autograd("elra::energy", _energy_grad, setup_context=_energy_setup)


def _merged(w: Tensor, a: Tensor, b: Optional[Tensor], eta: Tensor, step: Tensor, cfg,
            inverse: bool, right: bool = False) -> Tensor:
    """``exp(±G) w`` (merge, eq. 30 / unmerge, Prop. 3), or ``w exp(±G)`` with ``right``
    (App. B), through ``elra_op_merge``."""
    rows_, cols = w.shape
    n, r = a.shape
    dt = w.dtype
    has_b = int(cfg[0]) != VARIANTS["psd"]
    if w.is_cuda:
        if (cols if right else rows_) != n:
            raise ValueError(f"elra: the weight is {rows_}×{cols}; the generator acts on {n} "
                             f"{'columns' if right else 'rows'}")
        w = w.contiguous()
        a = a.detach().to(device=w.device, dtype=_F32).contiguous()
        b = b.detach().to(device=w.device, dtype=_F32).contiguous() if has_b else None
        eta = eta.detach().to(device=w.device, dtype=_F32).reshape(()).contiguous()
        other = rows_ if right else cols
        desc = _desc(cfg, n, other, r)
        _, wl = _gpu_sizes(desc, 1)
        st = _step(cfg, step, n, other, r)
        out, ws = torch.empty_like(w), _empty((wl,), _F32, w)
        check(_gpu().elra_gpu_op_merge(
            ctypes.byref(desc), ctypes.byref(st), _GPU_DTYPES[dt], a.data_ptr(), r, _p(b), n,
            eta.data_ptr(), w.data_ptr(), cols, int(inverse), int(right), out.data_ptr(), cols,
            ws.data_ptr(), wl, _stream(w)))
        return out
    w, a = w.contiguous(), a.detach().to(dt).contiguous()
    b = b.detach().to(dt).contiguous() if has_b else None
    other = rows_ if right else cols
    desc = _desc(cfg, n, other, r)
    st = _step(cfg, step, n, other, r)
    out = torch.empty_like(w)
    check(getattr(lib, f"elra_op_merge_{_SUFFIX[dt]}")(
        ctypes.byref(desc), ctypes.byref(st), a.data_ptr(), r, _p(b), n, float(eta), w.data_ptr(),
        cols, int(inverse), int(right), out.data_ptr(), cols))
    return out


# ---------------------------------------------------------------------------------------------
# ElraLinear
# ---------------------------------------------------------------------------------------------

_VARIANTS = ("general", "psd", "hyb", "hyb-ga", "double", "lora")


def _xavier(rows: int, cols: int, g: torch.Generator, dtype) -> Tensor:
    bound = math.sqrt(6.0 / (rows + cols))
    return (torch.rand((rows, cols), generator=g, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)


class ElraLinear(nn.Module):
    """A frozen ``nn.Linear`` (or any layer with an output of ``out_features``) adapted by ELRA,
    ``W_new = exp(G) W0`` (eq. 3), or by LoRA.

    ``variant``: ``"general"`` (G = ηAB, eq. 2), ``"psd"`` (G = ηAAᵀ, §4.2.1), ``"hyb"``
    (eq. 19, α from 1 to 0), ``"hyb-ga"`` (Hyb whose A, B :func:`ga_initialise` seeds from the
    frozen layer's gradient, App. H), ``"double"`` (``exp(L) W0 exp(R)``, App. B) or ``"lora"``
    (PEFT's ``W0 + (lora_alpha/r) B A`` with dropout on the input).

    Trainable: ``A`` (d×r), ``B`` (r×d; not for PSD), ``log_eta`` (η = exp(log η) > 0, eq. 2) —
    ``*_right`` too for ``"double"``; ``lora_A``, ``lora_B`` for LoRA. The optimiser step that
    drives α (eq. 75) and the η multiplier (App. H) is the buffer ``step``; :func:`advance`
    moves every layer of a model by one. ``dropout`` (App. H: p = 0.05) drops entries of the
    adapter's increment in training mode. The energy ``λ‖G‖²_F`` is :meth:`energy` (add it to
    the loss; :func:`energy` sums a model's).

    An ``nn.Linear`` base uses the fused increment (``elra::delta``: saves LoRA's activation
    memory); any other base (a quantised or tensor-parallel linear) the output-side form
    (``elra::rows``: saves the base output too).
    """

    def __init__(self, base: nn.Module, variant: str = "hyb", r: int = 8, *, eta: float = 1e-3,
                 lambda_: float = 1e-5, tau: Optional[float] = None,
                 schedule: str = "exponential", warmup_fraction: float = 0.25, gamma: float = 5.0,
                 alpha: float = 0.0, total_steps: int = 1000, eta_multiplier: str = "cosine",
                 dropout: float = 0.0, lora_alpha: Optional[float] = None, seed: int = 0,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        if variant not in _VARIANTS:
            raise ValueError(f"elra: `variant` must be one of {_VARIANTS}, got {variant!r}")
        weight = getattr(base, "weight", None)
        out_features = getattr(base, "out_features", None)
        in_features = getattr(base, "in_features", None)
        if out_features is None or in_features is None:
            raise TypeError("elra: `base` needs `in_features` and `out_features` (a linear layer)")
        if not (0 <= dropout < 1):
            raise ValueError(f"elra: `dropout` must lie in [0, 1), got {dropout}")
        d, k = int(out_features), int(in_features)
        if not 1 <= r <= (min(d, k) if variant in ("double", "lora") else d):
            raise ValueError(f"elra: `r` = {r} is out of range for a {d}×{k} layer")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.variant, self.r, self.d, self.k = variant, r, d, k
        self.eta0 = eta
        self.dropout = dropout
        self.fused = isinstance(base, nn.Linear)
        if dtype is not None and dtype not in _SUFFIX:
            raise TypeError(f"elra: `dtype` must be torch.float32 or torch.float64, got {dtype}")
        dtype = dtype or (weight.dtype if isinstance(weight, Tensor) and weight.dtype in _SUFFIX
                          else torch.float32)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.merged = False
        self._ga_probe = None
        self._ga_zero = None
        if variant == "lora":
            self.scaling = (lora_alpha if lora_alpha is not None else r) / r
            bound = 1.0 / math.sqrt(k)
            self.lora_A = nn.Parameter((torch.rand((r, k), generator=g, dtype=torch.float64) * 2 - 1)
                                       .mul_(bound).to(dtype))
            self.lora_B = nn.Parameter(torch.zeros((d, r), dtype=dtype))
            return
        for arg, value, names in (("schedule", schedule, SCHEDULES),
                                  ("eta_multiplier", eta_multiplier, ETA_MULTIPLIERS)):
            if value not in names:
                raise ValueError(f"elra: `{arg}` must be one of {sorted(names)}, got {value!r}")
        gv = "hyb" if variant in ("hyb", "hyb-ga", "double") else variant
        warmup = round(total_steps * warmup_fraction)
        self.cfg = [float(VARIANTS[gv]), float(SCHEDULES[schedule]), float(warmup), float(gamma),
                    float(alpha), float(ETA_MULTIPLIERS[eta_multiplier]), float(total_steps),
                    float(tau or 0.0), float(lambda_)]
        # Validate the config once through the C ABI (the one validation of elra).
        _step(self.cfg, torch.zeros((), dtype=torch.long), d, k, r)
        self.A = nn.Parameter(_xavier(d, r, g, dtype))
        self.B = nn.Parameter(_xavier(r, d, g, dtype)) if gv != "psd" else None
        self.log_eta = nn.Parameter(torch.tensor(math.log(eta), dtype=dtype))
        if variant == "double":
            self.A_right = nn.Parameter(_xavier(k, r, g, dtype))
            self.B_right = nn.Parameter(_xavier(r, k, g, dtype))
            self.log_eta_right = nn.Parameter(torch.tensor(math.log(eta), dtype=dtype))

    def extra_repr(self) -> str:
        return f"variant={self.variant}, r={self.r}, d={self.d}, k={self.k}, dropout={self.dropout}"

    def _mask(self, n: int, x: Tensor) -> Optional[Tensor]:
        if not self.training or self.dropout == 0:
            return None
        keep = 1.0 - self.dropout
        return torch.bernoulli(torch.full((n, self.d), keep, dtype=x.dtype)) / keep

    def _linear(self, x: Tensor, bias: bool = True) -> Tensor:
        b = self.base.bias if bias and isinstance(self.base, nn.Linear) else None
        if isinstance(self.base, nn.Linear):
            return F.linear(x, self.base.weight.to(x.dtype), None if b is None else b.to(x.dtype))
        y = self.base(x)
        base_bias = getattr(self.base, "bias", None)
        if not bias and base_bias is not None:
            y = y - base_bias.to(y.dtype)
        return y

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        shape = x.shape
        if shape[-1] != self.k:
            raise ValueError(f"elra: `x` must have {self.k} features in its last dimension, "
                             f"got shape {tuple(shape)}")
        param = self.lora_A if self.variant == "lora" else self.A
        cuda = x.is_cuda
        if x.device != param.device:
            raise ValueError(f"elra: `x` is on {x.device}, the adapter on {param.device}")
        if cuda and self.variant != "lora" and param.dtype != _F32:
            raise TypeError(f"elra: on the GPU the adapter's parameters are float32 (master "
                            f"weights), got {param.dtype}: create it with dtype=torch.float32")
        if cuda and x.dtype not in _GPU_DTYPES:
            raise TypeError(f"elra: `x` has dtype {x.dtype}; on the GPU activations are float32, "
                            "float16 or bfloat16")
        if not cuda and x.dtype != param.dtype:
            raise TypeError(f"elra: `x` has dtype {x.dtype}, the adapter {param.dtype}")
        x2 = x.reshape(-1, self.k)
        if x2.shape[0] == 0:
            # No rows (an idle expert, an empty batch): the base layer's empty output, tied to
            # the adapter's parameters by a zero so that their gradients are zeros, not missing
            # (DDP reduces every parameter).
            zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0
            return (self._linear(x2) + zero).reshape(*shape[:-1], self.d)
        if self.variant == "lora":
            xin = F.dropout(x2, self.dropout, self.training).to(param.dtype)
            inc = (xin @ self.lora_A.t() @ self.lora_B.t()) * self.scaling
            y = self._linear(x2) + inc.to(x2.dtype)
            return y.reshape(*shape[:-1], self.d)
        if self._ga_probe is not None:
            return self._probe(x2).reshape(*shape[:-1], self.d)
        eta = self.log_eta.exp()
        if cuda and self.training and self.dropout > 0 and (not self.fused
                                                            or self.variant == "double"):
            raise ValueError("elra: adapter dropout on CUDA tensors needs an nn.Linear base (the "
                             "fused increment); set dropout=0 for other bases and `double`")
        mask = None if cuda else self._mask(x2.shape[0], x2)
        if self.variant == "double":
            xr, _ = torch.ops.elra.rows(x2, self.A_right, self.B_right, self.log_eta_right.exp(),
                                        self.step, None, self.cfg)
            u = self._linear(xr, bias=False)
            y, _ = torch.ops.elra.rows(u, self.A, self.B, eta, self.step, mask, self.cfg)
            bias = getattr(self.base, "bias", None)
            if bias is not None:
                y = y + bias.to(y.dtype)
        elif self.fused:
            w0 = self.base.weight.detach().to(x2.dtype)
            inc, _ = torch.ops.elra.delta(x2, w0, self.A, self.B, eta, self.step, mask, self.cfg)
            if cuda:
                # D∘Δ(x) with D the same scaled Bernoulli mask as the CPU op's: the op's
                # backward then receives D∘∂y, as the CPU op computes it inside.
                inc = F.dropout(inc, self.dropout, self.training)
            y = self._linear(x2) + inc
        else:
            u = self._linear(x2, bias=False)
            y, _ = torch.ops.elra.rows(u, self.A, self.B, eta, self.step, mask, self.cfg)
            bias = getattr(self.base, "bias", None)
            if bias is not None:
                y = y + bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.d)

    def _probe(self, x2: Tensor) -> Tensor:
        """The frozen layer's output, recording ``U = x W0ᵀ`` and, through a hook, ``Ȳ``, whose
        product ``Ȳᵀ U`` is ``∂L/∂G`` at ``G = 0`` (:func:`ga_initialise`)."""
        u = self._linear(x2, bias=False)
        bias = getattr(self.base, "bias", None)
        y = u + bias.to(u.dtype) if bias is not None else u.clone()
        # A zero leaf makes the output differentiable whatever the input (token ids included).
        y = y + self._ga_zero.to(y.dtype)
        u = u.detach().to(torch.float64)
        acc = self._ga_probe

        def hook(g):
            acc.add_(g.detach().to(torch.float64).t() @ u)

        y.register_hook(hook)
        return y

    def energy(self) -> Tensor:
        """``λ‖G‖²_F`` of this layer at its step (eq. 20–21; both generators for ``"double"``),
        differentiable; 0 for LoRA."""
        if self.variant == "lora":
            return self.lora_A.new_zeros(())
        e = torch.ops.elra.energy(self.A, self.B, self.log_eta.exp(), self.step, self.cfg)
        if self.variant == "double":
            e = e + torch.ops.elra.energy(self.A_right, self.B_right, self.log_eta_right.exp(),
                                          self.step, self.cfg)
        return e

    @torch.no_grad()
    def merge(self):
        """Writes ``W_new`` into the base weight (eq. 30; PEFT's ``merge``); the forward then is
        the base layer alone."""
        if self.merged:
            return
        self.base.weight.copy_(self._transform(self.base.weight, inverse=False))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Recovers ``W0 = exp(−G) W_new`` in the base weight (Prop. 3; PEFT's ``unmerge``)."""
        if not self.merged:
            return
        self.base.weight.copy_(self._transform(self.base.weight, inverse=True))
        self.merged = False

    def _transform(self, w: Tensor, inverse: bool) -> Tensor:
        if not isinstance(self.base, nn.Linear):
            raise TypeError("elra: merging needs an nn.Linear base (its weight is the merged one)")
        if w.is_cuda:
            dt = w.dtype if w.dtype in _GPU_DTYPES else _F32
        else:
            dt = w.dtype if w.dtype in _SUFFIX else torch.float64
        w = w.detach().to(dt)
        if self.variant == "lora":
            delta = (self.lora_B @ self.lora_A).detach().to(dt) * self.scaling
            out = w - delta if inverse else w + delta
        elif self.variant == "double":
            # W_new = exp(L) W0 exp(R) (App. B eq. 22); the unmerge undoes both, in reverse.
            def left(m, inv):
                return _merged(m, self.A, self.B, self.log_eta.exp(), self.step, self.cfg, inv)

            def right(m, inv):
                return _merged(m, self.A_right, self.B_right, self.log_eta_right.exp(), self.step,
                               self.cfg, inv, right=True)

            out = right(left(w, True), True) if inverse else left(right(w, False), False)
        else:
            out = _merged(w, self.A, self.B, self.log_eta.exp(), self.step, self.cfg, inverse)
        return out.to(self.base.weight.dtype)


# ---------------------------------------------------------------------------------------------
# Model functions (PEFT-like)
# ---------------------------------------------------------------------------------------------


def layers(model: nn.Module) -> List[Tuple[str, ElraLinear]]:
    """The ``(name, ElraLinear)`` pairs of a model, in ``named_modules`` order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ElraLinear)]


def _matches(name: str, targets: Sequence[str]) -> bool:
    """PEFT's rule: the full name equals a target or ends with ``.target``; a target given as
    a regular expression (``re:…``) must match the whole name."""
    for t in targets:
        if t.startswith("re:"):
            if re.fullmatch(t[3:], name):
                return True
        elif name == t or name.endswith("." + t):
            return True
    return False


def inject(model: nn.Module, target_modules: Sequence[str], variant: str = "hyb", r: int = 8,
           **kwargs) -> nn.Module:
    """Replaces every ``nn.Linear`` of ``model`` whose name matches ``target_modules`` (PEFT's
    suffix rule, or ``re:<regex>``) by an :class:`ElraLinear` of ``variant`` and rank ``r``
    (``kwargs`` as for :class:`ElraLinear`; each layer gets ``seed + i``), and freezes every
    other parameter, as PEFT's ``get_peft_model`` does. Returns ``model``.

    Errors: no module matches (``ValueError``), a matched module is not a linear layer
    (``TypeError``)."""
    # Freeze everything but adapters already injected (a second inject keeps them trainable).
    own = {id(p) for _, m in layers(model) for p in m.parameters() if p is not None}
    own -= {id(p) for _, m in layers(model) for p in m.base.parameters()}
    for p in model.parameters():
        if id(p) not in own:
            p.requires_grad_(False)
    names = [n for n, _ in model.named_modules() if n and _matches(n, target_modules)]
    if not names:
        raise ValueError(f"elra: no module of the model matches target_modules={list(target_modules)}")
    seed = kwargs.pop("seed", 0)
    for i, name in enumerate(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if isinstance(base, ElraLinear):
            continue
        if getattr(base, "in_features", None) is None:
            raise TypeError(f"elra: module `{name}` ({type(base).__name__}) is not a linear layer")
        setattr(parent, child, ElraLinear(base, variant, r, seed=seed + i, **kwargs))
    return model


def advance(model: nn.Module, steps: int = 1) -> None:
    """Moves every ELRA layer's optimiser step forward (α of eq. 75 and the η multiplier of
    App. H follow it). Call once per optimiser step."""
    ls = layers(model)
    if any(m.merged for _, m in ls):
        raise ValueError("elra: the adapters are merged; unmerge them before training on "
                         "(α and the η multiplier of a merged weight must stay those it was "
                         "merged with)")
    for _, m in ls:
        m.step.add_(steps)


def energy(model: nn.Module) -> Tensor:
    """``Σ λ‖G‖²_F`` over the model's ELRA layers (eq. 20): add it to the loss."""
    es = [m.energy() for _, m in layers(model)]
    return torch.stack(es).sum() if es else torch.zeros(())


def merge(model: nn.Module) -> nn.Module:
    """Merges every layer's adapter into its base weight (PEFT's ``merge_adapter``)."""
    for _, m in layers(model):
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undoes :func:`merge` (PEFT's ``unmerge_adapter``): ``W0 = exp(−G) W_new``."""
    for _, m in layers(model):
        m.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merges every adapter and puts the plain base layers back (PEFT's ``merge_and_unload``):
    the model then has no elra module and the merged weights."""
    for name, m in layers(model):
        m.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.base)
    return model


def trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """``(trainable, all)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def print_trainable_parameters(model: nn.Module) -> None:
    """Prints the trainable parameter count as PEFT does."""
    t, a = trainable_parameters(model)
    print(f"trainable params: {t:,} || all params: {a:,} || trainable%: {100 * t / max(a, 1):.4f}")


def saved_bytes(layer: ElraLinear, n: int) -> int:
    """Bytes an ELRA layer keeps for its backward for a batch of ``n`` rows besides its input,
    without dropout: ``(n·r + 2r²)`` values of its dtype for the fused form (LoRA keeps
    ``n·r``), plus the base output ``n·d`` for the output-side form (non-``nn.Linear`` bases).
    With ``dropout > 0`` in training mode the n×d dropout mask (values of the dtype) is kept too
    — as LoRA with dropout keeps its n×k dropped input. CPU tensors, whose activations have the
    adapter's dtype; on CUDA the saved values are float32 and the base output and mask follow the
    activation type, which the layer does not know before a call."""
    size = layer.A.element_size() if layer.variant != "lora" else layer.lora_A.element_size()
    r = layer.r
    drop = layer.dropout > 0 and layer.training
    if layer.variant == "lora":
        return (n * r + (n * layer.k if drop else 0)) * size
    vals = _saved_len(n, r) + (0 if layer.fused else n * layer.d)
    if layer.variant == "double":
        vals = 2 * _saved_len(n, r) + n * layer.d
    return (vals + (n * layer.d if drop else 0)) * size


# Adapter files: the PEFT layout of elra (safetensors + adapter_config.json) through the CPU
# adapter handles of the C ABI (the same files `elra::io` and PEFT read).

def _handle(m: ElraLinear):
    from . import Adapter
    import numpy as np

    # Adapter files hold the factors, not W0 (any base: a quantised one has no dense weight).
    w0 = np.zeros((m.d, m.k))
    if m.variant == "lora":
        a = Adapter(w0, "lora", r=m.r, lora_alpha=m.scaling * m.r)
        a.set("A", m.lora_A.detach().to("cpu", torch.float64).numpy())
        a.set("B", m.lora_B.detach().to("cpu", torch.float64).numpy())
        return a
    if m.variant == "double":
        raise NotImplementedError("elra: double-sided adapters have no PEFT file layout")
    variant = {0: "general", 1: "psd", 2: "hyb"}[int(m.cfg[0])]
    c = m.cfg
    names = {v: k for k, v in SCHEDULES.items()}
    mults = {v: k for k, v in ETA_MULTIPLIERS.items()}
    a = Adapter(w0, variant, r=m.r, eta=m.eta0, lambda_=c[8], tau=c[7],
                schedule=names[int(c[1])], warmup_steps=int(c[2]), gamma=c[3], alpha=c[4],
                eta_multiplier=mults[int(c[5])], total_steps=int(c[6]))
    a.set("A", m.A.detach().to("cpu", torch.float64).numpy())
    if m.B is not None:
        a.set("B", m.B.detach().to("cpu", torch.float64).numpy())
    a.set("eta", float(m.log_eta.detach().exp()))
    a.step = int(m.step)
    return a


def save_adapter(model: nn.Module, directory) -> None:
    """Saves every adapter of ``model`` as one adapter directory in PEFT's layout
    (``adapter_model.safetensors`` + ``adapter_config.json``, module names as PEFT writes them):
    a LoRA model's directory loads in PEFT, an ELRA one in elra (Rust, C, Python, torch)."""
    from . import save

    ls = layers(model)
    if not ls:
        raise ValueError("elra: the model has no elra layer to save")
    if any(m.merged for _, m in ls):
        raise ValueError("elra: unmerge the adapters before saving them")
    save(directory, {name: _handle(m) for name, m in ls})


@torch.no_grad()
def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Loads an adapter directory into the matching layers of a model already injected with the
    same variant, rank and generator settings (:func:`inject`): parameters, η and step. Every
    module is checked before any parameter changes. Values are copied into the existing
    parameters and buffers, so this is a hot swap: a ``torch.compile``d model runs the new
    adapter without recompiling.

    Errors: a merged model, a module missing from the directory, another variant, rank,
    schedule, τ, λ or LoRA scaling (``ValueError``, naming the module and the field)."""
    from . import Adapter
    import numpy as np

    ls = layers(model)
    if any(m.merged for _, m in ls):
        raise ValueError("elra: unmerge the adapters before loading others")
    loaded = []
    for name, m in ls:
        a = Adapter.load(directory, name, np.zeros((m.d, m.k)))
        mine = _handle(m)  # the layer's own settings, in the file's terms
        want = {"lora": "lora", "double": "double"}.get(m.variant, mine.variant)
        if a.variant != want or a.r != m.r:
            raise ValueError(f"elra: module `{name}` in {directory} is {a.variant} of rank {a.r}, "
                             f"the model's is {m.variant} of rank {m.r}")
        for field in ("schedule", "warmup_steps", "gamma", "alpha", "eta_multiplier",
                      "total_steps", "tau", "lambda_", "lora_alpha"):
            if getattr(a.config, field) != getattr(mine.config, field):
                raise ValueError(
                    f"elra: module `{name}` in {directory} has {field} = "
                    f"{getattr(a.config, field)}, the model's layer {getattr(mine.config, field)}")
        loaded.append((m, a))
    for m, a in loaded:
        if m.variant == "lora":
            m.lora_A.copy_(torch.from_numpy(a.get("A")))
            m.lora_B.copy_(torch.from_numpy(a.get("B")))
            continue
        m.A.copy_(torch.from_numpy(a.get("A")))
        if m.B is not None:
            m.B.copy_(torch.from_numpy(a.get("B")))
        m.log_eta.fill_(math.log(a.get("eta")))
        m.step.fill_(a.step)
    return model


def ga_initialise(model: nn.Module, batches: Iterable[Tuple[Tensor, Tensor]], loss_fn) -> int:
    """ELRA-Hyb_GA seeding (App. H, after LoRA-GA) of the model's ``"hyb-ga"`` layers, as
    ``elra::train::init`` does for the Rust trainer: the mean over ``batches`` of the generator
    gradient at ``G = 0`` through the frozen network, ``∂L/∂G = Ȳᵀ U`` (``U = x W0ᵀ``, d×d per
    layer), is decomposed ``Σ σᵢ uᵢ vᵢᵀ`` and ``A = [u₁ … u_r]``, ``B`` has rows
    ``−(σᵢ/σ₁) vᵢᵀ`` (η keeps η₀; a zero gradient keeps the Xavier draw). ``loss_fn(output,
    target)`` is the training loss. Returns the number of batches used.

    Errors: no ``"hyb-ga"`` layer, no batch (``ValueError``)."""
    targets = [m for _, m in layers(model) if m.variant == "hyb-ga"]
    if not targets:
        raise ValueError("elra: the model has no \"hyb-ga\" layer to seed")
    for m in targets:
        m._ga_probe = torch.zeros((m.d, m.d), dtype=torch.float64, device=m.A.device)
        m._ga_zero = torch.zeros((), dtype=torch.float64, device=m.A.device, requires_grad=True)
    count = 0
    try:
        for x, t in batches:
            with torch.enable_grad():
                # Gradients only for the probes' zero leaves: nothing accumulates into any
                # parameter's .grad (the caller's gradients stay as they were).
                torch.autograd.grad(loss_fn(model(x), t), [m._ga_zero for m in targets],
                                    allow_unused=True)
            count += 1
    finally:
        sums = [m._ga_probe for m in targets]
        for m in targets:
            m._ga_probe = None
            m._ga_zero = None
    if count == 0:
        raise ValueError("elra: GA seeding needs at least one batch")
    with torch.no_grad():
        for m, g in zip(targets, sums):
            u, sv, vh = torch.linalg.svd(g / count)
            if sv[0] == 0:
                continue
            m.A.copy_(u[:, : m.r].to(m.A.dtype))
            m.B.copy_((-(sv[: m.r] / sv[0])[:, None] * vh[: m.r]).to(m.B.dtype))
    return count


# ---------------------------------------------------------------------------------------------
# Many adapters in one batch (serving)
# ---------------------------------------------------------------------------------------------

#: Values per adapter in the packed ``meta`` of ``elra::multi_forward``: ElraVariant value (3 =
#: LoRA), η (LoRA: the scaling s), α, η multiplier, τ, λ.
_META = 6


def _multi_inputs(x, w0, bias, index, a, b, meta, device):
    """Checks the activations, ``W0``, the bias, the index and the adapter lists of
    ``elra::multi_forward`` (``device`` ``None``: CPU tensors of float32/float64; a CUDA device:
    tensors on it), before any memory is read; returns them contiguous with ``(n, d, k)``."""
    _check("x", x, None, None, 2, device)
    dt = x.dtype
    n, k = x.shape
    _check("w0", w0, dt, None, 2, device)
    d = w0.shape[0]
    _check("w0", w0, dt, (d, k), None, device)
    if bias is not None:
        _check("bias", bias, dt, (d,), None, device)
    where = device if device is not None else torch.device("cpu")
    if index.dtype != torch.int32 or index.shape != (n,) or index.device != where:
        raise ValueError(f"elra: `index` must be an int32 tensor of shape ({n},) on {where}, got "
                         f"{index.dtype} {tuple(index.shape)} on {index.device}")
    if len(b) != len(a) or len(meta) != _META * len(a):
        raise ValueError("elra: `a`, `b` and `meta` must describe the same adapters")
    bias = bias.contiguous() if bias is not None else None
    return x.contiguous(), w0.contiguous(), bias, index.contiguous(), (n, d, k)


def _multi_factors(i: int, v: float, a: Tensor, b: Optional[Tensor], d: int, k: int, dtype,
                   device=None):
    """Adapter ``i``'s factors, contiguous, checked against the layer before any memory is read:
    ELRA ``a`` d×r and ``b`` r×d (none for PSD), LoRA ``a`` = lora_A r×k and ``b`` = lora_B d×r.
    Returns ``(a, b, r, is_lora)``."""
    variant = int(v)
    if variant not in VARIANTS.values():
        raise ValueError(f"elra: adapter {i} has an unknown variant {v}")
    lora = variant == VARIANTS["lora"]
    _check(f"a[{i}]", a, dtype, None, 2, device)
    r = a.shape[0] if lora else a.shape[1]
    _check(f"a[{i}]", a, dtype, (r, k) if lora else (d, r), None, device)
    needs_b = lora or variant != VARIANTS["psd"]
    if needs_b != (b is not None):
        raise ValueError(f"elra: adapter {i} ({'lora' if lora else 'elra'} variant {variant}) "
                         f"{'needs' if needs_b else 'takes no'} factor `b`")
    if b is not None:
        _check(f"b[{i}]", b, dtype, (d, r) if lora else (r, d), None, device)
        b = b.contiguous()
    return a.contiguous(), b, r, lora


@torch.library.custom_op("elra::multi_forward", mutates_args=())
def multi_forward(x: Tensor, w0: Tensor, bias: Optional[Tensor], index: Tensor, a: List[Tensor],
                  b: List[Optional[Tensor]], meta: List[float]) -> Tensor:
    """Row ``i`` of ``x`` (n×k) through adapter ``index[i]`` (int32, −1: the base alone):
    ``y_i = x_i W0ᵀ + bias + Δ_{index[i]}(x_i)`` (``elra_op_multi_forward``: ELRA's
    ``((u Cᵀ) φ1(CA)ᵀ) Aᵀ`` on ``u = x W0ᵀ``, eq. 3/5 and Prop. 1; LoRA's ``s (x Aᵀ) Bᵀ``). The
    frozen GEMM runs once; the rows are grouped by adapter. Forward only (inference)."""
    if x.is_cuda:
        return _multi_cuda(x, w0, bias, index, a, b, meta)
    x, w0, bias, index, (n, d, k) = _multi_inputs(x, w0, bias, index, a, b, meta, None)
    dt, count = x.dtype, len(a)
    descs = (MultiAdapterDesc * max(count, 1))()
    keep = []
    max_r = 0
    for i in range(count):
        v, eta, alpha, mult, tau, lam = meta[_META * i:_META * (i + 1)]
        ai, bi, r, lora = _multi_factors(i, v, a[i], b[i], d, k, dt)
        keep += [ai, bi]
        max_r = max(max_r, r)
        descs[i] = MultiAdapterDesc(int(v), r, ai.data_ptr(), ai.shape[1], _p(bi),
                                    bi.shape[1] if bi is not None else 0, float(eta),
                                    OpStep(alpha, mult, tau, lam))
    wl = _sz()
    check(lib.elra_op_multi_workspace(n, d, k, max_r, ctypes.byref(wl)))
    y = x.new_empty((n, d))
    ws = x.new_empty((max(wl.value, 1),))
    check(getattr(lib, f"elra_op_multi_forward_{_SUFFIX[dt]}")(
        descs, count, index.data_ptr(), n, w0.data_ptr(), k, d, k, _p(bias), x.data_ptr(), k,
        y.data_ptr(), d, ws.data_ptr(), wl.value))
    return y


class GpuMultiAdapterDesc(ctypes.Structure):
    """``ElraGpuMultiAdapter`` of ``elra.h`` (device pointers)."""

    _fields_ = [("variant", ctypes.c_uint32), ("r", ctypes.c_size_t), ("a", ctypes.c_void_p),
                ("ld_a", ctypes.c_size_t), ("b", ctypes.c_void_p), ("ld_b", ctypes.c_size_t),
                ("eta", ctypes.c_void_p), ("scale", ctypes.c_float), ("step", OpStep)]


def _multi_cuda(x, w0, bias, index, a, b, meta):
    """The multi-adapter forward on CUDA tensors through ``elra_gpu_op_multi_forward`` (the
    frozen GEMM once, the rows grouped by adapter on the device, one batched φ1 per rank) on
    torch's current stream. Activations f32/f16/bf16, factors f32. A row whose index lies outside
    the set comes back as NaN (the device reads the index; no host wait)."""
    dev = x.device
    x, w0, bias, index, (n, d, k) = _multi_inputs(x, w0, bias, index, a, b, meta, dev)
    dt, count = x.dtype, len(a)
    etas = torch.tensor([meta[_META * i + 1] for i in range(count)] or [0.0], dtype=_F32,
                        device=dev)
    descs = (GpuMultiAdapterDesc * max(count, 1))()
    keep = []
    for i in range(count):
        v, eta, alpha, mult, tau, lam = meta[_META * i:_META * (i + 1)]
        ai, bi, r, lora = _multi_factors(i, v, a[i], b[i], d, k, _F32, dev)
        keep += [ai, bi]
        descs[i] = GpuMultiAdapterDesc(
            int(v), r, ai.data_ptr(), ai.shape[1], _p(bi), bi.shape[1] if bi is not None else 0,
            None if lora else etas[i].data_ptr(), float(eta) if lora else 0.0,
            OpStep(alpha, mult, tau, lam))
    g = _gpu()
    wl = _sz()
    check(g.elra_gpu_op_multi_sizes(descs, count, n, d, ctypes.byref(wl)))
    y = _empty((n, d), dt, x)
    ws = _empty((max(wl.value, 1),), _F32, x)
    check(g.elra_gpu_op_multi_forward(
        _GPU_DTYPES[dt], descs, count, index.data_ptr(), n, w0.data_ptr(), k, d, k, _p(bias),
        x.data_ptr(), k, y.data_ptr(), d, ws.data_ptr(), wl.value, _stream(x)))
    return y


@multi_forward.register_fake
def _(x, w0, bias, index, a, b, meta):
    return x.new_empty((x.shape[0], w0.shape[0]))


class ElraMultiLinear(nn.Module):
    """A frozen ``nn.Linear`` serving many adapters at once (inference): each row of a batch
    selects one adapter (ELRA general/PSD/Hyb at its own step, or LoRA; ranks may differ) or
    ``−1`` for the base layer alone. The frozen GEMM runs once for the whole batch and the
    adapters' rank-r work is grouped by adapter (``elra::multi_forward``).

    Adapters are added from trained :class:`ElraLinear` layers on the same base
    (:meth:`add`) or from adapter directories (:meth:`add_file`); their tensors are buffers (no
    gradients). The per-row choice is ``forward(x, index)`` or, for a whole model,
    :func:`set_adapter_index`. ``slots`` maps a model-wide adapter number to this layer's
    adapter (``−1`` where that adapter does not touch this layer)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"elra: ElraMultiLinear needs an nn.Linear base, got "
                            f"{type(base).__name__}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.d, self.k = base.out_features, base.in_features
        self.meta: List[float] = []
        self.count = 0
        self.slots: List[int] = []
        self.register_buffer("adapter_index", None, persistent=False)

    def extra_repr(self) -> str:
        return f"d={self.d}, k={self.k}, adapters={self.count}"

    def _push(self, variant: int, a: Tensor, b: Optional[Tensor], eta: float, st: OpStep) -> int:
        # Factors in the base's dtype, float32 under a half-precision base (the GPU calls'
        # master-weight type).
        dt = self.base.weight.dtype if self.base.weight.dtype in _SUFFIX else _F32
        dev = self.base.weight.device
        a, b = a.to(dev), None if b is None else b.to(dev)
        i = self.count
        self.register_buffer(f"a{i}", a.detach().to(dt).clone())
        self.register_buffer(f"b{i}", None if b is None else b.detach().to(dt).clone())
        self.meta += [float(variant), float(eta), st.alpha, st.eta_mult, st.tau, st.lambda_]
        self.count += 1
        return i

    @torch.no_grad()
    def add(self, layer: "ElraLinear") -> int:
        """Adds the adapter of a trained :class:`ElraLinear` (single-sided ELRA or LoRA) on a
        base of the same shape, at its current step; returns its number in this layer."""
        if (layer.d, layer.k) != (self.d, self.k):
            raise ValueError(f"elra: the adapter is {layer.d}×{layer.k}, this layer "
                             f"{self.d}×{self.k}")
        if layer.variant == "lora":
            return self._push(VARIANTS["lora"], layer.lora_A, layer.lora_B, layer.scaling,
                              OpStep(0.0, 1.0, 0.0, 0.0))
        if layer.variant == "double":
            raise ValueError("elra: double-sided adapters are not served by ElraMultiLinear")
        st = _step(layer.cfg, layer.step, self.d, self.k, layer.r)
        return self._push(int(layer.cfg[0]), layer.A, layer.B, float(layer.log_eta.exp()), st)

    def add_file(self, directory, module: str) -> int:
        """Adds module ``module`` of an adapter directory (ELRA or PEFT LoRA, PEFT layout) at
        the step it was saved with; returns its number in this layer."""
        from . import Adapter
        import numpy as np

        ad = Adapter.load(directory, module, np.zeros((self.d, self.k)))
        if ad.variant == "lora":
            scale = ad.config.lora_alpha / ad.r
            return self._push(VARIANTS["lora"], torch.from_numpy(ad.get("A")),
                              torch.from_numpy(ad.get("B")), scale, OpStep(0.0, 1.0, 0.0, 0.0))
        st = OpStep()
        check(lib.elra_schedule_at(ctypes.byref(ad.config), ad.step, ctypes.byref(st)))
        b = torch.from_numpy(ad.get("B")) if ad.variant != "psd" else None
        return self._push(VARIANTS[ad.variant], torch.from_numpy(ad.get("A")), b,
                          float(ad.get("eta")), st)

    def forward(self, x: Tensor, index: Optional[Tensor] = None) -> Tensor:
        index = self.adapter_index if index is None else index
        if index is None:
            raise ValueError("elra: no adapter index: pass `index` or call set_adapter_index")
        shape = x.shape
        if shape[-1] != self.k:
            raise ValueError(f"elra: `x` must have {self.k} features in its last dimension, "
                             f"got shape {tuple(shape)}")
        lead = shape[:-1]
        if tuple(index.shape) != tuple(lead[:index.dim()]):
            raise ValueError(f"elra: `index` of shape {tuple(index.shape)} does not lead the "
                             f"batch shape {tuple(lead)}")
        idx = index.reshape(tuple(index.shape) + (1,) * (len(lead) - index.dim())).expand(lead)
        x2 = x.reshape(-1, self.k)
        a = [getattr(self, f"a{i}") for i in range(self.count)]
        b = [getattr(self, f"b{i}") for i in range(self.count)]
        w0 = self.base.weight.to(x2.dtype)
        bias = None if self.base.bias is None else self.base.bias.to(x2.dtype)
        idx = idx.reshape(-1).to(device=x2.device, dtype=torch.int32)
        y = torch.ops.elra.multi_forward(x2, w0, bias, idx, a, b, self.meta)
        return y.reshape(*lead, self.d)


def multi_layers(model: nn.Module) -> List[Tuple[str, ElraMultiLinear]]:
    """The ``(name, ElraMultiLinear)`` pairs of a model, in ``named_modules`` order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ElraMultiLinear)]


def _file_modules(directory) -> set:
    """The module names an adapter directory holds tensors for (from its safetensors header)."""
    import json
    import struct

    path = os.path.join(directory, "adapter_model.safetensors")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100_000_000:
            raise ValueError(f"elra: {path}: header of {n} bytes")
        header = json.loads(f.read(n))
    mods = set()
    for key in header:
        m = re.fullmatch(r"base_model\.model\.(.+)\.(?:lora_A\.weight|elra_A\.weight)", key)
        if m:
            mods.add(m.group(1))
    return mods


@torch.no_grad()
def inject_multi(model: nn.Module, target_modules: Sequence[str], directories) -> nn.Module:
    """Replaces every ``nn.Linear`` of ``model`` matching ``target_modules`` (PEFT's suffix rule,
    or ``re:<regex>``) by an :class:`ElraMultiLinear` serving the adapter directories
    ``directories`` (ELRA or PEFT LoRA): adapter ``i`` of the model is ``directories[i]``; a
    directory without tensors for a layer leaves that layer's base output unchanged for its rows.
    Select per row with :func:`set_adapter_index`. Returns ``model``.

    Errors: no module matches, a directory adapts none of the matched modules (``ValueError``)."""
    names = [n for n, m in model.named_modules() if n and _matches(n, target_modules)
             and isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"elra: no linear module matches target_modules={list(target_modules)}")
    held = [_file_modules(d) for d in directories]
    for d, mods in zip(directories, held):
        if not mods & set(names):
            raise ValueError(f"elra: {d} adapts none of the matched modules {names[:5]}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = ElraMultiLinear(getattr(parent, child))
        layer.slots = [layer.add_file(d, name) if name in mods else -1
                       for d, mods in zip(directories, held)]
        setattr(parent, child, layer)
    return model


@torch.no_grad()
def set_adapter_index(model: nn.Module, index: Tensor) -> None:
    """Selects, per row, the adapter every :class:`ElraMultiLinear` of ``model`` applies:
    ``index`` (integers, ``−1`` for the base model) of the batch's leading shape or a prefix of
    it (e.g. one adapter per sequence of a ``(B, T)`` batch). Values outside the model's
    adapters are errors (``ValueError``)."""
    index = torch.as_tensor(index)
    for _, m in multi_layers(model):
        n = len(m.slots) if m.slots else m.count
        if index.numel() and (int(index.min()) < -1 or int(index.max()) >= n):
            raise ValueError(f"elra: adapter index values must lie in −1 … {n - 1}, got "
                             f"{int(index.min())} … {int(index.max())}")
        if m.slots:
            table = torch.tensor([-1] + m.slots, dtype=torch.int32, device=index.device)
            m.adapter_index = table[index.long() + 1]
        else:
            m.adapter_index = index.to(torch.int32)
