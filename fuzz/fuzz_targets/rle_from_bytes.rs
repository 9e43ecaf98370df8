//! Fuzz target `rle_from_bytes`: see `pbcodec_fuzz::rle_from_bytes` for what it checks.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| pbcodec_fuzz::rle_from_bytes(data));
