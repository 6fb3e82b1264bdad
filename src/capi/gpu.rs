//! The GPU adapter handle `ElraGpuAdapter` (feature `cuda`; declared in `elra.h` under
//! `#if defined(ELRA_FEATURE_CUDA)`): the ELRA layer `y = x W_newᵀ`, `W_new = exp(G) W0` (eq. 3) through
//! the Woodbury form of Prop. 1 (eq. 5) or the merged weight (eq. 30), and the LoRA baseline, on
//! **device pointers owned by the caller**, ordered on the caller's CUDA stream.
//!
//! # Conventions (in addition to the module conventions of [`crate::capi`])
//! - **Context.** A handle lives on one device ordinal and uses that device's *primary* context
//!   (`cuDevicePrimaryCtxRetain`, as the CUDA runtime and PyTorch do). Device pointers must come
//!   from memory usable in that context (cudaMalloc, the PyTorch caching allocator, managed
//!   memory) and live on the handle's device (checked with `cuPointerGetAttribute`); streams
//!   must belong to that context.
//! - **Streams.** Every call that reads or writes caller device memory takes a `CUstream` as
//!   `void *stream` (NULL: the legacy default stream). The call is ordered like a kernel launched
//!   on that stream: the library records an event on `stream`, makes its own stream wait for it,
//!   enqueues its work there, records an event on its stream and makes `stream` wait for that. The
//!   call returns without synchronising the host (except where documented); caller memory may be
//!   reused or freed by work later enqueued on `stream` (this is what the PyTorch caching
//!   allocator does), but not by the host or another stream before `stream` has reached that point.
//! - **Device matrices** are row-major and contiguous: a rows×cols matrix at `p` with leading
//!   dimension `ld` must have `ld == cols` (strided device layouts are reserved for a later ABI
//!   version and return `ELRA_INVALID_ARGUMENT`). Their elements have the handle's activation type
//!   ([`ElraGpuDtype`]: f32, f16 or bf16), aligned to it. Inputs and outputs may not overlap.
//! - **Host buffers** (parameters, gradients) are f32, row-major with `ld ≥ cols`, as in the CPU
//!   ABI; the functions that read device results into them synchronise the handle's stream.
//! - **What is checked.** NULL pointers, zero dims, `ld != cols`, misalignment, memory that is not
//!   device memory of the handle's device, overlapping outputs, dtype and shape mismatches are
//!   reported before any work is enqueued. Device inputs are **not** scanned for NaN/±Inf (that
//!   would cost a pass over them): non-finite activations propagate to the outputs. Failures of
//!   the r×r matrix functions are reported by [`elra_gpu_adapter_synchronize`] and
//!   [`elra_gpu_adapter_get_grads`].
//! - **Not on the GPU.** The spectral clip τ of App. H (`tau` must be 0), f64 activations, ranks
//!   above [`crate::cuda::MAX_RANK`].
//! - **Threads.** A handle is not synchronised: use it from one thread at a time.
//!
//! Without a usable driver or device (a `cuda` build on a machine without a GPU), every function
//! that needs one returns `ELRA_NO_DEVICE`; none panics.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::{self as cu, CUdeviceptr, CUstream};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DriverError};
use half::{bf16, f16};
use nalgebra::DMatrix;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::config::{variant_of, ElraAdapterConfig};
use super::layout::{check_scalar_out, out_layout, read_matrix, row_major};
use super::{guard, write_out, CError, CResult, ElraStatus};
use crate::adapter::{kaiming_uniform, xavier_uniform, ElraConfig, LoraConfig, LoraInit};
use crate::cuda::{
    choose_route, device_count, Activation, BorrowedMatrices, CudaDevice, DeviceMatrices,
    GpuElraLayer, GpuLoraLayer, GpuSpec, MAX_RANK,
};
use crate::grad::Route;
use crate::ElraError;

/// Activation (and `W0`) element type of a GPU handle, in `ElraAdapterConfig::dtype`. The f32
/// value equals `ELRA_DTYPE_F32`; f64 (`ELRA_DTYPE_F64` = 1) is not available on the GPU.
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElraGpuDtype {
    /// 32-bit IEEE float (GEMMs in full f32, no TF32).
    ELRA_GPU_DTYPE_F32 = 0,
    /// IEEE half precision (f32 accumulation).
    ELRA_GPU_DTYPE_F16 = 2,
    /// bfloat16 (f32 accumulation).
    ELRA_GPU_DTYPE_BF16 = 3,
}

/// How [`elra_gpu_adapter_backward`] obtains the forward tape (its `flags` argument).
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElraGpuBackward {
    /// Recompute the forward pass of `x` inside the backward (always correct; one more forward).
    ELRA_GPU_BACKWARD_RECOMPUTE = 0,
    /// Reuse the tape of the last [`elra_gpu_adapter_forward`] on this handle. Allowed only when
    /// that forward had the same `x` pointer, `n` and `ld_x` and no parameter or step was set
    /// since (else `ELRA_INVALID_ARGUMENT`); the caller guarantees that `x`'s contents did not
    /// change in between (as autograd requires of saved tensors).
    ELRA_GPU_BACKWARD_REUSE_FORWARD = 1,
}

const GPU_MAGIC: u64 = 0x454c_5241_4750_5541; // "ELRAGPUA"

/// The layer of one activation type (one per handle, boxed inside it: the size difference of
/// the variants does not matter).
#[allow(clippy::large_enum_variant)]
enum Layer<T: Activation> {
    Elra(GpuElraLayer<T>),
    Lora(GpuLoraLayer<T>),
}

/// A layer with the buffer of a forward recomputed inside a backward.
struct Typed<T: Activation> {
    layer: Layer<T>,
    /// `y` of the recomputed forward (N×d), reallocated when N changes.
    y_scratch: Option<DeviceMatrices<T>>,
}

enum Inner {
    F32(Typed<f32>),
    F16(Typed<f16>),
    Bf16(Typed<bf16>),
}

/// Runs `$body` with `$t` bound to the `Typed<T>` of whichever activation type the handle has.
macro_rules! with_typed {
    ($inner:expr, $t:ident => $body:expr) => {
        match $inner {
            Inner::F32($t) => $body,
            Inner::F16($t) => $body,
            Inner::Bf16($t) => $body,
        }
    };
}

/// What the last forward ran on (for [`ElraGpuBackward::ELRA_GPU_BACKWARD_REUSE_FORWARD`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TapeKey {
    x: CUdeviceptr,
    n: usize,
    ld_x: usize,
    generation: u64,
}

/// An ELRA or LoRA adapter on a CUDA device (opaque to C): the device's primary context, the
/// device's one stream (shared with every other handle on that device), a cuBLAS handle of its
/// own, a library-owned copy of `W0`, the parameters and gradients in f32 device memory, and the
/// activation tapes.
pub struct ElraGpuAdapter {
    magic: u64,
    config: ElraAdapterConfig,
    /// `None` for LoRA.
    elra: Option<ElraConfig>,
    step: usize,
    /// Bumped whenever parameters or the step change (invalidates the forward tape).
    generation: u64,
    last_forward: Option<TapeKey>,
    has_grads: bool,
    ev_in: Arc<CudaEvent>,
    ev_out: Arc<CudaEvent>,
    inner: Inner,
    /// Declared last: dropped after the layers that use its stream.
    dev: CudaDevice,
}

fn drv<T>(r: std::result::Result<T, DriverError>) -> CResult<T> {
    r.map_err(|e| CError::Elra(ElraError::from(e)))
}

fn invalid(arg: &'static str, why: impl Into<String>) -> CError {
    CError::Elra(ElraError::invalid(arg, why))
}

/// Restores the calling thread's current CUDA context when dropped. cudarc binds the handle's
/// primary context to the thread; an engine that had another device's context current (the CUDA
/// runtime's "current device") gets it back. Create only once the driver is known to be loaded.
struct CtxRestore(Option<cu::CUcontext>);

impl CtxRestore {
    fn new() -> Self {
        CtxRestore(cudarc::driver::result::ctx::get_current().ok().flatten())
    }
}

