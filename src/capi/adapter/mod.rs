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
use super::layout::{
    check_scalar_out, elements, out_layout, read_matrix, reserve, write_matrix, write_one,
    write_pair, Layout,
};
use super::{guard, guard_void, CError, CResult, ElraStatus};
use crate::adapter::{Adapter, ElraConfig, ElraLayer, Energy, HostAdapter, LoraConfig, LoraLayer};
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

/// The elements of `T` a call works with: `terms` (its batch-sized buffers, as `(rows, cols)`
/// pairs), N×r intermediates for `n` rows, and twice the parameters (values and gradients or
/// generator factors). Generously counted: only requests far beyond the machine should fail.
fn work<A: Adapter + ?Sized>(a: &A, n: usize, terms: &[(usize, usize)]) -> Option<usize> {
    let params: usize = a.params().iter().map(|p| p.rows * p.cols).sum();
    let r = a
        .params()
        .iter()
        .map(|p| p.rows.min(p.cols))
        .max()
        .unwrap_or(0);
    elements(terms)?.checked_add(elements(&[(n, 4 * r), (params, 2)])?)
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

/// `(‖G‖²_F, λ‖G‖²_F)` of an adapter's energy (eq. 20–21); LoRA has none (`ELRA_INVALID_ARGUMENT`).
pub(crate) fn energy_pair(e: Option<Energy>) -> CResult<(f64, f64)> {
    let e = e.ok_or_else(|| ElraError::invalid("adapter", "LoRA has no generator energy"))?;
    Ok((e.frobenius_sq, e.penalty))
}

/// The gradient outputs of a backward — `da`, `db` and `deta` for [`super::ElraParam`] A, B and
/// η, each with the adapter's parameter index — validated before any work ([`Self::check`]) and
/// written after all of it ([`Self::write`]), so that nothing is written unless the call succeeds.
pub(crate) struct GradOuts<T> {
    da: (*mut T, Layout, usize),
    db: Option<(*mut T, Layout, usize)>,
    deta: Option<(*mut T, usize)>,
}

/// The gradients of the last backward for [`GradOuts`]: `∂A`, `∂B` and `∂η` where the adapter has
/// them.
pub(crate) struct Grads<T: Real>(DMatrix<T>, Option<DMatrix<T>>, Option<DMatrix<T>>);

impl<T: Real> GradOuts<T> {
    /// Checks `da` (the shape of A, leading dimension `ld_da`) and, where the adapter has them,
    /// `db` (the shape of B) and `deta` (a scalar); the others are ignored and may be NULL.
    pub(crate) fn check<A: Adapter + ?Sized>(
        l: &A,
        (da, ld_da): (*mut T, usize),
        (db, ld_db): (*mut T, usize),
        deta: *mut T,
    ) -> CResult<Self> {
        let specs = l.params();
        let out = |arg, p, i: usize, ld| {
            out_layout(arg, p, specs[i].rows, specs[i].cols, ld).map(|lo| (p, lo, i))
        };
        let ia = param_index(l, 0)?.ok_or_else(|| missing_param(0))?;
        let da = out("da", da, ia, ld_da)?;
        let db = match param_index(l, 1).ok().flatten() {
            Some(i) => Some(out("db", db, i, ld_db)?),
            None => None,
        };
        let deta = match param_index(l, 2).ok().flatten() {
            Some(i) => {
                check_scalar_out("deta", deta)?;
                Some((deta, i))
            }
            None => None,
        };
        Ok(GradOuts { da, db, deta })
    }

    /// The gradients of the adapter's last backward ([`Adapter::grad`]).
    pub(crate) fn read<A: Adapter<Scalar = T> + ?Sized>(&self, l: &A) -> CResult<Grads<T>> {
        Ok(Grads(
            l.grad(self.da.2)?,
            self.db.as_ref().map(|b| l.grad(b.2)).transpose()?,
            self.deta.map(|e| l.grad(e.1)).transpose()?,
        ))
    }

    /// Writes `g` to the outputs.
    ///
    /// # Safety
    /// The outputs checked by [`Self::check`] must be writable (the export's contract).
    pub(crate) unsafe fn write(&self, g: &Grads<T>) {
        let (da, lo, _) = &self.da;
        // SAFETY: layouts validated by `check`; the caller guarantees writability.
        unsafe {
            write_matrix(*da, lo, &g.0);
            if let (Some((db, lo, _)), Some(m)) = (&self.db, &g.1) {
                write_matrix(*db, lo, m);
            }
            if let (Some((deta, _)), Some(m)) = (self.deta, &g.2) {
                deta.write(m[(0, 0)]);
            }
        }
    }
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
    // W0 (read and kept), the factors and their initialisation draws.
    let need = c.d.checked_add(c.k).and_then(|dk| {
        elements(&[
            (c.d, c.k),
            (c.d, c.k),
            (c.r, dk),
            (c.r, dk),
            (c.r, dk),
            (c.r, dk),
        ])
    });
    reserve::<T>("the adapter", need)?;
    // SAFETY: forwarded contract.
    let w0 = unsafe { read_matrix("w0", w0, c.d, c.k, ld_w0)? };
    let layer: Box<dyn HostAdapter<T>> = match (elra, lora) {
        (Some(e), _) => Box::new(ElraLayer::new(e, w0)?),
        (None, Some(l)) => Box::new(LoraLayer::new(l, w0)?),
        (None, None) => return Err(ElraError::invalid("variant", "no variant").into()),
    };
    Ok(ElraAdapter::new(*c, layer))
}

/// Frees an adapter. NULL is ignored. The handle must not be used afterwards. The thread's error
/// text ([`elra_last_error_message`](super::elra_last_error_message)) is left as it was, so a
/// finaliser may free handles between a failing call and the read of its message.
///
/// # Safety
/// `adapter` must be NULL or a live handle from this library, not used concurrently.
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_destroy(adapter: *mut ElraAdapter) {
    guard_void(|| {
        // SAFETY: the caller guarantees NULL or a live handle with exclusive access.
        unsafe { handle::destroy(adapter) }
    });
}

/// Writes the adapter's configuration to `*out` (variant, dtype, d, k, r and the settings it was
/// created or loaded with; `eta` is the initial η₀ — the trained η is [`ElraParam::ELRA_PARAM_ETA`](super::ElraParam::ELRA_PARAM_ETA)).
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
        // SAFETY: the caller guarantees writability.
        unsafe { write_one(("out", out), a.config) }
    })
}

