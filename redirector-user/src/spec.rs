//! Typed descriptions of services, peers and node settings, their validation, and their
//! conversion to and from the `#[repr(C)]` map values of `redirector_ebpf`.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
};

use redirector_ebpf::{
    AddrKey, CONFIG_DECAP_V4, CONFIG_DECAP_V6, Config, DEFAULT_GUE_PORT, DEFAULT_RING_SIZE,
    ENCAP_GUE, ENCAP_IPIP, MAGLEV_STRIDE, MAX_SERVICES, PEER_ACTIVE, PeerConf, SVC_ACTIVE,
    SVC_STEER, ServiceConf, ServiceKey, family, gcra, proto,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Longest name (the map values keep 32 bytes, NUL padded).
pub const NAME_MAX: usize = 31;

/// `PeerConf::rate` value meaning "no limit" (shown as `unlimited`).
pub const RATE_UNLIMITED: u32 = u32::MAX;
/// Burst used for peers without a rate limit.
const UNLIMITED_BURST: u32 = 1_000_000;

/// Checks a service or peer name: 1 to 31 bytes of `[A-Za-z0-9._-]`.
pub fn validate_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > NAME_MAX {
        "longer than 31 bytes"
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        "only letters, digits, '.', '_' and '-' are allowed"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        name: name.to_owned(),
        reason,
    })
}

/// A validated name as stored in the maps (NUL padded).
pub(crate) fn name_bytes(name: &str) -> Result<[u8; 32]> {
    validate_name(name)?;
    let mut out = [0u8; 32];
    out[..name.len()].copy_from_slice(name.as_bytes());
    Ok(out)
}

/// The name stored in a map value (up to the first NUL; invalid UTF-8 is replaced).
pub(crate) fn name_from_bytes(bytes: &[u8; 32]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Parses a service address: `ADDR:PORT` for IPv4, `[ADDR]:PORT` for IPv6.
pub fn parse_service_addr(text: &str) -> Result<SocketAddr> {
    let addr = SocketAddr::from_str(text.trim()).map_err(|_| {
        Error::invalid(
            "service address",
            text,
            "expected ADDR:PORT, or [ADDR]:PORT for IPv6",
        )
    })?;
    check_unicast("service address", addr.ip())?;
    if addr.port() == 0 {
        return Err(Error::invalid("service address", text, "port 0"));
    }
    Ok(addr)
}

/// Parses an IPv4 or IPv6 address (no port).
pub fn parse_ip(what: &'static str, text: &str) -> Result<IpAddr> {
    let addr = IpAddr::from_str(text.trim())
        .map_err(|_| Error::invalid(what, text, "expected an IPv4 or IPv6 address"))?;
    check_unicast(what, addr)?;
    Ok(addr)
}

fn check_unicast(what: &'static str, addr: IpAddr) -> Result<()> {
    if addr.is_unspecified() || addr.is_multicast() {
        return Err(Error::invalid(what, addr, "not a unicast address"));
    }
    if let IpAddr::V4(v4) = addr
        && v4.is_broadcast()
    {
        return Err(Error::invalid(what, addr, "not a unicast address"));
    }
    Ok(())
}

/// Is `n` prime? (Trial division: ring sizes are at most 65 537.)
pub(crate) fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Checks a Maglev ring size: a prime no larger than `MAGLEV_STRIDE`.
pub fn validate_ring_size(size: u32) -> Result<()> {
    if size > MAGLEV_STRIDE {
        return Err(Error::invalid(
            "ring size",
            size,
            format!("larger than {MAGLEV_STRIDE}"),
        ));
    }
    if !is_prime(size) {
        return Err(Error::invalid("ring size", size, "not a prime"));
    }
    Ok(())
}

/// An address as stored in keys: 16 bytes, IPv4 in bytes `0..4`, and its family.
pub(crate) fn addr_bytes(addr: IpAddr) -> ([u8; 16], u8) {
    match addr {
        IpAddr::V4(v4) => {
            let mut out = [0u8; 16];
            out[..4].copy_from_slice(&v4.octets());
            (out, family::V4)
        }
        IpAddr::V6(v6) => (v6.octets(), family::V6),
    }
}

/// The address stored as `bytes` with family `fam` (`None` for an unknown family).
pub(crate) fn addr_from_bytes(bytes: &[u8; 16], fam: u8) -> Option<IpAddr> {
    match fam {
        family::V4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        family::V6 => Some(IpAddr::V6(Ipv6Addr::from(*bytes))),
        _ => None,
    }
}

/// The `SERVICES` key of one service address (TCP).
pub fn service_key(addr: SocketAddr) -> ServiceKey {
    let (bytes, fam) = addr_bytes(addr.ip());
    ServiceKey {
        addr: bytes,
        port_be: addr.port().to_be(),
        proto: proto::TCP,
        family: fam,
    }
}

/// The service address a `SERVICES` key stands for.
pub fn service_addr(key: &ServiceKey) -> Option<SocketAddr> {
    addr_from_bytes(&key.addr, key.family).map(|ip| SocketAddr::new(ip, u16::from_be(key.port_be)))
}

/// The `DECAP_ALLOW` key of a tunnel sender.
pub fn addr_key(addr: IpAddr) -> AddrKey {
    let (bytes, fam) = addr_bytes(addr);
    AddrKey {
        addr: bytes,
        family: fam,
        _pad0: [0; 3],
    }
}

/// What a service does with connections beyond its local admission rate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceMode {
    /// Steer overflow to peers.
    #[default]
    Steer,
    /// Serve everything locally; nothing is tracked.
    Off,
}

