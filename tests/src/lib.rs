//! End-to-end tests across the chuantou crates live in `tests/tests/`; this library holds
//! the helpers they share.
#![deny(missing_docs, unreachable_pub)]
