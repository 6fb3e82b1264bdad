//! The opaque adapter handle `ElraAdapter`: one frozen d×k weight `W0` adapted by ELRA
//! (`W_new = exp(G) W0`, eq. 3, through the Woodbury form of Prop. 1) or by LoRA, in f32 or f64.
//!
//! Life cycle: fill an [`ElraAdapterConfig`] (e.g. with [`elra_adapter_config_default`]), create
//! with [`elra_adapter_create`] (W0 is copied), set and get parameters, run
//! [`elra_adapter_forward_f64`] / [`elra_adapter_backward_f64`] (∂x and the adapter gradients),
//! merge / unmerge, read the energy (eq. 21) and parameter counts (Remark 1), save / load adapter
//! directories ([`super::files`]), and free with [`elra_adapter_destroy`].
//! Typed functions end in `_f32`/`_f64` and must match the handle's dtype
//! (`ELRA_INVALID_ARGUMENT` otherwise).
//!
//! The handle holds the layer as a [`HostAdapter`] trait object, so every export below is the
//! same few lines for ELRA and LoRA: check the arguments, lock, call the [`Adapter`] method,
//! copy the result out.
//!
//! Threads: functions taking `const ElraAdapter *` may be called concurrently on one handle (the
//! handle serialises them with a lock); functions taking `ElraAdapter *` need exclusive access.

use std::ffi::c_void;
use std::sync::{Mutex, MutexGuard};

use nalgebra::DMatrix;

use super::config::{
    dtype_of, missing_param, param_names, variant_of, ElraAdapterConfig, ElraDtype,
};
use super::handle::{self, Handle};
use super::layout::{check_scalar_out, out_layout, read_matrix, row_major, write_out};
use super::{guard, CError, CResult, ElraStatus};
use crate::adapter::{Adapter, ElraConfig, ElraLayer, HostAdapter, LoraConfig, LoraLayer};
use crate::linalg::Real;
use crate::ElraError;

/// The adapter behind a handle, by element type.
pub(crate) enum Host {
    F32(Box<dyn HostAdapter<f32>>),
    F64(Box<dyn HostAdapter<f64>>),
}

/// Runs `$body` with `$a` bound to the handle's adapter (`&mut dyn HostAdapter<f32 | f64>`).
macro_rules! any_dtype {
    ($host:expr, $a:ident => $body:expr) => {
        match $host {
            Host::F32($a) => $body,
            Host::F64($a) => $body,
        }
    };
}

/// An element type a CPU handle can hold.
pub(crate) trait HostReal: Real {
    /// The handle dtype of `Self`.
    const DTYPE: ElraDtype;
    /// The adapter if the handle holds `Self`.
    fn adapter_of(h: &mut Host) -> Option<&mut dyn HostAdapter<Self>>;
    /// A handle's adapter of `Self`.
    fn wrap(a: Box<dyn HostAdapter<Self>>) -> Host;
}

impl HostReal for f32 {
    const DTYPE: ElraDtype = ElraDtype::ELRA_DTYPE_F32;
    fn adapter_of(h: &mut Host) -> Option<&mut dyn HostAdapter<f32>> {
        match h {
            Host::F32(a) => Some(a.as_mut()),
            Host::F64(_) => None,
        }
    }
    fn wrap(a: Box<dyn HostAdapter<f32>>) -> Host {
        Host::F32(a)
    }
}

impl HostReal for f64 {
    const DTYPE: ElraDtype = ElraDtype::ELRA_DTYPE_F64;
    fn adapter_of(h: &mut Host) -> Option<&mut dyn HostAdapter<f64>> {
        match h {
            Host::F64(a) => Some(a.as_mut()),
            Host::F32(_) => None,
        }
    }
    fn wrap(a: Box<dyn HostAdapter<f64>>) -> Host {
        Host::F64(a)
    }
}

/// An adapter: a frozen weight W0 with its ELRA or LoRA parameters (opaque to C).
pub struct ElraAdapter {
    magic: u64,
    config: ElraAdapterConfig,
    dtype: ElraDtype,
    inner: Mutex<Host>,
}

impl Handle for ElraAdapter {
    const MAGIC: u64 = 0x454c_5241_4144_5054; // "ELRAADPT"
    const KIND: &'static str = "elra adapter";
    fn tag(&self) -> u64 {
        self.magic
    }
    fn set_tag(&mut self, tag: u64) {
        self.magic = tag;
    }
}

impl ElraAdapter {
    /// A handle for `layer`, described to C by `config`.
    pub(crate) fn new<T: HostReal>(
        config: ElraAdapterConfig,
        layer: Box<dyn HostAdapter<T>>,
    ) -> Self {
        ElraAdapter {
            magic: 0,
            config: ElraAdapterConfig {
                dtype: T::DTYPE as u32,
                ..config
            },
            dtype: T::DTYPE,
            inner: Mutex::new(T::wrap(layer)),
        }
    }

    /// The handle's element type.
    pub(crate) fn dtype(&self) -> ElraDtype {
        self.dtype
    }

    /// The adapter, locked. A lock poisoned by a panic (a library bug, reported as
    /// `ELRA_PANIC`) is taken over: every parameter change is validated before it is applied,
    /// so the adapter is consistent.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Host> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the adapter if the handle holds `T` (`ELRA_INVALID_ARGUMENT` otherwise).
    pub(crate) fn with<T: HostReal, R>(
        &self,
        f: impl FnOnce(&mut dyn HostAdapter<T>) -> CResult<R>,
    ) -> CResult<R> {
        let mut host = self.lock();
        match T::adapter_of(&mut host) {
            Some(a) => f(a),
            None => Err(ElraError::invalid(
                "adapter",
                format!(
                    "the handle holds {:?} but a {} function was called",
                    self.dtype,
                    T::NAME
                ),
            )
            .into()),
        }
    }
}

/// The adapter's parameter index of [`super::ElraParam`] `which`; `None` for W0.
pub(crate) fn param_index<A: Adapter + ?Sized>(a: &A, which: u32) -> CResult<Option<usize>> {
    match param_names(which)? {
        None => Ok(None),
        Some(names) => names
            .iter()
            .find_map(|n| a.param_index(n))
            .map(Some)
            .ok_or_else(|| missing_param(which).into()),
    }
}

/// `(rows, cols)` of [`super::ElraParam`] `which` (W0: d×k).
pub(crate) fn param_shape<A: Adapter + ?Sized>(a: &A, which: u32) -> CResult<(usize, usize)> {
    Ok(match param_index(a, which)? {
        Some(i) => {
            let p = a.params()[i];
            (p.rows, p.cols)
        }
        None => a.dims(),
    })
}

// ------------------------------------------------------------------------------------------
// Creation, destruction, information
// ------------------------------------------------------------------------------------------

/// Fills `*out` with the paper's defaults (App. H) for a `variant` adapter of dtype `dtype` on a
/// d×k weight with rank r trained for `total_steps` steps: η₀ = 1e-3, λ = 1e-5, τ = 2, exponential
/// α schedule with `T_warm` = 25 % of the steps and γ = 5, cosine η multiplier, seed 0; LoRA:
/// `lora_alpha = r`. Does not validate d, k, r (creation does).
///
/// # Safety
/// `out` must point to a writable `ElraAdapterConfig`.
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_config_default(
    variant: u32,
    dtype: u32,
    d: usize,
    k: usize,
    r: usize,
    total_steps: usize,
    out: *mut ElraAdapterConfig,
) -> ElraStatus {
    guard(|| {
        check_scalar_out("out", out)?;
        let dt = dtype_of(dtype)? as u32;
        let c = match variant_of(variant)? {
            Some(v) => ElraAdapterConfig::of_elra(&ElraConfig::new(v, d, k, r, total_steps), dt),
            None => ElraAdapterConfig::of_lora(&LoraConfig::new(d, k, r), dt),
        };
        // SAFETY: validated non-null and aligned; the caller guarantees it is writable.
        unsafe { out.write(c) };
        Ok(())
    })
}

