//! # elra — exponential low-rank adapters
//!
//! ELRA (Exponential Low-Rank Adapters) replaces LoRA's additive update `W0 + AB` by the
//! multiplicative `W_new = exp(G) W0` (eq. 3), with a low-rank generator written `G = A·C`
//! (`A` d×r, `C` r×d):
//!
//! | variant | `C` | paper |
//! |---|---|---|
//! | general | `ηB` | eq. 2 |
//! | PSD | `ηAᵀ` | §4.3 |
//! | Hyb | `η(αAᵀ + (1−α)B)`, α: 1 → 0 | eq. 19, Algorithm 1 |
//! | double-sided | `exp(L) W0 exp(R)` | App. B |
//!
//! Nothing of size d×d is ever formed: Proposition 1 (eq. 4, App. C) gives
//! `exp(A C) = I + A φ1(C A) C`, so only the r×r matrix `Z = C A` goes through a matrix
//! function ([`linalg`]), and a batch of rows is adapted by eq. 5:
//! `u = W0 x, v = C u, t = φ1(Z) v, y = u + A t`.
//!
//! Modules:
//! - [`linalg`]: `expm`, `φ1`, their Fréchet derivatives and adjoints (Padé scaling and squaring,
//!   Al-Mohy & Higham 2009), batched with one workspace.
//! - [`adapter`]: generators, α/η schedules, energy (eq. 21), spectral clip, the CPU layer
//!   (Woodbury forward, exact merge/unmerge, inference cache), double-sided variant, LoRA baseline.
//! - [`reference`](mod@reference): the dense nalgebra oracle (dense `exp(G)`, never Woodbury).
//! - [`verify`]: Propositions 1–7 as executable claim checks (`elra verify`, tests/propositions.rs).
//! - [`grad`]: hand-rolled reverse mode of the adapter path.
//! - [`ops`]: the functional layer on caller memory (forward, backward, output-side form, merge,
//!   energy) that engines train with.
//! - [`train`]: AdamW, schedules, initialisation (Xavier, GA), stability diagnostics (§5.4), the
//!   model harness and the training of the `fit` demo.
//! - [`expressivity`]: the constructions of "The Expressive Power of Low-Rank Adaptation" and
//!   the reverse mode of its models (the App. G experiments, the `elra` command line and their
//!   figures are the lab crate's, `lab/`).
//! - [`io`]: PEFT-layout adapter files (safetensors + JSON config).
//! - [`capi`]: the C ABI (`include/elra.h`).
//! - `cuda` (feature `cuda`): the device layer and kernels compiled from `cuda/*.cu`.
#![warn(missing_docs)]
// `unsafe` lives in the C ABI and the CUDA back end only, every block with a `// SAFETY:` note.
#![deny(unsafe_code)]

pub mod adapter;
#[allow(unsafe_code)]
pub mod capi;
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
pub mod cuda;
pub mod error;
pub mod expressivity;
pub mod grad;
pub mod io;
pub mod linalg;
pub mod ops;
pub mod reference;
pub mod train;
pub mod verify;

pub use error::{ElraError, Result};

/// The README's example, compiled and run as a doctest so that it stays true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
