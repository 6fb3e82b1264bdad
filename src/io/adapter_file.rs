//! Reading and writing adapter directories (PEFT layout) and merged weights; see the
//! [module docs](super) for the format.

use super::atomic::write_files_atomically;
use crate::adapter::GeneratorConfig;
use crate::linalg::Real;
use crate::{ElraError, Result};
use nalgebra::DMatrix;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::Path;

/// File name of the tensors inside an adapter directory (PEFT's name).
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// File name of the configuration inside an adapter directory (PEFT's name).
pub const CONFIG_FILE: &str = "adapter_config.json";
/// Prefix of every tensor key (PEFT's `PeftModel` wraps the base model as `base_model.model`).
const PREFIX: &str = "base_model.model.";
/// Version of the ELRA config layout written by this library.
pub const ELRA_FORMAT_VERSION: u32 = 1;

/// Upper bounds applied while loading, so a hostile file cannot make the loader allocate
/// without limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadLimits {
    /// Largest accepted weights file, in bytes.
    pub max_weights_bytes: u64,
    /// Largest accepted config file, in bytes.
    pub max_config_bytes: u64,
    /// Largest accepted matrix dimension (rows or columns of any tensor).
    pub max_dim: usize,
    /// Largest accepted number of adapted modules.
    pub max_modules: usize,
}

impl Default for LoadLimits {
    /// 4 GiB of weights, 1 MiB of config, dimensions up to 2²⁰, up to 65 536 modules.
    fn default() -> Self {
        LoadLimits {
            max_weights_bytes: 4 << 30,
            max_config_bytes: 1 << 20,
            max_dim: 1 << 20,
            max_modules: 1 << 16,
        }
    }
}

/// PEFT's `target_modules`: a list of module names (matched exactly or as a dotted suffix) or
/// one regular expression.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Names; a module `m` is targeted by `t` when `m == t` or `m` ends with `.t`.
    List(Vec<String>),
    /// A regular expression over full module names (kept, not interpreted).
    Pattern(String),
}

/// `adapter_config.json` of a PEFT LoRA adapter (the fields PEFT's `LoraConfig` writes that
/// change the meaning of the weights; other fields are ignored on load).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraFileConfig {
    /// Always `"LORA"`.
    pub peft_type: String,
    /// Default rank r.
    pub r: usize,
    /// `lora_alpha`; the update is scaled by `lora_alpha / r` (LoRA, Hu et al. 2021, §4.1).
    /// Written as a JSON integer when it is one (PEFT's `LoraConfig.lora_alpha: int`), else as
    /// a float.
    #[serde(serialize_with = "ser_alpha")]
    pub lora_alpha: f64,
    /// Which modules are adapted.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Dropout probability on the LoRA input path (training only).
    #[serde(default)]
    pub lora_dropout: f64,
    /// Bias handling; only `"none"` is supported.
    #[serde(default = "bias_none")]
    pub bias: String,
    /// Whether the base layer stores its weight as in×out (GPT-2 `Conv1D`); the LoRA tensors keep
    /// their r×in / out×r shapes either way.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// PEFT task type, e.g. `"CAUSAL_LM"`.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Name or path of the base model.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Saved for inference only.
    #[serde(default)]
    pub inference_mode: bool,
    /// Rank-stabilised scaling `lora_alpha / √r` (Kalajdzievski 2023).
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA; not supported (loading such a file is an error).
    #[serde(default)]
    pub use_dora: bool,
    /// Per-module ranks (keys matched as module-name suffixes); `null` (PEFT's
    /// `Optional[dict]`) reads as empty.
    #[serde(default, deserialize_with = "de_null_as_empty")]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module `lora_alpha` (keys matched as module-name suffixes); `null` reads as empty.
    /// Integral values are written as JSON integers, like `lora_alpha`.
    #[serde(
        default,
        deserialize_with = "de_null_as_empty",
        serialize_with = "ser_alpha_map"
    )]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Fully trained extra modules; not supported (must be absent or empty).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

fn bias_none() -> String {
    "none".to_string()
}

/// An alpha as PEFT writes it: a JSON integer when it is integral and exactly representable
/// (|α| < 2⁵³), else a float.
fn ser_alpha<S: serde::Serializer>(a: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if a.fract() == 0.0 && a.abs() < 9_007_199_254_740_992.0 {
        s.serialize_i64(*a as i64)
    } else {
        s.serialize_f64(*a)
    }
}

