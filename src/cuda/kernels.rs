//! Launches of the batched r×r kernels of `cuda/phi1.cu` and `cuda/grams.cu` (the skinny
//! kernels of the layer are launched by `skinny.rs`) and their host-side checks.
//!
//! Every function here validates shapes and devices first, then launches one kernel for the
//! whole batch (one thread block per matrix). The `launch_*` functions are asynchronous and write
//! a per-matrix status code into a caller-provided `i32` buffer; the plain functions launch,
//! synchronise, read the statuses back and turn the first failure into an error naming the
//! matrix's index in the batch.
#![allow(non_snake_case)]

use cudarc::driver::{CudaFunction, CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};
use nalgebra::DMatrix;

use super::device::BLOCK_THREADS;
use super::{CudaDevice, DeviceMatrices, DeviceScalar, FloatKernel, MatrixTeam, Workspace};
use crate::linalg::Real;
use crate::{ElraError, Result};

/// Largest matrix size of the batched matrix-function kernels (`ELRA_MAX_N` in `cuda/phi1.cu`).
pub const MAX_N: usize = 64;

/// Threads of a warp team.
const WARP: usize = 32;

/// Work matrices per block of the matrix-function kernels (`ELRA_NBUF` in `cuda/phi1.cu`; the
/// buffers of the CPU core's `Workspace`).
const NBUF: usize = 12;

/// Outcome for one matrix of a batch, as written by the kernels (`ELRA_*` in `cuda/common.cuh`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatrixStatus {
    /// Success.
    Ok,
    /// The input held NaN or ±Inf.
    NonFiniteInput,
    /// The result (or an intermediate power) left the floating-point range.
    Overflow,
    /// The Padé denominator was singular (a zero pivot).
    Singular,
    /// The matrix size was outside what the kernel supports.
    BadSize,
    /// A code the host does not know (a kernel/host mismatch).
    Unknown(i32),
}

impl MatrixStatus {
    /// Decodes a kernel status code.
    pub fn from_code(code: i32) -> Self {
        match code {
            0 => MatrixStatus::Ok,
            1 => MatrixStatus::NonFiniteInput,
            2 => MatrixStatus::Overflow,
            3 => MatrixStatus::Singular,
            4 => MatrixStatus::BadSize,
            c => MatrixStatus::Unknown(c),
        }
    }

    /// `Ok(())` or the error for matrix `index` of the batch of operation `op`, whose input
    /// argument is `arg`.
    pub fn into_result(self, op: &str, arg: &'static str, index: usize) -> Result<()> {
        match self {
            MatrixStatus::Ok => Ok(()),
            MatrixStatus::NonFiniteInput => Err(ElraError::invalid(
                arg,
                format!("{op}: matrix {index} of the batch contains NaN or ±Inf"),
            )),
            MatrixStatus::Overflow => Err(ElraError::Overflow {
                what: format!("{op}: matrix {index} of the batch: the result is outside the floating-point range"),
            }),
            MatrixStatus::Singular => Err(ElraError::Numerical(format!(
                "{op}: matrix {index} of the batch: singular Padé denominator"
            ))),
            MatrixStatus::BadSize => Err(ElraError::invalid(
                arg,
                format!("{op}: matrix {index}: size outside 1..={MAX_N}"),
            )),
            MatrixStatus::Unknown(c) => Err(ElraError::Cuda(format!(
                "{op}: matrix {index}: unknown kernel status {c}"
            ))),
        }
    }
}

/// Reads back the first `batch` status codes (synchronises the stream).
pub fn read_status(
    dev: &CudaDevice,
    status: &CudaSlice<i32>,
    batch: usize,
) -> Result<Vec<MatrixStatus>> {
    if status.len() < batch {
        return Err(ElraError::invalid(
            "status",
            format!("{} entries for a batch of {batch}", status.len()),
        ));
    }
    let codes = dev.stream().clone_dtoh(status)?;
    dev.synchronize()?;
    Ok(codes[..batch]
        .iter()
        .map(|&c| MatrixStatus::from_code(c))
        .collect())
}

