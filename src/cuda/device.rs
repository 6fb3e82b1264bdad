//! The device handle: context, stream, cuBLAS handle, and the one kernel table of a context
//! (every kernel of the fatbin, looked up once when the context's module is loaded).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use crate::{ElraError, Result};

/// The fatbin `build.rs` compiles from `cuda/*.cu` (SASS for the configured architectures plus PTX).
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/elra_kernels.fatbin"));

/// Threads per block of every kernel in `cuda/` (they assume exactly this; see `common.cuh`).
pub(crate) const BLOCK_THREADS: u32 = 256;

/// Every kernel of the fatbin, looked up once per context: the batched r×r matrix functions and
/// Grams (`cuda/phi1.cu`, `cuda/grams.cu`), the skinny kernels of the GPU layer
/// (`cuda/skinny.cu`) and the non-finite scan (`cuda/finite.cu`); activation-typed ones are
/// indexed by [`super::Activation::INDEX`].
pub(crate) struct Kernels {
    pub(crate) expm_phi1_f32: CudaFunction,
    pub(crate) expm_phi1_f64: CudaFunction,
    pub(crate) phi1_adjoint_f32: CudaFunction,
    pub(crate) phi1_adjoint_f64: CudaFunction,
    pub(crate) expm_phi1_warp_f32: CudaFunction,
    pub(crate) expm_phi1_warp_f64: CudaFunction,
    pub(crate) phi1_adjoint_warp_f32: CudaFunction,
    pub(crate) phi1_adjoint_warp_f64: CudaFunction,
    /// Streaming multiprocessors of the device.
    pub(crate) sm_count: usize,
    pub(crate) adapter_grams_f32: CudaFunction,
    pub(crate) adapter_grams_f64: CudaFunction,
    /// Largest dynamic shared memory (bytes) every matrix-function kernel accepts per block.
    pub(crate) max_dynamic_smem: usize,
    /// `rows_fused_{f32,f16,bf16}`: the fused row pass.
    pub(crate) rows_fused: [CudaFunction; 3],
    /// `col_reduce_partial_{f32,f16,bf16}`: per-chunk column reductions.
    pub(crate) col_reduce_partial: [CudaFunction; 3],
    /// `merge_apply_{f32,f16,bf16}`: `W_out = W_in + s L R`.
    pub(crate) merge_apply: [CudaFunction; 3],
    /// `col_reduce_finish_f32`: the ordered sum over chunks.
    pub(crate) col_reduce_finish: CudaFunction,
    /// `small_gemm_f32`.
    pub(crate) small_gemm: CudaFunction,
    /// `factor_c_f32`: the effective factor of eq. (19).
    pub(crate) factor_c: CudaFunction,
    /// `factor_backward_f32`: energy gradient and chain through eq. (19).
    pub(crate) factor_backward: CudaFunction,
    /// `factor_eta_f32`: ∂η.
    pub(crate) factor_eta: CudaFunction,
    /// `check_finite_{f32,f16,bf16}`: the non-finite scan (`cuda/finite.cu`).
    pub(crate) check_finite: [CudaFunction; 3],
    /// `multi_count_i32`, `multi_perm_i32`: the segments of the multi-adapter forward.
    pub(crate) multi_count: CudaFunction,
    pub(crate) multi_perm: CudaFunction,
    /// `multi_prep_f32`: Cᵀ and Z = C A for a batch of adapters.
    pub(crate) multi_prep: CudaFunction,
    /// `rows_multi_{f32,f16,bf16}`: the row pass over each adapter's segment.
    pub(crate) rows_multi: [CudaFunction; 3],
    /// `multi_finish_{f32,f16,bf16}`: bias and bad-index rows.
    pub(crate) multi_finish: [CudaFunction; 3],
    /// Keeps the module loaded as long as the functions are used.
    _module: Arc<CudaModule>,
}

/// Context and module shared by every [`CudaDevice`] on one ordinal.
struct Loaded {
    ctx: Arc<CudaContext>,
    kernels: Kernels,
    /// The one stream of this device: every handle, buffer, kernel and cuBLAS call of the crate
    /// on this device is ordered on it.
    stream: Arc<CudaStream>,
}

/// One entry per ordinal whose module is loaded; weak so that the context is released when the
/// last [`CudaDevice`] using it is dropped.
static LOADED: Mutex<Vec<(usize, Weak<Loaded>)>> = Mutex::new(Vec::new());

