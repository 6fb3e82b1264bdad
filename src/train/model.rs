//! A small model harness: a stack of frozen dense layers with an adapter on every layer.
//!
//! Layer ℓ maps `H_{ℓ−1}` (N×k) to `H_ℓ = act(Y_ℓ + 1 b_ℓᵀ)` with `Y_ℓ = H_{ℓ−1} W_newᵀ`
//! computed by the layer's adapter (ELRA through the Woodbury route, eq. 5; LoRA as PEFT), a
//! frozen bias `b_ℓ` and an activation (tanh, ReLU or identity). The loss is MSE or
//! cross-entropy; every ELRA layer adds its energy penalty `λ‖G‖²_F` (eq. 20). Gradients come
//! from the hand-written reverse mode of [`crate::grad`]. Dropout on the adapter output
//! (App. H, p = 0.05) uses masks drawn by the caller ([`AdaptedNetwork::sample_masks`]), so a
//! seeded generator makes everything bitwise reproducible (single-threaded, no clocks).
//!
//! **Trainable parameters**, in a fixed order per layer: ELRA `[A, B, log η]` (`B` absent for
//! ELRA-PSD), double-sided ELRA (App. B eq. 22) `[A_L, B_L, log η_L, A_R, B_R, log η_R]`, LoRA
//! `[lora_A, lora_B]`. η is optimised through `log η` so that it stays > 0
//! (eq. 2 requires η > 0): `∂L/∂log η = η ∂L/∂η`, and an AdamW step changes η by a bounded
//! factor `exp(±lr)` instead of possibly crossing zero. `log η` receives no weight decay.
#![allow(non_snake_case)]

use nalgebra::{DMatrix, DVector};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::adapter::{
    DoubleSidedConfig, DoubleSidedLayer, ElraConfig, ElraLayer, Frozen, HostAdapter, LoraConfig,
    LoraLayer, Variant,
};
use crate::grad::ops::{matmul, Op};
use crate::linalg::{check_finite, Real};
use crate::{ElraError, Result};

/// Activation after a dense layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `tanh`.
    Tanh,
    /// `max(0, ·)`.
    Relu,
    /// No activation.
    Identity,
}

impl Activation {
    fn apply<T: Real>(self, y: &mut DMatrix<T>) {
        match self {
            Activation::Tanh => y.apply(|v| *v = v.tanh()),
            Activation::Relu => y.apply(|v| {
                if *v < T::zero() {
                    *v = T::zero()
                }
            }),
            Activation::Identity => {}
        }
    }

    /// Multiplies `g` by the derivative, given the activation's output `h`.
    pub(crate) fn backward<T: Real>(self, h: &DMatrix<T>, g: &mut DMatrix<T>) {
        match self {
            Activation::Tanh => g.zip_apply(h, |gv, hv| *gv *= T::one() - hv * hv),
            Activation::Relu => g.zip_apply(h, |gv, hv| {
                if hv <= T::zero() {
                    *gv = T::zero()
                }
            }),
            Activation::Identity => {}
        }
    }
}

/// The training loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossKind {
    /// Mean squared error over all output entries, `(1/(N d)) Σ (y − t)²`.
    Mse,
    /// Mean softmax cross-entropy of the outputs (logits) against class labels.
    CrossEntropy,
}

/// Targets of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets<T: Real> {
    /// Regression targets (N×d) for [`LossKind::Mse`].
    Values(DMatrix<T>),
    /// Class labels (N of them, each < d) for [`LossKind::CrossEntropy`].
    Labels(Vec<usize>),
}