/// Reads back the statuses and returns the error of the first failed matrix, if any.
pub fn check_status(
    dev: &CudaDevice,
    status: &CudaSlice<i32>,
    batch: usize,
    op: &str,
    arg: &'static str,
) -> Result<()> {
    for (i, s) in read_status(dev, status, batch)?.into_iter().enumerate() {
        s.into_result(op, arg, i)?;
    }
    Ok(())
}

fn pick<'a, T: FloatKernel>(
    f32_fn: &'a CudaFunction,
    f64_fn: &'a CudaFunction,
) -> &'a CudaFunction {
    if T::DTYPE == "f64" {
        f64_fn
    } else {
        f32_fn
    }
}

fn i32_of(arg: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| ElraError::invalid(arg, format!("{v} exceeds the kernel's 32-bit range")))
}

fn check_batch_square<T: DeviceScalar>(arg: &'static str, z: &DeviceMatrices<T>) -> Result<usize> {
    let n = z.rows();
    if z.cols() != n {
        return Err(ElraError::shape(arg, (n, n), (z.rows(), z.cols())));
    }
    if n > MAX_N {
        return Err(ElraError::invalid(
            arg,
            format!("matrices are {n}×{n}; the GPU kernels support r ≤ {MAX_N}"),
        ));
    }
    Ok(n)
}

fn check_status_len(status: &CudaSlice<i32>, batch: usize) -> Result<()> {
    if status.len() < batch {
        return Err(ElraError::invalid(
            "status",
            format!("{} entries for a batch of {batch}", status.len()),
        ));
    }
    Ok(())
}

/// Where the work matrices of a launch live in global memory.
enum Work<'w, T> {
    /// In shared memory: a null `work` pointer, which the kernel never dereferences then.
    Shared,
    /// Global scratch allocated for this launch.
    Owned(CudaSlice<T>),
    /// Global scratch the caller lent ([`launch_expm_phi1_in`], [`launch_phi1_adjoint_in`]).
    Lent(&'w CudaSlice<T>),
}

/// The launch of one batched matrix-function kernel: which team runs a matrix, the grid, and
/// where the work matrices live.
struct Plan<'w, T: FloatKernel> {
    warp: bool,
    cfg: LaunchConfig,
    use_shared: i32,
    /// Global scratch (batch · NBUF · len entries) when the work matrices are not in shared
    /// memory.
    work: Work<'w, T>,
}

