//! The training stack: harness gradients, the recipe, error reporting, GA seeding and `fit`.
#![allow(non_snake_case)]

use elra::adapter::Variant;
use elra::train::{
    fit, Activation, AdaptedNetwork, AdapterSpec, FitMethod, FitOptions, FrozenNetwork, LossKind,
    Targets, TrainConfig, Trainer,
};
use elra::ElraError;
use nalgebra::DMatrix;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn randn(rng: &mut ChaCha8Rng, r: usize, c: usize) -> DMatrix<f64> {
    DMatrix::from_fn(r, c, |_, _| rng.random_range(-1.0..1.0))
}

fn specs() -> Vec<AdapterSpec> {
    vec![
        AdapterSpec::Lora {
            r: 2,
            lora_alpha: 4.0,
        },
        AdapterSpec::Elra {
            variant: Variant::General,
            r: 2,
        },
        AdapterSpec::Elra {
            variant: Variant::Psd,
            r: 3,
        },
        AdapterSpec::Elra {
            variant: Variant::Hyb,
            r: 2,
        },
        AdapterSpec::ElraDouble {
            variant: Variant::General,
            r: 2,
        },
        AdapterSpec::ElraDouble {
            variant: Variant::Psd,
            r: 3,
        },
        AdapterSpec::ElraDouble {
            variant: Variant::Hyb,
            r: 2,
        },
    ]
}

/// The whole harness (activations, biases, dropout masks, energy, the `log η` chain, parameter
/// order) against five-point central differences of its own loss along random directions.
/// Tolerance 1e-6 relative to the Cauchy–Schwarz bound, step 1e-3 × block RMS (truncation
/// ~1e-12, rounding ~u|L|/h ≈ 1e-12 relative; see tests/gradients.rs for the reasoning).
#[test]
fn training_network_gradient_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let base =
        FrozenNetwork::<f64>::random(&[5, 6, 4, 3], Activation::Tanh, Activation::Identity, 3)
            .unwrap();
    for (si, spec) in specs().into_iter().enumerate() {
        for loss in [LossKind::Mse, LossKind::CrossEntropy] {
            let mut net = AdaptedNetwork::new(&base, spec, loss, 50, 7 + si as u64).unwrap();
            net.set_step(9).unwrap();
            // Move away from the initial point (LoRA's B' = 0, ELRA's tiny η) so every term
            // of the gradient is exercised.
            let mut p = net.params();
            for m in p.iter_mut() {
                if m.len() == 1 {
                    m[0] = (0.3f64).ln();
                } else {
                    *m = randn(&mut rng, m.nrows(), m.ncols()) * 0.5;
                }
            }
            net.set_params(p.clone()).unwrap();
            let x = randn(&mut rng, 7, 5);
            let targets = match loss {
                LossKind::Mse => Targets::Values(randn(&mut rng, 7, 3)),
                LossKind::CrossEntropy => Targets::Labels((0..7).map(|i| i % 3).collect()),
            };
            let masks = net.sample_masks(7, 0.3, &mut rng).unwrap();
            let lg = net.loss_and_grad(&x, &targets, Some(&masks)).unwrap();
            let f = |q: &[DMatrix<f64>]| {
                let mut n2 = net.clone();
                n2.set_params(q.to_vec()).unwrap();
                let r = n2.loss_and_grad(&x, &targets, Some(&masks)).unwrap();
                r.loss + r.energy
            };
            for _ in 0..3 {
                let dir: Vec<DMatrix<f64>> = p
                    .iter()
                    .map(|m| {
                        let s = (m.norm_squared() / m.len() as f64).sqrt().max(1e-3);
                        randn(&mut rng, m.nrows(), m.ncols()) * s
                    })
                    .collect();
                let at = |t: f64| {
                    let q: Vec<DMatrix<f64>> = p.iter().zip(&dir).map(|(a, d)| a + d * t).collect();
                    f(&q)
                };
                let h = 1e-3;
                let fd = (8.0 * (at(h) - at(-h)) - (at(2.0 * h) - at(-2.0 * h))) / (12.0 * h);
                let an: f64 = lg.grads.iter().zip(&dir).map(|(g, d)| g.dot(d)).sum();
                let bound: f64 = lg
                    .grads
                    .iter()
                    .zip(&dir)
                    .map(|(g, d)| g.norm() * d.norm())
                    .sum();
                assert!(
                    (fd - an).abs() <= 1e-6 * bound,
                    "{spec:?} {loss:?}: fd {fd} vs {an} (bound {bound})"
                );
            }
        }
    }
}

