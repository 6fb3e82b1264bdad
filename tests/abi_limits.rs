//! No input may abort the process (issue 28): requests whose size the caller controls are
//! reserved fallibly before any work (`ELRA_OUT_OF_MEMORY` or `ELRA_INVALID_ARGUMENT`, never an
//! abort), layouts are checked before anything is allocated, and finite inputs whose result
//! leaves the floating-point range give `ELRA_OVERFLOW`, never a silent `Inf`/`NaN`.
//!
//! The cases that aborted before run in a child process (this test binary run again on one
//! case), so that a regression shows up as a failed assertion on the child's exit status and
//! output instead of killing the test run.

use std::ffi::{c_char, c_void, CStr};
use std::process::Command;

use elra::adapter::{ElraConfig, ElraLayer, LoraConfig, LoraLayer, Variant};
use elra::capi::*;
use elra::ElraError;
use nalgebra::DMatrix;

const CHILD: &str = "ELRA_ABI_LIMITS_CASE";

fn last_error() -> String {
    let mut buf = vec![0 as c_char; 512];
    // SAFETY: a live buffer of 512 bytes.
    unsafe { elra_last_error_message(buf.as_mut_ptr(), buf.len()) };
    // SAFETY: NUL-terminated by the library.
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Runs one abort-prone case; prints `status <code>: <message>` for the parent to check.
fn run_case(case: &str) {
    let small = [0.0f64; 16];
    let mut out = [0.0f64; 16];
    let s = match case {
        // r = 2^32: r² elements overflow the address space — a layout error, nothing allocated.
        "expm_r_2_32" => unsafe_expm(1 << 32, &small, &mut out),
        // r = 2^62: the span overflows usize — a layout error, not a "capacity overflow" panic.
        "expm_r_2_62" => unsafe_expm(1 << 62, &small, &mut out),
        // r = 2^22: the layout fits the address space (2^47 bytes), the memory does not.
        "expm_r_2_22" => unsafe_expm(1 << 22, &small, &mut out),
        // d = k = 2^22: an f64 W0 of 2^47 bytes.
        "create_2_22" => create(1 << 22, &small),
        // d = k = 10^5: the 80 GB copy of the report (more than this machine has).
        "create_1e5" => create(100_000, &small),
        other => panic!("unknown case {other}"),
    };
    println!("\nstatus {}: {}", s as i32, last_error());
}

/// `elra_expm_f64` on one r×r matrix claimed to live at `z` (never read: the call must fail
/// before touching caller memory).
fn unsafe_expm(r: usize, z: &[f64], out: &mut [f64]) -> ElraStatus {
    // SAFETY: the library must refuse the layout or the allocation before reading `z` or
    // writing `out` (what this test checks); both are live buffers.
    unsafe { elra_expm_f64(1, r, z.as_ptr(), r, 0, out.as_mut_ptr(), r, 0) }
}

/// `elra_adapter_create` of a d×d ELRA adapter on a W0 claimed to live at `w0` (never read).
fn create(d: usize, w0: &[f64]) -> ElraStatus {
    let mut c = std::mem::MaybeUninit::<ElraAdapterConfig>::uninit();
    // SAFETY: `c` is writable.
    let s = unsafe { elra_adapter_config_default(2, 1, d, d, 4, 100, c.as_mut_ptr()) };
    assert_eq!(s, ElraStatus::ELRA_OK);
    // SAFETY: initialised by the call above.
    let c = unsafe { c.assume_init() };
    let mut h: *mut ElraAdapter = std::ptr::null_mut();
    // SAFETY: the library must refuse the allocation before reading W0.
    let s = unsafe { elra_adapter_create(&c, w0.as_ptr().cast::<c_void>(), d, &mut h) };
    if !h.is_null() {
        // SAFETY: a live handle.
        unsafe { elra_adapter_destroy(h) };
    }
    s
}

/// Runs `case` in a child process and returns its exit status and output.
fn child(case: &str) -> (Option<i32>, String) {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args(["--exact", "child_case", "--nocapture", "--test-threads=1"])
        .env(CHILD, case)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

/// The entry point of the child processes (does nothing in a normal test run).
#[test]
fn child_case() {
    if let Ok(case) = std::env::var(CHILD) {
        run_case(&case);
    }
}

#[test]
fn oversized_requests_return_a_status_in_a_child_process() {
    let oom = ElraStatus::ELRA_OUT_OF_MEMORY as i32;
    let invalid = ElraStatus::ELRA_INVALID_ARGUMENT as i32;
    let mut cases = vec![
        ("expm_r_2_32", invalid, "exceeds the address space"),
        ("expm_r_2_62", invalid, "exceeds the address space"),
        ("expm_r_2_22", oom, "out of memory"),
        ("create_2_22", oom, "out of memory"),
    ];
    // 80 GB is beyond this kind of machine (24 GiB, no swap); on a larger one the request is
    // legitimate and the case is skipped.
    let mem_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_string();
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(u64::MAX);
    if mem_kb < 60_000_000 {
        cases.push(("create_1e5", oom, "out of memory"));
    } else {
        println!("create_1e5 skipped: {mem_kb} kB of memory could hold the 80 GB W0");
    }
    for (case, want, msg) in cases {
        let (code, text) = child(case);
        assert_eq!(code, Some(0), "{case}: the child died: {text}");
        let line = text
            .lines()
            .find(|l| l.starts_with("status "))
            .unwrap_or_else(|| panic!("{case}: no status line in {text}"));
        assert!(
            line.starts_with(&format!("status {want}:")) && line.contains(msg),
            "{case}: {line}"
        );
    }
}

fn rows(m: &DMatrix<f64>) -> Vec<f64> {
    let mut v = Vec::with_capacity(m.len());
    for i in 0..m.nrows() {
        v.extend(m.row(i).iter());
    }
    v
}

/// Finite inputs with a non-finite result: the CPU layers, and the C ABI on top of them, report
/// an overflow (the rule of the matrix functions), never `Inf`/`NaN` with status OK.
#[test]
fn finite_inputs_with_an_overflowing_result_are_overflow_errors() {
    let (d, k, r, n) = (6, 5, 2, 3);
    let w0 = DMatrix::from_fn(d, k, |i, j| ((i + 2 * j) % 5) as f64 - 2.0);
    let big = DMatrix::from_element(n, k, 1e308);
    // ELRA: x = 1e308 entries overflow in x W0ᵀ.
    let elra = ElraLayer::new(ElraConfig::new(Variant::Hyb, d, k, r, 10), w0.clone()).unwrap();
    assert!(matches!(
        elra.forward(&big),
        Err(ElraError::Overflow { .. })
    ));
    // LoRA with lora_alpha = 1e308: the scaled update overflows.
    let mut cfg = LoraConfig::new(d, k, r);
    cfg.lora_alpha = 1e308;
    let mut lora = LoraLayer::new(cfg.clone(), w0.clone()).unwrap();
    lora.set_lora_b(DMatrix::from_element(d, r, 100.0)).unwrap();
    let x = DMatrix::from_element(n, k, 1.0);
    assert!(matches!(lora.forward(&x), Err(ElraError::Overflow { .. })));
    assert!(matches!(lora.merge(), Err(ElraError::Overflow { .. })));

    // The same through the C ABI, f64 and f32 handles.
    for dtype in [1u32, 0] {
        let mut c = std::mem::MaybeUninit::<ElraAdapterConfig>::uninit();
        // SAFETY: `c` is writable.
        let s = unsafe { elra_adapter_config_default(3, dtype, d, k, r, 10, c.as_mut_ptr()) };
        assert_eq!(s, ElraStatus::ELRA_OK);
        // SAFETY: initialised above.
        let mut c = unsafe { c.assume_init() };
        c.lora_alpha = if dtype == 1 { 1e308 } else { 1e38 };
        let mut h: *mut ElraAdapter = std::ptr::null_mut();
        let w = rows(&w0);
        let b = vec![100.0; d * r];
        let xs = vec![1.0; n * k];
        let mut y = vec![-7.0; n * d];
        let (w32, b32, x32): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            w.iter().map(|&v| v as f32).collect(),
            b.iter().map(|&v| v as f32).collect(),
            xs.iter().map(|&v| v as f32).collect(),
        );
        let mut y32 = vec![-7.0f32; n * d];
        // SAFETY: live buffers of the described shapes; `h` is used only after creation.
        let s = unsafe {
            if dtype == 1 {
                assert_eq!(
                    elra_adapter_create(&c, w.as_ptr().cast(), k, &mut h),
                    ElraStatus::ELRA_OK
                );
                assert_eq!(
                    elra_adapter_set_param_f64(h, 1, b.as_ptr(), d, r, r),
                    ElraStatus::ELRA_OK
                );
                elra_adapter_forward_f64(h, n, xs.as_ptr(), k, y.as_mut_ptr(), d)
            } else {
                assert_eq!(
                    elra_adapter_create(&c, w32.as_ptr().cast(), k, &mut h),
                    ElraStatus::ELRA_OK
                );
                assert_eq!(
                    elra_adapter_set_param_f32(h, 1, b32.as_ptr(), d, r, r),
                    ElraStatus::ELRA_OK
                );
                elra_adapter_forward_f32(h, n, x32.as_ptr(), k, y32.as_mut_ptr(), d)
            }
        };
        assert_eq!(
            s,
            ElraStatus::ELRA_OVERFLOW,
            "dtype {dtype}: {}",
            last_error()
        );
        assert!(last_error().contains("floating-point range"));
        assert!(y.iter().all(|&v| v == -7.0) && y32.iter().all(|&v| v == -7.0));
        // SAFETY: a live handle.
        unsafe { elra_adapter_destroy(h) };
    }
}
