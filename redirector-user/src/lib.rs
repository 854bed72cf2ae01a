//! Loader and typed map API for the p2pcdn XDP program, and the `p2pcdn-redirector` CLI.
//!
//! - [`Redirector`] loads the program, attaches it (driver mode, falling back to skb mode),
//!   pins program, link and maps under `<pin-root>/<iface>/`, re-opens that pinned state
//!   (checking the schema version in `META`), upgrades the program atomically and detaches.
//!   [`Redirector::load_unattached`] loads without pinning or attaching, for
//!   `BPF_PROG_TEST_RUN` tests and benchmarks.
//! - [`Dataplane`] is the typed API the controller uses: services, peers (with Maglev rings
//!   written as changed slots only), node settings, the decapsulation allow-list and summed
//!   counters. [`MemoryDataplane`] runs the same logic on in-memory maps, without root.
//!
//! The map layouts are the contract in `redirector_ebpf` (its `src/lib.rs`).

mod dataplane;
mod engine;
mod error;
mod kernel;
pub mod maglev;
mod memory;
mod netlink;
pub mod privilege;
mod redirector;
pub mod spec;
pub mod stats;
mod sys;

pub use dataplane::Dataplane;
pub use error::{BpfError, Error, NEEDED_CAPABILITIES, Result};
pub use memory::MemoryDataplane;
pub use redirector::{
    ActiveMode, AttachMode, AttachOptions, AttachOutcome, AttachReport, DEFAULT_PIN_ROOT,
    DetachReport, LINK_PIN, LoadOptions, Redirector, Status, ensure_bpffs, ifindex, pin_dir,
    validate_iface,
};
pub use spec::{
    ConfigSpec, Encap, PeerInfo, PeerServices, PeerSpec, ServiceInfo, ServiceMode, ServiceSpec,
    parse_ip, parse_service_addr, validate_name,
};
pub use stats::{DecapCounters, GlobalCounters, PeerCounters, ServiceCounters, Stats};

/// The XDP object built by `build.rs` (aya-build, from `redirector-ebpf`).
pub static PROGRAM_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirector"));
