//! Fréchet derivatives of `e^Z` and `φ1(Z)` and their adjoints, for the reverse mode of ELRA.
//!
//! `L_f(Z, E) = d/dt f(Z + tE)|_{t=0}` is the top-right block of `f([[Z, E], [0, Z]])`
//! (Higham, *Functions of Matrices*, Thm 3.6 / eq. 3.16; Al-Mohy & Higham 2009, "Computing the
//! Fréchet derivative of the matrix exponential", §2). The block matrix is run through the same
//! Padé scaling-and-squaring kernel as [`crate::linalg::expm()`], with every intermediate kept in the
//! block-triangular form `[[X, Y], [0, X]]` (three r×r products per block product); the squaring
//! phase is then `L ← R L + L R` for e^Z and the pair form of `P ← ½(P + R P)` for φ1. E is scaled
//! by a power of two so that `‖E‖₁ ≈ ‖Z‖₁` before the block trick and the result scaled back
//! (linearity in E), so the degree/scaling choice is driven by Z. See the module docs of
//! [`linalg::expm`](mod@crate::linalg::expm) for the exact steps.
//!
//! Adjoints: for a real power series `f`, `⟨L_f(Z, E), G⟩ = ⟨E, L_f(Zᵀ, G)⟩` (Frobenius inner
//! product), so `L_f(Z)*(G) = L_f(Zᵀ, G)` — the gradient of a scalar loss through `M = f(Z)` is
//! `∂L/∂Z = L_f(Zᵀ, ∂L/∂M)`.
#![allow(non_snake_case)]

use super::all_finite;
use super::expm::{check_square, scale_pow2, to_row_major, Workspace};
use super::Real;
use crate::{ElraError, Result};
use nalgebra::DMatrix;

/// Which matrix function a Fréchet derivative is taken of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Func {
    /// `e^Z`
    Exp,
    /// `φ1(Z)`
    Phi1,
}

/// `out = L_f(X, E)` where `X = Z` (or `Zᵀ` when `transpose`), all n×n row-major slices, using a
/// workspace created with pairs. `e_arg` names E in errors. Allocates nothing.
pub(crate) fn frechet_rowmajor<T: Real>(
    ws: &mut Workspace<T>,
    f: Func,
    z: &[T],
    e: &[T],
    e_arg: &'static str,
    transpose: bool,
    out: &mut [T],
) -> Result<()> {
    let n = ws.n();
    let nn = n * n;
    if !all_finite(&z[..nn]) {
        return Err(ElraError::NonFinite { arg: "z" });
    }
    if !all_finite(&e[..nn]) {
        return Err(ElraError::NonFinite { arg: e_arg });
    }
    if transpose {
        ws.load_transposed(z);
    } else {
        ws.load(z);
    }
    let Some(k) = ws.load_direction(e) else {
        // L(Z, 0) = 0 (linear in E).
        out[..nn].fill(T::zero());
        return Ok(());
    };
    match f {
        Func::Exp => {
            ws.run(true, true, false)?;
            out[..nn].copy_from_slice(&ws.r[nn..2 * nn]);
        }
        Func::Phi1 => {
            ws.run(true, false, true)?;
            out[..nn].copy_from_slice(&ws.p[nn..2 * nn]);
        }
    }
    scale_pow2(&mut out[..nn], -k);
    if !all_finite(&out[..nn]) {
        return Err(ElraError::Overflow {
            what: "Fréchet derivative is outside the floating-point range".into(),
        });
    }
    Ok(())
}

fn frechet_single<T: Real>(
    f: Func,
    z: &DMatrix<T>,
    e: &DMatrix<T>,
    e_arg: &'static str,
    transpose: bool,
) -> Result<DMatrix<T>> {
    let n = check_square("z", z)?;
    if e.shape() != (n, n) {
        return Err(ElraError::shape(e_arg, (n, n), e.shape()));
    }
    super::check_finite("z", z)?;
    super::check_finite(e_arg, e)?;
    let mut zr = vec![T::zero(); n * n];
    let mut er = vec![T::zero(); n * n];
    to_row_major(z, &mut zr);
    to_row_major(e, &mut er);
    let mut ws = Workspace::new(n, true);
    let mut out = vec![T::zero(); n * n];
    frechet_rowmajor(&mut ws, f, &zr, &er, e_arg, transpose, &mut out)?;
    Ok(DMatrix::from_row_slice(n, n, &out))
}

/// Fréchet derivative `L_exp(Z, E)`: the top-right block of `exp([[Z, E], [0, Z]])` (Higham 2008
/// Thm 3.6; AMH 2009 Fréchet paper §2), by the block-structured Padé scaling and squaring of the
/// module docs of [`linalg::expm`](mod@crate::linalg::expm) (squaring `L ← R L + L R`).
///
/// Errors: shapes (`z` square, `e` the same shape) → [`ElraError::Shape`]; 0×0 →
/// [`ElraError::InvalidArgument`]; NaN/Inf → [`ElraError::NonFinite`]; overflow →
/// [`ElraError::Overflow`].
pub fn expm_frechet<T: Real>(z: &DMatrix<T>, e: &DMatrix<T>) -> Result<DMatrix<T>> {
    frechet_single(Func::Exp, z, e, "e", false)
}

/// Fréchet derivative `L_φ1(Z, E)`: the top-right block of `φ1([[Z, E], [0, Z]])` (Higham 2008
/// Thm 3.6 applied to φ1), from the same block Padé factorisation `P = 2(V−U)⁻¹W` and the pair
/// form of the squaring `P ← ½(P + R P)` (module docs of [`linalg::expm`](mod@crate::linalg::expm)).
///
/// Errors as [`expm_frechet`].
pub fn phi1_frechet<T: Real>(z: &DMatrix<T>, e: &DMatrix<T>) -> Result<DMatrix<T>> {
    frechet_single(Func::Phi1, z, e, "e", false)
}

/// Adjoint of the Fréchet derivative of exp: `L_exp(Z)*(G) = L_exp(Zᵀ, G)` (real power series;
/// `⟨L(Z,E), G⟩ = ⟨E, L(Zᵀ,G)⟩`), i.e. the gradient with respect to Z of `⟨e^Z, G⟩`.
///
/// Errors as [`expm_frechet`] (the direction is named `g`).
pub fn expm_frechet_adjoint<T: Real>(z: &DMatrix<T>, g: &DMatrix<T>) -> Result<DMatrix<T>> {
    frechet_single(Func::Exp, z, g, "g", true)
}

/// Adjoint of the Fréchet derivative of φ1: `L_φ1(Z)*(G) = L_φ1(Zᵀ, G)`, the gradient with
/// respect to Z of `⟨φ1(Z), G⟩` — the step of the ELRA reverse mode through `M = φ1(C A)`
/// (Prop. 1, eq. 4).
///
/// Errors as [`expm_frechet`] (the direction is named `g`).
pub fn phi1_frechet_adjoint<T: Real>(z: &DMatrix<T>, g: &DMatrix<T>) -> Result<DMatrix<T>> {
    frechet_single(Func::Phi1, z, g, "g", true)
}