/// Shape of a parameter: `(rows, cols)` of [`ElraParam`](super::ElraParam) `which` (A: d×r / LoRA r×k; B: r×d /
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
        let shape = || any_dtype!(&*a.lock(), l => param_shape(l.as_ref(), which));
        // SAFETY: the caller guarantees writability.
        unsafe { write_pair(("rows", rows), ("cols", cols), shape) }
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
        let counts = || Ok(any_dtype!(&*a.lock(), l => (l.param_count(), l.scalar_param_count())));
        // SAFETY: the caller guarantees writability.
        unsafe {
            write_pair(
                ("matrix_entries", matrix_entries),
                ("scalars", scalars),
                counts,
            )
        }
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
        let now = || Ok(any_dtype!(&*a.lock(), l => (l.step(), l.alpha())));
        // SAFETY: the caller guarantees writability.
        unsafe { write_pair(("step", step), ("alpha", alpha), now) }
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
        let pair = || energy_pair(any_dtype!(&mut *a.lock(), l => l.energy()?));
        // SAFETY: the caller guarantees writability.
        unsafe { write_pair(("energy", energy), ("penalty", penalty), pair) }
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
        reserve::<T>("the parameter", elements(&[(rows, cols), (rows, cols)]))?;
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
        reserve::<T>("the parameter", elements(&[(rows, cols), (rows, cols)]))?;
        Ok(match param_index(l, which)? {
            Some(i) => l.param(i)?,
            None => l.w0().clone(),
        })
    })?;
    let lo = out_layout("out", out, rows, cols, ld)?;
    // SAFETY: validated layout; caller guarantees writability.
    unsafe { write_matrix(out, &lo, &m) };
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
        reserve::<T>("the forward", work(l, n, &[(n, k), (n, 3 * d)]))?;
        // SAFETY: caller contract.
        let xm = unsafe { read_matrix("x", x, n, k, ld_x)? };
        Ok((ly, l.apply(&xm)?))
    })?;
    // SAFETY: validated layout; caller guarantees writability.
    unsafe { write_matrix(y, &ly, &ym) };
    Ok(())
}

/// # Safety
/// `w_new` covers d×k (ld) for writing.
unsafe fn merge<T: HostReal>(h: *const ElraAdapter, w_new: *mut T, ld: usize) -> CResult<()> {
    // SAFETY: caller contract.
    let a = unsafe { handle::live_ref(h)? };
    let m = a.with::<T, _>(|l| {
        let (d, k) = l.dims();
        reserve::<T>("the merge", work(l, d, &[(k, 3)]))?;
        let mut m = DMatrix::zeros(d, k);
        l.merge(&mut m)?;
        Ok(m)
    })?;
    let lo = out_layout("w_new", w_new, m.nrows(), m.ncols(), ld)?;
    // SAFETY: validated layout; caller guarantees writability.
    unsafe { write_matrix(w_new, &lo, &m) };
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
        reserve::<T>("the unmerge", work(l, d, &[(k, 4)]))?;
        // SAFETY: caller contract.
        let wn = unsafe { read_matrix("w_new", w_new, d, k, ld_w_new)? };
        let mut w0 = DMatrix::zeros(d, k);
        l.unmerge(&wn, &mut w0)?;
        Ok((lo, w0))
    })?;
    // SAFETY: validated layout; caller guarantees writability.
    unsafe { write_matrix(w0_out, &lo, &w0) };
    Ok(())
}

/// Sets parameter `which` ([`ElraParam`](super::ElraParam)) from `data` (rows×cols, row-major, leading dimension
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

/// Copies parameter `which` ([`ElraParam`](super::ElraParam)) into `out` (rows×cols, leading dimension `ld`), f64
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
    let (l_dx, outs, gx, grads) = a.with::<T, _>(|l| {
        let (d, k) = l.dims();
        // Validate every output before any work.
        let l_dx = out_layout("dx", dx, n, k, ld_dx)?;
        let outs = GradOuts::check(l, (da, ld_da), (db, ld_db), deta)?;
        // x, ∂y, ∂x, the recomputed forward's tape and the backward's temporaries.
        reserve::<T>("the backward", work(l, n, &[(n, 2 * k), (n, 5 * d)]))?;
        // SAFETY: caller contract.
        let xm = unsafe { read_matrix("x", x, n, k, ld_x)? };
        // SAFETY: caller contract.
        let dym = unsafe { read_matrix("dy", dy, n, d, ld_dy)? };
        l.recompute(&xm)?;
        let mut gx = DMatrix::zeros(n, k);
        l.backward(&xm, &dym, &mut gx)?;
        let grads = outs.read(l)?;
        Ok((l_dx, outs, gx, grads))
    })?;
    // SAFETY: layouts validated above; the caller guarantees writability. All results are
    // computed, so nothing is written unless the whole call succeeds.
    unsafe {
        write_matrix(dx, &l_dx, &gx);
        outs.write(&grads);
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
mod tests;