/// Creates an adapter from `config` on the frozen weight `w0` (d×k, row-major with leading
/// dimension `ld_w0 ≥ k`, elements of `config->dtype`; copied). ELRA factors start from the
/// seeded Xavier-uniform initialisation (App. H) with η = η₀ at step 0; LoRA starts as PEFT does
/// (`lora_A` Kaiming-uniform, `lora_B` = 0). On success `*out` receives a handle to free with
/// [`elra_adapter_destroy`]; on error `*out` is untouched.
///
/// # Safety
/// `config` must point to a readable config, `w0` to d×k readable elements of the config's dtype
/// laid out as described, `out` to a writable pointer.
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_create(
    config: *const ElraAdapterConfig,
    w0: *const c_void,
    ld_w0: usize,
    out: *mut *mut ElraAdapter,
) -> ElraStatus {
    guard(|| {
        if config.is_null() {
            return Err(CError::Null("config"));
        }
        check_scalar_out("out", out)?;
        // SAFETY: non-null; the caller guarantees a readable, initialised config (plain data).
        let c = unsafe { config.read_unaligned() };
        let h = match dtype_of(c.dtype)? {
            // SAFETY: the caller guarantees w0 covers d×k elements of the config's dtype.
            ElraDtype::ELRA_DTYPE_F32 => unsafe { build::<f32>(&c, w0.cast(), ld_w0)? },
            // SAFETY: as above.
            ElraDtype::ELRA_DTYPE_F64 => unsafe { build::<f64>(&c, w0.cast(), ld_w0)? },
        };
        // SAFETY: validated non-null and aligned; the caller guarantees it is writable.
        unsafe { out.write(handle::into_raw(h)) };
        Ok(())
    })
}

/// Validates `c`, reads `W0` and builds the layer (ELRA: Xavier factors, App. H; LoRA: PEFT's
/// initialisation).
///
/// # Safety
/// `w0` must cover the d×k layout with leading dimension `ld_w0`.
unsafe fn build<T: HostReal>(
    c: &ElraAdapterConfig,
    w0: *const T,
    ld_w0: usize,
) -> CResult<ElraAdapter> {
    // The config is validated before W0 is read, so dimension errors name the config fields.
    let variant = variant_of(c.variant)?;
    let elra = variant.map(|v| c.elra(v)).transpose()?;
    let lora = if elra.is_none() {
        Some(c.lora()?)
    } else {
        None
    };
    // SAFETY: forwarded contract.
    let w0 = unsafe { read_matrix("w0", w0, c.d, c.k, ld_w0)? };
    let layer: Box<dyn HostAdapter<T>> = match (elra, lora) {
        (Some(e), _) => Box::new(ElraLayer::new(e, w0)?),
        (None, Some(l)) => Box::new(LoraLayer::new(l, w0)?),
        (None, None) => return Err(ElraError::invalid("variant", "no variant").into()),
    };
    Ok(ElraAdapter::new(*c, layer))
}

/// Frees an adapter. NULL is ignored. The handle must not be used afterwards.
///
/// # Safety
/// `adapter` must be NULL or a live handle from this library, not used concurrently.
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_destroy(adapter: *mut ElraAdapter) {
    let _ = guard(|| {
        // SAFETY: the caller guarantees NULL or a live handle with exclusive access.
        unsafe { handle::destroy(adapter) }
    });
}

/// Writes the adapter's configuration to `*out` (variant, dtype, d, k, r and the settings it was
/// created or loaded with; `eta` is the initial η₀ — the trained η is [`ElraParam::ELRA_PARAM_ETA`]).
///
/// # Safety
/// `adapter` must be a live handle, `out` a writable `ElraAdapterConfig`.
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_get_config(
    adapter: *const ElraAdapter,
    out: *mut ElraAdapterConfig,
) -> ElraStatus {
    guard(|| {
        // SAFETY: caller contract.
        let a = unsafe { handle::live_ref(adapter)? };
        check_scalar_out("out", out)?;
        // SAFETY: validated; caller guarantees writability.
        unsafe { out.write(a.config) };
        Ok(())
    })
}

/// Shape of a parameter: `(rows, cols)` of [`ElraParam`] `which` (A: d×r / LoRA r×k; B: r×d /
/// LoRA d×r; η: 1×1; W0: d×k). A parameter the variant lacks (B of ELRA-PSD, η of LoRA) is
/// `ELRA_INVALID_ARGUMENT`.
///
/// # Safety
/// `adapter` must be a live handle; `rows` and `cols` writable.
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_param_shape(
    adapter: *const ElraAdapter,
    which: u32,
    rows: *mut usize,
    cols: *mut usize,
) -> ElraStatus {
    guard(|| {
        // SAFETY: caller contract.
        let a = unsafe { handle::live_ref(adapter)? };
        check_scalar_out("rows", rows)?;
        check_scalar_out("cols", cols)?;
        let (r, c) = any_dtype!(&*a.lock(), l => param_shape(l.as_ref(), which)?);
        // SAFETY: validated; caller guarantees writability.
        unsafe {
            rows.write(r);
            cols.write(c);
        }
        Ok(())
    })
}

/// Matrix entries trained (`*matrix_entries`: 2rd for ELRA/Hyb, rd for PSD, r(d+k) for LoRA,
/// Remark 1) and trainable scalars (`*scalars`: η of ELRA, 0 for LoRA).
///
/// # Safety
/// `adapter` must be a live handle; the outputs writable.
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_param_count(
    adapter: *const ElraAdapter,
    matrix_entries: *mut usize,
    scalars: *mut usize,
) -> ElraStatus {
    guard(|| {
        // SAFETY: caller contract.
        let a = unsafe { handle::live_ref(adapter)? };
        check_scalar_out("matrix_entries", matrix_entries)?;
        check_scalar_out("scalars", scalars)?;
        let (m, s) = any_dtype!(&*a.lock(), l => (l.param_count(), l.scalar_param_count()));
        // SAFETY: validated; caller guarantees writability.
        unsafe {
            matrix_entries.write(m);
            scalars.write(s);
        }
        Ok(())
    })
}

/// Sets the optimiser step t, which drives the α schedule (eq. 19, eq. 75) and the η multiplier
/// (App. H). LoRA ignores it.
///
/// # Safety
/// `adapter` must be a live handle with exclusive access.
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_set_step(
    adapter: *mut ElraAdapter,
    step: usize,
) -> ElraStatus {
    guard(|| {
        // SAFETY: caller contract.
        let a = unsafe { handle::live(adapter)? };
        any_dtype!(&mut *a.lock(), l => l.set_step(step)?);
        Ok(())
    })
}

/// The current optimiser step (`*step`) and α at that step (`*alpha`: the schedule's value for
/// ELRA-Hyb, 1 for PSD, 0 for general ELRA and LoRA).
///
/// # Safety
/// `adapter` must be a live handle; the outputs writable.
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_get_step(
    adapter: *const ElraAdapter,
    step: *mut usize,
    alpha: *mut f64,
) -> ElraStatus {
    guard(|| {
        // SAFETY: caller contract.
        let a = unsafe { handle::live_ref(adapter)? };
        check_scalar_out("step", step)?;
        check_scalar_out("alpha", alpha)?;
        let (s, al) = any_dtype!(&*a.lock(), l => (l.step(), l.alpha()));
        // SAFETY: validated; caller guarantees writability.
        unsafe {
            step.write(s);
            alpha.write(al);
        }
        Ok(())
    })
}

