//! Streaming merge and unmerge of safetensors checkpoints (`elra::io::checkpoint`), on
//! checkpoints these tests write: several shards with an index, mixed dtypes (F32, F16, BF16,
//! F64), tensors the adapter does not touch (a bias, an I64 tensor, an embedding), other files.
//! The merged tensors are checked against the in-memory merge of the CPU layers
//! (`ElraLayer::merge`, `LoraLayer::merge` in f64, rounded to the tensor's dtype), read back
//! with the `safetensors` crate; unmerge(merge) against the base; bad checkpoints and adapters
//! against their errors, with no output left behind.

use elra::adapter::{GeneratorConfig, Variant};
use elra::io::{
    merge_checkpoint, AdapterFile, Direction, ElraFileConfig, FileConfig, LoraFileConfig,
    ModuleWeights, ELRA_FORMAT_VERSION,
};
use elra::ElraError;
use nalgebra::DMatrix;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// A fresh empty directory under the target dir.
fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("checkpoint-{name}"));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

/// A deterministic matrix with entries in about [−1, 1].
fn mat(rows: usize, cols: usize, seed: usize) -> DMatrix<f64> {
    DMatrix::from_fn(rows, cols, |i, j| {
        (((i * 31 + j * 17 + seed * 7) % 23) as f64 / 11.0 - 1.0) * (1.0 + 0.1 * seed as f64)
    })
}

fn encode(m: &DMatrix<f64>, dtype: Dtype) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            let x = m[(i, j)];
            match dtype {
                Dtype::F32 => out.extend_from_slice(&(x as f32).to_le_bytes()),
                Dtype::F64 => out.extend_from_slice(&x.to_le_bytes()),
                Dtype::F16 => out.extend_from_slice(&half::f16::from_f64(x).to_le_bytes()),
                Dtype::BF16 => out.extend_from_slice(&half::bf16::from_f64(x).to_le_bytes()),
                _ => unreachable!(),
            }
        }
    }
    out
}

fn decode(v: &TensorView<'_>) -> DMatrix<f64> {
    let (r, c) = (v.shape()[0], v.shape()[1]);
    let b = v.data();
    let at = |i: usize| -> f64 {
        match v.dtype() {
            Dtype::F32 => f32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap()) as f64,
            Dtype::F64 => f64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap()),
            Dtype::F16 => half::f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f64(),
            Dtype::BF16 => half::bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f64(),
            d => panic!("unexpected dtype {d:?}"),
        }
    };
    DMatrix::from_fn(r, c, |i, j| at(i * c + j))
}

/// Rounds through a dtype (what storing a value in it does).
fn round(m: &DMatrix<f64>, dtype: Dtype) -> DMatrix<f64> {
    m.map(|x| match dtype {
        Dtype::F32 => x as f32 as f64,
        Dtype::F16 => half::f16::from_f64(x).to_f64(),
        Dtype::BF16 => half::bf16::from_f64(x).to_f64(),
        _ => x,
    })
}

/// Unit roundoff of a dtype.
fn unit(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::F32 => 2f64.powi(-24),
        Dtype::F16 => 2f64.powi(-11),
        Dtype::BF16 => 2f64.powi(-8),
        _ => 2f64.powi(-53),
    }
}

/// The adapted weights of the test checkpoint: name, shape, dtype.
const ADAPTED: [(&str, usize, usize, Dtype); 4] = [
    ("model.layers.0.attn.q_proj", 24, 16, Dtype::F32),
    ("model.layers.0.attn.v_proj", 24, 16, Dtype::F16),
    ("model.layers.1.attn.q_proj", 32, 24, Dtype::BF16),
    ("model.layers.1.mlp.up", 16, 16, Dtype::F64),
];

