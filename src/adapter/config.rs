//! The generator configuration every ELRA adapter shares, and the settings it gives at a step.
//!
//! [`GeneratorConfig`] holds what defines a generator `G = A·C` besides its trained factors
//! (eq. 2, §4.2.1, eq. 19, App. H): the variant, the initial step size η₀, the energy weight λ
//! (eq. 20), the spectral-clip threshold τ, the α schedule (eq. 75, App. K) and the η
//! multiplier. The single-sided ([`super::ElraConfig`]) and double-sided
//! ([`super::DoubleSidedConfig`]) layers embed it, the adapter files store it (its serde form is
//! the `adapter_config.json` layout), and the C ABI maps its flat fields onto it in one place.
//!
//! [`GeneratorConfig::spec_at`] is the one function that turns a step into the non-trainable
//! settings of that step ([`GeneratorSpec`]: α, the η multiplier, τ, λ); the CPU reverse mode and
//! the GPU layers both take that spec. [`GeneratorConfig::validate`] is the one validation of
//! these fields, used by constructors, the file loader and the ABI alike.

use serde::{Deserialize, Serialize};

use super::generator::Variant;
use super::schedule::{AlphaSchedule, EtaMultiplier};
use crate::linalg::Real;
use crate::{ElraError, Result};

/// Default energy-penalty weight λ of `λ‖G‖²_F` (eq. 20, App. H: λ = 10⁻⁵).
pub const DEFAULT_LAMBDA: f64 = 1e-5;
/// Default spectral-clip threshold τ (App. H: "if ‖G‖₂ > τ rescale G", τ = 2.0).
pub const DEFAULT_TAU: f64 = 2.0;
/// Default initial step size η₀ (App. H: η₀ = 10⁻³).
pub const DEFAULT_ETA: f64 = 1e-3;

/// Everything that defines an ELRA generator besides its trained factors `A`, `B` and η
/// (eq. 2, §4.2.1, eq. 19, eq. 20, eq. 75, App. H).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GeneratorConfig {
    /// Generator family (eq. 2, §4.2.1, eq. 19).
    pub variant: Variant,
    /// Initial step size η₀ > 0 (eq. 2; App. H: 10⁻³). The trained η starts here.
    pub eta: f64,
    /// Energy-penalty weight λ ≥ 0 of `λ‖G‖²_F` (eq. 20; App. H: 10⁻⁵).
    pub lambda: f64,
    /// Spectral-clip threshold τ > 0 (App. H: 2.0), or `None` for no clipping.
    pub tau: Option<f64>,
    /// The α schedule of ELRA-Hyb (eq. 19, eq. 75, App. K); ignored by the other variants.
    #[serde(rename = "alpha_schedule")]
    pub schedule: AlphaSchedule,
    /// Multiplier of η over the steps (App. H): the generator uses `η_eff(t) = η · m(t)`.
    pub eta_multiplier: EtaMultiplier,
}

/// The non-trainable settings of one generator at one step (Algorithm 1 line 4, App. H).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GeneratorSpec {
    /// α of eq. (19): 0 general, 1 PSD, the schedule's value for Hyb.
    pub alpha: f64,
    /// The η multiplier `m(t)` (App. H cosine in [0.5, 1]); 1 for none.
    pub eta_mult: f64,
    /// Spectral-clip threshold τ (App. H), `None` for no clip.
    pub tau: Option<f64>,
    /// Energy-penalty weight λ ≥ 0 (eq. 20).
    pub lambda: f64,
}

impl GeneratorConfig {
    /// The paper's defaults (App. H) for a run of `total_steps` optimiser steps: η₀ = 10⁻³,
    /// λ = 10⁻⁵, τ = 2.0, exponential α schedule with `T_warm` = 25 % and γ = 5 (eq. 75), cosine
    /// η multiplier over `total_steps`.
    pub fn paper_default(variant: Variant, total_steps: usize) -> Self {
        GeneratorConfig {
            variant,
            eta: DEFAULT_ETA,
            lambda: DEFAULT_LAMBDA,
            tau: Some(DEFAULT_TAU),
            schedule: AlphaSchedule::paper_default(total_steps),
            eta_multiplier: EtaMultiplier::Cosine { total_steps },
        }
    }

    /// Checks every field; errors name it (`eta`, `lambda`, `tau`, `gamma`, `alpha`). The one
    /// validation of these settings: layer constructors, the adapter-file loader and the C ABI
    /// all call it.
    pub fn validate(&self) -> Result<()> {
        check_eta(self.eta)?;
        check_lambda(self.lambda)?;
        if let Some(tau) = self.tau {
            check_tau(tau)?;
        }
        self.schedule.validate()
    }

