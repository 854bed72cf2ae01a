//! The data-plane scenario of the netns integration test and of `cargo xtask demo`.
//!
//! ```text
//!                 switch namespace: br0
//!   ┌────────┬──────────┼──────────┬──────────┐
//! client    edge      peer1      peer2      peer3
//! .1        .2 XDP    .3 XDP     .4 XDP     .5 XDP      (10.99.0.0/24, fd00:99::/64)
//!           lo: service 10.99.100.1 and fd00:99:100::1 on edge and every peer
//! ```
//!
//! The client routes the service addresses via the edge. The edge's XDP program admits new
//! connections up to the local rate and tunnels the overflow to the peers (peer1 over GUE
//! and peer2 over IPIP/6in4, both IPv4 outside; peer3, once added, over GUE with an IPv6
//! outer header); each peer's XDP program decapsulates
//! tunnels from the edge (its allow-list) and its own server on the service address
//! answers the client directly (DSR). Every server answers with its own name.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
};

use redirector_ebpf::DEFAULT_GUE_PORT;

use crate::{
    http::{Client, HttpError, Server},
    netns::{Host, NetnsError, Testbed, run_in_netns, send_frames},
    packet::{Eth, Ipv4, Udp},
    redirector::{self, Redirector, RedirectorError, Stats},
};

/// Service name on the edge.
pub const SERVICE: &str = "web";
pub const SERVICE_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 1);
pub const SERVICE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0x100, 0, 0, 0, 0, 1);
pub const SERVICE_PORT: u16 = 80;
/// Every host of the scenario, in address order.
pub const HOSTS: [&str; 5] = ["client", "edge", "peer1", "peer2", "peer3"];
/// The edge's server name (what local answers carry).
pub const EDGE: &str = "edge";

/// How a peer receives steered connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encap {
    Gue,
    Ipip,
}

impl Encap {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gue => "gue",
            Self::Ipip => "ipip",
        }
    }
}

/// Address family of a peer's tunnel (the outer header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outer {
    V4,
    V6,
}

/// Knobs of the scenario.
#[derive(Clone, Debug)]
pub struct ScenarioConfig {
    /// `attach --mode`: auto, driver or skb (default: `$P2PCDN_XDP_MODE` or auto).
    pub xdp_mode: String,
    /// Local admission: new connections per second, and burst.
    pub local_rate: u32,
    pub local_burst: u32,
    /// Each peer's admission rate (high: the peers are not the bottleneck here).
    pub peer_rate: u32,
    pub peer_burst: u32,
}

impl Default for ScenarioConfig {
    fn default() -> Self {
        Self {
            xdp_mode: std::env::var("P2PCDN_XDP_MODE").unwrap_or_else(|_| "auto".to_owned()),
            local_rate: 50,
            local_burst: 5,
            peer_rate: 10_000,
            peer_burst: 1_000,
        }
    }
}

/// Errors of setting the scenario up.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    Redirector(#[from] RedirectorError),
    #[error(
        "after `attach`, {key} is {value:?} in {host}: the XDP program's FIB lookups fail \
         without forwarding on the ingress device, and the CLI contract says attach enables it"
    )]
    ForwardingOff {
        host: String,
        key: String,
        value: String,
    },
    #[error("sending raw frames from {host}: {source}")]
    Send {
        host: String,
        source: std::io::Error,
    },
}

/// A running scenario. Dropping it stops the client and servers, then tears the testbed
/// down (namespaces, veths and pins).
#[derive(Debug)]
pub struct Scenario {
    // Field order is drop order: sockets close before their namespaces go.
    pub client: Client,
    servers: BTreeMap<String, Server>,
    pub edge: Redirector,
    /// The CLI of every peer host (configured on the edge or not).
    pub peer_cli: BTreeMap<String, Redirector>,
    pub config: ScenarioConfig,
    pub binary: PathBuf,
    pub testbed: Testbed,
}

