//! The few rtnetlink requests the loader needs: the route towards a peer, a managed
//! neighbour entry for its next hop, an interface's addresses and its XDP state.
//!
//! Synchronous requests on a `NETLINK_ROUTE` socket with `netlink-packet-route` messages
//! (the crates behind `rtnetlink`, without its async runtime).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage, AddressScope},
    link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached},
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourMessage, NeighbourState,
    },
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::error::{Error, Result};

/// The kernel's answer to "how do I reach this address" (`ip route get`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Route {
    /// Output interface.
    pub oif: u32,
    /// Next hop: the gateway, or the destination itself when it is on-link.
    pub next_hop: IpAddr,
    /// The destination is one of this host's addresses (no neighbour needed).
    pub local: bool,
}

/// How an XDP program is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum XdpAttachment {
    None,
    Driver,
    Skb,
    Hardware,
    Multiple,
}

/// An interface's XDP state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct XdpState {
    pub attached: XdpAttachment,
    pub prog_id: Option<u32>,
}

pub(crate) struct Netlink {
    socket: Socket,
    seq: u32,
}

fn nl_error(op: &'static str) -> impl Fn(io::Error) -> Error {
    move |source| {
        if source.raw_os_error() == Some(libc::EPERM) {
            return Error::MissingPrivilege {
                capability: crate::error::NEEDED_CAPABILITIES,
            };
        }
        Error::Netlink { op, source }
    }
}

