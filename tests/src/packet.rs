//! Packet fixtures built in code, and an independent parser for the program's output.
//!
//! Building: describe each layer ([`Ipv4`] or [`Ipv6`], [`Tcp`] or [`Udp`]), get an
//! [`IpPacket`], wrap it in tunnels ([`Ipv4::encap`], [`Ipv4::gue`], ...) and finally in an
//! Ethernet frame ([`Eth`], optionally with one 802.1Q tag). Every length and checksum is
//! computed (with etherparse) unless a fixture asks for a broken one. The functions at the
//! end of the "fixtures" section name the packets the tests talk about (`syn_v4`,
//! `gue`, ...).
//!
//! Parsing: [`parse_frame`] reads output bytes with etherparse only (none of our kernel
//! code), follows one level of IPIP / 6in4 / 4in6 / IP6IP6 / GUE, and checks every checksum
//! (IPv4 headers, UDP including IPv6, TCP).
//!
//! Builder methods panic on a fixture that cannot be encoded (say IPv4 options of 3 bytes):
//! that is a mistake in a test, reported with the value that does not fit.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use etherparse::{
    EtherType, Ethernet2Header, IpFragOffset, IpHeaders, IpNumber, Ipv4Header, Ipv6FlowLabel,
    Ipv6FragmentHeader, Ipv6Header, Ipv6RawExtHeader, SingleVlanHeader, TcpHeader,
    TcpOptionElement, UdpHeader, VlanId, VlanPcp,
};
use redirector_ebpf::DEFAULT_GUE_PORT;

/// MAC of the client side in single-packet fixtures (locally administered).
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// MAC of the edge (the interface the program runs on) in single-packet fixtures.
pub const EDGE_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
/// Initial sequence number of fixture SYNs.
pub const CLIENT_ISN: u32 = 1_000;
/// Initial sequence number of fixture SYN-ACKs (the server's).
pub const SERVER_ISN: u32 = 5_000;
/// MSS option carried by fixture SYNs (an Ethernet MTU of 1500 minus 40).
pub const FIXTURE_MSS: u16 = 1460;

// ---------------------------------------------------------------------------------------
// Transport layer
// ---------------------------------------------------------------------------------------

/// TCP flag bits, as in the header's flags byte.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const FIN: Self = Self(0x01);
    pub const SYN: Self = Self(0x02);
    pub const RST: Self = Self(0x04);
    pub const PSH: Self = Self(0x08);
    pub const ACK: Self = Self(0x10);
    pub const URG: Self = Self(0x20);
    pub const ECE: Self = Self(0x40);
    pub const CWR: Self = Self(0x80);

    /// True if every bit of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for TcpFlags {
    type Output = Self;

    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

/// A TCP segment: ports, sequence numbers, flags, options and payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: TcpFlags,
    pub window: u16,
    pub options: Vec<TcpOptionElement>,
    pub payload: Vec<u8>,
    /// Write a checksum that is off by one (a corrupted segment).
    pub corrupt_checksum: bool,
}

impl Tcp {
    /// A segment with the given flags, no options, no payload, sequence numbers 0.
    pub fn new(sport: u16, dport: u16, flags: TcpFlags) -> Self {
        Self {
            sport,
            dport,
            seq: 0,
            ack: 0,
            flags,
            window: 64_240,
            options: Vec::new(),
            payload: Vec::new(),
            corrupt_checksum: false,
        }
    }

    /// A client's opening SYN: sequence [`CLIENT_ISN`], MSS [`FIXTURE_MSS`], SACK permitted,
    /// window scale 7 (what Linux sends, minus the timestamp).
    pub fn syn(sport: u16, dport: u16) -> Self {
        Self::new(sport, dport, TcpFlags::SYN)
            .seq(CLIENT_ISN)
            .mss(FIXTURE_MSS)
            .option(TcpOptionElement::SelectiveAcknowledgementPermitted)
            .option(TcpOptionElement::WindowScale(7))
    }

    /// A server's SYN-ACK answering [`Tcp::syn`] (ports as given, so pass them swapped).
    pub fn syn_ack(sport: u16, dport: u16) -> Self {
        Self::new(sport, dport, TcpFlags::SYN | TcpFlags::ACK)
            .seq(SERVER_ISN)
            .ack_number(CLIENT_ISN.wrapping_add(1))
            .mss(FIXTURE_MSS)
    }

    /// The client's ACK that completes the handshake opened by [`Tcp::syn`].
    pub fn handshake_ack(sport: u16, dport: u16) -> Self {
        Self::new(sport, dport, TcpFlags::ACK)
            .seq(CLIENT_ISN.wrapping_add(1))
            .ack_number(SERVER_ISN.wrapping_add(1))
    }

    /// The client's first data segment (PSH|ACK) after the handshake.
    pub fn data(sport: u16, dport: u16, payload: &[u8]) -> Self {
        Self::handshake_ack(sport, dport)
            .flags(TcpFlags::PSH | TcpFlags::ACK)
            .payload(payload)
    }

    pub fn seq(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }

    pub fn ack_number(mut self, ack: u32) -> Self {
        self.ack = ack;
        self
    }

    pub fn flags(mut self, flags: TcpFlags) -> Self {
        self.flags = flags;
        self
    }

    pub fn window(mut self, window: u16) -> Self {
        self.window = window;
        self
    }

    /// Sets the MSS option (replacing an existing one, keeping its place).
    pub fn mss(mut self, mss: u16) -> Self {
        let option = TcpOptionElement::MaximumSegmentSize(mss);
        match self
            .options
            .iter_mut()
            .find(|o| matches!(o, TcpOptionElement::MaximumSegmentSize(_)))
        {
            Some(existing) => *existing = option,
            None => self.options.insert(0, option),
        }
        self
    }

    /// Removes every option.
    pub fn no_options(mut self) -> Self {
        self.options.clear();
        self
    }

    /// Appends an option (etherparse pads the option block to 4 bytes with EOL).
    pub fn option(mut self, option: TcpOptionElement) -> Self {
        self.options.push(option);
        self
    }

    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// Writes a wrong checksum.
    pub fn corrupt_checksum(mut self) -> Self {
        self.corrupt_checksum = true;
        self
    }

    /// The TCP header (checksum still zero).
    ///
    /// # Panics
    /// If the options do not fit in 40 bytes.
    pub fn header(&self) -> TcpHeader {
        let mut header = TcpHeader::new(self.sport, self.dport, self.seq, self.window);
        header.acknowledgment_number = self.ack;
        let f = self.flags;
        header.fin = f.contains(TcpFlags::FIN);
        header.syn = f.contains(TcpFlags::SYN);
        header.rst = f.contains(TcpFlags::RST);
        header.psh = f.contains(TcpFlags::PSH);
        header.ack = f.contains(TcpFlags::ACK);
        header.urg = f.contains(TcpFlags::URG);
        header.ece = f.contains(TcpFlags::ECE);
        header.cwr = f.contains(TcpFlags::CWR);
        if let Err(e) = header.set_options(&self.options) {
            panic!("TCP options {:?} do not fit: {e}", self.options);
        }
        header
    }

