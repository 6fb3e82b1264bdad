//! The functional operations (`elra::ops`) against the hand-written reverse mode (`elra::grad`,
//! itself checked against central differences and the dense oracle in tests/gradients.rs):
//! the fused layer, the output-side form, merge/unmerge and the energy, for every variant, with
//! and without the spectral clip and dropout, on row-major caller buffers with gaps between rows
//! (which must stay untouched), in f64 and f32.

use elra::adapter::{ElraConfig, ElraLayer, GeneratorSpec, Variant};
use elra::grad::ops::{Strided, StridedMut};
use elra::grad::{
    elra_backward_parts, elra_forward_parts, energy_backward, exp_rows_backward, exp_rows_forward,
    FactorChain, Route,
};
use elra::ops::{self, ElraOp, Generator, GeneratorGrads};
use nalgebra::DMatrix;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[path = "common/strided.rs"]
mod strided;
use strided::{rand, read, rel, rows, GAP};

struct Case {
    variant: Variant,
    spec: GeneratorSpec,
    w0: DMatrix<f64>,
    a: DMatrix<f64>,
    b: Option<DMatrix<f64>>,
    eta: f64,
    x: DMatrix<f64>,
    dy: DMatrix<f64>,
    mask: Option<DMatrix<f64>>,
}

fn cases() -> Vec<Case> {
    let mut rng = ChaCha8Rng::seed_from_u64(29);
    let mut out = Vec::new();
    for variant in [Variant::General, Variant::Psd, Variant::Hyb] {
        for (tau, dropout) in [(None, false), (Some(0.7), false), (None, true)] {
            // Sizes straddle matrixmultiply's threshold (all dims > 5) and the loop below it.
            for &(d, k, r, n) in &[(9, 7, 3, 6), (4, 3, 2, 2), (12, 10, 8, 11)] {
                let alpha = match variant {
                    Variant::Hyb => 0.35,
                    Variant::Psd => 1.0,
                    Variant::General => 0.0,
                };
                let mask = dropout.then(|| {
                    DMatrix::from_fn(
                        n,
                        d,
                        |_, _| if rng.random::<f64>() < 0.3 { 0.0 } else { 1.25 },
                    )
                });
                out.push(Case {
                    variant,
                    spec: GeneratorSpec {
                        alpha,
                        eta_mult: 0.8,
                        tau,
                        lambda: 0.0,
                    },
                    w0: rand(&mut rng, d, k, 1.0),
                    a: rand(&mut rng, d, r, 0.6),
                    b: variant.uses_b().then(|| rand(&mut rng, r, d, 0.6)),
                    eta: 0.9,
                    x: rand(&mut rng, n, k, 1.0),
                    dy: rand(&mut rng, n, d, 1.0),
                    mask,
                });
            }
        }
    }
    out
}

fn op_of(c: &Case) -> ElraOp {
    ElraOp {
        variant: c.variant,
        d: c.w0.nrows(),
        k: c.w0.ncols(),
        r: c.a.ncols(),
    }
}

