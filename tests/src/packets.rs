//! Crafted Ethernet frames for the BPF_PROG_TEST_RUN verdict tests.
//!
//! A [`Frame`] describes a packet layer by layer: Ethernet, up to any number of VLAN tags
//! (outermost first), then IPv4 (with options and fragment fields), IPv6 (with extension
//! headers, the fragment header among them) or a raw payload of another EtherType, then TCP,
//! UDP or ICMP and a payload. [`Frame::build`] lays it out with every length right (IPv4 IHL and
//! total length, IPv6 payload length, extension header lengths, TCP data offset, UDP length);
//! [`Frame::layout`] says where each layer starts, so a test can cut a frame at a meaningful
//! byte. Checksums stay zero: XDP runs before anything checks them.
//!
//! ```
//! use aiguard_tests::packets::{Frame, Transport, VlanTag, TCP_SYN};
//!
//! let frame = Frame::ipv4([192, 0, 2, 1], [10, 0, 0, 1], Transport::tcp(40000, 8000, TCP_SYN))
//!     .vlan(VlanTag::dot1ad(100))
//!     .vlan(VlanTag::dot1q(10))
//!     .payload(b"GET /");
//! let bytes = frame.build();
//! assert_eq!(bytes.len(), 14 + 2 * 4 + 20 + 20 + 5);
//! assert_eq!(frame.layout().source, 34..38);
//! ```
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    ops::Range,
};

/// EtherType of IPv4.
pub const ETH_P_IPV4: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// EtherType of ARP, a handy non-IP frame.
pub const ETH_P_ARP: u16 = 0x0806;
/// TPID of an 802.1Q (customer) VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// TPID of an 802.1ad (service, "QinQ" outer) VLAN tag.
pub const ETH_P_8021AD: u16 = 0x88a8;

/// Length of an Ethernet header without tags.
pub const ETH_HLEN: usize = 14;
/// Length of one VLAN tag.
pub const VLAN_HLEN: usize = 4;
/// Length of the IPv4 header without options.
pub const IPV4_HLEN: usize = 20;
/// Length of the fixed IPv6 header.
pub const IPV6_HLEN: usize = 40;
/// Length of the TCP header this builder writes (no options).
pub const TCP_HLEN: usize = 20;
/// Length of the UDP header.
pub const UDP_HLEN: usize = 8;
/// Length of an ICMP / ICMPv6 echo header.
pub const ICMP_HLEN: usize = 8;

/// TCP flag bits (the 14th byte of the header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// IP protocol numbers this builder writes.
pub mod proto {
    pub const HOP_BY_HOP: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const AUTHENTICATION: u8 = 51;
    pub const ICMPV6: u8 = 58;
    pub const DESTINATION_OPTIONS: u8 = 60;
}

/// One VLAN tag: the TPID that announces it and the VLAN id (priority and DEI stay zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VlanTag {
    pub tpid: u16,
    pub vid: u16,
}

impl VlanTag {
    /// An 802.1Q tag (TPID 0x8100).
    pub fn dot1q(vid: u16) -> Self {
        Self {
            tpid: ETH_P_8021Q,
            vid,
        }
    }

    /// An 802.1ad tag (TPID 0x88a8), the outer tag of QinQ.
    pub fn dot1ad(vid: u16) -> Self {
        Self {
            tpid: ETH_P_8021AD,
            vid,
        }
    }
}

/// The transport header after the IP header (and after IPv6 extension headers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// 20-byte TCP header; `flags` are the `TCP_*` bits.
    Tcp {
        src_port: u16,
        dst_port: u16,
        flags: u8,
    },
    Udp {
        src_port: u16,
        dst_port: u16,
    },
    /// ICMP echo request over IPv4, ICMPv6 echo request over IPv6.
    IcmpEcho,
}

impl Transport {
    pub fn tcp(src_port: u16, dst_port: u16, flags: u8) -> Self {
        Self::Tcp {
            src_port,
            dst_port,
            flags,
        }
    }

    pub fn udp(src_port: u16, dst_port: u16) -> Self {
        Self::Udp { src_port, dst_port }
    }

