//! The ELRA layer on the GPU: forward, backward, merge and unmerge of ELRA (general, PSD, Hyb with
//! any α), double-sided ELRA and the LoRA baseline, mirroring [`crate::adapter`] and
//! [`crate::grad`] with activations and `W0` in f32, f16 or bf16 ([`Activation`]) and adapter
//! parameters, r×r matrices and gradients in f32.
//!
//! # One step on the device
//! Parameters, tapes and gradients live in device buffers owned by the layer; a step enqueues
//! kernels on the device's stream and never copies to the host. Per optimiser step
//! ([`GpuElraLayer::prepare`], Algorithm 1 lines 4–5): `Cᵀ = η m (αA + (1−α)Bᵀ)` (eq. 19),
//! `Z = C A` (r×r), optionally the Grams `S = AᵀA`, `K = CCᵀ` (eq. 21, for λ > 0), then one
//! batched launch of the Padé `φ1` kernel for every generator of the layer (both sides of a
//! double-sided layer when their ranks agree). Kernel statuses stay on the device; failed r×r
//! matrices come out as NaN, and [`GpuElraLayer::check_status`] (which synchronises) names them.
//!
//! # Two exact routes ([`Route`])
//! * **Woodbury** (eq. 5): `u = x W0ᵀ` (cuBLAS), then one fused pass over the rows of `u`:
//!   `v = C u`, `t = M v`, `y = u + A t`. Backward: one fused pass over `∂y` gives
//!   `T̄ = ∂y A`, `V̄ = T̄ M` and `ū = ∂y + V̄ C`; `∂x = ū W0` (cuBLAS); two reductions over
//!   rows give `Ā = ∂yᵀ T` and `C̄ = V̄ᵀ u`; `M̄ = T̄ᵀ V` (N×r data).
//! * **Merged** (eq. 30): `P = C W0` (one pass over `W0`), `Q = A M` (d×r),
//!   `W_eff = W0 + Q P` (one pass), `y = x W_effᵀ` (cuBLAS). Backward never forms the dense
//!   `∂W = ∂yᵀ x`: `∂x = ∂y W_eff` (cuBLAS), `s = ∂y Q` and `v = x Pᵀ` (row passes),
//!   `Q̄ = ∂yᵀ v` and `∂P = sᵀ x` (reductions over rows), `C̄ = ∂P W0ᵀ` (a pass over `W0`),
//!   `Ā = Q̄ Mᵀ`, `M̄ = Aᵀ Q̄`.
//!
//! Both then take `Z̄ = L_φ1(Zᵀ, M̄)` (one batched adjoint launch), `Ā += Cᵀ Z̄`,
//! `C̄ += Z̄ Aᵀ`, the energy gradient (eq. 20–21) and the chain through eq. (19) to `(∂A, ∂B, ∂η)`
//! ([`crate::grad::FactorChain::backward`]). [`route_cost`] estimates both routes from the bytes
//! they move and the launches they make; [`choose_route`] picks the cheaper.
//!
//! # Not supported on the GPU (typed errors)
//! The spectral clip τ of App. H (its exact derivative needs an r×r SVD on the device: set
//! `tau = None`, or clip on the host between steps), dropout masks, and ranks above
//! [`MAX_RANK`].
#![allow(non_snake_case)]

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use nalgebra::DMatrix;

use super::kernels::{check_status, launch_expm_phi1, launch_phi1_adjoint};
use super::skinny::{
    col_reduce, col_reduce_scratch, factor_backward, factor_c, merge_apply, rows_fused, small_gemm,
    Activation, FactorBackward, RowPass, SkinnyKernels, View, MAX_RANK,
};
use super::{gemm, CudaDevice, DeviceMatrices, Transpose};
use crate::adapter::GeneratorSpec;
use crate::grad::Route;
use crate::{ElraError, Result};

// ---------------------------------------------------------------------------------------------
// Cost model
// ---------------------------------------------------------------------------------------------

/// Predicted extra cost of each route over the frozen layer (`y = x W0ᵀ`, `∂x = ∂y W0`) for one
/// forward + backward step ([`route_cost`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouteCost {
    /// Extra bytes moved by the Woodbury route's kernels.
    pub woodbury_bytes: f64,
    /// Extra kernel launches of the Woodbury route.
    pub woodbury_launches: usize,
    /// Extra bytes moved by the merged route's kernels.
    pub merged_bytes: f64,
    /// Extra kernel launches of the merged route.
    pub merged_launches: usize,
}

/// Assumed device bandwidth (bytes/s) and per-launch cost (s) of [`RouteCost::seconds`]
/// (H100-class: copy ≈ 3.0 TB/s, a launch ≈ 4 µs on a busy stream; DESIGN "Performance model").
pub const MODEL_BANDWIDTH: f64 = 3.0e12;
/// See [`MODEL_BANDWIDTH`].
pub const MODEL_LAUNCH_S: f64 = 4.0e-6;

impl RouteCost {
    /// `(woodbury, merged)` predicted extra seconds: bytes / [`MODEL_BANDWIDTH`] + launches ·
    /// [`MODEL_LAUNCH_S`].
    pub fn seconds(&self) -> (f64, f64) {
        let t = |b: f64, l: usize| b / MODEL_BANDWIDTH + l as f64 * MODEL_LAUNCH_S;
        (
            t(self.woodbury_bytes, self.woodbury_launches),
            t(self.merged_bytes, self.merged_launches),
        )
    }
}

/// The extra traffic of the two exact routes for `N` rows, `W0` d×k, rank r and activations of
/// `elem_bytes` bytes, counting only the N×d, N×k and d×k passes (the N×r, d×r and r×r data and
/// the r×r launches are the same for both or negligible):
///
/// * Woodbury: forward reads and writes `u` (2Nd); backward reads `∂y` and writes `ū` (2Nd), and
///   reads `∂y` and `u` once more for `Ā`, `C̄` (2Nd): 6Nd elements, 5 launches.
/// * Merged: forward reads `W0` for `P` (dk), reads `W0` and writes `W_eff` (2dk); backward reads
///   `∂y` twice (`s`, `Q̄`: 2Nd), `x` twice (`v`, `∂P`: 2Nk) and `W0` once (`C̄`: dk):
///   4dk + 2N(d+k) elements, 10 launches.
pub fn route_cost(n: usize, d: usize, k: usize, r: usize, elem_bytes: usize) -> RouteCost {
    let (n, d, k, b) = (n as f64, d as f64, k as f64, elem_bytes as f64);
    let _ = r;
    RouteCost {
        woodbury_bytes: 6.0 * n * d * b,
        woodbury_launches: 5,
        merged_bytes: (4.0 * d * k + 2.0 * n * (d + k)) * b,
        merged_launches: 10,
    }
}

/// The cheaper exact route by [`route_cost`] (ties go to Woodbury, which keeps `W0` untouched).
pub fn choose_route(n: usize, d: usize, k: usize, r: usize, elem_bytes: usize) -> Route {
    let (w, m) = route_cost(n, d, k, r, elem_bytes).seconds();
    if m < w {
        Route::Merged
    } else {
        Route::Woodbury
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn upload(dev: &CudaDevice, m: &DMatrix<f32>) -> Result<CudaSlice<f32>> {
    let mut host = Vec::with_capacity(m.len());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            host.push(m[(i, j)]);
        }
    }
    Ok(dev.stream().clone_htod(&host)?)
}

fn download(
    dev: &CudaDevice,
    s: &CudaSlice<f32>,
    rows: usize,
    cols: usize,
) -> Result<DMatrix<f32>> {
    let v = dev.stream().clone_dtoh(s)?;
    dev.synchronize()?;
    Ok(DMatrix::from_row_slice(rows, cols, &v[..rows * cols]))
}

fn zeros(dev: &CudaDevice, len: usize) -> Result<CudaSlice<f32>> {
    Ok(dev.stream().alloc_zeros::<f32>(len.max(1))?)
}

/// Grows `slot` to at least `len` entries (never shrinks, so memory is flat across steps).
fn ensure(dev: &CudaDevice, slot: &mut Option<CudaSlice<f32>>, len: usize) -> Result<()> {
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = Some(zeros(dev, len)?);
    }
    Ok(())
}

/// Grows an activation buffer to at least `rows × cols` (reallocated when the shape changes).
fn ensure_mat<T: Activation>(
    dev: &CudaDevice,
    slot: &mut Option<DeviceMatrices<T>>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    if slot
        .as_ref()
        .is_none_or(|m| (m.rows(), m.cols()) != (rows, cols))
    {
        *slot = Some(DeviceMatrices::zeros(dev, 1, rows, cols)?);
    }
    Ok(())
}

fn got<T>(slot: &Option<T>) -> Result<&T> {
    slot.as_ref()
        .ok_or_else(|| ElraError::invalid("self", "buffer not allocated (call forward first)"))
}

fn check_act<T: Activation>(
    dev: &CudaDevice,
    arg: &'static str,
    m: &DeviceMatrices<T>,
    rows: Option<usize>,
    cols: usize,
) -> Result<usize> {
    m.check_device(dev, arg)?;
    let n = rows.unwrap_or(m.rows());
    m.check_shape(arg, 1, n, cols)?;
    Ok(n)
}

