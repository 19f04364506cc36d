//! chuantou `natprobe`: NAT type probing and classification. Not built yet (issue 5); this crate holds its place in the
//! workspace and says so plainly instead of pretending.
#![deny(missing_docs, unreachable_pub)]

/// What this crate will hold, and which issue builds it.
pub const STATUS: &str =
    "natprobe is not implemented yet: NAT type probing and classification comes with issue 5";
