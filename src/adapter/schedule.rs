//! Schedules: the α gate of ELRA-Hyb and the cosine multiplier of the step size η.
//!
//! * α (eq. 19, App. H eq. 75, App. K) starts at 1 (pure PSD generator) and decays to 0
//!   (general generator) over a warm-up interval of `T_warm` steps; after the warm-up α = 0.
//!   The seed's App. H eq. (74) and App. B eq. (25) swap the roles of α; this crate follows the
//!   main text (eq. 19, Algorithm 1), see `DESIGN.md`.
//! * The η multiplier (App. H, "cosine schedule multiplier in [0.5, 1.0] tied to the main
//!   scheduler") is `m(t) = 0.75 + 0.25·cos(π·t/T)`, so `m(0) = 1` and `m(T) = 0.5`.

use serde::{Deserialize, Serialize};

use crate::{ElraError, Result};

/// Default fraction of the total number of steps used as the α warm-up (App. H: 25 %).
pub const DEFAULT_WARMUP_FRACTION: f64 = 0.25;
/// Default decay rate γ of the exponential α schedule (App. H eq. 75: γ = 5).
pub const DEFAULT_GAMMA: f64 = 5.0;

/// The α gate of ELRA-Hyb, `G = η(α AAᵀ + (1−α) AB)` (eq. 19): a function of the step `t`.
///
/// Every decaying schedule satisfies `α(0) = 1` and `α(t) = 0` for `t > T_warm`. A warm-up of
/// zero steps is accepted and means "general from the first step on": `α(0) = 1`, `α(t) = 0`
/// for `t ≥ 1`.
///
/// Serialised (in `adapter_config.json`) as `{"type": "exponential", "warmup_steps": …,
/// "gamma": …}`, `{"type": "cosine", …}`, `{"type": "linear", …}`, `{"type": "constant",
/// "alpha": …}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AlphaSchedule {
    /// App. H eq. (75): `α_t = exp(−γ t/T_warm)` for `t ≤ T_warm`, then 0.
    Exponential {
        /// Warm-up length `T_warm` in steps.
        warmup_steps: usize,
        /// Decay rate γ ≥ 0 (paper default 5).
        gamma: f64,
    },
    /// App. K: `α_t = ½(1 + cos(π·min(t/T_warm, 1)))`.
    Cosine {
        /// Warm-up length `T_warm` in steps.
        warmup_steps: usize,
    },
    /// App. K: `α_t = 1 − min(t/T_warm, 1)`.
    Linear {
        /// Warm-up length `T_warm` in steps.
        warmup_steps: usize,
    },
    /// A fixed α ∈ [0, 1] (α = 1: ELRA-PSD generator, α = 0: general ELRA, eq. 19).
    Constant {
        /// The value of α.
        alpha: f64,
    },
}

impl AlphaSchedule {
    /// The paper's default (App. H eq. 75): exponential decay with `T_warm` = 25 % of
    /// `total_steps` (rounded to the nearest step) and γ = 5.
    pub fn paper_default(total_steps: usize) -> Self {
        AlphaSchedule::Exponential {
            warmup_steps: warmup_from_fraction(total_steps, DEFAULT_WARMUP_FRACTION),
            gamma: DEFAULT_GAMMA,
        }
    }

    /// Exponential schedule (eq. 75) whose warm-up is `fraction` of `total_steps`.
    ///
    /// Errors: `fraction` outside `[0, 1]` or non-finite, `gamma` negative or non-finite.
    pub fn exponential(total_steps: usize, fraction: f64, gamma: f64) -> Result<Self> {
        check_fraction(fraction)?;
        let s = AlphaSchedule::Exponential {
            warmup_steps: warmup_from_fraction(total_steps, fraction),
            gamma,
        };
        s.validate()?;
        Ok(s)
    }

    /// Cosine schedule (App. K) whose warm-up is `fraction` of `total_steps`.
    pub fn cosine(total_steps: usize, fraction: f64) -> Result<Self> {
        check_fraction(fraction)?;
        Ok(AlphaSchedule::Cosine {
            warmup_steps: warmup_from_fraction(total_steps, fraction),
        })
    }