/// `alpha_pattern` with each value written by [`ser_alpha`].
fn ser_alpha_map<S: serde::Serializer>(
    m: &BTreeMap<String, f64>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(m.len()))?;
    for (k, v) in m {
        map.serialize_key(k)?;
        map.serialize_value(&Alpha(*v))?;
    }
    map.end()
}

/// An alpha value serialised by [`ser_alpha`].
struct Alpha(f64);

impl Serialize for Alpha {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        ser_alpha(&self.0, s)
    }
}

/// A map that may be `null` in the file (PEFT's `Optional[dict]` fields): `null` reads as empty.
fn de_null_as_empty<'de, D, V>(d: D) -> std::result::Result<BTreeMap<String, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    V: Deserialize<'de>,
{
    Ok(Option::<BTreeMap<String, V>>::deserialize(d)?.unwrap_or_default())
}

impl LoraFileConfig {
    /// A PEFT LoRA config with rank `r`, `lora_alpha`, the given target modules and PEFT's
    /// defaults for everything else (`lora_dropout = 0`, `bias = "none"`, no rsLoRA/DoRA).
    pub fn new(r: usize, lora_alpha: f64, target_modules: Vec<String>) -> Self {
        LoraFileConfig {
            peft_type: "LORA".to_string(),
            r,
            lora_alpha,
            target_modules: Some(TargetModules::List(target_modules)),
            lora_dropout: 0.0,
            bias: bias_none(),
            fan_in_fan_out: false,
            task_type: None,
            base_model_name_or_path: None,
            inference_mode: false,
            use_rslora: false,
            use_dora: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            modules_to_save: None,
        }
    }

    /// Rank of `module`: the `rank_pattern` entry matching it (longest key first), else `r`.
    pub fn rank_for(&self, module: &str) -> usize {
        pattern_lookup(&self.rank_pattern, module).unwrap_or(self.r)
    }

    /// `lora_alpha` of `module`: the `alpha_pattern` entry matching it, else `lora_alpha`.
    pub fn alpha_for(&self, module: &str) -> f64 {
        pattern_lookup(&self.alpha_pattern, module).unwrap_or(self.lora_alpha)
    }

    /// Scale of the update `ΔW = s·B·A` for `module`: `alpha/r`, or `alpha/√r` with rsLoRA
    /// (PEFT `LoraLayer.update_layer`).
    pub fn scaling_for(&self, module: &str) -> f64 {
        let r = self.rank_for(module) as f64;
        let a = self.alpha_for(module);
        if self.use_rslora {
            a / r.sqrt()
        } else {
            a / r
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(ElraError::Format(format!("{CONFIG_FILE}: {why}")));
        if self.peft_type != "LORA" {
            return bad(format!(
                "peft_type is {:?}, expected \"LORA\"",
                self.peft_type
            ));
        }
        if self.r == 0 || self.rank_pattern.values().any(|&r| r == 0) {
            return bad("rank r = 0".to_string());
        }
        if !self.lora_alpha.is_finite() || self.alpha_pattern.values().any(|a| !a.is_finite()) {
            return bad("lora_alpha is not finite".to_string());
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(format!(
                "lora_dropout = {} is outside [0, 1)",
                self.lora_dropout
            ));
        }
        if self.bias != "none" {
            return bad(format!(
                "bias = {:?} is not supported (only \"none\")",
                self.bias
            ));
        }
        if self.use_dora {
            return bad("use_dora = true (DoRA) is not supported".to_string());
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return bad("modules_to_save is not supported".to_string());
        }
        Ok(())
    }
}

/// Looks up the longest key of `map` that equals `module` or is a dotted suffix of it.
fn pattern_lookup<V: Copy>(map: &BTreeMap<String, V>, module: &str) -> Option<V> {
    map.iter()
        .filter(|(k, _)| suffix_match(module, k))
        .max_by_key(|(k, _)| k.len())
        .map(|(_, v)| *v)
}

/// PEFT's name rule: `module == target` or `module` ends with `.target`.
fn suffix_match(module: &str, target: &str) -> bool {
    module == target
        || (module.len() > target.len()
            && module.ends_with(target)
            && module.as_bytes()[module.len() - target.len() - 1] == b'.')
}

/// `adapter_config.json` of an ELRA adapter (PEFT layout with ELRA's fields). The generator
/// settings are the library's [`GeneratorConfig`] in its serde form: `variant` (`"general"`,
/// `"psd"`, `"hyb"`), `eta` (η₀), `lambda`, `tau` (`null`: no clip), `alpha_schedule`,
/// `eta_multiplier`, validated by [`GeneratorConfig::validate`] like every other entry point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ElraFileConfig {
    /// Always `"ELRA"`.
    pub peft_type: String,
    /// Variant, η₀, λ, τ, α schedule and η multiplier (eq. 2, §4.2.1, eq. 19–20, App. H).
    #[serde(flatten)]
    pub generator: GeneratorConfig,
    /// Factor rank r.
    pub r: usize,
    /// Seed of the initialisation.
    #[serde(default)]
    pub seed: u64,
    /// Optimiser step reached when the file was written (drives the α schedule).
    pub step: usize,
    /// Adapted module names (exactly the modules with tensors in the weights file).
    pub target_modules: Vec<String>,
    /// PEFT task type, e.g. `"CAUSAL_LM"`.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Name or path of the base model.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Layout version of this config ([`ELRA_FORMAT_VERSION`]).
    pub format_version: u32,
}

