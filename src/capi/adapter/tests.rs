//! Unit tests of the CPU adapter handle through its exports.

use super::*;
use crate::capi::layout::row_major;
use crate::capi::*;
use crate::grad;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::ffi::{c_char, CStr};
use ElraStatus::*;

fn last_error() -> String {
    let mut buf = vec![0 as c_char; 512];
    // SAFETY: buf holds 512 writable bytes.
    unsafe { elra_last_error_message(buf.as_mut_ptr(), buf.len()) };
    // SAFETY: NUL-terminated inside buf.
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn default_config(
    variant: ElraVariant,
    dtype: ElraDtype,
    d: usize,
    k: usize,
    r: usize,
) -> ElraAdapterConfig {
    let mut c = std::mem::MaybeUninit::<ElraAdapterConfig>::uninit();
    // SAFETY: c is a live local of the right type.
    let s = unsafe {
        elra_adapter_config_default(variant as u32, dtype as u32, d, k, r, 100, c.as_mut_ptr())
    };
    assert_eq!(s, ELRA_OK);
    // SAFETY: initialised by the successful call.
    unsafe { c.assume_init() }
}

fn rand_rows(n: usize, c: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
    (0..n * c).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// Creates a handle; panics on failure.
fn create(c: &ElraAdapterConfig, w0: &[f64], ld: usize) -> *mut ElraAdapter {
    let mut h: *mut ElraAdapter = std::ptr::null_mut();
    // SAFETY: live config, W0 of d×k with leading dimension ld, writable out.
    let s = unsafe { elra_adapter_create(c, w0.as_ptr().cast(), ld, &mut h) };
    assert_eq!(s, ELRA_OK, "{}", last_error());
    h
}

#[test]
fn forward_merge_unmerge_match_the_layer_for_every_variant() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (d, k, r, n) = (7, 5, 3, 4);
    for v in [
        ElraVariant::ELRA_VARIANT_GENERAL,
        ElraVariant::ELRA_VARIANT_PSD,
        ElraVariant::ELRA_VARIANT_HYB,
        ElraVariant::ELRA_VARIANT_LORA,
    ] {
        let mut c = default_config(v, ElraDtype::ELRA_DTYPE_F64, d, k, r);
        c.seed = 5;
        c.eta = 0.3; // a generator far from zero
        let w0 = rand_rows(d, k, &mut rng);
        let h = create(&c, &w0, k);
        let w0m = DMatrix::from_row_slice(d, k, &w0);
        let mut reference: Box<dyn HostAdapter<f64>> = match variant_of(c.variant).unwrap() {
            Some(var) => Box::new(ElraLayer::new(c.elra(var).unwrap(), w0m.clone()).unwrap()),
            None => {
                let mut l = LoraLayer::new(c.lora().unwrap(), w0m.clone()).unwrap();
                // Non-zero lora_B so that the adapter matters; set through the ABI too.
                let b = DMatrix::from_fn(d, r, |i, j| (i + 2 * j) as f64 * 0.1);
                l.set_lora_b(b.clone()).unwrap();
                let rows = row_major(&b);
                // SAFETY: live handle, d×r buffer.
                let s = unsafe { elra_adapter_set_param_f64(h, 1, rows.as_ptr(), d, r, r) };
                assert_eq!(s, ELRA_OK);
                Box::new(l)
            }
        };
        // Forward with strided x (ld 9) and y (ld 10): gaps untouched, values identical.
        let (ldx, ldy) = (9, 10);
        let mut x = vec![0.0; n * ldx];
        for i in 0..n {
            for j in 0..k {
                x[i * ldx + j] = rng.random_range(-1.0..1.0);
            }
        }
        let mut y = vec![-5.0; n * ldy];
        // SAFETY: buffers cover n×k / n×d with the given leading dimensions.
        let s = unsafe { elra_adapter_forward_f64(h, n, x.as_ptr(), ldx, y.as_mut_ptr(), ldy) };
        assert_eq!(s, ELRA_OK, "{}", last_error());
        let xm = DMatrix::from_fn(n, k, |i, j| x[i * ldx + j]);
        let want = reference.apply(&xm).unwrap();
        for i in 0..n {
            for j in 0..ldy {
                if j < d {
                    assert_eq!(y[i * ldy + j], want[(i, j)]);
                } else {
                    assert_eq!(y[i * ldy + j], -5.0);
                }
            }
        }
        // Merge / unmerge.
        let mut wn = vec![0.0; d * k];
        let mut back = vec![0.0; d * k];
        // SAFETY: d×k buffers.
        unsafe {
            assert_eq!(elra_adapter_merge_f64(h, wn.as_mut_ptr(), k), ELRA_OK);
            assert_eq!(
                elra_adapter_unmerge_f64(h, wn.as_ptr(), k, back.as_mut_ptr(), k),
                ELRA_OK
            );
        }
        assert_eq!(DMatrix::from_row_slice(d, k, &wn), {
            let mut m = DMatrix::zeros(d, k);
            reference.merge(&mut m).unwrap();
            m
        });
        // exp(−G) exp(G) W0 = W0 up to rounding: entries O(1), ‖G‖ ≤ τ = 2, so 1e-12.
        let err = back
            .iter()
            .zip(&w0)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-12, "unmerge error {err}");
        // Parameter counts (Remark 1).
        let (mut m, mut sc) = (0, 0);
        // SAFETY: live handle, local outputs.
        let st = unsafe { elra_adapter_param_count(h, &mut m, &mut sc) };
        assert_eq!(st, ELRA_OK);
        assert_eq!(
            (m, sc),
            (reference.param_count(), reference.scalar_param_count())
        );
        // SAFETY: handle from create, destroyed once.
        unsafe { elra_adapter_destroy(h) };
    }
}

