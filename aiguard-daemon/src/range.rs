//! Address ranges as operators type them: parsing, the checks that keep a typo from banning the
//! wrong thing, and conversion to LPM trie keys.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

/// Why a range was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Not an address or CIDR at all.
    #[error(
        "{input:?} is not a valid IP range: {reason}; expected e.g. 203.0.113.0/24, 2001:db8::/48 or a single address"
    )]
    Malformed { input: String, reason: String },
    /// Bits set after the prefix: almost always a typo for the network address.
    #[error("{input} has host bits set after the /{prefix}; did you mean {network}?")]
    HostBitsSet {
        input: String,
        prefix: u8,
        network: IpNetwork,
    },
    /// A /0 covers every address of its family.
    #[error("{input} covers every {family} address; pass --force if you really mean that")]
    WholeFamily { input: String, family: &'static str },
}

/// Parses a CIDR or a bare address (a /32 or /128). An IPv4-mapped IPv6 range (::ffff:a.b.c.d/n,
/// n >= 96) becomes the IPv4 range it stands for, because the XDP program looks mapped sources up
/// as IPv4. `/0` is refused unless `allow_whole_family`.
pub fn parse_range(input: &str, allow_whole_family: bool) -> Result<IpNetwork, RangeError> {
    let trimmed = input.trim();
    let malformed = |reason: String| RangeError::Malformed {
        input: input.to_owned(),
        reason,
    };
    if trimmed.is_empty() {
        return Err(malformed("it is empty".into()));
    }
    let net = match trimmed.split_once('/') {
        None => {
            let ip: IpAddr = trimmed
                .parse()
                .map_err(|_| malformed("not an IPv4 or IPv6 address".into()))?;
            IpNetwork::from(ip)
        }
        Some((addr, len)) => {
            let ip: IpAddr = addr
                .parse()
                .map_err(|_| malformed(format!("{addr:?} is not an IPv4 or IPv6 address")))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len: u8 = len.parse().ok().filter(|l| *l <= max).ok_or_else(|| {
                malformed(format!(
                    "prefix length {len:?} is not a number from 0 to {max}"
                ))
            })?;
            IpNetwork::new(ip, len).map_err(|e| malformed(e.to_string()))?
        }
    };
    let net = unmap(net);
    if net.ip() != net.network() {
        let network =
            IpNetwork::new(net.network(), net.prefix()).expect("network address of a valid prefix");
        return Err(RangeError::HostBitsSet {
            input: trimmed.to_owned(),
            prefix: net.prefix(),
            network,
        });
    }
    if net.prefix() == 0 && !allow_whole_family {
        return Err(RangeError::WholeFamily {
            input: trimmed.to_owned(),
            family: if net.is_ipv4() { "IPv4" } else { "IPv6" },
        });
    }
    Ok(net)
}

/// ::ffff:a.b.c.d/n (n >= 96) -> a.b.c.d/(n - 96).
fn unmap(net: IpNetwork) -> IpNetwork {
    match net {
        IpNetwork::V6(v6) if v6.prefix() >= 96 => match v6.ip().to_ipv4_mapped() {
            Some(v4) => {
                IpNetwork::V4(Ipv4Network::new(v4, v6.prefix() - 96).expect("prefix is at most 32"))
            }
            None => net,
        },
        _ => net,
    }
}

/// Whether two ranges share any address.
pub fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    match (a, b) {
        (IpNetwork::V4(a), IpNetwork::V4(b)) => a.contains(b.network()) || b.contains(a.network()),
        (IpNetwork::V6(a), IpNetwork::V6(b)) => a.contains(b.network()) || b.contains(a.network()),
        _ => false,
    }
}

/// An LPM trie key laid out as the kernel reads it (`struct bpf_lpm_trie_key`): prefix length,
/// then the address in network order. For batch updates, which take raw key arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C, packed)]
pub struct TrieKey<const N: usize> {
    pub prefix_len: u32,
    pub addr: [u8; N],
}

impl TrieKey<4> {
    pub fn v4(net: &Ipv4Network) -> Self {
        let (prefix_len, addr) = v4_key(net);
        Self { prefix_len, addr }
    }
}

impl TrieKey<16> {
    pub fn v6(net: &Ipv6Network) -> Self {
        let (prefix_len, addr) = v6_key(net);
        Self { prefix_len, addr }
    }
}

