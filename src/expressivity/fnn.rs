//! App. E — ReLU FNNs with biases: Lemma 11/12, Theorems 3, 5 and 15.
//!
//! `FNN_{L,D}(x; (W_l), (b_l))`: `z_0 = x`, `z_l = ReLU(W_l z_{l−1} + b_l)` for every layer,
//! the last included (§2.1). The construction, per block `P_i` of a partition of the frozen
//! layers (uniform partition of §2.2 for Theorems 3/5, any partition for Theorem 15):
//! 1. *Linearisation* (proof of Lemma 11): the biases of all but the block's last layer are
//!    made large enough that every ReLU in them is active on the (bounded) input domain;
//! 2. *Weight alignment*: Lemma 9 (Lemma 10 for per-layer ranks) on the block's frozen weights
//!    and the target layer `W̄_i` — the proof's eq. (14) uses `LR_{RL∧R_E}` (Lemma 11's
//!    statement writes `LR_{R∧R_E}`; the proof is what is implemented);
//! 3. *Bias alignment*: `b̂_last = b̄_i − Σ_{l} (∏_{j>l} (W_j+ΔW_j)) b̂_l`.
//!
//! The domain is described by a radius `ρ ≥ max ‖x‖₂`; the linearising bias of a layer with
//! weight `M` and input radius `ρ` is `b̂_j = ‖row_j(M)‖₂ ρ ≥ −(M z)_j` for `‖z‖ ≤ ρ`.
#![allow(non_snake_case)]

use super::linear::{lemma_10, ProductApprox};
use super::{
    add_adapters, bias_uniform, check_partition, check_square, check_vec, spectral_norm,
    uniform_partition, LowRank, SortedSvd,
};
use crate::adapter::xavier_uniform;
use crate::{ElraError, Result};
use nalgebra::{DMatrix, DVector};
use rand_chacha::ChaCha8Rng;
use std::ops::Range;

/// A width-`D` ReLU FNN with biases (§2.1); ReLU after every layer, the last included.
/// Samples are rows: `forward(X)` maps the `N×D` batch `X` row by row.
#[derive(Debug, Clone, PartialEq)]
pub struct Fnn {
    /// `W_1, …, W_L` (first layer first), each `D×D`.
    pub weights: Vec<DMatrix<f64>>,
    /// `b_1, …, b_L`, each of length `D`.
    pub biases: Vec<DVector<f64>>,
}

/// Applies `ReLU` in place.
pub(crate) fn relu_mut(m: &mut DMatrix<f64>) {
    m.apply(|x| *x = x.max(0.0));
}

/// `X Wᵀ + 1 bᵀ` for a row-sample batch.
pub(crate) fn affine(x: &DMatrix<f64>, w: &DMatrix<f64>, b: &DVector<f64>) -> DMatrix<f64> {
    let mut y = x * w.transpose();
    // Column by column: contiguous in the column-major layout (same sums as row by row).
    for (mut col, &bj) in y.column_iter_mut().zip(b.iter()) {
        col.add_scalar_mut(bj);
    }
    y
}

impl Fnn {
    /// A model from its layers. Errors: no layers, shape mismatch, non-finite entries.
    pub fn new(weights: Vec<DMatrix<f64>>, biases: Vec<DVector<f64>>) -> Result<Self> {
        let m = Fnn { weights, biases };
        m.validate()?;
        Ok(m)
    }

    /// Checks the invariants (≥ 1 layer, `D×D` weights with `D ≥ 1`, one length-`D` bias per
    /// layer, finite); every public function taking a model calls it, since the fields are
    /// public.
    pub fn validate(&self) -> Result<()> {
        let d = self
            .weights
            .first()
            .ok_or_else(|| ElraError::invalid("weights", "an FNN needs ≥ 1 layer"))?
            .nrows();
        if d == 0 {
            return Err(ElraError::invalid("weights", "width must be ≥ 1"));
        }
        if self.biases.len() != self.weights.len() {
            return Err(ElraError::invalid(
                "biases",
                format!(
                    "need one per layer ({}), got {}",
                    self.weights.len(),
                    self.biases.len()
                ),
            ));
        }
        for w in &self.weights {
            check_square("weights", w, d)?;
        }
        for b in &self.biases {
            check_vec("biases", b, d)?;
        }
        Ok(())
    }

    /// A random model: Xavier-uniform weights and `U(−1/√D, 1/√D)` biases (App. G.2, whose
    /// models are PyTorch `nn.Linear` layers with Xavier-uniform weights).
    pub fn random(d: usize, layers: usize, rng: &mut ChaCha8Rng) -> Result<Self> {
        if d == 0 || layers == 0 {
            return Err(ElraError::invalid("d/layers", "must be ≥ 1"));
        }
        let mut weights = Vec::with_capacity(layers);
        let mut biases = Vec::with_capacity(layers);
        for _ in 0..layers {
            weights.push(xavier_uniform(rng, d, d));
            biases.push(bias_uniform(d, d, rng));
        }
        Ok(Fnn { weights, biases })
    }

