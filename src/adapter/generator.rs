//! Low-rank generators `G = A·C` and the Woodbury action of `exp(G)`.
//!
//! Every ELRA generator is stored as two thin factors, `A` (d×r) and `C` (r×d); no d×d matrix
//! is ever formed on this path:
//!
//! * general ELRA (eq. 2): `C = ηB`;
//! * ELRA-PSD (§4.2.1): `C = ηAᵀ`;
//! * ELRA-Hyb (eq. 19, Algorithm 1 line 4): `C = η(αAᵀ + (1−α)B)`, α decaying 1 → 0.
//!
//! The matrix exponential acts through Proposition 1 (eq. 4, App. C eq. 28–30):
//! `exp(A C) = I + A φ1(C A) C`, so only the r×r matrix `Z = C A` goes through a matrix
//! function ([`crate::linalg::phi1`]). Norms of `G` come from r×r quantities too: the
//! Frobenius norm from the Grams `AᵀA`, `CCᵀ` (eq. 21) and the spectral norm from the
//! triangular factors of thin QR decompositions of `A` and `Cᵀ`.
#![allow(non_snake_case)]

use nalgebra::{DMatrix, SymmetricEigen, QR};

use super::config::{check_alpha, check_eta, check_lambda, check_tau};
use crate::linalg::{check_finite, Real};
use crate::{ElraError, Result};

/// Which generator family an ELRA layer uses (eq. 2, §4.2.1, eq. 19). Serialised (adapter
/// files) as `"general"`, `"psd"`, `"hyb"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// General ELRA, `G = ηAB` (eq. 2): `A` d×r and `B` r×d are trained, `2rd` parameters.
    General,
    /// ELRA-PSD, `G = ηAAᵀ` (§4.2.1): only `A` is trained, `rd` parameters.
    Psd,
    /// ELRA-Hyb, `G = η(αAAᵀ + (1−α)AB)` (eq. 19) with α decaying from 1 to 0: `2rd` parameters.
    Hyb,
}

impl Variant {
    /// `"elra"`, `"elra-psd"` or `"elra-hyb"`.
    pub fn name(self) -> &'static str {
        match self {
            Variant::General => "elra",
            Variant::Psd => "elra-psd",
            Variant::Hyb => "elra-hyb",
        }
    }

    /// Whether the variant has the second factor `B` (eq. 2 and eq. 19 do, §4.2.1 does not).
    pub fn uses_b(self) -> bool {
        !matches!(self, Variant::Psd)
    }

    /// α of eq. (19) at `step`: 0 for general ELRA, 1 for PSD, the schedule's value (eq. 75) for
    /// Hyb.
    pub fn alpha_at(self, schedule: &crate::adapter::AlphaSchedule, step: usize) -> f64 {
        match self {
            Variant::General => 0.0,
            Variant::Psd => 1.0,
            Variant::Hyb => schedule.alpha(step),
        }
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Variant {
    type Err = ElraError;
    /// Parses `elra`/`general`, `elra-psd`/`psd`, `elra-hyb`/`hyb` (case-insensitive).
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "elra" | "general" => Ok(Variant::General),
            "elra-psd" | "psd" => Ok(Variant::Psd),
            "elra-hyb" | "hyb" | "hybrid" => Ok(Variant::Hyb),
            other => Err(ElraError::invalid(
                "variant",
                format!("unknown variant `{other}` (expected elra, elra-psd or elra-hyb)"),
            )),
        }
    }
}

/// Checks that `a` is a valid left factor `A` (d×r, 1 ≤ r ≤ d, finite) and returns `(d, r)`.
pub(crate) fn check_left_factor<T: Real>(
    arg: &'static str,
    a: &DMatrix<T>,
) -> Result<(usize, usize)> {
    let (d, r) = a.shape();
    if d == 0 {
        return Err(ElraError::invalid(
            arg,
            "the dimension d must be at least 1",
        ));
    }
    if r == 0 {
        return Err(ElraError::invalid(
            arg,
            "the rank r must be at least 1 (got r = 0)",
        ));
    }
    if r > d {
        return Err(ElraError::invalid(
            arg,
            format!("the rank r = {r} exceeds the dimension d = {d}"),
        ));
    }
    check_finite(arg, a)?;
    Ok((d, r))
}