/// The fused forward and backward equal the reverse-mode reference (Woodbury route, λ = 0) to
/// rounding: relative 1e-12 in f64 (products of length ≤ 12 and one φ1 / adjoint evaluation).
#[test]
fn fused_layer_matches_the_reverse_mode() {
    for c in cases() {
        let op = op_of(&c);
        let (d, k, r) = (op.d, op.k, op.r);
        let n = c.x.nrows();
        let (ldw, ldx, ldy, lda, ldb) = (k + 2, k + 1, d + 3, r + 1, d + 2);
        let (w0s, xs, dys) = (rows(&c.w0, ldw), rows(&c.x, ldx), rows(&c.dy, ldy));
        let (as_, bs) = (rows(&c.a, lda), c.b.as_ref().map(|b| rows(b, ldb)));
        let g = Generator {
            a: Strided::row_major(&as_, d, r, lda).unwrap(),
            b: bs
                .as_ref()
                .map(|b| Strided::row_major(b, r, d, ldb).unwrap()),
            eta: c.eta,
        };
        let w0 = Strided::row_major(&w0s, d, k, ldw).unwrap();
        let x = Strided::row_major(&xs, n, k, ldx).unwrap();
        let ms = c.mask.as_ref().map(|m| rows(m, d));
        let mask = ms.as_ref().map(|m| Strided::row_major(m, n, d, d).unwrap());
        let mut ys = vec![GAP; n * ldy];
        let mut saved = vec![0.0; ops::saved_len(n, r).unwrap()];
        let mut ws = vec![0.0; ops::workspace_len(n, r).unwrap()];
        ops::forward(
            &op,
            w0,
            ops::Base::Included { bias: None },
            &g,
            &c.spec,
            x,
            mask,
            &mut StridedMut::row_major(&mut ys, n, d, ldy).unwrap(),
            &mut saved,
            &mut ws,
        )
        .unwrap();
        let (y_ref, tape) = elra_forward_parts(
            &c.x,
            &c.w0,
            &c.a,
            c.b.as_ref(),
            c.eta,
            &c.spec,
            Route::Woodbury,
            c.mask.as_ref(),
        )
        .unwrap();
        let y = read(&ys, n, d, ldy);
        assert!(
            rel(&y, &y_ref) < 1e-12,
            "{:?} y {}",
            c.variant,
            rel(&y, &y_ref)
        );

        let mut dxs = vec![GAP; n * ldx];
        let mut das = vec![GAP; d * lda];
        let mut dbs = vec![GAP; r * ldb];
        let mut deta = 0.0;
        ops::backward(
            &op,
            w0,
            true,
            &g,
            &c.spec,
            x,
            mask,
            &saved,
            Strided::row_major(&dys, n, d, ldy).unwrap(),
            &mut StridedMut::row_major(&mut dxs, n, k, ldx).unwrap(),
            GeneratorGrads {
                a: StridedMut::row_major(&mut das, d, r, lda).unwrap(),
                b: c.b
                    .is_some()
                    .then(|| StridedMut::row_major(&mut dbs, r, d, ldb).unwrap()),
                eta: &mut deta,
                accumulate: false,
            },
            &mut ws,
        )
        .unwrap();
        let gr = elra_backward_parts(&c.x, &c.w0, &tape, c.dy.clone()).unwrap();
        let tol = 1e-11;
        assert!(
            rel(&read(&dxs, n, k, ldx), &gr.x) < tol,
            "{:?} dx",
            c.variant
        );
        assert!(
            rel(&read(&das, d, r, lda), &gr.a) < tol,
            "{:?} da",
            c.variant
        );
        if let Some(gb) = &gr.b {
            assert!(rel(&read(&dbs, r, d, ldb), gb) < tol, "{:?} db", c.variant);
        } else {
            assert!(dbs.iter().all(|&v| v == GAP), "db written for PSD");
        }
        assert!(
            (deta - gr.eta).abs() <= tol * gr.eta.abs().max(1e-3),
            "{:?} deta",
            c.variant
        );

        // accumulate = true adds: a second backward doubles every gradient.
        let das1 = das.clone();
        let deta1 = deta;
        ops::backward(
            &op,
            w0,
            true,
            &g,
            &c.spec,
            x,
            mask,
            &saved,
            Strided::row_major(&dys, n, d, ldy).unwrap(),
            &mut StridedMut::row_major(&mut dxs, n, k, ldx).unwrap(),
            GeneratorGrads {
                a: StridedMut::row_major(&mut das, d, r, lda).unwrap(),
                b: c.b
                    .is_some()
                    .then(|| StridedMut::row_major(&mut dbs, r, d, ldb).unwrap()),
                eta: &mut deta,
                accumulate: true,
            },
            &mut ws,
        )
        .unwrap();
        assert_eq!(deta, deta1 + deta1);
        let twice = read(&das1, d, r, lda) * 2.0;
        assert!(rel(&read(&das, d, r, lda), &twice) < 1e-15);
    }
}

