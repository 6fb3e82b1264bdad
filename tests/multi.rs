//! Many adapters in one batch (`elra::ops::multi_forward`): every row equals its adapter run
//! alone on it — ELRA through the fused single-adapter forward (`ops::forward`, a different
//! evaluation order: `x Pᵀ` with `P = C W0` instead of `u Cᵀ`), LoRA through nalgebra — for any
//! permutation of the rows, empty segments, one adapter, 64 adapters, mixed ranks and variants,
//! base-only rows, segments longer than one gathered block; bad indices and adapters are typed
//! errors.

#[path = "common/strided.rs"]
mod strided;

use elra::adapter::{GeneratorConfig, Variant};
use elra::grad::ops::{Op, Strided, StridedMut};
use elra::ops::{
    self, multi_forward, multi_workspace_len, Base, ElraOp, Generator, MultiAdapter, MULTI_ROWS,
};
use elra::ElraError;
use nalgebra::DMatrix;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use strided::{rand, read, rel, rows, GAP};

/// The factors of one test adapter (f64), with what it is.
enum Spec {
    Elra {
        variant: Variant,
        a: DMatrix<f64>,
        b: Option<DMatrix<f64>>,
        eta: f64,
        step: usize,
    },
    Lora {
        a: DMatrix<f64>,
        b: DMatrix<f64>,
        scale: f64,
    },
}

fn config(variant: Variant) -> GeneratorConfig {
    let mut c = GeneratorConfig::paper_default(variant, 40);
    c.tau = Some(1.5);
    c
}

fn adapter_set(rng: &mut ChaCha8Rng, count: usize, d: usize, k: usize) -> Vec<Spec> {
    (0..count)
        .map(|i| {
            let r = 1 + (i * 7 + 3) % d.min(k).min(9);
            match i % 4 {
                3 => Spec::Lora {
                    a: rand(rng, r, k, 0.5),
                    b: rand(rng, d, r, 0.5),
                    scale: 0.5 + i as f64 * 0.1,
                },
                v => {
                    let variant = [Variant::General, Variant::Psd, Variant::Hyb][v];
                    Spec::Elra {
                        variant,
                        a: rand(rng, d, r, 0.6),
                        b: variant.uses_b().then(|| rand(rng, r, d, 0.6)),
                        eta: 0.2 + 0.05 * i as f64,
                        step: (i * 5) % 40,
                    }
                }
            }
        })
        .collect()
}

fn views(set: &[Spec]) -> Vec<MultiAdapter<'_, f64>> {
    set.iter()
        .map(|s| match s {
            Spec::Elra {
                variant,
                a,
                b,
                eta,
                step,
            } => MultiAdapter::Elra {
                variant: *variant,
                generator: Generator {
                    a: Strided::of(a, Op::N),
                    b: b.as_ref().map(|b| Strided::of(b, Op::N)),
                    eta: *eta,
                },
                spec: config(*variant).spec_at(*step),
            },
            Spec::Lora { a, b, scale } => MultiAdapter::Lora {
                a: Strided::of(a, Op::N),
                b: Strided::of(b, Op::N),
                scale: *scale,
            },
        })
        .collect()
}

/// Row `x` (1×k) through adapter `s` alone (or the base with `None`).
fn alone(s: Option<&Spec>, w0: &DMatrix<f64>, bias: &[f64], x: &DMatrix<f64>) -> DMatrix<f64> {
    let (d, k) = w0.shape();
    let n = x.nrows();
    let base = x * w0.transpose() + DMatrix::from_fn(n, d, |_, j| bias[j]);
    match s {
        None => base,
        Some(Spec::Lora { a, b, scale }) => base + (x * a.transpose()) * b.transpose() * *scale,
        Some(Spec::Elra {
            variant,
            a,
            b,
            eta,
            step,
        }) => {
            let r = a.ncols();
            let op = ElraOp {
                variant: *variant,
                d,
                k,
                r,
            };
            let g = Generator {
                a: Strided::of(a, Op::N),
                b: b.as_ref().map(|b| Strided::of(b, Op::N)),
                eta: *eta,
            };
            let mut y = DMatrix::zeros(n, d);
            let mut saved = vec![0.0; ops::saved_len(n, r).unwrap()];
            let mut ws = vec![0.0; ops::workspace_len(n, r).unwrap()];
            ops::forward(
                &op,
                Strided::of(w0, Op::N),
                Base::Included { bias: Some(bias) },
                &g,
                &config(*variant).spec_at(*step),
                Strided::of(x, Op::N),
                None,
                &mut StridedMut::of(&mut y),
                &mut saved,
                &mut ws,
            )
            .unwrap();
            y
        }
    }
}

