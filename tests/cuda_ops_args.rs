//! The functional GPU calls `elra_gpu_op_*` (src/capi/gpu_ops.rs), host-side validation — no
//! GPU needed: every bad argument the library can see without a driver (NULL pointers, unknown
//! flags and dtypes, LoRA or a rank above the GPU limit, τ ≠ 0, a NULL, misaligned or aliased η,
//! `ld ≠ cols`, misalignment, an empty or overflowing batch, a short workspace, overlapping
//! outputs, a bias without the base) is a status with a message naming the argument, and a call
//! with valid arguments returns `ELRA_NO_DEVICE` without a driver (on a GPU machine the fake
//! pointers are then reported as not device memory). The GPU parity tests are in
//! tests/cuda_ops.rs.
#![allow(clippy::too_many_arguments)]

use std::ffi::{c_char, c_void};
use std::ptr::{null, null_mut};

use elra::capi::*;
use elra::cuda::cuda_available;

use ElraStatus::*;

fn message() -> String {
    let mut buf = vec![0 as c_char; 512];
    // SAFETY: a live local buffer of 512 bytes.
    unsafe { elra_last_error_message(buf.as_mut_ptr(), buf.len()) };
    // SAFETY: NUL-terminated within the buffer by the call.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn desc(variant: u32, d: usize, k: usize, r: usize) -> ElraOpDesc {
    ElraOpDesc { variant, d, k, r }
}

/// A step with α, the η multiplier and λ exact in f32 (the GPU takes them as f32), no clip.
fn step() -> ElraOpStep {
    ElraOpStep {
        alpha: 0.375,
        eta_mult: 0.875,
        tau: 0.0,
        lambda: 0.125,
    }
}

// ---------------------------------------------------------------------------------------------
// Host-side validation (no GPU)
// ---------------------------------------------------------------------------------------------

/// Distinct, 256-byte aligned fake device addresses 16 MiB apart (never dereferenced: every
/// call below fails before touching memory).
fn fake<T>(i: usize) -> *mut T {
    (0x1000_0000 + i * 0x100_0000) as *mut T
}

/// The arguments of `elra_gpu_op_forward`, valid for (d, k, r, n) = (8, 6, 2, 5), general ELRA.
#[derive(Clone, Copy)]
struct Fw {
    desc: ElraOpDesc,
    step: ElraOpStep,
    dtype: u32,
    n: usize,
    w0: *const c_void,
    ld_w0: usize,
    base: u32,
    bias: *const c_void,
    a: *const f32,
    ld_a: usize,
    b: *const f32,
    ld_b: usize,
    eta: *const f32,
    x: *const c_void,
    ld_x: usize,
    y: *mut c_void,
    ld_y: usize,
    saved: *mut f32,
    ws: *mut f32,
    ws_len: usize,
}

fn fw() -> Fw {
    Fw {
        desc: desc(0, 8, 6, 2),
        step: step(),
        dtype: 0,
        n: 5,
        w0: fake(0),
        ld_w0: 6,
        base: 1,
        bias: fake(1),
        a: fake(2),
        ld_a: 2,
        b: fake(3),
        ld_b: 8,
        eta: fake(14),
        x: fake(4),
        ld_x: 6,
        y: fake(5),
        ld_y: 8,
        saved: fake(6),
        ws: fake(7),
        ws_len: 1 << 16,
    }
}

impl Fw {
    fn call(&self) -> ElraStatus {
        // SAFETY: desc and step are live fields; the device pointers are never dereferenced on
        // these paths (validation fails first, or no device / not device memory).
        unsafe {
            elra_gpu_op_forward(
                &self.desc,
                &self.step,
                self.dtype,
                self.n,
                self.w0,
                self.ld_w0,
                self.base,
                self.bias,
                self.a,
                self.ld_a,
                self.b,
                self.ld_b,
                self.eta,
                self.x,
                self.ld_x,
                self.y,
                self.ld_y,
                self.saved,
                self.ws,
                self.ws_len,
                null_mut(),
            )
        }
    }
}

