//! Double-sided ELRA (App. B, eq. 22–26): `W_new = exp(L) W0 exp(R)` with a d×d generator
//! `L = A_L C_L` acting on the left and a k×k generator `R = A_R C_R` on the right.
//!
//! Both exponentials go through the Woodbury form (Prop. 1), so only r_L×r_L and r_R×r_R
//! matrices are exponentiated. The variants are those of the single-sided layer applied to each
//! side (eq. 23 general, eq. 24 PSD, eq. 25 Hyb). For the Hyb gate this crate follows the main
//! text (eq. 19, α decaying 1 → 0 from PSD to general); App. B eq. (25) writes the roles of α
//! swapped, see `DESIGN.md`.
#![allow(non_snake_case)]

use nalgebra::DMatrix;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::config::{check_eta, GeneratorConfig, GeneratorSpec};
use super::generator::{check_left_factor, Variant};
use super::layer::GeneratorEval;
use super::{check_batch, check_dims, check_weight, finite_output, xavier_uniform, TrainState};
use crate::grad::{DoubleTape, FactorGrad};
use crate::linalg::{check_finite, Real};
use crate::{ElraError, Result};

/// Configuration of a [`DoubleSidedLayer`] (App. B eq. 23–26): one [`GeneratorConfig`] for both
/// generators (variant, η₀ of both sides, λ applied to `‖L‖²_F + ‖R‖²_F`, τ applied to each
/// generator, the α schedule and η multiplier), the shape, the two ranks and the seed.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleSidedConfig {
    /// Settings shared by `L` and `R` (eq. 23–25, App. H); `generator.eta` is the initial
    /// η_L = η_R (set them apart with [`DoubleSidedLayer::set_etas`]).
    pub generator: GeneratorConfig,
    /// Output dimension `d` (size of `L`).
    pub d: usize,
    /// Input dimension `k` (size of `R`).
    pub k: usize,
    /// Rank of the left generator, `1 ≤ r_left ≤ d`.
    pub r_left: usize,
    /// Rank of the right generator, `1 ≤ r_right ≤ k`.
    pub r_right: usize,
    /// Seed of the Xavier initialisation in [`DoubleSidedLayer::new`].
    pub seed: u64,
}

impl DoubleSidedConfig {
    /// App. H defaults ([`GeneratorConfig::paper_default`]) with `r_L = r_R = r` (App. B
    /// "r_L = r_R = r by default").
    pub fn new(variant: Variant, d: usize, k: usize, r: usize, total_steps: usize) -> Self {
        DoubleSidedConfig {
            generator: GeneratorConfig::paper_default(variant, total_steps),
            d,
            k,
            r_left: r,
            r_right: r,
            seed: 0,
        }
    }

    /// Checks the fields; errors name `d`, `k`, `r_left`, `r_right`, `eta`, `lambda`, `tau`,
    /// `alpha` or `gamma`.
    pub fn validate(&self) -> Result<()> {
        check_dims(self.d, self.k, self.r_left, "r_left", self.d)?;
        check_dims(self.d, self.k, self.r_right, "r_right", self.k)?;
        self.generator.validate()
    }

    /// Trainable matrix entries: `2 r_L d + 2 r_R k` (general, Hyb) or `r_L d + r_R k` (PSD).
    pub fn param_count(&self) -> usize {
        let m = if self.generator.variant.uses_b() {
            2
        } else {
            1
        };
        m * (self.r_left * self.d + self.r_right * self.k)
    }
}

/// One side's factors: `A` (n×r) and `B` (r×n, absent for PSD).
#[derive(Debug, Clone, PartialEq)]
struct Side<T: Real> {
    a: DMatrix<T>,
    b: Option<DMatrix<T>>,
    eta: T,
}

/// `W_new = exp(L) W0 exp(R)` (App. B eq. 22).
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleSidedLayer<T: Real> {
    config: DoubleSidedConfig,
    w0: DMatrix<T>,
    left: Side<T>,
    right: Side<T>,
    step: usize,
    /// Tape and gradients of the [`crate::adapter::Adapter`] training calls
    /// (`crate::grad::double`).
    pub(crate) train: TrainState<DoubleTape<T>, (FactorGrad<T>, FactorGrad<T>)>,
}