/// Runs the multi-adapter forward on row-major buffers with gaps (ld = cols + 3).
fn run(
    set: &[Spec],
    w0: &DMatrix<f64>,
    bias: &[f64],
    index: &[i32],
    x: &DMatrix<f64>,
) -> Result<DMatrix<f64>, ElraError> {
    let (d, k) = w0.shape();
    let n = x.nrows();
    let (xb, w0b) = (rows(x, k + 3), rows(w0, k + 3));
    let mut yb = vec![GAP; n * (d + 3)];
    let max_r = set.iter().map(|s| match s {
        Spec::Elra { a, .. } => a.ncols(),
        Spec::Lora { a, .. } => a.nrows(),
    });
    let need = multi_workspace_len(n, d, k, max_r.max().unwrap_or(0)).unwrap();
    let mut ws = vec![f64::NAN; need];
    let adapters = views(set);
    multi_forward(
        Strided::row_major(&w0b, d, k, k + 3).unwrap(),
        Some(bias),
        &adapters,
        index,
        Strided::row_major(&xb, n, k, k + 3).unwrap(),
        &mut StridedMut::row_major(&mut yb, n, d, d + 3).unwrap(),
        &mut ws,
    )?;
    Ok(read(&yb, n, d, d + 3))
}

/// Checks every row of `y` against its adapter alone.
fn check_rows(
    set: &[Spec],
    w0: &DMatrix<f64>,
    bias: &[f64],
    index: &[i32],
    x: &DMatrix<f64>,
    y: &DMatrix<f64>,
) {
    for (i, &a) in index.iter().enumerate() {
        let xi = x.rows(i, 1).into_owned();
        let want = alone(usize::try_from(a).ok().map(|a| &set[a]), w0, bias, &xi);
        let got = y.rows(i, 1).into_owned();
        assert!(
            rel(&got, &want) <= 1e-12,
            "row {i} (adapter {a}): rel {:e}",
            rel(&got, &want)
        );
    }
}

#[test]
fn every_row_equals_its_adapter_alone_in_any_order() {
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    // (adapters, rows, d, k): one adapter; a few with empty segments; 64 adapters; a segment
    // longer than one gathered block (MULTI_ROWS).
    for (count, n, d, k) in [
        (1, 9, 12, 7),
        (6, 40, 10, 14),
        (64, 300, 16, 16),
        (2, 2 * MULTI_ROWS + 37, 9, 11),
    ] {
        let set = adapter_set(&mut rng, count, d, k);
        let w0 = rand(&mut rng, d, k, 0.4);
        let bias: Vec<f64> = (0..d).map(|j| j as f64 * 0.01 - 0.05).collect();
        let x = rand(&mut rng, n, k, 1.0);
        // Adapters 0 and count−1 get no rows when count ≥ 4 (empty segments); −1 is the base.
        let index: Vec<i32> = (0..n)
            .map(|_| {
                let lo = if count >= 4 { 1 } else { 0 };
                let hi = if count >= 4 { count - 1 } else { count };
                if rng.random_bool(0.1) {
                    -1
                } else {
                    rng.random_range(lo..hi) as i32
                }
            })
            .collect();
        let y = run(&set, &w0, &bias, &index, &x).unwrap();
        check_rows(&set, &w0, &bias, &index, &x, &y);
        // A permutation of the rows permutes the output rows, bit for bit.
        let mut perm: Vec<usize> = (0..n).collect();
        perm.shuffle(&mut rng);
        let xp = DMatrix::from_fn(n, k, |i, j| x[(perm[i], j)]);
        let ip: Vec<i32> = perm.iter().map(|&p| index[p]).collect();
        let yp = run(&set, &w0, &bias, &ip, &xp).unwrap();
        assert_eq!(
            yp,
            DMatrix::from_fn(n, d, |i, j| y[(perm[i], j)]),
            "count {count}"
        );
    }
}

