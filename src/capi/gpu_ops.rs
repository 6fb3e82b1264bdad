//! The functional ELRA calls on the GPU (feature `cuda`; declared in `elra.h` under
//! `#if defined(ELRA_FEATURE_CUDA)`): [`crate::cuda::ops`] on **device memory the caller owns**,
//! ordered on the caller's CUDA stream — the GPU twins of the CPU calls `elra_op_*` of
//! [`super::ops`], with the same [`ElraOpDesc`] and [`ElraOpStep`] ([`elra_schedule_at`](super::elra_schedule_at) computes
//! the step on the host).
//!
//! # Conventions (in addition to those of [`super::gpu`] for device memory and streams)
//! - **Buffers.** Activations, `W0`, the bias and merged weights are device matrices of the
//!   call's activation type `dtype` ([`ElraGpuDtype`]: f32, f16, bf16); `a` (d×r), `b` (r×d),
//!   `eta`, `da`, `db`, `deta`, `energy`, `saved` and `workspace` are f32 device memory. Every device
//!   matrix is row-major and contiguous (`ld == cols`), aligned to its type. The device is the
//!   one holding `a`; every other pointer must be memory of that device (checked with
//!   `cuPointerGetAttribute`: a host pointer is `ELRA_INVALID_ARGUMENT`). Outputs may not overlap
//!   any other buffer of the call.
//! - **Scalars.** η is a device scalar (`const float *eta`, one f32): the engine's trained value
//!   (e.g. `exp(log η)`) is read by the kernels where it lives, never copied to the host, and not
//!   checked (a non-positive or non-finite η shows as NaN/±Inf in the outputs). The step (α, η
//!   multiplier, τ = 0, λ; [`elra_schedule_at`](super::elra_schedule_at)) is a host struct. `∂η` and the energy are
//!   written to device scalars.
//! - **Sizes.** [`elra_gpu_op_sizes`] gives, in f32 values, the `saved` array a forward of n rows
//!   fills and its backward reads (N·r + 2r², as [`elra_op_sizes`](super::elra_op_sizes)) and the `workspace` every call
//!   on n rows needs (enough for [`elra_gpu_op_merge`] and [`elra_gpu_op_energy`] too); each call
//!   takes `workspace_len` and rejects a smaller workspace.
//! - **Gradients** are written (`accumulate = 0`) or added (`accumulate = 1`). The energy penalty
//!   is only in [`elra_gpu_op_energy`].
//! - **Asynchronous.** A call validates everything it can on the host, then enqueues its kernels
//!   on the device's stream joined with `stream` (NULL: the legacy default stream) and returns:
//!   no allocation, no host synchronisation, no host copy. Inputs are not scanned for NaN; a
//!   failure of φ1 or its adjoint (Prop. 1) shows as NaN in the call's outputs.
//! - **Not on the GPU.** The spectral clip (τ ≠ 0), dropout masks, f64 activations and ranks above
//!   [`crate::cuda::MAX_RANK`] are `ELRA_INVALID_ARGUMENT`.
//! - **The overflow rule, on request.** The CPU calls `elra_op_*` check every output and return
//!   `ELRA_OVERFLOW` when finite inputs give NaN/±Inf. These calls do not scan (a scan is one more
//!   read of each output, and acting on it a host wait): [`elra_gpu_check_finite`] ORs 1 into a
//!   caller's device flag when a buffer holds a non-finite value, asynchronously, and the engine
//!   reads the flag when it synchronises anyway — a set flag is its `ELRA_OVERFLOW`.
//!
//! Every check that needs no driver comes first, so bad arguments are reported the same on a
//! machine without a GPU, where a call with valid arguments returns `ELRA_NO_DEVICE`.

use std::ffi::c_void;

use half::{bf16, f16};

use super::gpu::{gpu_dtype_of, ElraGpuDtype};
use super::layout::check_scalar_out;
use super::ops::{desc_of, flag, step_of};
use super::{guard, CError, CResult, ElraOpDesc, ElraOpStep, ElraStatus};
use crate::adapter::GeneratorSpec;
use crate::cuda::caller::{ordinal_of, shared_stream, CallerMatrix, CallerSpan, CtxRestore};
use crate::cuda::ops::{self as gops, GpuBase, GpuGenerator, GpuGrads};
use crate::cuda::{check_rank, device_count, Activation, CudaDevice, DeviceScalar};
use crate::ops::{ElraOp, Side};
use crate::ElraError;

/// Runs `$body` with `$t` the Rust type of an [`ElraGpuDtype`] `dtype` argument.
macro_rules! by_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match gpu_dtype_of($dtype)? {
            ElraGpuDtype::ELRA_GPU_DTYPE_F32 => {
                type $t = f32;
                $body
            }
            ElraGpuDtype::ELRA_GPU_DTYPE_F16 => {
                type $t = f16;
                $body
            }
            ElraGpuDtype::ELRA_GPU_DTYPE_BF16 => {
                type $t = bf16;
                $body
            }
        }
    };
}

/// A device buffer argument of a call: name, pointer, rows, cols, leading dimension, and
/// whether the call writes it.
#[derive(Clone, Copy)]
struct Arg {
    name: &'static str,
    p: *const c_void,
    rows: usize,
    cols: usize,
    ld: usize,
    out: bool,
}

fn arg<E>(name: &'static str, p: *const E, (rows, cols): (usize, usize), ld: usize) -> Arg {
    Arg {
        name,
        p: p.cast(),
        rows,
        cols,
        ld,
        out: false,
    }
}

fn output<E>(name: &'static str, p: *mut E, (rows, cols): (usize, usize), ld: usize) -> Arg {
    Arg {
        out: true,
        ..arg(name, p.cast_const(), (rows, cols), ld)
    }
}

