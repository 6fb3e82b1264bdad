//! The fused skinny kernels of the GPU layer (`cuda/skinny.cu`: the row pass, the column
//! reductions, the rank-r merge, the small f32 GEMM and the factor kernels of eq. 19–21) run in the
//! host emulation of `cuda/emu/` and checked against f64 references of each kernel's formula (and
//! the CPU core's `FactorChain`/`energy_backward`); the non-finite scan of `cuda/finite.cu` (the
//! GPU form of the overflow rule) against a CPU scan. No GPU is needed: these tests run in every
//! `--features cuda` build, skipping with a printed reason only without a host C++20 compiler.
//! (Split from `tests/cuda_layer.rs`, whose GPU parity tests compose these kernels.)
#![allow(non_snake_case)]
/// Only the emulation helpers of `tests/common/` (no device here).
mod common {
    pub mod emu;
}

use elra::adapter::GeneratorSpec;
use elra::grad::GeneratorTape;
use nalgebra::DMatrix;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

// ---------------------------------------------------------------------------------------------
// The skinny kernels emulated on the CPU (no GPU needed)
// ---------------------------------------------------------------------------------------------
//
// cuda/emu/skinny_harness.cpp compiles cuda/skinny.cu with the host C++ compiler (cuda/emu/
// cuda_emu.hpp: one OS thread per CUDA thread, ELRA_BLOCK = 8 = one warp, std::barrier for
// __syncthreads and the warp shuffles; f16 via _Float16, bf16 rounded to nearest even by hand).
// The device code runs unchanged — index arithmetic, strides, the vector (aligned, ld a multiple
// of the chunk) and scalar (odd ld, misaligned, ragged ends) paths, shared-memory staging, rank
// groups, warp butterflies, rows per warp, grid-stride loops, chunked reductions, null operands
// and in-place aliasing — and is checked against f64 references of each kernel's stated formula,
// with the gaps of strided outputs checked untouched. What only a GPU exercises: the 256-thread,
// 32-lane configuration, the launches and their argument marshalling (src/cuda/skinny.rs),
// cuBLAS, the device conversions and the composition of the kernels into the layer (the GPU
// tests of tests/cuda_layer.rs and tests/cuda_ops.rs). Tolerances are stated per test: f32 results differ from f64 only by f32
// accumulation; outputs stored as bf16/f16 add one rounding (u = 3.9e-3 / 4.9e-4).

mod skinny_emu {
    use std::path::PathBuf;
    use std::sync::OnceLock;

    const SOURCES: [(&str, &str); 6] = [
        ("skinny.cu", include_str!("../cuda/skinny.cu")),
        ("finite.cu", include_str!("../cuda/finite.cu")),
        ("common.cuh", include_str!("../cuda/common.cuh")),
        (
            "emu/math_constants.h",
            include_str!("../cuda/emu/math_constants.h"),
        ),
        ("emu/cuda_emu.hpp", include_str!("../cuda/emu/cuda_emu.hpp")),
        (
            "emu/skinny_harness.cpp",
            include_str!("../cuda/emu/skinny_harness.cpp"),
        ),
    ];

    fn build() -> Result<PathBuf, String> {
        crate::common::emu::build_harness("skinny", &SOURCES, "emu/skinny_harness.cpp", "-O1")
    }

    pub fn harness() -> Result<&'static PathBuf, String> {
        static EXE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        EXE.get_or_init(build).as_ref().map_err(|e| e.clone())
    }

    /// Runs one job; returns the output arrays by name (f32 values).
    pub fn run(job: &str) -> Vec<(String, Vec<f32>)> {
        let exe = harness().expect("harness built");
        crate::common::emu::run_job(exe, job)
            .lines()
            .map(|l| {
                let mut it = l.split_whitespace();
                let name = it.next().unwrap_or_default().to_string();
                let v = it
                    .map(|t| f32::from_bits(u32::from_str_radix(t, 16).unwrap()))
                    .collect();
                (name, v)
            })
            .collect()
    }
}

macro_rules! emu_or_skip {
    () => {
        if let Err(reason) = skinny_emu::harness() {
            eprintln!("skipping: {reason}");
            return;
        }
    };
}

fn hex(v: &[f32], job: &mut String) {
    for x in v {
        job.push_str(&format!(" {:x}", x.to_bits()));
    }
}

fn h1(x: f32) -> String {
    format!("{:x}", x.to_bits())
}

/// Random values exactly representable in `dt` (rounded through it).
fn rand_vals(len: usize, dt: &str, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..len)
        .map(|_| {
            let x: f64 = rng.random_range(-1.0..1.0);
            match dt {
                "bf16" => half::bf16::from_f64(x).to_f32(),
                "f16" => half::f16::from_f64(x).to_f32(),
                _ => x as f32,
            }
        })
        .collect()
}