/// `‖G‖²_F` of the effective (clipped) generator from r×r Grams (eq. 21) in `*energy`, and the
/// penalty `λ‖G‖²_F` (eq. 20) in `*penalty`. LoRA has no generator: `ELRA_INVALID_ARGUMENT`.
///
/// # Safety
/// `adapter` must be a live handle; the outputs writable.
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_energy(
    adapter: *const ElraAdapter,
    energy: *mut f64,
    penalty: *mut f64,
) -> ElraStatus {
    guard(|| {
        // SAFETY: caller contract.
        let a = unsafe { handle::live_ref(adapter)? };
        check_scalar_out("energy", energy)?;
        check_scalar_out("penalty", penalty)?;
        let e = any_dtype!(&mut *a.lock(), l => l.energy()?)
            .ok_or_else(|| ElraError::invalid("adapter", "LoRA has no generator energy"))?;
        // SAFETY: validated; caller guarantees writability.
        unsafe {
            energy.write(e.frobenius_sq);
            penalty.write(e.penalty);
        }
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------
// Typed operations (generic bodies, exported per dtype below)
// ------------------------------------------------------------------------------------------

/// # Safety
/// `data` covers rows×cols with leading dimension `ld`; exclusive access to the handle.
unsafe fn set_param<T: HostReal>(
    h: *mut ElraAdapter,
    which: u32,
    data: *const T,
    rows: usize,
    cols: usize,
    ld: usize,
) -> CResult<()> {
    // SAFETY: caller contract.
    let a = unsafe { handle::live(h)? };
    a.with::<T, _>(|l| {
        let shape = param_shape(l, which)?;
        if (rows, cols) != shape {
            return Err(ElraError::shape("data", shape, (rows, cols)).into());
        }
        // SAFETY: caller contract.
        let m = unsafe { read_matrix("data", data, rows, cols, ld)? };
        match param_index(l, which)? {
            Some(i) => l.set_param(i, &m)?,
            None => l.set_w0(&m)?,
        }
        Ok(())
    })
}

/// # Safety
/// `out` covers rows×cols with leading dimension `ld` for writing.
unsafe fn get_param<T: HostReal>(
    h: *const ElraAdapter,
    which: u32,
    out: *mut T,
    rows: usize,
    cols: usize,
    ld: usize,
) -> CResult<()> {
    // SAFETY: caller contract.
    let a = unsafe { handle::live_ref(h)? };
    let m = a.with::<T, _>(|l| {
        let shape = param_shape(l, which)?;
        if (rows, cols) != shape {
            return Err(ElraError::shape("out", shape, (rows, cols)).into());
        }
        Ok(match param_index(l, which)? {
            Some(i) => l.param(i)?,
            None => l.w0().clone(),
        })
    })?;
    let lo = out_layout("out", out, rows, cols, ld)?;
    // SAFETY: validated layout; caller guarantees writability.
    unsafe { write_out(out, &lo, &row_major(&m)) };
    Ok(())
}

/// # Safety
/// `x` covers n×k (ld_x), `y` covers n×d (ld_y).
unsafe fn forward<T: HostReal>(
    h: *const ElraAdapter,
    n: usize,
    x: *const T,
    ld_x: usize,
    y: *mut T,
    ld_y: usize,
) -> CResult<()> {
    // SAFETY: caller contract.
    let a = unsafe { handle::live_ref(h)? };
    let (ly, ym) = a.with::<T, _>(|l| {
        let (d, k) = l.dims();
        let ly = out_layout("y", y, n, d, ld_y)?;
        // SAFETY: caller contract.
        let xm = unsafe { read_matrix("x", x, n, k, ld_x)? };
        Ok((ly, l.apply(&xm)?))
    })?;
    // SAFETY: validated layout; caller guarantees writability.
    unsafe { write_out(y, &ly, &row_major(&ym)) };
    Ok(())
}

/// # Safety
/// `w_new` covers d×k (ld) for writing.
unsafe fn merge<T: HostReal>(h: *const ElraAdapter, w_new: *mut T, ld: usize) -> CResult<()> {
    // SAFETY: caller contract.
    let a = unsafe { handle::live_ref(h)? };
    let m = a.with::<T, _>(|l| {
        let (d, k) = l.dims();
        let mut m = DMatrix::zeros(d, k);
        l.merge(&mut m)?;
        Ok(m)
    })?;
    let lo = out_layout("w_new", w_new, m.nrows(), m.ncols(), ld)?;
    // SAFETY: validated layout; caller guarantees writability.
    unsafe { write_out(w_new, &lo, &row_major(&m)) };
    Ok(())
}

/// # Safety
/// `w_new` covers d×k (ld_w_new) for reading, `w0_out` d×k (ld_w0_out) for writing.
unsafe fn unmerge<T: HostReal>(
    h: *const ElraAdapter,
    w_new: *const T,
    ld_w_new: usize,
    w0_out: *mut T,
    ld_w0_out: usize,
) -> CResult<()> {
    // SAFETY: caller contract.
    let a = unsafe { handle::live_ref(h)? };
    let (lo, w0) = a.with::<T, _>(|l| {
        let (d, k) = l.dims();
        let lo = out_layout("w0_out", w0_out, d, k, ld_w0_out)?;
        // SAFETY: caller contract.
        let wn = unsafe { read_matrix("w_new", w_new, d, k, ld_w_new)? };
        let mut w0 = DMatrix::zeros(d, k);
        l.unmerge(&wn, &mut w0)?;
        Ok((lo, w0))
    })?;
    // SAFETY: validated layout; caller guarantees writability.
    unsafe { write_out(w0_out, &lo, &row_major(&w0)) };
    Ok(())
}

/// Sets parameter `which` ([`ElraParam`]) from `data` (rows×cols, row-major, leading dimension
/// `ld ≥ cols`), f64 handles. `(rows, cols)` must equal [`elra_adapter_param_shape`]
/// (`ELRA_SHAPE_MISMATCH` otherwise); values must be finite, η > 0. Setting W0 keeps A, B, η and
/// the step. On error the adapter is unchanged.
///
/// # Safety
/// `adapter` must be a live handle with exclusive access; `data` must cover the described layout.
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_set_param_f64(
    adapter: *mut ElraAdapter,
    which: u32,
    data: *const f64,
    rows: usize,
    cols: usize,
    ld: usize,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe { set_param::<f64>(adapter, which, data, rows, cols, ld) })
}

/// [`elra_adapter_set_param_f64`] for f32 handles.
///
/// # Safety
/// As [`elra_adapter_set_param_f64`].
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_set_param_f32(
    adapter: *mut ElraAdapter,
    which: u32,
    data: *const f32,
    rows: usize,
    cols: usize,
    ld: usize,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe { set_param::<f32>(adapter, which, data, rows, cols, ld) })
}

/// Copies parameter `which` ([`ElraParam`]) into `out` (rows×cols, leading dimension `ld`), f64
/// handles; `(rows, cols)` must equal [`elra_adapter_param_shape`].
///
/// # Safety
/// `adapter` must be a live handle; `out` must cover the described layout for writing.
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_get_param_f64(
    adapter: *const ElraAdapter,
    which: u32,
    out: *mut f64,
    rows: usize,
    cols: usize,
    ld: usize,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe { get_param::<f64>(adapter, which, out, rows, cols, ld) })
}

/// [`elra_adapter_get_param_f64`] for f32 handles.
///
/// # Safety
/// As [`elra_adapter_get_param_f64`].
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_get_param_f32(
    adapter: *const ElraAdapter,
    which: u32,
    out: *mut f32,
    rows: usize,
    cols: usize,
    ld: usize,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe { get_param::<f32>(adapter, which, out, rows, cols, ld) })
}

