//! The GPU adapter handle `ElraGpuAdapter` (feature `cuda`; declared in `elra.h` under
//! `#if defined(ELRA_FEATURE_CUDA)`): the ELRA layer `y = x W_newᵀ`, `W_new = exp(G) W0` (eq. 3) through
//! the Woodbury form of Prop. 1 (eq. 5) or the merged weight (eq. 30), and the LoRA baseline, on
//! **device pointers owned by the caller**, ordered on the caller's CUDA stream.
//!
//! The handle holds the layer as a [`GpuAdapter`] trait object ([`crate::cuda::GpuElraLayer`]
//! or [`crate::cuda::GpuLoraLayer`] of the activation type) and the caller-stream plumbing of
//! `cuda::caller`; every export is the same few steps: check the arguments, order on
//! the caller's stream, call the [`Adapter`] method.
//!
//! # Conventions (in addition to the module conventions of [`crate::capi`])
//! - **Context.** A handle lives on one device ordinal and uses that device's *primary* context
//!   (`cuDevicePrimaryCtxRetain`, as the CUDA runtime and PyTorch do). Device pointers must come
//!   from memory usable in that context (cudaMalloc, the PyTorch caching allocator, managed
//!   memory) and live on the handle's device (checked with `cuPointerGetAttribute`); streams
//!   must belong to that context. Each export restores the thread's previous context.
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
//! - **The overflow rule.** The CPU handles check every output: finite inputs with a non-finite
//!   result are `ELRA_OVERFLOW`. A GPU handle does so only on request
//!   ([`elra_gpu_adapter_set_check_finite`], default off), because a scan costs one more read of
//!   each output and a host wait: then forward, backward, merge and unmerge scan their outputs,
//!   synchronise and return `ELRA_OVERFLOW` naming the output.
//! - **Tape.** Backward with [`ElraGpuBackward::ELRA_GPU_BACKWARD_REUSE_FORWARD`] runs on the
//!   layer's tape, which the layer keys by the forward's `x` (device address and shape; `ld_x`
//!   equals the columns) and discards on any parameter or step change ([`Adapter::backward`]).
//! - **Not on the GPU.** The spectral clip τ of App. H (`tau` must be 0), f64 activations, ranks
//!   above [`crate::cuda::MAX_RANK`].
//! - **Threads.** A handle is not synchronised: use it from one thread at a time.
//!
//! Without a usable driver or device (a `cuda` build on a machine without a GPU), every function
//! that needs one returns `ELRA_NO_DEVICE`; none panics.

use std::ffi::c_void;
use std::sync::Arc;

use half::{bf16, f16};

use super::adapter::{energy_pair, param_index, param_shape, GradOuts};
use super::config::{variant_of, ElraAdapterConfig};
use super::handle::{self, Handle};
use super::layout::{check_scalar_out, out_layout, read_matrix, row_major, write_one, write_pair};
use super::ops::flag;
use super::{guard, guard_void, write_out, CError, CResult, ElraStatus};
use crate::adapter::{Adapter, ElraConfig, LoraConfig};
use crate::cuda::caller::{no_overlap, CallerMatrix, CallerStream, CtxRestore};
use crate::cuda::{
    check_rank, device_count, Activation, CudaDevice, GpuAdapter, GpuElraLayer, GpuLoraLayer,
};
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

/// The layer behind a GPU handle, by activation type.
enum Layers {
    F32(Box<dyn GpuAdapter<f32>>),
    F16(Box<dyn GpuAdapter<f16>>),
    Bf16(Box<dyn GpuAdapter<bf16>>),
}

/// Runs `$body` with `$l` bound to the handle's layer (`Box<dyn GpuAdapter<f32 | f16 | bf16>>`).
macro_rules! any_dtype {
    ($layers:expr, $l:ident => $body:expr) => {
        match $layers {
            Layers::F32($l) => $body,
            Layers::F16($l) => $body,
            Layers::Bf16($l) => $body,
        }
    };
}

/// An activation type a GPU handle can hold.
trait GpuDtype: Activation {
    /// The handle dtype of `Self`.
    const GPU_DTYPE: ElraGpuDtype;
    /// A handle's layer of `Self`.
    fn wrap(l: Box<dyn GpuAdapter<Self>>) -> Layers;
}

