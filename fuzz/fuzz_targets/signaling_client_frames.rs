//! Fuzz target `signaling_client_frames`: see `chuantou_tests::fuzz::signaling_client_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chuantou_tests::fuzz::signaling_client_frames(data));