    fn encode(&self, src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let mut header = self.header();
        let checksum = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                header.calc_checksum_ipv4_raw(s.octets(), d.octets(), &self.payload)
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                header.calc_checksum_ipv6_raw(s.octets(), d.octets(), &self.payload)
            }
            _ => panic!("TCP over mixed families {src} -> {dst}"),
        };
        header.checksum = match checksum {
            Ok(sum) if self.corrupt_checksum => sum.wrapping_add(1),
            Ok(sum) => sum,
            Err(e) => panic!("TCP payload of {} bytes too big: {e}", self.payload.len()),
        };
        let mut out = header.to_bytes().to_vec();
        out.extend_from_slice(&self.payload);
        out
    }
}

/// How a fixture fills the UDP checksum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UdpChecksum {
    /// The correct checksum.
    #[default]
    Valid,
    /// Zero: "no checksum" (allowed over IPv4 only).
    Zero,
    /// Off by one.
    Corrupt,
}

/// A UDP datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Udp {
    pub sport: u16,
    pub dport: u16,
    pub payload: Vec<u8>,
    pub checksum: UdpChecksum,
}

impl Udp {
    pub fn new(sport: u16, dport: u16, payload: &[u8]) -> Self {
        Self {
            sport,
            dport,
            payload: payload.to_vec(),
            checksum: UdpChecksum::Valid,
        }
    }

    pub fn checksum(mut self, checksum: UdpChecksum) -> Self {
        self.checksum = checksum;
        self
    }

    fn encode(&self, src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let Ok(length) = u16::try_from(UdpHeader::LEN + self.payload.len()) else {
            panic!("UDP payload of {} bytes too big", self.payload.len());
        };
        let mut header = UdpHeader {
            source_port: self.sport,
            destination_port: self.dport,
            length,
            checksum: 0,
        };
        let sum = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                header.calc_checksum_ipv4_raw(s.octets(), d.octets(), &self.payload)
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                header.calc_checksum_ipv6_raw(s.octets(), d.octets(), &self.payload)
            }
            _ => panic!("UDP over mixed families {src} -> {dst}"),
        };
        let sum = match sum {
            Ok(sum) => sum,
            Err(e) => panic!("UDP payload too big: {e}"),
        };
        header.checksum = match self.checksum {
            UdpChecksum::Valid => sum,
            UdpChecksum::Zero => 0,
            // Never 0 (which would mean "no checksum" rather than "wrong").
            UdpChecksum::Corrupt => sum.wrapping_add(1).max(1),
        };
        let mut out = header.to_bytes().to_vec();
        out.extend_from_slice(&self.payload);
        out
    }
}

// ---------------------------------------------------------------------------------------
// Network layer
// ---------------------------------------------------------------------------------------

/// An IP packet (header and payload), ready to be tunnelled or put in a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpPacket {
    bytes: Vec<u8>,
}

impl IpPacket {
    /// The packet as it appears on the wire after the link header.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// 4 or 6 (the version nibble).
    pub fn version(&self) -> u8 {
        self.bytes.first().map_or(0, |b| b >> 4)
    }

    /// The IP protocol number with which this packet is carried inside another IP packet
    /// (4 for IPv4, 41 for IPv6).
    pub fn ip_in_ip_protocol(&self) -> u8 {
        if self.version() == 6 { 41 } else { 4 }
    }

    /// This packet in an untagged Ethernet frame from [`CLIENT_MAC`] to [`EDGE_MAC`].
    pub fn frame(&self) -> Vec<u8> {
        Eth::default().frame(self)
    }
}

/// An IPv4 header description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub id: u16,
    pub dont_fragment: bool,
    pub more_fragments: bool,
    /// Fragment offset in 8-byte units.
    pub fragment_offset: u16,
    /// Raw option bytes (a multiple of 4, at most 40).
    pub options: Vec<u8>,
    /// Write a header checksum that is off by one.
    pub corrupt_checksum: bool,
}

impl Ipv4 {
    /// A header from `src` to `dst` with TTL 64, DF set (as Linux sends TCP), no options.
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        Self {
            src,
            dst,
            ttl: 64,
            id: 0x1234,
            dont_fragment: true,
            more_fragments: false,
            fragment_offset: 0,
            options: Vec::new(),
            corrupt_checksum: false,
        }
    }

    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn id(mut self, id: u16) -> Self {
        self.id = id;
        self
    }

    pub fn dont_fragment(mut self, df: bool) -> Self {
        self.dont_fragment = df;
        self
    }

    /// Makes this a fragment: `offset` in 8-byte units, `more` = the MF flag. Clears DF.
    pub fn fragment(mut self, offset: u16, more: bool) -> Self {
        self.dont_fragment = false;
        self.fragment_offset = offset;
        self.more_fragments = more;
        self
    }

    /// Raw IPv4 options (a multiple of 4 bytes, at most 40).
    pub fn options(mut self, options: &[u8]) -> Self {
        self.options = options.to_vec();
        self
    }

    pub fn corrupt_checksum(mut self) -> Self {
        self.corrupt_checksum = true;
        self
    }

    /// This header carrying `tcp`.
    pub fn tcp(&self, tcp: &Tcp) -> IpPacket {
        let segment = tcp.encode(self.src.into(), self.dst.into());
        self.payload(6, &segment)
    }

    /// This header carrying `udp`.
    pub fn udp(&self, udp: &Udp) -> IpPacket {
        let datagram = udp.encode(self.src.into(), self.dst.into());
        self.payload(17, &datagram)
    }

    /// IPIP (inner IPv4, protocol 4) or 6in4 (inner IPv6, protocol 41).
    pub fn encap(&self, inner: &IpPacket) -> IpPacket {
        self.payload(inner.ip_in_ip_protocol(), inner.bytes())
    }

    /// GUE variant 1: UDP from `sport` to `dport` with the inner IP packet right after the
    /// UDP header, UDP checksum filled in.
    pub fn gue(&self, sport: u16, dport: u16, inner: &IpPacket) -> IpPacket {
        self.udp(&Udp::new(sport, dport, inner.bytes()))
    }

    /// This header followed by `payload` bytes of protocol `protocol` (lengths and header
    /// checksum computed).
    ///
    /// # Panics
    /// On options that are not a multiple of 4 bytes or longer than 40, a fragment offset
    /// above 8191, or a packet longer than 65535 bytes.
    pub fn payload(&self, protocol: u8, payload: &[u8]) -> IpPacket {
        let mut header = Ipv4Header {
            identification: self.id,
            dont_fragment: self.dont_fragment,
            more_fragments: self.more_fragments,
            time_to_live: self.ttl,
            protocol: IpNumber(protocol),
            source: self.src.octets(),
            destination: self.dst.octets(),
            ..Ipv4Header::default()
        };
        header.fragment_offset = match IpFragOffset::try_new(self.fragment_offset) {
            Ok(o) => o,
            Err(e) => panic!("fragment offset: {e}"),
        };
        header.options = match etherparse::Ipv4Options::try_from(self.options.as_slice()) {
            Ok(o) => o,
            Err(e) => panic!("IPv4 options of {} bytes: {e}", self.options.len()),
        };
        if let Err(e) = header.set_payload_len(payload.len()) {
            panic!("IPv4 payload: {e}");
        }
        header.header_checksum = header.calc_header_checksum();
        if self.corrupt_checksum {
            header.header_checksum = header.header_checksum.wrapping_add(1);
        }
        let mut bytes = header.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        IpPacket { bytes }
    }
}