/// The loss and `∂L/∂Y` of the network output `y` (N×d).
///
/// Errors: targets of the wrong kind or shape, a label out of range, non-finite outputs.
pub fn loss_and_grad<T: Real>(
    kind: LossKind,
    y: &DMatrix<T>,
    targets: &Targets<T>,
) -> Result<(f64, DMatrix<T>)> {
    check_finite("y", y)?;
    let (n, d) = y.shape();
    if n == 0 {
        return Err(ElraError::invalid("x", "the batch is empty"));
    }
    match (kind, targets) {
        (LossKind::Mse, Targets::Values(t)) => {
            if t.shape() != (n, d) {
                return Err(ElraError::shape("targets", (n, d), t.shape()));
            }
            check_finite("targets", t)?;
            let diff = y - t;
            let scale = 1.0 / (n * d) as f64;
            let loss = diff.iter().map(|v| v.f64() * v.f64()).sum::<f64>() * scale;
            Ok((loss, diff * T::of(2.0 * scale)))
        }
        (LossKind::CrossEntropy, Targets::Labels(labels)) => {
            if labels.len() != n {
                return Err(ElraError::shape("targets", (n, 1), (labels.len(), 1)));
            }
            let mut g = DMatrix::zeros(n, d);
            let mut loss = 0.0;
            for (i, &c) in labels.iter().enumerate() {
                if c >= d {
                    return Err(ElraError::invalid(
                        "targets",
                        format!("label {c} ≥ {d} classes"),
                    ));
                }
                let row: Vec<f64> = (0..d).map(|j| y[(i, j)].f64()).collect();
                let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = row.iter().map(|v| (v - mx).exp()).sum();
                loss += mx + z.ln() - row[c];
                for j in 0..d {
                    let p = (row[j] - mx).exp() / z;
                    g[(i, j)] = T::of((p - if j == c { 1.0 } else { 0.0 }) / n as f64);
                }
            }
            Ok((loss / n as f64, g))
        }
        _ => Err(ElraError::invalid(
            "targets",
            "the targets do not match the loss kind",
        )),
    }
}

/// A frozen dense layer `h ↦ act(h W0ᵀ + bᵀ)`.
#[derive(Debug, Clone, PartialEq)]
pub struct FrozenLayer<T: Real> {
    /// Weight `W0` (d×k, out×in).
    pub w0: DMatrix<T>,
    /// Bias (length d).
    pub bias: DVector<T>,
    /// Activation.
    pub activation: Activation,
}

/// A stack of frozen dense layers (the "pretrained" network).
#[derive(Debug, Clone, PartialEq)]
pub struct FrozenNetwork<T: Real> {
    /// The layers, input first.
    pub layers: Vec<FrozenLayer<T>>,
}

fn add_bias<T: Real>(y: &mut DMatrix<T>, b: &DVector<T>) {
    for (j, mut col) in y.column_iter_mut().enumerate() {
        col.add_scalar_mut(b[j]);
    }
}

impl<T: Real> FrozenNetwork<T> {
    /// Random layers of widths `widths[0] → widths[1] → …` with LeCun-normal weights
    /// `N(0, 1/k)` (activations stay O(1) under tanh), biases `N(0, 0.1²)`, `hidden` after every
    /// layer but the last and `output` after the last; seeded ChaCha8.
    ///
    /// Errors: fewer than two widths or a zero width.
    pub fn random(
        widths: &[usize],
        hidden: Activation,
        output: Activation,
        seed: u64,
    ) -> Result<Self> {
        if widths.len() < 2 {
            return Err(ElraError::invalid(
                "widths",
                "need at least an input and an output width",
            ));
        }
        if widths.contains(&0) {
            return Err(ElraError::invalid(
                "widths",
                "every width must be at least 1",
            ));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = widths.len() - 1;
        let layers = (0..n)
            .map(|l| {
                let (k, d) = (widths[l], widths[l + 1]);
                let s = 1.0 / (k as f64).sqrt();
                FrozenLayer {
                    w0: DMatrix::from_fn(d, k, |_, _| {
                        T::of(s * rng.sample::<f64, _>(StandardNormal))
                    }),
                    bias: DVector::from_fn(d, |_, _| {
                        T::of(0.1 * rng.sample::<f64, _>(StandardNormal))
                    }),
                    activation: if l + 1 == n { output } else { hidden },
                }
            })
            .collect();
        Ok(FrozenNetwork { layers })
    }

    /// Input width `k` of the first layer.
    pub fn input_dim(&self) -> usize {
        self.layers.first().map_or(0, |l| l.w0.ncols())
    }

    /// Output width `d` of the last layer.
    pub fn output_dim(&self) -> usize {
        self.layers.last().map_or(0, |l| l.w0.nrows())
    }

    /// The network output for a batch `x` (N×k).
    ///
    /// Errors: `x` of the wrong width or non-finite.
    pub fn forward(&self, x: &DMatrix<T>) -> Result<DMatrix<T>> {
        Ok(self.forward_all(x)?.pop().unwrap_or_else(|| x.clone()))
    }

    /// Every layer's output `H_1, …, H_L` (the input is not included).
    pub(crate) fn forward_all(&self, x: &DMatrix<T>) -> Result<Vec<DMatrix<T>>> {
        check_finite("x", x)?;
        let mut outs: Vec<DMatrix<T>> = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let h = outs.last().unwrap_or(x);
            if h.ncols() != l.w0.ncols() {
                return Err(ElraError::shape("x", (h.nrows(), l.w0.ncols()), h.shape()));
            }
            let mut y = matmul(h, Op::N, &l.w0, Op::T);
            add_bias(&mut y, &l.bias);
            l.activation.apply(&mut y);
            outs.push(y);
        }
        Ok(outs)
    }
}