/// What a call with valid arguments returns on this machine with fake pointers.
fn valid_status() -> (ElraStatus, &'static str) {
    match cuda_available() {
        Ok(()) => (ELRA_INVALID_ARGUMENT, "device memory"),
        Err(_) => (ELRA_NO_DEVICE, ""),
    }
}

#[test]
fn gpu_op_bad_arguments_are_statuses_before_any_device_work() {
    let (ok_status, ok_needle) = valid_status();
    let s = fw().call();
    assert_eq!(s, ok_status, "{}", message());
    assert!(message().contains(ok_needle), "{}", message());
    let with = |f: &dyn Fn(&mut Fw)| {
        let mut a = fw();
        f(&mut a);
        a
    };
    let misaligned = (0x1000_0002usize) as *const f32;
    let cases: Vec<(Fw, ElraStatus, &str)> = vec![
        (with(&|a| a.desc.variant = 3), ELRA_INVALID_ARGUMENT, "LoRA"),
        (
            with(&|a| a.desc.variant = 9),
            ELRA_INVALID_ARGUMENT,
            "variant",
        ),
        (with(&|a| a.desc.r = 0), ELRA_INVALID_ARGUMENT, "r"),
        (with(&|a| a.desc.d = 0), ELRA_INVALID_ARGUMENT, "d"),
        (
            with(&|a| a.desc = desc(0, 100, 6, 65)),
            ELRA_INVALID_ARGUMENT,
            "ranks",
        ),
        (with(&|a| a.step.tau = 0.5), ELRA_INVALID_ARGUMENT, "tau"),
        (
            with(&|a| a.step.alpha = 2.0),
            ELRA_INVALID_ARGUMENT,
            "alpha",
        ),
        (
            with(&|a| a.step.eta_mult = 0.0),
            ELRA_INVALID_ARGUMENT,
            "eta_mult",
        ),
        // η is a device scalar: NULL, misaligned, or overlapping an output.
        (with(&|a| a.eta = null()), ELRA_NULL_POINTER, "eta"),
        (
            with(&|a| a.eta = (fake::<u8>(14) as usize + 2) as *const f32),
            ELRA_INVALID_ARGUMENT,
            "eta",
        ),
        (
            with(&|a| a.eta = a.saved.cast_const()),
            ELRA_INVALID_ARGUMENT,
            "eta",
        ),
        (with(&|a| a.dtype = 1), ELRA_INVALID_ARGUMENT, "f64"),
        (
            with(&|a| a.dtype = 7),
            ELRA_INVALID_ARGUMENT,
            "ElraGpuDtype",
        ),
        (with(&|a| a.base = 2), ELRA_INVALID_ARGUMENT, "base"),
        (with(&|a| a.base = 0), ELRA_INVALID_ARGUMENT, "bias"),
        (with(&|a| a.n = 0), ELRA_INVALID_ARGUMENT, "empty"),
        (with(&|a| a.n = usize::MAX / 2), ELRA_INVALID_ARGUMENT, "n"),
        (with(&|a| a.w0 = null()), ELRA_NULL_POINTER, "w0"),
        (with(&|a| a.x = null()), ELRA_NULL_POINTER, "x"),
        (with(&|a| a.y = null_mut()), ELRA_NULL_POINTER, "y"),
        (with(&|a| a.a = null()), ELRA_NULL_POINTER, "a"),
        (with(&|a| a.b = null()), ELRA_NULL_POINTER, "b"),
        (with(&|a| a.saved = null_mut()), ELRA_NULL_POINTER, "saved"),
        (with(&|a| a.ws = null_mut()), ELRA_NULL_POINTER, "workspace"),
        (with(&|a| a.ld_x = 7), ELRA_INVALID_ARGUMENT, "contiguous"),
        (with(&|a| a.ld_a = 3), ELRA_INVALID_ARGUMENT, "contiguous"),
        (
            with(&|a| a.a = misaligned),
            ELRA_INVALID_ARGUMENT,
            "aligned",
        ),
        (
            with(&|a| a.x = misaligned.cast()),
            ELRA_INVALID_ARGUMENT,
            "aligned",
        ),
        (
            with(&|a| a.ws_len = 10),
            ELRA_INVALID_ARGUMENT,
            "workspace_len",
        ),
        (with(&|a| a.ws_len = 0), ELRA_INVALID_ARGUMENT, "workspace"),
        (
            with(&|a| a.y = a.x.cast_mut()),
            ELRA_INVALID_ARGUMENT,
            "overlaps",
        ),
        (with(&|a| a.saved = a.ws), ELRA_INVALID_ARGUMENT, "overlaps"),
        (
            with(&|a| a.ws = a.a.cast_mut().wrapping_add(2)),
            ELRA_INVALID_ARGUMENT,
            "overlaps",
        ),
        (
            with(&|a| a.y = a.bias.cast_mut()),
            ELRA_INVALID_ARGUMENT,
            "overlaps",
        ),
    ];
    for (i, (args, want, needle)) in cases.into_iter().enumerate() {
        let s = args.call();
        let m = message();
        assert_eq!(s, want, "case {i}: {m}");
        assert!(
            m.contains(needle),
            "case {i}: `{m}` should mention `{needle}`"
        );
    }
    // PSD ignores `b` (NULL is fine); bf16 needs only 2-byte alignment; no bias with base = 0.
    for a in [
        with(&|a| {
            a.desc.variant = 1;
            a.b = null();
        }),
        with(&|a| {
            a.dtype = 3;
            a.x = (0x1000_0002usize) as *const c_void;
            a.ld_x = 6;
        }),
        with(&|a| {
            a.base = 0;
            a.bias = null();
        }),
    ] {
        assert_eq!(a.call(), ok_status, "{}", message());
    }
    // NULL descriptor and step.
    // SAFETY: the NULL descriptor / step is the checked case; nothing else is read.
    let s = unsafe {
        let a = fw();
        elra_gpu_op_forward(
            null(),
            &a.step,
            0,
            5,
            a.w0,
            6,
            1,
            a.bias,
            a.a,
            2,
            a.b,
            8,
            fake(14),
            a.x,
            6,
            a.y,
            8,
            a.saved,
            a.ws,
            a.ws_len,
            null_mut(),
        )
    };
    assert_eq!(s, ELRA_NULL_POINTER);
    assert!(message().contains("desc"));
    // SAFETY: as above.
    let s = unsafe {
        let a = fw();
        elra_gpu_op_forward(
            &a.desc,
            null(),
            0,
            5,
            a.w0,
            6,
            1,
            a.bias,
            a.a,
            2,
            a.b,
            8,
            fake(14),
            a.x,
            6,
            a.y,
            8,
            a.saved,
            a.ws,
            a.ws_len,
            null_mut(),
        )
    };
    assert_eq!(s, ELRA_NULL_POINTER);
    assert!(message().contains("step"));
}

