//! The adapters on the GPU, mirroring [`crate::adapter`]: ELRA (general, PSD, Hyb with any α,
//! [`GpuElraLayer`]), double-sided ELRA ([`GpuDoubleSidedLayer`]) and the LoRA baseline
//! ([`GpuLoraLayer`]), with activations and `W0` in f32, f16 or bf16 ([`Activation`]) and
//! parameters, r×r matrices and gradients in f32. Each implements [`Adapter`] over
//! [`DeviceMatrices`] (and [`GpuAdapter`]), owning its device, configuration, step, tape and
//! gradients, as the CPU layers do over host matrices.
//!
//! This file holds what the layers share: the route cost model, the generator on the device
//! ([`Gen`]: its factors, `C`, Grams, gradients and the row and weight passes of `exp(±AC)`), the
//! batched r×r work of a layer's generators ([`Generators`]) and small buffer helpers.
//!
//! # One step on the device
//! Parameters, tapes and gradients live in device buffers owned by the layer; a step enqueues
//! kernels on the device's stream and copies nothing to the host. Per optimiser step
//! ([`Generators::prepare`], Algorithm 1 lines 4–5): `Cᵀ = η m (αA + (1−α)Bᵀ)` (eq. 19),
//! `Z = C A` (r×r), the Grams `S = AᵀA`, `K = CCᵀ` (eq. 21) when λ > 0, then one batched launch
//! of the Padé `φ1` kernel for every generator of the layer (both sides of a double-sided layer
//! when their ranks agree). Kernel statuses stay on the device; failed r×r matrices come out as
//! NaN, and `check_status` (which synchronises; also run by [`Adapter::grad`]) names them.
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
//! The spectral clip τ of App. H (its exact derivative needs an r×r SVD on the device: use
//! `tau = None`, or clip on the host between steps; [`GeneratorSpec::require_no_clip`]), dropout
//! masks, and ranks above [`MAX_RANK`].
#![allow(non_snake_case)]

mod double;
mod elra;
mod lora;

pub use double::GpuDoubleSidedLayer;
pub use elra::GpuElraLayer;
pub use lora::GpuLoraLayer;

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use nalgebra::DMatrix;

use super::kernels::{check_status, launch_expm_phi1, launch_phi1_adjoint};
use super::skinny::{
    check_rank, col_reduce, col_reduce_scratch, factor_backward, factor_c, merge_apply, rows_fused,
    small_gemm, FactorBackward, RowPass, View,
};
use super::{Activation, CudaDevice, DeviceMatrices};
use crate::adapter::{param_spec, Adapter, GeneratorSpec, InputKey, ParamSpec};
use crate::grad::Route;
use crate::linalg::check_finite;
use crate::{ElraError, Result};

/// An [`Adapter`] on the GPU: parameters and gradients as host f32 matrices, `W0` and
/// activations as device matrices of `T` (`Box<dyn GpuAdapter<T>>` is what the C ABI holds).
pub trait GpuAdapter<T: Activation>: Adapter<Scalar = f32, Matrix = DeviceMatrices<T>> {
    /// The device the layer lives on (every call is ordered on its stream).
    fn device(&self) -> &Arc<CudaDevice>;

    /// Blocks until all work enqueued on the device's stream has run, then reports deferred
    /// errors: an asynchronous CUDA fault, or a failure of the r×r matrix functions of the last
    /// step (φ1, its adjoint, `φ1(−Z)` of an unmerge; Prop. 1, Al-Mohy & Higham 2009).
    fn synchronize(&self) -> Result<()>;
}

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

/// The extra traffic of the two exact routes (eq. 5 and eq. 30) for `N` rows, `W0` d×k, rank r
/// and activations of `elem_bytes` bytes, counting only the N×d, N×k and d×k passes (the N×r,
/// d×r and r×r data and the r×r launches are the same for both or negligible):
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

/// The cheaper exact route by [`route_cost`] (Woodbury, eq. 5, or merged, eq. 30; ties go to
/// Woodbury, which keeps `W0` untouched).
pub fn choose_route(n: usize, d: usize, k: usize, r: usize, elem_bytes: usize) -> Route {
    let (w, m) = route_cost(n, d, k, r, elem_bytes).seconds();
    if m < w {
        Route::Merged
    } else {
        Route::Woodbury
    }
}

