//! [`GpuElraLayer`]: single-sided ELRA on the GPU, `y = x W_newᵀ` with `W_new = exp(A C) W0`
//! (eq. 3) on the Woodbury (eq. 5) or merged (eq. 30) route — the GPU twin of
//! [`crate::adapter::ElraLayer`].

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use nalgebra::DMatrix;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{
    choose_route, ensure, ensure_mat, got, mat, scratch_for, upload_matrix, Base, Calls, GenCalls,
    Generators, RowsTape, RrBatch, SideInit,
};
use crate::adapter::{xavier_uniform, Adapter, ElraConfig, ElraLayer, GeneratorSpec};
use crate::cuda::kernels::check_status;
use crate::cuda::skinny::{col_reduce, rows_fused, small_gemm, RowPass, View};
use crate::cuda::{gemm, Activation, CudaDevice, DeviceMatrices, Transpose};
use crate::grad::Route;
use crate::{ElraError, Result};

/// The parameter names of the one generator: `a`, `b`, `eta`.
const NAMES: &[[&str; 3]] = &[["a", "b", "eta"]];

/// Activation tapes and scratch of a single-sided layer for one batch size.
#[derive(Default)]
struct Work<T: Activation> {
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
    /// Merged route: `Pᵀ` (k×r), `Q = A M` (d×r), `Q̄` (d×r), `∂Pᵀ` (k×r).
    pt: Option<CudaSlice<f32>>,
    q: Option<CudaSlice<f32>>,
    qbar: Option<CudaSlice<f32>>,
    pbar_t: Option<CudaSlice<f32>>,
    /// `Pᵀ` and `Q` of merge and unmerge (kept apart from the forward's, which a backward reads).
    merge_pt: Option<CudaSlice<f32>>,
    merge_q: Option<CudaSlice<f32>>,
}

/// The single-sided ELRA layer on the GPU: `y = x W_newᵀ`, `W_new = exp(A C) W0` (eq. 3, 5, 30)
/// for general (α = 0), PSD (α = 1, no `B`) and Hyb (α of its schedule) generators (eq. 19).
///
/// It implements [`Adapter`] (and [`GpuAdapter`](super::GpuAdapter)) over [`DeviceMatrices`]: the same training
/// step as the CPU layer (set the step, forward, backward with the same `x`, read the
/// gradients, set the parameters), with the parameters, tape and gradients on the device. The
/// settings of a step are `config.generator.spec_at(step)` without the clip
/// ([`GeneratorSpec::require_no_clip`]). A device-side optimiser can use [`Self::params_mut`]
/// and [`Self::grad_slices`] instead of the host copies of [`Adapter::param`] and
/// [`Adapter::grad`].
pub struct GpuElraLayer<T: Activation> {
    base: Base<T>,
    config: ElraConfig,
    /// The route of the forward; `None` picks it per batch with [`choose_route`].
    route: Option<Route>,
    gens: Generators,
    /// `φ1(−Z)` of the last unmerge.
    rr_neg: Option<RrBatch>,
    work: Work<T>,
}

gpu_layer!(GpuElraLayer, generators, extra: route);

