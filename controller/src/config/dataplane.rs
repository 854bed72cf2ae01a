//! `[dataplane]` and `[surrogate]`: the XDP redirector the daemon programs and the surrogate
//! it serves peers' content with.

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

/// `[dataplane]`: the redirector attached to this node's network card (`p2pcdn-redirector
/// attach`). Without this section the daemon is a control plane only: it negotiates but
/// steers nothing and allows no tunnels.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataplaneConfig {
    /// The interface the redirector is attached to.
    pub iface: String,
    /// Where its maps are pinned; default `/sys/fs/bpf/p2pcdn` (state in `<pin_root>/<iface>`).
    #[serde(default = "default_pin_root")]
    pub pin_root: PathBuf,
    /// Primary: install each `[[services]]` entry in the data plane at start, admitting
    /// `capacity_conn_per_s` new connections/s locally; default true. False when the
    /// services are managed with `p2pcdn-redirector service add`.
    #[serde(default = "yes")]
    pub install_services: bool,
    /// Primary: MTU of the paths to providers (steered SYNs get their MSS clamped to fit the
    /// tunnel); default 1500.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// Provider: put primaries' service addresses on `lo` while their arrangements are active
    /// (DSR needs them local); default true.
    #[serde(default = "yes")]
    pub manage_loopback: bool,
}

/// `[surrogate]`: the HTTP server that serves primaries' content under provider arrangements.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SurrogateSection {
    /// Where the surrogate also listens for redirected clients (`/<primary-id>/<path>`);
    /// default none (tunnelled clients reach it on the primaries' service addresses).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Cache directory (disk tier); default `<data_dir>/surrogate`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Memory tier, bytes, all arrangements together; default 256 MiB.
    #[serde(default = "default_memory_bytes")]
    pub memory_bytes: u64,
    /// Disk tier, bytes, all arrangements together; default 10 GiB.
    #[serde(default = "default_disk_bytes")]
    pub disk_bytes: u64,
    /// Largest object accepted per arrangement, bytes; default 1 GiB.
    #[serde(default = "default_max_object_bytes")]
    pub max_object_bytes: u64,
    /// Bytes stored per arrangement (each tier); default 1 GiB.
    #[serde(default = "default_arrangement_bytes")]
    pub arrangement_bytes: u64,
    /// `Access-Control-Allow-Origin` sent with primaries' objects; default none.
    #[serde(default)]
    pub allow_origin: Option<String>,
}

impl Default for SurrogateSection {
    fn default() -> Self {
        Self {
            listen: None,
            dir: None,
            memory_bytes: default_memory_bytes(),
            disk_bytes: default_disk_bytes(),
            max_object_bytes: default_max_object_bytes(),
            arrangement_bytes: default_arrangement_bytes(),
            allow_origin: None,
        }
    }
}

fn default_pin_root() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/p2pcdn")
}

fn yes() -> bool {
    true
}

fn default_mtu() -> u16 {
    1500
}

fn default_memory_bytes() -> u64 {
    256 << 20
}

fn default_disk_bytes() -> u64 {
    10 << 30
}

fn default_max_object_bytes() -> u64 {
    1 << 30
}

fn default_arrangement_bytes() -> u64 {
    1 << 30
}
