//! A self-checking driver of the matrix-function exports for fuzzing (`fuzz/fuzz_targets/
//! abi_args.rs`) and for the unit tests below: it decodes an argument tuple from bytes, calls the
//! export on buffers it owns, and panics if the library breaks the ABI contract of the
//! [module docs](super).

use super::*;
use crate::linalg::MatFnBatch;

/// Byte reader that yields zeros once the input is exhausted.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn f64(&mut self) -> f64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.u8();
        }
        // Mostly moderate values, sometimes raw bit patterns (NaN, Inf, huge, subnormal).
        if b[7] & 0xC0 == 0xC0 {
            match b[6] % 4 {
                0 => f64::NAN,
                1 => f64::INFINITY,
                2 => f64::NEG_INFINITY,
                _ => f64::from_le_bytes(b),
            }
        } else {
            (i16::from_le_bytes([b[0], b[1]]) as f64) / 4096.0
        }
    }
}

/// The span in elements that the documented contract lets the library touch, computed
/// independently of [`Layout::check`] in 128-bit arithmetic; `None` when the arguments are
/// invalid (zero dimension, `ld < cols`, overlapping stride, span beyond `isize::MAX` bytes).
fn contract_span(batch: usize, r: usize, ld: usize, stride: usize, elem: usize) -> Option<usize> {
    if batch == 0 || r == 0 || ld < r {
        return None;
    }
    let one = (r as u128 - 1) * ld as u128 + r as u128;
    if batch > 1 && (stride as u128) < one {
        return None;
    }
    let total = if batch > 1 {
        (batch as u128 - 1) * stride as u128 + one
    } else {
        one
    };
    (total * elem as u128 <= isize::MAX as u128).then_some(total as usize)
}

/// Whether element `k` of a buffer laid out as `(batch, r, ld, stride)` belongs to a matrix.
fn described(k: usize, batch: usize, r: usize, ld: usize, stride: usize) -> bool {
    let (b, rem) = if batch > 1 && stride > 0 {
        (k / stride, k % stride)
    } else {
        (0, k)
    };
    b < batch && rem / ld < r && rem % ld < r
}

const SENTINEL: f64 = -31337.0;