/// The output-side form equals the rows primitive of the reverse mode on `u = x W0ᵀ` with the
/// generator chain (`∂u`, `∂A`, `∂B`, `∂η`), to rounding.
#[test]
fn output_side_form_matches_the_rows_primitive() {
    for c in cases() {
        let op = op_of(&c);
        let (d, r) = (op.d, op.r);
        let n = c.x.nrows();
        let u = &c.x * c.w0.transpose();
        let (ldu, lda) = (d + 1, r);
        let us = rows(&u, ldu);
        let as_ = rows(&c.a, lda);
        let bs = c.b.as_ref().map(|b| rows(b, d));
        let g = Generator {
            a: Strided::row_major(&as_, d, r, lda).unwrap(),
            b: bs.as_ref().map(|b| Strided::row_major(b, r, d, d).unwrap()),
            eta: c.eta,
        };
        let ms = c.mask.as_ref().map(|m| rows(m, d));
        let mask = ms.as_ref().map(|m| Strided::row_major(m, n, d, d).unwrap());
        let us_view = Strided::row_major(&us, n, d, ldu).unwrap();
        let mut ys = vec![GAP; n * d];
        let mut saved = vec![0.0; ops::saved_len(n, r).unwrap()];
        let mut ws = vec![0.0; ops::workspace_len(n, r).unwrap()];
        ops::forward_out(
            &op,
            &g,
            &c.spec,
            us_view,
            mask,
            &mut StridedMut::row_major(&mut ys, n, d, d).unwrap(),
            &mut saved,
            &mut ws,
        )
        .unwrap();
        let alpha = if c.variant == Variant::Hyb {
            c.spec.alpha
        } else if c.variant == Variant::Psd {
            1.0
        } else {
            0.0
        };
        let (cc, chain) = FactorChain::new(
            &c.a,
            c.b.as_ref(),
            c.eta,
            c.spec.eta_mult,
            alpha,
            c.spec.tau,
        )
        .unwrap();
        let z = &cc * &c.a;
        let m = elra::linalg::phi1(&z).unwrap();
        let (y_ref, tape) = exp_rows_forward(&u, &c.a, &cc, &m, c.mask.as_ref()).unwrap();
        assert!(rel(&read(&ys, n, d, d), &y_ref) < 1e-12);
        let dys = rows(&c.dy, d);
        let mut dus = vec![GAP; n * ldu];
        let mut das = vec![GAP; d * lda];
        let mut dbs = vec![GAP; r * d];
        let mut deta = 0.0;
        ops::backward_out(
            &op,
            &g,
            &c.spec,
            us_view,
            mask,
            &saved,
            Strided::row_major(&dys, n, d, d).unwrap(),
            &mut StridedMut::row_major(&mut dus, n, d, ldu).unwrap(),
            GeneratorGrads {
                a: StridedMut::row_major(&mut das, d, r, lda).unwrap(),
                b: c.b
                    .is_some()
                    .then(|| StridedMut::row_major(&mut dbs, r, d, d).unwrap()),
                eta: &mut deta,
                accumulate: false,
            },
            &mut ws,
        )
        .unwrap();
        let gr = exp_rows_backward(&u, &c.a, &cc, &z, &m, &tape, c.dy.clone()).unwrap();
        let fg = chain.backward(&c.a, gr.a, gr.c).unwrap();
        let tol = 1e-11;
        assert!(rel(&read(&dus, n, d, ldu), &gr.x) < tol);
        assert!(rel(&read(&das, d, r, lda), &fg.a) < tol);
        if let Some(gb) = &fg.b {
            assert!(rel(&read(&dbs, r, d, d), gb) < tol);
        }
        assert!((deta - fg.eta).abs() <= tol * fg.eta.abs().max(1e-3));
    }
}

/// What the fused forward saves is LoRA's activation memory plus two r×r matrices: N·r values
/// besides `x` (LoRA keeps `x` and the N×r `x A'ᵀ`), never N×d.
#[test]
fn saved_activations_are_lora_sized() {
    for &(n, r) in &[(512, 8), (8192, 16), (1, 1)] {
        let lora = n * r;
        assert_eq!(ops::saved_len(n, r), Some(lora + 2 * r * r));
    }
    assert_eq!(ops::saved_len(usize::MAX, 2), None);
}

