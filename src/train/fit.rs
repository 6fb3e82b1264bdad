//! `fit`: teacher–student adaptation comparing LoRA and the ELRA family on the same data.
//!
//! A frozen random "pretrained" network (`depth` tanh layers of `width`, identity output) is
//! adapted toward a **teacher** of the same shape whose every weight is
//!
//! ```text
//! W*_ℓ = exp(G*_ℓ) W0_ℓ + ΔW*_ℓ,   G*_ℓ = A*C* (rank 4, ‖G*‖₂ = 0.5),
//!                                   ΔW*_ℓ = B*A'* (rank 4, ‖ΔW*‖₂ = 0.25 ‖W0_ℓ‖₂),
//! ```
//!
//! a multiplicative part in ELRA's family (eq. 3) plus an additive part in LoRA's, so both
//! families have something they can and something they cannot represent exactly. `exp(G*) W0`
//! is formed through Prop. 1 (`W0 + A* φ1(C*A*) C* W0`). Inputs are standard normal; the loss
//! is the MSE to the teacher's outputs (or cross-entropy against its arg-max classes).
//!
//! Every method sees the same stream of batches (one seeded generator per run, restarted for
//! each method), the same dropout masks and the same number of steps, with the recipe of
//! [`super::trainer`]: LoRA (r = 8), ELRA (r = 8), ELRA-PSD (r = 16, matched parameters),
//! ELRA-Hyb (r = 8) and optionally ELRA-Hyb_GA (r = 8, seeded from the first `ga_steps`
//! batches of the same stream, then trained on the stream from its start) and double-sided
//! ELRA (`exp(L) W0 exp(R)`, App. B eq. 22, r = 8 per side). The first and
//! final losses are evaluated without dropout on a fixed held-out set of 512 samples.
//!
//! The result is the table ([`FitReport::rows`]) and every method's per-step record
//! ([`FitReport::curves`]: training loss, speed, gradient norm, learning rate). Everything is
//! `f64`, single-threaded and seeded: bitwise reproducible. Writing them (`loss.csv`,
//! `loss.svg`) and showing progress is the command line's business (`elra fit`, in the lab
//! crate); [`fit_with_progress`] reports each step to it.
#![allow(non_snake_case)]

use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use nalgebra::DMatrix;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::diagnostics::{spike_report, DEFAULT_WINDOW, SPIKE_SIGMAS};
use super::init::{ga_initialise, DEFAULT_GA_STEPS};
use super::model::{Activation, AdaptedNetwork, AdapterSpec, FrozenNetwork, LossKind, Targets};
use super::trainer::{TrainConfig, Trainer};
use crate::adapter::Variant;
use crate::linalg::phi1;
use crate::{ElraError, Result};

/// The methods `fit` can compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FitMethod {
    /// LoRA, r = 8 (PEFT, `lora_alpha = 2r`).
    Lora,
    /// General ELRA, r = 8 (eq. 2).
    Elra,
    /// ELRA-PSD, r = 16 (§4.2.1; matched parameter count).
    ElraPsd,
    /// ELRA-Hyb, r = 8 (eq. 19).
    ElraHyb,
    /// ELRA-Hyb with GA seeding (App. H), r = 8.
    ElraHybGa,
    /// Double-sided general ELRA `exp(L) W0 exp(R)` (App. B eq. 22, 23), `r_L = r_R = 8`;
    /// not in [`FitMethod::DEFAULT`], selected with `--methods elra-double`.
    ElraDouble,
}

impl FitMethod {
    /// The default comparison of the task: LoRA, ELRA, ELRA-PSD, ELRA-Hyb.
    pub const DEFAULT: [FitMethod; 4] = [
        FitMethod::Lora,
        FitMethod::Elra,
        FitMethod::ElraPsd,
        FitMethod::ElraHyb,
    ];