struct Tensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// The base checkpoint's tensors: the adapted weights, plus a bias, an I64 tensor and an
/// embedding the adapter does not touch.
fn base_tensors() -> Vec<Tensor> {
    let mut ts: Vec<Tensor> = ADAPTED
        .iter()
        .enumerate()
        .map(|(i, &(m, r, c, dtype))| Tensor {
            name: format!("{m}.weight"),
            dtype,
            shape: vec![r, c],
            data: encode(&mat(r, c, i), dtype),
        })
        .collect();
    ts.push(Tensor {
        name: "model.layers.0.attn.q_proj.bias".into(),
        dtype: Dtype::F32,
        shape: vec![24],
        data: encode(&mat(1, 24, 9), Dtype::F32),
    });
    ts.push(Tensor {
        name: "model.positions".into(),
        dtype: Dtype::I64,
        shape: vec![5],
        data: (0..5i64).flat_map(|x| x.to_le_bytes()).collect(),
    });
    ts.push(Tensor {
        name: "model.embed.weight".into(),
        dtype: Dtype::BF16,
        shape: vec![10, 16],
        data: encode(&mat(10, 16, 5), Dtype::BF16),
    });
    ts
}

fn write_shard(path: &Path, ts: &[&Tensor]) {
    let views: Vec<(String, TensorView<'_>)> = ts
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Writes the checkpoint: three shards with an index (sharded) or one `model.safetensors`,
/// plus `config.json` and a `pytorch_model.bin` that must not be copied.
fn write_base(dir: &Path, sharded: bool) -> Vec<Tensor> {
    let ts = base_tensors();
    if sharded {
        let groups: [&[usize]; 3] = [&[0, 4, 5], &[1, 2], &[3, 6]];
        let mut map = serde_json::Map::new();
        for (s, g) in groups.iter().enumerate() {
            let file = format!("model-{:05}-of-00003.safetensors", s + 1);
            let part: Vec<&Tensor> = g.iter().map(|&i| &ts[i]).collect();
            write_shard(&dir.join(&file), &part);
            for t in part {
                map.insert(t.name.clone(), file.clone().into());
            }
        }
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
        fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_vec_pretty(&index).unwrap(),
        )
        .unwrap();
    } else {
        let all: Vec<&Tensor> = ts.iter().collect();
        write_shard(&dir.join("model.safetensors"), &all);
    }
    fs::write(dir.join("config.json"), b"{\"model_type\": \"test\"}").unwrap();
    fs::write(dir.join("pytorch_model.bin"), b"stale unmerged weights").unwrap();
    ts
}

/// An ELRA adapter over the four adapted modules (`variant`, η = 0.4, a step inside Hyb's
/// warm-up so 0 < α < 1).
fn elra_adapter(dir: &Path, variant: Variant) -> AdapterFile<f64> {
    let mut modules = BTreeMap::new();
    let r = 3;
    for (i, &(m, d, _, _)) in ADAPTED.iter().enumerate() {
        let a = mat(d, r, 10 + i) * 0.3;
        let b = variant.uses_b().then(|| mat(r, d, 20 + i) * 0.3);
        modules.insert(m.to_string(), ModuleWeights::Elra { a, b, eta: 0.4 });
    }
    let mut generator = GeneratorConfig::paper_default(variant, 100);
    generator.eta = 0.4;
    let f = AdapterFile {
        config: FileConfig::Elra(ElraFileConfig {
            peft_type: "ELRA".into(),
            generator,
            r,
            seed: 0,
            step: 10,
            target_modules: modules.keys().cloned().collect(),
            task_type: None,
            base_model_name_or_path: None,
            format_version: ELRA_FORMAT_VERSION,
        }),
        modules,
    };
    f.save(dir).unwrap();
    f
}

/// The in-memory merge (or unmerge) of one module on `w` in f64, by the CPU layers.
fn in_memory(f: &AdapterFile<f64>, module: &str, w: DMatrix<f64>, inverse: bool) -> DMatrix<f64> {
    match &f.config {
        FileConfig::Elra(_) => {
            let layer = f.elra_layer(module, w.clone()).unwrap();
            if inverse {
                layer.unmerge(&w).unwrap()
            } else {
                layer.merge().unwrap()
            }
        }
        FileConfig::Lora(c) => {
            let ModuleWeights::Lora { lora_a, lora_b } = &f.modules[module] else {
                unreachable!()
            };
            let delta = lora_b * lora_a * c.scaling_for(module);
            let delta = if c.fan_in_fan_out {
                delta.transpose()
            } else {
                delta
            };
            if inverse {
                w - delta
            } else {
                w + delta
            }
        }
    }
}

fn read_file(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap()
}

/// Every tensor of a checkpoint directory, by name: (dtype, shape, bytes).
fn tensors_of(dir: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let bytes = read_file(&p);
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (name, v) in st.iter() {
                out.insert(
                    name.to_string(),
                    (v.dtype(), v.shape().to_vec(), v.data().to_vec()),
                );
            }
        }
    }
    out
}