/// ‖g − c‖₂ / ‖c‖₂ over flat arrays.
fn rel_flat(g: &[f32], c: &[f64], what: &str) -> f64 {
    assert_eq!(g.len(), c.len(), "{what}: length");
    assert!(g.iter().all(|x| x.is_finite()), "{what}: non-finite output");
    let num: f64 = g.iter().zip(c).map(|(a, b)| (*a as f64 - b).powi(2)).sum();
    let den: f64 = c.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

fn out_tol(dt: &str) -> f64 {
    match dt {
        "bf16" => 8e-3,
        "f16" => 1e-3,
        _ => 1e-5,
    }
}

/// Row stride and offset (elements) of an activation matrix with `cols` columns in the
/// emulation: 0 = dense (ld = cols), 1 = aligned (ld a multiple of 8 with slack, offset 0: the
/// vector paths with a ragged end), 2 = aligned with offset 8 (still 16-byte aligned), 3 = offset 1
/// (misaligned: the scalar paths).
fn layout(kind: usize, cols: usize) -> (usize, usize) {
    let up = cols.div_ceil(8) * 8;
    match kind {
        0 => (cols, 0),
        1 => (up + 8, 0),
        2 => (up, 8),
        _ => (up, 1),
    }
}

/// Checks the harness's `pad` output: no entry outside the output matrix changed.
fn assert_pad(out: &[(String, Vec<f32>)], label: &str) {
    let pad = out.iter().find(|(n, _)| n == "pad").expect("pad output");
    assert_eq!(
        pad.1,
        vec![0.0],
        "{label}: entries outside the output written"
    );
}

// rows_fused in the emulation (ELRA_BLOCK = 8 = one warp; column tiles of 64 columns): n_in = 150
// spans 3 tiles with a ragged end (not a multiple of 4 or 8), n_out = 77 (phase-2 tiles of
// 64 / ⌈r/8⌉ columns), 11 rows (not a multiple of the 1, 2 or 4 rows per warp) over 2 blocks (the
// grid-stride loop takes the rest). Tolerances: v and t are dot products of ≤ 150 (≤ 64) f32
// products; γ_n-type error n·u ≈ 9e-6 in the worst case, ≈ √n·u ≈ 1e-6 typically: 1e-5 on the
// Frobenius-relative error. `out` in f32 adds ≤ 64 more products (1e-5); stored in bf16/f16 one
// rounding (u = 3.9e-3 / 4.9e-4): 8e-3 / 1e-3.
#[test]
fn cuda_layer_kernels_emulated_on_cpu_rows_fused() {
    emu_or_skip!();
    let mut rng = rng(800);
    let n_rows = 11usize;
    for dt in ["f32", "bf16", "f16"] {
        for r in [1usize, 9, 64] {
            // (has_base, alias, has_out, has_mm, transposed factors, rows per warp, layout)
            // alias 1: out = base; alias 2: in = base = out (in place, n_out = n_in).
            let cases = [
                (1, 1, 1, 1, false, 4, 1),
                (1, 0, 1, 0, true, 2, 0),
                (0, 0, 1, 1, false, 1, 3),
                (0, 0, 0, 1, true, 4, 1),
                (1, 2, 1, 1, true, 4, 2),
                (1, 2, 1, 0, false, 2, 0),
                (1, 0, 1, 1, false, 1, 2),
            ];
            for (case, &(has_base, alias, has_out, has_mm, tr, rpw, lay)) in
                cases.iter().enumerate()
            {
                let n_in = 150usize;
                let n_out = if alias == 2 { n_in } else { 77 };
                let (ld_in, off) = layout(lay, n_in);
                let ld_out = if alias == 2 {
                    ld_in
                } else {
                    layout(lay, n_out).0
                };
                let gx = 2;
                // Transposed storage of Cm and Am when `tr`, Mᵀ otherwise.
                let (cs0, cs1) = if tr { (1, r) } else { (n_in, 1) };
                let (ms0, ms1) = if tr { (r, 1) } else { (1, r) };
                let (as0, as1) = if tr { (1, n_out) } else { (r, 1) };
                let input = rand_vals(n_rows * n_in, dt, &mut rng);
                let base = if alias == 2 {
                    input.clone()
                } else {
                    rand_vals(n_rows * n_out, dt, &mut rng)
                };
                let cm = rand_vals(r * n_in, "f32", &mut rng);
                let mm = rand_vals(r * r, "f32", &mut rng);
                let am = rand_vals(n_out * r, "f32", &mut rng);
                let m_scale = 0.75f32;
                let mut job = format!(
                    "rows_fused {dt} {n_rows} {n_in} {n_out} {r} {rpw} {gx} {ld_in} {ld_out} {off} {has_base} {alias} {has_out} {has_mm} {} {cs0} {cs1} {ms0} {ms1} {as0} {as1} {} {} {}",
                    h1(m_scale),
                    cm.len(),
                    mm.len(),
                    am.len()
                );
                hex(&input, &mut job);
                if has_base == 1 {
                    hex(&base, &mut job);
                }
                hex(&cm, &mut job);
                hex(&mm, &mut job);
                hex(&am, &mut job);
                let out = skinny_emu::run(&job);
                // Reference.
                let (mut v, mut t, mut o) = (vec![], vec![], vec![]);
                for i in 0..n_rows {
                    let vi: Vec<f64> = (0..r)
                        .map(|q| {
                            (0..n_in)
                                .map(|l| cm[q * cs0 + l * cs1] as f64 * input[i * n_in + l] as f64)
                                .sum()
                        })
                        .collect();
                    let ti: Vec<f64> = (0..r)
                        .map(|q| {
                            if has_mm == 1 {
                                (0..r).map(|p| mm[q * ms0 + p * ms1] as f64 * vi[p]).sum()
                            } else {
                                m_scale as f64 * vi[q]
                            }
                        })
                        .collect();
                    for j in 0..n_out {
                        let b = if has_base == 1 {
                            base[i * n_out + j] as f64
                        } else {
                            0.0
                        };
                        o.push(
                            b + (0..r)
                                .map(|q| am[j * as0 + q * as1] as f64 * ti[q])
                                .sum::<f64>(),
                        );
                    }
                    v.extend(vi);
                    t.extend(ti);
                }
                let label = format!("rows_fused {dt} r={r} case {case}");
                let ev = rel_flat(&out[0].1, &v, &label);
                let et = rel_flat(&out[1].1, &t, &label);
                assert!(ev <= 1e-5 && et <= 1e-5, "{label}: v {ev:.2e} t {et:.2e}");
                assert_pad(&out, &label);
                if has_out == 1 {
                    let eo = rel_flat(&out[2].1, &o, &label);
                    assert!(eo <= out_tol(dt), "{label}: out {eo:.2e}");
                } else {
                    // Nothing written: the -7 sentinels of the separate output remain.
                    assert!(
                        out[2].1.iter().all(|&x| x == -7.0),
                        "{label}: output written without out"
                    );
                }
            }
        }
    }
}

// col_reduce in the emulation (blocks of 2 row lanes × 4 column threads × 4 columns = 16
// columns; S staged 32 rows at a time): 70 rows (several pieces per chunk when rows_per_chunk
// ≥ 33), 37 columns (3 column blocks, ragged), r = 1, 10 (two rank groups) and 64, the dense
// (scalar, odd ld), aligned (vector) and offset (scalar) layouts. Tolerance: sums of ≤ 70 f32
// products, γ_n ≈ 4e-6 worst case: 1e-5.
#[test]
fn cuda_layer_kernels_emulated_on_cpu_col_reduce() {
    emu_or_skip!();
    let mut rng = rng(801);
    let (n_rows, n) = (70usize, 37usize);
    for dt in ["f32", "bf16", "f16"] {
        for (r, lay) in [(1usize, 1usize), (10, 0), (64, 3), (10, 2)] {
            for rpc in [1usize, 17, 70] {
                for beta in [0.0f32, 0.5] {
                    let (ldy, off) = layout(lay, n);
                    // S stored transposed (ss0 = 1, ss1 = n_rows) or row-major; out transposed.
                    let (ss0, ss1) = if rpc == 17 { (r, 1) } else { (1, n_rows) };
                    let (os0, os1) = (1usize, n);
                    let y = rand_vals(n_rows * n, dt, &mut rng);
                    let s = rand_vals(n_rows * r, "f32", &mut rng);
                    let mut out0 = rand_vals(n * r, "f32", &mut rng);
                    if beta == 0.0 {
                        out0.iter_mut().for_each(|x| *x = f32::NAN); // β = 0 must not read out
                    }
                    let alpha = -1.25f32;
                    let mut job = format!(
                        "col_reduce {dt} {n_rows} {n} {r} {rpc} {ldy} {off} {ss0} {ss1} {os0} {os1} {} {} {} {}",
                        h1(alpha),
                        h1(beta),
                        s.len(),
                        out0.len()
                    );
                    hex(&y, &mut job);
                    hex(&s, &mut job);
                    hex(&out0, &mut job);
                    let out = skinny_emu::run(&job);
                    let mut want = vec![0.0f64; n * r];
                    for j in 0..n {
                        for q in 0..r {
                            let sum: f64 = (0..n_rows)
                                .map(|i| y[i * n + j] as f64 * s[i * ss0 + q * ss1] as f64)
                                .sum();
                            let old = if beta != 0.0 {
                                beta as f64 * out0[j * os0 + q * os1] as f64
                            } else {
                                0.0
                            };
                            want[j * os0 + q * os1] = alpha as f64 * sum + old;
                        }
                    }
                    let e = rel_flat(&out[0].1, &want, "col_reduce");
                    assert!(
                        e <= 1e-5,
                        "col_reduce {dt} r={r} rpc={rpc} layout {lay} β={beta}: {e:.2e}"
                    );
                }
            }
        }
    }
}

// merge_apply in the emulation (blocks of 32 columns, steps of 4 rows): d = 13 rows over 2 row
// blocks (grid-stride), k = 45 columns (2 column blocks, ragged), r = 1, 5, 64, L stored
// transposed, R row-major or transposed, in place and not, the four layouts. Tolerance: ≤ 64
// f32 products then one rounding to the output type: out_tol.
#[test]
fn cuda_layer_kernels_emulated_on_cpu_merge_gemm_factor() {
    emu_or_skip!();
    let mut rng = rng(802);
    // merge_apply: W_out = W_in + scale L R, L stored transposed, in place and not.
    let (d, k) = (13usize, 45usize);
    for dt in ["f32", "bf16", "f16"] {
        for (r, lay) in [(1usize, 1usize), (5, 0), (64, 2), (5, 3)] {
            for alias in [0, 1] {
                let (ld, off) = layout(lay, k);
                let w = rand_vals(d * k, dt, &mut rng);
                let l = rand_vals(d * r, "f32", &mut rng);
                let rr = rand_vals(r * k, "f32", &mut rng);
                let (ls0, ls1) = (1usize, d);
                let (rs0, rs1) = if alias == 0 { (k, 1usize) } else { (1, r) };
                let scale = -0.5f32;
                let mut job = format!(
                    "merge_apply {dt} {d} {k} {r} {alias} {ld} {off} 2 {} {ls0} {ls1} {rs0} {rs1} {} {}",
                    h1(scale),
                    l.len(),
                    rr.len()
                );
                hex(&w, &mut job);
                hex(&l, &mut job);
                hex(&rr, &mut job);
                let out = skinny_emu::run(&job);
                let want: Vec<f64> = (0..d * k)
                    .map(|idx| {
                        let (i, j) = (idx / k, idx % k);
                        w[idx] as f64
                            + scale as f64
                                * (0..r)
                                    .map(|q| {
                                        l[i * ls0 + q * ls1] as f64 * rr[q * rs0 + j * rs1] as f64
                                    })
                                    .sum::<f64>()
                    })
                    .collect();
                let label = format!("merge_apply {dt} r={r} layout {lay} alias={alias}");
                let e = rel_flat(&out[0].1, &want, &label);
                assert!(e <= out_tol(dt), "{label}: {e:.2e}");
                assert_pad(&out, &label);
            }
        }
    }
    // small_gemm with transposed A and strided C, β = 0 (C poisoned) and β ≠ 0.
    let (m, n, kk) = (6usize, 5usize, 9usize);
    for beta in [0.0f32, 0.5] {
        let a = rand_vals(m * kk, "f32", &mut rng);
        let b = rand_vals(kk * n, "f32", &mut rng);
        let mut c0 = rand_vals(m * n, "f32", &mut rng);
        if beta == 0.0 {
            c0.iter_mut().for_each(|x| *x = f32::NAN);
        }
        let (as0, as1, bs0, bs1, cs0, cs1) = (1usize, m, n, 1usize, 1usize, m);
        let alpha = 1.5f32;
        let mut job = format!(
            "small_gemm {m} {n} {kk} {} {} {as0} {as1} {bs0} {bs1} {cs0} {cs1} {} {} {}",
            h1(alpha),
            h1(beta),
            a.len(),
            b.len(),
            c0.len()
        );
        hex(&a, &mut job);
        hex(&b, &mut job);
        hex(&c0, &mut job);
        let out = skinny_emu::run(&job);
        let mut want = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..kk)
                    .map(|p| a[i * as0 + p * as1] as f64 * b[p * bs0 + j * bs1] as f64)
                    .sum();
                let old = if beta != 0.0 {
                    beta as f64 * c0[i * cs0 + j * cs1] as f64
                } else {
                    0.0
                };
                want[i * cs0 + j * cs1] = alpha as f64 * s + old;
            }
        }
        let e = rel_flat(&out[0].1, &want, "small_gemm");
        assert!(e <= 1e-5, "small_gemm β={beta}: {e:.2e}");
    }
    // factor_c and factor_backward against src/grad/generator.rs (FactorChain, energy_backward).
    let (d, r) = (11usize, 3usize);
    let a = rand_vals(d * r, "f32", &mut rng);
    let b = rand_vals(r * d, "f32", &mut rng);
    let eta = 0.8f32;
    for (has_b, alpha) in [(1, 0.3f32), (1, 0.0), (0, 1.0)] {
        let mult = 0.9f32;
        let mut job = format!("factor_c {d} {r} {has_b} {} {}", h1(mult), h1(alpha));
        hex(&a, &mut job);
        if has_b == 1 {
            hex(&b, &mut job);
        }
        hex(&[eta], &mut job);
        let ct = skinny_emu::run(&job)[0].1.clone();
        let am = DMatrix::from_row_slice(d, r, &a).map(|x| x as f64);
        let bm = DMatrix::from_row_slice(r, d, &b).map(|x| x as f64);
        let spec = GeneratorSpec {
            alpha: alpha as f64,
            eta_mult: mult as f64,
            tau: None,
            lambda: 0.1,
        };
        let bopt = (has_b == 1).then_some(&bm);
        let gt = GeneratorTape::new(&am, bopt, eta as f64, &spec).unwrap();
        let ct_want: Vec<f64> = (0..d * r).map(|idx| gt.c[(idx % r, idx / r)]).collect();
        let e = rel_flat(&ct, &ct_want, "factor_c");
        assert!(e <= 1e-6, "factor_c has_b={has_b} α={alpha}: {e:.2e}");
        // factor_backward with random Ā, C̄ of the effective factors; Grams from the same Cᵀ.
        let abar = rand_vals(d * r, "f32", &mut rng);
        let cbar_t = rand_vals(d * r, "f32", &mut rng);
        let ctm = DMatrix::from_row_slice(d, r, &ct).map(|x| x as f64);
        let s = am.transpose() * &am;
        let kg = ctm.transpose() * &ctm;
        let f32s = |m: &DMatrix<f64>| -> Vec<f32> {
            (0..m.nrows())
                .flat_map(|i| (0..m.ncols()).map(move |j| (i, j)))
                .map(|(i, j)| m[(i, j)] as f32)
                .collect()
        };
        // acc = 0 overwrites B̄ and ∂η (initial values NaN: never read); acc = 1 adds to them.
        for acc in [0usize, 1] {
            let (bbar0, etabar0) = if acc == 1 {
                (rand_vals(d * r, "f32", &mut rng), vec![0.375f32])
            } else {
                (vec![f32::NAN; d * r], vec![f32::NAN])
            };
            let mut job = format!(
                "factor_backward {d} {r} {has_b} {acc} {} {} {}",
                h1(0.1),
                h1(alpha),
                h1(mult)
            );
            hex(&a, &mut job);
            hex(&ct, &mut job);
            hex(&f32s(&s), &mut job);
            hex(&f32s(&kg), &mut job);
            hex(&[eta], &mut job);
            hex(&abar, &mut job);
            hex(&cbar_t, &mut job);
            hex(&bbar0, &mut job);
            hex(&etabar0, &mut job);
            let out = skinny_emu::run(&job);
            // CPU: GeneratorTape::finish adds the energy gradient and runs FactorChain::backward.
            let abar_m = DMatrix::from_row_slice(d, r, &abar).map(|x| x as f64);
            let cbar_m = DMatrix::from_row_slice(d, r, &cbar_t)
                .map(|x| x as f64)
                .transpose();
            let (_, ea, ec) = elra::grad::energy_backward(&am, &gt.c, 0.1).unwrap();
            let fg = gt.chain.backward(&am, abar_m + ea, cbar_m + ec).unwrap();
            let label = format!("factor_backward has_b={has_b} α={alpha} acc={acc}");
            let flat = |m: &DMatrix<f64>| -> Vec<f64> {
                (0..m.nrows())
                    .flat_map(|i| (0..m.ncols()).map(move |j| (i, j)))
                    .map(|(i, j)| m[(i, j)])
                    .collect()
            };
            let e = rel_flat(&out[0].1, &flat(&fg.a), &label);
            assert!(e <= 1e-5, "{label}: ∂A {e:.2e}");
            if let Some(gb) = &fg.b {
                let mut want = flat(gb);
                if acc == 1 {
                    want.iter_mut()
                        .zip(&bbar0)
                        .for_each(|(w, b0)| *w += *b0 as f64);
                }
                let e = rel_flat(&out[2].1, &want, &label);
                assert!(e <= 1e-5, "{label}: ∂B {e:.2e}");
            } else {
                // PSD: B̄ is null; the buffer the harness passed is untouched.
                let same = out[2].1.iter().zip(&bbar0);
                assert!(
                    same.into_iter().all(|(o, b)| o.to_bits() == b.to_bits()),
                    "{label}: B̄ written without B"
                );
            }
            let want_eta = fg.eta + if acc == 1 { etabar0[0] as f64 } else { 0.0 };
            let e = ((out[3].1[0] as f64) - want_eta).abs() / want_eta.abs();
            assert!(
                e <= 1e-5,
                "{label}: ∂η {e:.2e} ({} vs {want_eta})",
                out[3].1[0]
            );
        }
    }
}