#[test]
fn f32_matches_f64_and_an_empty_set_is_the_base() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (n, d, k) = (50, 24, 20);
    let set = adapter_set(&mut rng, 8, d, k);
    let w0 = rand(&mut rng, d, k, 0.4);
    let x = rand(&mut rng, n, k, 1.0);
    let index: Vec<i32> = (0..n).map(|i| (i % 9) as i32 - 1).collect();
    let y64 = run(&set, &w0, &[0.0; 24], &index, &x).unwrap();
    let c = |m: &DMatrix<f64>| m.map(|v| v as f32);
    // (LoRA's A, ELRA's A or LoRA's B, ELRA's B) in f32.
    type Factors32 = (Option<DMatrix<f32>>, DMatrix<f32>, Option<DMatrix<f32>>);
    let set32: Vec<Factors32> = set
        .iter()
        .map(|s| match s {
            Spec::Elra { a, b, .. } => (None, c(a), b.as_ref().map(c)),
            Spec::Lora { a, b, .. } => (Some(c(a)), c(b), None),
        })
        .collect();
    let adapters: Vec<MultiAdapter<'_, f32>> = set
        .iter()
        .zip(&set32)
        .map(|(s, (la, m, b))| match s {
            Spec::Elra {
                variant, eta, step, ..
            } => MultiAdapter::Elra {
                variant: *variant,
                generator: Generator {
                    a: Strided::of(m, Op::N),
                    b: b.as_ref().map(|b| Strided::of(b, Op::N)),
                    eta: *eta as f32,
                },
                spec: config(*variant).spec_at(*step),
            },
            Spec::Lora { scale, .. } => MultiAdapter::Lora {
                a: Strided::of(la.as_ref().unwrap(), Op::N),
                b: Strided::of(m, Op::N),
                scale: *scale as f32,
            },
        })
        .collect();
    let (w32, x32) = (c(&w0), c(&x));
    let mut y32 = DMatrix::<f32>::zeros(n, d);
    let mut ws = vec![0f32; multi_workspace_len(n, d, k, 9).unwrap()];
    multi_forward(
        Strided::of(&w32, Op::N),
        None,
        &adapters,
        &index,
        Strided::of(&x32, Op::N),
        &mut StridedMut::of(&mut y32),
        &mut ws,
    )
    .unwrap();
    let err = rel(&y32.map(|v| v as f64), &y64);
    assert!(err < 1e-5, "f32 vs f64: {err:e}");
    // No adapters: every row must be −1, and the result is the base layer.
    let base = run(&[], &w0, &[0.0; 24], &vec![-1; n], &x).unwrap();
    assert!(rel(&base, &(&x * w0.transpose())) < 1e-14);
}

