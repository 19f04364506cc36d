//! Fuzz target `stun_request`: see `chuantou_tests::fuzz::stun_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chuantou_tests::fuzz::stun_request(data));