// check_finite (cuda/finite.cu) in the emulation against a CPU scan of the same values: every
// dtype, the four layouts of `layout` (dense; ld > cols with slack; offset 8; offset 1, which takes
// the scalar path) — the gaps around the matrix hold NaN, so a scan that read the padding of a
// row or past the last row would set the flag — shapes with ragged ends (37, 150 columns: not a
// multiple of the 4 or 8 elements of one 16-byte chunk) and grids smaller than the matrix (the
// grid-stride loops in both directions), with finite values that must pass (±0, subnormals, the
// largest finite values) and one NaN, +Inf or −Inf at the first entry, the last entry or inside.
// The flag starts at 0 or 2: the kernel ORs 1 in and never clears a bit.
#[test]
fn check_finite_emulated_on_cpu() {
    emu_or_skip!();
    let mut rng = rng(900);
    let mut case = 0u32;
    for dt in ["f32", "bf16", "f16"] {
        // Finite values the scan must accept: ±0, the smallest subnormal, the largest finite.
        let specials: Vec<f32> = match dt {
            "f32" => vec![0.0, -0.0, f32::from_bits(1), 1e-40, f32::MAX, -f32::MAX],
            "bf16" => {
                let b = |x: half::bf16| x.to_f32();
                vec![
                    -0.0,
                    b(half::bf16::from_bits(1)),
                    b(half::bf16::MAX),
                    b(half::bf16::MIN),
                ]
            }
            _ => {
                let h = |x: half::f16| x.to_f32();
                vec![
                    -0.0,
                    h(half::f16::from_bits(1)),
                    h(half::f16::MAX),
                    h(half::f16::MIN),
                ]
            }
        };
        for (rows, cols, gx, gy) in [(1, 1, 1, 1), (3, 37, 1, 2), (7, 150, 2, 3), (13, 64, 1, 1)] {
            for lay in 0..4 {
                let (ld, off) = layout(lay, cols);
                let len = rows * cols;
                // (where the bad value goes, the value): none, first, last, inside.
                let bads: [(Option<usize>, f32); 4] = [
                    (None, 0.0),
                    (Some(0), f32::INFINITY),
                    (Some(len - 1), f32::NAN),
                    (Some(len / 2), f32::NEG_INFINITY),
                ];
                for (at, bad) in bads {
                    let mut vals = rand_vals(len, dt, &mut rng);
                    for (i, &s) in specials.iter().enumerate() {
                        let j = (i * 7 + 3) % len;
                        vals[j] = s;
                    }
                    if let Some(j) = at {
                        vals[j] = bad;
                    }
                    let flag0 = 2 * (case % 2);
                    case += 1;
                    let mut job =
                        format!("check_finite {dt} {rows} {cols} {ld} {off} {gx} {gy} {flag0}");
                    hex(&vals, &mut job);
                    let out = skinny_emu::run(&job);
                    let cpu = vals.iter().any(|x| !x.is_finite());
                    let want = (flag0 | u32::from(cpu)) as f32;
                    let label = format!(
                        "{dt} {rows}×{cols} ld={ld} off={off} grid=({gx},{gy}) bad at {at:?}"
                    );
                    assert_eq!(cpu, at.is_some(), "{label}: the specials are finite");
                    assert_eq!(out[0].0, "flag", "{label}");
                    assert_eq!(out[0].1, vec![want], "{label}");
                }
            }
        }
    }
}