/// An IPv6 extension header for fixtures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ipv6Ext {
    /// Hop-by-hop options holding one PadN option (8 bytes in all).
    HopByHop,
    /// Destination options holding one PadN option (8 bytes in all).
    DestinationOptions,
    /// A fragment header: `offset` in 8-byte units, `more` = the M flag.
    Fragment { offset: u16, more: bool, id: u32 },
}

/// An IPv6 header description (fixed header plus optional extension headers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub hop_limit: u8,
    pub flow_label: u32,
    pub extensions: Vec<Ipv6Ext>,
}

impl Ipv6 {
    /// A fixed header from `src` to `dst`, hop limit 64, flow label 0, no extensions.
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr) -> Self {
        Self {
            src,
            dst,
            hop_limit: 64,
            flow_label: 0,
            extensions: Vec::new(),
        }
    }

    pub fn hop_limit(mut self, hop_limit: u8) -> Self {
        self.hop_limit = hop_limit;
        self
    }

    pub fn flow_label(mut self, label: u32) -> Self {
        self.flow_label = label;
        self
    }

    /// Appends an extension header (in the order given, before the payload).
    pub fn extension(mut self, ext: Ipv6Ext) -> Self {
        self.extensions.push(ext);
        self
    }

    pub fn tcp(&self, tcp: &Tcp) -> IpPacket {
        let segment = tcp.encode(self.src.into(), self.dst.into());
        self.payload(6, &segment)
    }

    pub fn udp(&self, udp: &Udp) -> IpPacket {
        let datagram = udp.encode(self.src.into(), self.dst.into());
        self.payload(17, &datagram)
    }

    /// IP6IP6 (inner IPv6, next header 41) or 4in6 (inner IPv4, next header 4).
    pub fn encap(&self, inner: &IpPacket) -> IpPacket {
        self.payload(inner.ip_in_ip_protocol(), inner.bytes())
    }

    /// GUE variant 1 over IPv6 (UDP checksum filled in, as IPv6 requires).
    pub fn gue(&self, sport: u16, dport: u16, inner: &IpPacket) -> IpPacket {
        self.udp(&Udp::new(sport, dport, inner.bytes()))
    }

    /// This header (and its extensions) followed by `payload` of protocol `protocol`.
    ///
    /// # Panics
    /// On a fragment offset above 8191, a flow label above 20 bits or a payload longer than
    /// 65535 bytes.
    pub fn payload(&self, protocol: u8, payload: &[u8]) -> IpPacket {
        // Each extension names the header after it: walk from the payload backwards.
        let mut next = IpNumber(protocol);
        let mut ext_bytes: Vec<Vec<u8>> = Vec::new();
        for ext in self.extensions.iter().rev() {
            // PadN option (type 1) of 4 bytes of zeros: 2 + 6 bytes = 8, the minimum.
            const PADN: [u8; 6] = [1, 4, 0, 0, 0, 0];
            let (bytes, number) = match ext {
                Ipv6Ext::HopByHop | Ipv6Ext::DestinationOptions => {
                    let header = match Ipv6RawExtHeader::new_raw(next, &PADN) {
                        Ok(h) => h,
                        Err(e) => panic!("extension header: {e}"),
                    };
                    let number = if *ext == Ipv6Ext::HopByHop {
                        IpNumber::IPV6_HEADER_HOP_BY_HOP
                    } else {
                        IpNumber::IPV6_DESTINATION_OPTIONS
                    };
                    (header.to_bytes().to_vec(), number)
                }
                Ipv6Ext::Fragment { offset, more, id } => {
                    let offset = match IpFragOffset::try_new(*offset) {
                        Ok(o) => o,
                        Err(e) => panic!("fragment offset: {e}"),
                    };
                    let header = Ipv6FragmentHeader::new(next, offset, *more, *id);
                    (
                        header.to_bytes().to_vec(),
                        IpNumber::IPV6_FRAGMENTATION_HEADER,
                    )
                }
            };
            ext_bytes.push(bytes);
            next = number;
        }
        let mut rest: Vec<u8> = ext_bytes.into_iter().rev().flatten().collect();
        rest.extend_from_slice(payload);
        let Ok(payload_length) = u16::try_from(rest.len()) else {
            panic!(
                "IPv6 payload of {} bytes too big (no jumbograms)",
                rest.len()
            );
        };
        let flow_label = match Ipv6FlowLabel::try_new(self.flow_label) {
            Ok(l) => l,
            Err(e) => panic!("flow label: {e}"),
        };
        let header = Ipv6Header {
            traffic_class: 0,
            flow_label,
            payload_length,
            next_header: next,
            hop_limit: self.hop_limit,
            source: self.src.octets(),
            destination: self.dst.octets(),
        };
        let mut bytes = header.to_bytes().to_vec();
        bytes.extend_from_slice(&rest);
        IpPacket { bytes }
    }
}

/// An IPv4 or IPv6 header description, for fixtures written once for both families.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ip {
    V4(Ipv4),
    V6(Ipv6),
}

