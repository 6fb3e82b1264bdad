//! The ELRA layer on the CPU: `W_new = exp(G) W0` (eq. 3) with `G = A·C`, evaluated through the
//! Woodbury form (Prop. 1, eq. 5, Algorithm 1) so only r×r matrices go through φ1.
//!
//! With samples as rows (`X` N×k, frozen `W0` d×k) one forward pass is
//! `U = X W0ᵀ; V = U Cᵀ; T = V Mᵀ; Y = U + T Aᵀ` with `M = φ1(Z)`, `Z = C A`
//! (eq. 5 transposed: `u = W0x, v = Cu, t = Mv, y = u + At`). [`ElraLayer::forward_cached`]
//! keeps `U, V, T, C, Z, M` for the reverse mode.
#![allow(non_snake_case)]

use nalgebra::DMatrix;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::config::{check_eta, GeneratorConfig, GeneratorSpec};
use super::generator::{check_left_factor, generator_factor, ExpAction, LowRankGenerator, Variant};
use super::{check_batch, check_dims, check_weight, finite_output, xavier_uniform, TrainState};
use crate::grad::{ElraTape, FactorGrad};
use crate::linalg::{check_finite, Real};
use crate::{ElraError, Result};

/// Configuration of an [`ElraLayer`] (§3.2, §4.2, App. H): the shared [`GeneratorConfig`] plus
/// the layer's shape and seed.
#[derive(Debug, Clone, PartialEq)]
pub struct ElraConfig {
    /// Variant, η₀, λ, τ, α schedule and η multiplier (eq. 2, §4.2.1, eq. 19–20, App. H).
    pub generator: GeneratorConfig,
    /// Output dimension `d` (rows of `W0`, size of the generator).
    pub d: usize,
    /// Input dimension `k` (columns of `W0`).
    pub k: usize,
    /// Factor rank `r`, `1 ≤ r ≤ d`.
    pub r: usize,
    /// Seed of the ChaCha8 generator used by [`ElraLayer::new`] for the Xavier initialisation.
    pub seed: u64,
}

impl ElraConfig {
    /// The paper's defaults (App. H, [`GeneratorConfig::paper_default`]) for a d×k layer trained
    /// for `total_steps` steps: η₀ = 10⁻³, λ = 10⁻⁵, τ = 2.0, exponential α schedule with
    /// `T_warm` = 25 % and γ = 5, cosine η multiplier over `total_steps`, seed 0.
    pub fn new(variant: Variant, d: usize, k: usize, r: usize, total_steps: usize) -> Self {
        ElraConfig {
            generator: GeneratorConfig::paper_default(variant, total_steps),
            d,
            k,
            r,
            seed: 0,
        }
    }

    /// The generator family.
    pub fn variant(&self) -> Variant {
        self.generator.variant
    }

    /// Checks every field; errors name the field (`d`, `k`, `r`, `eta`, `lambda`, `tau`,
    /// `alpha`, `gamma`).
    pub fn validate(&self) -> Result<()> {
        check_dims(self.d, self.k, self.r, "r", self.d)?;
        self.generator.validate()
    }

    /// Trainable matrix entries (Remark 1): `2rd` for ELRA and ELRA-Hyb, `rd` for ELRA-PSD.
    pub fn param_count(&self) -> usize {
        match self.generator.variant {
            Variant::Psd => self.r * self.d,
            Variant::General | Variant::Hyb => 2 * self.r * self.d,
        }
    }
}

/// The generator of one step, evaluated once and shared by every minibatch of the step
/// (Algorithm 1 lines 4–5): the effective `C` (after the η multiplier and the spectral clip),
/// `Z = CA` and `M = φ1(Z)`.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratorEval<T: Real> {
    /// α used for the Hyb factor (eq. 19); 1 for PSD, 0 for general.
    pub alpha: f64,
    /// `η_eff = η · m(t)`.
    pub eta_eff: T,
    /// `min(1, τ/‖G‖₂)` applied to `C` (1 when not clipped or τ is `None`), App. H.
    pub clip_scale: T,
    /// `‖G‖₂` before clipping, when a threshold τ is set.
    pub raw_spectral_norm: Option<T>,
    /// `exp(G)` of the effective generator in Woodbury form (holds `A`, `C`, `Z`, `M`).
    pub action: ExpAction<T>,
}