fn check_side<T: Real>(
    variant: Variant,
    a_arg: &'static str,
    b_arg: &'static str,
    a: &DMatrix<T>,
    b: Option<&DMatrix<T>>,
    n: usize,
    r: usize,
) -> Result<()> {
    check_a(a_arg, a, n, r)?;
    match (variant.uses_b(), b) {
        (true, Some(b)) => check_b(variant, b_arg, b, n, r),
        (true, None) => Err(ElraError::invalid(
            b_arg,
            format!("variant {variant} needs this factor"),
        )),
        (false, Some(_)) => Err(ElraError::invalid(b_arg, "ELRA-PSD has no factor B")),
        (false, None) => Ok(()),
    }
}

fn check_a<T: Real>(arg: &'static str, a: &DMatrix<T>, n: usize, r: usize) -> Result<()> {
    if a.shape() != (n, r) {
        return Err(ElraError::shape(arg, (n, r), a.shape()));
    }
    check_left_factor(arg, a)?;
    Ok(())
}

/// [`check_eta`] naming the side's argument.
fn check_side_eta<T: Real>(arg: &'static str, eta: T) -> Result<()> {
    check_eta(eta).map_err(|e| match e {
        ElraError::InvalidArgument { reason, .. } => ElraError::InvalidArgument { arg, reason },
        other => other,
    })
}

fn check_b<T: Real>(
    variant: Variant,
    arg: &'static str,
    b: &DMatrix<T>,
    n: usize,
    r: usize,
) -> Result<()> {
    if !variant.uses_b() {
        return Err(ElraError::invalid(arg, "ELRA-PSD has no factor B"));
    }
    if b.shape() != (r, n) {
        return Err(ElraError::shape(arg, (r, n), b.shape()));
    }
    check_finite(arg, b)
}

