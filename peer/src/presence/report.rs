//! Telling the rendezvous how our sessions go, for its dashboard and metrics: for each
//! session of one registration, its paths (kind, which carries traffic, round trip, bytes)
//! when the active path changes, when a session starts or ends, and every
//! [`REFRESH`](crate::defaults::REPORT_REFRESH) besides for the byte counts. Only figures
//! leave: what crosses a path is never read.

use std::collections::HashMap;
use std::time::Instant;

use futures::future::select_all;
use tokio::task::JoinHandle;
use tracing::debug;
use wire::signal::client::{ClientError, Reporter};
use wire::signal::{PathStat, Report};

use crate::defaults;
use crate::session::{PathReport, Session};
use crate::status::Board;

/// Reports the sessions of `me` on `reporter` until its connection is gone or the
/// returned guard is dropped.
pub fn spawn(reporter: Reporter, board: Board, me: String) -> Reporting {
    Reporting(tokio::spawn(async move {
        if let Err(e) = run(&reporter, &board, &me).await {
            debug!(error = %e, "session reports stopped");
        }
    }))
}

/// Stops the reports when dropped (with the registration they belong to).
#[derive(Debug)]
pub struct Reporting(JoinHandle<()>);

impl Drop for Reporting {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What was last said of one session: its paths' kinds and states, and when.
struct Said {
    shape: Vec<(String, bool)>,
    at: Instant,
}

async fn run(reporter: &Reporter, board: &Board, me: &str) -> Result<(), ClientError> {
    let mut said: HashMap<String, Said> = HashMap::new();
    loop {
        // Subscribe before looking, so a change while we report wakes the next round.
        let added = board.added();
        let notified = added.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let sessions = board.sessions_of(me);
        let mut watches: Vec<_> = sessions.iter().map(Session::watch_active).collect();
        let closes: Vec<_> = sessions.iter().map(|s| s.closed().clone()).collect();

        let now = Instant::now();
        for s in &sessions {
            let paths = s.report();
            let shape: Vec<(String, bool)> = paths
                .iter()
                .map(|p| (p.kind.clone(), p.state == "active"))
                .collect();
            let due = said.get(s.peer()).is_none_or(|last| {
                last.shape != shape || now.duration_since(last.at) >= defaults::REPORT_REFRESH
            });
            if due {
                reporter
                    .report(report(s.peer(), false, &paths))
                    .await
                    .or_else(ignore_refusal)?;
                said.insert(s.peer().to_owned(), Said { shape, at: now });
            }
        }
        let gone: Vec<String> = said
            .keys()
            .filter(|p| !sessions.iter().any(|s| s.peer() == p.as_str()))
            .cloned()
            .collect();
        for peer in gone {
            said.remove(&peer);
            reporter
                .report(report(&peer, true, &[]))
                .await
                .or_else(ignore_refusal)?;
        }

        // select_all wants at least one future: without sessions, only an addition or
        // the refresh wakes us.
        let changed = async {
            if watches.is_empty() {
                std::future::pending::<()>().await;
            }
            let changes = watches.iter_mut().map(|w| {
                Box::pin(async move {
                    let _ = w.changed().await;
                }) as std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>>
            });
            let ends = closes.into_iter().map(|t| {
                Box::pin(t.cancelled_owned()) as std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
            });
            let _ = select_all(changes.chain(ends)).await;
        };
        tokio::select! {
            _ = &mut notified => {}
            _ = changed => {}
            _ = tokio::time::sleep(defaults::REPORT_REFRESH) => {}
        }
    }
}

/// A refused report (a session the rendezvous forgot, say) is no reason to stop.
fn ignore_refusal(e: ClientError) -> Result<(), ClientError> {
    match e {
        ClientError::Refused(_) => Ok(()),
        e => Err(e),
    }
}

fn report(peer: &str, closed: bool, paths: &[PathReport]) -> Report {
    Report {
        peer: peer.to_owned(),
        closed,
        paths: paths
            .iter()
            .take(wire::signal::report::MAX_REPORTED_PATHS)
            .map(|p| PathStat {
                kind: p.kind.clone(),
                active: p.state == "active",
                rtt_us: p
                    .rtt_ms
                    .map(|ms| (ms * 1000.0).min(f64::from(u32::MAX)) as u32),
                bytes_out: p.bytes_out,
                bytes_in: p.bytes_in,
            })
            .collect(),
    }
}