    fn header_len(self) -> usize {
        match self {
            Self::Tcp { .. } => TCP_HLEN,
            Self::Udp { .. } => UDP_HLEN,
            Self::IcmpEcho => ICMP_HLEN,
        }
    }

    fn protocol(self, v6: bool) -> u8 {
        match self {
            Self::Tcp { .. } => proto::TCP,
            Self::Udp { .. } => proto::UDP,
            Self::IcmpEcho if v6 => proto::ICMPV6,
            Self::IcmpEcho => proto::ICMP,
        }
    }

    fn write(self, v6: bool, payload_len: usize, out: &mut Vec<u8>) {
        match self {
            Self::Tcp {
                src_port,
                dst_port,
                flags,
            } => {
                out.extend_from_slice(&src_port.to_be_bytes());
                out.extend_from_slice(&dst_port.to_be_bytes());
                out.extend_from_slice(&1u32.to_be_bytes()); // sequence number
                out.extend_from_slice(&0u32.to_be_bytes()); // acknowledgement number
                out.push(((TCP_HLEN / 4) as u8) << 4); // data offset, in 32-bit words
                out.push(flags);
                out.extend_from_slice(&0xffffu16.to_be_bytes()); // window
                out.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
            }
            Self::Udp { src_port, dst_port } => {
                out.extend_from_slice(&src_port.to_be_bytes());
                out.extend_from_slice(&dst_port.to_be_bytes());
                let len = u16::try_from(UDP_HLEN + payload_len).expect("UDP length fits 16 bits");
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(&[0, 0]); // checksum
            }
            Self::IcmpEcho => {
                out.push(if v6 { 128 } else { 8 }); // echo request
                out.push(0); // code
                out.extend_from_slice(&[0, 0]); // checksum
                out.extend_from_slice(&[0x12, 0x34, 0, 1]); // identifier, sequence
            }
        }
    }
}

/// An IPv6 extension header. Lengths are chosen so each header is a multiple of 8 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv6Ext {
    /// Hop-by-hop options: 8 bytes plus `extra_units` x 8, filled with one PadN option.
    HopByHop { extra_units: u8 },
    /// Routing header with segments left 0 (so it may be ignored): 8 + `extra_units` x 8 bytes.
    Routing { extra_units: u8 },
    /// Destination options: like hop-by-hop.
    DestinationOptions { extra_units: u8 },
    /// Fragment header; `offset` in 8-byte units (13 bits), `more` = more fragments follow.
    Fragment { offset: u16, more: bool },
    /// Authentication header with a 12-byte ICV (HMAC-96): 24 bytes.
    Authentication,
}

impl Ipv6Ext {
    fn number(self) -> u8 {
        match self {
            Self::HopByHop { .. } => proto::HOP_BY_HOP,
            Self::Routing { .. } => proto::ROUTING,
            Self::DestinationOptions { .. } => proto::DESTINATION_OPTIONS,
            Self::Fragment { .. } => proto::FRAGMENT,
            Self::Authentication => proto::AUTHENTICATION,
        }
    }

    fn len(self) -> usize {
        match self {
            Self::HopByHop { extra_units }
            | Self::Routing { extra_units }
            | Self::DestinationOptions { extra_units } => 8 + 8 * usize::from(extra_units),
            Self::Fragment { .. } => 8,
            Self::Authentication => 24,
        }
    }

    fn write(self, next: u8, out: &mut Vec<u8>) {
        let start = out.len();
        match self {
            Self::HopByHop { extra_units } | Self::DestinationOptions { extra_units } => {
                assert!(
                    extra_units <= 30,
                    "one PadN option covers at most 255 bytes"
                );
                out.extend_from_slice(&[next, extra_units]);
                // PadN: type 1, then the number of padding bytes that follow.
                let pad = 6 + 8 * usize::from(extra_units) - 2;
                out.extend_from_slice(&[1, pad as u8]);
                out.resize(out.len() + pad, 0);
            }
            Self::Routing { extra_units } => {
                // Routing type 0 with segments left 0: "ignore this header and go on".
                out.extend_from_slice(&[next, extra_units, 0, 0, 0, 0, 0, 0]);
                out.resize(out.len() + 8 * usize::from(extra_units), 0);
            }
            Self::Fragment { offset, more } => {
                assert!(offset < 1 << 13, "the fragment offset has 13 bits");
                let field = (offset << 3) | u16::from(more);
                out.extend_from_slice(&[next, 0]);
                out.extend_from_slice(&field.to_be_bytes());
                out.extend_from_slice(&0x0bad_f00du32.to_be_bytes()); // identification
            }
            Self::Authentication => {
                // Payload length: the header's length in 32-bit words, minus 2.
                out.extend_from_slice(&[next, (24 / 4 - 2) as u8, 0, 0]);
                out.extend_from_slice(&0x100u32.to_be_bytes()); // SPI
                out.extend_from_slice(&1u32.to_be_bytes()); // sequence number
                out.resize(out.len() + 12, 0xaa); // ICV
            }
        }
        debug_assert_eq!(out.len() - start, self.len());
    }
}