// ---------------------------------------------------------------------------------------------
// Buffers
// ---------------------------------------------------------------------------------------------

/// Uploads a host f32 matrix row-major.
fn upload(dev: &CudaDevice, m: &DMatrix<f32>) -> Result<CudaSlice<f32>> {
    Ok(dev.stream().clone_htod(&row_major(m))?)
}

/// Overwrites the first `rows·cols` entries of `dst` with a host f32 matrix, row-major.
fn upload_into(dev: &CudaDevice, m: &DMatrix<f32>, dst: &mut CudaSlice<f32>) -> Result<()> {
    let host = row_major(m);
    if dst.len() < host.len() {
        return Err(ElraError::Cuda(
            "parameter buffer smaller than its shape".into(),
        ));
    }
    let mut view = dst.slice_mut(0..host.len());
    Ok(dev.stream().memcpy_htod(&host, &mut view)?)
}

/// Downloads the first `rows·cols` entries of `s` as a row-major matrix (synchronises).
fn download(
    dev: &CudaDevice,
    s: &CudaSlice<f32>,
    rows: usize,
    cols: usize,
) -> Result<DMatrix<f32>> {
    let v = dev.stream().clone_dtoh(s)?;
    dev.synchronize()?;
    if v.len() < rows * cols {
        return Err(ElraError::Cuda(
            "parameter buffer smaller than its shape".into(),
        ));
    }
    Ok(DMatrix::from_row_slice(rows, cols, &v[..rows * cols]))
}

fn row_major(m: &DMatrix<f32>) -> Vec<f32> {
    let mut v = Vec::with_capacity(m.len());
    for i in 0..m.nrows() {
        v.extend(m.row(i).iter().copied());
    }
    v
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

/// Checks a single activation matrix on `dev` with `cols` columns (and `rows` rows when given);
/// returns its rows.
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

/// Checks a frozen weight `w0` (one d×k matrix on `dev`).
fn check_w0<T: Activation>(
    dev: &CudaDevice,
    w0: &DeviceMatrices<T>,
    d: usize,
    k: usize,
) -> Result<()> {
    check_act(dev, "w0", w0, Some(d), k).map(|_| ())
}

/// The key of a forward's input: device address and shape (nothing is dereferenced).
fn key_of<T: Activation>(x: &DeviceMatrices<T>) -> InputKey {
    InputKey::new(x.device_addr(), x.rows(), x.cols())
}

/// Errors for a dropout mask: the GPU layers have none (App. H dropout runs on the CPU only).
fn no_dropout<T: Activation>(dropout: Option<&DeviceMatrices<T>>) -> Result<()> {
    match dropout {
        Some(_) => Err(ElraError::invalid(
            "dropout",
            "the GPU layers have no dropout masks (pass None)",
        )),
        None => Ok(()),
    }
}

fn mat<T: Activation>(m: &DeviceMatrices<T>) -> View<'_, T> {
    View::mat(m.slice(), m.rows(), m.cols())
}

/// Uploads a host matrix (any precision that widens to f64) as a 1×rows×cols activation buffer,
/// rounding each entry to `T` (round to nearest even).
pub fn upload_matrix<T: Activation>(
    dev: &CudaDevice,
    m: &DMatrix<f64>,
) -> Result<DeviceMatrices<T>> {
    let mut v = Vec::with_capacity(m.len());
    for i in 0..m.nrows() {
        v.extend(m.row(i).iter().map(|&x| T::from_f64(x)));
    }
    DeviceMatrices::from_row_major(dev, 1, m.nrows(), m.ncols(), &v)
}

/// Downloads a 1×rows×cols activation buffer as f64 (exact widening; synchronises).
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
// One generator on the device
// ---------------------------------------------------------------------------------------------

/// Which parameter of a generator (eq. 2, eq. 19): the factor `A`, the factor `B`, or η.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Factor {
    A,
    B,
    Eta,
}

/// One generator `G = A C` (A n×r, eq. 2 / §4.2.1 / eq. 19) on the device with its gradients.
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