/// `η = exp(log η)` from a 1×1 parameter (module docs). Errors: not 1×1.
fn eta_of<T: Real>(log_eta: &DMatrix<T>) -> Result<DMatrix<T>> {
    if log_eta.shape() != (1, 1) {
        return Err(ElraError::shape("log_eta", (1, 1), log_eta.shape()));
    }
    Ok(log_eta.map(|v| v.exp()))
}

/// Which adapter to put on every layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AdapterSpec {
    /// No adapter (the frozen network).
    None,
    /// PEFT LoRA of rank r with `lora_alpha` (scaling `lora_alpha/r`), `lora_B = 0` at start.
    Lora {
        /// Rank.
        r: usize,
        /// PEFT's `lora_alpha`.
        lora_alpha: f64,
    },
    /// ELRA of a variant and rank with the App. H defaults of [`ElraConfig::new`]
    /// (η₀ = 10⁻³, λ = 10⁻⁵, τ = 2, exponential α schedule, cosine η multiplier), Xavier factors.
    Elra {
        /// Generator family.
        variant: Variant,
        /// Rank.
        r: usize,
    },
    /// Double-sided ELRA `W_new = exp(L) W0 exp(R)` (App. B eq. 22) of a variant (used on both
    /// sides, eq. 23–25) with `r_L = r_R = r` and the App. H defaults of
    /// [`DoubleSidedConfig::new`] (η₀ = 10⁻³ per side, λ = 10⁻⁵ on `‖L‖²_F + ‖R‖²_F`, τ = 2 per
    /// generator, the same α schedule and η multiplier), Xavier factors.
    ElraDouble {
        /// Generator family of both sides.
        variant: Variant,
        /// Rank of each side (`r ≤ min(d, k)`).
        r: usize,
    },
}