/// Plans a launch for `batch` matrices whose work matrices hold `len` entries each.
/// Warp teams: W = ⌈batch / SMs⌉ matrices per block (at most 8, and at most what the shared
/// memory holds), so the teams spread over all SMs; block teams: one matrix per block. Work
/// matrices go to dynamic shared memory when they fit and the device policy allows it, else to
/// global scratch: `lent` when given (it must hold batch · NBUF · len entries; nothing is
/// allocated then), else allocated here (nothing is allocated in the shared case).
fn plan<'w, T: FloatKernel>(
    dev: &CudaDevice,
    batch: usize,
    len: usize,
    lent: Option<&'w CudaSlice<T>>,
) -> Result<Plan<'w, T>> {
    let k = dev.kernels();
    let per_team = NBUF * len * std::mem::size_of::<T>();
    let warp = dev.team() == MatrixTeam::Warp;
    let max_warps = BLOCK_THREADS as usize / WARP;
    let shared_ok = dev.workspace() == Workspace::Auto && per_team <= k.max_dynamic_smem;
    let teams_per_block = if warp {
        let spread = batch.div_ceil(k.sm_count).clamp(1, max_warps);
        if shared_ok {
            spread.min((k.max_dynamic_smem / per_team).max(1))
        } else {
            spread
        }
    } else {
        1
    };
    let blocks = batch.div_ceil(teams_per_block);
    let threads = if warp {
        (teams_per_block * WARP) as u32
    } else {
        BLOCK_THREADS
    };
    let (use_shared, smem, work) = if shared_ok {
        (1, (teams_per_block * per_team) as u32, Work::Shared)
    } else {
        let total = batch
            .checked_mul(NBUF * len)
            .ok_or_else(|| ElraError::invalid("batch", "workspace size overflows usize"))?;
        let work = match lent {
            Some(w) if w.len() >= total => Work::Lent(w),
            Some(w) => {
                return Err(ElraError::invalid(
                    "work",
                    format!("{} entries lent, the kernel needs {total}", w.len()),
                ))
            }
            // SAFETY: uninitialised device memory of f32/f64 (every bit pattern is a valid
            // value); the kernel writes each work matrix before reading it and the host never
            // reads it back, so skipping the memset (up to ~200 MB for r = 64 f64 adjoints)
            // changes no result.
            None => Work::Owned(unsafe { dev.stream().alloc::<T>(total) }?),
        };
        (0, 0, work)
    };
    Ok(Plan {
        warp,
        cfg: LaunchConfig {
            grid_dim: (i32_of("batch", blocks)? as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem,
        },
        use_shared,
        work,
    })
}

impl<T: FloatKernel> Plan<'_, T> {
    /// The kernel of this plan's team for `T`: one of `block` or `warp`, each `[f32, f64]`.
    fn kernel<'k>(
        &self,
        block: [&'k CudaFunction; 2],
        warp: [&'k CudaFunction; 2],
    ) -> &'k CudaFunction {
        let [f32_fn, f64_fn] = if self.warp { warp } else { block };
        pick::<T>(f32_fn, f64_fn)
    }

    /// Pushes the arguments every matrix-function kernel ends with: `T* work` (null when the
    /// work matrices are in shared memory), `int use_shared`, `int* status`.
    fn push_tail<'a>(&'a mut self, args: &mut LaunchArgs<'a>, status: &'a mut CudaSlice<i32>) {
        match &mut self.work {
            Work::Owned(w) => args.arg(w),
            Work::Lent(w) => args.arg(*w),
            Work::Shared => args.arg(&NULL_WORK),
        };
        args.arg(&self.use_shared).arg(status);
    }
}

fn launch_config(batch: usize, smem: u32) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (i32_of("batch", batch)? as u32, 1, 1),
        block_dim: (BLOCK_THREADS, 1, 1),
        shared_mem_bytes: smem,
    })
}

/// The null device pointer passed as `work` when the workspace is in shared memory.
const NULL_WORK: u64 = 0;

/// Launches `expm_phi1_{f32,f64}`: for every matrix `Z[b]` of the batch, `E[b] = e^{Z[b]}` and
/// `P[b] = φ1(Z[b])` by Padé scaling and squaring (Al-Mohy & Higham 2009 Alg. 3.1/5.1 and the φ1
/// recurrence `φ1(2X) = ½(e^X + I)φ1(X)`; the algorithm of [`crate::linalg::expm`](mod@crate::linalg::expm), mirrored
/// operation by operation). Asynchronous; statuses go to `status[b]`; failed matrices get NaN
/// outputs.
///
/// Shapes: `z` is batch × n × n with 1 ≤ n ≤ [`MAX_N`]; `exp_out`, `phi_out` the same;
/// `status` has at least `batch` entries.
pub fn launch_expm_phi1<T: FloatKernel>(
    dev: &CudaDevice,
    z: &DeviceMatrices<T>,
    exp_out: &mut DeviceMatrices<T>,
    phi_out: &mut DeviceMatrices<T>,
    status: &mut CudaSlice<i32>,
) -> Result<()> {
    launch_expm_phi1_in(dev, z, exp_out, phi_out, status, None)
}

