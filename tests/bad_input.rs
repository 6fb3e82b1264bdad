//! Bad input returns a typed error naming the argument; nothing panics.
//!
//! Covers the adapter layer (`ElraLayer`, `DoubleSidedLayer`, `LoraLayer`), the generator
//! functions, the schedules, the dense oracle and the claim checker.

use elra::adapter::{
    clip_scale, energy_eq21, frobenius_sq_from_grams, generator_factor, spectral_norm_from_grams,
    AlphaSchedule, DoubleSidedConfig, DoubleSidedLayer, ElraConfig, ElraLayer, ExpAction,
    LoraConfig, LoraLayer, LowRankGenerator, Variant,
};
use elra::{reference, verify, ElraError};
use nalgebra::DMatrix;

fn m(r: usize, c: usize) -> DMatrix<f64> {
    DMatrix::from_fn(r, c, |i, j| ((i * 7 + j * 3) % 5) as f64 * 0.1 - 0.2)
}

fn with_nan(mut x: DMatrix<f64>) -> DMatrix<f64> {
    x[(0, 0)] = f64::NAN;
    x
}

/// The argument named by an error, for the variants that carry one.
fn arg_of<T: std::fmt::Debug>(r: elra::Result<T>) -> (&'static str, &'static str) {
    match r {
        Err(ElraError::Shape { arg, .. }) => ("shape", arg),
        Err(ElraError::InvalidArgument { arg, .. }) => ("invalid", arg),
        Err(ElraError::NonFinite { arg }) => ("nonfinite", arg),
        Err(ElraError::Overflow { .. }) => ("overflow", ""),
        Err(ElraError::Numerical(_)) => ("numerical", ""),
        Err(e) => panic!("unexpected error variant {e:?}"),
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
    }
}

fn cfg(variant: Variant) -> ElraConfig {
    let mut c = ElraConfig::new(variant, 6, 4, 2, 100);
    c.generator.eta = 0.3;
    c
}

#[test]
fn config_rejects_bad_dimensions_and_scalars() {
    let bad = |f: &dyn Fn(&mut ElraConfig)| {
        let mut c = cfg(Variant::General);
        f(&mut c);
        arg_of(ElraLayer::<f64>::new(c, m(6, 4)))
    };
    assert_eq!(bad(&|c| c.r = 0), ("invalid", "r"));
    assert_eq!(bad(&|c| c.r = 7), ("invalid", "r"));
    assert_eq!(bad(&|c| c.d = 0), ("invalid", "d"));
    assert_eq!(bad(&|c| c.k = 0), ("invalid", "k"));
    assert_eq!(bad(&|c| c.generator.eta = 0.0), ("invalid", "eta"));
    assert_eq!(bad(&|c| c.generator.eta = -1.0), ("invalid", "eta"));
    assert_eq!(bad(&|c| c.generator.eta = f64::NAN), ("invalid", "eta"));
    assert_eq!(
        bad(&|c| c.generator.eta = f64::INFINITY),
        ("invalid", "eta")
    );
    assert_eq!(bad(&|c| c.generator.tau = Some(0.0)), ("invalid", "tau"));
    assert_eq!(bad(&|c| c.generator.tau = Some(-2.0)), ("invalid", "tau"));
    assert_eq!(
        bad(&|c| c.generator.tau = Some(f64::NAN)),
        ("invalid", "tau")
    );
    assert_eq!(bad(&|c| c.generator.lambda = -1e-5), ("invalid", "lambda"));
    assert_eq!(
        bad(&|c| c.generator.schedule = AlphaSchedule::Constant { alpha: 1.5 }),
        ("invalid", "alpha")
    );
    assert_eq!(
        bad(&|c| c.generator.schedule = AlphaSchedule::Exponential {
            warmup_steps: 10,
            gamma: -1.0
        }),
        ("invalid", "gamma")
    );
    assert_eq!(
        arg_of(AlphaSchedule::exponential(100, 1.5, 5.0)),
        ("invalid", "fraction")
    );
    assert_eq!(
        arg_of(AlphaSchedule::linear(100, f64::NAN)),
        ("invalid", "fraction")
    );
}