/// The right factor `C` of `G = A·C` for a variant (eq. 2, §4.2.1, eq. 19 / Algorithm 1 line 4):
/// general `C = ηB`, PSD `C = ηAᵀ`, Hyb `C = η(αAᵀ + (1−α)B)`.
///
/// `b` is required (r×d) for `General` and `Hyb` and ignored for `Psd`. `alpha` is used by
/// `Hyb` only and must lie in [0, 1]. Errors name the argument: `a` (shape, r = 0, r > d,
/// non-finite), `b`, `eta` (must be finite and > 0), `alpha`.
pub fn generator_factor<T: Real>(
    variant: Variant,
    a: &DMatrix<T>,
    b: Option<&DMatrix<T>>,
    eta: T,
    alpha: f64,
) -> Result<DMatrix<T>> {
    let (d, r) = check_left_factor("a", a)?;
    check_eta(eta)?;
    let need_b = || -> Result<&DMatrix<T>> {
        let b = b.ok_or_else(|| {
            ElraError::invalid("b", format!("variant {variant} needs the factor B (r×d)"))
        })?;
        if b.shape() != (r, d) {
            return Err(ElraError::shape("b", (r, d), b.shape()));
        }
        check_finite("b", b)?;
        Ok(b)
    };
    match variant {
        Variant::General => Ok(need_b()? * eta),
        Variant::Psd => Ok(a.transpose() * eta),
        Variant::Hyb => {
            check_alpha(alpha)?;
            let b = need_b()?;
            Ok(crate::grad::generator::mix_factor(a, Some(b), alpha) * eta)
        }
    }
}

/// The clip factor of App. H: `min(1, τ/‖G‖₂)` (1 when `‖G‖₂ ≤ τ`, including `G = 0`).
///
/// Errors: `tau` not finite and > 0; `norm` negative or non-finite.
pub fn clip_scale(norm: f64, tau: f64) -> Result<f64> {
    check_tau(tau)?;
    if !norm.is_finite() || norm < 0.0 {
        return Err(ElraError::invalid(
            "norm",
            format!("a spectral norm must be finite and ≥ 0, got {norm}"),
        ));
    }
    Ok(if norm > tau { tau / norm } else { 1.0 })
}

/// A low-rank generator `G = A·C` with `A` d×r and `C` r×d, held as its two factors.
///
/// Invariants (checked by the constructors): `1 ≤ r ≤ d`, shapes agree, all entries finite.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRankGenerator<T: Real> {
    a: DMatrix<T>,
    c: DMatrix<T>,
}

impl<T: Real> LowRankGenerator<T> {
    /// `G = A·C` from its factors (Prop. 1 notation). Errors: `a` (r = 0, r > d, non-finite),
    /// `c` (shape not r×d, non-finite).
    pub fn new(a: DMatrix<T>, c: DMatrix<T>) -> Result<Self> {
        let (d, r) = check_left_factor("a", &a)?;
        if c.shape() != (r, d) {
            return Err(ElraError::shape("c", (r, d), c.shape()));
        }
        check_finite("c", &c)?;
        Ok(LowRankGenerator { a, c })
    }

    /// The generator of a variant: `C` from [`generator_factor`] (eq. 2, §4.2.1, eq. 19).
    pub fn from_variant(
        variant: Variant,
        a: &DMatrix<T>,
        b: Option<&DMatrix<T>>,
        eta: T,
        alpha: f64,
    ) -> Result<Self> {
        let c = generator_factor(variant, a, b, eta, alpha)?;
        LowRankGenerator::new(a.clone(), c)
    }

    /// The left factor `A` (d×r).
    pub fn a(&self) -> &DMatrix<T> {
        &self.a
    }