impl Ip {
    /// A default header of the family of `src`.
    ///
    /// # Panics
    /// If `src` and `dst` are of different families.
    pub fn new(src: IpAddr, dst: IpAddr) -> Self {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => Self::V4(Ipv4::new(s, d)),
            (IpAddr::V6(s), IpAddr::V6(d)) => Self::V6(Ipv6::new(s, d)),
            _ => panic!("IP header with mixed families {src} -> {dst}"),
        }
    }

    pub fn tcp(&self, tcp: &Tcp) -> IpPacket {
        match self {
            Self::V4(h) => h.tcp(tcp),
            Self::V6(h) => h.tcp(tcp),
        }
    }

    pub fn udp(&self, udp: &Udp) -> IpPacket {
        match self {
            Self::V4(h) => h.udp(udp),
            Self::V6(h) => h.udp(udp),
        }
    }

    /// IPIP, 6in4, 4in6 or IP6IP6 by the two families.
    pub fn encap(&self, inner: &IpPacket) -> IpPacket {
        match self {
            Self::V4(h) => h.encap(inner),
            Self::V6(h) => h.encap(inner),
        }
    }

    /// GUE variant 1 over either family.
    pub fn gue(&self, sport: u16, dport: u16, inner: &IpPacket) -> IpPacket {
        match self {
            Self::V4(h) => h.gue(sport, dport, inner),
            Self::V6(h) => h.gue(sport, dport, inner),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Link layer
// ---------------------------------------------------------------------------------------

/// An Ethernet II header, optionally with one 802.1Q tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Eth {
    pub src: [u8; 6],
    pub dst: [u8; 6],
    /// VLAN id (12 bits) of an 802.1Q tag, if any.
    pub vlan: Option<u16>,
}

impl Default for Eth {
    /// [`CLIENT_MAC`] → [`EDGE_MAC`], untagged.
    fn default() -> Self {
        Self {
            src: CLIENT_MAC,
            dst: EDGE_MAC,
            vlan: None,
        }
    }
}

impl Eth {
    pub fn new(src: [u8; 6], dst: [u8; 6]) -> Self {
        Self {
            src,
            dst,
            vlan: None,
        }
    }

    /// Adds an 802.1Q tag with this VLAN id (priority 0).
    pub fn vlan(mut self, id: u16) -> Self {
        self.vlan = Some(id);
        self
    }

    /// `packet` in a frame with this header (EtherType from the packet's version).
    ///
    /// # Panics
    /// On a VLAN id above 4095.
    pub fn frame(&self, packet: &IpPacket) -> Vec<u8> {
        let ip_type = if packet.version() == 6 {
            EtherType::IPV6
        } else {
            EtherType::IPV4
        };
        let mut out = Vec::with_capacity(18 + packet.bytes().len());
        let outer_type = if self.vlan.is_some() {
            EtherType::VLAN_TAGGED_FRAME
        } else {
            ip_type
        };
        out.extend_from_slice(
            &Ethernet2Header {
                source: self.src,
                destination: self.dst,
                ether_type: outer_type,
            }
            .to_bytes(),
        );
        if let Some(id) = self.vlan {
            let vlan_id = match VlanId::try_new(id) {
                Ok(v) => v,
                Err(e) => panic!("VLAN id: {e}"),
            };
            let tag = SingleVlanHeader {
                pcp: VlanPcp::ZERO,
                drop_eligible_indicator: false,
                vlan_id,
                ether_type: ip_type,
            };
            out.extend_from_slice(&tag.to_bytes());
        }
        out.extend_from_slice(packet.bytes());
        out
    }
}

// ---------------------------------------------------------------------------------------
// Named fixtures
// ---------------------------------------------------------------------------------------

/// A client's opening SYN (MSS 1460, SACK, window scale) from `client:sport` to an IPv4
/// service, in an untagged frame [`CLIENT_MAC`] → [`EDGE_MAC`].
pub fn syn_v4(client: Ipv4Addr, service: SocketAddrV4, sport: u16) -> Vec<u8> {
    syn_v4_packet(client, service, sport).frame()
}

/// The IP packet of [`syn_v4`] (to tunnel it or tag it).
pub fn syn_v4_packet(client: Ipv4Addr, service: SocketAddrV4, sport: u16) -> IpPacket {
    Ipv4::new(client, *service.ip()).tcp(&Tcp::syn(sport, service.port()))
}

/// The client's handshake-completing ACK (no payload) of the flow opened by [`syn_v4`].
pub fn ack_v4(client: Ipv4Addr, service: SocketAddrV4, sport: u16) -> Vec<u8> {
    Ipv4::new(client, *service.ip())
        .tcp(&Tcp::handshake_ack(sport, service.port()))
        .frame()
}

/// The client's first data segment (PSH|ACK carrying `payload`) of the flow opened by
/// [`syn_v4`].
pub fn data_v4(client: Ipv4Addr, service: SocketAddrV4, sport: u16, payload: &[u8]) -> Vec<u8> {
    Ipv4::new(client, *service.ip())
        .tcp(&Tcp::data(sport, service.port(), payload))
        .frame()
}

/// [`syn_v4`] in a frame with one 802.1Q tag of VLAN `vlan`.
pub fn syn_v4_vlan(client: Ipv4Addr, service: SocketAddrV4, sport: u16, vlan: u16) -> Vec<u8> {
    Eth::default()
        .vlan(vlan)
        .frame(&syn_v4_packet(client, service, sport))
}

/// [`syn_v4`] whose IPv4 header carries a Router Alert option (RFC 2113, 4 bytes: IHL 6).
pub fn syn_v4_ip_options(client: Ipv4Addr, service: SocketAddrV4, sport: u16) -> Vec<u8> {
    Ipv4::new(client, *service.ip())
        .options(&[0x94, 0x04, 0x00, 0x00])
        .tcp(&Tcp::syn(sport, service.port()))
        .frame()
}

/// The first fragment (MF set, offset 0) of a SYN carrying 64 bytes of data (TCP Fast
/// Open style), cut after the first 48 bytes of the TCP segment.
pub fn first_fragment_v4(client: Ipv4Addr, service: SocketAddrV4, sport: u16) -> Vec<u8> {
    let segment = Tcp::syn(sport, service.port())
        .payload(&[0x55; 64])
        .encode(client.into(), (*service.ip()).into());
    // 24-byte header + 8 option bytes = 32 bytes of TCP header; cut at 48 (a multiple of 8).
    let cut = segment.len().min(48);
    Ipv4::new(client, *service.ip())
        .fragment(0, true)
        .payload(6, &segment[..cut])
        .frame()
}

/// A non-first IPv4 fragment (offset `offset` × 8 bytes, MF clear) of a TCP flow to the
/// service: no TCP header, only 16 bytes of payload.
pub fn later_fragment_v4(client: Ipv4Addr, service: SocketAddrV4, offset: u16) -> Vec<u8> {
    Ipv4::new(client, *service.ip())
        .fragment(offset, false)
        .payload(6, &[0x55; 16])
        .frame()
}

/// A client's opening SYN from `client:sport` to an IPv6 service.
pub fn syn_v6(client: Ipv6Addr, service: SocketAddrV6, sport: u16) -> Vec<u8> {
    syn_v6_packet(client, service, sport).frame()
}

/// The IP packet of [`syn_v6`].
pub fn syn_v6_packet(client: Ipv6Addr, service: SocketAddrV6, sport: u16) -> IpPacket {
    Ipv6::new(client, *service.ip()).tcp(&Tcp::syn(sport, service.port()))
}

/// The handshake-completing ACK of the IPv6 flow opened by [`syn_v6`].
pub fn ack_v6(client: Ipv6Addr, service: SocketAddrV6, sport: u16) -> Vec<u8> {
    Ipv6::new(client, *service.ip())
        .tcp(&Tcp::handshake_ack(sport, service.port()))
        .frame()
}

/// The first data segment of the IPv6 flow opened by [`syn_v6`].
pub fn data_v6(client: Ipv6Addr, service: SocketAddrV6, sport: u16, payload: &[u8]) -> Vec<u8> {
    Ipv6::new(client, *service.ip())
        .tcp(&Tcp::data(sport, service.port(), payload))
        .frame()
}

/// [`syn_v6`] with a hop-by-hop options extension header (PadN) before the TCP header.
pub fn syn_v6_hop_by_hop(client: Ipv6Addr, service: SocketAddrV6, sport: u16) -> Vec<u8> {
    Ipv6::new(client, *service.ip())
        .extension(Ipv6Ext::HopByHop)
        .tcp(&Tcp::syn(sport, service.port()))
        .frame()
}

/// A UDP datagram from `client:sport` to `dst` (not TCP: never a service flow).
pub fn udp_v4(client: Ipv4Addr, sport: u16, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    Ipv4::new(client, *dst.ip())
        .udp(&Udp::new(sport, dst.port(), payload))
        .frame()
}

/// `inner` in an IP-in-IP tunnel from `sender` to `decap`: IPIP, 6in4, 4in6 or IP6IP6 by
/// the families involved. Frame [`CLIENT_MAC`] → [`EDGE_MAC`].
///
/// # Panics
/// If `sender` and `decap` are of different families.
pub fn ipip(sender: IpAddr, decap: IpAddr, inner: &IpPacket) -> Vec<u8> {
    Ip::new(sender, decap).encap(inner).frame()
}

/// `inner` in a GUE tunnel (variant 1, UDP `sport` → [`DEFAULT_GUE_PORT`], valid UDP
/// checksum) from `sender` to `decap`. Frame [`CLIENT_MAC`] → [`EDGE_MAC`].
///
/// # Panics
/// If `sender` and `decap` are of different families.
pub fn gue(sender: IpAddr, decap: IpAddr, sport: u16, inner: &IpPacket) -> Vec<u8> {
    Ip::new(sender, decap)
        .gue(sport, DEFAULT_GUE_PORT, inner)
        .frame()
}

// ---------------------------------------------------------------------------------------
// Parsing output
// ---------------------------------------------------------------------------------------

/// What went wrong reading a frame, or which checksum is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("Ethernet header: {0}")]
    Ethernet(etherparse::err::LenError),
    #[error("802.1Q tag: {0}")]
    Vlan(etherparse::err::LenError),
    #[error("EtherType {0:#06x} is neither IPv4 nor IPv6")]
    EtherType(u16),
    #[error("{layer} IP headers: {source}")]
    Ip {
        layer: Layer,
        source: etherparse::err::ip::HeadersSliceError,
    },
    #[error("{layer} TCP header: {source}")]
    Tcp {
        layer: Layer,
        source: etherparse::err::tcp::HeaderSliceError,
    },
    #[error("{layer} UDP header: {source}")]
    Udp {
        layer: Layer,
        source: etherparse::err::LenError,
    },
    #[error("{layer} UDP length {length} does not match the {actual} bytes after the IP header")]
    UdpLength {
        layer: Layer,
        length: u16,
        actual: usize,
    },
    #[error("{layer} IPv4 header checksum {found:#06x}, expected {expected:#06x}")]
    Ipv4Checksum {
        layer: Layer,
        found: u16,
        expected: u16,
    },
    #[error("{layer} UDP checksum {found:#06x}, expected {expected:#06x}")]
    UdpChecksum {
        layer: Layer,
        found: u16,
        expected: u16,
    },
    #[error("{layer} UDP over IPv6 with a zero checksum")]
    UdpZeroChecksumV6 { layer: Layer },
    #[error("{layer} TCP checksum {found:#06x}, expected {expected:#06x}")]
    TcpChecksum {
        layer: Layer,
        found: u16,
        expected: u16,
    },
    #[error("GUE to port {port} carries no IP packet (first byte {first:#04x})")]
    NotGue { port: u16, first: u8 },
    #[error("tunnel inside a tunnel (only one level is expected)")]
    NestedTunnel,
}

