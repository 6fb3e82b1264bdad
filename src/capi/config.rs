//! The C configuration of an adapter: the enumerations of `elra.h` and [`ElraAdapterConfig`], and
//! the one place where their flat fields map onto the library's configs
//! ([`GeneratorConfig`], [`ElraConfig`], [`LoraConfig`]) and back. Validation is the library's
//! ([`ElraConfig::validate`], [`LoraConfig::validate`]), so a config the ABI accepts is one the
//! Rust API and the file loader accept too.

use super::CResult;
use crate::adapter::{
    AlphaSchedule, ElraConfig, EtaMultiplier, GeneratorConfig, LoraConfig, LoraInit, Variant,
};
use crate::ElraError;

/// Generator family of an adapter (`ElraAdapterConfig::variant`).
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElraVariant {
    /// General ELRA, `G = ηAB` (eq. 2): A d×r and B r×d trained.
    ELRA_VARIANT_GENERAL = 0,
    /// ELRA-PSD, `G = ηAAᵀ` (§4.2.1): only A trained.
    ELRA_VARIANT_PSD = 1,
    /// ELRA-Hyb, `G = η(αAAᵀ + (1−α)AB)` with α decaying from 1 to 0 (eq. 19).
    ELRA_VARIANT_HYB = 2,
    /// LoRA (PEFT): `W_new = W0 + (lora_alpha/r)·B·A`, A = `lora_A` r×k, B = `lora_B` d×r.
    ELRA_VARIANT_LORA = 3,
}

/// Element type of an adapter (`ElraAdapterConfig::dtype`).
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElraDtype {
    /// 32-bit IEEE float.
    ELRA_DTYPE_F32 = 0,
    /// 64-bit IEEE float (CPU handles only).
    ELRA_DTYPE_F64 = 1,
}

/// α schedule of ELRA-Hyb (`ElraAdapterConfig::schedule`; eq. 19, eq. 75, App. K).
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElraSchedule {
    /// `α(t) = exp(−γ t/T_warm)` during warm-up, 0 after (eq. 75); uses `warmup_steps`, `gamma`.
    ELRA_SCHEDULE_EXPONENTIAL = 0,
    /// Cosine decay 1 → 0 over `warmup_steps`.
    ELRA_SCHEDULE_COSINE = 1,
    /// Linear decay 1 → 0 over `warmup_steps`.
    ELRA_SCHEDULE_LINEAR = 2,
    /// Constant `alpha` in [0, 1].
    ELRA_SCHEDULE_CONSTANT = 3,
}

/// Multiplier of η over the steps (`ElraAdapterConfig::eta_multiplier`; App. H).
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElraEtaMultiplier {
    /// η is used as is.
    ELRA_ETA_MULTIPLIER_NONE = 0,
    /// Cosine multiplier over `total_steps` (App. H).
    ELRA_ETA_MULTIPLIER_COSINE = 1,
}

/// Which parameter [`elra_adapter_set_param_f64`](super::elra_adapter_set_param_f64) and friends address.
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElraParam {
    /// ELRA: factor A (d×r). LoRA: `lora_A` (r×k).
    ELRA_PARAM_A = 0,
    /// ELRA general/hyb: factor B (r×d; none for PSD). LoRA: `lora_B` (d×r).
    ELRA_PARAM_B = 1,
    /// ELRA: the trained step size η (1×1, > 0). LoRA: none.
    ELRA_PARAM_ETA = 2,
    /// The frozen weight W0 (d×k).
    ELRA_PARAM_W0 = 3,
}