fn toy(seed: u64) -> (FrozenNetwork<f64>, FrozenNetwork<f64>) {
    let base =
        FrozenNetwork::<f64>::random(&[8, 8, 8], Activation::Tanh, Activation::Identity, seed)
            .unwrap();
    let mut teacher = base.clone();
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    for l in &mut teacher.layers {
        l.w0 += randn(&mut rng, 8, 2) * randn(&mut rng, 2, 8) * 0.3;
    }
    (base, teacher)
}

/// Every adapter lowers the loss of a toy teacher–student problem under the paper's recipe,
/// and η stays positive (log-parametrised).
#[test]
fn training_recipe_lowers_the_loss() {
    let (base, teacher) = toy(5);
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let eval_x = randn(&mut rng, 128, 8);
    let eval_t = Targets::Values(teacher.forward(&eval_x).unwrap());
    for spec in [
        AdapterSpec::Lora {
            r: 2,
            lora_alpha: 4.0,
        },
        AdapterSpec::Elra {
            variant: Variant::General,
            r: 2,
        },
        AdapterSpec::Elra {
            variant: Variant::Psd,
            r: 4,
        },
        AdapterSpec::Elra {
            variant: Variant::Hyb,
            r: 2,
        },
        AdapterSpec::ElraDouble {
            variant: Variant::General,
            r: 2,
        },
        AdapterSpec::ElraDouble {
            variant: Variant::Hyb,
            r: 2,
        },
    ] {
        let net = AdaptedNetwork::new(&base, spec, LossKind::Mse, 200, 1).unwrap();
        let first = net.eval_loss(&eval_x, &eval_t).unwrap();
        let mut cfg = TrainConfig::new(200, 3e-2);
        cfg.seed = 2;
        let mut tr = Trainer::new(net, cfg).unwrap();
        let mut drng = ChaCha8Rng::seed_from_u64(9);
        for _ in 0..200 {
            let x = randn(&mut drng, 32, 8);
            let t = Targets::Values(teacher.forward(&x).unwrap());
            let rec = tr.step(&x, &t).unwrap();
            assert!(rec.loss.is_finite() && rec.grad_norm.is_finite());
        }
        let last = tr.network().eval_loss(&eval_x, &eval_t).unwrap();
        assert!(last < 0.5 * first, "{spec:?}: {first} → {last}");
        assert_eq!(tr.speeds().len(), 199);
        for p in tr.network().params() {
            assert!(p.iter().all(|v| v.is_finite()));
        }
        assert!(
            tr.step(&eval_x, &eval_t).is_err(),
            "a step past the schedule must be refused"
        );
    }
}

/// Bad input stops training with `ElraError::Training` naming the step, and leaves the
/// parameters as they were.
#[test]
fn training_errors_name_the_step() {
    let (base, teacher) = toy(7);
    let net = AdaptedNetwork::new(
        &base,
        AdapterSpec::Elra {
            variant: Variant::Hyb,
            r: 2,
        },
        LossKind::Mse,
        20,
        1,
    )
    .unwrap();
    let mut tr = Trainer::new(net, TrainConfig::new(20, 1e-2)).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for _ in 0..3 {
        let x = randn(&mut rng, 4, 8);
        tr.step(&x, &Targets::Values(teacher.forward(&x).unwrap()))
            .unwrap();
    }
    let before = tr.network().params();
    // Non-finite targets → non-finite loss at step 3.
    let x = randn(&mut rng, 4, 8);
    let mut t = teacher.forward(&x).unwrap();
    t[(1, 2)] = f64::INFINITY;
    match tr.step(&x, &Targets::Values(t)) {
        Err(ElraError::Training { step: 3, .. }) => {}
        other => panic!("expected Training at step 3, got {other:?}"),
    }
    // Mismatched shapes → still step 3 (nothing advanced).
    let bad = randn(&mut rng, 4, 7);
    match tr.step(&bad, &Targets::Values(DMatrix::zeros(4, 8))) {
        Err(ElraError::Training { step: 3, reason }) => assert!(reason.contains("x"), "{reason}"),
        other => panic!("expected Training at step 3, got {other:?}"),
    }
    // Non-finite input.
    let mut nan = randn(&mut rng, 4, 8);
    nan[0] = f64::NAN;
    assert!(matches!(
        tr.step(&nan, &Targets::Values(DMatrix::zeros(4, 8))),
        Err(ElraError::Training { step: 3, .. })
    ));
    assert_eq!(tr.network().params(), before);
    assert_eq!(tr.step_index(), 3);
    // Wrong target kind.
    let x = randn(&mut rng, 4, 8);
    assert!(matches!(
        tr.step(&x, &Targets::Labels(vec![0; 4])),
        Err(ElraError::Training { step: 3, .. })
    ));
}

