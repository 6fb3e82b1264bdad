//! App. D — linear models: Lemma 9 (uniform LoRA-rank) and Lemma 10 (per-layer ranks).
//!
//! Given frozen `W_1, …, W_L` and a target `W̄`, with `E = W̄ − ∏W_l` and SVD `E = U D Vᵀ`, the
//! proof of Lemma 9 takes `E' = LR_{RL∧R_E}(E)`, splits it as `E' = Σ_l E' Q_l` with
//! `Q_l = V I_{[R(l−1), Rl) ∩ [0, R_{E'})} Vᵀ` (eq. 11), and sets (eq. 8)
//!
//! `ΔW_l = (∏_{i>l} W_i)⁻¹ E' Q_l (∏_{i<l} (W_i + ΔW_i))⁻¹`.
//!
//! Then `∏(W_l + ΔW_l) = ∏W_l + E'` (eq. 5) and `‖∏(W_l+ΔW_l) − W̄‖₂ = σ_{RL+1}(E)`.
//! Since `E' Q_l = Σ_{i∈S_l} σ_i u_i v_iᵀ`, each adapter comes out factored:
//! `B_l = (∏_{i>l}W_i)⁻¹ U_S D_S`, `A_l = V_Sᵀ (∏_{i<l}(W_i+ΔW_i))⁻¹`.
#![allow(non_snake_case)]

use super::{
    add_adapters, check_square, product, uniform_partition, CheckedLu, LowRank, SortedSvd,
};
use crate::adapter::xavier_uniform;
use crate::{ElraError, Result};
use nalgebra::{DMatrix, DVector};
use rand_chacha::ChaCha8Rng;

/// A deep linear model `f(x) = W_L ⋯ W_1 x` (App. D). Samples are rows: `forward(X) = X (W_L⋯W_1)ᵀ`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearModel {
    /// `W_1, …, W_L` (first layer first), each `D×D`.
    pub weights: Vec<DMatrix<f64>>,
}

impl LinearModel {
    /// A model from its layers (first layer first). Errors: no layers, non-square or mismatched
    /// shapes, non-finite entries.
    pub fn new(weights: Vec<DMatrix<f64>>) -> Result<Self> {
        let m = LinearModel { weights };
        m.validate()?;
        Ok(m)
    }

    /// Checks the invariants (≥ 1 layer, all `D×D` with `D ≥ 1`, finite); every public function
    /// taking a model calls it, since the fields are public.
    pub fn validate(&self) -> Result<()> {
        let d = self
            .weights
            .first()
            .ok_or_else(|| ElraError::invalid("weights", "a linear model needs ≥ 1 layer"))?
            .nrows();
        if d == 0 {
            return Err(ElraError::invalid("weights", "width must be ≥ 1"));
        }
        for w in &self.weights {
            check_square("weights", w, d)?;
        }
        Ok(())
    }

    /// A random model with i.i.d. Xavier-uniform layers (App. G.1, "Random").
    pub fn random(d: usize, layers: usize, rng: &mut ChaCha8Rng) -> Result<Self> {
        if d == 0 || layers == 0 {
            return Err(ElraError::invalid("d/layers", "must be ≥ 1"));
        }
        Ok(LinearModel {
            weights: (0..layers).map(|_| xavier_uniform(rng, d, d)).collect(),
        })
    }

    /// Width `D`.
    pub fn dim(&self) -> usize {
        self.weights.first().map_or(0, |w| w.nrows())
    }

    /// Depth `L`.
    pub fn layers(&self) -> usize {
        self.weights.len()
    }

    /// `∏_{l=1}^L W_l = W_L ⋯ W_1`. Errors: an invalid model.
    pub fn product(&self) -> Result<DMatrix<f64>> {
        self.validate()?;
        product(&self.weights, self.dim())
    }

    /// `X ↦ X (W_L⋯W_1)ᵀ` for a batch `X` (`N×D`, rows are samples).
    pub fn forward(&self, x: &DMatrix<f64>) -> Result<DMatrix<f64>> {
        self.validate()?;
        let d = self.dim();
        if x.ncols() != d {
            return Err(ElraError::shape("x", (x.nrows(), d), x.shape()));
        }
        let mut y = x.clone();
        for w in &self.weights {
            y = &y * w.transpose();
        }
        Ok(y)
    }

    /// The model with `W_l + ΔW_l` for each layer (`adapters[l]` is `ΔW_{l+1}`).
    pub fn adapted(&self, adapters: &[LowRank]) -> Result<Self> {
        self.validate()?;
        let ws = add_adapters(&self.weights, adapters, self.dim())?;
        LinearModel::new(ws)
    }
}

