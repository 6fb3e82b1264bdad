//! One adapted layer on the CPU, f32, N = 256 rows, d = k = 1024, r = 8 (ELRA-PSD r = 16):
//! forward, and forward + backward (∂x and the adapter gradients), for
//!
//! * `base`: the frozen layer alone, `Y = X W0ᵀ` and `∂X = Ȳ W0` (no weight gradient);
//! * `lora`: PEFT LoRA (`elra::grad::lora_*`);
//! * `elra`, `elra-psd-r16`, `elra-hyb`: ELRA on the Woodbury route (`elra::grad::elra_*`),
//!   including the step's generator work (variant factor, spectral norm and clip test, φ1, the
//!   energy penalty and, backward, the Fréchet adjoint and the chain to `A`, `B`, η).
//!
//! Target: ELRA-Hyb forward + backward ≤ 1.10 × LoRA's in the same run. Both are dominated by
//! the two N×d×k GEMMs of the frozen layer; the adapters add six skinny N×d×r products each.
//! The backward consumes `Ȳ` as the buffer of `∂X`/`Ū` (as a caller would with a freshly
//! produced gradient), so every forward + backward variant clones `Ȳ` inside the timed loop.
//!
//! **Timer.** Times are the benchmark thread's CPU time (`/proc/thread-self/schedstat`), not
//! wall time: on a machine shared with other builds, wall time mostly measures the scheduler.
//! Everything here is single-threaded (nalgebra's matrixmultiply without its `threading`
//! feature), so CPU time is the work done. Elsewhere the wall clock is used.
//!
//! Short criterion settings (10 samples, 1 s warm-up, 4 s measurement) keep the run modest on a
//! shared machine: `cargo bench --bench cpu_layer`.
use criterion::{criterion_group, criterion_main, Criterion};
use elra::adapter::{ElraConfig, ElraLayer, LoraConfig, LoraLayer, Variant};
use elra::grad::ops::{matmul, Op};
use elra::grad::{elra_backward, elra_forward, lora_backward, lora_forward, Route};
use nalgebra::DMatrix;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::hint::black_box;
use std::time::{Duration, Instant};

const N: usize = 256;
const D: usize = 1024;
const K: usize = 1024;
const R: usize = 8;

/// CPU time of this thread in ns (`/proc/thread-self/schedstat`, Linux), if available.
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs `f` `iters` times and returns the thread's CPU time (wall time where unavailable).
/// On a machine shared with other jobs, wall time measures the scheduler as much as the code;
/// the thread's CPU time does not (the kernel updates it at ticks and context switches, so one
/// reading may lag by a few ms, which is < 1 % of criterion's batches of ≥ 0.4 s).
fn timed<R>(iters: u64, mut f: impl FnMut() -> R) -> Duration {
    let wall = Instant::now();
    let c0 = thread_cpu_ns();
    for _ in 0..iters {
        black_box(f());
    }
    match (c0, thread_cpu_ns()) {
        (Some(a), Some(b)) if b >= a => Duration::from_nanos(b - a),
        _ => wall.elapsed(),
    }
}

fn randm(rng: &mut ChaCha8Rng, r: usize, c: usize, s: f32) -> DMatrix<f32> {
    DMatrix::from_fn(r, c, |_, _| rng.random_range(-s..s))
}

fn elra_layer(variant: Variant, r: usize, w0: &DMatrix<f32>) -> ElraLayer<f32> {
    let mut cfg = ElraConfig::new(variant, D, K, r, 1000);
    cfg.seed = 3;
    let mut layer = ElraLayer::new(cfg, w0.clone()).unwrap();
    // A trained-looking step size (the generator is then O(0.1), not O(1e-3)).
    layer.set_eta(0.05).unwrap();
    layer.set_step(100);
    layer
}

fn bench(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let w0 = randm(&mut rng, D, K, 1.0 / (K as f32).sqrt());
    let x = randm(&mut rng, N, K, 1.0);
    let ybar = randm(&mut rng, N, D, 1.0);

    let mut lora = LoraLayer::new(LoraConfig::new(D, K, R), w0.clone()).unwrap();
    lora.set_lora_b(randm(&mut rng, D, R, 0.1)).unwrap();
    let elras = [
        ("elra", elra_layer(Variant::General, R, &w0)),
        ("elra-psd-r16", elra_layer(Variant::Psd, 2 * R, &w0)),
        ("elra-hyb", elra_layer(Variant::Hyb, R, &w0)),
    ];

    let mut g = c.benchmark_group("cpu_layer");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));

    g.bench_function("fwd/base", |b| {
        b.iter_custom(|n| timed(n, || black_box(matmul(black_box(&x), Op::N, &w0, Op::T))))
    });
    g.bench_function("fwd/lora", |b| {
        b.iter_custom(|n| {
            timed(n, || {
                black_box(lora_forward(&lora, black_box(&x), None).unwrap())
            })
        })
    });
    for (name, layer) in &elras {
        g.bench_function(format!("fwd/{name}"), |b| {
            b.iter_custom(|n| {
                timed(n, || {
                    black_box(elra_forward(layer, black_box(&x), Route::Woodbury, None).unwrap())
                })
            })
        });
    }
    // Backward consumes Ȳ as its output buffer: every variant clones it inside the timed loop
    // (≈ 1 MB copy, ~0.1 % of a step), so the comparison stays fair.
    g.bench_function("fwdbwd/base", |b| {
        b.iter_custom(|n| {
            timed(n, || {
                let yb = ybar.clone();
                let y = matmul(black_box(&x), Op::N, &w0, Op::T);
                let gx = matmul(&yb, Op::N, &w0, Op::N);
                black_box((y, gx))
            })
        })
    });
    g.bench_function("fwdbwd/lora", |b| {
        b.iter_custom(|n| {
            timed(n, || {
                let (y, tape) = lora_forward(&lora, black_box(&x), None).unwrap();
                let gr = lora_backward(&lora, &x, &tape, ybar.clone()).unwrap();
                black_box((y, gr))
            })
        })
    });
    for (name, layer) in &elras {
        g.bench_function(format!("fwdbwd/{name}"), |b| {
            b.iter_custom(|n| {
                timed(n, || {
                    let (y, tape) =
                        elra_forward(layer, black_box(&x), Route::Woodbury, None).unwrap();
                    let gr = elra_backward(layer, &x, &tape, ybar.clone()).unwrap();
                    black_box((y, gr))
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
