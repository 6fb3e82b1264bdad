//! Adam (Kingma & Ba 2015, Alg. 1) with PyTorch's coupled L2 weight decay (`torch.optim.Adam`,
//! the optimiser of App. G) or decoupled weight decay (AdamW, Loshchilov & Hutter 2019, Alg. 2).

use crate::train::optim::{adam_bias_corrections, adam_entry_step, AdamWConfig};
use crate::{ElraError, Result};

/// Hyper-parameters of [`Adam`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    /// Learning rate `η`.
    pub lr: f64,
    /// `β₁` (0.9).
    pub beta1: f64,
    /// `β₂` (0.999).
    pub beta2: f64,
    /// `ε` (1e-8).
    pub eps: f64,
    /// Weight decay `λ`.
    pub weight_decay: f64,
    /// `false`: L2 penalty added to the gradient (`g ← g + λθ`, PyTorch `Adam`);
    /// `true`: decoupled (`θ ← θ − ηλθ`, AdamW).
    pub decoupled: bool,
}

impl AdamConfig {
    /// PyTorch's `Adam(lr, weight_decay)` defaults: `β = (0.9, 0.999)`, `ε = 1e-8`, coupled decay.
    pub fn adam(lr: f64, weight_decay: f64) -> Self {
        AdamConfig {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            decoupled: false,
        }
    }

    /// The same with decoupled weight decay (AdamW).
    pub fn adamw(lr: f64, weight_decay: f64) -> Self {
        AdamConfig {
            decoupled: true,
            ..Self::adam(lr, weight_decay)
        }
    }

    /// The moment hyper-parameters in the form the shared entry update takes.
    fn moments(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(ElraError::invalid(
                "lr",
                format!("must be finite and > 0, got {}", self.lr),
            ));
        }
        self.moments().validate()
    }
}

/// Adam / AdamW state over a fixed list of parameter tensors, each seen as a flat slice. The
/// per-entry moment arithmetic is the one [`crate::train::optim::AdamW`] uses
/// (`train::optim::adam_entry_step`); this type adds App. G's coupled L2 decay and slices.
#[derive(Debug, Clone)]
pub struct Adam {
    cfg: AdamConfig,
    t: u64,
    m: Vec<Vec<f64>>,
    v: Vec<Vec<f64>>,
}

impl Adam {
    /// State for tensors of the given lengths (moments start at zero, `t = 0`).
    ///
    /// Errors: invalid hyper-parameters.
    pub fn new(cfg: AdamConfig, sizes: &[usize]) -> Result<Self> {
        cfg.validate()?;
        Ok(Adam {
            cfg,
            t: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        })
    }

    /// Number of steps taken.
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// One step (Kingma & Ba, Alg. 1, bias-corrected): `m ← β₁m + (1−β₁)g`,
    /// `v ← β₂v + (1−β₂)g²`, `θ ← θ − η m̂ / (√v̂ + ε)`, with the configured weight decay.
    ///
    /// Errors: wrong number or sizes of tensors; [`ElraError::NonFinite`] for a non-finite
    /// gradient (nothing is updated then).
    pub fn step(&mut self, params: &mut [&mut [f64]], grads: &[&[f64]]) -> Result<()> {
        if params.len() != self.m.len() || grads.len() != self.m.len() {
            return Err(ElraError::invalid(
                "params",
                format!(
                    "expected {} tensors, got {} params and {} grads",
                    self.m.len(),
                    params.len(),
                    grads.len()
                ),
            ));
        }
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            if p.len() != self.m[i].len() || g.len() != self.m[i].len() {
                return Err(ElraError::Shape {
                    arg: "params",
                    expected: format!("{} entries in tensor {i}", self.m[i].len()),
                    got: format!("{} params, {} grads", p.len(), g.len()),
                });
            }
            if !g.iter().all(|x| x.is_finite()) {
                return Err(ElraError::NonFinite { arg: "grads" });
            }
        }
        self.t += 1;
        let c = self.cfg;
        let moments = c.moments();
        let bc = adam_bias_corrections(&moments, self.t);
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let (m, v) = (&mut self.m[i], &mut self.v[i]);
            for j in 0..p.len() {
                let mut gj = g[j];
                if c.decoupled {
                    p[j] *= 1.0 - c.lr * c.weight_decay;
                } else {
                    gj += c.weight_decay * p[j];
                }
                p[j] -= adam_entry_step(&moments, bc, c.lr, &mut m[j], &mut v[j], gj);
            }
        }
        Ok(())
    }
}
