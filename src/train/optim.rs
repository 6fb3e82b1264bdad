//! AdamW, global gradient-norm clipping and the learning-rate schedule of §5 / App. H.
//!
//! The paper trains every method with AdamW (Loshchilov & Hutter 2019) with β1 = 0.9,
//! β2 = 0.999 and zero weight decay, a cosine learning-rate schedule with a 3 % linear warm-up
//! (§5 "Training setup"), and gradient clipping at max norm 1.0 (App. H.1.1).

use nalgebra::DMatrix;

use crate::linalg::Real;
use crate::{ElraError, Result};

/// AdamW hyperparameters (§5: β1 = 0.9, β2 = 0.999, zero weight decay; ε = 1e-8 as PyTorch).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay β1.
    pub beta1: f64,
    /// Second-moment decay β2.
    pub beta2: f64,
    /// ε added to `sqrt(v̂)`.
    pub eps: f64,
    /// Decoupled weight decay (applied as `θ ← θ − lr·wd·θ` to parameters flagged as decaying).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdamWConfig {
    /// Checks β1, β2 ∈ [0, 1), ε > 0, weight decay ≥ 0 (all finite); errors name the field.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !v.is_finite() || !(0.0..1.0).contains(&v) {
                return Err(ElraError::invalid(
                    name,
                    format!("must lie in [0, 1), got {v}"),
                ));
            }
        }
        if !self.eps.is_finite() || self.eps <= 0.0 {
            return Err(ElraError::invalid(
                "eps",
                format!("must be finite and > 0, got {}", self.eps),
            ));
        }
        if !self.weight_decay.is_finite() || self.weight_decay < 0.0 {
            return Err(ElraError::invalid(
                "weight_decay",
                format!("must be finite and ≥ 0, got {}", self.weight_decay),
            ));
        }
        Ok(())
    }
}

/// The moment updates and the step of one entry (Kingma & Ba 2015, Alg. 1, bias-corrected), the
/// arithmetic shared by [`AdamW`] and the App. G optimiser
/// ([`crate::expressivity::optim::Adam`]): `m ← β1 m + (1−β1) g`, `v ← β2 v + (1−β2) g²`, and
/// the returned step `lr · m̂ / (sqrt(v̂) + ε)` with `m̂ = m / bc1`, `v̂ = v / bc2`,
/// `bc1 = 1 − β1ᵗ`, `bc2 = 1 − β2ᵗ` (weight decay is the caller's).
#[inline]
pub(crate) fn adam_entry_step(
    c: &AdamWConfig,
    (bc1, bc2): (f64, f64),
    lr: f64,
    m: &mut f64,
    v: &mut f64,
    g: f64,
) -> f64 {
    *m = c.beta1 * *m + (1.0 - c.beta1) * g;
    *v = c.beta2 * *v + (1.0 - c.beta2) * g * g;
    let mh = *m / bc1;
    let vh = *v / bc2;
    lr * mh / (vh.sqrt() + c.eps)
}

/// `(1 − β1ᵗ, 1 − β2ᵗ)`, the bias corrections of step `t ≥ 1` (Kingma & Ba 2015, Alg. 1).
pub(crate) fn adam_bias_corrections(c: &AdamWConfig, t: u64) -> (f64, f64) {
    let t = t.min(i32::MAX as u64) as i32;
    (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t))
}

/// AdamW over a fixed list of matrix parameters (Loshchilov & Hutter 2019, Alg. 2, with
/// PyTorch's bias correction): `m ← β1 m + (1−β1) g`, `v ← β2 v + (1−β2) g²`,
/// `θ ← θ − lr (m̂ / (sqrt(v̂) + ε) + wd θ)` with `m̂ = m/(1−β1ᵗ)`, `v̂ = v/(1−β2ᵗ)`.
///
/// The moments are kept in `f64` whatever the parameter precision.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    config: AdamWConfig,
    m: Vec<DMatrix<f64>>,
    v: Vec<DMatrix<f64>>,
    t: u64,
}

impl AdamW {
    /// An optimiser for parameters of the given shapes, all moments zero.
    ///
    /// Errors: an invalid config ([`AdamWConfig::validate`]).
    pub fn new(config: AdamWConfig, shapes: &[(usize, usize)]) -> Result<Self> {
        config.validate()?;
        Ok(AdamW {
            config,
            m: shapes.iter().map(|&(r, c)| DMatrix::zeros(r, c)).collect(),
            v: shapes.iter().map(|&(r, c)| DMatrix::zeros(r, c)).collect(),
            t: 0,
        })
    }