    /// `lora`, `elra`, `elra-psd`, `elra-hyb`, `elra-hyb-ga`, `elra-double`.
    pub fn name(self) -> &'static str {
        match self {
            FitMethod::Lora => "lora",
            FitMethod::Elra => "elra",
            FitMethod::ElraPsd => "elra-psd",
            FitMethod::ElraHyb => "elra-hyb",
            FitMethod::ElraHybGa => "elra-hyb-ga",
            FitMethod::ElraDouble => "elra-double",
        }
    }

    /// The adapter put on every layer (ranks of §5: 8, PSD 16; double-sided 8 per side).
    pub fn spec(self) -> AdapterSpec {
        match self {
            FitMethod::Lora => AdapterSpec::Lora {
                r: 8,
                lora_alpha: 16.0,
            },
            FitMethod::Elra => AdapterSpec::Elra {
                variant: Variant::General,
                r: 8,
            },
            FitMethod::ElraPsd => AdapterSpec::Elra {
                variant: Variant::Psd,
                r: 16,
            },
            FitMethod::ElraHyb | FitMethod::ElraHybGa => AdapterSpec::Elra {
                variant: Variant::Hyb,
                r: 8,
            },
            FitMethod::ElraDouble => AdapterSpec::ElraDouble {
                variant: Variant::General,
                r: 8,
            },
        }
    }
}

impl fmt::Display for FitMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FitMethod {
    type Err = ElraError;
    /// Parses the names of [`FitMethod::name`] (case-insensitive; `psd`, `hyb`, `hyb-ga`,
    /// `double` too).
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "lora" => Ok(FitMethod::Lora),
            "elra" | "general" => Ok(FitMethod::Elra),
            "elra-psd" | "psd" => Ok(FitMethod::ElraPsd),
            "elra-hyb" | "hyb" => Ok(FitMethod::ElraHyb),
            "elra-hyb-ga" | "hyb-ga" | "elra-hyb_ga" => Ok(FitMethod::ElraHybGa),
            "elra-double" | "double" => Ok(FitMethod::ElraDouble),
            other => Err(ElraError::invalid(
                "methods",
                format!("unknown method `{other}` (expected lora, elra, elra-psd, elra-hyb, elra-hyb-ga, elra-double)"),
            )),
        }
    }
}

/// Options of [`fit`].
#[derive(Debug, Clone, PartialEq)]
pub struct FitOptions {
    /// Optimiser steps per method.
    pub steps: usize,
    /// Seed of everything (networks, data, adapters, dropout).
    pub seed: u64,
    /// Width of every layer.
    pub width: usize,
    /// Number of layers.
    pub depth: usize,
    /// Methods to compare, in order.
    pub methods: Vec<FitMethod>,
    /// Batch size.
    pub batch: usize,
    /// Peak learning rate (shared by all methods, as in §5).
    pub lr: f64,
    /// Seeding batches of ELRA-Hyb_GA (App. H default 200).
    pub ga_steps: usize,
    /// The loss.
    pub loss: LossKind,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            steps: 800,
            seed: 0,
            width: 64,
            depth: 3,
            methods: FitMethod::DEFAULT.to_vec(),
            batch: 64,
            lr: 2e-2,
            ga_steps: DEFAULT_GA_STEPS,
            loss: LossKind::Mse,
        }
    }
}

impl FitOptions {
    /// Checks the options; errors name the field.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("steps", self.steps),
            ("width", self.width),
            ("depth", self.depth),
            ("batch", self.batch),
        ] {
            if v == 0 {
                return Err(ElraError::invalid(name, "must be at least 1"));
            }
        }
        if self.methods.is_empty() {
            return Err(ElraError::invalid("methods", "name at least one method"));
        }
        let max_r = self.methods.iter().map(|m| match m.spec() {
            AdapterSpec::Lora { r, .. }
            | AdapterSpec::Elra { r, .. }
            | AdapterSpec::ElraDouble { r, .. } => r,
            AdapterSpec::None => 0,
        });
        if let Some(r) = max_r.max() {
            if r > self.width {
                return Err(ElraError::invalid(
                    "width",
                    format!("must be at least the largest rank {r} of the chosen methods"),
                ));
            }
        }
        if !self.lr.is_finite() || self.lr <= 0.0 {
            return Err(ElraError::invalid(
                "lr",
                format!("must be finite and > 0, got {}", self.lr),
            ));
        }
        if self.methods.contains(&FitMethod::ElraHybGa) && self.ga_steps == 0 {
            return Err(ElraError::invalid(
                "ga_steps",
                "ELRA-Hyb_GA needs at least one seeding batch",
            ));
        }
        Ok(())
    }
}

