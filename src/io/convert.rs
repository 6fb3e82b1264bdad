//! Conversions between adapter files and the layers of [`crate::adapter`]: an [`AdapterFile`]
//! from named [`ElraLayer`]s / [`LoraLayer`]s, and a layer for one module of a file given its
//! frozen weight `W0`.

use super::adapter_file::{
    AdapterFile, ElraFileConfig, FileConfig, LoraFileConfig, ModuleWeights, ELRA_FORMAT_VERSION,
};
use crate::adapter::{ElraConfig, ElraLayer, LoraConfig, LoraLayer};
use crate::linalg::Real;
use crate::{ElraError, Result};
use nalgebra::DMatrix;
use std::collections::BTreeMap;

impl ElraFileConfig {
    /// The file config of layers sharing `config` (its d and k are per module and not stored),
    /// at optimiser step `step`, adapting `modules`.
    pub fn from_layer_config(config: &ElraConfig, step: usize, modules: Vec<String>) -> Self {
        ElraFileConfig {
            peft_type: "ELRA".to_string(),
            generator: config.generator,
            r: config.r,
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
            generator: self.generator,
            d,
            k,
            r: self.r,
            seed: self.seed,
        };
        config.validate()?;
        Ok(config)
    }
}

/// The ELRA settings two layers must share to live in one file (everything but d and k).
fn same_settings(a: &ElraConfig, b: &ElraConfig) -> bool {
    a.generator == b.generator && a.r == b.r && a.seed == b.seed
}

/// Adds one module's tensors; a name given twice is an error.
fn insert_module<T: Real>(
    modules: &mut BTreeMap<String, ModuleWeights<T>>,
    name: String,
    w: ModuleWeights<T>,
) -> Result<()> {
    if modules.contains_key(&name) {
        return Err(ElraError::invalid(
            "layers",
            format!("module `{name}` appears twice"),
        ));
    }
    modules.insert(name, w);
    Ok(())
}

impl<T: Real> AdapterFile<T> {
    /// An ELRA adapter file from named layers (module name, layer). The layers must share
    /// their settings (variant, r, η₀, λ, τ, schedules, seed) and step; their `W0` is not
    /// stored (PEFT layout: the base model provides it).
    pub fn from_elra_layers(layers: &[(&str, &ElraLayer<T>)]) -> Result<Self> {
        Self::from_elra_modules(layers.iter().map(|(name, l)| {
            let w = ModuleWeights::Elra {
                a: l.a().clone(),
                b: l.b().cloned(),
                eta: l.eta(),
            };
            (name.to_string(), l.config().clone(), l.step(), w)
        }))
    }

    /// [`from_elra_layers`](Self::from_elra_layers) from each module's layer config, step and
    /// tensors (what a caller holding layers behind locks can hand over one at a time).
    pub fn from_elra_modules(
        modules: impl IntoIterator<Item = (String, ElraConfig, usize, ModuleWeights<T>)>,
    ) -> Result<Self> {
        let mut first: Option<(ElraConfig, usize)> = None;
        let mut out = BTreeMap::new();
        for (name, config, step, w) in modules {
            let (c0, s0) = first.get_or_insert_with(|| (config.clone(), step));
            if !same_settings(&config, c0) || step != *s0 {
                return Err(ElraError::invalid(
                    "layers",
                    format!(
                        "module `{name}` has settings or a step different from the first layer's; \
                         one adapter file holds one configuration"
                    ),
                ));
            }
            insert_module(&mut out, name, w)?;
        }
        let Some((c0, s0)) = first else {
            return Err(ElraError::invalid("layers", "no layer to save"));
        };
        let config = ElraFileConfig::from_layer_config(&c0, s0, out.keys().cloned().collect());
        let file = AdapterFile {
            config: FileConfig::Elra(config),
            modules: out,
        };
        file.validate()?;
        Ok(file)
    }

    /// A PEFT LoRA adapter file from named layers; they must share r and `lora_alpha`.
    /// `target_modules` lists the full module names.
    pub fn from_lora_layers(layers: &[(&str, &LoraLayer<T>)]) -> Result<Self> {
        Self::from_lora_modules(layers.iter().map(|(name, l)| {
            let w = ModuleWeights::Lora {
                lora_a: l.lora_a().clone(),
                lora_b: l.lora_b().clone(),
            };
            (name.to_string(), l.config().clone(), w)
        }))
    }

    /// [`from_lora_layers`](Self::from_lora_layers) from each module's layer config and tensors.
    pub fn from_lora_modules(
        modules: impl IntoIterator<Item = (String, LoraConfig, ModuleWeights<T>)>,
    ) -> Result<Self> {
        let mut first: Option<(usize, f64)> = None;
        let mut out = BTreeMap::new();
        for (name, config, w) in modules {
            let (r, alpha) = *first.get_or_insert((config.r, config.lora_alpha));
            if config.r != r || config.lora_alpha.to_bits() != alpha.to_bits() {
                return Err(ElraError::invalid(
                    "layers",
                    format!(
                        "module `{name}` has an r or lora_alpha different from the first layer's"
                    ),
                ));
            }
            insert_module(&mut out, name, w)?;
        }
        let Some((r, alpha)) = first else {
            return Err(ElraError::invalid("layers", "no layer to save"));
        };
        let config = LoraFileConfig::new(r, alpha, out.keys().cloned().collect());
        let file = AdapterFile {
            config: FileConfig::Lora(config),
            modules: out,
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