impl AdapterSpec {
    /// The adapter of this spec on a frozen weight `w0` (d×k) for a run of `total_steps` steps,
    /// seeded by `seed`: [`Frozen`], [`LoraLayer`] (PEFT's initialisation), [`ElraLayer`] or
    /// [`DoubleSidedLayer`] (App. H defaults, Xavier factors).
    ///
    /// Errors: an invalid rank (r = 0, r > d for ELRA, r > min(d, k) for LoRA and double-sided
    /// ELRA).
    pub fn build<T: Real>(
        &self,
        w0: DMatrix<T>,
        total_steps: usize,
        seed: u64,
    ) -> Result<Box<dyn HostAdapter<T>>> {
        let (d, k) = w0.shape();
        Ok(match *self {
            AdapterSpec::None => Box::new(Frozen::new(w0)?),
            AdapterSpec::Lora { r, lora_alpha } => {
                let mut cfg = LoraConfig::new(d, k, r);
                cfg.lora_alpha = lora_alpha;
                cfg.seed = seed;
                Box::new(LoraLayer::new(cfg, w0)?)
            }
            AdapterSpec::Elra { variant, r } => {
                let mut cfg = ElraConfig::new(variant, d, k, r, total_steps);
                cfg.seed = seed;
                Box::new(ElraLayer::new(cfg, w0)?)
            }
            AdapterSpec::ElraDouble { variant, r } => {
                let mut cfg = DoubleSidedConfig::new(variant, d, k, r, total_steps);
                cfg.seed = seed;
                Box::new(DoubleSidedLayer::new(cfg, w0)?)
            }
        })
    }
}

/// One adapted layer.
#[derive(Debug, Clone)]
pub struct AdaptedLayer<T: Real> {
    /// The adapter (owning `W0`): any [`HostAdapter`].
    pub adapter: Box<dyn HostAdapter<T>>,
    /// Frozen bias.
    pub bias: DVector<T>,
    /// Activation.
    pub activation: Activation,
}

/// The result of one forward/backward pass over the network.
#[derive(Debug, Clone, PartialEq)]
pub struct LossGrad<T: Real> {
    /// The task loss.
    pub loss: f64,
    /// `Σ λ‖G‖²_F` over the ELRA layers (eq. 20; both generators of a double-sided layer).
    pub energy: f64,
    /// Gradients of `loss + energy` in the order of [`AdaptedNetwork::params`].
    pub grads: Vec<DMatrix<T>>,
    /// Each adapted layer's generator factors of this pass (ELRA: `A`, effective `C`;
    /// double-sided ELRA: `(A_L, C_L)` then `(A_R, C_R)`; LoRA: `lora_B`, `s·lora_A`), for the
    /// speed diagnostics (§5.4).
    pub generators: Vec<(DMatrix<T>, DMatrix<T>)>,
    /// The network output (N×d) of this pass.
    pub output: DMatrix<T>,
}

/// A frozen network with an adapter on every layer.
#[derive(Debug, Clone)]
pub struct AdaptedNetwork<T: Real> {
    /// The layers, input first.
    pub layers: Vec<AdaptedLayer<T>>,
    /// The loss.
    pub loss: LossKind,
}

