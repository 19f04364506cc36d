//! Local forwarding: local TCP connections as session streams ([`tcp`]) and local UDP
//! flows as session datagrams ([`udp`]).

pub mod tcp;
pub mod udp;