impl FromStr for ServiceMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "steer" => Ok(Self::Steer),
            "off" => Ok(Self::Off),
            _ => Err(Error::invalid("service mode", s, "expected steer or off")),
        }
    }
}

impl fmt::Display for ServiceMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Steer => "steer",
            Self::Off => "off",
        })
    }
}

/// The default burst for a rate: a tenth of a second's worth, at least 1.
pub fn default_burst(rate: u32) -> u32 {
    (rate / 10).max(1)
}

/// A service: the addresses it listens on and how many new connections per second this
/// node admits locally.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// 1 to 31 bytes of `[A-Za-z0-9._-]`; the identity of the service.
    pub name: String,
    /// TCP addresses (IPv4 and/or IPv6) of the service; at least one.
    pub addrs: Vec<SocketAddr>,
    pub mode: ServiceMode,
    /// New connections per second admitted locally (0: none, everything is overflow).
    pub rate: u32,
    /// Connections admitted at once; `None`: [`default_burst`] of `rate`.
    pub burst: Option<u32>,
    /// Per-source (IPv4 /32, IPv6 /64) new connections per second; `None`: no flood guard.
    pub guard_rate: Option<u32>,
    /// Per-source burst; `None`: [`default_burst`] of `guard_rate`.
    pub guard_burst: Option<u32>,
    /// Maglev ring size: a prime no larger than `MAGLEV_STRIDE` (default 65 537).
    pub ring_size: u32,
}

impl ServiceSpec {
    /// A steering service with default burst, no flood guard and the default ring size.
    pub fn new(name: impl Into<String>, addrs: Vec<SocketAddr>, rate: u32) -> Self {
        Self {
            name: name.into(),
            addrs,
            mode: ServiceMode::Steer,
            rate,
            burst: None,
            guard_rate: None,
            guard_burst: None,
            ring_size: DEFAULT_RING_SIZE,
        }
    }