impl<T: Real> AdaptedNetwork<T> {
    /// Puts `spec` on every layer of `base` ([`AdapterSpec::build`]): ELRA and double-sided
    /// layers get the schedules of App. H for `total_steps`, and every layer ℓ is seeded by
    /// `seed + ℓ`.
    ///
    /// Errors: an invalid rank for some layer (r = 0, r > d for ELRA, r > min(d, k) for LoRA
    /// and double-sided ELRA).
    pub fn new(
        base: &FrozenNetwork<T>,
        spec: AdapterSpec,
        loss: LossKind,
        total_steps: usize,
        seed: u64,
    ) -> Result<Self> {
        let layers = base
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let s = seed.wrapping_add(i as u64);
                Ok(AdaptedLayer {
                    adapter: spec.build(l.w0.clone(), total_steps, s)?,
                    bias: l.bias.clone(),
                    activation: l.activation,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdaptedNetwork { layers, loss })
    }

    /// Every layer's parameters as the adapters list them ([`HostAdapter`] order), η itself.
    fn raw_params(&self) -> Result<Vec<DMatrix<T>>> {
        let mut out = Vec::new();
        for l in &self.layers {
            for i in 0..l.adapter.params().len() {
                out.push(l.adapter.param(i)?);
            }
        }
        Ok(out)
    }

    /// Trainable parameters in the order of the module docs (ELRA `[A, B, log η]`, double-sided
    /// `[A_L, B_L, log η_L, A_R, B_R, log η_R]`, LoRA `[lora_A, lora_B]`).
    pub fn params(&self) -> Vec<DMatrix<T>> {
        let mut out = Vec::new();
        for l in &self.layers {
            for (i, spec) in l.adapter.params().iter().enumerate() {
                // In range by construction: i indexes the adapter's own list.
                if let Ok(p) = l.adapter.param(i) {
                    out.push(if spec.positive { p.map(|v| v.ln()) } else { p });
                }
            }
        }
        out
    }

    /// Whether each parameter of [`params`](Self::params) takes weight decay (`log η` does not).
    pub fn decay_flags(&self) -> Vec<bool> {
        self.layers
            .iter()
            .flat_map(|l| l.adapter.params().into_iter().map(|p| p.decay))
            .collect()
    }

    /// Writes parameters back (same order and shapes as [`params`](Self::params)). All or
    /// nothing: on error the network is unchanged.
    ///
    /// Errors: wrong count or shapes, non-finite values, η = exp(log η) not finite and > 0.
    pub fn set_params(&mut self, params: Vec<DMatrix<T>>) -> Result<()> {
        let expected: usize = self.layers.iter().map(|l| l.adapter.params().len()).sum();
        if params.len() != expected {
            return Err(ElraError::invalid(
                "params",
                format!("expected {expected} parameters, got {}", params.len()),
            ));
        }
        let before = self.raw_params()?;
        let result = self.write_params(params.iter(), true);
        if result.is_err() {
            // Every value of `before` was accepted by the adapters, so restoring cannot fail.
            self.write_params(before.iter(), false)?;
        }
        result
    }

    /// Sets every adapter parameter in order; `log_eta` says whether step sizes come as log η.
    fn write_params<'a>(
        &mut self,
        mut values: impl Iterator<Item = &'a DMatrix<T>>,
        log_eta: bool,
    ) -> Result<()> {
        for l in &mut self.layers {
            for (i, spec) in l.adapter.params().iter().enumerate() {
                let v = values
                    .next()
                    .ok_or_else(|| ElraError::invalid("params", "too few parameters"))?;
                if spec.positive && log_eta {
                    l.adapter.set_param(i, &eta_of(v)?)?;
                } else {
                    l.adapter.set_param(i, v)?;
                }
            }
        }
        Ok(())
    }

    /// Moves every adapter to optimiser step `t` (α schedule of eq. 19/75 and the η multiplier
    /// of App. H advance per optimiser step).
    pub fn set_step(&mut self, t: usize) -> Result<()> {
        for l in &mut self.layers {
            l.adapter.set_step(t)?;
        }
        Ok(())
    }

