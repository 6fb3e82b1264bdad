//! Runs a few steps of one GPU layer (bf16) so that a profiler can time each kernel of a step:
//!
//! `gpu_layer_step <hyb|general|psd|lora|base> <woodbury|merged> N d k r [steps]`
//!
//! e.g. `ncu --clock-control none --metrics gpu__time_duration.sum gpu_layer_step hyb woodbury
//! 8192 4096 4096 8 3` lists every launch (ours and cuBLAS's) of three forward+backward steps;
//! the first step includes one-time allocations. The parameters are marked changed before every
//! step, as an optimiser would, so each step does its r×r work (Algorithm 1, lines 4–5). Prints
//! the mean wall time per step of the steps after the first (synchronised), and exits 0 with a
//! message when no GPU is present.

use std::sync::Arc;
use std::time::Instant;

#[allow(dead_code)] // each example uses a subset of the shared parsers
mod common;
use common::{parse, positional};

use elra::adapter::{
    Adapter, AlphaSchedule, ElraConfig, EtaMultiplier, GeneratorConfig, LoraConfig,
    Variant as ElraVariant,
};
use elra::cuda::{
    cuda_available, gemm, CudaDevice, DeviceMatrices, GpuElraLayer, GpuLoraLayer, Transpose,
};
use elra::grad::Route;
use half::bf16;
use nalgebra::DMatrix;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rand_dev(
    dev: &CudaDevice,
    rows: usize,
    cols: usize,
    scale: f32,
    seed: u64,
) -> elra::Result<DeviceMatrices<bf16>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<bf16> = (0..rows * cols)
        .map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0) * scale))
        .collect();
    DeviceMatrices::from_row_major(dev, 1, rows, cols, &v)
}

fn rand_host(rows: usize, cols: usize, scale: f32, seed: u64) -> DMatrix<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    DMatrix::from_fn(rows, cols, |_, _| rng.random_range(-1.0f32..1.0) * scale)
}

/// What one timed step runs: the base GEMMs, a LoRA layer, or an ELRA layer of `variant` with
/// (for Hyb) the constant weight `alpha`.
enum Variant {
    Base,
    Lora,
    Elra { variant: ElraVariant, alpha: f64 },
}

fn main() -> elra::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 6 {
        eprintln!(
            "usage: gpu_layer_step <hyb|general|psd|lora|base> <woodbury|merged> N d k r [steps]"
        );
        std::process::exit(2);
    }
    let (n, d, k, r): (usize, usize, usize, usize) = (
        parse("N", &args[2])?,
        parse("d", &args[3])?,
        parse("k", &args[4])?,
        parse("r", &args[5])?,
    );
    let steps: usize = positional(&args, 6, "steps", 3)?;
    let route = match args[1].as_str() {
        "merged" => Route::Merged,
        "woodbury" => Route::Woodbury,
        other => {
            return Err(elra::ElraError::invalid(
                "route",
                format!("{other:?}: expected woodbury or merged"),
            ))
        }
    };
    let variant = match args[0].as_str() {
        "base" => Variant::Base,
        "lora" => Variant::Lora,
        "general" => Variant::Elra {
            variant: ElraVariant::General,
            alpha: 0.0,
        },
        "psd" => Variant::Elra {
            variant: ElraVariant::Psd,
            alpha: 1.0,
        },
        "hyb" => Variant::Elra {
            variant: ElraVariant::Hyb,
            alpha: 0.5,
        },
        other => {
            return Err(elra::ElraError::invalid(
                "variant",
                format!("{other:?}: expected hyb, general, psd, lora or base"),
            ))
        }
    };
    // Arguments are checked first, so that a bad command line is an error with or without a GPU.
    if let Err(reason) = cuda_available() {
        println!("no GPU: {reason}");
        return Ok(());
    }
    let owned = Arc::new(CudaDevice::new(0)?);
    let dev = &owned;
    let x = rand_dev(dev, n, k, 1.0, 1)?;
    let dy = rand_dev(dev, n, d, 1.0, 2)?;
    let w0 = rand_dev(dev, d, k, 1.0 / (k as f32).sqrt(), 3)?;
    let mut y = DeviceMatrices::<bf16>::zeros(dev, 1, n, d)?;
    let mut dx = DeviceMatrices::<bf16>::zeros(dev, 1, n, k)?;
    let mut step: Box<dyn FnMut() -> elra::Result<()>> = match variant {
        Variant::Base => Box::new(move || {
            gemm(
                dev,
                1.0,
                &x,
                Transpose::No,
                &w0,
                Transpose::Yes,
                0.0,
                &mut y,
            )?;
            gemm(
                dev,
                1.0,
                &dy,
                Transpose::No,
                &w0,
                Transpose::No,
                0.0,
                &mut dx,
            )
        }),
        Variant::Lora => {
            let la = rand_host(r, k, 1.0 / (k as f32).sqrt(), 4);
            let lb = rand_host(d, r, 0.01, 5);
            let config = LoraConfig {
                lora_alpha: 16.0,
                ..LoraConfig::new(d, k, r)
            };
            let mut lora = GpuLoraLayer::from_factors(dev.clone(), config, w0, &la, &lb)?;
            Box::new(move || {
                lora.forward(&x, None, &mut y)?;
                lora.backward(&x, &dy, &mut dx)
            })
        }
        Variant::Elra { variant, alpha } => {
            let a = rand_host(d, r, 1.0 / (d as f32).sqrt(), 6);
            let b = rand_host(r, d, 1.0 / (r as f32).sqrt(), 7);
            let config = ElraConfig {
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
            };
            let bopt = variant.uses_b().then_some(&b);
            let mut layer = GpuElraLayer::from_factors(dev.clone(), config, w0, &a, bopt)?;
            layer.set_route(Some(route));
            Box::new(move || {
                let _ = layer.params_mut();
                layer.forward(&x, None, &mut y)?;
                layer.backward(&x, &dy, &mut dx)
            })
        }
    };
    step()?;
    let t0 = Instant::now();
    for _ in 1..steps {
        step()?;
    }
    drop(step);
    dev.synchronize()?;
    if steps > 1 {
        println!(
            "{} {:?} N={n} d={d} k={k} r={r}: {:.1} µs per step (mean of {})",
            args[0],
            route,
            t0.elapsed().as_secs_f64() * 1e6 / (steps - 1) as f64,
            steps - 1
        );
    }
    Ok(())
}