impl ElraFileConfig {
    /// Whether the variant trains `B` (general and hyb do, psd does not).
    pub fn uses_b(&self) -> bool {
        self.generator.variant.uses_b()
    }

    fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(ElraError::Format(format!("{CONFIG_FILE}: {why}")));
        if self.peft_type != "ELRA" {
            return bad(format!(
                "peft_type is {:?}, expected \"ELRA\"",
                self.peft_type
            ));
        }
        if self.format_version != ELRA_FORMAT_VERSION {
            return bad(format!(
                "format_version {} is not supported (this library reads {ELRA_FORMAT_VERSION})",
                self.format_version
            ));
        }
        if self.r == 0 {
            return bad("rank r = 0".to_string());
        }
        self.generator.validate().or_else(|e| bad(e.to_string()))
    }
}

/// The configuration of an adapter directory.
#[derive(Clone, Debug, PartialEq)]
pub enum FileConfig {
    /// A PEFT LoRA adapter.
    Lora(LoraFileConfig),
    /// An ELRA adapter.
    Elra(ElraFileConfig),
}

/// The trained tensors of one adapted module.
#[derive(Clone, Debug, PartialEq)]
pub enum ModuleWeights<T: Real> {
    /// LoRA: `ΔW = s·B·A` with `lora_a` r×in and `lora_b` out×r.
    Lora {
        /// `lora_A.weight`, r×in.
        lora_a: DMatrix<T>,
        /// `lora_B.weight`, out×r.
        lora_b: DMatrix<T>,
    },
    /// ELRA: generator factors `A` (d×r), `B` (r×d, absent for PSD) and the trained η.
    Elra {
        /// `elra_A.weight`, d×r.
        a: DMatrix<T>,
        /// `elra_B.weight`, r×d (`None` for ELRA-PSD).
        b: Option<DMatrix<T>>,
        /// `elra_eta`, the trained step size η > 0.
        eta: T,
    },
}

/// An adapter directory in memory: its config and the tensors of every adapted module, keyed
/// by module name (e.g. `model.layers.0.self_attn.q_proj`).
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterFile<T: Real> {
    /// `adapter_config.json`.
    pub config: FileConfig,
    /// Tensors per module.
    pub modules: BTreeMap<String, ModuleWeights<T>>,
}

fn fmt_err(file: &str, why: impl std::fmt::Display) -> ElraError {
    ElraError::Format(format!("{file}: {why}"))
}

/// Module names: ASCII letters, digits, `_`, `-` and single dots between non-empty parts, at most
/// 512 bytes.
fn check_module_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 512
        && name.split('.').all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(ElraError::invalid(
            "module",
            format!(
                "module name {:?} must be dot-separated non-empty parts of [A-Za-z0-9_-], ≤ 512 bytes",
                name.chars().take(80).collect::<String>()
            ),
        ))
    }
}

/// Which tensor of a module a key names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    LoraA,
    LoraB,
    ElraA,
    ElraB,
    ElraEta,
}