/// [`launch_expm_phi1`] with the work matrices in `work` (batch · 12 · n² entries) when they do
/// not fit in shared memory, so that the launch allocates nothing (the functional calls of
/// [`crate::cuda::ops`]); `None` allocates them as [`launch_expm_phi1`] does.
pub(crate) fn launch_expm_phi1_in<T: FloatKernel>(
    dev: &CudaDevice,
    z: &DeviceMatrices<T>,
    exp_out: &mut DeviceMatrices<T>,
    phi_out: &mut DeviceMatrices<T>,
    status: &mut CudaSlice<i32>,
    work: Option<&CudaSlice<T>>,
) -> Result<()> {
    z.check_device(dev, "z")?;
    exp_out.check_device(dev, "exp_out")?;
    phi_out.check_device(dev, "phi_out")?;
    let n = check_batch_square("z", z)?;
    let batch = z.batch();
    exp_out.check_shape("exp_out", batch, n, n)?;
    phi_out.check_shape("phi_out", batch, n, n)?;
    check_status_len(status, batch)?;
    let mut plan = plan::<T>(dev, batch, n * n, work)?;
    let (n_i, batch_i) = (i32_of("n", n)?, i32_of("batch", batch)?);
    let k = dev.kernels();
    let f = plan.kernel(
        [&k.expm_phi1_f32, &k.expm_phi1_f64],
        [&k.expm_phi1_warp_f32, &k.expm_phi1_warp_f64],
    );
    let cfg = plan.cfg;
    let mut args = dev.stream().launch_builder(f);
    args.arg(z.slice())
        .arg(&n_i)
        .arg(&batch_i)
        .arg(exp_out.slice_mut())
        .arg(phi_out.slice_mut());
    plan.push_tail(&mut args, status);
    // SAFETY: the argument list matches the kernel signature `(const T* z, int n, int batch,
    // T* exp_out, T* phi_out, T* work, int use_shared, int* status)` of both `expm_phi1_{dtype}`
    // and `expm_phi1_warp_{dtype}`, with T the element type of every buffer (kernel picked by
    // T). Team b < batch (a block, or warp b % W of block b / W with blockDim = W·32 ≤ 256 —
    // `plan`) reads z[b·n²..(b+1)·n²], writes the same range of exp_out and phi_out and
    // status[b], all checked above to exist (shapes batch×n×n, status.len() ≥ batch); teams with
    // b ≥ batch in the last block return at once. n ≤ MAX_N bounds the static shared arrays. With
    // use_shared = 1 the W·12·n² work entries are dynamic shared memory of `shared_mem_bytes`,
    // at most the opt-in limit set on every such function at load time, and `work` is null
    // (`bind` in phi1.cu only offsets it when use_shared = 0); otherwise `work` holds
    // batch·12·n² entries (allocated by `plan`, or lent and checked there to be that long). Outputs
    // and a lent `work` do not overlap the input or each other: distinct allocations (Rust
    // borrows), or disjoint regions of one workspace (the layout of `crate::cuda::ops`).
    unsafe { args.launch(cfg) }?;
    Ok(())
}

/// `E[b] = e^{Z[b]}` and `P[b] = φ1(Z[b])` for a device batch ([`launch_expm_phi1`], then
/// synchronise and check the statuses). Errors name the first failing matrix.
pub fn expm_phi1<T: FloatKernel>(
    dev: &CudaDevice,
    z: &DeviceMatrices<T>,
    exp_out: &mut DeviceMatrices<T>,
    phi_out: &mut DeviceMatrices<T>,
) -> Result<()> {
    let mut status = dev.stream().alloc_zeros::<i32>(z.batch())?;
    launch_expm_phi1(dev, z, exp_out, phi_out, &mut status)?;
    check_status(dev, &status, z.batch(), "expm_phi1", "z")
}