/// A dense array of `len` values (a 1×len matrix; `len = 0` is reported as a zero dimension).
fn array<E>(name: &'static str, p: *const E, len: usize, is_out: bool) -> Arg {
    Arg {
        out: is_out,
        ..arg(name, p, (1, len), len)
    }
}

/// Validates one buffer ([`CallerMatrix::check`]; NULL is `ELRA_NULL_POINTER`); with `dev`, also
/// that it is memory of that device.
fn checked<E: DeviceScalar>(dev: Option<&CudaDevice>, a: &Arg) -> CResult<CallerMatrix<E>> {
    if a.p.is_null() {
        return Err(CError::Null(a.name));
    }
    Ok(CallerMatrix::check(dev, a.name, a.p, a.rows, a.cols, a.ld)?)
}

/// The device buffers of a call: activation-typed and f32 (`f32s[0]` is `a`, which names the
/// device).
struct Bufs {
    act: Vec<Arg>,
    f32s: Vec<Arg>,
}

impl Bufs {
    /// Every check that needs no driver: each buffer ([`checked`]), then that no output overlaps
    /// any other buffer of the call.
    fn host_checks<T: Activation>(&self) -> CResult<()> {
        let mut spans = Vec::new();
        for a in &self.act {
            let m = checked::<T>(None, a)?;
            spans.push((a.name, m.ptr, m.bytes as u64, a.out));
        }
        for a in &self.f32s {
            let m = checked::<f32>(None, a)?;
            spans.push((a.name, m.ptr, m.bytes as u64, a.out));
        }
        for (i, &(name, p, bytes, is_out)) in spans.iter().enumerate() {
            if !is_out {
                continue;
            }
            for (j, &(other, q, qb, _)) in spans.iter().enumerate() {
                if i != j && p < q + qb && q < p + bytes {
                    return Err(ElraError::invalid(
                        name,
                        format!("overlaps `{other}` (device buffers may not alias)"),
                    )
                    .into());
                }
            }
        }
        Ok(())
    }

    /// After [`Self::host_checks`]: finds the device (`ELRA_NO_DEVICE` without a driver), checks
    /// that every buffer is memory of it, and runs `f` on the validated buffers ordered on
    /// `stream` (the thread's context is restored afterwards).
    ///
    /// # Safety
    /// `stream` must be NULL or a live stream of the device's primary context; the buffers must
    /// stay allocated until `stream` has passed the call.
    unsafe fn run<T: Activation>(
        &self,
        stream: *mut c_void,
        f: impl FnOnce(&CudaDevice, &[CallerMatrix<T>], &[CallerMatrix<f32>]) -> CResult<()>,
    ) -> CResult<()> {
        device_count()?;
        let _ctx = CtxRestore::new();
        let first = &self.f32s[0];
        let shared = shared_stream(ordinal_of(first.name, first.p)?)?;
        let caller = shared
            .lock()
            .map_err(|_| ElraError::Cuda("stream poisoned by an earlier panic".into()))?;
        let dev = caller.device().clone();
        let act = (self.act.iter())
            .map(|a| checked::<T>(Some(&dev), a))
            .collect::<CResult<Vec<_>>>()?;
        let f32s = (self.f32s.iter())
            .map(|a| checked::<f32>(Some(&dev), a))
            .collect::<CResult<Vec<_>>>()?;
        // SAFETY: the caller's contract on `stream`.
        unsafe { caller.ordered(stream, || f(&dev, &act, &f32s)) }
    }
}

/// Lends a validated buffer to the library without copying.
///
/// # Safety
/// `m` was checked against `dev` and stays allocated until the caller's stream passes the call,
/// which [`Bufs::run`] orders after the work enqueued through the wrapper.
unsafe fn lend<E: DeviceScalar>(
    dev: &CudaDevice,
    m: &CallerMatrix<E>,
) -> CResult<crate::cuda::BorrowedMatrices<E>> {
    // SAFETY: forwarded contract.
    Ok(unsafe { m.borrow(dev)? })
}

/// The layer (GPU rank limit) and the step (no clip).
fn parse(desc: *const ElraOpDesc, step: *const ElraOpStep) -> CResult<(ElraOp, GeneratorSpec)> {
    let op = desc_of(desc)?;
    check_rank(op.r)?;
    let spec = step_of(step)?.require_no_clip()?;
    Ok((op, spec))
}

/// The generator's buffers: `a` (d×r), `b` (r×d) when the variant has it, and the device
/// scalar `eta`.
fn gen_args(
    op: &ElraOp,
    a: *const f32,
    ld_a: usize,
    b: *const f32,
    ld_b: usize,
    eta: *const f32,
) -> Vec<Arg> {
    let mut v = vec![arg("a", a, (op.d, op.r), ld_a)];
    if op.variant.uses_b() {
        v.push(arg("b", b, (op.r, op.d), ld_b));
    }
    v.push(array("eta", eta, 1, false));
    v
}

/// The gradient buffers: `da` (d×r), `db` (r×d, when the variant has `B`), `deta` (one value).
fn grad_args(
    op: &ElraOp,
    (da, ld_da): (*mut f32, usize),
    (db, ld_db): (*mut f32, usize),
    deta: *mut f32,
) -> Vec<Arg> {
    let mut v = vec![output("da", da, (op.d, op.r), ld_da)];
    if op.variant.uses_b() {
        v.push(output("db", db, (op.r, op.d), ld_db));
    }
    v.push(array("deta", deta.cast_const(), 1, true));
    v
}

/// Errors unless the workspace holds `need` values (as [`elra_gpu_op_sizes`] gives them).
fn check_workspace(len: usize, need: usize) -> CResult<()> {
    check_workspace_of(len, need, "elra_gpu_op_sizes")
}

