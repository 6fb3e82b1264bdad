//! The generators of a GPU layer on the device: one generator `G = A C` ([`Gen`]: its factors,
//! the effective `Cᵀ` of eq. 19, the Grams of eq. 21, its gradients, and the row and weight
//! passes of `exp(±AC)` by Prop. 1), and the r×r work of all generators of a layer at one step
//! ([`Generators`]: `Z = CA`, `M = φ1(Z)` and its adjoint, batched per rank).
#![allow(non_snake_case)]

use cudarc::driver::CudaSlice;
use nalgebra::DMatrix;

use super::{download, got, upload, upload_into, zeros, Base, Calls};
use crate::adapter::{param_spec, Energy, Factors, GeneratorConfig, GeneratorSpec, ParamSpec};
use crate::cuda::kernels::{check_status, launch_expm_phi1, launch_phi1_adjoint};
use crate::cuda::skinny::{
    check_rank, col_reduce, col_reduce_scratch, factor_backward, factor_c, merge_apply, rows_fused,
    small_gemm, FactorBackward, RowPass, View,
};
use crate::cuda::{Activation, CudaDevice, DeviceMatrices};
use crate::linalg::check_finite;
use crate::{ElraError, Result};

// ---------------------------------------------------------------------------------------------
// One generator on the device
// ---------------------------------------------------------------------------------------------

/// Which parameter of a generator (eq. 2, eq. 19): the factor `A`, the factor `B`, or η.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Factor {
    A,
    B,
    Eta,
}

/// One generator `G = A C` (A n×r, eq. 2 / §4.2.1 / eq. 19) on the device with its gradients.
pub(super) struct Gen {
    pub(super) n: usize,
    pub(super) r: usize,
    pub(super) a: CudaSlice<f32>,
    pub(super) b: Option<CudaSlice<f32>>,
    pub(super) eta: CudaSlice<f32>,
    /// `Cᵀ` (n×r).
    pub(super) ct: CudaSlice<f32>,
    /// Grams `S = AᵀA`, `K = CCᵀ` (r×r), computed when λ > 0 or on demand.
    pub(super) s: CudaSlice<f32>,
    pub(super) k: CudaSlice<f32>,
    pub(super) abar: CudaSlice<f32>,
    pub(super) cbar_t: CudaSlice<f32>,
    pub(super) bbar: Option<CudaSlice<f32>>,
    pub(super) etabar: CudaSlice<f32>,
    /// Which r×r batch and slot hold this generator's Z, M, M̄, Z̄.
    pub(super) group: usize,
    pub(super) slot: usize,
}

/// The starting values of one generator: `A` (n×r), `B` (r×n, `None` for ELRA-PSD) and η.
pub(super) struct SideInit<'a> {
    pub(super) a: &'a DMatrix<f32>,
    pub(super) b: Option<&'a DMatrix<f32>>,
    pub(super) eta: f32,
}

impl SideInit<'_> {
    /// Checks the values against a generator of size `n`, rank `r` (1..=[`MAX_RANK`](crate::cuda::MAX_RANK)) and a
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

