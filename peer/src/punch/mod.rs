//! Hole punching: the sans-IO agents for UDP ([`udp`]) and TCP simultaneous open
//! ([`tcp`]), the authenticated probes they exchange ([`probe`]), the [`strategy`] that
//! picks how to punch from both sides' NAT profiles, and the tokio shells that run them
//! for one brokered session ([`udp_shell`], [`tcp_shell`]). What they find becomes a path
//! of the session ([`crate::path`]).

#[cfg(test)]
mod natsim;
pub mod probe;
pub mod strategy;
pub mod tcp;
pub mod tcp_shell;
pub mod udp;
pub mod udp_shell;