impl Drop for CtxRestore {
    fn drop(&mut self) {
        if let Some(prev) = self.0 {
            let now = cudarc::driver::result::ctx::get_current().ok().flatten();
            if now != Some(prev) {
                // SAFETY: `prev` was the thread's current context when the export was entered
                // (owned by whoever made it current; the library never destroys contexts), so
                // making it current again is what the thread had before the call.
                let _ = unsafe { cudarc::driver::result::ctx::set_current(prev) };
            }
        }
    }
}

/// Makes the caller's stream wait for the library's stream when dropped, so that work enqueued
/// before an early return (or a panic) is still ordered before the caller's later work.
struct JoinBack {
    ours: Arc<CudaStream>,
    caller: Arc<CudaStream>,
    ev: Arc<CudaEvent>,
    done: bool,
}

impl JoinBack {
    fn finish(mut self) -> CResult<()> {
        self.done = true;
        drv(self.ev.record(&self.ours))?;
        drv(self.caller.wait(&self.ev))
    }
}

impl Drop for JoinBack {
    fn drop(&mut self) {
        if !self.done {
            // Best effort on the error path; the error being returned is the one to report.
            if self.ev.record(&self.ours).is_ok() {
                let _ = self.caller.wait(&self.ev);
            }
        }
    }
}

/// Orders `f` (work enqueued on `dev`'s stream) after the caller's `stream` and the caller's later
/// work on `stream` after `f`.
fn ordered<R>(
    dev: &CudaDevice,
    ev_in: &Arc<CudaEvent>,
    ev_out: &Arc<CudaEvent>,
    stream: *mut c_void,
    f: impl FnOnce() -> CResult<R>,
) -> CResult<R> {
    let ctx = dev.context();
    drv(ctx.bind_to_thread())?;
    // SAFETY: the export's caller guarantees that `stream` is NULL (the legacy default stream) or
    // a live stream of this device's primary context that outlives the call. The wrapper does not
    // own the stream (dropping it destroys nothing), and all work we submit through it is an
    // event record or wait, ordered by this function.
    let caller = unsafe { ctx.wrap_borrowed_stream(stream as CUstream) };
    drv(ev_in.record(&caller))?;
    drv(dev.stream().wait(ev_in))?;
    let join = JoinBack {
        ours: dev.stream().clone(),
        caller,
        ev: ev_out.clone(),
        done: false,
    };
    let r = f()?;
    join.finish()?;
    Ok(r)
}

/// A caller device matrix after validation: its address and dims.
#[derive(Clone, Copy, Debug)]
struct DevMat {
    arg: &'static str,
    ptr: CUdeviceptr,
    rows: usize,
    cols: usize,
    bytes: usize,
}

/// Validates a caller device matrix of `T` without touching it: NULL, zero dims, `ld == cols`,
/// alignment, size, and that the driver knows the address as memory of `dev`'s device.
fn dev_mat<T: Activation>(
    dev: Option<&CudaDevice>,
    arg: &'static str,
    p: *const c_void,
    rows: usize,
    cols: usize,
    ld: usize,
) -> CResult<DevMat> {
    if p.is_null() {
        return Err(CError::Null(arg));
    }
    if rows == 0 || cols == 0 {
        return Err(invalid(
            arg,
            format!("zero dimension ({rows}×{cols} matrix)"),
        ));
    }
    if ld != cols {
        return Err(invalid(
            arg,
            format!(
                "leading dimension {ld} ≠ {cols} columns: device matrices must be contiguous \
                 row-major (ld = cols)"
            ),
        ));
    }
    let size = std::mem::size_of::<T>();
    if (p as usize) % size != 0 {
        return Err(invalid(
            arg,
            format!("device pointer is not aligned to {size} bytes"),
        ));
    }
    let bytes = rows
        .checked_mul(cols)
        .and_then(|x| x.checked_mul(size))
        .filter(|&b| b <= isize::MAX as usize && (p as usize).checked_add(b).is_some())
        .ok_or_else(|| invalid(arg, "the described memory exceeds the address space"))?;
    let ptr = p as CUdeviceptr;
    if let Some(dev) = dev {
        let mut ordinal: i32 = -1;
        // SAFETY: the driver writes one `int` (the attribute's documented type) into `ordinal`, a
        // live local; it only looks the address up in its allocation tables and never
        // dereferences it.
        let r = unsafe {
            cu::cuPointerGetAttribute(
                (&mut ordinal as *mut i32).cast(),
                cu::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                ptr,
            )
        };
        if r != cu::CUresult::CUDA_SUCCESS {
            return Err(invalid(
                arg,
                format!("not device memory known to the CUDA driver ({r:?})"),
            ));
        }
        if usize::try_from(ordinal).ok() != Some(dev.ordinal()) {
            return Err(invalid(
                arg,
                format!(
                    "memory is on device {ordinal} but the handle is on device {}",
                    dev.ordinal()
                ),
            ));
        }
    }
    Ok(DevMat {
        arg,
        ptr,
        rows,
        cols,
        bytes,
    })
}

/// Errors when an output overlaps any other buffer of the call.
fn no_overlap(outputs: &[DevMat], all: &[DevMat]) -> CResult<()> {
    for o in outputs {
        for m in all {
            if std::ptr::eq(o, m) || (o.arg == m.arg && o.ptr == m.ptr) {
                continue;
            }
            let (a0, a1) = (o.ptr, o.ptr + o.bytes as u64);
            let (b0, b1) = (m.ptr, m.ptr + m.bytes as u64);
            if a0 < b1 && b0 < a1 {
                return Err(invalid(
                    o.arg,
                    format!("overlaps `{}` (device buffers may not alias)", m.arg),
                ));
            }
        }
    }
    Ok(())
}

/// Wraps a validated caller matrix without copying.
///
/// # Safety
/// The export's caller guarantees that `m` describes live device memory of `dev`'s context, not
/// freed before the work enqueued through the wrapper has run on the caller's stream.
unsafe fn borrow<T: Activation>(dev: &CudaDevice, m: &DevMat) -> CResult<BorrowedMatrices<T>> {
    // SAFETY: forwarded; `dev_mat` checked alignment, size and the device.
    Ok(unsafe { BorrowedMatrices::new(dev, m.ptr, 1, m.rows, m.cols)? })
}

/// α (eq. 19), the η multiplier (App. H) and λ (eq. 20) of an ELRA config at `step`.
fn gpu_spec(cfg: &ElraConfig, step: usize) -> CResult<GpuSpec> {
    let g = &cfg.generator;
    let s = GpuSpec {
        alpha: g.alpha_at(step),
        eta_mult: g.eta_multiplier.at(step),
        lambda: g.lambda,
    };
    if !s.eta_mult.is_finite() || s.eta_mult <= 0.0 {
        return Err(invalid(
            "step",
            format!(
                "the η multiplier at step {step} is {} (the GPU layer needs it > 0)",
                s.eta_mult
            ),
        ));
    }
    Ok(s)
}

/// Borrows a GPU handle after checking NULL, alignment and the magic tag.
///
/// # Safety
/// `h` must be NULL or a live handle from [`elra_gpu_adapter_create`]; with exclusive access.
unsafe fn gpu_handle<'a>(h: *mut ElraGpuAdapter) -> CResult<&'a mut ElraGpuAdapter> {
    if h.is_null() {
        return Err(CError::Null("adapter"));
    }
    if (h as usize) % std::mem::align_of::<ElraGpuAdapter>() != 0 {
        return Err(invalid("adapter", "misaligned handle pointer"));
    }
    // SAFETY: non-null and aligned; the caller guarantees a live handle with exclusive access.
    let a = unsafe { &mut *h };
    if a.magic != GPU_MAGIC {
        return Err(invalid("adapter", "not a live elra GPU adapter handle"));
    }
    Ok(a)
}

/// Shared-reference variant of [`gpu_handle`].
///
/// # Safety
/// As [`gpu_handle`], shared access suffices.
unsafe fn gpu_handle_ref<'a>(h: *const ElraGpuAdapter) -> CResult<&'a ElraGpuAdapter> {
    if h.is_null() {
        return Err(CError::Null("adapter"));
    }
    if (h as usize) % std::mem::align_of::<ElraGpuAdapter>() != 0 {
        return Err(invalid("adapter", "misaligned handle pointer"));
    }
    // SAFETY: non-null and aligned; the caller guarantees a live handle.
    let a = unsafe { &*h };
    if a.magic != GPU_MAGIC {
        return Err(invalid("adapter", "not a live elra GPU adapter handle"));
    }
    Ok(a)
}