impl Netlink {
    pub(crate) fn new() -> Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(nl_error("socket"))?;
        socket.bind_auto().map_err(nl_error("bind"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(nl_error("connect"))?;
        Ok(Self { socket, seq: 1 })
    }

    /// Sends `message` and collects the replies: until `NLMSG_DONE` for a dump, until the
    /// acknowledgement otherwise. A negative acknowledgement becomes the errno.
    fn request(
        &mut self,
        op: &'static str,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        self.seq = self.seq.wrapping_add(1);
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(nl_error(op))?;

        let mut replies = Vec::new();
        // Bounded: a dump of a few interfaces or addresses is a handful of datagrams.
        for _ in 0..10_000 {
            let (data, _) = self.socket.recv_from_full().map_err(nl_error(op))?;
            let mut offset = 0;
            while offset < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| Error::Netlink {
                        op,
                        source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
                    })?;
                let len = reply.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += (len + 3) & !3;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(replies),
                            Some(code) => {
                                Err(nl_error(op)(io::Error::from_raw_os_error(-code.get())))
                            }
                        };
                    }
                    NetlinkPayload::InnerMessage(m) => replies.push(m),
                    _ => {}
                }
            }
        }
        Err(Error::Netlink {
            op,
            source: io::Error::new(io::ErrorKind::TimedOut, "no end of reply"),
        })
    }

    /// The route the kernel would use towards `dst` (`ip route get DST`).
    pub(crate) fn route_to(&mut self, dst: IpAddr) -> Result<Route> {
        let mut message = RouteMessage::default();
        message.header.address_family = family(dst);
        message.header.destination_prefix_length = if dst.is_ipv4() { 32 } else { 128 };
        message
            .attributes
            .push(RouteAttribute::Destination(RouteAddress::from(dst)));
        let replies = self.request("route get", RouteNetlinkMessage::GetRoute(message), 0)?;
        for reply in replies {
            if let RouteNetlinkMessage::NewRoute(route) = reply {
                let mut oif = None;
                let mut gateway = None;
                for attr in &route.attributes {
                    match attr {
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::Gateway(RouteAddress::Inet(a)) => {
                            gateway = Some(IpAddr::V4(*a));
                        }
                        RouteAttribute::Gateway(RouteAddress::Inet6(a)) => {
                            gateway = Some(IpAddr::V6(*a));
                        }
                        _ => {}
                    }
                }
                let local = route.header.kind == RouteType::Local;
                return Ok(Route {
                    oif: oif.unwrap_or(0),
                    next_hop: gateway.unwrap_or(dst),
                    local,
                });
            }
        }
        Err(Error::Netlink {
            op: "route get",
            source: io::Error::new(io::ErrorKind::NotFound, format!("no route to {dst}")),
        })
    }

    /// Creates or replaces a *managed* neighbour entry for `addr` on `ifindex`
    /// (`ip neigh replace ADDR dev DEV managed`): the kernel resolves it and keeps it
    /// resolved, so `bpf_fib_lookup` in XDP finds a MAC address (Linux ≥ 5.16,
    /// `NTF_EXT_MANAGED`, commit 7482e3841d52). The state must be `NUD_NONE`: managed
    /// entries cannot be permanent.
    pub(crate) fn replace_managed_neighbour(&mut self, ifindex: u32, addr: IpAddr) -> Result<()> {
        let mut message = NeighbourMessage::default();
        message.header.family = family(addr);
        message.header.ifindex = ifindex;
        message.header.state = NeighbourState::None;
        message
            .attributes
            .push(NeighbourAttribute::Destination(match addr {
                IpAddr::V4(a) => NeighbourAddress::Inet(a),
                IpAddr::V6(a) => NeighbourAddress::Inet6(a),
            }));
        message
            .attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        self.request(
            "neighbour replace",
            RouteNetlinkMessage::NewNeighbour(message),
            NLM_F_CREATE | NLM_F_REPLACE,
        )?;
        Ok(())
    }

    /// Global (non link-local) addresses of `ifindex`, IPv4 and IPv6.
    pub(crate) fn addresses(&mut self, ifindex: u32) -> Result<Vec<IpAddr>> {
        let replies = self.request(
            "address dump",
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )?;
        let mut out = Vec::new();
        for reply in replies {
            let RouteNetlinkMessage::NewAddress(address) = reply else {
                continue;
            };
            if address.header.index != ifindex || address.header.scope != AddressScope::Universe {
                continue;
            }
            // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer's on
            // point-to-point links); fall back to IFA_ADDRESS when there is no IFA_LOCAL.
            let local = address.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let any = address.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if let Some(ip) = local.or(any) {
                out.push(ip);
            }
        }
        Ok(out)
    }

    /// The index of the interface named `name`, `None` if there is none.
    pub(crate) fn link_index(&mut self, name: &str) -> Result<Option<u32>> {
        let mut message = LinkMessage::default();
        message
            .attributes
            .push(LinkAttribute::IfName(name.to_owned()));
        match self.request("link get", RouteNetlinkMessage::GetLink(message), 0) {
            Ok(replies) => Ok(replies.into_iter().find_map(|r| match r {
                RouteNetlinkMessage::NewLink(link) => Some(link.header.index),
                _ => None,
            })),
            Err(Error::Netlink { source, .. }) if source.raw_os_error() == Some(libc::ENODEV) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether and how an XDP program is attached to `ifindex`.
    pub(crate) fn xdp_state(&mut self, ifindex: u32) -> Result<XdpState> {
        let mut message = LinkMessage::default();
        message.header.index = ifindex;
        let replies = self.request("link get", RouteNetlinkMessage::GetLink(message), 0)?;
        let mut state = XdpState {
            attached: XdpAttachment::None,
            prog_id: None,
        };
        for reply in replies {
            let RouteNetlinkMessage::NewLink(link) = reply else {
                continue;
            };
            for attr in link.attributes {
                let LinkAttribute::Xdp(xdp) = attr else {
                    continue;
                };
                for x in xdp {
                    match x {
                        LinkXdp::Attached(a) => {
                            state.attached = match a {
                                XdpAttached::Driver => XdpAttachment::Driver,
                                XdpAttached::SocketBuffer => XdpAttachment::Skb,
                                XdpAttached::Hardware => XdpAttachment::Hardware,
                                XdpAttached::Multiple => XdpAttachment::Multiple,
                                _ => XdpAttachment::None,
                            };
                        }
                        LinkXdp::ProgId(id) if id != 0 => state.prog_id = Some(id),
                        _ => {}
                    }
                }
            }
        }
        Ok(state)
    }
}

fn family(addr: IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// Picks the source address of a family among an interface's addresses: the first one,
/// skipping IPv6 link-local addresses (tunnels are routed).
pub(crate) fn pick_source(addrs: &[IpAddr], v4: bool) -> Option<IpAddr> {
    addrs.iter().copied().find(|a| match a {
        IpAddr::V4(v) => v4 && !v.is_loopback() && *v != Ipv4Addr::UNSPECIFIED,
        IpAddr::V6(v) => !v4 && !is_link_local(v) && *v != Ipv6Addr::LOCALHOST,
    })
}

fn is_link_local(v6: &Ipv6Addr) -> bool {
    v6.segments()[0] & 0xffc0 == 0xfe80
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]
mod tests {
    use super::*;

    #[test]
    fn sources_match_the_family_and_skip_link_local() {
        let addrs: Vec<IpAddr> = ["fe80::1", "192.0.2.1", "2001:db8::1", "192.0.2.2"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(
            pick_source(&addrs, true),
            Some("192.0.2.1".parse().unwrap())
        );
        assert_eq!(
            pick_source(&addrs, false),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(pick_source(&addrs[..1], false), None);
    }
}