impl Part {
    fn suffix(self) -> &'static str {
        match self {
            Part::LoraA => "lora_A.weight",
            Part::LoraB => "lora_B.weight",
            Part::ElraA => "elra_A.weight",
            Part::ElraB => "elra_B.weight",
            Part::ElraEta => "elra_eta",
        }
    }

    fn key(self, module: &str) -> String {
        format!("{PREFIX}{module}.{}", self.suffix())
    }
}

/// Splits `base_model.model.<module>.<part>` into module and part, for the parts of `kind`.
fn parse_key(key: &str, lora: bool) -> Option<(&str, Part)> {
    let rest = key.strip_prefix(PREFIX)?;
    let parts: &[Part] = if lora {
        &[Part::LoraA, Part::LoraB]
    } else {
        &[Part::ElraA, Part::ElraB, Part::ElraEta]
    };
    parts.iter().find_map(|&p| {
        let module = rest.strip_suffix(p.suffix())?.strip_suffix('.')?;
        check_module_name(module).ok()?;
        Some((module, p))
    })
}

/// Converts a tensor to `T` values (row-major), accepting F16, BF16, F32 and F64, and checks
/// that every value is finite in `T`.
fn tensor_values<T: Real>(key: &str, t: &TensorView<'_>) -> Result<Vec<T>> {
    let data = t.data();
    let vals: Vec<T> = match t.dtype() {
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| T::of(f64::from_le_bytes(c.try_into().expect("8-byte chunk"))))
            .collect(),
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| T::of(f32::from_le_bytes(c.try_into().expect("4-byte chunk")) as f64))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| {
                let bits = (u16::from_le_bytes([c[0], c[1]]) as u32) << 16;
                T::of(f32::from_bits(bits) as f64)
            })
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| T::of(f16_to_f64(u16::from_le_bytes([c[0], c[1]]))))
            .collect(),
        other => {
            return Err(fmt_err(
                WEIGHTS_FILE,
                format!("tensor `{key}` has dtype {other:?}; expected F16, BF16, F32 or F64"),
            ))
        }
    };
    if let Some(i) = vals.iter().position(|v| !v.is_finite()) {
        return Err(fmt_err(
            WEIGHTS_FILE,
            format!(
                "tensor `{key}` holds a non-finite value (or one outside the {} range) at flat index {i}",
                T::NAME
            ),
        ));
    }
    Ok(vals)
}

/// IEEE 754 binary16 → f64 (exact).
fn f16_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f64;
    let mag = match exp {
        0 => frac * 2f64.powi(-24),
        31 => {
            if frac == 0.0 {
                f64::INFINITY
            } else {
                f64::NAN
            }
        }
        e => (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    };
    sign * mag
}

/// A 2-D tensor as a matrix, checking its shape against `(rows, cols)` where given.
fn tensor_matrix<T: Real>(
    key: &str,
    t: &TensorView<'_>,
    rows: Option<usize>,
    cols: Option<usize>,
    limits: &LoadLimits,
) -> Result<DMatrix<T>> {
    let shape = t.shape();
    let show = |r: Option<usize>, c: Option<usize>| {
        let f = |x: Option<usize>| x.map_or("?".to_string(), |v| v.to_string());
        format!("[{}, {}]", f(r), f(c))
    };
    if shape.len() != 2
        || rows.is_some_and(|r| r != shape[0])
        || cols.is_some_and(|c| c != shape[1])
    {
        return Err(fmt_err(
            WEIGHTS_FILE,
            format!(
                "tensor `{key}` has shape {shape:?}, expected {}",
                show(rows, cols)
            ),
        ));
    }
    let (r, c) = (shape[0], shape[1]);
    if r == 0 || c == 0 || r > limits.max_dim || c > limits.max_dim {
        return Err(fmt_err(
            WEIGHTS_FILE,
            format!(
                "tensor `{key}` has shape {shape:?}: dimensions must be in 1..={}",
                limits.max_dim
            ),
        ));
    }
    let vals = tensor_values::<T>(key, t)?;
    Ok(DMatrix::from_row_slice(r, c, &vals))
}

/// Row-major little-endian bytes of `m` in `T`'s dtype.
fn matrix_bytes<T: Real>(m: &DMatrix<T>) -> Vec<u8> {
    let mut out = Vec::with_capacity(m.len() * std::mem::size_of::<T>());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            push_value(&mut out, m[(i, j)]);
        }
    }
    out
}