/// Decodes one call from `data`, runs it and checks the contract: no panic status, no write
/// outside the described entries, outputs untouched on error, invalid arguments always rejected,
/// and on success the result equal bit for bit to [`MatFnBatch`] on a packed copy.
/// Returns the status of the call.
#[doc(hidden)]
pub fn abi_fuzz_one(data: &[u8]) -> ElraStatus {
    let mut s = Bytes(data);
    let op = s.u8() % 5;
    let flags = s.u8();
    let mut batch = (s.u8() % 5) as usize;
    let mut r = (s.u8() % 6) as usize;
    // Sometimes a huge r (2^27 … 2^30): the layout fits `isize::MAX` bytes but no machine's
    // address space (≥ 2^57 bytes), so the call must fail before touching memory — a layout
    // error or OUT_OF_MEMORY from the fallible reservation, never an abort.
    let huge = flags & 128 != 0 && flags & 16 == 0;
    if huge {
        r = (1 << 27) + ((s.u8() as usize) << 21) * 3;
        batch = 1 + (s.u8() % 2) as usize;
    }
    let mut ldz = r + (s.u8() % 4) as usize;
    ldz = ldz.saturating_sub((flags & 1) as usize); // sometimes ld < r
    let ldo = r.max(1) + (s.u8() % 3) as usize;
    let span_z = r.saturating_sub(1) * ldz + r;
    let span_o = r.saturating_sub(1) * ldo + r;
    let mut stride_z = span_z + (s.u8() % 4) as usize;
    let stride_o = span_o + (s.u8() % 3) as usize;
    if flags & 2 != 0 {
        stride_z = stride_z.saturating_sub(1 + (s.u8() % 3) as usize); // overlap
    }
    if flags & 4 != 0 {
        batch = usize::MAX / (s.u8() as usize + 1); // span overflow
    }
    let null_z = flags & 8 != 0 && flags & 16 != 0;
    let null_o = flags & 32 != 0 && flags & 64 != 0;

    let valid_z = contract_span(batch, r, ldz, stride_z, 8);
    let valid_o = contract_span(batch, r, ldo, stride_o, 8);
    let expect_ok_args = valid_z.is_some() && valid_o.is_some() && !null_z && !null_o;
    // Buffers: the contract span when valid, else a small buffer (the library must not touch it).
    let len_z = valid_z.filter(|&n| n <= 4096).unwrap_or(8);
    let len_o = valid_o.filter(|&n| n <= 4096).unwrap_or(8);
    let oversized = expect_ok_args && huge;
    if expect_ok_args
        && !oversized
        && (len_z != valid_z.unwrap_or(0) || len_o != valid_o.unwrap_or(0))
    {
        return ELRA_OK; // a valid call on memory we did not allocate would break the caller's side
    }
    let z: Vec<f64> = (0..len_z).map(|_| s.f64()).collect();
    let g: Vec<f64> = (0..len_z).map(|_| s.f64()).collect();
    let mut out = vec![SENTINEL; len_o];
    let mut out2 = vec![SENTINEL; len_o];
    let zp = if null_z { std::ptr::null() } else { z.as_ptr() };
    let op_ = if null_o {
        std::ptr::null_mut()
    } else {
        out.as_mut_ptr()
    };
    // SAFETY: when the arguments are valid and not oversized the buffers are exactly the
    // contract span; when they are invalid or oversized (a span beyond any address space), the
    // library must reject them before touching memory (that is what is checked).
    let status = unsafe {
        match op {
            0 => elra_expm_f64(batch, r, zp, ldz, stride_z, op_, ldo, stride_o),
            1 => elra_phi1_f64(batch, r, zp, ldz, stride_z, op_, ldo, stride_o),
            2 => elra_expm_phi1_f64(
                batch,
                r,
                zp,
                ldz,
                stride_z,
                op_,
                ldo,
                stride_o,
                out2.as_mut_ptr(),
                ldo,
                stride_o,
            ),
            3 => elra_expm_frechet_adjoint_f64(
                batch,
                r,
                zp,
                ldz,
                stride_z,
                g.as_ptr(),
                ldz,
                stride_z,
                op_,
                ldo,
                stride_o,
            ),
            _ => elra_phi1_frechet_adjoint_f64(
                batch,
                r,
                zp,
                ldz,
                stride_z,
                g.as_ptr(),
                ldz,
                stride_z,
                op_,
                ldo,
                stride_o,
            ),
        }
    };
    assert_ne!(status, ElraStatus::ELRA_PANIC, "panic inside the library");
    if oversized {
        assert!(
            matches!(
                status,
                ElraStatus::ELRA_INVALID_ARGUMENT | ElraStatus::ELRA_OUT_OF_MEMORY
            ),
            "an r = {r} request beyond any address space: status {status:?}"
        );
    }
    if !expect_ok_args {
        assert!(
            matches!(
                status,
                ElraStatus::ELRA_NULL_POINTER | ElraStatus::ELRA_INVALID_ARGUMENT
            ),
            "invalid arguments accepted: status {status:?}"
        );
    }
    if status != ELRA_OK {
        assert!(
            out.iter().chain(&out2).all(|&x| x == SENTINEL),
            "output written on error {status:?}"
        );
        return status;
    }
    assert!(expect_ok_args);
    // Gaps untouched; results equal to the batch kernel on packed copies.
    let pack = |v: &[f64], ld: usize, st: usize| -> Vec<f64> {
        let mut p = Vec::with_capacity(batch * r * r);
        for b in 0..batch {
            for i in 0..r {
                p.extend_from_slice(&v[b * st + i * ld..][..r]);
            }
        }
        p
    };
    for (k, (&a, &b)) in out.iter().zip(&out2).enumerate() {
        if !described(k, batch, r, ldo, stride_o) {
            assert!(a == SENTINEL && b == SENTINEL, "gap entry {k} written");
        }
    }
    let zp = pack(&z, ldz, stride_z);
    let gp = pack(&g, ldz, stride_z);
    let mut w = MatFnBatch::<f64>::new(r).expect("r ≥ 1 on success");
    let mut want = vec![0.0; zp.len()];
    let mut want2 = vec![0.0; zp.len()];
    match op {
        0 => w.expm(&zp, &mut want),
        1 => w.phi1(&zp, &mut want),
        2 => w.expm_phi1(&zp, &mut want, &mut want2),
        3 => w.expm_frechet_adjoint(&zp, &gp, &mut want),
        _ => w.phi1_frechet_adjoint(&zp, &gp, &mut want),
    }
    .expect("the export succeeded on the same input");
    let same = |x: &[f64], y: &[f64]| x.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(
        same(&pack(&out, ldo, stride_o), &want),
        "result differs from MatFnBatch"
    );
    if op == 2 {
        assert!(same(&pack(&out2, ldo, stride_o), &want2));
    }
    status
}

/// A call on an adapter handle whose outputs may be checked for "untouched on error".
fn untouched(out: &[f64]) -> bool {
    out.iter().all(|&x| x == SENTINEL)
}