    /// Checks everything that does not depend on other services.
    pub fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        if self.addrs.is_empty() {
            return Err(Error::invalid(
                "service",
                &self.name,
                "needs at least one address",
            ));
        }
        for addr in &self.addrs {
            check_unicast("service address", addr.ip())?;
            if addr.port() == 0 {
                return Err(Error::invalid("service address", addr, "port 0"));
            }
        }
        if self.burst == Some(0) {
            return Err(Error::invalid("burst", 0, "must be at least 1"));
        }
        if self.guard_rate == Some(0) {
            return Err(Error::invalid(
                "guard rate",
                0,
                "must be at least 1 (omit it to disable the guard)",
            ));
        }
        if self.guard_burst == Some(0) {
            return Err(Error::invalid("guard burst", 0, "must be at least 1"));
        }
        if self.guard_burst.is_some() && self.guard_rate.is_none() {
            return Err(Error::invalid(
                "guard burst",
                self.guard_burst.unwrap_or_default(),
                "needs a guard rate",
            ));
        }
        validate_ring_size(self.ring_size)
    }

    /// The `SVC_CONF` value of this service (validated).
    pub fn to_conf(&self) -> Result<ServiceConf> {
        self.validate()?;
        let burst = self.burst.unwrap_or_else(|| default_burst(self.rate));
        let (local_interval_ns, local_burst_ns) = gcra(self.rate, burst);
        let (guard_rate, guard_burst, guard_interval_ns, guard_burst_ns) = match self.guard_rate {
            Some(rate) => {
                let burst = self.guard_burst.unwrap_or_else(|| default_burst(rate));
                let (interval, burst_ns) = gcra(rate, burst);
                (rate, burst, interval, burst_ns)
            }
            None => (0, 0, 0, 0),
        };
        let mut flags = SVC_ACTIVE;
        if self.mode == ServiceMode::Steer {
            flags |= SVC_STEER;
        }
        Ok(ServiceConf {
            flags,
            ring_size: self.ring_size,
            local_interval_ns,
            local_burst_ns,
            guard_interval_ns,
            guard_burst_ns,
            rate: self.rate,
            burst,
            guard_rate,
            guard_burst,
            name: name_bytes(&self.name)?,
        })
    }
}

/// Tunnel encapsulation towards a peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encap {
    /// GUE variant 1 (UDP, source port from the flow hash).
    #[default]
    Gue,
    /// IP-in-IP (IPIP, 4in6, 6in4 or IP6IP6 by families).
    Ipip,
}

impl FromStr for Encap {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gue" => Ok(Self::Gue),
            "ipip" => Ok(Self::Ipip),
            _ => Err(Error::invalid("encapsulation", s, "expected gue or ipip")),
        }
    }
}

impl fmt::Display for Encap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Gue => "gue",
            Self::Ipip => "ipip",
        })
    }
}

/// Which services a peer takes overflow of.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerServices {
    /// Every service, including those added later.
    #[default]
    All,
    /// The named services only.
    Only(Vec<String>),
}

impl FromStr for PeerServices {
    type Err = Error;
    /// `all`, or a comma-separated list of service names.
    fn from_str(s: &str) -> Result<Self> {
        if s.trim() == "all" {
            return Ok(Self::All);
        }
        let names: Vec<String> = s.split(',').map(|n| n.trim().to_owned()).collect();
        for name in &names {
            validate_name(name)?;
        }
        Ok(Self::Only(names))
    }
}

/// `PeerConf::services` value meaning "every service, now and later".
pub(crate) const ALL_SERVICES_MASK: u64 = if MAX_SERVICES >= 64 {
    u64::MAX
} else {
    (1u64 << MAX_SERVICES) - 1
};

/// A peer server taking steered connections through a tunnel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSpec {
    /// 1 to 31 bytes of `[A-Za-z0-9._-]`; the identity of the peer (its Maglev positions
    /// derive from it, so they survive restarts and slot changes).
    pub name: String,
    /// The peer's decapsulation address (outer destination).
    pub addr: IpAddr,
    /// This edge's address towards the peer (outer source); `None`: the interface's own
    /// address of the same family.
    pub src: Option<IpAddr>,
    pub encap: Encap,
    /// GUE destination port at the peer.
    pub gue_port: u16,
    /// Maglev weight; 0 keeps the peer configured but gives it no new connections.
    pub weight: u32,
    /// Negotiated new connections per second; `None`: no limit.
    pub rate: Option<u32>,
    /// Connections at once; `None`: [`default_burst`] of the rate.
    pub burst: Option<u32>,
    /// MTU of the path to the peer (steered SYNs get their MSS clamped to fit it).
    pub mtu: u16,
    pub services: PeerServices,
}