/// `(e^Z, φ1(Z))` for each matrix of a host batch.
pub type ExpPhi1<T> = (Vec<DMatrix<T>>, Vec<DMatrix<T>>);

/// Host convenience for [`expm_phi1`]: uploads `zs`, runs the batched kernel, returns
/// `(e^Z, φ1(Z))` per matrix (Prop. 1, eq. 4 needs φ1; the merge needs both).
pub fn expm_phi1_host<T: FloatKernel>(dev: &CudaDevice, zs: &[DMatrix<T>]) -> Result<ExpPhi1<T>> {
    let z = DeviceMatrices::from_host(dev, zs)?;
    let (b, n) = (z.batch(), z.rows());
    let mut e = DeviceMatrices::zeros(dev, b, n, n)?;
    let mut p = DeviceMatrices::zeros(dev, b, n, n)?;
    expm_phi1(dev, &z, &mut e, &mut p)?;
    Ok((e.to_host(dev)?, p.to_host(dev)?))
}

/// Launches `phi1_adjoint_{f32,f64}`: `out[b] = L_φ1(Z[b]ᵀ, G[b])`, the adjoint of the Fréchet
/// derivative of φ1 at `Z[b]` applied to `G[b]` (for a real power series `L_f(X)* = L_f(Xᵀ, ·)`),
/// i.e. the top-right block of `φ1([[Zᵀ, G], [0, Zᵀ]])` computed on block pairs by the same Padé
/// algorithm, with `G` pre-scaled by `2^k ≈ ‖Zᵀ‖₁/‖G‖₁` (DESIGN "Fréchet derivative"; the CPU
/// core's block-pair scheme). This is the reverse-mode step through `M = φ1(Z)` (Prop. 1).
/// Asynchronous; statuses go to `status[b]`; failed matrices get NaN outputs.
///
/// Shapes: `z`, `g`, `out` are batch × n × n with 1 ≤ n ≤ [`MAX_N`].
pub fn launch_phi1_adjoint<T: FloatKernel>(
    dev: &CudaDevice,
    z: &DeviceMatrices<T>,
    g: &DeviceMatrices<T>,
    out: &mut DeviceMatrices<T>,
    status: &mut CudaSlice<i32>,
) -> Result<()> {
    launch_phi1_adjoint_in(dev, z, g, out, status, None)
}

/// [`launch_phi1_adjoint`] with the work matrices in `work` (batch · 12 · 2n² entries) when
/// they do not fit in shared memory (nothing is allocated); `None` allocates them.
pub(crate) fn launch_phi1_adjoint_in<T: FloatKernel>(
    dev: &CudaDevice,
    z: &DeviceMatrices<T>,
    g: &DeviceMatrices<T>,
    out: &mut DeviceMatrices<T>,
    status: &mut CudaSlice<i32>,
    work: Option<&CudaSlice<T>>,
) -> Result<()> {
    z.check_device(dev, "z")?;
    g.check_device(dev, "g")?;
    out.check_device(dev, "out")?;
    let n = check_batch_square("z", z)?;
    let batch = z.batch();
    g.check_shape("g", batch, n, n)?;
    out.check_shape("out", batch, n, n)?;
    check_status_len(status, batch)?;
    let mut plan = plan::<T>(dev, batch, 2 * n * n, work)?;
    let (n_i, batch_i) = (i32_of("n", n)?, i32_of("batch", batch)?);
    let k = dev.kernels();
    let f = plan.kernel(
        [&k.phi1_adjoint_f32, &k.phi1_adjoint_f64],
        [&k.phi1_adjoint_warp_f32, &k.phi1_adjoint_warp_f64],
    );
    let cfg = plan.cfg;
    let mut args = dev.stream().launch_builder(f);
    args.arg(z.slice())
        .arg(g.slice())
        .arg(&n_i)
        .arg(&batch_i)
        .arg(out.slice_mut());
    plan.push_tail(&mut args, status);
    // SAFETY: the argument list matches `(const T* z, const T* g, int n, int batch, T* out,
    // T* work, int use_shared, int* status)` of `phi1_adjoint_{dtype}` and
    // `phi1_adjoint_warp_{dtype}`. Team b < batch (see `plan`) reads z and g at [b·n², (b+1)·n²),
    // writes that range of out and status[b]; shapes and status length were checked above; teams
    // with b ≥ batch return at once. n ≤ MAX_N bounds the static shared arrays (vectors of 2n
    // entries). Work matrices hold 2n² entries (block pairs): W·12·2n² per block in dynamic shared
    // memory of `shared_mem_bytes` (≤ the opt-in limit set at load time) when use_shared = 1, with
    // `work` null and never dereferenced, else `work` holds batch·12·2n² entries (allocated or
    // lent and checked by `plan`; a lent one is a region disjoint from z, g and out).
    unsafe { args.launch(cfg) }?;
    Ok(())
}