/// The starting values of one generator: `A` (n×r), `B` (r×n, `None` for ELRA-PSD) and η.
struct SideInit<'a> {
    a: &'a DMatrix<f32>,
    b: Option<&'a DMatrix<f32>>,
    eta: f32,
}

impl SideInit<'_> {
    /// Checks the values against a generator of size `n`, rank `r` (1..=[`MAX_RANK`]) and a
    /// variant with (`uses_b`) or without `B`; errors name `names` (`a`, `b`, `eta`, …).
    fn check(&self, names: [&'static str; 3], n: usize, r: usize, uses_b: bool) -> Result<()> {
        check_rank(r)?;
        check_factor(names[0], self.a, n, r)?;
        match (uses_b, self.b) {
            (true, Some(b)) => check_factor(names[1], b, r, n)?,
            (true, None) => {
                return Err(ElraError::invalid(
                    names[1],
                    "this variant needs the factor B (r×n)",
                ))
            }
            (false, Some(_)) => {
                return Err(ElraError::invalid(
                    names[1],
                    "ELRA-PSD has no factor B (G = ηAAᵀ)",
                ))
            }
            (false, None) => {}
        }
        check_eta(names[2], self.eta)
    }
}

fn check_factor(arg: &'static str, m: &DMatrix<f32>, rows: usize, cols: usize) -> Result<()> {
    if m.shape() != (rows, cols) {
        return Err(ElraError::shape(arg, (rows, cols), m.shape()));
    }
    check_finite(arg, m)
}

/// η finite and > 0 (eq. 2), naming the parameter.
fn check_eta(arg: &'static str, eta: f32) -> Result<()> {
    if !eta.is_finite() || eta <= 0.0 {
        return Err(ElraError::invalid(
            arg,
            format!("the step size η must be finite and > 0, got {eta}"),
        ));
    }
    Ok(())
}

