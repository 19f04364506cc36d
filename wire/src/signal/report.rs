//! What peers tell the rendezvous about their sessions, for its dashboard and metrics:
//! which paths a session with another peer has, which one carries traffic, round trips
//! and byte counts. Only figures: nothing that crosses a path is ever read or reported.

use serde::{Deserialize, Serialize};

use super::{ErrorCode, ErrorFrame, validate_name};

/// Most paths one report may list.
pub const MAX_REPORTED_PATHS: usize = 8;

/// `Request::Report`: the state of our session with `peer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The other peer's registered name.
    pub peer: String,
    /// The session ended.
    pub closed: bool,
    /// Its paths now.
    pub paths: Vec<PathStat>,
}

/// One path of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathStat {
    /// `direct-udp`, `direct-tcp`, `relay` or `relay-tcp`.
    pub kind: String,
    /// It carries the session's traffic now.
    pub active: bool,
    /// Smoothed round trip, microseconds.
    pub rtt_us: Option<u32>,
    /// Bytes sent on it.
    pub bytes_out: u64,
    /// Bytes received on it.
    pub bytes_in: u64,
}

impl PathStat {
    /// Whether this is a punched path (not through a relay).
    pub fn is_direct(&self) -> bool {
        self.kind.starts_with("direct")
    }
}

impl Report {
    /// Checks the bounds of every field.
    pub fn validate(&self) -> Result<(), ErrorFrame> {
        validate_name(&self.peer).map_err(|m| ErrorFrame::new(ErrorCode::InvalidName, m))?;
        if self.paths.len() > MAX_REPORTED_PATHS {
            return Err(ErrorFrame::new(
                ErrorCode::BadRequest,
                format!(
                    "{} paths reported, at most {MAX_REPORTED_PATHS}",
                    self.paths.len()
                ),
            ));
        }
        if let Some(p) = self.paths.iter().find(|p| {
            p.kind.is_empty()
                || p.kind.len() > 16
                || !p.kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
        }) {
            return Err(ErrorFrame::new(
                ErrorCode::BadRequest,
                format!(
                    "path kind {:?} is not one of direct-udp, direct-tcp, relay, relay-tcp",
                    p.kind
                ),
            ));
        }
        Ok(())
    }
}
