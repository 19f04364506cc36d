//! The hardest pair the lab has: random symmetric ↔ sequential symmetric, which
//! prediction × birthday (`peer/src/punch/strategy.rs` has the maths) takes direct in
//! about 99 % of punches by design. 20 tries, alternating which side exposes, each with
//! fresh peers and NATs that forgot every mapping: at least 18 must go direct within 10 s.

use std::process::Stdio;
use std::time::Duration;

use chuantou_tests::lab_peers::{run_pair, start_rendezvous};
use chuantou_tests::natlab::Lab;
use chuantou_tests::workspace_bin;

const TRIES: usize = 20;
const WITHIN: Duration = Duration::from_secs(10);

#[test]
fn random_symmetric_and_sequential_symmetric_go_direct_in_at_least_90_percent() {
    let Some(lab) = Lab::for_test(&["rnd=symmetric-random", "seq=symmetric-sequential"]) else {
        return;
    };
    let peer = workspace_bin("peer");
    let _server = start_rendezvous(&lab, &workspace_bin("rendezvous"));
    let mut direct = 0;
    let mut table = Vec::new();
    let mut misses = Vec::new();
    for t in 0..TRIES {
        // A fresh start for each try: the sweep leaves ~100,000 conntrack entries per
        // round on the random NAT, and the spray walks the sequential NAT's table.
        for r in ["rnd", "seq"] {
            let flushed = lab
                .router_command(r, "conntrack")
                .arg("-F")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("conntrack (apt-get install conntrack)");
            assert!(flushed.success(), "conntrack -F on {r}");
        }
        let (a, b) = if t % 2 == 0 {
            ("rnd-1", "seq-1")
        } else {
            ("seq-1", "rnd-1")
        };
        let run = run_pair(&lab, &peer, a, b, &format!("hard{t}"), "udp");
        if let Some(e) = &run.error {
            panic!("try {t}: {e}");
        }
        let ok = run.direct && run.to_direct.is_some_and(|d| d <= WITHIN);
        direct += usize::from(ok);
        table.push(match run.to_direct {
            Some(d) if ok => format!("{a} -> {b}: direct in {d:.1?}"),
            _ => format!("{a} -> {b}: relay ({})", run.outcome),
        });
        if !ok {
            misses.push(format!("try {t}: {}\n{}", run.outcome, run.log));
        }
    }
    println!(
        "{}\n{direct} of {TRIES} direct within {WITHIN:?}",
        table.join("\n")
    );
    assert!(
        direct * 10 >= TRIES * 9,
        "{direct} of {TRIES} direct:\n{}\n{}",
        table.join("\n"),
        misses.join("\n\n")
    );
}