/// Where the batched matrix-function kernels keep their per-matrix work matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Workspace {
    /// Shared memory when the work matrices fit in a block's shared memory, global scratch otherwise.
    #[default]
    Auto,
    /// Always global scratch (the same arithmetic; used to test both paths).
    Global,
}

/// Which thread team computes one matrix in the batched matrix-function kernels
/// (`cuda/phi1.cu`). The results are bit-identical either way (tested); only the speed differs.
/// Measured on an H100 (2026-11-22, 224 matrices of n = 16, f32): e^Z and φ1(Z) take 49 µs with
/// block teams and 65 µs with warp teams, φ1's adjoint 72 µs and 106 µs — a warp runs each
/// product's n² entries on 32 lanes, and that costs more than the block barriers it saves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MatrixTeam {
    /// A thread block (256 threads) per matrix.
    #[default]
    Block,
    /// A warp per matrix, up to 8 matrices per block.
    Warp,
}

/// A CUDA device: the device's primary context, the device's one stream (shared by every handle
/// on the same ordinal), a cuBLAS handle of this handle's own bound to that stream, and the
/// kernel module (loaded once per context and shared).
///
/// All work submitted through any `CudaDevice` of one ordinal is ordered on that stream.
pub struct CudaDevice {
    loaded: Arc<Loaded>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    allow_tf32: bool,
    workspace: Workspace,
    team: MatrixTeam,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.loaded.ctx.ordinal())
            .field("allow_tf32", &self.allow_tf32)
            .field("workspace", &self.workspace)
            .field("team", &self.team)
            .finish()
    }
}

/// Number of CUDA devices, after checking that the driver and cuBLAS libraries can be loaded.
fn probe() -> std::result::Result<usize, String> {
    static PROBE: OnceLock<std::result::Result<usize, String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            // SAFETY: `is_culib_present` only tries to dlopen the candidate library names and drops
            // the handles; loading runs the library's initialisers, which any use of the CUDA back
            // end does anyway. No pointer or state of ours is involved.
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                return Err("the CUDA driver library (libcuda.so) cannot be loaded".into());
            }
            // SAFETY: as above, for libcublas.
            if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                return Err("the cuBLAS library (libcublas.so) cannot be loaded".into());
            }
            // cudarc panics when a symbol is missing from the driver library (e.g. a driver older
            // than the CUDA 13.0 API it was built for): catch that as a last line of defence.
            match catch_unwind(CudaContext::device_count) {
                Ok(Ok(n)) if n > 0 => Ok(n as usize),
                Ok(Ok(_)) => Err("the CUDA driver reports no device".into()),
                Ok(Err(e)) => Err(format!("CUDA driver initialisation failed: {:?}", e.0)),
                Err(p) => Err(format!("CUDA driver unusable: {}", panic_message(&p))),
            }
        })
        .clone()
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic while calling the CUDA libraries".into()
    }
}

/// `Ok(())` when a CUDA driver, cuBLAS and at least one device are present; otherwise the
/// reason, for tests and benches to print when they skip. Never panics.
pub fn cuda_available() -> std::result::Result<(), String> {
    probe().map(|_| ())
}

/// Number of CUDA devices ([`ElraError::NoDevice`] when the driver or cuBLAS is missing).
pub fn device_count() -> Result<usize> {
    probe().map_err(ElraError::NoDevice)
}

impl CudaDevice {
    /// Opens device `ordinal`: retains its primary context, loads the kernel module once per
    /// context, and creates a cuBLAS handle (default math mode: no TF32) on the device's stream.
    /// All handles of one device share that one stream (created with the context, with
    /// cudarc's per-buffer event tracking off, since one stream orders everything): work from two
    /// handles of the same device runs in submission order, never concurrently.
    ///
    /// Returns [`ElraError::NoDevice`] without a usable driver/device and never panics.
    pub fn new(ordinal: usize) -> Result<Self> {
        let count = probe().map_err(ElraError::NoDevice)?;
        if ordinal >= count {
            return Err(ElraError::NoDevice(format!(
                "device {ordinal} requested but {count} present"
            )));
        }
        match catch_unwind(AssertUnwindSafe(|| Self::open(ordinal))) {
            Ok(r) => r,
            Err(p) => Err(ElraError::NoDevice(format!(
                "CUDA library panicked while opening device {ordinal}: {}",
                panic_message(&p)
            ))),
        }
    }

