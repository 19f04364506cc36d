//! A rendezvous on a cloud VM behind a 1:1 NAT (the lab's `one-to-one` router: the VM's
//! public address is not on the machine). Peers reach it at the public address; STUN and
//! the embedded relay must be handed out at that address too, not at the VM's private one.
//! Both ways are shown: with `--advertise PUBLIC`, and with nothing said, where peers use
//! the host they reached the rendezvous on. In each, a port-restricted ↔ full-cone pair
//! punches and a random-symmetric pair gets its data through the relay.

use chuantou_tests::lab_peers::{run_pair_via, start_rendezvous_on};
use chuantou_tests::natlab::Lab;
use chuantou_tests::workspace_bin;

const ROUTERS: [&str; 5] = [
    "vps=one-to-one",
    "pr=port-restricted",
    "fc=full-cone",
    "symr=symmetric-random",
    "symq=symmetric-random",
];

#[test]
fn a_rendezvous_behind_a_one_to_one_nat_serves_stun_and_its_relay_at_the_public_address() {
    let Some(lab) = Lab::for_test(&ROUTERS) else {
        return;
    };
    let (peer, rendezvous) = (workspace_bin("peer"), workspace_bin("rendezvous"));
    let public = lab.wan("vps");
    let signaling = format!("{public}:7000");
    let advertise = public.to_string();
    let base = chuantou_tests::lab_peers::EVERY_ADDRESS;
    for extra in [vec![], vec!["--advertise", advertise.as_str()]] {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        let mut server = start_rendezvous_on(&lab, &rendezvous, "vps-1", &args);
        let how = if extra.is_empty() {
            "nothing advertised"
        } else {
            "--advertise"
        };

        let punched = run_pair_via(&lab, &peer, &signaling, "pr-1", "fc-1", "pc", "udp");
        assert!(
            punched.error.is_none(),
            "{how}: {}\n--- rendezvous:\n{}",
            punched.error.unwrap_or_default(),
            server.finish()
        );
        assert!(
            punched.direct && punched.path == "direct-udp",
            "{how}: {}\n{}",
            punched.outcome,
            punched.log
        );

        let relayed = run_pair_via(&lab, &peer, &signaling, "symr-1", "symq-1", "pc2", "udp");
        assert!(
            relayed.error.is_none(),
            "{how}: {}\n--- rendezvous:\n{}",
            relayed.error.unwrap_or_default(),
            server.finish()
        );
        assert!(
            !relayed.direct && relayed.path.starts_with("relay"),
            "{how}: {} (path {})\n{}",
            relayed.outcome,
            relayed.path,
            relayed.log
        );
        // No private address of the VM was ever handed out.
        let private = "198.19.1.2";
        for log in [&punched.log, &relayed.log] {
            assert!(
                !log.contains(private),
                "{how}: the VM's private address leaked:\n{log}"
            );
        }
        drop(server);
    }
}