impl GpuDtype for f32 {
    const GPU_DTYPE: ElraGpuDtype = ElraGpuDtype::ELRA_GPU_DTYPE_F32;
    fn wrap(l: Box<dyn GpuAdapter<f32>>) -> Layers {
        Layers::F32(l)
    }
}
impl GpuDtype for f16 {
    const GPU_DTYPE: ElraGpuDtype = ElraGpuDtype::ELRA_GPU_DTYPE_F16;
    fn wrap(l: Box<dyn GpuAdapter<f16>>) -> Layers {
        Layers::F16(l)
    }
}
impl GpuDtype for bf16 {
    const GPU_DTYPE: ElraGpuDtype = ElraGpuDtype::ELRA_GPU_DTYPE_BF16;
    fn wrap(l: Box<dyn GpuAdapter<bf16>>) -> Layers {
        Layers::Bf16(l)
    }
}

/// An ELRA or LoRA adapter on a CUDA device (opaque to C): the device's primary context, the
/// device's one stream (shared with every other handle on that device), a cuBLAS handle of its
/// own, a library-owned copy of `W0`, the parameters and gradients in f32 device memory, and the
/// activation tapes.
pub struct ElraGpuAdapter {
    magic: u64,
    config: ElraAdapterConfig,
    layer: Layers,
    /// Declared last: dropped after the layer that uses its device's stream.
    caller: CallerStream,
}

impl Handle for ElraGpuAdapter {
    const MAGIC: u64 = 0x454c_5241_4750_5541; // "ELRAGPUA"
    const KIND: &'static str = "elra GPU adapter";
    fn tag(&self) -> u64 {
        self.magic
    }
    fn set_tag(&mut self, tag: u64) {
        self.magic = tag;
    }
}

/// Validates a caller device matrix of `T` ([`CallerMatrix::check`]); NULL is
/// `ELRA_NULL_POINTER`. Without `dev` nothing is asked of the driver.
fn dev_mat<T: Activation>(
    dev: Option<&CudaDevice>,
    arg: &'static str,
    p: *const c_void,
    rows: usize,
    cols: usize,
    ld: usize,
) -> CResult<CallerMatrix<T>> {
    if p.is_null() {
        return Err(CError::Null(arg));
    }
    Ok(CallerMatrix::check(dev, arg, p, rows, cols, ld)?)
}

/// The ELRA or LoRA config of a creation request.
enum Kind {
    Elra(ElraConfig),
    Lora(LoraConfig),
}

/// The [`ElraGpuDtype`] of a `dtype` argument (f64 and unknown values are
/// `ELRA_INVALID_ARGUMENT`).
pub(super) fn gpu_dtype_of(v: u32) -> CResult<ElraGpuDtype> {
    Ok(match v {
        0 => ElraGpuDtype::ELRA_GPU_DTYPE_F32,
        2 => ElraGpuDtype::ELRA_GPU_DTYPE_F16,
        3 => ElraGpuDtype::ELRA_GPU_DTYPE_BF16,
        1 => {
            return Err(ElraError::invalid(
                "dtype",
                "f64 activations are not available on the GPU (use f32, f16 or bf16)",
            )
            .into())
        }
        v => {
            return Err(
                ElraError::invalid("dtype", format!("unknown ElraGpuDtype value {v}")).into(),
            )
        }
    })
}

/// Parses and validates a creation config without a device: the dtype, the variant's config,
/// no spectral clip ([`crate::adapter::GeneratorSpec::require_no_clip`]) and the GPU rank limit.
fn parse_config(c: &ElraAdapterConfig) -> CResult<(ElraGpuDtype, Kind)> {
    let dtype = gpu_dtype_of(c.dtype)?;
    let kind = match variant_of(c.variant)? {
        Some(v) => {
            let cfg = c.elra(v)?;
            cfg.generator.spec_at(0).require_no_clip()?;
            Kind::Elra(cfg)
        }
        None => Kind::Lora(c.lora()?),
    };
    check_rank(c.r)?;
    Ok((dtype, kind))
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
        let (dtype, kind) = parse_config(&c)?;
        let args = (&c, &kind, device, w0, ld_w0, stream);
        // SAFETY: (all three arms) the caller's contract on `w0` and `stream` is forwarded.
        let h = unsafe {
            match dtype {
                ElraGpuDtype::ELRA_GPU_DTYPE_F32 => create::<f32>(args)?,
                ElraGpuDtype::ELRA_GPU_DTYPE_F16 => create::<f16>(args)?,
                ElraGpuDtype::ELRA_GPU_DTYPE_BF16 => create::<bf16>(args)?,
            }
        };
        // SAFETY: validated non-null and aligned; the caller guarantees writability.
        unsafe { out.write(handle::into_raw(h)) };
        Ok(())
    })
}