/// Result of the Lemma 9 / Lemma 10 construction for one product of frozen matrices.
#[derive(Debug, Clone)]
pub struct ProductApprox {
    /// `ΔW_l = B_l A_l` for `l = 1..L` (first layer first), each factored with exactly `R_l`
    /// columns (zero-padded when fewer singular triplets are assigned to the layer).
    pub adapters: Vec<LowRank>,
    /// `W_l + ΔW_l`, first layer first.
    pub adapted: Vec<DMatrix<f64>>,
    /// `∏_l (W_l + ΔW_l)`.
    pub product: DMatrix<f64>,
    /// `∏W_l + LR_{(ΣR_l)∧R_E}(E)`: what the lemma says the product equals (eq. 5).
    pub predicted_product: DMatrix<f64>,
    /// Achieved spectral-norm error `‖∏(W_l+ΔW_l) − W̄‖₂`.
    pub error: f64,
    /// The lemma's value of that error, `σ_{ΣR_l+1}(E)` (0 when `ΣR_l ≥ D`).
    pub predicted_error: f64,
    /// Numerical rank `R_E` of `E = W̄ − ∏W_l`.
    pub rank_e: usize,
    /// Singular values of `E`, decreasing.
    pub sigma_e: DVector<f64>,
}

/// Lemma 9 (App. D): rank-`R` adapters for every layer so that
/// `∏(W_l + ΔW_l) = ∏W_l + LR_{RL∧R_E}(W̄ − ∏W_l)`, built exactly as in the proof (SVD of `E`,
/// the `Q_l` split of eq. 11, `ΔW_l` from eq. 8). `frozen` is `W_1, …, W_L`, first layer first.
///
/// Errors: `rank ∉ [1, D]`, shape/finiteness errors, and [`ElraError::Numerical`] when an inverse
/// the construction needs does not exist — `W_2, …, W_L` or `W_l + ΔW_l` for `l < L` (the
/// lemma's assumption that `∏W_l + LR_r(E)` is non-singular for `r ≤ R(L−1)`; Lemma 8 says
/// random matrices satisfy it with probability 1).
pub fn lemma_9(
    frozen: &[DMatrix<f64>],
    target: &DMatrix<f64>,
    rank: usize,
) -> Result<ProductApprox> {
    let d = target.nrows();
    if rank == 0 || rank > d {
        return Err(ElraError::invalid(
            "rank",
            format!("must be in [1, D = {d}], got {rank}"),
        ));
    }
    lemma_10(frozen, target, &vec![rank; frozen.len()])
}

