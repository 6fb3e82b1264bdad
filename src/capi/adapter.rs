//! The opaque adapter handle `ElraAdapter`: one frozen d×k weight `W0` adapted by ELRA
//! (`W_new = exp(G) W0`, eq. 3, through the Woodbury form of Prop. 1) or by LoRA, in f32 or f64.
//!
//! Life cycle: fill an [`ElraAdapterConfig`] (e.g. with [`elra_adapter_config_default`]), create
//! with [`elra_adapter_create`] (W0 is copied), set and get parameters, run
//! [`elra_adapter_forward_f64`] / [`elra_adapter_backward_f64`] (∂x and the adapter gradients),
//! merge / unmerge, read the energy (eq. 21) and parameter counts (Remark 1), save / load adapter
//! directories, and free with [`elra_adapter_destroy`].
//! Typed functions end in `_f32`/`_f64` and must match the handle's dtype
//! (`ELRA_INVALID_ARGUMENT` otherwise).
//!
//! Threads: functions taking `const ElraAdapter *` only read the handle and may run concurrently
//! on one handle; functions taking `ElraAdapter *` modify it and need exclusive access.

use super::{
    check_in, check_out, check_scalar_out, guard, read_in, write_out, CError, CResult, ElraStatus,
    Layout,
};
use crate::adapter::{
    Adapter, AlphaSchedule, ElraConfig, ElraLayer, EtaMultiplier, LoraConfig, LoraInit, LoraLayer,
    Variant,
};
use crate::grad;
use crate::io::{save_merged, AdapterFile, FileConfig};
use crate::linalg::Real;
use crate::ElraError;
use nalgebra::DMatrix;
use std::ffi::{c_char, c_void, CStr};
use std::path::PathBuf;

/// Generator family of an adapter (`ElraAdapterConfig::variant`).
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElraVariant {
    /// General ELRA, `G = ηAB` (eq. 2): A d×r and B r×d trained.
    ELRA_VARIANT_GENERAL = 0,
    /// ELRA-PSD, `G = ηAAᵀ` (§4.2.1): only A trained.
    ELRA_VARIANT_PSD = 1,
    /// ELRA-Hyb, `G = η(αAAᵀ + (1−α)AB)` with α decaying from 1 to 0 (eq. 19).
    ELRA_VARIANT_HYB = 2,
    /// LoRA (PEFT): `W_new = W0 + (lora_alpha/r)·B·A`, A = `lora_A` r×k, B = `lora_B` d×r.
    ELRA_VARIANT_LORA = 3,
}

/// Element type of an adapter (`ElraAdapterConfig::dtype`).
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElraDtype {
    /// 32-bit IEEE float.
    ELRA_DTYPE_F32 = 0,
    /// 64-bit IEEE float (CPU handles only).
    ELRA_DTYPE_F64 = 1,
}

/// α schedule of ELRA-Hyb (`ElraAdapterConfig::schedule`; eq. 19, eq. 75, App. K).
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElraSchedule {
    /// `α(t) = exp(−γ t/T_warm)` during warm-up, 0 after (eq. 75); uses `warmup_steps`, `gamma`.
    ELRA_SCHEDULE_EXPONENTIAL = 0,
    /// Cosine decay 1 → 0 over `warmup_steps`.
    ELRA_SCHEDULE_COSINE = 1,
    /// Linear decay 1 → 0 over `warmup_steps`.
    ELRA_SCHEDULE_LINEAR = 2,
    /// Constant `alpha` in [0, 1].
    ELRA_SCHEDULE_CONSTANT = 3,
}

/// Multiplier of η over the steps (`ElraAdapterConfig::eta_multiplier`; App. H).
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElraEtaMultiplier {
    /// η is used as is.
    ELRA_ETA_MULTIPLIER_NONE = 0,
    /// Cosine multiplier over `total_steps` (App. H).
    ELRA_ETA_MULTIPLIER_COSINE = 1,
}

/// Which parameter [`elra_adapter_set_param_f64`] and friends address.
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElraParam {
    /// ELRA: factor A (d×r). LoRA: `lora_A` (r×k).
    ELRA_PARAM_A = 0,
    /// ELRA general/hyb: factor B (r×d; none for PSD). LoRA: `lora_B` (d×r).
    ELRA_PARAM_B = 1,
    /// ELRA: the trained step size η (1×1, > 0). LoRA: none.
    ELRA_PARAM_ETA = 2,
    /// The frozen weight W0 (d×k).
    ELRA_PARAM_W0 = 3,
}