/// The arguments of [`create`]: config, its parsed kind, device ordinal, `w0`, `ld_w0`, stream.
type CreateArgs<'a> = (
    &'a ElraAdapterConfig,
    &'a Kind,
    usize,
    *const c_void,
    usize,
    *mut c_void,
);

/// Checks `w0`, opens the device, copies `W0` (ordered on the caller's stream) and builds the
/// layer of activation type `T` with the CPU's initialisation ([`GpuElraLayer::new`],
/// [`GpuLoraLayer::new`]).
///
/// # Safety
/// `w0` must be NULL or device memory covering the described matrix; `stream` NULL or a live
/// stream of the device's primary context.
unsafe fn create<T: GpuDtype>(
    (c, kind, device, w0, ld_w0, stream): CreateArgs<'_>,
) -> CResult<ElraGpuAdapter> {
    // Argument checks that need no device first, so that they work on any machine.
    dev_mat::<T>(None, "w0", w0, c.d, c.k, ld_w0)?;
    device_count()?;
    let _ctx = CtxRestore::new();
    let dev = Arc::new(CudaDevice::new(device)?);
    let w0m = dev_mat::<T>(Some(&dev), "w0", w0, c.d, c.k, ld_w0)?;
    let caller = CallerStream::new(dev.clone())?;
    let copy = || -> CResult<_> {
        // SAFETY: `w0` validated above and alive until the caller's stream passes this call
        // (caller contract); the copy is ordered after the caller's stream, and the caller's
        // stream waits for it.
        let b = unsafe { w0m.borrow(&dev)? };
        Ok(b.to_owned(&dev)?)
    };
    // SAFETY: the caller's contract on `stream`.
    let w0_own = unsafe { caller.ordered(stream, copy)? };
    let dtype = T::GPU_DTYPE as u32;
    let (config, layer): (_, Box<dyn GpuAdapter<T>>) = match kind {
        Kind::Elra(e) => (
            ElraAdapterConfig::of_elra(e, dtype),
            Box::new(GpuElraLayer::new(dev, e.clone(), w0_own)?),
        ),
        Kind::Lora(l) => (
            ElraAdapterConfig::of_lora(l, dtype),
            Box::new(GpuLoraLayer::new(dev, l.clone(), w0_own)?),
        ),
    };
    Ok(ElraGpuAdapter {
        magic: 0,
        config,
        layer: T::wrap(layer),
        caller,
    })
}

/// Frees a GPU adapter. NULL is ignored. Work already enqueued finishes on the library's stream
/// (its memory is released in stream order); the handle must not be used afterwards. The
/// thread's error text is left as it was (as [`super::adapter::elra_adapter_destroy`]).
///
/// # Safety
/// `adapter` must be NULL or a live handle from [`elra_gpu_adapter_create`], not used concurrently.
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_adapter_destroy(adapter: *mut ElraGpuAdapter) {
    guard_void(|| {
        if adapter.is_null() {
            return Ok(());
        }
        // SAFETY: the caller guarantees a live handle with exclusive access.
        let a = unsafe { handle::live_ref(adapter)? };
        let _ctx = CtxRestore::new();
        // The handle's buffers are freed stream-ordered on its device: make its context current
        // for the drop (CtxRestore puts the caller's back afterwards).
        let _ = a.caller.device().context().bind_to_thread();
        // SAFETY: a live handle from `handle::into_raw`, not used afterwards (caller contract).
        unsafe { handle::destroy(adapter) }
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
        let a = unsafe { handle::live_ref(adapter)? };
        // SAFETY: the caller guarantees writability.
        unsafe { write_one(("out", out), a.config) }
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
        let a = unsafe { handle::live_ref(adapter)? };
        let shape = || any_dtype!(&a.layer, l => param_shape(l.as_ref(), which));
        // SAFETY: the caller guarantees writability.
        unsafe { write_pair(("rows", rows), ("cols", cols), shape) }
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
        let a = unsafe { handle::live(adapter)? };
        any_dtype!(&mut a.layer, l => l.set_step(step)?);
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
        let a = unsafe { handle::live_ref(adapter)? };
        let now = || Ok(any_dtype!(&a.layer, l => (l.step(), l.alpha())));
        // SAFETY: the caller guarantees writability.
        unsafe { write_pair(("step", step), ("alpha", alpha), now) }
    })
}