    /// α of eq. (19) at `step`: 0 general, 1 PSD, the schedule's value (eq. 75) for Hyb.
    pub fn alpha_at(&self, step: usize) -> f64 {
        self.variant.alpha_at(&self.schedule, step)
    }

    /// The settings of optimiser step `step` (Algorithm 1 line 4, App. H): α of the variant and
    /// schedule (eq. 19, eq. 75), the η multiplier `m(t)`, τ and λ.
    pub fn spec_at(&self, step: usize) -> GeneratorSpec {
        GeneratorSpec {
            alpha: self.alpha_at(step),
            eta_mult: self.eta_multiplier.at(step),
            tau: self.tau,
            lambda: self.lambda,
        }
    }
}

impl GeneratorSpec {
    /// Checks the settings: α ∈ [0, 1] (eq. 19), `m(t)` finite and > 0, τ finite and > 0 when
    /// set, λ finite and ≥ 0 (eq. 20). Errors name `alpha`, `eta_mult`, `tau`, `lambda`.
    pub fn validate(&self) -> Result<()> {
        check_alpha(self.alpha)?;
        check_eta_mult(self.eta_mult)?;
        if let Some(tau) = self.tau {
            check_tau(tau)?;
        }
        check_lambda(self.lambda)
    }

    /// This spec without the spectral clip, for a back end that has none: errors when τ is set
    /// (the GPU layer, until it clips), else the validated spec.
    pub fn require_no_clip(&self) -> Result<Self> {
        if self.tau.is_some() {
            return Err(ElraError::invalid(
                "tau",
                "the GPU layer has no spectral clip (App. H): set tau = None (tau = 0 in the C ABI)",
            ));
        }
        self.validate()?;
        Ok(*self)
    }
}

/// Checks η: finite and strictly positive (eq. 2: "a trainable positive scaling factor η > 0").
pub(crate) fn check_eta<T: Real>(eta: T) -> Result<()> {
    let e = eta.f64();
    if !e.is_finite() || e <= 0.0 {
        return Err(ElraError::invalid(
            "eta",
            format!("the step size η must be finite and > 0, got {e}"),
        ));
    }
    Ok(())
}

/// Checks τ: finite and strictly positive (App. H spectral clip).
pub(crate) fn check_tau(tau: f64) -> Result<()> {
    if !tau.is_finite() || tau <= 0.0 {
        return Err(ElraError::invalid(
            "tau",
            format!("the spectral-clip threshold τ must be finite and > 0, got {tau}"),
        ));
    }
    Ok(())
}

/// Checks λ: finite and ≥ 0 (eq. 20 energy penalty weight).
pub(crate) fn check_lambda(lambda: f64) -> Result<()> {
    if !lambda.is_finite() || lambda < 0.0 {
        return Err(ElraError::invalid(
            "lambda",
            format!("the energy-penalty weight λ must be finite and ≥ 0, got {lambda}"),
        ));
    }
    Ok(())
}

/// Checks α ∈ [0, 1] (eq. 19).
pub(crate) fn check_alpha(alpha: f64) -> Result<()> {
    if !alpha.is_finite() || !(0.0..=1.0).contains(&alpha) {
        return Err(ElraError::invalid(
            "alpha",
            format!("must lie in [0, 1], got {alpha}"),
        ));
    }
    Ok(())
}

/// Checks the η multiplier `m(t)`: finite and > 0 (App. H).
pub(crate) fn check_eta_mult(m: f64) -> Result<()> {
    if !m.is_finite() || m <= 0.0 {
        return Err(ElraError::invalid(
            "eta_mult",
            format!("must be finite and > 0, got {m}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_follows_the_schedules() {
        let g = GeneratorConfig::paper_default(Variant::Hyb, 100);
        let s0 = g.spec_at(0);
        assert_eq!((s0.alpha, s0.eta_mult), (1.0, 1.0));
        assert_eq!((s0.tau, s0.lambda), (Some(2.0), 1e-5));
        let s = g.spec_at(100);
        assert_eq!(s.alpha, 0.0);
        assert!((s.eta_mult - 0.5).abs() < 1e-15);
        assert_eq!(
            GeneratorConfig::paper_default(Variant::Psd, 100)
                .spec_at(7)
                .alpha,
            1.0
        );
        assert!(s.require_no_clip().is_err());
        let no_clip = GeneratorSpec { tau: None, ..s };
        assert_eq!(no_clip.require_no_clip().unwrap(), no_clip);
        let bad = GeneratorSpec {
            alpha: 1.5,
            ..no_clip
        };
        assert!(bad.validate().is_err());
    }
}