/// One row of the result table.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodResult {
    /// The method.
    pub method: FitMethod,
    /// Trainable parameters, η scalars included.
    pub params: usize,
    /// Held-out loss before training.
    pub first_loss: f64,
    /// Held-out loss after training.
    pub final_loss: f64,
    /// Speed spikes (§5.4).
    pub spikes: usize,
    /// Coefficient of variation of the speed (§5.4).
    pub cv: f64,
    /// Wall time of the method's training, seconds.
    pub wall_secs: f64,
}

/// The result of [`fit`].
#[derive(Debug, Clone, PartialEq)]
pub struct FitReport {
    /// One row per method, in the order of the options.
    pub rows: Vec<MethodResult>,
    /// One training record per method, in the same order.
    pub curves: Vec<Curve>,
}

impl fmt::Display for FitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<12} {:>8} {:>12} {:>12} {:>7} {:>7} {:>9}",
            "method", "params", "first loss", "final loss", "spikes", "CV", "time (s)"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<12} {:>8} {:>12.4e} {:>12.4e} {:>7} {:>7.3} {:>9.2}",
                r.method.name(),
                r.params,
                r.first_loss,
                r.final_loss,
                r.spikes,
                r.cv,
                r.wall_secs
            )?;
        }
        write!(
            f,
            "first/final loss: held-out evaluation batch, no dropout; the curves hold the training loss"
        )
    }
}

/// Per-step records of one method's training ([`super::trainer::StepRecord`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// The method.
    pub method: FitMethod,
    /// Training loss of each step (on the step's batch, with dropout).
    pub loss: Vec<f64>,
    /// Speed `s_t` of each step (§5.4; `None` where it is not defined).
    pub speed: Vec<Option<f64>>,
    /// Global gradient norm of each step (before clipping).
    pub grad_norm: Vec<f64>,
    /// Learning rate of each step.
    pub lr: Vec<f64>,
}

/// `exp(G) W0 + ΔW` of the teacher (module docs), G and ΔW random of rank 4.
fn teacher_weight(w0: &DMatrix<f64>, rng: &mut ChaCha8Rng) -> Result<DMatrix<f64>> {
    let (d, k) = w0.shape();
    let r = 4.min(d).min(k);
    let mut randn =
        |a: usize, b: usize| DMatrix::from_fn(a, b, |_, _| rng.sample::<f64, _>(StandardNormal));
    let a = randn(d, r);
    let mut c = randn(r, d);
    let g_norm = (&a * &c).singular_values().max();
    c *= 0.5 / g_norm;
    let m = phi1(&(&c * &a))?;
    let exp_w0 = w0 + &a * (m * (&c * w0));
    let b = randn(d, r);
    let a2 = randn(r, k);
    let delta = &b * &a2;
    let scale = 0.25 * w0.clone().singular_values().max() / delta.clone().singular_values().max();
    Ok(exp_w0 + delta * scale)
}

/// The data stream: batch t of a run is the t-th draw of a generator seeded with `seed`.
struct Stream {
    rng: ChaCha8Rng,
    width: usize,
    batch: usize,
}

impl Stream {
    fn new(seed: u64, width: usize, batch: usize) -> Self {
        Stream {
            rng: ChaCha8Rng::seed_from_u64(seed),
            width,
            batch,
        }
    }
    fn next_x(&mut self) -> DMatrix<f64> {
        DMatrix::from_fn(self.batch, self.width, |_, _| {
            self.rng.sample::<f64, _>(StandardNormal)
        })
    }
}