impl<T: Real> DoubleSidedLayer<T> {
    /// Xavier-uniform factors on both sides (App. H), seeded by `config.seed`.
    ///
    /// Errors: invalid config, `w0` not d×k or non-finite.
    pub fn new(config: DoubleSidedConfig, w0: DMatrix<T>) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let (d, k, rl, rr) = (config.d, config.k, config.r_left, config.r_right);
        let a_l = xavier_uniform(&mut rng, d, rl);
        let b_l = config
            .generator
            .variant
            .uses_b()
            .then(|| xavier_uniform(&mut rng, rl, d));
        let a_r = xavier_uniform(&mut rng, k, rr);
        let b_r = config
            .generator
            .variant
            .uses_b()
            .then(|| xavier_uniform(&mut rng, rr, k));
        Self::from_factors(config, w0, (a_l, b_l), (a_r, b_r))
    }

    /// A layer from given factors: `left = (A_L d×r_L, B_L r_L×d)`,
    /// `right = (A_R k×r_R, B_R r_R×k)`; `B`s are `None` for ELRA-PSD.
    ///
    /// Errors: invalid config; factors or `w0` of the wrong shape or non-finite.
    pub fn from_factors(
        config: DoubleSidedConfig,
        w0: DMatrix<T>,
        left: (DMatrix<T>, Option<DMatrix<T>>),
        right: (DMatrix<T>, Option<DMatrix<T>>),
    ) -> Result<Self> {
        config.validate()?;
        check_weight("w0", &w0, config.d, config.k)?;
        let v = config.generator.variant;
        check_side(
            v,
            "a_left",
            "b_left",
            &left.0,
            left.1.as_ref(),
            config.d,
            config.r_left,
        )?;
        check_side(
            v,
            "a_right",
            "b_right",
            &right.0,
            right.1.as_ref(),
            config.k,
            config.r_right,
        )?;
        Ok(DoubleSidedLayer {
            left: Side {
                a: left.0,
                b: left.1,
                eta: T::of(config.generator.eta),
            },
            right: Side {
                a: right.0,
                b: right.1,
                eta: T::of(config.generator.eta),
            },
            w0,
            step: 0,
            config,
            train: TrainState::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DoubleSidedConfig {
        &self.config
    }

    /// Moves to optimiser step `t` (α and the η multiplier follow their schedules).
    pub fn set_step(&mut self, step: usize) {
        self.step = step;
        self.train.invalidate();
    }

    /// The frozen weight `W0` (d×k).
    pub fn w0(&self) -> &DMatrix<T> {
        &self.w0
    }

    /// Replaces `W0`, keeping the parameters and the step. Errors: not d×k or non-finite.
    pub fn set_w0(&mut self, w0: DMatrix<T>) -> Result<()> {
        check_weight("w0", &w0, self.config.d, self.config.k)?;
        self.w0 = w0;
        self.train.invalidate();
        Ok(())
    }

    /// α at the current step (eq. 19 convention: 1 = PSD, 0 = general).
    pub fn alpha(&self) -> f64 {
        self.config.generator.alpha_at(self.step)
    }

    /// The settings of the current step shared by `L` and `R` ([`GeneratorConfig::spec_at`]):
    /// α, the η multiplier, τ (applied to each generator) and λ (applied to
    /// `‖L‖²_F + ‖R‖²_F`).
    pub fn spec(&self) -> GeneratorSpec {
        self.config.generator.spec_at(self.step)
    }

    /// Replaces `(η_L, η_R)`. Errors: either not finite and > 0.
    pub fn set_etas(&mut self, eta_left: T, eta_right: T) -> Result<()> {
        check_eta(eta_left)?;
        check_eta(eta_right)?;
        self.left.eta = eta_left;
        self.right.eta = eta_right;
        self.train.invalidate();
        Ok(())
    }

    /// The current optimiser step (α schedule of eq. 19/75, η multiplier of App. H).
    pub fn step(&self) -> usize {
        self.step
    }

    /// `A_L` (d×r_L), the left factor of the left generator `L` (eq. 22–25).
    pub fn a_left(&self) -> &DMatrix<T> {
        &self.left.a
    }

    /// `B_L` (r_L×d) of the left generator (eq. 23, 25); `None` for ELRA-PSD (eq. 24).
    pub fn b_left(&self) -> Option<&DMatrix<T>> {
        self.left.b.as_ref()
    }

    /// η_L > 0 (before the multiplier), the step size of `L` (eq. 23–25).
    pub fn eta_left(&self) -> T {
        self.left.eta
    }

    /// `A_R` (k×r_R), the left factor of the right generator `R` (eq. 22–25).
    pub fn a_right(&self) -> &DMatrix<T> {
        &self.right.a
    }

    /// `B_R` (r_R×k) of the right generator (eq. 23, 25); `None` for ELRA-PSD (eq. 24).
    pub fn b_right(&self) -> Option<&DMatrix<T>> {
        self.right.b.as_ref()
    }

    /// η_R > 0 (before the multiplier), the step size of `R` (eq. 23–25).
    pub fn eta_right(&self) -> T {
        self.right.eta
    }

    /// Replaces `A_L` (eq. 22–25). Errors (as [`from_factors`](Self::from_factors)):
    /// `a_left` not d×r_L or non-finite.
    pub fn set_a_left(&mut self, a: DMatrix<T>) -> Result<()> {
        check_a("a_left", &a, self.config.d, self.config.r_left)?;
        self.left.a = a;
        self.train.invalidate();
        Ok(())
    }

    /// Replaces `B_L` (eq. 23, 25). Errors: ELRA-PSD (no `B`, eq. 24), `b_left` not r_L×d or
    /// non-finite.
    pub fn set_b_left(&mut self, b: DMatrix<T>) -> Result<()> {
        let (v, n, r) = (
            self.config.generator.variant,
            self.config.d,
            self.config.r_left,
        );
        check_b(v, "b_left", &b, n, r)?;
        self.left.b = Some(b);
        self.train.invalidate();
        Ok(())
    }

    /// Replaces η_L. Errors: `eta_left` not finite and > 0 (eq. 2 applied to `L`).
    pub fn set_eta_left(&mut self, eta: T) -> Result<()> {
        check_side_eta("eta_left", eta)?;
        self.left.eta = eta;
        self.train.invalidate();
        Ok(())
    }

    /// Replaces `A_R` (eq. 22–25). Errors: `a_right` not k×r_R or non-finite.
    pub fn set_a_right(&mut self, a: DMatrix<T>) -> Result<()> {
        check_a("a_right", &a, self.config.k, self.config.r_right)?;
        self.right.a = a;
        self.train.invalidate();
        Ok(())
    }

    /// Replaces `B_R` (eq. 23, 25). Errors: ELRA-PSD (no `B`, eq. 24), `b_right` not r_R×k or
    /// non-finite.
    pub fn set_b_right(&mut self, b: DMatrix<T>) -> Result<()> {
        let (v, n, r) = (
            self.config.generator.variant,
            self.config.k,
            self.config.r_right,
        );
        check_b(v, "b_right", &b, n, r)?;
        self.right.b = Some(b);
        self.train.invalidate();
        Ok(())
    }

    /// Replaces η_R. Errors: `eta_right` not finite and > 0 (eq. 2 applied to `R`).
    pub fn set_eta_right(&mut self, eta: T) -> Result<()> {
        check_side_eta("eta_right", eta)?;
        self.right.eta = eta;
        self.train.invalidate();
        Ok(())
    }

    fn eval(&self, side: &Side<T>) -> Result<GeneratorEval<T>> {
        let m = T::of(self.config.generator.eta_multiplier.at(self.step));
        GeneratorEval::evaluate(
            self.config.generator.variant,
            &side.a,
            side.b.as_ref(),
            side.eta * m,
            self.alpha(),
            self.config.generator.tau,
        )
    }

    /// The left (d×d) and right (k×k) generators of the current step in Woodbury form
    /// (eq. 23–25, Prop. 1), each clipped by τ when set.
    pub fn generators(&self) -> Result<(GeneratorEval<T>, GeneratorEval<T>)> {
        Ok((self.eval(&self.left)?, self.eval(&self.right)?))
    }

    /// `(‖L‖²_F, ‖R‖²_F)` from r×r Grams (eq. 21 applied to each side).
    pub fn energies(&self) -> Result<(T, T)> {
        let (l, r) = self.generators()?;
        Ok((
            l.action.generator().frobenius_norm_sq(),
            r.action.generator().frobenius_norm_sq(),
        ))
    }

    /// `"elra-double"`, `"elra-psd-double"` or `"elra-hyb-double"`.
    pub fn name(&self) -> &'static str {
        match self.config.generator.variant {
            Variant::General => "elra-double",
            Variant::Psd => "elra-psd-double",
            Variant::Hyb => "elra-hyb-double",
        }
    }

    /// `Y = X exp(R)ᵀ W0ᵀ exp(L)ᵀ`: Woodbury on the rows twice (Prop. 1, eq. 5).
    pub fn forward(&self, x: &DMatrix<T>) -> Result<DMatrix<T>> {
        check_batch(x, self.config.k)?;
        let (l, r) = self.generators()?;
        let xr = r.action.rows(x)?;
        let u = xr * self.w0.transpose();
        finite_output("y", l.action.rows(&u)?)
    }

    /// `exp(L) (W0 exp(R))` (eq. 22) via Prop. 1 on both sides.
    pub fn merge(&self) -> Result<DMatrix<T>> {
        let (l, r) = self.generators()?;
        finite_output("w_new", l.action.left(&r.action.right(&self.w0)?)?)
    }

    /// `exp(−L) W_new exp(−R)` (Prop. 3 on both sides). Errors: `w_new` not d×k or non-finite.
    pub fn unmerge(&self, w_new: &DMatrix<T>) -> Result<DMatrix<T>> {
        check_weight("w_new", w_new, self.config.d, self.config.k)?;
        let (l, r) = self.generators()?;
        let inner = r.action.inverse()?.right(w_new)?;
        finite_output("w0", l.action.inverse()?.left(&inner)?)
    }

    /// Trainable matrix entries: `2 r_L d + 2 r_R k` (general, Hyb) or `r_L d + r_R k` (PSD).
    pub fn param_count(&self) -> usize {
        self.config.param_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn double_sided_matches_dense() {
        let mut rng = ChaCha8Rng::seed_from_u64(31);
        let mut m = |r: usize, c: usize| DMatrix::from_fn(r, c, |_, _| rng.random_range(-1.0..1.0));
        let (d, k) = (8, 11);
        let w0 = m(d, k);
        let x = m(3, k);
        for variant in [Variant::General, Variant::Psd, Variant::Hyb] {
            let mut cfg = DoubleSidedConfig::new(variant, d, k, 2, 40);
            cfg.r_right = 3;
            cfg.generator.tau = None;
            let mut layer = DoubleSidedLayer::new(cfg, w0.clone()).unwrap();
            layer.set_etas(0.6, 0.9).unwrap();
            layer.set_step(3);
            let (l, r) = layer.generators().unwrap();
            let dl = l.action.generator().a() * l.c();
            let dr = r.action.generator().a() * r.c();
            let dense = dl.exp() * &w0 * dr.exp();
            let merged = layer.merge().unwrap();
            assert!((&merged - &dense).norm() <= 1e-13 * dense.norm());
            let y = layer.forward(&x).unwrap();
            let yd = &x * dense.transpose();
            assert!((y - &yd).norm() <= 1e-13 * yd.norm());
            let back = layer.unmerge(&merged).unwrap();
            assert!((back - &w0).norm() <= 1e-13 * w0.norm());
            let pc = if variant == Variant::Psd {
                2 * d + 3 * k
            } else {
                2 * (2 * d + 3 * k)
            };
            assert_eq!(crate::adapter::Adapter::param_count(&layer), pc);
        }
    }
}