fn mat<T: Activation>(m: &DeviceMatrices<T>) -> View<'_, T> {
    View::mat(m.slice(), m.rows(), m.cols())
}

fn f32_to<T: Activation>(m: &DMatrix<f64>) -> Vec<T> {
    let mut v = Vec::with_capacity(m.len());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            v.push(T::from_f64(m[(i, j)]));
        }
    }
    v
}

/// Uploads a host matrix (any precision that widens to f64) as a 1×rows×cols activation buffer,
/// rounding each entry to `T`.
pub fn upload_matrix<T: Activation>(
    dev: &CudaDevice,
    m: &DMatrix<f64>,
) -> Result<DeviceMatrices<T>> {
    DeviceMatrices::from_row_major(dev, 1, m.nrows(), m.ncols(), &f32_to::<T>(m))
}

/// Downloads a 1×rows×cols activation buffer as f64 (synchronises).
pub fn download_matrix<T: Activation>(
    dev: &CudaDevice,
    m: &DeviceMatrices<T>,
) -> Result<DMatrix<f64>> {
    let v = m.to_row_major(dev)?;
    Ok(DMatrix::from_row_slice(
        m.rows(),
        m.cols(),
        &v[..m.rows() * m.cols()]
            .iter()
            .map(|x| x.to_f64())
            .collect::<Vec<_>>(),
    ))
}

// ---------------------------------------------------------------------------------------------
// Generators and their r×r batch
// ---------------------------------------------------------------------------------------------

/// Per-step settings of a generator on the GPU: α of eq. (19), the η multiplier and λ of
/// eq. (20). [`GeneratorSpec`] minus the clip, which the GPU layer does not support.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GpuSpec {
    /// α ∈ [0, 1]: 0 general, 1 PSD, the schedule's value for Hyb (eq. 19).
    pub alpha: f64,
    /// The η multiplier `m(t)` > 0 (App. H).
    pub eta_mult: f64,
    /// Energy-penalty weight λ ≥ 0 (eq. 20).
    pub lambda: f64,
}

impl GpuSpec {
    /// From a CPU [`GeneratorSpec`]; errors when it asks for the spectral clip.
    pub fn from_spec(spec: &GeneratorSpec) -> Result<Self> {
        if spec.tau.is_some() {
            return Err(ElraError::invalid(
                "tau",
                "the GPU layer has no spectral clip (App. H); use tau = None",
            ));
        }
        let s = GpuSpec {
            alpha: spec.alpha,
            eta_mult: spec.eta_mult,
            lambda: spec.lambda,
        };
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(ElraError::invalid(
                "alpha",
                format!("must lie in [0, 1], got {}", self.alpha),
            ));
        }
        if !self.eta_mult.is_finite() || self.eta_mult <= 0.0 {
            return Err(ElraError::invalid("eta_mult", "must be finite and > 0"));
        }
        if !self.lambda.is_finite() || self.lambda < 0.0 {
            return Err(ElraError::invalid("lambda", "must be finite and ≥ 0"));
        }
        Ok(())
    }
}

/// One generator `G = A C` (A n×r) on the device with its gradients.
struct Gen {
    n: usize,
    r: usize,
    a: CudaSlice<f32>,
    b: Option<CudaSlice<f32>>,
    eta: CudaSlice<f32>,
    /// `Cᵀ` (n×r).
    ct: CudaSlice<f32>,
    /// Grams `S = AᵀA`, `K = CCᵀ` (r×r), computed when λ > 0 or on demand.
    s: CudaSlice<f32>,
    k: CudaSlice<f32>,
    abar: CudaSlice<f32>,
    cbar_t: CudaSlice<f32>,
    bbar: Option<CudaSlice<f32>>,
    etabar: CudaSlice<f32>,
    /// Which r×r batch and slot hold this generator's Z, M, M̄, Z̄.
    group: usize,
    slot: usize,
}

#[allow(clippy::too_many_arguments)]
fn check_factors(
    n: usize,
    r: usize,
    a: &DMatrix<f32>,
    b: Option<&DMatrix<f32>>,
    eta: f32,
    spec: &GpuSpec,
    a_arg: &'static str,
    b_arg: &'static str,
) -> Result<()> {
    if r == 0 || r > MAX_RANK {
        return Err(ElraError::invalid(
            a_arg,
            format!("rank must be 1..={MAX_RANK}, got {r}"),
        ));
    }
    if a.shape() != (n, r) {
        return Err(ElraError::shape(a_arg, (n, r), a.shape()));
    }
    if a.iter().any(|x| !x.is_finite()) {
        return Err(ElraError::invalid(a_arg, "contains NaN or ±Inf"));
    }
    match b {
        Some(b) => {
            if b.shape() != (r, n) {
                return Err(ElraError::shape(b_arg, (r, n), b.shape()));
            }
            if b.iter().any(|x| !x.is_finite()) {
                return Err(ElraError::invalid(b_arg, "contains NaN or ±Inf"));
            }
        }
        None if spec.alpha < 1.0 => {
            return Err(ElraError::invalid(b_arg, "α < 1 needs the factor B (r×n)"))
        }
        None => {}
    }
    if !eta.is_finite() || eta <= 0.0 {
        return Err(ElraError::invalid(
            "eta",
            format!("must be finite and > 0, got {eta}"),
        ));
    }
    Ok(())
}

impl Gen {
    fn new(
        dev: &CudaDevice,
        a: &DMatrix<f32>,
        b: Option<&DMatrix<f32>>,
        eta: f32,
        group: usize,
        slot: usize,
    ) -> Result<Self> {
        let (n, r) = a.shape();
        Ok(Gen {
            n,
            r,
            a: upload(dev, a)?,
            b: b.map(|b| upload(dev, b)).transpose()?,
            eta: dev.stream().clone_htod(&[eta])?,
            ct: zeros(dev, n * r)?,
            s: zeros(dev, r * r)?,
            k: zeros(dev, r * r)?,
            abar: zeros(dev, n * r)?,
            cbar_t: zeros(dev, n * r)?,
            bbar: if b.is_some() {
                Some(zeros(dev, n * r)?)
            } else {
                None
            },
            etabar: zeros(dev, 1)?,
            group,
            slot,
        })
    }

    fn a(&self) -> View<'_, f32> {
        View::mat(&self.a, self.n, self.r)
    }
    fn ct(&self) -> View<'_, f32> {
        View::mat(&self.ct, self.n, self.r)
    }
    fn abar(&self) -> View<'_, f32> {
        View::mat(&self.abar, self.n, self.r)
    }
    fn cbar_t(&self) -> View<'_, f32> {
        View::mat(&self.cbar_t, self.n, self.r)
    }

    /// The largest scratch the generator's own reductions need.
    fn scratch_need(&self) -> usize {
        col_reduce_scratch(self.n, self.r, self.r)
    }

    /// `Cᵀ` (eq. 19), `Z = C A` into its batch slot, and the Grams when asked.
    fn prepare(
        &self,
        dev: &CudaDevice,
        kern: &SkinnyKernels,
        spec: &GpuSpec,
        z: View<'_, f32>,
        grams: bool,
        scratch: &CudaSlice<f32>,
    ) -> Result<()> {
        let b = self.b.as_ref().filter(|_| spec.alpha < 1.0);
        factor_c(
            dev,
            kern,
            self.a(),
            b.map(|b| View::mat(b, self.r, self.n)),
            View::mat(&self.eta, 1, 1),
            spec.eta_mult as f32,
            spec.alpha as f32,
            self.ct(),
        )?;
        // Z[p, q] = Σ_l C[p, l] A[l, q] = Σ_l Cᵀ[l, p] A[l, q].
        col_reduce::<f32>(dev, kern, self.ct(), self.a(), 1.0, 0.0, z, scratch)?;
        if grams {
            self.grams(dev, kern, scratch)?;
        }
        Ok(())
    }

    fn grams(
        &self,
        dev: &CudaDevice,
        kern: &SkinnyKernels,
        scratch: &CudaSlice<f32>,
    ) -> Result<()> {
        let r = self.r;
        col_reduce::<f32>(
            dev,
            kern,
            self.a(),
            self.a(),
            1.0,
            0.0,
            View::mat(&self.s, r, r),
            scratch,
        )?;
        col_reduce::<f32>(
            dev,
            kern,
            self.ct(),
            self.ct(),
            1.0,
            0.0,
            View::mat(&self.k, r, r),
            scratch,
        )
    }

    /// `Ā += Cᵀ Z̄`, `C̄ += Z̄ Aᵀ` (through φ1, Z = CA), then energy and chain to (∂A, ∂B, ∂η).
    fn finish(
        &self,
        dev: &CudaDevice,
        kern: &SkinnyKernels,
        spec: &GpuSpec,
        zbar: View<'_, f32>,
    ) -> Result<()> {
        small_gemm(dev, kern, 1.0, self.ct(), zbar, 1.0, self.abar())?;
        small_gemm(dev, kern, 1.0, self.a(), zbar.t(), 1.0, self.cbar_t())?;
        let r = self.r;
        factor_backward(
            dev,
            kern,
            &FactorBackward {
                a: self.a(),
                ct: self.ct(),
                s: View::mat(&self.s, r, r),
                k: View::mat(&self.k, r, r),
                lambda: spec.lambda as f32,
                alpha: spec.alpha as f32,
                eta: View::mat(&self.eta, 1, 1),
                mult: spec.eta_mult as f32,
                abar: self.abar(),
                cbar_t: self.cbar_t(),
                bbar: self.bbar.as_ref().map(|b| View::mat(b, self.r, self.n)),
                etabar: View::mat(&self.etabar, 1, 1),
            },
        )
    }

    /// Forward row pass of `exp(A C)` on rows (eq. 5): `out = in + A M C in`, keeping `v`, `t`.
    #[allow(clippy::too_many_arguments)]
    fn rows_forward<T: Activation>(
        &self,
        dev: &CudaDevice,
        kern: &SkinnyKernels,
        m: View<'_, f32>,
        input: View<'_, T>,
        out: View<'_, T>,
        v: View<'_, f32>,
        t: View<'_, f32>,
    ) -> Result<()> {
        rows_fused(
            dev,
            kern,
            &RowPass {
                input,
                base: Some(input),
                out: Some(out),
                cm: self.ct().t(),
                mm: Some(m),
                m_scale: 1.0,
                am: Some(self.a()),
                v_out: Some(v),
                t_out: Some(t),
            },
        )
    }

    /// Reverse mode of [`Self::rows_forward`] ([`crate::grad::rows`]): `T̄ = Ȳ A`, `V̄ = T̄ M`,
    /// `X̄ = Ȳ + V̄ C` (one pass), `Ā = Ȳᵀ T`, `C̄ = V̄ᵀ X` (reductions over rows) and
    /// `M̄ = T̄ᵀ V` into `mbar`.
    #[allow(clippy::too_many_arguments)]
    fn rows_backward<T: Activation>(
        &self,
        dev: &CudaDevice,
        kern: &SkinnyKernels,
        m: View<'_, f32>,
        x: View<'_, T>,
        ybar: View<'_, T>,
        xbar: View<'_, T>,
        v: View<'_, f32>,
        t: View<'_, f32>,
        tbar: View<'_, f32>,
        vbar: View<'_, f32>,
        mbar: View<'_, f32>,
        scratch: &CudaSlice<f32>,
    ) -> Result<()> {
        rows_fused(
            dev,
            kern,
            &RowPass {
                input: ybar,
                base: Some(ybar),
                out: Some(xbar),
                cm: self.a().t(),
                mm: Some(m.t()),
                m_scale: 1.0,
                am: Some(self.ct()),
                v_out: Some(tbar),
                t_out: Some(vbar),
            },
        )?;
        col_reduce(dev, kern, ybar, t, 1.0, 0.0, self.abar(), scratch)?;
        col_reduce(dev, kern, x, vbar, 1.0, 0.0, self.cbar_t(), scratch)?;
        col_reduce::<f32>(dev, kern, tbar, v, 1.0, 0.0, mbar, scratch)
    }

    fn grads_host(&self, dev: &CudaDevice) -> Result<GpuGrads> {
        Ok(GpuGrads {
            a: download(dev, &self.abar, self.n, self.r)?,
            b: self
                .bbar
                .as_ref()
                .map(|b| download(dev, b, self.r, self.n))
                .transpose()?,
            eta: download(dev, &self.etabar, 1, 1)?[(0, 0)],
        })
    }
}

