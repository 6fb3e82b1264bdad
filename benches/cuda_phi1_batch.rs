//! GPU time of the batched r×r matrix functions of an ELRA step: `e^Z`, `φ1(Z)` (Prop. 1, eq. 4)
//! and the adjoint `L_φ1(Zᵀ, G)` of the reverse mode, for 224 adapters of rank r = 16 (e.g. the
//! q/k/v/o/up/down/gate projections of 32 transformer blocks), f32 and f64.
//!
//! Each sample launches the kernels `iters` times on the device's stream and synchronises the
//! stream once before and once after (`iter_custom`), so the time is GPU time including launch
//! overhead and the per-launch workspace allocation. Without a GPU the bench prints why it skips
//! and exits 0.

use std::time::{Duration, Instant};

use criterion::Criterion;
use elra::cuda::{cuda_available, kernels, CudaDevice, DeviceMatrices, FloatKernel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BATCH: usize = 224;
const R: usize = 16;

struct Inputs<T: FloatKernel> {
    z: DeviceMatrices<T>,
    g: DeviceMatrices<T>,
    e: DeviceMatrices<T>,
    p: DeviceMatrices<T>,
    l: DeviceMatrices<T>,
}

fn inputs<T: FloatKernel>(dev: &CudaDevice) -> Inputs<T> {
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    // ‖Z‖ of order 1 (a trained adapter's C·A), G of order 1.
    let mut gen = |scale: f64| -> Vec<T> {
        (0..BATCH * R * R)
            .map(|_| T::of(rng.random_range(-1.0..1.0) * scale))
            .collect()
    };
    let zs = gen(0.15);
    let gs = gen(1.0);
    let mk = |v: &[T]| DeviceMatrices::from_row_major(dev, BATCH, R, R, v).expect("upload");
    let out = || DeviceMatrices::zeros(dev, BATCH, R, R).expect("alloc");
    Inputs {
        z: mk(&zs),
        g: mk(&gs),
        e: out(),
        p: out(),
        l: out(),
    }
}

fn bench_dtype<T: FloatKernel>(c: &mut Criterion, dev: &CudaDevice) {
    let mut x = inputs::<T>(dev);
    let mut status = dev.stream().alloc_zeros::<i32>(BATCH).expect("alloc");
    // One checked run first: the timed work must be valid.
    kernels::expm_phi1(dev, &x.z, &mut x.e, &mut x.p).expect("expm_phi1");
    kernels::phi1_adjoint(dev, &x.z, &x.g, &mut x.l).expect("phi1_adjoint");

    let mut group = c.benchmark_group(format!("cuda_phi1_batch/{}", T::NAME));
    group.measurement_time(Duration::from_secs(3));
    let mut time =
        |name: &str, f: &mut dyn FnMut(&mut Inputs<T>, &mut cudarc::driver::CudaSlice<i32>)| {
            group.bench_function(format!("{name}/{BATCH}x{R}x{R}"), |b| {
                b.iter_custom(|iters| {
                    dev.synchronize().expect("sync");
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        f(&mut x, &mut status);
                    }
                    dev.synchronize().expect("sync");
                    t0.elapsed()
                })
            });
        };
    time("expm_phi1", &mut |x, s| {
        kernels::launch_expm_phi1(dev, &x.z, &mut x.e, &mut x.p, s).expect("launch")
    });
    time("phi1_adjoint", &mut |x, s| {
        kernels::launch_phi1_adjoint(dev, &x.z, &x.g, &mut x.l, s).expect("launch")
    });
    time("expm_phi1+adjoint", &mut |x, s| {
        kernels::launch_expm_phi1(dev, &x.z, &mut x.e, &mut x.p, s).expect("launch");
        kernels::launch_phi1_adjoint(dev, &x.z, &x.g, &mut x.l, s).expect("launch");
    });
    group.finish();
    kernels::check_status(dev, &status, BATCH, "bench", "z").expect("statuses after timing");
}

fn main() {
    if let Err(reason) = cuda_available() {
        println!("skipping cuda_phi1_batch: {reason}");
        return;
    }
    let dev = CudaDevice::new(0).expect("CUDA device 0");
    let mut c = Criterion::default().configure_from_args();
    bench_dtype::<f32>(&mut c, &dev);
    bench_dtype::<f64>(&mut c, &dev);
    c.final_summary();
}