fn targets_for(
    teacher: &FrozenNetwork<f64>,
    loss: LossKind,
    x: &DMatrix<f64>,
) -> Result<Targets<f64>> {
    let y = teacher.forward(x)?;
    Ok(match loss {
        LossKind::Mse => Targets::Values(y),
        LossKind::CrossEntropy => Targets::Labels(
            y.row_iter()
                .map(|row| {
                    row.iter()
                        .enumerate()
                        .fold(
                            (0, f64::NEG_INFINITY),
                            |b, (j, &v)| if v > b.1 { (j, v) } else { b },
                        )
                        .0
                })
                .collect(),
        ),
    })
}

/// Teacher–student adaptation with every method of `opts` (module docs); returns the table and
/// the per-step curves.
///
/// Errors: invalid options ([`FitOptions::validate`]); [`ElraError::Training`] from any
/// method's training.
pub fn fit(opts: &FitOptions) -> Result<FitReport> {
    fit_with_progress(opts, &mut |_, _| {})
}

/// [`fit`], calling `progress(method, step)` after each optimiser step (`step` counts from 1 to
/// `opts.steps` for each method in turn) — for a progress display.
///
/// Errors: as [`fit`].
pub fn fit_with_progress(
    opts: &FitOptions,
    progress: &mut dyn FnMut(FitMethod, usize),
) -> Result<FitReport> {
    opts.validate()?;
    let widths = vec![opts.width; opts.depth + 1];
    let seed = opts.seed;
    let base = FrozenNetwork::<f64>::random(&widths, Activation::Tanh, Activation::Identity, seed)?;
    let mut teacher = base.clone();
    let mut trng = ChaCha8Rng::seed_from_u64(seed ^ 0x7eac_4e11);
    for l in &mut teacher.layers {
        l.w0 = teacher_weight(&l.w0, &mut trng)?;
    }
    let data_seed = seed ^ 0xda7a_5eed;
    let mut eval_stream = Stream::new(seed ^ 0xe7a1_0000, opts.width, 512);
    let eval_x = eval_stream.next_x();
    let eval_t = targets_for(&teacher, opts.loss, &eval_x)?;

    let mut rows = Vec::new();
    let mut curves = Vec::new();
    for &method in &opts.methods {
        let start = Instant::now();
        let mut net =
            AdaptedNetwork::new(&base, method.spec(), opts.loss, opts.steps, seed ^ 0xada7)?;
        if method == FitMethod::ElraHybGa {
            let mut s = Stream::new(data_seed, opts.width, opts.batch);
            let batches = (0..opts.ga_steps)
                .map(|_| {
                    let x = s.next_x();
                    targets_for(&teacher, opts.loss, &x).map(|t| (x, t))
                })
                .collect::<Result<Vec<_>>>()?;
            ga_initialise(&mut net, &base, batches)?;
        }
        let first_loss = net.eval_loss(&eval_x, &eval_t)?;
        let mut cfg = TrainConfig::new(opts.steps, opts.lr);
        cfg.seed = seed ^ 0xd0_0b0e;
        let mut trainer = Trainer::new(net, cfg)?;
        let mut stream = Stream::new(data_seed, opts.width, opts.batch);
        let mut curve = Curve {
            method,
            loss: Vec::with_capacity(opts.steps),
            speed: Vec::with_capacity(opts.steps),
            grad_norm: Vec::with_capacity(opts.steps),
            lr: Vec::with_capacity(opts.steps),
        };
        for step in 1..=opts.steps {
            let x = stream.next_x();
            let t = targets_for(&teacher, opts.loss, &x)?;
            let rec = trainer.step(&x, &t)?;
            curve.loss.push(rec.loss);
            curve.speed.push(rec.speed);
            curve.grad_norm.push(rec.grad_norm);
            curve.lr.push(rec.lr);
            progress(method, step);
        }
        let spikes = spike_report(trainer.speeds(), DEFAULT_WINDOW, SPIKE_SIGMAS)?;
        let net = trainer.into_network();
        let final_loss = net.eval_loss(&eval_x, &eval_t)?;
        rows.push(MethodResult {
            method,
            params: net.trainable_param_count(),
            first_loss,
            final_loss,
            spikes: spikes.spikes.len(),
            cv: spikes.cv,
            wall_secs: start.elapsed().as_secs_f64(),
        });
        curves.push(curve);
    }
    Ok(FitReport { rows, curves })
}