/// The r×r matrices of a batch of generators of one rank: `Z`, `e^Z`, `M = φ1(Z)`, `M̄`, `Z̄`,
/// and the statuses of the forward and adjoint launches.
struct RrBatch {
    z: DeviceMatrices<f32>,
    e: DeviceMatrices<f32>,
    m: DeviceMatrices<f32>,
    mbar: DeviceMatrices<f32>,
    zbar: DeviceMatrices<f32>,
    status_fwd: CudaSlice<i32>,
    status_bwd: CudaSlice<i32>,
    ran_bwd: bool,
}

impl RrBatch {
    fn new(dev: &CudaDevice, batch: usize, r: usize) -> Result<Self> {
        Ok(RrBatch {
            z: DeviceMatrices::zeros(dev, batch, r, r)?,
            e: DeviceMatrices::zeros(dev, batch, r, r)?,
            m: DeviceMatrices::zeros(dev, batch, r, r)?,
            mbar: DeviceMatrices::zeros(dev, batch, r, r)?,
            zbar: DeviceMatrices::zeros(dev, batch, r, r)?,
            status_fwd: dev.stream().alloc_zeros::<i32>(batch)?,
            status_bwd: dev.stream().alloc_zeros::<i32>(batch)?,
            ran_bwd: false,
        })
    }
    fn slot<'a>(m: &'a DeviceMatrices<f32>, slot: usize) -> View<'a, f32> {
        let r = m.rows();
        View::at(m.slice(), slot * r * r, r, r)
    }
    fn phi(&mut self, dev: &CudaDevice) -> Result<()> {
        launch_expm_phi1(dev, &self.z, &mut self.e, &mut self.m, &mut self.status_fwd)
    }
    fn adjoint(&mut self, dev: &CudaDevice) -> Result<()> {
        self.ran_bwd = true;
        launch_phi1_adjoint(
            dev,
            &self.z,
            &self.mbar,
            &mut self.zbar,
            &mut self.status_bwd,
        )
    }
    fn check(&self, dev: &CudaDevice) -> Result<()> {
        check_status(
            dev,
            &self.status_fwd,
            self.z.batch(),
            "phi1(Z) of the layer",
            "z",
        )?;
        if self.ran_bwd {
            check_status(
                dev,
                &self.status_bwd,
                self.z.batch(),
                "phi1 adjoint of the layer",
                "z",
            )?;
        }
        Ok(())
    }
}

/// Gradients of one generator downloaded to the host.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuGrads {
    /// `∂L/∂A` (n×r).
    pub a: DMatrix<f32>,
    /// `∂L/∂B` (r×n); `None` for ELRA-PSD.
    pub b: Option<DMatrix<f32>>,
    /// `∂L/∂η`.
    pub eta: f32,
}

// ---------------------------------------------------------------------------------------------
// Single-sided ELRA
// ---------------------------------------------------------------------------------------------

/// Activation tapes and scratch of a single-sided layer for one batch size.
struct Tape<T: Activation> {
    n: usize,
    route: Option<Route>,
    /// Woodbury: `u = x W0ᵀ` (N×d); `ū` in the backward (N×d).
    u: Option<DeviceMatrices<T>>,
    ubar: Option<DeviceMatrices<T>>,
    /// Merged: `W_eff` (d×k).
    weff: Option<DeviceMatrices<T>>,
    /// N×r f32: v, t, T̄ (or s), V̄ (or v of the merged backward).
    v: Option<CudaSlice<f32>>,
    t: Option<CudaSlice<f32>>,
    tbar: Option<CudaSlice<f32>>,
    vbar: Option<CudaSlice<f32>>,
    /// Merged: `Pᵀ` (k×r), `Q = A M` (d×r), `Q̄` (d×r), `∂Pᵀ` (k×r).
    pt: Option<CudaSlice<f32>>,
    q: Option<CudaSlice<f32>>,
    qbar: Option<CudaSlice<f32>>,
    pbar_t: Option<CudaSlice<f32>>,
    scratch: Option<CudaSlice<f32>>,
}

impl<T: Activation> Tape<T> {
    fn new() -> Self {
        Tape {
            n: 0,
            route: None,
            u: None,
            ubar: None,
            weff: None,
            v: None,
            t: None,
            tbar: None,
            vbar: None,
            pt: None,
            q: None,
            qbar: None,
            pbar_t: None,
            scratch: None,
        }
    }
}

/// The single-sided ELRA layer on the GPU: `y = x W_newᵀ`, `W_new = exp(A C) W0` (eq. 3, 5, 30)
/// for general (α = 0), PSD (α = 1, no `B`) and Hyb (any α) generators (eq. 19).
///
/// Typical step: [`Self::forward`] (prepares the r×r work when the parameters changed), then
/// [`Self::backward`]; the gradients stay on the device ([`Self::grad_slices`]) for a device-side
/// optimiser that writes the parameters through [`Self::params_mut`].
pub struct GpuElraLayer<T: Activation> {
    kern: Arc<SkinnyKernels>,
    ordinal: usize,
    d: usize,
    k: usize,
    w0: DeviceMatrices<T>,
    gen: Gen,
    spec: GpuSpec,
    rr: RrBatch,
    rr_neg: Option<RrBatch>,
    prepared: bool,
    tape: Tape<T>,
}

impl<T: Activation> std::fmt::Debug for GpuElraLayer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuElraLayer")
            .field("dtype", &T::DTYPE)
            .field("d", &self.d)
            .field("k", &self.k)
            .field("r", &self.gen.r)
            .field("spec", &self.spec)
            .finish()
    }
}