impl Gen {
    fn new(dev: &CudaDevice, init: &SideInit<'_>, group: usize, slot: usize) -> Result<Self> {
        let (n, r) = init.a.shape();
        Ok(Gen {
            n,
            r,
            a: upload(dev, init.a)?,
            b: init.b.map(|b| upload(dev, b)).transpose()?,
            eta: dev.stream().clone_htod(&[init.eta])?,
            ct: zeros(dev, n * r)?,
            s: zeros(dev, r * r)?,
            k: zeros(dev, r * r)?,
            abar: zeros(dev, n * r)?,
            cbar_t: zeros(dev, n * r)?,
            bbar: match init.b {
                Some(_) => Some(zeros(dev, n * r)?),
                None => None,
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

    /// The parameter's buffer (`B` only where the generator has it).
    fn param_buf(&self, f: Factor) -> Result<&CudaSlice<f32>> {
        match f {
            Factor::A => Ok(&self.a),
            Factor::B => self.b.as_ref().ok_or_else(no_b),
            Factor::Eta => Ok(&self.eta),
        }
    }

    /// The parameter's gradient buffer.
    fn grad_buf(&self, f: Factor) -> Result<&CudaSlice<f32>> {
        match f {
            Factor::A => Ok(&self.abar),
            Factor::B => self.bbar.as_ref().ok_or_else(no_b),
            Factor::Eta => Ok(&self.etabar),
        }
    }

    /// Replaces a parameter with a checked host value (shape, finite, η > 0).
    fn set(
        &mut self,
        dev: &CudaDevice,
        spec: &ParamSpec,
        f: Factor,
        v: &DMatrix<f32>,
    ) -> Result<()> {
        check_factor(spec.name, v, spec.rows, spec.cols)?;
        let dst = match f {
            Factor::A => &mut self.a,
            Factor::B => self.b.as_mut().ok_or_else(no_b)?,
            Factor::Eta => {
                check_eta(spec.name, v[(0, 0)])?;
                &mut self.eta
            }
        };
        upload_into(dev, v, dst)
    }

    /// The largest scratch the generator's own reductions need.
    fn scratch_need(&self) -> usize {
        col_reduce_scratch(self.n, self.r, self.r)
    }

    /// `Cᵀ` (eq. 19), `Z = C A` into its batch slot, and the Grams of eq. (21) when asked.
    fn prepare(
        &self,
        dev: &CudaDevice,
        spec: &GeneratorSpec,
        z: View<'_, f32>,
        grams: bool,
        scratch: &CudaSlice<f32>,
    ) -> Result<()> {
        let b = self.b.as_ref().filter(|_| spec.alpha < 1.0);
        factor_c(
            dev,
            self.a(),
            b.map(|b| View::mat(b, self.r, self.n)),
            View::mat(&self.eta, 1, 1),
            spec.eta_mult as f32,
            spec.alpha as f32,
            self.ct(),
        )?;
        // Z[p, q] = Σ_l C[p, l] A[l, q] = Σ_l Cᵀ[l, p] A[l, q].
        col_reduce::<f32>(dev, self.ct(), self.a(), 1.0, 0.0, z, scratch)?;
        if grams {
            self.grams(dev, scratch)?;
        }
        Ok(())
    }

    /// `−Z = −C A` into `z` (the core of `exp(−G)`, Prop. 3 with Prop. 1).
    fn neg_z(&self, dev: &CudaDevice, z: View<'_, f32>, scratch: &CudaSlice<f32>) -> Result<()> {
        col_reduce::<f32>(dev, self.ct(), self.a(), -1.0, 0.0, z, scratch)
    }

    /// The Grams `S = AᵀA`, `K = CCᵀ` of eq. (21).
    fn grams(&self, dev: &CudaDevice, scratch: &CudaSlice<f32>) -> Result<()> {
        let r = self.r;
        col_reduce::<f32>(
            dev,
            self.a(),
            self.a(),
            1.0,
            0.0,
            View::mat(&self.s, r, r),
            scratch,
        )?;
        col_reduce::<f32>(
            dev,
            self.ct(),
            self.ct(),
            1.0,
            0.0,
            View::mat(&self.k, r, r),
            scratch,
        )
    }

    /// `‖G‖²_F = tr(S K)` (eq. 21) from fresh Grams, summed in f64 on the host (synchronises).
    fn frobenius_sq(&self, dev: &CudaDevice, scratch: &CudaSlice<f32>) -> Result<f64> {
        self.grams(dev, scratch)?;
        let r = self.r;
        let s = download(dev, &self.s, r, r)?;
        let k = download(dev, &self.k, r, r)?;
        Ok((0..r)
            .flat_map(|i| (0..r).map(move |j| (i, j)))
            .map(|(i, j)| s[(i, j)] as f64 * k[(j, i)] as f64)
            .sum())
    }

    /// `Ā += Cᵀ Z̄`, `C̄ += Z̄ Aᵀ` (through φ1, Z = CA), then the energy gradient (eq. 20–21) and
    /// the chain through eq. (19) to (∂A, ∂B, ∂η).
    fn finish(&self, dev: &CudaDevice, spec: &GeneratorSpec, zbar: View<'_, f32>) -> Result<()> {
        small_gemm(dev, 1.0, self.ct(), zbar, 1.0, self.abar())?;
        small_gemm(dev, 1.0, self.a(), zbar.t(), 1.0, self.cbar_t())?;
        let r = self.r;
        factor_backward(
            dev,
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
        m: View<'_, f32>,
        input: View<'_, T>,
        out: View<'_, T>,
        v: View<'_, f32>,
        t: View<'_, f32>,
    ) -> Result<()> {
        rows_fused(
            dev,
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
        m: View<'_, f32>,
        x: View<'_, T>,
        ybar: View<'_, T>,
        xbar: View<'_, T>,
        rows: &RowsTape<'_>,
        mbar: View<'_, f32>,
        scratch: &CudaSlice<f32>,
    ) -> Result<()> {
        rows_fused(
            dev,
            &RowPass {
                input: ybar,
                base: Some(ybar),
                out: Some(xbar),
                cm: self.a().t(),
                mm: Some(m.t()),
                m_scale: 1.0,
                am: Some(self.ct()),
                v_out: Some(rows.tbar),
                t_out: Some(rows.vbar),
            },
        )?;
        col_reduce(dev, ybar, rows.t, 1.0, 0.0, self.abar(), scratch)?;
        col_reduce(dev, x, rows.vbar, 1.0, 0.0, self.cbar_t(), scratch)?;
        col_reduce::<f32>(dev, rows.tbar, rows.v, 1.0, 0.0, mbar, scratch)
    }

    /// `W_out = W_in + sign (A M)(C W_in)`: `exp(±G) W` by Prop. 1 with `m = φ1(±Z)` — the merge
    /// `W0 + A (M (C W0))` of eq. (30) (sign +1), the unmerge `exp(−G) W_new` (Prop. 3, sign −1
    /// with `m = φ1(−Z)`), and the left factor of the double-sided merge (App. B eq. 22). Three
    /// launches: `Pᵀ = W_inᵀ Cᵀ` (k×r, a reduction over the rows of `W_in`), `Q = A M` (d×r),
    /// then the rank-r update; `pt` and `q` keep `Pᵀ` and `Q`.
    #[allow(clippy::too_many_arguments)]
    fn apply_left<T: Activation>(
        &self,
        dev: &CudaDevice,
        m: View<'_, f32>,
        w_in: View<'_, T>,
        w_out: View<'_, T>,
        sign: f32,
        pt: View<'_, f32>,
        q: View<'_, f32>,
        scratch: &CudaSlice<f32>,
    ) -> Result<()> {
        col_reduce(dev, w_in, self.ct(), 1.0, 0.0, pt, scratch)?;
        small_gemm(dev, 1.0, self.a(), m, 0.0, q)?;
        merge_apply(dev, w_in, w_out, sign, q, pt.t())
    }

    /// `W_out = W_in + sign (W_in A M) C`: `W exp(±G)` by Prop. 1 (the right factor of App. B
    /// eq. 22) with `m = φ1(±Z)`. Three launches: `L1 = W_in A` (a row pass, d×r),
    /// `L2 = L1 M` (d×r), then the rank-r update.
    fn apply_right<T: Activation>(
        &self,
        dev: &CudaDevice,
        m: View<'_, f32>,
        (w_in, w_out): (View<'_, T>, View<'_, T>),
        sign: f32,
        l1: View<'_, f32>,
        l2: View<'_, f32>,
    ) -> Result<()> {
        rows_fused(
            dev,
            &RowPass {
                input: w_in,
                base: None,
                out: None,
                cm: self.a().t(),
                mm: None,
                m_scale: 1.0,
                am: None,
                v_out: Some(l1),
                t_out: None,
            },
        )?;
        small_gemm(dev, 1.0, l1, m, 0.0, l2)?;
        merge_apply(dev, w_in, w_out, sign, l2, self.ct().t())
    }
}

fn no_b() -> ElraError {
    ElraError::invalid("which", "this adapter has no factor B (ELRA-PSD: G = ηAAᵀ)")
}

/// The N×r f32 intermediates of one row pass of a generator (eq. 5): `v = C u`, `t = M v` of
/// the forward and `T̄`, `V̄` of the backward.
struct RowsTape<'a> {
    v: View<'a, f32>,
    t: View<'a, f32>,
    tbar: View<'a, f32>,
    vbar: View<'a, f32>,
}

// ---------------------------------------------------------------------------------------------
// The r×r work of a layer's generators
// ---------------------------------------------------------------------------------------------

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

    /// A batch of the same shape as `self` (for `φ1(−Z)` of an unmerge).
    fn like(&self, dev: &CudaDevice) -> Result<Self> {
        Self::new(dev, self.z.batch(), self.z.rows())
    }

    fn slot(m: &DeviceMatrices<f32>, slot: usize) -> View<'_, f32> {
        let r = m.rows();
        View::at(m.slice(), slot * r * r, r, r)
    }

    /// `e^Z` and `M = φ1(Z)` of every matrix (Prop. 1), one batched launch.
    fn phi(&mut self, dev: &CudaDevice) -> Result<()> {
        launch_expm_phi1(dev, &self.z, &mut self.e, &mut self.m, &mut self.status_fwd)
    }

    /// `Z̄ = L_φ1(Zᵀ, M̄)` of every matrix, one batched launch.
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

    /// Reads the statuses of the launches (synchronises); `what` names the forward's function.
    fn check(&self, dev: &CudaDevice, what: &str) -> Result<()> {
        check_status(dev, &self.status_fwd, self.z.batch(), what, "z")?;
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

/// The generators of a layer (one for ELRA, left and right for double-sided ELRA) at one step:
/// their factors and gradients, the [`GeneratorSpec`] of the step, and their r×r matrices, in one
/// batch per rank so that φ1 and its adjoint take one launch per rank.
struct Generators {
    names: &'static [[&'static str; 3]],
    gens: Vec<Gen>,
    rr: Vec<RrBatch>,
    spec: GeneratorSpec,
    /// Whether `C`, `Z` and `M` are those of the current parameters and spec.
    prepared: bool,
}

impl Generators {
    /// Generators from checked starting values, named `names[i]` (`[a, b, eta]` of each side);
    /// `uses_b` says whether the variant has `B`.
    fn new(
        dev: &CudaDevice,
        names: &'static [[&'static str; 3]],
        sides: &[SideInit<'_>],
        uses_b: bool,
        spec: GeneratorSpec,
    ) -> Result<Self> {
        let mut rr: Vec<RrBatch> = Vec::new();
        let mut ranks: Vec<(usize, usize)> = Vec::new();
        let mut slots = Vec::new();
        for (i, side) in sides.iter().enumerate() {
            let (n, r) = side.a.shape();
            side.check(names[i], n, r, uses_b)?;
            match ranks.iter_mut().position(|(rank, _)| *rank == r) {
                Some(g) => {
                    slots.push((g, ranks[g].1));
                    ranks[g].1 += 1;
                }
                None => {
                    slots.push((ranks.len(), 0));
                    ranks.push((r, 1));
                }
            }
        }
        for &(r, batch) in &ranks {
            rr.push(RrBatch::new(dev, batch, r)?);
        }
        let gens = sides
            .iter()
            .zip(slots)
            .map(|(side, (group, slot))| Gen::new(dev, side, group, slot))
            .collect::<Result<_>>()?;
        Ok(Generators {
            names,
            gens,
            rr,
            spec,
            prepared: false,
        })
    }

    /// Moves to the spec of another step (eq. 19, App. H); the r×r work is redone before use.
    fn set_spec(&mut self, spec: GeneratorSpec) {
        self.spec = spec;
        self.prepared = false;
    }

    /// The largest rank.
    fn max_rank(&self) -> usize {
        self.gens.iter().map(|g| g.r).max().unwrap_or(1)
    }

    /// `M = φ1(Z)` of generator `i`.
    fn m(&self, i: usize) -> View<'_, f32> {
        let g = &self.gens[i];
        RrBatch::slot(&self.rr[g.group].m, g.slot)
    }

    /// `M̄` of generator `i`.
    fn mbar(&self, i: usize) -> View<'_, f32> {
        let g = &self.gens[i];
        RrBatch::slot(&self.rr[g.group].mbar, g.slot)
    }

