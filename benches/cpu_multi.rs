//! Many adapters in one batch on the CPU (BENCHMARKS.md, "Many adapters in one batch"): the
//! grouped `ops::multi_forward` against a loop of single-adapter calls (`ops::forward` with the
//! base on each adapter's rows, gathered and scattered) and against the base layer alone
//! (`X W0ᵀ`), for 1, 8 and 64 ELRA-general adapters of rank r spread evenly over the rows.
//!
//! ```text
//! cargo bench --bench cpu_multi                 # N = 4096, d = k = 4096, r = 16 (minutes)
//! ELRA_BENCH_QUICK=1 cargo bench --bench cpu_multi   # N = 512, d = k = 512 (seconds)
//! ELRA_BENCH_SIZE=2048 cargo bench --bench cpu_multi # N = d = k = 2048
//! ```
//!
//! Prints the median of 3 runs per configuration (after one warm-up) and the ratios.
use elra::adapter::{GeneratorConfig, Variant};
use elra::grad::ops::{gemm_strided_par, Op, Strided, StridedMut};
use elra::ops::{self, multi_forward, multi_workspace_len, Base, ElraOp, Generator, MultiAdapter};
use nalgebra::DMatrix;
use std::time::Instant;

fn mat(rows: usize, cols: usize, seed: u64, scale: f32) -> DMatrix<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    DMatrix::from_fn(rows, cols, |_, _| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    })
}

/// Median wall time of `f` over 3 runs after a warm-up, in seconds.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..3)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[1]
}

fn main() {
    let quick = std::env::var_os("ELRA_BENCH_QUICK").is_some();
    let size = std::env::var("ELRA_BENCH_SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 512 } else { 4096 });
    let (n, d, k, r) = (size, size, size, 16);
    let threads = std::env::var("ELRA_NUM_THREADS").unwrap_or_else(|_| "1".into());
    println!("cpu_multi: N = {n}, d = k = {d}, r = {r}, f32, ELRA_NUM_THREADS = {threads}");
    let w0 = mat(d, k, 1, 0.02);
    // Activations row-major, as engines and the C ABI hold them.
    let xv: Vec<f32> = mat(k, n, 2, 1.0).as_slice().to_vec();
    let xs = Strided::row_major(&xv, n, k, k).unwrap();
    let spec = GeneratorConfig::paper_default(Variant::General, 1000).spec_at(1000);
    let mut yv = vec![0f32; n * d];
    let base = time(|| {
        gemm_strided_par(
            &mut StridedMut::row_major(&mut yv, n, d, d).unwrap(),
            1.0,
            xs,
            Strided::of(&w0, Op::T),
            0.0,
        )
    });
    println!("{:<34} {:>9.3} s", "base X W0ᵀ", base);
    let mut ws = vec![0f32; multi_workspace_len(n, d, k, r).unwrap()];
    let base_rows = time(|| {
        multi_forward(
            Strided::of(&w0, Op::N),
            None,
            &[],
            &vec![-1; n],
            xs,
            &mut StridedMut::row_major(&mut yv, n, d, d).unwrap(),
            &mut ws,
        )
        .unwrap()
    });
    println!(
        "{:<34} {:>9.3} s ({:.3}× base)",
        "multi_forward, every row −1",
        base_rows,
        base_rows / base
    );
    println!(
        "{:<10} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "adapters", "grouped (s)", "loop (s)", "grouped/base", "loop/base", "prep (ms)"
    );
    for count in [1usize, 8, 64] {
        let factors: Vec<(DMatrix<f32>, DMatrix<f32>)> = (0..count)
            .map(|i| {
                (
                    mat(d, r, 10 + i as u64, 0.1),
                    mat(r, d, 100 + i as u64, 0.1),
                )
            })
            .collect();
        let set: Vec<MultiAdapter<'_, f32>> = factors
            .iter()
            .map(|(a, b)| MultiAdapter::Elra {
                variant: Variant::General,
                generator: Generator {
                    a: Strided::of(a, Op::N),
                    b: Some(Strided::of(b, Op::N)),
                    eta: 0.1,
                },
                spec,
            })
            .collect();
        // Adapters interleaved over the rows (each request's rows belong to one adapter).
        let index: Vec<i32> = (0..n).map(|i| ((i * count) / n) as i32).collect();
        let grouped = time(|| {
            multi_forward(
                Strided::of(&w0, Op::N),
                None,
                &set,
                &index,
                xs,
                &mut StridedMut::row_major(&mut yv, n, d, d).unwrap(),
                &mut ws,
            )
            .unwrap()
        });
        // The loop: each adapter's rows gathered, one fused single-adapter forward with the
        // base, scattered back.
        let op = ElraOp {
            variant: Variant::General,
            d,
            k,
            r,
        };
        let looped = time(|| {
            for (ai, ad) in set.iter().enumerate() {
                let MultiAdapter::Elra { generator, .. } = ad else {
                    unreachable!()
                };
                let rows: Vec<usize> = (0..n).filter(|&i| index[i] == ai as i32).collect();
                let na = rows.len();
                let mut xa = vec![0f32; na * k];
                for (i, &row) in rows.iter().enumerate() {
                    xa[i * k..(i + 1) * k].copy_from_slice(&xv[row * k..(row + 1) * k]);
                }
                let mut ya = vec![0f32; na * d];
                let mut saved = vec![0f32; ops::saved_len(na, r).unwrap()];
                let mut wsa = vec![0f32; ops::workspace_len(na, r).unwrap()];
                ops::forward(
                    &op,
                    Strided::of(&w0, Op::N),
                    Base::Included { bias: None },
                    generator,
                    &spec,
                    Strided::row_major(&xa, na, k, k).unwrap(),
                    None,
                    &mut StridedMut::row_major(&mut ya, na, d, d).unwrap(),
                    &mut saved,
                    &mut wsa,
                )
                .unwrap();
                for (i, &row) in rows.iter().enumerate() {
                    yv[row * d..(row + 1) * d].copy_from_slice(&ya[i * d..(i + 1) * d]);
                }
            }
        });
        // The same set with every row −1: the base plus the adapters' preparation (C, φ1).
        let prep = time(|| {
            multi_forward(
                Strided::of(&w0, Op::N),
                None,
                &set,
                &vec![-1; n],
                xs,
                &mut StridedMut::row_major(&mut yv, n, d, d).unwrap(),
                &mut ws,
            )
            .unwrap()
        });
        println!(
            "{count:<10} {grouped:>12.3} {looped:>12.3} {:>12.3} {:>12.3} {:>12.3}",
            grouped / base,
            looped / base,
            (prep - base_rows) * 1e3
        );
    }
}