/// Errors unless the workspace holds `need` values; `query` names the size call.
fn check_workspace_of(len: usize, need: usize, query: &str) -> CResult<()> {
    if len < need {
        return Err(
            ElraError::invalid("workspace_len", format!("{len} < {need} ({query})")).into(),
        );
    }
    Ok(())
}

/// The generator of a call from its lent buffers ([`gen_args`]: `f[0]` = A, `f[1]` = B when the
/// variant has it, η last).
fn generator<'a>(op: &ElraOp, f: &'a [crate::cuda::BorrowedMatrices<f32>]) -> GpuGenerator<'a> {
    GpuGenerator {
        a: f[0].get(),
        b: op.variant.uses_b().then(|| f[1].get()),
        eta: f[f.len() - 1].get(),
    }
}

/// Gradient outputs from lent buffers `g` (`da`, [`db`], `deta`).
fn grads<'a>(
    op: &ElraOp,
    g: &'a mut [crate::cuda::BorrowedMatrices<f32>],
    accumulate: bool,
) -> GpuGrads<'a> {
    let has_b = op.variant.uses_b();
    let (da, rest) = g.split_first_mut().expect("da");
    let (deta, rest) = rest.split_last_mut().expect("deta");
    GpuGrads {
        a: da.get_mut(),
        b: if has_b {
            rest.first_mut().map(|b| b.get_mut())
        } else {
            None
        },
        eta: deta.get_mut(),
        accumulate,
    }
}

/// Lends every buffer of a list.
///
/// # Safety
/// As [`lend`].
unsafe fn lend_all<E: DeviceScalar>(
    dev: &CudaDevice,
    ms: &[CallerMatrix<E>],
) -> CResult<Vec<crate::cuda::BorrowedMatrices<E>>> {
    // SAFETY: forwarded contract.
    ms.iter().map(|m| unsafe { lend(dev, m) }).collect()
}

/// The `saved` and `workspace` lengths (f32 values) for a batch of `n ≥ 1` rows of the layer
/// `desc` (rank at most [`crate::cuda::MAX_RANK`]): `saved` = N·r + 2r² (the N×r `V = X Pᵀ`
/// and the r×r `Z = C A`, `M = φ1(Z)` of eq. 5 and Prop. 1), and the workspace of every GPU
/// functional call on n rows, merge and energy included ([`crate::cuda::ops::sizes`]).
///
/// # Safety
/// `desc` must point to a readable descriptor; the outputs to writable `size_t`s.
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_op_sizes(
    desc: *const ElraOpDesc,
    n: usize,
    saved_len: *mut usize,
    workspace_len: *mut usize,
) -> ElraStatus {
    guard(|| {
        let op = desc_of(desc)?;
        check_scalar_out("saved_len", saved_len)?;
        check_scalar_out("workspace_len", workspace_len)?;
        let s = gops::sizes(&op, n)?;
        // SAFETY: validated; the caller guarantees writability.
        unsafe {
            saved_len.write(s.saved);
            workspace_len.write(s.workspace);
        }
        Ok(())
    })
}

/// The fused ELRA layer's forward on device memory ([`crate::cuda::ops::forward`]):
/// `y = x W0ᵀ + 1 biasᵀ + ((x Pᵀ) φ1(Z)ᵀ) Aᵀ` (with `base = 1`; `base = 0` writes only the
/// increment, for an engine that runs the frozen GEMM itself; the bias needs `base = 1`), with
/// `C` from (A, B, η) and `step` (eq. 2, §4.2.1, eq. 19), `Z = C A`, `P = C W0` (eq. 5,
/// Prop. 1). `x` is n×k, `y` n×d, `w0` d×k and `bias` (d values, or NULL) of type `dtype`; `a`
/// d×r and `b` r×d (ignored, may be NULL, for PSD) f32. Fills `saved` ([`elra_gpu_op_sizes`]) for
/// the backward; `workspace` holds `workspace_len` f32 values. Ordered on `stream`;
/// asynchronous.
///
/// # Safety
/// Every non-NULL pointer must be device memory covering its described layout, alive until
/// `stream` has passed the call; `desc` and `step` readable host memory; `stream` NULL or a live
/// stream of the device's primary context.
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_op_forward(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    dtype: u32,
    n: usize,
    w0: *const c_void,
    ld_w0: usize,
    base: u32,
    bias: *const c_void,
    a: *const f32,
    ld_a: usize,
    b: *const f32,
    ld_b: usize,
    eta: *const f32,
    x: *const c_void,
    ld_x: usize,
    y: *mut c_void,
    ld_y: usize,
    saved: *mut f32,
    workspace: *mut f32,
    workspace_len: usize,
    stream: *mut c_void,
) -> ElraStatus {
    guard(|| {
        let (op, spec) = parse(desc, step)?;
        let with_base = flag("base", base)?;
        if !with_base && !bias.is_null() {
            return Err(ElraError::invalid("bias", "a bias needs base = 1").into());
        }
        let sz = gops::sizes(&op, n)?;
        let (d, k) = (op.d, op.k);
        let mut act = vec![
            arg("w0", w0, (d, k), ld_w0),
            arg("x", x, (n, k), ld_x),
            output("y", y, (n, d), ld_y),
        ];
        if !bias.is_null() {
            act.push(arg("bias", bias, (1, d), d));
        }
        let mut f32s = gen_args(&op, a, ld_a, b, ld_b, eta);
        let n_gen = f32s.len();
        f32s.push(array("saved", saved.cast_const(), sz.saved, true));
        f32s.push(array(
            "workspace",
            workspace.cast_const(),
            workspace_len,
            true,
        ));
        let bufs = Bufs { act, f32s };
        by_dtype!(dtype, T => {
            bufs.host_checks::<T>()?;
            check_workspace(workspace_len, sz.workspace)?;
            let call = |dev: &CudaDevice,
                        am: &[CallerMatrix<T>],
                        fm: &[CallerMatrix<f32>]|
             -> CResult<()> {
                    // SAFETY: validated buffers of the call (Bufs::run's contract).
                    let (mut act, mut f) = unsafe { (lend_all(dev, am)?, lend_all(dev, fm)?) };
                    let (gen, rest) = f.split_at_mut(n_gen);
                    let (s, w) = rest.split_at_mut(1);
                    let (head, bias) = act.split_at_mut(3);
                    let (w0b, rest) = head.split_at_mut(1);
                    let (xb, yb) = rest.split_at_mut(1);
                    let base = if with_base {
                        GpuBase::Included { bias: bias.first().map(|b| b.get()) }
                    } else {
                        GpuBase::Excluded
                    };
                    Ok(gops::forward::<T>(
                        dev,
                        &op,
                        &spec,
                        w0b[0].get(),
                        base,
                        &generator(&op, gen),
                        xb[0].get(),
                        yb[0].get_mut(),
                        s[0].get_mut(),
                        w[0].get_mut(),
                    )?)
            };
            // SAFETY: the caller's contract on the buffers and `stream` is forwarded.
            unsafe { bufs.run::<T>(stream, call) }
        })
    })
}

