//! What every chuantou binary does around its work: logs to stderr (`RUST_LOG` respected,
//! colour only on a terminal), runs on a tokio runtime, owns SIGINT and SIGTERM (the first
//! asks the work to stop through its [`CancellationToken`], as systemd's stop does; a
//! second ends the process at once), and turns an error into one line with its whole cause
//! chain and exit status 1.

use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;
use tracing::info;

/// `wait` spread between half and one and a half times itself by `r` (a random number in
/// 0..1): after a rendezvous restart its peers and relays come back spread out over the
/// backoff, not all at the same instant.
pub fn jitter(wait: std::time::Duration, r: f64) -> std::time::Duration {
    wait.mul_f64(0.5 + r.clamp(0.0, 1.0))
}

/// The version every binary prints: the crate version and the commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("CHUANTOU_COMMIT"),
    ")"
);

/// The arguments to parse: the command line, preceded by the settings of the TOML file
/// named by `--config FILE` (or the environment variable `env`) turned into the flags they
/// name, so that a flag on the command line wins over the file (the command must let an
/// argument override itself: `#[command(args_override_self = true)]`).
///
/// Keys are the long flags of `--help` without the dashes (`listen = "0.0.0.0:7000"`,
/// `max-peers = 100000`, `no-http = true`; `_` may stand for `-`); an array gives the flag
/// once per element. An unknown key is an error naming the file and the key.
pub fn args_with_config<C: clap::CommandFactory>(
    env: &str,
) -> anyhow::Result<Vec<std::ffi::OsString>> {
    use anyhow::Context as _;
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut path = std::env::var_os(env).map(std::path::PathBuf::from);
    let mut i = 1;
    while i < argv.len() {
        let arg = argv[i].to_string_lossy();
        if arg == "--" {
            break;
        }
        if arg == "--config" {
            path = argv.get(i + 1).map(std::path::PathBuf::from);
            i += 1;
        } else if let Some(p) = arg.strip_prefix("--config=") {
            path = Some(p.into());
        }
        i += 1;
    }
    let Some(path) = path else { return Ok(argv) };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("config file {}", path.display()))?;
    let command = C::command();
    let mut from_file = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(flag.as_str()) && flag != "config")
            .ok_or_else(|| {
                let known: Vec<&str> = command
                    .get_arguments()
                    .filter_map(|a| a.get_long())
                    .filter(|l| !["config", "help", "version"].contains(l))
                    .collect();
                anyhow::anyhow!(
                    "config file {}: unknown setting `{key}`; settings are the long flags of \
                     --help: {}",
                    path.display(),
                    known.join(", ")
                )
            })?;
        let takes_value = arg.get_action().takes_values();
        let values = match value {
            toml::Value::Array(items) => items,
            other => vec![other],
        };
        for v in values {
            let text = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(n) => n.to_string(),
                toml::Value::Float(n) => n.to_string(),
                toml::Value::Boolean(b) if !takes_value => {
                    if b {
                        from_file.push(format!("--{flag}").into());
                    }
                    continue;
                }
                toml::Value::Boolean(b) => b.to_string(),
                other => anyhow::bail!(
                    "config file {}: `{key}` must be a string, number, boolean or array, not {}",
                    path.display(),
                    other.type_str()
                ),
            };
            from_file.push(format!("--{flag}").into());
            from_file.push(text.into());
        }
    }
    let mut args = Vec::with_capacity(argv.len() + from_file.len());
    args.extend(argv.first().cloned());
    args.extend(from_file);
    args.extend(argv.into_iter().skip(1));
    Ok(args)
}

/// Parses the command line of binary `name` with its config file ([`args_with_config`]);
/// a config file that cannot be read or names an unknown setting ends the process with
/// one line saying why and status 1.
pub fn parse_with_config<C: clap::Parser>(name: &str, env: &str) -> C {
    match args_with_config::<C>(env) {
        Ok(args) => C::parse_from(args),
        Err(e) => {
            say(&format!("{name}: {}", chain(&e)));
            std::process::exit(1);
        }
    }
}

/// Writes `shell`'s completion script for the command `C` (named `name`) to stdout:
/// `peer completions bash > /etc/bash_completion.d/peer`.
pub fn completions<C: clap::CommandFactory>(
    shell: clap_complete::Shell,
    name: &str,
) -> anyhow::Result<()> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut C::command(), name, &mut out);
    print(&String::from_utf8_lossy(&out))
}

