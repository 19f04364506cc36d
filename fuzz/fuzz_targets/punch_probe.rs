//! Fuzz target `punch_probe`: see `chuantou_tests::fuzz::punch_probe`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chuantou_tests::fuzz::punch_probe(data));