#[test]
fn layer_rejects_bad_matrices() {
    // W0 of the wrong shape, non-finite W0
    assert_eq!(
        arg_of(ElraLayer::new(cfg(Variant::General), m(4, 6))),
        ("shape", "w0")
    );
    assert_eq!(
        arg_of(ElraLayer::new(cfg(Variant::General), with_nan(m(6, 4)))),
        ("nonfinite", "w0")
    );
    // factors
    let c = cfg(Variant::General);
    assert_eq!(
        arg_of(ElraLayer::from_factors(
            c.clone(),
            m(6, 4),
            m(6, 3),
            Some(m(2, 6))
        )),
        ("shape", "a")
    );
    assert_eq!(
        arg_of(ElraLayer::from_factors(
            c.clone(),
            m(6, 4),
            m(6, 2),
            Some(m(2, 5))
        )),
        ("shape", "b")
    );
    assert_eq!(
        arg_of(ElraLayer::from_factors(c.clone(), m(6, 4), m(6, 2), None)),
        ("invalid", "b")
    );
    assert_eq!(
        arg_of(ElraLayer::from_factors(
            c.clone(),
            m(6, 4),
            with_nan(m(6, 2)),
            Some(m(2, 6))
        )),
        ("nonfinite", "a")
    );
    let mut b = m(2, 6);
    b[(1, 1)] = f64::INFINITY;
    assert_eq!(
        arg_of(ElraLayer::from_factors(c, m(6, 4), m(6, 2), Some(b))),
        ("nonfinite", "b")
    );
    assert_eq!(
        arg_of(ElraLayer::from_factors(
            cfg(Variant::Psd),
            m(6, 4),
            m(6, 2),
            Some(m(2, 6))
        )),
        ("invalid", "b")
    );

    let mut layer = ElraLayer::new(cfg(Variant::Hyb), m(6, 4)).unwrap();
    assert_eq!(arg_of(layer.forward(&m(3, 5))), ("shape", "x"));
    assert_eq!(
        arg_of(layer.forward(&with_nan(m(3, 4)))),
        ("nonfinite", "x")
    );
    assert_eq!(arg_of(layer.forward_cached(&m(3, 6))), ("shape", "x"));
    assert_eq!(arg_of(layer.unmerge(&m(4, 6))), ("shape", "w_new"));
    assert_eq!(
        arg_of(layer.unmerge(&with_nan(m(6, 4)))),
        ("nonfinite", "w_new")
    );
    assert_eq!(arg_of(layer.set_eta(0.0)), ("invalid", "eta"));
    assert_eq!(arg_of(layer.set_eta(-0.5)), ("invalid", "eta"));
    assert_eq!(arg_of(layer.set_eta(f64::NAN)), ("invalid", "eta"));
    assert_eq!(arg_of(layer.set_a(m(5, 2))), ("shape", "a"));
    assert_eq!(arg_of(layer.set_b(m(6, 2))), ("shape", "b"));
    assert_eq!(arg_of(layer.set_b(with_nan(m(2, 6)))), ("nonfinite", "b"));
    let cache = layer.inference_cache().unwrap();
    assert_eq!(arg_of(cache.forward(&m(6, 5), &m(2, 4))), ("shape", "w0"));
    assert_eq!(arg_of(cache.forward(layer.w0(), &m(2, 5))), ("shape", "x"));
    let mut psd = ElraLayer::new(cfg(Variant::Psd), m(6, 4)).unwrap();
    assert_eq!(arg_of(psd.set_b(m(2, 6))), ("invalid", "b"));
    // the layer is unchanged by the rejected updates and still works
    assert!(layer.forward(&m(3, 4)).is_ok());
}