impl PeerSpec {
    /// A GUE peer with weight 1, no rate limit, MTU 1500, serving every service.
    pub fn new(name: impl Into<String>, addr: IpAddr) -> Self {
        Self {
            name: name.into(),
            addr,
            src: None,
            encap: Encap::Gue,
            gue_port: DEFAULT_GUE_PORT,
            weight: 1,
            rate: None,
            burst: None,
            mtu: 1500,
            services: PeerServices::All,
        }
    }

    /// Checks everything that does not depend on the node (services, source address).
    pub fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        check_unicast("peer address", self.addr)?;
        if let Some(src) = self.src {
            check_unicast("source address", src)?;
            if src.is_ipv4() != self.addr.is_ipv4() {
                return Err(Error::invalid(
                    "source address",
                    src,
                    format!("not of the same family as the peer address {}", self.addr),
                ));
            }
        }
        if self.encap == Encap::Gue && self.gue_port == 0 {
            return Err(Error::invalid("GUE port", 0, "port 0"));
        }
        let min_mtu = if self.addr.is_ipv4() { 576 } else { 1280 };
        if self.mtu < min_mtu {
            return Err(Error::invalid(
                "MTU",
                self.mtu,
                format!("below the minimum of {min_mtu} for this family"),
            ));
        }
        if self.rate == Some(RATE_UNLIMITED) {
            return Err(Error::invalid(
                "rate",
                RATE_UNLIMITED,
                "reserved for \"no limit\" (omit the rate instead)",
            ));
        }
        if self.burst == Some(0) {
            return Err(Error::invalid("burst", 0, "must be at least 1"));
        }
        Ok(())
    }

    /// The `PEERS` value of this peer, given its resolved source address and services
    /// bitmask. `flags` and `generation` are left for the caller.
    pub(crate) fn to_conf(&self, src: IpAddr, services: u64) -> Result<PeerConf> {
        self.validate()?;
        if src.is_ipv4() != self.addr.is_ipv4() {
            return Err(Error::invalid(
                "source address",
                src,
                format!("not of the same family as the peer address {}", self.addr),
            ));
        }
        let (rate, burst, interval_ns, burst_ns) = match self.rate {
            Some(rate) => {
                let burst = self.burst.unwrap_or_else(|| default_burst(rate));
                let (interval, burst_ns) = gcra(rate, burst);
                (rate, burst, interval, burst_ns)
            }
            None => {
                let burst = self.burst.unwrap_or(UNLIMITED_BURST);
                let (interval, burst_ns) = gcra(RATE_UNLIMITED, burst);
                (RATE_UNLIMITED, burst, interval, burst_ns)
            }
        };
        let (addr, fam) = addr_bytes(self.addr);
        let (src, _) = addr_bytes(src);
        Ok(PeerConf {
            flags: PEER_ACTIVE,
            generation: 0,
            encap: match self.encap {
                Encap::Gue => ENCAP_GUE,
                Encap::Ipip => ENCAP_IPIP,
            },
            family: fam,
            gue_port_be: self.gue_port.to_be(),
            mtu: self.mtu,
            _pad0: [0; 2],
            addr,
            src,
            interval_ns,
            burst_ns,
            rate,
            burst,
            weight: self.weight,
            _pad1: [0; 4],
            services,
            name: name_bytes(&self.name)?,
        })
    }
}

/// Node-wide settings (`CONFIG[0]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSpec {
    /// Accept tunnels to this IPv4 address (peer role); `None`: no IPv4 decapsulation.
    pub decap_v4: Option<Ipv4Addr>,
    /// Accept tunnels to this IPv6 address (peer role); `None`: no IPv6 decapsulation.
    pub decap_v6: Option<Ipv6Addr>,
    /// UDP port on which this node accepts GUE (default 6080).
    pub gue_port: u16,
    /// New flow-table entries allowed per CPU per second (0: no ceiling).
    pub flow_ceiling: u32,
}