/// Training is bitwise deterministic for a seed (single- and double-sided ELRA-Hyb).
#[test]
fn training_is_bitwise_deterministic() {
    let run = |spec: AdapterSpec| {
        let (base, teacher) = toy(11);
        let net = AdaptedNetwork::new(&base, spec, LossKind::Mse, 30, 3).unwrap();
        let mut tr = Trainer::new(net, TrainConfig::new(30, 1e-2)).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let mut losses = Vec::new();
        for _ in 0..30 {
            let x = randn(&mut rng, 16, 8);
            losses.push(
                tr.step(&x, &Targets::Values(teacher.forward(&x).unwrap()))
                    .unwrap()
                    .loss
                    .to_bits(),
            );
        }
        (losses, tr.network().params())
    };
    let single = AdapterSpec::Elra {
        variant: Variant::Hyb,
        r: 2,
    };
    assert_eq!(run(single), run(single));
    let double = AdapterSpec::ElraDouble {
        variant: Variant::Hyb,
        r: 2,
    };
    let (a, b) = (run(double), run(double));
    assert_eq!(a, b);
    assert_eq!(
        a.1.len(),
        2 * 6,
        "two layers × [A_L, B_L, log η_L, A_R, B_R, log η_R]"
    );
}

/// A short `fit` twice with the same seed gives identical per-step curves (the numbers `elra
/// fit` writes to `loss.csv`; the files themselves are checked by the unit test in `lab/src/fit_output.rs`),
/// and every method's held-out loss drops.
#[test]
fn training_fit_is_reproducible_and_learns() {
    let opts = FitOptions {
        steps: 200,
        seed: 3,
        width: 16,
        depth: 2,
        batch: 32,
        methods: vec![
            FitMethod::Lora,
            FitMethod::Elra,
            FitMethod::ElraPsd,
            FitMethod::ElraHyb,
            FitMethod::ElraHybGa,
            FitMethod::ElraDouble,
        ],
        ga_steps: 10,
        ..FitOptions::default()
    };
    let r1 = fit(&opts).unwrap();
    let r2 = fit(&opts).unwrap();
    assert!(!r1.curves.is_empty());
    assert_eq!(
        r1.curves, r2.curves,
        "the curves differ between two runs with the same seed"
    );
    assert_eq!(r1.curves.len(), 6);
    for c in &r1.curves {
        assert_eq!(c.loss.len(), 200, "{}", c.method);
        assert!(c.speed.len() == 200 && c.grad_norm.len() == 200 && c.lr.len() == 200);
    }
    assert_eq!(r1.curves[5].method, FitMethod::ElraDouble);
    for (a, b) in r1.rows.iter().zip(&r2.rows) {
        assert_eq!(
            (a.first_loss, a.final_loss, a.params),
            (b.first_loss, b.final_loss, b.params)
        );
    }
    for row in &r1.rows {
        assert!(
            row.final_loss < 0.7 * row.first_loss,
            "{}: {} → {}",
            row.method,
            row.first_loss,
            row.final_loss
        );
    }
    let params = |m: FitMethod| r1.rows.iter().find(|r| r.method == m).unwrap().params;
    // Per layer: ELRA 2·8·16 + 1 (η); double-sided twice that (App. B: both sides, η_L, η_R).
    assert_eq!(params(FitMethod::Elra), 2 * (2 * 8 * 16 + 1));
    assert_eq!(params(FitMethod::ElraDouble), 2 * params(FitMethod::Elra));
    let shown = r1.to_string();
    assert!(shown.contains("elra-hyb-ga") && shown.contains("final loss"));
    assert!(shown.contains("elra-double"));
    // The progress callback sees every step of every method, in order.
    let mut seen = Vec::new();
    let short = FitOptions {
        steps: 3,
        methods: vec![FitMethod::Lora, FitMethod::Elra],
        ..opts.clone()
    };
    elra::train::fit::fit_with_progress(&short, &mut |m, t| seen.push((m, t))).unwrap();
    assert_eq!(
        seen,
        [
            (FitMethod::Lora, 1),
            (FitMethod::Lora, 2),
            (FitMethod::Lora, 3),
            (FitMethod::Elra, 1),
            (FitMethod::Elra, 2),
            (FitMethod::Elra, 3)
        ]
    );
}