/// Outer or inner headers of a tunnelled packet (for messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    Outer,
    Inner,
}

impl std::fmt::Display for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Outer => "outer",
            Self::Inner => "inner",
        })
    }
}

/// One IP header (and its extensions) as parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpInfo {
    pub headers: IpHeaders,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Protocol of the payload (after IPv6 extension headers).
    pub protocol: u8,
    /// TTL or hop limit.
    pub ttl: u8,
    /// Length of the packet from this header to the end of its payload.
    pub len: usize,
    /// Length of the header including options / extension headers.
    pub header_len: usize,
    /// The payload is a fragment (non-first, or first with more to come).
    pub fragmented: bool,
}

/// The tunnel that carried the inner packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tunnel {
    /// IPIP, 6in4, 4in6 or IP6IP6 (protocol 4 or 41).
    IpInIp,
    /// GUE variant 1: this UDP header, then the inner IP packet.
    Gue(UdpHeader),
}

/// The transport layer of the innermost IP packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp {
        header: TcpHeader,
        payload: Vec<u8>,
    },
    Udp {
        header: UdpHeader,
        payload: Vec<u8>,
    },
    /// A fragment or another protocol: not parsed.
    Other {
        protocol: u8,
        payload: Vec<u8>,
    },
}

impl Transport {
    pub fn tcp(&self) -> Option<&TcpHeader> {
        match self {
            Self::Tcp { header, .. } => Some(header),
            _ => None,
        }
    }

    pub fn udp(&self) -> Option<&UdpHeader> {
        match self {
            Self::Udp { header, .. } => Some(header),
            _ => None,
        }
    }

    pub fn payload(&self) -> &[u8] {
        match self {
            Self::Tcp { payload, .. } | Self::Udp { payload, .. } | Self::Other { payload, .. } => {
                payload
            }
        }
    }
}

/// A frame as read by [`parse_frame`], every checksum verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub eth: Ethernet2Header,
    pub vlan: Option<SingleVlanHeader>,
    /// The first IP header (the tunnel's outer header for a tunnelled packet).
    pub outer: IpInfo,
    pub tunnel: Option<Tunnel>,
    /// The tunnelled packet's IP header.
    pub inner: Option<IpInfo>,
    /// The transport layer of the innermost IP packet.
    pub transport: Transport,
    /// Bytes after the outer IP packet (Ethernet padding).
    pub trailing: usize,
}

impl Parsed {
    /// The innermost IP header (the packet the client sent).
    pub fn innermost(&self) -> &IpInfo {
        self.inner.as_ref().unwrap_or(&self.outer)
    }