fn view(t: &(Dtype, Vec<usize>, Vec<u8>)) -> TensorView<'_> {
    TensorView::new(t.0, t.1.clone(), &t.2).unwrap()
}

/// Checks `out` = the in-memory merge (or unmerge) of `base` with `f`, element by element within
/// the dtype's rounding of the result plus the f32 computation's error, and every untouched
/// tensor byte for byte.
fn check_merged(base: &Path, out: &Path, f: &AdapterFile<f64>, inverse: bool) {
    let (b, o) = (tensors_of(base), tensors_of(out));
    assert_eq!(b.keys().collect::<Vec<_>>(), o.keys().collect::<Vec<_>>());
    for (name, bt) in &b {
        let ot = &o[name];
        assert_eq!(
            (bt.0, &bt.1),
            (ot.0, &ot.1),
            "{name}: dtype or shape changed"
        );
        let Some(module) = name
            .strip_suffix(".weight")
            .filter(|m| f.modules.contains_key(*m))
        else {
            assert_eq!(bt.2, ot.2, "{name}: an untouched tensor changed");
            continue;
        };
        let want = in_memory(f, module, decode(&view(bt)), inverse);
        let got = decode(&view(ot));
        let scale = want.amax();
        // Within one rounding of the dtype per entry, plus the f32 (or f64) computation's error.
        let compute = if bt.0 == Dtype::F64 { 1e-13 } else { 2e-6 };
        for (w, g) in want.iter().zip(got.iter()) {
            let tol = unit(bt.0) * w.abs() + compute * scale;
            assert!(
                (w - g).abs() <= tol,
                "{name}: got {g}, in-memory {w} (tol {tol:e})"
            );
        }
        assert_eq!(got, round(&got, bt.0));
    }
}

#[test]
fn sharded_mixed_dtype_merge_equals_the_in_memory_merge_and_unmerge_restores_the_base() {
    for variant in [Variant::General, Variant::Psd, Variant::Hyb] {
        let root = scratch(&format!("sharded-{variant}"));
        let (base, adapter) = (root.join("base"), root.join("adapter"));
        fs::create_dir_all(&base).unwrap();
        write_base(&base, true);
        let f = elra_adapter(&adapter, variant);
        let merged = root.join("merged");
        let mut calls = Vec::new();
        let report = merge_checkpoint(&base, &adapter, &merged, Direction::Merge, &mut |d, t| {
            calls.push((d, t))
        })
        .unwrap();
        assert_eq!((report.shards, report.tensors, report.adapted), (3, 7, 4));
        assert_eq!(report.other_files, 1);
        assert_eq!(report.skipped_files, vec!["pytorch_model.bin".to_string()]);
        assert_eq!(calls.last().map(|c| c.0), Some(report.bytes));
        assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));
        check_merged(&base, &merged, &f, false);
        // Same sharding, index and headers; the other files as they were.
        for name in [
            "model.safetensors.index.json",
            "config.json",
            "model-00001-of-00003.safetensors",
        ] {
            let (a, b) = (read_file(&base.join(name)), read_file(&merged.join(name)));
            let n = if name.ends_with(".safetensors") {
                8 + u64::from_le_bytes(a[..8].try_into().unwrap()) as usize
            } else {
                a.len()
            };
            assert_eq!(a[..n], b[..n], "{name}");
        }
        assert!(!merged.join("pytorch_model.bin").exists());
        // Unmerge of the merge: the base back, to the rounding of each dtype.
        let back = root.join("back");
        merge_checkpoint(&merged, &adapter, &back, Direction::Unmerge, &mut |_, _| {}).unwrap();
        check_merged(&merged, &back, &f, true);
        let (b, o) = (tensors_of(&base), tensors_of(&back));
        for &(m, _, _, dtype) in &ADAPTED {
            let name = format!("{m}.weight");
            let (w0, w) = (decode(&view(&b[&name])), decode(&view(&o[&name])));
            let err = (&w - &w0).amax() / w0.amax();
            // Relative to max |W0|. f32: to rounding (measured ≤ 9.5e-7, PSD); bf16/f16: the
            // stored merge's rounding carried through exp(−G), then the final rounding — at
            // most 4 units of the dtype (measured ≤ 3.3 units: bf16 1.3e-2, f16 1.8e-3, PSD).
            let tol = match dtype {
                Dtype::F32 => 2e-6,
                Dtype::F64 => 1e-13,
                d => 4.0 * unit(d),
            };
            assert!(
                err <= tol,
                "{variant} {name} ({dtype:?}): unmerge(merge) error {err:e} > {tol:e}"
            );
        }
    }
}

