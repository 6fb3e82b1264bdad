//! The constructions of Zeng & Lee, *The Expressive Power of Low-Rank Adaptation* (seed paper
//! `001`), as code: the models of the paper, the adapters its proofs build, and the models'
//! exact reverse mode. The App. G experiments that train adapters on these models (LoRA and the
//! ELRA variants side by side, CSV, figures, the `elra expressivity` runner) are not part of the
//! library: they live in the lab crate (`lab/`, package `elra-lab`).
//!
//! # Conventions
//! * All matrices are `nalgebra::DMatrix<f64>`; every weight is square `D×D` (out×in), as in the
//!   paper.
//! * **Samples are rows** (the crate-wide convention): a batch `X` is `N×D` and a linear layer maps
//!   it to `X Wᵀ`. The paper writes column vectors `W x`; the two agree row by row. For a
//!   transformer ([`tfn::Tfn`]) a *sequence* of `n` tokens is `n` consecutive rows, and a batch of
//!   `B` sequences is the `(B·n)×D` stack of them (the paper's `X ∈ ℝ^{D×N}` transposed).
//! * Biases are column vectors `DVector<f64>` of length `D`.
//! * Random weights are Xavier-uniform ([`crate::adapter::xavier_uniform`], App. G), attention
//!   weights standard normal ([`standard_normal`]), biases PyTorch-uniform ([`bias_uniform`]).
//!
//! # What is here
//! * [`linear`]: Lemma 9 / Lemma 10 (App. D) — adapters for a product of frozen matrices whose
//!   spectral-norm error is the optimal `σ_{RL+1}(E)`; [`linear::LinearModel`].
//! * [`fnn`]: Lemma 11/12, Theorems 3, 5 and 15 (App. E) — ReLU FNNs with biases, uniform and
//!   general partitions; [`fnn::Fnn`].
//! * [`tfn`]: Theorem 6 / Corollary 20 (App. F) — multi-head transformer blocks without skip
//!   connections or layer norm; [`tfn::Tfn`].
//! * [`network`]: the models' exact reverse mode (gradients of the MSE w.r.t. every weight and
//!   bias), behind the [`network::Network`] trait.
#![allow(non_snake_case)]

pub mod fnn;
pub mod linear;
pub mod network;
pub mod tfn;

use crate::linalg::check_finite;
use crate::linalg::jacobi::{one_sided_jacobi, JacobiSweeps, JacobiTolerance};
use crate::{ElraError, Result};
use nalgebra::{DMatrix, DVector};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// A low-rank adapter `ΔW = B A` with `B` `D×R` and `A` `R×D` (the LoRA factorisation of
/// Hu et al.; the paper's `ΔW_l` of rank `≤ R`).
#[derive(Debug, Clone, PartialEq)]
pub struct LowRank {
    /// Left factor, `D×R`.
    pub B: DMatrix<f64>,
    /// Right factor, `R×D`.
    pub A: DMatrix<f64>,
}

impl LowRank {
    /// The zero adapter of rank budget `r` for `D×D` weights.
    pub fn zeros(d: usize, r: usize) -> Self {
        LowRank {
            B: DMatrix::zeros(d, r),
            A: DMatrix::zeros(r, d),
        }
    }

    /// The rank budget `R` (number of columns of `B`).
    pub fn rank_budget(&self) -> usize {
        self.B.ncols()
    }

    /// An adapter from its factors. Errors: `B.ncols() ≠ A.nrows()`, non-finite entries.
    pub fn new(B: DMatrix<f64>, A: DMatrix<f64>) -> Result<Self> {
        let l = LowRank { B, A };
        l.validate()?;
        Ok(l)
    }

    /// Checks `B.ncols() = A.nrows()` and finiteness (the fields are public).
    pub fn validate(&self) -> Result<()> {
        if self.B.ncols() != self.A.nrows() {
            return Err(ElraError::shape(
                "A",
                (self.B.ncols(), self.A.ncols()),
                self.A.shape(),
            ));
        }
        check_finite("B", &self.B)?;
        check_finite("A", &self.A)
    }