#[test]
fn gpu_op_sizes_and_the_other_exports_validate_on_the_host() {
    let (ok_status, ok_needle) = valid_status();
    let d8 = desc(0, 8, 6, 2);
    let st = step();
    let (mut sl, mut wl) = (0usize, 0usize);
    // SAFETY: live locals.
    assert_eq!(
        unsafe { elra_gpu_op_sizes(&d8, 5, &mut sl, &mut wl) },
        ELRA_OK
    );
    assert_eq!(sl, 5 * 2 + 2 * 2 * 2, "saved = N·r + 2r², as elra_op_sizes");
    assert!(wl >= 3 * 5 * 2 + 24 * 2 * 2, "workspace {wl}");
    // SAFETY: live locals / the checked NULL outputs.
    unsafe {
        assert_eq!(
            elra_gpu_op_sizes(&d8, 0, &mut sl, &mut wl),
            ELRA_INVALID_ARGUMENT
        );
        assert_eq!(
            elra_gpu_op_sizes(null(), 5, &mut sl, &mut wl),
            ELRA_NULL_POINTER
        );
        assert_eq!(
            elra_gpu_op_sizes(&d8, 5, null_mut(), &mut wl),
            ELRA_NULL_POINTER
        );
        let big = desc(0, 100, 6, 65);
        assert_eq!(
            elra_gpu_op_sizes(&big, 5, &mut sl, &mut wl),
            ELRA_INVALID_ARGUMENT
        );
        let lora = desc(3, 8, 6, 2);
        assert_eq!(
            elra_gpu_op_sizes(&lora, 5, &mut sl, &mut wl),
            ELRA_INVALID_ARGUMENT
        );
    }
    let ws = 1usize << 16;
    let f = |i| fake::<f32>(i);
    let v = |i| fake::<c_void>(i);
    type Call<'a> = Box<dyn Fn(u32, u32, *const f32, usize) -> ElraStatus + 'a>;
    // (name, call(flag_a, flag_b, eta, workspace_len)) for the exports other than forward.
    let calls: Vec<(&str, Call)> = vec![
        (
            "backward",
            Box::new(|fa, fb, eta, wsl| {
                // SAFETY: fake device pointers, never dereferenced on these paths.
                unsafe {
                    elra_gpu_op_backward(
                        &d8,
                        &st,
                        0,
                        5,
                        v(0),
                        6,
                        fa,
                        f(2),
                        2,
                        f(3),
                        8,
                        eta,
                        v(4),
                        6,
                        f(6),
                        v(8),
                        8,
                        v(9),
                        6,
                        f(10),
                        2,
                        f(11),
                        8,
                        f(12),
                        fb,
                        f(7),
                        wsl,
                        null_mut(),
                    )
                }
            }),
        ),
        (
            "forward_out",
            Box::new(|_, _, eta, wsl| {
                // SAFETY: as above.
                unsafe {
                    elra_gpu_op_forward_out(
                        &d8,
                        &st,
                        2,
                        5,
                        f(2),
                        2,
                        f(3),
                        8,
                        eta,
                        v(4),
                        8,
                        v(5),
                        8,
                        f(6),
                        f(7),
                        wsl,
                        null_mut(),
                    )
                }
            }),
        ),
        (
            "backward_out",
            Box::new(|fa, _, eta, wsl| {
                // SAFETY: as above.
                unsafe {
                    elra_gpu_op_backward_out(
                        &d8,
                        &st,
                        3,
                        5,
                        f(2),
                        2,
                        f(3),
                        8,
                        eta,
                        v(4),
                        8,
                        f(6),
                        v(8),
                        8,
                        v(9),
                        8,
                        f(10),
                        2,
                        f(11),
                        8,
                        f(12),
                        fa,
                        f(7),
                        wsl,
                        null_mut(),
                    )
                }
            }),
        ),
        (
            "merge",
            Box::new(|fa, fb, eta, wsl| {
                // SAFETY: as above.
                unsafe {
                    elra_gpu_op_merge(
                        &d8,
                        &st,
                        0,
                        f(2),
                        2,
                        f(3),
                        8,
                        eta,
                        v(0),
                        6,
                        fa,
                        fb,
                        v(5),
                        6,
                        f(7),
                        wsl,
                        null_mut(),
                    )
                }
            }),
        ),
        (
            "energy",
            Box::new(|fa, _, eta, wsl| {
                // SAFETY: as above.
                unsafe {
                    elra_gpu_op_energy(
                        &d8,
                        &st,
                        f(2),
                        2,
                        f(3),
                        8,
                        eta,
                        f(13),
                        f(10),
                        2,
                        f(11),
                        8,
                        f(12),
                        fa,
                        f(7),
                        wsl,
                        null_mut(),
                    )
                }
            }),
        ),
    ];
    for (name, call) in &calls {
        // Valid → no device / not device memory.
        assert_eq!(call(0, 0, f(14), ws), ok_status, "{name}: {}", message());
        assert!(message().contains(ok_needle), "{name}: {}", message());
        assert_eq!(call(1, 0, f(14), ws), ok_status, "{name}: {}", message());
        // Flags (the first: base, accumulate or inverse; the second: accumulate or right), η
        // and the workspace are statuses.
        if *name != "forward_out" {
            assert_eq!(call(2, 0, f(14), ws), ELRA_INVALID_ARGUMENT, "{name}");
        }
        if *name == "backward" || *name == "merge" {
            assert_eq!(call(0, 5, f(14), ws), ELRA_INVALID_ARGUMENT, "{name}");
        }
        if *name == "backward" {
            assert_eq!(call(1, 1, f(14), ws), ok_status, "{name}: {}", message());
        }
        assert_eq!(call(0, 0, null(), ws), ELRA_NULL_POINTER, "{name}");
        assert!(message().contains("eta"), "{name}: {}", message());
        let odd = (fake::<u8>(14) as usize + 2) as *const f32;
        assert_eq!(call(0, 0, odd, ws), ELRA_INVALID_ARGUMENT, "{name}");
        assert!(message().contains("eta"), "{name}: {}", message());
        assert_eq!(call(0, 0, f(14), 3), ELRA_INVALID_ARGUMENT, "{name}");
        assert!(message().contains("workspace"), "{name}: {}", message());
    }
    // Outputs overlapping inputs; NULL gradients; energy without gradients.
    // SAFETY: fake device pointers, never dereferenced on these paths.
    unsafe {
        let s = elra_gpu_op_backward(
            &d8,
            &st,
            0,
            5,
            v(0),
            6,
            1,
            f(2),
            2,
            f(3),
            8,
            fake(14),
            v(4),
            6,
            f(6),
            v(8),
            8,
            v(4),
            6,
            f(10),
            2,
            f(11),
            8,
            f(12),
            0,
            f(7),
            ws,
            null_mut(),
        );
        assert_eq!(s, ELRA_INVALID_ARGUMENT);
        assert!(message().contains("overlaps"), "{}", message());
        let s = elra_gpu_op_backward(
            &d8,
            &st,
            0,
            5,
            v(0),
            6,
            1,
            f(2),
            2,
            f(3),
            8,
            fake(14),
            v(4),
            6,
            f(6),
            v(8),
            8,
            v(9),
            6,
            f(10),
            2,
            f(10),
            8,
            f(12),
            0,
            f(7),
            ws,
            null_mut(),
        );
        assert_eq!(s, ELRA_INVALID_ARGUMENT, "da = db");
        let s = elra_gpu_op_backward(
            &d8,
            &st,
            0,
            5,
            v(0),
            6,
            1,
            f(2),
            2,
            f(3),
            8,
            fake(14),
            v(4),
            6,
            f(6),
            v(8),
            8,
            v(9),
            6,
            f(10),
            2,
            f(11),
            8,
            null_mut(),
            0,
            f(7),
            ws,
            null_mut(),
        );
        assert_eq!(s, ELRA_NULL_POINTER);
        assert!(message().contains("deta"));
        let s = elra_gpu_op_merge(
            &d8,
            &st,
            0,
            f(2),
            2,
            f(3),
            8,
            fake(14),
            v(0),
            6,
            0,
            0,
            v(0),
            6,
            f(7),
            ws,
            null_mut(),
        );
        assert_eq!(s, ELRA_INVALID_ARGUMENT, "out = w");
        // right = 1: w and out are k×d (ld = d).
        let s = elra_gpu_op_merge(
            &d8,
            &st,
            0,
            f(2),
            2,
            f(3),
            8,
            fake(14),
            v(0),
            6,
            0,
            1,
            v(5),
            6,
            f(7),
            ws,
            null_mut(),
        );
        assert_eq!(s, ELRA_INVALID_ARGUMENT, "right merge with ld = k");
        let s = elra_gpu_op_merge(
            &d8,
            &st,
            0,
            f(2),
            2,
            f(3),
            8,
            fake(14),
            v(0),
            8,
            0,
            1,
            v(5),
            8,
            f(7),
            ws,
            null_mut(),
        );
        assert_eq!(s, ok_status, "{}", message());
        let s = elra_gpu_op_energy(
            &d8,
            &st,
            f(2),
            2,
            f(3),
            8,
            fake(14),
            f(13),
            null_mut(),
            0,
            null_mut(),
            0,
            null_mut(),
            0,
            f(7),
            ws,
            null_mut(),
        );
        assert_eq!(s, ok_status, "{}", message());
        let s = elra_gpu_op_energy(
            &d8,
            &st,
            f(2),
            2,
            f(3),
            8,
            fake(14),
            null_mut(),
            null_mut(),
            0,
            null_mut(),
            0,
            null_mut(),
            0,
            f(7),
            ws,
            null_mut(),
        );
        assert_eq!(s, ELRA_NULL_POINTER);
        let s = elra_gpu_op_energy(
            &d8,
            &st,
            f(2),
            2,
            f(3),
            8,
            fake(14),
            f(2),
            null_mut(),
            0,
            null_mut(),
            0,
            null_mut(),
            0,
            f(7),
            ws,
            null_mut(),
        );
        assert_eq!(s, ELRA_INVALID_ARGUMENT, "energy overlaps a");
    }
}