#[test]
fn peft_lora_merges_into_a_single_file_checkpoint_and_unmerges() {
    for fan_in_fan_out in [false, true] {
        let root = scratch(&format!("lora-{fan_in_fan_out}"));
        let (base, adapter) = (root.join("base"), root.join("adapter"));
        fs::create_dir_all(&base).unwrap();
        let ts = write_base(&base, false);
        let _ = ts;
        let mut modules = BTreeMap::new();
        let r = 4;
        for (i, &(m, d, k, _)) in ADAPTED.iter().enumerate() {
            let (out_f, in_f) = if fan_in_fan_out { (k, d) } else { (d, k) };
            modules.insert(
                m.to_string(),
                ModuleWeights::Lora {
                    lora_a: mat(r, in_f, 30 + i) * 0.2,
                    lora_b: mat(out_f, r, 40 + i) * 0.2,
                },
            );
        }
        let mut c = LoraFileConfig::new(r, 8.0, modules.keys().cloned().collect());
        c.fan_in_fan_out = fan_in_fan_out;
        c.rank_pattern.insert("mlp.up".into(), r);
        c.alpha_pattern.insert("mlp.up".into(), 2.0);
        let f = AdapterFile {
            config: FileConfig::Lora(c),
            modules,
        };
        f.save(&adapter).unwrap();
        let merged = root.join("merged");
        let report =
            merge_checkpoint(&base, &adapter, &merged, Direction::Merge, &mut |_, _| {}).unwrap();
        assert_eq!((report.shards, report.adapted), (1, 4));
        check_merged(&base, &merged, &f, false);
        let back = root.join("back");
        merge_checkpoint(&merged, &adapter, &back, Direction::Unmerge, &mut |_, _| {}).unwrap();
        check_merged(&merged, &back, &f, true);
    }
}

/// Saves an ELRA adapter whose modules were edited (its config lists them).
fn resave(f: &mut AdapterFile<f64>, dir: &Path) {
    if let FileConfig::Elra(c) = &mut f.config {
        c.target_modules = f.modules.keys().cloned().collect();
    }
    f.save(dir).unwrap();
}

/// Runs a merge expected to fail and checks that it leaves nothing: no `out`, no temporary.
fn fails(base: &Path, adapter: &Path, root: &Path) -> ElraError {
    let out = root.join("out");
    let before: Vec<_> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let e = merge_checkpoint(base, adapter, &out, Direction::Merge, &mut |_, _| {}).unwrap_err();
    let after: Vec<_> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "a failed merge left files: {e}");
    e
}