/// Merge and unmerge equal the layer's (eq. 30, Prop. 3), and the energy and its gradient the
/// reverse mode's `energy_backward` through the same chain.
#[test]
fn merge_unmerge_and_energy_match_the_layer() {
    let mut rng = ChaCha8Rng::seed_from_u64(30);
    for variant in [Variant::General, Variant::Psd, Variant::Hyb] {
        let (d, k, r) = (8, 6, 3);
        let mut cfg = ElraConfig::new(variant, d, k, r, 100);
        cfg.generator.eta = 0.7;
        cfg.generator.tau = Some(1.5);
        cfg.generator.lambda = 0.01;
        let w0 = rand(&mut rng, d, k, 1.0);
        let mut layer = ElraLayer::new(cfg, w0.clone()).unwrap();
        layer.set_step(10);
        let spec = layer.spec();
        let op = ElraOp { variant, d, k, r };
        let a = layer.a().clone();
        let b = layer.b().cloned();
        let g = Generator {
            a: Strided::of(&a, elra::grad::ops::Op::N),
            b: b.as_ref().map(|b| Strided::of(b, elra::grad::ops::Op::N)),
            eta: layer.eta(),
        };
        let mut out = DMatrix::zeros(d, k);
        let w0v = Strided::of(&w0, elra::grad::ops::Op::N);
        ops::merge(
            &op,
            &g,
            &spec,
            w0v,
            false,
            ops::Side::Left,
            &mut StridedMut::of(&mut out),
        )
        .unwrap();
        let merged = layer.merge().unwrap();
        assert!(rel(&out, &merged) < 1e-13);
        let mut back = DMatrix::zeros(d, k);
        let mv = Strided::of(&merged, elra::grad::ops::Op::N);
        ops::merge(
            &op,
            &g,
            &spec,
            mv,
            true,
            ops::Side::Left,
            &mut StridedMut::of(&mut back),
        )
        .unwrap();
        assert!(rel(&back, &w0) < 1e-13);
        // The right side (App. B): W exp(G) for a k×d W, against the dense exponential.
        let (cc, _) = FactorChain::new(
            &a,
            b.as_ref(),
            layer.eta(),
            spec.eta_mult,
            layer.alpha(),
            spec.tau,
        )
        .unwrap();
        let dense = (&a * &cc).exp();
        let wr = rand(&mut rng, k, d, 1.0);
        let mut outr = DMatrix::zeros(k, d);
        let wrv = Strided::of(&wr, elra::grad::ops::Op::N);
        ops::merge(
            &op,
            &g,
            &spec,
            wrv,
            false,
            ops::Side::Right,
            &mut StridedMut::of(&mut outr),
        )
        .unwrap();
        assert!(rel(&outr, &(&wr * &dense)) < 1e-13);
        let mut backr = DMatrix::zeros(k, d);
        let ov = Strided::of(&outr, elra::grad::ops::Op::N);
        ops::merge(
            &op,
            &g,
            &spec,
            ov,
            true,
            ops::Side::Right,
            &mut StridedMut::of(&mut backr),
        )
        .unwrap();
        assert!(rel(&backr, &wr) < 1e-13);

        let mut da = DMatrix::zeros(d, r);
        let mut db = DMatrix::zeros(r, d);
        let mut deta = 0.0;
        let e = ops::energy(
            &op,
            &g,
            &spec,
            Some(GeneratorGrads {
                a: StridedMut::of(&mut da),
                b: b.is_some().then(|| StridedMut::of(&mut db)),
                eta: &mut deta,
                accumulate: false,
            }),
        )
        .unwrap();
        assert!((e - layer.energy_penalty().unwrap()).abs() <= 1e-13 * e);
        let (cc, chain) = FactorChain::new(
            &a,
            b.as_ref(),
            layer.eta(),
            spec.eta_mult,
            layer.alpha(),
            spec.tau,
        )
        .unwrap();
        let (_, ea, ec) = energy_backward(&a, &cc, spec.lambda).unwrap();
        let fg = chain.backward(&a, ea, ec).unwrap();
        assert!(rel(&da, &fg.a) < 1e-13);
        if let Some(gb) = &fg.b {
            assert!(rel(&db, gb) < 1e-13);
        }
        assert!((deta - fg.eta).abs() <= 1e-13 * fg.eta.abs().max(1e-12));
    }
}

/// f32 buffers give the f64 result to f32 rounding, and bad input is a typed error that leaves
/// the outputs untouched.
#[test]
fn f32_and_bad_input() {
    let c = &cases()[0];
    let op = op_of(c);
    let (d, k, r) = (op.d, op.k, op.r);
    let n = c.x.nrows();
    let f = |m: &DMatrix<f64>| -> Vec<f32> {
        let mut v = Vec::new();
        for i in 0..m.nrows() {
            v.extend(m.row(i).iter().map(|&x| x as f32));
        }
        v
    };
    let (w0s, xs, as_) = (f(&c.w0), f(&c.x), f(&c.a));
    let bs = c.b.as_ref().map(f);
    let g = Generator {
        a: Strided::row_major(&as_, d, r, r).unwrap(),
        b: bs.as_ref().map(|b| Strided::row_major(b, r, d, d).unwrap()),
        eta: c.eta as f32,
    };
    let mut ys = vec![0.0f32; n * d];
    let mut saved = vec![0.0f32; ops::saved_len(n, r).unwrap()];
    let mut ws = vec![0.0f32; ops::workspace_len(n, r).unwrap()];
    let w0 = Strided::row_major(&w0s, d, k, k).unwrap();
    let x = Strided::row_major(&xs, n, k, k).unwrap();
    ops::forward(
        &op,
        w0,
        ops::Base::Included { bias: None },
        &g,
        &c.spec,
        x,
        None,
        &mut StridedMut::row_major(&mut ys, n, d, d).unwrap(),
        &mut saved,
        &mut ws,
    )
    .unwrap();
    let (y_ref, _) = elra_forward_parts(
        &c.x,
        &c.w0,
        &c.a,
        c.b.as_ref(),
        c.eta,
        &c.spec,
        Route::Woodbury,
        None,
    )
    .unwrap();
    let y = DMatrix::from_fn(n, d, |i, j| ys[i * d + j] as f64);
    assert!(rel(&y, &y_ref) < 2e-6, "{}", rel(&y, &y_ref));
    // Non-finite x, too small a workspace, a wrong bias length: errors, y untouched.
    let mut bad = xs.clone();
    bad[0] = f32::NAN;
    let mut y2 = vec![7.0f32; n * d];
    let xb = Strided::row_major(&bad, n, k, k).unwrap();
    let e = ops::forward(
        &op,
        w0,
        ops::Base::Included { bias: None },
        &g,
        &c.spec,
        xb,
        None,
        &mut StridedMut::row_major(&mut y2, n, d, d).unwrap(),
        &mut saved,
        &mut ws,
    );
    assert!(
        matches!(e, Err(elra::ElraError::NonFinite { arg: "x" })),
        "{e:?}"
    );
    let mut small = vec![0.0f32; 1];
    let e = ops::forward(
        &op,
        w0,
        ops::Base::Included { bias: None },
        &g,
        &c.spec,
        x,
        None,
        &mut StridedMut::row_major(&mut y2, n, d, d).unwrap(),
        &mut saved,
        &mut small,
    );
    assert!(
        matches!(
            e,
            Err(elra::ElraError::InvalidArgument {
                arg: "workspace",
                ..
            })
        ),
        "{e:?}"
    );
    let bias = vec![0.0f32; d + 1];
    let e = ops::forward(
        &op,
        w0,
        ops::Base::Included { bias: Some(&bias) },
        &g,
        &c.spec,
        x,
        None,
        &mut StridedMut::row_major(&mut y2, n, d, d).unwrap(),
        &mut saved,
        &mut ws,
    );
    assert!(
        matches!(e, Err(elra::ElraError::Shape { arg: "bias", .. })),
        "{e:?}"
    );
    assert!(y2.iter().all(|&v| v == 7.0));
}

