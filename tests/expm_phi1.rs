//! Claims about the r×r matrix functions of `elra::linalg` (expm, φ1, Fréchet, batch).
#![allow(non_snake_case)]

use elra::linalg::{expm, expm_phi1, pade_plan, phi1};
use elra::ElraError;
use nalgebra::DMatrix;
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

/// φ1(Z) via nalgebra: the top-right block of exp([[Z, I], [0, 0]]).
fn phi1_by_block_exp(z: &DMatrix<f64>) -> DMatrix<f64> {
    let n = z.nrows();
    let mut b = DMatrix::zeros(2 * n, 2 * n);
    b.view_mut((0, 0), (n, n)).copy_from(z);
    b.view_mut((0, n), (n, n)).fill_with_identity();
    b.exp().view((0, n), (n, n)).into_owned()
}

#[test]
fn expm_and_phi1_agree_with_nalgebra_on_random_matrices() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut worst = (0.0f64, 0.0f64);
    for &n in &[1usize, 2, 3, 5, 8, 16] {
        for &nrm in &[1e-6, 1e-2, 0.3, 1.0, 3.0, 10.0] {
            let z = random(n, nrm, &mut rng);
            let (e, p) = expm_phi1(&z).unwrap();
            let ee = rel_err(&e, &z.exp());
            let pe = rel_err(&p, &phi1_by_block_exp(&z));
            worst = (worst.0.max(ee), worst.1.max(pe));
            assert!(ee < 1e-12, "n={n} norm={nrm} expm err {ee}");
            assert!(pe < 1e-12, "n={n} norm={nrm} phi1 err {pe}");
            assert_eq!(e, expm(&z).unwrap());
            assert_eq!(p, phi1(&z).unwrap());
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