// ------------------------------------------------------------------------------------------
// Parameters and gradients (host f32 buffers)
// ------------------------------------------------------------------------------------------

/// The layer's index of parameter `which` (W0 is fixed at creation: `why` says so).
fn gpu_param_index<A: Adapter + ?Sized>(l: &A, which: u32, why: &str) -> CResult<usize> {
    param_index(l, which)?.ok_or_else(|| ElraError::invalid("which", why.to_string()).into())
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
        let a = unsafe { handle::live(adapter)? };
        let _ctx = CtxRestore::new();
        any_dtype!(&mut a.layer, l => {
            let why = "W0 of a GPU handle is set at creation (create a new handle)";
            let i = gpu_param_index(l.as_ref(), which, why)?;
            let p = l.params()[i];
            if (rows, cols) != (p.rows, p.cols) {
                return Err(ElraError::shape("data", (p.rows, p.cols), (rows, cols)).into());
            }
            // SAFETY: caller contract on `data` (read_matrix validates the layout and finiteness).
            let m = unsafe { read_matrix::<f32>("data", data, rows, cols, ld)? };
            l.set_param(i, &m)?;
        });
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
        let a = unsafe { handle::live_ref(adapter)? };
        let _ctx = CtxRestore::new();
        let m = any_dtype!(&a.layer, l => {
            let why = "W0 of a GPU handle lives on the device (read it with elra_gpu_adapter_merge \
                       at zero parameters)";
            let i = gpu_param_index(l.as_ref(), which, why)?;
            let p = l.params()[i];
            if (rows, cols) != (p.rows, p.cols) {
                return Err(ElraError::shape("out", (p.rows, p.cols), (rows, cols)).into());
            }
            (out_layout("out", out, rows, cols, ld)?, l.param(i)?)
        });
        let (lo, m) = m;
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
        let a = unsafe { handle::live_ref(adapter)? };
        let _ctx = CtxRestore::new();
        any_dtype!(&a.layer, l => {
            let l = l.as_ref();
            // Validate every output before any work.
            let outs = GradOuts::check(l, (da, ld_da), (db, ld_db), deta)?;
            // `grad` checks that a backward ran and the statuses of its r×r kernels.
            let grads = outs.read(l)?;
            // SAFETY: layouts validated above; the caller guarantees writability. Everything was
            // downloaded first, so nothing is written unless the whole call succeeded.
            unsafe { outs.write(&grads) };
        });
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
        let a = unsafe { handle::live(adapter)? };
        let _ctx = CtxRestore::new();
        let pair = || energy_pair(any_dtype!(&mut a.layer, l => l.energy()?));
        // SAFETY: the caller guarantees writability.
        unsafe { write_pair(("energy", energy), ("penalty", penalty), pair) }
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
        let a = unsafe { handle::live_ref(adapter)? };
        let _ctx = CtxRestore::new();
        any_dtype!(&a.layer, l => l.synchronize()?);
        Ok(())
    })
}