    /// The dense update `ΔW = B A`. Errors: as [`LowRank::validate`].
    pub fn dense(&self) -> Result<DMatrix<f64>> {
        self.validate()?;
        Ok(&self.B * &self.A)
    }

    /// The same update with factors zero-padded to `r` columns/rows (`r ≥` current budget);
    /// `B A` is unchanged.
    pub fn padded(&self, r: usize) -> Self {
        let (d_out, k) = self.B.shape();
        let d_in = self.A.ncols();
        let mut B = DMatrix::zeros(d_out, r.max(k));
        let mut A = DMatrix::zeros(r.max(k), d_in);
        B.view_mut((0, 0), (d_out, k)).copy_from(&self.B);
        A.view_mut((0, 0), (k, d_in)).copy_from(&self.A);
        LowRank { B, A }
    }

    /// The transposed update `ΔWᵀ = Aᵀ Bᵀ` as a [`LowRank`].
    pub fn transposed(&self) -> Self {
        LowRank {
            B: self.A.transpose(),
            A: self.B.transpose(),
        }
    }
}

/// A singular value decomposition `M = U diag(σ) Vᵀ` with `σ` sorted in decreasing order.
#[derive(Debug, Clone)]
pub struct SortedSvd {
    /// Left singular vectors (columns).
    pub U: DMatrix<f64>,
    /// Singular values, decreasing.
    pub sigma: DVector<f64>,
    /// Right singular vectors (columns) — `V`, not `Vᵀ`.
    pub V: DMatrix<f64>,
}

impl SortedSvd {
    /// The SVD of `m` (notation paragraph of §1: `W = U D Vᵀ`, `σ_1 ≥ σ_2 ≥ …`), thin:
    /// `U` is `m×k`, `V` is `n×k`, `k = min(m, n)`.
    ///
    /// Computed by one-sided Jacobi (Hestenes 1958; Demmel & Veselić 1992; the sweeps of
    /// `linalg/jacobi.rs`, shared with [`crate::reference::svd`]), which is accurate to
    /// a few ulps relative to `‖m‖` and, unlike nalgebra 0.34/0.35's bidiagonal QR SVD, never
    /// returns wrong singular values when vectors are requested (dimforge/nalgebra#1172: e.g.
    /// the 2×2 rank-one matrix `[[0.1599, −0.5228], [−0.0856, 0.2797]]` gets σ₁ = 0.690 instead
    /// of 0.620). Columns of `U` for zero singular values are completed to an orthonormal set.
    ///
    /// Errors: [`ElraError::NonFinite`] for NaN/Inf entries, [`ElraError::Numerical`] if the
    /// Jacobi sweeps do not converge.
    pub fn new(arg: &'static str, m: &DMatrix<f64>) -> Result<Self> {
        check_finite(arg, m)?;
        if m.nrows() < m.ncols() {
            let t = Self::new(arg, &m.transpose())?;
            return Ok(SortedSvd {
                U: t.V,
                sigma: t.sigma,
                V: t.U,
            });
        }
        let (rows, n) = m.shape();
        let Some(JacobiSweeps {
            a,
            v,
            norms,
            order,
            negligible: tiny,
        }) = one_sided_jacobi(m, JacobiTolerance::Rows, 80)
        else {
            return Err(ElraError::Numerical(format!(
                "Jacobi SVD of `{arg}` did not converge in 80 sweeps"
            )));
        };
        let sigma = DVector::from_iterator(n, order.iter().map(|&j| norms[j]));
        let V = DMatrix::from_fn(n, n, |i, k| v[(i, order[k])]);
        let mut U = DMatrix::<f64>::zeros(rows, n);
        let smax = sigma.get(0).copied().unwrap_or(0.0);
        let mut filled = Vec::with_capacity(n);
        for (k, &j) in order.iter().enumerate() {
            // Columns at or below the rotation floor were never orthogonalised: complete instead.
            if norms[j] > 0.0
                && norms[j] * norms[j] > tiny
                && norms[j] > smax * f64::MIN_POSITIVE.sqrt()
            {
                U.set_column(k, &(a.column(j) / norms[j]));
                filled.push(k);
            }
        }
        // Complete U for (numerically) zero singular values: Gram–Schmidt (twice) on e_i, the
        // first `e_i` (in order) whose residual keeps more than half its norm; when none of the
        // remaining ones does, the one with the largest residual. Such an `e_i` always exists:
        // the squared residuals of all `e_i` sum to the co-dimension `rows − filled ≥ 1`, so the
        // largest is at least `1/√rows` (a 9×9 rank-8 matrix whose null vector has no entry
        // above 0.5 once left a zero column here).
        let residual = |U: &DMatrix<f64>, filled: &[usize], i: usize| {
            let mut x = DVector::<f64>::zeros(rows);
            x[i] = 1.0;
            for _ in 0..2 {
                for &f in filled {
                    let proj = U.column(f).dot(&x);
                    x -= U.column(f) * proj;
                }
            }
            x
        };
        let mut e = 0;
        for k in 0..n {
            if filled.contains(&k) {
                continue;
            }
            let mut chosen = None;
            while e < rows {
                let x = residual(&U, &filled, e);
                e += 1;
                if x.norm() > 0.5 {
                    chosen = Some(x);
                    break;
                }
            }
            let x = match chosen {
                Some(x) => x,
                None => (0..rows)
                    .map(|i| residual(&U, &filled, i))
                    .max_by(|a, b| a.norm().total_cmp(&b.norm()))
                    .unwrap_or_else(|| DVector::zeros(rows)),
            };
            let nx = x.norm();
            if nx > 0.0 {
                U.set_column(k, &(x / nx));
            }
            filled.push(k);
        }
        Ok(SortedSvd { U, sigma, V })
    }