/// Invalid options are refused before anything runs or is written.
#[test]
fn training_fit_rejects_bad_options() {
    let base = FitOptions::default();
    for (o, arg) in [
        (
            FitOptions {
                steps: 0,
                ..base.clone()
            },
            "steps",
        ),
        (
            FitOptions {
                width: 4,
                ..base.clone()
            },
            "width",
        ),
        (
            FitOptions {
                methods: vec![],
                ..base.clone()
            },
            "methods",
        ),
        (
            FitOptions {
                lr: f64::NAN,
                ..base.clone()
            },
            "lr",
        ),
    ] {
        match fit(&o) {
            Err(ElraError::InvalidArgument { arg: a, .. }) => assert_eq!(a, arg),
            other => panic!("expected an error naming {arg}, got {other:?}"),
        }
    }
    assert!("elra-hyb-ga".parse::<FitMethod>().is_ok());
    assert_eq!(
        "elra-double".parse::<FitMethod>().unwrap(),
        FitMethod::ElraDouble
    );
    assert_eq!(
        "Double".parse::<FitMethod>().unwrap(),
        FitMethod::ElraDouble
    );
    assert!(!FitMethod::DEFAULT.contains(&FitMethod::ElraDouble));
    assert!("dora".parse::<FitMethod>().is_err());
}

