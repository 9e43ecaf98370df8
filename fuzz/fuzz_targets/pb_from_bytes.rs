//! Fuzz target `pb_from_bytes`: see `pbcodec_fuzz::pb_from_bytes` for what it checks.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| pbcodec_fuzz::pb_from_bytes(data));