impl<T: Real> GeneratorEval<T> {
    /// Algorithm 1 lines 4–5 for one generator: `C` of the variant (eq. 2, §4.2.1, eq. 19)
    /// with step size `eta_eff` and gate `alpha`, the spectral clip of App. H when `tau` is
    /// set, then `Z = CA` and `M = φ1(Z)` (Prop. 1).
    ///
    /// Errors: as [`generator_factor`]; `tau` not finite and > 0; φ1 failures.
    pub fn evaluate(
        variant: Variant,
        a: &DMatrix<T>,
        b: Option<&DMatrix<T>>,
        eta_eff: T,
        alpha: f64,
        tau: Option<f64>,
    ) -> Result<Self> {
        let raw = LowRankGenerator::from_variant(variant, a, b, eta_eff, alpha)?;
        let (g, clip_scale, raw_norm) = match tau {
            Some(tau) => {
                let (g, s, n) = raw.clipped(tau)?;
                (g, s, Some(n))
            }
            None => (raw, T::one(), None),
        };
        Ok(GeneratorEval {
            alpha,
            eta_eff,
            clip_scale,
            raw_spectral_norm: raw_norm,
            action: g.exp_action()?,
        })
    }

    /// The effective right factor `C` (r×d).
    pub fn c(&self) -> &DMatrix<T> {
        self.action.generator().c()
    }
    /// `Z = C A` (r×r).
    pub fn z(&self) -> &DMatrix<T> {
        self.action.z()
    }
    /// `M = φ1(Z)` (r×r).
    pub fn m(&self) -> &DMatrix<T> {
        self.action.m()
    }
    /// Whether the spectral clip was active.
    pub fn clipped(&self) -> bool {
        self.clip_scale < T::one()
    }
}

/// Everything one forward pass computed (Algorithm 1 lines 4–8), kept for the reverse mode.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardCache<T: Real> {
    /// The step's generator (`C`, `Z`, `M`, α, η, clip).
    pub generator: GeneratorEval<T>,
    /// `U = X W0ᵀ` (N×d).
    pub u: DMatrix<T>,
    /// `V = U Cᵀ` (N×r).
    pub v: DMatrix<T>,
    /// `T = V Mᵀ` (N×r).
    pub t: DMatrix<T>,
    /// `Y = U + T Aᵀ` (N×d).
    pub y: DMatrix<T>,
}

/// The inference cache of App. H: the r×k matrix `K = M C W0` so that
/// `Y = X W0ᵀ + (X Kᵀ) Aᵀ` costs two skinny products on top of the frozen layer.
#[derive(Debug, Clone, PartialEq)]
pub struct InferenceCache<T: Real> {
    a: DMatrix<T>,
    k: DMatrix<T>,
}

impl<T: Real> InferenceCache<T> {
    /// The left factor `A` (d×r).
    pub fn a(&self) -> &DMatrix<T> {
        &self.a
    }

    /// `K = M C W0` (r×k), App. H.
    pub fn k_matrix(&self) -> &DMatrix<T> {
        &self.k
    }

    /// `Y = X W0ᵀ + (X Kᵀ) Aᵀ` (App. H inference). Errors: `w0` not d×k, `x` without k columns.
    pub fn forward(&self, w0: &DMatrix<T>, x: &DMatrix<T>) -> Result<DMatrix<T>> {
        let (d, k) = (self.a.nrows(), self.k.ncols());
        check_weight("w0", w0, d, k)?;
        check_batch(x, k)?;
        let u = x * w0.transpose();
        let p = x * self.k.transpose();
        Ok(p * self.a.transpose() + u)
    }
}

/// A frozen d×k weight `W0` adapted by ELRA: `W_new = exp(G) W0` (eq. 3).
#[derive(Debug, Clone, PartialEq)]
pub struct ElraLayer<T: Real> {
    config: ElraConfig,
    w0: DMatrix<T>,
    a: DMatrix<T>,
    b: Option<DMatrix<T>>,
    eta: T,
    step: usize,
    /// Tape and gradients of the [`Adapter`] training calls (`crate::grad::elra`).
    pub(crate) train: TrainState<ElraTape<T>, FactorGrad<T>>,
}