/// Decodes an adapter configuration and a sequence of calls from `data` and runs them on one
/// f64 handle: creation (with huge dimensions sometimes, which must fail with a status before
/// the weight is read), step, parameters of the right or a wrong shape, forward, backward,
/// merge, unmerge, energy. Checks: no call panics; outputs are untouched on error and finite on
/// success; an oversized request is `ELRA_OUT_OF_MEMORY` or `ELRA_INVALID_ARGUMENT`. Returns the
/// status of the creation.
#[doc(hidden)]
pub fn adapter_fuzz_one(data: &[u8]) -> ElraStatus {
    let mut s = Bytes(data);
    let flags = s.u8();
    let small = |b: u8| (b % 7) as usize;
    let (mut d, mut k, r, n) = (
        small(s.u8()),
        small(s.u8()),
        small(s.u8()),
        small(s.u8()) + 1,
    );
    // Sometimes a W0 beyond any address space (2^27 … rows, 2^57+ bytes): refused unread.
    let huge = flags & 3 == 3;
    if huge {
        d = (1 << 27) + s.u8() as usize;
        k = d + s.u8() as usize;
    }
    let cfg = ElraAdapterConfig {
        variant: (s.u8() % 5) as u32,
        dtype: 1,
        d,
        k,
        r,
        eta: s.f64(),
        lambda: s.f64().abs() * 1e-3,
        tau: if flags & 4 != 0 { s.f64().abs() } else { 0.0 },
        schedule: (s.u8() % 5) as u32,
        warmup_steps: s.u8() as usize,
        gamma: s.f64(),
        alpha: s.f64(),
        eta_multiplier: (s.u8() % 3) as u32,
        total_steps: s.u8() as usize,
        seed: s.u8() as u64,
        lora_alpha: s.f64() * 1e3,
    };
    let w0: Vec<f64> = if huge {
        vec![0.0; 8]
    } else {
        (0..d * k).map(|_| s.f64()).collect()
    };
    let mut h: *mut ElraAdapter = std::ptr::null_mut();
    // SAFETY: `cfg` and `h` are live locals; `w0` covers d×k with ld = k when not huge, and a
    // huge request must be refused before `w0` is read (what is checked).
    let st = unsafe { elra_adapter_create(&cfg, w0.as_ptr().cast(), k, &mut h) };
    assert_ne!(st, ElraStatus::ELRA_PANIC, "panic in create");
    if huge {
        assert!(
            matches!(
                st,
                ElraStatus::ELRA_OUT_OF_MEMORY | ElraStatus::ELRA_INVALID_ARGUMENT
            ),
            "a {d}×{k} W0 was not refused: {st:?}"
        );
    }
    if st != ELRA_OK {
        assert!(h.is_null(), "handle returned on error");
        return st;
    }
    let x: Vec<f64> = (0..n * k).map(|_| s.f64()).collect();
    let dy: Vec<f64> = (0..n * d).map(|_| s.f64()).collect();
    let check = |st: ElraStatus, outs: &[&[f64]], what: &str| {
        assert_ne!(st, ElraStatus::ELRA_PANIC, "panic in {what}");
        for o in outs {
            if st == ELRA_OK {
                assert!(o.iter().all(|v| v.is_finite()), "non-finite {what} output");
            } else {
                assert!(untouched(o), "{what} wrote on error {st:?}");
            }
        }
    };
    for _ in 0..(s.u8() % 4) {
        // SAFETY: every buffer below is a live local of the size passed with it.
        unsafe {
            match s.u8() % 7 {
                0 => check(elra_adapter_set_step(h, s.u8() as usize), &[], "set_step"),
                1 => {
                    let which = (s.u8() % 5) as u32;
                    let (rows, cols) = (small(s.u8()) + 1, small(s.u8()) + 1);
                    let v: Vec<f64> = (0..rows * cols).map(|_| s.f64()).collect();
                    let st = elra_adapter_set_param_f64(h, which, v.as_ptr(), rows, cols, cols);
                    check(st, &[], "set_param");
                    let mut out = vec![SENTINEL; rows * cols];
                    let st =
                        elra_adapter_get_param_f64(h, which, out.as_mut_ptr(), rows, cols, cols);
                    check(st, &[&out], "get_param");
                }
                2 => {
                    let mut y = vec![SENTINEL; n * d];
                    let st = elra_adapter_forward_f64(h, n, x.as_ptr(), k, y.as_mut_ptr(), d);
                    check(st, &[&y], "forward");
                }
                3 => {
                    let (mut dx, mut da, mut db) = (
                        vec![SENTINEL; n * k],
                        vec![SENTINEL; d * r.max(k)],
                        vec![SENTINEL; d * r.max(k)],
                    );
                    let mut de = SENTINEL;
                    let (mut ar, mut ac, mut br, mut bc) = (0, 0, 0, 0);
                    elra_adapter_param_shape(h, 0, &mut ar, &mut ac);
                    if elra_adapter_param_shape(h, 1, &mut br, &mut bc) != ELRA_OK {
                        (br, bc) = (1, 1);
                    }
                    let st = elra_adapter_backward_f64(
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
                        db.as_mut_ptr(),
                        bc,
                        &mut de,
                    );
                    check(st, &[&dx, &da[..ar * ac], &db[..br * bc]], "backward");
                }
                4 => {
                    let mut w = vec![SENTINEL; d * k];
                    let st = elra_adapter_merge_f64(h, w.as_mut_ptr(), k);
                    check(st, &[&w], "merge");
                    if st == ELRA_OK {
                        let mut back = vec![SENTINEL; d * k];
                        let st = elra_adapter_unmerge_f64(h, w.as_ptr(), k, back.as_mut_ptr(), k);
                        check(st, &[&back], "unmerge");
                    }
                }
                5 => {
                    let (mut e, mut p) = (SENTINEL, SENTINEL);
                    let st = elra_adapter_energy(h, &mut e, &mut p);
                    check(st, &[&[e, p]], "energy");
                }
                _ => {
                    let mut c = std::mem::MaybeUninit::<ElraAdapterConfig>::uninit();
                    check(
                        elra_adapter_get_config(h, c.as_mut_ptr()),
                        &[],
                        "get_config",
                    );
                }
            }
        }
    }
    // SAFETY: a live handle from the creation above, destroyed once.
    unsafe { elra_adapter_destroy(h) };
    st
}