/// The C ABI of the functional calls gives the Rust functions' results bit for bit, refuses
/// aliased outputs, short workspaces and bad flags with a status (outputs untouched), and
/// `elra_schedule_at` is `GeneratorConfig::spec_at`.
#[test]
fn c_abi_matches_the_rust_functions() {
    use elra::capi::*;
    let c = &cases()[1];
    let op = op_of(c);
    let (d, k, r) = (op.d, op.k, op.r);
    let n = c.x.nrows();
    let rm = |m: &DMatrix<f64>| rows(m, m.ncols());
    let (w0s, xs, as_, dys) = (rm(&c.w0), rm(&c.x), rm(&c.a), rm(&c.dy));
    let bs = rm(c.b.as_ref().unwrap());
    let desc = ElraOpDesc {
        variant: 0,
        d,
        k,
        r,
    };
    let step = ElraOpStep {
        alpha: c.spec.alpha,
        eta_mult: c.spec.eta_mult,
        tau: c.spec.tau.unwrap_or(0.0),
        lambda: 0.0,
    };
    let (mut sl, mut wl) = (0, 0);
    // SAFETY: live locals.
    assert_eq!(
        unsafe { elra_op_sizes(&desc, n, &mut sl, &mut wl) },
        ElraStatus::ELRA_OK
    );
    assert_eq!((sl, wl), (n * r + 2 * r * r, 3 * n * r));
    let mut y = vec![0.0; n * d];
    let mut saved = vec![0.0; sl];
    let mut ws = vec![0.0; wl];
    // SAFETY: every buffer is a live local of the described size.
    let s = unsafe {
        elra_op_forward_f64(
            &desc,
            &step,
            n,
            w0s.as_ptr(),
            k,
            1,
            std::ptr::null(),
            as_.as_ptr(),
            r,
            bs.as_ptr(),
            d,
            c.eta,
            xs.as_ptr(),
            k,
            std::ptr::null(),
            y.as_mut_ptr(),
            d,
            saved.as_mut_ptr(),
            ws.as_mut_ptr(),
            wl,
        )
    };
    assert_eq!(s, ElraStatus::ELRA_OK);
    let g = Generator {
        a: Strided::row_major(&as_, d, r, r).unwrap(),
        b: Some(Strided::row_major(&bs, r, d, d).unwrap()),
        eta: c.eta,
    };
    let mut y_rs = vec![0.0; n * d];
    let mut saved_rs = vec![0.0; sl];
    let w0 = Strided::row_major(&w0s, d, k, k).unwrap();
    let x = Strided::row_major(&xs, n, k, k).unwrap();
    elra::ops::forward(
        &op,
        w0,
        elra::ops::Base::Included { bias: None },
        &g,
        &c.spec,
        x,
        None,
        &mut StridedMut::row_major(&mut y_rs, n, d, d).unwrap(),
        &mut saved_rs,
        &mut ws,
    )
    .unwrap();
    assert_eq!(y, y_rs);
    assert_eq!(saved, saved_rs);
    let (mut dx, mut da, mut db, mut deta) =
        (vec![0.0; n * k], vec![0.0; d * r], vec![0.0; r * d], 0.0);
    // SAFETY: as above.
    let s = unsafe {
        elra_op_backward_f64(
            &desc,
            &step,
            n,
            w0s.as_ptr(),
            k,
            1,
            as_.as_ptr(),
            r,
            bs.as_ptr(),
            d,
            c.eta,
            xs.as_ptr(),
            k,
            std::ptr::null(),
            saved.as_ptr(),
            dys.as_ptr(),
            d,
            dx.as_mut_ptr(),
            k,
            da.as_mut_ptr(),
            r,
            db.as_mut_ptr(),
            d,
            &mut deta,
            0,
            ws.as_mut_ptr(),
            wl,
        )
    };
    assert_eq!(s, ElraStatus::ELRA_OK);
    let (mut dx2, mut da2, mut db2, mut deta2) =
        (vec![0.0; n * k], vec![0.0; d * r], vec![0.0; r * d], 0.0);
    elra::ops::backward(
        &op,
        w0,
        true,
        &g,
        &c.spec,
        x,
        None,
        &saved_rs,
        Strided::row_major(&dys, n, d, d).unwrap(),
        &mut StridedMut::row_major(&mut dx2, n, k, k).unwrap(),
        GeneratorGrads {
            a: StridedMut::row_major(&mut da2, d, r, r).unwrap(),
            b: Some(StridedMut::row_major(&mut db2, r, d, d).unwrap()),
            eta: &mut deta2,
            accumulate: false,
        },
        &mut ws,
    )
    .unwrap();
    assert_eq!((dx, da, db, deta), (dx2, da2, db2, deta2));
    // y aliasing x, a short workspace, accumulate = 2: statuses, y untouched.
    let mut y3 = vec![5.0; n * d];
    let mut xa = xs.clone();
    // SAFETY: `xa` is used both as x and y: the library must refuse before touching it.
    let s = unsafe {
        elra_op_forward_f64(
            &desc,
            &step,
            n,
            w0s.as_ptr(),
            k,
            1,
            std::ptr::null(),
            as_.as_ptr(),
            r,
            bs.as_ptr(),
            d,
            c.eta,
            xa.as_ptr(),
            k,
            std::ptr::null(),
            xa.as_mut_ptr(),
            k.max(d),
            saved.as_mut_ptr(),
            ws.as_mut_ptr(),
            wl,
        )
    };
    assert!(matches!(
        s,
        ElraStatus::ELRA_INVALID_ARGUMENT | ElraStatus::ELRA_SHAPE_MISMATCH
    ));
    assert_eq!(xa, xs);
    // SAFETY: live locals; workspace_len understated.
    let s = unsafe {
        elra_op_forward_f64(
            &desc,
            &step,
            n,
            w0s.as_ptr(),
            k,
            1,
            std::ptr::null(),
            as_.as_ptr(),
            r,
            bs.as_ptr(),
            d,
            c.eta,
            xs.as_ptr(),
            k,
            std::ptr::null(),
            y3.as_mut_ptr(),
            d,
            saved.as_mut_ptr(),
            ws.as_mut_ptr(),
            wl - 1,
        )
    };
    assert_eq!(s, ElraStatus::ELRA_INVALID_ARGUMENT);
    assert!(y3.iter().all(|&v| v == 5.0));
    // elra_schedule_at = GeneratorConfig::spec_at.
    let mut cfg = std::mem::MaybeUninit::<ElraAdapterConfig>::uninit();
    // SAFETY: writable locals.
    unsafe { elra_adapter_config_default(2, 1, d, k, r, 200, cfg.as_mut_ptr()) };
    // SAFETY: initialised above.
    let cfg = unsafe { cfg.assume_init() };
    let mut out = ElraOpStep {
        alpha: 0.0,
        eta_mult: 0.0,
        tau: 0.0,
        lambda: 0.0,
    };
    // SAFETY: live locals.
    assert_eq!(
        unsafe { elra_schedule_at(&cfg, 30, &mut out) },
        ElraStatus::ELRA_OK
    );
    let want = elra::adapter::GeneratorConfig::paper_default(Variant::Hyb, 200).spec_at(30);
    assert_eq!(
        (out.alpha, out.eta_mult, out.tau, out.lambda),
        (want.alpha, want.eta_mult, 2.0, want.lambda)
    );
}