impl<T: Real> ElraLayer<T> {
    /// A layer with Xavier-uniform factors (App. H "Xavier initialization for trainable low-rank
    /// factors"), seeded by `config.seed`, `η = config.generator.eta`, at step 0.
    ///
    /// Errors: invalid config ([`ElraConfig::validate`]), `w0` not d×k or non-finite.
    pub fn new(config: ElraConfig, w0: DMatrix<T>) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let a = xavier_uniform(&mut rng, config.d, config.r);
        let b = if config.generator.variant.uses_b() {
            Some(xavier_uniform(&mut rng, config.r, config.d))
        } else {
            None
        };
        Self::from_factors(config, w0, a, b)
    }

    /// A layer with given factors `A` (d×r) and `B` (r×d; `None` for ELRA-PSD), at step 0 with
    /// `η = config.generator.eta`.
    ///
    /// Errors: invalid config, `w0`/`a`/`b` of the wrong shape or non-finite, `b` given for
    /// ELRA-PSD or missing for the other variants.
    pub fn from_factors(
        config: ElraConfig,
        w0: DMatrix<T>,
        a: DMatrix<T>,
        b: Option<DMatrix<T>>,
    ) -> Result<Self> {
        config.validate()?;
        check_weight("w0", &w0, config.d, config.k)?;
        let mut layer = ElraLayer {
            eta: T::of(config.generator.eta),
            w0,
            a: DMatrix::zeros(config.d, config.r),
            b: None,
            step: 0,
            config,
            train: TrainState::default(),
        };
        check_eta(layer.eta)?;
        layer.set_a(a)?;
        match (layer.config.generator.variant.uses_b(), b) {
            (true, Some(b)) => layer.set_b(b)?,
            (true, None) => {
                return Err(ElraError::invalid(
                    "b",
                    format!(
                        "variant {} needs the factor B (r×d)",
                        layer.config.generator.variant
                    ),
                ))
            }
            (false, Some(_)) => {
                return Err(ElraError::invalid(
                    "b",
                    "ELRA-PSD has no factor B (G = ηAAᵀ)",
                ))
            }
            (false, None) => {}
        }
        Ok(layer)
    }

    /// The configuration.
    pub fn config(&self) -> &ElraConfig {
        &self.config
    }

    /// The frozen weight `W0` (d×k).
    pub fn w0(&self) -> &DMatrix<T> {
        &self.w0
    }

    /// The factor `A` (d×r).
    pub fn a(&self) -> &DMatrix<T> {
        &self.a
    }

    /// The factor `B` (r×d); `None` for ELRA-PSD.
    pub fn b(&self) -> Option<&DMatrix<T>> {
        self.b.as_ref()
    }

    /// The trainable step size η (before the multiplier).
    pub fn eta(&self) -> T {
        self.eta
    }

    /// The current optimiser step.
    pub fn step(&self) -> usize {
        self.step
    }

    /// α at the current step: the schedule's value for ELRA-Hyb (eq. 19, eq. 75), 1 for
    /// ELRA-PSD and 0 for general ELRA.
    pub fn alpha(&self) -> f64 {
        self.config.generator.alpha_at(self.step)
    }

    /// The settings of the current step ([`GeneratorConfig::spec_at`]): α, the η multiplier,
    /// τ and λ.
    pub fn spec(&self) -> GeneratorSpec {
        self.config.generator.spec_at(self.step)
    }

    /// `η_eff = η · m(t)` (App. H cosine multiplier).
    pub fn eta_effective(&self) -> T {
        self.eta * T::of(self.config.generator.eta_multiplier.at(self.step))
    }

    /// Replaces `A`. Errors: `a` not d×r or non-finite.
    pub fn set_a(&mut self, a: DMatrix<T>) -> Result<()> {
        if a.shape() != (self.config.d, self.config.r) {
            return Err(ElraError::shape(
                "a",
                (self.config.d, self.config.r),
                a.shape(),
            ));
        }
        check_left_factor("a", &a)?;
        self.a = a;
        self.train.invalidate();
        Ok(())
    }

    /// Replaces `B`. Errors: ELRA-PSD (no `B`), `b` not r×d or non-finite.
    pub fn set_b(&mut self, b: DMatrix<T>) -> Result<()> {
        if !self.config.generator.variant.uses_b() {
            return Err(ElraError::invalid(
                "b",
                "ELRA-PSD has no factor B (G = ηAAᵀ)",
            ));
        }
        if b.shape() != (self.config.r, self.config.d) {
            return Err(ElraError::shape(
                "b",
                (self.config.r, self.config.d),
                b.shape(),
            ));
        }
        check_finite("b", &b)?;
        self.b = Some(b);
        self.train.invalidate();
        Ok(())
    }

    /// Replaces η. Errors: η not finite and > 0 (eq. 2).
    pub fn set_eta(&mut self, eta: T) -> Result<()> {
        check_eta(eta)?;
        self.eta = eta;
        self.train.invalidate();
        Ok(())
    }

    /// Moves to optimiser step `t`: α and the η multiplier follow their schedules
    /// (eq. 75, App. H).
    pub fn set_step(&mut self, step: usize) {
        self.step = step;
        self.train.invalidate();
    }

    /// Replaces the frozen weight `W0`, keeping the parameters and the step. Errors: `w0` not
    /// d×k or non-finite.
    pub fn set_w0(&mut self, w0: DMatrix<T>) -> Result<()> {
        check_weight("w0", &w0, self.config.d, self.config.k)?;
        self.w0 = w0;
        self.train.invalidate();
        Ok(())
    }

    /// `"elra"`, `"elra-psd"` or `"elra-hyb"`.
    pub fn name(&self) -> &'static str {
        self.config.generator.variant.name()
    }

    /// The generator before the spectral clip: `C` of eq. (2)/§4.2.1/eq. (19) with `η_eff`.
    pub fn raw_generator(&self) -> Result<LowRankGenerator<T>> {
        LowRankGenerator::from_variant(
            self.config.generator.variant,
            &self.a,
            self.b.as_ref(),
            self.eta_effective(),
            self.alpha(),
        )
    }

    /// The right factor `C` used before clipping (Algorithm 1 line 4).
    pub fn factor_c(&self) -> Result<DMatrix<T>> {
        generator_factor(
            self.config.generator.variant,
            &self.a,
            self.b.as_ref(),
            self.eta_effective(),
            self.alpha(),
        )
    }

    /// Evaluates the step's generator (Algorithm 1 lines 4–5): `C`, the spectral clip of App. H
    /// when τ is set, `Z = CA` and `M = φ1(Z)`.
    pub fn generator(&self) -> Result<GeneratorEval<T>> {
        GeneratorEval::evaluate(
            self.config.generator.variant,
            &self.a,
            self.b.as_ref(),
            self.eta_effective(),
            self.alpha(),
            self.config.generator.tau,
        )
    }

    /// `‖G‖²_F` of the effective (clipped) generator from r×r Grams (eq. 21).
    pub fn energy(&self) -> Result<T> {
        Ok(self.generator()?.action.generator().frobenius_norm_sq())
    }

    /// `λ‖G‖²_F` (eq. 20) of the effective generator, with `λ = config.generator.lambda`.
    pub fn energy_penalty(&self) -> Result<T> {
        Ok(self.energy()? * T::of(self.config.generator.lambda))
    }

    /// The forward pass with every intermediate (eq. 5 / Algorithm 1 lines 4–8, samples as rows):
    /// `U = X W0ᵀ, V = U Cᵀ, T = V Mᵀ, Y = U + T Aᵀ`.
    ///
    /// Errors: `x` without `k` columns or non-finite; φ1 failures.
    pub fn forward_cached(&self, x: &DMatrix<T>) -> Result<ForwardCache<T>> {
        let generator = self.generator()?;
        self.forward_cached_with(generator, x)
    }

    /// [`forward_cached`](Self::forward_cached) with a generator evaluated once per step and
    /// shared by the step's minibatches (Algorithm 1 line 5 is outside the minibatch loop).
    ///
    /// Errors: `x` without `k` columns or non-finite; `generator` of another shape.
    pub fn forward_cached_with(
        &self,
        generator: GeneratorEval<T>,
        x: &DMatrix<T>,
    ) -> Result<ForwardCache<T>> {
        check_batch(x, self.config.k)?;
        let (d, r) = (self.config.d, self.config.r);
        let c = generator.c();
        if c.shape() != (r, d) || generator.action.generator().a().shape() != (d, r) {
            return Err(ElraError::shape("generator", (r, d), c.shape()));
        }
        let u = x * self.w0.transpose();
        let v = &u * c.transpose();
        let t = &v * generator.m().transpose();
        let y = &t * generator.action.generator().a().transpose() + &u;
        Ok(ForwardCache {
            generator,
            u,
            v,
            t,
            y,
        })
    }

    /// `Y = X W_newᵀ` through eq. (5) (see [`forward_cached`](Self::forward_cached)).
    pub fn forward(&self, x: &DMatrix<T>) -> Result<DMatrix<T>> {
        finite_output("y", self.forward_cached(x)?.y)
    }

    /// The exact merge `W_new = W0 + A(M(C W0))` (Prop. 1, eq. 30).
    pub fn merge(&self) -> Result<DMatrix<T>> {
        finite_output("w_new", self.generator()?.action.left(&self.w0)?)
    }

    /// The exact unmerge `W0 = exp(−G) W_new = W_new + A φ1(−Z)(−C) W_new` (Prop. 3 with
    /// Prop. 1) for the current parameters. Errors: `w_new` not d×k or non-finite.
    pub fn unmerge(&self, w_new: &DMatrix<T>) -> Result<DMatrix<T>> {
        check_weight("w_new", w_new, self.config.d, self.config.k)?;
        finite_output("w0", self.generator()?.action.inverse()?.left(w_new)?)
    }

    /// The inference cache of App. H: `K = M C W0` (r×k) with the current parameters.
    pub fn inference_cache(&self) -> Result<InferenceCache<T>> {
        let g = self.generator()?;
        let k = g.m() * (g.c() * &self.w0);
        Ok(InferenceCache {
            a: self.a.clone(),
            k,
        })
    }

    /// Trainable matrix entries (Remark 1): `2rd` (ELRA, ELRA-Hyb) or `rd` (ELRA-PSD).
    pub fn param_count(&self) -> usize {
        self.config.param_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn rand_mat(rng: &mut ChaCha8Rng, r: usize, c: usize) -> DMatrix<f64> {
        DMatrix::from_fn(r, c, |_, _| rng.random_range(-1.0..1.0))
    }

    fn dense_w_new(layer: &ElraLayer<f64>) -> DMatrix<f64> {
        let g = layer.generator().unwrap();
        let a = g.action.generator().a();
        (a * g.c()).exp() * layer.w0()
    }

    #[test]
    fn forward_merge_cache_agree_with_dense() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for variant in [Variant::General, Variant::Psd, Variant::Hyb] {
            let (d, k, r) = (12, 9, 3);
            let mut cfg = ElraConfig::new(variant, d, k, r, 100);
            cfg.generator.eta = 0.4;
            let w0 = rand_mat(&mut rng, d, k);
            let mut layer = ElraLayer::new(cfg, w0).unwrap();
            layer.set_step(10);
            let x = rand_mat(&mut rng, 5, k);
            let dense = dense_w_new(&layer);
            let scale = dense.norm();
            let merged = layer.merge().unwrap();
            assert!((&merged - &dense).norm() <= 1e-13 * scale);
            let y_dense = &x * dense.transpose();
            let y = layer.forward(&x).unwrap();
            assert!((&y - &y_dense).norm() <= 1e-13 * y_dense.norm());
            let cache = layer.inference_cache().unwrap();
            let y2 = cache.forward(layer.w0(), &x).unwrap();
            assert!((&y2 - &y_dense).norm() <= 1e-13 * y_dense.norm());
            let back = layer.unmerge(&merged).unwrap();
            assert!((&back - layer.w0()).norm() <= 1e-13 * layer.w0().norm());
            // the cached intermediates are what eq. (5) says
            let fc = layer.forward_cached(&x).unwrap();
            assert!((&fc.u - &x * layer.w0().transpose()).norm() < 1e-13);
            assert!((&fc.v - &fc.u * fc.generator.c().transpose()).norm() < 1e-13);
            assert!((&fc.t - &fc.v * fc.generator.m().transpose()).norm() < 1e-13);
        }
    }

    #[test]
    fn step_drives_alpha_and_eta() {
        let cfg = ElraConfig::new(Variant::Hyb, 6, 4, 2, 100);
        let layer0 = ElraLayer::<f64>::new(cfg.clone(), DMatrix::identity(6, 4)).unwrap();
        assert_eq!(layer0.alpha(), 1.0);
        assert_eq!(layer0.eta_effective(), 1e-3);
        let mut layer = layer0.clone();
        layer.set_step(25);
        assert!((layer.alpha() - (-5.0f64).exp()).abs() < 1e-15);
        layer.set_step(26);
        assert_eq!(layer.alpha(), 0.0);
        layer.set_step(100);
        assert!((layer.eta_effective() - 5e-4).abs() < 1e-18);
        // α = 1 makes the Hyb generator the PSD one
        let c = layer0.factor_c().unwrap();
        assert!((c - layer0.a().transpose() * 1e-3).norm() < 1e-18);
    }

    #[test]
    fn clip_limits_the_generator() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let (d, k, r) = (10, 10, 4);
        let mut cfg = ElraConfig::new(Variant::General, d, k, r, 10);
        cfg.generator.eta = 5.0;
        cfg.generator.tau = Some(1.0);
        let layer = ElraLayer::new(cfg, rand_mat(&mut rng, d, k)).unwrap();
        let g = layer.generator().unwrap();
        assert!(g.clipped());
        assert!(g.raw_spectral_norm.unwrap() > 1.0);
        let n = g.action.generator().spectral_norm().unwrap();
        assert!((n - 1.0).abs() < 1e-13);
        let raw = layer.raw_generator().unwrap().frobenius_norm_sq();
        let e = layer.energy().unwrap();
        assert!((e - raw * g.clip_scale * g.clip_scale).abs() < 1e-12 * e);
        assert!((layer.energy_penalty().unwrap() - 1e-5 * e).abs() < 1e-18 * e.max(1.0));
    }

    #[test]
    fn f32_layer_matches_f64() {
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let (d, k, r) = (32, 24, 8);
        let w0 = rand_mat(&mut rng, d, k);
        let a = rand_mat(&mut rng, d, r) * 0.3;
        let b = rand_mat(&mut rng, r, d) * 0.3;
        let mut cfg = ElraConfig::new(Variant::Hyb, d, k, r, 100);
        cfg.generator.eta = 0.5;
        cfg.generator.tau = None;
        let l64 =
            ElraLayer::from_factors(cfg.clone(), w0.clone(), a.clone(), Some(b.clone())).unwrap();
        let c = |m: &DMatrix<f64>| m.map(|v| v as f32);
        let l32 = ElraLayer::from_factors(cfg, c(&w0), c(&a), Some(c(&b))).unwrap();
        let x = rand_mat(&mut rng, 7, k);
        let y64 = l64.forward(&x).unwrap();
        let y32 = l32.forward(&c(&x)).unwrap().map(|v| v as f64);
        // f32: unit roundoff 6e-8, inner products of length ≤ 32 and a φ1 with ‖Z‖ ≈ 1:
        // a relative error of a few 1e-6 is the expected rounding level.
        assert!((&y32 - &y64).norm() <= 2e-5 * y64.norm());
        let m32 = l32.merge().unwrap();
        let back = l32.unmerge(&m32).unwrap().map(|v| v as f64);
        assert!((&back - &w0).norm() <= 2e-5 * w0.norm());
    }

    #[test]
    fn param_counts() {
        use crate::adapter::Adapter;
        let cfg = ElraConfig::new(Variant::General, 16, 40, 4, 1);
        let l = ElraLayer::<f64>::new(cfg, DMatrix::zeros(16, 40)).unwrap();
        assert_eq!(Adapter::param_count(&l), 2 * 4 * 16);
        assert_eq!(l.total_param_count(), 2 * 4 * 16 + 1);
        let cfg = ElraConfig::new(Variant::Psd, 16, 40, 4, 1);
        let l = ElraLayer::<f64>::new(cfg, DMatrix::zeros(16, 40)).unwrap();
        assert_eq!(Adapter::param_count(&l), 4 * 16);
        assert_eq!(l.name(), "elra-psd");
    }
}
