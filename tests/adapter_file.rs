//! Claims about adapter files (`elra::io`): PEFT-exact LoRA layout, ELRA layout, exact round
//! trips, atomic writes, and that truncated, oversized, wrongly shaped or hostile files are
//! rejected with an error naming the problem (never a panic, never a partial adapter).

use elra::adapter::{AlphaSchedule, EtaMultiplier, GeneratorConfig, Variant};
use elra::io::{
    load_merged, save_merged, AdapterFile, ElraFileConfig, FileConfig, LoadLimits, LoraFileConfig,
    ModuleWeights, CONFIG_FILE, ELRA_FORMAT_VERSION, WEIGHTS_FILE,
};
use elra::ElraError;
use nalgebra::DMatrix;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("elra-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn rand_mat(r: usize, c: usize, rng: &mut ChaCha8Rng) -> DMatrix<f64> {
    DMatrix::from_fn(r, c, |_, _| rng.random_range(-1.0..1.0))
}

const MODS: [&str; 2] = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
];

fn lora_file(rng: &mut ChaCha8Rng) -> AdapterFile<f64> {
    let mut modules = BTreeMap::new();
    for (i, m) in MODS.iter().enumerate() {
        let (out, inp) = (6 + i, 5);
        modules.insert(
            m.to_string(),
            ModuleWeights::Lora {
                lora_a: rand_mat(3, inp, rng),
                lora_b: rand_mat(out, 3, rng),
            },
        );
    }
    let mut c = LoraFileConfig::new(3, 8.0, vec!["q_proj".into(), "v_proj".into()]);
    c.task_type = Some("CAUSAL_LM".into());
    c.base_model_name_or_path = Some("toy/model".into());
    AdapterFile {
        config: FileConfig::Lora(c),
        modules,
    }
}

fn elra_config(variant: &str, r: usize) -> ElraFileConfig {
    ElraFileConfig {
        peft_type: "ELRA".into(),
        generator: GeneratorConfig {
            variant: variant.parse::<Variant>().unwrap(),
            eta: 1e-3,
            lambda: 1e-5,
            tau: Some(2.0),
            schedule: AlphaSchedule::Exponential {
                warmup_steps: 25,
                gamma: 5.0,
            },
            eta_multiplier: EtaMultiplier::Cosine { total_steps: 100 },
        },
        r,
        seed: 3,
        step: 42,
        target_modules: MODS.iter().map(|s| s.to_string()).collect(),
        task_type: None,
        base_model_name_or_path: Some("toy/model".into()),
        format_version: ELRA_FORMAT_VERSION,
    }
}

fn elra_file(variant: &str, rng: &mut ChaCha8Rng) -> AdapterFile<f64> {
    let mut modules = BTreeMap::new();
    for m in MODS {
        let d = 7;
        modules.insert(
            m.to_string(),
            ModuleWeights::Elra {
                a: rand_mat(d, 2, rng),
                b: (variant != "psd").then(|| rand_mat(2, d, rng)),
                eta: 0.0123,
            },
        );
    }
    AdapterFile {
        config: FileConfig::Elra(elra_config(variant, 2)),
        modules,
    }
}

fn to_f32(f: &AdapterFile<f64>) -> AdapterFile<f32> {
    let cv = |m: &DMatrix<f64>| m.map(|x| x as f32);
    AdapterFile {
        config: f.config.clone(),
        modules: f
            .modules
            .iter()
            .map(|(k, v)| {
                let w = match v {
                    ModuleWeights::Lora { lora_a, lora_b } => ModuleWeights::Lora {
                        lora_a: cv(lora_a),
                        lora_b: cv(lora_b),
                    },
                    ModuleWeights::Elra { a, b, eta } => ModuleWeights::Elra {
                        a: cv(a),
                        b: b.as_ref().map(cv),
                        eta: *eta as f32,
                    },
                };
                (k.clone(), w)
            })
            .collect(),
    }
}