#[test]
fn parameters_round_trip_and_bad_values_leave_the_adapter_unchanged() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (d, k, r) = (4, 6, 2);
    let c = default_config(
        ElraVariant::ELRA_VARIANT_HYB,
        ElraDtype::ELRA_DTYPE_F64,
        d,
        k,
        r,
    );
    let w0 = rand_rows(d, k, &mut rng);
    let h = create(&c, &w0, k);
    let a = rand_rows(d, r, &mut rng);
    let mut got = vec![0.0; d * r];
    let (mut rows, mut cols) = (0, 0);
    // SAFETY: every call passes live buffers matching the shapes it states.
    unsafe {
        assert_eq!(
            elra_adapter_param_shape(h, 0, &mut rows, &mut cols),
            ELRA_OK
        );
        assert_eq!((rows, cols), (d, r));
        assert_eq!(
            elra_adapter_set_param_f64(h, 0, a.as_ptr(), d, r, r),
            ELRA_OK
        );
        assert_eq!(
            elra_adapter_get_param_f64(h, 0, got.as_mut_ptr(), d, r, r),
            ELRA_OK
        );
        assert_eq!(got, a);
        // η.
        let eta = [0.25];
        assert_eq!(
            elra_adapter_set_param_f64(h, 2, eta.as_ptr(), 1, 1, 1),
            ELRA_OK
        );
        let mut e = [0.0];
        assert_eq!(
            elra_adapter_get_param_f64(h, 2, e.as_mut_ptr(), 1, 1, 1),
            ELRA_OK
        );
        assert_eq!(e, eta);
        // Bad values: negative η, NaN in A, wrong shape, unknown parameter, wrong dtype.
        assert_eq!(
            elra_adapter_set_param_f64(h, 2, [-1.0].as_ptr(), 1, 1, 1),
            ELRA_INVALID_ARGUMENT
        );
        assert!(last_error().contains("eta"), "{}", last_error());
        let mut bad = a.clone();
        bad[3] = f64::NAN;
        assert_eq!(
            elra_adapter_set_param_f64(h, 0, bad.as_ptr(), d, r, r),
            ELRA_NON_FINITE
        );
        assert_eq!(
            elra_adapter_set_param_f64(h, 0, a.as_ptr(), r, d, d),
            ELRA_SHAPE_MISMATCH
        );
        assert!(
            last_error().contains(&format!("expected {d}×{r}")),
            "{}",
            last_error()
        );
        assert_eq!(
            elra_adapter_set_param_f64(h, 9, a.as_ptr(), d, r, r),
            ELRA_INVALID_ARGUMENT
        );
        let af: Vec<f32> = a.iter().map(|&x| x as f32).collect();
        assert_eq!(
            elra_adapter_set_param_f32(h, 0, af.as_ptr(), d, r, r),
            ELRA_INVALID_ARGUMENT
        );
        assert!(last_error().contains("f32"));
        assert_eq!(
            elra_adapter_get_param_f64(h, 0, got.as_mut_ptr(), d, r, r),
            ELRA_OK
        );
        assert_eq!(got, a, "unchanged after failed sets");
        assert_eq!(
            elra_adapter_get_param_f64(h, 2, e.as_mut_ptr(), 1, 1, 1),
            ELRA_OK
        );
        assert_eq!(e, eta);
        // W0 can be replaced; A, η, step stay.
        let w1 = rand_rows(d, k, &mut rng);
        assert_eq!(elra_adapter_set_step(h, 7), ELRA_OK);
        assert_eq!(
            elra_adapter_set_param_f64(h, 3, w1.as_ptr(), d, k, k),
            ELRA_OK
        );
        let mut step = 0;
        let mut alpha = -1.0;
        assert_eq!(elra_adapter_get_step(h, &mut step, &mut alpha), ELRA_OK);
        assert_eq!(step, 7);
        assert!((0.0..=1.0).contains(&alpha));
        assert_eq!(
            elra_adapter_get_param_f64(h, 0, got.as_mut_ptr(), d, r, r),
            ELRA_OK
        );
        assert_eq!(got, a);
        // Energy (eq. 21) is positive for a non-zero generator; penalty = λ·energy.
        let (mut en, mut pe) = (0.0, 0.0);
        assert_eq!(elra_adapter_energy(h, &mut en, &mut pe), ELRA_OK);
        assert!(en > 0.0 && (pe - c.lambda * en).abs() <= 1e-15 * en);
        // Null handle.
        assert_eq!(
            elra_adapter_forward_f64(std::ptr::null(), 1, a.as_ptr(), k, got.as_mut_ptr(), d),
            ELRA_NULL_POINTER
        );
        elra_adapter_destroy(h);
        elra_adapter_destroy(std::ptr::null_mut());
    }
    // PSD has no B.
    let c = default_config(
        ElraVariant::ELRA_VARIANT_PSD,
        ElraDtype::ELRA_DTYPE_F64,
        d,
        k,
        r,
    );
    let h = create(&c, &w0, k);
    let (mut rows, mut cols) = (0, 0);
    // SAFETY: live handle and locals.
    unsafe {
        assert_eq!(
            elra_adapter_param_shape(h, 1, &mut rows, &mut cols),
            ELRA_INVALID_ARGUMENT
        );
        assert!(last_error().contains("PSD"));
        elra_adapter_destroy(h);
    }
}