/// `elra_gpu_check_finite`, the GPU form of the overflow rule: every argument it can check on the
/// host is a status naming the argument; valid arguments (strided `ld > cols` included) reach the
/// driver (`ELRA_NO_DEVICE` here, not device memory on a GPU machine).
#[test]
fn gpu_check_finite_validates_on_the_host() {
    let (ok_status, ok_needle) = valid_status();
    let x = fake::<c_void>(0);
    let flag = fake::<u32>(1);
    let call = |dtype: u32, x: *const c_void, (rows, cols, ld): (usize, usize, usize), flag| {
        // SAFETY: fake device pointers, never dereferenced on these paths.
        let s = unsafe { elra_gpu_check_finite(dtype, x, rows, cols, ld, flag, null_mut()) };
        (s, message())
    };
    for dtype in [0, 2, 3] {
        for dims in [(5, 8, 8), (5, 8, 13), (1, 1, 1), (1, 3, 1 << 20)] {
            let (s, m) = call(dtype, x, dims, flag);
            assert_eq!(s, ok_status, "{m}");
            assert!(m.contains(ok_needle), "{m}");
        }
    }
    let misaligned = (0x1000_0002usize) as *const c_void;
    let cases: Vec<((ElraStatus, String), &str, ElraStatus)> = vec![
        (call(0, null(), (5, 8, 8), flag), "`x`", ELRA_NULL_POINTER),
        (
            call(0, x, (5, 8, 8), null_mut()),
            "`flag`",
            ELRA_NULL_POINTER,
        ),
        (call(1, x, (5, 8, 8), flag), "f64", ELRA_INVALID_ARGUMENT),
        (
            call(9, x, (5, 8, 8), flag),
            "ElraGpuDtype",
            ELRA_INVALID_ARGUMENT,
        ),
        (call(0, x, (0, 8, 8), flag), "zero", ELRA_INVALID_ARGUMENT),
        (call(0, x, (5, 0, 8), flag), "zero", ELRA_INVALID_ARGUMENT),
        (
            call(0, x, (5, 8, 7), flag),
            "leading dimension",
            ELRA_INVALID_ARGUMENT,
        ),
        (
            call(0, misaligned, (5, 8, 8), flag),
            "aligned",
            ELRA_INVALID_ARGUMENT,
        ),
        (
            call(0, x, (5, 8, 8), (0x2000_0002usize) as *mut u32),
            "aligned",
            ELRA_INVALID_ARGUMENT,
        ),
        (
            call(0, x, (usize::MAX / 8, 8, 8), flag),
            "address space",
            ELRA_INVALID_ARGUMENT,
        ),
        (
            call(0, x, (3, 8, usize::MAX / 2), flag),
            "address space",
            ELRA_INVALID_ARGUMENT,
        ),
        // The flag inside x (the last entry of row 4), and the flag right after x (accepted).
        (
            call(0, x, (5, 8, 8), x.wrapping_byte_add(4 * 39).cast()),
            "overlaps",
            ELRA_INVALID_ARGUMENT,
        ),
    ];
    for (i, ((s, m), needle, want)) in cases.into_iter().enumerate() {
        assert_eq!(s, want, "case {i}: {m}");
        assert!(
            m.contains(needle),
            "case {i}: `{m}` should mention `{needle}`"
        );
    }
    let after = x.wrapping_byte_add(4 * 40).cast();
    let (s, m) = call(0, x, (5, 8, 8), after);
    assert_eq!(s, ok_status, "{m}");
    // bf16 needs only 2-byte alignment.
    let (s, m) = call(3, misaligned, (5, 8, 8), flag);
    assert_eq!(s, ok_status, "{m}");
}

