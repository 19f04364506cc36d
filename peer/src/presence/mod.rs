//! Being findable: the registration with the rendezvous ([`signal`]) and the two sockets
//! whose NAT mappings it observes and hands to peers — the UDP [`endpoint`] every session
//! runs on, and the shared [`tcp_port`] that signaling, the listener and TCP punching use;
//! [`moves`] notices a move to another network; [`portmap`] asks the gateway to map the UDP endpoint's port; [`trust`] decides which
//! rendezvous key to insist on; [`report`] tells the rendezvous how
//! our sessions go.

pub mod endpoint;
pub mod moves;
pub mod portmap;
pub mod report;
pub mod signal;
pub mod tcp_port;
pub mod trust;
