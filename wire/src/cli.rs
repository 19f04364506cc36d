//! What every chuantou binary does around its work: logs to stderr (`RUST_LOG` respected,
//! colour only on a terminal), runs on a tokio runtime, and turns an error into one line
//! with its whole cause chain and exit status 1. Here because this is the bottom crate.

use std::future::Future;
use std::process::ExitCode;

/// Runs `work` as the binary `name`; returns the process exit status.
pub fn run<F>(name: &str, work: F) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    run_with(name, None, work)
}

/// [`run`] with `workers` runtime worker threads (default: one per core); the
/// `TOKIO_WORKER_THREADS` environment variable overrides either.
pub fn run_with<F>(name: &str, workers: Option<usize>, work: F) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = workers.filter(|_| std::env::var_os("TOKIO_WORKER_THREADS").is_none()) {
        builder.worker_threads(n);
    }
    let runtime = match builder.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line with the whole chain: "starting rendezvous: cannot bind …: …".
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