/// Configuration of an adapter. Enumerations are stored as `uint32_t` holding the values of
/// [`ElraVariant`], [`ElraDtype`], [`ElraSchedule`] and [`ElraEtaMultiplier`]; unknown values
/// are rejected with `ELRA_INVALID_ARGUMENT`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ElraAdapterConfig {
    /// An [`ElraVariant`].
    pub variant: u32,
    /// An [`ElraDtype`].
    pub dtype: u32,
    /// Output dimension d (rows of W0).
    pub d: usize,
    /// Input dimension k (columns of W0).
    pub k: usize,
    /// Rank r (ELRA: 1 ≤ r ≤ d; LoRA: 1 ≤ r ≤ min(d, k)).
    pub r: usize,
    /// Initial step size η₀ > 0 (eq. 2; App. H: 1e-3). Ignored by LoRA.
    pub eta: f64,
    /// Energy-penalty weight λ ≥ 0 of `λ‖G‖²_F` (eq. 20; App. H: 1e-5). Ignored by LoRA.
    pub lambda: f64,
    /// Spectral clip threshold τ > 0 (App. H: 2.0), or 0 for no clipping. Ignored by LoRA.
    pub tau: f64,
    /// An [`ElraSchedule`] (used by ELRA-Hyb).
    pub schedule: u32,
    /// Warm-up length `T_warm` of the α schedule, in steps.
    pub warmup_steps: usize,
    /// Decay rate γ ≥ 0 of the exponential schedule (App. H: 5).
    pub gamma: f64,
    /// α of the constant schedule, in [0, 1].
    pub alpha: f64,
    /// An [`ElraEtaMultiplier`].
    pub eta_multiplier: u32,
    /// Length of the main schedule for the cosine η multiplier.
    pub total_steps: usize,
    /// Seed of the deterministic initialisation (ChaCha8).
    pub seed: u64,
    /// LoRA's `lora_alpha` (scaling `lora_alpha / r`). Ignored by ELRA.
    pub lora_alpha: f64,
}

/// The layer behind a handle.
#[derive(Debug, Clone)]
enum Inner {
    ElraF32(ElraLayer<f32>),
    ElraF64(ElraLayer<f64>),
    LoraF32(LoraLayer<f32>),
    LoraF64(LoraLayer<f64>),
}

/// Either layer of one dtype.
enum Layer<'a, T: Real> {
    Elra(&'a ElraLayer<T>),
    Lora(&'a LoraLayer<T>),
}

/// Mutable access to either layer of one dtype.
enum LayerMut<'a, T: Real> {
    Elra(&'a mut ElraLayer<T>),
    Lora(&'a mut LoraLayer<T>),
}

/// A dtype a handle can hold (f32, f64).
trait HandleReal: Real {
    fn layer(inner: &Inner) -> Option<Layer<'_, Self>>;
    fn layer_mut(inner: &mut Inner) -> Option<LayerMut<'_, Self>>;
    fn wrap_elra(l: ElraLayer<Self>) -> Inner;
    fn wrap_lora(l: LoraLayer<Self>) -> Inner;
}

macro_rules! handle_real {
    ($t:ty, $e:ident, $l:ident) => {
        impl HandleReal for $t {
            fn layer(inner: &Inner) -> Option<Layer<'_, Self>> {
                match inner {
                    Inner::$e(l) => Some(Layer::Elra(l)),
                    Inner::$l(l) => Some(Layer::Lora(l)),
                    _ => None,
                }
            }
            fn layer_mut(inner: &mut Inner) -> Option<LayerMut<'_, Self>> {
                match inner {
                    Inner::$e(l) => Some(LayerMut::Elra(l)),
                    Inner::$l(l) => Some(LayerMut::Lora(l)),
                    _ => None,
                }
            }
            fn wrap_elra(l: ElraLayer<Self>) -> Inner {
                Inner::$e(l)
            }
            fn wrap_lora(l: LoraLayer<Self>) -> Inner {
                Inner::$l(l)
            }
        }
    };
}
handle_real!(f32, ElraF32, LoraF32);
handle_real!(f64, ElraF64, LoraF64);

const MAGIC: u64 = 0x454c_5241_4144_5054; // "ELRAADPT"

/// An adapter: a frozen weight W0 with its ELRA or LoRA parameters (opaque to C).
#[derive(Debug)]
pub struct ElraAdapter {
    magic: u64,
    inner: Inner,
}

impl ElraAdapter {
    fn dtype(&self) -> ElraDtype {
        match self.inner {
            Inner::ElraF32(_) | Inner::LoraF32(_) => ElraDtype::ELRA_DTYPE_F32,
            Inner::ElraF64(_) | Inner::LoraF64(_) => ElraDtype::ELRA_DTYPE_F64,
        }
    }

    fn typed<T: HandleReal>(&self) -> CResult<Layer<'_, T>> {
        T::layer(&self.inner).ok_or_else(|| self.wrong_dtype::<T>())
    }

    fn typed_mut<T: HandleReal>(&mut self) -> CResult<LayerMut<'_, T>> {
        let e = self.wrong_dtype::<T>();
        T::layer_mut(&mut self.inner).ok_or(e)
    }

    fn wrong_dtype<T: HandleReal>(&self) -> CError {
        CError::Elra(ElraError::invalid(
            "adapter",
            format!(
                "the handle holds {:?} but a {} function was called",
                self.dtype(),
                T::NAME
            ),
        ))
    }
}

/// Borrows a handle after checking NULL, alignment and the magic tag (a best-effort check
/// against destroyed or foreign pointers).
///
/// # Safety
/// `h` must be NULL or a pointer returned by this library and not yet destroyed.
unsafe fn handle<'a>(h: *const ElraAdapter) -> CResult<&'a ElraAdapter> {
    if h.is_null() {
        return Err(CError::Null("adapter"));
    }
    if (h as usize) % std::mem::align_of::<ElraAdapter>() != 0 {
        return Err(ElraError::invalid("adapter", "misaligned handle pointer").into());
    }
    // SAFETY: non-null and aligned; the caller guarantees it came from elra_adapter_create /
    // elra_adapter_load and is live, so it points to an initialised ElraAdapter.
    let a = unsafe { &*h };
    if a.magic != MAGIC {
        return Err(ElraError::invalid("adapter", "not a live elra adapter handle").into());
    }
    Ok(a)
}