#[test]
fn lora_directory_follows_peft_keys_shapes_and_config_fields() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let f = lora_file(&mut rng);
    let dir = tmpdir("lora");
    f.save(&dir).unwrap();
    let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(
        names,
        vec![
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
            "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight",
        ]
    );
    let a = st
        .tensor("base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight")
        .unwrap();
    assert_eq!(a.shape(), &[3, 5], "lora_A is r×in");
    assert_eq!(a.dtype(), Dtype::F64);
    let b = st
        .tensor("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight")
        .unwrap();
    assert_eq!(b.shape(), &[7, 3], "lora_B is out×r");
    // Row-major: the first 8 bytes of lora_B are entry (0, 0), the next entry (0, 1).
    let ModuleWeights::Lora { lora_b, .. } = &f.modules[MODS[1]] else {
        unreachable!()
    };
    let v01 = f64::from_le_bytes(b.data()[8..16].try_into().unwrap());
    assert_eq!(v01, lora_b[(0, 1)]);
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .unwrap()
            .get("format")
            .map(String::as_str),
        Some("pt")
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(CONFIG_FILE)).unwrap()).unwrap();
    for k in [
        "peft_type",
        "r",
        "lora_alpha",
        "target_modules",
        "lora_dropout",
        "bias",
        "fan_in_fan_out",
        "task_type",
        "base_model_name_or_path",
    ] {
        assert!(cfg.get(k).is_some(), "config lacks {k}");
    }
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 3);
    assert_eq!(cfg["bias"], "none");
    // Exact round trip, and no temporary files left behind.
    assert_eq!(AdapterFile::<f64>::load(&dir).unwrap(), f);
    let mut left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, vec![CONFIG_FILE, WEIGHTS_FILE]);
    let FileConfig::Lora(c) = &f.config else {
        unreachable!()
    };
    assert_eq!(c.scaling_for(MODS[0]), 8.0 / 3.0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn elra_round_trips_exactly_in_f32_and_f64_for_every_variant() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for variant in ["general", "psd", "hyb"] {
        let f = elra_file(variant, &mut rng);
        let (json, w) = f.to_bytes().unwrap();
        assert_eq!(AdapterFile::<f64>::from_bytes(&json, &w).unwrap(), f);
        let st = SafeTensors::deserialize(&w).unwrap();
        let eta = st
            .tensor("base_model.model.model.layers.0.self_attn.q_proj.elra_eta")
            .unwrap();
        assert_eq!(eta.shape(), &[] as &[usize]);
        let a = st
            .tensor("base_model.model.model.layers.0.self_attn.q_proj.elra_A.weight")
            .unwrap();
        assert_eq!(a.shape(), &[7, 2], "elra_A is d×r");
        assert_eq!(
            st.tensor("base_model.model.model.layers.0.self_attn.q_proj.elra_B.weight")
                .is_ok(),
            variant != "psd"
        );
        let f32f = to_f32(&f);
        let dir = tmpdir(&format!("elra-{variant}"));
        f32f.save(&dir).unwrap();
        let back = AdapterFile::<f32>::load(&dir).unwrap();
        assert_eq!(back, f32f);
        // Loading an f32 file as f64 widens exactly.
        let wide = AdapterFile::<f64>::load(&dir).unwrap();
        assert_eq!(to_f32(&wide), f32f);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A hand-made PEFT directory as PEFT writes it: bf16 tensors, integer lora_alpha, PEFT's extra
/// config fields.
#[test]
fn loads_a_peft_written_bf16_lora_directory() {
    let header = r#"{"__metadata__":{"format":"pt"},"base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight":{"dtype":"BF16","shape":[1,2],"data_offsets":[0,4]},"base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_B.weight":{"dtype":"BF16","shape":[3,1],"data_offsets":[4,10]}}"#;
    let mut w = (header.len() as u64).to_le_bytes().to_vec();
    w.extend_from_slice(header.as_bytes());
    // bf16: 1.0 = 0x3F80, -2.0 = 0xC000, 0.5 = 0x3F00, 3.0 = 0x4040, -0.25 = 0xBE80.
    for v in [0x3F80u16, 0xC000, 0x3F00, 0x4040, 0xBE80] {
        w.extend_from_slice(&v.to_le_bytes());
    }
    let cfg = br#"{"alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": "facebook/opt-125m",
      "bias": "none", "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true,
      "layers_pattern": null, "layers_to_transform": null, "lora_alpha": 16, "lora_dropout": 0.05,
      "modules_to_save": null, "peft_type": "LORA", "r": 1, "rank_pattern": {}, "revision": null,
      "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM", "use_dora": false, "use_rslora": false}"#;
    let f = AdapterFile::<f32>::from_bytes(cfg, &w).unwrap();
    let m = &f.modules["model.decoder.layers.0.self_attn.q_proj"];
    let ModuleWeights::Lora { lora_a, lora_b } = m else {
        panic!("not LoRA")
    };
    assert_eq!(lora_a, &DMatrix::from_row_slice(1, 2, &[1.0, -2.0]));
    assert_eq!(lora_b, &DMatrix::from_row_slice(3, 1, &[0.5, 3.0, -0.25]));
    let FileConfig::Lora(c) = &f.config else {
        panic!()
    };
    assert_eq!(
        c.scaling_for("model.decoder.layers.0.self_attn.q_proj"),
        16.0
    );
}

/// PEFT's `LoraConfig` annotates `lora_alpha: int` and its pattern fields `Optional[dict]`:
/// integral alphas are written as JSON integers (fractional ones as floats), and `null` patterns
/// read as empty.
#[test]
fn lora_alpha_is_written_as_peft_writes_it_and_null_patterns_load() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut f = lora_file(&mut rng);
    let FileConfig::Lora(c) = &mut f.config else {
        unreachable!()
    };
    c.lora_alpha = 7.0;
    c.alpha_pattern = BTreeMap::from([("q_proj".to_string(), 4.0), ("v_proj".to_string(), 2.5)]);
    let (json, w) = f.to_bytes().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert!(
        v["lora_alpha"].is_i64(),
        "lora_alpha written as {}",
        v["lora_alpha"]
    );
    assert_eq!(v["lora_alpha"], 7);
    assert!(v["alpha_pattern"]["q_proj"].is_i64());
    assert_eq!(v["alpha_pattern"]["v_proj"].as_f64(), Some(2.5));
    let back = AdapterFile::<f64>::from_bytes(&json, &w).unwrap();
    assert_eq!(back, f);
    let FileConfig::Lora(bc) = &back.config else {
        unreachable!()
    };
    assert_eq!(bc.scaling_for(MODS[0]), 4.0 / 3.0);
    assert_eq!(bc.scaling_for(MODS[1]), 2.5 / 3.0);
    // A fractional lora_alpha stays a float, exactly.
    let FileConfig::Lora(c) = &mut f.config else {
        unreachable!()
    };
    c.lora_alpha = 7.25;
    c.alpha_pattern.clear();
    let (json, w) = f.to_bytes().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert!(v["lora_alpha"].is_f64());
    assert_eq!(AdapterFile::<f64>::from_bytes(&json, &w).unwrap(), f);
    // `null` patterns (PEFT's Optional[dict]) read as empty; a null rank is still an error.
    let mut v = v;
    v["rank_pattern"] = serde_json::Value::Null;
    v["alpha_pattern"] = serde_json::Value::Null;
    let nulls = serde_json::to_vec(&v).unwrap();
    assert_eq!(AdapterFile::<f64>::from_bytes(&nulls, &w).unwrap(), f);
    v["rank_pattern"] = serde_json::json!({ "q_proj": null });
    let bad = serde_json::to_vec(&v).unwrap();
    expect_format(AdapterFile::<f64>::from_bytes(&bad, &w), CONFIG_FILE);
}