    /// The right factor `C` (r×d).
    pub fn c(&self) -> &DMatrix<T> {
        &self.c
    }

    /// `(A, C)`.
    pub fn into_parts(self) -> (DMatrix<T>, DMatrix<T>) {
        (self.a, self.c)
    }

    /// The dimension `d` of the square generator.
    pub fn dim(&self) -> usize {
        self.a.nrows()
    }

    /// The factor rank `r`.
    pub fn rank(&self) -> usize {
        self.a.ncols()
    }

    /// `Z = C·A` (r×r), the matrix whose φ1 gives the Woodbury core (Prop. 1, eq. 4).
    pub fn z(&self) -> DMatrix<T> {
        &self.c * &self.a
    }

    /// `tr G = tr(C A)`; `det exp(G) = exp(tr G)` (Prop. 3).
    pub fn trace(&self) -> T {
        self.z().trace()
    }

    /// The Grams `(S, P) = (AᵀA, CCᵀ)`, both r×r (eq. 21).
    pub fn grams(&self) -> (DMatrix<T>, DMatrix<T>) {
        (self.a.tr_mul(&self.a), &self.c * self.c.transpose())
    }

    /// `‖G‖²_F = tr((AᵀA)(CCᵀ))` from the r×r Grams only (eq. 21c, written for any `G = AC`).
    pub fn frobenius_norm_sq(&self) -> T {
        let (s, p) = self.grams();
        frobenius_sq_from_grams_unchecked(&s, &p)
    }

    /// `‖G‖₂`, the largest singular value of `G = A C`, without forming `G`.
    ///
    /// Method: thin Householder QR `A = Q_A R_A`, `Cᵀ = Q_C R_C` (O(dr²)), so that
    /// `G = Q_A (R_A R_Cᵀ) Q_Cᵀ` and `‖G‖₂ = σ_max(R_A R_Cᵀ)`, the square root of the largest
    /// eigenvalue of the r×r symmetric `K Kᵀ`, `K = R_A R_Cᵀ`. This equals
    /// `sqrt(λ_max((AᵀA)(CCᵀ)))` (eq. 21's Grams: `AᵀA = R_AᵀR_A`, `CCᵀ = R_CᵀR_C`) but never
    /// squares the factors: only the final r×r `K` is squared, which leaves its largest
    /// singular value accurate to ~u, whereas the Grams of nearly rank-deficient factors lose
    /// digits before the eigenproblem starts.
    pub fn spectral_norm(&self) -> Result<T> {
        let ra = QR::new(self.a.clone()).r();
        let rc = QR::new(self.c.transpose()).r();
        let k = &ra * rc.transpose();
        largest_singular_value(k)
    }

    /// The energy penalty `λ‖G‖²_F = λ tr(GᵀG)` (eq. 20, §4.2.1), from Grams (eq. 21).
    ///
    /// Errors: `lambda` negative or non-finite.
    pub fn energy_penalty(&self, lambda: f64) -> Result<T> {
        check_lambda(lambda)?;
        Ok(self.frobenius_norm_sq() * T::of(lambda))
    }

    /// `s·G = A (sC)`.
    pub fn scaled(&self, s: T) -> Self {
        LowRankGenerator {
            a: self.a.clone(),
            c: &self.c * s,
        }
    }

    /// `−G = A (−C)`.
    pub fn neg(&self) -> Self {
        self.scaled(-T::one())
    }

    /// Spectral clip (App. H): if `‖G‖₂ > τ` the generator is rescaled to `(τ/‖G‖₂) G`
    /// (by scaling `C`). Returns the clipped generator, the factor `min(1, τ/‖G‖₂)` and
    /// `‖G‖₂` before clipping. Errors: `tau` not finite and > 0.
    pub fn clipped(&self, tau: f64) -> Result<(Self, T, T)> {
        check_tau(tau)?;
        let norm = self.spectral_norm()?;
        let s = T::of(clip_scale(norm.f64(), tau)?);
        let g = if s < T::one() {
            self.scaled(s)
        } else {
            self.clone()
        };
        Ok((g, s, norm))
    }

