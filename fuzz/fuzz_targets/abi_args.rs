//! Fuzzes the argument checks of the matrix-function exports: every decoded call must be rejected
//! before memory is touched when its arguments break the contract, must never panic, never write
//! outside the described entries or on error, and must match the batch kernel on success (the
//! checks live in `elra::capi::fuzz::abi_fuzz_one`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    elra::capi::fuzz::abi_fuzz_one(data);
});
