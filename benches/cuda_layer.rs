//! GPU time of one layer step (bf16 activations and W0): the frozen base done by cuBLAS alone
//! (`y = x W0ᵀ`, and `∂x = ∂y W0` for forward+backward) against our LoRA and ELRA general, PSD
//! (r = 16) and Hyb on both exact routes, at the shapes of issue 5:
//! N=8192 d=k=4096 r=8, N=8192 d=4096 k=11008 r=8, N=2048 d=k=1024 r=8.
//!
//! Each sample enqueues the step `iters` times on the device's stream and synchronises before and
//! after (`iter_custom`), so the time is GPU time including launch overhead. ELRA parameters are
//! marked changed before every step (a device optimiser would write them), so each step includes
//! its r×r work (C, Z, one batched φ1 launch; the adjoint in the backward). The ratios to the base
//! are printed at the end of each shape. Without a GPU the bench prints why it skips and exits 0.
//! PyTorch/PEFT on the same shapes: `scripts/bench_torch.py`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use elra::adapter::{
    Adapter, AlphaSchedule, ElraConfig, EtaMultiplier, GeneratorConfig, LoraConfig, Variant,
};
use elra::cuda::{
    cuda_available, gemm, CudaDevice, DeviceMatrices, GpuElraLayer, GpuLoraLayer, Transpose,
};
use elra::grad::Route;
use half::bf16;
use nalgebra::DMatrix;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type T = bf16;

const SHAPES: [(usize, usize, usize, usize); 3] = [
    (8192, 4096, 4096, 8),
    (8192, 4096, 11008, 8),
    (2048, 1024, 1024, 8),
];

fn rand_dev(
    dev: &CudaDevice,
    rows: usize,
    cols: usize,
    scale: f32,
    seed: u64,
) -> DeviceMatrices<T> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<T> = (0..rows * cols)
        .map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0) * scale))
        .collect();
    DeviceMatrices::from_row_major(dev, 1, rows, cols, &v).expect("upload")
}

fn rand_host(rows: usize, cols: usize, scale: f32, seed: u64) -> DMatrix<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    DMatrix::from_fn(rows, cols, |_, _| rng.random_range(-1.0f32..1.0) * scale)
}

fn time_it(dev: &CudaDevice, iters: u64, f: &mut dyn FnMut()) -> Duration {
    dev.synchronize().expect("sync");
    let t0 = Instant::now();
    for _ in 0..iters {
        f();
    }
    dev.synchronize().expect("sync");
    t0.elapsed()
}

/// ELRA of `variant` with a constant α (Hyb), η = 0.5, no energy penalty, clip or η multiplier.
fn elra_config(variant: Variant, alpha: f64, d: usize, k: usize, r: usize) -> ElraConfig {
    ElraConfig {
        generator: GeneratorConfig {
            variant,
            eta: 0.5,
            lambda: 0.0,
            tau: None,
            schedule: AlphaSchedule::Constant { alpha },
            eta_multiplier: EtaMultiplier::None,
        },
        d,
        k,
        r,
        seed: 0,
    }
}

