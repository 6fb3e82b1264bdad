//! One generator configuration, one validation: every configuration is accepted or refused
//! alike by the Rust constructors, the adapter-file loader and the C ABI, and every accepted one
//! survives save/load unchanged (through the Rust API and through the C ABI).

use std::ffi::{c_void, CString};

use elra::adapter::{
    AlphaSchedule, ElraConfig, ElraLayer, EtaMultiplier, GeneratorConfig, Variant,
};
use elra::capi::{
    elra_adapter_create, elra_adapter_destroy, elra_adapter_get_config, elra_adapter_load,
    elra_adapter_save, ElraAdapter, ElraAdapterConfig, ElraStatus,
};
use elra::io::{AdapterFile, ElraFileConfig, FileConfig, ModuleWeights, ELRA_FORMAT_VERSION};
use nalgebra::DMatrix;

const D: usize = 5;
const K: usize = 4;
const R: usize = 2;

/// Every combination of valid and invalid field values (τ = 0 is left out: the C ABI spells
/// "no clip" as τ = 0, so it cannot express an invalid τ = 0).
fn configs() -> Vec<GeneratorConfig> {
    let etas = [1e-3, 0.7, 0.0, -1.0, f64::NAN, f64::INFINITY];
    let lambdas = [0.0, 1e-5, -1e-5, f64::NAN];
    let taus = [None, Some(2.0), Some(-1.0), Some(f64::INFINITY)];
    let schedules = [
        AlphaSchedule::Exponential {
            warmup_steps: 25,
            gamma: 5.0,
        },
        AlphaSchedule::Exponential {
            warmup_steps: 25,
            gamma: 0.0,
        },
        AlphaSchedule::Exponential {
            warmup_steps: 0,
            gamma: -1.0,
        },
        AlphaSchedule::Exponential {
            warmup_steps: 7,
            gamma: f64::NAN,
        },
        AlphaSchedule::Cosine { warmup_steps: 30 },
        AlphaSchedule::Linear { warmup_steps: 0 },
        AlphaSchedule::Constant { alpha: 0.0 },
        AlphaSchedule::Constant { alpha: 0.3 },
        AlphaSchedule::Constant { alpha: 1.0 },
        AlphaSchedule::Constant { alpha: 1.5 },
        AlphaSchedule::Constant { alpha: f64::NAN },
    ];
    let mults = [
        EtaMultiplier::None,
        EtaMultiplier::Cosine { total_steps: 100 },
        EtaMultiplier::Cosine { total_steps: 0 },
    ];
    let mut out = Vec::new();
    for (i, variant) in [Variant::General, Variant::Psd, Variant::Hyb]
        .into_iter()
        .enumerate()
    {
        for (j, &eta) in etas.iter().enumerate() {
            for (l, &lambda) in lambdas.iter().enumerate() {
                for (t, &tau) in taus.iter().enumerate() {
                    // All schedules and multipliers, spread over the other fields.
                    let s = (i + j + l + t) % schedules.len();
                    let m = (i + 2 * j + l) % mults.len();
                    for schedule in [schedules[s], schedules[(s + 5) % schedules.len()]] {
                        out.push(GeneratorConfig {
                            variant,
                            eta,
                            lambda,
                            tau,
                            schedule,
                            eta_multiplier: mults[m],
                        });
                    }
                }
            }
        }
    }
    out
}

fn w0() -> DMatrix<f64> {
    DMatrix::from_fn(D, K, |i, j| ((3 * i + j) % 7) as f64 / 7.0 - 0.4)
}

/// `W0` row-major, as a C caller holds it.
fn w0_rows() -> Vec<f64> {
    let w = w0();
    let mut v = Vec::with_capacity(D * K);
    for i in 0..D {
        v.extend(w.row(i).iter());
    }
    v
}

fn layer_config(g: GeneratorConfig) -> ElraConfig {
    ElraConfig {
        generator: g,
        d: D,
        k: K,
        r: R,
        seed: 11,
    }
}