/// `out[b] = L_φ1(Z[b]ᵀ, G[b])` for a device batch ([`launch_phi1_adjoint`], then synchronise and
/// check the statuses). Errors name the first failing matrix.
pub fn phi1_adjoint<T: FloatKernel>(
    dev: &CudaDevice,
    z: &DeviceMatrices<T>,
    g: &DeviceMatrices<T>,
    out: &mut DeviceMatrices<T>,
) -> Result<()> {
    let mut status = dev.stream().alloc_zeros::<i32>(z.batch())?;
    launch_phi1_adjoint(dev, z, g, out, &mut status)?;
    check_status(dev, &status, z.batch(), "phi1_adjoint", "z")
}

/// Host convenience for [`phi1_adjoint`]: `L_φ1(Zᵀ, G)` for each pair `(zs[b], gs[b])`.
pub fn phi1_adjoint_host<T: FloatKernel>(
    dev: &CudaDevice,
    zs: &[DMatrix<T>],
    gs: &[DMatrix<T>],
) -> Result<Vec<DMatrix<T>>> {
    if zs.len() != gs.len() {
        return Err(ElraError::invalid(
            "gs",
            format!("{} matrices for {} in zs", gs.len(), zs.len()),
        ));
    }
    let z = DeviceMatrices::from_host(dev, zs)?;
    let g = DeviceMatrices::from_host(dev, gs)?;
    let mut out = DeviceMatrices::zeros(dev, z.batch(), z.rows(), z.cols())?;
    phi1_adjoint(dev, &z, &g, &mut out)?;
    out.to_host(dev)
}

/// Device outputs of [`adapter_grams`] for a batch of adapters `G = A·C` (A d×r, C r×d).
pub struct DeviceGrams<T: DeviceScalar> {
    /// `Z = C·A` (batch × r × r), the Woodbury core of Prop. 1.
    pub z: DeviceMatrices<T>,
    /// `S = AᵀA` (batch × r × r), eq. (21).
    pub s: DeviceMatrices<T>,
    /// `K = CCᵀ` (batch × r × r), eq. (21) (the paper's `BBᵀ` for `C = B`).
    pub k: DeviceMatrices<T>,
    /// `S·K` (batch × r × r): `λmax(SK) = ‖G‖₂²`.
    pub sk: DeviceMatrices<T>,
    /// `tr(S K) = ‖G‖_F²` (batch × 1 × 1), eq. (21c).
    pub energy: DeviceMatrices<T>,
}

/// Host copy of one adapter's [`DeviceGrams`].
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterGrams<T: DeviceScalar> {
    /// `Z = C·A`.
    pub z: DMatrix<T>,
    /// `S = AᵀA`.
    pub s: DMatrix<T>,
    /// `K = CCᵀ`.
    pub k: DMatrix<T>,
    /// `S·K`.
    pub sk: DMatrix<T>,
    /// `tr(SK) = ‖G‖_F²`.
    pub energy: T,
}

