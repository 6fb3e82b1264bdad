//! Fuzzes the adapter handle of the C ABI: decoded configurations (valid, invalid, and with a
//! `W0` beyond any address space) and call sequences must give statuses, never a panic or an
//! abort, leave outputs untouched on error and finite on success (the checks live in
//! `elra::capi::fuzz::adapter_fuzz_one`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    elra::capi::fuzz::adapter_fuzz_one(data);
});
