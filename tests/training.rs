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
            net.set_step(9);
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

/// Training is bitwise deterministic for a seed.
#[test]
fn training_is_bitwise_deterministic() {
    let run = || {
        let (base, teacher) = toy(11);
        let net = AdaptedNetwork::new(
            &base,
            AdapterSpec::Elra {
                variant: Variant::Hyb,
                r: 2,
            },
            LossKind::Mse,
            30,
            3,
        )
        .unwrap();
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
    assert_eq!(run(), run());
}

/// A short `fit` twice with the same seed writes byte-identical CSVs, every method's held-out
/// loss drops, and the SVG is a complete document.
#[test]
fn training_fit_is_reproducible_and_learns() {
    let dir = std::env::temp_dir().join(format!("elra-fit-test-{}", std::process::id()));
    let opts = |sub: &str| FitOptions {
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
        ],
        ga_steps: 10,
        out: dir.join(sub),
        progress: false,
        ..FitOptions::default()
    };
    let r1 = fit(&opts("a")).unwrap();
    let r2 = fit(&opts("b")).unwrap();
    let c1 = std::fs::read(&r1.csv).unwrap();
    let c2 = std::fs::read(&r2.csv).unwrap();
    assert!(!c1.is_empty());
    assert_eq!(
        c1, c2,
        "the CSV bytes differ between two runs with the same seed"
    );
    assert_eq!(
        std::fs::read(&r1.svg).unwrap(),
        std::fs::read(&r2.svg).unwrap()
    );
    let text = String::from_utf8(c1).unwrap();
    assert_eq!(text.lines().count(), 1 + 5 * 200);
    let svg = std::fs::read_to_string(&r1.svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    for row in &r1.rows {
        assert!(
            row.final_loss < 0.7 * row.first_loss,
            "{}: {} → {}",
            row.method,
            row.first_loss,
            row.final_loss
        );
    }
    let shown = r1.to_string();
    assert!(shown.contains("elra-hyb-ga") && shown.contains("final loss"));
    // No temporary files are left behind.
    let names: Vec<String> = std::fs::read_dir(dir.join("a"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Invalid options are refused before anything runs or is written.
#[test]
fn training_fit_rejects_bad_options() {
    let dir = std::env::temp_dir().join(format!("elra-fit-bad-{}", std::process::id()));
    let base = FitOptions {
        out: dir.clone(),
        progress: false,
        ..FitOptions::default()
    };
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
    assert!(!dir.exists());
    assert!("elra-hyb-ga".parse::<FitMethod>().is_ok());
    assert!("dora".parse::<FitMethod>().is_err());
}
