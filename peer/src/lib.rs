//! chuantou `peer`: the peer (expose / reach, hole punching, tunnels). Not built yet (issues 4, 6 and 7); this crate holds its place in the
//! workspace and says so plainly instead of pretending.
#![deny(missing_docs, unreachable_pub)]

/// What this crate will hold, and which issue builds it.
pub const STATUS: &str = "peer is not implemented yet: the peer (expose / reach, hole punching, tunnels) comes with issues 4, 6 and 7";
