//! Drives the real `p2pcdn-redirector` CLI inside a testbed host's namespace.
//!
//! The binary belongs to another package (`redirector-user`), so cargo does not build it
//! for this crate's tests: [`binary`] finds it (`P2PCDN_REDIRECTOR`), or builds it once with
//! the cargo that runs the tests, in the same profile.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::OnceLock,
};

use serde::Deserialize;

use crate::netns::Host;

/// Names the binary to use instead of building it.
pub const BINARY_VAR: &str = "P2PCDN_REDIRECTOR";

/// Errors of finding and running the CLI.
#[derive(Debug, thiserror::Error)]
pub enum RedirectorError {
    #[error("cannot run {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` exited with {status}: {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("`{command}` printed JSON that does not match the stats contract: {source}\n{json}")]
    BadJson {
        command: String,
        json: String,
        source: serde_json::Error,
    },
    #[error("building p2pcdn-redirector failed: {0}")]
    Build(String),
}

/// Path of the `p2pcdn-redirector` binary: `$P2PCDN_REDIRECTOR`, or built once per process
/// with `cargo build -p redirector-user --bin p2pcdn-redirector` (release if this program
/// is a release build) so it is never stale.
pub fn binary() -> Result<PathBuf, RedirectorError> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            if let Some(path) = std::env::var_os(BINARY_VAR) {
                return Ok(PathBuf::from(path));
            }
            build().map_err(|e| e.to_string())
        })
        .clone()
        .map_err(RedirectorError::Build)
}

fn build() -> Result<PathBuf, RedirectorError> {
    let release = std::env::current_exe()
        .ok()
        .is_some_and(|exe| exe.components().any(|c| c.as_os_str() == "release"));
    // The workspace root: this crate's manifest directory is `<root>/tests`.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root).args([
        "build",
        "-p",
        "redirector-user",
        "--bin",
        "p2pcdn-redirector",
        "--message-format=json-render-diagnostics",
    ]);
    if release {
        cmd.arg("--release");
    }
    let output = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| RedirectorError::Spawn {
            command: "cargo build -p redirector-user".to_owned(),
            source,
        })?;
    if !output.status.success() {
        return Err(RedirectorError::Build(format!(
            "cargo build exited with {}",
            output.status
        )));
    }
    // The last compiler-artifact message of the bin names the executable.
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|msg| msg.get("executable")?.as_str().map(PathBuf::from))
        .next_back()
        .ok_or_else(|| RedirectorError::Build("cargo named no executable".to_owned()))
}

/// The CLI bound to one host: its namespace, interface and pin root.
#[derive(Clone, Debug)]
pub struct Redirector {
    pub binary: PathBuf,
    pub ns: String,
    pub iface: String,
    pub pin_root: PathBuf,
}

impl Redirector {
    /// The CLI for `host` (its `eth0`, its own pin root).
    pub fn for_host(binary: &Path, host: &Host) -> Self {
        Self {
            binary: binary.to_owned(),
            ns: host.ns.clone(),
            iface: host.iface.clone(),
            pin_root: host.pin_root.clone(),
        }
    }