/// IPv4 header fields the tests vary; the rest are fixed (TTL 64, no DF, zero checksum).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Raw option bytes, padded with End-of-Options to a multiple of 4; at most 40.
    pub options: Vec<u8>,
    /// Fragment offset in 8-byte units (13 bits); non-zero = not the first fragment.
    pub fragment_offset: u16,
    pub more_fragments: bool,
}

/// IPv6 header fields the tests vary (hop limit 64, no flow label).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    /// In wire order; each one's next-header field names the one after it.
    pub extensions: Vec<Ipv6Ext>,
}

/// What follows the Ethernet header and VLAN tags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Network {
    Ipv4(Ipv4, Transport),
    Ipv6(Ipv6, Transport),
    /// Any other EtherType with its bytes as they are (ARP, LLDP, ...).
    Raw {
        ether_type: u16,
        bytes: Vec<u8>,
    },
}

/// A frame to build. Construct with [`Frame::ipv4`], [`Frame::ipv6`] or [`Frame::raw`] and
/// refine with the chained setters.
///
/// Non-first fragments still carry the configured transport header: a real one would carry
/// only payload there, and header-shaped bytes show that the program does not read them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// Outermost first.
    pub vlans: Vec<VlanTag>,
    pub network: Network,
    /// Bytes after the transport header.
    pub payload: Vec<u8>,
}

/// Where the layers of a built IP frame are (byte offsets into [`Frame::build`]'s output).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Start of the IP header, after Ethernet and VLAN tags.
    pub network: usize,
    /// The source address bytes.
    pub source: Range<usize>,
    /// End of the IP header proper: IPv4 with its options, or the fixed 40-byte IPv6 header.
    pub network_end: usize,
    /// Start of the transport header, after any IPv6 extension headers.
    pub transport: usize,
    /// End of the transport header.
    pub transport_end: usize,
}

impl Frame {
    fn with(network: Network) -> Self {
        Self {
            dst_mac: [0x02, 0, 0, 0, 0, 0x01],
            src_mac: [0x02, 0, 0, 0, 0, 0x02],
            vlans: Vec::new(),
            network,
            payload: Vec::new(),
        }
    }

    /// An unfragmented IPv4 packet without options.
    pub fn ipv4(src: impl Into<Ipv4Addr>, dst: impl Into<Ipv4Addr>, transport: Transport) -> Self {
        Self::with(Network::Ipv4(
            Ipv4 {
                src: src.into(),
                dst: dst.into(),
                options: Vec::new(),
                fragment_offset: 0,
                more_fragments: false,
            },
            transport,
        ))
    }

    /// An IPv6 packet without extension headers.
    pub fn ipv6(src: impl Into<Ipv6Addr>, dst: impl Into<Ipv6Addr>, transport: Transport) -> Self {
        Self::with(Network::Ipv6(
            Ipv6 {
                src: src.into(),
                dst: dst.into(),
                extensions: Vec::new(),
            },
            transport,
        ))
    }

    /// A frame of another EtherType carrying `bytes` as they are.
    pub fn raw(ether_type: u16, bytes: &[u8]) -> Self {
        Self::with(Network::Raw {
            ether_type,
            bytes: bytes.to_vec(),
        })
    }