/// Reverse mode of [`elra_gpu_op_forward`] on device memory ([`crate::cuda::ops::backward`]):
/// from `dy` (n×d) writes `dx = dy W0 + V̄ P` (n×k; with `base = 0` only `V̄ P`, as in the
/// forward) and writes or adds (`accumulate` 0/1) `da` (d×r), `db` (r×d, not for PSD) and the
/// device scalar `*deta`: the gradients of `⟨y, dy⟩` through `Z̄ = L_φ1(Zᵀ, M̄)` (Prop. 1) and
/// eq. (19), without the energy term ([`elra_gpu_op_energy`]). `x`, the parameters, `step` and
/// `saved` must be the forward's. Ordered on `stream`; asynchronous.
///
/// # Safety
/// As [`elra_gpu_op_forward`].
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_op_backward(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    dtype: u32,
    n: usize,
    w0: *const c_void,
    ld_w0: usize,
    base: u32,
    a: *const f32,
    ld_a: usize,
    b: *const f32,
    ld_b: usize,
    eta: *const f32,
    x: *const c_void,
    ld_x: usize,
    saved: *const f32,
    dy: *const c_void,
    ld_dy: usize,
    dx: *mut c_void,
    ld_dx: usize,
    da: *mut f32,
    ld_da: usize,
    db: *mut f32,
    ld_db: usize,
    deta: *mut f32,
    accumulate: u32,
    workspace: *mut f32,
    workspace_len: usize,
    stream: *mut c_void,
) -> ElraStatus {
    guard(|| {
        let (op, spec) = parse(desc, step)?;
        let with_base = flag("base", base)?;
        let accumulate = flag("accumulate", accumulate)?;
        let sz = gops::sizes(&op, n)?;
        let (d, k) = (op.d, op.k);
        let act = vec![
            arg("w0", w0, (d, k), ld_w0),
            arg("x", x, (n, k), ld_x),
            arg("dy", dy, (n, d), ld_dy),
            output("dx", dx, (n, k), ld_dx),
        ];
        let mut f32s = gen_args(&op, a, ld_a, b, ld_b, eta);
        let n_gen = f32s.len();
        let gr = grad_args(&op, (da, ld_da), (db, ld_db), deta);
        let n_grad = gr.len();
        f32s.extend(gr);
        f32s.push(array("saved", saved, sz.saved, false));
        f32s.push(array(
            "workspace",
            workspace.cast_const(),
            workspace_len,
            true,
        ));
        let bufs = Bufs { act, f32s };
        by_dtype!(dtype, T => {
            bufs.host_checks::<T>()?;
            check_workspace(workspace_len, sz.workspace)?;
            let call = |dev: &CudaDevice,
                        am: &[CallerMatrix<T>],
                        fm: &[CallerMatrix<f32>]|
             -> CResult<()> {
                    // SAFETY: validated buffers of the call (Bufs::run's contract).
                    let (mut act, mut f) = unsafe { (lend_all(dev, am)?, lend_all(dev, fm)?) };
                    let (gen, rest) = f.split_at_mut(n_gen);
                    let (g, rest) = rest.split_at_mut(n_grad);
                    let (s, w) = rest.split_at_mut(1);
                    let (inputs, dxb) = act.split_at_mut(3);
                    Ok(gops::backward::<T>(
                        dev,
                        &op,
                        &spec,
                        inputs[0].get(),
                        with_base,
                        &generator(&op, gen),
                        inputs[1].get(),
                        s[0].get(),
                        inputs[2].get(),
                        dxb[0].get_mut(),
                        grads(&op, g, accumulate),
                        w[0].get_mut(),
                    )?)
            };
            // SAFETY: the caller's contract on the buffers and `stream` is forwarded.
            unsafe { bufs.run::<T>(stream, call) }
        })
    })
}

