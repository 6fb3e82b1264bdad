//! Geometric stability diagnostics of §5.4: per-step speed, spikes, coefficient of variation.
//!
//! For adapters `ℓ = 1..L` with generators `G_t^(ℓ)` at optimiser step t (ELRA: the effective
//! generator `A C` used by the step's forward pass; LoRA: its product `ΔW = s·B'A'`),
//! `s_t = (Σ_ℓ ‖G_t^(ℓ) − G_{t−1}^(ℓ)‖²_F)^{1/2}`. A spike is declared when
//! `s_t > μ_t + 3σ_t` with `μ_t`, `σ_t` the mean and standard deviation of the trailing window
//! (the `w = 200` previous speeds, the current one excluded so that a spike does not raise its
//! own threshold), and
//! `CV(s) = std(s_t) / max(mean(s_t), 1e-12)` over the whole run.
//!
//! **Low-rank speed.** `‖A₁C₁ − A₀C₀‖²_F` is computed without forming either product: with
//! `ΔA = A₁ − A₀`, `ΔC = C₁ − C₀`, `A₁C₁ − A₀C₀ = ΔA C₁ + A₀ ΔC = P Q` for
//! `P = [ΔA, A₀]` (n×2r) and `Q = [C₁; ΔC]` (2r×m), so the squared norm is
//! `tr((PᵀP)(QQᵀ))` from two 2r×2r Grams (eq. 21's trick). Writing the difference through
//! `ΔA`, `ΔC` (rather than `[A₁, −A₀][C₁; C₀]`) avoids cancelling two terms of size `‖G‖²`
//! when the step is small. The computation runs in f64.
//!
//! **Full windows only.** A spike is only declared once the trailing window holds `w` speeds
//! (the rolling-window convention `min_periods = w` of pandas, which §5.4's plots suggest).
//! With partial windows, the first steps of ELRA — whose speed grows geometrically while η
//! grows from η₀ = 10⁻³ — would all count as spikes, which says nothing about stability.

use nalgebra::DMatrix;

use crate::grad::ops::{matmul, Op};
use crate::linalg::Real;
use crate::{ElraError, Result};

/// Window of the causal moving statistics (§5.4: `w = 200`).
pub const DEFAULT_WINDOW: usize = 200;
/// Spike threshold in standard deviations (§5.4: 3σ).
pub const SPIKE_SIGMAS: f64 = 3.0;
/// ε of the coefficient of variation (§5.4).
pub const CV_EPS: f64 = 1e-12;

fn to_f64<T: Real>(m: &DMatrix<T>) -> DMatrix<f64> {
    m.map(|x| x.f64())
}

/// `‖A₁C₁ − A₀C₀‖²_F` from 2r×2r Grams (module docs); `A` n×r, `C` r×m.
///
/// Errors: the four shapes disagree.
pub fn generator_step_sq<T: Real>(
    a0: &DMatrix<T>,
    c0: &DMatrix<T>,
    a1: &DMatrix<T>,
    c1: &DMatrix<T>,
) -> Result<f64> {
    let (n, r) = a0.shape();
    let m = c0.ncols();
    if c0.shape() != (r, m) {
        return Err(ElraError::shape("c0", (r, m), c0.shape()));
    }
    if a1.shape() != (n, r) {
        return Err(ElraError::shape("a1", (n, r), a1.shape()));
    }
    if c1.shape() != (r, m) {
        return Err(ElraError::shape("c1", (r, m), c1.shape()));
    }
    let (a0, a1, c0, c1) = (to_f64(a0), to_f64(a1), to_f64(c0), to_f64(c1));
    let mut p = DMatrix::zeros(n, 2 * r);
    p.view_mut((0, 0), (n, r)).copy_from(&(&a1 - &a0));
    p.view_mut((0, r), (n, r)).copy_from(&a0);
    let mut q = DMatrix::zeros(2 * r, m);
    q.view_mut((0, 0), (r, m)).copy_from(&c1);
    q.view_mut((r, 0), (r, m)).copy_from(&(&c1 - &c0));
    let pp = matmul(&p, Op::T, &p, Op::N);
    let qq = matmul(&q, Op::N, &q, Op::T);
    Ok(pp.dot(&qq).max(0.0))
}

/// Tracks the per-step speed `s_t` of a set of low-rank generators (module docs).
#[derive(Debug, Clone, Default)]
pub struct SpeedTracker {
    prev: Option<Vec<(DMatrix<f64>, DMatrix<f64>)>>,
    speeds: Vec<f64>,
}

impl SpeedTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the generators `G^(ℓ) = A^(ℓ) C^(ℓ)` of the current step and returns `s_t`
    /// (`None` at the first call, which has no predecessor).
    ///
    /// Errors: a different number of generators or shapes than at the previous call.
    pub fn record<T: Real>(&mut self, gens: &[(&DMatrix<T>, &DMatrix<T>)]) -> Result<Option<f64>> {
        let cur: Vec<(DMatrix<f64>, DMatrix<f64>)> =
            gens.iter().map(|(a, c)| (to_f64(a), to_f64(c))).collect();
        let out = match &self.prev {
            None => None,
            Some(prev) => {
                if prev.len() != cur.len() {
                    return Err(ElraError::invalid(
                        "gens",
                        format!("expected {} generators, got {}", prev.len(), cur.len()),
                    ));
                }
                let mut total = 0.0;
                for ((a0, c0), (a1, c1)) in prev.iter().zip(&cur) {
                    total += generator_step_sq(a0, c0, a1, c1)?;
                }
                let s = total.sqrt();
                self.speeds.push(s);
                Some(s)
            }
        };
        self.prev = Some(cur);
        Ok(out)
    }

    /// The speeds recorded so far (`s_1, s_2, …`).
    pub fn speeds(&self) -> &[f64] {
        &self.speeds
    }
}

