//! The systemd units in `dist/systemd/` pass `systemd-analyze verify` (Debian's systemd),
//! with their binaries pointed at this build: no unknown keys, no bad values, executables
//! that exist. A unit with a mistake is caught the same way, so a pass means something.

use std::path::Path;
use std::process::Command;

use chuantou_tests::{TempHome, workspace_bin};

/// `systemd-analyze verify` on `unit` in `dir`: its status and what it said.
fn verify(dir: &Path, unit: &str) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no", unit])
        .current_dir(dir)
        .output()
        .expect("systemd-analyze (Debian's systemd package; .ci/run installs it)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && said.trim().is_empty(), said)
}

#[test]
fn the_units_in_dist_pass_systemd_analyze_verify() {
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd");
    let dir = TempHome::new();
    std::fs::create_dir_all(&dir.0).unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(&dist).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let mut text = std::fs::read_to_string(&path).unwrap();
        for bin in ["rendezvous", "relay", "peer"] {
            text = text.replace(
                &format!("/usr/local/bin/{bin} "),
                &format!("{} ", workspace_bin(bin).display()),
            );
        }
        // A template is verified as one of its instances.
        let unit = name.replace("@.", "@7274.");
        std::fs::write(dir.0.join(&unit), text).unwrap();
        let (ok, said) = verify(&dir.0, &unit);
        assert!(ok, "{name}: {said}");
        checked += 1;
    }
    assert_eq!(checked, 3, "rendezvous, relay and expose@ units");

    // The control: a unit with an unknown key and a missing binary does not pass.
    std::fs::write(
        dir.0.join("broken.service"),
        "[Service]\nExecStart=/nonexistent/chuantou\nRestartt=always\n",
    )
    .unwrap();
    let (ok, said) = verify(&dir.0, "broken.service");
    assert!(!ok, "a broken unit passed: {said}");
}