#[test]
fn bad_indices_and_adapters_are_typed_errors() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let (n, d, k) = (6, 8, 5);
    let set = adapter_set(&mut rng, 4, d, k);
    let w0 = rand(&mut rng, d, k, 0.4);
    let x = rand(&mut rng, n, k, 1.0);
    let bias = [0.0; 8];
    for (bad, row) in [(4, 2), (-2, 5), (i32::MAX, 0), (i32::MIN, 3)] {
        let mut index = vec![0i32; n];
        index[row] = bad;
        match run(&set, &w0, &bias, &index, &x) {
            Err(ElraError::InvalidArgument {
                arg: "index",
                reason,
            }) => {
                assert!(reason.contains(&format!("row {row}")), "{reason}")
            }
            other => panic!("index {bad}: {other:?}"),
        }
    }
    // Too few indices.
    assert!(matches!(
        run(&set, &w0, &bias, &[0; 5], &x),
        Err(ElraError::InvalidArgument { arg: "index", .. })
    ));
    // An adapter of the wrong shape, a PSD adapter with B, a NaN factor: named by number.
    let mut broken = adapter_set(&mut rng, 3, d, k);
    broken[1] = Spec::Lora {
        a: rand(&mut rng, 2, k + 1, 0.5),
        b: rand(&mut rng, d, 2, 0.5),
        scale: 1.0,
    };
    let e = run(&broken, &w0, &bias, &[0; 6], &x).unwrap_err();
    assert!(
        matches!(&e, ElraError::InvalidArgument { arg: "adapters", reason } if reason.contains("adapter 1")),
        "{e}"
    );
    let mut broken = adapter_set(&mut rng, 3, d, k);
    if let Spec::Elra { b, .. } = &mut broken[1] {
        *b = Some(rand(&mut rng, 2, d, 0.5));
    }
    assert!(run(&broken, &w0, &bias, &[0; 6], &x)
        .unwrap_err()
        .to_string()
        .contains("adapter 1"));
    let mut broken = adapter_set(&mut rng, 3, d, k);
    if let Spec::Elra { a, .. } = &mut broken[2] {
        a[(0, 0)] = f64::NAN;
    }
    assert!(run(&broken, &w0, &bias, &[0; 6], &x)
        .unwrap_err()
        .to_string()
        .contains("adapter 2"));
    // A non-finite input row is named.
    let mut xn = x.clone();
    xn[(3, 1)] = f64::INFINITY;
    assert!(matches!(
        run(&set, &w0, &bias, &[0; 6], &xn),
        Err(ElraError::NonFinite { arg: "x" })
    ));
    // A workspace too small.
    let mut ws = vec![0.0; 3];
    let adapters = views(&set);
    let mut y = DMatrix::zeros(n, d);
    let e = multi_forward(
        Strided::of(&w0, Op::N),
        None,
        &adapters,
        &[0; 6],
        Strided::of(&x, Op::N),
        &mut StridedMut::of(&mut y),
        &mut ws,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            ElraError::InvalidArgument {
                arg: "workspace",
                ..
            }
        ),
        "{e}"
    );
}

/// The last error message of this thread (C ABI).
fn last_error() -> String {
    let mut buf = vec![0u8; 1024];
    // SAFETY: a writable local buffer of the stated length.
    let n = unsafe { elra::capi::elra_last_error_message(buf.as_mut_ptr().cast(), buf.len()) };
    String::from_utf8_lossy(&buf[..n.min(buf.len() - 1)]).into_owned()
}