/// The output-side form's forward on device memory ([`crate::cuda::ops::forward_out`]):
/// `y = u + ((u Cᵀ) φ1(Z)ᵀ) Aᵀ` for the base layer's output `u` (n×d, without bias, type
/// `dtype`) from any base layer (eq. 5, Prop. 1). `y` (n×d) may not overlap `u` (the backward
/// needs `u`). Fills `saved` ([`elra_gpu_op_sizes`]). Ordered on `stream`; asynchronous.
///
/// # Safety
/// As [`elra_gpu_op_forward`].
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_op_forward_out(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    dtype: u32,
    n: usize,
    a: *const f32,
    ld_a: usize,
    b: *const f32,
    ld_b: usize,
    eta: *const f32,
    u: *const c_void,
    ld_u: usize,
    y: *mut c_void,
    ld_y: usize,
    saved: *mut f32,
    workspace: *mut f32,
    workspace_len: usize,
    stream: *mut c_void,
) -> ElraStatus {
    guard(|| {
        let (op, spec) = parse(desc, step)?;
        let sz = gops::sizes(&op, n)?;
        let d = op.d;
        let act = vec![arg("u", u, (n, d), ld_u), output("y", y, (n, d), ld_y)];
        let mut f32s = gen_args(&op, a, ld_a, b, ld_b, eta);
        let n_gen = f32s.len();
        f32s.push(array("saved", saved.cast_const(), sz.saved, true));
        f32s.push(array(
            "workspace",
            workspace.cast_const(),
            workspace_len,
            true,
        ));
        let bufs = Bufs { act, f32s };
        by_dtype!(dtype, T => {
            bufs.host_checks::<T>()?;
            check_workspace(workspace_len, sz.workspace)?;
            let call = |dev: &CudaDevice,
                        am: &[CallerMatrix<T>],
                        fm: &[CallerMatrix<f32>]|
             -> CResult<()> {
                    // SAFETY: validated buffers of the call (Bufs::run's contract).
                    let (mut act, mut f) = unsafe { (lend_all(dev, am)?, lend_all(dev, fm)?) };
                    let (gen, rest) = f.split_at_mut(n_gen);
                    let (s, w) = rest.split_at_mut(1);
                    let (ub, yb) = act.split_at_mut(1);
                    Ok(gops::forward_out::<T>(
                        dev,
                        &op,
                        &spec,
                        &generator(&op, gen),
                        ub[0].get(),
                        yb[0].get_mut(),
                        s[0].get_mut(),
                        w[0].get_mut(),
                    )?)
            };
            // SAFETY: the caller's contract on the buffers and `stream` is forwarded.
            unsafe { bufs.run::<T>(stream, call) }
        })
    })
}

/// Reverse mode of [`elra_gpu_op_forward_out`] ([`crate::cuda::ops::backward_out`]):
/// `du = dy + V̄ C` (n×d, for the base layer's own backward) and the parameter gradients (written
/// or added; `C̄ = V̄ᵀ u`, Prop. 1, eq. 19; no energy term), from the forward's `u`, `saved`,
/// parameters and `step`. Ordered on `stream`; asynchronous.
///
/// # Safety
/// As [`elra_gpu_op_forward`].
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_op_backward_out(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    dtype: u32,
    n: usize,
    a: *const f32,
    ld_a: usize,
    b: *const f32,
    ld_b: usize,
    eta: *const f32,
    u: *const c_void,
    ld_u: usize,
    saved: *const f32,
    dy: *const c_void,
    ld_dy: usize,
    du: *mut c_void,
    ld_du: usize,
    da: *mut f32,
    ld_da: usize,
    db: *mut f32,
    ld_db: usize,
    deta: *mut f32,
    accumulate: u32,
    workspace: *mut f32,
    workspace_len: usize,
    stream: *mut c_void,
) -> ElraStatus {
    guard(|| {
        let (op, spec) = parse(desc, step)?;
        let accumulate = flag("accumulate", accumulate)?;
        let sz = gops::sizes(&op, n)?;
        let d = op.d;
        let act = vec![
            arg("u", u, (n, d), ld_u),
            arg("dy", dy, (n, d), ld_dy),
            output("du", du, (n, d), ld_du),
        ];
        let mut f32s = gen_args(&op, a, ld_a, b, ld_b, eta);
        let n_gen = f32s.len();
        let gr = grad_args(&op, (da, ld_da), (db, ld_db), deta);
        let n_grad = gr.len();
        f32s.extend(gr);
        f32s.push(array("saved", saved, sz.saved, false));
        f32s.push(array(
            "workspace",
            workspace.cast_const(),
            workspace_len,
            true,
        ));
        let bufs = Bufs { act, f32s };
        by_dtype!(dtype, T => {
            bufs.host_checks::<T>()?;
            check_workspace(workspace_len, sz.workspace)?;
            let call = |dev: &CudaDevice,
                        am: &[CallerMatrix<T>],
                        fm: &[CallerMatrix<f32>]|
             -> CResult<()> {
                    // SAFETY: validated buffers of the call (Bufs::run's contract).
                    let (mut act, mut f) = unsafe { (lend_all(dev, am)?, lend_all(dev, fm)?) };
                    let (gen, rest) = f.split_at_mut(n_gen);
                    let (g, rest) = rest.split_at_mut(n_grad);
                    let (s, w) = rest.split_at_mut(1);
                    let (inputs, dub) = act.split_at_mut(2);
                    Ok(gops::backward_out::<T>(
                        dev,
                        &op,
                        &spec,
                        &generator(&op, gen),
                        inputs[0].get(),
                        s[0].get(),
                        inputs[1].get(),
                        dub[0].get_mut(),
                        grads(&op, g, accumulate),
                        w[0].get_mut(),
                    )?)
            };
            // SAFETY: the caller's contract on the buffers and `stream` is forwarded.
            unsafe { bufs.run::<T>(stream, call) }
        })
    })
}