fn bench_shape(
    c: &mut Criterion,
    dev: &Arc<CudaDevice>,
    (n, d, k, r): (usize, usize, usize, usize),
) {
    let x = rand_dev(dev, n, k, 1.0, 1);
    let dy = rand_dev(dev, n, d, 1.0, 2);
    let w0 = || rand_dev(dev, d, k, 1.0 / (k as f32).sqrt(), 3);
    let w0_base = w0();
    let mut y = DeviceMatrices::<T>::zeros(dev, 1, n, d).expect("alloc");
    let mut dx = DeviceMatrices::<T>::zeros(dev, 1, n, k).expect("alloc");
    let mut group = c.benchmark_group(format!("cuda_layer/N{n}_d{d}_k{k}_r{r}_bf16"));
    // GPU timings of 20+ steps per sample are stable to ≈ 1 %; 2 s × 10 samples keeps the whole
    // bench (42 functions) to a few minutes of a lent GPU.
    group.measurement_time(Duration::from_secs(2));
    group.sample_size(10);
    let mut means: Vec<(String, f64)> = Vec::new();
    let mut record =
        |group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
         name: &str,
         f: &mut dyn FnMut()| {
            // One untimed run (allocations, module load), then criterion's samples; our own mean of
            // 20 steps for the ratio table.
            f();
            let mean = time_it(dev, 20, f).as_secs_f64() / 20.0;
            means.push((name.to_string(), mean));
            group.bench_function(name, |b| b.iter_custom(|iters| time_it(dev, iters, f)));
        };

    // Frozen base: cuBLAS only.
    record(&mut group, "cuda_base_fwd", &mut || {
        gemm(
            dev,
            1.0,
            &x,
            Transpose::No,
            &w0_base,
            Transpose::Yes,
            0.0,
            &mut y,
        )
        .expect("gemm")
    });
    record(&mut group, "cuda_base_fwd_bwd", &mut || {
        gemm(
            dev,
            1.0,
            &x,
            Transpose::No,
            &w0_base,
            Transpose::Yes,
            0.0,
            &mut y,
        )
        .expect("gemm");
        gemm(
            dev,
            1.0,
            &dy,
            Transpose::No,
            &w0_base,
            Transpose::No,
            0.0,
            &mut dx,
        )
        .expect("gemm");
    });

    // Our LoRA (PEFT conventions, scaling 16/r).
    let la = rand_host(r, k, 1.0 / (k as f32).sqrt(), 4);
    let lb = rand_host(d, r, 0.01, 5);
    let lora_config = LoraConfig {
        lora_alpha: 16.0,
        ..LoraConfig::new(d, k, r)
    };
    let mut lora =
        GpuLoraLayer::from_factors(dev.clone(), lora_config, w0(), &la, &lb).expect("lora");
    record(&mut group, "cuda_lora_fwd", &mut || {
        lora.forward(&x, None, &mut y).expect("fwd")
    });
    record(&mut group, "cuda_lora_fwd_bwd", &mut || {
        lora.forward(&x, None, &mut y).expect("fwd");
        lora.backward(&x, &dy, &mut dx).expect("bwd");
    });

    // ELRA variants: general (α = 0), PSD (α = 1, r = 16), Hyb (α = 0.5), both routes.
    let variants: [(&str, Variant, f64, usize); 3] = [
        ("general", Variant::General, 0.0, r),
        ("psd_r16", Variant::Psd, 1.0, 16),
        ("hyb", Variant::Hyb, 0.5, r),
    ];
    for (name, variant, alpha, rank) in variants {
        let a = rand_host(d, rank, 1.0 / (d as f32).sqrt(), 6);
        let b = rand_host(rank, d, 1.0 / (rank as f32).sqrt(), 7);
        let bopt = variant.uses_b().then_some(&b);
        let config = elra_config(variant, alpha, d, k, rank);
        let mut layer =
            GpuElraLayer::from_factors(dev.clone(), config, w0(), &a, bopt).expect("elra");
        for route in [Route::Woodbury, Route::Merged] {
            let tag = format!("{name}_{route:?}").to_lowercase();
            layer.set_route(Some(route));
            record(&mut group, &format!("cuda_elra_{tag}_fwd"), &mut || {
                let _ = layer.params_mut();
                layer.forward(&x, None, &mut y).expect("fwd");
            });
            record(&mut group, &format!("cuda_elra_{tag}_fwd_bwd"), &mut || {
                let _ = layer.params_mut();
                layer.forward(&x, None, &mut y).expect("fwd");
                layer.backward(&x, &dy, &mut dx).expect("bwd");
            });
        }
        layer.check_status().expect("statuses");
    }
    group.finish();

    let base = |kind: &str| {
        means
            .iter()
            .find(|(nm, _)| nm == &format!("cuda_base_{kind}"))
            .map(|(_, t)| *t)
            .unwrap_or(f64::NAN)
    };
    let model = elra::cuda::choose_route(n, d, k, r, 2);
    eprintln!(
        "\nN={n} d={d} k={k} r={r} bf16 on {} (cost model picks {model:?}):",
        dev.name().unwrap_or_default()
    );
    for (name, t) in &means {
        let kind = if name.ends_with("fwd_bwd") {
            "fwd_bwd"
        } else {
            "fwd"
        };
        eprintln!(
            "  {name:<40} {:>10.1} µs  {:.3}× base",
            t * 1e6,
            t / base(kind)
        );
    }
}

fn main() {
    let dev = match cuda_available() {
        Ok(()) => Arc::new(CudaDevice::new(0).expect("device")),
        Err(reason) => {
            println!("skipping cuda_layer benches: {reason}");
            return;
        }
    };
    let mut c = Criterion::default().configure_from_args();
    for shape in SHAPES {
        bench_shape(&mut c, &dev, shape);
    }
    c.final_summary();
}