/// Forward pass `Y = X W_newᵀ` without forming `W_new` (ELRA: eq. 5 / Algorithm 1 lines 4–8,
/// `U = X W0ᵀ, Y = U + ((U Cᵀ) φ1(CA)ᵀ) Aᵀ`; LoRA: `X W0ᵀ + s (X Aᵀ) Bᵀ`), f64 handles. `x` is
/// n×k (leading dimension `ld_x ≥ k`), `y` n×d (`ld_y ≥ d`); rows are samples.
///
/// # Safety
/// `adapter` must be a live handle; `x` and `y` must cover their layouts (y may alias x only with
/// an identical layout, i.e. when d = k).
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_forward_f64(
    adapter: *const ElraAdapter,
    n: usize,
    x: *const f64,
    ld_x: usize,
    y: *mut f64,
    ld_y: usize,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe { forward::<f64>(adapter, n, x, ld_x, y, ld_y) })
}

/// [`elra_adapter_forward_f64`] for f32 handles.
///
/// # Safety
/// As [`elra_adapter_forward_f64`].
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_forward_f32(
    adapter: *const ElraAdapter,
    n: usize,
    x: *const f32,
    ld_x: usize,
    y: *mut f32,
    ld_y: usize,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe { forward::<f32>(adapter, n, x, ld_x, y, ld_y) })
}

/// The merged weight `W_new` (d×k, leading dimension `ld ≥ k`) into `w_new`, f64 handles (ELRA:
/// `W0 + A(φ1(Z)(C W0))`, Prop. 1 / eq. 30; LoRA: `W0 + s·B·A`).
///
/// # Safety
/// `adapter` must be a live handle; `w_new` must cover the layout for writing.
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_merge_f64(
    adapter: *const ElraAdapter,
    w_new: *mut f64,
    ld: usize,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe { merge::<f64>(adapter, w_new, ld) })
}

/// [`elra_adapter_merge_f64`] for f32 handles.
///
/// # Safety
/// As [`elra_adapter_merge_f64`].
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_merge_f32(
    adapter: *const ElraAdapter,
    w_new: *mut f32,
    ld: usize,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe { merge::<f32>(adapter, w_new, ld) })
}

/// Recovers `W0` from a merged weight with the current parameters into `w0_out`, f64 handles
/// (ELRA: `exp(−G) W_new = W_new + A φ1(−Z)(−C) W_new`, Prop. 3 with Prop. 1; LoRA:
/// `W_new − s·B·A`). Both d×k with their leading dimensions.
///
/// # Safety
/// `adapter` must be a live handle; `w_new` and `w0_out` must cover their layouts (they may
/// alias with identical layouts).
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_unmerge_f64(
    adapter: *const ElraAdapter,
    w_new: *const f64,
    ld_w_new: usize,
    w0_out: *mut f64,
    ld_w0_out: usize,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe { unmerge::<f64>(adapter, w_new, ld_w_new, w0_out, ld_w0_out) })
}

/// [`elra_adapter_unmerge_f64`] for f32 handles.
///
/// # Safety
/// As [`elra_adapter_unmerge_f64`].
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_unmerge_f32(
    adapter: *const ElraAdapter,
    w_new: *const f32,
    ld_w_new: usize,
    w0_out: *mut f32,
    ld_w0_out: usize,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe { unmerge::<f32>(adapter, w_new, ld_w_new, w0_out, ld_w0_out) })
}

/// # Safety
/// Every pointer must cover its described layout (`db` and `deta` may be NULL where unused).
#[allow(clippy::too_many_arguments)]
unsafe fn backward<T: HostReal>(
    h: *const ElraAdapter,
    n: usize,
    x: *const T,
    ld_x: usize,
    dy: *const T,
    ld_dy: usize,
    dx: *mut T,
    ld_dx: usize,
    da: *mut T,
    ld_da: usize,
    db: *mut T,
    ld_db: usize,
    deta: *mut T,
) -> CResult<()> {
    // SAFETY: caller contract.
    let a = unsafe { handle::live_ref(h)? };
    let (layouts, gx, grads) = a.with::<T, _>(|l| {
        let (d, k) = l.dims();
        // Validate every output before any work.
        let l_dx = out_layout("dx", dx, n, k, ld_dx)?;
        let (ar, ac) = param_shape(l, 0)?;
        let l_da = out_layout("da", da, ar, ac, ld_da)?;
        let b = param_index(l, 1).ok().flatten();
        let l_db = match b {
            Some(i) => {
                let p = l.params()[i];
                Some(out_layout("db", db, p.rows, p.cols, ld_db)?)
            }
            None => None,
        };
        let eta = param_index(l, 2).ok().flatten();
        if eta.is_some() {
            check_scalar_out("deta", deta)?;
        }
        // SAFETY: caller contract.
        let xm = unsafe { read_matrix("x", x, n, k, ld_x)? };
        // SAFETY: caller contract.
        let dym = unsafe { read_matrix("dy", dy, n, d, ld_dy)? };
        l.recompute(&xm)?;
        let mut gx = DMatrix::zeros(n, k);
        l.backward(&xm, &dym, &mut gx)?;
        let ga = l.grad(param_index(l, 0)?.unwrap_or(0))?;
        let gb = b.map(|i| l.grad(i)).transpose()?;
        let geta = eta.map(|i| l.grad(i)).transpose()?;
        Ok(((l_dx, l_da, l_db), gx, (ga, gb, geta)))
    })?;
    let (l_dx, l_da, l_db) = layouts;
    let (ga, gb, geta) = grads;
    // SAFETY: layouts validated above; the caller guarantees writability. All results are
    // computed, so nothing is written unless the whole call succeeds.
    unsafe {
        write_out(dx, &l_dx, &row_major(&gx));
        write_out(da, &l_da, &row_major(&ga));
        if let (Some(l), Some(g)) = (l_db, gb) {
            write_out(db, &l, &row_major(&g));
        }
        if let Some(e) = geta {
            deta.write(e[(0, 0)]);
        }
    }
    Ok(())
}

/// Reverse mode of [`elra_adapter_forward_f64`], f64 handles: given the input `x` (n×k) and the
/// gradient `dy = ∂L/∂Y` (n×d), writes `dx = ∂L/∂X` (n×k), `da = ∂L/∂A` and `db = ∂L/∂B` (the
/// shapes of [`elra_adapter_param_shape`]) and, for ELRA, `*deta = ∂L/∂η`. For ELRA the
/// parameter gradients include the energy penalty `λ‖G‖²_F` (eq. 20–21), so
/// `L = ⟨Y, dy⟩ + λ‖G‖²_F`; the chain runs through the spectral clip, the α/η schedules at the
/// current step and the adjoint Fréchet derivative of φ1 (Prop. 1, eq. 5; Algorithm 1 line 12),
/// with only N×r, r×d and r×r intermediates (no d×d matrix, no dense weight gradient). The
/// forward pass is recomputed inside the call. `db` is ignored (may be NULL) for ELRA-PSD; `deta`
/// is ignored (may be NULL) for LoRA. `dx` may alias `x` with an identical layout.
///
/// # Safety
/// `adapter` must be a live handle; every pointer must cover its described layout.
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_backward_f64(
    adapter: *const ElraAdapter,
    n: usize,
    x: *const f64,
    ld_x: usize,
    dy: *const f64,
    ld_dy: usize,
    dx: *mut f64,
    ld_dx: usize,
    da: *mut f64,
    ld_da: usize,
    db: *mut f64,
    ld_db: usize,
    deta: *mut f64,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe {
        backward::<f64>(
            adapter, n, x, ld_x, dy, ld_dy, dx, ld_dx, da, ld_da, db, ld_db, deta,
        )
    })
}

