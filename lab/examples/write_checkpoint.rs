//! Writes a synthetic sharded safetensors checkpoint and an ELRA adapter over all of its
//! weights, for measuring `elra merge` on a checkpoint larger than memory would like
//! (BENCHMARKS.md, "Streaming checkpoint merge").
//!
//! ```text
//! cargo run --release -p elra-lab --example write_checkpoint -- DIR SHARDS TENSORS D K DTYPE R
//! ```
//!
//! writes `DIR/base` (SHARDS files of TENSORS `layers.<i>.proj.weight` tensors, D×K, DTYPE one
//! of f32, f16, bf16, plus `model.safetensors.index.json`) and `DIR/adapter` (ELRA-general of
//! rank R, η = 0.1, on every tensor). Tensors are generated and written one at a time, so
//! writing needs memory for one tensor only.
use elra::adapter::{GeneratorConfig, Variant};
use elra::io::{
    AdapterFile, ElraFileConfig, FileConfig, ModuleWeights, CONFIG_FILE, ELRA_FORMAT_VERSION,
};
use nalgebra::DMatrix;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

fn die(msg: &str) -> ! {
    eprintln!("write_checkpoint: {msg}");
    std::process::exit(2)
}

/// A cheap deterministic value in [−1, 1) for element `i` of tensor `t`.
fn value(t: usize, i: usize) -> f32 {
    let x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (t as u64).wrapping_mul(0xC2B2_AE3D);
    ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn write_shard(path: &Path, names: &[String], first: usize, d: usize, k: usize, dtype: &str) {
    let size = if dtype == "F32" { 4 } else { 2 };
    let bytes = d * k * size;
    let mut header = serde_json::Map::new();
    for (i, n) in names.iter().enumerate() {
        header.insert(
            n.clone(),
            serde_json::json!({"dtype": dtype, "shape": [d, k],
                               "data_offsets": [i * bytes, (i + 1) * bytes]}),
        );
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&h).unwrap();
    let mut buf = Vec::with_capacity(bytes);
    for t in 0..names.len() {
        buf.clear();
        for i in 0..d * k {
            let v = value(first + t, i) * 0.05;
            match dtype {
                "F32" => buf.extend_from_slice(&v.to_le_bytes()),
                "F16" => buf.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                _ => buf.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            }
        }
        f.write_all(&buf).unwrap();
    }
    f.flush().unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, shards, tensors, d, k, dtype, r] = args.as_slice() else {
        die("usage: write_checkpoint DIR SHARDS TENSORS D K DTYPE R");
    };
    let num = |s: &str| -> usize {
        s.parse()
            .unwrap_or_else(|_| die(&format!("not a count: {s}")))
    };
    let (shards, tensors, d, k, r) = (num(shards), num(tensors), num(d), num(k), num(r));
    let dtype = match dtype.as_str() {
        "f32" => "F32",
        "f16" => "F16",
        "bf16" => "BF16",
        _ => die("DTYPE is f32, f16 or bf16"),
    };
    let (base, adapter) = (Path::new(dir).join("base"), Path::new(dir).join("adapter"));
    std::fs::create_dir_all(&base).unwrap();
    let mut map = serde_json::Map::new();
    let mut modules = BTreeMap::new();
    for s in 0..shards {
        let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
        let names: Vec<String> = (0..tensors)
            .map(|t| format!("layers.{}.proj.weight", s * tensors + t))
            .collect();
        write_shard(&base.join(&file), &names, s * tensors, d, k, dtype);
        for n in &names {
            map.insert(n.clone(), file.clone().into());
            let t = modules.len();
            let m = n.strip_suffix(".weight").unwrap().to_string();
            let a = DMatrix::from_fn(d, r, |i, j| value(1000 + t, i * r + j) * 0.1);
            let b = DMatrix::from_fn(r, d, |i, j| value(2000 + t, i * d + j) * 0.1);
            modules.insert(
                m,
                ModuleWeights::Elra {
                    a,
                    b: Some(b),
                    eta: 0.1f32,
                },
            );
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        base.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index).unwrap(),
    )
    .unwrap();
    std::fs::write(
        base.join("config.json"),
        b"{\"model_type\": \"synthetic\"}\n",
    )
    .unwrap();
    let mut generator = GeneratorConfig::paper_default(Variant::General, 1000);
    generator.eta = 0.1;
    let file = AdapterFile {
        config: FileConfig::Elra(ElraFileConfig {
            peft_type: "ELRA".into(),
            generator,
            r,
            seed: 0,
            step: 1000,
            target_modules: modules.keys().cloned().collect(),
            task_type: None,
            base_model_name_or_path: None,
            format_version: ELRA_FORMAT_VERSION,
        }),
        modules,
    };
    file.save(&adapter).unwrap_or_else(|e| die(&e.to_string()));
    println!(
        "wrote {} ({shards} shards × {tensors} tensors of {d}×{k} {dtype}) and {} ({})",
        base.display(),
        adapter.display(),
        CONFIG_FILE
    );
}