/// The merged weight on device memory ([`crate::cuda::ops::merge`]): `out = exp(G) w =
/// w + A (φ1(Z) (C w))` of `w` (d×k, type `dtype`) (eq. 30, merge: pass `W0`), or with
/// `inverse = 1` the unmerge `out = exp(−G) w` (Prop. 3), into `out` (d×k); with `right = 1` the
/// same on the right, `out = w exp(±G)` for a k×d `w` (App. B eq. 22). `out` may not overlap `w`.
/// Ordered on `stream`; asynchronous.
///
/// # Safety
/// As [`elra_gpu_op_forward`].
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_op_merge(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    dtype: u32,
    a: *const f32,
    ld_a: usize,
    b: *const f32,
    ld_b: usize,
    eta: *const f32,
    w: *const c_void,
    ld_w: usize,
    inverse: u32,
    right: u32,
    out: *mut c_void,
    ld_out: usize,
    workspace: *mut f32,
    workspace_len: usize,
    stream: *mut c_void,
) -> ElraStatus {
    guard(|| {
        let (op, spec) = parse(desc, step)?;
        let inverse = flag("inverse", inverse)?;
        let (side, shape) = if flag("right", right)? {
            (Side::Right, (op.k, op.d))
        } else {
            (Side::Left, (op.d, op.k))
        };
        let need = gops::unbatched_workspace(&op)?;
        let act = vec![arg("w", w, shape, ld_w), output("out", out, shape, ld_out)];
        let mut f32s = gen_args(&op, a, ld_a, b, ld_b, eta);
        let n_gen = f32s.len();
        f32s.push(array(
            "workspace",
            workspace.cast_const(),
            workspace_len,
            true,
        ));
        let bufs = Bufs { act, f32s };
        by_dtype!(dtype, T => {
            bufs.host_checks::<T>()?;
            check_workspace(workspace_len, need)?;
            let call = |dev: &CudaDevice,
                        am: &[CallerMatrix<T>],
                        fm: &[CallerMatrix<f32>]|
             -> CResult<()> {
                    // SAFETY: validated buffers of the call (Bufs::run's contract).
                    let (mut act, mut f) = unsafe { (lend_all(dev, am)?, lend_all(dev, fm)?) };
                    let (gen, w) = f.split_at_mut(n_gen);
                    let (wb, ob) = act.split_at_mut(1);
                    Ok(gops::merge::<T>(
                        dev,
                        &op,
                        &spec,
                        &generator(&op, gen),
                        wb[0].get(),
                        inverse,
                        side,
                        ob[0].get_mut(),
                        w[0].get_mut(),
                    )?)
            };
            // SAFETY: the caller's contract on the buffers and `stream` is forwarded.
            unsafe { bufs.run::<T>(stream, call) }
        })
    })
}

/// The energy penalty `*energy = λ‖G‖²_F = λ tr((AᵀA)(CCᵀ))` of the step's generator (eq. 20–21,
/// λ = `step->lambda`) into the device f32 scalar `energy` (overwritten) and, when `da` is not
/// NULL, its gradient written or added (`accumulate`) into `da`, `db` (not for PSD) and `*deta`
/// (device f32; through eq. 19). Ordered on `stream`; asynchronous.
///
/// # Safety
/// As [`elra_gpu_op_forward`]; `da`, `db`, `deta` may be NULL together.
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_op_energy(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    a: *const f32,
    ld_a: usize,
    b: *const f32,
    ld_b: usize,
    eta: *const f32,
    energy: *mut f32,
    da: *mut f32,
    ld_da: usize,
    db: *mut f32,
    ld_db: usize,
    deta: *mut f32,
    accumulate: u32,
    workspace: *mut f32,
    workspace_len: usize,
    stream: *mut c_void,
) -> ElraStatus {
    guard(|| {
        let (op, spec) = parse(desc, step)?;
        let accumulate = flag("accumulate", accumulate)?;
        let need = gops::unbatched_workspace(&op)?;
        let want_grads = !da.is_null();
        let mut f32s = gen_args(&op, a, ld_a, b, ld_b, eta);
        let n_gen = f32s.len();
        let gr = if want_grads {
            grad_args(&op, (da, ld_da), (db, ld_db), deta)
        } else {
            Vec::new()
        };
        let n_grad = gr.len();
        f32s.extend(gr);
        f32s.push(array("energy", energy.cast_const(), 1, true));
        f32s.push(array(
            "workspace",
            workspace.cast_const(),
            workspace_len,
            true,
        ));
        let bufs = Bufs {
            act: Vec::new(),
            f32s,
        };
        bufs.host_checks::<f32>()?;
        check_workspace(workspace_len, need)?;
        let call =
            |dev: &CudaDevice, _: &[CallerMatrix<f32>], fm: &[CallerMatrix<f32>]| -> CResult<()> {
                // SAFETY: validated buffers of the call (Bufs::run's contract).
                let mut f = unsafe { lend_all(dev, fm)? };
                let (gen, rest) = f.split_at_mut(n_gen);
                let (g, rest) = rest.split_at_mut(n_grad);
                let (e, w) = rest.split_at_mut(1);
                let gr = want_grads.then(|| grads(&op, g, accumulate));
                Ok(gops::energy(
                    dev,
                    &op,
                    &spec,
                    &generator(&op, gen),
                    e[0].get_mut(),
                    gr,
                    w[0].get_mut(),
                )?)
            };
        // SAFETY: the caller's contract on the buffers and `stream` is forwarded.
        unsafe { bufs.run::<f32>(stream, call) }
    })
}