impl Default for ConfigSpec {
    fn default() -> Self {
        Self {
            decap_v4: None,
            decap_v6: None,
            gue_port: DEFAULT_GUE_PORT,
            flow_ceiling: 0,
        }
    }
}

impl ConfigSpec {
    /// The `CONFIG[0]` value.
    pub fn to_config(&self) -> Result<Config> {
        if self.gue_port == 0 {
            return Err(Error::invalid("GUE port", 0, "port 0"));
        }
        for addr in [self.decap_v4.map(IpAddr::V4), self.decap_v6.map(IpAddr::V6)]
            .into_iter()
            .flatten()
        {
            check_unicast("decapsulation address", addr)?;
        }
        let mut config = Config {
            gue_port_be: self.gue_port.to_be(),
            flow_ceiling: self.flow_ceiling,
            ..Config::default()
        };
        if let Some(v4) = self.decap_v4 {
            config.flags |= CONFIG_DECAP_V4;
            config.decap_v4 = v4.octets();
        }
        if let Some(v6) = self.decap_v6 {
            config.flags |= CONFIG_DECAP_V6;
            config.decap_v6 = v6.octets();
        }
        Ok(config)
    }

    /// Reads a `CONFIG[0]` value back.
    pub fn from_config(config: &Config) -> Self {
        Self {
            decap_v4: (config.flags & CONFIG_DECAP_V4 != 0)
                .then(|| Ipv4Addr::from(config.decap_v4)),
            decap_v6: (config.flags & CONFIG_DECAP_V6 != 0)
                .then(|| Ipv6Addr::from(config.decap_v6)),
            gue_port: u16::from_be(config.gue_port_be),
            flow_ceiling: config.flow_ceiling,
        }
    }
}

/// A configured service, as read back from the maps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub id: u32,
    pub name: String,
    pub addrs: Vec<SocketAddr>,
    pub mode: ServiceMode,
    pub rate: u32,
    pub burst: u32,
    /// `None`: no flood guard.
    pub guard_rate: Option<u32>,
    pub guard_burst: Option<u32>,
    pub ring_size: u32,
    /// Names of the peers in the service's Maglev ring (active, weight > 0, serving it).
    pub peers: Vec<String>,
}

impl ServiceInfo {
    /// The spec that reproduces this service.
    pub fn to_spec(&self) -> ServiceSpec {
        ServiceSpec {
            name: self.name.clone(),
            addrs: self.addrs.clone(),
            mode: self.mode,
            rate: self.rate,
            burst: Some(self.burst),
            guard_rate: self.guard_rate,
            guard_burst: self.guard_burst,
            ring_size: self.ring_size,
        }
    }
}

pub(crate) fn service_info(
    id: u32,
    conf: &ServiceConf,
    mut addrs: Vec<SocketAddr>,
    peers: Vec<String>,
) -> ServiceInfo {
    addrs.sort();
    let guard = conf.guard_interval_ns != 0;
    ServiceInfo {
        id,
        name: name_from_bytes(&conf.name),
        addrs,
        mode: if conf.flags & SVC_STEER != 0 {
            ServiceMode::Steer
        } else {
            ServiceMode::Off
        },
        rate: conf.rate,
        burst: conf.burst,
        guard_rate: guard.then_some(conf.guard_rate),
        guard_burst: guard.then_some(conf.guard_burst),
        ring_size: conf.ring_size,
        peers,
    }
}

/// A configured peer, as read back from the maps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub slot: u32,
    pub name: String,
    pub addr: IpAddr,
    pub src: IpAddr,
    pub encap: Encap,
    pub gue_port: u16,
    pub weight: u32,
    /// `None`: no limit.
    pub rate: Option<u32>,
    pub burst: u32,
    pub mtu: u16,
    pub services: PeerServices,
    /// Bumped each time the slot gets a new peer.
    pub generation: u32,
}