    fn open(ordinal: usize) -> Result<Self> {
        let loaded = loaded_for(ordinal)?;
        let stream = loaded.stream.clone();
        let blas = CudaBlas::new(stream.clone())?;
        set_math_mode(&blas, false)?;
        Ok(CudaDevice {
            loaded,
            stream,
            blas,
            allow_tf32: false,
            workspace: Workspace::Auto,
            team: MatrixTeam::Block,
        })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.loaded.ctx.ordinal()
    }

    /// The device's name as the driver reports it.
    pub fn name(&self) -> Result<String> {
        Ok(self.loaded.ctx.name()?)
    }

    /// Compute capability `(major, minor)`.
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        Ok(self.loaded.ctx.compute_capability()?)
    }

    /// The CUDA context (the device's primary context).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.loaded.ctx
    }

    /// The stream all work of this handle is ordered on (the same for every handle of the device).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The cuBLAS handle (bound to [`Self::stream`]).
    pub fn blas(&self) -> &CudaBlas {
        &self.blas
    }

    /// Blocks until all work submitted on this handle's stream has finished; reports any
    /// asynchronous error (e.g. a kernel fault) as [`ElraError::Cuda`].
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// Whether f32 GEMMs may use TF32 tensor cores (default `false`: full f32).
    pub fn allow_tf32(&self) -> bool {
        self.allow_tf32
    }

    /// Allows or forbids TF32 in f32 GEMMs ([`crate::cuda::gemm()`]). The r×r matrix-function
    /// kernels never use TF32 either way.
    pub fn set_allow_tf32(&mut self, allow: bool) -> Result<()> {
        set_math_mode(&self.blas, allow)?;
        self.allow_tf32 = allow;
        Ok(())
    }

    /// Where the matrix-function kernels keep their work matrices.
    pub fn workspace(&self) -> Workspace {
        self.workspace
    }

    /// Chooses where the matrix-function kernels keep their work matrices.
    pub fn set_workspace(&mut self, workspace: Workspace) {
        self.workspace = workspace;
    }

    /// The thread-team policy of the batched matrix-function kernels.
    pub fn team(&self) -> MatrixTeam {
        self.team
    }

    /// Sets the thread-team policy of the batched matrix-function kernels (results are the same
    /// bits; [`MatrixTeam::Block`], the default, is the faster one measured).
    pub fn set_team(&mut self, team: MatrixTeam) {
        self.team = team;
    }

    pub(crate) fn kernels(&self) -> &Kernels {
        &self.loaded.kernels
    }
}

fn set_math_mode(blas: &CudaBlas, tf32: bool) -> Result<()> {
    use cudarc::cublas::sys::cublasMath_t;
    let mode = if tf32 {
        cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
    } else {
        cublasMath_t::CUBLAS_DEFAULT_MATH
    };
    // SAFETY: the handle is a live cuBLAS handle owned by `blas`; setting the math mode has no
    // memory effects.
    unsafe { cudarc::cublas::sys::cublasSetMathMode(*blas.handle(), mode) }.result()?;
    Ok(())
}

/// The context and kernels for `ordinal`, loading the module if no live device holds it.
fn loaded_for(ordinal: usize) -> Result<Arc<Loaded>> {
    let mut table = LOADED
        .lock()
        .map_err(|_| ElraError::Cuda("module registry poisoned by an earlier panic".into()))?;
    table.retain(|(_, w)| w.strong_count() > 0);
    if let Some(l) = table
        .iter()
        .find(|(o, _)| *o == ordinal)
        .and_then(|(_, w)| w.upgrade())
    {
        return Ok(l);
    }
    let ctx = CudaContext::new(ordinal)?;
    // SAFETY: cudarc's event tracking records and waits on a CUDA event per buffer argument of
    // every launch (≈ 14 driver calls for a 7-argument kernel) to order buffers used on several
    // streams. This crate uses exactly one stream per device (`Loaded::stream`, shared by every
    // `CudaDevice` of this ordinal and created right below, before any buffer): all buffers it
    // allocates are allocated, used by kernels and cuBLAS, and freed (stream-ordered) on that
    // stream, so stream order already gives what the events would. No slice was created on this
    // `CudaContext` before this call (it was just made), so none is left half-tracked. Memory
    // owned by a caller on another stream is ordered by explicit events where it is used (C ABI).
    unsafe { ctx.disable_event_tracking() };
    let kernels = load_kernels(&ctx)?;
    let stream = ctx.new_stream()?;
    let loaded = Arc::new(Loaded {
        ctx,
        kernels,
        stream,
    });
    table.push((ordinal, Arc::downgrade(&loaded)));
    Ok(loaded)
}