    /// The r×r work of a step (Algorithm 1 lines 4–5) for every generator: `C` (eq. 19),
    /// `Z = CA`, the Grams when λ > 0 (eq. 21), then `M = φ1(Z)` in one batched launch per rank
    /// (Prop. 1). Asynchronous.
    fn prepare(&mut self, dev: &CudaDevice, scratch: &CudaSlice<f32>) -> Result<()> {
        let grams = self.spec.lambda > 0.0;
        for g in &self.gens {
            let z = RrBatch::slot(&self.rr[g.group].z, g.slot);
            g.prepare(dev, &self.spec, z, grams, scratch)?;
        }
        for b in &mut self.rr {
            b.phi(dev)?;
        }
        self.prepared = true;
        Ok(())
    }

    /// The end of every backward: `Z̄ = L_φ1(Zᵀ, M̄)` in one batched launch per rank, then each
    /// generator's [`Gen::finish`] (eq. 19–21, Prop. 1). Asynchronous.
    fn backward_tail(&mut self, dev: &CudaDevice) -> Result<()> {
        for b in &mut self.rr {
            b.adjoint(dev)?;
        }
        for g in &self.gens {
            let zbar = RrBatch::slot(&self.rr[g.group].zbar, g.slot);
            g.finish(dev, &self.spec, zbar)?;
        }
        Ok(())
    }