/// The adapter directory of `g` written without validation (as a hostile or hand-made file).
fn file_bytes(g: &GeneratorConfig) -> (Vec<u8>, Vec<u8>) {
    let module = "layer.0";
    let cfg = ElraFileConfig {
        peft_type: "ELRA".into(),
        generator: *g,
        r: R,
        seed: 11,
        step: 3,
        target_modules: vec![module.into()],
        task_type: None,
        base_model_name_or_path: None,
        format_version: ELRA_FORMAT_VERSION,
    };
    // Tensors of a valid file of the same shape (only the config differs).
    let valid = AdapterFile::<f64> {
        config: FileConfig::Elra(ElraFileConfig {
            generator: GeneratorConfig::paper_default(g.variant, 100),
            ..cfg.clone()
        }),
        modules: [(
            module.to_string(),
            ModuleWeights::Elra {
                a: DMatrix::from_element(D, R, 0.1),
                b: g.variant.uses_b().then(|| DMatrix::from_element(R, D, 0.2)),
                eta: 0.5,
            },
        )]
        .into(),
    };
    let (_, weights) = valid.to_bytes().unwrap();
    (serde_json::to_vec_pretty(&cfg).unwrap(), weights)
}

/// The flat C config of `g` (the mapping a C caller writes by hand).
fn c_config(g: &GeneratorConfig) -> ElraAdapterConfig {
    let (schedule, warmup_steps, gamma, alpha) = match g.schedule {
        AlphaSchedule::Exponential {
            warmup_steps,
            gamma,
        } => (0, warmup_steps, gamma, 0.0),
        AlphaSchedule::Cosine { warmup_steps } => (1, warmup_steps, 0.0, 0.0),
        AlphaSchedule::Linear { warmup_steps } => (2, warmup_steps, 0.0, 0.0),
        AlphaSchedule::Constant { alpha } => (3, 0, 0.0, alpha),
    };
    let (eta_multiplier, total_steps) = match g.eta_multiplier {
        EtaMultiplier::None => (0, 0),
        EtaMultiplier::Cosine { total_steps } => (1, total_steps),
    };
    ElraAdapterConfig {
        variant: match g.variant {
            Variant::General => 0,
            Variant::Psd => 1,
            Variant::Hyb => 2,
        },
        dtype: 1,
        d: D,
        k: K,
        r: R,
        eta: g.eta,
        lambda: g.lambda,
        tau: g.tau.unwrap_or(0.0),
        schedule,
        warmup_steps,
        gamma,
        alpha,
        eta_multiplier,
        total_steps,
        seed: 11,
        lora_alpha: R as f64,
    }
}

fn c_create(g: &GeneratorConfig) -> (ElraStatus, *mut ElraAdapter) {
    let c = c_config(g);
    let rows = w0_rows();
    let mut h: *mut ElraAdapter = std::ptr::null_mut();
    // SAFETY: `c` is a live config, `rows` holds D×K values with ld = K, `h` is writable.
    let s = unsafe { elra_adapter_create(&c, rows.as_ptr().cast::<c_void>(), K, &mut h) };
    (s, h)
}

#[test]
fn every_entry_point_accepts_or_refuses_a_config_alike() {
    let all = configs();
    let (mut valid, mut invalid) = (0, 0);
    for g in &all {
        let rust = ElraLayer::new(layer_config(*g), w0()).is_ok();
        assert_eq!(g.validate().is_ok(), rust, "{g:?}");
        let (json, weights) = file_bytes(g);
        if finite(g) {
            // JSON has no NaN or ±Inf (serde writes them as null): the loader sees exactly `g`.
            let file = AdapterFile::<f64>::from_bytes(&json, &weights).is_ok();
            assert_eq!(file, rust, "file loader vs constructor: {g:?}");
        }
        let (s, h) = c_create(g);
        let abi = s == ElraStatus::ELRA_OK;
        assert_eq!(abi, rust, "C ABI ({s:?}) vs constructor: {g:?}");
        if abi {
            // SAFETY: a live handle from elra_adapter_create.
            unsafe { elra_adapter_destroy(h) };
            valid += 1;
        } else {
            assert_eq!(s, ElraStatus::ELRA_INVALID_ARGUMENT, "{g:?}");
            invalid += 1;
        }
    }
    assert!(
        valid >= 20 && invalid >= 200,
        "{valid} valid, {invalid} invalid"
    );
}