/// The overflow rule on the GPU, on request: ORs 1 into the device u32 `*flag` when the device
/// matrix `x` (rows×cols of type `dtype`, row stride `ld ≥ cols`; the padding past `cols` is not
/// read) holds NaN or ±Inf ([`crate::cuda::ops::check_finite`]). The CPU calls always check their
/// outputs and return `ELRA_OVERFLOW` when finite inputs give a non-finite result; the GPU calls
/// do not (a scan costs one more read of each output, and acting on it a host wait), so an engine
/// zeroes a flag, scans the outputs it wants checked with this call — one read of `x`, no write
/// unless something is found, no host synchronisation — and reads the flag when it synchronises
/// anyway: a set flag is its `ELRA_OVERFLOW`. Ordered on `stream`; asynchronous.
///
/// Errors: `ELRA_NULL_POINTER` (`x`, `flag`), `ELRA_INVALID_ARGUMENT` (dtype, zero dimensions,
/// `ld < cols`, misalignment, a size beyond the address space, `flag` inside `x`, memory that is
/// not on `x`'s device), `ELRA_NO_DEVICE`.
///
/// # Safety
/// `x` must be device memory covering the described layout and `flag` one device `uint32_t`,
/// both alive until `stream` has passed the call; `stream` NULL or a live stream of the device's
/// primary context.
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_check_finite(
    dtype: u32,
    x: *const c_void,
    rows: usize,
    cols: usize,
    ld: usize,
    flag: *mut u32,
    stream: *mut c_void,
) -> ElraStatus {
    guard(|| {
        if x.is_null() {
            return Err(CError::Null("x"));
        }
        if flag.is_null() {
            return Err(CError::Null("flag"));
        }
        let f = flag.cast_const().cast::<c_void>();
        by_dtype!(dtype, T => {
            let span = |dev: Option<&CudaDevice>| -> CResult<_> {
                let xs = CallerSpan::<T>::check(dev, "x", x, rows, cols, ld)?;
                let fs = CallerSpan::<u32>::check(dev, "flag", f, 1, 1, 1)?;
                if fs.ptr < xs.ptr + xs.bytes as u64 && xs.ptr < fs.ptr + fs.bytes as u64 {
                    return Err(ElraError::invalid("flag", "overlaps `x`").into());
                }
                Ok((xs, fs))
            };
            span(None)?;
            device_count()?;
            let _ctx = CtxRestore::new();
            let shared = shared_stream(ordinal_of("x", x)?)?;
            let caller = shared
                .lock()
                .map_err(|_| ElraError::Cuda("stream poisoned by an earlier panic".into()))?;
            let dev = caller.device().clone();
            let (xs, fs) = span(Some(&dev))?;
            // SAFETY: validated spans on `dev`, alive until the caller's stream passes the call
            // (caller contract), which `ordered` orders after the scan.
            let run = || -> CResult<()> { Ok(unsafe { gops::check_finite_span(&dev, &xs, &fs) }?) };
            // SAFETY: the caller's contract on `stream`.
            unsafe { caller.ordered(stream, run) }
        })
    })
}

/// One adapter of a layer's set for [`elra_gpu_op_multi_forward`]: `variant` an
/// [`super::ElraVariant`] value — general, PSD or Hyb (ELRA: `a` = `A` d×r, `b` = `B` r×d or
/// NULL for PSD, `eta` the device scalar η, `step` the settings of its step, τ = 0) or LoRA (`a` =
/// `lora_A` r×k, `b` = `lora_B` d×r, `scale` = `lora_alpha / r`; `eta` and `step` unused). `a`,
/// `b` and `eta` are f32 device memory, row-major with `ld_a`, `ld_b` equal to their widths.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ElraGpuMultiAdapter {
    /// An `ElraVariant` value.
    pub variant: u32,
    /// Rank r, 1 … [`crate::cuda::MAX_RANK`].
    pub r: usize,
    /// ELRA's `A` (d×r) or LoRA's `lora_A` (r×k).
    pub a: *const f32,
    /// Leading dimension of `a`.
    pub ld_a: usize,
    /// ELRA's `B` (r×d; NULL for PSD) or LoRA's `lora_B` (d×r).
    pub b: *const f32,
    /// Leading dimension of `b`.
    pub ld_b: usize,
    /// ELRA: η on the device (one f32); LoRA: unused, may be NULL.
    pub eta: *const f32,
    /// LoRA: the scaling `s`; ELRA: unused.
    pub scale: f32,
    /// ELRA: α, η multiplier of the adapter's step (τ = 0, λ unused); LoRA: unused.
    pub step: ElraOpStep,
}

/// The adapters of a multi call, read and checked on the host: `(variant, r, spec)`.
fn multi_descs(
    adapters: *const ElraGpuMultiAdapter,
    count: usize,
) -> CResult<
    Vec<(
        ElraGpuMultiAdapter,
        Option<crate::adapter::Variant>,
        GeneratorSpec,
    )>,
> {
    if count > gops::MAX_GPU_ADAPTERS {
        return Err(ElraError::invalid(
            "count",
            format!("{count} adapters; at most {}", gops::MAX_GPU_ADAPTERS),
        )
        .into());
    }
    if count > 0 && adapters.is_null() {
        return Err(CError::Null("adapters"));
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        // SAFETY: non-null; the caller guarantees `count` readable descriptions (plain data).
        let m = unsafe { adapters.add(i).read_unaligned() };
        let tag = |e: CError| super::ops::about_adapter(i, e);
        let variant = super::config::variant_of(m.variant).map_err(tag)?;
        check_rank(m.r).map_err(|e| tag(e.into()))?;
        let spec = match variant {
            Some(_) => step_of(&m.step)
                .and_then(|s| Ok(s.require_no_clip()?))
                .map_err(tag)?,
            None => GeneratorSpec {
                alpha: 0.0,
                eta_mult: 1.0,
                tau: None,
                lambda: 0.0,
            },
        };
        out.push((m, variant, spec));
    }
    Ok(out)
}

/// The workspace, in f32 values, of [`elra_gpu_op_multi_forward`] for `n` rows of a layer with
/// output dimension `d` and the `count` adapters described by `adapters` (only their variants
/// and ranks are read; [`crate::cuda::ops::multi_sizes`]).
///
/// # Safety
/// `adapters` must point to `count` readable descriptions (or be NULL with `count = 0`);
/// `workspace_len` to a writable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_op_multi_sizes(
    adapters: *const ElraGpuMultiAdapter,
    count: usize,
    n: usize,
    d: usize,
    workspace_len: *mut usize,
) -> ElraStatus {
    guard(|| {
        check_scalar_out("workspace_len", workspace_len)?;
        let descs = multi_descs(adapters, count)?;
        let ranks: Vec<(usize, bool)> = descs.iter().map(|(m, v, _)| (m.r, v.is_some())).collect();
        let w = gops::multi_sizes(n, d, &ranks)?;
        // SAFETY: validated; the caller guarantees writability.
        unsafe { workspace_len.write(w) };
        Ok(())
    })
}

