//! [`GpuDoubleSidedLayer`]: double-sided ELRA on the GPU, `W_new = exp(L) W0 exp(R)` (App. B
//! eq. 22) — the GPU twin of [`crate::adapter::DoubleSidedLayer`].

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use nalgebra::DMatrix;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{
    ensure, ensure_mat, got, mat, scratch_for, upload_matrix, Base, Calls, GenCalls, Generators,
    RowsTape, RrBatch, SideInit,
};
use crate::adapter::{
    xavier_uniform, Adapter, DoubleSidedConfig, DoubleSidedLayer, GeneratorSpec, Variant,
};
use crate::cuda::kernels::check_status;
use crate::cuda::skinny::View;
use crate::cuda::{Activation, CudaDevice, DeviceMatrices};
use crate::{ElraError, Result};

/// The parameter names of the left and the right generator.
const NAMES: &[[&str; 3]] = &[
    ["a_left", "b_left", "eta_left"],
    ["a_right", "b_right", "eta_right"],
];
/// Index of the left (`L`, d×d) and the right (`R`, k×k) generator.
const LEFT: usize = 0;
const RIGHT: usize = 1;

/// Double-sided ELRA on the GPU (App. B eq. 22): `W_new = exp(L) W0 exp(R)`,
/// `y = ((x exp(R)ᵀ) W0ᵀ) exp(L)ᵀ` — the right row pass on `x`, the frozen GEMM, the left row
/// pass (Woodbury route on both sides). Both generators use the spec of the step (as
/// [`crate::grad::double_forward_parts`]); their φ1 (and adjoints) run in one batched launch when
/// `r_L = r_R`. It implements [`Adapter`] over [`DeviceMatrices`] like [`super::GpuElraLayer`].
pub struct GpuDoubleSidedLayer<T: Activation> {
    base: Base<T>,
    config: DoubleSidedConfig,
    gens: Generators,
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
}

gpu_layer!(GpuDoubleSidedLayer, generators);

