//! Adam (Kingma & Ba 2015, Alg. 1) with PyTorch's coupled L2 weight decay (`torch.optim.Adam`,
//! the optimiser of App. G) or decoupled weight decay (AdamW, Loshchilov & Hutter 2019, Alg. 2).

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

    fn validate(&self) -> Result<()> {
        let ok = |x: f64| x.is_finite();
        if !(ok(self.lr) && self.lr > 0.0) {
            return Err(ElraError::invalid("lr", "must be finite and > 0"));
        }
        if !(ok(self.beta1) && (0.0..1.0).contains(&self.beta1)) {
            return Err(ElraError::invalid("beta1", "must be in [0, 1)"));
        }
        if !(ok(self.beta2) && (0.0..1.0).contains(&self.beta2)) {
            return Err(ElraError::invalid("beta2", "must be in [0, 1)"));
        }
        if !(ok(self.eps) && self.eps > 0.0) {
            return Err(ElraError::invalid("eps", "must be finite and > 0"));
        }
        if !(ok(self.weight_decay) && self.weight_decay >= 0.0) {
            return Err(ElraError::invalid("weight_decay", "must be finite and ≥ 0"));
        }
        Ok(())
    }
}

/// Adam / AdamW state over a fixed list of parameter tensors, each seen as a flat slice.
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
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let (m, v) = (&mut self.m[i], &mut self.v[i]);
            for j in 0..p.len() {
                let mut gj = g[j];
                if c.decoupled {
                    p[j] *= 1.0 - c.lr * c.weight_decay;
                } else {
                    gj += c.weight_decay * p[j];
                }
                m[j] = c.beta1 * m[j] + (1.0 - c.beta1) * gj;
                v[j] = c.beta2 * v[j] + (1.0 - c.beta2) * gj * gj;
                let mhat = m[j] / bc1;
                let vhat = v[j] / bc2;
                p[j] -= c.lr * mhat / (vhat.sqrt() + c.eps);
            }
        }
        Ok(())
    }
}