    /// `σ_k` with the paper's 1-based index; `σ_k = 0` for `k > min(m, n)` (§1 notation).
    pub fn sigma_1based(&self, k: usize) -> f64 {
        if k == 0 || k > self.sigma.len() {
            0.0
        } else {
            self.sigma[k - 1]
        }
    }

    /// Numerical rank: the number of `σ_i > max(m,n)·ε·σ_1` (the usual `matrix_rank` rule).
    pub fn numerical_rank(&self) -> usize {
        let n = self.U.nrows().max(self.V.nrows()) as f64;
        let s1 = self.sigma_1based(1);
        if s1 == 0.0 {
            return 0;
        }
        let tol = n * f64::EPSILON * s1;
        self.sigma.iter().filter(|&&s| s > tol).count()
    }

    /// `Σ_{i ∈ idx} σ_i u_i v_iᵀ` for 0-based indices `idx ⊆ [0, min(m, n))`, returned as
    /// factors `(U_S diag(σ_S), V_S)` (`D×|S|` each).
    pub(crate) fn triplets(&self, idx: std::ops::Range<usize>) -> (DMatrix<f64>, DMatrix<f64>) {
        let k = idx.len();
        let mut US = self.U.columns(idx.start, k).into_owned();
        for (j, i) in idx.clone().enumerate() {
            let s = self.sigma[i];
            US.column_mut(j).scale_mut(s);
        }
        let VS = self.V.columns(idx.start, k).into_owned();
        (US, VS)
    }

    /// `LR_r(M)`: the best rank-`r` approximation `Σ_{i≤r} σ_i u_i v_iᵀ` (§1 notation).
    pub fn low_rank(&self, r: usize) -> DMatrix<f64> {
        let r = r.min(self.sigma.len());
        let (US, VS) = self.triplets(0..r);
        US * VS.transpose()
    }
}

/// Spectral norm `‖M‖₂ = σ_1(M)`.
pub fn spectral_norm(arg: &'static str, m: &DMatrix<f64>) -> Result<f64> {
    if m.is_empty() {
        return Ok(0.0);
    }
    Ok(SortedSvd::new(arg, m)?.sigma_1based(1))
}

