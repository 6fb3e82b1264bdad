//! The LoRA baseline (Hu et al. 2022) with PEFT's conventions, for comparison with ELRA.
//!
//! PEFT stores `lora_A` (r×k, the "down" projection) and `lora_B` (d×r, the "up" projection)
//! and computes `y = W0 x + (α/r)·B'A'x`; `lora_B` starts at zero so the adapted layer starts
//! equal to the frozen one, and `lora_A` is Kaiming-uniform (`a = √5`, PyTorch's `nn.Linear`
//! default). Its additive update can lower the rank of `W0` by up to r (App. D, Lemma 1), which
//! ELRA's multiplicative update cannot (Prop. 3).
#![allow(non_snake_case)]

use nalgebra::DMatrix;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{
    check_batch, check_dims, check_weight, finite_output, kaiming_uniform, xavier_uniform,
    TrainState,
};
use crate::grad::{LoraGrad, LoraTape};
use crate::linalg::Real;
use crate::{ElraError, Result};

/// How `lora_A` is initialised (`lora_B` always starts at zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraInit {
    /// PEFT's default: Kaiming-uniform with `a = √5`, i.e. `U(±1/sqrt(k))`.
    #[default]
    KaimingUniform,
    /// Xavier/Glorot-uniform, `U(±sqrt(6/(r + k)))`.
    XavierUniform,
}

/// Configuration of a [`LoraLayer`].
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Output dimension `d`.
    pub d: usize,
    /// Input dimension `k`.
    pub k: usize,
    /// Rank `r`, `1 ≤ r ≤ min(d, k)`.
    pub r: usize,
    /// PEFT's `lora_alpha`; the update is scaled by `lora_alpha / r`.
    pub lora_alpha: f64,
    /// Initialisation of `lora_A`.
    pub init: LoraInit,
    /// Seed of the ChaCha8 generator used by [`LoraLayer::new`].
    pub seed: u64,
}

impl LoraConfig {
    /// A config with `lora_alpha = r` (scaling 1), Kaiming-uniform init and seed 0.
    pub fn new(d: usize, k: usize, r: usize) -> Self {
        LoraConfig {
            d,
            k,
            r,
            lora_alpha: r as f64,
            init: LoraInit::KaimingUniform,
            seed: 0,
        }
    }

    /// Checks the fields; errors name `d`, `k`, `r` (0 or above `min(d, k)`) or `lora_alpha`
    /// (non-finite).
    pub fn validate(&self) -> Result<()> {
        check_dims(self.d, self.k, self.r, "r", self.d.min(self.k))?;
        if !self.lora_alpha.is_finite() {
            return Err(ElraError::invalid(
                "lora_alpha",
                format!("must be finite, got {}", self.lora_alpha),
            ));
        }
        Ok(())
    }

    /// The scaling `lora_alpha / r` of the update.
    pub fn scaling(&self) -> f64 {
        self.lora_alpha / self.r as f64
    }

    /// Trainable entries `r(d + k)` (Remark 1).
    pub fn param_count(&self) -> usize {
        self.r * (self.d + self.k)
    }
}

/// A frozen d×k weight adapted by LoRA: `W_new = W0 + (α/r)·B'A'` with `lora_A` r×k and
/// `lora_B` d×r.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraLayer<T: Real> {
    config: LoraConfig,
    w0: DMatrix<T>,
    lora_a: DMatrix<T>,
    lora_b: DMatrix<T>,
    /// Tape and gradients of the [`crate::adapter::Adapter`] training calls
    /// (`crate::grad::lora`).
    pub(crate) train: TrainState<LoraTape<T>, LoraGrad<T>>,
}