impl Scenario {
    /// Builds the testbed, starts the servers and the client, attaches the edge with the
    /// service, and adds peer1 (GUE over IPv4, weight 1) and peer2 (IPIP over IPv4, weight 2).
    /// peer3's host
    /// and server exist, but it is not a peer until [`Scenario::add_peer`].
    pub fn setup(config: ScenarioConfig, log: &mut dyn FnMut(&str)) -> Result<Self, ScenarioError> {
        let binary = redirector::binary()?;
        log(&format!("CLI: {}", binary.display()));
        let services = [IpAddr::V4(SERVICE_V4), IpAddr::V6(SERVICE_V6)];
        let testbed = Testbed::builder()
            .host("client")
            .host_with_loopback("edge", &services)
            .host_with_loopback("peer1", &services)
            .host_with_loopback("peer2", &services)
            .host_with_loopback("peer3", &services)
            .build()?;
        log(&format!(
            "testbed {}: bridge br0 in namespace {}",
            testbed.id, testbed.switch_ns
        ));
        for host in &testbed.hosts {
            log(&format!(
                "  {:<6} namespace {:<22} {} {}/24 {}/64{}",
                host.name,
                host.ns,
                host.iface,
                host.v4,
                host.v6,
                if host.name == "client" {
                    String::new()
                } else {
                    format!(", lo {SERVICE_V4} {SERVICE_V6}")
                }
            ));
        }
        let edge_host = testbed.host("edge").clone();
        testbed.route("client", &format!("{SERVICE_V4}/32"), edge_host.v4.into())?;
        testbed.route("client", &format!("{SERVICE_V6}/128"), edge_host.v6.into())?;
        log(&format!(
            "  client routes {SERVICE_V4} and {SERVICE_V6} via the edge; no default route anywhere"
        ));

        let mut servers = BTreeMap::new();
        for name in &HOSTS[1..] {
            let host = testbed.host(name);
            let server = Server::start(&host.ns, name, &[service_v4(), service_v6()])?;
            servers.insert((*name).to_owned(), server);
        }
        log(
            "HTTP servers on the service address in edge, peer1, peer2, peer3 (each answers its name)",
        );
        let client = Client::start(&testbed.host("client").ns)?;

        let edge = Redirector::for_host(&binary, &edge_host);
        let peer_cli = HOSTS[2..]
            .iter()
            .map(|name| {
                (
                    (*name).to_owned(),
                    Redirector::for_host(&binary, testbed.host(name)),
                )
            })
            .collect();
        let scenario = Self {
            client,
            servers,
            edge,
            peer_cli,
            config,
            binary,
            testbed,
        };

        scenario.attach(&scenario.edge, log)?;
        let forwarding_key = format!("net.ipv4.conf.{}.forwarding", edge_host.iface);
        let forwarding = edge_host.sysctl(&forwarding_key)?;
        if forwarding != "1" {
            return Err(ScenarioError::ForwardingOff {
                host: "edge".to_owned(),
                key: forwarding_key,
                value: forwarding,
            });
        }
        let rate = scenario.config.local_rate.to_string();
        let burst = scenario.config.local_burst.to_string();
        let addr4 = service_v4().to_string();
        let addr6 = service_v6().to_string();
        let args = [
            "service", "add", "--name", SERVICE, "--addr", &addr4, "--addr", &addr6, "--mode",
            "steer", "--rate", &rate, "--burst", &burst,
        ];
        scenario.edge.run(&args)?;
        log(&format!("edge: {}", args.join(" ")));
        scenario.add_peer("peer1", Encap::Gue, Outer::V4, 1, log)?;
        scenario.add_peer("peer2", Encap::Ipip, Outer::V4, 2, log)?;
        Ok(scenario)
    }

