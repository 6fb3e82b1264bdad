//! Conversions between adapter files and the layers of [`crate::adapter`]: an [`AdapterFile`]
//! from named [`ElraLayer`]s / [`LoraLayer`]s, and a layer for one module of a file given its
//! frozen weight `W0`.

use super::adapter_file::{
    AdapterFile, AlphaScheduleSpec, ElraFileConfig, EtaMultiplierSpec, FileConfig, LoraFileConfig,
    ModuleWeights, ELRA_FORMAT_VERSION,
};
use crate::adapter::{
    AlphaSchedule, ElraConfig, ElraLayer, EtaMultiplier, LoraConfig, LoraLayer, Variant,
};
use crate::linalg::Real;
use crate::{ElraError, Result};
use nalgebra::DMatrix;
use std::collections::BTreeMap;

impl From<AlphaSchedule> for AlphaScheduleSpec {
    fn from(s: AlphaSchedule) -> Self {
        match s {
            AlphaSchedule::Exponential {
                warmup_steps,
                gamma,
            } => AlphaScheduleSpec::Exponential {
                warmup_steps,
                gamma,
            },
            AlphaSchedule::Cosine { warmup_steps } => AlphaScheduleSpec::Cosine { warmup_steps },
            AlphaSchedule::Linear { warmup_steps } => AlphaScheduleSpec::Linear { warmup_steps },
            AlphaSchedule::Constant(alpha) => AlphaScheduleSpec::Constant { alpha },
        }
    }
}

impl From<AlphaScheduleSpec> for AlphaSchedule {
    fn from(s: AlphaScheduleSpec) -> Self {
        match s {
            AlphaScheduleSpec::Exponential {
                warmup_steps,
                gamma,
            } => AlphaSchedule::Exponential {
                warmup_steps,
                gamma,
            },
            AlphaScheduleSpec::Cosine { warmup_steps } => AlphaSchedule::Cosine { warmup_steps },
            AlphaScheduleSpec::Linear { warmup_steps } => AlphaSchedule::Linear { warmup_steps },
            AlphaScheduleSpec::Constant { alpha } => AlphaSchedule::Constant(alpha),
        }
    }
}

impl From<EtaMultiplier> for EtaMultiplierSpec {
    fn from(m: EtaMultiplier) -> Self {
        match m {
            EtaMultiplier::None => EtaMultiplierSpec::None,
            EtaMultiplier::Cosine { total_steps } => EtaMultiplierSpec::Cosine { total_steps },
        }
    }
}

impl From<EtaMultiplierSpec> for EtaMultiplier {
    fn from(m: EtaMultiplierSpec) -> Self {
        match m {
            EtaMultiplierSpec::None => EtaMultiplier::None,
            EtaMultiplierSpec::Cosine { total_steps } => EtaMultiplier::Cosine { total_steps },
        }
    }
}

/// The file name of a variant (`"general"`, `"psd"`, `"hyb"`).
fn variant_name(v: Variant) -> &'static str {
    match v {
        Variant::General => "general",
        Variant::Psd => "psd",
        Variant::Hyb => "hyb",
    }
}

impl ElraFileConfig {
    /// The file config of layers sharing `config` (its d and k are per module and not stored),
    /// at optimiser step `step`, adapting `modules`.
    pub fn from_layer_config(config: &ElraConfig, step: usize, modules: Vec<String>) -> Self {
        ElraFileConfig {
            peft_type: "ELRA".to_string(),
            variant: variant_name(config.variant).to_string(),
            r: config.r,
            eta: config.eta,
            lambda: config.lambda,
            tau: config.tau,
            alpha_schedule: config.schedule.into(),
            eta_multiplier: config.eta_multiplier.into(),
            seed: config.seed,
            step,
            target_modules: modules,
            task_type: None,
            base_model_name_or_path: None,
            format_version: ELRA_FORMAT_VERSION,
        }
    }

    /// The [`ElraConfig`] of one module whose frozen weight is d×k (eq. 2, eq. 19, App. H).
    pub fn layer_config(&self, d: usize, k: usize) -> Result<ElraConfig> {
        let config = ElraConfig {
            variant: self.variant.parse()?,
            d,
            k,
            r: self.r,
            eta: self.eta,
            lambda: self.lambda,
            tau: self.tau,
            schedule: self.alpha_schedule.into(),
            eta_multiplier: self.eta_multiplier.into(),
            seed: self.seed,
        };
        config.validate()?;
        Ok(config)
    }
}

/// The ELRA settings two layers must share to live in one file (everything but d and k).
fn same_settings(a: &ElraConfig, b: &ElraConfig) -> bool {
    a.variant == b.variant
        && a.r == b.r
        && a.eta.to_bits() == b.eta.to_bits()
        && a.lambda.to_bits() == b.lambda.to_bits()
        && a.tau.map(f64::to_bits) == b.tau.map(f64::to_bits)
        && a.schedule == b.schedule
        && a.eta_multiplier == b.eta_multiplier
        && a.seed == b.seed
}