impl PeerInfo {
    /// The spec that reproduces this peer.
    pub fn to_spec(&self) -> PeerSpec {
        PeerSpec {
            name: self.name.clone(),
            addr: self.addr,
            src: Some(self.src),
            encap: self.encap,
            gue_port: self.gue_port,
            weight: self.weight,
            rate: self.rate,
            burst: Some(self.burst),
            mtu: self.mtu,
            services: self.services.clone(),
        }
    }
}

/// `service_names[i]` is the name of service `i` if it exists.
pub(crate) fn peer_info(
    slot: u32,
    conf: &PeerConf,
    service_names: &[Option<String>],
) -> Option<PeerInfo> {
    if conf.flags & PEER_ACTIVE == 0 {
        return None;
    }
    let services = if conf.services == ALL_SERVICES_MASK {
        PeerServices::All
    } else {
        PeerServices::Only(
            service_names
                .iter()
                .enumerate()
                .filter(|(i, _)| *i < 64 && conf.services & (1u64 << i) != 0)
                .filter_map(|(_, n)| n.clone())
                .collect(),
        )
    };
    Some(PeerInfo {
        slot,
        name: name_from_bytes(&conf.name),
        addr: addr_from_bytes(&conf.addr, conf.family)?,
        src: addr_from_bytes(&conf.src, conf.family)?,
        encap: if conf.encap == ENCAP_IPIP {
            Encap::Ipip
        } else {
            Encap::Gue
        },
        gue_port: u16::from_be(conf.gue_port_be),
        weight: conf.weight,
        rate: (conf.rate != RATE_UNLIMITED).then_some(conf.rate),
        burst: conf.burst,
        mtu: conf.mtu,
        services,
        generation: conf.generation,
    })
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic with a message on failure"
)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["a", "edge-1", "svc.v2_b", &"x".repeat(31)] {
            validate_name(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in ["", &"x".repeat(32), "a b", "ümlaut", "a/b", "a,b"] {
            let err = validate_name(bad).expect_err(bad);
            assert!(matches!(err, Error::InvalidName { .. }), "{bad}: {err}");
            assert!(err.is_bad_input());
        }
    }

    #[test]
    fn names_round_trip_through_map_bytes() {
        let bytes = name_bytes("peer-7").unwrap();
        assert_eq!(&bytes[..6], b"peer-7");
        assert!(bytes[6..].iter().all(|&b| b == 0));
        assert_eq!(name_from_bytes(&bytes), "peer-7");
        let full = name_bytes(&"z".repeat(31)).unwrap();
        assert_eq!(full[31], 0, "the last byte stays a NUL terminator");
    }

    #[test]
    fn service_addresses_parse_v4_and_bracketed_v6() {
        assert_eq!(
            parse_service_addr("10.0.0.1:80").unwrap(),
            "10.0.0.1:80".parse::<SocketAddr>().unwrap()
        );
        let v6 = parse_service_addr("[2001:db8::1]:443").unwrap();
        assert_eq!(v6.ip(), "2001:db8::1".parse::<IpAddr>().unwrap());
        assert_eq!(v6.port(), 443);
        for bad in [
            "10.0.0.1",
            "2001:db8::1:443",
            "10.0.0.1:0",
            "10.0.0.1:65536",
            "host:80",
            "0.0.0.0:80",
            "[::]:80",
            "224.0.0.1:80",
            "",
        ] {
            let err = parse_service_addr(bad).expect_err(bad);
            assert!(err.is_bad_input(), "{bad}: {err}");
            assert!(!err.to_string().contains('\n'));
        }
    }

    #[test]
    fn plain_addresses_parse() {
        assert!(parse_ip("peer address", "192.0.2.7").unwrap().is_ipv4());
        assert!(parse_ip("peer address", "2001:db8::7").unwrap().is_ipv6());
        let err = parse_ip("peer address", "192.0.2.7:80").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid peer address \"192.0.2.7:80\": expected an IPv4 or IPv6 address"
        );
    }

    #[test]
    fn ring_sizes_must_be_prime_and_fit_the_stride() {
        for good in [2, 3, 13, 251, 65_537] {
            validate_ring_size(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [0, 1, 4, 65_536, 65_539, 100_003] {
            assert!(validate_ring_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn service_spec_becomes_gcra_parameters() {
        let mut spec = ServiceSpec::new("web", vec!["10.0.0.1:80".parse().unwrap()], 50);
        spec.burst = Some(10);
        spec.guard_rate = Some(5);
        let conf = spec.to_conf().unwrap();
        assert_eq!(conf.flags, SVC_ACTIVE | SVC_STEER);
        assert_eq!((conf.local_interval_ns, conf.local_burst_ns), gcra(50, 10));
        assert_eq!(conf.local_interval_ns, 20_000_000);
        assert_eq!((conf.rate, conf.burst), (50, 10));
        assert_eq!((conf.guard_rate, conf.guard_burst), (5, 1));
        assert_eq!((conf.guard_interval_ns, conf.guard_burst_ns), gcra(5, 1));
        assert_eq!(conf.ring_size, DEFAULT_RING_SIZE);
        assert_eq!(name_from_bytes(&conf.name), "web");

        spec.mode = ServiceMode::Off;
        spec.guard_rate = None;
        let conf = spec.to_conf().unwrap();
        assert_eq!(conf.flags, SVC_ACTIVE, "mode off clears SVC_STEER");
        assert_eq!(
            conf.guard_interval_ns, 0,
            "no guard rate disables the guard"
        );

        let info = service_info(3, &conf, spec.addrs.clone(), vec![]);
        assert_eq!(info.to_spec().to_conf().unwrap(), conf, "round trip");
    }

    #[test]
    fn default_burst_is_a_tenth_of_a_second() {
        let spec = ServiceSpec::new("web", vec!["10.0.0.1:80".parse().unwrap()], 50);
        assert_eq!(spec.to_conf().unwrap().burst, 5);
        assert_eq!(default_burst(3), 1);
        let zero = ServiceSpec::new("web", vec!["10.0.0.1:80".parse().unwrap()], 0);
        assert_eq!(
            zero.to_conf().unwrap().local_burst_ns,
            0,
            "rate 0 admits nothing locally"
        );
    }

    #[test]
    fn bad_service_specs_are_refused() {
        let ok = ServiceSpec::new("web", vec!["10.0.0.1:80".parse().unwrap()], 50);
        let mut s = ok.clone();
        s.addrs.clear();
        assert!(s.validate().is_err());
        let mut s = ok.clone();
        s.ring_size = 1000;
        assert!(s.validate().is_err());
        let mut s = ok.clone();
        s.guard_burst = Some(3);
        assert!(s.validate().is_err(), "guard burst without guard rate");
        let mut s = ok;
        s.name = "no spaces".into();
        assert!(matches!(s.validate(), Err(Error::InvalidName { .. })));
    }

    #[test]
    fn service_keys_use_network_order_and_v4_in_the_first_bytes() {
        let key = service_key("10.1.2.3:8080".parse().unwrap());
        assert_eq!(&key.addr[..4], &[10, 1, 2, 3]);
        assert!(key.addr[4..].iter().all(|&b| b == 0));
        assert_eq!(key.port_be, 8080u16.to_be());
        assert_eq!(key.port_be.to_ne_bytes(), [0x1f, 0x90], "wire order");
        assert_eq!((key.proto, key.family), (proto::TCP, family::V4));
        let v6: SocketAddr = "[2001:db8::5]:443".parse().unwrap();
        let key6 = service_key(v6);
        assert_eq!(key6.family, family::V6);
        assert_eq!(service_addr(&key6), Some(v6));
    }

    #[test]
    fn peer_spec_becomes_peer_conf_and_back() {
        let mut spec = PeerSpec::new("p1", "192.0.2.10".parse().unwrap());
        spec.rate = Some(200);
        spec.weight = 3;
        spec.encap = Encap::Ipip;
        spec.mtu = 1400;
        let src: IpAddr = "192.0.2.1".parse().unwrap();
        let conf = spec.to_conf(src, 0b101).unwrap();
        assert_eq!(conf.flags, PEER_ACTIVE);
        assert_eq!(conf.encap, ENCAP_IPIP);
        assert_eq!(conf.family, family::V4);
        assert_eq!(&conf.addr[..4], &[192, 0, 2, 10]);
        assert_eq!(&conf.src[..4], &[192, 0, 2, 1]);
        assert_eq!((conf.interval_ns, conf.burst_ns), gcra(200, 20));
        assert_eq!(conf.weight, 3);
        assert_eq!(conf.services, 0b101);
        assert_eq!(conf.mtu, 1400);

        let names = vec![
            Some("a".to_owned()),
            Some("b".to_owned()),
            Some("c".to_owned()),
        ];
        let info = peer_info(7, &conf, &names).unwrap();
        assert_eq!(
            info.services,
            PeerServices::Only(vec!["a".into(), "c".into()])
        );
        assert_eq!(info.rate, Some(200));
        assert_eq!(info.src, src);
        let again = info.to_spec().to_conf(src, 0b101).unwrap();
        assert_eq!(again, conf);
    }

    #[test]
    fn peers_without_rate_are_unlimited() {
        let spec = PeerSpec::new("p1", "2001:db8::10".parse().unwrap());
        let conf = spec
            .to_conf("2001:db8::1".parse().unwrap(), ALL_SERVICES_MASK)
            .unwrap();
        assert_eq!(conf.rate, RATE_UNLIMITED);
        assert_eq!(conf.interval_ns, 1);
        assert_eq!(conf.gue_port_be, DEFAULT_GUE_PORT.to_be());
        let info = peer_info(0, &conf, &[]).unwrap();
        assert_eq!(info.rate, None);
        assert_eq!(info.services, PeerServices::All);
    }

    #[test]
    fn bad_peer_specs_are_refused() {
        let ok = PeerSpec::new("p1", "192.0.2.10".parse().unwrap());
        let mut p = ok.clone();
        p.src = Some("2001:db8::1".parse().unwrap());
        assert!(p.validate().is_err(), "mixed families");
        let mut p = ok.clone();
        p.mtu = 100;
        assert!(p.validate().is_err());
        let mut p = ok.clone();
        p.gue_port = 0;
        assert!(p.validate().is_err());
        p.encap = Encap::Ipip;
        assert!(
            p.validate().is_ok(),
            "the GUE port does not matter for IPIP"
        );
        let mut p = ok;
        p.addr = "0.0.0.0".parse().unwrap();
        assert!(p.validate().is_err());
    }

    #[test]
    fn services_lists_parse() {
        assert_eq!("all".parse::<PeerServices>().unwrap(), PeerServices::All);
        assert_eq!(
            "a,b".parse::<PeerServices>().unwrap(),
            PeerServices::Only(vec!["a".into(), "b".into()])
        );
        assert!("a,,b".parse::<PeerServices>().is_err());
    }

    #[test]
    fn config_round_trips() {
        let spec = ConfigSpec {
            decap_v4: Some("192.0.2.50".parse().unwrap()),
            decap_v6: None,
            gue_port: 7777,
            flow_ceiling: 10_000,
        };
        let config = spec.to_config().unwrap();
        assert_eq!(config.flags, CONFIG_DECAP_V4);
        assert_eq!(config.decap_v4, [192, 0, 2, 50]);
        assert_eq!(config.gue_port_be.to_ne_bytes(), 7777u16.to_be_bytes());
        assert_eq!(ConfigSpec::from_config(&config), spec);
        let zero = ConfigSpec {
            gue_port: 0,
            ..ConfigSpec::default()
        };
        assert!(zero.to_config().is_err());
    }
}
