//! Claims about the r×r matrix functions of `elra::linalg` (expm, φ1, Fréchet, batch).
#![allow(non_snake_case)]

#[path = "common/seeded.rs"]
mod seeded;
use elra::linalg::{
    expm, expm_frechet, expm_frechet_adjoint, expm_phi1, pade_plan, phi1, phi1_frechet,
    phi1_frechet_adjoint, MatFnBatch,
};
use elra::ElraError;
use nalgebra::DMatrix;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rel_err(a: &DMatrix<f64>, b: &DMatrix<f64>) -> f64 {
    (a - b).norm() / b.norm()
}

fn random(n: usize, norm1: f64, rng: &mut ChaCha8Rng) -> DMatrix<f64> {
    let m = DMatrix::from_fn(n, n, |_, _| rng.random_range(-1.0..1.0));
    let s = m.column_iter().map(|c| c.abs().sum()).fold(0.0, f64::max);
    m * (norm1 / s)
}

#[test]
fn expm_phi1_equals_separate_calls_and_agrees_with_nalgebra() {
    // Claim: expm_phi1 returns exactly (bit for bit) what expm and phi1 return separately, and
    // both agree with nalgebra (exp of Z, and of [[Z, I], [0, 0]] for φ1) for n up to 8 and
    // ‖Z‖₁ up to 10, within the conditioning tolerance `cond_tol` (derived there).
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut worst = (0.0f64, 0.0f64);
    for &n in &[1usize, 2, 3, 5, 8] {
        for &nrm in &[1e-6, 1e-2, 0.3, 1.0, 3.0, 10.0] {
            let z = random(n, nrm, &mut rng);
            let (e, p) = expm_phi1(&z).unwrap();
            assert_eq!(e, expm(&z).unwrap());
            assert_eq!(p, phi1(&z).unwrap());
            let e_ref = z.exp();
            let (b, p_ref) = phi1_block(&z);
            let tol_e = cond_tol(U64, n, kron_cond(l_exp, &z), z.norm(), e_ref.norm());
            let tol_p = cond_tol(U64, 2 * n, kron_cond(l_phi1, &z), z.norm(), p_ref.norm())
                + cond_tol(U64, 2 * n, kron_cond(l_exp, &b), b.norm(), p_ref.norm());
            let (ee, pe) = (rel_err(&e, &e_ref), rel_err(&p, &p_ref));
            worst = (worst.0.max(ee), worst.1.max(pe));
            assert!(
                ee <= tol_e,
                "n={n} norm={nrm} expm err {ee:.2e} > {tol_e:.2e}"
            );
            assert!(
                pe <= tol_p,
                "n={n} norm={nrm} phi1 err {pe:.2e} > {tol_p:.2e}"
            );
        }
    }
    eprintln!(
        "worst relative errors vs nalgebra: expm {:.2e}, phi1 {:.2e}",
        worst.0, worst.1
    );
}

#[test]
fn phi1_of_singular_and_zero_matrices_is_finite_and_exact() {
    let z = DMatrix::<f64>::zeros(3, 3);
    assert_eq!(phi1(&z).unwrap(), DMatrix::identity(3, 3));
    assert_eq!(expm(&z).unwrap(), DMatrix::identity(3, 3));
    // nilpotent: φ1(N) = I + N/2 exactly in exact arithmetic
    let nm = DMatrix::from_row_slice(2, 2, &[0.0, 1e3, 0.0, 0.0]);
    let p = phi1(&nm).unwrap();
    let want = DMatrix::from_row_slice(2, 2, &[1.0, 500.0, 0.0, 1.0]);
    assert!(rel_err(&p, &want) < 1e-15, "{p}");
}

#[test]
fn badly_scaled_matrices_are_not_overscaled() {
    let z = DMatrix::from_row_slice(2, 2, &[1.0, 1e8, 0.0, -1.0]);
    let plan = pade_plan(&z).unwrap();
    assert_eq!(plan.s, 0, "{plan:?}");
    let e = expm(&z).unwrap();
    // exact: [[e, 1e8·sinh(1)], [0, 1/e]]
    let want = DMatrix::from_row_slice(2, 2, &[1f64.exp(), 1e8 * 1f64.sinh(), 0.0, (-1f64).exp()]);
    assert!(rel_err(&e, &want) < 1e-15, "{}", rel_err(&e, &want));
    let e32 = expm(&z.map(|x| x as f32)).unwrap().map(|x| x as f64);
    assert!(rel_err(&e32, &want) < 1e-6, "{}", rel_err(&e32, &want));
}

#[test]
fn bad_inputs_are_typed_errors() {
    let z = DMatrix::<f64>::zeros(2, 3);
    assert!(matches!(expm(&z), Err(ElraError::Shape { .. })));
    let z = DMatrix::<f64>::zeros(0, 0);
    assert!(matches!(phi1(&z), Err(ElraError::InvalidArgument { .. })));
    let mut z = DMatrix::<f64>::zeros(2, 2);
    z[(0, 1)] = f64::NAN;
    assert!(matches!(phi1(&z), Err(ElraError::NonFinite { .. })));
    z[(0, 1)] = f64::INFINITY;
    assert!(matches!(expm(&z), Err(ElraError::NonFinite { .. })));
    let z = DMatrix::<f64>::identity(2, 2) * 1e3;
    assert!(matches!(expm(&z), Err(ElraError::Overflow { .. })));
    assert!(matches!(phi1(&z), Err(ElraError::Overflow { .. })));
    let z = DMatrix::<f64>::identity(2, 2) * -1e3;
    let e = expm(&z).unwrap();
    assert!(e.iter().all(|&x| x == 0.0));
    let p = phi1(&z).unwrap();
    assert!((p[(0, 0)] - 1e-3).abs() < 1e-18);
}

// ---------------------------------------------------------------------------------------------
// Oracle: mpmath at 110/140 digits (tests/data/gen_expm_reference.py), independent of the Padé code.
// ---------------------------------------------------------------------------------------------

struct RefCase {
    name: String,
    dtype: String,
    n: usize,
    z: Vec<f64>,
    exp: Vec<f64>,
    phi1: Vec<f64>,
}

fn reference_cases() -> Vec<RefCase> {
    parse_reference(include_str!("data/expm_phi1_reference.txt"))
}