    /// The action of `exp(G)` through Prop. 1: computes `Z = CA` and `M = φ1(Z)`.
    pub fn exp_action(&self) -> Result<ExpAction<T>> {
        ExpAction::new(self.clone())
    }
}

/// `tr(S P)` for symmetric `S`, `P`, clamped at 0 (both PSD in use).
fn frobenius_sq_from_grams_unchecked<T: Real>(s: &DMatrix<T>, p: &DMatrix<T>) -> T {
    let v = s.dot(p);
    if v < T::zero() {
        T::zero()
    } else {
        v
    }
}

fn check_grams<T: Real>(s: &DMatrix<T>, p: &DMatrix<T>) -> Result<usize> {
    let r = s.nrows();
    if r == 0 || !s.is_square() {
        return Err(ElraError::invalid(
            "s",
            format!(
                "must be a non-empty square r×r Gram, got {}×{}",
                s.nrows(),
                s.ncols()
            ),
        ));
    }
    if p.shape() != (r, r) {
        return Err(ElraError::shape("p", (r, r), p.shape()));
    }
    check_finite("s", s)?;
    check_finite("p", p)?;
    Ok(r)
}

/// `‖G‖²_F = tr(S P)` from the Grams `S = AᵀA`, `P = CCᵀ` of `G = AC` (eq. 21c).
///
/// Errors: shapes (`s` r×r, `p` r×r), non-finite entries.
pub fn frobenius_sq_from_grams<T: Real>(s: &DMatrix<T>, p: &DMatrix<T>) -> Result<T> {
    check_grams(s, p)?;
    Ok(frobenius_sq_from_grams_unchecked(s, p))
}

/// `‖G‖₂ = sqrt(λ_max(S P))` from the Grams `S = AᵀA`, `P = CCᵀ` alone (eq. 21's r×r
/// quantities), for callers that hold only the Grams (e.g. a GPU backend).
///
/// `S P` is not symmetric, but it is similar to the symmetric PSD matrix `S^{1/2} P S^{1/2}`,
/// whose eigenvalues are therefore real and ≥ 0. `S^{1/2}` comes from a symmetric
/// eigendecomposition of `S` (negative rounding-level eigenvalues clamped to 0), which works for
/// rank-deficient `A` where a Cholesky factor would not exist. Accuracy: the Grams square the
/// factors' conditioning, so when `A` is nearly rank deficient the result can carry a relative
/// error up to about `sqrt(u)`; [`LowRankGenerator::spectral_norm`] avoids that.
pub fn spectral_norm_from_grams<T: Real>(s: &DMatrix<T>, p: &DMatrix<T>) -> Result<T> {
    check_grams(s, p)?;
    let sym = |m: &DMatrix<T>| (m + m.transpose()) * T::of(0.5);
    let es = SymmetricEigen::try_new(sym(s), T::default_epsilon(), 0)
        .ok_or_else(|| ElraError::Numerical("eigendecomposition of AᵀA did not converge".into()))?;
    let sqrt_vals = es
        .eigenvalues
        .map(|l| if l > T::zero() { l.sqrt() } else { T::zero() });
    let q = &es.eigenvectors;
    let half = q * DMatrix::from_diagonal(&sqrt_vals) * q.transpose();
    let m = &half * p * &half;
    let em = SymmetricEigen::try_new(sym(&m), T::default_epsilon(), 0).ok_or_else(|| {
        ElraError::Numerical("eigendecomposition of S^{1/2} P S^{1/2} did not converge".into())
    })?;
    let lmax = em
        .eigenvalues
        .iter()
        .copied()
        .fold(T::zero(), |x, y| if y > x { y } else { x });
    Ok(lmax.sqrt())
}