    /// The number of updates done so far.
    pub fn steps_done(&self) -> u64 {
        self.t
    }

    /// One AdamW update with learning rate `lr` (Loshchilov & Hutter 2019, Alg. 2).
    /// `decay[i]` says whether parameter `i` receives weight decay.
    ///
    /// Errors: `params`/`grads`/`decay` not matching the shapes given to [`AdamW::new`];
    /// `lr` negative or non-finite; non-finite gradients.
    pub fn step<T: Real>(
        &mut self,
        params: &mut [DMatrix<T>],
        grads: &[DMatrix<T>],
        decay: &[bool],
        lr: f64,
    ) -> Result<()> {
        if params.len() != self.m.len()
            || grads.len() != self.m.len()
            || decay.len() != self.m.len()
        {
            return Err(ElraError::invalid(
                "params",
                format!(
                    "expected {} parameters, gradients and decay flags, got {}, {}, {}",
                    self.m.len(),
                    params.len(),
                    grads.len(),
                    decay.len()
                ),
            ));
        }
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            if p.shape() != self.m[i].shape() {
                return Err(ElraError::shape("params", self.m[i].shape(), p.shape()));
            }
            if g.shape() != self.m[i].shape() {
                return Err(ElraError::shape("grads", self.m[i].shape(), g.shape()));
            }
            crate::linalg::check_finite("grads", g)?;
        }
        if !lr.is_finite() || lr < 0.0 {
            return Err(ElraError::invalid(
                "lr",
                format!("must be finite and ≥ 0, got {lr}"),
            ));
        }
        self.t += 1;
        let c = self.config;
        let bc = adam_bias_corrections(&c, self.t);
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let (m, v) = (&mut self.m[i], &mut self.v[i]);
            for j in 0..p.len() {
                let step = adam_entry_step(&c, bc, lr, &mut m[j], &mut v[j], g[j].f64());
                let mut th = p[j].f64();
                if decay[i] {
                    th -= lr * c.weight_decay * th;
                }
                th -= step;
                p[j] = T::of(th);
            }
        }
        Ok(())
    }
}

/// The global L2 norm `sqrt(Σ_i ‖g_i‖²_F)` of a list of gradients (in f64).
pub fn global_norm<T: Real>(grads: &[DMatrix<T>]) -> f64 {
    grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|x| {
            let v = x.f64();
            v * v
        })
        .sum::<f64>()
        .sqrt()
}

/// Clips the global gradient norm at `max_norm` (App. H "gradient clipping with max norm 1.0";
/// PyTorch `clip_grad_norm_`): if `‖g‖ > max_norm`, every gradient is scaled by
/// `max_norm/‖g‖`. Returns the norm before clipping.
///
/// Errors: `max_norm` not finite and > 0; a non-finite norm (then nothing is scaled).
pub fn clip_global_norm<T: Real>(grads: &mut [DMatrix<T>], max_norm: f64) -> Result<f64> {
    if !max_norm.is_finite() || max_norm <= 0.0 {
        return Err(ElraError::invalid(
            "max_norm",
            format!("must be finite and > 0, got {max_norm}"),
        ));
    }
    let n = global_norm(grads);
    if !n.is_finite() {
        return Err(ElraError::NonFinite { arg: "grads" });
    }
    if n > max_norm {
        let s = T::of(max_norm / n);
        for g in grads.iter_mut() {
            *g *= s;
        }
    }
    Ok(n)
}

/// Cosine learning-rate schedule with linear warm-up (§5: "a cosine learning-rate schedule with
/// a 3 % warm-up phase"; the schedule of HF `get_cosine_schedule_with_warmup`).
///
/// With `W` warm-up steps out of `T`: `lr(t) = lr_max (t+1)/W` for `t < W`, then
/// `lr_max · ½(1 + cos(π (t−W)/(T−W)))`, reaching 0 after the last step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub lr_max: f64,
    /// Total optimiser steps `T`.
    pub total_steps: usize,
    /// Warm-up steps `W = ceil(fraction · T)`.
    pub warmup_steps: usize,
}