impl<T: Activation> GpuElraLayer<T> {
    /// A layer with frozen `w0` (d×k on `dev`), factors `A` (d×r), `B` (r×d; `None` for PSD,
    /// required when α < 1), step size η and the per-step [`GpuSpec`] (eq. 2, §4.2.1, eq. 19).
    ///
    /// Errors: shapes, r outside 1..=[`MAX_RANK`], non-finite factors, η ≤ 0, spec out of range.
    pub fn new(
        dev: &CudaDevice,
        w0: DeviceMatrices<T>,
        a: &DMatrix<f32>,
        b: Option<&DMatrix<f32>>,
        eta: f32,
        spec: GpuSpec,
    ) -> Result<Self> {
        spec.validate()?;
        w0.check_device(dev, "w0")?;
        if w0.batch() != 1 {
            return Err(ElraError::invalid("w0", "must be a single matrix"));
        }
        let (d, k) = (w0.rows(), w0.cols());
        check_factors(d, a.ncols(), a, b, eta, &spec, "a", "b")?;
        let r = a.ncols();
        Ok(GpuElraLayer {
            kern: SkinnyKernels::get(dev)?,
            ordinal: dev.ordinal(),
            d,
            k,
            w0,
            gen: Gen::new(dev, a, b, eta, 0, 0)?,
            spec,
            rr: RrBatch::new(dev, 1, r)?,
            rr_neg: None,
            prepared: false,
            tape: Tape::new(),
        })
    }

    /// The GPU copy of a CPU [`crate::adapter::ElraLayer`] at its current step: `W0` rounded to
    /// `T`, `A`, `B`, η, α of its variant and schedule, the η multiplier and λ
    /// ([`crate::adapter::ElraLayer::spec`]). Errors when the layer uses the spectral clip.
    pub fn from_layer(dev: &CudaDevice, layer: &crate::adapter::ElraLayer<f32>) -> Result<Self> {
        let spec = GpuSpec::from_spec(&layer.spec())?;
        let w0 = upload_matrix::<T>(dev, &layer.w0().map(|x| x as f64))?;
        Self::new(dev, w0, layer.a(), layer.b(), layer.eta(), spec)
    }

    /// `(d, k, r)`.
    pub fn dims(&self) -> (usize, usize, usize) {
        (self.d, self.k, self.gen.r)
    }

    /// The frozen weight on the device.
    pub fn w0(&self) -> &DeviceMatrices<T> {
        &self.w0
    }

    /// The per-step settings.
    pub fn spec(&self) -> GpuSpec {
        self.spec
    }

    /// Sets α, the η multiplier and λ for the next step (e.g. the Hyb schedule, eq. 19).
    pub fn set_spec(&mut self, spec: GpuSpec) -> Result<()> {
        spec.validate()?;
        if spec.alpha < 1.0 && self.gen.b.is_none() {
            return Err(ElraError::invalid(
                "alpha",
                "α < 1 needs the factor B, which this layer lacks",
            ));
        }
        self.spec = spec;
        self.prepared = false;
        Ok(())
    }

    /// Replaces `A`, `B`, η from the host (same shapes as at construction).
    pub fn set_params(
        &mut self,
        dev: &CudaDevice,
        a: &DMatrix<f32>,
        b: Option<&DMatrix<f32>>,
        eta: f32,
    ) -> Result<()> {
        self.check_dev(dev)?;
        check_factors(self.d, self.gen.r, a, b, eta, &self.spec, "a", "b")?;
        if b.is_some() != self.gen.b.is_some() {
            return Err(ElraError::invalid(
                "b",
                "must be given exactly when the layer has B",
            ));
        }
        self.gen.a = upload(dev, a)?;
        if let Some(b) = b {
            self.gen.b = Some(upload(dev, b)?);
        }
        self.gen.eta = dev.stream().clone_htod(&[eta])?;
        self.prepared = false;
        Ok(())
    }

    /// Device parameters `(A d×r, B r×d, η)` for an optimiser on the device. The r×r work is
    /// redone before the next forward.
    pub fn params_mut(
        &mut self,
    ) -> (
        &mut CudaSlice<f32>,
        Option<&mut CudaSlice<f32>>,
        &mut CudaSlice<f32>,
    ) {
        self.prepared = false;
        (&mut self.gen.a, self.gen.b.as_mut(), &mut self.gen.eta)
    }

    /// Device parameters `(A d×r, B r×d, η)`, for reading (e.g. to download them).
    pub fn params(&self) -> (&CudaSlice<f32>, Option<&CudaSlice<f32>>, &CudaSlice<f32>) {
        (&self.gen.a, self.gen.b.as_ref(), &self.gen.eta)
    }

    /// Device gradients `(∂A d×r, ∂B r×d, ∂η)` of the last [`Self::backward`].
    pub fn grad_slices(&self) -> (&CudaSlice<f32>, Option<&CudaSlice<f32>>, &CudaSlice<f32>) {
        (&self.gen.abar, self.gen.bbar.as_ref(), &self.gen.etabar)
    }

    /// The gradients of the last [`Self::backward`], downloaded (synchronises).
    pub fn grads(&self, dev: &CudaDevice) -> Result<GpuGrads> {
        self.check_dev(dev)?;
        self.gen.grads_host(dev)
    }

    /// Overwrites the gradient buffers with `value` (tests poison them with NaN).
    pub fn fill_grads(&mut self, dev: &CudaDevice, value: f32) -> Result<()> {
        let g = &mut self.gen;
        for s in [&mut g.abar, &mut g.cbar_t, &mut g.etabar]
            .into_iter()
            .chain(g.bbar.as_mut())
        {
            let len = s.len();
            dev.stream().memcpy_htod(&vec![value; len], s)?;
        }
        Ok(())
    }

    fn check_dev(&self, dev: &CudaDevice) -> Result<()> {
        if dev.ordinal() != self.ordinal {
            return Err(ElraError::invalid(
                "dev",
                "the layer lives on another device",
            ));
        }
        Ok(())
    }

    fn scratch_need(&self, n: usize) -> usize {
        let (d, k, r) = (self.d, self.k, self.gen.r);
        [
            col_reduce_scratch(n, d, r),
            col_reduce_scratch(n, k, r),
            col_reduce_scratch(d, k, r),
            col_reduce_scratch(n, r, r),
            col_reduce_scratch(d, r, r),
            self.gen.scratch_need(),
        ]
        .into_iter()
        .max()
        .unwrap_or(1)
    }

    fn ensure_scratch(&mut self, dev: &CudaDevice, n: usize) -> Result<()> {
        let need = self.scratch_need(n);
        ensure(dev, &mut self.tape.scratch, need)
    }

    /// The r×r work of a step (Algorithm 1 lines 4–5): `C` (eq. 19), `Z = CA`, the Grams when
    /// λ > 0, and `M = φ1(Z)` in one batched launch (Prop. 1). Asynchronous.
    pub fn prepare(&mut self, dev: &CudaDevice) -> Result<()> {
        self.check_dev(dev)?;
        self.ensure_scratch(dev, 1)?;
        let scratch = got(&self.tape.scratch)?;
        let z = RrBatch::slot(&self.rr.z, self.gen.slot);
        self.gen.prepare(
            dev,
            &self.kern,
            &self.spec,
            z,
            self.spec.lambda > 0.0,
            scratch,
        )?;
        self.rr.phi(dev)?;
        self.prepared = true;
        Ok(())
    }

    /// Reads the statuses of the r×r launches (synchronises): errors name a non-finite `Z`,
    /// an overflow of φ1, of its adjoint, or of `φ1(−Z)` of the last unmerge.
    pub fn check_status(&self, dev: &CudaDevice) -> Result<()> {
        self.rr.check(dev)?;
        match &self.rr_neg {
            Some(neg) => check_status(dev, &neg.status_fwd, 1, "phi1(−Z) of the unmerge", "z"),
            None => Ok(()),
        }
    }

    /// `‖G‖²_F = tr((AᵀA)(CCᵀ))` of the effective generator (eq. 21), from r×r Grams
    /// (synchronises).
    pub fn generator_frobenius_sq(&mut self, dev: &CudaDevice) -> Result<f64> {
        if !self.prepared {
            self.prepare(dev)?;
        }
        let scratch = got(&self.tape.scratch)?;
        self.gen.grams(dev, &self.kern, scratch)?;
        let r = self.gen.r;
        let s = download(dev, &self.gen.s, r, r)?;
        let k = download(dev, &self.gen.k, r, r)?;
        Ok((0..r)
            .flat_map(|i| (0..r).map(move |j| (i, j)))
            .map(|(i, j)| s[(i, j)] as f64 * k[(j, i)] as f64)
            .sum())
    }

    /// `W_eff = W0 + (A M)(C W0)` into `self.tape.weff` (eq. 30), keeping `Pᵀ` and `Q = A M`.
    fn build_weff(&mut self, dev: &CudaDevice) -> Result<()> {
        let (d, k, r) = (self.d, self.k, self.gen.r);
        ensure(dev, &mut self.tape.pt, k * r)?;
        ensure(dev, &mut self.tape.q, d * r)?;
        ensure_mat(dev, &mut self.tape.weff, d, k)?;
        let t = &self.tape;
        let scratch = got(&t.scratch)?;
        let pt = View::mat(got(&t.pt)?, k, r);
        let q = View::mat(got(&t.q)?, d, r);
        let m = RrBatch::slot(&self.rr.m, self.gen.slot);
        col_reduce(
            dev,
            &self.kern,
            mat(&self.w0),
            self.gen.ct(),
            1.0,
            0.0,
            pt,
            scratch,
        )?;
        small_gemm(dev, &self.kern, 1.0, self.gen.a(), m, 0.0, q)?;
        let weff = got(&t.weff)?;
        merge_apply(dev, &self.kern, mat(&self.w0), mat(weff), 1.0, q, pt.t())
    }

