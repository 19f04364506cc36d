//! End-to-end tests across the chuantou crates: the NAT-lab helpers and the matrix of NAT
//! pairs arrive with the natprobe and punching issues. The rendezvous' own loopback tests
//! live in `rendezvous/tests/`, next to the binary they start.
#![deny(missing_docs, unreachable_pub)]