/// The largest singular value of a small matrix `K`, as `sqrt(λ_max(K Kᵀ))` from a symmetric
/// eigensolver. Squaring does not hurt the largest singular value (its relative error stays
/// ~u); nalgebra's SVD is avoided because it can return wrong values (dimforge/nalgebra#1172).
/// The result is checked against the bounds `max_j ‖K e_j‖ ≤ σ_max ≤ ‖K‖_F`.
pub(crate) fn largest_singular_value<T: Real>(k: DMatrix<T>) -> Result<T> {
    if k.is_empty() {
        return Ok(T::zero());
    }
    check_finite("generator", &k)?;
    let fro = k.norm();
    if fro == T::zero() {
        return Ok(T::zero());
    }
    // scale to unit Frobenius norm so the Gram cannot overflow or underflow
    let ks = &k / fro;
    let kkt = &ks * ks.transpose();
    let e = SymmetricEigen::try_new(kkt, T::default_epsilon(), 0).ok_or_else(|| {
        ElraError::Numerical("eigendecomposition of the r×r core did not converge".into())
    })?;
    let lmax = e
        .eigenvalues
        .iter()
        .copied()
        .fold(T::zero(), |x, y| if y > x { y } else { x });
    let smax = lmax.sqrt();
    let col_max = (0..ks.ncols())
        .map(|j| ks.column(j).norm())
        .fold(T::zero(), |x, y| if y > x { y } else { x });
    let slack = T::of(1.0 + 64.0 * T::UNIT_ROUNDOFF * ks.nrows() as f64);
    if !(smax * slack >= col_max && smax <= slack) {
        return Err(ElraError::Numerical(format!(
            "largest singular value {smax} of the r×r core fails its bounds [{col_max}, 1]"
        )));
    }
    Ok(smax * fro)
}

/// `‖G‖²_F` of an ELRA generator written out exactly as the paper's eq. (21a–d):
/// `η²(α²tr(S²) + (1−α)²tr(S·BBᵀ) + 2α(1−α)tr(S·(BA)))` with `S = AᵀA`.
///
/// Mathematically equal to [`LowRankGenerator::frobenius_norm_sq`] of
/// `generator_factor(Hyb, A, B, η, α)`; kept as the literal formula so the two can be checked
/// against each other. General ELRA is `α = 0`, ELRA-PSD `α = 1` (then `b` may be `None`).
pub fn energy_eq21<T: Real>(
    a: &DMatrix<T>,
    b: Option<&DMatrix<T>>,
    eta: T,
    alpha: f64,
) -> Result<T> {
    let (d, r) = check_left_factor("a", a)?;
    check_eta(eta)?;
    if !alpha.is_finite() || !(0.0..=1.0).contains(&alpha) {
        return Err(ElraError::invalid(
            "alpha",
            format!("must lie in [0, 1], got {alpha}"),
        ));
    }
    let s = a.tr_mul(a);
    let al = T::of(alpha);
    let be = T::of(1.0 - alpha);
    let mut total = al * al * s.dot(&s); // tr(S²) = ‖S‖²_F (S symmetric), eq. 21b
    if alpha < 1.0 {
        let b = b.ok_or_else(|| ElraError::invalid("b", "α < 1 needs the factor B (r×d)"))?;
        if b.shape() != (r, d) {
            return Err(ElraError::shape("b", (r, d), b.shape()));
        }
        check_finite("b", b)?;
        let bbt = b * b.transpose();
        let ba = b * a;
        total += be * be * s.dot(&bbt); // eq. 21c
                                        // eq. 21d: tr(S (BA)) = Σ_ij S_ij (BA)_ji
        total += T::of(2.0) * al * be * s.dot(&ba.transpose());
    }
    Ok(eta * eta * total)
}

/// `exp(G)` for `G = A C` in the Woodbury form of Prop. 1 (eq. 4): `exp(AC) = I + A M C` with
/// the r×r core `M = φ1(Z)`, `Z = CA`. Applies `exp(G)` from the left, from the right and to
/// rows of samples without forming any d×d matrix (eq. 5, eq. 30).
#[derive(Debug, Clone, PartialEq)]
pub struct ExpAction<T: Real> {
    generator: LowRankGenerator<T>,
    z: DMatrix<T>,
    m: DMatrix<T>,
}