/// Configuration of an adapter. Enumerations are stored as `uint32_t` holding the values of
/// [`ElraVariant`], [`ElraDtype`], [`ElraSchedule`] and [`ElraEtaMultiplier`]; unknown values
/// are rejected with `ELRA_INVALID_ARGUMENT`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ElraAdapterConfig {
    /// An [`ElraVariant`].
    pub variant: u32,
    /// An [`ElraDtype`].
    pub dtype: u32,
    /// Output dimension d (rows of W0).
    pub d: usize,
    /// Input dimension k (columns of W0).
    pub k: usize,
    /// Rank r (ELRA: 1 ≤ r ≤ d; LoRA: 1 ≤ r ≤ min(d, k)).
    pub r: usize,
    /// Initial step size η₀ > 0 (eq. 2; App. H: 1e-3). Ignored by LoRA.
    pub eta: f64,
    /// Energy-penalty weight λ ≥ 0 of `λ‖G‖²_F` (eq. 20; App. H: 1e-5). Ignored by LoRA.
    pub lambda: f64,
    /// Spectral clip threshold τ > 0 (App. H: 2.0), or 0 for no clipping. Ignored by LoRA.
    pub tau: f64,
    /// An [`ElraSchedule`] (used by ELRA-Hyb).
    pub schedule: u32,
    /// Warm-up length `T_warm` of the α schedule, in steps.
    pub warmup_steps: usize,
    /// Decay rate γ ≥ 0 of the exponential schedule (App. H: 5).
    pub gamma: f64,
    /// α of the constant schedule, in [0, 1].
    pub alpha: f64,
    /// An [`ElraEtaMultiplier`].
    pub eta_multiplier: u32,
    /// Length of the main schedule for the cosine η multiplier.
    pub total_steps: usize,
    /// Seed of the deterministic initialisation (ChaCha8).
    pub seed: u64,
    /// LoRA's `lora_alpha` (scaling `lora_alpha / r`). Ignored by ELRA.
    pub lora_alpha: f64,
}

/// The variant of a config: `Some(ELRA variant)` or `None` for LoRA.
pub(crate) fn variant_of(v: u32) -> CResult<Option<Variant>> {
    Ok(match v {
        0 => Some(Variant::General),
        1 => Some(Variant::Psd),
        2 => Some(Variant::Hyb),
        3 => None,
        _ => {
            return Err(
                ElraError::invalid("variant", format!("unknown ElraVariant value {v}")).into(),
            )
        }
    })
}

/// The dtype of a CPU handle.
pub(crate) fn dtype_of(v: u32) -> CResult<ElraDtype> {
    match v {
        0 => Ok(ElraDtype::ELRA_DTYPE_F32),
        1 => Ok(ElraDtype::ELRA_DTYPE_F64),
        2 | 3 => Err(ElraError::invalid(
            "dtype",
            format!(
                "value {v} is an f16/bf16 activation type of GPU handles (ElraGpuDtype, \
                 elra_gpu_adapter_create); CPU adapters are f32 (0) or f64 (1)"
            ),
        )
        .into()),
        _ => Err(ElraError::invalid("dtype", format!("unknown ElraDtype value {v}")).into()),
    }
}

impl ElraAdapterConfig {
    /// The generator settings of an ELRA config (`tau = 0` means no clip), not yet validated.
    fn generator(&self, variant: Variant) -> CResult<GeneratorConfig> {
        let schedule = match self.schedule {
            0 => AlphaSchedule::Exponential {
                warmup_steps: self.warmup_steps,
                gamma: self.gamma,
            },
            1 => AlphaSchedule::Cosine {
                warmup_steps: self.warmup_steps,
            },
            2 => AlphaSchedule::Linear {
                warmup_steps: self.warmup_steps,
            },
            3 => AlphaSchedule::Constant { alpha: self.alpha },
            v => {
                return Err(ElraError::invalid(
                    "schedule",
                    format!("unknown ElraSchedule value {v}"),
                )
                .into())
            }
        };
        let eta_multiplier = match self.eta_multiplier {
            0 => EtaMultiplier::None,
            1 => EtaMultiplier::Cosine {
                total_steps: self.total_steps,
            },
            v => {
                return Err(ElraError::invalid(
                    "eta_multiplier",
                    format!("unknown ElraEtaMultiplier value {v}"),
                )
                .into())
            }
        };
        Ok(GeneratorConfig {
            variant,
            eta: self.eta,
            lambda: self.lambda,
            tau: if self.tau == 0.0 {
                None
            } else {
                Some(self.tau)
            },
            schedule,
            eta_multiplier,
        })
    }