    /// `y = x W_newᵀ` (eq. 3) on `route` for `x` (N×k) into `y` (N×d), keeping the tape for
    /// [`Self::backward`]: Woodbury (eq. 5: cuBLAS then one fused row pass) or merged (eq. 30:
    /// `W_eff` then one cuBLAS GEMM). Prepares the r×r work first when the parameters changed.
    /// Asynchronous.
    pub fn forward(
        &mut self,
        dev: &CudaDevice,
        x: &DeviceMatrices<T>,
        y: &mut DeviceMatrices<T>,
        route: Route,
    ) -> Result<()> {
        self.check_dev(dev)?;
        let n = check_act(dev, "x", x, None, self.k)?;
        check_act(dev, "y", y, Some(n), self.d)?;
        if !self.prepared {
            self.prepare(dev)?;
        }
        self.ensure_scratch(dev, n)?;
        let r = self.gen.r;
        ensure(dev, &mut self.tape.v, n * r)?;
        ensure(dev, &mut self.tape.t, n * r)?;
        self.tape.n = n;
        self.tape.route = Some(route);
        match route {
            Route::Woodbury => {
                ensure_mat(dev, &mut self.tape.u, n, self.d)?;
                let u = self
                    .tape
                    .u
                    .as_mut()
                    .ok_or_else(|| ElraError::Cuda("tape".into()))?;
                gemm(dev, 1.0, x, Transpose::No, &self.w0, Transpose::Yes, 0.0, u)?;
                let t = &self.tape;
                let m = RrBatch::slot(&self.rr.m, self.gen.slot);
                self.gen.rows_forward(
                    dev,
                    &self.kern,
                    m,
                    mat(got(&t.u)?),
                    mat(y),
                    View::mat(got(&t.v)?, n, r),
                    View::mat(got(&t.t)?, n, r),
                )
            }
            Route::Merged => {
                self.build_weff(dev)?;
                gemm(
                    dev,
                    1.0,
                    x,
                    Transpose::No,
                    got(&self.tape.weff)?,
                    Transpose::Yes,
                    0.0,
                    y,
                )
            }
        }
    }

    /// Reverse mode of the last [`Self::forward`] (same `x`): `∂x` (N×k) into `dx` and the
    /// gradients of `(A, B, η)` including `λ‖G‖²_F` (eq. 20) into the layer's gradient buffers,
    /// through the forward's route (module docs; [`crate::grad::elra_backward_parts`] without
    /// the clip). Asynchronous.
    pub fn backward(
        &mut self,
        dev: &CudaDevice,
        x: &DeviceMatrices<T>,
        dy: &DeviceMatrices<T>,
        dx: &mut DeviceMatrices<T>,
    ) -> Result<()> {
        self.check_dev(dev)?;
        let route = self
            .tape
            .route
            .ok_or_else(|| ElraError::invalid("self", "backward before forward"))?;
        let n = self.tape.n;
        check_act(dev, "x", x, Some(n), self.k)?;
        check_act(dev, "dy", dy, Some(n), self.d)?;
        check_act(dev, "dx", dx, Some(n), self.k)?;
        let (d, k, r) = (self.d, self.k, self.gen.r);
        ensure(dev, &mut self.tape.tbar, n * r)?;
        ensure(dev, &mut self.tape.vbar, n * r)?;
        let slot = self.gen.slot;
        match route {
            Route::Woodbury => {
                ensure_mat(dev, &mut self.tape.ubar, n, d)?;
                let t = &self.tape;
                let scratch = got(&t.scratch)?;
                let m = RrBatch::slot(&self.rr.m, slot);
                self.gen.rows_backward(
                    dev,
                    &self.kern,
                    m,
                    mat(got(&t.u)?),
                    mat(dy),
                    mat(got(&t.ubar)?),
                    View::mat(got(&t.v)?, n, r),
                    View::mat(got(&t.t)?, n, r),
                    View::mat(got(&t.tbar)?, n, r),
                    View::mat(got(&t.vbar)?, n, r),
                    RrBatch::slot(&self.rr.mbar, slot),
                    scratch,
                )?;
                gemm(
                    dev,
                    1.0,
                    got(&t.ubar)?,
                    Transpose::No,
                    &self.w0,
                    Transpose::No,
                    0.0,
                    dx,
                )?;
            }
            Route::Merged => {
                ensure(dev, &mut self.tape.qbar, d * r)?;
                ensure(dev, &mut self.tape.pbar_t, k * r)?;
                let t = &self.tape;
                let scratch = got(&t.scratch)?;
                let kern = &self.kern;
                gemm(
                    dev,
                    1.0,
                    dy,
                    Transpose::No,
                    got(&t.weff)?,
                    Transpose::No,
                    0.0,
                    dx,
                )?;
                let q = View::mat(got(&t.q)?, d, r);
                let pt = View::mat(got(&t.pt)?, k, r);
                let s = View::mat(got(&t.tbar)?, n, r);
                let v = View::mat(got(&t.vbar)?, n, r);
                let qbar = View::mat(got(&t.qbar)?, d, r);
                let pbar_t = View::mat(got(&t.pbar_t)?, k, r);
                let v_only = |input, cm, out| RowPass {
                    input,
                    base: None,
                    out: None,
                    cm,
                    mm: None,
                    m_scale: 1.0,
                    am: None,
                    v_out: Some(out),
                    t_out: None,
                };
                // s = ∂y Q, v = x Pᵀ
                rows_fused(dev, kern, &v_only(mat(dy), q.t(), s))?;
                rows_fused(dev, kern, &v_only(mat(x), pt.t(), v))?;
                // Q̄ = ∂yᵀ v, ∂Pᵀ = xᵀ s
                col_reduce(dev, kern, mat(dy), v, 1.0, 0.0, qbar, scratch)?;
                col_reduce(dev, kern, mat(x), s, 1.0, 0.0, pbar_t, scratch)?;
                // C̄ᵀ = W0 ∂Pᵀ (a pass over the rows of W0)
                rows_fused(
                    dev,
                    kern,
                    &v_only(mat(&self.w0), pbar_t.t(), self.gen.cbar_t()),
                )?;
                // Ā = Q̄ Mᵀ, M̄ = Aᵀ Q̄
                let m = RrBatch::slot(&self.rr.m, slot);
                small_gemm(dev, kern, 1.0, qbar, m.t(), 0.0, self.gen.abar())?;
                col_reduce::<f32>(
                    dev,
                    kern,
                    self.gen.a(),
                    qbar,
                    1.0,
                    0.0,
                    RrBatch::slot(&self.rr.mbar, slot),
                    scratch,
                )?;
            }
        }
        self.rr.adjoint(dev)?;
        let zbar = RrBatch::slot(&self.rr.zbar, slot);
        self.gen.finish(dev, &self.kern, &self.spec, zbar)
    }

    /// The merged weight `W_new = W0 + A (M (C W0))` (eq. 30) into `out` (d×k). Asynchronous.
    pub fn merge(&mut self, dev: &CudaDevice, out: &mut DeviceMatrices<T>) -> Result<()> {
        self.check_dev(dev)?;
        check_act(dev, "out", out, Some(self.d), self.k)?;
        if !self.prepared {
            self.prepare(dev)?;
        }
        self.ensure_scratch(dev, 1)?;
        let (d, k, r) = (self.d, self.k, self.gen.r);
        ensure(dev, &mut self.tape.pt, k * r)?;
        ensure(dev, &mut self.tape.q, d * r)?;
        let t = &self.tape;
        let scratch = got(&t.scratch)?;
        let pt = View::mat(got(&t.pt)?, k, r);
        let q = View::mat(got(&t.q)?, d, r);
        let m = RrBatch::slot(&self.rr.m, self.gen.slot);
        col_reduce(
            dev,
            &self.kern,
            mat(&self.w0),
            self.gen.ct(),
            1.0,
            0.0,
            pt,
            scratch,
        )?;
        small_gemm(dev, &self.kern, 1.0, self.gen.a(), m, 0.0, q)?;
        merge_apply(dev, &self.kern, mat(&self.w0), mat(out), 1.0, q, pt.t())
    }

    /// `W0 = exp(−G) W_new = W_new − A (φ1(−Z) (C W_new))` (Prop. 3 with Prop. 1) into `out`
    /// (d×k) with the current parameters. Asynchronous; `φ1(−Z)` is one more batched launch.
    pub fn unmerge(
        &mut self,
        dev: &CudaDevice,
        w_new: &DeviceMatrices<T>,
        out: &mut DeviceMatrices<T>,
    ) -> Result<()> {
        self.check_dev(dev)?;
        check_act(dev, "w_new", w_new, Some(self.d), self.k)?;
        check_act(dev, "out", out, Some(self.d), self.k)?;
        if !self.prepared {
            self.prepare(dev)?;
        }
        self.ensure_scratch(dev, 1)?;
        let (d, k, r) = (self.d, self.k, self.gen.r);
        if self.rr_neg.is_none() {
            self.rr_neg = Some(RrBatch::new(dev, 1, r)?);
        }
        ensure(dev, &mut self.tape.pt, k * r)?;
        ensure(dev, &mut self.tape.q, d * r)?;
        let neg = self
            .rr_neg
            .as_mut()
            .ok_or_else(|| ElraError::Cuda("rr_neg".into()))?;
        let scratch = got(&self.tape.scratch)?;
        // −Z = −C A
        col_reduce::<f32>(
            dev,
            &self.kern,
            self.gen.ct(),
            self.gen.a(),
            -1.0,
            0.0,
            RrBatch::slot(&neg.z, 0),
            scratch,
        )?;
        neg.phi(dev)?;
        let t = &self.tape;
        let pt = View::mat(got(&t.pt)?, k, r);
        let q = View::mat(got(&t.q)?, d, r);
        col_reduce(
            dev,
            &self.kern,
            mat(w_new),
            self.gen.ct(),
            1.0,
            0.0,
            pt,
            scratch,
        )?;
        small_gemm(
            dev,
            &self.kern,
            1.0,
            self.gen.a(),
            RrBatch::slot(&neg.m, 0),
            0.0,
            q,
        )?;
        merge_apply(dev, &self.kern, mat(w_new), mat(out), -1.0, q, pt.t())
    }
}