fn expect_format(r: Result<AdapterFile<f64>, ElraError>, needle: &str) {
    match r {
        Err(ElraError::Format(msg)) => assert!(
            msg.contains(needle),
            "message {msg:?} does not mention {needle:?}"
        ),
        other => panic!("expected a format error mentioning {needle:?}, got {other:?}"),
    }
}

/// Rebuilds a safetensors file with one tensor's header entry edited.
fn rewrite_header(w: &[u8], edit: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    let n = u64::from_le_bytes(w[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Value = serde_json::from_slice(&w[8..8 + n]).unwrap();
    edit(&mut h);
    let hs = serde_json::to_vec(&h).unwrap();
    let mut out = (hs.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&hs);
    out.extend_from_slice(&w[8 + n..]);
    out
}

#[test]
fn hostile_and_broken_files_are_rejected_with_named_problems() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let f = elra_file("general", &mut rng);
    let (json, w) = f.to_bytes().unwrap();
    let load = |j: &[u8], w: &[u8]| AdapterFile::<f64>::from_bytes(j, w);
    // Every truncation of the weights file fails cleanly.
    for cut in 0..w.len() {
        assert!(matches!(load(&json, &w[..cut]), Err(ElraError::Format(_))));
    }
    // Every truncation of the config fails cleanly.
    for cut in 0..json.len() {
        assert!(load(&json[..cut], &w).is_err());
    }
    // Trailing garbage / oversized.
    let mut longer = w.clone();
    longer.push(0);
    expect_format(load(&json, &longer), WEIGHTS_FILE);
    let huge_header = [u64::MAX.to_le_bytes().to_vec(), vec![b'{'; 16]].concat();
    expect_format(load(&json, &huge_header), WEIGHTS_FILE);
    let limits = LoadLimits {
        max_weights_bytes: 100,
        ..LoadLimits::default()
    };
    expect_format(
        AdapterFile::<f64>::from_bytes_with(&json, &w, &limits),
        "exceed the limit",
    );
    // Wrong shape: the header claims B is 7×2 (same byte count as 2×7).
    let qb = "base_model.model.model.layers.0.self_attn.q_proj.elra_B.weight";
    let bad = rewrite_header(&w, |h| h[qb]["shape"] = serde_json::json!([7, 2]));
    expect_format(load(&json, &bad), "shape [7, 2], expected [2, 7]");
    // Missing B for the general variant.
    let psd = elra_file("psd", &mut rng);
    let (_, wpsd) = psd.to_bytes().unwrap();
    expect_format(load(&json, &wpsd), "elra_B.weight");
    // Unexpected tensor name and path-like module name.
    let bad = rewrite_header(&w, |h| {
        let v = h[qb].clone();
        h.as_object_mut().unwrap().remove(qb);
        h["base_model.model.../../etc/passwd.elra_B.weight"] = v;
    });
    expect_format(load(&json, &bad), "unexpected tensor");
    // Integer dtype.
    let bad = rewrite_header(&w, |h| h[qb]["dtype"] = serde_json::json!("I64"));
    expect_format(load(&json, &bad), "dtype I64");
    // Offsets pointing outside the data.
    let bad = rewrite_header(&w, |h| {
        h[qb]["data_offsets"] = serde_json::json!([0, 1u64 << 40])
    });
    expect_format(load(&json, &bad), WEIGHTS_FILE);
    // Shape whose element count overflows.
    let bad = rewrite_header(&w, |h| {
        h[qb]["shape"] = serde_json::json!([u64::MAX, u64::MAX])
    });
    expect_format(load(&json, &bad), WEIGHTS_FILE);
    // A NaN inside A.
    let qa = "base_model.model.model.layers.0.self_attn.q_proj.elra_A.weight";
    let st = SafeTensors::deserialize(&w).unwrap();
    let a_off = st.tensor(qa).unwrap().data().as_ptr() as usize - w.as_ptr() as usize;
    let mut nan = w.clone();
    nan[a_off..a_off + 8].copy_from_slice(&f64::NAN.to_le_bytes());
    expect_format(load(&json, &nan), "non-finite");
    // An f64 value outside the f32 range loads as f64 but not as f32.
    let mut big = w.clone();
    big[a_off..a_off + 8].copy_from_slice(&1e300f64.to_le_bytes());
    assert!(load(&json, &big).is_ok());
    assert!(matches!(
        AdapterFile::<f32>::from_bytes(&json, &big),
        Err(ElraError::Format(m)) if m.contains("f32 range")
    ));
    // Config problems.
    let cfg = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        edit(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    expect_format(
        load(&cfg(&|v| v["peft_type"] = "IA3".into()), &w),
        "peft_type",
    );
    expect_format(load(&cfg(&|v| v["r"] = 3.into()), &w), "shape");
    expect_format(load(&cfg(&|v| v["eta"] = (-1.0).into()), &w), "eta");
    expect_format(
        load(&cfg(&|v| v["variant"] = "psd".into()), &w),
        "variant psd has no B",
    );
    expect_format(
        load(
            &cfg(&|v| v["target_modules"] = serde_json::json!([MODS[0]])),
            &w,
        ),
        "target_modules",
    );
    expect_format(load(b"{not json", &w), CONFIG_FILE);
    expect_format(load(b"[]", &w), CONFIG_FILE);
    // A LoRA config over ELRA tensors.
    let (lj, _) = lora_file(&mut rng).to_bytes().unwrap();
    expect_format(load(&lj, &w), "unexpected tensor");
}

#[test]
fn random_corruption_never_panics_and_never_yields_a_different_adapter() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let f = lora_file(&mut rng);
    let (json, w) = f.to_bytes().unwrap();
    let mut accepted = 0;
    for _ in 0..3000 {
        let mut c = w.clone();
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(0..c.len());
            c[i] = rng.random();
        }
        if let Ok(g) = AdapterFile::<f64>::from_bytes(&json, &c) {
            // Only flips inside tensor data can survive; then every shape still matches.
            accepted += 1;
            assert_eq!(g.modules.len(), f.modules.len());
            for (k, m) in &g.modules {
                let (
                    ModuleWeights::Lora { lora_a, lora_b },
                    ModuleWeights::Lora {
                        lora_a: a0,
                        lora_b: b0,
                    },
                ) = (m, &f.modules[k])
                else {
                    panic!()
                };
                assert_eq!((lora_a.shape(), lora_b.shape()), (a0.shape(), b0.shape()));
            }
        }
    }
    assert!(accepted < 3000);
}