/// Mutable variant of [`handle`].
///
/// # Safety
/// As [`handle`], and no other reference to the handle may be live during the call.
unsafe fn handle_mut<'a>(h: *mut ElraAdapter) -> CResult<&'a mut ElraAdapter> {
    // SAFETY: forwarded contract; checks first through the shared path.
    unsafe { handle(h)? };
    // SAFETY: validated above; the caller guarantees exclusive access.
    Ok(unsafe { &mut *h })
}

pub(super) fn variant_of(v: u32) -> CResult<Option<Variant>> {
    Ok(match v {
        0 => Some(Variant::General),
        1 => Some(Variant::Psd),
        2 => Some(Variant::Hyb),
        3 => None,
        _ => {
            return Err(
                ElraError::invalid("variant", format!("unknown ElraVariant value {v}")).into(),
            )
        }
    })
}

fn dtype_of(v: u32) -> CResult<ElraDtype> {
    match v {
        0 => Ok(ElraDtype::ELRA_DTYPE_F32),
        1 => Ok(ElraDtype::ELRA_DTYPE_F64),
        2 | 3 => Err(ElraError::invalid(
            "dtype",
            format!(
                "value {v} is an f16/bf16 activation type of GPU handles (ElraGpuDtype, \
                 elra_gpu_adapter_create); CPU adapters are f32 (0) or f64 (1)"
            ),
        )
        .into()),
        _ => Err(ElraError::invalid("dtype", format!("unknown ElraDtype value {v}")).into()),
    }
}

/// The crate's ELRA configuration from the C struct (validated).
pub(super) fn elra_config(c: &ElraAdapterConfig, variant: Variant) -> CResult<ElraConfig> {
    let schedule = match c.schedule {
        0 => AlphaSchedule::Exponential {
            warmup_steps: c.warmup_steps,
            gamma: c.gamma,
        },
        1 => AlphaSchedule::Cosine {
            warmup_steps: c.warmup_steps,
        },
        2 => AlphaSchedule::Linear {
            warmup_steps: c.warmup_steps,
        },
        3 => AlphaSchedule::Constant(c.alpha),
        v => {
            return Err(
                ElraError::invalid("schedule", format!("unknown ElraSchedule value {v}")).into(),
            )
        }
    };
    let eta_multiplier = match c.eta_multiplier {
        0 => EtaMultiplier::None,
        1 => EtaMultiplier::Cosine {
            total_steps: c.total_steps,
        },
        v => {
            return Err(ElraError::invalid(
                "eta_multiplier",
                format!("unknown ElraEtaMultiplier value {v}"),
            )
            .into())
        }
    };
    let config = ElraConfig {
        variant,
        d: c.d,
        k: c.k,
        r: c.r,
        eta: c.eta,
        lambda: c.lambda,
        tau: if c.tau == 0.0 { None } else { Some(c.tau) },
        schedule,
        eta_multiplier,
        seed: c.seed,
    };
    config.validate()?;
    Ok(config)
}

pub(super) fn lora_config(c: &ElraAdapterConfig) -> CResult<LoraConfig> {
    let config = LoraConfig {
        d: c.d,
        k: c.k,
        r: c.r,
        lora_alpha: c.lora_alpha,
        init: LoraInit::KaimingUniform,
        seed: c.seed,
    };
    config.validate()?;
    Ok(config)
}

/// The C struct of an ELRA configuration.
pub(super) fn c_config_elra(c: &ElraConfig, dtype: ElraDtype) -> ElraAdapterConfig {
    let (schedule, warmup_steps, gamma, alpha) = match c.schedule {
        AlphaSchedule::Exponential {
            warmup_steps,
            gamma,
        } => (0, warmup_steps, gamma, 0.0),
        AlphaSchedule::Cosine { warmup_steps } => (1, warmup_steps, 0.0, 0.0),
        AlphaSchedule::Linear { warmup_steps } => (2, warmup_steps, 0.0, 0.0),
        AlphaSchedule::Constant(a) => (3, 0, 0.0, a),
    };
    let (eta_multiplier, total_steps) = match c.eta_multiplier {
        EtaMultiplier::None => (0, 0),
        EtaMultiplier::Cosine { total_steps } => (1, total_steps),
    };
    ElraAdapterConfig {
        variant: match c.variant {
            Variant::General => 0,
            Variant::Psd => 1,
            Variant::Hyb => 2,
        },
        dtype: dtype as u32,
        d: c.d,
        k: c.k,
        r: c.r,
        eta: c.eta,
        lambda: c.lambda,
        tau: c.tau.unwrap_or(0.0),
        schedule,
        warmup_steps,
        gamma,
        alpha,
        eta_multiplier,
        total_steps,
        seed: c.seed,
        lora_alpha: c.r as f64,
    }
}

