//! Fuzz target `frame_reader`: see `chuantou_tests::fuzz::frame_reader`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chuantou_tests::fuzz::frame_reader(data));