/// Spike statistics of a speed series (§5.4).
#[derive(Debug, Clone, PartialEq)]
pub struct SpikeReport {
    /// Trailing-window mean `μ_t` before each speed (NaN while the window is empty).
    pub moving_mean: Vec<f64>,
    /// Trailing-window standard deviation `σ_t` (population) before each speed.
    pub moving_std: Vec<f64>,
    /// Indices `t` (into the series) with `s_t > μ_t + 3σ_t`.
    pub spikes: Vec<usize>,
    /// `CV(s) = std(s)/max(mean(s), 1e-12)` over the whole series (0 for an empty series).
    pub cv: f64,
}

/// Causal moving statistics, spikes and CV of a speed series (§5.4, module docs), with the
/// trailing window `window` and threshold `k_sigma` standard deviations.
///
/// Errors: `window` = 0; `k_sigma` negative or non-finite.
pub fn spike_report(speeds: &[f64], window: usize, k_sigma: f64) -> Result<SpikeReport> {
    if window == 0 {
        return Err(ElraError::invalid("window", "must be at least 1"));
    }
    if !k_sigma.is_finite() || k_sigma < 0.0 {
        return Err(ElraError::invalid(
            "k_sigma",
            format!("must be finite and ≥ 0, got {k_sigma}"),
        ));
    }
    let n = speeds.len();
    let mut moving_mean = Vec::with_capacity(n);
    let mut moving_std = Vec::with_capacity(n);
    let mut spikes = Vec::new();
    for t in 0..n {
        let lo = t.saturating_sub(window);
        let w = &speeds[lo..t];
        if w.is_empty() {
            moving_mean.push(f64::NAN);
            moving_std.push(f64::NAN);
            continue;
        }
        let (mu, sd) = mean_std(w);
        moving_mean.push(mu);
        moving_std.push(sd);
        if w.len() >= window && speeds[t] > mu + k_sigma * sd {
            spikes.push(t);
        }
    }
    let cv = if n == 0 {
        0.0
    } else {
        let (mu, sd) = mean_std(speeds);
        sd / mu.max(CV_EPS)
    };
    Ok(SpikeReport {
        moving_mean,
        moving_std,
        spikes,
        cv,
    })
}

/// Mean and population standard deviation.
fn mean_std(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let mu = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / n;
    (mu, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn step_norm_matches_dense() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut m =
            |r: usize, c: usize| DMatrix::<f64>::from_fn(r, c, |_, _| rng.random_range(-1.0..1.0));
        let (a0, c0) = (m(9, 3), m(3, 7));
        let (a1, c1) = (&a0 + m(9, 3) * 1e-4, &c0 + m(3, 7) * 1e-4);
        let dense = (&a1 * &c1 - &a0 * &c0).norm_squared();
        let got = generator_step_sq(&a0, &c0, &a1, &c1).unwrap();
        assert!((got - dense).abs() <= 1e-10 * dense, "{got} vs {dense}");
        assert_eq!(generator_step_sq(&a0, &c0, &a0, &c0).unwrap(), 0.0);
    }

    #[test]
    fn spikes_and_cv() {
        let mut s = vec![1.0; 30];
        s[20] = 5.0;
        let rep = spike_report(&s, 10, 3.0).unwrap();
        assert_eq!(rep.spikes, vec![20]);
        // Not before the window is full.
        assert!(spike_report(&s, 25, 3.0).unwrap().spikes.is_empty());
        assert!(rep.moving_mean[0].is_nan());
        assert_eq!(rep.moving_mean[5], 1.0);
        let (mu, sd) = mean_std(&s);
        assert!((rep.cv - sd / mu).abs() < 1e-15);
        // A flat series has no spikes and CV 0.
        let flat = spike_report(&[2.0; 50], 200, 3.0).unwrap();
        assert!(flat.spikes.is_empty());
        assert_eq!(flat.cv, 0.0);
        assert!(spike_report(&s, 0, 3.0).is_err());
    }

    #[test]
    fn tracker_sums_layers() {
        let a0 = DMatrix::from_element(4, 2, 1.0f32);
        let c0 = DMatrix::from_element(2, 4, 0.5f32);
        let c1 = DMatrix::from_element(2, 4, 0.75f32);
        let mut t = SpeedTracker::new();
        assert_eq!(t.record(&[(&a0, &c0), (&a0, &c0)]).unwrap(), None);
        let s = t.record(&[(&a0, &c1), (&a0, &c0)]).unwrap().unwrap();
        // A0 (C1 − C0): every entry 2·0.25 = 0.5, 16 entries.
        assert!((s - (16.0f64 * 0.25).sqrt()).abs() < 1e-12);
        assert!(t.record(&[(&a0, &c0)]).is_err());
    }
}