pub(super) fn c_config_lora(c: &LoraConfig, dtype: ElraDtype) -> ElraAdapterConfig {
    let mut out = c_config_elra(&ElraConfig::new(Variant::General, c.d, c.k, c.r, 0), dtype);
    out.variant = ElraVariant::ELRA_VARIANT_LORA as u32;
    out.lora_alpha = c.lora_alpha;
    out.seed = c.seed;
    out
}

/// Reads a caller matrix (rows×cols, leading dimension ld) into a DMatrix, checking finiteness.
///
/// # Safety
/// `p` must cover the described layout for reading.
pub(super) unsafe fn read_matrix<T: Real>(
    arg: &'static str,
    p: *const T,
    rows: usize,
    cols: usize,
    ld: usize,
) -> CResult<DMatrix<T>> {
    let l = Layout {
        batch: 1,
        rows,
        cols,
        ld,
        stride: 0,
    };
    check_in(arg, p, &l)?;
    // SAFETY: validated; the caller guarantees readability of the layout.
    let v = unsafe { read_in(arg, p, &l)? };
    Ok(DMatrix::from_row_slice(rows, cols, &v))
}

/// Row-major copy of a matrix.
pub(super) fn row_major<T: Real>(m: &DMatrix<T>) -> Vec<T> {
    let mut v = Vec::with_capacity(m.len());
    for i in 0..m.nrows() {
        v.extend(m.row(i).iter().copied());
    }
    v
}

/// A validated output layout for a rows×cols matrix.
pub(super) fn out_layout<T>(
    arg: &'static str,
    p: *mut T,
    rows: usize,
    cols: usize,
    ld: usize,
) -> CResult<Layout> {
    let l = Layout {
        batch: 1,
        rows,
        cols,
        ld,
        stride: 0,
    };
    check_out(arg, p, &l)?;
    Ok(l)
}

fn c_str<'a>(arg: &'static str, p: *const c_char) -> CResult<&'a CStr> {
    if p.is_null() {
        return Err(CError::Null(arg));
    }
    // SAFETY: non-null; the export's caller guarantees a NUL-terminated string that outlives the
    // call (documented on every export taking a string).
    Ok(unsafe { CStr::from_ptr(p) })
}

fn c_path(arg: &'static str, p: *const c_char) -> CResult<PathBuf> {
    let s = c_str(arg, p)?;
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(s.to_bytes())))
    }
    #[cfg(not(unix))]
    {
        Ok(PathBuf::from(s.to_str().map_err(|_| {
            ElraError::invalid(arg, "path is not valid UTF-8")
        })?))
    }
}

fn c_utf8<'a>(arg: &'static str, p: *const c_char) -> CResult<&'a str> {
    c_str(arg, p)?
        .to_str()
        .map_err(|_| ElraError::invalid(arg, "not valid UTF-8").into())
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
        let dt = dtype_of(dtype)?;
        let c = match variant_of(variant)? {
            Some(v) => c_config_elra(&ElraConfig::new(v, d, k, r, total_steps), dt),
            None => c_config_lora(&LoraConfig::new(d, k, r), dt),
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
        let inner = match dtype_of(c.dtype)? {
            // SAFETY: the caller guarantees w0 covers d×k elements of the config's dtype.
            ElraDtype::ELRA_DTYPE_F32 => unsafe { build::<f32>(&c, w0.cast(), ld_w0)? },
            // SAFETY: as above.
            ElraDtype::ELRA_DTYPE_F64 => unsafe { build::<f64>(&c, w0.cast(), ld_w0)? },
        };
        let h = Box::into_raw(Box::new(ElraAdapter {
            magic: MAGIC,
            inner,
        }));
        // SAFETY: validated non-null and aligned; the caller guarantees it is writable.
        unsafe { out.write(h) };
        Ok(())
    })
}

/// # Safety
/// `w0` must cover the d×k layout with leading dimension `ld_w0`.
unsafe fn build<T: HandleReal>(
    c: &ElraAdapterConfig,
    w0: *const T,
    ld_w0: usize,
) -> CResult<Inner> {
    let variant = variant_of(c.variant)?;
    // Validate the config before reading W0, so dimension errors name the config fields.
    match variant {
        Some(v) => {
            elra_config(c, v)?;
        }
        None => {
            lora_config(c)?;
        }
    }
    // SAFETY: forwarded contract.
    let w0 = unsafe { read_matrix("w0", w0, c.d, c.k, ld_w0)? };
    Ok(match variant {
        Some(v) => T::wrap_elra(ElraLayer::new(elra_config(c, v)?, w0)?),
        None => T::wrap_lora(LoraLayer::new(lora_config(c)?, w0)?),
    })
}