#[test]
fn invalid_configs_are_rejected_and_out_stays_untouched() {
    let w0 = vec![0.5; 12];
    let base = default_config(
        ElraVariant::ELRA_VARIANT_GENERAL,
        ElraDtype::ELRA_DTYPE_F64,
        3,
        4,
        2,
    );
    let cases: Vec<(ElraAdapterConfig, &str)> = vec![
        (ElraAdapterConfig { variant: 7, ..base }, "variant"),
        (ElraAdapterConfig { dtype: 2, ..base }, "dtype"),
        (ElraAdapterConfig { r: 0, ..base }, "r"),
        (ElraAdapterConfig { r: 4, ..base }, "r"),
        (ElraAdapterConfig { d: 0, ..base }, "d"),
        (ElraAdapterConfig { eta: -1.0, ..base }, "eta"),
        (
            ElraAdapterConfig {
                eta: f64::NAN,
                ..base
            },
            "eta",
        ),
        (ElraAdapterConfig { tau: -2.0, ..base }, "tau"),
        (
            ElraAdapterConfig {
                lambda: f64::INFINITY,
                ..base
            },
            "lambda",
        ),
        (
            ElraAdapterConfig {
                schedule: 9,
                ..base
            },
            "schedule",
        ),
        (
            ElraAdapterConfig {
                schedule: 3,
                alpha: 1.5,
                ..base
            },
            "alpha",
        ),
        (
            ElraAdapterConfig {
                eta_multiplier: 4,
                ..base
            },
            "eta_multiplier",
        ),
    ];
    for (c, needle) in cases {
        let sentinel = 0x10 as *mut ElraAdapter;
        let mut h = sentinel;
        // SAFETY: live config and W0 (3×4), writable out.
        let s = unsafe { elra_adapter_create(&c, w0.as_ptr().cast(), 4, &mut h) };
        assert_eq!(s, ELRA_INVALID_ARGUMENT, "{needle}");
        assert!(
            last_error().contains(&format!("`{needle}`")),
            "{needle}: {}",
            last_error()
        );
        assert_eq!(h, sentinel);
    }
    let mut h: *mut ElraAdapter = std::ptr::null_mut();
    let mut w = w0.clone();
    w[5] = f64::INFINITY;
    // SAFETY: as above.
    unsafe {
        assert_eq!(
            elra_adapter_create(&base, w.as_ptr().cast(), 4, &mut h),
            ELRA_NON_FINITE
        );
        assert_eq!(
            elra_adapter_create(&base, w0.as_ptr().cast(), 3, &mut h),
            ELRA_INVALID_ARGUMENT
        );
        assert_eq!(
            elra_adapter_create(std::ptr::null(), w0.as_ptr().cast(), 4, &mut h),
            ELRA_NULL_POINTER
        );
        assert_eq!(
            elra_adapter_create(&base, std::ptr::null(), 4, &mut h),
            ELRA_NULL_POINTER
        );
    }
    assert!(h.is_null());
}