impl<T: Activation> GpuDoubleSidedLayer<T> {
    /// A layer on `dev` with frozen `w0` (d×k on the device) and the CPU's initialisation
    /// ([`DoubleSidedLayer::new`] in f32): Xavier-uniform factors of both sides (App. H) from
    /// `config.seed`, `η_L = η_R = config.generator.eta`, step 0.
    ///
    /// Errors: invalid config, the spectral clip asked for, a rank above
    /// [`MAX_RANK`](crate::cuda::MAX_RANK), `w0` not d×k on `dev`.
    pub fn new(
        dev: Arc<CudaDevice>,
        config: DoubleSidedConfig,
        w0: DeviceMatrices<T>,
    ) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let (d, k, rl, rr) = (config.d, config.k, config.r_left, config.r_right);
        let uses_b = config.generator.variant.uses_b();
        let a_l: DMatrix<f32> = xavier_uniform(&mut rng, d, rl);
        let b_l: Option<DMatrix<f32>> = uses_b.then(|| xavier_uniform(&mut rng, rl, d));
        let a_r: DMatrix<f32> = xavier_uniform(&mut rng, k, rr);
        let b_r: Option<DMatrix<f32>> = uses_b.then(|| xavier_uniform(&mut rng, rr, k));
        Self::from_factors(dev, config, w0, (&a_l, b_l.as_ref()), (&a_r, b_r.as_ref()))
    }

    /// A layer from given factors: `left = (A_L d×r_L, B_L r_L×d)`, `right = (A_R k×r_R,
    /// B_R r_R×k)` (`B`s `None` for ELRA-PSD), `η_L = η_R = config.generator.eta`, step 0
    /// (App. B eq. 23–25).
    ///
    /// Errors: as [`Self::new`]; factors of the wrong shape or non-finite (arguments `a_left`,
    /// `b_left`, …).
    pub fn from_factors(
        dev: Arc<CudaDevice>,
        config: DoubleSidedConfig,
        w0: DeviceMatrices<T>,
        left: (&DMatrix<f32>, Option<&DMatrix<f32>>),
        right: (&DMatrix<f32>, Option<&DMatrix<f32>>),
    ) -> Result<Self> {
        let eta = config.generator.eta as f32;
        let sides = [
            SideInit {
                a: left.0,
                b: left.1,
                eta,
            },
            SideInit {
                a: right.0,
                b: right.1,
                eta,
            },
        ];
        Self::build(dev, config, w0, &sides, 0)
    }

    /// The GPU copy of a CPU [`DoubleSidedLayer`] at its step (`W0` rounded to `T`, both sides'
    /// factors and η). Errors when the layer uses the spectral clip.
    pub fn from_layer(dev: Arc<CudaDevice>, layer: &DoubleSidedLayer<f32>) -> Result<Self> {
        let w0 = upload_matrix::<T>(&dev, &layer.w0().map(f64::from))?;
        let sides = [
            SideInit {
                a: layer.a_left(),
                b: layer.b_left(),
                eta: layer.eta_left(),
            },
            SideInit {
                a: layer.a_right(),
                b: layer.b_right(),
                eta: layer.eta_right(),
            },
        ];
        Self::build(dev, layer.config().clone(), w0, &sides, layer.step())
    }

    fn build(
        dev: Arc<CudaDevice>,
        config: DoubleSidedConfig,
        w0: DeviceMatrices<T>,
        sides: &[SideInit<'_>; 2],
        step: usize,
    ) -> Result<Self> {
        config.validate()?;
        let dk = (config.d, config.k);
        let (base, spec) = Base::at_step(dev, w0, dk, &config.generator, step)?;
        for (side, (n, r, arg)) in sides.iter().zip([
            (config.d, config.r_left, "a_left"),
            (config.k, config.r_right, "a_right"),
        ]) {
            if side.a.shape() != (n, r) {
                return Err(ElraError::shape(arg, (n, r), side.a.shape()));
            }
        }
        let uses_b = config.generator.variant.uses_b();
        let gens = Generators::new(&base.dev, NAMES, sides, uses_b, spec)?;
        Ok(GpuDoubleSidedLayer {
            base,
            config,
            gens,
            n: 0,
            xr: None,
            u: None,
            ubar: None,
            xrbar: None,
            nr: (0..8).map(|_| None).collect(),
            dr: None,
            dr2: None,
            kr: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DoubleSidedConfig {
        &self.config
    }

    /// The settings of the current step, shared by both sides (eq. 19–20, App. H).
    pub fn spec(&self) -> GeneratorSpec {
        self.gens.spec
    }

    /// Device parameters of `(left, right)`: `(A, B, η)` each; the r×r work is redone before
    /// the next forward and the tape is discarded.
    #[allow(clippy::type_complexity)]
    pub fn params_mut(
        &mut self,
    ) -> [(
        &mut CudaSlice<f32>,
        Option<&mut CudaSlice<f32>>,
        &mut CudaSlice<f32>,
    ); 2] {
        self.gens.prepared = false;
        self.base.train.invalidate();
        let (l, r) = self.gens.gens.split_at_mut(RIGHT);
        let (l, r) = (&mut l[LEFT], &mut r[0]);
        [
            (&mut l.a, l.b.as_mut(), &mut l.eta),
            (&mut r.a, r.b.as_mut(), &mut r.eta),
        ]
    }

    /// The r×r work of both sides (eq. 19, Prop. 1), φ1 batched. Asynchronous.
    pub fn prepare(&mut self) -> Result<()> {
        self.gen_prepare()
    }

    /// Reads the statuses of the r×r launches (synchronises).
    pub fn check_status(&self) -> Result<()> {
        self.gens.check_status(&self.base.dev)
    }

    /// `W_out = W_in + sign (W_in A_R M) C_R` (the right factor `W exp(±R)`; `m` is φ1(±Z_R)).
    fn right_apply(
        &self,
        m: View<'_, f32>,
        w_in: View<'_, T>,
        w_out: View<'_, T>,
        sign: f32,
    ) -> Result<()> {
        let (d, r) = (self.config.d, self.gens.gens[RIGHT].r);
        let l1 = View::mat(got(&self.dr)?, d, r);
        let l2 = View::mat(got(&self.dr2)?, d, r);
        self.gens.gens[RIGHT].apply_right(&self.base.dev, m, (w_in, w_out), sign, l1, l2)
    }

    /// `W_out = W_in + sign (A_L M)(C_L W_in)` (the left factor `exp(±L) W`).
    fn left_apply(
        &self,
        m: View<'_, f32>,
        w_in: View<'_, T>,
        w_out: View<'_, T>,
        sign: f32,
    ) -> Result<()> {
        let (d, k, r) = (self.config.d, self.config.k, self.gens.gens[LEFT].r);
        let pt = View::mat(got(&self.kr)?, k, r);
        let q = View::mat(got(&self.dr2)?, d, r);
        let scratch = got(&self.base.scratch)?;
        self.gens.gens[LEFT].apply_left(&self.base.dev, m, w_in, w_out, sign, pt, q, scratch)
    }

    fn ensure_merge(&mut self) -> Result<()> {
        self.ensure_prepared()?;
        self.ensure_scratch(1)?;
        let r = self.gens.max_rank();
        ensure(&self.base.dev, &mut self.dr, self.config.d * r)?;
        ensure(&self.base.dev, &mut self.dr2, self.config.d * r)?;
        ensure(&self.base.dev, &mut self.kr, self.config.k * r)
    }
}

/// The N×r intermediates of side `side` (0 left, 1 right) of rank `r`: slots `4·side + 0..4`.
fn rows_tape(
    nr: &[Option<CudaSlice<f32>>],
    side: usize,
    n: usize,
    r: usize,
) -> Result<RowsTape<'_>> {
    let v = |i: usize| -> Result<View<'_, f32>> { Ok(View::mat(got(&nr[4 * side + i])?, n, r)) };
    Ok(RowsTape {
        v: v(0)?,
        t: v(1)?,
        tbar: v(2)?,
        vbar: v(3)?,
    })
}

impl<T: Activation> Adapter for GpuDoubleSidedLayer<T> {
    type Scalar = f32;
    type Matrix = DeviceMatrices<T>;

    /// `"elra-double"`, `"elra-psd-double"` or `"elra-hyb-double"`, as the CPU layer.
    fn name(&self) -> &'static str {
        match self.config.generator.variant {
            Variant::General => "elra-double",
            Variant::Psd => "elra-psd-double",
            Variant::Hyb => "elra-hyb-double",
        }
    }
    generator_calls!();
    adapter_calls! {
        forward: "App. B eq. 22 through the Woodbury row pass on both sides; asynchronous. No dropout.",
        backward: "Reverse mode on the kept tape; asynchronous.",
        merge: "`W_new = exp(L) W0 exp(R)` (App. B eq. 22) into `out`, both factors by Prop. 1; \
                asynchronous.",
        unmerge: "`W0 = exp(−L) W_new exp(−R)` into `out` with the current parameters (Prop. 3 on \
                  each side; `φ1(−Z)` of both sides in one more batched launch when the ranks \
                  agree). Synchronises to check the statuses of that launch.",
    }
}

impl<T: Activation> Calls<T> for GpuDoubleSidedLayer<T> {
    fn grad_outputs(&self) -> Vec<(String, View<'_, f32>)> {
        self.gens.grad_views()
    }
    fn scratch_need(&self, n: usize) -> usize {
        let (d, k) = (self.config.d, self.config.k);
        let r = self.gens.max_rank();
        let sizes = [
            (n, d, r),
            (n, k, r),
            (n, r, r),
            (d, k, r),
            (d, r, r),
            (k, r, r),
        ];
        scratch_for(&sizes, &[])
    }

    /// `y = x W_newᵀ` (App. B eq. 22) for `x` (N×k) into `y` (N×d), keeping the tape.
    fn run_forward(&mut self, x: &DeviceMatrices<T>, y: &mut DeviceMatrices<T>) -> Result<()> {
        let n = x.rows();
        self.ensure_prepared()?;
        self.ensure_scratch(n)?;
        let (rl, rr) = (self.gens.gens[LEFT].r, self.gens.gens[RIGHT].r);
        for (i, slot) in self.nr.iter_mut().enumerate() {
            ensure(&self.base.dev, slot, n * if i < 4 { rl } else { rr })?;
        }
        ensure_mat(&self.base.dev, &mut self.xr, n, self.config.k)?;
        ensure_mat(&self.base.dev, &mut self.u, n, self.config.d)?;
        self.n = n;
        let dev: &CudaDevice = &self.base.dev;
        let (left, right) = (&self.gens.gens[LEFT], &self.gens.gens[RIGHT]);
        let tl = rows_tape(&self.nr, LEFT, n, left.r)?;
        let tr = rows_tape(&self.nr, RIGHT, n, right.r)?;
        let xr = got(&self.xr)?;
        right.rows_forward(dev, self.gens.m(RIGHT), mat(x), mat(xr), tr.v, tr.t)?;
        let u = self
            .u
            .as_mut()
            .ok_or_else(|| ElraError::Cuda("tape".into()))?;
        self.base.frozen(xr, u)?;
        let u = got(&self.u)?;
        left.rows_forward(dev, self.gens.m(LEFT), mat(u), mat(y), tl.v, tl.t)
    }

    /// Reverse mode of the last forward ([`crate::grad::double_backward_parts`] without the
    /// clip): `∂x` into `dx` and both sides' gradients. Asynchronous.
    fn run_backward(
        &mut self,
        x: &DeviceMatrices<T>,
        dy: &DeviceMatrices<T>,
        dx: &mut DeviceMatrices<T>,
    ) -> Result<()> {
        let n = self.n;
        ensure_mat(&self.base.dev, &mut self.ubar, n, self.config.d)?;
        ensure_mat(&self.base.dev, &mut self.xrbar, n, self.config.k)?;
        let dev: &CudaDevice = &self.base.dev;
        let scratch = got(&self.base.scratch)?;
        let (left, right) = (&self.gens.gens[LEFT], &self.gens.gens[RIGHT]);
        let tl = rows_tape(&self.nr, LEFT, n, left.r)?;
        let tr = rows_tape(&self.nr, RIGHT, n, right.r)?;
        let (u, ubar) = (mat(got(&self.u)?), got(&self.ubar)?);
        let (ml, mbar_l) = (self.gens.m(LEFT), self.gens.mbar(LEFT));
        left.rows_backward(dev, ml, u, mat(dy), mat(ubar), &tl, mbar_l, scratch)?;
        let xrbar = self
            .xrbar
            .as_mut()
            .ok_or_else(|| ElraError::Cuda("tape".into()))?;
        self.base.frozen_back(ubar, xrbar)?;
        let xrbar = got(&self.xrbar)?;
        let (mr, mbar_r) = (self.gens.m(RIGHT), self.gens.mbar(RIGHT));
        right.rows_backward(dev, mr, mat(x), mat(xrbar), mat(dx), &tr, mbar_r, scratch)?;
        self.gens.backward_tail(dev)
    }

    /// `W_new = exp(L) W0 exp(R)` (App. B eq. 22) into `out`, both factors by Prop. 1;
    /// asynchronous.
    fn run_merge(&mut self, out: &mut DeviceMatrices<T>) -> Result<()> {
        self.ensure_merge()?;
        self.right_apply(self.gens.m(RIGHT), mat(&self.base.w0), mat(out), 1.0)?;
        self.left_apply(self.gens.m(LEFT), mat(out), mat(out), 1.0)
    }
    /// `W0 = exp(−L) W_new exp(−R)` into `out` with the current parameters (Prop. 3 on each
    /// side; `φ1(−Z)` of both sides in one more batched launch when the ranks agree).
    /// Synchronises to check the statuses of that launch.
    fn run_unmerge(
        &mut self,
        w_new: &DeviceMatrices<T>,
        out: &mut DeviceMatrices<T>,
    ) -> Result<()> {
        self.ensure_merge()?;
        let mut neg: Vec<RrBatch> = self
            .gens
            .rr
            .iter()
            .map(|b| b.like(&self.base.dev))
            .collect::<Result<_>>()?;
        self.gens
            .phi_neg(&self.base.dev, &mut neg, got(&self.base.scratch)?)?;
        let slot = |i: usize| {
            let g = &self.gens.gens[i];
            RrBatch::slot(&neg[g.group].m, g.slot)
        };
        self.left_apply(slot(LEFT), mat(w_new), mat(out), -1.0)?;
        self.right_apply(slot(RIGHT), mat(out), mat(out), -1.0)?;
        // The temporary r×r batches are freed after the stream has used them.
        self.base.dev.synchronize()?;
        for b in &neg {
            check_status(
                &self.base.dev,
                &b.status_fwd,
                b.z.batch(),
                "phi1(−Z) of the unmerge",
                "z",
            )?;
        }
        Ok(())
    }
}
