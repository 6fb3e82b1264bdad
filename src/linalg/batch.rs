//! Many r×r matrix functions at once with one reusable workspace (the CPU counterpart of the
//! batched GPU kernel): every ELRA layer has its own `Z = C A`, and a model has many layers.
//!
//! Matrices are stored row-major and contiguous: matrix `i` of a batch occupies
//! `z[i·r·r .. (i+1)·r·r]`, entry `(j, k)` at offset `j·r + k`. Each matrix goes through exactly
//! the same kernel as the single-matrix functions ([`crate::linalg::expm()`], [`crate::linalg::phi1()`],
//! [`crate::linalg::expm_phi1()`], [`crate::linalg::expm_frechet_adjoint()`],
//! [`crate::linalg::phi1_frechet_adjoint()`]), so results are bit-for-bit equal to them. No
//! allocation happens after [`MatFnBatch::new`] (errors aside).
#![allow(non_snake_case)]

use super::expm::Workspace;
use super::frechet::{frechet_rowmajor, Func};
use super::Real;
use crate::{ElraError, Result};

/// Workspace for batched r×r matrix functions (Padé scaling and squaring, Al-Mohy & Higham
/// 2009 Alg. 5.1, with φ1 and Fréchet extensions; see [`linalg::expm`](mod@crate::linalg::expm)).
#[derive(Clone, Debug)]
pub struct MatFnBatch<T: Real> {
    r: usize,
    ws: Workspace<T>,
    out_tmp: Vec<T>,
}

/// Adds the batch index to an error from the kernel.
fn at(i: usize, e: ElraError) -> ElraError {
    match e {
        ElraError::Overflow { what } => ElraError::Overflow {
            what: format!("matrix {i} of the batch: {what}"),
        },
        ElraError::Numerical(m) => ElraError::Numerical(format!("matrix {i} of the batch: {m}")),
        ElraError::InvalidArgument { arg, reason } => ElraError::InvalidArgument {
            arg,
            reason: format!("matrix {i} of the batch: {reason}"),
        },
        other => other,
    }
}

impl<T: Real> MatFnBatch<T> {
    /// Allocates the workspace for r×r matrices (`r ≥ 1`; r = 0 → [`ElraError::InvalidArgument`]).
    pub fn new(r: usize) -> Result<Self> {
        if r == 0 {
            return Err(ElraError::invalid(
                "r",
                "r = 0: matrices must be at least 1×1",
            ));
        }
        Ok(MatFnBatch {
            r,
            ws: Workspace::new(r, true),
            out_tmp: vec![T::zero(); r * r],
        })
    }

    /// The matrix size r.
    pub fn r(&self) -> usize {
        self.r
    }

    /// Number of matrices in `z`, checking that `z` holds whole r×r matrices and that every
    /// other buffer has the same length.
    fn count(&self, z: &[T], others: &[(&'static str, usize)]) -> Result<usize> {
        let rr = self.r * self.r;
        if z.len() % rr != 0 {
            return Err(ElraError::Shape {
                arg: "z",
                expected: format!("a multiple of r·r = {rr} values"),
                got: format!("{} values", z.len()),
            });
        }
        for &(arg, len) in others {
            if len != z.len() {
                return Err(ElraError::Shape {
                    arg,
                    expected: format!(
                        "{} values ({} matrices {r}×{r})",
                        z.len(),
                        z.len() / rr,
                        r = self.r
                    ),
                    got: format!("{len} values"),
                });
            }
        }
        Ok(z.len() / rr)
    }

    fn plain(
        &mut self,
        z: &[T],
        exp_out: Option<&mut [T]>,
        phi_out: Option<&mut [T]>,
    ) -> Result<()> {
        let rr = self.r * self.r;
        let both = exp_out.is_some() && phi_out.is_some();
        let e_len = exp_out.as_ref().map(|o| o.len());
        let p_len = phi_out.as_ref().map(|o| o.len());
        let others = [
            (
                if both { "exp_out" } else { "out" },
                e_len.or(p_len).unwrap_or(z.len()),
            ),
            (
                if both { "phi1_out" } else { "out" },
                p_len.or(e_len).unwrap_or(z.len()),
            ),
        ];
        let count = self.count(z, &others)?;
        let (want_exp, want_phi) = (exp_out.is_some(), phi_out.is_some());
        let mut exp_out = exp_out;
        let mut phi_out = phi_out;
        for i in 0..count {
            let zi = &z[i * rr..(i + 1) * rr];
            self.ws.load(zi);
            self.ws
                .run(false, want_exp, want_phi)
                .map_err(|e| at(i, e))?;
            if let Some(o) = exp_out.as_deref_mut() {
                o[i * rr..(i + 1) * rr].copy_from_slice(&self.ws.r[..rr]);
            }
            if let Some(o) = phi_out.as_deref_mut() {
                o[i * rr..(i + 1) * rr].copy_from_slice(&self.ws.p[..rr]);
            }
        }
        Ok(())
    }

    /// `out_i = φ1(Z_i)` for every r×r matrix of `z` (Prop. 1, eq. 4; AMH 2009 Alg. 5.1 with the
    /// φ1 recurrence). `out.len()` must equal `z.len()`, a multiple of r².
    pub fn phi1(&mut self, z: &[T], out: &mut [T]) -> Result<()> {
        self.plain(z, None, Some(out))
    }

    /// `out_i = e^{Z_i}` (AMH 2009 Alg. 5.1).
    pub fn expm(&mut self, z: &[T], out: &mut [T]) -> Result<()> {
        self.plain(z, Some(out), None)
    }

    /// `(e^{Z_i}, φ1(Z_i))` from one factorisation per matrix (module docs of
    /// [`linalg::expm`](mod@crate::linalg::expm)).
    pub fn expm_phi1(&mut self, z: &[T], exp_out: &mut [T], phi1_out: &mut [T]) -> Result<()> {
        self.plain(z, Some(exp_out), Some(phi1_out))
    }

    fn adjoint(&mut self, f: Func, z: &[T], g: &[T], out: &mut [T]) -> Result<()> {
        let rr = self.r * self.r;
        let count = self.count(z, &[("g", g.len()), ("out", out.len())])?;
        for i in 0..count {
            let (zi, gi) = (&z[i * rr..(i + 1) * rr], &g[i * rr..(i + 1) * rr]);
            frechet_rowmajor(&mut self.ws, f, zi, gi, "g", true, &mut self.out_tmp)
                .map_err(|e| at(i, e))?;
            out[i * rr..(i + 1) * rr].copy_from_slice(&self.out_tmp);
        }
        Ok(())
    }

    /// `out_i = L_φ1(Z_iᵀ, G_i)`, the adjoint Fréchet derivative of φ1 (gradient of `⟨φ1(Z), G⟩`;
    /// block-triangular Padé, see [`crate::linalg::frechet`]).
    pub fn phi1_frechet_adjoint(&mut self, z: &[T], g: &[T], out: &mut [T]) -> Result<()> {
        self.adjoint(Func::Phi1, z, g, out)
    }

    /// `out_i = L_exp(Z_iᵀ, G_i)`, the adjoint Fréchet derivative of exp.
    pub fn expm_frechet_adjoint(&mut self, z: &[T], g: &[T], out: &mut [T]) -> Result<()> {
        self.adjoint(Func::Exp, z, g, out)
    }
}