impl<T: Real> ExpAction<T> {
    /// Evaluates `Z = CA` and `M = φ1(Z)` (Prop. 1). Errors from φ1 (overflow, non-finite)
    /// are passed on.
    pub fn new(generator: LowRankGenerator<T>) -> Result<Self> {
        let z = generator.z();
        let m = crate::linalg::phi1(&z)?;
        check_finite("phi1(Z)", &m)?;
        Ok(ExpAction { generator, z, m })
    }

    /// The generator `G = AC`.
    pub fn generator(&self) -> &LowRankGenerator<T> {
        &self.generator
    }

    /// `Z = CA` (r×r).
    pub fn z(&self) -> &DMatrix<T> {
        &self.z
    }

    /// `M = φ1(Z)` (r×r), the Woodbury core (eq. 4).
    pub fn m(&self) -> &DMatrix<T> {
        &self.m
    }

    /// `A M C W` (d×k): the increment `exp(G)W − W` of eq. (30), without adding `W`.
    ///
    /// Errors: `w` must have `d` rows.
    pub fn left_delta(&self, w: &DMatrix<T>) -> Result<DMatrix<T>> {
        let d = self.generator.dim();
        if w.nrows() != d {
            return Err(ElraError::shape("w", (d, w.ncols()), w.shape()));
        }
        let cw = self.generator.c() * w;
        Ok(self.generator.a() * (&self.m * cw))
    }

    /// `exp(G) W = W + A (M (C W))` (Prop. 1, eq. 30). Errors: `w` must have `d` rows.
    pub fn left(&self, w: &DMatrix<T>) -> Result<DMatrix<T>> {
        Ok(self.left_delta(w)? + w)
    }

    /// `W exp(G) = W + ((W A) M) C` (Prop. 1 applied on the right, App. B).
    /// Errors: `w` must have `d` columns.
    pub fn right(&self, w: &DMatrix<T>) -> Result<DMatrix<T>> {
        let d = self.generator.dim();
        if w.ncols() != d {
            return Err(ElraError::shape("w", (w.nrows(), d), w.shape()));
        }
        let wa = w * self.generator.a();
        Ok((wa * &self.m) * self.generator.c() + w)
    }

    /// `X exp(G)ᵀ = X + ((X Cᵀ) Mᵀ) Aᵀ` for a batch of rows `X` (N×d): eq. (5) with samples as
    /// rows (`v = C u`, `t = M v`, `y = u + A t`). Errors: `x` must have `d` columns.
    pub fn rows(&self, x: &DMatrix<T>) -> Result<DMatrix<T>> {
        let d = self.generator.dim();
        if x.ncols() != d {
            return Err(ElraError::shape("x", (x.nrows(), d), x.shape()));
        }
        let v = x * self.generator.c().transpose();
        let t = v * self.m.transpose();
        Ok(t * self.generator.a().transpose() + x)
    }

    /// `exp(−G) = exp(G)⁻¹` (Prop. 3) in the same form: `−G = A(−C)`, core `φ1(−Z)`.
    pub fn inverse(&self) -> Result<ExpAction<T>> {
        ExpAction::new(self.generator.neg())
    }

