//! Fuzz target `signaling_server_frames`: see `chuantou_tests::fuzz::signaling_server_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chuantou_tests::fuzz::signaling_server_frames(data));