/// Frees an adapter. NULL is ignored. The handle must not be used afterwards.
///
/// # Safety
/// `adapter` must be NULL or a live handle from this library, not used concurrently.
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_destroy(adapter: *mut ElraAdapter) {
    let _ = guard(|| {
        if adapter.is_null() {
            return Ok(());
        }
        // SAFETY: the caller guarantees a live handle with exclusive access.
        let a = unsafe { handle_mut(adapter)? };
        a.magic = 0;
        // SAFETY: the pointer came from Box::into_raw in this library and is freed once.
        drop(unsafe { Box::from_raw(adapter) });
        Ok(())
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
        let a = unsafe { handle(adapter)? };
        check_scalar_out("out", out)?;
        let dt = a.dtype();
        let c = match &a.inner {
            Inner::ElraF32(l) => c_config_elra(l.config(), dt),
            Inner::ElraF64(l) => c_config_elra(l.config(), dt),
            Inner::LoraF32(l) => c_config_lora(l.config(), dt),
            Inner::LoraF64(l) => c_config_lora(l.config(), dt),
        };
        // SAFETY: validated; caller guarantees writability.
        unsafe { out.write(c) };
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
        let a = unsafe { handle(adapter)? };
        check_scalar_out("rows", rows)?;
        check_scalar_out("cols", cols)?;
        let (r, c) = param_shape(a, which)?;
        // SAFETY: validated; caller guarantees writability.
        unsafe {
            rows.write(r);
            cols.write(c);
        }
        Ok(())
    })
}