    /// Width `D`.
    pub fn dim(&self) -> usize {
        self.weights.first().map_or(0, |w| w.nrows())
    }

    /// Depth `L`.
    pub fn layers(&self) -> usize {
        self.weights.len()
    }

    /// `FNN_{L,D}(X)` for a batch `X` (`N×D`, rows are samples).
    pub fn forward(&self, x: &DMatrix<f64>) -> Result<DMatrix<f64>> {
        self.validate()?;
        let d = self.dim();
        if x.ncols() != d {
            return Err(ElraError::shape("x", (x.nrows(), d), x.shape()));
        }
        let mut z = x.clone();
        for (w, b) in self.weights.iter().zip(&self.biases) {
            z = affine(&z, w, b);
            relu_mut(&mut z);
        }
        Ok(z)
    }

    /// The adapted model `FNN(·; (W_l + ΔW_l), (b̂_l))` (§2.1).
    pub fn adapted(&self, adapters: &[LowRank], biases: &[DVector<f64>]) -> Result<Self> {
        self.validate()?;
        let ws = add_adapters(&self.weights, adapters, self.dim())?;
        Fnn::new(ws, biases.to_vec())
    }
}

/// What the construction did on one block `P_i` of the partition.
#[derive(Debug, Clone)]
pub struct FnnBlock {
    /// The frozen layers `P_i` (0-based) that approximate target layer `i`.
    pub layers: Range<usize>,
    /// The Lemma 9/10 result for `W̄_i` and `(W_l)_{l∈P_i}`.
    pub approx: ProductApprox,
    /// Radius of the block's input domain used for linearisation.
    pub input_radius: f64,
}

/// The adapted FNN and its parameters.
#[derive(Debug, Clone)]
pub struct FnnConstruction {
    /// `FNN(·; (W_l + ΔW_l), (b̂_l))`.
    pub model: Fnn,
    /// `ΔW_l`, one per frozen layer (first layer first), each with the layer's rank budget.
    pub adapters: Vec<LowRank>,
    /// `b̂_l`, one per frozen layer.
    pub biases: Vec<DVector<f64>>,
    /// One entry per target layer.
    pub blocks: Vec<FnnBlock>,
}

/// Theorem 15 (App. E.3; Lemma 12 per block): adapters of ranks `R_l` and biases for a general
/// ordered partition `𝒫 = (P_1, …, P_L̄)` of the frozen layers, valid on inputs with
/// `‖x‖₂ ≤ input_radius`. With `Σ_{l∈P_i} R_l ≥ rank(W̄_i − ∏_{l∈P_i} W_l)` for all `i`, the
/// adapted model equals the target on that domain.
///
/// Errors: shape mismatches, `partition` not a consecutive cover of `0..L` with `L̄` blocks,
/// `ranks.len() ≠ L`, a negative or non-finite radius, and the errors of
/// [`lemma_10`] (Assumption 2 failing).
pub fn construct_partition(
    frozen: &Fnn,
    target: &Fnn,
    partition: &[Range<usize>],
    ranks: &[usize],
    input_radius: f64,
) -> Result<FnnConstruction> {
    frozen.validate()?;
    target.validate()?;
    let d = frozen.dim();
    if target.dim() != d {
        return Err(ElraError::invalid(
            "target",
            "width differs from the frozen model's",
        ));
    }
    if partition.len() != target.layers() {
        return Err(ElraError::invalid(
            "partition",
            format!(
                "need one block per target layer ({}), got {}",
                target.layers(),
                partition.len()
            ),
        ));
    }
    check_partition(partition, frozen.layers())?;
    if ranks.len() != frozen.layers() {
        return Err(ElraError::invalid(
            "ranks",
            format!(
                "need one rank per frozen layer ({}), got {}",
                frozen.layers(),
                ranks.len()
            ),
        ));
    }
    if !(input_radius.is_finite() && input_radius >= 0.0) {
        return Err(ElraError::invalid("input_radius", "must be finite and ≥ 0"));
    }

    let mut rho = input_radius;
    let mut adapters = Vec::with_capacity(frozen.layers());
    let mut biases = Vec::with_capacity(frozen.layers());
    let mut blocks = Vec::with_capacity(partition.len());
    for (i, p) in partition.iter().enumerate() {
        let approx = lemma_10(
            &frozen.weights[p.clone()],
            &target.weights[i],
            &ranks[p.clone()],
        )?;
        // c = accumulated bias of the linearised layers: z_{last−1} = (∏M) x + c.
        let mut c = DVector::zeros(d);
        let mut r = rho;
        for (k, l) in p.clone().enumerate() {
            let M = &approx.adapted[k];
            if l + 1 < p.end {
                // Linearisation: every pre-activation M z + b̂ ≥ 0 for ‖z‖ ≤ r.
                let b = DVector::from_fn(d, |j, _| M.row(j).norm() * r);
                r = spectral_norm("adapted weight", M)? * r + b.norm();
                c = M * c + &b;
                biases.push(b);
            } else {
                // Bias alignment: the block's effective bias becomes b̄_i.
                biases.push(&target.biases[i] - M * &c);
            }
        }
        adapters.extend(approx.adapters.iter().cloned());
        blocks.push(FnnBlock {
            layers: p.clone(),
            input_radius: rho,
            approx: approx.clone(),
        });
        // Radius of the next block's input: bounds both the adapted and the target
        // intermediate output ReLU(Ŵ z + b̄_i), ReLU(W̄_i z̄ + b̄_i) (needed by Thm. 5's proof).
        let nw = spectral_norm("product", &approx.product)?
            .max(spectral_norm("target", &target.weights[i])?);
        rho = nw * rho + target.biases[i].norm();
    }
    let model = frozen.adapted(&adapters, &biases)?;
    Ok(FnnConstruction {
        model,
        adapters,
        biases,
        blocks,
    })
}

