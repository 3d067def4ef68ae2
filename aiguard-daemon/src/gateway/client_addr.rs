//! Whose request this is: the socket peer, or, when the peer is a trusted proxy (a load
//! balancer in front of the node), the client it speaks for, from `X-Forwarded-For` or a PROXY
//! protocol header.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use ipnetwork::IpNetwork;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _},
    time::timeout,
};

/// The longest PROXY header: v1 lines are at most 107 bytes; v2 headers carry a 16-byte
/// preamble and up to 65535 bytes of addresses and TLVs, of which we accept a sane amount.
const MAX_V2_PAYLOAD: usize = 512;
const V1_MAX: usize = 107;
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Whether `ip` belongs to a trusted proxy.
pub fn is_trusted(trusted: &[IpNetwork], ip: IpAddr) -> bool {
    let ip = canonical(ip);
    trusted.iter().any(|n| n.contains(ip))
}

/// IPv4-mapped IPv6 addresses (a dual-stack socket's view of IPv4 peers) as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The client of a request that came from `peer`: the rightmost `X-Forwarded-For` address
/// that is not itself a trusted proxy, when `peer` is trusted; `peer` otherwise (a client
/// cannot make itself someone else by sending the header). `values`: every X-Forwarded-For
/// field of the request, in order.
pub fn from_forwarded_for<'a>(
    trusted: &[IpNetwork],
    peer: IpAddr,
    values: impl Iterator<Item = &'a [u8]>,
) -> IpAddr {
    let peer = canonical(peer);
    if !is_trusted(trusted, peer) {
        return peer;
    }
    let mut client = peer;
    // Every X-Forwarded-For header, in order, as one list; walk it from the right.
    let hops: Vec<&str> = values
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for hop in hops.iter().rev() {
        let Some(ip) = parse_hop(hop) else {
            // Garbage: stop at the last address we could believe.
            break;
        };
        client = canonical(ip);
        if !is_trusted(trusted, client) {
            break;
        }
    }
    client
}

fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    // `1.2.3.4:5678` and `[2001:db8::1]:5678`.
    hop.parse::<SocketAddr>().ok().map(|s| s.ip())
}

/// Why a PROXY protocol header was refused (the connection is closed).
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY protocol header within {0:?}")]
    Timeout(Duration),
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed PROXY protocol header")]
    Malformed,
}

/// Reads a PROXY protocol v1 or v2 header, byte-exact (nothing of the HTTP request after it is
/// consumed), and returns the client address it names (`None` for LOCAL/UNKNOWN: the proxy's
/// own health checks, which keep the peer address).
pub async fn read_proxy_header<R: AsyncRead + Unpin>(
    io: &mut R,
    limit: Duration,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    timeout(limit, read_header(io))
        .await
        .map_err(|_| ProxyHeaderError::Timeout(limit))?
}

async fn read_header<R: AsyncRead + Unpin>(
    io: &mut R,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut buf = vec![0u8; 16];
    io.read_exact(&mut buf[..1]).await?;
    if buf[0] == b'P' {
        // v1: a text line ending in CRLF.
        let mut len = 1;
        loop {
            if len >= V1_MAX {
                return Err(ProxyHeaderError::Malformed);
            }
            if buf.len() <= len {
                buf.resize(len + 1, 0);
            }
            io.read_exact(&mut buf[len..len + 1]).await?;
            len += 1;
            if buf[..len].ends_with(b"\r\n") {
                break;
            }
        }
        let header = ppp::v1::Header::try_from(
            std::str::from_utf8(&buf[..len]).map_err(|_| ProxyHeaderError::Malformed)?,
        )
        .map_err(|_| ProxyHeaderError::Malformed)?;
        return Ok(match header.addresses {
            ppp::v1::Addresses::Tcp4(a) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            ppp::v1::Addresses::Tcp6(a) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            ppp::v1::Addresses::Unknown => None,
        });
    }
    io.read_exact(&mut buf[1..16]).await?;
    if buf[..12] != V2_SIGNATURE {
        return Err(ProxyHeaderError::Malformed);
    }
    let payload = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if payload > MAX_V2_PAYLOAD {
        return Err(ProxyHeaderError::Malformed);
    }
    buf.resize(16 + payload, 0);
    io.read_exact(&mut buf[16..]).await?;
    let header = ppp::v2::Header::try_from(&buf[..]).map_err(|_| ProxyHeaderError::Malformed)?;
    if header.command == ppp::v2::Command::Local {
        return Ok(None);
    }
    Ok(match header.addresses {
        ppp::v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<IpNetwork> {
        s.iter().map(|n| n.parse().expect("net")).collect()
    }

    fn xff<'a>(v: &'a [&'a str]) -> impl Iterator<Item = &'a [u8]> + Clone {
        v.iter().map(|x| x.as_bytes())
    }

    #[test]
    fn forwarded_for_is_only_believed_from_trusted_proxies() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = xff(&["198.51.100.7, 10.0.0.2"]);
        // From a trusted balancer: the rightmost untrusted hop.
        assert_eq!(
            from_forwarded_for(&trusted, "10.0.0.1".parse().expect("ip"), h.clone()),
            "198.51.100.7".parse::<IpAddr>().expect("ip")
        );
        // From anyone else: the socket address, whatever the header says.
        assert_eq!(
            from_forwarded_for(&trusted, "203.0.113.9".parse().expect("ip"), h.clone()),
            "203.0.113.9".parse::<IpAddr>().expect("ip")
        );
        // A spoofed leftmost entry does not win over the real client the balancer appended.
        let h = xff(&["1.1.1.1", "198.51.100.7"]);
        assert_eq!(
            from_forwarded_for(&trusted, "10.0.0.1".parse().expect("ip"), h.clone()),
            "198.51.100.7".parse::<IpAddr>().expect("ip")
        );
        // Garbage stops the walk at the last believable address.
        let h = xff(&["198.51.100.7, nonsense"]);
        assert_eq!(
            from_forwarded_for(&trusted, "10.0.0.1".parse().expect("ip"), h.clone()),
            "10.0.0.1".parse::<IpAddr>().expect("ip")
        );
    }

    #[tokio::test]
    async fn proxy_headers_v1_and_v2_are_read_exactly() {
        let mut v1: &[u8] = b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 8080\r\nGET / HTTP/1.1\r\n";
        let got = read_proxy_header(&mut v1, Duration::from_secs(1))
            .await
            .expect("v1");
        assert_eq!(got, Some("198.51.100.7:40000".parse().expect("addr")));
        assert_eq!(
            v1, b"GET / HTTP/1.1\r\n",
            "nothing after the header is consumed"
        );

        let header = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (
                "[2001:db8::7]:40000".parse::<SocketAddr>().expect("addr"),
                "[2001:db8::1]:8080".parse::<SocketAddr>().expect("addr"),
            ),
        )
        .build()
        .expect("v2 header");
        let mut bytes = header.clone();
        bytes.extend_from_slice(b"GET /");
        let mut v2: &[u8] = &bytes;
        let got = read_proxy_header(&mut v2, Duration::from_secs(1))
            .await
            .expect("v2");
        assert_eq!(got, Some("[2001:db8::7]:40000".parse().expect("addr")));
        assert_eq!(v2, b"GET /");

        let mut bad: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
        assert!(
            read_proxy_header(&mut bad, Duration::from_secs(1))
                .await
                .is_err()
        );
    }
}
