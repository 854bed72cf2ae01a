//! Privileged end-to-end test of the `p2pcdn-redirector` CLI on a veth pair in throwaway
//! network namespaces: attach, already attached, service and peer (with the managed
//! neighbour entry), upgrade keeping the maps, the schema guard, detach keeping the maps,
//! re-attach reusing them, detach.
//!
//! Needs root. Without it it fails when `CI=true` and otherwise skips with a printed reason.
#![expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use aya::maps::{Array, Map, MapData};
use redirector_ebpf::{Meta, SCHEMA_VERSION, map_names};
use redirector_user::privilege;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_p2pcdn-redirector");

fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn must(args: &[&str]) {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces joined by a veth pair; deleted (with the pins) on drop, also on panic.
struct Testbed {
    edge: String,
    peer: String,
    pin_root: PathBuf,
}

impl Testbed {
    fn new() -> Self {
        let id = std::process::id();
        let bed = Self {
            edge: format!("rdu{id}e"),
            peer: format!("rdu{id}p"),
            pin_root: PathBuf::from(format!("/sys/fs/bpf/rdu-{id}")),
        };
        must(&["ip", "netns", "add", &bed.edge]);
        must(&["ip", "netns", "add", &bed.peer]);
        must(&[
            "ip", "-n", &bed.edge, "link", "add", "ve", "type", "veth", "peer", "name", "vp",
            "netns", &bed.peer,
        ]);
        must(&[
            "ip",
            "-n",
            &bed.edge,
            "addr",
            "add",
            "10.201.0.1/24",
            "dev",
            "ve",
        ]);
        must(&[
            "ip",
            "-n",
            &bed.peer,
            "addr",
            "add",
            "10.201.0.2/24",
            "dev",
            "vp",
        ]);
        must(&["ip", "-n", &bed.edge, "link", "set", "ve", "up"]);
        must(&["ip", "-n", &bed.peer, "link", "set", "vp", "up"]);
        bed
    }

    /// Runs the CLI in the edge namespace on `ve`.
    fn cli(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.edge))
            .arg("--")
            .arg(BIN)
            .args(["-i", "ve", "--pin-root"])
            .arg(&self.pin_root)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs the CLI with `--json`; panics unless it exits 0.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
    }

    fn dir(&self) -> PathBuf {
        self.pin_root.join("ve")
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.edge]);
        let _ = sh(&["ip", "netns", "del", &self.peer]);
        let _ = std::fs::remove_dir_all(&self.pin_root);
    }
}

fn write_schema(dir: &Path, version: u32) {
    let data = MapData::from_pin(dir.join(map_names::META)).unwrap();
    let mut meta: Array<MapData, Meta> = Map::from_map_data(data).unwrap().try_into().unwrap();
    let mut value = meta.get(&0, 0).unwrap();
    value.schema_version = version;
    meta.set(0, value, 0).unwrap();
}

fn one_line_error(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn attach_program_upgrade_guard_and_detach_through_the_cli() {
    if let Err(e) = privilege::require() {
        let reason = format!("privileged test skipped: {e}");
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{reason} (CI=true: privileged tests must run)"
        );
        eprintln!("{reason}");
        return;
    }
    let bed = Testbed::new();

    let report = bed.json(&["attach"]);
    assert_eq!(report["outcome"], "attached", "{report}");
    assert_eq!(report["mode"], "driver", "veth has native XDP: {report}");
    let first_program = report["program_id"].as_u64().unwrap();
    let forwarding = sh(&[
        "nsenter",
        &format!("--net=/run/netns/{}", bed.edge),
        "cat",
        "/proc/sys/net/ipv4/conf/ve/forwarding",
    ]);
    assert_eq!(String::from_utf8_lossy(&forwarding.stdout).trim(), "1");
    for pin in ["link", "p2pcdn_redirect", "META", "MAGLEV", "FLOWS"] {
        assert!(bed.dir().join(pin).exists(), "{pin} is pinned");
    }
    assert_eq!(bed.json(&["attach"])["outcome"], "already_attached");

    let svc = bed.json(&[
        "service",
        "add",
        "--name",
        "web",
        "--addr",
        "10.201.0.1:80",
        "--rate",
        "50",
        "--ring-size",
        "251",
    ]);
    assert_eq!(svc["name"], "web");
    let peer = bed.json(&["peer", "set", "--name", "p1", "--addr", "10.201.0.2"]);
    assert_eq!(
        peer["src"], "10.201.0.1",
        "source defaults to the interface address"
    );
    let neigh = sh(&["ip", "-n", &bed.edge, "neigh", "show", "10.201.0.2"]);
    let neigh = String::from_utf8_lossy(&neigh.stdout);
    assert!(
        neigh.contains("managed"),
        "managed neighbour entry: {neigh}"
    );
    assert_eq!(bed.json(&["service", "list"])[0]["peers"][0], "p1");

    // Upgrade: a new program in the same link; the maps and their contents stay.
    let report = bed.json(&["attach", "--upgrade"]);
    assert_eq!(report["outcome"], "upgraded");
    assert_ne!(report["program_id"].as_u64().unwrap(), first_program);
    let status = bed.json(&["status"]);
    assert_eq!(status["attached"], true);
    assert_eq!(status["program_id"], report["program_id"]);
    assert_eq!(status["schema_version"], SCHEMA_VERSION);
    assert_eq!(bed.json(&["service", "list"])[0]["name"], "web");

    // Pinned maps of another layout version are refused by every command, with the fix.
    write_schema(&bed.dir(), SCHEMA_VERSION + 7);
    for args in [
        &["service", "list"][..],
        &["attach", "--upgrade"],
        &["stats"],
    ] {
        let out = bed.cli(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let line = one_line_error(&out);
        assert!(
            line.contains(&format!("schema version {}", SCHEMA_VERSION + 7))
                && line.contains(&format!("this build uses {SCHEMA_VERSION}"))
                && line.contains("detach"),
            "{line}"
        );
    }
    write_schema(&bed.dir(), SCHEMA_VERSION);

    // Detach keeping the maps; re-attach picks them up with their contents.
    let report = bed.json(&["detach", "--keep-maps"]);
    assert_eq!(report["link_removed"], true);
    assert_eq!(report["still_attached"], false);
    assert_eq!(bed.json(&["status"])["attached"], false);
    let report = bed.json(&["attach", "--mode", "skb"]);
    assert_eq!(report["reused_maps"], true);
    assert_eq!(report["mode"], "skb");
    assert_eq!(bed.json(&["peer", "list"])[0]["name"], "p1");

    let report = bed.json(&["detach"]);
    assert_eq!(report["maps_removed"], map_names::ALL.len());
    assert!(!bed.dir().exists(), "the pin directory is gone");
    let link = sh(&["ip", "-n", &bed.edge, "link", "show", "ve"]);
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "no XDP program left on ve"
    );
    assert_eq!(bed.json(&["status"])["attached"], false);
    let out = bed.cli(&["service", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(one_line_error(&out).contains("not attached"));

    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", bed.edge))
        .args(["--", BIN, "-i", "nope0", "attach", "--pin-root"])
        .arg(&bed.pin_root)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(one_line_error(&out).contains("unknown network interface"));
}