/// Theorems 3 and 5 (App. E.2; Lemma 11 per block): rank-`R` adapters on every layer and
/// updated biases for the uniform partition (`M = ⌊L/L̄⌋` frozen layers per target layer, the
/// remainder going to the last block), valid on inputs with `‖x‖₂ ≤ input_radius`.
/// With `R ≥ max_i ⌈rank(W̄_i − ∏_{l∈P_i^u} W_l)/M⌉` the adapted model equals the target
/// (Theorem 3; for random models `R ≥ D/M` suffices, Corollary 4).
///
/// Errors: `rank ∉ [1, D]`, `L < L̄`, and those of [`construct_partition`].
pub fn construct(
    frozen: &Fnn,
    target: &Fnn,
    rank: usize,
    input_radius: f64,
) -> Result<FnnConstruction> {
    frozen.validate()?;
    let d = frozen.dim();
    if rank == 0 || rank > d {
        return Err(ElraError::invalid(
            "rank",
            format!("must be in [1, D = {d}], got {rank}"),
        ));
    }
    let partition = uniform_partition(frozen.layers(), target.layers())?;
    construct_partition(
        frozen,
        target,
        &partition,
        &vec![rank; frozen.layers()],
        input_radius,
    )
}

/// The approximation-error bound of Theorem 5 / Theorem 15, in the paper's form and in a
/// corrected form that its proof actually establishes.
#[derive(Debug, Clone)]
pub struct ErrorBound {
    /// `E_i`, the per-layer approximation errors.
    pub E: Vec<f64>,
    /// `α = max_k (‖W̄_k‖_F + E_k)`.
    pub alpha: f64,
    /// Corrected `β`: `max_{0≤i<L̄} [√tr Σ · ∏_{j≤i}‖W̄_j‖_F + Σ_{j≤i} ∏_{j<k≤i}‖W̄_k‖_F ‖b̄_j‖₂]`,
    /// a bound on `max_i E‖z̄_i‖₂` over the target's block inputs.
    pub beta: f64,
    /// Corrected bound `β Σ_i α^{L̄−i} E_i` on `E‖f(x) − f̄(x)‖₂`.
    pub bound: f64,
    /// `β` exactly as printed in Theorem 5 (with `√‖Σ‖_F`).
    pub beta_paper: f64,
    /// The bound with `beta_paper`.
    pub bound_paper: f64,
}

