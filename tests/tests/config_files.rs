//! `rendezvous` and `relay` read their settings from a TOML file (`--config FILE`, or the
//! environment): every long flag is a key, flags on the command line win over the file,
//! and a key that is no flag is refused with the file and the key named.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use chuantou_tests::{TempHome, workspace_bin};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `cmd` until its log has every line in `want` (each a substring), then stops it.
fn log_until(mut cmd: Command, want: &[String]) -> Vec<String> {
    let mut child = cmd
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mut missing: Vec<&String> = want.iter().collect();
    for line in lines.map_while(Result::ok) {
        missing.retain(|w| !line.contains(w.as_str()));
        seen.push(line);
        if missing.is_empty() {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(missing.is_empty(), "never logged {missing:?}: {seen:#?}");
    seen
}

#[test]
fn the_rendezvous_takes_its_settings_from_a_file_and_the_command_line_wins() {
    let dir = TempHome::new();
    std::fs::create_dir_all(&dir.0).unwrap();
    let (file_listen, cli_listen, stun, relay) =
        (free_port(), free_port(), free_port(), free_port());
    let config = dir.0.join("rendezvous.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{file_listen}\"\nstun = \"127.0.0.1:{stun}\"\n\
             relay = \"127.0.0.1:{relay}\"\nno-http = true\nmax_names_per_ip = 5\n\
             advertise = [\"127.0.0.1\"]\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(workspace_bin("rendezvous"));
    cmd.arg("--state")
        .arg(dir.0.join("state"))
        .arg("--config")
        .arg(&config)
        .args(["--listen", &format!("127.0.0.1:{cli_listen}")]);
    let seen = log_until(
        cmd,
        &[
            format!("signaling listening addr=127.0.0.1:{cli_listen}"),
            format!("stun listening addr=127.0.0.1:{stun}"),
            format!("addr=127.0.0.1:{relay}"),
        ],
    );
    assert!(
        !seen.iter().any(|l| l.contains("http api listening")),
        "no-http = true was ignored: {seen:#?}"
    );
}

#[test]
fn an_unknown_setting_is_refused_naming_the_file_and_the_key() {
    let dir = TempHome::new();
    std::fs::create_dir_all(&dir.0).unwrap();
    let config = dir.0.join("rendezvous.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nmax_peer = 10\n").unwrap();
    let out = Command::new(workspace_bin("rendezvous"))
        .env("CHUANTOU_RENDEZVOUS_CONFIG", &config)
        .arg("--state")
        .arg(dir.0.join("state"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&config.display().to_string()), "{err}");
    assert!(err.contains("unknown setting `max_peer`"), "{err}");
    assert!(
        err.contains("max-peers"),
        "the known flags are listed: {err}"
    );
}

#[test]
fn a_relay_takes_its_key_and_address_from_a_file() {
    let dir = TempHome::new();
    std::fs::create_dir_all(&dir.0).unwrap();
    let port = free_port();
    let config = dir.0.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "key = \"{}\"\nlisten = \"127.0.0.1:{port}\"\n",
            "ab".repeat(32)
        ),
    )
    .unwrap();
    let mut cmd = Command::new(workspace_bin("relay"));
    cmd.arg("--config")
        .arg(&config)
        .env_remove("CHUANTOU_RELAY_KEY");
    log_until(cmd, &[format!("addr=127.0.0.1:{port}")]);
}