/// Turns the overflow rule on (`enabled = 1`) or off (`0`, the default) for the handle's
/// outputs ([`GpuAdapter::set_check_finite`]). The CPU handles always apply it: finite inputs
/// with a non-finite output are `ELRA_OVERFLOW`. On the GPU it is opt-in, since it costs one more
/// read of each output and a host wait: when on, [`elra_gpu_adapter_forward`] (`y`),
/// [`elra_gpu_adapter_backward`] (`dx` and the parameter gradients), [`elra_gpu_adapter_merge`]
/// (`w_new`) and [`elra_gpu_adapter_unmerge`] (`w0`) scan their outputs for NaN/±Inf, synchronise
/// the handle's stream and return `ELRA_OVERFLOW` with a message naming the first non-finite
/// output (a forward or backward that fails the check keeps no tape and no gradients). Off, they
/// stay asynchronous. Inputs are never scanned, so a non-finite input shows up in the outputs.
///
/// # Safety
/// `adapter` must be a live handle with exclusive access.
#[no_mangle]
pub unsafe extern "C" fn elra_gpu_adapter_set_check_finite(
    adapter: *mut ElraGpuAdapter,
    enabled: u32,
) -> ElraStatus {
    guard(|| {
        let on = flag("enabled", enabled)?;
        // SAFETY: caller contract.
        let a = unsafe { handle::live(adapter)? };
        any_dtype!(&mut a.layer, l => l.set_check_finite(on));
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------
// Forward, backward, merge, unmerge on caller device memory
// ------------------------------------------------------------------------------------------

/// A caller device matrix argument: name, pointer, rows, cols, leading dimension.
type MatArg = (&'static str, *const c_void, usize, usize, usize);

/// Validates the call's device matrices (in argument order) against the layer's device and
/// rejects an output (the last of them) that overlaps any other.
fn check_mats<T: Activation, const N: usize>(
    l: &dyn GpuAdapter<T>,
    args: [MatArg; N],
) -> CResult<[CallerMatrix<T>; N]> {
    let dev = l.device();
    let mut mats = Vec::with_capacity(N);
    for (arg, p, rows, cols, ld) in args {
        mats.push(dev_mat::<T>(Some(dev), arg, p, rows, cols, ld)?);
    }
    no_overlap(&mats[N.saturating_sub(1)..], &mats)?;
    mats.try_into()
        .map_err(|_| ElraError::invalid("args", "wrong argument count").into())
}

/// The typed body of [`elra_gpu_adapter_forward`].
///
/// # Safety
/// `x`, `y` and `stream` as that export's contract.
unsafe fn forward<T: Activation>(
    l: &mut dyn GpuAdapter<T>,
    caller: &CallerStream,
    (n, x, ld_x, y, ld_y): (usize, *const c_void, usize, *mut c_void, usize),
    stream: *mut c_void,
) -> CResult<()> {
    let (d, k) = l.dims();
    let [xm, ym] = check_mats(l, [("x", x, n, k, ld_x), ("y", y.cast_const(), n, d, ld_y)])?;
    let dev = caller.device();
    let run = || -> CResult<()> {
        // SAFETY: validated matrices, alive until the caller's stream passes this call (caller
        // contract); `y` overlaps nothing.
        let (xb, mut yb) = unsafe { (xm.borrow(dev)?, ym.borrow(dev)?) };
        Ok(l.forward(xb.get(), None, yb.get_mut())?)
    };
    // SAFETY: the caller's contract on `stream`.
    unsafe { caller.ordered(stream, run) }
}

/// Forward pass `y = x W_newᵀ` on device memory, without forming `W_new` for small N (ELRA:
/// eq. 5, `u = x W0ᵀ`, `y = u + ((u Cᵀ) φ1(CA)ᵀ) Aᵀ`) or through `W_eff = W0 + A φ1(Z) C W0`
/// (eq. 30) when that moves fewer bytes ([`crate::cuda::choose_route`]); LoRA:
/// `x W0ᵀ + s (x Aᵀ) Bᵀ`. `x` is n×k (`ld_x == k`), `y` n×d (`ld_y == d`), both of the
/// handle's activation type in device memory; rows are samples. Ordered on `stream` (module
/// docs); asynchronous, unless [`elra_gpu_adapter_set_check_finite`] is on: then `y` is scanned,
/// the stream synchronised, and a non-finite `y` is `ELRA_OVERFLOW`. Keeps the tape for
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
        let a = unsafe { handle::live(adapter)? };
        let _ctx = CtxRestore::new();
        let args = (n, x, ld_x, y, ld_y);
        // SAFETY: (all arms) the caller's contract on `x`, `y` and `stream` is forwarded.
        any_dtype!(&mut a.layer, l => unsafe { forward(l.as_mut(), &a.caller, args, stream) })
    })
}

/// The typed body of [`elra_gpu_adapter_backward`]: [`Adapter::recompute`] unless the tape of
/// the last forward is reused, then [`Adapter::backward`] (which checks that tape's key).
///
/// # Safety
/// The matrices and `stream` as that export's contract.
unsafe fn backward<T: Activation>(
    l: &mut dyn GpuAdapter<T>,
    caller: &CallerStream,
    [x, dy, dx]: [MatArg; 3],
    recompute: bool,
    stream: *mut c_void,
) -> CResult<()> {
    let [xm, dym, dxm] = check_mats(l, [x, dy, dx])?;
    let dev = caller.device();
    let run = || -> CResult<()> {
        // SAFETY: validated matrices, alive until the caller's stream passes this call (caller
        // contract); `dx` overlaps neither `x` nor `dy`.
        let (xb, dyb, mut dxb) = unsafe { (xm.borrow(dev)?, dym.borrow(dev)?, dxm.borrow(dev)?) };
        if recompute {
            l.recompute(xb.get())?;
        }
        Ok(l.backward(xb.get(), dyb.get(), dxb.get_mut())?)
    };
    // SAFETY: the caller's contract on `stream`.
    unsafe { caller.ordered(stream, run) }
}

/// Reverse mode of [`elra_gpu_adapter_forward`] on device memory: given `x` (n×k) and
/// `dy = ∂L/∂y` (n×d), writes `dx = ∂L/∂x` (n×k) to caller device memory and keeps the adapter
/// gradients (∂A, ∂B, ∂η; read them with [`elra_gpu_adapter_get_grads`]). For ELRA the
/// gradients include the energy penalty, `L = ⟨y, dy⟩ + λ‖G‖²_F` (eq. 20–21), and run through
/// α/η of the current step (eq. 19) and the adjoint Fréchet derivative of φ1 (Prop. 1, eq. 5;
/// Algorithm 1 line 12) with N×r, r×d and r×r intermediates only (no dense weight gradient).
/// `flags` is an [`ElraGpuBackward`]: recompute the forward of `x` (0) or reuse the last
/// forward's tape (1). All ld must equal their column counts; `dx` may not overlap `x` or `dy`.
/// Ordered on `stream`; asynchronous, unless [`elra_gpu_adapter_set_check_finite`] is on: then
/// `dx` and the gradients are scanned, the stream synchronised, and a non-finite one is
/// `ELRA_OVERFLOW` naming it.
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
        let a = unsafe { handle::live(adapter)? };
        let _ctx = CtxRestore::new();
        let recompute = match flags {
            0 => true,
            1 => false,
            v => {
                return Err(ElraError::invalid(
                    "flags",
                    format!("unknown ElraGpuBackward value {v}"),
                )
                .into())
            }
        };
        let (d, k) = any_dtype!(&a.layer, l => l.dims());
        let mats = [
            ("x", x, n, k, ld_x),
            ("dy", dy, n, d, ld_dy),
            ("dx", dx.cast_const(), n, k, ld_dx),
        ];
        // SAFETY: (all arms) the caller's contract on the matrices and `stream` is forwarded.
        any_dtype!(&mut a.layer, l => unsafe {
            backward(l.as_mut(), &a.caller, mats, recompute, stream)
        })
    })
}

