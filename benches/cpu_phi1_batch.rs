//! φ1 (and φ1 + its adjoint Fréchet derivative) for a batch of 224 r×r matrices, r = 16, f64, on
//! one core: the per-step r×r work of ELRA for a model with 224 adapted layers. Target: φ1 for the
//! batch under 5 ms.
//!
//! Inputs: Z = C·A with A (d×r) and C (r×d) uniform in [−1, 1], d = 256, each Z then scaled
//! so that ‖Z‖₁ spans (geometrically)  0.05..8 across the batch (small at the start of
//! training, larger later), which exercises every Padé degree and 0–2 squarings.
//!
//! Two variants of `cpu_phi1_batch` on the same inputs show the cost of the exact-structure paths
//! (docs/numerics.md): `cpu_phi1_batch_f32` (the matrices rounded to f32, which are balanced
//! first) and `cpu_phi1_batch_triangular` (their upper triangles, f64: exact diagonal and
//! superdiagonal after every squaring).
use criterion::{criterion_group, criterion_main, Criterion};
use elra::linalg::MatFnBatch;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::hint::black_box;

const R: usize = 16;
const BATCH: usize = 224;

fn inputs() -> (Vec<f64>, Vec<f64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let d = 256;
    let mut z = Vec::with_capacity(BATCH * R * R);
    for i in 0..BATCH {
        let a: Vec<f64> = (0..d * R).map(|_| rng.random_range(-1.0..1.0)).collect();
        let c: Vec<f64> = (0..R * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut zi = vec![0.0; R * R];
        for p in 0..R {
            for q in 0..R {
                zi[p * R + q] = (0..d).map(|k| c[p * d + k] * a[k * R + q]).sum::<f64>();
            }
        }
        let norm1 = (0..R)
            .map(|q| (0..R).map(|p| zi[p * R + q].abs()).sum::<f64>())
            .fold(0.0, f64::max);
        let target = 0.05 * (160.0f64).powf(i as f64 / (BATCH - 1) as f64); // 0.05 … 8
        z.extend(zi.iter().map(|v| v * target / norm1));
    }
    let g: Vec<f64> = (0..BATCH * R * R)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    (z, g)
}

fn bench(c: &mut Criterion) {
    let (z, g) = inputs();
    let mut b = MatFnBatch::<f64>::new(R).unwrap();
    let mut out = vec![0.0; z.len()];
    let mut grad = vec![0.0; z.len()];
    c.bench_function("cpu_phi1_batch", |bch| {
        bch.iter(|| {
            b.phi1(black_box(&z), &mut out).unwrap();
            black_box(&out);
        })
    });
    let z32: Vec<f32> = z.iter().map(|&v| v as f32).collect();
    let mut b32 = MatFnBatch::<f32>::new(R).unwrap();
    let mut out32 = vec![0.0f32; z.len()];
    c.bench_function("cpu_phi1_batch_f32", |bch| {
        bch.iter(|| {
            b32.phi1(black_box(&z32), &mut out32).unwrap();
            black_box(&out32);
        })
    });
    let tri: Vec<f64> = z
        .iter()
        .enumerate()
        .map(|(k, &v)| if (k % (R * R)) / R > k % R { 0.0 } else { v })
        .collect();
    c.bench_function("cpu_phi1_batch_triangular", |bch| {
        bch.iter(|| {
            b.phi1(black_box(&tri), &mut out).unwrap();
            black_box(&out);
        })
    });
    c.bench_function("cpu_phi1_adjoint_batch", |bch| {
        bch.iter(|| {
            b.phi1(black_box(&z), &mut out).unwrap();
            b.phi1_frechet_adjoint(black_box(&z), black_box(&g), &mut grad)
                .unwrap();
            black_box((&out, &grad));
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