/// `Base::Excluded` gives the increment alone: adding the frozen layer `x W0ᵀ` (and `∂y W0`) to
/// it gives the fused layer's output (and `∂x`) to rounding; gradients are the same. Outputs
/// start as NaN (write-only).
#[test]
fn the_increment_alone_plus_the_frozen_layer_is_the_fused_layer() {
    for c in cases().iter().filter(|c| c.w0.nrows() > 5) {
        let op = op_of(c);
        let (d, k, r) = (op.d, op.k, op.r);
        let n = c.x.nrows();
        let g = Generator {
            a: Strided::of(&c.a, elra::grad::ops::Op::N),
            b: c.b.as_ref().map(|b| Strided::of(b, elra::grad::ops::Op::N)),
            eta: c.eta,
        };
        let (w0, x, dy) = (
            Strided::of(&c.w0, elra::grad::ops::Op::N),
            Strided::of(&c.x, elra::grad::ops::Op::N),
            Strided::of(&c.dy, elra::grad::ops::Op::N),
        );
        let mask = c
            .mask
            .as_ref()
            .map(|m| Strided::of(m, elra::grad::ops::Op::N));
        // Every output, saved buffer and workspace starts as NaN: what they held must never
        // be read (an engine hands over uninitialised memory).
        let run = |base: bool| {
            let nan = f64::NAN;
            let mut y = DMatrix::from_element(n, d, nan);
            let mut dx = DMatrix::from_element(n, k, nan);
            let (mut da, mut db, mut deta) = (
                DMatrix::from_element(d, r, nan),
                DMatrix::from_element(r, d, nan),
                nan,
            );
            let mut saved = vec![nan; ops::saved_len(n, r).unwrap()];
            let mut ws = vec![nan; ops::workspace_len(n, r).unwrap()];
            let b = if base {
                ops::Base::Included { bias: None }
            } else {
                ops::Base::Excluded
            };
            ops::forward(
                &op,
                w0,
                b,
                &g,
                &c.spec,
                x,
                mask,
                &mut StridedMut::of(&mut y),
                &mut saved,
                &mut ws,
            )
            .unwrap();
            ops::backward(
                &op,
                w0,
                base,
                &g,
                &c.spec,
                x,
                mask,
                &saved,
                dy,
                &mut StridedMut::of(&mut dx),
                GeneratorGrads {
                    a: StridedMut::of(&mut da),
                    b: c.b.is_some().then(|| StridedMut::of(&mut db)),
                    eta: &mut deta,
                    accumulate: false,
                },
                &mut ws,
            )
            .unwrap();
            (y, dx, da, db, deta)
        };
        let full = run(true);
        let inc = run(false);
        assert!(rel(&(inc.0 + &c.x * c.w0.transpose()), &full.0) < 1e-13);
        assert!(rel(&(inc.1 + &c.dy * &c.w0), &full.1) < 1e-13);
        assert_eq!((&inc.2, inc.4), (&full.2, full.4));
        if c.b.is_some() {
            assert_eq!(inc.3, full.3);
        }
    }
}

