//! One-sided Jacobi SVD (Hestenes 1958; Demmel & Veselić 1992), the SVD behind both
//! [`crate::reference::svd`] (the test oracle) and [`crate::expressivity::SortedSvd`] (the
//! constructions of the LoRA-expressivity paper).
//!
//! For a tall or square `M` (`rows ≥ n`) the sweeps rotate column pairs `(a_p, a_q)` of a copy
//! `A` of `M` by the plane rotation that makes them orthogonal, accumulating the rotations in `V`
//! (so `A = M V` throughout), until every pair satisfies `|a_pᵀa_q| ≤ τ‖a_p‖‖a_q‖`. Then
//! `σ_j = ‖a_j‖`, `u_j = a_j/σ_j`, and `M = U diag(σ) Vᵀ`. Unlike a bidiagonal QR SVD it computes
//! every singular value to a few ulps relative to `‖M‖`, and it never mis-pairs values and
//! vectors (nalgebra 0.34/0.35's SVD does for some rank-deficient inputs, dimforge/nalgebra#1172).
//!
//! Thresholds: the caller picks `τ` ([`JacobiTolerance`]). LAPACK's `dgesvj` uses `√rows·ε`, what
//! the oracle needs to pass its a-posteriori orthogonality check (`10·max(d,k)·ε` on `UᵀU − I` in
//! Frobenius norm: with `rows·ε` per pair that check failed on 17×56 and 63×27 products of
//! Prop. 3's cases); `SortedSvd` keeps
//! the `rows·ε` it was written with (the order of the computed `a_pᵀa_q`'s rounding error), which
//! its App. G results depend on bit for bit. Columns whose squared norm is at or below
//! `(ε‖M‖_F)²` are rounding noise and are never rotated.

use nalgebra::DMatrix;

/// The orthogonality threshold `τ` of the sweeps (see the module docs), and with it the exact
/// arithmetic of each caller's previous implementation: `‖a_p‖‖a_q‖` as `√α·√β` (reference; no
/// overflow) or `√(αβ)` (`SortedSvd`, which overflows for column norms beyond ~1e77, far from
/// App. G's inputs), and the sign of `t` at `ζ = −0.0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JacobiTolerance {
    /// `τ = √rows·ε` (LAPACK `dgesvj`): the reference SVD.
    SqrtRows,
    /// `τ = rows·ε`: `expressivity::SortedSvd`.
    Rows,
}

/// The result of the sweeps on a tall or square `M`: `A = M V` with mutually orthogonal columns.
#[derive(Debug, Clone)]
pub(crate) struct JacobiSweeps {
    /// `A = M V` (`rows × n`), columns mutually orthogonal to `τ` (see [`JacobiTolerance`]).
    pub a: DMatrix<f64>,
    /// The accumulated rotations (`n × n`, orthogonal).
    pub v: DMatrix<f64>,
    /// `‖a_j‖` for every column `j` (the singular values, unsorted).
    pub norms: Vec<f64>,
    /// Column indices in decreasing order of `norms` (stable for ties).
    pub order: Vec<usize>,
    /// `(ε‖M‖_F)²`: columns at or below it were never rotated (rounding noise).
    pub negligible: f64,
}