impl<T: DeviceScalar> DeviceGrams<T> {
    /// Outputs for `batch` adapters of rank `r`, every entry set to `value` (NaN to poison).
    pub fn filled(dev: &CudaDevice, batch: usize, r: usize, value: T) -> Result<Self> {
        Ok(DeviceGrams {
            z: DeviceMatrices::filled(dev, batch, r, r, value)?,
            s: DeviceMatrices::filled(dev, batch, r, r, value)?,
            k: DeviceMatrices::filled(dev, batch, r, r, value)?,
            sk: DeviceMatrices::filled(dev, batch, r, r, value)?,
            energy: DeviceMatrices::filled(dev, batch, 1, 1, value)?,
        })
    }

    /// Zero-initialised outputs for `batch` adapters of rank `r`.
    pub fn zeros(dev: &CudaDevice, batch: usize, r: usize) -> Result<Self> {
        Self::filled(dev, batch, r, T::default())
    }

    /// Downloads all outputs (synchronises the stream).
    pub fn to_host(&self, dev: &CudaDevice) -> Result<Vec<AdapterGrams<T>>> {
        let z = self.z.to_host(dev)?;
        let s = self.s.to_host(dev)?;
        let k = self.k.to_host(dev)?;
        let sk = self.sk.to_host(dev)?;
        let e = self.energy.to_row_major(dev)?;
        Ok(z.into_iter()
            .zip(s)
            .zip(k)
            .zip(sk)
            .zip(e)
            .map(|((((z, s), k), sk), energy)| AdapterGrams {
                z,
                s,
                k,
                sk,
                energy,
            })
            .collect())
    }
}

/// Launches `adapter_grams_{f32,f64}`: for every adapter b, `Z = C·A`, `S = AᵀA`, `K = CCᵀ`,
/// `SK = S·K` and `energy = tr(SK) = ‖A·C‖_F²` (eq. 21c: ‖G‖_F² from r×r Grams only; `λmax(SK) =
/// ‖G‖₂²`, see [`spectral_norm_sq`]). Dot products of length d accumulate in the input precision
/// with FMA. Asynchronous; statuses go to `status[b]` (non-finite A or C → NaN outputs).
///
/// Shapes: `a` is batch × d × r, `c` is batch × r × d, `out` holds batch adapters of rank r.
pub fn launch_adapter_grams<T: FloatKernel>(
    dev: &CudaDevice,
    a: &DeviceMatrices<T>,
    c: &DeviceMatrices<T>,
    out: &mut DeviceGrams<T>,
    status: &mut CudaSlice<i32>,
) -> Result<()> {
    a.check_device(dev, "a")?;
    c.check_device(dev, "c")?;
    let (batch, d, r) = (a.batch(), a.rows(), a.cols());
    c.check_shape("c", batch, r, d)?;
    out.z.check_device(dev, "out")?;
    out.z.check_shape("out.z", batch, r, r)?;
    out.s.check_shape("out.s", batch, r, r)?;
    out.k.check_shape("out.k", batch, r, r)?;
    out.sk.check_shape("out.sk", batch, r, r)?;
    out.energy.check_shape("out.energy", batch, 1, 1)?;
    for (arg, m) in [
        ("out.s", &out.s),
        ("out.k", &out.k),
        ("out.sk", &out.sk),
        ("out.energy", &out.energy),
    ] {
        m.check_device(dev, arg)?;
    }
    check_status_len(status, batch)?;
    if r.checked_mul(3 * r).is_none_or(|x| x > i32::MAX as usize) {
        return Err(ElraError::invalid(
            "a",
            format!("rank {r} too large for the Gram kernel"),
        ));
    }
    let (d_i, r_i) = (i32_of("d", d)?, i32_of("r", r)?);
    let cfg = launch_config(batch, 0)?;
    let k = dev.kernels();
    let f = pick::<T>(&k.adapter_grams_f32, &k.adapter_grams_f64);
    let mut args = dev.stream().launch_builder(f);
    args.arg(a.slice())
        .arg(c.slice())
        .arg(&d_i)
        .arg(&r_i)
        .arg(out.z.slice_mut())
        .arg(out.s.slice_mut())
        .arg(out.k.slice_mut())
        .arg(out.sk.slice_mut())
        .arg(out.energy.slice_mut())
        .arg(status);
    // SAFETY: the argument list matches `(const T* A, const T* C, int d, int r, T* Z, T* S, T* K,
    // T* SK, T* energy, int* status)`. Grid = batch blocks of BLOCK_THREADS threads; block b reads
    // A and C at [b·d·r, (b+1)·d·r) and writes Z, S, K, SK at [b·r², (b+1)·r²), energy[b] and
    // status[b]; every buffer was checked above to have exactly these shapes (status ≥ batch).
    // 3r² fits the kernel's int indices. The five outputs are distinct allocations (the struct's
    // fields are separate buffers) and distinct from the inputs.
    unsafe { args.launch(cfg) }?;
    Ok(())
}