/// Theorem 5's bound for the uniform partition and LoRA-rank `R`:
/// `E_i = σ_{RM+1}(W̄_i − ∏_{l∈P_i^u} W_l)`, `E‖f(x) − f̄(x)‖₂ ≤ β Σ_i α^{L̄−i} E_i`.
///
/// Erratum (documented in [`ErrorBound`]): the proof bounds `E‖x‖₂` by `√‖Σ‖_F`, but Jensen
/// gives `E‖x‖₂ ≤ √E‖x‖² = √tr Σ ≥ √‖Σ‖_F`; e.g. for `x ~ N(0, I_D)`, `E‖x‖ ≈ √D` while
/// `√‖Σ‖_F = D^{1/4}`. The field `bound` uses `√tr Σ` (and the products of the proof, with
/// `‖Ŵ_i‖₂ ≤ ‖W̄_i‖_F + E_i` in step (18)); `bound_paper` is the printed formula.
/// `sigma` is `Σ = E[x xᵀ]` (`D×D`).
///
/// Errors: `rank ∉ [1, D]`, `L < L̄`, shape/finiteness errors.
pub fn theorem_5_bound(
    frozen: &Fnn,
    target: &Fnn,
    rank: usize,
    sigma: &DMatrix<f64>,
) -> Result<ErrorBound> {
    frozen.validate()?;
    target.validate()?;
    let d = frozen.dim();
    if rank == 0 || rank > d {
        return Err(ElraError::invalid(
            "rank",
            format!("must be in [1, D = {d}], got {rank}"),
        ));
    }
    let partition = uniform_partition(frozen.layers(), target.layers())?;
    let m = frozen.layers() / target.layers();
    let mut E = Vec::with_capacity(partition.len());
    for (i, p) in partition.iter().enumerate() {
        let disc = &target.weights[i] - super::product(&frozen.weights[p.clone()], d)?;
        E.push(SortedSvd::new("discrepancy", &disc)?.sigma_1based(rank * m + 1));
    }
    bound_from_errors(target, E, sigma)
}

/// Theorem 15's bound for a general partition and per-layer ranks:
/// `E_i = σ_{Σ_{l∈P_i} R_l + 1}(W̄_i − ∏_{l∈P_i} W_l)`; otherwise as [`theorem_5_bound`]
/// (same erratum).
///
/// Errors: malformed partition or ranks, shape/finiteness errors.
pub fn theorem_15_bound(
    frozen: &Fnn,
    target: &Fnn,
    partition: &[Range<usize>],
    ranks: &[usize],
    sigma: &DMatrix<f64>,
) -> Result<ErrorBound> {
    frozen.validate()?;
    target.validate()?;
    let d = frozen.dim();
    if partition.len() != target.layers() {
        return Err(ElraError::invalid(
            "partition",
            "need one block per target layer",
        ));
    }
    check_partition(partition, frozen.layers())?;
    if ranks.len() != frozen.layers() {
        return Err(ElraError::invalid(
            "ranks",
            "need one rank per frozen layer",
        ));
    }
    let mut E = Vec::with_capacity(partition.len());
    for (i, p) in partition.iter().enumerate() {
        let disc = &target.weights[i] - super::product(&frozen.weights[p.clone()], d)?;
        let r: usize = ranks[p.clone()].iter().sum();
        E.push(SortedSvd::new("discrepancy", &disc)?.sigma_1based(r + 1));
    }
    bound_from_errors(target, E, sigma)
}

fn bound_from_errors(target: &Fnn, E: Vec<f64>, sigma: &DMatrix<f64>) -> Result<ErrorBound> {
    let d = target.dim();
    check_square("sigma", sigma, d)?;
    let lbar = target.layers();
    let fro: Vec<f64> = target.weights.iter().map(|w| w.norm()).collect();
    let bn: Vec<f64> = target.biases.iter().map(|b| b.norm()).collect();
    let alpha = fro.iter().zip(&E).map(|(f, e)| f + e).fold(0.0, f64::max);
    let tr = sigma.trace().max(0.0).sqrt();
    let fr = sigma.norm().sqrt();
    // Corrected: bound on E‖z̄_i‖ for i = 0..L̄−1 (z̄_0 = x), by the recursion of the proof.
    let mut beta = tr;
    let mut z = tr;
    for i in 0..lbar.saturating_sub(1) {
        z = fro[i] * z + bn[i];
        beta = beta.max(z);
    }
    // As printed: max_{i∈[L̄]} (√‖Σ‖_F ∏_{j=1}^i ‖W̄_j‖_F + Σ_{j=1}^i ∏_{k=j+1}^{i−1} ‖W̄_k‖_F ‖b̄_j‖) ∨ √‖Σ‖_F.
    let mut beta_paper = fr;
    for i in 1..=lbar {
        let p: f64 = fro[..i].iter().product();
        let mut s = 0.0;
        for j in 1..=i {
            let q: f64 = if j < i {
                fro[j..i - 1].iter().product()
            } else {
                1.0
            };
            s += q * bn[j - 1];
        }
        beta_paper = beta_paper.max(fr * p + s);
    }
    let sum: f64 = E
        .iter()
        .enumerate()
        .map(|(i, e)| alpha.powi((lbar - 1 - i) as i32) * e)
        .sum();
    Ok(ErrorBound {
        alpha,
        beta,
        bound: beta * sum,
        beta_paper,
        bound_paper: beta_paper * sum,
        E,
    })
}
