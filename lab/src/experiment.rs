//! App. G — the paper's numerical experiments: for every LoRA-rank, the MSE of the constructed
//! adapters (the proofs of Lemma 9, Theorem 5 and Theorem 6) and of adapters trained by Adam.
//!
//! Setup (App. G, with the details the text leaves open taken from the paper's released code,
//! UW-Madison-Lee-Lab/Expressive_Power_of_LoRA, and marked as such):
//! * width `D = 16`; linear models with `L = 2` frozen layers and a one-layer target (G.1); FNNs
//!   with `(L̄, L) = (1, 2)` and `(2, 4)` (G.2); TFNs with `L = 1` and `2` blocks, two heads (G.3),
//!   sequences of 10 tokens (released code's default; the text gives no length);
//! * "random": target and frozen models drawn independently — Xavier-uniform weights, attention
//!   weights `N(0,1)`, biases `U(−1/√D, 1/√D)`;
//! * "pretrained": the random frozen model is first trained with full-rank updates (Adam,
//!   lr 1e-3, all weights and biases, 256 fresh samples per step) until its training loss drops
//!   below a third of the initial loss (released code: `loss < init/3`, at most 1000 steps);
//! * trained adapters: Adam over the adapter parameters (and the biases, which the paper's
//!   adapted models update — §2.1, Thm. 6), learning rate × weight decay grid, fresh `N(0, I)`
//!   batches of 256 samples, the configuration with the lowest validation MSE on 256 samples is
//!   reported on 5000 test samples; all configurations of one rank share the initialisation and
//!   the sample stream (as in the released code);
//! * constructions: Lemma 9 (linear), Theorem 5's uniform-partition construction (FNN; its
//!   linearising biases need a bounded domain, taken as the ball of the largest test-input norm,
//!   since `N(0, I)` inputs are unbounded), Theorem 6 (TFN);
//! * MSE is per entry (PyTorch's `nn.MSELoss`, what the released code reports); the paper's
//!   `Ê‖f(x) − f̄(x)‖²₂` is `D` (TFN: `D·N`) times larger.
#![allow(non_snake_case)]

use crate::adapter::{AdapterFamily, LoraFamily, WeightAdapter};
use crate::optim::{Adam, AdamConfig};
use elra::expressivity::fnn::{self, Fnn};
use elra::expressivity::linear::{self, LinearModel};
use elra::expressivity::network::{mse, mse_loss_and_grads, Network};
use elra::expressivity::tfn::{self, Tfn};
use elra::expressivity::{input_radius, standard_normal};
use elra::{ElraError, Result};
use nalgebra::{DMatrix, DVector};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::fmt::Write as _;

/// The model family and depths of one App. G experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Deep linear frozen model with `frozen_layers` layers, one-layer linear target (G.1).
    Linear {
        /// `L`.
        frozen_layers: usize,
    },
    /// ReLU FNNs with biases (G.2).
    Fnn {
        /// `L̄`.
        target_layers: usize,
        /// `L`.
        frozen_layers: usize,
    },
    /// Transformer networks (G.3); target and frozen share the architecture.
    Tfn {
        /// Number of blocks `L`.
        layers: usize,
        /// Number of heads `H`.
        heads: usize,
        /// Tokens per sequence.
        seq_len: usize,
    },
}

/// How the frozen model is obtained (App. G.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrozenInit {
    /// Drawn independently of the target.
    Random,
    /// Drawn, then trained with full-rank updates until its loss is a third of the initial one.
    Pretrained,
}

impl FrozenInit {
    /// `"random"` or `"pretrained"`.
    pub fn name(self) -> &'static str {
        match self {
            FrozenInit::Random => "random",
            FrozenInit::Pretrained => "pretrained",
        }
    }
}

/// One experiment of App. G.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    /// Identifier used in the CSV (`"fnn_Lbar2_L4"`, …).
    pub name: String,
    /// Model family and depths.
    pub arch: Architecture,
    /// Width / embedding size `D`.
    pub dim: usize,
    /// Random or pretrained frozen model.
    pub frozen: FrozenInit,
}

