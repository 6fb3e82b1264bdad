//! Adapter files: `adapter_model.safetensors` + `adapter_config.json` in one directory, the
//! layout of Hugging Face PEFT, merged-weight export, and the streaming merge of a safetensors
//! checkpoint ([`checkpoint`]).
//!
//! - **LoRA** directories follow PEFT exactly: tensors `base_model.model.<module>.lora_A.weight`
//!   (r×in) and `base_model.model.<module>.lora_B.weight` (out×r), config with `peft_type:
//!   "LORA"`, `r`, `lora_alpha`, `target_modules`, `lora_dropout`, `bias`, `fan_in_fan_out`,
//!   `task_type`, `base_model_name_or_path` (plus PEFT's optional fields). The update is
//!   `ΔW = (lora_alpha / r) · B·A` (`lora_alpha/√r` with `use_rslora`).
//! - **ELRA** directories use the same layout with tensors `…<module>.elra_A.weight` (d×r),
//!   `…<module>.elra_B.weight` (r×d; absent for ELRA-PSD, whose generator is `G = ηAAᵀ`) and
//!   `…<module>.elra_eta` (a scalar, shape `[]`), and an ELRA config (`peft_type: "ELRA"`, variant,
//!   r, η, α schedule (eq. 19), λ (eq. 20), τ, η multiplier, step, …).
//!
//! The two files of a directory are replaced as one set ([`atomic::write_files_atomically`]):
//! after a failed save both previous files are in place and no temporary remains. Loading
//! validates everything — sizes, header, dtypes, shapes, key names, finite
//! values, consistency with the config — before it returns, so a truncated, oversized, wrongly
//! shaped or hostile file gives an [`crate::ElraError::Format`] (or `Io`) naming the problem,
//! never a panic and never a partially filled adapter.

pub mod adapter_file;
pub mod atomic;
pub mod checkpoint;
pub mod convert;

pub use adapter_file::{
    load_merged, save_merged, AdapterFile, ElraFileConfig, FileConfig, LoadLimits, LoraFileConfig,
    ModuleWeights, TargetModules, CONFIG_FILE, ELRA_FORMAT_VERSION, WEIGHTS_FILE,
};
pub use atomic::{check_files, write_files_atomically, write_files_in};
pub use checkpoint::{merge_checkpoint, Checkpoint, Direction, MergeReport};