impl LrSchedule {
    /// The schedule with `W = ceil(warmup_fraction · T)` (§5 uses 0.03).
    ///
    /// Errors: `lr_max` not finite and > 0, `total_steps` = 0, `warmup_fraction` outside [0, 1].
    pub fn cosine_with_warmup(
        lr_max: f64,
        total_steps: usize,
        warmup_fraction: f64,
    ) -> Result<Self> {
        if !lr_max.is_finite() || lr_max <= 0.0 {
            return Err(ElraError::invalid(
                "lr",
                format!("must be finite and > 0, got {lr_max}"),
            ));
        }
        if total_steps == 0 {
            return Err(ElraError::invalid("steps", "must be at least 1"));
        }
        if !warmup_fraction.is_finite() || !(0.0..=1.0).contains(&warmup_fraction) {
            return Err(ElraError::invalid(
                "warmup_fraction",
                format!("must lie in [0, 1], got {warmup_fraction}"),
            ));
        }
        let w = ((warmup_fraction * total_steps as f64).ceil() as usize).min(total_steps);
        Ok(LrSchedule {
            lr_max,
            total_steps,
            warmup_steps: w,
        })
    }

    /// The learning rate of optimiser step `t` (0-based).
    pub fn at(&self, t: usize) -> f64 {
        let w = self.warmup_steps;
        if t < w {
            return self.lr_max * (t + 1) as f64 / w as f64;
        }
        let rest = (self.total_steps - w).max(1) as f64;
        let p = ((t - w) as f64 / rest).min(1.0);
        self.lr_max * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_first_step_moves_by_lr_times_sign() {
        // With bias correction the first update is lr · g/(|g| + ε) ≈ lr · sign(g).
        let mut opt = AdamW::new(AdamWConfig::default(), &[(2, 1)]).unwrap();
        let mut p = vec![DMatrix::from_column_slice(2, 1, &[1.0f64, -2.0])];
        let g = vec![DMatrix::from_column_slice(2, 1, &[3.0f64, -0.5])];
        opt.step(&mut p, &g, &[true], 0.1).unwrap();
        assert!((p[0][0] - 0.9).abs() < 1e-8);
        assert!((p[0][1] + 1.9).abs() < 1e-7);
    }

    #[test]
    fn adamw_minimises_a_quadratic() {
        let mut opt = AdamW::new(AdamWConfig::default(), &[(3, 1)]).unwrap();
        let target = DMatrix::from_column_slice(3, 1, &[1.0f64, -2.0, 0.5]);
        let mut p = vec![DMatrix::zeros(3, 1)];
        for _ in 0..3000 {
            let g = vec![(&p[0] - &target) * 2.0];
            opt.step(&mut p, &g, &[false], 0.01).unwrap();
        }
        assert!((&p[0] - &target).norm() < 1e-3);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let mut g = vec![
            DMatrix::from_element(2, 2, 3.0f32),
            DMatrix::from_element(1, 1, 4.0f32),
        ];
        let n = clip_global_norm(&mut g, 1.0).unwrap();
        assert!((n - (36.0f64 + 16.0).sqrt()).abs() < 1e-6);
        assert!((global_norm(&g) - 1.0).abs() < 1e-6);
        let mut small = vec![DMatrix::from_element(1, 1, 0.5f64)];
        assert_eq!(clip_global_norm(&mut small, 1.0).unwrap(), 0.5);
        assert_eq!(small[0][0], 0.5);
        assert!(clip_global_norm(&mut small, 0.0).is_err());
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let s = LrSchedule::cosine_with_warmup(1.0, 100, 0.03).unwrap();
        assert_eq!(s.warmup_steps, 3);
        assert!((s.at(0) - 1.0 / 3.0).abs() < 1e-15);
        assert!((s.at(2) - 1.0).abs() < 1e-15);
        assert!((s.at(3) - 1.0).abs() < 1e-15);
        assert!(s.at(50) < 1.0 && s.at(50) > 0.0);
        assert!(s.at(99) < 1e-3);
        assert!(s.at(100).abs() < 1e-15);
        assert!(LrSchedule::cosine_with_warmup(0.0, 10, 0.03).is_err());
        assert!(LrSchedule::cosine_with_warmup(1.0, 0, 0.03).is_err());
    }
}
