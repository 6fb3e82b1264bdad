//! Fuzzes the multi-adapter forward `elra_op_multi_forward_f64` on caller memory: decoded
//! layers, 0–6 adapter descriptions (ELRA variants, LoRA, unknown variants, bad ranks, NULL or
//! padded factors, raw steps and η), per-row indices out of range, NaN/±∞ inputs, short
//! workspaces. No call may panic, write between rows or return a non-finite `y` with `ELRA_OK`,
//! and a batch beyond the address space must be refused unread (the checks live in
//! `elra::capi::fuzz::multi_fuzz_one`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    elra::capi::fuzz::multi_fuzz_one(data);
});