    /// Linear schedule (App. K) whose warm-up is `fraction` of `total_steps`.
    pub fn linear(total_steps: usize, fraction: f64) -> Result<Self> {
        check_fraction(fraction)?;
        Ok(AlphaSchedule::Linear {
            warmup_steps: warmup_from_fraction(total_steps, fraction),
        })
    }

    /// Checks the schedule's parameters: γ finite and ≥ 0; a constant α finite and in [0, 1].
    pub fn validate(&self) -> Result<()> {
        match *self {
            AlphaSchedule::Exponential { gamma, .. } => {
                if !gamma.is_finite() || gamma < 0.0 {
                    return Err(ElraError::invalid(
                        "gamma",
                        format!("must be finite and ≥ 0, got {gamma}"),
                    ));
                }
            }
            AlphaSchedule::Constant { alpha } => super::config::check_alpha(alpha)?,
            AlphaSchedule::Cosine { .. } | AlphaSchedule::Linear { .. } => {}
        }
        Ok(())
    }

    /// α at optimiser step `step` (eq. 75 and App. K). Always in `[0, 1]` for a valid schedule;
    /// for an invalid one (see [`validate`](Self::validate)) the value is clamped into `[0, 1]`
    /// (NaN becomes 0), so this never returns a non-finite number.
    pub fn alpha(&self, step: usize) -> f64 {
        let a = match *self {
            AlphaSchedule::Constant { alpha } => alpha,
            AlphaSchedule::Exponential {
                warmup_steps,
                gamma,
            } => match progress(step, warmup_steps) {
                None => 0.0,
                Some(_) if warmup_steps == 0 => 1.0,
                // −γt/T_warm evaluated as (−γ·t)/T_warm (the lab's App. G runs were made so).
                Some(_) => (-gamma * step as f64 / warmup_steps as f64).exp(),
            },
            AlphaSchedule::Cosine { warmup_steps } => match progress(step, warmup_steps) {
                None => 0.0,
                Some(p) => 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
            },
            AlphaSchedule::Linear { warmup_steps } => match progress(step, warmup_steps) {
                None => 0.0,
                Some(p) => 1.0 - p,
            },
        };
        if a.is_nan() {
            0.0
        } else {
            a.clamp(0.0, 1.0)
        }
    }
}

/// `t/T_warm` while `t ≤ T_warm`, `None` after the warm-up (α = 0). A zero warm-up gives
/// `Some(0)` at `t = 0` (α = 1) and `None` afterwards.
fn progress(step: usize, warmup: usize) -> Option<f64> {
    if warmup == 0 {
        return if step == 0 { Some(0.0) } else { None };
    }
    if step > warmup {
        None
    } else {
        Some(step as f64 / warmup as f64)
    }
}

fn warmup_from_fraction(total_steps: usize, fraction: f64) -> usize {
    (total_steps as f64 * fraction).round() as usize
}

fn check_fraction(fraction: f64) -> Result<()> {
    if !fraction.is_finite() || !(0.0..=1.0).contains(&fraction) {
        return Err(ElraError::invalid(
            "fraction",
            format!("warm-up fraction must lie in [0, 1], got {fraction}"),
        ));
    }
    Ok(())
}

/// The cosine multiplier of the step size η (App. H, ELRA: "cosine schedule multiplier in
/// [0.5, 1.0] tied to the main scheduler"): `m(t) = 0.75 + 0.25·cos(π·t/T)`.
///
/// `m(0) = 1`, `m(T) = 0.5`, monotone in between; `t > T` is clamped to `T`. `total_steps = 0`
/// means no schedule and gives `m = 1`.
pub fn eta_cosine_multiplier(step: usize, total_steps: usize) -> f64 {
    if total_steps == 0 {
        return 1.0;
    }
    let p = (step.min(total_steps)) as f64 / total_steps as f64;
    0.75 + 0.25 * (std::f64::consts::PI * p).cos()
}