/// `LR_r(M)`, the best rank-`r` approximation of `M` in the 2- and Frobenius norms
/// (Eckart–Young–Mirsky; the paper's notation paragraph).
pub fn low_rank_approx(arg: &'static str, m: &DMatrix<f64>, r: usize) -> Result<DMatrix<f64>> {
    Ok(SortedSvd::new(arg, m)?.low_rank(r))
}

/// An LU factorisation of a square matrix that was checked to be numerically non-singular
/// (`σ_min > D·ε·σ_max`); the inverses in eq. (8) and Thm. 6's proof go through it.
#[derive(Debug, Clone)]
pub struct CheckedLu {
    lu: nalgebra::LU<f64, nalgebra::Dyn, nalgebra::Dyn>,
    lu_t: nalgebra::LU<f64, nalgebra::Dyn, nalgebra::Dyn>,
    /// `σ_min / σ_max` of the factorised matrix.
    pub inv_condition: f64,
}

impl CheckedLu {
    /// Factorises `m`; `what` names the matrix in the error when it is (numerically) singular,
    /// i.e. when the paper's non-singularity assumption (Lemma 9, Assumption 1/2/4) fails.
    pub fn new(arg: &'static str, what: &str, m: &DMatrix<f64>) -> Result<Self> {
        if !m.is_square() {
            return Err(ElraError::shape(arg, (m.nrows(), m.nrows()), m.shape()));
        }
        let svd = SortedSvd::new(arg, m)?;
        let d = m.nrows();
        let smax = svd.sigma_1based(1);
        let smin = svd.sigma_1based(d);
        let inv_condition = if smax > 0.0 { smin / smax } else { 0.0 };
        if inv_condition.is_nan() || inv_condition <= d as f64 * f64::EPSILON {
            return Err(ElraError::Numerical(format!(
                "{what} is singular to working precision (σ_min/σ_max = {inv_condition:.3e} \
                 ≤ D·ε): the paper's non-singularity assumption fails, exactly or through the \
                 rounding of inverses of ill-conditioned frozen weights"
            )));
        }
        Ok(CheckedLu {
            lu: m.clone().lu(),
            lu_t: m.transpose().lu(),
            inv_condition,
        })
    }

    /// `M⁻¹ X`.
    pub fn solve(&self, x: &DMatrix<f64>) -> Result<DMatrix<f64>> {
        self.lu
            .solve(x)
            .ok_or_else(|| ElraError::Numerical("LU solve failed (singular pivot)".into()))
    }

    /// `M⁻ᵀ X`.
    pub fn solve_transpose(&self, x: &DMatrix<f64>) -> Result<DMatrix<f64>> {
        self.lu_t
            .solve(x)
            .ok_or_else(|| ElraError::Numerical("LU solve failed (singular pivot)".into()))
    }

    /// `M⁻¹` (used only where the paper's formula needs an explicit matrix, e.g. as a Lemma 9
    /// target in Thm. 6).
    pub fn inverse(&self) -> Result<DMatrix<f64>> {
        let n = self.lu.l().nrows();
        self.solve(&DMatrix::identity(n, n))
    }
}