#[test]
fn huge_generators_are_errors_or_clipped_never_panics() {
    // η so large that η·B overflows: a typed error
    let mut c = cfg(Variant::General);
    c.generator.eta = 1e308;
    c.generator.tau = None;
    let layer =
        ElraLayer::from_factors(c.clone(), m(6, 4), m(6, 2) * 10.0, Some(m(2, 6) * 10.0)).unwrap();
    assert_eq!(arg_of(layer.forward(&m(2, 4))), ("nonfinite", "c"));
    assert_eq!(arg_of(layer.merge()), ("nonfinite", "c"));
    // a finite generator without clip whose exponential overflows: Overflow from φ1, not Inf/NaN
    c.generator.eta = 1e6;
    let layer = ElraLayer::from_factors(c.clone(), m(6, 4), m(6, 2), Some(m(2, 6))).unwrap();
    assert_eq!(arg_of(layer.forward(&m(2, 4))), ("overflow", ""));
    assert_eq!(arg_of(layer.unmerge(&m(6, 4))), ("overflow", ""));
    // the same with the spectral clip: finite, and ‖G‖₂ = τ
    c.generator.tau = Some(2.0);
    let layer = ElraLayer::from_factors(c, m(6, 4), m(6, 2), Some(m(2, 6))).unwrap();
    let y = layer.forward(&m(2, 4)).unwrap();
    assert!(y.iter().all(|v| v.is_finite()));
    let g = layer.generator().unwrap();
    assert!((g.action.generator().spectral_norm().unwrap() - 2.0).abs() < 1e-12);
}

#[test]
fn generator_functions_reject_bad_input() {
    assert_eq!(
        arg_of(LowRankGenerator::new(m(5, 0), m(0, 5))),
        ("invalid", "a")
    );
    assert_eq!(
        arg_of(LowRankGenerator::new(m(3, 4), m(4, 3))),
        ("invalid", "a")
    );
    assert_eq!(
        arg_of(LowRankGenerator::new(m(0, 0), m(0, 0))),
        ("invalid", "a")
    );
    assert_eq!(
        arg_of(LowRankGenerator::new(m(5, 2), m(2, 4))),
        ("shape", "c")
    );
    assert_eq!(
        arg_of(LowRankGenerator::new(m(5, 2), with_nan(m(2, 5)))),
        ("nonfinite", "c")
    );
    let a = m(5, 2);
    let b = m(2, 5);
    assert_eq!(
        arg_of(generator_factor(Variant::General, &a, Some(&b), 0.0, 0.0)),
        ("invalid", "eta")
    );
    assert_eq!(
        arg_of(generator_factor(Variant::General, &a, None, 1.0, 0.0)),
        ("invalid", "b")
    );
    assert_eq!(
        arg_of(generator_factor(Variant::Hyb, &a, Some(&b), 1.0, 1.5)),
        ("invalid", "alpha")
    );
    assert_eq!(
        arg_of(generator_factor(Variant::Hyb, &a, Some(&b), 1.0, f64::NAN)),
        ("invalid", "alpha")
    );
    assert_eq!(
        arg_of(generator_factor(Variant::Hyb, &a, Some(&m(2, 4)), 1.0, 0.5)),
        ("shape", "b")
    );
    assert_eq!(
        arg_of(energy_eq21(&a, Some(&b), -1.0, 0.5)),
        ("invalid", "eta")
    );
    assert_eq!(arg_of(energy_eq21(&a, None, 1.0, 0.5)), ("invalid", "b"));
    assert_eq!(arg_of(clip_scale(1.0, 0.0)), ("invalid", "tau"));
    assert_eq!(arg_of(clip_scale(1.0, f64::INFINITY)), ("invalid", "tau"));
    assert_eq!(arg_of(clip_scale(f64::NAN, 2.0)), ("invalid", "norm"));
    let g = LowRankGenerator::new(a.clone(), b.clone()).unwrap();
    assert_eq!(arg_of(g.clipped(-1.0)), ("invalid", "tau"));
    assert_eq!(arg_of(g.energy_penalty(-1.0)), ("invalid", "lambda"));
    assert_eq!(arg_of(g.energy_penalty(f64::NAN)), ("invalid", "lambda"));
    let (s, p) = g.grams();
    assert_eq!(
        arg_of(spectral_norm_from_grams(&s, &m(3, 3))),
        ("shape", "p")
    );
    assert_eq!(
        arg_of(spectral_norm_from_grams(&m(2, 3), &p)),
        ("invalid", "s")
    );
    assert_eq!(
        arg_of(frobenius_sq_from_grams(&s, &with_nan(m(2, 2)))),
        ("nonfinite", "p")
    );
    let act: ExpAction<f64> = g.exp_action().unwrap();
    assert_eq!(arg_of(act.left(&m(4, 3))), ("shape", "w"));
    assert_eq!(arg_of(act.left_delta(&m(4, 3))), ("shape", "w"));
    assert_eq!(arg_of(act.right(&m(3, 4))), ("shape", "w"));
    assert_eq!(arg_of(act.rows(&m(3, 4))), ("shape", "x"));
    assert!("nonsense".parse::<Variant>().is_err());
}