// ---------------------------------------------------------------------------------------------
// Double-sided ELRA
// ---------------------------------------------------------------------------------------------

/// Double-sided ELRA on the GPU (App. B eq. 22): `W_new = exp(L) W0 exp(R)`,
/// `y = ((x exp(R)ᵀ) W0ᵀ) exp(L)ᵀ` — the right row pass on `x`, the frozen GEMM, the left row
/// pass (Woodbury route on both sides). Both generators use the same [`GpuSpec`] (as
/// [`crate::grad::double_forward_parts`]); their φ1 (and adjoints) run in one batched launch when
/// `r_L = r_R`.
pub struct GpuDoubleSidedLayer<T: Activation> {
    kern: Arc<SkinnyKernels>,
    ordinal: usize,
    d: usize,
    k: usize,
    w0: DeviceMatrices<T>,
    left: Gen,
    right: Gen,
    spec: GpuSpec,
    rr: Vec<RrBatch>,
    prepared: bool,
    n: usize,
    xr: Option<DeviceMatrices<T>>,
    u: Option<DeviceMatrices<T>>,
    ubar: Option<DeviceMatrices<T>>,
    xrbar: Option<DeviceMatrices<T>>,
    /// v, t, T̄, V̄ per side (N×r).
    nr: Vec<Option<CudaSlice<f32>>>,
    /// d×r and k×r scratch of merge/unmerge.
    dr: Option<CudaSlice<f32>>,
    dr2: Option<CudaSlice<f32>>,
    kr: Option<CudaSlice<f32>>,
    scratch: Option<CudaSlice<f32>>,
}

impl<T: Activation> std::fmt::Debug for GpuDoubleSidedLayer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuDoubleSidedLayer")
            .field("dtype", &T::DTYPE)
            .field("d", &self.d)
            .field("k", &self.k)
            .field("r_left", &self.left.r)
            .field("r_right", &self.right.r)
            .finish()
    }
}

/// One side's parameters for [`GpuDoubleSidedLayer::new`].
#[derive(Clone, Copy, Debug)]
pub struct GpuSide<'a> {
    /// `A` (n×r).
    pub a: &'a DMatrix<f32>,
    /// `B` (r×n); `None` for PSD.
    pub b: Option<&'a DMatrix<f32>>,
    /// η of this side.
    pub eta: f32,
}

impl<T: Activation> GpuDoubleSidedLayer<T> {
    /// A double-sided layer (App. B eq. 22) with frozen `w0` (d×k), the left side (`A_L` d×r_L)
    /// and the right side (`A_R` k×r_R).
    ///
    /// Errors: as [`GpuElraLayer::new`] for each side (arguments `a_left`, `b_left`, …).
    pub fn new(
        dev: &CudaDevice,
        w0: DeviceMatrices<T>,
        left: GpuSide<'_>,
        right: GpuSide<'_>,
        spec: GpuSpec,
    ) -> Result<Self> {
        spec.validate()?;
        w0.check_device(dev, "w0")?;
        if w0.batch() != 1 {
            return Err(ElraError::invalid("w0", "must be a single matrix"));
        }
        let (d, k) = (w0.rows(), w0.cols());
        check_factors(
            d,
            left.a.ncols(),
            left.a,
            left.b,
            left.eta,
            &spec,
            "a_left",
            "b_left",
        )?;
        check_factors(
            k,
            right.a.ncols(),
            right.a,
            right.b,
            right.eta,
            &spec,
            "a_right",
            "b_right",
        )?;
        let (rl, rrk) = (left.a.ncols(), right.a.ncols());
        let (rr, gl, gr) = if rl == rrk {
            (vec![RrBatch::new(dev, 2, rl)?], (0, 0), (0, 1))
        } else {
            (
                vec![RrBatch::new(dev, 1, rl)?, RrBatch::new(dev, 1, rrk)?],
                (0, 0),
                (1, 0),
            )
        };
        Ok(GpuDoubleSidedLayer {
            kern: SkinnyKernels::get(dev)?,
            ordinal: dev.ordinal(),
            d,
            k,
            w0,
            left: Gen::new(dev, left.a, left.b, left.eta, gl.0, gl.1)?,
            right: Gen::new(dev, right.a, right.b, right.eta, gr.0, gr.1)?,
            spec,
            rr,
            prepared: false,
            n: 0,
            xr: None,
            u: None,
            ubar: None,
            xrbar: None,
            nr: (0..8).map(|_| None).collect(),
            dr: None,
            dr2: None,
            kr: None,
            scratch: None,
        })
    }

    /// Sets α, the η multiplier and λ of both sides for the next step.
    pub fn set_spec(&mut self, spec: GpuSpec) -> Result<()> {
        spec.validate()?;
        if spec.alpha < 1.0 && (self.left.b.is_none() || self.right.b.is_none()) {
            return Err(ElraError::invalid("alpha", "α < 1 needs the factors B"));
        }
        self.spec = spec;
        self.prepared = false;
        Ok(())
    }

    /// Device parameters of `(left, right)`: `(A, B, η)` each; the r×r work is redone next step.
    #[allow(clippy::type_complexity)]
    pub fn params_mut(
        &mut self,
    ) -> [(
        &mut CudaSlice<f32>,
        Option<&mut CudaSlice<f32>>,
        &mut CudaSlice<f32>,
    ); 2] {
        self.prepared = false;
        let (l, r) = (&mut self.left, &mut self.right);
        [
            (&mut l.a, l.b.as_mut(), &mut l.eta),
            (&mut r.a, r.b.as_mut(), &mut r.eta),
        ]
    }

    /// `(left, right)` gradients of the last backward, downloaded (synchronises).
    pub fn grads(&self, dev: &CudaDevice) -> Result<(GpuGrads, GpuGrads)> {
        self.check_dev(dev)?;
        Ok((self.left.grads_host(dev)?, self.right.grads_host(dev)?))
    }

    fn check_dev(&self, dev: &CudaDevice) -> Result<()> {
        if dev.ordinal() != self.ordinal {
            return Err(ElraError::invalid(
                "dev",
                "the layer lives on another device",
            ));
        }
        Ok(())
    }

    fn ensure_scratch(&mut self, dev: &CudaDevice, n: usize) -> Result<()> {
        let (d, k, rl, rr) = (self.d, self.k, self.left.r, self.right.r);
        let r = rl.max(rr);
        let need = [
            col_reduce_scratch(n, d, r),
            col_reduce_scratch(n, k, r),
            col_reduce_scratch(n, r, r),
            col_reduce_scratch(d, k, r),
            col_reduce_scratch(d, r, r),
            col_reduce_scratch(k, r, r),
        ]
        .into_iter()
        .max()
        .unwrap_or(1);
        ensure(dev, &mut self.scratch, need)
    }

    /// The r×r work of both sides (eq. 19, Prop. 1), φ1 batched. Asynchronous.
    pub fn prepare(&mut self, dev: &CudaDevice) -> Result<()> {
        self.check_dev(dev)?;
        self.ensure_scratch(dev, 1)?;
        let scratch = got(&self.scratch)?;
        let grams = self.spec.lambda > 0.0;
        for g in [&self.left, &self.right] {
            let z = RrBatch::slot(&self.rr[g.group].z, g.slot);
            g.prepare(dev, &self.kern, &self.spec, z, grams, scratch)?;
        }
        for b in &mut self.rr {
            b.phi(dev)?;
        }
        self.prepared = true;
        Ok(())
    }

    /// Reads the statuses of the r×r launches (synchronises).
    pub fn check_status(&self, dev: &CudaDevice) -> Result<()> {
        self.rr.iter().try_for_each(|b| b.check(dev))
    }

