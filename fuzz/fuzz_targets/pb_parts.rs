//! Fuzz target `pb_parts`: see `pbcodec_fuzz::pb_parts` for what it checks.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| pbcodec_fuzz::pb_parts(data));