#[test]
fn save_load_round_trip_through_the_abi() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let dir = std::env::temp_dir().join(format!("elra-capi-{}", std::process::id()));
    let cdir = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
    for (variant, dt) in [
        (ElraVariant::ELRA_VARIANT_HYB, ElraDtype::ELRA_DTYPE_F64),
        (ElraVariant::ELRA_VARIANT_LORA, ElraDtype::ELRA_DTYPE_F64),
        (ElraVariant::ELRA_VARIANT_GENERAL, ElraDtype::ELRA_DTYPE_F32),
    ] {
        let (d, k, r) = (5, 4, 2);
        let c = default_config(variant, dt, d, k, r);
        let w0 = rand_rows(d, k, &mut rng);
        let w032: Vec<f32> = w0.iter().map(|&x| x as f32).collect();
        let mk = || -> *mut ElraAdapter {
            let mut h = std::ptr::null_mut();
            let p: *const c_void = match dt {
                ElraDtype::ELRA_DTYPE_F32 => w032.as_ptr().cast(),
                ElraDtype::ELRA_DTYPE_F64 => w0.as_ptr().cast(),
            };
            // SAFETY: live config, W0 d×k of the config's dtype, writable out.
            assert_eq!(unsafe { elra_adapter_create(&c, p, k, &mut h) }, ELRA_OK);
            h
        };
        let (h1, h2) = (mk(), mk());
        let names = [c"model.q".as_ptr(), c"model.v".as_ptr()];
        let hs = [h1.cast_const(), h2.cast_const()];
        // SAFETY: two live handles and names; NUL-terminated dir.
        let s = unsafe { elra_adapter_save(2, hs.as_ptr(), names.as_ptr(), cdir.as_ptr()) };
        assert_eq!(s, ELRA_OK, "{}", last_error());
        let mut back: *mut ElraAdapter = std::ptr::null_mut();
        let p: *const c_void = match dt {
            ElraDtype::ELRA_DTYPE_F32 => w032.as_ptr().cast(),
            ElraDtype::ELRA_DTYPE_F64 => w0.as_ptr().cast(),
        };
        // SAFETY: NUL-terminated strings, W0 d×k, writable out.
        let s = unsafe {
            elra_adapter_load(
                cdir.as_ptr(),
                c"model.v".as_ptr(),
                dt as u32,
                d,
                k,
                p,
                k,
                &mut back,
            )
        };
        assert_eq!(s, ELRA_OK, "{}", last_error());
        // Same merged weight as the saved handle (merge is a deterministic function of the
        // parameters, which round trip exactly).
        match dt {
            ElraDtype::ELRA_DTYPE_F64 => {
                let (mut m1, mut m2) = (vec![0.0; d * k], vec![1.0; d * k]);
                // SAFETY: d×k buffers, live handles.
                unsafe {
                    assert_eq!(elra_adapter_merge_f64(h2, m1.as_mut_ptr(), k), ELRA_OK);
                    assert_eq!(elra_adapter_merge_f64(back, m2.as_mut_ptr(), k), ELRA_OK);
                }
                assert_eq!(m1, m2);
            }
            ElraDtype::ELRA_DTYPE_F32 => {
                let (mut m1, mut m2) = (vec![0.0f32; d * k], vec![1.0f32; d * k]);
                // SAFETY: d×k buffers, live handles.
                unsafe {
                    assert_eq!(elra_adapter_merge_f32(h2, m1.as_mut_ptr(), k), ELRA_OK);
                    assert_eq!(elra_adapter_merge_f32(back, m2.as_mut_ptr(), k), ELRA_OK);
                }
                assert_eq!(m1, m2);
            }
        }
        let mut cfg_back = std::mem::MaybeUninit::<ElraAdapterConfig>::uninit();
        // SAFETY: live handle, writable local.
        let st = unsafe { elra_adapter_get_config(back, cfg_back.as_mut_ptr()) };
        assert_eq!(st, ELRA_OK);
        // SAFETY: initialised by the call.
        assert_eq!(unsafe { cfg_back.assume_init() }, c);
        // Errors: unknown module, wrong d, corrupted weights file, missing dir.
        let mut other: *mut ElraAdapter = std::ptr::null_mut();
        // SAFETY: as above; d − 1 rows of W0 lie inside the d×k buffer.
        unsafe {
            let s = elra_adapter_load(
                cdir.as_ptr(),
                c"model.x".as_ptr(),
                dt as u32,
                d,
                k,
                p,
                k,
                &mut other,
            );
            assert_eq!(s, ELRA_INVALID_ARGUMENT);
            assert!(last_error().contains("model.x"));
            let s = elra_adapter_load(
                cdir.as_ptr(),
                c"model.q".as_ptr(),
                dt as u32,
                d - 1,
                k,
                p,
                k,
                &mut other,
            );
            assert_eq!(s, ELRA_SHAPE_MISMATCH, "{}", last_error());
        }
        let wf = dir.join(crate::io::WEIGHTS_FILE);
        let bytes = std::fs::read(&wf).unwrap();
        std::fs::write(&wf, &bytes[..bytes.len() - 3]).unwrap();
        // SAFETY: as above.
        let s = unsafe {
            elra_adapter_load(
                cdir.as_ptr(),
                c"model.q".as_ptr(),
                dt as u32,
                d,
                k,
                p,
                k,
                &mut other,
            )
        };
        assert_eq!(s, ELRA_FORMAT);
        assert!(
            last_error().contains(crate::io::WEIGHTS_FILE),
            "{}",
            last_error()
        );
        assert!(other.is_null());
        // Merged export.
        let path =
            std::ffi::CString::new(dir.join("merged.safetensors").to_str().unwrap()).unwrap();
        // SAFETY: live handles and names, NUL-terminated path.
        let s = unsafe { elra_adapter_save_merged(2, hs.as_ptr(), names.as_ptr(), path.as_ptr()) };
        assert_eq!(s, ELRA_OK, "{}", last_error());
        // SAFETY: handles from create/load, destroyed once each.
        unsafe {
            elra_adapter_destroy(h1);
            elra_adapter_destroy(h2);
            elra_adapter_destroy(back);
        }
    }
    // Mixing dtypes in one file is refused.
    let c32 = default_config(
        ElraVariant::ELRA_VARIANT_GENERAL,
        ElraDtype::ELRA_DTYPE_F32,
        3,
        3,
        1,
    );
    let c64 = default_config(
        ElraVariant::ELRA_VARIANT_GENERAL,
        ElraDtype::ELRA_DTYPE_F64,
        3,
        3,
        1,
    );
    let (w32, w64) = ([0.1f32; 9], [0.1f64; 9]);
    let (mut a, mut b) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: live configs, 3×3 weights, writable outs; handles destroyed once.
    unsafe {
        assert_eq!(
            elra_adapter_create(&c32, w32.as_ptr().cast(), 3, &mut a),
            ELRA_OK
        );
        assert_eq!(
            elra_adapter_create(&c64, w64.as_ptr().cast(), 3, &mut b),
            ELRA_OK
        );
        let hs = [a.cast_const(), b.cast_const()];
        let names = [c"m.a".as_ptr(), c"m.b".as_ptr()];
        assert_eq!(
            elra_adapter_save(2, hs.as_ptr(), names.as_ptr(), cdir.as_ptr()),
            ELRA_INVALID_ARGUMENT
        );
        elra_adapter_destroy(a);
        elra_adapter_destroy(b);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `L = ⟨forward(x), dy⟩ + λ‖G‖²_F` through the ABI only.
fn loss(
    h: *const ElraAdapter,
    n: usize,
    x: &[f64],
    k: usize,
    dy: &[f64],
    d: usize,
    lora: bool,
) -> f64 {
    let mut y = vec![0.0; n * d];
    // SAFETY: live handle, n×k and n×d buffers.
    let s = unsafe { elra_adapter_forward_f64(h, n, x.as_ptr(), k, y.as_mut_ptr(), d) };
    assert_eq!(s, ELRA_OK, "{}", last_error());
    let task: f64 = y.iter().zip(dy).map(|(a, b)| a * b).sum();
    if lora {
        return task;
    }
    let (mut e, mut p) = (0.0, 0.0);
    // SAFETY: live handle, local outputs.
    assert_eq!(unsafe { elra_adapter_energy(h, &mut e, &mut p) }, ELRA_OK);
    task + p
}

#[test]
fn backward_matches_the_grad_module_and_central_differences_through_the_abi() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (d, k, r, n) = (6, 5, 2, 3);
    for (v, tau) in [
        (ElraVariant::ELRA_VARIANT_GENERAL, 0.0),
        (ElraVariant::ELRA_VARIANT_PSD, 2.0),
        (ElraVariant::ELRA_VARIANT_HYB, 0.0),
        (ElraVariant::ELRA_VARIANT_LORA, 0.0),
    ] {
        let lora = v == ElraVariant::ELRA_VARIANT_LORA;
        let mut c = default_config(v, ElraDtype::ELRA_DTYPE_F64, d, k, r);
        c.eta = 0.4;
        c.tau = tau;
        c.lambda = 0.05; // make the energy term visible in the gradients
        let w0 = rand_rows(d, k, &mut rng);
        let h = create(&c, &w0, k);
        // SAFETY: live handle.
        assert_eq!(unsafe { elra_adapter_set_step(h, 3) }, ELRA_OK);
        if lora {
            let b = rand_rows(d, r, &mut rng);
            // SAFETY: live handle, d×r buffer.
            let st = unsafe { elra_adapter_set_param_f64(h, 1, b.as_ptr(), d, r, r) };
            assert_eq!(st, ELRA_OK);
        }
        let x = rand_rows(n, k, &mut rng);
        let dy = rand_rows(n, d, &mut rng);
        let (mut ar, mut ac) = (0, 0);
        // SAFETY: live handle, locals.
        let st = unsafe { elra_adapter_param_shape(h, 0, &mut ar, &mut ac) };
        assert_eq!(st, ELRA_OK);
        let uses_b = v != ElraVariant::ELRA_VARIANT_PSD;
        let (br, bc) = if uses_b {
            let (mut br, mut bc) = (0, 0);
            // SAFETY: live handle, locals.
            let st = unsafe { elra_adapter_param_shape(h, 1, &mut br, &mut bc) };
            assert_eq!(st, ELRA_OK);
            (br, bc)
        } else {
            (0, 0)
        };
        let mut dx = vec![0.0; n * k];
        let mut da = vec![0.0; ar * ac];
        let mut db = vec![0.0; br * bc];
        let mut deta = 0.0;
        let dbp = if uses_b {
            db.as_mut_ptr()
        } else {
            std::ptr::null_mut()
        };
        // SAFETY: buffers match the shapes queried above.
        let s = unsafe {
            elra_adapter_backward_f64(
                h,
                n,
                x.as_ptr(),
                k,
                dy.as_ptr(),
                d,
                dx.as_mut_ptr(),
                k,
                da.as_mut_ptr(),
                ac,
                dbp,
                bc.max(1),
                &mut deta,
            )
        };
        assert_eq!(s, ELRA_OK, "{:?}: {}", v, last_error());
        // Bit-for-bit the grad module on the same layer.
        // SAFETY: live handle.
        let a = unsafe { handle::live_ref(h) }.unwrap();
        let xm = DMatrix::from_row_slice(n, k, &x);
        let dym = DMatrix::from_row_slice(n, d, &dy);
        a.with::<f64, _>(|l| {
            let any = l.as_any();
            if let Some(l) = any.downcast_ref::<ElraLayer<f64>>() {
                let (_, t) = grad::elra_forward(l, &xm, grad::Route::Woodbury, None).unwrap();
                let g = grad::elra_backward(l, &xm, &t, dym.clone()).unwrap();
                assert_eq!(row_major(&g.x), dx);
                assert_eq!(row_major(&g.a), da);
                assert_eq!(g.eta, deta);
            } else {
                let l = any.downcast_ref::<LoraLayer<f64>>().unwrap();
                let (_, t) = grad::lora_forward(l, &xm, None).unwrap();
                let g = grad::lora_backward(l, &xm, &t, dym.clone()).unwrap();
                assert_eq!(row_major(&g.lora_a), da);
            }
            Ok(())
        })
        .unwrap();
        // Central differences of L = <Y, dy> + λ‖G‖²_F through the ABI alone, h = 1e-6:
        // truncation O(h²) ≈ 1e-12, rounding O(u·|L|/h) ≈ 1e-10; bound 1e-6·(1 + |g|).
        let hh = 1e-6;
        let close = |fd: f64, an: f64, what: &str| {
            assert!(
                (fd - an).abs() < 1e-6 * (1.0 + an.abs()),
                "{v:?} {what}: fd {fd} vs {an}"
            );
        };
        for i in [0, n * k - 1] {
            let (mut xp, mut xm_) = (x.clone(), x.clone());
            xp[i] += hh;
            xm_[i] -= hh;
            let fd =
                (loss(h, n, &xp, k, &dy, d, lora) - loss(h, n, &xm_, k, &dy, d, lora)) / (2.0 * hh);
            close(fd, dx[i], "dx");
        }
        let fd_param = |which: u32, rows: usize, cols: usize, i: usize| -> f64 {
            let mut p = vec![0.0; rows * cols];
            // SAFETY: live handle, rows×cols buffers.
            unsafe {
                assert_eq!(
                    elra_adapter_get_param_f64(h, which, p.as_mut_ptr(), rows, cols, cols),
                    ELRA_OK
                );
                let orig = p[i];
                p[i] = orig + hh;
                assert_eq!(
                    elra_adapter_set_param_f64(h, which, p.as_ptr(), rows, cols, cols),
                    ELRA_OK
                );
                let lp = loss(h, n, &x, k, &dy, d, lora);
                p[i] = orig - hh;
                assert_eq!(
                    elra_adapter_set_param_f64(h, which, p.as_ptr(), rows, cols, cols),
                    ELRA_OK
                );
                let lm = loss(h, n, &x, k, &dy, d, lora);
                p[i] = orig;
                assert_eq!(
                    elra_adapter_set_param_f64(h, which, p.as_ptr(), rows, cols, cols),
                    ELRA_OK
                );
                (lp - lm) / (2.0 * hh)
            }
        };
        for i in [0, ar * ac / 2, ar * ac - 1] {
            close(fd_param(0, ar, ac, i), da[i], "da");
        }
        if uses_b {
            for i in [0, br * bc - 1] {
                close(fd_param(1, br, bc, i), db[i], "db");
            }
        }
        if !lora {
            close(fd_param(2, 1, 1, 0), deta, "deta");
        }
        // Errors leave every output untouched.
        let mut dx2 = vec![7.0; n * k];
        let mut da2 = vec![7.0; ar * ac];
        let mut bad = dy.clone();
        bad[1] = f64::NAN;
        // SAFETY: buffers as above.
        let s = unsafe {
            elra_adapter_backward_f64(
                h,
                n,
                x.as_ptr(),
                k,
                bad.as_ptr(),
                d,
                dx2.as_mut_ptr(),
                k,
                da2.as_mut_ptr(),
                ac,
                dbp,
                bc.max(1),
                &mut deta,
            )
        };
        assert_eq!(s, ELRA_NON_FINITE);
        assert!(dx2.iter().chain(&da2).all(|&z| z == 7.0));
        // SAFETY: handle from create, destroyed once.
        unsafe { elra_adapter_destroy(h) };
    }
}

