//! Network namespaces and veth pairs for end-to-end tests, and traffic made from inside them.
//!
//! Every namespace has a unique name and is deleted when its guard drops (panics included), which
//! also deletes the veth ends inside it. Traffic helpers run on a thread that has joined the
//! namespace with `setns`: the network namespace is per thread, and a socket keeps the namespace
//! it was created in, so no external tool (`ping`, `nc`, `ip netns exec`) is needed.
use std::{
    collections::HashMap,
    fs::File,
    io::ErrorKind,
    net::{IpAddr, SocketAddr, TcpListener, UdpSocket},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sched::{CloneFlags, setns},
    sys::{
        socket::{
            AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, setsockopt, socket,
            sockopt,
        },
        time::{TimeVal, TimeValLike as _},
    },
};

/// Where `ip netns` keeps its namespace handles.
const NETNS_DIR: &str = "/run/netns";

/// Runs `ip ARGS`, panicking with its stderr when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running `ip` (iproute2 is needed for the namespace tests)");
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with a unique name, loopback up and IPv6 off (router solicitations
    /// and DAD would be traffic the tests did not make).
    pub fn new() -> Self {
        let name = crate::unique_name("agn");
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        for knob in ["all", "default"] {
            let path = format!("/proc/sys/net/ipv6/conf/{knob}/disable_ipv6");
            ns.run(|| std::fs::write(&path, "1"))
                .unwrap_or_else(|e| panic!("writing {path} in {}: {e}", ns.name));
        }
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace handle, e.g. for `nsenter --net=PATH`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// `ip -n NAME ARGS...`, panicking when it fails.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Output of `ip -n NAME ARGS...`.
    pub fn ip_output(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("running `ip`");
        assert!(
            out.status.success(),
            "`ip -n {} {}` failed: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether an XDP program is attached to `interface` (as `ip link` reports it).
    pub fn xdp_attached(&self, interface: &str) -> bool {
        self.ip_output(&["-d", "link", "show", "dev", interface])
            .contains("prog/xdp")
    }

    fn handle(&self) -> File {
        File::open(self.path()).unwrap_or_else(|e| panic!("opening {}: {e}", self.path().display()))
    }

    /// Runs `f` on a thread of its own that has joined this namespace; the thread ends when `f`
    /// returns, so the rest of the process never leaves its namespace.
    pub fn spawn<T, F>(&self, f: F) -> JoinHandle<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let handle = self.handle();
        let name = self.name.clone();
        thread::Builder::new()
            .name(format!("in-{name}"))
            .spawn(move || {
                setns(&handle, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("joining network namespace {name}: {e}"));
                f()
            })
            .expect("spawning a thread")
    }

    /// Runs `f` inside this namespace and waits for it (a panic in `f` is passed on).
    pub fn run<T, F>(&self, f: F) -> T
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        let handle = self.handle();
        thread::scope(|s| {
            let joined = s
                .spawn(move || {
                    setns(&handle, CloneFlags::CLONE_NEWNET)
                        .unwrap_or_else(|e| panic!("joining network namespace {}: {e}", self.name));
                    f()
                })
                .join();
            joined.unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "warning: deleting network namespace {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("warning: deleting network namespace {}: {e}", self.name),
        }
    }
}

/// A veth pair between two namespaces, each end up and addressed. The ends go when their
/// namespaces are deleted.
pub struct VethPair {
    /// The end in the first ("server") namespace.
    pub server_if: String,
    /// The end in the second ("client") namespace.
    pub client_if: String,
}

impl VethPair {
    /// Creates the pair directly inside the namespaces (it never appears in the host's), gives
    /// each end its addresses (CIDR, e.g. "10.231.1.1/24") and brings both up.
    pub fn new(
        server: &Netns,
        server_addrs: &[&str],
        client: &Netns,
        client_addrs: &[&str],
    ) -> Self {
        let base = crate::unique_name("agv");
        let server_if = format!("{base}s");
        let client_if = format!("{base}c");
        assert!(server_if.len() <= 15, "{server_if} is too long");
        server.ip(&[
            "link",
            "add",
            &server_if,
            "type",
            "veth",
            "peer",
            "name",
            &client_if,
            "netns",
            client.name(),
        ]);
        for (ns, ifname, addrs) in [
            (server, &server_if, server_addrs),
            (client, &client_if, client_addrs),
        ] {
            for a in addrs {
                if a.contains(':') {
                    // No duplicate address detection: the address is usable at once, instead
                    // of "tentative" (bind fails) for a second or two.
                    ns.ip(&["addr", "add", a, "dev", ifname, "nodad"]);
                } else {
                    ns.ip(&["addr", "add", a, "dev", ifname]);
                }
            }
            ns.ip(&["link", "set", ifname, "up"]);
        }
        Self {
            server_if,
            client_if,
        }
    }
}

/// How a TCP connection attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// The handshake completed.
    Connected,
    /// No answer within the timeout: the SYN (or its answer) was dropped.
    TimedOut,
    /// Anything else (refused, unreachable, ...): the path works but something else is wrong.
    Failed(Errno),
}

/// Connects from `src` (an address of the namespace, so the test picks the source range) to
/// `dst` inside `ns`, waiting at most `timeout` for the handshake.
pub fn connect_from(ns: &Netns, src: IpAddr, dst: SocketAddr, timeout: Duration) -> Reach {
    ns.run(|| match connect_bound(src, dst, timeout) {
        Ok(_) => Reach::Connected,
        Err(reach) => reach,
    })
}

/// A TCP connection from `src` to `dst` in the calling thread's namespace, the handshake
/// bounded by `timeout`.
fn connect_bound(
    src: IpAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<std::os::fd::OwnedFd, Reach> {
    let family = match dst {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .expect("creating a TCP socket");
    bind(
        fd.as_raw_fd(),
        &SockaddrStorage::from(SocketAddr::new(src, 0)),
    )
    .unwrap_or_else(|e| panic!("binding the source address {src}: {e}"));
    // Linux bounds a blocking connect by the send timeout (EINPROGRESS when it runs out).
    let ms = i64::try_from(timeout.as_millis()).expect("a sane timeout");
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::milliseconds(ms)).expect("setting SO_SNDTIMEO");
    match connect(fd.as_raw_fd(), &SockaddrStorage::from(dst)) {
        Ok(()) => Ok(fd),
        Err(Errno::EINPROGRESS | Errno::EAGAIN | Errno::ETIMEDOUT) => Err(Reach::TimedOut),
        Err(e) => Err(Reach::Failed(e)),
    }
}

/// Sends `request` (a whole HTTP/1.1 request with `connection: close`) from `src` in `ns` to
/// `dst` and returns the answer's status and whole text, or how the connection failed.
pub fn http_from(
    ns: &Netns,
    src: IpAddr,
    dst: SocketAddr,
    request: &str,
    timeout: Duration,
) -> Result<(u16, String), Reach> {
    use std::io::{Read as _, Write as _};
    ns.run(|| {
        let fd = connect_bound(src, dst, timeout)?;
        let mut stream = std::net::TcpStream::from(fd);
        stream
            .set_read_timeout(Some(timeout))
            .expect("setting the read timeout");
        stream
            .write_all(request.as_bytes())
            .map_err(|e| Reach::Failed(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
        let mut out = String::new();
        stream
            .read_to_string(&mut out)
            .map_err(|_| Reach::TimedOut)?;
        let status = out
            .get(9..12)
            .and_then(|c| c.parse().ok())
            .ok_or(Reach::Failed(Errno::EPROTO))?;
        Ok((status, out))
    })
}

/// Whether a TCP connection from `src` to `dst` completes within `timeout`.
pub fn try_connect(ns: &Netns, src: IpAddr, dst: SocketAddr, timeout: Duration) -> bool {
    connect_from(ns, src, dst, timeout) == Reach::Connected
}

/// A TCP service in a namespace: accepts and closes connections until dropped or `lifetime`
/// is over. (The kernel completes handshakes on its own; accepting keeps the backlog free.)
pub struct TcpService {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpService {
    pub fn start(ns: &Netns, addrs: &[SocketAddr], lifetime: Duration) -> Self {
        let listeners: Vec<TcpListener> = ns.run(|| {
            addrs
                .iter()
                .map(|a| {
                    let l =
                        TcpListener::bind(a).unwrap_or_else(|e| panic!("listening on {a}: {e}"));
                    l.set_nonblocking(true).expect("non-blocking listener");
                    l
                })
                .collect()
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::spawn({
            let stop = stop.clone();
            move || {
                let deadline = Instant::now() + lifetime;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let mut idle = true;
                    for l in &listeners {
                        if let Ok((conn, _)) = l.accept() {
                            drop(conn);
                            idle = false;
                        }
                    }
                    if idle {
                        thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for TcpService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a UDP sender did.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    /// Datagrams the kernel accepted.
    pub sent: u64,
    /// From just before the first send to just after the last.
    pub elapsed: Duration,
}

/// Sends up to `count` small datagrams from `src` to `dst`, `gap` apart (none: as fast as
/// possible), stopping at `max_time` whichever comes first. Runs in `ns` on a thread of its own.
pub fn udp_send(
    ns: &Netns,
    src: IpAddr,
    dst: SocketAddr,
    count: u64,
    gap: Option<Duration>,
    max_time: Duration,
) -> JoinHandle<Sent> {
    ns.spawn(move || {
        let sock = UdpSocket::bind(SocketAddr::new(src, 0))
            .unwrap_or_else(|e| panic!("binding a UDP socket to {src}: {e}"));
        let payload = [0x5au8; 32];
        let start = Instant::now();
        let mut sent = 0;
        for _ in 0..count {
            if start.elapsed() >= max_time {
                break;
            }
            // A full queue (ENOBUFS) is a datagram not sent, not a test failure.
            if sock.send_to(&payload, dst).is_ok() {
                sent += 1;
            }
            if let Some(g) = gap {
                thread::sleep(g);
            }
        }
        Sent {
            sent,
            elapsed: start.elapsed(),
        }
    })
}

/// Counts the datagrams arriving at one address of a namespace, by source address.
pub struct UdpCounter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<HashMap<IpAddr, u64>>>,
}

impl UdpCounter {
    /// Starts counting at `addr` in `ns`; counting ends at [`UdpCounter::finish`] or after
    /// `lifetime`.
    pub fn start(ns: &Netns, addr: SocketAddr, lifetime: Duration) -> Self {
        let sock = ns.run(|| {
            let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("binding UDP {addr}: {e}"));
            s.set_read_timeout(Some(Duration::from_millis(20)))
                .expect("setting a read timeout");
            s
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::spawn({
            let stop = stop.clone();
            move || {
                let deadline = Instant::now() + lifetime;
                let mut counts = HashMap::new();
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match sock.recv_from(&mut buf) {
                        Ok((_, from)) => *counts.entry(from.ip()).or_insert(0) += 1,
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(e) => panic!("receiving on {addr}: {e}"),
                    }
                }
                // What is already queued arrived before the stop: count it too.
                let _ = sock.set_nonblocking(true);
                while let Ok((_, from)) = sock.recv_from(&mut buf) {
                    *counts.entry(from.ip()).or_insert(0) += 1;
                }
                counts
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops counting and returns the datagrams received, by source address.
    pub fn finish(mut self) -> HashMap<IpAddr, u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("finish is called once")
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

impl Drop for UdpCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