/// The typed body of [`elra_gpu_adapter_merge`].
///
/// # Safety
/// `w_new` and `stream` as that export's contract.
unsafe fn merge<T: Activation>(
    l: &mut dyn GpuAdapter<T>,
    caller: &CallerStream,
    (w_new, ld): (*mut c_void, usize),
    stream: *mut c_void,
) -> CResult<()> {
    let (d, k) = l.dims();
    let [wm] = check_mats(l, [("w_new", w_new.cast_const(), d, k, ld)])?;
    let dev = caller.device();
    let run = || -> CResult<()> {
        // SAFETY: a validated matrix, alive until the caller's stream passes this call (caller
        // contract).
        let mut wb = unsafe { wm.borrow(dev)? };
        Ok(l.merge(wb.get_mut())?)
    };
    // SAFETY: the caller's contract on `stream`.
    unsafe { caller.ordered(stream, run) }
}

/// The typed body of [`elra_gpu_adapter_unmerge`].
///
/// # Safety
/// The matrices and `stream` as that export's contract.
unsafe fn unmerge<T: Activation>(
    l: &mut dyn GpuAdapter<T>,
    caller: &CallerStream,
    [w_new, w0_out]: [MatArg; 2],
    stream: *mut c_void,
) -> CResult<()> {
    let [wm, om] = check_mats(l, [w_new, w0_out])?;
    let dev = caller.device();
    let run = || -> CResult<()> {
        // SAFETY: validated matrices, alive until the caller's stream passes this call (caller
        // contract); `w0_out` does not overlap `w_new`.
        let (wb, mut ob) = unsafe { (wm.borrow(dev)?, om.borrow(dev)?) };
        Ok(l.unmerge(wb.get(), ob.get_mut())?)
    };
    // SAFETY: the caller's contract on `stream`.
    unsafe { caller.ordered(stream, run) }
}

