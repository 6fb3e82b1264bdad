//! Reverse mode (hand-written backpropagation) for ELRA, double-sided ELRA and LoRA on the CPU.
//!
//! The paper trains with automatic differentiation through the matrix exponential (§3.2,
//! Algorithm 1 line 12). Here every gradient is written out on explicit matrices, with samples
//! as rows (`X` N×k, `W0` d×k, `Y = X W_newᵀ` N×d), and only N×r, r×d, r×k and r×r
//! intermediates besides the N×d/N×k activations — no d×d matrix and no dense weight gradient
//! `Ȳᵀ X` is ever formed:
//!
//! * [`rows`]: the primitive `Y = X exp(A C)ᵀ = X + ((X Cᵀ) Mᵀ) Aᵀ` (Prop. 1, eq. 5) and its
//!   reverse mode, including the Fréchet adjoint of `M = φ1(Z)`;
//! * [`generator`]: the chain from the effective factors back to `(A, B, η)` through the
//!   spectral clip (exact derivative), the variant (eq. 2, §4.2.1, eq. 19) and the η
//!   multiplier, and the energy penalty `λ‖G‖²_F` (eq. 20–21);
//! * [`elra`]: the single-sided layer on the Woodbury route (eq. 5) and on the merged route
//!   (eq. 30), wired to [`crate::adapter::ElraLayer`];
//! * [`double`]: the double-sided variant `exp(L) W0 exp(R)` (App. B);
//! * [`lora`]: the PEFT LoRA baseline, wired to [`crate::adapter::LoraLayer`];
//! * [`ops`]: products with transposes through strides.
//!
//! Every reverse-mode function is checked against central differences and against the dense
//! nalgebra oracle in `tests/gradients.rs`.
#![allow(non_snake_case)]

mod adapters;
pub mod double;
pub mod elra;
pub mod generator;
pub mod lora;
pub mod ops;
pub mod rows;

pub use double::{
    double_backward, double_backward_parts, double_forward, double_forward_parts, DoubleGrad,
    DoubleTape, SideParams,
};
pub use elra::{
    elra_backward, elra_backward_parts, elra_forward, elra_forward_parts, ElraGrad, ElraTape,
    GeneratorTape, Route, RouteTape,
};
pub use generator::{
    energy_backward, top_singular, ClipTape, FactorChain, FactorGrad, TopSingular,
};
pub use lora::{
    lora_backward, lora_backward_parts, lora_forward, lora_forward_parts, LoraGrad, LoraTape,
};
pub use rows::{exp_rows_backward, exp_rows_forward, ExpRowsGrad, ExpRowsTape};

use nalgebra::DMatrix;

use crate::linalg::Real;
use crate::Result;

/// `Z̄ = L_φ1(Z)*(M̄) = L_φ1(Zᵀ, M̄)`: the adjoint of the Fréchet derivative of φ1 (real power
/// series), the step through `M = φ1(Z)` of every reverse mode here
/// ([`crate::linalg::phi1_frechet_adjoint`]: block Padé scaling and squaring of
/// `φ1([[Zᵀ, M̄], [0, Zᵀ]])`, Higham 2008 Thm 3.6).
pub(crate) fn phi1_adjoint<T: Real>(z: &DMatrix<T>, mbar: &DMatrix<T>) -> Result<DMatrix<T>> {
    crate::linalg::phi1_frechet_adjoint(z, mbar)
}