/// The harness's double-sided layer against the explicit-matrix reverse mode of
/// `grad::double` (App. B eq. 22): a one-layer network (identity activation, MSE) at step 5
/// of 40, factors large enough that the τ = 2 spectral clip is active on both sides and α of
/// the Hyb schedule is strictly between 0 and 1. The oracle is built by hand: α from
/// `AlphaSchedule::paper_default`, the App. H cosine η multiplier, τ = 2, λ = 1e-5, the dropout
/// mask, `Ȳ = 2(Y + 1bᵀ − T)/(N d)`, and `∂/∂log η = η ∂/∂η`. Both sides run the same kernels in
/// the same order, so the gradients agree to rounding: tolerance 1e-12 relative per block
/// (observed: bitwise equal). The output also matches `X (exp(L) W0 exp(R))ᵀ + 1bᵀ` from the
/// adapter's own merge (a separate evaluation, `GeneratorEval`) to 1e-12 relative.
#[test]
fn training_double_sided_gradient_matches_grad_double() {
    use elra::adapter::{eta_cosine_multiplier, AlphaSchedule};
    use elra::adapter::{DoubleSidedLayer, GeneratorSpec};
    use elra::grad::{double_backward_parts, double_forward_parts, SideParams};

    let mut rng = ChaCha8Rng::seed_from_u64(41);
    let base = FrozenNetwork::<f64>::random(&[7, 5], Activation::Identity, Activation::Identity, 4)
        .unwrap();
    let (total, step) = (40, 5);
    let spec = AdapterSpec::ElraDouble {
        variant: Variant::Hyb,
        r: 2,
    };
    let mut net = AdaptedNetwork::new(&base, spec, LossKind::Mse, total, 5).unwrap();
    net.set_step(step).unwrap();
    let mut p = net.params();
    assert_eq!(p.len(), 6);
    for m in p.iter_mut() {
        if m.len() == 1 {
            m[0] = (0.8f64).ln();
        } else {
            *m = randn(&mut rng, m.nrows(), m.ncols()) * 1.5;
        }
    }
    net.set_params(p.clone()).unwrap();
    let (n, d) = (9, 5);
    let x = randn(&mut rng, n, 7);
    let t = randn(&mut rng, n, d);
    let masks = net.sample_masks(n, 0.2, &mut rng).unwrap();
    let lg = net
        .loss_and_grad(&x, &Targets::Values(t.clone()), Some(&masks))
        .unwrap();

    let any = net.layers[0].adapter.as_any();
    let layer = match any.downcast_ref::<DoubleSidedLayer<f64>>() {
        Some(l) => l.clone(),
        None => panic!(
            "expected a double-sided layer, got {:?}",
            net.layers[0].adapter
        ),
    };
    assert_eq!(layer.config().generator.tau, Some(2.0));
    assert_eq!(layer.config().generator.lambda, 1e-5);
    let alpha = AlphaSchedule::paper_default(total).alpha(step);
    assert!(alpha > 0.0 && alpha < 1.0, "α = {alpha}");
    let gspec = GeneratorSpec {
        alpha,
        eta_mult: eta_cosine_multiplier(step, total),
        tau: Some(2.0),
        lambda: 1e-5,
    };
    let side = |a, b, eta| SideParams { a, b, eta };
    let left = side(layer.a_left(), layer.b_left(), layer.eta_left());
    let right = side(layer.a_right(), layer.b_right(), layer.eta_right());
    let (y, tape) =
        double_forward_parts(&x, layer.w0(), left, right, &gspec, masks[0].as_ref()).unwrap();
    assert!(tape.left.chain.clip.is_some() && tape.right.chain.clip.is_some());
    let bias = &net.layers[0].bias;
    let mut out = y.clone();
    for (j, mut col) in out.column_iter_mut().enumerate() {
        col.add_scalar_mut(bias[j]);
    }
    assert_eq!(lg.output, out);
    let energy = tape.left.energy + tape.right.energy;
    assert!((lg.energy - energy).abs() <= 1e-12 * energy);
    let ybar = (&out - &t) * (2.0 / (n * d) as f64);
    let gr = double_backward_parts(&x, layer.w0(), &tape, ybar).unwrap();
    let mut want = Vec::new();
    for (fg, eta) in [(gr.left, layer.eta_left()), (gr.right, layer.eta_right())] {
        want.push(fg.a);
        want.push(fg.b.unwrap());
        want.push(DMatrix::from_element(1, 1, fg.eta * eta));
    }
    assert_eq!(lg.grads.len(), want.len());
    for (i, (g, w)) in lg.grads.iter().zip(&want).enumerate() {
        assert!(
            (g - w).norm() <= 1e-12 * w.norm(),
            "block {i}: {} vs {}",
            g.norm(),
            w.norm()
        );
    }
    // Without dropout the harness output is the adapter's merged weight applied to X.
    let mut merged = &x * layer.merge().unwrap().transpose();
    for (j, mut col) in merged.column_iter_mut().enumerate() {
        col.add_scalar_mut(bias[j]);
    }
    let pred = net.predict(&x).unwrap();
    assert!((&pred - &merged).norm() <= 1e-12 * merged.norm());
}