/// The merged weight `W_new` (d×k, `ld == k`, activation type) into caller device memory `w_new`
/// (ELRA: `W0 + A (φ1(Z) (C W0))`, Prop. 1 / eq. 30; LoRA: `W0 + s·B·A`). Ordered on `stream`;
/// asynchronous, unless [`elra_gpu_adapter_set_check_finite`] is on (then a non-finite `w_new`
/// is `ELRA_OVERFLOW`, after a host synchronisation).
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
        let a = unsafe { handle::live(adapter)? };
        let _ctx = CtxRestore::new();
        // SAFETY: (all arms) the caller's contract on `w_new` and `stream` is forwarded.
        any_dtype!(&mut a.layer, l => unsafe {
            merge(l.as_mut(), &a.caller, (w_new, ld), stream)
        })
    })
}

/// Recovers `W0` from a merged weight with the current parameters: `w0_out = exp(−G) w_new`
/// (ELRA: `w_new − A φ1(−Z) (C w_new)`, Prop. 3 with Prop. 1; LoRA: `w_new − s·B·A`). Both d×k
/// in caller device memory with `ld == k`; they may not overlap. Ordered on `stream`;
/// asynchronous, unless [`elra_gpu_adapter_set_check_finite`] is on (then a non-finite `w0_out`
/// is `ELRA_OVERFLOW`, named `w0`, after a host synchronisation).
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
        let a = unsafe { handle::live(adapter)? };
        let _ctx = CtxRestore::new();
        let (d, k) = any_dtype!(&a.layer, l => l.dims());
        let mats = [
            ("w_new", w_new, d, k, ld_w_new),
            ("w0_out", w0_out.cast_const(), d, k, ld_w0_out),
        ];
        // SAFETY: (all arms) the caller's contract on the matrices and `stream` is forwarded.
        any_dtype!(&mut a.layer, l => unsafe { unmerge(l.as_mut(), &a.caller, mats, stream) })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capi::{elra_adapter_config_default, elra_last_error_message};
    use crate::cuda::MAX_RANK;
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
                elra_gpu_adapter_set_check_finite(h, 1),
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
    fn check_finite_setting_is_validated_before_the_handle() {
        // SAFETY: the bad flag is rejected before the (NULL) handle is read.
        let s = unsafe { elra_gpu_adapter_set_check_finite(null_mut(), 2) };
        assert_eq!(s, ElraStatus::ELRA_INVALID_ARGUMENT);
        assert!(message().contains("enabled"), "{}", message());
    }

    #[test]
    fn null_device_matrices_are_null_pointer_errors() {
        // The checks themselves are `cuda::caller`'s (tested there); the ABI adds the NULL status.
        assert!(matches!(
            dev_mat::<f32>(None, "x", null(), 3, 4, 4),
            Err(CError::Null("x"))
        ));
        assert!(dev_mat::<f32>(None, "x", FAKE, 3, 4, 4).is_ok());
        assert!(matches!(
            dev_mat::<f32>(None, "x", FAKE, 3, 4, 5),
            Err(CError::Elra(ElraError::InvalidArgument { .. }))
        ));
    }
}
