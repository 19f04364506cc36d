//! Fuzz target `stun_response`: see `chuantou_tests::fuzz::stun_response`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chuantou_tests::fuzz::stun_response(data));
