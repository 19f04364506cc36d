//! Fuzz target `relay_udp`: see `chuantou_tests::fuzz::relay_udp`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chuantou_tests::fuzz::relay_udp(data));