/// Cases of `tests/data/*.txt` (format written by `gen_expm_reference.py`).
fn parse_reference(text: &str) -> Vec<RefCase> {
    let mut out = Vec::new();
    let mut lines = text.lines().filter(|l| !l.starts_with('#'));
    let nums = |l: &str, tag: &str| -> Vec<f64> {
        let mut it = l.split_whitespace();
        assert_eq!(it.next(), Some(tag));
        it.map(|v| v.parse::<f64>().unwrap()).collect()
    };
    while let Some(head) = lines.next() {
        let h: Vec<&str> = head.split_whitespace().collect();
        assert_eq!(h[0], "case");
        let n: usize = h[3].parse().unwrap();
        let z = nums(lines.next().unwrap(), "z");
        let exp = nums(lines.next().unwrap(), "exp");
        let phi1 = nums(lines.next().unwrap(), "phi1");
        assert_eq!((z.len(), exp.len(), phi1.len()), (n * n, n * n, n * n));
        out.push(RefCase {
            name: h[1].to_string(),
            dtype: h[2].to_string(),
            n,
            z,
            exp,
            phi1,
        });
    }
    out
}

fn norm1_of(m: &DMatrix<f64>) -> f64 {
    m.column_iter().map(|c| c.abs().sum()).fold(0.0, f64::max)
}

/// Relative Frobenius errors (expm, φ1) of the crate against one mpmath reference case.
fn oracle_errors(c: &RefCase) -> (f64, f64) {
    let n = c.n;
    let want_e = DMatrix::from_row_slice(n, n, &c.exp);
    let want_p = DMatrix::from_row_slice(n, n, &c.phi1);
    let z = DMatrix::from_row_slice(n, n, &c.z);
    if c.dtype == "f32" {
        let z32 = z.map(|v| v as f32);
        assert!(
            z32.map(|v| v as f64) == z,
            "{}: f32 input not exact",
            c.name
        );
        let (e, p) = expm_phi1(&z32).unwrap();
        (
            rel_err(&e.map(|v| v as f64), &want_e),
            rel_err(&p.map(|v| v as f64), &want_p),
        )
    } else {
        let (e, p) = expm_phi1(&z).unwrap();
        (rel_err(&e, &want_e), rel_err(&p, &want_p))
    }
}

const U64: f64 = f64::EPSILON / 2.0; // unit roundoff 2^-53
const U32: f64 = f32::EPSILON as f64 / 2.0; // 2^-24

/// ‖K_f(X)‖₂: the 2-norm of the Kronecker (n²×n²) matrix of the Fréchet derivative, i.e. the
/// absolute Frobenius-norm condition number of f at X (Higham 2008, eq. 3.20). Built column by
/// column from `frechet(X, E_ij)`.
fn kron_cond(frechet: fn(&DMatrix<f64>, &DMatrix<f64>) -> DMatrix<f64>, x: &DMatrix<f64>) -> f64 {
    let n = x.nrows();
    let mut k = DMatrix::<f64>::zeros(n * n, n * n);
    for j in 0..n {
        for i in 0..n {
            let mut e = DMatrix::zeros(n, n);
            e[(i, j)] = 1.0;
            let l = frechet(x, &e);
            k.column_mut(j * n + i).copy_from_slice(l.as_slice());
        }
    }
    k.singular_values().max()
}

fn l_exp(x: &DMatrix<f64>, e: &DMatrix<f64>) -> DMatrix<f64> {
    expm_frechet(x, e).unwrap()
}
fn l_phi1(x: &DMatrix<f64>, e: &DMatrix<f64>) -> DMatrix<f64> {
    phi1_frechet(x, e).unwrap()
}

/// Tolerance for comparing two evaluations of f(X) that are each backward stable with backward
/// error ≤ c·u·‖X‖: to first order each forward error is ≤ ‖K_f(X)‖₂·c·u·‖X‖_F (Higham 2008,
/// §3.1), so the difference is within 2·c·u·‖K_f(X)‖₂‖X‖_F plus the rounding of the result
/// itself (the `1 +` term). We take c = 8(n + 2): a growth factor linear in n for the n×n
/// products and solves, plus a constant for the rounding amplified by the squaring phase (for
/// scalars, the relative error after s squarings grows like 2ˢ·u while κ ≈ |x|). Over 300
/// random cases the largest observed error/tolerance ratio was 0.22 (n = 1, exp) and ≤ 0.03 for
/// the Fréchet checks. Relative to ‖f(X)‖_F.
fn cond_tol(u: f64, n: usize, kabs: f64, xnorm: f64, fnorm: f64) -> f64 {
    let c = 8.0 * (n as f64 + 2.0);
    2.0 * c * u * (1.0 + kabs * xnorm / fnorm)
}

#[test]
fn expm_phi1_match_oracle() {
    // Claim: against mpmath references (≥ 40 correct digits, independent of the crate's Padé
    // code), relative Frobenius error ≤ 1e-13 (f64) / 1e-5 (f32) for ‖Z‖₁ ≤ 10 and for the badly
    // scaled cases [[1,1e8],[0,-1]], [[-0.5,1e4],[0,-0.6]], D⁻¹AD with D = diag(1,1e3,1e-3).
    // Moler's 3×3 matrix (‖Z‖₁ = 2e10, outside that class) is held to 1e-12 (see below).
    let cases = reference_cases();
    assert!(cases.len() > 100);
    let mut worst64 = (0.0f64, 0.0f64);
    let mut worst32 = (0.0f64, 0.0f64);
    for c in &cases {
        let z = DMatrix::from_row_slice(c.n, c.n, &c.z);
        let (ee, pe) = oracle_errors(c);
        if c.name == "moler_3x3" {
            // Moler's matrix has ‖Z‖₁ = 2e10 and a normwise relative condition number of ≈ 3e18,
            // so no normwise bound applies. Measured: 3.5e-13 (exp). The error does not change
            // when the 8 squarings are split differently (the Padé evaluation at 2⁻⁸Z is the
            // same computation); one more squaring gives 1.9e-13, two 2.8e-12, and the plain
            // Higham 2005 choice (≈ 32 squarings, i.e. a low-degree Padé of a much smaller
            // matrix) ≥ 5e-7. nalgebra's exp gives 2.1e-13. So ≈ 2e-13 is what this algorithm
            // class attains here; we hold it to 1e-12.
            eprintln!("moler_3x3: exp err {ee:.2e}, phi1 err {pe:.2e}");
            assert!(
                ee <= 1e-12 && pe <= 1e-12,
                "moler: exp {ee:.2e} phi1 {pe:.2e}"
            );
            continue;
        }
        let bound = if c.dtype == "f32" { 1e-5 } else { 1e-13 };
        assert!(
            norm1_of(&z) <= 10.0 * (1.0 + 1e-6)
                || ["amh2009_1e8", "upper_1e4", "diag_similar", "rank1"].contains(&c.name.as_str()),
            "{} is outside the claimed class",
            c.name
        );
        assert!(
            ee <= bound && pe <= bound,
            "{} ({}): exp {ee:.2e} phi1 {pe:.2e}",
            c.name,
            c.dtype
        );
        let w = if c.dtype == "f32" {
            &mut worst32
        } else {
            &mut worst64
        };
        *w = (w.0.max(ee), w.1.max(pe));
    }
    eprintln!(
        "oracle: {} cases; worst f64 exp {:.2e} phi1 {:.2e}; worst f32 exp {:.2e} phi1 {:.2e}",
        cases.len(),
        worst64.0,
        worst64.1,
        worst32.0,
        worst32.1
    );
}