    /// `φ1(−Z)` of every generator into `neg` (batches shaped like `self.rr`): `−Z = −CA`, then
    /// one batched launch per rank (Prop. 3 with Prop. 1). Asynchronous.
    fn phi_neg(
        &self,
        dev: &CudaDevice,
        neg: &mut [RrBatch],
        scratch: &CudaSlice<f32>,
    ) -> Result<()> {
        for g in &self.gens {
            g.neg_z(dev, RrBatch::slot(&neg[g.group].z, g.slot), scratch)?;
        }
        for b in neg {
            b.phi(dev)?;
        }
        Ok(())
    }

    /// Reads the statuses of the r×r launches (synchronises).
    fn check_status(&self, dev: &CudaDevice) -> Result<()> {
        self.rr
            .iter()
            .try_for_each(|b| b.check(dev, "phi1(Z) of the layer"))
    }

    /// `‖G‖²_F` summed over the generators (eq. 21; double-sided `‖L‖²_F + ‖R‖²_F`).
    fn frobenius_sq(&self, dev: &CudaDevice, scratch: &CudaSlice<f32>) -> Result<f64> {
        self.gens.iter().map(|g| g.frobenius_sq(dev, scratch)).sum()
    }

    /// The parameters in [`Adapter::params`] order: `[a, b, eta]` per generator, without `b`
    /// for ELRA-PSD, with the generator and factor each one is.
    fn entries(&self) -> Vec<(ParamSpec, usize, Factor)> {
        let mut v = Vec::new();
        for (i, (g, names)) in self.gens.iter().zip(self.names).enumerate() {
            v.push((ParamSpec::factor(names[0], g.n, g.r), i, Factor::A));
            if g.b.is_some() {
                v.push((ParamSpec::factor(names[1], g.r, g.n), i, Factor::B));
            }
            v.push((ParamSpec::step_size(names[2]), i, Factor::Eta));
        }
        v
    }