#[test]
fn double_sided_rejects_bad_input() {
    let mut c = DoubleSidedConfig::new(Variant::General, 6, 4, 2, 10);
    c.r_right = 5;
    assert_eq!(
        arg_of(DoubleSidedLayer::<f64>::new(c.clone(), m(6, 4))),
        ("invalid", "r_right")
    );
    c.r_right = 2;
    c.r_left = 0;
    assert_eq!(
        arg_of(DoubleSidedLayer::<f64>::new(c.clone(), m(6, 4))),
        ("invalid", "r_left")
    );
    c.r_left = 2;
    c.generator.eta = 0.0;
    assert_eq!(
        arg_of(DoubleSidedLayer::<f64>::new(c.clone(), m(6, 4))),
        ("invalid", "eta")
    );
    c.generator.eta = 0.1;
    assert_eq!(
        arg_of(DoubleSidedLayer::from_factors(
            c.clone(),
            m(6, 4),
            (m(6, 3), Some(m(2, 6))),
            (m(4, 2), Some(m(2, 4)))
        )),
        ("shape", "a_left")
    );
    assert_eq!(
        arg_of(DoubleSidedLayer::from_factors(
            c.clone(),
            m(6, 4),
            (m(6, 2), Some(m(2, 6))),
            (m(4, 2), Some(m(2, 5)))
        )),
        ("shape", "b_right")
    );
    assert_eq!(
        arg_of(DoubleSidedLayer::from_factors(
            c.clone(),
            m(6, 4),
            (m(6, 2), None),
            (m(4, 2), Some(m(2, 4)))
        )),
        ("invalid", "b_left")
    );
    let l = DoubleSidedLayer::new(c, m(6, 4)).unwrap();
    assert_eq!(arg_of(l.forward(&m(2, 6))), ("shape", "x"));
    assert_eq!(arg_of(l.unmerge(&m(6, 5))), ("shape", "w_new"));
    let mut l = l;
    assert_eq!(arg_of(l.set_etas(1.0, -1.0)), ("invalid", "eta"));
}

#[test]
fn lora_rejects_bad_input() {
    let bad = |f: &dyn Fn(&mut LoraConfig)| {
        let mut c = LoraConfig::new(6, 4, 2);
        f(&mut c);
        arg_of(LoraLayer::<f64>::new(c, m(6, 4)))
    };
    assert_eq!(bad(&|c| c.r = 0), ("invalid", "r"));
    assert_eq!(bad(&|c| c.r = 5), ("invalid", "r"));
    assert_eq!(bad(&|c| c.lora_alpha = f64::NAN), ("invalid", "lora_alpha"));
    let c = LoraConfig::new(6, 4, 2);
    assert_eq!(
        arg_of(LoraLayer::from_factors(
            c.clone(),
            m(6, 4),
            m(4, 2),
            m(6, 2)
        )),
        ("shape", "lora_a")
    );
    assert_eq!(
        arg_of(LoraLayer::from_factors(
            c.clone(),
            m(6, 4),
            m(2, 4),
            m(2, 6)
        )),
        ("shape", "lora_b")
    );
    assert_eq!(
        arg_of(LoraLayer::from_factors(
            c.clone(),
            with_nan(m(6, 4)),
            m(2, 4),
            m(6, 2)
        )),
        ("nonfinite", "w0")
    );
    let mut l = LoraLayer::new(c, m(6, 4)).unwrap();
    assert_eq!(arg_of(l.forward(&m(1, 6))), ("shape", "x"));
    assert_eq!(arg_of(l.unmerge(&m(4, 6))), ("shape", "w_new"));
    assert_eq!(
        arg_of(l.set_lora_b(with_nan(m(6, 2)))),
        ("nonfinite", "lora_b")
    );
    assert_eq!(arg_of(l.set_lora_a(m(2, 5))), ("shape", "lora_a"));
}