impl<const N: usize> TrieKey<N> {
    /// The range this key stands for.
    pub fn network(&self) -> IpNetwork {
        let (len, addr) = (self.prefix_len, self.addr);
        if N == 4 {
            from_v4_key(len, addr[..4].try_into().expect("4 bytes"))
        } else {
            from_v6_key(len, addr[..16].try_into().expect("16 bytes"))
        }
    }
}

/// LPM trie key data for an IPv4 range: (prefix length, address bytes in network order).
pub fn v4_key(net: &Ipv4Network) -> (u32, [u8; 4]) {
    (u32::from(net.prefix()), net.network().octets())
}

/// LPM trie key data for an IPv6 range.
pub fn v6_key(net: &Ipv6Network) -> (u32, [u8; 16]) {
    (u32::from(net.prefix()), net.network().octets())
}

/// The range an LPM trie key stands for.
pub fn from_v4_key(prefix_len: u32, data: [u8; 4]) -> IpNetwork {
    IpNetwork::V4(
        Ipv4Network::new(Ipv4Addr::from(data), prefix_len as u8)
            .expect("trie keys are valid prefixes"),
    )
}

/// The range an LPM trie key stands for.
pub fn from_v6_key(prefix_len: u32, data: [u8; 16]) -> IpNetwork {
    IpNetwork::V6(
        Ipv6Network::new(Ipv6Addr::from(data), prefix_len as u8)
            .expect("trie keys are valid prefixes"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_cidrs_and_bare_addresses() {
        assert_eq!(
            parse_range("203.0.113.0/24", false).unwrap().to_string(),
            "203.0.113.0/24"
        );
        assert_eq!(
            parse_range(" 198.51.100.7 ", false).unwrap().to_string(),
            "198.51.100.7/32"
        );
        assert_eq!(
            parse_range("2001:db8::/48", false).unwrap().to_string(),
            "2001:db8::/48"
        );
        assert_eq!(parse_range("2001:db8::1", false).unwrap().prefix(), 128);
    }

    #[test]
    fn mapped_ipv6_becomes_ipv4() {
        assert_eq!(
            parse_range("::ffff:203.0.113.0/120", false)
                .unwrap()
                .to_string(),
            "203.0.113.0/24"
        );
        assert_eq!(
            parse_range("::ffff:198.51.100.7", false)
                .unwrap()
                .to_string(),
            "198.51.100.7/32"
        );
    }

    #[test]
    fn host_bits_suggest_the_network() {
        let err = parse_range("203.0.113.5/24", false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "203.0.113.5/24 has host bits set after the /24; did you mean 203.0.113.0/24?"
        );
        assert!(matches!(
            parse_range("2001:db8::1/64", false),
            Err(RangeError::HostBitsSet { .. })
        ));
    }

    #[test]
    fn zero_prefix_needs_force() {
        let err = parse_range("0.0.0.0/0", false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert!(parse_range("0.0.0.0/0", true).is_ok());
        assert!(matches!(
            parse_range("::/0", false),
            Err(RangeError::WholeFamily { family: "IPv6", .. })
        ));
    }

    #[test]
    fn malformed_input_says_what_is_expected() {
        for bad in [
            "",
            "300.1.2.3/24",
            "10.0.0.0/33",
            "10.0.0.0/abc",
            "fe80::/129",
            "banana",
            "10.0.0/8",
            "1.2.3.4/-1",
        ] {
            let err = parse_range(bad, false).unwrap_err();
            assert!(matches!(err, RangeError::Malformed { .. }), "{bad}: {err}");
            assert!(err.to_string().contains("expected e.g."), "{err}");
        }
    }

    #[test]
    fn overlap_is_symmetric_and_family_aware() {
        let a = parse_range("10.0.0.0/8", false).unwrap();
        let b = parse_range("10.1.2.0/24", false).unwrap();
        let c = parse_range("11.0.0.0/8", false).unwrap();
        let d = parse_range("::/96", false).unwrap();
        assert!(overlaps(&a, &b) && overlaps(&b, &a));
        assert!(!overlaps(&a, &c));
        assert!(!overlaps(&a, &d));
    }

    #[test]
    fn keys_round_trip() {
        let IpNetwork::V4(n) = parse_range("203.0.113.0/24", false).unwrap() else {
            unreachable!()
        };
        let (len, data) = v4_key(&n);
        assert_eq!(from_v4_key(len, data), IpNetwork::V4(n));
        let IpNetwork::V6(n) = parse_range("2001:db8:1::/48", false).unwrap() else {
            unreachable!()
        };
        let (len, data) = v6_key(&n);
        assert_eq!(from_v6_key(len, data), IpNetwork::V6(n));
    }
}