    /// `y = x W_newᵀ` (App. B eq. 22) for `x` (N×k) into `y` (N×d), keeping the tape.
    pub fn forward(
        &mut self,
        dev: &CudaDevice,
        x: &DeviceMatrices<T>,
        y: &mut DeviceMatrices<T>,
    ) -> Result<()> {
        self.check_dev(dev)?;
        let n = check_act(dev, "x", x, None, self.k)?;
        check_act(dev, "y", y, Some(n), self.d)?;
        if !self.prepared {
            self.prepare(dev)?;
        }
        self.ensure_scratch(dev, n)?;
        let (rl, rr) = (self.left.r, self.right.r);
        for (i, slot) in self.nr.iter_mut().enumerate() {
            ensure(dev, slot, n * if i < 4 { rl } else { rr })?;
        }
        ensure_mat(dev, &mut self.xr, n, self.k)?;
        ensure_mat(dev, &mut self.u, n, self.d)?;
        self.n = n;
        let nrv = |i: usize, r: usize| -> Result<View<'_, f32>> {
            Ok(View::mat(got(&self.nr[i])?, n, r))
        };
        let mr = RrBatch::slot(&self.rr[self.right.group].m, self.right.slot);
        self.right.rows_forward(
            dev,
            &self.kern,
            mr,
            mat(x),
            mat(got(&self.xr)?),
            nrv(4, rr)?,
            nrv(5, rr)?,
        )?;
        let u = self
            .u
            .as_mut()
            .ok_or_else(|| ElraError::Cuda("tape".into()))?;
        gemm(
            dev,
            1.0,
            got(&self.xr)?,
            Transpose::No,
            &self.w0,
            Transpose::Yes,
            0.0,
            u,
        )?;
        let nrv = |i: usize, r: usize| -> Result<View<'_, f32>> {
            Ok(View::mat(got(&self.nr[i])?, n, r))
        };
        let ml = RrBatch::slot(&self.rr[self.left.group].m, self.left.slot);
        self.left.rows_forward(
            dev,
            &self.kern,
            ml,
            mat(got(&self.u)?),
            mat(y),
            nrv(0, rl)?,
            nrv(1, rl)?,
        )
    }

    /// Reverse mode of the last forward ([`crate::grad::double_backward_parts`] without the
    /// clip): `∂x` into `dx` and both sides' gradients. Asynchronous.
    pub fn backward(
        &mut self,
        dev: &CudaDevice,
        x: &DeviceMatrices<T>,
        dy: &DeviceMatrices<T>,
        dx: &mut DeviceMatrices<T>,
    ) -> Result<()> {
        self.check_dev(dev)?;
        let n = self.n;
        if n == 0 {
            return Err(ElraError::invalid("self", "backward before forward"));
        }
        check_act(dev, "x", x, Some(n), self.k)?;
        check_act(dev, "dy", dy, Some(n), self.d)?;
        check_act(dev, "dx", dx, Some(n), self.k)?;
        ensure_mat(dev, &mut self.ubar, n, self.d)?;
        ensure_mat(dev, &mut self.xrbar, n, self.k)?;
        let (rl, rr) = (self.left.r, self.right.r);
        let scratch = got(&self.scratch)?;
        let nrv = |i: usize, r: usize| -> Result<View<'_, f32>> {
            Ok(View::mat(got(&self.nr[i])?, n, r))
        };
        let (l, rg) = (&self.left, &self.right);
        l.rows_backward(
            dev,
            &self.kern,
            RrBatch::slot(&self.rr[l.group].m, l.slot),
            mat(got(&self.u)?),
            mat(dy),
            mat(got(&self.ubar)?),
            nrv(0, rl)?,
            nrv(1, rl)?,
            nrv(2, rl)?,
            nrv(3, rl)?,
            RrBatch::slot(&self.rr[l.group].mbar, l.slot),
            scratch,
        )?;
        let xrbar = self
            .xrbar
            .as_mut()
            .ok_or_else(|| ElraError::Cuda("tape".into()))?;
        gemm(
            dev,
            1.0,
            got(&self.ubar)?,
            Transpose::No,
            &self.w0,
            Transpose::No,
            0.0,
            xrbar,
        )?;
        let nrv = |i: usize, r: usize| -> Result<View<'_, f32>> {
            Ok(View::mat(got(&self.nr[i])?, n, r))
        };
        rg.rows_backward(
            dev,
            &self.kern,
            RrBatch::slot(&self.rr[rg.group].m, rg.slot),
            mat(x),
            mat(got(&self.xrbar)?),
            mat(dx),
            nrv(4, rr)?,
            nrv(5, rr)?,
            nrv(6, rr)?,
            nrv(7, rr)?,
            RrBatch::slot(&self.rr[rg.group].mbar, rg.slot),
            scratch,
        )?;
        for b in &mut self.rr {
            b.adjoint(dev)?;
        }
        for g in [&self.left, &self.right] {
            let zbar = RrBatch::slot(&self.rr[g.group].zbar, g.slot);
            g.finish(dev, &self.kern, &self.spec, zbar)?;
        }
        Ok(())
    }

    /// `W_out = W_in + sign (W_in A_R M) C_R` (the right factor `W exp(±R)`; `m` is φ1(±Z_R)).
    fn right_apply(
        &self,
        dev: &CudaDevice,
        m: View<'_, f32>,
        w_in: View<'_, T>,
        w_out: View<'_, T>,
        sign: f32,
    ) -> Result<()> {
        let (d, r) = (self.d, self.right.r);
        let l1 = View::mat(got(&self.dr)?, d, r);
        let l2 = View::mat(got(&self.dr2)?, d, r);
        rows_fused(
            dev,
            &self.kern,
            &RowPass {
                input: w_in,
                base: None,
                out: None,
                cm: self.right.a().t(),
                mm: None,
                m_scale: 1.0,
                am: None,
                v_out: Some(l1),
                t_out: None,
            },
        )?;
        small_gemm(dev, &self.kern, 1.0, l1, m, 0.0, l2)?;
        merge_apply(dev, &self.kern, w_in, w_out, sign, l2, self.right.ct().t())
    }

    /// `W_out = W_in + sign (A_L M)(C_L W_in)` (the left factor `exp(±L) W`).
    fn left_apply(
        &self,
        dev: &CudaDevice,
        m: View<'_, f32>,
        w_in: View<'_, T>,
        w_out: View<'_, T>,
        sign: f32,
    ) -> Result<()> {
        let (d, k, r) = (self.d, self.k, self.left.r);
        let pt = View::mat(got(&self.kr)?, k, r);
        let q = View::mat(got(&self.dr2)?, d, r);
        col_reduce(
            dev,
            &self.kern,
            w_in,
            self.left.ct(),
            1.0,
            0.0,
            pt,
            got(&self.scratch)?,
        )?;
        small_gemm(dev, &self.kern, 1.0, self.left.a(), m, 0.0, q)?;
        merge_apply(dev, &self.kern, w_in, w_out, sign, q, pt.t())
    }

    fn ensure_merge(&mut self, dev: &CudaDevice) -> Result<()> {
        if !self.prepared {
            self.prepare(dev)?;
        }
        self.ensure_scratch(dev, 1)?;
        let r = self.left.r.max(self.right.r);
        ensure(dev, &mut self.dr, self.d * r)?;
        ensure(dev, &mut self.dr2, self.d * r)?;
        ensure(dev, &mut self.kr, self.k * r)
    }

    /// `W_new = exp(L) W0 exp(R)` (App. B eq. 22) into `out` (d×k), both factors by Prop. 1.
    pub fn merge(&mut self, dev: &CudaDevice, out: &mut DeviceMatrices<T>) -> Result<()> {
        self.check_dev(dev)?;
        check_act(dev, "out", out, Some(self.d), self.k)?;
        self.ensure_merge(dev)?;
        let mr = RrBatch::slot(&self.rr[self.right.group].m, self.right.slot);
        let ml = RrBatch::slot(&self.rr[self.left.group].m, self.left.slot);
        self.right_apply(dev, mr, mat(&self.w0), mat(out), 1.0)?;
        self.left_apply(dev, ml, mat(out), mat(out), 1.0)
    }

    /// `W0 = exp(−L) W_new exp(−R)` into `out` (d×k) with the current parameters (Prop. 3 on
    /// each side; `φ1(−Z)` of both sides in one more batched launch when the ranks agree).
    pub fn unmerge(
        &mut self,
        dev: &CudaDevice,
        w_new: &DeviceMatrices<T>,
        out: &mut DeviceMatrices<T>,
    ) -> Result<()> {
        self.check_dev(dev)?;
        check_act(dev, "w_new", w_new, Some(self.d), self.k)?;
        check_act(dev, "out", out, Some(self.d), self.k)?;
        self.ensure_merge(dev)?;
        let mut neg: Vec<RrBatch> = self
            .rr
            .iter()
            .map(|b| RrBatch::new(dev, b.z.batch(), b.z.rows()))
            .collect::<Result<_>>()?;
        let scratch = got(&self.scratch)?;
        for g in [&self.left, &self.right] {
            let z = RrBatch::slot(&neg[g.group].z, g.slot);
            col_reduce::<f32>(dev, &self.kern, g.ct(), g.a(), -1.0, 0.0, z, scratch)?;
        }
        for b in &mut neg {
            b.phi(dev)?;
        }
        let ml = RrBatch::slot(&neg[self.left.group].m, self.left.slot);
        let mr = RrBatch::slot(&neg[self.right.group].m, self.right.slot);
        self.left_apply(dev, ml, mat(w_new), mat(out), -1.0)?;
        self.right_apply(dev, mr, mat(out), mat(out), -1.0)?;
        // The temporary r×r batches are freed after the stream has used them.
        dev.synchronize()?;
        for b in &neg {
            check_status(
                dev,
                &b.status_fwd,
                b.z.batch(),
                "phi1(−Z) of the unmerge",
                "z",
            )?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// LoRA
// ---------------------------------------------------------------------------------------------

/// The LoRA baseline on the GPU with PEFT's conventions (Hu et al. 2022; [`crate::grad::lora`]):
/// `y = x W0ᵀ + s (x A'ᵀ) B'ᵀ`, `lora_A = A'` (r×k), `lora_B = B'` (d×r), `s = lora_alpha / r`.
/// Forward: cuBLAS, then one fused row pass adding the branch in place. Backward:
/// `∂x = ∂y W0` (cuBLAS) plus `S A'` with `S = s ∂y B'` (one fused row pass, in place),
/// `∂A' = Sᵀ x` and `∂B' = s ∂yᵀ (x A'ᵀ)` (reductions over rows).
pub struct GpuLoraLayer<T: Activation> {
    kern: Arc<SkinnyKernels>,
    ordinal: usize,
    d: usize,
    k: usize,
    r: usize,
    scaling: f32,
    w0: DeviceMatrices<T>,
    lora_a: CudaSlice<f32>,
    lora_b: CudaSlice<f32>,
    grad_a: CudaSlice<f32>,
    grad_b: CudaSlice<f32>,
    n: usize,
    p: Option<CudaSlice<f32>>,
    s: Option<CudaSlice<f32>>,
    scratch: Option<CudaSlice<f32>>,
}

impl<T: Activation> std::fmt::Debug for GpuLoraLayer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuLoraLayer")
            .field("dtype", &T::DTYPE)
            .field("d", &self.d)
            .field("k", &self.k)
            .field("r", &self.r)
            .field("scaling", &self.scaling)
            .finish()
    }
}