    /// Trainable entries including the η scalars (Remark 1, App. I).
    pub fn trainable_param_count(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.adapter.total_param_count())
            .sum()
    }

    /// Dropout masks for the adapter outputs of a batch of `n` rows (App. H, p = `p`): entries
    /// 0 with probability p, else `1/(1−p)`; `None` for frozen layers or p = 0.
    ///
    /// Errors: p outside [0, 1).
    pub fn sample_masks<R: Rng>(
        &self,
        n: usize,
        p: f64,
        rng: &mut R,
    ) -> Result<Vec<Option<DMatrix<T>>>> {
        if !p.is_finite() || !(0.0..1.0).contains(&p) {
            return Err(ElraError::invalid(
                "dropout",
                format!("must lie in [0, 1), got {p}"),
            ));
        }
        let keep = T::of(1.0 / (1.0 - p));
        Ok(self
            .layers
            .iter()
            .map(|l| {
                if p == 0.0 || l.adapter.params().is_empty() {
                    return None;
                }
                let d = l.adapter.dims().0;
                Some(DMatrix::from_fn(n, d, |_, _| {
                    if rng.random::<f64>() < p {
                        T::zero()
                    } else {
                        keep
                    }
                }))
            })
            .collect())
    }

    /// The network output without dropout.
    ///
    /// Errors: as [`loss_and_grad`](Self::loss_and_grad)'s forward part.
    pub fn predict(&self, x: &DMatrix<T>) -> Result<DMatrix<T>> {
        check_finite("x", x)?;
        let mut h = x.clone();
        for l in &self.layers {
            let mut y = l.adapter.apply(&h)?;
            add_bias(&mut y, &l.bias);
            l.activation.apply(&mut y);
            h = y;
        }
        Ok(h)
    }

    /// The task loss of a batch without dropout (no gradients).
    pub fn eval_loss(&self, x: &DMatrix<T>, targets: &Targets<T>) -> Result<f64> {
        let y = self.predict(x)?;
        Ok(loss_and_grad(self.loss, &y, targets)?.0)
    }

    /// Forward with tapes, loss, energy and reverse mode through every layer ([`Adapter`](crate::adapter::Adapter)
    /// forward and backward, [`crate::grad`]). `masks` (one per layer, from
    /// [`sample_masks`](Self::sample_masks)) drop out adapter outputs.
    ///
    /// Errors: shapes, non-finite values (inputs, outputs, loss, gradients), φ1 failures.
    pub fn loss_and_grad(
        &mut self,
        x: &DMatrix<T>,
        targets: &Targets<T>,
        masks: Option<&[Option<DMatrix<T>>]>,
    ) -> Result<LossGrad<T>> {
        if let Some(m) = masks {
            if m.len() != self.layers.len() {
                return Err(ElraError::invalid(
                    "masks",
                    format!("expected {} masks, got {}", self.layers.len(), m.len()),
                ));
            }
        }
        check_finite("x", x)?;
        let mut inputs: Vec<DMatrix<T>> = Vec::with_capacity(self.layers.len());
        let mut outputs: Vec<DMatrix<T>> = Vec::with_capacity(self.layers.len());
        let mut energy = 0.0;
        for (i, l) in self.layers.iter_mut().enumerate() {
            let h = outputs.last().unwrap_or(x).clone();
            let mask = masks.and_then(|m| m[i].as_ref());
            let mut y = DMatrix::zeros(h.nrows(), l.adapter.dims().0);
            l.adapter.forward(&h, mask, &mut y)?;
            if let Some(e) = l.adapter.energy()? {
                energy += e.penalty;
            }
            add_bias(&mut y, &l.bias);
            l.activation.apply(&mut y);
            inputs.push(h);
            outputs.push(y);
        }
        let out = outputs.last().cloned().unwrap_or_else(|| x.clone());
        let (loss, mut g) = loss_and_grad(self.loss, &out, targets)?;
        if !loss.is_finite() || !energy.is_finite() {
            return Err(ElraError::NonFinite { arg: "loss" });
        }
        // Reverse pass; parameter gradients are collected per layer, then flattened in order.
        let mut per_layer: Vec<Vec<DMatrix<T>>> = vec![Vec::new(); self.layers.len()];
        for i in (0..self.layers.len()).rev() {
            let l = &mut self.layers[i];
            l.activation.backward(&outputs[i], &mut g);
            let h = &inputs[i];
            let mut gx = DMatrix::zeros(h.nrows(), h.ncols());
            l.adapter.backward(h, &g, &mut gx)?;
            for (j, spec) in l.adapter.params().iter().enumerate() {
                let gp = l.adapter.grad(j)?;
                per_layer[i].push(if spec.positive {
                    // ∂L/∂log η = η ∂L/∂η (module docs).
                    let eta = l.adapter.param(j)?;
                    gp.component_mul(&eta)
                } else {
                    gp
                });
            }
            g = gx;
        }
        let mut gens: Vec<(DMatrix<T>, DMatrix<T>)> = Vec::new();
        for l in &self.layers {
            gens.extend(l.adapter.generator_factors()?);
        }
        let grads: Vec<DMatrix<T>> = per_layer.into_iter().flatten().collect();
        for gm in &grads {
            check_finite("gradient", gm)?;
        }
        Ok(LossGrad {
            loss,
            energy,
            grads,
            generators: gens,
            output: out,
        })
    }
}
