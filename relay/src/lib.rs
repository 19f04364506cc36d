//! chuantou `relay`: the relay (pairs ticketed session halves and forwards bytes). Not built yet (issue 4); this crate holds its place in the
//! workspace and says so plainly instead of pretending.
#![deny(missing_docs, unreachable_pub)]

/// What this crate will hold, and which issue builds it.
pub const STATUS: &str = "relay is not implemented yet: the relay (pairs ticketed session halves and forwards bytes) comes with issue 4";