// The device half of the multi-adapter forward in the emulation (`multi` job: multi_count_i32,
// multi_perm_i32, rows_multi_* in launch batches of 8 adapters, multi_finish_*), against the
// formula per row in f64: y_i = u_i + bias + Am (Mm (Cm in_i)) with in_i = u_i (ELRA) or x_i
// (LoRA, Mm = s·I), NaN rows for indices outside [−1, count), untouched rows for −1 (plus bias).
// 11 adapters (two launch batches; one with no rows), mixed ranks and kinds, n = 37 rows in a
// random order, d = 77 and k = 70 (ragged column tiles), dense and aligned-with-gaps layouts,
// 1/2/4 rows per warp and 1 or 3 blocks per adapter. The segments are checked exactly (stable:
// rows in increasing order). Tolerances as rows_fused's.
#[test]
fn cuda_multi_adapter_kernels_emulated_on_cpu() {
    emu_or_skip!();
    let mut rng = rng(61);
    let (n, d, k, count) = (37usize, 77usize, 70usize, 11usize);
    for (case, (dt, rpw, gx, lay, bias)) in [
        ("f32", 1, 1, 0, true),
        ("f32", 4, 3, 1, false),
        ("bf16", 2, 1, 1, true),
        ("f16", 4, 2, 0, true),
    ]
    .into_iter()
    .enumerate()
    {
        let (ld_x, _) = layout(lay, k);
        let (ld_y, _) = layout(lay, d);
        // Adapter 4 has no rows; rows 5 and 20 carry bad indices (NaN rows); some rows are −1.
        let mut index: Vec<i32> = (0..n)
            .map(|_| {
                let a = rng.random_range(-1..count as i32);
                if a == 4 {
                    5
                } else {
                    a
                }
            })
            .collect();
        index[5] = count as i32;
        index[20] = -3;
        let x = rand_vals(n * k, dt, &mut rng);
        let y0 = rand_vals(n * d, dt, &mut rng);
        let b = rand_vals(d, dt, &mut rng);
        let mut job = format!(
            "multi {dt} {n} {d} {k} {count} {rpw} {gx} {ld_x} {ld_y} {}",
            bias as u8
        );
        for i in &index {
            job.push_str(&format!(" {i}"));
        }
        hex(&x, &mut job);
        hex(&y0, &mut job);
        if bias {
            hex(&b, &mut job);
        }
        struct Ad {
            from_x: bool,
            r: usize,
            cm: Vec<f32>,
            mm: Option<Vec<f32>>,
            s: f32,
            am: Vec<f32>,
        }
        let ads: Vec<Ad> = (0..count)
            .map(|a| {
                let from_x = a % 3 == 2;
                let r = 1 + (a * 5 + case) % 12;
                let n_in = if from_x { k } else { d };
                Ad {
                    from_x,
                    r,
                    cm: rand_vals(n_in * r, "f32", &mut rng),
                    mm: (!from_x).then(|| rand_vals(r * r, "f32", &mut rng)),
                    s: 0.75,
                    am: rand_vals(d * r, "f32", &mut rng),
                }
            })
            .collect();
        for ad in &ads {
            job.push_str(&format!(
                " {} {} {} {}",
                ad.from_x as u8,
                ad.r,
                ad.mm.is_some() as u8,
                h1(ad.s)
            ));
            hex(&ad.cm, &mut job);
            if let Some(m) = &ad.mm {
                hex(m, &mut job);
            }
            hex(&ad.am, &mut job);
        }
        let out = skinny_emu::run(&job);
        let get = |name: &str| out.iter().find(|(n, _)| n == name).unwrap().1.clone();
        // Segments: stable counting sort of the valid indices.
        let mut seg = vec![0f32];
        let mut perm = Vec::new();
        for a in 0..count as i32 {
            perm.extend((0..n).filter(|&i| index[i] == a).map(|i| i as f32));
            seg.push(perm.len() as f32);
        }
        assert_eq!(get("seg"), seg, "case {case}: segments");
        assert_eq!(
            get("perm")[..perm.len()],
            perm[..],
            "case {case}: permutation"
        );
        let y = get("y");
        let mut want = Vec::with_capacity(n * d);
        let mut nan_rows = Vec::new();
        for i in 0..n {
            let a = index[i];
            if a < -1 || a >= count as i32 {
                nan_rows.push(i);
                want.extend(std::iter::repeat_n(0.0, d));
                continue;
            }
            let u: Vec<f64> = (0..d).map(|j| y0[i * d + j] as f64).collect();
            let mut row = u.clone();
            if a >= 0 {
                let ad = &ads[a as usize];
                let r = ad.r;
                let input: Vec<f64> = if ad.from_x {
                    (0..k).map(|j| x[i * k + j] as f64).collect()
                } else {
                    u.clone()
                };
                // v = Cm in: ELRA's cm is Cᵀ (d×r), LoRA's lora_A (r×k).
                let v: Vec<f64> = (0..r)
                    .map(|q| {
                        (0..input.len())
                            .map(|l| {
                                let c = if ad.from_x {
                                    ad.cm[q * k + l]
                                } else {
                                    ad.cm[l * r + q]
                                };
                                c as f64 * input[l]
                            })
                            .sum()
                    })
                    .collect();
                let t: Vec<f64> = match &ad.mm {
                    Some(m) => (0..r)
                        .map(|q| (0..r).map(|p| m[q * r + p] as f64 * v[p]).sum())
                        .collect(),
                    None => v.iter().map(|x| ad.s as f64 * x).collect(),
                };
                for (j, yj) in row.iter_mut().enumerate() {
                    *yj += (0..r).map(|q| ad.am[j * r + q] as f64 * t[q]).sum::<f64>();
                }
            }
            if bias {
                for (j, yj) in row.iter_mut().enumerate() {
                    *yj += b[j] as f64;
                }
            }
            want.extend(row);
        }
        for &i in &nan_rows {
            assert!(
                y[i * d..(i + 1) * d].iter().all(|v| v.is_nan()),
                "case {case}: row {i} with a bad index is not NaN"
            );
        }
        let keep: Vec<usize> = (0..n).filter(|i| !nan_rows.contains(i)).collect();
        let g: Vec<f32> = keep
            .iter()
            .flat_map(|&i| y[i * d..(i + 1) * d].to_vec())
            .collect();
        let w: Vec<f64> = keep
            .iter()
            .flat_map(|&i| want[i * d..(i + 1) * d].to_vec())
            .collect();
        let e = rel_flat(&g, &w, "multi");
        assert!(e <= out_tol(dt), "case {case} ({dt}): {e:.2e}");
        assert_pad(&out, &format!("multi case {case}"));
    }
}