/// Matrix with i.i.d. standard normal entries (App. G.3: attention weights).
pub fn standard_normal(rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> DMatrix<f64> {
    DMatrix::from_fn(rows, cols, |_, _| StandardNormal.sample(rng))
}

/// Bias vector with i.i.d. `U(−1/√fan_in, 1/√fan_in)` entries (PyTorch's `nn.Linear` bias
/// initialisation, which App. G's models inherit).
pub fn bias_uniform(d: usize, fan_in: usize, rng: &mut ChaCha8Rng) -> DVector<f64> {
    let a = 1.0 / (fan_in.max(1) as f64).sqrt();
    DVector::from_fn(d, |_, _| rng.random_range(-a..a))
}

/// The largest row norm `max_n ‖x_n‖₂` of a batch (rows are samples): a radius of the bounded
/// input domain `𝒳` that the FNN construction (Lemma 11, "linearisation") needs.
pub fn input_radius(x: &DMatrix<f64>) -> f64 {
    x.row_iter().map(|r| r.norm()).fold(0.0, f64::max)
}

/// The matrix product `W_L ⋯ W_1` of `D×D` layers given first-to-last (the paper's
/// `∏_{l=1}^L W_l`); the identity for an empty list.
///
/// Errors: a layer that is not `d×d`.
pub fn product(ws: &[DMatrix<f64>], d: usize) -> Result<DMatrix<f64>> {
    let mut p = DMatrix::identity(d, d);
    for w in ws {
        if w.shape() != (d, d) {
            return Err(ElraError::shape("ws", (d, d), w.shape()));
        }
        p = w * p;
    }
    Ok(p)
}

/// `W_l + ΔW_l` for every layer (§2.1: the adapted model's weights), checking that there is one
/// D×D adapter per layer. Errors name `adapters`.
pub(crate) fn add_adapters(
    weights: &[DMatrix<f64>],
    adapters: &[LowRank],
    d: usize,
) -> Result<Vec<DMatrix<f64>>> {
    if adapters.len() != weights.len() {
        return Err(ElraError::invalid(
            "adapters",
            format!(
                "need one per layer ({}), got {}",
                weights.len(),
                adapters.len()
            ),
        ));
    }
    weights
        .iter()
        .zip(adapters)
        .map(|(w, a)| {
            let dw = a.dense()?;
            if dw.shape() != (d, d) {
                return Err(ElraError::shape("adapters", (d, d), dw.shape()));
            }
            Ok(w + dw)
        })
        .collect()
}

pub(crate) fn check_square(arg: &'static str, m: &DMatrix<f64>, d: usize) -> Result<()> {
    if m.shape() != (d, d) {
        return Err(ElraError::shape(arg, (d, d), m.shape()));
    }
    check_finite(arg, m)
}

pub(crate) fn check_vec(arg: &'static str, v: &DVector<f64>, d: usize) -> Result<()> {
    if v.len() != d {
        return Err(ElraError::shape(arg, (d, 1), (v.len(), 1)));
    }
    if v.iter().all(|x| x.is_finite()) {
        Ok(())
    } else {
        Err(ElraError::NonFinite { arg })
    }
}

/// The uniform partition `P^u` of §2.2 / App. E.2, 0-based: block `i < L̄−1` is layers
/// `[iM, (i+1)M)` and the last block is `[(L̄−1)M, L)`, with `M = ⌊L/L̄⌋`.
///
/// Errors: `target_layers = 0` or `target_layers > frozen_layers` (the paper assumes `L ≥ L̄`).
pub fn uniform_partition(
    frozen_layers: usize,
    target_layers: usize,
) -> Result<Vec<std::ops::Range<usize>>> {
    if target_layers == 0 {
        return Err(ElraError::invalid("target_layers", "must be ≥ 1"));
    }
    if frozen_layers < target_layers {
        return Err(ElraError::invalid(
            "frozen_layers",
            format!("the frozen model must be at least as deep as the target (L = {frozen_layers} < L̄ = {target_layers})"),
        ));
    }
    let m = frozen_layers / target_layers;
    Ok((0..target_layers)
        .map(|i| {
            let end = if i + 1 == target_layers {
                frozen_layers
            } else {
                (i + 1) * m
            };
            i * m..end
        })
        .collect())
}

/// Checks that `partition` is an ordered partition of `0..layers` into non-empty consecutive
/// ranges (App. E.3's `𝒫`).
pub fn check_partition(partition: &[std::ops::Range<usize>], layers: usize) -> Result<()> {
    let mut next = 0;
    for r in partition {
        if r.start != next || r.end <= r.start {
            return Err(ElraError::invalid(
                "partition",
                format!("must be consecutive non-empty ranges covering 0..{layers}"),
            ));
        }
        next = r.end;
    }
    if next != layers {
        return Err(ElraError::invalid(
            "partition",
            format!("covers 0..{next}, expected 0..{layers}"),
        ));
    }
    Ok(())
}
