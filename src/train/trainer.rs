//! One optimiser step of the training recipe of §5 / App. H on an [`AdaptedNetwork`].
//!
//! Per step t: every ELRA layer moves to step t (α schedule, η multiplier); dropout masks
//! (p = 0.05) are drawn from the trainer's seeded generator; forward, loss + energy, reverse
//! mode ([`crate::grad`]); the global adapter gradient norm is clipped at 1.0; AdamW
//! (β = (0.9, 0.999), ε = 1e-8, no weight decay) updates with the cosine learning rate with 3 %
//! warm-up; the step's generators feed the speed diagnostics of §5.4. Any error inside a step
//! — mismatched shapes, a non-finite loss or gradient, a failing φ1 — stops training with
//! [`ElraError::Training`] naming the step; the parameters are then left as they were before
//! that step.

use nalgebra::DMatrix;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::diagnostics::{spike_report, SpeedTracker, SpikeReport, DEFAULT_WINDOW, SPIKE_SIGMAS};
use super::model::{AdaptedNetwork, Targets};
use super::optim::{clip_global_norm, AdamW, AdamWConfig, LrSchedule};
use crate::linalg::Real;
use crate::{ElraError, Result};

/// The training recipe (§5 "Training setup", App. H.1.1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainConfig {
    /// Total optimiser steps T.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up fraction of the cosine schedule (§5: 3 %).
    pub warmup_fraction: f64,
    /// AdamW hyperparameters.
    pub adamw: AdamWConfig,
    /// Max global gradient norm (App. H: 1.0).
    pub clip_norm: f64,
    /// Dropout probability on adapter outputs (App. H: 0.05).
    pub dropout: f64,
    /// Seed of the dropout masks.
    pub seed: u64,
}

impl TrainConfig {
    /// The paper's recipe for `steps` steps at learning rate `lr`.
    pub fn new(steps: usize, lr: f64) -> Self {
        TrainConfig {
            steps,
            lr,
            warmup_fraction: 0.03,
            adamw: AdamWConfig::default(),
            clip_norm: 1.0,
            dropout: 0.05,
            seed: 0,
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepRecord {
    /// The step index t (0-based).
    pub step: usize,
    /// The task loss of the step's batch (with dropout), before the update.
    pub loss: f64,
    /// `Σ λ‖G‖²_F` before the update.
    pub energy: f64,
    /// The global adapter gradient norm before clipping (§5.4 `g_t`).
    pub grad_norm: f64,
    /// The learning rate used.
    pub lr: f64,
    /// The speed `s_t` of the generators of this step's forward pass relative to the previous
    /// step's (§5.4); `None` at the first step.
    pub speed: Option<f64>,
}

/// Trains an [`AdaptedNetwork`] step by step (module docs).
#[derive(Debug, Clone)]
pub struct Trainer<T: Real> {
    net: AdaptedNetwork<T>,
    config: TrainConfig,
    opt: AdamW,
    schedule: LrSchedule,
    dropout_rng: ChaCha8Rng,
    speeds: SpeedTracker,
    step: usize,
}

impl<T: Real> Trainer<T> {
    /// A trainer at step 0.
    ///
    /// Errors: `steps` = 0, `lr`, `warmup_fraction`, `clip_norm`, `dropout` or the AdamW
    /// settings out of range.
    pub fn new(net: AdaptedNetwork<T>, config: TrainConfig) -> Result<Self> {
        let schedule =
            LrSchedule::cosine_with_warmup(config.lr, config.steps, config.warmup_fraction)?;
        if !config.clip_norm.is_finite() || config.clip_norm <= 0.0 {
            return Err(ElraError::invalid(
                "clip_norm",
                format!("must be finite and > 0, got {}", config.clip_norm),
            ));
        }
        if !config.dropout.is_finite() || !(0.0..1.0).contains(&config.dropout) {
            return Err(ElraError::invalid(
                "dropout",
                format!("must lie in [0, 1), got {}", config.dropout),
            ));
        }
        let shapes: Vec<(usize, usize)> = net.params().iter().map(|p| p.shape()).collect();
        let opt = AdamW::new(config.adamw, &shapes)?;
        Ok(Trainer {
            net,
            config,
            opt,
            schedule,
            dropout_rng: ChaCha8Rng::seed_from_u64(config.seed),
            speeds: SpeedTracker::new(),
            step: 0,
        })
    }

    /// The network being trained.
    pub fn network(&self) -> &AdaptedNetwork<T> {
        &self.net
    }

    /// The network, consuming the trainer.
    pub fn into_network(self) -> AdaptedNetwork<T> {
        self.net
    }

    /// The next step index.
    pub fn step_index(&self) -> usize {
        self.step
    }

    /// One optimiser step on a batch (module docs).
    ///
    /// Errors: [`ElraError::Training`] with the step index for anything that goes wrong inside
    /// the step (its `reason` carries the underlying error), or when all steps are done.
    pub fn step(&mut self, x: &DMatrix<T>, targets: &Targets<T>) -> Result<StepRecord> {
        let t = self.step;
        let wrap = |e: ElraError| match e {
            ElraError::Training { .. } => e,
            other => ElraError::Training {
                step: t,
                reason: other.to_string(),
            },
        };
        if t >= self.config.steps {
            return Err(ElraError::Training {
                step: t,
                reason: format!("all {} steps are done", self.config.steps),
            });
        }
        self.net.set_step(t).map_err(wrap)?;
        let masks = self
            .net
            .sample_masks(x.nrows(), self.config.dropout, &mut self.dropout_rng)
            .map_err(wrap)?;
        let lg = self
            .net
            .loss_and_grad(x, targets, Some(&masks))
            .map_err(wrap)?;
        let mut grads = lg.grads;
        let grad_norm = clip_global_norm(&mut grads, self.config.clip_norm).map_err(wrap)?;
        let lr = self.schedule.at(t);
        let mut params = self.net.params();
        let decay = self.net.decay_flags();
        self.opt
            .step(&mut params, &grads, &decay, lr)
            .map_err(wrap)?;
        // All or nothing: a rejected update leaves the parameters as they were.
        self.net.set_params(params).map_err(wrap)?;
        let gens: Vec<(&DMatrix<T>, &DMatrix<T>)> =
            lg.generators.iter().map(|(a, c)| (a, c)).collect();
        let speed = self.speeds.record(&gens).map_err(wrap)?;
        self.step += 1;
        Ok(StepRecord {
            step: t,
            loss: lg.loss,
            energy: lg.energy,
            grad_norm,
            lr,
            speed,
        })
    }

    /// The speeds `s_1, s_2, …` so far.
    pub fn speeds(&self) -> &[f64] {
        self.speeds.speeds()
    }

    /// Spikes and CV of the speeds so far (§5.4: window 200, 3σ).
    pub fn spike_report(&self) -> Result<SpikeReport> {
        spike_report(self.speeds.speeds(), DEFAULT_WINDOW, SPIKE_SIGMAS)
    }
}
