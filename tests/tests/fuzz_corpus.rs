//! Replays every kept fuzz input (`fuzz/corpus/TARGET/*`, seeds and what libFuzzer found)
//! through its target on stable Rust, so CI checks that no input that ever mattered
//! panics a decoder or breaks a round trip. `scripts/fuzz` does the fuzzing itself.

use std::path::Path;

#[test]
fn every_kept_fuzz_input_still_decodes_safely() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (target, run) in chuantou_tests::fuzz::TARGETS {
        let dir = root.join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (run the fuzzseeds bin)", dir.display()))
        {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target}: {} panics", path.display());
            n += 1;
        }
        assert!(n > 0, "{target}: no inputs in {}", dir.display());
    }
}
