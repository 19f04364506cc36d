//! Fuzz target `public_sniff`: see `chuantou_tests::fuzz::public_sniff`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chuantou_tests::fuzz::public_sniff(data));
