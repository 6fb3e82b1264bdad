//! The functional ops with `ELRA_NUM_THREADS=3` (set before the first op of this test binary, so
//! its products split into bands): fused forward and backward, the output-side pair and the
//! merge on sizes large enough to split, against the single-threaded reverse mode (`elra::grad`)
//! to rounding. The bands' bit-for-bit agreement with one call is a unit test of
//! `grad::ops`; this checks that the ops hand the split products the right views.

use elra::adapter::{GeneratorSpec, Variant};
use elra::grad::ops::{op_threads, Strided, StridedMut};
use elra::grad::{elra_backward_parts, elra_forward_parts, Route};
use elra::ops::{self, ElraOp, Generator, GeneratorGrads, Side};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[path = "common/strided.rs"]
mod strided;
use strided::{rand, read, rel, rows, GAP};

#[test]
fn split_products_give_the_single_threaded_results() {
    // Set before anything in this binary reads the environment: op_threads reads it once,
    // below, and this is the binary's only test.
    std::env::set_var("ELRA_NUM_THREADS", "3");
    assert_eq!(op_threads(), 3);
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    // N·k·r and d·k·r well above 2²⁰ multiply-adds per band; N, d and k above 2·64 rows.
    let (n, d, k, r) = (1100, 200, 300, 8);
    let spec = GeneratorSpec {
        alpha: 0.3,
        eta_mult: 0.9,
        tau: None,
        lambda: 0.0,
    };
    let op = ElraOp {
        variant: Variant::Hyb,
        d,
        k,
        r,
    };
    let w0 = rand(&mut rng, d, k, 0.1);
    let a = rand(&mut rng, d, r, 0.3);
    let b = rand(&mut rng, r, d, 0.3);
    let (x, dy) = (rand(&mut rng, n, k, 1.0), rand(&mut rng, n, d, 1.0));
    let eta = 0.7;
    let (ldw, ldx, ldy) = (k + 3, k + 1, d + 2);
    let (w0s, xs, dys, as_, bs) = (
        rows(&w0, ldw),
        rows(&x, ldx),
        rows(&dy, ldy),
        rows(&a, r),
        rows(&b, d),
    );
    let g = Generator {
        a: Strided::row_major(&as_, d, r, r).unwrap(),
        b: Some(Strided::row_major(&bs, r, d, d).unwrap()),
        eta,
    };
    let w0v = Strided::row_major(&w0s, d, k, ldw).unwrap();
    let xv = Strided::row_major(&xs, n, k, ldx).unwrap();
    let mut ys = vec![GAP; n * ldy];
    let mut saved = vec![0.0; ops::saved_len(n, r).unwrap()];
    let mut ws = vec![0.0; ops::workspace_len(n, r).unwrap()];
    ops::forward(
        &op,
        w0v,
        ops::Base::Included { bias: None },
        &g,
        &spec,
        xv,
        None,
        &mut StridedMut::row_major(&mut ys, n, d, ldy).unwrap(),
        &mut saved,
        &mut ws,
    )
    .unwrap();
    let (y_ref, tape) =
        elra_forward_parts(&x, &w0, &a, Some(&b), eta, &spec, Route::Woodbury, None).unwrap();
    assert!(rel(&read(&ys, n, d, ldy), &y_ref) < 1e-12);

    let mut dxs = vec![GAP; n * ldx];
    let (mut da, mut db, mut deta) = (vec![0.0; d * r], vec![0.0; r * d], 0.0);
    ops::backward(
        &op,
        w0v,
        true,
        &g,
        &spec,
        xv,
        None,
        &saved,
        Strided::row_major(&dys, n, d, ldy).unwrap(),
        &mut StridedMut::row_major(&mut dxs, n, k, ldx).unwrap(),
        GeneratorGrads {
            a: StridedMut::row_major(&mut da, d, r, r).unwrap(),
            b: Some(StridedMut::row_major(&mut db, r, d, d).unwrap()),
            eta: &mut deta,
            accumulate: false,
        },
        &mut ws,
    )
    .unwrap();
    let gr = elra_backward_parts(&x, &w0, &tape, dy.clone()).unwrap();
    assert!(rel(&read(&dxs, n, k, ldx), &gr.x) < 1e-11, "dx");
    assert!(rel(&read(&da, d, r, r), &gr.a) < 1e-11, "da");
    assert!(
        rel(&read(&db, r, d, d), gr.b.as_ref().unwrap()) < 1e-11,
        "db"
    );
    assert!(
        (deta - gr.eta).abs() < 1e-11 * gr.eta.abs().max(1e-3),
        "deta"
    );

    // The merge, W_new = exp(G) W0, against y = x W_newᵀ of the forward.
    let mut wn = vec![0.0; d * k];
    ops::merge(
        &op,
        &g,
        &spec,
        w0v,
        false,
        Side::Left,
        &mut StridedMut::row_major(&mut wn, d, k, k).unwrap(),
    )
    .unwrap();
    let y_merged = &x * read(&wn, d, k, k).transpose();
    assert!(rel(&y_merged, &y_ref) < 1e-12, "merge");
}