    fn attach(&self, cli: &Redirector, log: &mut dyn FnMut(&str)) -> Result<(), ScenarioError> {
        let out = cli.output(&["attach", "--mode", &self.config.xdp_mode])?;
        if !out.status.success() {
            return Err(RedirectorError::Failed {
                command: cli.describe(&["attach", "--mode", &self.config.xdp_mode]),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            }
            .into());
        }
        let name = self.host_of(cli).map_or("?", |h| h.name.as_str());
        let said = [out.stdout, out.stderr]
            .iter()
            .flat_map(|b| {
                String::from_utf8_lossy(b)
                    .lines()
                    .map(|l| l.trim().to_owned())
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
            .join("; ");
        log(&format!(
            "{name}: attach --mode {}: {said}",
            self.config.xdp_mode
        ));
        Ok(())
    }

    fn host_of(&self, cli: &Redirector) -> Option<&Host> {
        self.testbed.hosts.iter().find(|h| h.ns == cli.ns)
    }

    /// Makes `name` a peer: attaches its XDP program in the peer role (decapsulation to its
    /// own address of the `outer` family, tunnels allowed from the edge only) and declares
    /// it on the edge.
    pub fn add_peer(
        &self,
        name: &str,
        encap: Encap,
        outer: Outer,
        weight: u32,
        log: &mut dyn FnMut(&str),
    ) -> Result<(), ScenarioError> {
        let host = self.testbed.host(name).clone();
        let edge = self.testbed.host("edge").clone();
        if let Some(cli) = self.peer_cli.get(name) {
            self.attach(cli, log)?;
            let (flag, decap, allow) = match outer {
                Outer::V4 => ("--decap-v4", host.v4.to_string(), edge.v4.to_string()),
                Outer::V6 => ("--decap-v6", host.v6.to_string(), edge.v6.to_string()),
            };
            cli.run(&["config", flag, &decap])?;
            cli.run(&["decap", "allow", &allow])?;
            log(&format!(
                "{name}: config {flag} {decap}; decap allow {allow}"
            ));
        }
        self.set_peer(name, encap, outer, weight, log)
    }

    /// `peer set` on the edge (creates or updates).
    pub fn set_peer(
        &self,
        name: &str,
        encap: Encap,
        outer: Outer,
        weight: u32,
        log: &mut dyn FnMut(&str),
    ) -> Result<(), ScenarioError> {
        let host = self.testbed.host(name);
        let addr = match outer {
            Outer::V4 => host.v4.to_string(),
            Outer::V6 => host.v6.to_string(),
        };
        let weight = weight.to_string();
        let rate = self.config.peer_rate.to_string();
        let burst = self.config.peer_burst.to_string();
        let args = [
            "peer",
            "set",
            "--name",
            name,
            "--addr",
            &addr,
            "--encap",
            encap.as_str(),
            "--weight",
            &weight,
            "--rate",
            &rate,
            "--burst",
            &burst,
            "--services",
            "all",
        ];
        self.edge.run(&args)?;
        log(&format!("edge: {}", args.join(" ")));
        Ok(())
    }

    /// `peer remove` on the edge.
    pub fn remove_peer(&self, name: &str, log: &mut dyn FnMut(&str)) -> Result<(), ScenarioError> {
        self.edge.run(&["peer", "remove", "--name", name])?;
        log(&format!("edge: peer remove --name {name}"));
        Ok(())
    }

    /// `stats --json` of `host` (edge or a peer).
    pub fn stats(&self, host: &str) -> Result<Stats, ScenarioError> {
        let cli = if host == "edge" {
            &self.edge
        } else {
            match self.peer_cli.get(host) {
                Some(cli) => cli,
                None => panic!("no CLI for host {host:?}"),
            }
        };
        Ok(cli.stats()?)
    }

    /// Connections each server accepted so far.
    pub fn accepted(&self) -> BTreeMap<String, u64> {
        self.servers
            .iter()
            .map(|(name, server)| (name.clone(), server.accepted()))
            .collect()
    }

    /// Sends `count` crafted tunnel frames from host `from` to host `to`'s address (the
    /// peer's decapsulation address): outer source = `from`'s address, inner = a UDP
    /// datagram from the client to `inner_dst`. GUE goes to [`DEFAULT_GUE_PORT`].
    pub fn send_tunnel_frames(
        &self,
        from: &str,
        to: &str,
        encap: Encap,
        count: usize,
        inner_dst: SocketAddrV4,
    ) -> Result<usize, ScenarioError> {
        let sender = self.testbed.host(from).clone();
        let target = self.testbed.host(to);
        let client = self.testbed.host("client");
        let frames: Vec<Vec<u8>> = (0..count)
            .map(|i| {
                let sport = 20_000 + u16::try_from(i % 1000).unwrap_or(0);
                let inner = Ipv4::new(client.v4, *inner_dst.ip()).udp(&Udp::new(
                    sport,
                    inner_dst.port(),
                    b"tunnel probe",
                ));
                let outer = Ipv4::new(sender.v4, target.v4);
                let packet = match encap {
                    Encap::Gue => outer.gue(sport, DEFAULT_GUE_PORT, &inner),
                    Encap::Ipip => outer.encap(&inner),
                };
                Eth::new(sender.mac, target.mac).frame(&packet)
            })
            .collect();
        let iface = sender.iface.clone();
        run_in_netns(&sender.ns, move || send_frames(&iface, &frames))?.map_err(|source| {
            ScenarioError::Send {
                host: from.to_owned(),
                source,
            }
        })
    }

    /// `detach` on every host that was attached (best effort, before teardown); returns the
    /// failures.
    pub fn detach_all(&self) -> Vec<RedirectorError> {
        std::iter::once(&self.edge)
            .chain(self.peer_cli.values())
            .filter(|cli| cli.pin_root.join(&cli.iface).exists())
            .filter_map(|cli| cli.run(&["detach"]).err())
            .collect()
    }
}

/// The IPv4 service address and port.
pub fn service_v4() -> SocketAddr {
    SocketAddr::new(SERVICE_V4.into(), SERVICE_PORT)
}

/// The IPv6 service address and port.
pub fn service_v6() -> SocketAddr {
    SocketAddr::new(SERVICE_V6.into(), SERVICE_PORT)
}