/// Whether every float of `g` is finite (representable in JSON).
fn finite(g: &GeneratorConfig) -> bool {
    let s = match g.schedule {
        AlphaSchedule::Exponential { gamma, .. } => gamma,
        AlphaSchedule::Constant { alpha } => alpha,
        _ => 0.0,
    };
    [g.eta, g.lambda, g.tau.unwrap_or(1.0), s]
        .iter()
        .all(|v| v.is_finite())
}

/// Non-finite numbers in a hand-written `adapter_config.json` (`NaN`, `Infinity`, `1e999`) are
/// refused by the loader, as the constructors refuse them.
#[test]
fn non_finite_numbers_in_a_file_are_refused() {
    let g = GeneratorConfig::paper_default(Variant::Hyb, 100);
    let (json, weights) = file_bytes(&g);
    let text = String::from_utf8(json).unwrap();
    assert!(AdapterFile::<f64>::from_bytes(text.as_bytes(), &weights).is_ok());
    for bad in ["NaN", "Infinity", "-Infinity", "1e999"] {
        for field in [
            "\"eta\": 0.001",
            "\"lambda\": 0.00001",
            "\"tau\": 2.0",
            "\"gamma\": 5.0",
        ] {
            assert!(text.contains(field), "{field} in {text}");
            let key = field.split(':').next().unwrap();
            let hostile = text.replacen(field, &format!("{key}: {bad}"), 1);
            let r = AdapterFile::<f64>::from_bytes(hostile.as_bytes(), &weights);
            assert!(
                matches!(r, Err(elra::ElraError::Format(_))),
                "{key} = {bad}: {r:?}"
            );
        }
    }
}

#[test]
fn every_valid_config_survives_save_and_load() {
    let dir = std::env::temp_dir().join(format!("elra-config-rt-{}", std::process::id()));
    let cdir = CString::new(dir.to_str().unwrap()).unwrap();
    let module = CString::new("model.layers.0.q_proj").unwrap();
    for g in configs().into_iter().filter(|g| g.validate().is_ok()) {
        // Rust: layer → file → layer.
        let mut layer = ElraLayer::new(layer_config(g), w0()).unwrap();
        layer.set_step(17);
        AdapterFile::from_elra_layers(&[("m", &layer)])
            .unwrap()
            .save(&dir)
            .unwrap();
        let back = AdapterFile::<f64>::load(&dir)
            .unwrap()
            .elra_layer("m", w0())
            .unwrap();
        assert_eq!(back.config(), layer.config(), "{g:?}");
        assert_eq!(back.step(), 17);
        assert_eq!(back, layer);
        // C ABI: create → save → load → the same configuration.
        let (s, h) = c_create(&g);
        assert_eq!(s, ElraStatus::ELRA_OK);
        let rows = w0_rows();
        let mut loaded: *mut ElraAdapter = std::ptr::null_mut();
        let mut c_before = c_config(&g);
        let mut c_after = c_config(&g);
        // SAFETY: live handles, NUL-terminated strings, writable outputs, D×K weight buffer.
        unsafe {
            let hc = h.cast_const();
            let name = module.as_ptr();
            assert_eq!(
                elra_adapter_save(1, &hc, &name, cdir.as_ptr()),
                ElraStatus::ELRA_OK
            );
            assert_eq!(
                elra_adapter_load(
                    cdir.as_ptr(),
                    name,
                    1,
                    D,
                    K,
                    rows.as_ptr().cast::<c_void>(),
                    K,
                    &mut loaded
                ),
                ElraStatus::ELRA_OK
            );
            assert_eq!(
                elra_adapter_get_config(h, &mut c_before),
                ElraStatus::ELRA_OK
            );
            assert_eq!(
                elra_adapter_get_config(loaded, &mut c_after),
                ElraStatus::ELRA_OK
            );
            elra_adapter_destroy(h);
            elra_adapter_destroy(loaded);
        }
        assert_eq!(c_after, c_before, "{g:?}");
        assert_eq!(c_after, c_config(&g));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