    /// The validated [`ElraConfig`] of an ELRA config.
    pub(crate) fn elra(&self, variant: Variant) -> CResult<ElraConfig> {
        let config = ElraConfig {
            generator: self.generator(variant)?,
            d: self.d,
            k: self.k,
            r: self.r,
            seed: self.seed,
        };
        config.validate()?;
        Ok(config)
    }

    /// The validated [`LoraConfig`] of a LoRA config (PEFT's Kaiming-uniform `lora_A`).
    pub(crate) fn lora(&self) -> CResult<LoraConfig> {
        let config = LoraConfig {
            d: self.d,
            k: self.k,
            r: self.r,
            lora_alpha: self.lora_alpha,
            init: LoraInit::KaimingUniform,
            seed: self.seed,
        };
        config.validate()?;
        Ok(config)
    }

    /// The C config of an ELRA layer config with element type `dtype` (a value of
    /// [`ElraDtype`] or `ElraGpuDtype`).
    pub(crate) fn of_elra(c: &ElraConfig, dtype: u32) -> Self {
        let g = &c.generator;
        let (schedule, warmup_steps, gamma, alpha) = match g.schedule {
            AlphaSchedule::Exponential {
                warmup_steps,
                gamma,
            } => (0, warmup_steps, gamma, 0.0),
            AlphaSchedule::Cosine { warmup_steps } => (1, warmup_steps, 0.0, 0.0),
            AlphaSchedule::Linear { warmup_steps } => (2, warmup_steps, 0.0, 0.0),
            AlphaSchedule::Constant { alpha } => (3, 0, 0.0, alpha),
        };
        let (eta_multiplier, total_steps) = match g.eta_multiplier {
            EtaMultiplier::None => (0, 0),
            EtaMultiplier::Cosine { total_steps } => (1, total_steps),
        };
        ElraAdapterConfig {
            variant: match g.variant {
                Variant::General => 0,
                Variant::Psd => 1,
                Variant::Hyb => 2,
            },
            dtype,
            d: c.d,
            k: c.k,
            r: c.r,
            eta: g.eta,
            lambda: g.lambda,
            tau: g.tau.unwrap_or(0.0),
            schedule,
            warmup_steps,
            gamma,
            alpha,
            eta_multiplier,
            total_steps,
            seed: c.seed,
            lora_alpha: c.r as f64,
        }
    }

    /// The C config of a LoRA layer config with element type `dtype`.
    pub(crate) fn of_lora(c: &LoraConfig, dtype: u32) -> Self {
        let mut out = Self::of_elra(&ElraConfig::new(Variant::General, c.d, c.k, c.r, 0), dtype);
        out.variant = ElraVariant::ELRA_VARIANT_LORA as u32;
        out.lora_alpha = c.lora_alpha;
        out.seed = c.seed;
        out
    }
}

/// The parameter names an [`ElraParam`] value addresses (ELRA name, LoRA name); `None` for W0.
pub(crate) fn param_names(which: u32) -> CResult<Option<[&'static str; 2]>> {
    match which {
        0 => Ok(Some(["a", "lora_a"])),
        1 => Ok(Some(["b", "lora_b"])),
        2 => Ok(Some(["eta", "eta"])),
        3 => Ok(None),
        v => Err(ElraError::invalid("which", format!("unknown ElraParam value {v}")).into()),
    }
}

/// What a handle lacks when `which` names no parameter of it.
pub(crate) fn missing_param(which: u32) -> ElraError {
    let what = match which {
        1 => "factor B (ELRA-PSD: G = ηAAᵀ)",
        _ => "step size η (LoRA)",
    };
    ElraError::invalid("which", format!("this adapter has no {what}"))
}