/// A caller matrix of the functional-op fuzzer: `rows × cols` with leading dimension `ld`
/// (sometimes `< cols`, which the library must refuse), in a buffer that covers the layout
/// either way; the gaps of each row hold [`SENTINEL`].
struct OpMat {
    v: Vec<f64>,
    rows: usize,
    cols: usize,
    ld: usize,
}

impl OpMat {
    /// `fill`: values from the input (`raw`: any bit pattern, NaN and ±∞ included; else
    /// moderate values), or [`SENTINEL`] (an output).
    fn new(s: &mut Bytes<'_>, rows: usize, cols: usize, fill: bool, raw: bool) -> OpMat {
        let pad = s.u8();
        let ld = match pad % 16 {
            15 if cols > 0 => cols - 1,
            p => cols + (p as usize % 3),
        };
        let mut v = vec![SENTINEL; rows * ld.max(cols) + 1];
        for i in 0..rows {
            for j in 0..cols {
                v[i * ld.max(cols) + j] = match (fill, raw) {
                    (false, _) => SENTINEL,
                    (true, true) => s.f64(),
                    (true, false) => f64::from(i16::from_le_bytes([s.u8(), s.u8()])) / 8192.0,
                };
            }
        }
        OpMat { v, rows, cols, ld }
    }
    fn p(&self) -> *const f64 {
        self.v.as_ptr()
    }
    fn m(&mut self) -> *mut f64 {
        self.v.as_mut_ptr()
    }
    /// The gaps are untouched; with `ok`, every described entry is finite.
    fn check(&self, what: &str, ok: bool) {
        let row = self.ld.max(self.cols);
        for i in 0..self.rows {
            for j in 0..row {
                let x = self.v[i * row + j];
                if j >= self.cols {
                    assert_eq!(x, SENTINEL, "{what}: gap ({i}, {j}) written");
                } else if ok && self.ld >= self.cols {
                    assert!(x.is_finite(), "{what}: ({i}, {j}) = {x} after ELRA_OK");
                }
            }
        }
    }
}

/// The checks on a functional call's status: never `ELRA_PANIC`, and a batch beyond the address
/// space (`huge`) refused (invalid argument or out of memory). Returns whether it succeeded.
fn op_status(st: ElraStatus, what: &str, huge: bool) -> bool {
    assert_ne!(st, ElraStatus::ELRA_PANIC, "panic in {what}");
    if huge {
        assert!(
            matches!(
                st,
                ElraStatus::ELRA_INVALID_ARGUMENT | ElraStatus::ELRA_OUT_OF_MEMORY
            ),
            "{what}: a batch beyond the address space gave {st:?}"
        );
    }
    st == ELRA_OK
}

