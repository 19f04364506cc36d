//! chuantou `natprobe`: what NAT is this machine behind, how long do its mappings live, and
//! will a direct connection work with a peer behind another kind?
//!
//! It speaks STUN (RFC 8489) to an RFC 5780 server (a `rendezvous` with `--alt-ip`, or
//! coturn with two IPs) and runs the behaviour discovery tests: mapping, filtering, port
//! allocation, hairpinning, mapping lifetime, and TCP mapping.
//!
//! # Layout
//!
//! - `defaults`: every timing, with the reason for its value.
//! - `transaction`: the RFC 8489 retransmission schedule, sans-IO (`wire::stun::transaction`).
//! - `classify`: the decisions, sans-IO: observations in, RFC 4787 behaviour, the classic
//!   NAT name and the direct-connection table out; unit tested over every combination.
//! - `probe`: the shell that runs the tests over real sockets.
//! - `report`: the JSON object and the text a student reads.
#![deny(missing_docs, unreachable_pub)]

pub mod classify;
pub mod defaults;
pub mod probe;
pub mod report;
pub use wire::stun::transaction;