/// `elra_gpu_op_multi_sizes` / `elra_gpu_op_multi_forward`: bad descriptions (unknown variant,
/// rank 0 or above the GPU limit, τ ≠ 0, NULL list, too many adapters), a NULL or aliased
/// buffer and a short workspace are statuses naming the problem; valid arguments reach the
/// device check.
#[test]
fn gpu_multi_forward_validates_on_the_host() {
    let (ok_status, ok_needle) = valid_status();
    let (n, d, k) = (5usize, 8usize, 6usize);
    let elra = |i: usize| ElraGpuMultiAdapter {
        variant: 0,
        r: 2,
        a: fake::<f32>(10 + 3 * i),
        ld_a: 2,
        b: fake::<f32>(11 + 3 * i),
        ld_b: d,
        eta: fake::<f32>(12 + 3 * i),
        scale: 0.0,
        step: step(),
    };
    let lora = ElraGpuMultiAdapter {
        variant: 3,
        r: 2,
        a: fake::<f32>(40),
        ld_a: k,
        b: fake::<f32>(41),
        ld_b: 2,
        eta: null(),
        scale: 0.5,
        step: step(),
    };
    let good = vec![elra(0), lora, elra(1)];
    let mut wl = 0usize;
    // SAFETY: live locals.
    assert_eq!(
        unsafe { elra_gpu_op_multi_sizes(good.as_ptr(), good.len(), n, d, &mut wl) },
        ELRA_OK
    );
    assert!(wl >= 2 * 3 + n + 2 * d * 2 + 3 * 2 * 4, "workspace {wl}");
    let call = |ads: &[ElraGpuMultiAdapter], ws_len: usize, y: *mut c_void| {
        // SAFETY: fake device addresses: every call below fails before touching memory, or at
        // the device check without a driver.
        unsafe {
            elra_gpu_op_multi_forward(
                0,
                ads.as_ptr(),
                ads.len(),
                fake::<i32>(1),
                n,
                fake::<c_void>(2),
                k,
                d,
                k,
                null(),
                fake::<c_void>(3),
                k,
                y,
                d,
                fake::<f32>(5),
                ws_len,
                null_mut(),
            )
        }
    };
    let (s, m) = (call(&good, wl, fake(4)), message());
    assert_eq!(s, ok_status, "{m}");
    assert!(m.contains(ok_needle), "{m}");
    let mut bad = good.clone();
    bad[1].variant = 7;
    assert_eq!(call(&bad, wl, fake(4)), ELRA_INVALID_ARGUMENT);
    assert!(message().contains("adapter 1"), "{}", message());
    for r in [0usize, 65] {
        let mut bad = good.clone();
        bad[2].r = r;
        assert_eq!(call(&bad, wl, fake(4)), ELRA_INVALID_ARGUMENT, "r = {r}");
        assert!(message().contains("adapter 2"), "{}", message());
    }
    let mut bad = good.clone();
    bad[0].step.tau = 2.0;
    assert_eq!(call(&bad, wl, fake(4)), ELRA_INVALID_ARGUMENT);
    assert!(message().contains("adapter 0"), "{}", message());
    let mut bad = good.clone();
    bad[0].eta = null();
    assert_eq!(call(&bad, wl, fake(4)), ELRA_NULL_POINTER);
    assert_eq!(call(&good, wl - 1, fake(4)), ELRA_INVALID_ARGUMENT);
    assert!(message().contains("workspace_len"), "{}", message());
    // y over x.
    assert_eq!(call(&good, wl, fake(3)), ELRA_INVALID_ARGUMENT);
    assert!(message().contains("overlaps"), "{}", message());
    // SAFETY: NULL list with a count; too many adapters (the list is not read past the check).
    unsafe {
        assert_eq!(
            elra_gpu_op_multi_sizes(null(), 2, n, d, &mut wl),
            ELRA_NULL_POINTER
        );
        assert_eq!(
            elra_gpu_op_multi_sizes(good.as_ptr(), 5000, n, d, &mut wl),
            ELRA_INVALID_ARGUMENT
        );
    }
}
