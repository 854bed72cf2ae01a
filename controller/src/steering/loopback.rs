//! Service addresses on `lo` for a DSR peer: decapsulated packets are addressed to the
//! primary's service address, and the stack accepts them only if that address is local. On
//! `lo`, never on the NIC, so the peer does not claim the address on its link
//! (`ip addr add VIP/32 dev lo`, IPv6 `/128 nodad`).
//!
//! Synchronous `NETLINK_ROUTE` requests with `netlink-packet-route` messages, as the
//! redirector's loader does.

use std::{io, net::IpAddr};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// The loopback interface's index (always 1 on Linux).
const LO_INDEX: u32 = 1;

/// Adds `addr` to `lo`; `Ok(false)` if it was there already (then it is not ours to remove).
pub fn add(addr: IpAddr) -> io::Result<bool> {
    match request(
        RouteNetlinkMessage::NewAddress(message(addr)),
        NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes `addr` from `lo`; `Ok(false)` if it was not there.
pub fn remove(addr: IpAddr) -> io::Result<bool> {
    match request(RouteNetlinkMessage::DelAddress(message(addr)), 0) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(false),
        Err(e) => Err(e),
    }
}

fn message(addr: IpAddr) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.index = LO_INDEX;
    m.header.scope = AddressScope::Host;
    match addr {
        IpAddr::V4(_) => {
            m.header.family = AddressFamily::Inet;
            m.header.prefix_len = 32;
        }
        IpAddr::V6(_) => {
            m.header.family = AddressFamily::Inet6;
            m.header.prefix_len = 128;
            // No duplicate address detection: the address is never on a link.
            m.header.flags = AddressHeaderFlags::Nodad;
            m.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
    }
    m.attributes.push(AddressAttribute::Local(addr));
    m.attributes.push(AddressAttribute::Address(addr));
    m
}

/// Sends one request and waits for its acknowledgement; a negative one becomes the errno.
fn request(message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    header.sequence_number = 1;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    // Bounded: the acknowledgement is one datagram; other messages are skipped.
    for _ in 0..64 {
        let (data, _) = socket.recv_from_full()?;
        let mut offset = 0;
        while offset < data.len() {
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = reply.header.length as usize;
            if len == 0 {
                break;
            }
            offset += (len + 3) & !3;
            if let NetlinkPayload::Error(e) = reply.payload {
                return match e.code {
                    None => Ok(()),
                    Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                };
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "no acknowledgement from the kernel",
    ))
}