/// Lemma 10 (App. D): per-layer ranks `R_l`; `Q_l = V I_{[Σ_{i<l}R_i, Σ_{i≤l}R_i) ∩ [0,R_{E'})} Vᵀ`
/// and `ΔW_l` from eq. (8), so that `∏(W_l + ΔW_l) = ∏W_l + LR_{(ΣR_l)∧R_E}(E)` and the
/// spectral error is `σ_{ΣR_l+1}(E)`.
///
/// Errors: as [`lemma_9`]; `ranks.len() ≠ L`, any `R_l > D` (`R_l = 0` is allowed: that layer
/// keeps its frozen weight).
pub fn lemma_10(
    frozen: &[DMatrix<f64>],
    target: &DMatrix<f64>,
    ranks: &[usize],
) -> Result<ProductApprox> {
    let d = target.nrows();
    if d == 0 {
        return Err(ElraError::invalid("target", "empty matrix"));
    }
    check_square("target", target, d)?;
    let L = frozen.len();
    if L == 0 {
        return Err(ElraError::invalid("frozen", "needs ≥ 1 layer"));
    }
    for w in frozen {
        check_square("frozen", w, d)?;
    }
    if ranks.len() != L {
        return Err(ElraError::invalid(
            "ranks",
            format!("need one rank per layer ({L}), got {}", ranks.len()),
        ));
    }
    if let Some(&r) = ranks.iter().find(|&&r| r > d) {
        return Err(ElraError::invalid(
            "ranks",
            format!("R_l = {r} exceeds D = {d}"),
        ));
    }

    let p0 = product(frozen, d)?;
    let E = target - &p0;
    let svd = SortedSvd::new("E", &E)?;
    let rank_e = svd.numerical_rank();
    let total: usize = ranks.iter().sum();
    let r_ep = total.min(rank_e);

    // Factorisations of W_2..W_L (0-based 1..L): (∏_{i>l} W_i)⁻¹ = W_{l+1}⁻¹ ⋯ W_L⁻¹.
    let mut lu_w: Vec<Option<CheckedLu>> = Vec::with_capacity(L);
    for (l, w) in frozen.iter().enumerate() {
        if l == 0 {
            lu_w.push(None);
        } else {
            lu_w.push(Some(CheckedLu::new(
                "frozen",
                &format!(
                    "frozen weight W_{} (Lemma 9 assumes every W_l non-singular)",
                    l + 1
                ),
                w,
            )?));
        }
    }

    let mut adapters = Vec::with_capacity(L);
    let mut adapted = Vec::with_capacity(L);
    let mut lu_m: Vec<CheckedLu> = Vec::with_capacity(L);
    let mut offset = 0usize;
    for l in 0..L {
        let lo = offset.min(r_ep);
        let hi = (offset + ranks[l]).min(r_ep);
        offset += ranks[l];
        let (US, VS) = svd.triplets(lo..hi);
        // B_l = (W_L ⋯ W_{l+1})⁻¹ U_S D_S: apply W_L⁻¹ first.
        let mut B = US;
        for lu in lu_w[l + 1..].iter().rev() {
            B = lu.as_ref().expect("W_l factorised for l ≥ 2").solve(&B)?;
        }
        // A_lᵀ = (M_{l−1} ⋯ M_1)⁻ᵀ V_S = M_{l−1}⁻ᵀ ⋯ M_1⁻ᵀ V_S: apply M_1⁻ᵀ first.
        let mut At = VS;
        for lu in &lu_m[..l] {
            At = lu.solve_transpose(&At)?;
        }
        let ad = LowRank {
            B,
            A: At.transpose(),
        }
        .padded(ranks[l]);
        let m = &frozen[l] + ad.dense()?;
        if l + 1 < L {
            lu_m.push(CheckedLu::new(
                "frozen",
                &format!(
                    "W_{} + ΔW_{} (eq. 10; Lemma 9 assumes ∏W_l + LR_r(E) non-singular for r ≤ {})",
                    l + 1,
                    l + 1,
                    ranks[..L - 1].iter().sum::<usize>()
                ),
                &m,
            )?);
        }
        adapters.push(ad);
        adapted.push(m);
    }
    let prod = product(&adapted, d)?;
    let predicted_product = &p0 + svd.low_rank(r_ep);
    let error = super::spectral_norm("product", &(&prod - target))?;
    Ok(ProductApprox {
        adapters,
        adapted,
        product: prod,
        predicted_product,
        error,
        predicted_error: svd.sigma_1based(total + 1),
        rank_e,
        sigma_e: svd.sigma.clone(),
    })
}

/// Adapters for a deep linear frozen model and a linear target, with the frozen layers split by
/// the uniform partition (one Lemma 9 per target layer; App. D with `L̄ = 1`, App. E.2's
/// partition for `L̄ > 1`).
#[derive(Debug, Clone)]
pub struct LinearConstruction {
    /// The adapted model `(W_l + ΔW_l)_l`.
    pub model: LinearModel,
    /// `ΔW_l`, one per frozen layer, first layer first.
    pub adapters: Vec<LowRank>,
    /// One Lemma 9 result per target layer.
    pub blocks: Vec<ProductApprox>,
}

/// Maps (frozen, target, rank) to the adapted model and its adapters: Lemma 9 on each block of
/// the uniform partition (for `L̄ = 1`, exactly Lemma 9 on the whole model).
///
/// Errors: `target.layers() > frozen.layers()`, width mismatch, and the errors of [`lemma_9`].
pub fn construct(
    frozen: &LinearModel,
    target: &LinearModel,
    rank: usize,
) -> Result<LinearConstruction> {
    frozen.validate()?;
    target.validate()?;
    if frozen.dim() != target.dim() {
        return Err(ElraError::invalid(
            "target",
            "width differs from the frozen model's",
        ));
    }
    let partition = uniform_partition(frozen.layers(), target.layers())?;
    let mut adapters = Vec::with_capacity(frozen.layers());
    let mut blocks = Vec::with_capacity(partition.len());
    for (i, p) in partition.iter().enumerate() {
        let b = lemma_9(&frozen.weights[p.clone()], &target.weights[i], rank)?;
        adapters.extend(b.adapters.iter().cloned());
        blocks.push(b);
    }
    let model = frozen.adapted(&adapters)?;
    Ok(LinearConstruction {
        model,
        adapters,
        blocks,
    })
}