/// The ten settings of App. G: linear `L = 2`; FNN `(L̄, L) ∈ {(1, 2), (2, 4)}`; TFN
/// `L ∈ {1, 2}` with two heads — each with a random and a pretrained frozen model, `D = 16`.
pub fn app_g_settings() -> Vec<Setting> {
    let archs = [
        ("linear_L2", Architecture::Linear { frozen_layers: 2 }),
        (
            "fnn_Lbar1_L2",
            Architecture::Fnn {
                target_layers: 1,
                frozen_layers: 2,
            },
        ),
        (
            "fnn_Lbar2_L4",
            Architecture::Fnn {
                target_layers: 2,
                frozen_layers: 4,
            },
        ),
        (
            "tfn_L1_H2",
            Architecture::Tfn {
                layers: 1,
                heads: 2,
                seq_len: 10,
            },
        ),
        (
            "tfn_L2_H2",
            Architecture::Tfn {
                layers: 2,
                heads: 2,
                seq_len: 10,
            },
        ),
    ];
    let mut v = Vec::new();
    for (name, arch) in archs {
        for frozen in [FrozenInit::Random, FrozenInit::Pretrained] {
            v.push(Setting {
                name: name.to_string(),
                arch,
                dim: 16,
                frozen,
            });
        }
    }
    v
}

/// Options of [`run_setting`].
#[derive(Debug, Clone, PartialEq)]
pub struct Opts {
    /// Adam iterations per configuration (App. G: 5000).
    pub iterations: usize,
    /// Learning-rate grid (App. G: {1e-2, 1e-3, 1e-4}).
    pub lr_grid: Vec<f64>,
    /// Weight-decay grid (App. G: {0, 1e-2, 1e-3, 1e-4}).
    pub wd_grid: Vec<f64>,
    /// Master seed; every random stream is derived from it.
    pub seed: u64,
    /// Quick mode (smoke tests): at most 20 iterations, only the first learning rate and weight
    /// decay, batches of at most 64 samples, at most 64 validation and 256 test samples, at most
    /// 50 pretraining steps.
    pub quick: bool,
    /// Samples per training step (App. G: 256; sequences for TFNs).
    pub batch: usize,
    /// Validation samples (App. G: 256).
    pub val_samples: usize,
    /// Test samples (App. G: 5000).
    pub test_samples: usize,
    /// Pretraining: Adam learning rate (released code: 1e-3).
    pub pretrain_lr: f64,
    /// Pretraining: stop once the loss is below `initial / pretrain_factor` (released code: 3).
    pub pretrain_factor: f64,
    /// Pretraining: at most this many steps (released code: 1000).
    pub pretrain_max_steps: usize,
    /// Whether the adapted model's biases are trained along with the adapters (§2.1, Thm. 6
    /// update them; the released code does so for FNNs, not TFNs).
    pub train_biases: bool,
    /// `false`: `torch.optim.Adam` with L2 weight decay (App. G); `true`: AdamW.
    pub decoupled_weight_decay: bool,
    /// Worker threads for the grid (each configuration runs on one thread).
    pub threads: usize,
}

impl Default for Opts {
    /// The full App. G protocol.
    fn default() -> Self {
        Opts {
            iterations: 5000,
            lr_grid: vec![1e-2, 1e-3, 1e-4],
            wd_grid: vec![0.0, 1e-2, 1e-3, 1e-4],
            seed: 0,
            quick: false,
            batch: 256,
            val_samples: 256,
            test_samples: 5000,
            pretrain_lr: 1e-3,
            pretrain_factor: 3.0,
            pretrain_max_steps: 1000,
            train_biases: true,
            decoupled_weight_decay: false,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }
}

impl Opts {
    /// The options actually used: the quick-mode caps applied.
    fn effective(&self) -> Result<Opts> {
        let mut o = self.clone();
        if o.quick {
            o.iterations = o.iterations.min(20);
            o.lr_grid.truncate(1);
            o.wd_grid.truncate(1);
            o.batch = o.batch.min(64);
            o.val_samples = o.val_samples.min(64);
            o.test_samples = o.test_samples.min(256);
            o.pretrain_max_steps = o.pretrain_max_steps.min(50);
        }
        if o.lr_grid.is_empty() || o.wd_grid.is_empty() {
            return Err(ElraError::invalid("lr_grid/wd_grid", "must not be empty"));
        }
        if o.batch == 0 || o.val_samples == 0 || o.test_samples == 0 {
            return Err(ElraError::invalid(
                "batch/val_samples/test_samples",
                "must be ≥ 1",
            ));
        }
        if !(o.pretrain_factor.is_finite() && o.pretrain_factor >= 1.0) {
            return Err(ElraError::invalid(
                "pretrain_factor",
                "must be finite and ≥ 1",
            ));
        }
        o.threads = o.threads.max(1);
        Ok(o)
    }
}

/// One result line: a setting at one rank.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Setting name.
    pub setting: String,
    /// `"random"` or `"pretrained"`.
    pub frozen_init: String,
    /// Width `D`.
    pub dim: usize,
    /// LoRA-rank `R`.
    pub rank: usize,
    /// Test MSE of the frozen model itself (no adapters).
    pub frozen_mse: f64,
    /// Test MSE of the construction (NaN if it failed; see `note`).
    pub construction_mse: f64,
    /// Adapter family trained (`"lora"`, …).
    pub adapter: String,
    /// Test MSE of the best trained configuration.
    pub trained_mse: f64,
    /// Validation MSE of that configuration.
    pub best_val_mse: f64,
    /// Its learning rate.
    pub best_lr: f64,
    /// Its weight decay.
    pub best_wd: f64,
    /// Adam iterations per configuration.
    pub iterations: usize,
    /// Pretraining steps taken (0 for a random frozen model).
    pub pretrain_steps: usize,
    /// Configurations that diverged, construction failures, pretraining that stopped early.
    pub note: String,
}