#[test]
fn badly_scaled_oracle_cases_choose_few_squarings() {
    // Claim: the AMH 2009 ℓ-correction and d_k-based selection keep s small where the plain
    // ‖Z‖₁-based Higham 2005 choice would use ⌈log2(‖Z‖₁/5.37)⌉ squarings (21 for 1e8/-1, 32 for
    // Moler's matrix).
    for c in reference_cases() {
        let z = DMatrix::from_row_slice(c.n, c.n, &c.z);
        let s = if c.dtype == "f32" {
            pade_plan(&z.map(|v| v as f32)).unwrap().s
        } else {
            pade_plan(&z).unwrap().s
        };
        match c.name.as_str() {
            "amh2009_1e8" | "upper_1e4" | "diag_similar" => assert_eq!(s, 0, "{}", c.name),
            "moler_3x3" => assert!(s <= 10, "moler s = {s}"),
            _ => {}
        }
    }
}

fn matrix_strategy(max_n: usize, max_norm: f64) -> impl Strategy<Value = DMatrix<f64>> {
    (1..=max_n, 0.0..max_norm, any::<u64>()).prop_map(|(n, nrm, seed)| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        random(n, nrm, &mut rng)
    })
}

/// exp([[Z, I], [0, 0]]) (nalgebra) and its top-right block φ1(Z).
fn phi1_block(z: &DMatrix<f64>) -> (DMatrix<f64>, DMatrix<f64>) {
    let n = z.nrows();
    let mut b = DMatrix::zeros(2 * n, 2 * n);
    b.view_mut((0, 0), (n, n)).copy_from(z);
    b.view_mut((0, n), (n, n)).fill_with_identity();
    let p = b.exp().view((0, n), (n, n)).into_owned();
    (b, p)
}