    /// `nsenter --net=/run/netns/NS p2pcdn-redirector -i IFACE --pin-root DIR ARGS...`.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = crate::netns::ns_command(&self.ns, &self.binary);
        cmd.arg("-i")
            .arg(&self.iface)
            .arg("--pin-root")
            .arg(&self.pin_root)
            .args(args);
        cmd
    }

    /// Runs the CLI and returns its output whatever the exit status.
    pub fn output(&self, args: &[&str]) -> Result<Output, RedirectorError> {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| RedirectorError::Spawn {
                command: self.describe(args),
                source,
            })
    }

    /// Runs the CLI; an error (with its stderr) unless it exits 0. Returns stdout.
    pub fn run(&self, args: &[&str]) -> Result<String, RedirectorError> {
        let output = self.output(args)?;
        if !output.status.success() {
            return Err(RedirectorError::Failed {
                command: self.describe(args),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `stats --json`, parsed.
    pub fn stats(&self) -> Result<Stats, RedirectorError> {
        let args = ["--json", "stats"];
        let json = self.run(&args)?;
        serde_json::from_str(&json).map_err(|source| RedirectorError::BadJson {
            command: self.describe(&args),
            json,
            source,
        })
    }

    /// `p2pcdn-redirector -i eth0 ARGS` as a person would type it in the namespace.
    pub fn describe(&self, args: &[&str]) -> String {
        format!(
            "p2pcdn-redirector -i {} --pin-root {} {} (in {})",
            self.iface,
            self.pin_root.display(),
            args.join(" "),
            self.ns
        )
    }
}

/// `stats --json` (the CLI contract; fields added later are ignored).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Stats {
    pub global: GlobalStats,
    pub services: Vec<ServiceStats>,
    pub peers: Vec<PeerStats>,
    /// Per allowed sender (schema 3 on); empty when the CLI printed none.
    #[serde(default)]
    pub decap: Vec<DecapStats>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct GlobalStats {
    pub unparsed: u64,
    pub decap_pkts: u64,
    pub decap_bytes: u64,
    pub decap_denied: u64,
    pub fib_no_neigh: u64,
    pub fib_failed: u64,
    pub encap_failed: u64,
    pub stale_peer: u64,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct ServiceStats {
    pub name: String,
    pub id: u32,
    pub syn_local: u64,
    pub syn_steered: u64,
    pub kept_local: u64,
    pub pkts_local: u64,
    pub bytes_local: u64,
    pub pkts_steered: u64,
    pub bytes_steered: u64,
    pub flow_misses: u64,
    pub guard_drops: u64,
    pub ceiling_hits: u64,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct PeerStats {
    pub name: String,
    pub slot: u32,
    pub connections: u64,
    pub packets: u64,
    pub bytes: u64,
    pub no_token: u64,
}

/// What a peer decapsulated from one allowed sender.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct DecapStats {
    pub addr: IpAddr,
    pub packets: u64,
    pub bytes: u64,
}

impl Stats {
    /// What was decapsulated from `addr` (`None` if it is not an allowed sender).
    pub fn decap_from(&self, addr: IpAddr) -> Option<&DecapStats> {
        self.decap.iter().find(|d| d.addr == addr)
    }

    pub fn service(&self, name: &str) -> Option<&ServiceStats> {
        self.services.iter().find(|s| s.name == name)
    }

    pub fn peer(&self, name: &str) -> Option<&PeerStats> {
        self.peers.iter().find(|p| p.name == name)
    }

    /// Connections steered to `name` (0 if it is not listed, e.g. after `peer remove`).
    pub fn peer_connections(&self, name: &str) -> u64 {
        self.peer(name).map_or(0, |p| p.connections)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_json_of_the_contract_parses() {
        let json = r#"{"global":{"unparsed":1,"decap_pkts":2,"decap_bytes":3,"decap_denied":4,
            "fib_no_neigh":5,"fib_failed":6,"encap_failed":7,"stale_peer":8},
            "services":[{"name":"web","id":0,"syn_local":10,"syn_steered":20,"kept_local":1,
            "pkts_local":1,"bytes_local":1,"pkts_steered":1,"bytes_steered":1,"flow_misses":0,
            "guard_drops":0,"ceiling_hits":0}],
            "peers":[{"name":"peer1","slot":0,"connections":7,"packets":1,"bytes":1,
            "no_token":0,"extra":"ignored"}],
            "decap":[{"addr":"10.0.0.1","packets":3,"bytes":180}]}"#;
        let stats: Stats = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(stats.global.decap_denied, 4);
        assert_eq!(stats.service("web").map(|s| s.syn_steered), Some(20));
        assert_eq!(stats.peer_connections("peer1"), 7);
        assert_eq!(stats.peer_connections("gone"), 0);
        let from = stats.decap_from("10.0.0.1".parse().unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(from.map(|d| (d.packets, d.bytes)), Some((3, 180)));
        assert!(
            stats
                .decap_from("10.0.0.2".parse().unwrap_or_else(|e| panic!("{e}")))
                .is_none()
        );
    }

    #[test]
    fn commands_enter_the_namespace_with_nsenter() {
        let r = Redirector {
            binary: PathBuf::from("/bin/p2pcdn-redirector"),
            ns: "p2p-1-0-edge".to_owned(),
            iface: "eth0".to_owned(),
            pin_root: PathBuf::from("/sys/fs/bpf/p2p-1-0/edge"),
        };
        let cmd = r.command(&["status"]);
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(cmd.get_program(), "nsenter");
        assert_eq!(
            args,
            [
                "--net=/run/netns/p2p-1-0-edge",
                "--",
                "/bin/p2pcdn-redirector",
                "-i",
                "eth0",
                "--pin-root",
                "/sys/fs/bpf/p2p-1-0/edge",
                "status"
            ]
        );
    }
}