/// `DoubleSidedLayer` parameter access (App. B eq. 22–25): getters return what the setters
/// stored; bad shapes, non-finite entries, η ≤ 0 and a `B` on ELRA-PSD are refused with typed
/// errors naming the argument, leaving the layer unchanged. `set_params` of the harness
/// reports the same errors.
#[test]
fn training_double_sided_parameter_access() {
    use elra::adapter::{DoubleSidedConfig, DoubleSidedLayer};
    let mut rng = ChaCha8Rng::seed_from_u64(43);
    let (d, k) = (6, 4);
    let mut cfg = DoubleSidedConfig::new(Variant::General, d, k, 2, 10);
    cfg.r_right = 3;
    let mut layer = DoubleSidedLayer::<f64>::new(cfg, randn(&mut rng, d, k)).unwrap();
    let (al, bl, ar, br) = (
        randn(&mut rng, d, 2),
        randn(&mut rng, 2, d),
        randn(&mut rng, k, 3),
        randn(&mut rng, 3, k),
    );
    layer.set_a_left(al.clone()).unwrap();
    layer.set_b_left(bl.clone()).unwrap();
    layer.set_eta_left(0.25).unwrap();
    layer.set_a_right(ar.clone()).unwrap();
    layer.set_b_right(br.clone()).unwrap();
    layer.set_eta_right(0.5).unwrap();
    assert_eq!(layer.a_left(), &al);
    assert_eq!(layer.b_left(), Some(&bl));
    assert_eq!(layer.eta_left(), 0.25);
    assert_eq!(layer.a_right(), &ar);
    assert_eq!(layer.b_right(), Some(&br));
    assert_eq!(layer.eta_right(), 0.5);
    layer.set_step(7);
    assert_eq!(layer.step(), 7);

    let before = layer.clone();
    let shape = |e: ElraError| match e {
        ElraError::Shape { arg, .. } => arg,
        other => panic!("expected a shape error, got {other:?}"),
    };
    assert_eq!(
        shape(layer.set_a_left(randn(&mut rng, d, 3)).unwrap_err()),
        "a_left"
    );
    assert_eq!(
        shape(layer.set_b_left(randn(&mut rng, 2, k)).unwrap_err()),
        "b_left"
    );
    assert_eq!(
        shape(layer.set_a_right(randn(&mut rng, d, 3)).unwrap_err()),
        "a_right"
    );
    assert_eq!(
        shape(layer.set_b_right(randn(&mut rng, 2, k)).unwrap_err()),
        "b_right"
    );
    let nonfinite = |e: ElraError| match e {
        ElraError::NonFinite { arg } => arg,
        other => panic!("expected a non-finite error, got {other:?}"),
    };
    let mut bad = al.clone();
    bad[(1, 1)] = f64::NAN;
    assert_eq!(nonfinite(layer.set_a_left(bad).unwrap_err()), "a_left");
    let mut bad = br.clone();
    bad[(0, 2)] = f64::INFINITY;
    assert_eq!(nonfinite(layer.set_b_right(bad).unwrap_err()), "b_right");
    let invalid = |e: ElraError| match e {
        ElraError::InvalidArgument { arg, .. } => arg,
        other => panic!("expected an invalid-argument error, got {other:?}"),
    };
    for eta in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert_eq!(invalid(layer.set_eta_left(eta).unwrap_err()), "eta_left");
        assert_eq!(invalid(layer.set_eta_right(eta).unwrap_err()), "eta_right");
    }
    assert_eq!(layer, before, "a refused setter changed the layer");

    // ELRA-PSD has no B on either side.
    let cfg = DoubleSidedConfig::new(Variant::Psd, d, k, 2, 10);
    let mut psd = DoubleSidedLayer::<f64>::new(cfg, randn(&mut rng, d, k)).unwrap();
    assert!(psd.b_left().is_none() && psd.b_right().is_none());
    assert_eq!(
        invalid(psd.set_b_left(randn(&mut rng, 2, d)).unwrap_err()),
        "b_left"
    );
    assert_eq!(
        invalid(psd.set_b_right(randn(&mut rng, 2, k)).unwrap_err()),
        "b_right"
    );

    // The harness: a non-finite log η or a misshapen factor is refused, nothing is written.
    let base =
        FrozenNetwork::<f64>::random(&[4, 6], Activation::Tanh, Activation::Identity, 1).unwrap();
    let spec = AdapterSpec::ElraDouble {
        variant: Variant::General,
        r: 2,
    };
    let mut net = AdaptedNetwork::new(&base, spec, LossKind::Mse, 10, 2).unwrap();
    let p = net.params();
    assert_eq!(
        net.decay_flags(),
        vec![true, true, false, true, true, false]
    );
    let mut q = p.clone();
    q[5][0] = f64::INFINITY;
    assert_eq!(invalid(net.set_params(q).unwrap_err()), "eta_right");
    let mut q = p.clone();
    q[3] = randn(&mut rng, 3, 2);
    assert_eq!(shape(net.set_params(q).unwrap_err()), "a_right");
    assert_eq!(net.params(), p);
    // r = 5 > k = 4 is refused for the right side.
    let too_big = AdapterSpec::ElraDouble {
        variant: Variant::General,
        r: 5,
    };
    assert!(matches!(
        AdaptedNetwork::new(&base, too_big, LossKind::Mse, 10, 2),
        Err(ElraError::InvalidArgument { arg: "r_right", .. })
    ));
}