/// A row-major view of `s` (rows × cols, no gaps).
fn rm(s: &[f64], rows: usize, cols: usize) -> Strided<'_, f64> {
    Strided::row_major(s, rows, cols, cols).unwrap()
}

/// A NaN or ±∞ in any large input (`w0`, `x`, `dy`, `u`) is named by its argument, also where
/// the factors are zero: the ops detect these through the products that read them (`P = C W0`,
/// `V = X Pᵀ`, `T̄ = Ȳ A`, `∂P = V̄ᵀ X`, `C̄ = V̄ᵀ u`, where `0·∞` is NaN) and scan the input only then.
#[test]
fn every_non_finite_large_input_is_named() {
    type Out = Result<(), elra::ElraError>;
    let named =
        |e: Out, arg: &str| matches!(e, Err(elra::ElraError::NonFinite { arg: a }) if a == arg);
    for ci in 0..cases().len() {
        for zero in [false, true] {
            let mut c = cases().swap_remove(ci);
            if zero {
                c.a.fill(0.0);
                if let Some(b) = c.b.as_mut() {
                    b.fill(0.0);
                }
            }
            let op = op_of(&c);
            let (d, k, r) = (op.d, op.k, op.r);
            let n = c.x.nrows();
            let as_ = rows(&c.a, r);
            let bs = c.b.as_ref().map(|b| rows(b, d));
            let g = Generator {
                a: Strided::row_major(&as_, d, r, r).unwrap(),
                b: bs.as_ref().map(|b| Strided::row_major(b, r, d, d).unwrap()),
                eta: c.eta,
            };
            let ms = c.mask.as_ref().map(|m| rows(m, d));
            let mask = ms.as_ref().map(|m| Strided::row_major(m, n, d, d).unwrap());
            let (w0s, xs, dys) = (rows(&c.w0, k), rows(&c.x, k), rows(&c.dy, d));
            let us = rows(&(&c.x * c.w0.transpose()), d);
            let mut saved = vec![0.0; ops::saved_len(n, r).unwrap()];
            let mut saved_u = saved.clone();
            let mut ws = vec![0.0; ops::workspace_len(n, r).unwrap()];
            let (mut y, mut dx, mut du) = (vec![0.0; n * d], vec![0.0; n * k], vec![0.0; n * d]);
            let (mut da, mut db, mut deta) = (vec![0.0; d * r], vec![0.0; r * d], 0.0);
            // Clean runs give the saved values the backwards need.
            let fwd =
                |w0: &[f64], x: &[f64], base, y: &mut [f64], saved: &mut [f64], ws: &mut [f64]| {
                    ops::forward(
                        &op,
                        rm(w0, d, k),
                        base,
                        &g,
                        &c.spec,
                        rm(x, n, k),
                        mask,
                        &mut StridedMut::row_major(y, n, d, d).unwrap(),
                        saved,
                        ws,
                    )
                };
            fwd(&w0s, &xs, ops::Base::Excluded, &mut y, &mut saved, &mut ws).unwrap();
            let fwd_u = |u: &[f64], y: &mut [f64], saved: &mut [f64], ws: &mut [f64]| {
                ops::forward_out(
                    &op,
                    &g,
                    &c.spec,
                    rm(u, n, d),
                    mask,
                    &mut StridedMut::row_major(y, n, d, d).unwrap(),
                    saved,
                    ws,
                )
            };
            fwd_u(&us, &mut y, &mut saved_u, &mut ws).unwrap();
            for (vi, bad) in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY]
                .into_iter()
                .enumerate()
            {
                let at = |len: usize| (ci * 7 + vi * 13 + zero as usize * 5) % len.max(1);
                let spoil = |s: &[f64]| {
                    let mut v = s.to_vec();
                    let i = at(v.len());
                    v[i] = bad;
                    v
                };
                let (w0b, xb, dyb, ub) = (spoil(&w0s), spoil(&xs), spoil(&dys), spoil(&us));
                let tag = format!("case {ci}, zero factors {zero}, value {bad}");
                for base in [true, false] {
                    let b = || {
                        if base {
                            ops::Base::Included { bias: None }
                        } else {
                            ops::Base::Excluded
                        }
                    };
                    assert!(
                        named(
                            fwd(&w0b, &xs, b(), &mut y, &mut saved.clone(), &mut ws),
                            "w0"
                        ),
                        "fwd w0 {tag}"
                    );
                    assert!(
                        named(
                            fwd(&w0s, &xb, b(), &mut y, &mut saved.clone(), &mut ws),
                            "x"
                        ),
                        "fwd x {tag}"
                    );
                    let mut bwd = |w0: &[f64], x: &[f64], dy: &[f64]| {
                        ops::backward(
                            &op,
                            rm(w0, d, k),
                            base,
                            &g,
                            &c.spec,
                            rm(x, n, k),
                            mask,
                            &saved,
                            rm(dy, n, d),
                            &mut StridedMut::row_major(&mut dx, n, k, k).unwrap(),
                            GeneratorGrads {
                                a: StridedMut::row_major(&mut da, d, r, r).unwrap(),
                                b: c.b
                                    .is_some()
                                    .then(|| StridedMut::row_major(&mut db, r, d, d).unwrap()),
                                eta: &mut deta,
                                accumulate: false,
                            },
                            &mut ws,
                        )
                    };
                    assert!(named(bwd(&w0b, &xs, &dys), "w0"), "bwd w0 {tag}");
                    assert!(named(bwd(&w0s, &xb, &dys), "x"), "bwd x {tag}");
                    assert!(named(bwd(&w0s, &xs, &dyb), "dy"), "bwd dy {tag}");
                    assert!(bwd(&w0s, &xs, &dys).is_ok(), "bwd clean {tag}");
                }
                assert!(
                    named(fwd_u(&ub, &mut y, &mut saved_u.clone(), &mut ws), "u"),
                    "fwd_out u {tag}"
                );
                let mut bwd_u = |u: &[f64], dy: &[f64]| {
                    ops::backward_out(
                        &op,
                        &g,
                        &c.spec,
                        rm(u, n, d),
                        mask,
                        &saved_u,
                        rm(dy, n, d),
                        &mut StridedMut::row_major(&mut du, n, d, d).unwrap(),
                        GeneratorGrads {
                            a: StridedMut::row_major(&mut da, d, r, r).unwrap(),
                            b: c.b
                                .is_some()
                                .then(|| StridedMut::row_major(&mut db, r, d, d).unwrap()),
                            eta: &mut deta,
                            accumulate: false,
                        },
                        &mut ws,
                    )
                };
                assert!(named(bwd_u(&ub, &dys), "u"), "bwd_out u {tag}");
                assert!(named(bwd_u(&us, &dyb), "dy"), "bwd_out dy {tag}");
                assert!(bwd_u(&us, &dys).is_ok(), "bwd_out clean {tag}");
            }
        }
    }
}