fn param_shape(a: &ElraAdapter, which: u32) -> CResult<(usize, usize)> {
    let (lora, d, k, r, uses_b) = match &a.inner {
        Inner::ElraF32(l) => (
            false,
            l.config().d,
            l.config().k,
            l.config().r,
            l.config().variant.uses_b(),
        ),
        Inner::ElraF64(l) => (
            false,
            l.config().d,
            l.config().k,
            l.config().r,
            l.config().variant.uses_b(),
        ),
        Inner::LoraF32(l) => (true, l.config().d, l.config().k, l.config().r, true),
        Inner::LoraF64(l) => (true, l.config().d, l.config().k, l.config().r, true),
    };
    let missing = |what: &str| -> CResult<(usize, usize)> {
        Err(ElraError::invalid("which", format!("this adapter has no {what}")).into())
    };
    match which {
        0 if lora => Ok((r, k)),
        0 => Ok((d, r)),
        1 if lora => Ok((d, r)),
        1 if uses_b => Ok((r, d)),
        1 => missing("factor B (ELRA-PSD: G = ηAAᵀ)"),
        2 if lora => missing("step size η (LoRA)"),
        2 => Ok((1, 1)),
        3 => Ok((d, k)),
        v => Err(ElraError::invalid("which", format!("unknown ElraParam value {v}")).into()),
    }
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
        let a = unsafe { handle(adapter)? };
        check_scalar_out("matrix_entries", matrix_entries)?;
        check_scalar_out("scalars", scalars)?;
        let (m, s) = match &a.inner {
            Inner::ElraF32(l) => (l.param_count(), l.scalar_param_count()),
            Inner::ElraF64(l) => (l.param_count(), l.scalar_param_count()),
            Inner::LoraF32(l) => (Adapter::param_count(l), l.scalar_param_count()),
            Inner::LoraF64(l) => (Adapter::param_count(l), l.scalar_param_count()),
        };
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
        let a = unsafe { handle_mut(adapter)? };
        match &mut a.inner {
            Inner::ElraF32(l) => l.set_step(step),
            Inner::ElraF64(l) => l.set_step(step),
            Inner::LoraF32(_) | Inner::LoraF64(_) => {}
        }
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
        let a = unsafe { handle(adapter)? };
        check_scalar_out("step", step)?;
        check_scalar_out("alpha", alpha)?;
        let (s, al) = match &a.inner {
            Inner::ElraF32(l) => (l.step(), l.alpha()),
            Inner::ElraF64(l) => (l.step(), l.alpha()),
            Inner::LoraF32(_) | Inner::LoraF64(_) => (0, 0.0),
        };
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
        let a = unsafe { handle(adapter)? };
        check_scalar_out("energy", energy)?;
        check_scalar_out("penalty", penalty)?;
        let (e, p) = match &a.inner {
            Inner::ElraF32(l) => (l.energy()?.f64(), l.energy_penalty()?.f64()),
            Inner::ElraF64(l) => (l.energy()?, l.energy_penalty()?),
            Inner::LoraF32(_) | Inner::LoraF64(_) => {
                return Err(ElraError::invalid("adapter", "LoRA has no generator energy").into())
            }
        };
        // SAFETY: validated; caller guarantees writability.
        unsafe {
            energy.write(e);
            penalty.write(p);
        }
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------
// Typed operations (generic bodies, exported per dtype below)
// ------------------------------------------------------------------------------------------

/// # Safety
/// `data` covers rows×cols with leading dimension `ld`; exclusive access to the handle.
unsafe fn set_param<T: HandleReal>(
    h: *mut ElraAdapter,
    which: u32,
    data: *const T,
    rows: usize,
    cols: usize,
    ld: usize,
) -> CResult<()> {
    // SAFETY: caller contract.
    let a = unsafe { handle_mut(h)? };
    let shape = param_shape(a, which)?;
    if (rows, cols) != shape {
        return Err(ElraError::shape("data", shape, (rows, cols)).into());
    }
    // SAFETY: caller contract.
    let m = unsafe { read_matrix("data", data, rows, cols, ld)? };
    match (a.typed_mut::<T>()?, which) {
        (LayerMut::Elra(l), 0) => l.set_a(m)?,
        (LayerMut::Elra(l), 1) => l.set_b(m)?,
        (LayerMut::Elra(l), 2) => l.set_eta(m[(0, 0)])?,
        (LayerMut::Elra(l), _) => {
            let mut n =
                ElraLayer::from_factors(l.config().clone(), m, l.a().clone(), l.b().cloned())?;
            n.set_eta(l.eta())?;
            n.set_step(l.step());
            *l = n;
        }
        (LayerMut::Lora(l), 0) => l.set_lora_a(m)?,
        (LayerMut::Lora(l), 1) => l.set_lora_b(m)?,
        (LayerMut::Lora(l), _) => {
            *l = LoraLayer::from_factors(
                l.config().clone(),
                m,
                l.lora_a().clone(),
                l.lora_b().clone(),
            )?;
        }
    }
    Ok(())
}

/// # Safety
/// `out` covers rows×cols with leading dimension `ld` for writing.
unsafe fn get_param<T: HandleReal>(
    h: *const ElraAdapter,
    which: u32,
    out: *mut T,
    rows: usize,
    cols: usize,
    ld: usize,
) -> CResult<()> {
    // SAFETY: caller contract.
    let a = unsafe { handle(h)? };
    let shape = param_shape(a, which)?;
    if (rows, cols) != shape {
        return Err(ElraError::shape("out", shape, (rows, cols)).into());
    }
    let l = out_layout("out", out, rows, cols, ld)?;
    let m: DMatrix<T> = match (a.typed::<T>()?, which) {
        (Layer::Elra(x), 0) => x.a().clone(),
        (Layer::Elra(x), 1) => x.b().cloned().unwrap_or_else(|| DMatrix::zeros(rows, cols)),
        (Layer::Elra(x), 2) => DMatrix::from_element(1, 1, x.eta()),
        (Layer::Elra(x), _) => x.w0().clone(),
        (Layer::Lora(x), 0) => x.lora_a().clone(),
        (Layer::Lora(x), 1) => x.lora_b().clone(),
        (Layer::Lora(x), _) => Adapter::w0(x).clone(),
    };
    // SAFETY: validated layout; caller guarantees writability.
    unsafe { write_out(out, &l, &row_major(&m)) };
    Ok(())
}

/// # Safety
/// `x` covers n×k (ld_x), `y` covers n×d (ld_y).
unsafe fn forward<T: HandleReal>(
    h: *const ElraAdapter,
    n: usize,
    x: *const T,
    ld_x: usize,
    y: *mut T,
    ld_y: usize,
) -> CResult<()> {
    // SAFETY: caller contract.
    let a = unsafe { handle(h)? };
    let layer = a.typed::<T>()?;
    let (d, k) = match &layer {
        Layer::Elra(l) => (l.config().d, l.config().k),
        Layer::Lora(l) => (l.config().d, l.config().k),
    };
    let ly = out_layout("y", y, n, d, ld_y)?;
    // SAFETY: caller contract.
    let xm = unsafe { read_matrix("x", x, n, k, ld_x)? };
    let ym = match layer {
        Layer::Elra(l) => l.forward(&xm)?,
        Layer::Lora(l) => l.forward(&xm)?,
    };
    // SAFETY: validated layout; caller guarantees writability.
    unsafe { write_out(y, &ly, &row_major(&ym)) };
    Ok(())
}

/// # Safety
/// `w_new` covers d×k (ld) for writing.
unsafe fn merge<T: HandleReal>(h: *const ElraAdapter, w_new: *mut T, ld: usize) -> CResult<()> {
    // SAFETY: caller contract.
    let a = unsafe { handle(h)? };
    let layer = a.typed::<T>()?;
    let m = match layer {
        Layer::Elra(l) => l.merge()?,
        Layer::Lora(l) => Adapter::merge(l)?,
    };
    let lo = out_layout("w_new", w_new, m.nrows(), m.ncols(), ld)?;
    // SAFETY: validated layout; caller guarantees writability.
    unsafe { write_out(w_new, &lo, &row_major(&m)) };
    Ok(())
}

/// # Safety
/// `w_new` covers d×k (ld_w_new) for reading, `w0_out` d×k (ld_w0_out) for writing.
unsafe fn unmerge<T: HandleReal>(
    h: *const ElraAdapter,
    w_new: *const T,
    ld_w_new: usize,
    w0_out: *mut T,
    ld_w0_out: usize,
) -> CResult<()> {
    // SAFETY: caller contract.
    let a = unsafe { handle(h)? };
    let layer = a.typed::<T>()?;
    let (d, k) = match &layer {
        Layer::Elra(l) => (l.config().d, l.config().k),
        Layer::Lora(l) => (l.config().d, l.config().k),
    };
    let lo = out_layout("w0_out", w0_out, d, k, ld_w0_out)?;
    // SAFETY: caller contract.
    let wn = unsafe { read_matrix("w_new", w_new, d, k, ld_w_new)? };
    let w0 = match layer {
        Layer::Elra(l) => l.unmerge(&wn)?,
        Layer::Lora(l) => Adapter::unmerge(l, &wn)?,
    };
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
unsafe fn backward<T: HandleReal>(
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
    let a = unsafe { handle(h)? };
    let layer = a.typed::<T>()?;
    let (d, k, lora, uses_b) = match &layer {
        Layer::Elra(l) => (
            l.config().d,
            l.config().k,
            false,
            l.config().variant.uses_b(),
        ),
        Layer::Lora(l) => (l.config().d, l.config().k, true, true),
    };
    // Validate every output before any work.
    let l_dx = out_layout("dx", dx, n, k, ld_dx)?;
    let (ar, ac) = param_shape(a, 0)?;
    let l_da = out_layout("da", da, ar, ac, ld_da)?;
    let l_db = if uses_b {
        let (br, bc) = param_shape(a, 1)?;
        Some(out_layout("db", db, br, bc, ld_db)?)
    } else {
        None
    };
    if !lora {
        check_scalar_out("deta", deta)?;
    }
    // SAFETY: caller contract.
    let xm = unsafe { read_matrix("x", x, n, k, ld_x)? };
    // SAFETY: caller contract.
    let dym = unsafe { read_matrix("dy", dy, n, d, ld_dy)? };
    let (gx, ga, gb, geta) = match layer {
        Layer::Elra(l) => {
            let (_, tape) = grad::elra_forward(l, &xm, grad::Route::Woodbury, None)?;
            let g = grad::elra_backward(l, &xm, &tape, dym)?;
            (g.x, g.a, g.b, Some(g.eta))
        }
        Layer::Lora(l) => {
            let (_, tape) = grad::lora_forward(l, &xm, None)?;
            let g = grad::lora_backward(l, &xm, &tape, dym)?;
            (g.x, g.lora_a, Some(g.lora_b), None)
        }
    };
    // SAFETY: layouts validated above; the caller guarantees writability. All results are
    // computed, so nothing is written unless the whole call succeeds.
    unsafe {
        write_out(dx, &l_dx, &row_major(&gx));
        write_out(da, &l_da, &row_major(&ga));
        if let (Some(l), Some(g)) = (l_db, gb) {
            write_out(db, &l, &row_major(&g));
        }
        if let Some(e) = geta {
            deta.write(e);
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

// ------------------------------------------------------------------------------------------
// Files
// ------------------------------------------------------------------------------------------

/// Reads `n` handles and module names.
///
/// # Safety
/// `adapters` and `modules` must point to `n` readable entries each.
unsafe fn named_handles<'a>(
    n: usize,
    adapters: *const *const ElraAdapter,
    modules: *const *const c_char,
) -> CResult<Vec<(&'a str, &'a ElraAdapter)>> {
    if n == 0 {
        return Err(ElraError::invalid("n", "at least one adapter is needed").into());
    }
    if adapters.is_null() {
        return Err(CError::Null("adapters"));
    }
    if modules.is_null() {
        return Err(CError::Null("modules"));
    }
    let mut out = Vec::with_capacity(n.min(1 << 16));
    for i in 0..n {
        // SAFETY: the caller guarantees n readable entries in both arrays.
        let (h, m) = unsafe {
            (
                adapters.add(i).read_unaligned(),
                modules.add(i).read_unaligned(),
            )
        };
        // SAFETY: each entry must be a live handle (caller contract).
        let a = unsafe { handle(h)? };
        out.push((c_utf8("modules", m)?, a));
    }
    Ok(out)
}

fn file_of<T: HandleReal>(list: &[(&str, &ElraAdapter)]) -> CResult<AdapterFile<T>> {
    let mut elra = Vec::new();
    let mut lora = Vec::new();
    for (name, a) in list {
        match a.typed::<T>()? {
            Layer::Elra(l) => elra.push((*name, l)),
            Layer::Lora(l) => lora.push((*name, l)),
        }
    }
    match (elra.is_empty(), lora.is_empty()) {
        (false, true) => Ok(AdapterFile::from_elra_layers(&elra)?),
        (true, false) => Ok(AdapterFile::from_lora_layers(&lora)?),
        _ => Err(
            ElraError::invalid("adapters", "cannot mix ELRA and LoRA adapters in one file").into(),
        ),
    }
}

/// Saves `n` adapters (one per module, names like `model.layers.0.self_attn.q_proj`) as one
/// adapter directory `dir` (`adapter_model.safetensors` + `adapter_config.json`, PEFT layout;
/// created if missing; each file written atomically). All adapters must have the same dtype and
/// kind (ELRA or LoRA) and share their settings (variant, r, η₀, λ, τ, schedules, step / r,
/// lora_alpha); W0 is not saved.
///
/// # Safety
/// `adapters` and `modules` must point to `n` live handles and `n` NUL-terminated strings; `dir`
/// to a NUL-terminated path.
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_save(
    n: usize,
    adapters: *const *const ElraAdapter,
    modules: *const *const c_char,
    dir: *const c_char,
) -> ElraStatus {
    guard(|| {
        let dir = c_path("dir", dir)?;
        // SAFETY: caller contract.
        let list = unsafe { named_handles(n, adapters, modules)? };
        match list[0].1.dtype() {
            ElraDtype::ELRA_DTYPE_F32 => file_of::<f32>(&list)?.save(&dir)?,
            ElraDtype::ELRA_DTYPE_F64 => file_of::<f64>(&list)?.save(&dir)?,
        }
        Ok(())
    })
}

/// Loads module `module` of the adapter directory `dir` onto the frozen weight `w0` (d×k
/// elements of `dtype`, leading dimension `ld_w0 ≥ k`; copied) and returns a new handle in
/// `*out`. The directory may hold an ELRA or a PEFT LoRA adapter (F16/BF16/F32/F64 tensors are
/// converted to `dtype`). Every problem with the files is `ELRA_FORMAT` (or `ELRA_IO`) with a
/// message naming it; d (and k for LoRA) must match the stored tensors (`ELRA_SHAPE_MISMATCH`).
/// On error `*out` is untouched.
///
/// # Safety
/// `dir` and `module` must be NUL-terminated strings, `w0` must cover d×k elements of `dtype` as
/// described, `out` must be writable.
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_load(
    dir: *const c_char,
    module: *const c_char,
    dtype: u32,
    d: usize,
    k: usize,
    w0: *const c_void,
    ld_w0: usize,
    out: *mut *mut ElraAdapter,
) -> ElraStatus {
    guard(|| {
        let dir = c_path("dir", dir)?;
        let module = c_utf8("module", module)?;
        check_scalar_out("out", out)?;
        let inner = match dtype_of(dtype)? {
            // SAFETY: caller contract.
            ElraDtype::ELRA_DTYPE_F32 => unsafe {
                load::<f32>(&dir, module, d, k, w0.cast(), ld_w0)?
            },
            // SAFETY: caller contract.
            ElraDtype::ELRA_DTYPE_F64 => unsafe {
                load::<f64>(&dir, module, d, k, w0.cast(), ld_w0)?
            },
        };
        let h = Box::into_raw(Box::new(ElraAdapter {
            magic: MAGIC,
            inner,
        }));
        // SAFETY: validated; caller guarantees writability.
        unsafe { out.write(h) };
        Ok(())
    })
}

/// # Safety
/// `w0` must cover d×k with leading dimension `ld_w0`.
unsafe fn load<T: HandleReal>(
    dir: &std::path::Path,
    module: &str,
    d: usize,
    k: usize,
    w0: *const T,
    ld_w0: usize,
) -> CResult<Inner> {
    // SAFETY: forwarded contract.
    let w0 = unsafe { read_matrix("w0", w0, d, k, ld_w0)? };
    let file = AdapterFile::<T>::load(dir)?;
    Ok(match &file.config {
        FileConfig::Elra(_) => T::wrap_elra(file.elra_layer(module, w0)?),
        FileConfig::Lora(_) => T::wrap_lora(file.lora_layer(module, w0)?),
    })
}

/// Writes the merged weights `W_new` of `n` adapters as one safetensors file at `path` with keys
/// `<module>.weight` (d×k, the adapters' dtype), atomically — the base model's own key layout.
///
/// # Safety
/// As [`elra_adapter_save`], with `path` a NUL-terminated file path.
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_save_merged(
    n: usize,
    adapters: *const *const ElraAdapter,
    modules: *const *const c_char,
    path: *const c_char,
) -> ElraStatus {
    guard(|| {
        let path = c_path("path", path)?;
        // SAFETY: caller contract.
        let list = unsafe { named_handles(n, adapters, modules)? };
        match list[0].1.dtype() {
            ElraDtype::ELRA_DTYPE_F32 => merged_of::<f32>(&list, &path),
            ElraDtype::ELRA_DTYPE_F64 => merged_of::<f64>(&list, &path),
        }
    })
}

fn merged_of<T: HandleReal>(list: &[(&str, &ElraAdapter)], path: &std::path::Path) -> CResult<()> {
    let mut merged = Vec::with_capacity(list.len());
    for (name, a) in list {
        let m = match a.typed::<T>()? {
            Layer::Elra(l) => l.merge()?,
            Layer::Lora(l) => Adapter::merge(l)?,
        };
        merged.push((*name, m));
    }
    let refs: Vec<(&str, &DMatrix<T>)> = merged.iter().map(|(n, m)| (*n, m)).collect();
    save_merged(path, &refs)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capi::{elra_last_error_message, ELRA_OK};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
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
            let reference: Box<dyn Adapter<f64>> = match variant_of(c.variant).unwrap() {
                Some(var) => {
                    Box::new(ElraLayer::new(elra_config(&c, var).unwrap(), w0m.clone()).unwrap())
                }
                None => {
                    let mut l = LoraLayer::new(lora_config(&c).unwrap(), w0m.clone()).unwrap();
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
            let want = reference.forward(&xm).unwrap();
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
            assert_eq!(
                DMatrix::from_row_slice(d, k, &wn),
                reference.merge().unwrap()
            );
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
            let a = unsafe { handle(h) }.unwrap();
            let xm = DMatrix::from_row_slice(n, k, &x);
            let dym = DMatrix::from_row_slice(n, d, &dy);
            match a.typed::<f64>().unwrap() {
                Layer::Elra(l) => {
                    let (_, t) = grad::elra_forward(l, &xm, grad::Route::Woodbury, None).unwrap();
                    let g = grad::elra_backward(l, &xm, &t, dym).unwrap();
                    assert_eq!(row_major(&g.x), dx);
                    assert_eq!(row_major(&g.a), da);
                    assert_eq!(g.eta, deta);
                }
                Layer::Lora(l) => {
                    let (_, t) = grad::lora_forward(l, &xm, None).unwrap();
                    let g = grad::lora_backward(l, &xm, &t, dym).unwrap();
                    assert_eq!(row_major(&g.lora_a), da);
                }
            }
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