/// Derives an independent stream seed from the master seed and a tag (SplitMix64 mixing).
fn derive_seed(seed: u64, tag: &str, extra: u64) -> u64 {
    let mut z = seed ^ 0x9E37_79B9_7F4A_7C15;
    for b in tag.bytes().chain(extra.to_le_bytes()) {
        z = z
            .wrapping_add(u64::from(b))
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    z
}

fn rng_for(seed: u64, tag: &str, extra: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(derive_seed(seed, tag, extra))
}

/// The seeds [`run_setting`] trains every configuration of `rank` with: (adapter
/// initialisation, training-sample stream), both derived from `opts.seed` and the setting's
/// name (the frozen-initialisation variant shares them). With [`tfn_setting_models`] /
/// [`linear_setting_models`] and [`train_adapters`] they reproduce one runner configuration
/// outside the runner — and, varied, measure how much a row depends on them (App. G trains one
/// seed per configuration).
pub fn rank_seeds(setting: &Setting, opts: &Opts, rank: usize) -> (u64, u64) {
    (
        derive_seed(opts.seed, &setting.name, 1000 + rank as u64),
        derive_seed(opts.seed, &setting.name, 2000 + rank as u64),
    )
}

/// The (frozen, target) pair of a linear App. G.1 setting exactly as [`run_setting`] builds it:
/// drawn from the setting's seed stream and, for [`FrozenInit::Pretrained`], pretrained with the
/// same options. Returns the frozen model and the target.
///
/// Errors: a setting that is not linear; invalid options; pretraining failures.
pub fn linear_setting_models(setting: &Setting, opts: &Opts) -> Result<(LinearModel, LinearModel)> {
    let Architecture::Linear { frozen_layers } = setting.arch else {
        return Err(ElraError::invalid("setting", "not a linear setting"));
    };
    setting_models(setting, opts, |mr| {
        let target = LinearModel::random(setting.dim, 1, mr)?;
        Ok((LinearModel::random(setting.dim, frozen_layers, mr)?, target))
    })
}

/// The (frozen, target) pair of a TFN App. G.3 setting exactly as [`run_setting`] builds it
/// (§3.1 models, App. G.3 initialisation: [`Tfn::random`] for the target, then the frozen model,
/// from the setting's seed stream; [`FrozenInit::Pretrained`] pretrains the frozen model with the
/// same options). Returns the frozen model and the target.
///
/// Errors: a setting that is not a TFN; invalid options; pretraining failures.
pub fn tfn_setting_models(setting: &Setting, opts: &Opts) -> Result<(Tfn, Tfn)> {
    let Architecture::Tfn {
        layers,
        heads,
        seq_len,
    } = setting.arch
    else {
        return Err(ElraError::invalid("setting", "not a TFN setting"));
    };
    setting_models(setting, opts, |mr| {
        let target = Tfn::random(setting.dim, layers, heads, seq_len, mr)?;
        Ok((
            Tfn::random(setting.dim, layers, heads, seq_len, mr)?,
            target,
        ))
    })
}

/// The shared part of [`linear_setting_models`] and [`tfn_setting_models`]: `draw` returns
/// (frozen, target) from the setting's model stream (the order of draws is the caller's, as in
/// [`run_setting_families`]); the frozen model is then pretrained for
/// [`FrozenInit::Pretrained`].
fn setting_models<N: Network>(
    setting: &Setting,
    opts: &Opts,
    draw: impl FnOnce(&mut ChaCha8Rng) -> Result<(N, N)>,
) -> Result<(N, N)> {
    let o = opts.effective()?;
    let mut mr = rng_for(o.seed, &setting.name, 0);
    let (frozen, target) = draw(&mut mr)?;
    let frozen = match setting.frozen {
        FrozenInit::Random => frozen,
        FrozenInit::Pretrained => {
            let mut r = rng_for(o.seed, &setting.name, 1);
            pretrain(
                &frozen,
                &target,
                o.pretrain_lr,
                o.pretrain_factor,
                o.pretrain_max_steps,
                o.batch,
                &mut r,
            )?
            .0
        }
    };
    Ok((frozen, target))
}

/// The test inputs of a setting exactly as [`run_setting`] draws them (App. G: `test_samples`
/// samples of i.i.d. `N(0, 1)` entries, `rows_per_sample` rows each, from the setting's test
/// stream), for analyses of a run's test set outside the runner.
///
/// Errors: invalid options.
pub fn setting_test_inputs<N: Network>(
    setting: &Setting,
    opts: &Opts,
    net: &N,
) -> Result<DMatrix<f64>> {
    let o = opts.effective()?;
    Ok(test_inputs(setting, &o, net))
}

/// The runner's test set: `o.test_samples` samples from stream 3 of the setting.
fn test_inputs<N: Network>(setting: &Setting, o: &Opts, net: &N) -> DMatrix<f64> {
    gaussian_batch(net, o.test_samples, &mut rng_for(o.seed, &setting.name, 3))
}

/// A batch of `n` samples (`n·rows_per_sample` rows) with i.i.d. `N(0,1)` entries.
fn gaussian_batch<N: Network>(net: &N, n: usize, rng: &mut ChaCha8Rng) -> DMatrix<f64> {
    standard_normal(n * net.rows_per_sample(), net.dim(), rng)
}

/// One optimiser step on a flat list of slices, mapping errors to [`ElraError::Training`].
fn adam_step(
    adam: &mut Adam,
    params: &mut [&mut [f64]],
    grads: &[&[f64]],
    step: usize,
) -> Result<()> {
    adam.step(params, grads).map_err(|e| ElraError::Training {
        step,
        reason: e.to_string(),
    })
}

/// Full-rank pretraining of App. G.1: Adam on every weight and bias of `frozen` towards
/// `target` until the training loss is below `initial / factor` or `max_steps` steps were taken.
/// Returns the trained model and the number of steps taken.
///
/// Errors: invalid hyper-parameters; [`ElraError::Training`] on a non-finite loss or gradient.
pub fn pretrain<N: Network>(
    frozen: &N,
    target: &N,
    lr: f64,
    factor: f64,
    max_steps: usize,
    batch: usize,
    rng: &mut ChaCha8Rng,
) -> Result<(N, usize)> {
    let mut model = frozen.clone();
    let sizes: Vec<usize> = model
        .weights()
        .iter()
        .map(|w| w.len())
        .chain(model.biases().iter().map(|b| b.len()))
        .collect();
    let mut adam = Adam::new(AdamConfig::adam(lr, 0.0), &sizes)?;
    let mut initial = f64::NAN;
    for step in 0..max_steps {
        let x = gaussian_batch(&model, batch, rng);
        let y = target.forward(&x)?;
        let (loss, g) = mse_loss_and_grads(&model, &x, &y).map_err(|e| ElraError::Training {
            step,
            reason: e.to_string(),
        })?;
        if step == 0 {
            initial = loss;
        } else if loss < initial / factor {
            return Ok((model, step));
        }
        let grads: Vec<&[f64]> = g
            .weights
            .iter()
            .map(|w| w.as_slice())
            .chain(g.biases.iter().map(|b| b.as_slice()))
            .collect();
        let (ws, bs) = model.params_mut();
        let mut params: Vec<&mut [f64]> = ws
            .into_iter()
            .map(|w| w.as_mut_slice())
            .chain(bs.into_iter().map(|b| b.as_mut_slice()))
            .collect();
        adam_step(&mut adam, &mut params, &grads, step)?;
    }
    Ok((model, max_steps))
}

/// A trained configuration: the adapted model (effective weights and biases filled in) and its
/// validation MSE.
#[derive(Debug, Clone)]
pub struct Trained<N> {
    /// `frozen` with `W_eff(θ)` in the adapted slots and the trained biases.
    pub model: N,
    /// MSE on the validation set.
    pub val_mse: f64,
    /// Training loss at the last step.
    pub last_loss: f64,
}

/// Writes `W_eff(θ_k; W0_k)` into the adapted slots and the biases into `model`.
fn assemble<N: Network, A: WeightAdapter>(
    model: &mut N,
    slots: &[usize],
    w0: &[DMatrix<f64>],
    adapters: &[A],
    biases: Option<&[DVector<f64>]>,
) -> Result<()> {
    let (mut ws, mut bs) = model.params_mut();
    for ((&s, w), a) in slots.iter().zip(w0).zip(adapters) {
        *ws[s] = a.effective_weight(w)?;
    }
    if let Some(b) = biases {
        for (dst, src) in bs.iter_mut().zip(b) {
            dst.copy_from(src);
        }
    }
    Ok(())
}

/// Trains adapters of one family and rank on the adapted slots of `frozen` (and, with
/// `train_biases`, its biases) to match `target`: `iterations` Adam steps on fresh `N(0, I)`
/// batches of `batch` samples, per-entry MSE loss (App. G). The gradient flows
/// `∂L/∂W_eff` (the model's reverse mode, [`Network::vjp`]) `→ ∂L/∂θ`
/// ([`WeightAdapter::pullback`]).
///
/// Errors: invalid hyper-parameters or rank; [`ElraError::Training`] when a loss or gradient
/// becomes non-finite (divergence).
#[allow(clippy::too_many_arguments)]
pub fn train_adapters<N: Network, F: AdapterFamily>(
    frozen: &N,
    target: &N,
    family: &F,
    rank: usize,
    cfg: AdamConfig,
    iterations: usize,
    batch: usize,
    train_biases: bool,
    init_seed: u64,
    data_seed: u64,
    val: (&DMatrix<f64>, &DMatrix<f64>),
) -> Result<Trained<N>> {
    let slots = frozen.adapted_slots();
    let w0: Vec<DMatrix<f64>> = slots.iter().map(|&s| frozen.weights()[s].clone()).collect();
    let mut init_rng = ChaCha8Rng::seed_from_u64(init_seed);
    let mut adapters: Vec<F::Adapter> = w0
        .iter()
        .map(|w| family.init(w, rank, &mut init_rng))
        .collect::<Result<_>>()?;
    let mut biases: Vec<DVector<f64>> = if train_biases {
        frozen.biases().into_iter().cloned().collect()
    } else {
        Vec::new()
    };
    let sizes: Vec<usize> = adapters
        .iter()
        .flat_map(|a| a.params().into_iter().map(|p| p.len()).collect::<Vec<_>>())
        .chain(biases.iter().map(|b| b.len()))
        .collect();
    let mut adam = Adam::new(cfg, &sizes)?;
    let mut data_rng = ChaCha8Rng::seed_from_u64(data_seed);
    let mut model = frozen.clone();
    let mut last_loss = f64::NAN;
    let training = |step: usize| {
        move |e: ElraError| ElraError::Training {
            step,
            reason: e.to_string(),
        }
    };
    for step in 0..iterations {
        for a in adapters.iter_mut() {
            a.set_step(step, iterations);
        }
        assemble(
            &mut model,
            &slots,
            &w0,
            &adapters,
            train_biases.then_some(&biases[..]),
        )
        .map_err(training(step))?;
        let x = gaussian_batch(frozen, batch, &mut data_rng);
        let y = target.forward(&x)?;
        let (loss, g) = mse_loss_and_grads(&model, &x, &y).map_err(training(step))?;
        last_loss = loss;
        let mut owned: Vec<DMatrix<f64>> = Vec::with_capacity(sizes.len());
        for ((a, w), &s) in adapters.iter().zip(&w0).zip(&slots) {
            owned.extend(a.pullback(w, &g.weights[s]).map_err(training(step))?);
        }
        let grads: Vec<&[f64]> = owned
            .iter()
            .map(|m| m.as_slice())
            .chain(g.biases.iter().take(biases.len()).map(|b| b.as_slice()))
            .collect();
        let mut params: Vec<&mut [f64]> = adapters
            .iter_mut()
            .flat_map(|a| a.params_mut())
            .map(|p| p.as_mut_slice())
            .chain(biases.iter_mut().map(|b| b.as_mut_slice()))
            .collect();
        adam_step(&mut adam, &mut params, &grads, step)?;
    }
    for a in adapters.iter_mut() {
        a.set_step(iterations, iterations);
    }
    assemble(
        &mut model,
        &slots,
        &w0,
        &adapters,
        train_biases.then_some(&biases[..]),
    )
    .map_err(training(iterations))?;
    let val_mse = mse(&model.forward(val.0)?, val.1)?;
    if !val_mse.is_finite() {
        return Err(ElraError::Training {
            step: iterations,
            reason: "non-finite validation loss".into(),
        });
    }
    Ok(Trained {
        model,
        val_mse,
        last_loss,
    })
}

/// Runs one App. G setting for the given ranks with LoRA adapters (`B = 0`, `A ~ N(0, 1/D)`):
/// per rank, the construction's test MSE and the best trained configuration's test MSE.
///
/// Errors: ranks outside `[1, D]`, invalid options; pretraining that diverges.
pub fn run_setting(setting: &Setting, ranks: &[usize], opts: &Opts) -> Result<Vec<Row>> {
    run_setting_with(setting, ranks, opts, &LoraFamily { init_std: None })
}

/// [`run_setting`] with any adapter family (the construction column is always the paper's).
///
/// Errors: as [`run_setting`].
pub fn run_setting_with<F: AdapterFamily>(
    setting: &Setting,
    ranks: &[usize],
    opts: &Opts,
    family: &F,
) -> Result<Vec<Row>> {
    run_setting_families(setting, ranks, opts, std::slice::from_ref(family), &|| {})
}

/// [`run_setting`] for several adapter families of one type (e.g. LoRA and the ELRA variants
/// behind [`super::runner::Method`]): the frozen model (and its pretraining), the validation and
/// test sets and the construction are shared; per rank, every family × grid configuration is
/// trained (in parallel over `opts.threads`), and `progress` is called once per finished
/// configuration. Rows are ordered by rank, then family.
///
/// Errors: as [`run_setting`]; an empty `families`.
pub fn run_setting_families<F: AdapterFamily>(
    setting: &Setting,
    ranks: &[usize],
    opts: &Opts,
    families: &[F],
    progress: &(dyn Fn() + Sync),
) -> Result<Vec<Row>> {
    let o = opts.effective()?;
    let d = setting.dim;
    if d == 0 {
        return Err(ElraError::invalid("setting.dim", "must be ≥ 1"));
    }
    if families.is_empty() {
        return Err(ElraError::invalid("families", "must not be empty"));
    }
    if let Some(&r) = ranks.iter().find(|&&r| r == 0 || r > d) {
        return Err(ElraError::invalid(
            "ranks",
            format!("rank {r} outside [1, D = {d}]"),
        ));
    }
    // Target and frozen models depend on the setting's name only, so the random and the
    // pretrained variant start from the same pair.
    let mut mr = rng_for(o.seed, &setting.name, 0);
    let run = RunCtx {
        setting,
        ranks,
        o: &o,
        families,
        progress,
    };
    match setting.arch {
        Architecture::Linear { frozen_layers } => {
            let target = LinearModel::random(d, 1, &mut mr)?;
            let frozen = LinearModel::random(d, frozen_layers, &mut mr)?;
            run_generic(run, frozen, target, |f, t, r, _| {
                Ok(linear::construct(f, t, r)?.model)
            })
        }
        Architecture::Fnn {
            target_layers,
            frozen_layers,
        } => {
            let target = Fnn::random(d, target_layers, &mut mr)?;
            let frozen = Fnn::random(d, frozen_layers, &mut mr)?;
            run_generic(run, frozen, target, |f, t, r, x| {
                Ok(fnn::construct(f, t, r, input_radius(x))?.model)
            })
        }
        Architecture::Tfn {
            layers,
            heads,
            seq_len,
        } => {
            let target = Tfn::random(d, layers, heads, seq_len, &mut mr)?;
            let frozen = Tfn::random(d, layers, heads, seq_len, &mut mr)?;
            run_generic(run, frozen, target, |f, t, r, _| {
                Ok(tfn::construct(f, t, r)?.model)
            })
        }
    }
}

/// The arguments of [`run_generic`] that do not depend on the model type.
struct RunCtx<'a, F> {
    setting: &'a Setting,
    ranks: &'a [usize],
    o: &'a Opts,
    families: &'a [F],
    progress: &'a (dyn Fn() + Sync),
}