    /// Adds a VLAN tag inside the ones already added (call outermost first).
    pub fn vlan(mut self, tag: VlanTag) -> Self {
        self.vlans.push(tag);
        self
    }

    /// Sets the bytes after the transport header.
    pub fn payload(mut self, bytes: &[u8]) -> Self {
        self.payload = bytes.to_vec();
        self
    }

    /// Sets IPv4 options (padded to a multiple of 4 at build time). Panics on a non-IPv4 frame.
    pub fn ipv4_options(mut self, options: &[u8]) -> Self {
        match &mut self.network {
            Network::Ipv4(ip, _) => ip.options = options.to_vec(),
            _ => panic!("IPv4 options on a frame that is not IPv4"),
        }
        self
    }

    /// Sets the IPv4 fragment offset (8-byte units) and the more-fragments flag. Panics on a
    /// non-IPv4 frame.
    pub fn ipv4_fragment(mut self, offset: u16, more: bool) -> Self {
        match &mut self.network {
            Network::Ipv4(ip, _) => {
                ip.fragment_offset = offset;
                ip.more_fragments = more;
            }
            _ => panic!("an IPv4 fragment offset on a frame that is not IPv4"),
        }
        self
    }

    /// Appends an IPv6 extension header after those already added. Panics on a non-IPv6 frame.
    pub fn ipv6_ext(mut self, ext: Ipv6Ext) -> Self {
        match &mut self.network {
            Network::Ipv6(ip, _) => ip.extensions.push(ext),
            _ => panic!("an IPv6 extension header on a frame that is not IPv6"),
        }
        self
    }

    /// The wire bytes.
    pub fn build(&self) -> Vec<u8> {
        self.assemble().0
    }

    /// Where the layers are. Panics for a raw (non-IP) frame, which has none of them.
    pub fn layout(&self) -> Layout {
        self.assemble().1.expect("a raw frame has no IP layout")
    }