fn load_kernels(ctx: &Arc<CudaContext>) -> Result<Kernels> {
    let module = ctx
        .load_module(Ptx::from_binary(FATBIN.to_vec()))
        .map_err(|e| {
            let cc = ctx
                .compute_capability()
                .map(|(a, b)| format!("sm_{a}{b}"))
                .unwrap_or_else(|_| "unknown".into());
            ElraError::Cuda(format!(
                "cannot load the elra kernels on this GPU ({cc}): {:?}; rebuild with \
             ELRA_CUDA_ARCHS including its compute capability",
                e.0
            ))
        })?;
    let get = |name: &str| {
        module.load_function(name).map_err(|e| {
            ElraError::Cuda(format!(
                "kernel `{name}` missing from the fatbin: {:?}",
                e.0
            ))
        })
    };
    let three = |op: &str| -> Result<[CudaFunction; 3]> {
        Ok([
            get(&format!("{op}_f32"))?,
            get(&format!("{op}_f16"))?,
            get(&format!("{op}_bf16"))?,
        ])
    };
    let optin =
        ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
    let expm_phi1_f32 = get("expm_phi1_f32")?;
    let expm_phi1_f64 = get("expm_phi1_f64")?;
    let phi1_adjoint_f32 = get("phi1_adjoint_f32")?;
    let phi1_adjoint_f64 = get("phi1_adjoint_f64")?;
    let expm_phi1_warp_f32 = get("expm_phi1_warp_f32")?;
    let expm_phi1_warp_f64 = get("expm_phi1_warp_f64")?;
    let phi1_adjoint_warp_f32 = get("phi1_adjoint_warp_f32")?;
    let phi1_adjoint_warp_f64 = get("phi1_adjoint_warp_f64")?;
    let sm_count = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
        .max(1) as usize;
    // Opt in to dynamic shared memory above the default 48 KiB for the matrix-function kernels.
    let mut max_dynamic_smem = usize::MAX;
    for f in [
        &expm_phi1_f32,
        &expm_phi1_f64,
        &phi1_adjoint_f32,
        &phi1_adjoint_f64,
        &expm_phi1_warp_f32,
        &expm_phi1_warp_f64,
        &phi1_adjoint_warp_f32,
        &phi1_adjoint_warp_f64,
    ] {
        let static_smem =
            f.get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?;
        let dynamic = (optin - static_smem).max(0);
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            dynamic,
        )?;
        max_dynamic_smem = max_dynamic_smem.min(dynamic as usize);
    }
    Ok(Kernels {
        expm_phi1_f32,
        expm_phi1_f64,
        phi1_adjoint_f32,
        phi1_adjoint_f64,
        expm_phi1_warp_f32,
        expm_phi1_warp_f64,
        phi1_adjoint_warp_f32,
        phi1_adjoint_warp_f64,
        sm_count,
        adapter_grams_f32: get("adapter_grams_f32")?,
        adapter_grams_f64: get("adapter_grams_f64")?,
        max_dynamic_smem,
        rows_fused: three("rows_fused")?,
        col_reduce_partial: three("col_reduce_partial")?,
        merge_apply: three("merge_apply")?,
        col_reduce_finish: get("col_reduce_finish_f32")?,
        small_gemm: get("small_gemm_f32")?,
        factor_c: get("factor_c_f32")?,
        factor_backward: get("factor_backward_f32")?,
        factor_eta: get("factor_eta_f32")?,
        check_finite: three("check_finite")?,
        multi_count: get("multi_count_i32")?,
        multi_perm: get("multi_perm_i32")?,
        multi_prep: get("multi_prep_f32")?,
        rows_multi: three("rows_multi")?,
        multi_finish: three("multi_finish")?,
        _module: module,
    })
}