impl<T: Real> LoraLayer<T> {
    /// PEFT's initialisation: `lora_A` from `config.init` seeded by `config.seed`, `lora_B = 0`.
    ///
    /// Errors: invalid config, `w0` not d×k or non-finite.
    pub fn new(config: LoraConfig, w0: DMatrix<T>) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let lora_a = match config.init {
            LoraInit::KaimingUniform => kaiming_uniform(&mut rng, config.r, config.k),
            LoraInit::XavierUniform => xavier_uniform(&mut rng, config.r, config.k),
        };
        let lora_b = DMatrix::zeros(config.d, config.r);
        Self::from_factors(config, w0, lora_a, lora_b)
    }

    /// A layer with given `lora_A` (r×k) and `lora_B` (d×r).
    ///
    /// Errors: invalid config; `w0`, `lora_a`, `lora_b` of the wrong shape or non-finite.
    pub fn from_factors(
        config: LoraConfig,
        w0: DMatrix<T>,
        lora_a: DMatrix<T>,
        lora_b: DMatrix<T>,
    ) -> Result<Self> {
        config.validate()?;
        check_weight("w0", &w0, config.d, config.k)?;
        check_weight("lora_a", &lora_a, config.r, config.k)?;
        check_weight("lora_b", &lora_b, config.d, config.r)?;
        Ok(LoraLayer {
            config,
            w0,
            lora_a,
            lora_b,
            train: TrainState::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// `lora_A` (r×k).
    pub fn lora_a(&self) -> &DMatrix<T> {
        &self.lora_a
    }

    /// `lora_B` (d×r).
    pub fn lora_b(&self) -> &DMatrix<T> {
        &self.lora_b
    }

    /// Replaces `lora_A`. Errors: not r×k or non-finite.
    pub fn set_lora_a(&mut self, a: DMatrix<T>) -> Result<()> {
        check_weight("lora_a", &a, self.config.r, self.config.k)?;
        self.lora_a = a;
        self.train.invalidate();
        Ok(())
    }

    /// Replaces `lora_B`. Errors: not d×r or non-finite.
    pub fn set_lora_b(&mut self, b: DMatrix<T>) -> Result<()> {
        check_weight("lora_b", &b, self.config.d, self.config.r)?;
        self.lora_b = b;
        self.train.invalidate();
        Ok(())
    }

    /// The update `ΔW = (α/r)·B'A'` (d×k).
    pub fn delta(&self) -> DMatrix<T> {
        (&self.lora_b * &self.lora_a) * T::of(self.config.scaling())
    }

    /// The frozen weight `W0` (d×k).
    pub fn w0(&self) -> &DMatrix<T> {
        &self.w0
    }

    /// Replaces `W0`, keeping `lora_A` and `lora_B`. Errors: not d×k or non-finite.
    pub fn set_w0(&mut self, w0: DMatrix<T>) -> Result<()> {
        check_weight("w0", &w0, self.config.d, self.config.k)?;
        self.w0 = w0;
        self.train.invalidate();
        Ok(())
    }

    /// `Y = X W0ᵀ + (α/r)·(X A'ᵀ) B'ᵀ` (PEFT `Linear.forward`, samples as rows).
    pub fn forward(&self, x: &DMatrix<T>) -> Result<DMatrix<T>> {
        check_batch(x, self.config.k)?;
        let base = x * self.w0.transpose();
        let down = x * self.lora_a.transpose();
        finite_output(
            "y",
            (down * self.lora_b.transpose()) * T::of(self.config.scaling()) + base,
        )
    }

    /// `W0 + (α/r)·B'A'` (PEFT `merge`).
    pub fn merge(&self) -> Result<DMatrix<T>> {
        finite_output("w_new", self.delta() + &self.w0)
    }

    /// `W_new − (α/r)·B'A'` (PEFT `unmerge`). Errors: `w_new` not d×k or non-finite.
    pub fn unmerge(&self, w_new: &DMatrix<T>) -> Result<DMatrix<T>> {
        check_weight("w_new", w_new, self.config.d, self.config.k)?;
        finite_output("w0", w_new - self.delta())
    }

    /// Trainable entries `r(d + k)` (Remark 1).
    pub fn param_count(&self) -> usize {
        self.config.param_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn starts_at_w0_and_matches_dense() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let (d, k, r) = (9, 13, 3);
        let w0 = DMatrix::from_fn(d, k, |_, _| rng.random_range(-1.0..1.0));
        let mut cfg = LoraConfig::new(d, k, r);
        cfg.lora_alpha = 6.0;
        let mut l: LoraLayer<f64> = LoraLayer::new(cfg, w0.clone()).unwrap();
        assert_eq!(l.merge().unwrap(), w0);
        let bound = 1.0 / (k as f64).sqrt();
        assert!(l.lora_a().iter().all(|v: &f64| v.abs() <= bound));
        l.set_lora_b(DMatrix::from_fn(d, r, |_, _| rng.random_range(-1.0..1.0)))
            .unwrap();
        let w_new = &w0 + l.lora_b() * l.lora_a() * 2.0;
        assert!((l.merge().unwrap() - &w_new).norm() < 1e-13);
        let x = DMatrix::from_fn(4, k, |_, _| rng.random_range(-1.0..1.0));
        let y = l.forward(&x).unwrap();
        assert!((y - &x * w_new.transpose()).norm() < 1e-12);
        assert!((l.unmerge(&w_new).unwrap() - &w0).norm() < 1e-13);
        assert_eq!(crate::adapter::Adapter::param_count(&l), r * (d + k));
        assert_eq!(crate::adapter::Adapter::total_param_count(&l), r * (d + k));
    }

    #[test]
    fn f32_matches_f64() {
        let mut rng = ChaCha8Rng::seed_from_u64(22);
        let (d, k, r) = (16, 12, 4);
        let mut f = |rows: usize, cols: usize| {
            DMatrix::from_fn(rows, cols, |_, _| rng.random_range(-1.0f64..1.0))
        };
        let (w0, a, b, x) = (f(d, k), f(r, k), f(d, r), f(5, k));
        let cfg = LoraConfig::new(d, k, r);
        let l64 = LoraLayer::from_factors(cfg.clone(), w0.clone(), a.clone(), b.clone()).unwrap();
        let c = |m: &DMatrix<f64>| m.map(|v| v as f32);
        let l32 = LoraLayer::from_factors(cfg, c(&w0), c(&a), c(&b)).unwrap();
        let y64 = l64.forward(&x).unwrap();
        let y32 = l32.forward(&c(&x)).unwrap().map(|v| v as f64);
        // f32 rounding of inner products of length ≤ 16: a few 1e-7 relative
        assert!((y32 - &y64).norm() <= 1e-5 * y64.norm());
    }
}
