//! Adapters on the CPU: ELRA (single- and double-sided) and the LoRA baseline.
//!
//! * [`generator`]: low-rank generators `G = A·C` (eq. 2, §4.2.1, eq. 19), their norms from
//!   r×r quantities (eq. 21), the spectral clip (App. H) and the Woodbury action of `exp(G)`
//!   (Prop. 1).
//! * [`schedule`]: the α gate of ELRA-Hyb (App. H eq. 75, App. K) and the η multiplier.
//! * [`layer`]: [`ElraLayer`], `W_new = exp(G) W0` (eq. 3) evaluated as in eq. (5) /
//!   Algorithm 1, with exact merge/unmerge and the inference cache of App. H.
//! * [`double`]: the double-sided variant `exp(L) W0 exp(R)` (App. B, eq. 22–26).
//! * [`lora`]: [`LoraLayer`], PEFT-style LoRA `W0 + (α/r)·B'A'` for comparison.
//!
//! All adapters implement [`Adapter`]. Conventions: `W0` is d×k (out×in), a batch `X` is N×k
//! with samples as rows, and the output is `Y = X W_newᵀ` (N×d).

pub mod double;
pub mod generator;
pub mod layer;
pub mod lora;
pub mod schedule;

pub use double::{DoubleSidedConfig, DoubleSidedLayer};
pub use generator::{
    clip_scale, energy_eq21, frobenius_sq_from_grams, generator_factor, spectral_norm_from_grams,
    ExpAction, LowRankGenerator, Variant,
};
pub use layer::{ElraConfig, ElraLayer, ForwardCache, GeneratorEval, InferenceCache};
pub use lora::{LoraConfig, LoraInit, LoraLayer};
pub use schedule::{eta_cosine_multiplier, AlphaSchedule, EtaMultiplier};

use nalgebra::DMatrix;
use rand::Rng;

use crate::linalg::{check_finite, Real};
use crate::{ElraError, Result};

/// The interface shared by ELRA, double-sided ELRA and LoRA, so that they can be compared on
/// the same frozen layer.
pub trait Adapter<T: Real> {
    /// A short name: `"elra"`, `"elra-psd"`, `"elra-hyb"`, `"elra-double"`, `"lora"`.
    fn name(&self) -> &'static str;

    /// `(d, k)`: the frozen weight is d×k (out×in).
    fn dims(&self) -> (usize, usize);

    /// The frozen weight `W0` (d×k).
    fn w0(&self) -> &DMatrix<T>;

    /// `Y = X W_newᵀ` for a batch `X` (N×k, samples as rows) without forming `W_new`
    /// (ELRA: eq. 5 / Algorithm 1 lines 7–8; LoRA: `y = W0x + (α/r)B'A'x`).
    fn forward(&self, x: &DMatrix<T>) -> Result<DMatrix<T>>;

    /// The merged weight `W_new` (d×k) (ELRA: eq. 30; LoRA: `W0 + (α/r)B'A'`).
    fn merge(&self) -> Result<DMatrix<T>>;

    /// Recovers `W0` from a merged weight with the adapter's current parameters
    /// (ELRA: `exp(−G) W_new`, Prop. 3; LoRA: `W_new − (α/r)B'A'`).
    fn unmerge(&self, w_new: &DMatrix<T>) -> Result<DMatrix<T>>;

    /// Trainable matrix entries: `2rd` (ELRA, ELRA-Hyb), `rd` (ELRA-PSD), `r(d+k)` (LoRA),
    /// Remark 1.
    fn param_count(&self) -> usize;

    /// Trainable scalars besides the matrices: the step size η of ELRA (one per generator,
    /// App. I), none for LoRA.
    fn scalar_param_count(&self) -> usize;

    /// `param_count() + scalar_param_count()`.
    fn total_param_count(&self) -> usize {
        self.param_count() + self.scalar_param_count()
    }
}

/// Checks a batch `x` (N×k, finite) against the layer's input width `k`.
pub(crate) fn check_batch<T: Real>(x: &DMatrix<T>, k: usize) -> Result<()> {
    if x.ncols() != k {
        return Err(ElraError::shape("x", (x.nrows(), k), x.shape()));
    }
    check_finite("x", x)
}

/// Checks a d×k weight argument.
pub(crate) fn check_weight<T: Real>(
    arg: &'static str,
    w: &DMatrix<T>,
    d: usize,
    k: usize,
) -> Result<()> {
    if w.shape() != (d, k) {
        return Err(ElraError::shape(arg, (d, k), w.shape()));
    }
    check_finite(arg, w)
}

/// Checks dimensions `d`, `k` ≥ 1 and `1 ≤ r ≤ limit`.
pub(crate) fn check_dims(
    d: usize,
    k: usize,
    r: usize,
    r_arg: &'static str,
    limit: usize,
) -> Result<()> {
    if d == 0 {
        return Err(ElraError::invalid("d", "must be at least 1"));
    }
    if k == 0 {
        return Err(ElraError::invalid("k", "must be at least 1"));
    }
    if r == 0 {
        return Err(ElraError::invalid(
            r_arg,
            "the rank must be at least 1 (got 0)",
        ));
    }
    if r > limit {
        return Err(ElraError::invalid(
            r_arg,
            format!("the rank {r} exceeds the generator dimension {limit}"),
        ));
    }
    Ok(())
}

/// Xavier/Glorot-uniform matrix (Glorot & Bengio 2010; PyTorch `xavier_uniform_`): entries
/// uniform in `±sqrt(6/(fan_in + fan_out))` with `fan_out = rows`, `fan_in = cols`. App. H uses
/// it for the trainable low-rank factors.
pub fn xavier_uniform<T: Real, R: Rng + ?Sized>(
    rng: &mut R,
    rows: usize,
    cols: usize,
) -> DMatrix<T> {
    let bound = (6.0 / (rows + cols).max(1) as f64).sqrt();
    DMatrix::from_fn(rows, cols, |_, _| T::of(rng.random_range(-bound..=bound)))
}

/// Kaiming-uniform matrix with `a = √5` as PyTorch's `nn.Linear` and PEFT's `lora_A` use:
/// entries uniform in `±1/sqrt(fan_in)` with `fan_in = cols`.
pub fn kaiming_uniform<T: Real, R: Rng + ?Sized>(
    rng: &mut R,
    rows: usize,
    cols: usize,
) -> DMatrix<T> {
    let bound = 1.0 / (cols.max(1) as f64).sqrt();
    DMatrix::from_fn(rows, cols, |_, _| T::of(rng.random_range(-bound..=bound)))
}