/// Runs cyclic one-sided Jacobi sweeps (row-cyclic pair order) on `m`, which must have
/// `rows ≥ cols`, with the orthogonality threshold and arithmetic of `kind`, for at most
/// `max_sweeps` sweeps. `None` when a sweep still rotated at the end.
pub(crate) fn one_sided_jacobi(
    m: &DMatrix<f64>,
    kind: JacobiTolerance,
    max_sweeps: usize,
) -> Option<JacobiSweeps> {
    let (rows, n) = m.shape();
    debug_assert!(rows >= n, "one_sided_jacobi needs a tall or square matrix");
    let mut a = m.clone();
    let mut v = DMatrix::<f64>::identity(n, n);
    let tol = match kind {
        JacobiTolerance::SqrtRows => (rows as f64).sqrt() * f64::EPSILON,
        JacobiTolerance::Rows => rows as f64 * f64::EPSILON,
    };
    let negligible = (f64::EPSILON * m.norm()).powi(2);
    let mut converged = n < 2;
    for _sweep in 0..max_sweeps {
        let mut rotated = false;
        for p in 0..n.saturating_sub(1) {
            for q in p + 1..n {
                let alpha = a.column(p).norm_squared();
                let beta = a.column(q).norm_squared();
                let gamma = a.column(p).dot(&a.column(q));
                // `‖a_p‖‖a_q‖`: as a product of square roots for the reference (no overflow
                // for norms beyond 1e77), as the square root of the product for `SortedSvd`
                // (its App. G bits depend on it).
                let norm_pq = match kind {
                    JacobiTolerance::SqrtRows => alpha.sqrt() * beta.sqrt(),
                    JacobiTolerance::Rows => (alpha * beta).sqrt(),
                };
                if gamma == 0.0
                    || alpha <= negligible
                    || beta <= negligible
                    || gamma.abs() <= tol * norm_pq
                {
                    continue;
                }
                rotated = true;
                // The rotation angle θ with tan θ = t, the smaller root of t² + 2ζt − 1 = 0.
                // The two callers' sign rules differ only at ζ = −0.0 (both rotations are valid).
                let zeta = (beta - alpha) / (2.0 * gamma);
                let sign = match kind {
                    JacobiTolerance::SqrtRows => zeta.signum(),
                    JacobiTolerance::Rows => {
                        if zeta >= 0.0 {
                            1.0
                        } else {
                            -1.0
                        }
                    }
                };
                let t = sign / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for i in 0..rows {
                    let (x, y) = (a[(i, p)], a[(i, q)]);
                    a[(i, p)] = c * x - s * y;
                    a[(i, q)] = s * x + c * y;
                }
                for i in 0..n {
                    let (x, y) = (v[(i, p)], v[(i, q)]);
                    v[(i, p)] = c * x - s * y;
                    v[(i, q)] = s * x + c * y;
                }
            }
        }
        if !rotated {
            converged = true;
            break;
        }
    }
    if !converged {
        return None;
    }
    let norms: Vec<f64> = (0..n).map(|j| a.column(j).norm()).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| norms[j].total_cmp(&norms[i]));
    Some(JacobiSweeps {
        a,
        v,
        norms,
        order,
        negligible,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `A = M V`, `V` orthogonal, columns of `A` orthogonal: the invariants both callers rely on,
    /// on a rank-deficient tall matrix (3 of 5 columns independent), to 1e-13 (a few hundred ulps
    /// at these O(1) norms).
    #[test]
    fn jacobi_sweeps_keep_a_equal_m_v_with_orthogonal_columns() {
        let b = DMatrix::from_fn(7, 3, |i, j| ((i * 3 + j * 5) % 11) as f64 / 7.0 - 0.6);
        let c = DMatrix::from_fn(3, 5, |i, j| ((i * 7 + j * 2) % 5) as f64 / 3.0 - 0.5);
        let m = &b * &c;
        let s = one_sided_jacobi(&m, JacobiTolerance::SqrtRows, 80).expect("converges");
        assert!((&m * &s.v - &s.a).norm() < 1e-13);
        assert!((s.v.transpose() * &s.v - DMatrix::identity(5, 5)).norm() < 1e-13);
        for p in 0..5 {
            for q in p + 1..5 {
                let g = s.a.column(p).dot(&s.a.column(q));
                assert!(g.abs() <= 1e-13, "columns {p},{q}: {g:e}");
            }
        }
        let sorted: Vec<f64> = s.order.iter().map(|&j| s.norms[j]).collect();
        assert!(sorted.windows(2).all(|w| w[0] >= w[1]));
        assert!(sorted[3] < 1e-13 && sorted[2] > 1e-3, "rank 3: {sorted:?}");
    }
}