    /// `log det exp(G) = tr G = tr Z` (Prop. 3: `det exp(G) = exp(tr G)`).
    pub fn log_det(&self) -> T {
        self.z.trace()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn rand_mat(rng: &mut ChaCha8Rng, r: usize, c: usize) -> DMatrix<f64> {
        DMatrix::from_fn(r, c, |_, _| rng.random_range(-1.0..1.0))
    }

    #[test]
    fn variants_build_the_right_factor() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let a = rand_mat(&mut rng, 7, 3);
        let b = rand_mat(&mut rng, 3, 7);
        let eta = 0.7;
        let cg = generator_factor(Variant::General, &a, Some(&b), eta, 0.3).unwrap();
        assert!((cg - &b * eta).abs().max() < 1e-15);
        let cp = generator_factor(Variant::Psd, &a, None, eta, 0.3).unwrap();
        assert!((cp - a.transpose() * eta).abs().max() < 1e-15);
        let ch = generator_factor(Variant::Hyb, &a, Some(&b), eta, 0.3).unwrap();
        let expect = (a.transpose() * 0.3 + &b * 0.7) * eta;
        assert!((ch - expect).abs().max() < 1e-15);
        // α = 1 is the PSD generator, α = 0 the general one (eq. 19, not App. H eq. 74)
        let h1 = generator_factor(Variant::Hyb, &a, Some(&b), eta, 1.0).unwrap();
        assert!((h1 - a.transpose() * eta).abs().max() < 1e-15);
        let h0 = generator_factor(Variant::Hyb, &a, Some(&b), eta, 0.0).unwrap();
        assert!((h0 - &b * eta).abs().max() < 1e-15);
    }

    #[test]
    fn norms_match_dense() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for &(d, r) in &[(1, 1), (5, 1), (9, 4), (20, 20), (33, 7)] {
            let a = rand_mat(&mut rng, d, r);
            let c = rand_mat(&mut rng, r, d);
            let g = LowRankGenerator::new(a.clone(), c.clone()).unwrap();
            let dense = &a * &c;
            let f2 = dense.norm_squared();
            assert!((g.frobenius_norm_sq() - f2).abs() <= 1e-13 * f2);
            let s2 = dense.clone().singular_values().max();
            assert!((g.spectral_norm().unwrap() - s2).abs() <= 1e-13 * s2);
            let (s, p) = g.grams();
            assert!((spectral_norm_from_grams(&s, &p).unwrap() - s2).abs() <= 1e-10 * s2);
            assert!((g.trace() - dense.trace()).abs() <= 1e-13 * (1.0 + f2.sqrt()));
        }
    }

    #[test]
    fn clip_rescales_to_tau() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let a = rand_mat(&mut rng, 10, 3) * 3.0;
        let c = rand_mat(&mut rng, 3, 10);
        let g = LowRankGenerator::new(a, c).unwrap();
        let n = g.spectral_norm().unwrap();
        assert!(n > 2.0);
        let (gc, s, n0) = g.clipped(2.0).unwrap();
        assert_eq!(n0, n);
        assert!((s - 2.0 / n).abs() < 1e-15);
        assert!((gc.spectral_norm().unwrap() - 2.0).abs() < 1e-13);
        let (gu, s1, _) = g.clipped(1e6).unwrap();
        assert_eq!(s1, 1.0);
        assert_eq!(gu, g);
        assert!(g.clipped(0.0).is_err());
        assert!(g.clipped(f64::NAN).is_err());
    }

    #[test]
    fn eq21_literal_matches_grams() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let a = rand_mat(&mut rng, 12, 4);
        let b = rand_mat(&mut rng, 4, 12);
        for &al in &[0.0, 0.25, 0.9, 1.0] {
            let g = LowRankGenerator::from_variant(Variant::Hyb, &a, Some(&b), 0.3, al).unwrap();
            let lit = energy_eq21(&a, Some(&b), 0.3, al).unwrap();
            let gram = g.frobenius_norm_sq();
            assert!((lit - gram).abs() <= 1e-13 * gram, "{lit} vs {gram}");
        }
        assert!(energy_eq21(&a, None, 0.3, 1.0).is_ok());
        assert!(energy_eq21(&a, None, 0.3, 0.5).is_err());
    }

    #[test]
    fn f32_generator_norms() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let a = rand_mat(&mut rng, 16, 4);
        let c = rand_mat(&mut rng, 4, 16);
        let dense = &a * &c;
        let g = LowRankGenerator::new(a.map(|x| x as f32), c.map(|x| x as f32)).unwrap();
        let s2 = dense.singular_values().max();
        assert!(((g.spectral_norm().unwrap() as f64) - s2).abs() <= 1e-5 * s2);
    }
}