/// Destroying a handle (a finaliser may do it between a failing call and the read of its
/// message) leaves the thread's error text alone; the next call that can fail clears it.
#[test]
fn destroy_keeps_the_last_error_message() {
    let c = default_config(
        ElraVariant::ELRA_VARIANT_HYB,
        ElraDtype::ELRA_DTYPE_F64,
        4,
        3,
        2,
    );
    let w0 = vec![0.5; 12];
    let h = create(&c, &w0, 3);
    let other = create(&c, &w0, 3);
    let (mut rows, mut cols) = (0usize, 0usize);
    // SAFETY: a live handle and writable outputs; parameter 99 does not exist.
    let s = unsafe { elra_adapter_param_shape(h, 99, &mut rows, &mut cols) };
    assert_ne!(s, ELRA_OK);
    let message = last_error();
    assert!(!message.is_empty());
    // SAFETY: a live handle, not used afterwards; then NULL, which is allowed.
    unsafe {
        elra_adapter_destroy(other);
        elra_adapter_destroy(std::ptr::null_mut());
    }
    assert_eq!(last_error(), message);
    // SAFETY: a live handle and writable outputs.
    let s = unsafe { elra_adapter_param_shape(h, 0, &mut rows, &mut cols) };
    assert_eq!(s, ELRA_OK);
    assert_eq!(last_error(), "");
    // SAFETY: a live handle, not used afterwards.
    unsafe { elra_adapter_destroy(h) };
}