/// [`elra_adapter_backward_f64`] for f32 handles.
///
/// # Safety
/// As [`elra_adapter_backward_f64`].
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_backward_f32(
    adapter: *const ElraAdapter,
    n: usize,
    x: *const f32,
    ld_x: usize,
    dy: *const f32,
    ld_dy: usize,
    dx: *mut f32,
    ld_dx: usize,
    da: *mut f32,
    ld_da: usize,
    db: *mut f32,
    ld_db: usize,
    deta: *mut f32,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe {
        backward::<f32>(
            adapter, n, x, ld_x, dy, ld_dy, dx, ld_dx, da, ld_da, db, ld_db, deta,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capi::*;
    use crate::grad;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::ffi::{c_char, CStr};
    use ElraStatus::*;

    fn last_error() -> String {
        let mut buf = vec![0 as c_char; 512];
        // SAFETY: buf holds 512 writable bytes.
        unsafe { elra_last_error_message(buf.as_mut_ptr(), buf.len()) };
        // SAFETY: NUL-terminated inside buf.
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    fn default_config(
        variant: ElraVariant,
        dtype: ElraDtype,
        d: usize,
        k: usize,
        r: usize,
    ) -> ElraAdapterConfig {
        let mut c = std::mem::MaybeUninit::<ElraAdapterConfig>::uninit();
        // SAFETY: c is a live local of the right type.
        let s = unsafe {
            elra_adapter_config_default(variant as u32, dtype as u32, d, k, r, 100, c.as_mut_ptr())
        };
        assert_eq!(s, ELRA_OK);
        // SAFETY: initialised by the successful call.
        unsafe { c.assume_init() }
    }

    fn rand_rows(n: usize, c: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
        (0..n * c).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// Creates a handle; panics on failure.
    fn create(c: &ElraAdapterConfig, w0: &[f64], ld: usize) -> *mut ElraAdapter {
        let mut h: *mut ElraAdapter = std::ptr::null_mut();
        // SAFETY: live config, W0 of d×k with leading dimension ld, writable out.
        let s = unsafe { elra_adapter_create(c, w0.as_ptr().cast(), ld, &mut h) };
        assert_eq!(s, ELRA_OK, "{}", last_error());
        h
    }

    #[test]
    fn forward_merge_unmerge_match_the_layer_for_every_variant() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (d, k, r, n) = (7, 5, 3, 4);
        for v in [
            ElraVariant::ELRA_VARIANT_GENERAL,
            ElraVariant::ELRA_VARIANT_PSD,
            ElraVariant::ELRA_VARIANT_HYB,
            ElraVariant::ELRA_VARIANT_LORA,
        ] {
            let mut c = default_config(v, ElraDtype::ELRA_DTYPE_F64, d, k, r);
            c.seed = 5;
            c.eta = 0.3; // a generator far from zero
            let w0 = rand_rows(d, k, &mut rng);
            let h = create(&c, &w0, k);
            let w0m = DMatrix::from_row_slice(d, k, &w0);
            let mut reference: Box<dyn HostAdapter<f64>> = match variant_of(c.variant).unwrap() {
                Some(var) => Box::new(ElraLayer::new(c.elra(var).unwrap(), w0m.clone()).unwrap()),
                None => {
                    let mut l = LoraLayer::new(c.lora().unwrap(), w0m.clone()).unwrap();
                    // Non-zero lora_B so that the adapter matters; set through the ABI too.
                    let b = DMatrix::from_fn(d, r, |i, j| (i + 2 * j) as f64 * 0.1);
                    l.set_lora_b(b.clone()).unwrap();
                    let rows = row_major(&b);
                    // SAFETY: live handle, d×r buffer.
                    let s = unsafe { elra_adapter_set_param_f64(h, 1, rows.as_ptr(), d, r, r) };
                    assert_eq!(s, ELRA_OK);
                    Box::new(l)
                }
            };
            // Forward with strided x (ld 9) and y (ld 10): gaps untouched, values identical.
            let (ldx, ldy) = (9, 10);
            let mut x = vec![0.0; n * ldx];
            for i in 0..n {
                for j in 0..k {
                    x[i * ldx + j] = rng.random_range(-1.0..1.0);
                }
            }
            let mut y = vec![-5.0; n * ldy];
            // SAFETY: buffers cover n×k / n×d with the given leading dimensions.
            let s = unsafe { elra_adapter_forward_f64(h, n, x.as_ptr(), ldx, y.as_mut_ptr(), ldy) };
            assert_eq!(s, ELRA_OK, "{}", last_error());
            let xm = DMatrix::from_fn(n, k, |i, j| x[i * ldx + j]);
            let want = reference.apply(&xm).unwrap();
            for i in 0..n {
                for j in 0..ldy {
                    if j < d {
                        assert_eq!(y[i * ldy + j], want[(i, j)]);
                    } else {
                        assert_eq!(y[i * ldy + j], -5.0);
                    }
                }
            }
            // Merge / unmerge.
            let mut wn = vec![0.0; d * k];
            let mut back = vec![0.0; d * k];
            // SAFETY: d×k buffers.
            unsafe {
                assert_eq!(elra_adapter_merge_f64(h, wn.as_mut_ptr(), k), ELRA_OK);
                assert_eq!(
                    elra_adapter_unmerge_f64(h, wn.as_ptr(), k, back.as_mut_ptr(), k),
                    ELRA_OK
                );
            }
            assert_eq!(DMatrix::from_row_slice(d, k, &wn), {
                let mut m = DMatrix::zeros(d, k);
                reference.merge(&mut m).unwrap();
                m
            });
            // exp(−G) exp(G) W0 = W0 up to rounding: entries O(1), ‖G‖ ≤ τ = 2, so 1e-12.
            let err = back
                .iter()
                .zip(&w0)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-12, "unmerge error {err}");
            // Parameter counts (Remark 1).
            let (mut m, mut sc) = (0, 0);
            // SAFETY: live handle, local outputs.
            let st = unsafe { elra_adapter_param_count(h, &mut m, &mut sc) };
            assert_eq!(st, ELRA_OK);
            assert_eq!(
                (m, sc),
                (reference.param_count(), reference.scalar_param_count())
            );
            // SAFETY: handle from create, destroyed once.
            unsafe { elra_adapter_destroy(h) };
        }
    }

    #[test]
    fn parameters_round_trip_and_bad_values_leave_the_adapter_unchanged() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let (d, k, r) = (4, 6, 2);
        let c = default_config(
            ElraVariant::ELRA_VARIANT_HYB,
            ElraDtype::ELRA_DTYPE_F64,
            d,
            k,
            r,
        );
        let w0 = rand_rows(d, k, &mut rng);
        let h = create(&c, &w0, k);
        let a = rand_rows(d, r, &mut rng);
        let mut got = vec![0.0; d * r];
        let (mut rows, mut cols) = (0, 0);
        // SAFETY: every call passes live buffers matching the shapes it states.
        unsafe {
            assert_eq!(
                elra_adapter_param_shape(h, 0, &mut rows, &mut cols),
                ELRA_OK
            );
            assert_eq!((rows, cols), (d, r));
            assert_eq!(
                elra_adapter_set_param_f64(h, 0, a.as_ptr(), d, r, r),
                ELRA_OK
            );
            assert_eq!(
                elra_adapter_get_param_f64(h, 0, got.as_mut_ptr(), d, r, r),
                ELRA_OK
            );
            assert_eq!(got, a);
            // η.
            let eta = [0.25];
            assert_eq!(
                elra_adapter_set_param_f64(h, 2, eta.as_ptr(), 1, 1, 1),
                ELRA_OK
            );
            let mut e = [0.0];
            assert_eq!(
                elra_adapter_get_param_f64(h, 2, e.as_mut_ptr(), 1, 1, 1),
                ELRA_OK
            );
            assert_eq!(e, eta);
            // Bad values: negative η, NaN in A, wrong shape, unknown parameter, wrong dtype.
            assert_eq!(
                elra_adapter_set_param_f64(h, 2, [-1.0].as_ptr(), 1, 1, 1),
                ELRA_INVALID_ARGUMENT
            );
            assert!(last_error().contains("eta"), "{}", last_error());
            let mut bad = a.clone();
            bad[3] = f64::NAN;
            assert_eq!(
                elra_adapter_set_param_f64(h, 0, bad.as_ptr(), d, r, r),
                ELRA_NON_FINITE
            );
            assert_eq!(
                elra_adapter_set_param_f64(h, 0, a.as_ptr(), r, d, d),
                ELRA_SHAPE_MISMATCH
            );
            assert!(
                last_error().contains(&format!("expected {d}×{r}")),
                "{}",
                last_error()
            );
            assert_eq!(
                elra_adapter_set_param_f64(h, 9, a.as_ptr(), d, r, r),
                ELRA_INVALID_ARGUMENT
            );
            let af: Vec<f32> = a.iter().map(|&x| x as f32).collect();
            assert_eq!(
                elra_adapter_set_param_f32(h, 0, af.as_ptr(), d, r, r),
                ELRA_INVALID_ARGUMENT
            );
            assert!(last_error().contains("f32"));
            assert_eq!(
                elra_adapter_get_param_f64(h, 0, got.as_mut_ptr(), d, r, r),
                ELRA_OK
            );
            assert_eq!(got, a, "unchanged after failed sets");
            assert_eq!(
                elra_adapter_get_param_f64(h, 2, e.as_mut_ptr(), 1, 1, 1),
                ELRA_OK
            );
            assert_eq!(e, eta);
            // W0 can be replaced; A, η, step stay.
            let w1 = rand_rows(d, k, &mut rng);
            assert_eq!(elra_adapter_set_step(h, 7), ELRA_OK);
            assert_eq!(
                elra_adapter_set_param_f64(h, 3, w1.as_ptr(), d, k, k),
                ELRA_OK
            );
            let mut step = 0;
            let mut alpha = -1.0;
            assert_eq!(elra_adapter_get_step(h, &mut step, &mut alpha), ELRA_OK);
            assert_eq!(step, 7);
            assert!((0.0..=1.0).contains(&alpha));
            assert_eq!(
                elra_adapter_get_param_f64(h, 0, got.as_mut_ptr(), d, r, r),
                ELRA_OK
            );
            assert_eq!(got, a);
            // Energy (eq. 21) is positive for a non-zero generator; penalty = λ·energy.
            let (mut en, mut pe) = (0.0, 0.0);
            assert_eq!(elra_adapter_energy(h, &mut en, &mut pe), ELRA_OK);
            assert!(en > 0.0 && (pe - c.lambda * en).abs() <= 1e-15 * en);
            // Null handle.
            assert_eq!(
                elra_adapter_forward_f64(std::ptr::null(), 1, a.as_ptr(), k, got.as_mut_ptr(), d),
                ELRA_NULL_POINTER
            );
            elra_adapter_destroy(h);
            elra_adapter_destroy(std::ptr::null_mut());
        }
        // PSD has no B.
        let c = default_config(
            ElraVariant::ELRA_VARIANT_PSD,
            ElraDtype::ELRA_DTYPE_F64,
            d,
            k,
            r,
        );
        let h = create(&c, &w0, k);
        let (mut rows, mut cols) = (0, 0);
        // SAFETY: live handle and locals.
        unsafe {
            assert_eq!(
                elra_adapter_param_shape(h, 1, &mut rows, &mut cols),
                ELRA_INVALID_ARGUMENT
            );
            assert!(last_error().contains("PSD"));
            elra_adapter_destroy(h);
        }
    }

    #[test]
    fn invalid_configs_are_rejected_and_out_stays_untouched() {
        let w0 = vec![0.5; 12];
        let base = default_config(
            ElraVariant::ELRA_VARIANT_GENERAL,
            ElraDtype::ELRA_DTYPE_F64,
            3,
            4,
            2,
        );
        let cases: Vec<(ElraAdapterConfig, &str)> = vec![
            (ElraAdapterConfig { variant: 7, ..base }, "variant"),
            (ElraAdapterConfig { dtype: 2, ..base }, "dtype"),
            (ElraAdapterConfig { r: 0, ..base }, "r"),
            (ElraAdapterConfig { r: 4, ..base }, "r"),
            (ElraAdapterConfig { d: 0, ..base }, "d"),
            (ElraAdapterConfig { eta: -1.0, ..base }, "eta"),
            (
                ElraAdapterConfig {
                    eta: f64::NAN,
                    ..base
                },
                "eta",
            ),
            (ElraAdapterConfig { tau: -2.0, ..base }, "tau"),
            (
                ElraAdapterConfig {
                    lambda: f64::INFINITY,
                    ..base
                },
                "lambda",
            ),
            (
                ElraAdapterConfig {
                    schedule: 9,
                    ..base
                },
                "schedule",
            ),
            (
                ElraAdapterConfig {
                    schedule: 3,
                    alpha: 1.5,
                    ..base
                },
                "alpha",
            ),
            (
                ElraAdapterConfig {
                    eta_multiplier: 4,
                    ..base
                },
                "eta_multiplier",
            ),
        ];
        for (c, needle) in cases {
            let sentinel = 0x10 as *mut ElraAdapter;
            let mut h = sentinel;
            // SAFETY: live config and W0 (3×4), writable out.
            let s = unsafe { elra_adapter_create(&c, w0.as_ptr().cast(), 4, &mut h) };
            assert_eq!(s, ELRA_INVALID_ARGUMENT, "{needle}");
            assert!(
                last_error().contains(&format!("`{needle}`")),
                "{needle}: {}",
                last_error()
            );
            assert_eq!(h, sentinel);
        }
        let mut h: *mut ElraAdapter = std::ptr::null_mut();
        let mut w = w0.clone();
        w[5] = f64::INFINITY;
        // SAFETY: as above.
        unsafe {
            assert_eq!(
                elra_adapter_create(&base, w.as_ptr().cast(), 4, &mut h),
                ELRA_NON_FINITE
            );
            assert_eq!(
                elra_adapter_create(&base, w0.as_ptr().cast(), 3, &mut h),
                ELRA_INVALID_ARGUMENT
            );
            assert_eq!(
                elra_adapter_create(std::ptr::null(), w0.as_ptr().cast(), 4, &mut h),
                ELRA_NULL_POINTER
            );
            assert_eq!(
                elra_adapter_create(&base, std::ptr::null(), 4, &mut h),
                ELRA_NULL_POINTER
            );
        }
        assert!(h.is_null());
    }

    #[test]
    fn save_load_round_trip_through_the_abi() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let dir = std::env::temp_dir().join(format!("elra-capi-{}", std::process::id()));
        let cdir = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
        for (variant, dt) in [
            (ElraVariant::ELRA_VARIANT_HYB, ElraDtype::ELRA_DTYPE_F64),
            (ElraVariant::ELRA_VARIANT_LORA, ElraDtype::ELRA_DTYPE_F64),
            (ElraVariant::ELRA_VARIANT_GENERAL, ElraDtype::ELRA_DTYPE_F32),
        ] {
            let (d, k, r) = (5, 4, 2);
            let c = default_config(variant, dt, d, k, r);
            let w0 = rand_rows(d, k, &mut rng);
            let w032: Vec<f32> = w0.iter().map(|&x| x as f32).collect();
            let mk = || -> *mut ElraAdapter {
                let mut h = std::ptr::null_mut();
                let p: *const c_void = match dt {
                    ElraDtype::ELRA_DTYPE_F32 => w032.as_ptr().cast(),
                    ElraDtype::ELRA_DTYPE_F64 => w0.as_ptr().cast(),
                };
                // SAFETY: live config, W0 d×k of the config's dtype, writable out.
                assert_eq!(unsafe { elra_adapter_create(&c, p, k, &mut h) }, ELRA_OK);
                h
            };
            let (h1, h2) = (mk(), mk());
            let names = [c"model.q".as_ptr(), c"model.v".as_ptr()];
            let hs = [h1.cast_const(), h2.cast_const()];
            // SAFETY: two live handles and names; NUL-terminated dir.
            let s = unsafe { elra_adapter_save(2, hs.as_ptr(), names.as_ptr(), cdir.as_ptr()) };
            assert_eq!(s, ELRA_OK, "{}", last_error());
            let mut back: *mut ElraAdapter = std::ptr::null_mut();
            let p: *const c_void = match dt {
                ElraDtype::ELRA_DTYPE_F32 => w032.as_ptr().cast(),
                ElraDtype::ELRA_DTYPE_F64 => w0.as_ptr().cast(),
            };
            // SAFETY: NUL-terminated strings, W0 d×k, writable out.
            let s = unsafe {
                elra_adapter_load(
                    cdir.as_ptr(),
                    c"model.v".as_ptr(),
                    dt as u32,
                    d,
                    k,
                    p,
                    k,
                    &mut back,
                )
            };
            assert_eq!(s, ELRA_OK, "{}", last_error());
            // Same merged weight as the saved handle (merge is a deterministic function of the
            // parameters, which round trip exactly).
            match dt {
                ElraDtype::ELRA_DTYPE_F64 => {
                    let (mut m1, mut m2) = (vec![0.0; d * k], vec![1.0; d * k]);
                    // SAFETY: d×k buffers, live handles.
                    unsafe {
                        assert_eq!(elra_adapter_merge_f64(h2, m1.as_mut_ptr(), k), ELRA_OK);
                        assert_eq!(elra_adapter_merge_f64(back, m2.as_mut_ptr(), k), ELRA_OK);
                    }
                    assert_eq!(m1, m2);
                }
                ElraDtype::ELRA_DTYPE_F32 => {
                    let (mut m1, mut m2) = (vec![0.0f32; d * k], vec![1.0f32; d * k]);
                    // SAFETY: d×k buffers, live handles.
                    unsafe {
                        assert_eq!(elra_adapter_merge_f32(h2, m1.as_mut_ptr(), k), ELRA_OK);
                        assert_eq!(elra_adapter_merge_f32(back, m2.as_mut_ptr(), k), ELRA_OK);
                    }
                    assert_eq!(m1, m2);
                }
            }
            let mut cfg_back = std::mem::MaybeUninit::<ElraAdapterConfig>::uninit();
            // SAFETY: live handle, writable local.
            let st = unsafe { elra_adapter_get_config(back, cfg_back.as_mut_ptr()) };
            assert_eq!(st, ELRA_OK);
            // SAFETY: initialised by the call.
            assert_eq!(unsafe { cfg_back.assume_init() }, c);
            // Errors: unknown module, wrong d, corrupted weights file, missing dir.
            let mut other: *mut ElraAdapter = std::ptr::null_mut();
            // SAFETY: as above; d − 1 rows of W0 lie inside the d×k buffer.
            unsafe {
                let s = elra_adapter_load(
                    cdir.as_ptr(),
                    c"model.x".as_ptr(),
                    dt as u32,
                    d,
                    k,
                    p,
                    k,
                    &mut other,
                );
                assert_eq!(s, ELRA_INVALID_ARGUMENT);
                assert!(last_error().contains("model.x"));
                let s = elra_adapter_load(
                    cdir.as_ptr(),
                    c"model.q".as_ptr(),
                    dt as u32,
                    d - 1,
                    k,
                    p,
                    k,
                    &mut other,
                );
                assert_eq!(s, ELRA_SHAPE_MISMATCH, "{}", last_error());
            }
            let wf = dir.join(crate::io::WEIGHTS_FILE);
            let bytes = std::fs::read(&wf).unwrap();
            std::fs::write(&wf, &bytes[..bytes.len() - 3]).unwrap();
            // SAFETY: as above.
            let s = unsafe {
                elra_adapter_load(
                    cdir.as_ptr(),
                    c"model.q".as_ptr(),
                    dt as u32,
                    d,
                    k,
                    p,
                    k,
                    &mut other,
                )
            };
            assert_eq!(s, ELRA_FORMAT);
            assert!(
                last_error().contains(crate::io::WEIGHTS_FILE),
                "{}",
                last_error()
            );
            assert!(other.is_null());
            // Merged export.
            let path =
                std::ffi::CString::new(dir.join("merged.safetensors").to_str().unwrap()).unwrap();
            // SAFETY: live handles and names, NUL-terminated path.
            let s =
                unsafe { elra_adapter_save_merged(2, hs.as_ptr(), names.as_ptr(), path.as_ptr()) };
            assert_eq!(s, ELRA_OK, "{}", last_error());
            // SAFETY: handles from create/load, destroyed once each.
            unsafe {
                elra_adapter_destroy(h1);
                elra_adapter_destroy(h2);
                elra_adapter_destroy(back);
            }
        }
        // Mixing dtypes in one file is refused.
        let c32 = default_config(
            ElraVariant::ELRA_VARIANT_GENERAL,
            ElraDtype::ELRA_DTYPE_F32,
            3,
            3,
            1,
        );
        let c64 = default_config(
            ElraVariant::ELRA_VARIANT_GENERAL,
            ElraDtype::ELRA_DTYPE_F64,
            3,
            3,
            1,
        );
        let (w32, w64) = ([0.1f32; 9], [0.1f64; 9]);
        let (mut a, mut b) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: live configs, 3×3 weights, writable outs; handles destroyed once.
        unsafe {
            assert_eq!(
                elra_adapter_create(&c32, w32.as_ptr().cast(), 3, &mut a),
                ELRA_OK
            );
            assert_eq!(
                elra_adapter_create(&c64, w64.as_ptr().cast(), 3, &mut b),
                ELRA_OK
            );
            let hs = [a.cast_const(), b.cast_const()];
            let names = [c"m.a".as_ptr(), c"m.b".as_ptr()];
            assert_eq!(
                elra_adapter_save(2, hs.as_ptr(), names.as_ptr(), cdir.as_ptr()),
                ELRA_INVALID_ARGUMENT
            );
            elra_adapter_destroy(a);
            elra_adapter_destroy(b);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `L = ⟨forward(x), dy⟩ + λ‖G‖²_F` through the ABI only.
    fn loss(
        h: *const ElraAdapter,
        n: usize,
        x: &[f64],
        k: usize,
        dy: &[f64],
        d: usize,
        lora: bool,
    ) -> f64 {
        let mut y = vec![0.0; n * d];
        // SAFETY: live handle, n×k and n×d buffers.
        let s = unsafe { elra_adapter_forward_f64(h, n, x.as_ptr(), k, y.as_mut_ptr(), d) };
        assert_eq!(s, ELRA_OK, "{}", last_error());
        let task: f64 = y.iter().zip(dy).map(|(a, b)| a * b).sum();
        if lora {
            return task;
        }
        let (mut e, mut p) = (0.0, 0.0);
        // SAFETY: live handle, local outputs.
        assert_eq!(unsafe { elra_adapter_energy(h, &mut e, &mut p) }, ELRA_OK);
        task + p
    }

    #[test]
    fn backward_matches_the_grad_module_and_central_differences_through_the_abi() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let (d, k, r, n) = (6, 5, 2, 3);
        for (v, tau) in [
            (ElraVariant::ELRA_VARIANT_GENERAL, 0.0),
            (ElraVariant::ELRA_VARIANT_PSD, 2.0),
            (ElraVariant::ELRA_VARIANT_HYB, 0.0),
            (ElraVariant::ELRA_VARIANT_LORA, 0.0),
        ] {
            let lora = v == ElraVariant::ELRA_VARIANT_LORA;
            let mut c = default_config(v, ElraDtype::ELRA_DTYPE_F64, d, k, r);
            c.eta = 0.4;
            c.tau = tau;
            c.lambda = 0.05; // make the energy term visible in the gradients
            let w0 = rand_rows(d, k, &mut rng);
            let h = create(&c, &w0, k);
            // SAFETY: live handle.
            assert_eq!(unsafe { elra_adapter_set_step(h, 3) }, ELRA_OK);
            if lora {
                let b = rand_rows(d, r, &mut rng);
                // SAFETY: live handle, d×r buffer.
                let st = unsafe { elra_adapter_set_param_f64(h, 1, b.as_ptr(), d, r, r) };
                assert_eq!(st, ELRA_OK);
            }
            let x = rand_rows(n, k, &mut rng);
            let dy = rand_rows(n, d, &mut rng);
            let (mut ar, mut ac) = (0, 0);
            // SAFETY: live handle, locals.
            let st = unsafe { elra_adapter_param_shape(h, 0, &mut ar, &mut ac) };
            assert_eq!(st, ELRA_OK);
            let uses_b = v != ElraVariant::ELRA_VARIANT_PSD;
            let (br, bc) = if uses_b {
                let (mut br, mut bc) = (0, 0);
                // SAFETY: live handle, locals.
                let st = unsafe { elra_adapter_param_shape(h, 1, &mut br, &mut bc) };
                assert_eq!(st, ELRA_OK);
                (br, bc)
            } else {
                (0, 0)
            };
            let mut dx = vec![0.0; n * k];
            let mut da = vec![0.0; ar * ac];
            let mut db = vec![0.0; br * bc];
            let mut deta = 0.0;
            let dbp = if uses_b {
                db.as_mut_ptr()
            } else {
                std::ptr::null_mut()
            };
            // SAFETY: buffers match the shapes queried above.
            let s = unsafe {
                elra_adapter_backward_f64(
                    h,
                    n,
                    x.as_ptr(),
                    k,
                    dy.as_ptr(),
                    d,
                    dx.as_mut_ptr(),
                    k,
                    da.as_mut_ptr(),
                    ac,
                    dbp,
                    bc.max(1),
                    &mut deta,
                )
            };
            assert_eq!(s, ELRA_OK, "{:?}: {}", v, last_error());
            // Bit-for-bit the grad module on the same layer.
            // SAFETY: live handle.
            let a = unsafe { handle::live_ref(h) }.unwrap();
            let xm = DMatrix::from_row_slice(n, k, &x);
            let dym = DMatrix::from_row_slice(n, d, &dy);
            a.with::<f64, _>(|l| {
                let any = l.as_any();
                if let Some(l) = any.downcast_ref::<ElraLayer<f64>>() {
                    let (_, t) = grad::elra_forward(l, &xm, grad::Route::Woodbury, None).unwrap();
                    let g = grad::elra_backward(l, &xm, &t, dym.clone()).unwrap();
                    assert_eq!(row_major(&g.x), dx);
                    assert_eq!(row_major(&g.a), da);
                    assert_eq!(g.eta, deta);
                } else {
                    let l = any.downcast_ref::<LoraLayer<f64>>().unwrap();
                    let (_, t) = grad::lora_forward(l, &xm, None).unwrap();
                    let g = grad::lora_backward(l, &xm, &t, dym.clone()).unwrap();
                    assert_eq!(row_major(&g.lora_a), da);
                }
                Ok(())
            })
            .unwrap();
            // Central differences of L = <Y, dy> + λ‖G‖²_F through the ABI alone, h = 1e-6:
            // truncation O(h²) ≈ 1e-12, rounding O(u·|L|/h) ≈ 1e-10; bound 1e-6·(1 + |g|).
            let hh = 1e-6;
            let close = |fd: f64, an: f64, what: &str| {
                assert!(
                    (fd - an).abs() < 1e-6 * (1.0 + an.abs()),
                    "{v:?} {what}: fd {fd} vs {an}"
                );
            };
            for i in [0, n * k - 1] {
                let (mut xp, mut xm_) = (x.clone(), x.clone());
                xp[i] += hh;
                xm_[i] -= hh;
                let fd = (loss(h, n, &xp, k, &dy, d, lora) - loss(h, n, &xm_, k, &dy, d, lora))
                    / (2.0 * hh);
                close(fd, dx[i], "dx");
            }
            let fd_param = |which: u32, rows: usize, cols: usize, i: usize| -> f64 {
                let mut p = vec![0.0; rows * cols];
                // SAFETY: live handle, rows×cols buffers.
                unsafe {
                    assert_eq!(
                        elra_adapter_get_param_f64(h, which, p.as_mut_ptr(), rows, cols, cols),
                        ELRA_OK
                    );
                    let orig = p[i];
                    p[i] = orig + hh;
                    assert_eq!(
                        elra_adapter_set_param_f64(h, which, p.as_ptr(), rows, cols, cols),
                        ELRA_OK
                    );
                    let lp = loss(h, n, &x, k, &dy, d, lora);
                    p[i] = orig - hh;
                    assert_eq!(
                        elra_adapter_set_param_f64(h, which, p.as_ptr(), rows, cols, cols),
                        ELRA_OK
                    );
                    let lm = loss(h, n, &x, k, &dy, d, lora);
                    p[i] = orig;
                    assert_eq!(
                        elra_adapter_set_param_f64(h, which, p.as_ptr(), rows, cols, cols),
                        ELRA_OK
                    );
                    (lp - lm) / (2.0 * hh)
                }
            };
            for i in [0, ar * ac / 2, ar * ac - 1] {
                close(fd_param(0, ar, ac, i), da[i], "da");
            }
            if uses_b {
                for i in [0, br * bc - 1] {
                    close(fd_param(1, br, bc, i), db[i], "db");
                }
            }
            if !lora {
                close(fd_param(2, 1, 1, 0), deta, "deta");
            }
            // Errors leave every output untouched.
            let mut dx2 = vec![7.0; n * k];
            let mut da2 = vec![7.0; ar * ac];
            let mut bad = dy.clone();
            bad[1] = f64::NAN;
            // SAFETY: buffers as above.
            let s = unsafe {
                elra_adapter_backward_f64(
                    h,
                    n,
                    x.as_ptr(),
                    k,
                    bad.as_ptr(),
                    d,
                    dx2.as_mut_ptr(),
                    k,
                    da2.as_mut_ptr(),
                    ac,
                    dbp,
                    bc.max(1),
                    &mut deta,
                )
            };
            assert_eq!(s, ELRA_NON_FINITE);
            assert!(dx2.iter().chain(&da2).all(|&z| z == 7.0));
            // SAFETY: handle from create, destroyed once.
            unsafe { elra_adapter_destroy(h) };
        }
    }
}