impl<T: Activation> GpuElraLayer<T> {
    /// A layer on `dev` with frozen `w0` (d×k on the device) and the CPU's initialisation
    /// ([`ElraLayer::new`] in f32): Xavier-uniform `A` (d×r) and `B` (r×d, not for PSD) drawn from
    /// `config.seed` (App. H), `η = config.generator.eta`, step 0.
    ///
    /// Errors: invalid config, the spectral clip asked for (`tau` set), r above
    /// [`MAX_RANK`](crate::cuda::MAX_RANK), `w0` not d×k on `dev`.
    pub fn new(dev: Arc<CudaDevice>, config: ElraConfig, w0: DeviceMatrices<T>) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let a: DMatrix<f32> = xavier_uniform(&mut rng, config.d, config.r);
        let b: Option<DMatrix<f32>> = config
            .variant()
            .uses_b()
            .then(|| xavier_uniform(&mut rng, config.r, config.d));
        Self::from_factors(dev, config, w0, &a, b.as_ref())
    }

    /// A layer with given factors `A` (d×r) and `B` (r×d; `None` for ELRA-PSD) at step 0 with
    /// `η = config.generator.eta` (eq. 2, §4.2.1, eq. 19).
    ///
    /// Errors: as [`Self::new`]; factors of the wrong shape or non-finite, `b` missing or given
    /// against the variant.
    pub fn from_factors(
        dev: Arc<CudaDevice>,
        config: ElraConfig,
        w0: DeviceMatrices<T>,
        a: &DMatrix<f32>,
        b: Option<&DMatrix<f32>>,
    ) -> Result<Self> {
        let eta = config.generator.eta as f32;
        Self::build(dev, config, w0, SideInit { a, b, eta }, 0)
    }

    /// The GPU copy of a CPU [`ElraLayer`] at its step: `W0` rounded to `T`, `A`, `B`, η, the
    /// config and the step (so α, the η multiplier and λ are those of
    /// [`ElraLayer::spec`]). Errors when the layer uses the spectral clip.
    pub fn from_layer(dev: Arc<CudaDevice>, layer: &ElraLayer<f32>) -> Result<Self> {
        let w0 = upload_matrix::<T>(&dev, &layer.w0().map(f64::from))?;
        let init = SideInit {
            a: layer.a(),
            b: layer.b(),
            eta: layer.eta(),
        };
        Self::build(dev, layer.config().clone(), w0, init, layer.step())
    }

    fn build(
        dev: Arc<CudaDevice>,
        config: ElraConfig,
        w0: DeviceMatrices<T>,
        init: SideInit<'_>,
        step: usize,
    ) -> Result<Self> {
        config.validate()?;
        let dk = (config.d, config.k);
        let (base, spec) = Base::at_step(dev, w0, dk, &config.generator, step)?;
        if init.a.ncols() != config.r {
            return Err(ElraError::shape("a", (config.d, config.r), init.a.shape()));
        }
        let uses_b = config.variant().uses_b();
        let gens = Generators::new(&base.dev, NAMES, &[init], uses_b, spec)?;
        Ok(GpuElraLayer {
            base,
            config,
            route: None,
            gens,
            rr_neg: None,
            work: Work::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ElraConfig {
        &self.config
    }

    /// The settings of the current step: α, the η multiplier and λ (eq. 19–20, App. H).
    pub fn spec(&self) -> GeneratorSpec {
        self.gens.spec
    }

    /// The route of [`Adapter::forward`]: `Some` fixes it, `None` (the default) lets
    /// [`choose_route`] pick the cheaper one for each batch.
    pub fn route(&self) -> Option<Route> {
        self.route
    }

    /// Sets the route of the next forwards (Woodbury, eq. 5, or merged, eq. 30); both are exact.
    pub fn set_route(&mut self, route: Option<Route>) {
        self.route = route;
    }

    /// Device parameters `(A d×r, B r×d, η)` for an optimiser on the device. The r×r work is
    /// redone before the next forward and the tape is discarded.
    pub fn params_mut(
        &mut self,
    ) -> (
        &mut CudaSlice<f32>,
        Option<&mut CudaSlice<f32>>,
        &mut CudaSlice<f32>,
    ) {
        self.gens.prepared = false;
        self.base.train.invalidate();
        let g = &mut self.gens.gens[0];
        (&mut g.a, g.b.as_mut(), &mut g.eta)
    }

    /// Device parameters `(A d×r, B r×d, η)`, for reading.
    pub fn param_slices(&self) -> (&CudaSlice<f32>, Option<&CudaSlice<f32>>, &CudaSlice<f32>) {
        let g = &self.gens.gens[0];
        (&g.a, g.b.as_ref(), &g.eta)
    }

    /// Device gradients `(∂A d×r, ∂B r×d, ∂η)` of the last backward.
    pub fn grad_slices(&self) -> (&CudaSlice<f32>, Option<&CudaSlice<f32>>, &CudaSlice<f32>) {
        let g = &self.gens.gens[0];
        (&g.abar, g.bbar.as_ref(), &g.etabar)
    }

    /// Overwrites the gradient buffers with `value` (tests poison them with NaN).
    pub fn fill_grads(&mut self, value: f32) -> Result<()> {
        self.gens.fill_grads(&self.base.dev, value)
    }

    /// The r×r work of a step (Algorithm 1 lines 4–5): `C` (eq. 19), `Z = CA`, the Grams when
    /// λ > 0, and `M = φ1(Z)` in one batched launch (Prop. 1). Asynchronous; forward, merge and
    /// unmerge run it when the parameters or the step changed.
    pub fn prepare(&mut self) -> Result<()> {
        self.gen_prepare()
    }

    /// Reads the statuses of the r×r launches (synchronises): errors name a non-finite `Z`,
    /// an overflow of φ1 (Prop. 1), of its adjoint, or of `φ1(−Z)` of the last unmerge.
    pub fn check_status(&self) -> Result<()> {
        self.gens.check_status(&self.base.dev)?;
        match &self.rr_neg {
            Some(neg) => check_status(
                &self.base.dev,
                &neg.status_fwd,
                1,
                "phi1(−Z) of the unmerge",
                "z",
            ),
            None => Ok(()),
        }
    }

    /// `y = x W_newᵀ` (eq. 3) on `route` for `x` (N×k) into `y` (N×d), keeping the tape:
    /// Woodbury (eq. 5: cuBLAS then one fused row pass) or merged (eq. 30: `W_eff` then one
    /// cuBLAS GEMM). Prepares the r×r work first when the parameters changed. Asynchronous.
    fn forward_on(
        &mut self,
        x: &DeviceMatrices<T>,
        y: &mut DeviceMatrices<T>,
        route: Route,
    ) -> Result<()> {
        let n = x.rows();
        self.ensure_prepared()?;
        self.ensure_scratch(n)?;
        let (d, k, r) = (self.config.d, self.config.k, self.config.r);
        let dev: &CudaDevice = &self.base.dev;
        let w = &mut self.work;
        ensure(dev, &mut w.v, n * r)?;
        ensure(dev, &mut w.t, n * r)?;
        w.n = n;
        w.route = Some(route);
        let gen = &self.gens.gens[0];
        let m = self.gens.m(0);
        match route {
            Route::Woodbury => {
                ensure_mat(dev, &mut w.u, n, d)?;
                let u = w.u.as_mut().ok_or_else(|| ElraError::Cuda("tape".into()))?;
                self.base.frozen(x, u)?;
                gen.rows_forward(
                    dev,
                    m,
                    mat(got(&w.u)?),
                    mat(y),
                    View::mat(got(&w.v)?, n, r),
                    View::mat(got(&w.t)?, n, r),
                )
            }
            Route::Merged => {
                // W_eff = W0 + (A M)(C W0) (eq. 30), keeping Pᵀ and Q = A M for the backward.
                ensure(dev, &mut w.pt, k * r)?;
                ensure(dev, &mut w.q, d * r)?;
                ensure_mat(dev, &mut w.weff, d, k)?;
                let weff = got(&w.weff)?;
                gen.apply_left(
                    dev,
                    m,
                    mat(&self.base.w0),
                    mat(weff),
                    1.0,
                    View::mat(got(&w.pt)?, k, r),
                    View::mat(got(&w.q)?, d, r),
                    got(&self.base.scratch)?,
                )?;
                gemm(dev, 1.0, x, Transpose::No, weff, Transpose::Yes, 0.0, y)
            }
        }
    }

    /// The merge/unmerge work buffers: `Pᵀ` (k×r), `Q` (d×r), scratch.
    fn ensure_merge(&mut self) -> Result<()> {
        self.ensure_prepared()?;
        self.ensure_scratch(1)?;
        let (d, k, r) = (self.config.d, self.config.k, self.config.r);
        ensure(&self.base.dev, &mut self.work.merge_pt, k * r)?;
        ensure(&self.base.dev, &mut self.work.merge_q, d * r)
    }
}

impl<T: Activation> Adapter for GpuElraLayer<T> {
    type Scalar = f32;
    type Matrix = DeviceMatrices<T>;

    fn name(&self) -> &'static str {
        self.config.generator.variant.name()
    }
    generator_calls!();
    adapter_calls! {
        forward: "eq. 5 (Woodbury) or eq. 30 (merged) on [`Self::route`]; asynchronous. No dropout.",
        backward: "Reverse mode on the kept tape (Algorithm 1 line 12); asynchronous.",
        merge: "`W_new = W0 + A (M (C W0))` (eq. 30) into `out`; asynchronous.",
        unmerge: "`W0 = exp(−G) W_new = W_new − A (φ1(−Z) (C W_new))` (Prop. 3 with Prop. 1) into \
                  `out`; asynchronous, `φ1(−Z)` is one more batched launch whose status \
                  [`Self::check_status`] reads.",
    }
}

impl<T: Activation> Calls<T> for GpuElraLayer<T> {
    fn grad_outputs(&self) -> Vec<(String, View<'_, f32>)> {
        self.gens.grad_views()
    }
    fn scratch_need(&self, n: usize) -> usize {
        let (d, k, r) = (self.config.d, self.config.k, self.config.r);
        let sizes = [(n, d, r), (n, k, r), (d, k, r), (n, r, r), (d, r, r)];
        scratch_for(&sizes, &[self.gens.gens[0].scratch_need()])
    }
    /// On [`Self::route`], or the cheaper route for this batch ([`choose_route`]).
    fn run_forward(&mut self, x: &DeviceMatrices<T>, y: &mut DeviceMatrices<T>) -> Result<()> {
        let (d, k, r) = (self.config.d, self.config.k, self.config.r);
        let route = self
            .route
            .unwrap_or_else(|| choose_route(x.rows(), d, k, r, T::BYTES));
        self.forward_on(x, y, route)
    }

    /// Reverse mode of the last forward on its route (module docs of [`super`];
    /// [`crate::grad::elra_backward_parts`] without the clip): `∂x` into `dx` and the gradients
    /// of `(A, B, η)` including `λ‖G‖²_F` (eq. 20). Asynchronous.
    fn run_backward(
        &mut self,
        x: &DeviceMatrices<T>,
        dy: &DeviceMatrices<T>,
        dx: &mut DeviceMatrices<T>,
    ) -> Result<()> {
        let dev: &CudaDevice = &self.base.dev;
        let route = self
            .work
            .route
            .ok_or_else(|| ElraError::invalid("self", "backward before forward"))?;
        let n = self.work.n;
        let (d, k, r) = (self.config.d, self.config.k, self.config.r);
        let w = &mut self.work;
        ensure(dev, &mut w.tbar, n * r)?;
        ensure(dev, &mut w.vbar, n * r)?;
        let gen = &self.gens.gens[0];
        let (m, mbar) = (self.gens.m(0), self.gens.mbar(0));
        match route {
            Route::Woodbury => {
                ensure_mat(dev, &mut w.ubar, n, d)?;
                let rows = RowsTape {
                    v: View::mat(got(&w.v)?, n, r),
                    t: View::mat(got(&w.t)?, n, r),
                    tbar: View::mat(got(&w.tbar)?, n, r),
                    vbar: View::mat(got(&w.vbar)?, n, r),
                };
                let ubar = got(&w.ubar)?;
                let u = mat(got(&w.u)?);
                let scratch = got(&self.base.scratch)?;
                gen.rows_backward(dev, m, u, mat(dy), mat(ubar), &rows, mbar, scratch)?;
                self.base.frozen_back(ubar, dx)?;
            }
            Route::Merged => {
                ensure(dev, &mut w.qbar, d * r)?;
                ensure(dev, &mut w.pbar_t, k * r)?;
                let scratch = got(&self.base.scratch)?;
                gemm(
                    dev,
                    1.0,
                    dy,
                    Transpose::No,
                    got(&w.weff)?,
                    Transpose::No,
                    0.0,
                    dx,
                )?;
                let q = View::mat(got(&w.q)?, d, r);
                let pt = View::mat(got(&w.pt)?, k, r);
                let s = View::mat(got(&w.tbar)?, n, r);
                let v = View::mat(got(&w.vbar)?, n, r);
                let qbar = View::mat(got(&w.qbar)?, d, r);
                let pbar_t = View::mat(got(&w.pbar_t)?, k, r);
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
                rows_fused(dev, &v_only(mat(dy), q.t(), s))?;
                rows_fused(dev, &v_only(mat(x), pt.t(), v))?;
                // Q̄ = ∂yᵀ v, ∂Pᵀ = xᵀ s
                col_reduce(dev, mat(dy), v, 1.0, 0.0, qbar, scratch)?;
                col_reduce(dev, mat(x), s, 1.0, 0.0, pbar_t, scratch)?;
                // C̄ᵀ = W0 ∂Pᵀ (a pass over the rows of W0)
                rows_fused(dev, &v_only(mat(&self.base.w0), pbar_t.t(), gen.cbar_t()))?;
                // Ā = Q̄ Mᵀ, M̄ = Aᵀ Q̄
                small_gemm(dev, 1.0, qbar, m.t(), 0.0, gen.abar())?;
                col_reduce::<f32>(dev, gen.a(), qbar, 1.0, 0.0, mbar, scratch)?;
            }
        }
        self.gens.backward_tail(dev)
    }

    /// `W_new = W0 + A (M (C W0))` (eq. 30) into `out`; asynchronous.
    fn run_merge(&mut self, out: &mut DeviceMatrices<T>) -> Result<()> {
        self.ensure_merge()?;
        let (d, k, r) = (self.config.d, self.config.k, self.config.r);
        let w = &self.work;
        self.gens.gens[0].apply_left(
            &self.base.dev,
            self.gens.m(0),
            mat(&self.base.w0),
            mat(out),
            1.0,
            View::mat(got(&w.merge_pt)?, k, r),
            View::mat(got(&w.merge_q)?, d, r),
            got(&self.base.scratch)?,
        )
    }

    /// `W0 = exp(−G) W_new = W_new − A (φ1(−Z) (C W_new))` (Prop. 3 with Prop. 1) into `out`;
    /// asynchronous, `φ1(−Z)` is one more batched launch whose status [`Self::check_status`]
    /// reads.
    fn run_unmerge(
        &mut self,
        w_new: &DeviceMatrices<T>,
        out: &mut DeviceMatrices<T>,
    ) -> Result<()> {
        let (d, k, r) = (self.config.d, self.config.k, self.config.r);
        self.ensure_merge()?;
        if self.rr_neg.is_none() {
            self.rr_neg = Some(self.gens.rr[0].like(&self.base.dev)?);
        }
        let neg = self
            .rr_neg
            .as_mut()
            .ok_or_else(|| ElraError::Cuda("rr_neg".into()))?;
        let w = &self.work;
        let scratch = got(&self.base.scratch)?;
        self.gens
            .phi_neg(&self.base.dev, std::slice::from_mut(neg), scratch)?;
        self.gens.gens[0].apply_left(
            &self.base.dev,
            RrBatch::slot(&neg.m, 0),
            mat(w_new),
            mat(out),
            -1.0,
            View::mat(got(&w.merge_pt)?, k, r),
            View::mat(got(&w.merge_q)?, d, r),
            scratch,
        )
    }
}
