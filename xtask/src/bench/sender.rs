//! The packet generator: an AF_PACKET socket in the sender namespace, on one pinned CPU, pushing
//! 64-byte UDP frames in `sendmmsg` batches until told to stop or its bounds run out.
//!
//! The project's own rather than trafgen, which aborts on EAGAIN when the receiver backs up:
//! this one counts the refusal, yields and goes on. On veth the receiver's work runs in this
//! thread's softirq on this CPU, which is what lets the benchmark charge the receive path to the
//! softirq time of that one CPU.

use std::{
    ffi::CString,
    fs::File,
    mem,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sched::{CpuSet, sched_setaffinity},
    unistd::Pid,
};

/// 64 bytes on the wire with the frame check sequence, which the NIC (here veth) would add.
pub const FRAME_LEN: usize = 60;
const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const SOURCE_PORT: u16 = 40_000;
/// Frames per `sendmmsg`: enough to amortise the syscall, few enough to stop promptly.
const BATCH: usize = 64;

/// An Ethernet + IPv4 + UDP frame of [`FRAME_LEN`] bytes, checksummed, zero payload.
pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    dst_port: u16,
) -> [u8; FRAME_LEN] {
    let mut frame = [0u8; FRAME_LEN];
    frame[0..6].copy_from_slice(&dst_mac);
    frame[6..12].copy_from_slice(&src_mac);
    frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());

    let ip_len = (FRAME_LEN - ETH_HLEN) as u16;
    let ip = &mut frame[ETH_HLEN..ETH_HLEN + IPV4_HLEN];
    ip[0] = 0x45; // version 4, 5 words of header
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
    ip[8] = 64; // TTL
    ip[9] = 17; // UDP
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let checksum = ipv4_checksum(ip);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());

    let udp_len = ip_len - IPV4_HLEN as u16;
    let udp = &mut frame[ETH_HLEN + IPV4_HLEN..ETH_HLEN + IPV4_HLEN + UDP_HLEN];
    udp[0..2].copy_from_slice(&SOURCE_PORT.to_be_bytes());
    udp[2..4].copy_from_slice(&dst_port.to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    // UDP checksum 0: "none", valid over IPv4.
    frame
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|word| u32::from(u16::from_be_bytes([word[0], word[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Where the sender stops on its own, whatever the measuring side does.
pub struct Limits {
    pub max_packets: u64,
    pub max_time: Duration,
}

/// Shared between the sender thread and the one measuring it.
#[derive(Default)]
pub struct Progress {
    sent: AtomicU64,
    stop: AtomicBool,
}

impl Progress {
    /// Frames the kernel has accepted so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// How a send run ended.
pub struct SendReport {
    pub sent: u64,
    /// `sendmmsg` calls refused with EAGAIN/ENOBUFS (the receiver backed up).
    pub refused: u64,
}

/// Sends `frame` out of `ifname` until `progress` says stop or `limits` run out.
///
/// Call it on a thread of its own: it moves that thread into the namespace behind `netns` and
/// onto `cpu` for good.
pub fn send(
    netns: &File,
    ifname: &str,
    cpu: usize,
    frame: &[u8],
    limits: &Limits,
    progress: &Progress,
) -> Result<SendReport> {
    super::netns::enter(netns)?;
    let mut cpus = CpuSet::new();
    cpus.set(cpu).with_context(|| format!("CPU {cpu}"))?;
    sched_setaffinity(Pid::from_raw(0), &cpus)
        .with_context(|| format!("pinning the sender to CPU {cpu}"))?;
    let socket = packet_socket(ifname)?;

    let mut iov = libc::iovec {
        iov_base: frame.as_ptr() as *mut libc::c_void,
        iov_len: frame.len(),
    };
    // SAFETY: mmsghdr is plain data; all-zero is a valid (empty) value, filled in below.
    let mut messages: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { mem::zeroed() }).collect();
    for message in &mut messages {
        // The socket is bound to the interface, so no destination address is needed. Every
        // message points at the same frame; the kernel only reads it.
        message.msg_hdr.msg_iov = &mut iov;
        message.msg_hdr.msg_iovlen = 1;
    }

    let started = Instant::now();
    let mut report = SendReport {
        sent: 0,
        refused: 0,
    };
    while !progress.stop.load(Ordering::Relaxed)
        && report.sent < limits.max_packets
        && started.elapsed() < limits.max_time
    {
        // SAFETY: `messages` holds BATCH valid headers whose iovec points at `frame`, all alive
        // for the call.
        let sent = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                messages.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if sent < 0 {
            let error = std::io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EAGAIN | libc::ENOBUFS) => {
                    report.refused += 1;
                    std::thread::yield_now();
                    continue;
                }
                _ => return Err(error).context("sendmmsg on the AF_PACKET socket"),
            }
        }
        report.sent += sent as u64;
        progress.sent.store(report.sent, Ordering::Relaxed);
    }
    Ok(report)
}

/// An AF_PACKET raw socket bound to `ifname`, send-only (protocol 0: it receives nothing), that
/// hands frames straight to the driver (PACKET_QDISC_BYPASS: veth has no queue to go through).
fn packet_socket(ifname: &str) -> Result<OwnedFd> {
    let name = CString::new(ifname).context("interface name")?;
    // SAFETY: `name` is a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {ifname} in the sender namespace");
    }
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET, SOCK_RAW)");
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };

    let one: libc::c_int = 1;
    // SAFETY: the option value is a live c_int of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&one as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("setsockopt(PACKET_QDISC_BYPASS)");
    }

    // SAFETY: sockaddr_ll is plain data; all-zero is valid, the fields that matter are set.
    let mut address: libc::sockaddr_ll = unsafe { mem::zeroed() };
    address.sll_family = libc::AF_PACKET as libc::c_ushort;
    address.sll_ifindex = ifindex as libc::c_int;
    // SAFETY: `address` is a live sockaddr_ll of the stated size.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&address as *const libc::sockaddr_ll).cast(),
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("binding to {ifname}"));
    }
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_is_a_valid_udp_datagram() {
        let frame = udp_frame([2; 6], [4; 6], [10, 77, 1, 2], [10, 77, 0, 1], 8000);
        assert_eq!(&frame[12..14], &[0x08, 0x00]);
        let ip = &frame[ETH_HLEN..ETH_HLEN + IPV4_HLEN];
        // A header with its checksum in place sums to 0xffff, so the check yields 0.
        assert_eq!(ipv4_checksum(ip), 0);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 46);
        assert_eq!(&ip[12..16], &[10, 77, 1, 2]);
        let udp = &frame[ETH_HLEN + IPV4_HLEN..];
        assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), 8000);
        assert_eq!(u16::from_be_bytes([udp[4], udp[5]]), 26);
    }
}