impl<T: Real> AdapterFile<T> {
    /// An ELRA adapter file from named layers (module name, layer). The layers must share
    /// their settings (variant, r, η₀, λ, τ, schedules, seed) and step; their `W0` is not
    /// stored (PEFT layout: the base model provides it).
    pub fn from_elra_layers(layers: &[(&str, &ElraLayer<T>)]) -> Result<Self> {
        let Some((_, first)) = layers.first() else {
            return Err(ElraError::invalid("layers", "no layer to save"));
        };
        let mut modules = BTreeMap::new();
        for (name, l) in layers {
            if !same_settings(l.config(), first.config()) || l.step() != first.step() {
                return Err(ElraError::invalid(
                    "layers",
                    format!(
                        "module `{name}` has settings or a step different from the first layer's; \
                         one adapter file holds one configuration"
                    ),
                ));
            }
            let w = ModuleWeights::Elra {
                a: l.a().clone(),
                b: l.b().cloned(),
                eta: l.eta(),
            };
            if modules.insert(name.to_string(), w).is_some() {
                return Err(ElraError::invalid(
                    "layers",
                    format!("module `{name}` appears twice"),
                ));
            }
        }
        let config = ElraFileConfig::from_layer_config(
            first.config(),
            first.step(),
            modules.keys().cloned().collect(),
        );
        let file = AdapterFile {
            config: FileConfig::Elra(config),
            modules,
        };
        file.validate()?;
        Ok(file)
    }

    /// A PEFT LoRA adapter file from named layers; they must share r and `lora_alpha`.
    /// `target_modules` lists the full module names.
    pub fn from_lora_layers(layers: &[(&str, &LoraLayer<T>)]) -> Result<Self> {
        let Some((_, first)) = layers.first() else {
            return Err(ElraError::invalid("layers", "no layer to save"));
        };
        let (r, alpha) = (first.config().r, first.config().lora_alpha);
        let mut modules = BTreeMap::new();
        for (name, l) in layers {
            if l.config().r != r || l.config().lora_alpha.to_bits() != alpha.to_bits() {
                return Err(ElraError::invalid(
                    "layers",
                    format!(
                        "module `{name}` has an r or lora_alpha different from the first layer's"
                    ),
                ));
            }
            let w = ModuleWeights::Lora {
                lora_a: l.lora_a().clone(),
                lora_b: l.lora_b().clone(),
            };
            if modules.insert(name.to_string(), w).is_some() {
                return Err(ElraError::invalid(
                    "layers",
                    format!("module `{name}` appears twice"),
                ));
            }
        }
        let config = LoraFileConfig::new(r, alpha, modules.keys().cloned().collect());
        let file = AdapterFile {
            config: FileConfig::Lora(config),
            modules,
        };
        file.validate()?;
        Ok(file)
    }

    fn module(&self, module: &str) -> Result<&ModuleWeights<T>> {
        self.modules.get(module).ok_or_else(|| {
            ElraError::invalid(
                "module",
                format!(
                    "no module `{}` in the adapter",
                    module.chars().take(200).collect::<String>()
                ),
            )
        })
    }

    /// The [`ElraLayer`] of `module` on the frozen weight `w0` (d×k, d matching the module's A),
    /// with the stored A, B, trained η and step.
    pub fn elra_layer(&self, module: &str, w0: DMatrix<T>) -> Result<ElraLayer<T>> {
        let FileConfig::Elra(c) = &self.config else {
            return Err(ElraError::invalid(
                "module",
                "the adapter is LoRA, not ELRA",
            ));
        };
        let ModuleWeights::Elra { a, b, eta } = self.module(module)? else {
            return Err(ElraError::invalid("module", "module holds LoRA tensors"));
        };
        if w0.nrows() != a.nrows() {
            return Err(ElraError::shape("w0", (a.nrows(), w0.ncols()), w0.shape()));
        }
        let config = c.layer_config(w0.nrows(), w0.ncols())?;
        let mut layer = ElraLayer::from_factors(config, w0, a.clone(), b.clone())?;
        layer.set_eta(*eta)?;
        layer.set_step(c.step);
        Ok(layer)
    }

    /// The [`LoraLayer`] of `module` on the frozen weight `w0` (out×in matching `lora_B` rows and
    /// `lora_A` columns), with the module's rank and `lora_alpha` (rank/alpha patterns applied).
    /// rsLoRA files are refused (the layer scales by `lora_alpha / r`).
    pub fn lora_layer(&self, module: &str, w0: DMatrix<T>) -> Result<LoraLayer<T>> {
        let FileConfig::Lora(c) = &self.config else {
            return Err(ElraError::invalid(
                "module",
                "the adapter is ELRA, not LoRA",
            ));
        };
        let ModuleWeights::Lora { lora_a, lora_b } = self.module(module)? else {
            return Err(ElraError::invalid("module", "module holds ELRA tensors"));
        };
        if c.use_rslora {
            return Err(ElraError::invalid(
                "use_rslora",
                "rsLoRA scaling (alpha/√r) is not supported by LoraLayer",
            ));
        }
        if c.fan_in_fan_out {
            return Err(ElraError::invalid(
                "fan_in_fan_out",
                "pass W0 as out×in and a config without fan_in_fan_out",
            ));
        }
        let (d, k) = (lora_b.nrows(), lora_a.ncols());
        if w0.shape() != (d, k) {
            return Err(ElraError::shape("w0", (d, k), w0.shape()));
        }
        let mut config = LoraConfig::new(d, k, lora_a.nrows());
        config.lora_alpha = c.alpha_for(module);
        LoraLayer::from_factors(config, w0, lora_a.clone(), lora_b.clone())
    }
}