#[test]
fn bad_checkpoints_and_adapters_are_errors_that_leave_no_output() {
    let root = scratch("bad");
    let (base, adapter) = (root.join("base"), root.join("adapter"));
    fs::create_dir_all(&base).unwrap();
    write_base(&base, true);
    elra_adapter(&adapter, Variant::General);

    // A truncated shard: named, found before anything is written.
    let shard = base.join("model-00003-of-00003.safetensors");
    let full = read_file(&shard);
    fs::write(&shard, &full[..full.len() - 3]).unwrap();
    let e = fails(&base, &adapter, &root);
    assert!(matches!(e, ElraError::Format(_)), "{e}");
    assert!(
        e.to_string().contains("model-00003-of-00003.safetensors")
            && e.to_string().contains("truncated"),
        "{e}"
    );
    // Cut inside the header too.
    fs::write(&shard, &full[..20]).unwrap();
    assert!(matches!(
        fails(&base, &adapter, &root),
        ElraError::Format(_)
    ));
    fs::write(&shard, &full).unwrap();

    // Adapter modules the checkpoint does not have: every one listed.
    let other = root.join("other-adapter");
    let mut f = elra_adapter(&other, Variant::General);
    let w = f.modules.remove("model.layers.0.attn.q_proj").unwrap();
    f.modules.insert("layers.0.attn.q_proj".into(), w.clone());
    f.modules.insert("model.layers.9.attn.q_proj".into(), w);
    resave(&mut f, &other);
    let e = fails(&base, &other, &root).to_string();
    for m in [
        "layers.0.attn.q_proj",
        "model.layers.9.attn.q_proj",
        "2 adapter module(s)",
    ] {
        assert!(e.contains(m), "{m} missing from: {e}");
    }

    // A shape the adapter does not fit (A has 32 rows, the tensor 24).
    let mut f = elra_adapter(&other, Variant::General);
    let w = f.modules.remove("model.layers.1.attn.q_proj").unwrap();
    f.modules.insert("model.layers.0.attn.v_proj".into(), w);
    resave(&mut f, &other);
    let e = fails(&base, &other, &root);
    assert!(
        matches!(e, ElraError::InvalidArgument { arg: "adapter", .. }),
        "{e}"
    );
    assert!(
        e.to_string().contains("model.layers.0.attn.v_proj.weight"),
        "{e}"
    );

    // An adapted tensor of another dtype (the I64 one, named as a weight).
    let mut f = elra_adapter(&other, Variant::General);
    let w = f.modules.remove("model.layers.1.mlp.up").unwrap();
    f.modules.insert("model.positions2".into(), w);
    resave(&mut f, &other);
    assert!(fails(&base, &other, &root)
        .to_string()
        .contains("model.positions2"));

    // A NaN in an adapted tensor: found while writing; the partial output is removed.
    let nan_base = root.join("nan-base");
    fs::create_dir_all(&nan_base).unwrap();
    let mut ts = base_tensors();
    ts[2].data[0..2].copy_from_slice(&half::bf16::NAN.to_le_bytes());
    let all: Vec<&Tensor> = ts.iter().collect();
    write_shard(&nan_base.join("model.safetensors"), &all);
    let e = fails(&nan_base, &adapter, &root);
    assert!(
        e.to_string().contains("model.layers.1.attn.q_proj.weight"),
        "{e}"
    );

    // An output that exists already (a file or a directory) is never touched.
    let out = root.join("out");
    fs::write(&out, b"keep").unwrap();
    let e = merge_checkpoint(&base, &adapter, &out, Direction::Merge, &mut |_, _| {}).unwrap_err();
    assert!(
        matches!(e, ElraError::InvalidArgument { arg: "out", .. }),
        "{e}"
    );
    assert_eq!(read_file(&out), b"keep");
    fs::remove_file(&out).unwrap();

    // An index naming a shard outside the directory.
    let evil = root.join("evil");
    fs::create_dir_all(&evil).unwrap();
    fs::write(
        evil.join("model.safetensors.index.json"),
        br#"{"weight_map": {"x.weight": "../base/model-00001-of-00003.safetensors"}}"#,
    )
    .unwrap();
    let e = fails(&evil, &adapter, &root);
    assert!(matches!(e, ElraError::Format(_)), "{e}");
}

#[test]
fn a_merged_value_beyond_f16_is_an_overflow() {
    let root = scratch("f16-overflow");
    let (base, adapter) = (root.join("base"), root.join("adapter"));
    fs::create_dir_all(&base).unwrap();
    let m = "m";
    let t = Tensor {
        name: "m.weight".into(),
        dtype: Dtype::F16,
        shape: vec![4, 4],
        data: encode(&DMatrix::from_element(4, 4, 60000.0), Dtype::F16),
    };
    write_shard(&base.join("model.safetensors"), &[&t]);
    let mut modules = BTreeMap::new();
    modules.insert(
        m.to_string(),
        ModuleWeights::Lora {
            lora_a: DMatrix::from_element(1, 4, 100.0),
            lora_b: DMatrix::from_element(4, 1, 100.0),
        },
    );
    AdapterFile::<f64> {
        config: FileConfig::Lora(LoraFileConfig::new(1, 1.0, vec![m.into()])),
        modules,
    }
    .save(&adapter)
    .unwrap();
    let e = fails(&base, &adapter, &root);
    assert!(matches!(e, ElraError::Overflow { .. }), "{e}");
}
