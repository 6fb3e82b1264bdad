//! # elra-lab — the experiments beside the `elra` library
//!
//! The library (`elra`) holds ELRA itself and the constructions of Zeng & Lee, *The Expressive
//! Power of Low-Rank Adaptation* ([`elra::expressivity`]). This crate holds what trains models
//! for that paper's App. G and writes reports about them, so that none of it (nor its plotting
//! and progress-bar dependencies) ships in the library:
//!
//! * [`adapter`]: the pluggable adapter parameterisation `W_eff(θ; W0)` with its pull-back
//!   ([`adapter::WeightAdapter`]); LoRA `W_eff = W0 + B A`.
//! * [`elra_adapter`]: ELRA (`W_eff = exp(G) W0`; general, PSD, Hyb) in the same interface,
//!   built on the library's generator ([`elra::grad::FactorChain`]), α schedule
//!   ([`elra::adapter::AlphaSchedule`]) and φ1 ([`elra::linalg::phi1`]).
//! * [`optim`]: Adam with PyTorch's coupled L2 decay (App. G) or decoupled decay, on the
//!   library's [`elra::train::AdamW`] step.
//! * [`experiment`]: the App. G protocol — construction vs. trained adapters for every rank,
//!   CSV rows.
//! * [`runner`]: the `elra expressivity` runner — LoRA and the ELRA variants per rank, CSV, SVG,
//!   rank shards and their merge.
//! * [`prop3`]: ELRA's Prop. 3 (rank and determinant sign are kept) in the App. G.1 setting.
//! * [`plot`]: the SVG figures (test MSE against rank; `elra fit`'s loss curves).
//! * [`fit_output`]: `elra fit`'s `loss.csv` and `loss.svg`, written as one set with the
//!   library's [`elra::io::write_files_in`] (every file or none).
//!
//! The `elra` binary (`src/bin/elra.rs`: `fit`, `verify`, `expressivity`, `help`) and the
//! examples that produced EXPERIMENTS.md (`examples/`) live here too; the committed results are
//! in `figures/`.
#![warn(missing_docs)]

pub mod adapter;
pub mod elra_adapter;
pub mod experiment;
pub mod fit_output;
pub mod optim;
pub mod plot;
pub mod prop3;
pub mod runner;
