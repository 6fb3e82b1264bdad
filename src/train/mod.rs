//! Training on the CPU: the recipe of §5 / App. H, a small model harness, the stability
//! diagnostics of §5.4 and the `fit` demo.
//!
//! * [`optim`]: AdamW (β = (0.9, 0.999), ε = 1e-8, weight decay 0 by default), global
//!   gradient-norm clipping (1.0), cosine learning rate with 3 % linear warm-up;
//! * [`init`]: Xavier factors (through [`crate::adapter`]) and the ELRA-Hyb_GA seeding from the
//!   SVD of the accumulated generator gradient `Ȳᵀ U` at `G = 0`;
//! * [`diagnostics`]: per-step speed `s_t` from 2r×2r Grams, causal moving statistics, 3σ
//!   spikes, coefficient of variation;
//! * [`model`]: frozen dense layers (tanh / ReLU / identity) with an adapter on every layer,
//!   MSE or cross-entropy, dropout on adapter outputs, `log η` parametrisation;
//! * [`trainer`]: one optimiser step with all of the above, errors reported as
//!   [`crate::ElraError::Training`] with the step;
//! * [`fit`](mod@fit): teacher–student adaptation comparing LoRA, ELRA, ELRA-PSD and ELRA-Hyb
//!   (optionally ELRA-Hyb_GA and double-sided ELRA, App. B eq. 22).

pub mod diagnostics;
pub mod fit;
pub mod init;
pub mod model;
pub mod optim;
pub mod trainer;

pub use diagnostics::{generator_step_sq, spike_report, SpeedTracker, SpikeReport};
pub use fit::{fit, FitMethod, FitOptions, FitReport, MethodResult};
pub use init::{frozen_generator_grads, ga_factors, ga_initialise, DEFAULT_GA_STEPS};
pub use model::{
    loss_and_grad, Activation, AdaptedLayer, AdaptedNetwork, AdapterSpec, FrozenLayer,
    FrozenNetwork, LossGrad, LossKind, Targets,
};
pub use optim::{clip_global_norm, global_norm, AdamW, AdamWConfig, LrSchedule};
pub use trainer::{StepRecord, TrainConfig, Trainer};
