//! Fuzz target `relay_hello`: see `chuantou_tests::fuzz::relay_hello`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chuantou_tests::fuzz::relay_hello(data));