impl<T: Activation> GpuLoraLayer<T> {
    /// A LoRA layer with frozen `w0` (d×k), `lora_a` (r×k), `lora_b` (d×r) and scaling
    /// `s = lora_alpha / r`.
    ///
    /// Errors: shapes, r outside 1..=[`MAX_RANK`], non-finite factors or scaling.
    pub fn new(
        dev: &CudaDevice,
        w0: DeviceMatrices<T>,
        lora_a: &DMatrix<f32>,
        lora_b: &DMatrix<f32>,
        scaling: f32,
    ) -> Result<Self> {
        w0.check_device(dev, "w0")?;
        let (d, k) = (w0.rows(), w0.cols());
        let r = lora_a.nrows();
        if r == 0 || r > MAX_RANK {
            return Err(ElraError::invalid(
                "lora_a",
                format!("rank must be 1..={MAX_RANK}"),
            ));
        }
        if lora_a.shape() != (r, k) {
            return Err(ElraError::shape("lora_a", (r, k), lora_a.shape()));
        }
        if lora_b.shape() != (d, r) {
            return Err(ElraError::shape("lora_b", (d, r), lora_b.shape()));
        }
        if lora_a.iter().chain(lora_b.iter()).any(|x| !x.is_finite()) {
            return Err(ElraError::invalid("lora_a", "factors contain NaN or ±Inf"));
        }
        if !scaling.is_finite() {
            return Err(ElraError::invalid("scaling", "must be finite"));
        }
        Ok(GpuLoraLayer {
            kern: SkinnyKernels::get(dev)?,
            ordinal: dev.ordinal(),
            d,
            k,
            r,
            scaling,
            w0,
            lora_a: upload(dev, lora_a)?,
            lora_b: upload(dev, lora_b)?,
            grad_a: zeros(dev, r * k)?,
            grad_b: zeros(dev, d * r)?,
            n: 0,
            p: None,
            s: None,
            scratch: None,
        })
    }

    /// Device parameters `(lora_A r×k, lora_B d×r)`.
    pub fn params_mut(&mut self) -> (&mut CudaSlice<f32>, &mut CudaSlice<f32>) {
        (&mut self.lora_a, &mut self.lora_b)
    }

    /// Device parameters `(lora_A r×k, lora_B d×r)`, for reading.
    pub fn params(&self) -> (&CudaSlice<f32>, &CudaSlice<f32>) {
        (&self.lora_a, &self.lora_b)
    }

    /// `(∂lora_A, ∂lora_B)` of the last backward, downloaded (synchronises).
    pub fn grads(&self, dev: &CudaDevice) -> Result<(DMatrix<f32>, DMatrix<f32>)> {
        self.check_dev(dev)?;
        Ok((
            download(dev, &self.grad_a, self.r, self.k)?,
            download(dev, &self.grad_b, self.d, self.r)?,
        ))
    }

    fn check_dev(&self, dev: &CudaDevice) -> Result<()> {
        if dev.ordinal() != self.ordinal {
            return Err(ElraError::invalid(
                "dev",
                "the layer lives on another device",
            ));
        }
        Ok(())
    }

    /// `y = x W0ᵀ + s (x A'ᵀ) B'ᵀ` into `y` (N×d), keeping `P = x A'ᵀ`. Asynchronous.
    pub fn forward(
        &mut self,
        dev: &CudaDevice,
        x: &DeviceMatrices<T>,
        y: &mut DeviceMatrices<T>,
    ) -> Result<()> {
        self.check_dev(dev)?;
        let n = check_act(dev, "x", x, None, self.k)?;
        check_act(dev, "y", y, Some(n), self.d)?;
        let (d, k, r) = (self.d, self.k, self.r);
        ensure(dev, &mut self.p, n * r)?;
        ensure(dev, &mut self.s, n * r)?;
        let need = [col_reduce_scratch(n, d, r), col_reduce_scratch(n, k, r)]
            .into_iter()
            .max()
            .unwrap_or(1);
        ensure(dev, &mut self.scratch, need)?;
        self.n = n;
        gemm(dev, 1.0, x, Transpose::No, &self.w0, Transpose::Yes, 0.0, y)?;
        rows_fused(
            dev,
            &self.kern,
            &RowPass {
                input: mat(x),
                base: Some(mat(y)),
                out: Some(mat(y)),
                cm: View::mat(&self.lora_a, r, k),
                mm: None,
                m_scale: self.scaling,
                am: Some(View::mat(&self.lora_b, d, r)),
                v_out: Some(View::mat(got(&self.p)?, n, r)),
                t_out: None,
            },
        )
    }

    /// Reverse mode of the last forward ([`crate::grad::lora_backward_parts`]). Asynchronous.
    pub fn backward(
        &mut self,
        dev: &CudaDevice,
        x: &DeviceMatrices<T>,
        dy: &DeviceMatrices<T>,
        dx: &mut DeviceMatrices<T>,
    ) -> Result<()> {
        self.check_dev(dev)?;
        let n = self.n;
        if n == 0 {
            return Err(ElraError::invalid("self", "backward before forward"));
        }
        check_act(dev, "x", x, Some(n), self.k)?;
        check_act(dev, "dy", dy, Some(n), self.d)?;
        check_act(dev, "dx", dx, Some(n), self.k)?;
        let (d, k, r) = (self.d, self.k, self.r);
        gemm(
            dev,
            1.0,
            dy,
            Transpose::No,
            &self.w0,
            Transpose::No,
            0.0,
            dx,
        )?;
        let s = View::mat(got(&self.s)?, n, r);
        rows_fused(
            dev,
            &self.kern,
            &RowPass {
                input: mat(dy),
                base: Some(mat(dx)),
                out: Some(mat(dx)),
                cm: View::mat(&self.lora_b, d, r).t(),
                mm: None,
                m_scale: self.scaling,
                am: Some(View::mat(&self.lora_a, r, k).t()),
                v_out: None,
                t_out: Some(s),
            },
        )?;
        let scratch = got(&self.scratch)?;
        col_reduce(
            dev,
            &self.kern,
            mat(x),
            s,
            1.0,
            0.0,
            View::mat(&self.grad_a, r, k).t(),
            scratch,
        )?;
        col_reduce(
            dev,
            &self.kern,
            mat(dy),
            View::mat(got(&self.p)?, n, r),
            self.scaling,
            0.0,
            View::mat(&self.grad_b, d, r),
            scratch,
        )
    }

    /// `W_new = W0 + s B' A'` into `out` (d×k). Asynchronous.
    pub fn merge(&mut self, dev: &CudaDevice, out: &mut DeviceMatrices<T>) -> Result<()> {
        self.check_dev(dev)?;
        check_act(dev, "out", out, Some(self.d), self.k)?;
        let (d, k, r) = (self.d, self.k, self.r);
        merge_apply(
            dev,
            &self.kern,
            mat(&self.w0),
            mat(out),
            self.scaling,
            View::mat(&self.lora_b, d, r),
            View::mat(&self.lora_a, r, k),
        )
    }

    /// `W0 = W_new − s B' A'` into `out` (d×k). Asynchronous.
    pub fn unmerge(
        &mut self,
        dev: &CudaDevice,
        w_new: &DeviceMatrices<T>,
        out: &mut DeviceMatrices<T>,
    ) -> Result<()> {
        self.check_dev(dev)?;
        check_act(dev, "w_new", w_new, Some(self.d), self.k)?;
        check_act(dev, "out", out, Some(self.d), self.k)?;
        let (d, k, r) = (self.d, self.k, self.r);
        merge_apply(
            dev,
            &self.kern,
            mat(w_new),
            mat(out),
            -self.scaling,
            View::mat(&self.lora_b, d, r),
            View::mat(&self.lora_a, r, k),
        )
    }
}
