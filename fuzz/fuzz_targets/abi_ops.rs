//! Fuzzes the functional calls `elra_op_*_f64` on caller memory: decoded layers, steps, η,
//! padded or invalid leading dimensions, NaN/±∞/huge values, short workspaces and flags. No call
//! may panic, write between rows or return non-finite outputs with `ELRA_OK`, and a batch beyond
//! the address space must be refused unread (the checks live in `elra::capi::fuzz::ops_fuzz_one`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    elra::capi::fuzz::ops_fuzz_one(data);
});