fn push_value<T: Real>(out: &mut Vec<u8>, v: T) {
    if std::mem::size_of::<T>() == 4 {
        out.extend_from_slice(&(v.f64() as f32).to_le_bytes());
    } else {
        out.extend_from_slice(&v.f64().to_le_bytes());
    }
}

fn dtype_of<T: Real>() -> Dtype {
    if std::mem::size_of::<T>() == 4 {
        Dtype::F32
    } else {
        Dtype::F64
    }
}

/// Serialises `(key, shape, bytes)` triples as safetensors with PEFT's `{"format": "pt"}`
/// metadata.
fn serialize_tensors<T: Real>(tensors: &[(String, Vec<usize>, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut views = Vec::with_capacity(tensors.len());
    for (k, shape, bytes) in tensors {
        let v = TensorView::new(dtype_of::<T>(), shape.clone(), bytes)
            .map_err(|e| fmt_err(WEIGHTS_FILE, format!("tensor `{k}`: {e}")))?;
        views.push((k.clone(), v));
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(meta)).map_err(|e| fmt_err(WEIGHTS_FILE, e))
}

fn check_finite_matrix<T: Real>(what: &str, m: &DMatrix<T>) -> Result<()> {
    if m.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(ElraError::invalid(
            "weights",
            format!("{what} holds NaN or ±Inf"),
        ))
    }
}

impl<T: Real> AdapterFile<T> {
    /// Checks that config and tensors agree: every module name is valid, every module has the
    /// kind of the config, shapes are consistent (LoRA: `lora_A` r_m×in, `lora_B` out×r_m with r_m
    /// the module's rank; ELRA: `A` d×r, `B` r×d iff the variant uses B), values are finite, η > 0,
    /// and the config's `target_modules` cover (LoRA) or equal (ELRA) the module names.
    pub fn validate(&self) -> Result<()> {
        if self.modules.is_empty() {
            return Err(ElraError::invalid(
                "modules",
                "an adapter needs at least one module",
            ));
        }
        for name in self.modules.keys() {
            check_module_name(name)?;
        }
        match &self.config {
            FileConfig::Lora(c) => {
                c.validate()?;
                for (name, m) in &self.modules {
                    let ModuleWeights::Lora { lora_a, lora_b } = m else {
                        return Err(ElraError::invalid(
                            "modules",
                            format!("module `{name}` holds ELRA tensors in a LoRA adapter"),
                        ));
                    };
                    let r = c.rank_for(name);
                    if lora_a.nrows() != r || lora_a.ncols() == 0 {
                        return Err(ElraError::shape(
                            "lora_a",
                            (r, lora_a.ncols().max(1)),
                            lora_a.shape(),
                        ));
                    }
                    if lora_b.ncols() != r || lora_b.nrows() == 0 {
                        return Err(ElraError::shape(
                            "lora_b",
                            (lora_b.nrows().max(1), r),
                            lora_b.shape(),
                        ));
                    }
                    check_finite_matrix(&format!("lora_A of `{name}`"), lora_a)?;
                    check_finite_matrix(&format!("lora_B of `{name}`"), lora_b)?;
                    if let Some(TargetModules::List(t)) = &c.target_modules {
                        if !t.iter().any(|t| suffix_match(name, t)) {
                            return Err(ElraError::invalid(
                                "target_modules",
                                format!("module `{name}` is not matched by target_modules"),
                            ));
                        }
                    }
                }
            }
            FileConfig::Elra(c) => {
                c.validate()?;
                let names: Vec<&String> = self.modules.keys().collect();
                let mut targets: Vec<&String> = c.target_modules.iter().collect();
                targets.sort();
                targets.dedup();
                if names != targets || targets.len() != c.target_modules.len() {
                    return Err(ElraError::invalid(
                        "target_modules",
                        "an ELRA config must list exactly the adapted modules, once each",
                    ));
                }
                for (name, m) in &self.modules {
                    let ModuleWeights::Elra { a, b, eta } = m else {
                        return Err(ElraError::invalid(
                            "modules",
                            format!("module `{name}` holds LoRA tensors in an ELRA adapter"),
                        ));
                    };
                    if a.ncols() != c.r || a.nrows() == 0 {
                        return Err(ElraError::shape("a", (a.nrows().max(1), c.r), a.shape()));
                    }
                    match (b, c.uses_b()) {
                        (Some(b), true) => {
                            if b.shape() != (c.r, a.nrows()) {
                                return Err(ElraError::shape("b", (c.r, a.nrows()), b.shape()));
                            }
                            check_finite_matrix(&format!("elra_B of `{name}`"), b)?;
                        }
                        (None, false) => {}
                        (Some(_), false) => {
                            return Err(ElraError::invalid(
                                "b",
                                format!("module `{name}`: variant psd has no B factor"),
                            ))
                        }
                        (None, true) => {
                            return Err(ElraError::invalid(
                                "b",
                                format!("module `{name}`: variant {} needs B", c.generator.variant),
                            ))
                        }
                    }
                    check_finite_matrix(&format!("elra_A of `{name}`"), a)?;
                    if !(eta.is_finite() && *eta > T::zero()) {
                        return Err(ElraError::invalid(
                            "eta",
                            format!("module `{name}`: η = {eta} must be finite and > 0"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The two files' contents: (`adapter_config.json`, `adapter_model.safetensors`). Tensors are
    /// written in `T`'s dtype (F32 or F64), row-major.
    pub fn to_bytes(&self) -> Result<(Vec<u8>, Vec<u8>)> {
        self.validate()?;
        let mut tensors = Vec::new();
        for (name, m) in &self.modules {
            match m {
                ModuleWeights::Lora { lora_a, lora_b } => {
                    for (p, x) in [(Part::LoraA, lora_a), (Part::LoraB, lora_b)] {
                        tensors.push((p.key(name), vec![x.nrows(), x.ncols()], matrix_bytes(x)));
                    }
                }
                ModuleWeights::Elra { a, b, eta } => {
                    tensors.push((
                        Part::ElraA.key(name),
                        vec![a.nrows(), a.ncols()],
                        matrix_bytes(a),
                    ));
                    if let Some(b) = b {
                        tensors.push((
                            Part::ElraB.key(name),
                            vec![b.nrows(), b.ncols()],
                            matrix_bytes(b),
                        ));
                    }
                    let mut e = Vec::new();
                    push_value(&mut e, *eta);
                    tensors.push((Part::ElraEta.key(name), vec![], e));
                }
            }
        }
        let weights = serialize_tensors::<T>(&tensors)?;
        let json = match &self.config {
            FileConfig::Lora(c) => serde_json::to_vec_pretty(c),
            FileConfig::Elra(c) => serde_json::to_vec_pretty(c),
        }
        .map_err(|e| fmt_err(CONFIG_FILE, e))?;
        Ok((json, weights))
    }

    /// Parses the two files' contents (see [`AdapterFile::to_bytes`]) with default limits.
    pub fn from_bytes(config_json: &[u8], weights: &[u8]) -> Result<Self> {
        Self::from_bytes_with(config_json, weights, &LoadLimits::default())
    }

    /// Parses the two files' contents under `limits`. Every problem — malformed JSON or
    /// safetensors header, unknown `peft_type`, unexpected or missing tensor, wrong dtype or
    /// shape, non-finite value, disagreement with the config — is an [`ElraError::Format`] naming
    /// the file and the tensor or field.
    pub fn from_bytes_with(
        config_json: &[u8],
        weights: &[u8],
        limits: &LoadLimits,
    ) -> Result<Self> {
        if config_json.len() as u64 > limits.max_config_bytes {
            return Err(fmt_err(
                CONFIG_FILE,
                format!(
                    "{} bytes exceed the limit of {}",
                    config_json.len(),
                    limits.max_config_bytes
                ),
            ));
        }
        if weights.len() as u64 > limits.max_weights_bytes {
            return Err(fmt_err(
                WEIGHTS_FILE,
                format!(
                    "{} bytes exceed the limit of {}",
                    weights.len(),
                    limits.max_weights_bytes
                ),
            ));
        }
        #[derive(Deserialize)]
        struct Kind {
            peft_type: String,
        }
        let kind: Kind =
            serde_json::from_slice(config_json).map_err(|e| fmt_err(CONFIG_FILE, e))?;
        let config = match kind.peft_type.as_str() {
            "LORA" => FileConfig::Lora(
                serde_json::from_slice(config_json).map_err(|e| fmt_err(CONFIG_FILE, e))?,
            ),
            "ELRA" => FileConfig::Elra(
                serde_json::from_slice(config_json).map_err(|e| fmt_err(CONFIG_FILE, e))?,
            ),
            other => {
                return Err(fmt_err(
                    CONFIG_FILE,
                    format!(
                        "peft_type {:?} is not supported (LORA or ELRA)",
                        other.chars().take(40).collect::<String>()
                    ),
                ))
            }
        };
        let lora = matches!(config, FileConfig::Lora(_));
        match &config {
            FileConfig::Lora(c) => c.validate()?,
            FileConfig::Elra(c) => c.validate()?,
        }
        let st = SafeTensors::deserialize(weights).map_err(|e| fmt_err(WEIGHTS_FILE, e))?;
        // Group tensors by module; reject any key that is not an adapter tensor.
        let mut by_module: BTreeMap<&str, BTreeMap<Part, TensorView<'_>>> = BTreeMap::new();
        for (key, view) in st.iter() {
            let Some((module, part)) = parse_key(key, lora) else {
                return Err(fmt_err(
                    WEIGHTS_FILE,
                    format!(
                        "unexpected tensor `{}` (expected `{PREFIX}<module>.{}`)",
                        key.chars().take(200).collect::<String>(),
                        if lora {
                            "lora_A.weight|lora_B.weight"
                        } else {
                            "elra_A.weight|elra_B.weight|elra_eta"
                        }
                    ),
                ));
            };
            by_module.entry(module).or_default().insert(part, view);
            if by_module.len() > limits.max_modules {
                return Err(fmt_err(
                    WEIGHTS_FILE,
                    format!("more than {} modules", limits.max_modules),
                ));
            }
        }
        if by_module.is_empty() {
            return Err(fmt_err(WEIGHTS_FILE, "no adapter tensors"));
        }
        let mut modules = BTreeMap::new();
        for (module, parts) in &by_module {
            let get = |p: Part| {
                parts.get(&p).ok_or_else(|| {
                    fmt_err(
                        WEIGHTS_FILE,
                        format!("module `{module}` has no tensor `{}`", p.key(module)),
                    )
                })
            };
            let w = match &config {
                FileConfig::Lora(c) => {
                    let r = c.rank_for(module);
                    let (ka, kb) = (Part::LoraA.key(module), Part::LoraB.key(module));
                    let lora_a = tensor_matrix(&ka, get(Part::LoraA)?, Some(r), None, limits)?;
                    let lora_b = tensor_matrix(&kb, get(Part::LoraB)?, None, Some(r), limits)?;
                    ModuleWeights::Lora { lora_a, lora_b }
                }
                FileConfig::Elra(c) => {
                    let ka = Part::ElraA.key(module);
                    let a = tensor_matrix(&ka, get(Part::ElraA)?, None, Some(c.r), limits)?;
                    let b = match (parts.get(&Part::ElraB), c.uses_b()) {
                        (Some(t), true) => {
                            let kb = Part::ElraB.key(module);
                            Some(tensor_matrix(&kb, t, Some(c.r), Some(a.nrows()), limits)?)
                        }
                        (None, false) => None,
                        (Some(_), false) => {
                            return Err(fmt_err(
                                WEIGHTS_FILE,
                                format!(
                                    "module `{module}` has `{}` but variant psd has no B",
                                    Part::ElraB.key(module)
                                ),
                            ))
                        }
                        (None, true) => {
                            get(Part::ElraB)?;
                            None
                        }
                    };
                    let ke = Part::ElraEta.key(module);
                    let te = get(Part::ElraEta)?;
                    if !(te.shape().is_empty() || te.shape() == [1]) {
                        return Err(fmt_err(
                            WEIGHTS_FILE,
                            format!(
                                "tensor `{ke}` has shape {:?}, expected [] (a scalar)",
                                te.shape()
                            ),
                        ));
                    }
                    let eta = tensor_values::<T>(&ke, te)?[0];
                    ModuleWeights::Elra { a, b, eta }
                }
            };
            modules.insert(module.to_string(), w);
        }
        let file = AdapterFile { config, modules };
        file.validate().map_err(|e| match e {
            ElraError::Format(_) => e,
            other => fmt_err("adapter", other),
        })?;
        Ok(file)
    }

    /// Writes `dir/adapter_model.safetensors` and `dir/adapter_config.json`, creating `dir` if
    /// needed, as one set ([`write_files_atomically`]): on any failure both previous files are
    /// left as they were and no temporary file remains.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let (json, weights) = self.to_bytes()?;
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let (wp, cp) = (dir.join(WEIGHTS_FILE), dir.join(CONFIG_FILE));
        write_files_atomically(&[(&wp, &weights), (&cp, &json)])
    }

    /// Loads `dir` with default [`LoadLimits`].
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        Self::load_with(dir, &LoadLimits::default())
    }

    /// Loads `dir` under `limits`; see [`AdapterFile::from_bytes_with`] for the checks.
    pub fn load_with(dir: impl AsRef<Path>, limits: &LoadLimits) -> Result<Self> {
        let dir = dir.as_ref();
        let json = read_limited(&dir.join(CONFIG_FILE), limits.max_config_bytes)?;
        let weights = read_limited(&dir.join(WEIGHTS_FILE), limits.max_weights_bytes)?;
        Self::from_bytes_with(&json, &weights, limits)
    }
}

fn io_err(path: &Path, e: std::io::Error) -> ElraError {
    ElraError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Reads a whole file, refusing files larger than `max` bytes (checked before and while
/// reading).
fn read_limited(path: &Path, max: u64) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let len = f.metadata().map_err(|e| io_err(path, e))?.len();
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    if len > max {
        return Err(fmt_err(
            &name,
            format!("{len} bytes exceed the limit of {max}"),
        ));
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|e| io_err(path, e))?;
    if buf.len() as u64 > max {
        return Err(fmt_err(
            &name,
            format!("file grew beyond the limit of {max} bytes"),
        ));
    }
    Ok(buf)
}

/// Writes merged weights `W_new` (e.g. from an ELRA merge `W_new = W0 + A φ1(Z) C W0`, Prop. 1)
/// as a safetensors file with keys `<module>.weight` (d×k, `T`'s dtype, row-major) — the key
/// layout of the base model's own state dict — atomically.
pub fn save_merged<T: Real>(path: impl AsRef<Path>, weights: &[(&str, &DMatrix<T>)]) -> Result<()> {
    let mut tensors = Vec::with_capacity(weights.len());
    let mut seen = BTreeSet::new();
    for (name, w) in weights {
        check_module_name(name)?;
        if !seen.insert(*name) {
            return Err(ElraError::invalid(
                "weights",
                format!("module `{name}` appears twice"),
            ));
        }
        if w.is_empty() {
            return Err(ElraError::invalid(
                "weights",
                format!("module `{name}` has an empty weight"),
            ));
        }
        check_finite_matrix(&format!("weight of `{name}`"), w)?;
        tensors.push((
            format!("{name}.weight"),
            vec![w.nrows(), w.ncols()],
            matrix_bytes(w),
        ));
    }
    if tensors.is_empty() {
        return Err(ElraError::invalid("weights", "nothing to save"));
    }
    let bytes = serialize_tensors::<T>(&tensors)?;
    write_files_atomically(&[(path.as_ref(), &bytes)])
}

/// Reads a file written by [`save_merged`] (or any safetensors file of 2-D `<module>.weight`
/// tensors) into `T` matrices keyed by module, under `limits`.
pub fn load_merged<T: Real>(
    path: impl AsRef<Path>,
    limits: &LoadLimits,
) -> Result<BTreeMap<String, DMatrix<T>>> {
    let path = path.as_ref();
    let bytes = read_limited(path, limits.max_weights_bytes)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| fmt_err("merged weights", e))?;
    let mut out = BTreeMap::new();
    for (key, view) in st.iter() {
        let module = key
            .strip_suffix(".weight")
            .filter(|m| check_module_name(m).is_ok())
            .ok_or_else(|| {
                fmt_err(
                    "merged weights",
                    format!(
                        "unexpected tensor `{}` (expected `<module>.weight`)",
                        key.chars().take(200).collect::<String>()
                    ),
                )
            })?;
        let m = tensor_matrix::<T>(key, &view, None, None, limits)?;
        out.insert(module.to_string(), m);
    }
    Ok(out)
}
