//! Fuzz target `stream_link`: see `chuantou_tests::fuzz::stream_link`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chuantou_tests::fuzz::stream_link(data));