impl ElraGpuAdapter {
    fn dims(&self) -> (usize, usize, usize) {
        (self.config.d, self.config.k, self.config.r)
    }

    fn is_lora(&self) -> bool {
        self.elra.is_none()
    }

    fn uses_b(&self) -> bool {
        self.elra.as_ref().is_none_or(|c| c.variant().uses_b())
    }

    /// `(rows, cols)` of parameter `which` ([`super::ElraParam`]); W0 is not addressable here.
    fn param_shape(&self, which: u32) -> CResult<(usize, usize)> {
        let (d, k, r) = self.dims();
        let lora = self.is_lora();
        match which {
            0 if lora => Ok((r, k)),
            0 => Ok((d, r)),
            1 if lora => Ok((d, r)),
            1 if self.uses_b() => Ok((r, d)),
            1 => Err(invalid(
                "which",
                "this adapter has no factor B (ELRA-PSD: G = ηAAᵀ)",
            )),
            2 if lora => Err(invalid("which", "this adapter has no step size η (LoRA)")),
            2 => Ok((1, 1)),
            3 => Ok((d, k)),
            v => Err(invalid("which", format!("unknown ElraParam value {v}"))),
        }
    }
}

fn gpu_dtype(v: u32) -> CResult<ElraGpuDtype> {
    match v {
        0 => Ok(ElraGpuDtype::ELRA_GPU_DTYPE_F32),
        2 => Ok(ElraGpuDtype::ELRA_GPU_DTYPE_F16),
        3 => Ok(ElraGpuDtype::ELRA_GPU_DTYPE_BF16),
        1 => Err(invalid(
            "dtype",
            "f64 activations are not available on the GPU (use f32, f16 or bf16)",
        )),
        _ => Err(invalid("dtype", format!("unknown ElraGpuDtype value {v}"))),
    }
}

// ------------------------------------------------------------------------------------------
// Creation, destruction, information
// ------------------------------------------------------------------------------------------

/// Number of CUDA devices in `*count`; `ELRA_NO_DEVICE` (with the reason in the error text) when
/// the driver or cuBLAS cannot be loaded or no device is present.
///
/// # Safety
/// `count` must point to a writable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn elra_cuda_device_count(count: *mut usize) -> ElraStatus {
    guard(|| {
        check_scalar_out("count", count)?;
        let n = device_count()?;
        // SAFETY: validated non-null and aligned; the caller guarantees writability.
        unsafe { count.write(n) };
        Ok(())
    })
}

/// The parsed, validated creation request.
struct Request {
    dtype: ElraGpuDtype,
    elra: Option<ElraConfig>,
    lora: Option<LoraConfig>,
}

fn parse_config(c: &ElraAdapterConfig) -> CResult<Request> {
    let dtype = gpu_dtype(c.dtype)?;
    let (elra, lora) = match variant_of(c.variant)? {
        Some(v) => {
            let cfg = c.elra(v)?;
            if cfg.generator.tau.is_some() {
                return Err(invalid(
                    "tau",
                    "the GPU layer has no spectral clip (App. H): set tau = 0",
                ));
            }
            (Some(cfg), None)
        }
        None => (None, Some(c.lora()?)),
    };
    if c.r > MAX_RANK {
        return Err(invalid(
            "r",
            format!("the GPU layer supports ranks 1..={MAX_RANK}, got {}", c.r),
        ));
    }
    Ok(Request { dtype, elra, lora })
}

/// Creates a GPU adapter on device `device` (a CUDA ordinal) from `config` (as for
/// [`super::elra_adapter_create`], with `dtype` an [`ElraGpuDtype`] and `tau = 0`) on the frozen
/// weight `w0`: a **device** pointer to d×k elements of the activation type, row-major with
/// `ld_w0 == k`. `W0` is copied once into library-owned device memory, ordered on `stream` (NULL:
/// the legacy default stream), so the caller may reuse `w0` after its stream reaches the call.
///
/// ELRA factors start from the same seeded Xavier-uniform initialisation as an f32 CPU handle
/// (App. H) with η = η₀ at step 0; LoRA as PEFT (`lora_A` Kaiming-uniform, `lora_B` = 0).
/// Parameters, r×r work and gradients are f32 on the device; the generator is
/// `C = η m(t) (αAᵀ + (1−α)B)` (eq. 2, §4.2.1, eq. 19) with `Z = CA` and `M = φ1(Z)` (Prop. 1).
///
/// Errors: `ELRA_NULL_POINTER`, `ELRA_INVALID_ARGUMENT` (config out of range, `tau ≠ 0`, f64,
/// r above the GPU limit, `ld_w0 ≠ k`, `w0` not on the device), `ELRA_NO_DEVICE` (no driver or
/// no such device), `ELRA_CUDA`. On error `*out` is untouched.
///
/// # Safety
/// `config` must point to a readable config, `out` to a writable pointer; `w0` must be device
/// memory of the primary context of `device` covering the described matrix, and `stream` NULL or
/// a live stream of that context.
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_adapter_create(
    config: *const ElraAdapterConfig,
    device: usize,
    w0: *const c_void,
    ld_w0: usize,
    stream: *mut c_void,
    out: *mut *mut ElraGpuAdapter,
) -> ElraStatus {
    guard(|| {
        if config.is_null() {
            return Err(CError::Null("config"));
        }
        check_scalar_out("out", out)?;
        // SAFETY: non-null; the caller guarantees a readable, initialised config (plain data).
        let c = unsafe { config.read_unaligned() };
        let req = parse_config(&c)?;
        // Argument checks that need no device first, so that they work on any machine.
        check_w0(None, req.dtype, w0, &c, ld_w0)?;
        device_count()?;
        let _ctx = CtxRestore::new();
        let dev = CudaDevice::new(device)?;
        let w0m = check_w0(Some(&dev), req.dtype, w0, &c, ld_w0)?;
        let ctx = dev.context().clone();
        let ev_in = Arc::new(drv(ctx.new_event(None))?);
        let ev_out = Arc::new(drv(ctx.new_event(None))?);
        let (d, s) = (&dev, stream);
        // SAFETY: (all three arms) the caller's contract on `w0` (validated above) and `stream`
        // is forwarded to `build`.
        let inner = unsafe {
            match req.dtype {
                ElraGpuDtype::ELRA_GPU_DTYPE_F32 => {
                    Inner::F32(build::<f32>(d, &req, &w0m, &ev_in, &ev_out, s)?)
                }
                ElraGpuDtype::ELRA_GPU_DTYPE_F16 => {
                    Inner::F16(build::<f16>(d, &req, &w0m, &ev_in, &ev_out, s)?)
                }
                ElraGpuDtype::ELRA_GPU_DTYPE_BF16 => {
                    Inner::Bf16(build::<bf16>(d, &req, &w0m, &ev_in, &ev_out, s)?)
                }
            }
        };
        let config = match (&req.elra, &req.lora) {
            (Some(e), _) => ElraAdapterConfig::of_elra(e, req.dtype as u32),
            (None, Some(l)) => ElraAdapterConfig::of_lora(l, req.dtype as u32),
            (None, None) => return Err(invalid("config", "no variant")),
        };
        let h = Box::into_raw(Box::new(ElraGpuAdapter {
            magic: GPU_MAGIC,
            config,
            elra: req.elra,
            step: 0,
            generation: 0,
            last_forward: None,
            has_grads: false,
            ev_in,
            ev_out,
            inner,
            dev,
        }));
        // SAFETY: validated non-null and aligned; the caller guarantees writability.
        unsafe { out.write(h) };
        Ok(())
    })
}