#[test]
fn the_c_abi_gives_the_rust_result_and_refuses_bad_calls() {
    use elra::capi::{
        elra_op_multi_forward_f64, elra_op_multi_workspace, ElraMultiAdapter, ElraOpStep,
        ElraStatus,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(77);
    let (n, d, k) = (70, 12, 10);
    let set = adapter_set(&mut rng, 9, d, k);
    let w0 = rand(&mut rng, d, k, 0.4);
    let x = rand(&mut rng, n, k, 1.0);
    let bias: Vec<f64> = (0..d).map(|j| 0.1 * j as f64).collect();
    let index: Vec<i32> = (0..n).map(|i| ((i * 5) % 10) as i32 - 1).collect();
    let want = run(&set, &w0, &bias, &index, &x).unwrap();
    // Row-major copies of every factor, kept alive for the call.
    let rm = |m: &DMatrix<f64>| rows(m, m.ncols());
    let bufs: Vec<(Vec<f64>, Option<Vec<f64>>)> = set
        .iter()
        .map(|s| match s {
            Spec::Elra { a, b, .. } => (rm(a), b.as_ref().map(rm)),
            Spec::Lora { a, b, .. } => (rm(a), Some(rm(b))),
        })
        .collect();
    let descs: Vec<ElraMultiAdapter> = set
        .iter()
        .zip(&bufs)
        .map(|(s, (a, b))| {
            let b_ptr = b.as_ref().map_or(std::ptr::null(), |b| b.as_ptr().cast());
            match s {
                Spec::Elra {
                    variant,
                    a: am,
                    eta,
                    step,
                    ..
                } => {
                    let sp = config(*variant).spec_at(*step);
                    ElraMultiAdapter {
                        variant: match variant {
                            Variant::General => 0,
                            Variant::Psd => 1,
                            Variant::Hyb => 2,
                        },
                        r: am.ncols(),
                        a: a.as_ptr().cast(),
                        ld_a: am.ncols(),
                        b: b_ptr,
                        ld_b: d,
                        eta: *eta,
                        step: ElraOpStep {
                            alpha: sp.alpha,
                            eta_mult: sp.eta_mult,
                            tau: sp.tau.unwrap_or(0.0),
                            lambda: sp.lambda,
                        },
                    }
                }
                Spec::Lora { a: am, scale, .. } => ElraMultiAdapter {
                    variant: 3,
                    r: am.nrows(),
                    a: a.as_ptr().cast(),
                    ld_a: k,
                    b: b_ptr,
                    ld_b: am.nrows(),
                    eta: *scale,
                    step: ElraOpStep {
                        alpha: 0.0,
                        eta_mult: 1.0,
                        tau: 0.0,
                        lambda: 0.0,
                    },
                },
            }
        })
        .collect();
    let mut wl = 0;
    // SAFETY: a writable local.
    let s = unsafe { elra_op_multi_workspace(n, d, k, 9, &mut wl) };
    assert_eq!(
        (s, wl),
        (
            ElraStatus::ELRA_OK,
            multi_workspace_len(n, d, k, 9).unwrap()
        )
    );
    let (w0s, xs) = (rm(&w0), rm(&x));
    let mut ws = vec![0.0; wl];
    let call =
        |descs: &[ElraMultiAdapter], index: &[i32], y: &mut [f64], x: &[f64], ws: &mut [f64]| {
            // SAFETY: every pointer is a live local covering its described layout (or the call
            // is expected to refuse it before reading).
            unsafe {
                elra_op_multi_forward_f64(
                    descs.as_ptr(),
                    descs.len(),
                    index.as_ptr(),
                    n,
                    w0s.as_ptr(),
                    k,
                    d,
                    k,
                    bias.as_ptr(),
                    x.as_ptr(),
                    k,
                    y.as_mut_ptr(),
                    d,
                    ws.as_mut_ptr(),
                    ws.len(),
                )
            }
        };
    let mut y = vec![0.0; n * d];
    assert_eq!(
        call(&descs, &index, &mut y, &xs, &mut ws),
        ElraStatus::ELRA_OK,
        "{}",
        last_error()
    );
    assert_eq!(DMatrix::from_row_slice(n, d, &y), want);
    // An index outside the set, a LoRA adapter with a NULL factor, a short workspace, y over x.
    let mut bad = index.clone();
    bad[17] = 9;
    let mut y2 = vec![7.0; n * d];
    assert_eq!(
        call(&descs, &bad, &mut y2, &xs, &mut ws),
        ElraStatus::ELRA_INVALID_ARGUMENT
    );
    assert!(last_error().contains("row 17"), "{}", last_error());
    let mut broken = descs.clone();
    broken[3].b = std::ptr::null();
    assert_ne!(
        call(&broken, &index, &mut y2, &xs, &mut ws),
        ElraStatus::ELRA_OK
    );
    assert!(last_error().contains("adapter 3"), "{}", last_error());
    broken = descs.clone();
    broken[0].variant = 9;
    assert_ne!(
        call(&broken, &index, &mut y2, &xs, &mut ws),
        ElraStatus::ELRA_OK
    );
    assert!(last_error().contains("adapter 0"), "{}", last_error());
    assert_eq!(
        call(&descs, &index, &mut y2, &xs, &mut ws[..wl - 1]),
        ElraStatus::ELRA_INVALID_ARGUMENT
    );
    assert!(y2.iter().all(|&v| v == 7.0), "y written by a refused call");
    let mut xy = vec![0.0; n * d.max(k)];
    xy[..xs.len()].copy_from_slice(&xs);
    let xc = xy.clone();
    // SAFETY: x and y share `xy`: the library must refuse before writing.
    let s = unsafe {
        elra_op_multi_forward_f64(
            descs.as_ptr(),
            descs.len(),
            index.as_ptr(),
            n,
            w0s.as_ptr(),
            k,
            d,
            k,
            std::ptr::null(),
            xy.as_ptr(),
            k,
            xy.as_mut_ptr(),
            d,
            ws.as_mut_ptr(),
            wl,
        )
    };
    assert_eq!(s, ElraStatus::ELRA_INVALID_ARGUMENT);
    assert_eq!(xy, xc);
}