// multi_prep_f32 (Cᵀ of eq. 19 and Z = C A per adapter, two launch batches) against
// GeneratorTape (the CPU's effective factor) and C·A in f64, with leading dimensions above the
// factors' widths.
#[test]
fn cuda_multi_prep_emulated_on_cpu() {
    emu_or_skip!();
    let mut rng = rng(62);
    let d = 29usize;
    let specs: Vec<(usize, bool, f32, f32)> = (0..10)
        .map(|a| {
            (
                1 + a % 6,
                a % 3 != 1,
                0.5 + 0.05 * a as f32,
                [0.0f32, 0.4, 1.0][a % 3],
            )
        })
        .collect();
    let mut job = format!("multi_prep {d} {}", specs.len());
    let mut data = Vec::new();
    for &(r, has_b, mult, alpha) in &specs {
        let (lda, ldb) = (r + 2, d + 3);
        let alpha = if has_b { alpha } else { 1.0 };
        job.push_str(&format!(
            " {r} {} {lda} {ldb} {} {}",
            has_b as u8,
            h1(mult),
            h1(alpha)
        ));
        let eta = 0.6f32;
        let a = rand_vals(d * lda, "f32", &mut rng);
        let b = rand_vals(r * ldb, "f32", &mut rng);
        hex(&[eta], &mut job);
        hex(&a, &mut job);
        if has_b {
            hex(&b, &mut job);
        }
        data.push((r, has_b, mult, alpha, eta, lda, ldb, a, b));
    }
    let out = skinny_emu::run(&job);
    for (i, (r, has_b, mult, alpha, eta, lda, ldb, a, b)) in data.into_iter().enumerate() {
        let am = DMatrix::from_fn(d, r, |l, q| a[l * lda + q] as f64);
        let bm = DMatrix::from_fn(r, d, |q, l| b[q * ldb + l] as f64);
        let spec = GeneratorSpec {
            alpha: alpha as f64,
            eta_mult: mult as f64,
            tau: None,
            lambda: 0.0,
        };
        let gt = GeneratorTape::new(&am, has_b.then_some(&bm), eta as f64, &spec).unwrap();
        let ct_want: Vec<f64> = (0..d * r).map(|idx| gt.c[(idx % r, idx / r)]).collect();
        let e = rel_flat(&out[2 * i].1, &ct_want, "multi_prep ct");
        assert!(e <= 1e-6, "adapter {i}: Cᵀ {e:.2e}");
        let z = &gt.c * &am;
        let z_want: Vec<f64> = (0..r * r).map(|e| z[(e / r, e % r)]).collect();
        let e = rel_flat(&out[2 * i + 1].1, &z_want, "multi_prep z");
        assert!(e <= 1e-5, "adapter {i}: Z {e:.2e}");
    }
}
