//! Fuzz target `udp_flow`: see `chuantou_tests::fuzz::udp_flow`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chuantou_tests::fuzz::udp_flow(data));