    /// The MSS option of the innermost TCP header.
    pub fn mss(&self) -> Option<u16> {
        self.transport.tcp().and_then(|h| {
            h.options_iterator().find_map(|o| match o {
                Ok(TcpOptionElement::MaximumSegmentSize(m)) => Some(m),
                _ => None,
            })
        })
    }
}

/// Reads an Ethernet frame with etherparse, follows one tunnel (IP-in-IP, or UDP to
/// `gue_port` whose payload starts with an IP version nibble), and verifies every checksum:
/// IPv4 header checksums, UDP (zero allowed over IPv4 only) and TCP of the innermost packet
/// (fragments are not checked).
pub fn parse_frame(frame: &[u8], gue_port: u16) -> Result<Parsed, ParseError> {
    let (eth, rest) = Ethernet2Header::from_slice(frame).map_err(ParseError::Ethernet)?;
    let (vlan, ether_type, rest) = if eth.ether_type == EtherType::VLAN_TAGGED_FRAME {
        let (tag, rest) = SingleVlanHeader::from_slice(rest).map_err(ParseError::Vlan)?;
        let ether_type = tag.ether_type;
        (Some(tag), ether_type, rest)
    } else {
        (None, eth.ether_type, rest)
    };
    if ether_type != EtherType::IPV4 && ether_type != EtherType::IPV6 {
        return Err(ParseError::EtherType(ether_type.0));
    }
    let (outer, outer_payload) = parse_ip(rest, Layer::Outer)?;
    let trailing = rest.len() - outer.len;

    let tunnel_payload: Option<(Tunnel, &[u8])> = match outer.protocol {
        _ if outer.fragmented => None,
        4 | 41 => Some((Tunnel::IpInIp, outer_payload)),
        17 => {
            let (udp, udp_payload) = parse_udp(&outer, outer_payload, Layer::Outer)?;
            if udp.destination_port == gue_port {
                let first = udp_payload.first().copied().unwrap_or(0);
                if first >> 4 != 4 && first >> 4 != 6 {
                    return Err(ParseError::NotGue {
                        port: gue_port,
                        first,
                    });
                }
                Some((Tunnel::Gue(udp), udp_payload))
            } else {
                None
            }
        }
        _ => None,
    };

    let Some((tunnel, inner_bytes)) = tunnel_payload else {
        let transport = parse_transport(&outer, outer_payload, Layer::Outer)?;
        return Ok(Parsed {
            eth,
            vlan,
            outer,
            tunnel: None,
            inner: None,
            transport,
            trailing,
        });
    };
    let (inner, inner_payload) = parse_ip(inner_bytes, Layer::Inner)?;
    if !inner.fragmented && matches!(inner.protocol, 4 | 41) {
        return Err(ParseError::NestedTunnel);
    }
    let transport = parse_transport(&inner, inner_payload, Layer::Inner)?;
    Ok(Parsed {
        eth,
        vlan,
        outer,
        tunnel: Some(tunnel),
        inner: Some(inner),
        transport,
        trailing,
    })
}

fn parse_ip(bytes: &[u8], layer: Layer) -> Result<(IpInfo, &[u8]), ParseError> {
    let (headers, payload) =
        IpHeaders::from_slice(bytes).map_err(|source| ParseError::Ip { layer, source })?;
    let header_len = bytes.len() - payload.payload.len();
    let (src, dst, ttl, len) = match &headers {
        IpHeaders::Ipv4(h, _) => {
            let expected = h.calc_header_checksum();
            if expected != h.header_checksum {
                return Err(ParseError::Ipv4Checksum {
                    layer,
                    found: h.header_checksum,
                    expected,
                });
            }
            (
                IpAddr::from(h.source),
                IpAddr::from(h.destination),
                h.time_to_live,
                usize::from(h.total_len),
            )
        }
        IpHeaders::Ipv6(h, _) => (
            IpAddr::from(h.source),
            IpAddr::from(h.destination),
            h.hop_limit,
            Ipv6Header::LEN + usize::from(h.payload_length),
        ),
    };
    let info = IpInfo {
        src,
        dst,
        protocol: payload.ip_number.0,
        ttl,
        len,
        header_len,
        fragmented: payload.fragmented,
        headers,
    };
    Ok((info, payload.payload))
}

fn parse_udp<'a>(
    ip: &IpInfo,
    bytes: &'a [u8],
    layer: Layer,
) -> Result<(UdpHeader, &'a [u8]), ParseError> {
    let (header, payload) =
        UdpHeader::from_slice(bytes).map_err(|source| ParseError::Udp { layer, source })?;
    if usize::from(header.length) != bytes.len() {
        return Err(ParseError::UdpLength {
            layer,
            length: header.length,
            actual: bytes.len(),
        });
    }
    let expected = match (ip.src, ip.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            header.calc_checksum_ipv4_raw(s.octets(), d.octets(), payload)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            header.calc_checksum_ipv6_raw(s.octets(), d.octets(), payload)
        }
        _ => unreachable!("one IP header has one family"),
    }
    .map_err(|_| ParseError::UdpLength {
        layer,
        length: header.length,
        actual: bytes.len(),
    })?;
    match (header.checksum, ip.src) {
        (0, IpAddr::V4(_)) => {}
        (0, IpAddr::V6(_)) => return Err(ParseError::UdpZeroChecksumV6 { layer }),
        (found, _) if found != expected => {
            return Err(ParseError::UdpChecksum {
                layer,
                found,
                expected,
            });
        }
        _ => {}
    }
    Ok((header, payload))
}

