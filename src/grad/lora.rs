//! Reverse mode of the LoRA baseline with PEFT's conventions (Hu et al. 2022).
//!
//! `Y = X W0ᵀ + D ∘ (s (X A'ᵀ) B'ᵀ)` with `lora_A = A'` (r×k), `lora_B = B'` (d×r),
//! `s = lora_alpha / r` and an optional dropout mask `D` on the adapter output (the harness
//! applies App. H's "dropout p = 0.05 on adapter outputs" to every method alike; PEFT itself
//! drops the branch *input*). With `P = X A'ᵀ` (N×r) and `Δ̄ = D ∘ Ȳ`:
//!
//! ```text
//! S = s Δ̄ B' (N×r),  ∂B' = s Δ̄ᵀ P,  ∂A' = Sᵀ X,  ∂X = Ȳ W0 + S A'.
//! ```
//!
//! The dense weight gradient `Ȳᵀ X` is never formed.
#![allow(non_snake_case)]

use nalgebra::DMatrix;

use super::ops::{gemm, matmul, Op};
use super::rows::check_mask;
use crate::adapter::LoraLayer;
use crate::linalg::{check_finite, Real};
use crate::{ElraError, Result};

/// The intermediates of [`lora_forward`] that [`lora_backward`] needs.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTape<T: Real> {
    /// `P = X A'ᵀ` (N×r).
    pub p: DMatrix<T>,
    /// The dropout mask (N×d), if any.
    pub mask: Option<DMatrix<T>>,
}

/// Gradients of the LoRA layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraGrad<T: Real> {
    /// `∂L/∂X` (N×k).
    pub x: DMatrix<T>,
    /// `∂L/∂A'` (`lora_A`, r×k).
    pub lora_a: DMatrix<T>,
    /// `∂L/∂B'` (`lora_B`, d×r).
    pub lora_b: DMatrix<T>,
}

fn check_lora<T: Real>(
    x: &DMatrix<T>,
    w0: &DMatrix<T>,
    lora_a: &DMatrix<T>,
    lora_b: &DMatrix<T>,
) -> Result<(usize, usize, usize)> {
    let (d, k) = w0.shape();
    let r = lora_a.nrows();
    if lora_a.shape() != (r, k) || r == 0 {
        return Err(ElraError::shape("lora_a", (r.max(1), k), lora_a.shape()));
    }
    if lora_b.shape() != (d, r) {
        return Err(ElraError::shape("lora_b", (d, r), lora_b.shape()));
    }
    if x.ncols() != k {
        return Err(ElraError::shape("x", (x.nrows(), k), x.shape()));
    }
    Ok((d, k, r))
}

/// LoRA forward `Y = X W0ᵀ + D∘(s (X A'ᵀ) B'ᵀ)` (PEFT `Linear.forward`, samples as rows) on
/// explicit matrices, keeping `P = X A'ᵀ`.
///
/// Errors: shapes of `x` (N×k), `lora_a` (r×k), `lora_b` (d×r), `mask` (N×d); non-finite `x`.
pub fn lora_forward_parts<T: Real>(
    x: &DMatrix<T>,
    w0: &DMatrix<T>,
    lora_a: &DMatrix<T>,
    lora_b: &DMatrix<T>,
    scaling: T,
    mask: Option<&DMatrix<T>>,
) -> Result<(DMatrix<T>, LoraTape<T>)> {
    let (d, _, _) = check_lora(x, w0, lora_a, lora_b)?;
    check_finite("x", x)?;
    check_mask(mask, (x.nrows(), d))?;
    let mut y = matmul(x, Op::N, w0, Op::T);
    let p = matmul(x, Op::N, lora_a, Op::T);
    match mask {
        None => gemm(&mut y, scaling, &p, Op::N, lora_b, Op::T, T::one()),
        Some(m) => {
            let mut delta = matmul(&p, Op::N, lora_b, Op::T);
            delta.component_mul_assign(m);
            y += delta * scaling;
        }
    }
    Ok((
        y,
        LoraTape {
            p,
            mask: mask.cloned(),
        },
    ))
}

/// Reverse mode of [`lora_forward_parts`] (module docs). `ybar` is taken by value.
///
/// Errors: shapes; non-finite `ybar`.
pub fn lora_backward_parts<T: Real>(
    x: &DMatrix<T>,
    w0: &DMatrix<T>,
    lora_a: &DMatrix<T>,
    lora_b: &DMatrix<T>,
    scaling: T,
    tape: &LoraTape<T>,
    ybar: DMatrix<T>,
) -> Result<LoraGrad<T>> {
    let (d, k, r) = check_lora(x, w0, lora_a, lora_b)?;
    let n = x.nrows();
    if ybar.shape() != (n, d) {
        return Err(ElraError::shape("ybar", (n, d), ybar.shape()));
    }
    if tape.p.shape() != (n, r) {
        return Err(ElraError::shape("tape", (n, r), tape.p.shape()));
    }
    check_mask(tape.mask.as_ref(), (n, d))?;
    check_finite("ybar", &ybar)?;
    let mut s = DMatrix::zeros(n, r);
    let mut gb = DMatrix::zeros(d, r);
    match &tape.mask {
        None => {
            gemm(&mut s, scaling, &ybar, Op::N, lora_b, Op::N, T::zero());
            gemm(&mut gb, scaling, &ybar, Op::T, &tape.p, Op::N, T::zero());
        }
        Some(m) => {
            let dbar = ybar.component_mul(m);
            gemm(&mut s, scaling, &dbar, Op::N, lora_b, Op::N, T::zero());
            gemm(&mut gb, scaling, &dbar, Op::T, &tape.p, Op::N, T::zero());
        }
    }
    let ga = matmul(&s, Op::T, x, Op::N);
    let mut gx = DMatrix::zeros(n, k);
    gemm(&mut gx, T::one(), &ybar, Op::N, w0, Op::N, T::zero());
    gemm(&mut gx, T::one(), &s, Op::N, lora_a, Op::N, T::one());
    Ok(LoraGrad {
        x: gx,
        lora_a: ga,
        lora_b: gb,
    })
}

/// [`lora_forward_parts`] for a [`LoraLayer`] (its `W0`, `lora_A`, `lora_B`, `lora_alpha/r`).
pub fn lora_forward<T: Real>(
    layer: &LoraLayer<T>,
    x: &DMatrix<T>,
    mask: Option<&DMatrix<T>>,
) -> Result<(DMatrix<T>, LoraTape<T>)> {
    lora_forward_parts(
        x,
        layer.w0(),
        layer.lora_a(),
        layer.lora_b(),
        T::of(layer.config().scaling()),
        mask,
    )
}

/// [`lora_backward_parts`] for a [`LoraLayer`].
pub fn lora_backward<T: Real>(
    layer: &LoraLayer<T>,
    x: &DMatrix<T>,
    tape: &LoraTape<T>,
    ybar: DMatrix<T>,
) -> Result<LoraGrad<T>> {
    lora_backward_parts(
        x,
        layer.w0(),
        layer.lora_a(),
        layer.lora_b(),
        T::of(layer.config().scaling()),
        tape,
        ybar,
    )
}