/// Validates the creation's `w0` (d×k device matrix of the activation type).
fn check_w0(
    dev: Option<&CudaDevice>,
    dtype: ElraGpuDtype,
    w0: *const c_void,
    c: &ElraAdapterConfig,
    ld_w0: usize,
) -> CResult<DevMat> {
    match dtype {
        ElraGpuDtype::ELRA_GPU_DTYPE_F32 => dev_mat::<f32>(dev, "w0", w0, c.d, c.k, ld_w0),
        ElraGpuDtype::ELRA_GPU_DTYPE_F16 => dev_mat::<f16>(dev, "w0", w0, c.d, c.k, ld_w0),
        ElraGpuDtype::ELRA_GPU_DTYPE_BF16 => dev_mat::<bf16>(dev, "w0", w0, c.d, c.k, ld_w0),
    }
}

/// Copies `W0` (ordered on the caller's stream) and builds the layer of activation type `T`.
///
/// # Safety
/// `w0` must describe live device memory of `dev`'s context; `stream` NULL or a live stream of
/// that context.
unsafe fn build<T: Activation>(
    dev: &CudaDevice,
    req: &Request,
    w0: &DevMat,
    ev_in: &Arc<CudaEvent>,
    ev_out: &Arc<CudaEvent>,
    stream: *mut c_void,
) -> CResult<Typed<T>> {
    let w0_own = ordered(dev, ev_in, ev_out, stream, || {
        // SAFETY: forwarded caller contract; the copy is ordered after the caller's stream and
        // the caller's stream waits for it before this function returns.
        let b = unsafe { borrow::<T>(dev, w0)? };
        Ok(b.to_owned(dev)?)
    })?;
    let layer = match (&req.elra, &req.lora) {
        (Some(cfg), _) => {
            // The CPU handle's initialisation (ElraLayer::new) in f32.
            let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
            let a: DMatrix<f32> = xavier_uniform(&mut rng, cfg.d, cfg.r);
            let b: Option<DMatrix<f32>> = if cfg.variant().uses_b() {
                Some(xavier_uniform(&mut rng, cfg.r, cfg.d))
            } else {
                None
            };
            let spec = gpu_spec(cfg, 0)?;
            Layer::Elra(GpuElraLayer::new(
                dev,
                w0_own,
                &a,
                b.as_ref(),
                cfg.generator.eta as f32,
                spec,
            )?)
        }
        (None, Some(cfg)) => {
            // The CPU handle's initialisation (LoraLayer::new) in f32.
            let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
            let la: DMatrix<f32> = match cfg.init {
                LoraInit::KaimingUniform => kaiming_uniform(&mut rng, cfg.r, cfg.k),
                LoraInit::XavierUniform => xavier_uniform(&mut rng, cfg.r, cfg.k),
            };
            let lb = DMatrix::<f32>::zeros(cfg.d, cfg.r);
            Layer::Lora(GpuLoraLayer::new(
                dev,
                w0_own,
                &la,
                &lb,
                cfg.scaling() as f32,
            )?)
        }
        (None, None) => return Err(invalid("config", "no variant")),
    };
    Ok(Typed {
        layer,
        y_scratch: None,
    })
}

/// Frees a GPU adapter. NULL is ignored. Work already enqueued finishes on the library's stream
/// (its memory is released in stream order); the handle must not be used afterwards.
///
/// # Safety
/// `adapter` must be NULL or a live handle from [`elra_gpu_adapter_create`], not used concurrently.
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_adapter_destroy(adapter: *mut ElraGpuAdapter) {
    let _ = guard(|| {
        if adapter.is_null() {
            return Ok(());
        }
        // SAFETY: the caller guarantees a live handle with exclusive access.
        let a = unsafe { gpu_handle(adapter)? };
        let _ctx = CtxRestore::new();
        a.magic = 0;
        // The handle's buffers are freed stream-ordered on its device: make its context current
        // for the drop (CtxRestore puts the caller's back afterwards).
        let _ = a.dev.context().bind_to_thread();
        // SAFETY: the pointer came from Box::into_raw in elra_gpu_adapter_create; freed once.
        drop(unsafe { Box::from_raw(adapter) });
        Ok(())
    });
}

/// Writes the handle's configuration to `*out` (`dtype` is its [`ElraGpuDtype`]; `eta` the
/// initial η₀).
///
/// # Safety
/// `adapter` must be a live handle, `out` a writable `ElraAdapterConfig`.
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_adapter_get_config(
    adapter: *const ElraGpuAdapter,
    out: *mut ElraAdapterConfig,
) -> ElraStatus {
    guard(|| {
        // SAFETY: caller contract.
        let a = unsafe { gpu_handle_ref(adapter)? };
        let _ctx = CtxRestore::new();
        check_scalar_out("out", out)?;
        // SAFETY: validated; the caller guarantees writability.
        unsafe { out.write(a.config) };
        Ok(())
    })
}

/// Shape `(rows, cols)` of parameter `which` ([`super::ElraParam`]), as
/// [`super::elra_adapter_param_shape`].
///
/// # Safety
/// `adapter` must be a live handle; `rows` and `cols` writable.
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_adapter_param_shape(
    adapter: *const ElraGpuAdapter,
    which: u32,
    rows: *mut usize,
    cols: *mut usize,
) -> ElraStatus {
    guard(|| {
        // SAFETY: caller contract.
        let a = unsafe { gpu_handle_ref(adapter)? };
        let _ctx = CtxRestore::new();
        check_scalar_out("rows", rows)?;
        check_scalar_out("cols", cols)?;
        let (r, c) = a.param_shape(which)?;
        // SAFETY: validated; the caller guarantees writability.
        unsafe {
            rows.write(r);
            cols.write(c);
        }
        Ok(())
    })
}

/// Sets the optimiser step t, which drives the α schedule (eq. 19, eq. 75) and the η multiplier
/// (App. H) of ELRA handles; LoRA ignores it.
///
/// # Safety
/// `adapter` must be a live handle with exclusive access.
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_adapter_set_step(
    adapter: *mut ElraGpuAdapter,
    step: usize,
) -> ElraStatus {
    guard(|| {
        // SAFETY: caller contract.
        let a = unsafe { gpu_handle(adapter)? };
        let _ctx = CtxRestore::new();
        if let Some(cfg) = &a.elra {
            let spec = gpu_spec(cfg, step)?;
            with_typed!(&mut a.inner, t => match &mut t.layer {
                Layer::Elra(l) => l.set_spec(spec)?,
                Layer::Lora(_) => {}
            });
        }
        a.step = step;
        a.generation += 1;
        Ok(())
    })
}