/// Runs `work` as the binary `name`; returns the process exit status. `work` gets a token
/// that is cancelled on the first SIGINT or SIGTERM.
pub fn run<F, Fut>(name: &str, work: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    run_with(name, None, work)
}

/// [`run`] with `workers` runtime worker threads (default: one per core); the
/// `TOKIO_WORKER_THREADS` environment variable overrides either.
pub fn run_with<F, Fut>(name: &str, workers: Option<usize>, work: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // Its own report of a failed write is an `eprintln!`, which panics when stderr
        // is closed: a log line nobody can read is simply lost.
        .log_internal_errors(false)
        .init();
    raise_open_files();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = workers.filter(|_| std::env::var_os("TOKIO_WORKER_THREADS").is_none()) {
        builder.worker_threads(n);
    }
    let runtime = match builder.build() {
        Ok(r) => r,
        Err(e) => {
            say(&format!("{name}: cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        // The handlers are in place before the work starts: a SIGTERM that comes right
        // after start-up must stop the work, not kill the process unannounced.
        let installed = Signals::install();
        let signals = tokio::spawn(stop_on_signals(
            name.to_owned(),
            shutdown.clone(),
            installed,
        ));
        let result = work(shutdown).await;
        signals.abort();
        result
    });
    // Tasks still running (a connection being served) must not keep the process alive.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line with the whole chain: "starting rendezvous: cannot bind …: …".
            say(&format!("{name}: {}", chain(&e)));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: an error whose message already
/// ends with its cause ("connecting to X: Connection refused") does not get it again.
pub fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Writes `text` to stdout. A reader that went away (`| head`) ends the output quietly,
/// as for any Unix tool, instead of a panic.
pub fn print(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("writing to stdout"))
        }
        _ => Ok(()),
    }
}

/// One line on stderr; a closed stderr (`2>&-`, a pipe whose reader left) is no reason to
/// panic, so a failed write is dropped.
fn say(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Raises the soft limit of open files to the hard one: a server holds a descriptor per
/// connection, and the usual soft limit (1,024) would refuse users long before any of its
/// own limits does ("Too many open files"). Also for test processes that host servers and
/// peers in-process.
pub fn raise_open_files() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        );
    }
}

/// SIGINT and SIGTERM, their handlers registered.
struct Signals {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            int: signal(SignalKind::interrupt()).ok(),
            term: signal(SignalKind::terminate()).ok(),
        }
    }

    /// The next signal's name.
    async fn next(&mut self) -> &'static str {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.int) => "interrupted",
            _ = recv(&mut self.term) => "terminated",
        }
    }
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM; exits on the second.
async fn stop_on_signals(name: String, shutdown: CancellationToken, mut signals: Signals) {
    let which = signals.next().await;
    info!("{which}: shutting down");
    shutdown.cancel();
    let again = signals.next().await;
    say(&format!("{name}: {again} again: exiting now"));
    // 128 + SIGINT, as a shell reports an interrupted command.
    std::process::exit(130);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_spreads_a_wait_over_half_to_one_and_a_half_times() {
        let s = std::time::Duration::from_secs(8);
        assert_eq!(jitter(s, 0.0), std::time::Duration::from_secs(4));
        assert_eq!(jitter(s, 1.0), std::time::Duration::from_secs(12));
        assert_eq!(jitter(s, 0.25), std::time::Duration::from_secs(6));
        // A thousand peers drawing at random do not come back in lockstep.
        let draws: std::collections::BTreeSet<u128> = (0..1000)
            .map(|_| jitter(s, rand::random()).as_millis())
            .collect();
        assert!(draws.len() > 900, "{} distinct waits", draws.len());
        assert!(draws.iter().all(|ms| (4000..=12000).contains(ms)));
    }

    #[test]
    fn each_cause_is_printed_once() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        #[derive(Debug, thiserror::Error)]
        #[error("connecting to rendezvous 198.18.0.1:7000: {source}")]
        struct Connect {
            source: std::io::Error,
        }
        let e = anyhow::Error::new(Connect { source: io }).context("registering");
        assert_eq!(
            chain(&e),
            "registering: connecting to rendezvous 198.18.0.1:7000: connection refused"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(chain(&plain), "outer: inner");
    }
}