/// How the effective step size `η_eff(t) = η · m(t)` of a layer evolves with the step.
///
/// Serialised as `{"type": "none"}` or `{"type": "cosine", "total_steps": …}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EtaMultiplier {
    /// `m(t) = 1`: η is used as is.
    #[default]
    None,
    /// `m(t)` = [`eta_cosine_multiplier`]`(t, total_steps)` (App. H).
    Cosine {
        /// Length `T` of the main (learning-rate) schedule.
        total_steps: usize,
    },
}

impl EtaMultiplier {
    /// The multiplier `m(t)` at step `step` (App. H).
    pub fn at(&self, step: usize) -> f64 {
        match *self {
            EtaMultiplier::None => 1.0,
            EtaMultiplier::Cosine { total_steps } => eta_cosine_multiplier(step, total_steps),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_matches_eq_75() {
        let s = AlphaSchedule::paper_default(1000);
        assert_eq!(
            s,
            AlphaSchedule::Exponential {
                warmup_steps: 250,
                gamma: 5.0
            }
        );
        assert_eq!(s.alpha(0), 1.0);
        // exp(−5·100/250) = exp(−2)
        assert!((s.alpha(100) - (-2.0f64).exp()).abs() < 1e-15);
        assert!((s.alpha(250) - (-5.0f64).exp()).abs() < 1e-15);
        assert_eq!(s.alpha(251), 0.0);
        assert_eq!(s.alpha(100_000), 0.0);
        // monotone non-increasing
        for t in 0..1000 {
            assert!(s.alpha(t + 1) <= s.alpha(t));
        }
    }

    #[test]
    fn cosine_and_linear_match_app_k() {
        let c = AlphaSchedule::cosine(100, 0.5).unwrap();
        let l = AlphaSchedule::linear(100, 0.5).unwrap();
        assert_eq!(c.alpha(0), 1.0);
        assert_eq!(l.alpha(0), 1.0);
        assert!((c.alpha(25) - 0.5).abs() < 1e-15);
        assert!((l.alpha(25) - 0.5).abs() < 1e-15);
        assert!(c.alpha(50).abs() < 1e-15);
        assert_eq!(l.alpha(50), 0.0);
        assert_eq!(c.alpha(77), 0.0);
        assert_eq!(l.alpha(77), 0.0);
        // cosine has zero slope at both ends: α(1) is closer to 1 than the linear one
        assert!(1.0 - c.alpha(1) < 1.0 - l.alpha(1));
    }

    #[test]
    fn zero_warmup_and_constant() {
        let s = AlphaSchedule::Linear { warmup_steps: 0 };
        assert_eq!(s.alpha(0), 1.0);
        assert_eq!(s.alpha(1), 0.0);
        let e = AlphaSchedule::Exponential {
            warmup_steps: 0,
            gamma: 5.0,
        };
        assert_eq!(e.alpha(0), 1.0);
        assert_eq!(e.alpha(3), 0.0);
        assert_eq!(AlphaSchedule::Constant { alpha: 0.3 }.alpha(17), 0.3);
        assert!(AlphaSchedule::Constant { alpha: 1.5 }.validate().is_err());
        assert!(AlphaSchedule::Constant { alpha: f64::NAN }
            .validate()
            .is_err());
        assert_eq!(AlphaSchedule::Constant { alpha: f64::NAN }.alpha(0), 0.0);
        assert!(AlphaSchedule::exponential(10, 0.25, -1.0).is_err());
        assert!(AlphaSchedule::cosine(10, 1.5).is_err());
    }

    #[test]
    fn eta_multiplier_endpoints() {
        assert_eq!(eta_cosine_multiplier(0, 100), 1.0);
        assert!((eta_cosine_multiplier(100, 100) - 0.5).abs() < 1e-15);
        assert!((eta_cosine_multiplier(50, 100) - 0.75).abs() < 1e-15);
        assert!((eta_cosine_multiplier(500, 100) - 0.5).abs() < 1e-15);
        assert_eq!(eta_cosine_multiplier(5, 0), 1.0);
        for t in 0..100 {
            let m = eta_cosine_multiplier(t, 100);
            assert!((0.5..=1.0).contains(&m));
            assert!(eta_cosine_multiplier(t + 1, 100) <= m);
        }
        assert_eq!(EtaMultiplier::None.at(7), 1.0);
    }
}