/// The current step (`*step`) and α at that step (`*alpha`: the schedule's value for Hyb, 1 for
/// PSD, 0 for general ELRA and LoRA).
///
/// # Safety
/// `adapter` must be a live handle; the outputs writable.
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_adapter_get_step(
    adapter: *const ElraGpuAdapter,
    step: *mut usize,
    alpha: *mut f64,
) -> ElraStatus {
    guard(|| {
        // SAFETY: caller contract.
        let a = unsafe { gpu_handle_ref(adapter)? };
        let _ctx = CtxRestore::new();
        check_scalar_out("step", step)?;
        check_scalar_out("alpha", alpha)?;
        let al = match &a.elra {
            Some(cfg) => gpu_spec(cfg, a.step)?.alpha,
            None => 0.0,
        };
        // SAFETY: validated; the caller guarantees writability.
        unsafe {
            step.write(a.step);
            alpha.write(al);
        }
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------
// Parameters and gradients (host f32 buffers)
// ------------------------------------------------------------------------------------------

fn upload_into(dev: &CudaDevice, m: &DMatrix<f32>, dst: &mut CudaSlice<f32>) -> CResult<()> {
    let host = row_major(m);
    if dst.len() < host.len() {
        return Err(CError::Elra(ElraError::Cuda(
            "parameter buffer smaller than its shape".into(),
        )));
    }
    let mut view = dst.slice_mut(0..host.len());
    drv(dev.stream().memcpy_htod(&host, &mut view))
}

fn download(
    dev: &CudaDevice,
    s: &CudaSlice<f32>,
    rows: usize,
    cols: usize,
) -> CResult<DMatrix<f32>> {
    let v = drv(dev.stream().clone_dtoh(s))?;
    drv(dev.stream().synchronize())?;
    if v.len() < rows * cols {
        return Err(CError::Elra(ElraError::Cuda(
            "parameter buffer smaller than its shape".into(),
        )));
    }
    Ok(DMatrix::from_row_slice(rows, cols, &v[..rows * cols]))
}

/// Sets parameter `which` ([`super::ElraParam`]: A, B or η; W0 is fixed at creation) from the
/// **host** f32 buffer `data` (rows×cols, row-major, `ld ≥ cols`); `(rows, cols)` must equal
/// [`elra_gpu_adapter_param_shape`], values finite, η > 0. The upload is enqueued on the handle's
/// stream, after the handle's earlier work; the r×r work (`Z = CA`, `φ1(Z)`, Prop. 1) is redone
/// before the next forward. On error the parameters are unchanged.
///
/// # Safety
/// `adapter` must be a live handle with exclusive access; `data` must cover the described host
/// layout.
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_adapter_set_param(
    adapter: *mut ElraGpuAdapter,
    which: u32,
    data: *const f32,
    rows: usize,
    cols: usize,
    ld: usize,
) -> ElraStatus {
    guard(|| {
        // SAFETY: caller contract.
        let a = unsafe { gpu_handle(adapter)? };
        let _ctx = CtxRestore::new();
        if which == 3 {
            return Err(invalid(
                "which",
                "W0 of a GPU handle is set at creation (create a new handle)",
            ));
        }
        let shape = a.param_shape(which)?;
        if (rows, cols) != shape {
            return Err(ElraError::shape("data", shape, (rows, cols)).into());
        }
        // SAFETY: caller contract on `data` (read_matrix validates the layout and finiteness).
        let m = unsafe { read_matrix::<f32>("data", data, rows, cols, ld)? };
        if which == 2 && m[(0, 0)] <= 0.0 {
            return Err(invalid("data", format!("η must be > 0, got {}", m[(0, 0)])));
        }
        let dev = &a.dev;
        with_typed!(&mut a.inner, t => match &mut t.layer {
            Layer::Elra(l) => {
                let (pa, pb, pe) = l.params_mut();
                match which {
                    0 => upload_into(dev, &m, pa)?,
                    1 => match pb {
                        Some(pb) => upload_into(dev, &m, pb)?,
                        None => return Err(invalid("which", "this adapter has no factor B")),
                    },
                    _ => upload_into(dev, &m, pe)?,
                }
            }
            Layer::Lora(l) => {
                let (la, lb) = l.params_mut();
                match which {
                    0 => upload_into(dev, &m, la)?,
                    _ => upload_into(dev, &m, lb)?,
                }
            }
        });
        a.generation += 1;
        Ok(())
    })
}

/// Copies parameter `which` (A, B or η) into the **host** f32 buffer `out` (rows×cols,
/// `ld ≥ cols`); `(rows, cols)` must equal [`elra_gpu_adapter_param_shape`]. Synchronises the
/// handle's stream.
///
/// # Safety
/// `adapter` must be a live handle; `out` must cover the described host layout for writing.
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_adapter_get_param(
    adapter: *const ElraGpuAdapter,
    which: u32,
    out: *mut f32,
    rows: usize,
    cols: usize,
    ld: usize,
) -> ElraStatus {
    guard(|| {
        // SAFETY: caller contract.
        let a = unsafe { gpu_handle_ref(adapter)? };
        let _ctx = CtxRestore::new();
        if which == 3 {
            return Err(invalid(
                "which",
                "W0 of a GPU handle lives on the device (read it with elra_gpu_adapter_merge at \
                 zero parameters)",
            ));
        }
        let shape = a.param_shape(which)?;
        if (rows, cols) != shape {
            return Err(ElraError::shape("out", shape, (rows, cols)).into());
        }
        let lo = out_layout("out", out, rows, cols, ld)?;
        let dev = &a.dev;
        let m = with_typed!(&a.inner, t => match &t.layer {
            Layer::Elra(l) => {
                let (pa, pb, pe) = l.params();
                match (which, pb) {
                    (0, _) => download(dev, pa, rows, cols)?,
                    (1, Some(pb)) => download(dev, pb, rows, cols)?,
                    (1, None) => return Err(invalid("which", "this adapter has no factor B")),
                    _ => download(dev, pe, 1, 1)?,
                }
            }
            Layer::Lora(l) => {
                let (la, lb) = l.params();
                if which == 0 {
                    download(dev, la, rows, cols)?
                } else {
                    download(dev, lb, rows, cols)?
                }
            }
        });
        // SAFETY: validated layout; the caller guarantees writability.
        unsafe { write_out(out, &lo, &row_major(&m)) };
        Ok(())
    })
}

/// The gradients of the last [`elra_gpu_adapter_backward`] into **host** f32 buffers: `da` =
/// ∂L/∂A and `db` = ∂L/∂B with the shapes of [`elra_gpu_adapter_param_shape`] (leading
/// dimensions `ld_da`, `ld_db`), and for ELRA `*deta` = ∂L/∂η. `db` is ignored (may be NULL)
/// for ELRA-PSD and `deta` for LoRA. For ELRA `L = ⟨y, ∂y⟩ + λ‖G‖²_F` (eq. 20–21).
/// Synchronises the handle's stream and checks the statuses of the r×r kernels (φ1 and its
/// adjoint, Prop. 1): a failure there is `ELRA_NUMERICAL`/`ELRA_OVERFLOW`/`ELRA_NON_FINITE`.
/// `ELRA_INVALID_ARGUMENT` before the first backward.
///
/// # Safety
/// `adapter` must be a live handle; the outputs must cover their host layouts.
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_adapter_get_grads(
    adapter: *const ElraGpuAdapter,
    da: *mut f32,
    ld_da: usize,
    db: *mut f32,
    ld_db: usize,
    deta: *mut f32,
) -> ElraStatus {
    guard(|| {
        // SAFETY: caller contract.
        let a = unsafe { gpu_handle_ref(adapter)? };
        let _ctx = CtxRestore::new();
        let (ar, ac) = a.param_shape(0)?;
        let l_da = out_layout("da", da, ar, ac, ld_da)?;
        let l_db = if a.uses_b() {
            let (br, bc) = a.param_shape(1)?;
            Some(out_layout("db", db, br, bc, ld_db)?)
        } else {
            None
        };
        if !a.is_lora() {
            check_scalar_out("deta", deta)?;
        }
        if !a.has_grads {
            return Err(invalid("adapter", "no backward has run on this handle yet"));
        }
        let dev = &a.dev;
        let (ga, gb, ge) = with_typed!(&a.inner, t => match &t.layer {
            Layer::Elra(l) => {
                l.check_status(dev)?;
                let g = l.grads(dev)?;
                (g.a, g.b, Some(g.eta))
            }
            Layer::Lora(l) => {
                let (ga, gb) = l.grads(dev)?;
                (ga, Some(gb), None)
            }
        });
        // SAFETY: layouts validated above; the caller guarantees writability. Everything was
        // downloaded first, so nothing is written unless the whole call succeeded.
        unsafe {
            write_out(da, &l_da, &row_major(&ga));
            if let (Some(l), Some(g)) = (l_db, gb) {
                write_out(db, &l, &row_major(&g));
            }
            if let Some(e) = ge {
                deta.write(e);
            }
        }
        Ok(())
    })
}

/// `‖G‖²_F = tr((AᵀA)(CCᵀ))` of the generator at the current step from r×r Grams (eq. 21) in
/// `*energy` and `λ‖G‖²_F` (eq. 20) in `*penalty`. Synchronises the handle's stream. LoRA:
/// `ELRA_INVALID_ARGUMENT`.
///
/// # Safety
/// `adapter` must be a live handle with exclusive access; the outputs writable.
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_adapter_energy(
    adapter: *mut ElraGpuAdapter,
    energy: *mut f64,
    penalty: *mut f64,
) -> ElraStatus {
    guard(|| {
        // SAFETY: caller contract.
        let a = unsafe { gpu_handle(adapter)? };
        let _ctx = CtxRestore::new();
        check_scalar_out("energy", energy)?;
        check_scalar_out("penalty", penalty)?;
        let lambda = match &a.elra {
            Some(c) => c.generator.lambda,
            None => return Err(invalid("adapter", "LoRA has no generator energy")),
        };
        let dev = &a.dev;
        let e = with_typed!(&mut a.inner, t => match &mut t.layer {
            Layer::Elra(l) => l.generator_frobenius_sq(dev)?,
            Layer::Lora(_) => return Err(invalid("adapter", "LoRA has no generator energy")),
        });
        // SAFETY: validated; the caller guarantees writability.
        unsafe {
            energy.write(e);
            penalty.write(lambda * e);
        }
        Ok(())
    })
}

/// Blocks until all work enqueued through the handle has finished and reports deferred errors:
/// an asynchronous CUDA fault (`ELRA_CUDA`) or a failure of the r×r matrix functions of the last
/// step (φ1, its adjoint, φ1(−Z) of an unmerge; Prop. 1, Al-Mohy & Higham 2009).
///
/// # Safety
/// `adapter` must be a live handle.
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_adapter_synchronize(
    adapter: *const ElraGpuAdapter,
) -> ElraStatus {
    guard(|| {
        // SAFETY: caller contract.
        let a = unsafe { gpu_handle_ref(adapter)? };
        let _ctx = CtxRestore::new();
        a.dev.synchronize()?;
        with_typed!(&a.inner, t => match &t.layer {
            Layer::Elra(l) => l.check_status(&a.dev)?,
            Layer::Lora(_) => {}
        });
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------
// Forward, backward, merge, unmerge on caller device memory
// ------------------------------------------------------------------------------------------

/// Typed forward: `y = x W_newᵀ`.
///
/// # Safety
/// `x`, `y` describe live caller device memory (validated by `dev_mat`).
unsafe fn forward_t<T: Activation>(
    dev: &CudaDevice,
    t: &mut Typed<T>,
    x: &DevMat,
    y: &DevMat,
    dims: (usize, usize, usize),
) -> CResult<()> {
    // SAFETY: forwarded.
    let xb = unsafe { borrow::<T>(dev, x)? };
    // SAFETY: forwarded; `y` does not overlap `x` (checked by the caller).
    let mut yb = unsafe { borrow::<T>(dev, y)? };
    run_forward(dev, &mut t.layer, xb.get(), yb.get_mut(), dims)
}

fn run_forward<T: Activation>(
    dev: &CudaDevice,
    layer: &mut Layer<T>,
    x: &DeviceMatrices<T>,
    y: &mut DeviceMatrices<T>,
    (d, k, r): (usize, usize, usize),
) -> CResult<()> {
    match layer {
        Layer::Elra(l) => {
            let route: Route = choose_route(x.rows(), d, k, r, T::BYTES);
            l.forward(dev, x, y, route)?
        }
        Layer::Lora(l) => l.forward(dev, x, y)?,
    }
    Ok(())
}

/// Forward pass `y = x W_newᵀ` on device memory, without forming `W_new` for small N (ELRA:
/// eq. 5, `u = x W0ᵀ`, `y = u + ((u Cᵀ) φ1(CA)ᵀ) Aᵀ`) or through `W_eff = W0 + A φ1(Z) C W0`
/// (eq. 30) when that moves fewer bytes ([`crate::cuda::choose_route`]); LoRA:
/// `x W0ᵀ + s (x Aᵀ) Bᵀ`. `x` is n×k (`ld_x == k`), `y` n×d (`ld_y == d`), both of the
/// handle's activation type in device memory; rows are samples. Ordered on `stream` (module
/// docs); asynchronous. Keeps the tape for
/// [`ElraGpuBackward::ELRA_GPU_BACKWARD_REUSE_FORWARD`].
///
/// # Safety
/// `adapter` must be a live handle with exclusive access; `x` and `y` device memory of the
/// handle's device covering their layouts, alive until `stream` has passed this call; `stream`
/// NULL or a live stream of the device's primary context.
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_adapter_forward(
    adapter: *mut ElraGpuAdapter,
    n: usize,
    x: *const c_void,
    ld_x: usize,
    y: *mut c_void,
    ld_y: usize,
    stream: *mut c_void,
) -> ElraStatus {
    guard(|| {
        // SAFETY: caller contract.
        let a = unsafe { gpu_handle(adapter)? };
        let _ctx = CtxRestore::new();
        let dims = a.dims();
        let (d, k, _) = dims;
        let (xm, ym) = check_pair(
            &a.dev,
            &a.inner,
            ("x", x, n, k, ld_x),
            ("y", y.cast_const(), n, d, ld_y),
        )?;
        no_overlap(&[ym], &[xm, ym])?;
        a.last_forward = None;
        let dev = &a.dev;
        ordered(dev, &a.ev_in, &a.ev_out, stream, || {
            with_typed!(&mut a.inner, t => {
                // SAFETY: validated device matrices; caller contract on their lifetime.
                unsafe { forward_t(dev, t, &xm, &ym, dims) }
            })
        })?;
        a.last_forward = Some(TapeKey {
            x: xm.ptr,
            n,
            ld_x,
            generation: a.generation,
        });
        Ok(())
    })
}

type MatArg = (&'static str, *const c_void, usize, usize, usize);

/// Validates two device matrices with the handle's activation type.
fn check_pair(dev: &CudaDevice, inner: &Inner, p: MatArg, q: MatArg) -> CResult<(DevMat, DevMat)> {
    Ok((check_one(dev, inner, p)?, check_one(dev, inner, q)?))
}

fn check_one(dev: &CudaDevice, inner: &Inner, (arg, p, rows, cols, ld): MatArg) -> CResult<DevMat> {
    match inner {
        Inner::F32(_) => dev_mat::<f32>(Some(dev), arg, p, rows, cols, ld),
        Inner::F16(_) => dev_mat::<f16>(Some(dev), arg, p, rows, cols, ld),
        Inner::Bf16(_) => dev_mat::<bf16>(Some(dev), arg, p, rows, cols, ld),
    }
}

/// Typed backward.
///
/// # Safety
/// The matrices describe live caller device memory (validated by `dev_mat`).
unsafe fn backward_t<T: Activation>(
    dev: &CudaDevice,
    t: &mut Typed<T>,
    (x, dy, dx): (&DevMat, &DevMat, &DevMat),
    recompute: bool,
    dims: (usize, usize, usize),
) -> CResult<()> {
    // SAFETY: forwarded.
    let xb = unsafe { borrow::<T>(dev, x)? };
    // SAFETY: forwarded.
    let dyb = unsafe { borrow::<T>(dev, dy)? };
    // SAFETY: forwarded; `dx` overlaps neither `x` nor `dy` (checked by the caller).
    let mut dxb = unsafe { borrow::<T>(dev, dx)? };
    let n = x.rows;
    if recompute {
        let d = dims.0;
        if t.y_scratch
            .as_ref()
            .is_none_or(|m| (m.rows(), m.cols()) != (n, d))
        {
            t.y_scratch = None;
            t.y_scratch = Some(DeviceMatrices::zeros(dev, 1, n, d)?);
        }
        let y = t
            .y_scratch
            .as_mut()
            .ok_or_else(|| invalid("adapter", "scratch"))?;
        run_forward(dev, &mut t.layer, xb.get(), y, dims)?;
    }
    match &mut t.layer {
        Layer::Elra(l) => l.backward(dev, xb.get(), dyb.get(), dxb.get_mut())?,
        Layer::Lora(l) => l.backward(dev, xb.get(), dyb.get(), dxb.get_mut())?,
    }
    Ok(())
}

/// Reverse mode of [`elra_gpu_adapter_forward`] on device memory: given `x` (n×k) and
/// `dy = ∂L/∂y` (n×d), writes `dx = ∂L/∂x` (n×k) to caller device memory and keeps the adapter
/// gradients (∂A, ∂B, ∂η; read them with [`elra_gpu_adapter_get_grads`]). For ELRA the
/// gradients include the energy penalty, `L = ⟨y, dy⟩ + λ‖G‖²_F` (eq. 20–21), and run through
/// α/η of the current step (eq. 19) and the adjoint Fréchet derivative of φ1 (Prop. 1, eq. 5;
/// Algorithm 1 line 12) with N×r, r×d and r×r intermediates only (no dense weight gradient).
/// `flags` is an [`ElraGpuBackward`]: recompute the forward of `x` (0) or reuse the last
/// forward's tape (1). All ld must equal their column counts; `dx` may not overlap `x` or `dy`.
/// Ordered on `stream`; asynchronous.
///
/// # Safety
/// `adapter` must be a live handle with exclusive access; the pointers device memory of the
/// handle's device covering their layouts, alive until `stream` has passed this call; `stream`
/// NULL or a live stream of the device's primary context.
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_adapter_backward(
    adapter: *mut ElraGpuAdapter,
    n: usize,
    x: *const c_void,
    ld_x: usize,
    dy: *const c_void,
    ld_dy: usize,
    dx: *mut c_void,
    ld_dx: usize,
    flags: u32,
    stream: *mut c_void,
) -> ElraStatus {
    guard(|| {
        // SAFETY: caller contract.
        let a = unsafe { gpu_handle(adapter)? };
        let _ctx = CtxRestore::new();
        let dims = a.dims();
        let (d, k, _) = dims;
        let recompute = match flags {
            0 => true,
            1 => false,
            v => {
                return Err(invalid(
                    "flags",
                    format!("unknown ElraGpuBackward value {v}"),
                ))
            }
        };
        let (xm, dym) = check_pair(
            &a.dev,
            &a.inner,
            ("x", x, n, k, ld_x),
            ("dy", dy, n, d, ld_dy),
        )?;
        let dxm = check_one(&a.dev, &a.inner, ("dx", dx.cast_const(), n, k, ld_dx))?;
        no_overlap(&[dxm], &[xm, dym, dxm])?;
        let key = TapeKey {
            x: xm.ptr,
            n,
            ld_x,
            generation: a.generation,
        };
        if !recompute && a.last_forward != Some(key) {
            return Err(invalid(
                "flags",
                "ELRA_GPU_BACKWARD_REUSE_FORWARD needs a preceding forward on this handle with \
                 the same x, n and ld_x and no parameter or step change since",
            ));
        }
        let dev = &a.dev;
        a.last_forward = None;
        ordered(dev, &a.ev_in, &a.ev_out, stream, || {
            with_typed!(&mut a.inner, t => {
                // SAFETY: validated device matrices; caller contract on their lifetime.
                unsafe { backward_t(dev, t, (&xm, &dym, &dxm), recompute, dims) }
            })
        })?;
        a.has_grads = true;
        a.last_forward = Some(key);
        Ok(())
    })
}

/// The merged weight `W_new` (d×k, `ld == k`, activation type) into caller device memory `w_new`
/// (ELRA: `W0 + A (φ1(Z) (C W0))`, Prop. 1 / eq. 30; LoRA: `W0 + s·B·A`). Ordered on `stream`;
/// asynchronous.
///
/// # Safety
/// `adapter` must be a live handle with exclusive access; `w_new` device memory of the handle's
/// device covering the layout, alive until `stream` has passed this call; `stream` NULL or a live
/// stream of the device's primary context.
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_adapter_merge(
    adapter: *mut ElraGpuAdapter,
    w_new: *mut c_void,
    ld: usize,
    stream: *mut c_void,
) -> ElraStatus {
    guard(|| {
        // SAFETY: caller contract.
        let a = unsafe { gpu_handle(adapter)? };
        let _ctx = CtxRestore::new();
        let (d, k, _) = a.dims();
        let wm = check_one(&a.dev, &a.inner, ("w_new", w_new.cast_const(), d, k, ld))?;
        let dev = &a.dev;
        ordered(dev, &a.ev_in, &a.ev_out, stream, || {
            with_typed!(&mut a.inner, t => {
                // SAFETY: validated device matrix; caller contract on its lifetime.
                let mut wb = unsafe { borrow(dev, &wm)? };
                match &mut t.layer {
                    Layer::Elra(l) => l.merge(dev, wb.get_mut())?,
                    Layer::Lora(l) => l.merge(dev, wb.get_mut())?,
                }
                Ok(())
            })
        })
    })
}

/// Recovers `W0` from a merged weight with the current parameters: `w0_out = exp(−G) w_new`
/// (ELRA: `w_new − A φ1(−Z) (C w_new)`, Prop. 3 with Prop. 1; LoRA: `w_new − s·B·A`). Both d×k
/// in caller device memory with `ld == k`; they may not overlap. Ordered on `stream`;
/// asynchronous.
///
/// # Safety
/// `adapter` must be a live handle with exclusive access; both pointers device memory of the
/// handle's device covering their layouts, alive until `stream` has passed this call; `stream`
/// NULL or a live stream of the device's primary context.
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_adapter_unmerge(
    adapter: *mut ElraGpuAdapter,
    w_new: *const c_void,
    ld_w_new: usize,
    w0_out: *mut c_void,
    ld_w0_out: usize,
    stream: *mut c_void,
) -> ElraStatus {
    guard(|| {
        // SAFETY: caller contract.
        let a = unsafe { gpu_handle(adapter)? };
        let _ctx = CtxRestore::new();
        let (d, k, _) = a.dims();
        let (wm, om) = check_pair(
            &a.dev,
            &a.inner,
            ("w_new", w_new, d, k, ld_w_new),
            ("w0_out", w0_out.cast_const(), d, k, ld_w0_out),
        )?;
        no_overlap(&[om], &[wm, om])?;
        let dev = &a.dev;
        ordered(dev, &a.ev_in, &a.ev_out, stream, || {
            with_typed!(&mut a.inner, t => {
                // SAFETY: validated device matrices; caller contract on their lifetime.
                let wb = unsafe { borrow(dev, &wm)? };
                // SAFETY: as above; `w0_out` does not overlap `w_new`.
                let mut ob = unsafe { borrow(dev, &om)? };
                match &mut t.layer {
                    Layer::Elra(l) => l.unmerge(dev, wb.get(), ob.get_mut())?,
                    Layer::Lora(l) => l.unmerge(dev, wb.get(), ob.get_mut())?,
                }
                Ok(())
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capi::{elra_adapter_config_default, elra_last_error_message};
    use std::ptr::{null, null_mut};

    fn message() -> String {
        let mut buf = vec![0 as std::ffi::c_char; 512];
        // SAFETY: buf is a live local buffer of 512 bytes.
        unsafe { elra_last_error_message(buf.as_mut_ptr(), buf.len()) };
        // SAFETY: the function NUL-terminates within the buffer.
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    /// A valid GPU config: `variant`, d = 8, k = 6, r = 2, f32 activations, no clip.
    fn config(variant: u32) -> ElraAdapterConfig {
        let mut c = std::mem::MaybeUninit::<ElraAdapterConfig>::uninit();
        // SAFETY: `c` is a writable local config.
        let s = unsafe { elra_adapter_config_default(variant, 0, 8, 6, 2, 100, c.as_mut_ptr()) };
        assert_eq!(s, ElraStatus::ELRA_OK);
        // SAFETY: initialised by the successful call.
        let mut c = unsafe { c.assume_init() };
        c.tau = 0.0;
        c
    }

    /// A non-null pointer aligned for every activation type. It is never dereferenced: every
    /// call below fails its argument checks (or finds no device) before touching memory.
    const FAKE: *const c_void = 0x1000 as *const c_void;

    fn create(c: &ElraAdapterConfig, w0: *const c_void, ld: usize) -> ElraStatus {
        let mut out: *mut ElraGpuAdapter = null_mut();
        // SAFETY: `c` and `out` are live locals; `w0` is never dereferenced on these paths.
        let s = unsafe { elra_gpu_adapter_create(c, 0, w0, ld, null_mut(), &mut out) };
        assert!(out.is_null(), "out must stay untouched on error");
        s
    }

    #[test]
    fn create_rejects_bad_arguments_before_touching_a_device() {
        use ElraStatus::*;
        let ok = config(0);
        let with = |f: &dyn Fn(&mut ElraAdapterConfig)| {
            let mut c = ok;
            f(&mut c);
            c
        };
        let cases: Vec<(ElraAdapterConfig, *const c_void, usize, ElraStatus, &str)> = vec![
            (
                with(&|c| c.dtype = 1),
                FAKE,
                6,
                ELRA_INVALID_ARGUMENT,
                "f64",
            ),
            (
                with(&|c| c.dtype = 7),
                FAKE,
                6,
                ELRA_INVALID_ARGUMENT,
                "ElraGpuDtype",
            ),
            (
                with(&|c| c.variant = 9),
                FAKE,
                6,
                ELRA_INVALID_ARGUMENT,
                "variant",
            ),
            (
                with(&|c| c.tau = 2.0),
                FAKE,
                6,
                ELRA_INVALID_ARGUMENT,
                "tau",
            ),
            (with(&|c| c.r = 0), FAKE, 6, ELRA_INVALID_ARGUMENT, "r"),
            (with(&|c| c.d = 0), FAKE, 6, ELRA_INVALID_ARGUMENT, "d"),
            (
                with(&|c| c.eta = -1.0),
                FAKE,
                6,
                ELRA_INVALID_ARGUMENT,
                "eta",
            ),
            (
                with(&|c| {
                    c.d = 200;
                    c.r = MAX_RANK + 1
                }),
                FAKE,
                6,
                ELRA_INVALID_ARGUMENT,
                "ranks",
            ),
            (ok, null(), 6, ELRA_NULL_POINTER, "w0"),
            (ok, FAKE, 7, ELRA_INVALID_ARGUMENT, "contiguous"),
            (ok, FAKE, 5, ELRA_INVALID_ARGUMENT, "leading dimension"),
            (
                ok,
                0x1002 as *const c_void,
                6,
                ELRA_INVALID_ARGUMENT,
                "aligned",
            ),
        ];
        for (i, (c, w0, ld, want, needle)) in cases.into_iter().enumerate() {
            let s = create(&c, w0, ld);
            let m = message();
            assert_eq!(s, want, "case {i}: {m}");
            assert!(
                m.contains(needle),
                "case {i}: `{m}` should mention `{needle}`"
            );
        }
        // NULL config and NULL out.
        let mut out: *mut ElraGpuAdapter = null_mut();
        // SAFETY: NULL config is the checked case; `out` is a live local.
        let s = unsafe { elra_gpu_adapter_create(null(), 0, FAKE, 6, null_mut(), &mut out) };
        assert_eq!(s, ELRA_NULL_POINTER);
        // SAFETY: NULL out is the checked case.
        let s = unsafe { elra_gpu_adapter_create(&ok, 0, FAKE, 6, null_mut(), null_mut()) };
        assert_eq!(s, ELRA_NULL_POINTER);
        // bf16 needs only 2-byte alignment: 0x1002 passes that check and fails later (no
        // device here, or not device memory on a GPU machine) — never on alignment.
        let mut c = ok;
        c.dtype = ElraGpuDtype::ELRA_GPU_DTYPE_BF16 as u32;
        let s = create(&c, 0x1002 as *const c_void, 6);
        assert_ne!(s, ELRA_OK);
        assert!(!message().contains("aligned"), "{}", message());
    }

    #[test]
    fn without_a_device_the_gpu_abi_reports_no_device_not_a_panic() {
        if let Ok(()) = crate::cuda::cuda_available() {
            eprintln!("skipped: a CUDA device is present (this test checks the no-device path)");
            return;
        }
        let mut n = usize::MAX;
        // SAFETY: `n` is a live local.
        let s = unsafe { elra_cuda_device_count(&mut n) };
        assert_eq!(s, ElraStatus::ELRA_NO_DEVICE);
        assert_eq!(n, usize::MAX, "count untouched on error");
        assert!(!message().is_empty());
        for variant in 0..4 {
            for dtype in [0, 2, 3] {
                let mut c = config(variant);
                c.dtype = dtype;
                let s = create(&c, FAKE, 6);
                assert_eq!(s, ElraStatus::ELRA_NO_DEVICE, "{}", message());
                assert!(!message().is_empty());
            }
        }
    }

    #[test]
    fn null_handles_are_reported_by_every_export() {
        use ElraStatus::ELRA_NULL_POINTER as NUL;
        let h: *mut ElraGpuAdapter = null_mut();
        let mut f = [0f32; 64];
        let (mut r, mut c, mut st) = (0usize, 0usize, 0usize);
        let (mut e, mut p, mut al) = (0f64, 0f64, 0f64);
        let mut cfg = config(0);
        let fp = f.as_mut_ptr();
        let v = FAKE.cast_mut();
        // SAFETY: every call gets a NULL handle, which each export rejects before reading any
        // other argument; the other pointers are live locals (or FAKE, never dereferenced).
        unsafe {
            let all = [
                elra_gpu_adapter_get_config(h, &mut cfg),
                elra_gpu_adapter_param_shape(h, 0, &mut r, &mut c),
                elra_gpu_adapter_set_step(h, 1),
                elra_gpu_adapter_get_step(h, &mut st, &mut al),
                elra_gpu_adapter_set_param(h, 0, fp, 8, 2, 2),
                elra_gpu_adapter_get_param(h, 0, fp, 8, 2, 2),
                elra_gpu_adapter_get_grads(h, fp, 2, fp, 8, fp),
                elra_gpu_adapter_energy(h, &mut e, &mut p),
                elra_gpu_adapter_synchronize(h),
                elra_gpu_adapter_forward(h, 1, FAKE, 6, v, 8, null_mut()),
                elra_gpu_adapter_backward(h, 1, FAKE, 6, FAKE, 8, v, 6, 0, null_mut()),
                elra_gpu_adapter_merge(h, v, 6, null_mut()),
                elra_gpu_adapter_unmerge(h, FAKE, 6, v, 6, null_mut()),
            ];
            for (i, s) in all.into_iter().enumerate() {
                assert_eq!(s, NUL, "export #{i}: {}", message());
                assert!(message().contains("adapter"));
            }
            elra_gpu_adapter_destroy(h);
        }
        assert!(f.iter().all(|&x| x == 0.0), "no output written");
    }

    #[test]
    fn device_matrix_checks_without_a_device() {
        let ok = dev_mat::<f32>(None, "x", FAKE, 3, 4, 4).unwrap();
        assert_eq!((ok.rows, ok.cols, ok.bytes), (3, 4, 48));
        let err = |r: CResult<DevMat>| match r {
            Err(CError::Elra(e)) => e.to_string(),
            Err(CError::Null(a)) => format!("null {a}"),
            Ok(_) => panic!("accepted"),
        };
        assert!(err(dev_mat::<f32>(None, "x", null(), 3, 4, 4)).contains("null x"));
        assert!(err(dev_mat::<f32>(None, "x", FAKE, 0, 4, 4)).contains("zero"));
        assert!(err(dev_mat::<f32>(None, "x", FAKE, 3, 0, 0)).contains("zero"));
        assert!(err(dev_mat::<f32>(None, "x", FAKE, 3, 4, 5)).contains("contiguous"));
        assert!(err(dev_mat::<f32>(None, "x", FAKE, 3, 4, 3)).contains("contiguous"));
        assert!(err(dev_mat::<f32>(None, "x", 0x1002 as _, 3, 4, 4)).contains("aligned"));
        assert!(dev_mat::<f16>(None, "x", 0x1002 as _, 3, 4, 4).is_ok());
        let huge = usize::MAX / 2;
        assert!(err(dev_mat::<f32>(None, "x", FAKE, huge, 4, 4)).contains("address space"));
        // Overlap: y = [0x1000, 0x1030) against x at 0x1020 (overlaps) and at 0x1030 (adjacent).
        let y = dev_mat::<f32>(None, "y", FAKE, 3, 4, 4).unwrap();
        let x1 = dev_mat::<f32>(None, "x", 0x1020 as _, 1, 4, 4).unwrap();
        let x2 = dev_mat::<f32>(None, "x", 0x1030 as _, 1, 4, 4).unwrap();
        assert!(err(no_overlap(&[y], &[x1, y]).map(|_| y)).contains("overlaps `x`"));
        assert!(no_overlap(&[y], &[x2, y]).is_ok());
    }
}