/// Many adapters of one layer in one batch on device memory
/// ([`crate::cuda::ops::multi_forward`], the GPU twin of
/// [`elra_op_multi_forward_f32`](super::elra_op_multi_forward_f32)): row `i` of `x` (n×k) goes
/// through adapter `index[i]` (device int32, n values; −1: the base alone),
/// `y_i = x_i W0ᵀ + bias + Δ_{index[i]}(x_i)` into `y` (n×d), ELRA's `Δ = ((u Cᵀ) φ1(CA)ᵀ) Aᵀ` on
/// `u = x W0ᵀ` (eq. 3/5, Prop. 1), LoRA's `s (x Aᵀ) Bᵀ`. `w0` (d×k), `x`, `y` and `bias` (d
/// values, or NULL) have the activation type `dtype`. The frozen GEMM runs once; the rows are
/// grouped by adapter on the device. A row whose index lies outside `[−1, count)` is written as
/// NaN (no host wait reads the index). `workspace` holds `workspace_len` f32 values
/// ([`elra_gpu_op_multi_sizes`]). Forward only. Ordered on `stream`; asynchronous.
///
/// # Safety
/// As [`elra_gpu_op_forward`]; `adapters` points to `count` readable descriptions whose device
/// buffers stay allocated until `stream` has passed the call.
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_op_multi_forward(
    dtype: u32,
    adapters: *const ElraGpuMultiAdapter,
    count: usize,
    index: *const i32,
    n: usize,
    w0: *const c_void,
    ld_w0: usize,
    d: usize,
    k: usize,
    bias: *const c_void,
    x: *const c_void,
    ld_x: usize,
    y: *mut c_void,
    ld_y: usize,
    workspace: *mut f32,
    workspace_len: usize,
    stream: *mut c_void,
) -> ElraStatus {
    guard(|| {
        let descs = multi_descs(adapters, count)?;
        let ranks: Vec<(usize, bool)> = descs.iter().map(|(m, v, _)| (m.r, v.is_some())).collect();
        let need = gops::multi_sizes(n, d, &ranks)?;
        let mut act = vec![
            arg("w0", w0, (d, k), ld_w0),
            arg("x", x, (n, k), ld_x),
            output("y", y, (n, d), ld_y),
        ];
        if !bias.is_null() {
            act.push(arg("bias", bias, (1, d), d));
        }
        // The workspace names the device; the index is checked as n 4-byte values (an f32
        // array's size and alignment) and lent as int32.
        let mut f32s = vec![
            array("workspace", workspace.cast_const(), workspace_len, true),
            array("index", index.cast::<f32>(), n, false),
        ];
        // Per adapter: a, b (when it has one), eta (ELRA).
        let mut per = Vec::with_capacity(count);
        for (m, variant, _) in &descs {
            let start = f32s.len();
            match variant {
                Some(v) => {
                    f32s.push(arg("a", m.a, (d, m.r), m.ld_a));
                    if v.uses_b() {
                        f32s.push(arg("b", m.b, (m.r, d), m.ld_b));
                    }
                    f32s.push(array("eta", m.eta, 1, false));
                }
                None => {
                    f32s.push(arg("lora_a", m.a, (m.r, k), m.ld_a));
                    f32s.push(arg("lora_b", m.b, (d, m.r), m.ld_b));
                }
            }
            per.push(start..f32s.len());
        }
        let bufs = Bufs { act, f32s };
        by_dtype!(dtype, T => {
            bufs.host_checks::<T>()?;
            check_workspace_of(workspace_len, need, "elra_gpu_op_multi_sizes")?;
            let call = |dev: &CudaDevice,
                        am: &[CallerMatrix<T>],
                        fm: &[CallerMatrix<f32>]|
             -> CResult<()> {
                // SAFETY: validated buffers of the call (Bufs::run's contract); the index was
                // checked as n 4-byte values of this device, aligned to 4 bytes.
                let (mut act, mut f, index_s) = unsafe {
                    (
                        lend_all(dev, am)?,
                        lend_all(dev, fm)?,
                        crate::cuda::BorrowedSlice::<i32>::new(dev, fm[1].ptr, n),
                    )
                };
                let (ws, params) = f.split_at_mut(1);
                let set: Vec<gops::GpuMultiAdapter<'_>> = descs
                    .iter()
                    .zip(&per)
                    .map(|((m, variant, spec), range)| {
                        let p = &params[range.start - 1..range.end - 1];
                        match variant {
                            Some(v) => gops::GpuMultiAdapter::Elra {
                                variant: *v,
                                generator: GpuGenerator {
                                    a: p[0].get(),
                                    b: v.uses_b().then(|| p[1].get()),
                                    eta: p[p.len() - 1].get(),
                                },
                                spec: *spec,
                            },
                            None => gops::GpuMultiAdapter::Lora {
                                a: p[0].get(),
                                b: p[1].get(),
                                scale: m.scale,
                            },
                        }
                    })
                    .collect();
                let (inputs, rest) = act.split_at_mut(2);
                let (yb, bias_b) = rest.split_at_mut(1);
                Ok(gops::multi_forward::<T>(
                    dev,
                    inputs[0].get(),
                    bias_b.first().map(|b| b.get()),
                    &set,
                    index_s.get(),
                    inputs[1].get(),
                    yb[0].get_mut(),
                    ws[0].get_mut(),
                )?)
            };
            // SAFETY: the caller's contract on the buffers and `stream` is forwarded.
            unsafe { bufs.run::<T>(stream, call) }
        })
    })
}
