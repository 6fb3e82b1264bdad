//! Adam (Kingma & Ba 2015, Alg. 1) with PyTorch's coupled L2 weight decay (`torch.optim.Adam`,
//! the optimiser of App. G) or decoupled weight decay (AdamW, Loshchilov & Hutter 2019, Alg. 2).

use elra::train::optim::{AdamW, AdamWConfig};
use elra::{ElraError, Result};
use nalgebra::DMatrix;

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
/// moment arithmetic is the library's [`AdamW`] step (Kingma & Ba's bias-corrected update, run
/// without its own decay); this type adds App. G's weight decay — coupled L2 (`g ← g + λθ`) or
/// decoupled (`θ ← (1 − ηλ) θ` before the step) — and the slices.
#[derive(Debug, Clone)]
pub struct Adam {
    cfg: AdamConfig,
    inner: AdamW,
    sizes: Vec<usize>,
}

impl Adam {
    /// State for tensors of the given lengths (moments start at zero, `t = 0`).
    ///
    /// Errors: invalid hyper-parameters.
    pub fn new(cfg: AdamConfig, sizes: &[usize]) -> Result<Self> {
        cfg.validate()?;
        let moments = AdamWConfig {
            weight_decay: 0.0,
            ..cfg.moments()
        };
        let shapes: Vec<(usize, usize)> = sizes.iter().map(|&n| (n, 1)).collect();
        Ok(Adam {
            cfg,
            inner: AdamW::new(moments, &shapes)?,
            sizes: sizes.to_vec(),
        })
    }

    /// Number of steps taken.
    pub fn steps(&self) -> u64 {
        self.inner.steps_done()
    }

    /// One step (Kingma & Ba, Alg. 1, bias-corrected): `m ← β₁m + (1−β₁)g`,
    /// `v ← β₂v + (1−β₂)g²`, `θ ← θ − η m̂ / (√v̂ + ε)`, with the configured weight decay.
    ///
    /// Errors: wrong number or sizes of tensors; [`ElraError::NonFinite`] for a non-finite
    /// gradient (nothing is updated then).
    pub fn step(&mut self, params: &mut [&mut [f64]], grads: &[&[f64]]) -> Result<()> {
        if params.len() != self.sizes.len() || grads.len() != self.sizes.len() {
            return Err(ElraError::invalid(
                "params",
                format!(
                    "expected {} tensors, got {} params and {} grads",
                    self.sizes.len(),
                    params.len(),
                    grads.len()
                ),
            ));
        }
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            if p.len() != self.sizes[i] || g.len() != self.sizes[i] {
                return Err(ElraError::Shape {
                    arg: "params",
                    expected: format!("{} entries in tensor {i}", self.sizes[i]),
                    got: format!("{} params, {} grads", p.len(), g.len()),
                });
            }
            if !g.iter().all(|x| x.is_finite()) {
                return Err(ElraError::NonFinite { arg: "grads" });
            }
        }
        let c = self.cfg;
        let column = |v: &[f64]| DMatrix::from_column_slice(v.len(), 1, v);
        let mut theta: Vec<DMatrix<f64>> = params.iter().map(|p| column(p)).collect();
        let g: Vec<DMatrix<f64>> = if c.decoupled {
            for t in &mut theta {
                t.iter_mut().for_each(|x| *x *= 1.0 - c.lr * c.weight_decay);
            }
            grads.iter().map(|g| column(g)).collect()
        } else {
            grads
                .iter()
                .zip(&theta)
                .map(|(g, t)| DMatrix::from_fn(g.len(), 1, |j, _| g[j] + c.weight_decay * t[j]))
                .collect()
        };
        let no_decay = vec![false; theta.len()];
        self.inner.step(&mut theta, &g, &no_decay, c.lr)?;
        for (p, t) in params.iter_mut().zip(&theta) {
            p.copy_from_slice(t.as_slice());
        }
        Ok(())
    }
}