pub(super) fn check_factor(
    arg: &'static str,
    m: &DMatrix<f32>,
    rows: usize,
    cols: usize,
) -> Result<()> {
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
    pub(super) fn new(
        dev: &CudaDevice,
        init: &SideInit<'_>,
        group: usize,
        slot: usize,
    ) -> Result<Self> {
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

    pub(super) fn a(&self) -> View<'_, f32> {
        View::mat(&self.a, self.n, self.r)
    }
    pub(super) fn ct(&self) -> View<'_, f32> {
        View::mat(&self.ct, self.n, self.r)
    }
    pub(super) fn abar(&self) -> View<'_, f32> {
        View::mat(&self.abar, self.n, self.r)
    }
    pub(super) fn cbar_t(&self) -> View<'_, f32> {
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
    pub(super) fn scratch_need(&self) -> usize {
        col_reduce_scratch(self.n, self.r, self.r)
    }

    /// `Cᵀ` (eq. 19), `Z = C A` into its batch slot, and the Grams of eq. (21) when asked.
    pub(super) fn prepare(
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
    pub(super) fn frobenius_sq(&self, dev: &CudaDevice, scratch: &CudaSlice<f32>) -> Result<f64> {
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
                accumulate: false,
            },
        )
    }

    /// Forward row pass of `exp(A C)` on rows (eq. 5): `out = in + A M C in`, keeping `v`, `t`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rows_forward<T: Activation>(
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
    pub(super) fn rows_backward<T: Activation>(
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
    pub(super) fn apply_left<T: Activation>(
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
    pub(super) fn apply_right<T: Activation>(
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
pub(super) struct RowsTape<'a> {
    pub(super) v: View<'a, f32>,
    pub(super) t: View<'a, f32>,
    pub(super) tbar: View<'a, f32>,
    pub(super) vbar: View<'a, f32>,
}

// ---------------------------------------------------------------------------------------------
// The r×r work of a layer's generators
// ---------------------------------------------------------------------------------------------

/// The r×r matrices of a batch of generators of one rank: `Z`, `e^Z`, `M = φ1(Z)`, `M̄`, `Z̄`,
/// and the statuses of the forward and adjoint launches.
pub(super) struct RrBatch {
    pub(super) z: DeviceMatrices<f32>,
    pub(super) e: DeviceMatrices<f32>,
    pub(super) m: DeviceMatrices<f32>,
    pub(super) mbar: DeviceMatrices<f32>,
    pub(super) zbar: DeviceMatrices<f32>,
    pub(super) status_fwd: CudaSlice<i32>,
    pub(super) status_bwd: CudaSlice<i32>,
    pub(super) ran_bwd: bool,
}

impl RrBatch {
    pub(super) fn new(dev: &CudaDevice, batch: usize, r: usize) -> Result<Self> {
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
    pub(super) fn like(&self, dev: &CudaDevice) -> Result<Self> {
        Self::new(dev, self.z.batch(), self.z.rows())
    }

    pub(super) fn slot(m: &DeviceMatrices<f32>, slot: usize) -> View<'_, f32> {
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
pub(super) struct Generators {
    pub(super) names: &'static [[&'static str; 3]],
    pub(super) gens: Vec<Gen>,
    pub(super) rr: Vec<RrBatch>,
    pub(super) spec: GeneratorSpec,
    /// Whether `C`, `Z` and `M` are those of the current parameters and spec.
    pub(super) prepared: bool,
}

impl Generators {
    /// Generators from checked starting values, named `names[i]` (`[a, b, eta]` of each side);
    /// `uses_b` says whether the variant has `B`.
    pub(super) fn new(
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
    pub(super) fn set_spec(&mut self, spec: GeneratorSpec) {
        self.spec = spec;
        self.prepared = false;
    }

    /// The largest rank.
    pub(super) fn max_rank(&self) -> usize {
        self.gens.iter().map(|g| g.r).max().unwrap_or(1)
    }

    /// `M = φ1(Z)` of generator `i`.
    pub(super) fn m(&self, i: usize) -> View<'_, f32> {
        let g = &self.gens[i];
        RrBatch::slot(&self.rr[g.group].m, g.slot)
    }

    /// `M̄` of generator `i`.
    pub(super) fn mbar(&self, i: usize) -> View<'_, f32> {
        let g = &self.gens[i];
        RrBatch::slot(&self.rr[g.group].mbar, g.slot)
    }

    /// The r×r work of a step (Algorithm 1 lines 4–5) for every generator: `C` (eq. 19),
    /// `Z = CA`, the Grams when λ > 0 (eq. 21), then `M = φ1(Z)` in one batched launch per rank
    /// (Prop. 1). Asynchronous.
    pub(super) fn prepare(&mut self, dev: &CudaDevice, scratch: &CudaSlice<f32>) -> Result<()> {
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
    pub(super) fn backward_tail(&mut self, dev: &CudaDevice) -> Result<()> {
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
    pub(super) fn phi_neg(
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
    pub(super) fn check_status(&self, dev: &CudaDevice) -> Result<()> {
        self.rr
            .iter()
            .try_for_each(|b| b.check(dev, "phi1(Z) of the layer"))
    }

    /// `‖G‖²_F` summed over the generators (eq. 21; double-sided `‖L‖²_F + ‖R‖²_F`).
    pub(super) fn frobenius_sq(&self, dev: &CudaDevice, scratch: &CudaSlice<f32>) -> Result<f64> {
        self.gens.iter().map(|g| g.frobenius_sq(dev, scratch)).sum()
    }

    /// The parameters in [`Adapter::params`](crate::adapter::Adapter::params) order: `[a, b, eta]` per generator, without `b`
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

    /// [`Adapter::params`](crate::adapter::Adapter::params).
    pub(super) fn params(&self) -> Vec<ParamSpec> {
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
    pub(super) fn param(&self, dev: &CudaDevice, index: usize) -> Result<DMatrix<f32>> {
        let (p, g, f) = self.entry(index)?;
        download(dev, self.gens[g].param_buf(f)?, p.rows, p.cols)
    }

    /// Replaces parameter `index` (checked: shape, finite, η > 0); the r×r work is redone.
    pub(super) fn set_param(
        &mut self,
        dev: &CudaDevice,
        index: usize,
        v: &DMatrix<f32>,
    ) -> Result<()> {
        let (p, g, f) = self.entry(index)?;
        self.gens[g].set(dev, &p, f, v)?;
        self.prepared = false;
        Ok(())
    }

    /// The gradient of parameter `index` from the last backward (synchronises).
    pub(super) fn grad(&self, dev: &CudaDevice, index: usize) -> Result<DMatrix<f32>> {
        let (p, g, f) = self.entry(index)?;
        download(dev, self.gens[g].grad_buf(f)?, p.rows, p.cols)
    }

    /// The gradient buffers in [`Self::params`] order, named `"{param} gradient"` as the CPU
    /// layers name them (for the overflow rule of [`Calls::verify`]).
    pub(super) fn grad_views(&self) -> Vec<(String, View<'_, f32>)> {
        let view = |(p, g, f): (ParamSpec, usize, Factor)| {
            let buf = self.gens[g].grad_buf(f).ok()?;
            Some((
                format!("{} gradient", p.name),
                View::mat(buf, p.rows, p.cols),
            ))
        };
        self.entries().into_iter().filter_map(view).collect()
    }

    /// `(A, C)` of every generator at the last prepared step (synchronises).
    pub(super) fn factors(&self, dev: &CudaDevice) -> Result<Vec<Factors<f32>>> {
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
    pub(super) fn fill_grads(&mut self, dev: &CudaDevice, value: f32) -> Result<()> {
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

/// The [`Adapter`](crate::adapter::Adapter) methods the two ELRA layers share through their
/// [`Generators`]: the r×r work of a step, parameters, step, gradients, energy and generator
/// factors (the `generator_calls!` methods of their `impl Adapter`).
pub(super) trait GenCalls<T: Activation>: Calls<T> {
    fn gens(&self) -> &Generators;
    /// The layer's `Base` and its generators, borrowed together.
    fn parts_mut(&mut self) -> (&Base<T>, &mut Generators);
    /// The layer's generator settings (eq. 2, eq. 19–20, App. H).
    fn generator_config(&self) -> &GeneratorConfig;

    fn gens_mut(&mut self) -> &mut Generators {
        self.parts_mut().1
    }

    /// The reduction scratch (allocated by [`Self::gen_prepare`] and the layer's calls).
    fn scratch(&self) -> Result<&CudaSlice<f32>> {
        got(&self.base().scratch)
    }

    /// The r×r work of a step (Algorithm 1 lines 4–5): `C` (eq. 19), `Z = CA`, the Grams when
    /// λ > 0 (eq. 21) and `M = φ1(Z)` in one batched launch per rank (Prop. 1), after growing the
    /// reduction scratch. Asynchronous.
    fn gen_prepare(&mut self) -> Result<()> {
        self.ensure_scratch(1)?;
        let (base, gens) = self.parts_mut();
        gens.prepare(&base.dev, got(&base.scratch)?)
    }

    /// Runs [`Self::gen_prepare`] unless the r×r work of the step is current.
    fn ensure_prepared(&mut self) -> Result<()> {
        if !self.gens().prepared {
            self.gen_prepare()?;
        }
        Ok(())
    }

    /// [`Adapter::param`](crate::adapter::Adapter::param): downloads parameter `index`
    /// (synchronises).
    fn gen_param(&self, index: usize) -> Result<DMatrix<f32>> {
        self.gens().param(&self.base().dev, index)
    }

    /// [`Adapter::set_param`](crate::adapter::Adapter::set_param): uploads parameter `index`
    /// (ordered on the device's stream); the r×r work is redone and the tape discarded.
    fn gen_set_param(&mut self, index: usize, value: &DMatrix<f32>) -> Result<()> {
        let dev = self.base().dev.clone();
        self.gens_mut().set_param(&dev, index, value)?;
        self.base_mut().train.invalidate();
        Ok(())
    }

    /// [`Adapter::set_step`](crate::adapter::Adapter::set_step): the spec of `step`
    /// (`spec_at(step)` without the clip; eq. 19, eq. 75, App. H) for every generator.
    fn gen_set_step(&mut self, step: usize) -> Result<()> {
        let spec = self.generator_config().spec_at(step).require_no_clip()?;
        self.gens_mut().set_spec(spec);
        self.base_mut().set_step(step);
        Ok(())
    }

    /// [`Adapter::grad`](crate::adapter::Adapter::grad): after a backward, checks the r×r
    /// statuses of the step and downloads the gradient (synchronises).
    fn gen_grad(&self, index: usize) -> Result<DMatrix<f32>> {
        self.base().train.grads()?;
        self.statuses()?;
        self.gens().grad(&self.base().dev, index)
    }

    /// [`Adapter::energy`](crate::adapter::Adapter::energy): `‖G‖²_F = tr((AᵀA)(CCᵀ))` summed
    /// over the generators (eq. 21) and `λ‖G‖²_F` (eq. 20); synchronises.
    fn gen_energy(&mut self) -> Result<Option<Energy>> {
        self.ensure_prepared()?;
        let f = self
            .gens()
            .frobenius_sq(&self.base().dev, self.scratch()?)?;
        Energy::checked(f, self.gens().spec.lambda * f)
    }

    /// [`Adapter::generator_factors`](crate::adapter::Adapter::generator_factors): `(A, C)` of
    /// every generator at the last forward (synchronises).
    fn gen_factors(&self) -> Result<Vec<Factors<f32>>> {
        self.base().train.tape()?;
        self.gens().factors(&self.base().dev)
    }
}