/// The eq. (21) Grams of a device batch of adapters ([`launch_adapter_grams`], then synchronise
/// and check the statuses). Errors name the first failing adapter.
pub fn adapter_grams<T: FloatKernel>(
    dev: &CudaDevice,
    a: &DeviceMatrices<T>,
    c: &DeviceMatrices<T>,
    out: &mut DeviceGrams<T>,
) -> Result<()> {
    let mut status = dev.stream().alloc_zeros::<i32>(a.batch())?;
    launch_adapter_grams(dev, a, c, out, &mut status)?;
    check_status(dev, &status, a.batch(), "adapter_grams", "a")
}

/// `‖G‖₂² = λmax(S K)` for `G = A C`, from the Grams `S = AᵀA` and `K = CCᵀ` of eq. (21):
/// `‖AC‖₂² = λmax(CᵀAᵀAC) = λmax(S K)` (the non-zero eigenvalues of XY and YX agree), computed as
/// `λmax(S^{1/2} K S^{1/2})`, a symmetric r×r eigenproblem (f64, on the host). Used by the
/// spectral clip `G ← (τ/‖G‖₂) G` (App. H).
pub fn spectral_norm_sq<T: Real>(s: &DMatrix<T>, k: &DMatrix<T>) -> Result<f64> {
    let r = s.nrows();
    if s.shape() != (r, r) || r == 0 {
        return Err(ElraError::shape("s", (r.max(1), r.max(1)), s.shape()));
    }
    if k.shape() != (r, r) {
        return Err(ElraError::shape("k", (r, r), k.shape()));
    }
    crate::linalg::check_finite("s", s)?;
    crate::linalg::check_finite("k", k)?;
    let s64 = DMatrix::<f64>::from_fn(r, r, |i, j| 0.5 * (s[(i, j)].f64() + s[(j, i)].f64()));
    let k64 = DMatrix::<f64>::from_fn(r, r, |i, j| 0.5 * (k[(i, j)].f64() + k[(j, i)].f64()));
    let eig = nalgebra::SymmetricEigen::new(s64);
    // S^{1/2} = Q diag(√max(λ, 0)) Qᵀ (S is PSD; rounding can make tiny eigenvalues negative).
    let sqrt_l = eig.eigenvalues.map(|l| l.max(0.0).sqrt());
    let half = &eig.eigenvectors * DMatrix::from_diagonal(&sqrt_l) * eig.eigenvectors.transpose();
    let m = &half * k64 * &half;
    let m = (&m + m.transpose()) * 0.5;
    let lmax = nalgebra::SymmetricEigen::new(m)
        .eigenvalues
        .iter()
        .fold(0.0f64, |a, &b| a.max(b));
    Ok(lmax)
}