/// Decodes a layer (variant, small d, k, r, n — or, sometimes, a batch beyond any address
/// space), a step, η, caller matrices with padded or invalid leading dimensions, values that may
/// be NaN, ±∞ or huge, short `saved`/workspace buffers and flags, then runs the functional
/// calls `elra_op_*_f64` on them: forward (with and without the base, with a bias), backward,
/// the output-side pair, merge (either side, either direction) and the energy. Checks: no call
/// panics; nothing is written into the gaps between rows; outputs are finite after `ELRA_OK`; a
/// batch beyond the address space is refused (unread). Returns the forward's status.
#[doc(hidden)]
pub fn ops_fuzz_one(data: &[u8]) -> ElraStatus {
    let mut s = Bytes(data);
    let flags = s.u8();
    let raw = s.u8() % 4 == 0; // raw values (NaN, ±∞, huge) in the inputs, a quarter of the time
    let small = |b: u8| (b % 6) as usize;
    let desc = ElraOpDesc {
        variant: (s.u8() % 7).min(3) as u32, // 3 (LoRA) is refused
        d: small(s.u8()),
        k: small(s.u8()),
        r: small(s.u8()),
    };
    let (d, k, r) = (desc.d, desc.k, desc.r);
    let huge = flags & 7 == 7;
    let n_small = small(s.u8());
    let n = if huge {
        (1usize << 61) + s.u8() as usize
    } else {
        n_small
    };
    let rows = if huge { 1 } else { n };
    // At most one raw (possibly invalid) setting per input, 5 times in 16; else valid ones.
    let bad = s.u8() % 16;
    let unit = f64::from(s.u8()) / 255.0;
    let mut setting = |i: u8, valid: f64| if bad == i { s.f64() } else { valid };
    let step = ElraOpStep {
        alpha: setting(0, unit),
        eta_mult: setting(1, 0.5 + unit),
        tau: setting(
            2,
            if flags & 8 != 0 {
                0.25 + 4.0 * unit
            } else {
                0.0
            },
        ),
        lambda: setting(3, unit * 1e-2),
    };
    let eta = setting(4, 0.05 + unit);
    let w0 = OpMat::new(&mut s, d, k, true, raw);
    let a = OpMat::new(&mut s, d, r, true, raw);
    let b = OpMat::new(&mut s, r, d, true, raw);
    let x = OpMat::new(&mut s, rows, k, true, raw);
    let dy = OpMat::new(&mut s, rows, d, true, raw);
    let u = OpMat::new(&mut s, rows, d, true, raw);
    let bias: Vec<f64> = (0..d).map(|_| if raw { s.f64() } else { 0.5 }).collect();
    // `saved` has no length argument: it must hold what elra_op_sizes says (never shortened
    // here); the workspace's length is passed and sometimes one short.
    let (mut saved_len, mut ws_len) = (0usize, 0usize);
    // SAFETY: live locals.
    let st = unsafe { elra_op_sizes(&desc, n_small, &mut saved_len, &mut ws_len) };
    assert_ne!(st, ElraStatus::ELRA_PANIC, "panic in sizes");
    let short = s.u8() % 8;
    if short == 1 {
        ws_len = ws_len.saturating_sub(1);
    }
    let mut saved = vec![0.0f64; saved_len.max(1)];
    let mut ws = vec![0.0f64; ws_len.max(1)];
    let saved_n = saved_len;
    let base = (s.u8() % 8).min(2) as u32; // 2 is not a flag
    let with_bias = base == 1 && s.u8() & 1 == 1;
    let mut y = OpMat::new(&mut s, rows, d, false, false);
    // `batched`: the call takes the batch n (merge and energy do not).
    let ok = |st: ElraStatus, what: &str, batched: bool| op_status(st, what, huge && batched);
    // SAFETY: every matrix covers its described layout (or the layout is invalid and must be
    // refused unread); `saved` and `ws` hold the lengths passed; a huge batch must be refused
    // before any buffer is read (what is checked).
    let fwd = unsafe {
        elra_op_forward_f64(
            &desc,
            &step,
            n,
            w0.p(),
            w0.ld,
            base,
            if with_bias {
                bias.as_ptr()
            } else {
                std::ptr::null()
            },
            a.p(),
            a.ld,
            b.p(),
            b.ld,
            eta,
            x.p(),
            x.ld,
            std::ptr::null(),
            y.m(),
            y.ld,
            saved.as_mut_ptr(),
            ws.as_mut_ptr(),
            ws_len,
        )
    };
    let fwd_ok = ok(fwd, "forward", true);
    y.check("forward y", fwd_ok);
    if fwd_ok {
        assert!(
            saved[..saved_n].iter().all(|v| v.is_finite()),
            "saved not finite"
        );
    }
    let acc = (s.u8() % 3) as u32;
    let mut dx = OpMat::new(&mut s, rows, k, false, false);
    let mut da = OpMat::new(&mut s, d, r, acc == 1, false);
    let mut db = OpMat::new(&mut s, r, d, acc == 1, false);
    let mut deta = 0.0f64;
    // SAFETY: as above; `saved` holds what the forward wrote (or garbage the checks must catch).
    let bwd = unsafe {
        elra_op_backward_f64(
            &desc,
            &step,
            n,
            w0.p(),
            w0.ld,
            base.min(1),
            a.p(),
            a.ld,
            b.p(),
            b.ld,
            eta,
            x.p(),
            x.ld,
            std::ptr::null(),
            saved.as_ptr(),
            dy.p(),
            dy.ld,
            dx.m(),
            dx.ld,
            da.m(),
            da.ld,
            db.m(),
            db.ld,
            &mut deta,
            acc,
            ws.as_mut_ptr(),
            ws_len,
        )
    };
    let bwd_ok = ok(bwd, "backward", true);
    dx.check("backward dx", bwd_ok);
    da.check("backward da", bwd_ok && acc == 0);
    if bwd_ok && acc == 0 && desc.variant != 1 {
        db.check("backward db", true);
    }
    // The output-side pair (d×d layer).
    let sq = ElraOpDesc { k: d, ..desc };
    let mut y2 = OpMat::new(&mut s, rows, d, false, false);
    // SAFETY: as above.
    let fo = unsafe {
        elra_op_forward_out_f64(
            &sq,
            &step,
            n,
            a.p(),
            a.ld,
            b.p(),
            b.ld,
            eta,
            u.p(),
            u.ld,
            std::ptr::null(),
            y2.m(),
            y2.ld,
            saved.as_mut_ptr(),
            ws.as_mut_ptr(),
            ws_len,
        )
    };
    let fo_ok = ok(fo, "forward_out", true);
    y2.check("forward_out y", fo_ok);
    let mut du = OpMat::new(&mut s, rows, d, false, false);
    // SAFETY: as above.
    let bo = unsafe {
        elra_op_backward_out_f64(
            &sq,
            &step,
            n,
            a.p(),
            a.ld,
            b.p(),
            b.ld,
            eta,
            u.p(),
            u.ld,
            std::ptr::null(),
            saved.as_ptr(),
            dy.p(),
            dy.ld,
            du.m(),
            du.ld,
            da.m(),
            da.ld,
            db.m(),
            db.ld,
            &mut deta,
            0,
            ws.as_mut_ptr(),
            ws_len,
        )
    };
    let bo_ok = ok(bo, "backward_out", true);
    du.check("backward_out du", bo_ok);
    // Merge on either side, either direction; then the energy with its gradient.
    let (inverse, right) = ((s.u8() % 3) as u32, (s.u8() % 3) as u32);
    let (wr, wc) = if right == 1 { (k, d) } else { (d, k) };
    let w = OpMat::new(&mut s, wr, wc, true, raw);
    let mut out = OpMat::new(&mut s, wr, wc, false, false);
    // SAFETY: as above.
    let mg = unsafe {
        elra_op_merge_f64(
            &desc,
            &step,
            a.p(),
            a.ld,
            b.p(),
            b.ld,
            eta,
            w.p(),
            w.ld,
            inverse,
            right,
            out.m(),
            out.ld,
        )
    };
    let mg_ok = ok(mg, "merge", false);
    out.check("merge out", mg_ok);
    let mut e = 0.0f64;
    let mut ga = OpMat::new(&mut s, d, r, false, false);
    // SAFETY: as above.
    let en = unsafe {
        elra_op_energy_f64(
            &sq,
            &step,
            a.p(),
            a.ld,
            b.p(),
            b.ld,
            eta,
            &mut e,
            ga.m(),
            ga.ld,
            db.m(),
            db.ld,
            &mut deta,
            0,
        )
    };
    assert_ne!(en, ElraStatus::ELRA_PANIC, "panic in energy");
    ga.check("energy da", en == ELRA_OK);
    if en == ELRA_OK {
        assert!(
            e.is_finite() && deta.is_finite(),
            "energy {e}, ∂η {deta} after ELRA_OK"
        );
    }
    fwd
}

