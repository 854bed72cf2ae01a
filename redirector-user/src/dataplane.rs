//! The typed operations on the data plane, behind a trait so control-plane logic can run
//! against [`MemoryDataplane`](crate::MemoryDataplane) without root.

use std::net::IpAddr;

use crate::{
    error::Result,
    spec::{ConfigSpec, PeerInfo, PeerSpec, ServiceInfo, ServiceSpec},
    stats::{DecapCounters, Stats},
};

/// What the controller (and the CLI) can do to the data plane.
///
/// Implemented by [`Redirector`](crate::Redirector) (the kernel maps) and by
/// [`MemoryDataplane`](crate::MemoryDataplane) (the same logic over in-memory maps). One
/// writer at a time: implementations cache the configured services and peers.
pub trait Dataplane {
    /// Node-wide settings.
    fn config(&self) -> Result<ConfigSpec>;
    /// Replaces the node-wide settings.
    fn set_config(&mut self, config: &ConfigSpec) -> Result<()>;

    /// Creates the service, or updates the one with the same name; returns its id. The
    /// service becomes visible to the kernel only once its Maglev ring is written.
    fn upsert_service(&mut self, spec: &ServiceSpec) -> Result<u32>;
    /// Removes a service, its flows and its flood-guard state.
    fn remove_service(&mut self, name: &str) -> Result<()>;
    /// Configured services, by id.
    fn services(&self) -> Result<Vec<ServiceInfo>>;

    /// Creates the peer, or updates the one with the same name; returns its slot. Rewrites
    /// the changed slots of the Maglev rings of the services it serves (or served).
    fn set_peer(&mut self, spec: &PeerSpec) -> Result<u32>;
    /// Removes a peer: it gets no new connection and its established flows are dropped
    /// from the flow table (their next packets are served locally).
    fn remove_peer(&mut self, name: &str) -> Result<()>;
    /// Configured peers, by slot.
    fn peers(&self) -> Result<Vec<PeerInfo>>;

    /// Accepts tunnels from `addr`; false if it was already allowed.
    fn allow_decap(&mut self, addr: IpAddr) -> Result<bool>;
    /// Stops accepting tunnels from `addr`; false if it was not allowed.
    fn deny_decap(&mut self, addr: IpAddr) -> Result<bool>;
    /// Senders allowed to tunnel to this node.
    fn decap_allowed(&self) -> Result<Vec<IpAddr>>;
    /// Every allowed sender with what was decapsulated from it (summed across CPUs), by
    /// address. `bytes` counts inner IP packets, the measure of the primary's per-peer
    /// `bytes` for the same packets. Denying a sender drops its counters; allowing one
    /// already allowed keeps them.
    fn decap_stats(&self) -> Result<Vec<DecapCounters>>;

    /// Counters summed across CPUs.
    fn stats(&self) -> Result<Stats>;
}