fn run_generic<N, F, C>(run: RunCtx<'_, F>, frozen: N, target: N, construct: C) -> Result<Vec<Row>>
where
    N: Network,
    F: AdapterFamily,
    C: Fn(&N, &N, usize, &DMatrix<f64>) -> Result<N>,
{
    let RunCtx {
        setting,
        ranks,
        o,
        families,
        progress,
    } = run;
    let mut notes_setting = Vec::new();
    let (frozen, pretrain_steps) = match setting.frozen {
        FrozenInit::Random => (frozen, 0),
        FrozenInit::Pretrained => {
            let mut r = rng_for(o.seed, &setting.name, 1);
            let (m, steps) = pretrain(
                &frozen,
                &target,
                o.pretrain_lr,
                o.pretrain_factor,
                o.pretrain_max_steps,
                o.batch,
                &mut r,
            )?;
            if steps == o.pretrain_max_steps {
                notes_setting.push(format!(
                    "pretraining reached the step cap ({steps}) before loss < initial/{}",
                    o.pretrain_factor
                ));
            }
            (m, steps)
        }
    };
    let x_val = gaussian_batch(
        &frozen,
        o.val_samples,
        &mut rng_for(o.seed, &setting.name, 2),
    );
    let y_val = target.forward(&x_val)?;
    let x_test = test_inputs(setting, o, &frozen);
    let y_test = target.forward(&x_test)?;
    let frozen_mse = mse(&frozen.forward(&x_test)?, &y_test)?;
    let configs: Vec<(f64, f64)> = o
        .lr_grid
        .iter()
        .flat_map(|&lr| o.wd_grid.iter().map(move |&wd| (lr, wd)))
        .collect();
    let jobs: Vec<(usize, f64, f64)> = (0..families.len())
        .flat_map(|fi| configs.iter().map(move |&(lr, wd)| (fi, lr, wd)))
        .collect();

    let mut rows = Vec::with_capacity(ranks.len() * families.len());
    for &rank in ranks {
        let mut notes_rank = notes_setting.clone();
        let construction_mse = match construct(&frozen, &target, rank, &x_test)
            .and_then(|m| mse(&m.forward(&x_test)?, &y_test))
        {
            Ok(v) => v,
            Err(e) => {
                notes_rank.push(format!("construction failed: {e}"));
                f64::NAN
            }
        };
        // All families and configurations of one rank share the initialisation seed and the
        // sample stream (as the released code does for its configurations).
        let (init_seed, data_seed) = rank_seeds(setting, o, rank);
        let results = run_grid(&jobs, o.threads, |&(fi, lr, wd)| {
            let cfg = if o.decoupled_weight_decay {
                AdamConfig::adamw(lr, wd)
            } else {
                AdamConfig::adam(lr, wd)
            };
            let r = train_adapters(
                &frozen,
                &target,
                &families[fi],
                rank,
                cfg,
                o.iterations,
                o.batch,
                o.train_biases,
                init_seed,
                data_seed,
                (&x_val, &y_val),
            );
            progress();
            (fi, lr, wd, r)
        });
        let mut best: Vec<Option<(f64, f64, Trained<N>)>> =
            (0..families.len()).map(|_| None).collect();
        let mut notes: Vec<Vec<String>> = vec![notes_rank; families.len()];
        for (fi, lr, wd, res) in results {
            match res {
                Ok(t) => {
                    if best[fi].as_ref().is_none_or(|b| t.val_mse < b.2.val_mse) {
                        best[fi] = Some((lr, wd, t));
                    }
                }
                Err(ElraError::Training { step, reason }) => notes[fi].push(format!(
                    "lr={lr:e} wd={wd:e} diverged at step {step}: {reason}"
                )),
                Err(e) => return Err(e),
            }
        }
        for (fi, (b, mut notes)) in best.into_iter().zip(notes).enumerate() {
            let (trained_mse, best_val_mse, best_lr, best_wd) = match b {
                Some((lr, wd, t)) => (mse(&t.model.forward(&x_test)?, &y_test)?, t.val_mse, lr, wd),
                None => {
                    notes.push("every configuration diverged".into());
                    (f64::NAN, f64::NAN, f64::NAN, f64::NAN)
                }
            };
            rows.push(Row {
                setting: setting.name.clone(),
                frozen_init: setting.frozen.name().to_string(),
                dim: setting.dim,
                rank,
                frozen_mse,
                construction_mse,
                adapter: families[fi].name(),
                trained_mse,
                best_val_mse,
                best_lr,
                best_wd,
                iterations: o.iterations,
                pretrain_steps,
                note: notes.join("; "),
            });
        }
    }
    Ok(rows)
}

/// Runs `f` on every configuration with up to `threads` scoped worker threads; results in
/// configuration order (the runner's grid of App. G configurations; also used by the examples
/// that retrain configurations outside it).
pub fn run_grid<T, R, G>(configs: &[T], threads: usize, f: G) -> Vec<R>
where
    T: Sync,
    R: Send,
    G: Fn(&T) -> R + Sync,
{
    if threads <= 1 || configs.len() <= 1 {
        return configs.iter().map(&f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out: std::sync::Mutex<Vec<Option<R>>> =
        std::sync::Mutex::new((0..configs.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads.min(configs.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= configs.len() {
                    break;
                }
                let r = f(&configs[i]);
                out.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
            });
        }
    });
    out.into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .map(|r| r.expect("every configuration ran"))
        .collect()
}

/// The CSV header of [`to_csv`].
pub const CSV_HEADER: &str = "setting,frozen_init,dim,rank,frozen_mse,construction_mse,adapter,trained_mse,best_val_mse,best_lr,best_wd,iterations,pretrain_steps,note";

/// Rows as CSV text (header [`CSV_HEADER`], floats in `{:e}` notation, the note quoted and on
/// one line); [`from_csv`] reads it back.
pub fn to_csv(rows: &[Row]) -> String {
    let mut s = String::from(CSV_HEADER);
    s.push('\n');
    for r in rows {
        let _ = writeln!(
            s,
            "{},{},{},{},{:e},{:e},{},{:e},{:e},{:e},{:e},{},{},\"{}\"",
            r.setting,
            r.frozen_init,
            r.dim,
            r.rank,
            r.frozen_mse,
            r.construction_mse,
            r.adapter,
            r.trained_mse,
            r.best_val_mse,
            r.best_lr,
            r.best_wd,
            r.iterations,
            r.pretrain_steps,
            r.note.replace('"', "\"\"").replace(['\n', '\r'], " ")
        );
    }
    s
}

/// Parses the text of [`to_csv`] back into rows — the inverse of [`to_csv`]: `{:e}` prints the
/// shortest digits that round-trip, so every finite or infinite number comes back with the same
/// bits, and `to_csv(&from_csv(&to_csv(rows)))` is the same text. Not kept: a NaN's sign and
/// payload (any NaN reads back as `f64::NAN`), and line breaks in a note (written as spaces).
/// Used to join the CSVs of a run made rank by rank ([`super::runner::merge_csvs`]).
///
/// Errors: [`ElraError::InvalidArgument`] (`"csv"`) naming the line, if the header is not
/// [`CSV_HEADER`], a line has another number of fields, a number does not parse or the note is
/// not quoted.
pub fn from_csv(text: &str) -> Result<Vec<Row>> {
    let mut lines = text.lines();
    if lines.next().map(str::trim_end) != Some(CSV_HEADER) {
        return Err(ElraError::invalid(
            "csv",
            format!("first line is not the runner's header {CSV_HEADER:?}"),
        ));
    }
    let columns = CSV_HEADER.split(',').count();
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let n = i + 2;
        let bad = |what: &str| ElraError::invalid("csv", format!("line {n}: {what}"));
        // Every field but the last (the quoted note, which may hold commas) is comma-free.
        let f: Vec<&str> = line.trim_end().splitn(columns, ',').collect();
        if f.len() != columns {
            return Err(bad(&format!("{} fields, expected {columns}", f.len())));
        }
        let num = |k: usize| -> Result<f64> {
            f[k].parse()
                .map_err(|_| bad(&format!("column {k}: {:?} is not a number", f[k])))
        };
        let int = |k: usize| -> Result<usize> {
            f[k].parse()
                .map_err(|_| bad(&format!("column {k}: {:?} is not a count", f[k])))
        };
        let note = f[columns - 1]
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .ok_or_else(|| bad("the note is not quoted"))?;
        rows.push(Row {
            setting: f[0].to_string(),
            frozen_init: f[1].to_string(),
            dim: int(2)?,
            rank: int(3)?,
            frozen_mse: num(4)?,
            construction_mse: num(5)?,
            adapter: f[6].to_string(),
            trained_mse: num(7)?,
            best_val_mse: num(8)?,
            best_lr: num(9)?,
            best_wd: num(10)?,
            iterations: int(11)?,
            pretrain_steps: int(12)?,
            note: note.replace("\"\"", "\""),
        });
    }
    Ok(rows)
}