    /// [`Adapter::params`].
    fn params(&self) -> Vec<ParamSpec> {
        self.entries().into_iter().map(|(p, _, _)| p).collect()
    }

    /// The entry of parameter `index` (errors out of range).
    fn entry(&self, index: usize) -> Result<(ParamSpec, usize, Factor)> {
        let entries = self.entries();
        let specs: Vec<ParamSpec> = entries.iter().map(|e| e.0).collect();
        param_spec(&specs, index)?;
        Ok(entries[index])
    }

    /// A copy of parameter `index` (synchronises).
    fn param(&self, dev: &CudaDevice, index: usize) -> Result<DMatrix<f32>> {
        let (p, g, f) = self.entry(index)?;
        download(dev, self.gens[g].param_buf(f)?, p.rows, p.cols)
    }

    /// Replaces parameter `index` (checked: shape, finite, η > 0); the r×r work is redone.
    fn set_param(&mut self, dev: &CudaDevice, index: usize, v: &DMatrix<f32>) -> Result<()> {
        let (p, g, f) = self.entry(index)?;
        self.gens[g].set(dev, &p, f, v)?;
        self.prepared = false;
        Ok(())
    }

    /// The gradient of parameter `index` from the last backward (synchronises).
    fn grad(&self, dev: &CudaDevice, index: usize) -> Result<DMatrix<f32>> {
        let (p, g, f) = self.entry(index)?;
        download(dev, self.gens[g].grad_buf(f)?, p.rows, p.cols)
    }

    /// `(A, C)` of every generator at the last prepared step (synchronises).
    fn factors(&self, dev: &CudaDevice) -> Result<Vec<(DMatrix<f32>, DMatrix<f32>)>> {
        self.gens
            .iter()
            .map(|g| {
                let a = download(dev, &g.a, g.n, g.r)?;
                let ct = download(dev, &g.ct, g.n, g.r)?;
                Ok((a, ct.transpose()))
            })
            .collect()
    }

    /// Overwrites every gradient buffer with `value` (tests poison them with NaN).
    fn fill_grads(&mut self, dev: &CudaDevice, value: f32) -> Result<()> {
        for g in &mut self.gens {
            for s in [&mut g.abar, &mut g.cbar_t, &mut g.etabar]
                .into_iter()
                .chain(g.bbar.as_mut())
            {
                let len = s.len();
                dev.stream().memcpy_htod(&vec![value; len], s)?;
            }
        }
        Ok(())
    }
}