#[test]
fn f32_layer_rejects_bad_input() {
    let c = cfg(Variant::Hyb);
    let w0 = m(6, 4).map(|v| v as f32);
    let layer = ElraLayer::<f32>::new(c, w0).unwrap();
    let mut x = DMatrix::<f32>::zeros(2, 4);
    x[(1, 2)] = f32::NAN;
    assert_eq!(arg_of(layer.forward(&x)), ("nonfinite", "x"));
    let mut layer = layer;
    assert_eq!(arg_of(layer.set_eta(-1.0f32)), ("invalid", "eta"));
    assert_eq!(arg_of(layer.set_eta(f32::NAN)), ("invalid", "eta"));
}

#[test]
fn oracle_rejects_bad_input() {
    assert_eq!(arg_of(reference::dense_exp(&m(2, 3))), ("invalid", "g"));
    assert_eq!(
        arg_of(reference::dense_exp(&with_nan(m(3, 3)))),
        ("nonfinite", "g")
    );
    assert_eq!(
        arg_of(reference::dense_exp(
            &(m(3, 3) * 1e5 + DMatrix::identity(3, 3) * 1e5)
        )),
        ("overflow", "")
    );
    assert_eq!(
        arg_of(reference::dense_generator(&m(4, 2), &m(2, 3))),
        ("shape", "c")
    );
    assert_eq!(
        arg_of(reference::dense_w_new(&m(4, 2), &m(2, 4), &m(3, 3))),
        ("shape", "w0")
    );
    assert_eq!(
        arg_of(reference::frechet_exp(&m(3, 3), &m(2, 2))),
        ("shape", "e")
    );
    assert_eq!(
        arg_of(reference::numerical_rank(&m(3, 3), Some(-1.0))),
        ("invalid", "tol")
    );
    assert_eq!(
        arg_of(reference::singular_values(&m(0, 3))),
        ("invalid", "m")
    );
    assert_eq!(
        arg_of(reference::lemma1_construction(&m(3, 3), 0, None)),
        ("invalid", "r")
    );
    assert_eq!(
        arg_of(reference::lemma1_construction(&m(3, 3), 9, None)),
        ("invalid", "r")
    );
    assert_eq!(
        arg_of(reference::subspace_distance(&m(3, 1), &m(4, 1))),
        ("shape", "q")
    );
    assert_eq!(arg_of(reference::log_abs_det(&m(2, 3))), ("invalid", "m"));
    assert_eq!(
        arg_of(reference::dense_elra_generator(
            Variant::General,
            &m(3, 2),
            None,
            1.0,
            0.0
        )),
        ("invalid", "b")
    );
}

#[test]
fn claim_checker_rejects_bad_cases() {
    for claim in verify::claims() {
        for scale in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let case = verify::Case {
                d: 4,
                k: 4,
                r: 2,
                scale,
                seed: 1,
            };
            assert_eq!(
                arg_of((claim.check)(&case)),
                ("invalid", "scale"),
                "{}",
                claim.name
            );
        }
        // degenerate dimensions are clamped, not a panic
        let case = verify::Case {
            d: 0,
            k: 0,
            r: 0,
            scale: 1.0,
            seed: 3,
        };
        assert!((claim.check)(&case).is_ok(), "{}", claim.name);
    }
}