#[test]
fn saving_over_an_existing_adapter_replaces_it_whole() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let dir = tmpdir("overwrite");
    let f1 = elra_file("hyb", &mut rng);
    let f2 = elra_file("psd", &mut rng);
    f1.save(&dir).unwrap();
    f2.save(&dir).unwrap();
    assert_eq!(AdapterFile::<f64>::load(&dir).unwrap(), f2);
    // An invalid adapter is refused before anything is written.
    let mut bad = f1.clone();
    if let Some(ModuleWeights::Elra { eta, .. }) = bad.modules.get_mut(MODS[0]) {
        *eta = f64::NAN;
    }
    assert!(bad.save(&dir).is_err());
    assert_eq!(AdapterFile::<f64>::load(&dir).unwrap(), f2);
    // A directory where the config goes: the save fails and changes nothing — the previous
    // weights stay, no new weights appear beside an old config, no temporary file remains.
    let dir2 = tmpdir("overwrite-blocked");
    f1.save(&dir2).unwrap();
    let weights_before = std::fs::read(dir2.join(WEIGHTS_FILE)).unwrap();
    std::fs::remove_file(dir2.join(CONFIG_FILE)).unwrap();
    std::fs::create_dir(dir2.join(CONFIG_FILE)).unwrap();
    assert!(matches!(f2.save(&dir2), Err(ElraError::Io { .. })));
    assert_eq!(
        std::fs::read(dir2.join(WEIGHTS_FILE)).unwrap(),
        weights_before
    );
    let mut names: Vec<String> = std::fs::read_dir(&dir2)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [CONFIG_FILE, WEIGHTS_FILE]);
    std::fs::remove_dir_all(&dir2).unwrap();
    // A missing directory is an I/O error naming the path.
    match AdapterFile::<f64>::load(dir.join("nope")) {
        Err(ElraError::Io { path, .. }) => assert!(path.contains("nope")),
        other => panic!("{other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn merged_weights_export_round_trips() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let dir = tmpdir("merged");
    let w1 = rand_mat(4, 6, &mut rng);
    let w2 = rand_mat(3, 2, &mut rng);
    let path = dir.join("merged.safetensors");
    save_merged(&path, &[(MODS[0], &w1), (MODS[1], &w2)]).unwrap();
    let back = load_merged::<f64>(&path, &LoadLimits::default()).unwrap();
    assert_eq!(back[MODS[0]], w1);
    assert_eq!(back[MODS[1]], w2);
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor(&format!("{}.weight", MODS[0])).unwrap().shape(),
        &[4, 6]
    );
    assert!(save_merged(&path, &[(MODS[0], &w1), (MODS[0], &w2)]).is_err());
    assert!(save_merged::<f64>(&path, &[("bad name", &w1)]).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn elra_and_lora_layers_round_trip_through_a_directory() {
    use elra::adapter::{ElraConfig, ElraLayer, LoraConfig, LoraLayer, Variant};
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let dir = tmpdir("layers");
    for variant in [Variant::General, Variant::Psd, Variant::Hyb] {
        let (d1, k1, d2, k2) = (6, 5, 4, 7);
        let mut c1 = ElraConfig::new(variant, d1, k1, 2, 50);
        c1.seed = 11;
        let mut c2 = c1.clone();
        c2.d = d2;
        c2.k = k2;
        let w01 = rand_mat(d1, k1, &mut rng);
        let w02 = rand_mat(d2, k2, &mut rng);
        let mut l1 = ElraLayer::new(c1, w01.clone()).unwrap();
        let mut l2 = ElraLayer::new(c2, w02.clone()).unwrap();
        // Pretend training moved η and the step (α of the Hyb schedule depends on it).
        for l in [&mut l1, &mut l2] {
            l.set_eta(0.37).unwrap();
            l.set_step(9);
        }
        let f = AdapterFile::from_elra_layers(&[(MODS[0], &l1), (MODS[1], &l2)]).unwrap();
        f.save(&dir).unwrap();
        let g = AdapterFile::<f64>::load(&dir).unwrap();
        let back1 = g.elra_layer(MODS[0], w01).unwrap();
        let back2 = g.elra_layer(MODS[1], w02.clone()).unwrap();
        assert_eq!(back1, l1);
        assert_eq!(back2, l2);
        let x = rand_mat(3, k2, &mut rng);
        assert_eq!(back2.forward(&x).unwrap(), l2.forward(&x).unwrap());
        // W0 with the wrong number of rows is refused.
        assert!(g
            .elra_layer(MODS[1], rand_mat(d2 + 1, k2, &mut rng))
            .is_err());
        assert!(g.elra_layer("missing.module", w02).is_err());
    }
    // Layers with different settings cannot share a file.
    let a = ElraLayer::<f64>::new(
        ElraConfig::new(Variant::General, 4, 4, 2, 10),
        DMatrix::identity(4, 4),
    )
    .unwrap();
    let b = ElraLayer::<f64>::new(
        ElraConfig::new(Variant::Hyb, 4, 4, 2, 10),
        DMatrix::identity(4, 4),
    )
    .unwrap();
    assert!(AdapterFile::from_elra_layers(&[(MODS[0], &a), (MODS[1], &b)]).is_err());
    // LoRA.
    let w0 = rand_mat(6, 5, &mut rng);
    let mut cfg = LoraConfig::new(6, 5, 2);
    cfg.lora_alpha = 16.0;
    let mut l = LoraLayer::new(cfg, w0.clone()).unwrap();
    l.set_lora_b(rand_mat(6, 2, &mut rng)).unwrap();
    let f = AdapterFile::from_lora_layers(&[(MODS[0], &l)]).unwrap();
    f.save(&dir).unwrap();
    let g = AdapterFile::<f64>::load(&dir).unwrap();
    let back = g.lora_layer(MODS[0], w0).unwrap();
    assert_eq!(back.lora_a(), l.lora_a());
    assert_eq!(back.lora_b(), l.lora_b());
    assert_eq!(back.merge().unwrap(), l.merge().unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}