/// Decodes a multi-adapter call — a small layer (or a batch beyond any address space), 0–6
/// adapter descriptions (ELRA variants with raw or valid steps and η, LoRA, unknown variants,
/// ranks 0 … 6, NULL or padded factors), a per-row index with out-of-range values, NaN/±∞ in
/// the inputs, a short workspace — then runs `elra_op_multi_forward_f64`. Checks: no panic,
/// nothing written between rows, a finite `y` after `ELRA_OK`, `y` untouched by a refused call
/// whose arguments fail before any work, a huge batch refused unread. Returns the status.
#[doc(hidden)]
pub fn multi_fuzz_one(data: &[u8]) -> ElraStatus {
    let mut s = Bytes(data);
    let flags = s.u8();
    let raw = s.u8() % 4 == 0;
    // Dimensions 1 … 5, and 0 one time in 32.
    let dim = |b: u8| if b % 32 == 0 { 0 } else { 1 + (b % 5) as usize };
    let (d, k) = (dim(s.u8()), dim(s.u8()));
    let huge = flags & 7 == 7;
    let n_small = dim(s.u8()) + (s.u8() % 2) as usize * 300; // sometimes several row blocks
    let n = if huge {
        (1usize << 61) + s.u8() as usize
    } else {
        n_small
    };
    let rows = if huge { 1 } else { n };
    let count = (s.u8() % 7) as usize;
    let mut factors = Vec::with_capacity(count);
    let mut descs = Vec::with_capacity(count);
    for _ in 0..count {
        let variant = match s.u8() % 16 {
            15 => 4, // unknown
            v => (v % 4) as u32,
        };
        // Mostly a valid rank (1 … min(d, k)), sometimes 0 or too large.
        let r = match s.u8() {
            0..=7 => 0,
            8..=15 => d + k + 1,
            b => 1 + b as usize % d.min(k).max(1),
        };
        let lora = variant == 3;
        let (ar, ac) = if lora { (r, k) } else { (d, r) };
        let (br, bc) = if lora { (d, r) } else { (r, d) };
        let a = OpMat::new(&mut s, ar, ac, true, raw);
        let b = OpMat::new(&mut s, br, bc, true, raw);
        let null_b = s.u8() % 16 == 0;
        let bad = s.u8() % 24;
        let unit = f64::from(s.u8()) / 255.0;
        let mut setting = |i: u8, valid: f64| if bad == i { s.f64() } else { valid };
        let step = ElraOpStep {
            alpha: setting(0, unit),
            eta_mult: setting(1, 0.5 + unit),
            tau: setting(2, if flags & 8 != 0 { 0.5 + unit } else { 0.0 }),
            lambda: 0.0,
        };
        let eta = setting(3, 0.05 + unit);
        descs.push(ElraMultiAdapter {
            variant,
            r,
            a: a.p().cast(),
            ld_a: a.ld,
            b: if null_b {
                std::ptr::null()
            } else {
                b.p().cast()
            },
            ld_b: b.ld,
            eta,
            step,
        });
        factors.push((a, b));
    }
    let index: Vec<i32> = (0..rows)
        .map(|_| match s.u8() % 16 {
            15 => i32::from_le_bytes([s.u8(), s.u8(), s.u8(), s.u8()]),
            v => v as i32 % (count as i32 + 1) - 1,
        })
        .collect();
    let w0 = OpMat::new(&mut s, d, k, true, raw);
    let x = OpMat::new(&mut s, rows, k, true, raw);
    let bias: Vec<f64> = (0..d).map(|_| if raw { s.f64() } else { 0.25 }).collect();
    let with_bias = s.u8() & 1 == 1;
    let max_r = descs.iter().map(|m| m.r).max().unwrap_or(0);
    let mut ws_len = crate::ops::multi_workspace_len(n_small, d, k, max_r).unwrap_or(0);
    if s.u8() % 8 == 1 {
        ws_len = ws_len.saturating_sub(1);
    }
    let mut ws = vec![0.0f64; ws_len.max(1)];
    let mut y = OpMat::new(&mut s, rows, d, false, false);
    // SAFETY: every matrix covers its described layout (or the layout is invalid and must be
    // refused unread); the adapters' factors live in `factors`; `ws` holds `ws_len` values; a
    // huge batch must be refused before any buffer is read.
    let st = unsafe {
        elra_op_multi_forward_f64(
            descs.as_ptr(),
            count,
            index.as_ptr(),
            n,
            w0.p(),
            w0.ld,
            d,
            k,
            if with_bias {
                bias.as_ptr()
            } else {
                std::ptr::null()
            },
            x.p(),
            x.ld,
            y.m(),
            y.ld,
            ws.as_mut_ptr(),
            ws_len,
        )
    };
    y.check("multi y", op_status(st, "multi_forward", huge));
    drop(factors);
    st
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Runs a driver on 3,000 seeded random inputs of up to `max_len` bytes (the driver asserts
    /// the contract on each) and checks that each status of `reached` came back more than 30
    /// times (the decoder reaches it).
    fn drive(seed: u64, max_len: usize, driver: fn(&[u8]) -> ElraStatus, reached: &[ElraStatus]) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..3000 {
            let n = rng.random_range(0..max_len);
            let data: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            *seen.entry(driver(&data) as i32).or_insert(0) += 1;
        }
        for &st in reached {
            assert!(
                seen.get(&(st as i32)).copied().unwrap_or(0) > 30,
                "{st:?}: {seen:?}"
            );
        }
    }

    #[test]
    fn random_argument_tuples_respect_the_contract() {
        // Success and every argument-error class.
        drive(
            99,
            400,
            abi_fuzz_one,
            &[
                ELRA_OK,
                ElraStatus::ELRA_NULL_POINTER,
                ElraStatus::ELRA_INVALID_ARGUMENT,
                ElraStatus::ELRA_NON_FINITE,
                ElraStatus::ELRA_OUT_OF_MEMORY,
            ],
        );
    }

    #[test]
    fn random_adapter_calls_respect_the_contract() {
        drive(
            7,
            600,
            adapter_fuzz_one,
            &[
                ELRA_OK,
                ElraStatus::ELRA_INVALID_ARGUMENT,
                ElraStatus::ELRA_OUT_OF_MEMORY,
            ],
        );
    }

    #[test]
    fn random_op_calls_respect_the_contract() {
        // Success and the argument-error classes of the forward.
        drive(
            29,
            700,
            ops_fuzz_one,
            &[
                ELRA_OK,
                ElraStatus::ELRA_INVALID_ARGUMENT,
                ElraStatus::ELRA_NON_FINITE,
            ],
        );
    }

    #[test]
    fn random_multi_calls_respect_the_contract() {
        drive(
            31,
            900,
            multi_fuzz_one,
            &[
                ELRA_OK,
                ElraStatus::ELRA_INVALID_ARGUMENT,
                ElraStatus::ELRA_NON_FINITE,
            ],
        );
    }

    /// Found by the abi_adapter target (1e6-run campaign): a huge η made `elra_adapter_energy`
    /// return an infinite energy with status OK; it is now ELRA_OVERFLOW.
    #[test]
    fn fuzz_regression_energy_overflow_is_a_status() {
        let data: [u8; 113] = [
            114, 169, 127, 127, 127, 127, 0, 35, 0, 0, 0, 0, 35, 0, 0, 0, 59, 98, 126, 126, 126,
            106, 0, 0, 0, 126, 114, 36, 126, 126, 126, 126, 126, 126, 126, 126, 91, 126, 126, 126,
            37, 52, 126, 37, 1, 1, 0, 0, 55, 126, 126, 1, 0, 0, 0, 126, 126, 126, 0, 37, 1, 55, 37,
            1, 0, 55, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 206, 181, 1, 0, 0, 0, 157, 0, 0,
            0, 61, 255, 255, 1, 0, 0, 0, 122, 247, 247, 247, 247, 247, 247, 247, 5, 0, 247, 247,
            44, 255, 255, 48,
        ];
        adapter_fuzz_one(&data);
    }

    /// A spectral clip on factors whose `R_A R_Cᵀ` overflows: nalgebra's SVD met NaN and
    /// panicked (status ELRA_PANIC); now the factors are scaled by powers of two first and an
    /// out-of-range σ is ELRA_OVERFLOW (found by the abi_adapter target).
    #[test]
    fn fuzz_regression_clip_of_huge_factors_is_a_status() {
        let data: [u8; 190] = [
            69, 65, 234, 65, 63, 65, 255, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 211, 101,
            211, 211, 211, 211, 211, 211, 211, 211, 211, 211, 211, 211, 211, 211, 211, 211, 211,
            22, 43, 22, 22, 22, 22, 22, 22, 22, 22, 22, 22, 22, 22, 22, 22, 22, 22, 22, 22, 22, 22,
            22, 22, 22, 22, 22, 22, 26, 6, 6, 22, 22, 22, 22, 22, 22, 234, 74, 233, 49, 22, 22, 22,
            22, 22, 22, 22, 22, 22, 22, 22, 22, 22, 1, 0, 0, 255, 255, 255, 255, 8, 22, 22, 22, 22,
            22, 22, 22, 22, 22, 150, 150, 150, 211, 211, 211, 211, 211, 211, 211, 211, 211, 211,
            211, 211, 211, 163, 163, 163, 163, 163, 1, 0, 0, 0, 0, 0, 0, 4, 163, 163, 163, 163,
            163, 211, 211, 211, 211, 211, 211, 211, 211, 211, 211, 211, 211, 211, 211, 211, 211,
            211, 211, 211, 211, 211, 211, 211, 211, 211, 211, 211, 211, 163, 163, 163, 0, 0, 0,
            255, 191, 255, 255, 255, 2, 4, 0, 57,
        ];
        adapter_fuzz_one(&data);
    }

    #[test]
    fn contract_span_agrees_with_the_documented_rules() {
        assert_eq!(contract_span(1, 3, 3, 0, 8), Some(9));
        assert_eq!(contract_span(2, 3, 4, 11, 8), Some(11 + 11));
        assert_eq!(contract_span(2, 3, 4, 10, 8), None);
        assert_eq!(contract_span(1, 3, 2, 0, 8), None);
        assert_eq!(contract_span(usize::MAX, 1, 1, 1, 8), None);
        assert!(described(4, 2, 2, 3, 7) && !described(2, 2, 2, 3, 7) && described(7, 2, 2, 3, 7));
    }
}