    fn assemble(&self) -> (Vec<u8>, Option<Layout>) {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        // Each TPID sits where an EtherType would; the tag's TCI follows it.
        for tag in &self.vlans {
            out.extend_from_slice(&tag.tpid.to_be_bytes());
            out.extend_from_slice(&(tag.vid & 0x0fff).to_be_bytes());
        }
        let network = out.len() + 2;
        match &self.network {
            Network::Raw { ether_type, bytes } => {
                out.extend_from_slice(&ether_type.to_be_bytes());
                out.extend_from_slice(bytes);
                (out, None)
            }
            Network::Ipv4(ip, transport) => {
                out.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
                let mut options = ip.options.clone();
                options.resize(options.len().next_multiple_of(4), 0);
                assert!(options.len() <= 40, "IPv4 options are at most 40 bytes");
                assert!(
                    ip.fragment_offset < 1 << 13,
                    "the fragment offset has 13 bits"
                );
                let header_len = IPV4_HLEN + options.len();
                let total = header_len + transport.header_len() + self.payload.len();
                let flags = if ip.more_fragments { 0x2000 } else { 0 };
                out.push(0x40 | (header_len / 4) as u8); // version, IHL
                out.push(0); // DSCP, ECN
                let total = u16::try_from(total).expect("IPv4 total length fits 16 bits");
                out.extend_from_slice(&total.to_be_bytes());
                out.extend_from_slice(&0x1234u16.to_be_bytes()); // identification
                out.extend_from_slice(&(flags | ip.fragment_offset).to_be_bytes());
                out.push(64); // TTL
                out.push(transport.protocol(false));
                out.extend_from_slice(&[0, 0]); // checksum
                out.extend_from_slice(&ip.src.octets());
                out.extend_from_slice(&ip.dst.octets());
                out.extend_from_slice(&options);
                let transport_at = out.len();
                transport.write(false, self.payload.len(), &mut out);
                let layout = Layout {
                    network,
                    source: network + 12..network + 16,
                    network_end: network + header_len,
                    transport: transport_at,
                    transport_end: out.len(),
                };
                out.extend_from_slice(&self.payload);
                (out, Some(layout))
            }
            Network::Ipv6(ip, transport) => {
                out.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                let ext_len: usize = ip.extensions.iter().map(|e| e.len()).sum();
                let payload_len = ext_len + transport.header_len() + self.payload.len();
                let payload_len =
                    u16::try_from(payload_len).expect("IPv6 payload length fits 16 bits");
                let first = ip
                    .extensions
                    .first()
                    .map_or(transport.protocol(true), |e| e.number());
                out.extend_from_slice(&[0x60, 0, 0, 0]); // version, traffic class, flow label
                out.extend_from_slice(&payload_len.to_be_bytes());
                out.push(first);
                out.push(64); // hop limit
                out.extend_from_slice(&ip.src.octets());
                out.extend_from_slice(&ip.dst.octets());
                for (i, ext) in ip.extensions.iter().enumerate() {
                    let next = ip
                        .extensions
                        .get(i + 1)
                        .map_or(transport.protocol(true), |e| e.number());
                    ext.write(next, &mut out);
                }
                let transport_at = out.len();
                transport.write(true, self.payload.len(), &mut out);
                let layout = Layout {
                    network,
                    source: network + 8..network + 24,
                    network_end: network + IPV6_HLEN,
                    transport: transport_at,
                    transport_end: out.len(),
                };
                out.extend_from_slice(&self.payload);
                (out, Some(layout))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    #[test]
    fn ipv4_tcp_with_options_and_qinq_parses_back() {
        let frame = Frame::ipv4(
            [192, 0, 2, 7],
            [10, 0, 0, 1],
            Transport::tcp(4000, 8000, TCP_SYN),
        )
        .vlan(VlanTag::dot1ad(100))
        .vlan(VlanTag::dot1q(10))
        .ipv4_options(&[1, 1, 1])
        .payload(b"hello");
        let bytes = frame.build();
        let layout = frame.layout();
        let p = SlicedPacket::from_ethernet(&bytes).expect("etherparse reads it");
        let Some(NetSlice::Ipv4(ip)) = &p.net else {
            panic!("not IPv4: {p:?}")
        };
        assert_eq!(ip.header().source(), [192, 0, 2, 7]);
        assert_eq!(ip.header().ihl(), 6);
        assert_eq!(&bytes[layout.source.clone()], &[192, 0, 2, 7]);
        assert_eq!(layout.network, 14 + 8);
        assert_eq!(layout.network_end, 14 + 8 + 24);
        let Some(TransportSlice::Tcp(tcp)) = &p.transport else {
            panic!("not TCP: {p:?}")
        };
        assert_eq!(tcp.destination_port(), 8000);
        assert!(tcp.syn() && !tcp.ack());
        assert_eq!(tcp.payload(), b"hello");
    }

    #[test]
    fn ipv6_udp_with_extension_headers_parses_back() {
        let frame = Frame::ipv6(
            "2001:db8::1".parse::<Ipv6Addr>().expect("literal"),
            "2001:db8::2".parse::<Ipv6Addr>().expect("literal"),
            Transport::udp(5353, 8000),
        )
        .ipv6_ext(Ipv6Ext::HopByHop { extra_units: 1 })
        .ipv6_ext(Ipv6Ext::DestinationOptions { extra_units: 0 })
        .ipv6_ext(Ipv6Ext::Routing { extra_units: 2 })
        // An atomic fragment (offset 0, no more): etherparse still reads the transport.
        .ipv6_ext(Ipv6Ext::Fragment {
            offset: 0,
            more: false,
        })
        .ipv6_ext(Ipv6Ext::Authentication)
        .payload(b"abc");
        let bytes = frame.build();
        let layout = frame.layout();
        assert_eq!(layout.transport, 14 + 40 + 16 + 8 + 24 + 8 + 24);
        let p = SlicedPacket::from_ethernet(&bytes).expect("etherparse reads it");
        let Some(NetSlice::Ipv6(ip)) = &p.net else {
            panic!("not IPv6: {p:?}")
        };
        assert_eq!(
            ip.header().source_addr(),
            "2001:db8::1".parse::<Ipv6Addr>().expect("literal")
        );
        let Some(TransportSlice::Udp(udp)) = &p.transport else {
            panic!("not UDP: {p:?}")
        };
        assert_eq!(udp.destination_port(), 8000);
        assert_eq!(udp.length(), 8 + 3);
    }
}