fn parse_transport(ip: &IpInfo, bytes: &[u8], layer: Layer) -> Result<Transport, ParseError> {
    if ip.fragmented {
        return Ok(Transport::Other {
            protocol: ip.protocol,
            payload: bytes.to_vec(),
        });
    }
    match ip.protocol {
        6 => {
            let (header, payload) =
                TcpHeader::from_slice(bytes).map_err(|source| ParseError::Tcp { layer, source })?;
            let expected = match (ip.src, ip.dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    header.calc_checksum_ipv4_raw(s.octets(), d.octets(), payload)
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    header.calc_checksum_ipv6_raw(s.octets(), d.octets(), payload)
                }
                _ => unreachable!("one IP header has one family"),
            }
            .unwrap_or(!header.checksum);
            if expected != header.checksum {
                return Err(ParseError::TcpChecksum {
                    layer,
                    found: header.checksum,
                    expected,
                });
            }
            Ok(Transport::Tcp {
                header,
                payload: payload.to_vec(),
            })
        }
        17 => {
            let (header, payload) = parse_udp(ip, bytes, layer)?;
            Ok(Transport::Udp {
                header,
                payload: payload.to_vec(),
            })
        }
        protocol => Ok(Transport::Other {
            protocol,
            payload: bytes.to_vec(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use etherparse::{NetHeaders, PacketHeaders, TransportHeader};

    use super::*;

    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const SERVICE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 1), 80);
    const EDGE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
    const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
    const SERVICE6: SocketAddrV6 =
        SocketAddrV6::new(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1), 443, 0, 0);
    const EDGE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
    const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 3);

    fn parse(frame: &[u8]) -> Parsed {
        parse_frame(frame, DEFAULT_GUE_PORT)
            .unwrap_or_else(|e| panic!("fixture does not parse: {e}\n{frame:02x?}"))
    }

    fn etherparse_headers(frame: &[u8]) -> PacketHeaders<'_> {
        PacketHeaders::from_ethernet_slice(frame)
            .unwrap_or_else(|e| panic!("etherparse rejects the fixture: {e}"))
    }

    #[test]
    fn syn_v4_round_trips_through_etherparse() {
        let frame = syn_v4(CLIENT, SERVICE, 40_000);
        let headers = etherparse_headers(&frame);
        let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else {
            panic!("no IPv4 header: {headers:?}");
        };
        assert_eq!(ip.source, CLIENT.octets());
        assert_eq!(ip.destination, SERVICE.ip().octets());
        assert!(ip.dont_fragment);
        assert_eq!(ip.header_checksum, ip.calc_header_checksum());
        let Some(TransportHeader::Tcp(tcp)) = &headers.transport else {
            panic!("no TCP header: {headers:?}");
        };
        assert_eq!((tcp.source_port, tcp.destination_port), (40_000, 80));
        assert!(tcp.syn && !tcp.ack);
        assert_eq!(tcp.sequence_number, CLIENT_ISN);
        // 14 + 20 + 20 + 12 bytes of options (MSS 4, SACK-permitted 2, wscale 3, padding 3).
        assert_eq!(frame.len(), 66);
        let parsed = parse(&frame);
        assert_eq!(parsed.mss(), Some(FIXTURE_MSS));
        assert_eq!(parsed.eth.source, CLIENT_MAC);
        assert_eq!(parsed.eth.destination, EDGE_MAC);
        assert!(parsed.tunnel.is_none());
        assert_eq!(parsed.trailing, 0);
    }

    #[test]
    fn handshake_and_data_follow_the_syn() {
        let ack = parse(&ack_v4(CLIENT, SERVICE, 40_000));
        let Some(tcp) = ack.transport.tcp() else {
            panic!("no TCP: {ack:?}");
        };
        assert!(tcp.ack && !tcp.syn);
        assert_eq!(tcp.sequence_number, CLIENT_ISN + 1);
        assert_eq!(tcp.acknowledgment_number, SERVER_ISN + 1);
        let data = parse(&data_v4(CLIENT, SERVICE, 40_000, b"GET / HTTP/1.1\r\n\r\n"));
        assert_eq!(data.transport.payload(), b"GET / HTTP/1.1\r\n\r\n");
        assert!(data.transport.tcp().is_some_and(|t| t.psh && t.ack));
        let v6 = parse(&data_v6(CLIENT6, SERVICE6, 40_001, b"x"));
        assert_eq!(v6.outer.src, IpAddr::V6(CLIENT6));
        assert_eq!(v6.transport.payload(), b"x");
        assert!(
            parse(&ack_v6(CLIENT6, SERVICE6, 1))
                .transport
                .tcp()
                .is_some()
        );
    }

    #[test]
    fn vlan_tag_is_read_back() {
        let frame = syn_v4_vlan(CLIENT, SERVICE, 40_000, 100);
        assert_eq!(&frame[12..14], &[0x81, 0x00]);
        let headers = etherparse_headers(&frame);
        assert_eq!(headers.link_exts.len(), 1);
        let parsed = parse(&frame);
        assert_eq!(parsed.vlan.map(|v| v.vlan_id.value()), Some(100));
        assert_eq!(parsed.outer.dst, IpAddr::V4(*SERVICE.ip()));
    }

    #[test]
    fn ipv4_options_lengthen_the_header() {
        let parsed = parse(&syn_v4_ip_options(CLIENT, SERVICE, 40_000));
        assert_eq!(parsed.outer.header_len, 24);
        let IpHeaders::Ipv4(h, _) = &parsed.outer.headers else {
            panic!("not IPv4");
        };
        assert_eq!(h.options.as_slice(), &[0x94, 0x04, 0x00, 0x00]);
        assert!(parsed.transport.tcp().is_some_and(|t| t.syn));
    }

    #[test]
    #[should_panic(expected = "IPv4 options of 3 bytes")]
    fn unencodable_options_are_reported() {
        let _ = Ipv4::new(CLIENT, EDGE).options(&[1, 1, 1]).payload(6, &[]);
    }

    #[test]
    fn fragments_carry_their_offsets() {
        let first = parse(&first_fragment_v4(CLIENT, SERVICE, 40_000));
        let IpHeaders::Ipv4(h, _) = &first.outer.headers else {
            panic!("not IPv4");
        };
        assert!(h.more_fragments && !h.dont_fragment);
        assert_eq!(h.fragment_offset.value(), 0);
        assert!(first.outer.fragmented);
        let later = parse(&later_fragment_v4(CLIENT, SERVICE, 6));
        let IpHeaders::Ipv4(h, _) = &later.outer.headers else {
            panic!("not IPv4");
        };
        assert!(!h.more_fragments);
        assert_eq!(h.fragment_offset.value(), 6);
        assert_eq!(later.transport.payload().len(), 16);
        assert!(later.transport.tcp().is_none());
    }

    #[test]
    fn ipv6_syn_and_extension_header() {
        let plain = syn_v6(CLIENT6, SERVICE6, 40_000);
        assert_eq!(plain.len(), 14 + 40 + 32);
        let parsed = parse(&plain);
        assert_eq!(parsed.outer.protocol, 6);
        assert_eq!(parsed.outer.src, IpAddr::V6(CLIENT6));
        assert_eq!(parsed.mss(), Some(FIXTURE_MSS));

        let with_ext = syn_v6_hop_by_hop(CLIENT6, SERVICE6, 40_000);
        assert_eq!(with_ext.len(), plain.len() + 8);
        // The fixed header names the hop-by-hop header, which names TCP.
        assert_eq!(with_ext[14 + 6], 0);
        assert_eq!(with_ext[14 + 40], 6);
        let headers = etherparse_headers(&with_ext);
        let Some(NetHeaders::Ipv6(_, exts)) = &headers.net else {
            panic!("no IPv6");
        };
        assert!(exts.hop_by_hop_options.is_some());
        let parsed = parse(&with_ext);
        assert_eq!(parsed.outer.header_len, 48);
        assert!(parsed.transport.tcp().is_some_and(|t| t.syn));
    }

    #[test]
    fn ipv6_fragment_and_destination_options_chain() {
        let packet = Ipv6::new(CLIENT6, *SERVICE6.ip())
            .extension(Ipv6Ext::DestinationOptions)
            .extension(Ipv6Ext::Fragment {
                offset: 3,
                more: false,
                id: 7,
            })
            .payload(6, &[0; 8]);
        let parsed = parse(&packet.frame());
        let IpHeaders::Ipv6(_, exts) = &parsed.outer.headers else {
            panic!("not IPv6");
        };
        assert!(exts.destination_options.is_some());
        assert_eq!(
            exts.fragment.as_ref().map(|f| f.fragment_offset.value()),
            Some(3)
        );
        assert!(parsed.outer.fragmented);
        assert_eq!(parsed.outer.protocol, 6);
    }

    #[test]
    fn tunnels_of_every_family_pair() {
        let inner4 = syn_v4_packet(CLIENT, SERVICE, 40_000);
        let inner6 = syn_v6_packet(CLIENT6, SERVICE6, 40_000);
        let cases: [(IpAddr, IpAddr, &IpPacket, u8); 4] = [
            (EDGE.into(), PEER.into(), &inner4, 4),    // IPIP
            (EDGE.into(), PEER.into(), &inner6, 41),   // 6in4
            (EDGE6.into(), PEER6.into(), &inner4, 4),  // 4in6
            (EDGE6.into(), PEER6.into(), &inner6, 41), // IP6IP6
        ];
        for (sender, decap, inner, protocol) in cases {
            let frame = ipip(sender, decap, inner);
            let parsed = parse(&frame);
            assert_eq!(parsed.tunnel, Some(Tunnel::IpInIp));
            assert_eq!(parsed.outer.protocol, protocol);
            assert_eq!((parsed.outer.src, parsed.outer.dst), (sender, decap));
            assert_eq!(&frame[14 + parsed.outer.header_len..], inner.bytes());
            assert!(parsed.transport.tcp().is_some_and(|t| t.syn));
            assert_eq!(parsed.mss(), Some(FIXTURE_MSS));

            let frame = gue(sender, decap, 50_000, inner);
            let parsed = parse(&frame);
            let Some(Tunnel::Gue(udp)) = &parsed.tunnel else {
                panic!("not GUE: {parsed:?}");
            };
            assert_eq!(udp.destination_port, DEFAULT_GUE_PORT);
            assert_ne!(udp.checksum, 0);
            assert_eq!(
                parsed.inner.as_ref().map(|i| i.len),
                Some(inner.bytes().len())
            );
            assert_eq!(&frame[14 + parsed.outer.header_len + 8..], inner.bytes());
        }
    }

    #[test]
    fn gue_to_another_port_is_plain_udp() {
        let inner = syn_v4_packet(CLIENT, SERVICE, 40_000);
        let frame = gue(EDGE.into(), PEER.into(), 50_000, &inner);
        let parsed = parse_frame(&frame, 9999).unwrap_or_else(|e| panic!("{e}"));
        assert!(parsed.tunnel.is_none());
        assert!(parsed.transport.udp().is_some());
    }

    #[test]
    fn broken_checksums_are_caught() {
        let bad_ip = Ipv4::new(CLIENT, *SERVICE.ip())
            .corrupt_checksum()
            .tcp(&Tcp::syn(1, 80))
            .frame();
        assert!(matches!(
            parse_frame(&bad_ip, DEFAULT_GUE_PORT),
            Err(ParseError::Ipv4Checksum {
                layer: Layer::Outer,
                ..
            })
        ));

        let bad_tcp = Ipv4::new(CLIENT, *SERVICE.ip()).tcp(&Tcp::syn(1, 80).corrupt_checksum());
        let tunnelled = ipip(EDGE.into(), PEER.into(), &bad_tcp);
        assert!(matches!(
            parse_frame(&tunnelled, DEFAULT_GUE_PORT),
            Err(ParseError::TcpChecksum {
                layer: Layer::Inner,
                ..
            })
        ));

        let inner = syn_v6_packet(CLIENT6, SERVICE6, 1);
        let bad_udp = Ipv6::new(EDGE6, PEER6)
            .udp(&Udp::new(1, DEFAULT_GUE_PORT, inner.bytes()).checksum(UdpChecksum::Corrupt))
            .frame();
        assert!(matches!(
            parse_frame(&bad_udp, DEFAULT_GUE_PORT),
            Err(ParseError::UdpChecksum {
                layer: Layer::Outer,
                ..
            })
        ));
        let zero_v6 = Ipv6::new(EDGE6, PEER6)
            .udp(&Udp::new(1, DEFAULT_GUE_PORT, inner.bytes()).checksum(UdpChecksum::Zero))
            .frame();
        assert!(matches!(
            parse_frame(&zero_v6, DEFAULT_GUE_PORT),
            Err(ParseError::UdpZeroChecksumV6 { .. })
        ));
        let zero_v4 = Ipv4::new(EDGE, PEER)
            .udp(&Udp::new(1, DEFAULT_GUE_PORT, inner.bytes()).checksum(UdpChecksum::Zero))
            .frame();
        assert!(parse_frame(&zero_v4, DEFAULT_GUE_PORT).is_ok());
    }

    #[test]
    fn a_changed_byte_is_caught_by_some_checksum() {
        // Every byte after the Ethernet header of a GUE packet is covered by the outer IPv4
        // header checksum or the UDP checksum.
        let inner = syn_v4_packet(CLIENT, SERVICE, 40_000);
        let frame = gue(EDGE.into(), PEER.into(), 50_000, &inner);
        for i in 14..frame.len() {
            let mut broken = frame.clone();
            broken[i] ^= 0x01;
            assert!(
                parse_frame(&broken, DEFAULT_GUE_PORT).is_err(),
                "byte {i} flipped and nothing noticed"
            );
        }
    }

    #[test]
    fn truncated_frames_are_errors_not_panics() {
        let frame = gue(
            EDGE.into(),
            PEER.into(),
            50_000,
            &syn_v4_packet(CLIENT, SERVICE, 1),
        );
        for len in 0..frame.len() {
            assert!(
                parse_frame(&frame[..len], DEFAULT_GUE_PORT).is_err(),
                "length {len}"
            );
        }
    }

    #[test]
    fn mss_replaces_in_place() {
        let tcp = Tcp::syn(1, 2).mss(1400);
        assert_eq!(tcp.options[0], TcpOptionElement::MaximumSegmentSize(1400));
        assert_eq!(
            tcp.options
                .iter()
                .filter(|o| matches!(o, TcpOptionElement::MaximumSegmentSize(_)))
                .count(),
            1
        );
        assert_eq!(Tcp::syn(1, 2).no_options().mss(900).options.len(), 1);
    }

    #[test]
    fn udp_fixture() {
        let parsed = parse(&udp_v4(CLIENT, 5353, SocketAddrV4::new(PEER, 9), b"hi"));
        assert_eq!(parsed.transport.udp().map(|u| u.destination_port), Some(9));
        assert_eq!(parsed.transport.payload(), b"hi");
    }
}