proptest! {
    #![proptest_config(seeded::config(256))]

    /// Claim: expm and φ1 agree with nalgebra's own `exp` (φ1 via exp([[Z, I],[0, 0]])) within
    /// the conditioning tolerance of [`cond_tol`] (both algorithms backward stable).
    #[test]
    fn expm_phi1_match_nalgebra_within_conditioning(z in matrix_strategy(4, 10.0)) {
        let n = z.nrows();
        let (e, p) = expm_phi1(&z).unwrap();
        let e_ref = z.exp();
        let tol_e = cond_tol(U64, n, kron_cond(l_exp, &z), z.norm(), e_ref.norm());
        let err_e = rel_err(&e, &e_ref);
        prop_assert!(err_e <= tol_e, "exp err {err_e:.2e} > tol {tol_e:.2e}");
        let (b, p_ref) = phi1_block(&z);
        // ours: conditioning of φ1 at Z; the reference: conditioning of exp at the 2n block B.
        let tol_p = cond_tol(U64, 2 * n, kron_cond(l_phi1, &z), z.norm(), p_ref.norm())
            + cond_tol(U64, 2 * n, kron_cond(l_exp, &b), b.norm(), p_ref.norm());
        let err_p = rel_err(&p, &p_ref);
        prop_assert!(err_p <= tol_p, "phi1 err {err_p:.2e} > tol {tol_p:.2e}");
    }

    /// Claim: the f32 functions agree with the f64 ones (themselves within 1e-13 of the oracle)
    /// to the f32 conditioning tolerance (same derivation, u = 2⁻²⁴), and within 1e-5 for
    /// ‖Z‖₁ ≤ 10 matrices of modest conditioning.
    #[test]
    fn expm_phi1_f32_match_f64_within_conditioning(z in matrix_strategy(6, 10.0)) {
        let n = z.nrows();
        let z32 = z.map(|v| v as f32);
        let z = z32.map(|v| v as f64); // exactly the matrix the f32 code sees
        let (e, p) = expm_phi1(&z).unwrap();
        let (e32, p32) = expm_phi1(&z32).unwrap();
        let err_e = rel_err(&e32.map(|v| v as f64), &e);
        let err_p = rel_err(&p32.map(|v| v as f64), &p);
        let tol_e = cond_tol(U32, n, kron_cond(l_exp, &z), z.norm(), e.norm());
        let tol_p = cond_tol(U32, n, kron_cond(l_phi1, &z), z.norm(), p.norm());
        prop_assert!(err_e <= tol_e, "exp f32 err {err_e:.2e} > {tol_e:.2e}");
        prop_assert!(err_p <= tol_p, "phi1 f32 err {err_p:.2e} > {tol_p:.2e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Fréchet derivatives and adjoints
// ---------------------------------------------------------------------------------------------

fn block2(z: &DMatrix<f64>, e: &DMatrix<f64>) -> DMatrix<f64> {
    let n = z.nrows();
    let mut b = DMatrix::zeros(2 * n, 2 * n);
    b.view_mut((0, 0), (n, n)).copy_from(z);
    b.view_mut((n, n), (n, n)).copy_from(z);
    b.view_mut((0, n), (n, n)).copy_from(e);
    b
}

fn dot(a: &DMatrix<f64>, b: &DMatrix<f64>) -> f64 {
    a.component_mul(b).sum()
}

fn pair_strategy(
    max_n: usize,
    max_norm: f64,
) -> impl Strategy<Value = (DMatrix<f64>, DMatrix<f64>)> {
    (1..=max_n, 0.0..max_norm, 0.5..5.0f64, any::<u64>()).prop_map(|(n, nrm, enrm, seed)| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let z = random(n, nrm, &mut rng);
        let e = DMatrix::from_fn(n, n, |_, _| rng.random_range(-1.0..1.0));
        let e = &e * (enrm / e.norm());
        (z, e)
    })
}

#[test]
fn frechet_of_zero_matrix_is_exact() {
    // L_exp(0, E) = E and L_φ1(0, E) = E/2 (first-order terms of the series).
    let z = DMatrix::<f64>::zeros(3, 3);
    let e = DMatrix::from_row_slice(3, 3, &[1.0, -2.0, 3.0, 0.5, 0.25, -7.0, 1e-3, 4.0, 9.0]);
    assert!(rel_err(&expm_frechet(&z, &e).unwrap(), &e) < 1e-15);
    assert!(rel_err(&phi1_frechet(&z, &e).unwrap(), &(&e * 0.5)) < 1e-15);
    assert_eq!(
        expm_frechet(&z, &DMatrix::zeros(3, 3)).unwrap(),
        DMatrix::<f64>::zeros(3, 3)
    );
}

#[test]
fn frechet_bad_inputs_are_typed_errors() {
    let z = DMatrix::<f64>::identity(3, 3);
    let e = DMatrix::<f64>::zeros(3, 2);
    assert!(matches!(
        expm_frechet(&z, &e),
        Err(ElraError::Shape { arg: "e", .. })
    ));
    assert!(matches!(
        phi1_frechet_adjoint(&z, &e),
        Err(ElraError::Shape { arg: "g", .. })
    ));
    let mut e = DMatrix::<f64>::zeros(3, 3);
    e[(1, 2)] = f64::NAN;
    assert!(matches!(
        phi1_frechet(&z, &e),
        Err(ElraError::NonFinite { arg: "e" })
    ));
    assert!(matches!(
        expm_frechet_adjoint(&z, &e),
        Err(ElraError::NonFinite { arg: "g" })
    ));
    let mut zn = z.clone();
    zn[(0, 0)] = f64::INFINITY;
    assert!(matches!(
        expm_frechet(&zn, &z),
        Err(ElraError::NonFinite { arg: "z" })
    ));
    let big = DMatrix::<f64>::identity(2, 2) * 800.0;
    assert!(matches!(
        phi1_frechet_adjoint(&big, &DMatrix::identity(2, 2)),
        Err(ElraError::Overflow { .. })
    ));
    assert!(matches!(
        expm_frechet(&DMatrix::<f64>::zeros(0, 0), &DMatrix::zeros(0, 0)),
        Err(ElraError::InvalidArgument { .. })
    ));
}

proptest! {
    #![proptest_config(seeded::config(256))]

    /// Claim: L_exp(Z,E) equals the top-right block of nalgebra's exp([[Z,E],[0,Z]]) and
    /// L_φ1(Z,E) the corresponding block of exp([[Z,E,0],[0,Z,I]…]) = φ1 of the block, within the
    /// conditioning tolerance [`cond_tol`] of both computations (the reference exponentiates the
    /// 2n (exp) or 4n (φ1) block B, so its error is governed by ‖K_exp(B)‖₂‖B‖_F).
    #[test]
    fn frechet_matches_block_exp_oracle((z, e) in pair_strategy(3, 6.0)) {
        let n = z.nrows();
        let b2 = block2(&z, &e);
        let l_ref = b2.exp().view((0, n), (n, n)).into_owned();
        let l = expm_frechet(&z, &e).unwrap();
        let tol = 2.0 * cond_tol(U64, 2 * n, kron_cond(l_exp, &b2), b2.norm(), l_ref.norm());
        let err = rel_err(&l, &l_ref);
        prop_assert!(err <= tol, "L_exp err {err:.2e} > {tol:.2e}");

        let (b4, _) = phi1_block(&b2);
        let lp_ref = b4.exp().view((0, 3 * n), (n, n)).into_owned();
        let lp = phi1_frechet(&z, &e).unwrap();
        let tol = cond_tol(U64, 4 * n, kron_cond(l_exp, &b4), b4.norm(), lp_ref.norm())
            + cond_tol(U64, 2 * n, kron_cond(l_phi1, &b2), b2.norm(), lp_ref.norm());
        let err = rel_err(&lp, &lp_ref);
        prop_assert!(err <= tol, "L_phi1 err {err:.2e} > {tol:.2e}");
    }

    /// Claim: the Fréchet derivatives match central differences
    /// (f(Z+hE) − f(Z−hE))/(2h), h = 2⁻¹⁵, within the difference-quotient error bound
    /// h²/6·e^{‖Z‖_F+h}‖E‖³ (third derivative; the coefficients of φ1 are ≤ those of exp) plus
    /// rounding 2·ε·√n·e^{‖Z‖_F+h}/(2h) with ε = 1e-14 (ten times the worst oracle error).
    #[test]
    fn frechet_matches_central_differences((z, e) in pair_strategy(5, 3.0)) {
        let n = z.nrows();
        let e = &e / e.norm();
        let h = 2f64.powi(-15);
        let growth = (z.norm() + h).exp();
        let tol_abs = h * h / 6.0 * growth + 1e-14 * (n as f64).sqrt() * growth / h;
        let zp = &z + &e * h;
        let zm = &z - &e * h;
        let fd_e = (expm(&zp).unwrap() - expm(&zm).unwrap()) / (2.0 * h);
        let fd_p = (phi1(&zp).unwrap() - phi1(&zm).unwrap()) / (2.0 * h);
        let le = expm_frechet(&z, &e).unwrap();
        let lp = phi1_frechet(&z, &e).unwrap();
        prop_assert!((&le - &fd_e).norm() <= tol_abs, "exp {:.2e} > {tol_abs:.2e}", (&le - &fd_e).norm());
        prop_assert!((&lp - &fd_p).norm() <= tol_abs, "phi1 {:.2e} > {tol_abs:.2e}", (&lp - &fd_p).norm());
    }

    /// Claim: ⟨L_f(Z,E), G⟩ = ⟨E, L_f*(Z,G)⟩ for f = exp, φ1, to 1e-12 relative to
    /// max(‖L(Z,E)‖_F‖G‖_F, ‖E‖_F‖L*(Z,G)‖_F) (Cauchy–Schwarz scale of both sides).
    #[test]
    fn frechet_adjoint_identity_holds((z, e) in pair_strategy(8, 10.0), gseed in any::<u64>()) {
        let n = z.nrows();
        let mut rng = ChaCha8Rng::seed_from_u64(gseed);
        let g = DMatrix::from_fn(n, n, |_, _| rng.random_range(-1.0..1.0));
        for (fwd, adj) in [
            (expm_frechet::<f64> as fn(&_, &_) -> _, expm_frechet_adjoint::<f64> as fn(&_, &_) -> _),
            (phi1_frechet::<f64>, phi1_frechet_adjoint::<f64>),
        ] {
            let l = fwd(&z, &e).unwrap();
            let la = adj(&z, &g).unwrap();
            let lhs = dot(&l, &g);
            let rhs = dot(&e, &la);
            let scale = (l.norm() * g.norm()).max(e.norm() * la.norm());
            prop_assert!((lhs - rhs).abs() <= 1e-12 * scale, "{lhs} vs {rhs} (scale {scale})");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Batch
// ---------------------------------------------------------------------------------------------

fn row_major<T: nalgebra::Scalar + Copy>(m: &DMatrix<T>) -> Vec<T> {
    m.transpose().as_slice().to_vec()
}

fn batch_input(r: usize, count: usize, seed: u64) -> (Vec<f64>, Vec<DMatrix<f64>>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mats: Vec<DMatrix<f64>> = (0..count)
        .map(|i| random(r, [0.05, 0.7, 2.5, 6.0, 9.0][i % 5], &mut rng))
        .collect();
    (mats.iter().flat_map(row_major).collect(), mats)
}

fn check_batch_bitwise<T: elra::linalg::Real>(r: usize, count: usize, seed: u64) {
    let (z64, mats64) = batch_input(r, count, seed);
    let (g64, gm64) = batch_input(r, count, seed + 1);
    let z: Vec<T> = z64.iter().map(|&v| T::of(v)).collect();
    let g: Vec<T> = g64.iter().map(|&v| T::of(v)).collect();
    let mats: Vec<DMatrix<T>> = mats64.iter().map(|m| m.map(T::of)).collect();
    let gms: Vec<DMatrix<T>> = gm64.iter().map(|m| m.map(T::of)).collect();
    let mut b = MatFnBatch::<T>::new(r).unwrap();
    assert_eq!(b.r(), r);
    let len = z.len();
    let (mut e, mut p, mut e2, mut p2, mut ap, mut ae) = (
        vec![T::zero(); len],
        vec![T::zero(); len],
        vec![T::zero(); len],
        vec![T::zero(); len],
        vec![T::zero(); len],
        vec![T::zero(); len],
    );
    b.expm(&z, &mut e).unwrap();
    b.phi1(&z, &mut p).unwrap();
    b.expm_phi1(&z, &mut e2, &mut p2).unwrap();
    b.phi1_frechet_adjoint(&z, &g, &mut ap).unwrap();
    b.expm_frechet_adjoint(&z, &g, &mut ae).unwrap();
    let rr = r * r;
    for (i, (m, gm)) in mats.iter().zip(&gms).enumerate() {
        let sl = i * rr..(i + 1) * rr;
        let (se, sp) = expm_phi1(m).unwrap();
        assert_eq!(
            &e[sl.clone()],
            &row_major(&expm(m).unwrap())[..],
            "{} r={r} expm #{i}",
            T::NAME
        );
        assert_eq!(
            &p[sl.clone()],
            &row_major(&phi1(m).unwrap())[..],
            "{} r={r} phi1 #{i}",
            T::NAME
        );
        assert_eq!(
            &e2[sl.clone()],
            &row_major(&se)[..],
            "{} r={r} expm_phi1.0 #{i}",
            T::NAME
        );
        assert_eq!(
            &p2[sl.clone()],
            &row_major(&sp)[..],
            "{} r={r} expm_phi1.1 #{i}",
            T::NAME
        );
        let sap = phi1_frechet_adjoint(m, gm).unwrap();
        let sae = expm_frechet_adjoint(m, gm).unwrap();
        assert_eq!(
            &ap[sl.clone()],
            &row_major(&sap)[..],
            "{} r={r} phi1 adjoint #{i}",
            T::NAME
        );
        assert_eq!(
            &ae[sl],
            &row_major(&sae)[..],
            "{} r={r} expm adjoint #{i}",
            T::NAME
        );
    }
}

#[test]
fn batch_results_equal_single_matrix_functions_bit_for_bit() {
    for (k, &r) in [1usize, 2, 7, 16, 64, 128].iter().enumerate() {
        let count = if r >= 64 { 2 } else { 6 };
        check_batch_bitwise::<f64>(r, count, 100 + k as u64);
        check_batch_bitwise::<f32>(r, count, 200 + k as u64);
    }
}

/// φ1'(x) for the scalar φ1(x) = (eˣ − 1)/x (= 1/2 at 0).
fn phi1_scalar(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        x.exp_m1() / x
    }
}

#[test]
fn large_r_functions_match_eigendecomposition_reference() {
    // Claim: for r ∈ {16, 64, 128}, e^Z and φ1(Z) of a symmetric Z (spectrum in [−3, 3]) match
    // Q f(Λ) Qᵀ (nalgebra's symmetric eigendecomposition, scalar exp / expm1(λ)/λ) within
    // cond_tol with the absolute condition numbers of a symmetric argument (Higham 2008,
    // Thm 3.11: ‖K_f(Z)‖₂ = max_{i,j} |f[λi, λj]|): e^{λmax} for exp, and for φ1(x) = ∫₀¹e^{sx}ds
    // the divided differences are means of φ1'(x) = ∫₀¹ s e^{sx} ds ≤ e^{max(λmax,0)}/2 ≤ e^{λmax}
    // here (λmax = 3). The eigendecomposition reference has an error of the same first-order class.
    for &r in &[16usize, 64, 128] {
        let mut rng = ChaCha8Rng::seed_from_u64(r as u64);
        let a = DMatrix::from_fn(r, r, |_, _| rng.random_range(-1.0..1.0));
        let q = a.qr().q();
        let lam: Vec<f64> = (0..r)
            .map(|i| -3.0 + 6.0 * i as f64 / (r - 1) as f64)
            .collect();
        let d = DMatrix::from_diagonal(&nalgebra::DVector::from_vec(lam.clone()));
        let z = &q * &d * q.transpose();
        let z = (&z + z.transpose()) * 0.5;
        let eig = z.clone().symmetric_eigen();
        let (qv, ev) = (&eig.eigenvectors, &eig.eigenvalues);
        let e_ref = qv * DMatrix::from_diagonal(&ev.map(f64::exp)) * qv.transpose();
        let p_ref = qv * DMatrix::from_diagonal(&ev.map(phi1_scalar)) * qv.transpose();
        let (e, p) = expm_phi1(&z).unwrap();
        let lmax = ev.max();
        let tol_e = cond_tol(U64, r, lmax.exp(), z.norm(), e_ref.norm());
        let tol_p = cond_tol(U64, r, lmax.exp(), z.norm(), p_ref.norm());
        let (err_e, err_p) = (rel_err(&e, &e_ref), rel_err(&p, &p_ref));
        eprintln!(
            "r={r}: exp err {err_e:.2e} (tol {tol_e:.2e}), phi1 err {err_p:.2e} (tol {tol_p:.2e})"
        );
        assert!(err_e <= tol_e && err_p <= tol_p);
    }
}

#[test]
fn batch_errors_are_typed_and_name_the_failing_index() {
    assert!(matches!(
        MatFnBatch::<f64>::new(0),
        Err(ElraError::InvalidArgument { arg: "r", .. })
    ));
    let r = 3;
    let mut b = MatFnBatch::<f64>::new(r).unwrap();
    let (mut z, _) = batch_input(r, 4, 7);
    let g = z.clone();
    let mut out = vec![0.0; z.len()];
    let mut out2 = vec![0.0; z.len()];
    // shapes
    assert!(matches!(
        b.phi1(&z[..10], &mut out[..10]),
        Err(ElraError::Shape { arg: "z", .. })
    ));
    assert!(matches!(
        b.expm(&z, &mut out[..9]),
        Err(ElraError::Shape { arg: "out", .. })
    ));
    assert!(matches!(
        b.expm_phi1(&z, &mut out, &mut out2[..18]),
        Err(ElraError::Shape {
            arg: "phi1_out",
            ..
        })
    ));
    assert!(matches!(
        b.phi1_frechet_adjoint(&z, &g[..9], &mut out),
        Err(ElraError::Shape { arg: "g", .. })
    ));
    // NaN / Inf in matrix 2
    z[2 * 9 + 4] = f64::NAN;
    assert!(matches!(
        b.phi1(&z, &mut out),
        Err(ElraError::NonFinite { arg: "z" })
    ));
    z[2 * 9 + 4] = f64::NEG_INFINITY;
    assert!(matches!(
        b.expm_phi1(&z, &mut out, &mut out2),
        Err(ElraError::NonFinite { arg: "z" })
    ));
    assert!(matches!(
        b.expm_frechet_adjoint(&z, &g, &mut out),
        Err(ElraError::NonFinite { arg: "z" })
    ));
    z[2 * 9 + 4] = 0.0;
    let mut gn = g.clone();
    gn[5] = f64::NAN;
    assert!(matches!(
        b.phi1_frechet_adjoint(&z, &gn, &mut out),
        Err(ElraError::NonFinite { arg: "g" })
    ));
    // overflow in matrix 1: e^{1000} is not representable
    for i in 0..r {
        z[9 + i * r + i] = 1000.0;
    }
    for res in [
        b.phi1(&z, &mut out),
        b.expm(&z, &mut out),
        b.phi1_frechet_adjoint(&z, &g, &mut out),
    ] {
        match res {
            Err(ElraError::Overflow { what }) => assert!(what.contains("matrix 1 "), "{what}"),
            other => panic!("expected Overflow, got {other:?}"),
        }
    }
    // huge but finite norm whose result underflows instead: fine, no error
    let zneg: Vec<f64> = (0..9)
        .map(|k| if k % 4 == 0 { -1e300 } else { 0.0 })
        .collect();
    b.expm(&zneg, &mut out[..9]).unwrap();
    assert!(out[..9].iter().all(|&v| v == 0.0));
    b.phi1(&zneg, &mut out[..9]).unwrap();
    assert!((out[0] - 1e-300).abs() <= 1e-315 && out[1] == 0.0);
    // empty batch is fine
    b.phi1(&[], &mut []).unwrap();
}

#[test]
fn huge_norms_that_do_not_overflow_the_result_are_computed() {
    // Powers of these matrices overflow (‖Z²‖ > max), so the kernel pre-scales before the
    // selection; the results are representable and must come back without error.
    // e^{−cI} = 0 (underflow) and φ1(−cI) = (1 − e^{−c})/c · I = I/c.
    for c in [1e200f64, 1e300] {
        let z = DMatrix::<f64>::identity(3, 3) * -c;
        let (e, p) = expm_phi1(&z).unwrap();
        assert!(e.iter().all(|&v| v == 0.0));
        // (compare c·φ1 with I: ‖φ1‖_F itself underflows when squared)
        let pe = rel_err(&(&p * c), &DMatrix::identity(3, 3));
        assert!(pe < 1e-14, "c = {c:e}: error {pe:e}");
    }
    let z = DMatrix::<f32>::identity(2, 2) * -1e30f32;
    let p = phi1(&z).unwrap();
    assert!((p[(0, 0)] as f64 * 1e30 - 1.0).abs() < 1e-6, "{p}");
    // Upper triangular with a huge off-diagonal entry: e^Z = [[e, b·sinh 1], [0, 1/e]],
    // φ1(Z) = [[e − 1, b(e + 1/e − 2)/2], [0, 1 − 1/e]] (b = 1e30, A² = I, no overscaling).
    let b = 1e30;
    let z = DMatrix::from_row_slice(2, 2, &[1.0, b, 0.0, -1.0]);
    let (e, p) = expm_phi1(&z).unwrap();
    let one = 1f64.exp();
    let e_want = DMatrix::from_row_slice(2, 2, &[one, b * 1f64.sinh(), 0.0, 1.0 / one]);
    let p_want = DMatrix::from_row_slice(
        2,
        2,
        &[
            one - 1.0,
            b * (one + 1.0 / one - 2.0) / 2.0,
            0.0,
            1.0 - 1.0 / one,
        ],
    );
    assert!(rel_err(&e, &e_want) < 1e-15 && rel_err(&p, &p_want) < 1e-15);
    let (e32, p32) = expm_phi1(&z.map(|v| v as f32)).unwrap();
    assert!(rel_err(&e32.map(|v| v as f64), &e_want) < 1e-6);
    assert!(rel_err(&p32.map(|v| v as f64), &p_want) < 1e-6);
    // e^{+1e300 I} overflows: a typed error, not Inf.
    let z = DMatrix::<f64>::identity(2, 2) * 1e300;
    assert!(matches!(expm(&z), Err(ElraError::Overflow { .. })));
    let z = DMatrix::<f32>::identity(2, 2) * 100.0f32;
    assert!(matches!(phi1(&z), Err(ElraError::Overflow { .. })));
}

// ---------------------------------------------------------------------------------------------
// Exact structure (issue 28): triangular inputs, badly scaled f32 inputs.
// References: `tests/data/expm_phi1_structured.txt` (gen_expm_reference.py structured), mpmath at
// 400 digits checked entry by entry against 440-digit Padé, so small entries are reliable too.
// Errors before/after the change are in docs/numerics.md; the worst ones are quoted below.
// ---------------------------------------------------------------------------------------------

fn structured_cases() -> Vec<RefCase> {
    parse_reference(include_str!("data/expm_phi1_structured.txt"))
}

/// (e^Z, φ1(Z)) in the case's precision, widened to f64.
fn eval_in_dtype(c: &RefCase) -> (DMatrix<f64>, DMatrix<f64>) {
    let z = DMatrix::from_row_slice(c.n, c.n, &c.z);
    if c.dtype == "f32" {
        let z32 = z.map(|v| v as f32);
        assert!(
            z32.map(|v| v as f64) == z,
            "{}: f32 input not exact",
            c.name
        );
        let (e, p) = expm_phi1(&z32).unwrap();
        (e.map(|v| v as f64), p.map(|v| v as f64))
    } else {
        expm_phi1(&z).unwrap()
    }
}

/// Largest relative error over the entries (i, i + offset) whose reference is a normal number of
/// the case's precision, in units of its unit roundoff u.
fn band_error_in_u(c: &RefCase, got: &DMatrix<f64>, want: &[f64], offset: usize) -> f64 {
    let (u, tiny) = if c.dtype == "f32" {
        (U32, f32::MIN_POSITIVE as f64)
    } else {
        (U64, f64::MIN_POSITIVE)
    };
    let n = c.n;
    let lower = c.name.contains("lower");
    let mut worst = 0.0f64;
    for i in 0..n - offset {
        // lower triangular inputs: the band is the first subdiagonal
        let (r, k) = if lower {
            (i + offset, i)
        } else {
            (i, i + offset)
        };
        let w = want[r * n + k];
        if w.abs() < tiny {
            continue;
        }
        worst = worst.max((got[(r, k)] - w).abs() / w.abs() / u);
    }
    worst
}

#[test]
fn triangular_diagonal_and_first_superdiagonal_are_exact() {
    // Claim: for triangular Z (n ≥ 2; lower ones too) the diagonal of the results is exp(z_ii)
    // and φ1(z_ii), and the first superdiagonal (subdiagonal for lower Z) t·exp[z_ii, z_jj] and
    // t·φ1[z_ii, z_jj], evaluated in f64 and rounded once (AMH 2009 Code Fragment 2.1).
    // Tolerances, relative, in units of the precision's u: f64 diagonal 4 u (glibc exp ≤ 1 ulp,
    // expm1(x)/x ≤ 1.5 ulp; measured ≤ 1.3 u), f64 superdiagonal 10 u (divided differences
    // ≤ 3.3 u and ≤ 6.4 u measured over 6·10⁴ points, times t: one rounding; measured ≤ 2.6 u);
    // f32 both 1.001 u (one rounding of an f64 value good to 10⁻¹⁵; measured ≤ 0.94 u).
    // Before (plain squaring): f64 diagonal errors up to 2019 u (tri_lower_close_n7) and
    // 1024 u (tri_lower_markov_n6_x100), f32 up to 12787 u (tri_lower_close_n7).
    let mut worst = [0.0f64; 4];
    let mut count = 0;
    for c in structured_cases()
        .iter()
        .filter(|c| c.name.starts_with("tri_"))
    {
        let (e, p) = eval_in_dtype(c);
        let (tol_d, tol_s) = if c.dtype == "f32" {
            (1.001, 1.001)
        } else {
            (4.0, 10.0)
        };
        let errs = [
            band_error_in_u(c, &e, &c.exp, 0),
            band_error_in_u(c, &p, &c.phi1, 0),
            band_error_in_u(c, &e, &c.exp, 1),
            band_error_in_u(c, &p, &c.phi1, 1),
        ];
        assert!(
            errs[0] <= tol_d && errs[1] <= tol_d && errs[2] <= tol_s && errs[3] <= tol_s,
            "{} ({}): diagonal exp {:.2} u, φ1 {:.2} u; superdiagonal exp {:.2} u, φ1 {:.2} u",
            c.name,
            c.dtype,
            errs[0],
            errs[1],
            errs[2],
            errs[3]
        );
        for (w, e) in worst.iter_mut().zip(errs) {
            *w = w.max(e);
        }
        count += 1;
    }
    assert!(count >= 20, "{count} triangular cases");
    eprintln!(
        "{count} triangular cases: worst diagonal exp {:.2} u, φ1 {:.2} u; superdiagonal exp {:.2} u, φ1 {:.2} u",
        worst[0], worst[1], worst[2], worst[3]
    );
}

#[test]
fn triangular_results_match_mpmath_and_keep_their_structure() {
    // Claim: against the 400-digit references, relative Frobenius error ≤ 1.5e-14 (f64) and
    // ≤ 2e-6 (f32) for every triangular case (3× the worst measured: 4.9e-15, 6.4e-7, both
    // tri_constdiag_n12_0.5_1e2), and the strictly lower (upper, for lower inputs) part of
    // e^Z and φ1(Z) is exactly zero. Before: up to 1.1e-13 (f64, tri_lower_markov_n6_x100) and
    // 3.0e-6 (f32, tri_constdiag_n8_m1_1e4), and lower inputs got nonzero entries above the
    // diagonal (pivoting fill-in in the Padé solve).
    let mut worst = (0.0f64, 0.0f64);
    for c in structured_cases()
        .iter()
        .filter(|c| c.name.starts_with("tri_"))
    {
        let (e, p) = eval_in_dtype(c);
        let want_e = DMatrix::from_row_slice(c.n, c.n, &c.exp);
        let want_p = DMatrix::from_row_slice(c.n, c.n, &c.phi1);
        let (ee, pe) = (rel_err(&e, &want_e), rel_err(&p, &want_p));
        let bound = if c.dtype == "f32" { 2e-6 } else { 1.5e-14 };
        assert!(
            ee <= bound && pe <= bound,
            "{} ({}): exp {ee:.2e} phi1 {pe:.2e} > {bound:.0e}",
            c.name,
            c.dtype
        );
        let lower = c.name.contains("lower");
        for i in 0..c.n {
            for j in 0..c.n {
                let off = if lower { j > i } else { i > j };
                if off {
                    assert!(
                        e[(i, j)] == 0.0 && p[(i, j)] == 0.0,
                        "{} ({}): entry ({i}, {j}) is {:e} / {:e}",
                        c.name,
                        c.dtype,
                        e[(i, j)],
                        p[(i, j)]
                    );
                }
            }
        }
        let w = if c.dtype == "f32" {
            &mut worst.1
        } else {
            &mut worst.0
        };
        *w = w.max(ee).max(pe);
    }
    eprintln!(
        "triangular: worst relative Frobenius error f64 {:.2e}, f32 {:.2e}",
        worst.0, worst.1
    );
}

#[test]
fn badly_scaled_f32_matches_mpmath_within_conditioning() {
    // Claim: for badly scaled dense f32 matrices (diagonal similarities D⁻¹AD, D = 10^±2..3, of
    // random, non-normal and decaying A) the relative Frobenius error of e^Z and φ1(Z) is
    // ≤ 8e-6 (1.8× the worst measured, 4.5e-6 for exp of scaled32_nnscaled4_n6) and within the
    // first-order bound κ·u (u = 2⁻²⁴, κ = ‖K_f(Z)‖₂‖Z‖_F/‖f(Z)‖_F, Higham 2008 eq. 3.20; the
    // normwise κ of such matrices is large, 10³..10¹⁰, so this part is loose). Before f32
    // balancing (Real::BALANCE): exp of scaled32_dsim2_n8 had error 1.1e-5, now 1.3e-7, and its
    // first-superdiagonal entries up to 791 u relative, now 21 u (docs/numerics.md has every case,
    // before/after and SciPy's float32 expm).
    let mut worst = (0.0f64, 0.0f64);
    for c in structured_cases()
        .iter()
        .filter(|c| c.name.starts_with("scaled32_"))
    {
        let z = DMatrix::from_row_slice(c.n, c.n, &c.z);
        let (e, p) = eval_in_dtype(c);
        let want_e = DMatrix::from_row_slice(c.n, c.n, &c.exp);
        let want_p = DMatrix::from_row_slice(c.n, c.n, &c.phi1);
        let k_e = kron_cond(l_exp, &z) * z.norm() / want_e.norm();
        let k_p = kron_cond(l_phi1, &z) * z.norm() / want_p.norm();
        let (ee, pe) = (rel_err(&e, &want_e), rel_err(&p, &want_p));
        eprintln!(
            "{}: exp {ee:.2e} (κu {:.1e}), φ1 {pe:.2e} (κu {:.1e})",
            c.name,
            k_e * U32,
            k_p * U32
        );
        assert!(
            ee <= 8e-6 && pe <= 8e-6 && ee <= k_e * U32 && pe <= k_p * U32,
            "{}: exp {ee:.2e}, φ1 {pe:.2e}",
            c.name
        );
        worst = (worst.0.max(ee), worst.1.max(pe));
    }
    eprintln!(
        "badly scaled f32: worst exp {:.2e}, φ1 {:.2e}",
        worst.0, worst.1
    );
}

#[test]
fn frechet_of_triangular_matrices_matches_central_differences() {
    // Claim: the Fréchet derivatives (block-pair runs, which have no triangular path) agree with
    // central differences of expm/φ1 taken along a triangular direction (so f(Z ± hE) go through
    // the triangular path): the two paths are consistent. Bound as in
    // `frechet_matches_central_differences`: h²/6·e^{‖Z‖_F+h}‖E‖³ + 2ε√n e^{‖Z‖_F+h}/(2h),
    // h = 2⁻¹⁵, ε = 1e-14, ‖E‖_F = 1.
    let mut rng = ChaCha8Rng::seed_from_u64(28);
    for n in [2usize, 3, 5, 8] {
        for lower in [false, true] {
            let mut z = random(n, 3.0, &mut rng);
            let mut e = DMatrix::from_fn(n, n, |_, _| rng.random_range(-1.0..1.0));
            for i in 0..n {
                for j in 0..n {
                    if (i > j) != lower && i != j {
                        z[(i, j)] = 0.0;
                        e[(i, j)] = 0.0;
                    }
                }
            }
            z[(0, 0)] = z[(1, 1)]; // a repeated diagonal entry
            let e = &e / e.norm();
            let h = 2f64.powi(-15);
            let growth = (z.norm() + h).exp();
            let tol = h * h / 6.0 * growth + 1e-14 * (n as f64).sqrt() * growth / h;
            let (zp, zm) = (&z + &e * h, &z - &e * h);
            let fd_e = (expm(&zp).unwrap() - expm(&zm).unwrap()) / (2.0 * h);
            let fd_p = (phi1(&zp).unwrap() - phi1(&zm).unwrap()) / (2.0 * h);
            let de = (expm_frechet(&z, &e).unwrap() - &fd_e).norm();
            let dp = (phi1_frechet(&z, &e).unwrap() - &fd_p).norm();
            assert!(
                de <= tol && dp <= tol,
                "n={n} lower={lower}: exp {de:.2e}, φ1 {dp:.2e} > {tol:.2e}"
            );
        }
    }
}

#[test]
fn triangular_overflow_and_underflow_are_handled() {
    // A triangular input whose result leaves the range is a typed error (the exact diagonal
    // exp(800) is written as +∞ and reported), never an infinite or wrong finite result; one
    // whose result underflows is computed (zeros where e^{z_ii} underflows).
    let z = DMatrix::from_row_slice(2, 2, &[800.0, 1.0, 0.0, -1.0]);
    assert!(matches!(expm(&z), Err(ElraError::Overflow { .. })));
    assert!(matches!(phi1(&z), Err(ElraError::Overflow { .. })));
    let z32 = DMatrix::from_row_slice(2, 2, &[100.0f32, 1.0, 0.0, -1.0]);
    assert!(matches!(expm(&z32), Err(ElraError::Overflow { .. })));
    let z =
        DMatrix::<f64>::from_row_slice(3, 3, &[-1e300, 1.0, 2.0, 0.0, -2.0, 3.0, 0.0, 0.0, -1e300]);
    let (e, p) = expm_phi1(&z).unwrap();
    assert!(e.iter().all(|v| v.is_finite()) && p.iter().all(|v| v.is_finite()));
    assert_eq!((e[(0, 0)], e[(2, 2)], e[(1, 1)]), (0.0, 0.0, (-2f64).exp()));
    assert_eq!((p[(0, 0)], p[(1, 1)]), (1e-300, (-2f64).exp_m1() / -2.0));
}
