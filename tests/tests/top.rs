//! `aiguard top` in a pseudo-terminal of 80x24, its screen read back through a terminal
//! emulator: the real daemon protects one end of a veth pair (so that drops at the NIC are real)
//! and runs its gateway on the namespace's loopback, in front of the fake upstream.
//!
//! Address plan (only inside the namespaces the test makes): the server end holds 10.241.1.1/24
//! and 10.242.1.1/24, the client end 10.241.1.2 and 10.242.1.2; 10.242.1.0/24 is banned.
use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use aiguard_tests::{
    daemon::{Daemon, aiguard_bin},
    netns::{Netns, VethPair, udp_send},
    privileged,
    upstream::{Upstream, UpstreamOptions},
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

const ROWS: u16 = 24;
const COLS: u16 = 80;
/// How long the screen may take to show what the test waits for (a refresh is 1 s).
const SCREEN_TIMEOUT: Duration = Duration::from_secs(15);
const BANNED: &str = "10.242.1.0/24";

/// A child process on the slave side of a pseudo-terminal, and the emulated screen of the
/// master side.
struct PtyProcess {
    child: Child,
    bytes: mpsc::Receiver<Vec<u8>>,
    master: File,
    screen: vt100::Parser,
    /// Everything the child wrote, to look for escape sequences.
    raw: Vec<u8>,
}

impl PtyProcess {
    fn spawn(mut cmd: Command) -> Self {
        let mut master = -1;
        let mut slave = -1;
        let size = libc::winsize {
            ws_row: ROWS,
            ws_col: COLS,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: out-pointers to two ints and a valid winsize; no name buffer, default termios.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty just returned these descriptors; each is owned once from here on.
        let (master, slave) = unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let dup = |fd: &OwnedFd| Stdio::from(fd.try_clone().expect("duplicating the pty slave"));
        cmd.stdin(dup(&slave))
            .stdout(dup(&slave))
            .stderr(dup(&slave))
            .env("TERM", "xterm-256color");
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                // A session of its own with the pty as its controlling terminal, as sshd does.
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        // The parent's copies of the slave go, so that reading the master ends with the child.
        drop(cmd);
        drop(slave);
        let mut reader = master.try_clone().expect("duplicating the pty master");
        let (tx, bytes) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = [0u8; 8192];
            // EIO once the child and every slave descriptor are gone.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            bytes,
            master,
            screen: vt100::Parser::new(ROWS, COLS, 0),
            raw: Vec::new(),
        }
    }

    /// Feeds what arrived within `wait` to the emulator.
    fn pump(&mut self, wait: Duration) {
        if let Ok(b) = self.bytes.recv_timeout(wait) {
            self.feed(&b);
        }
        while let Ok(b) = self.bytes.try_recv() {
            self.feed(&b);
        }
    }

    fn feed(&mut self, b: &[u8]) {
        self.screen.process(b);
        self.raw.extend_from_slice(b);
    }

    fn text(&self) -> String {
        self.screen.screen().contents()
    }

    /// Waits (bounded) until `cond` holds for the screen's text; panics with the screen if not.
    fn wait_for(&mut self, what: &str, mut cond: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + SCREEN_TIMEOUT;
        loop {
            let text = self.text();
            if cond(&text) {
                return text;
            }
            if Instant::now() >= deadline {
                panic!("the screen never showed {what} within {SCREEN_TIMEOUT:?}:\n{text}");
            }
            self.pump(Duration::from_millis(100));
        }
    }

    fn send(&mut self, keys: &[u8]) {
        self.master.write_all(keys).expect("typing into the pty");
    }

    /// Waits (bounded) for the child to exit, reading its last output; kills it by PID if not.
    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            self.pump(Duration::from_millis(50));
            if let Some(status) = self.child.try_wait().expect("polling the child") {
                // What it wrote just before exiting.
                self.pump(Duration::from_millis(200));
                return status;
            }
            if Instant::now() >= deadline {
                let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
                let _ = self.child.wait();
                panic!(
                    "the process did not exit within {within:?}:\n{}",
                    self.text()
                );
            }
        }
    }

    /// Whether the pty is back in canonical mode with echo (what a shell expects).
    fn cooked(&self) -> bool {
        // SAFETY: a zeroed termios is a valid out-parameter; the master descriptor is open.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::tcgetattr(self.master.as_raw_fd(), &mut t) };
        assert_eq!(rc, 0, "tcgetattr: {}", std::io::Error::last_os_error());
        t.c_lflag & libc::ICANON != 0 && t.c_lflag & libc::ECHO != 0
    }
}

impl Drop for PtyProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

fn top_at(socket: &Path) -> PtyProcess {
    let mut cmd = Command::new(aiguard_bin());
    for var in ["AIGUARD_SOCKET", "RUST_LOG"] {
        cmd.env_remove(var);
    }
    cmd.arg("--socket").arg(socket).arg("top");
    PtyProcess::spawn(cmd)
}

/// One chat completion on its own connection; returns the status.
fn post(addr: SocketAddr, key: &str) -> u16 {
    let body = r#"{"model":"gpt-test","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;
    let mut s = TcpStream::connect(addr).expect("connect to the gateway");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the answer");
    out.get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {out:?}"))
}

/// Allowed and rate-limited answers, as the gateway counts them.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Answers {
    allowed: u64,
    limited: u64,
}

/// Sends `n` requests from inside `ns` and counts the answers.
fn requests(ns: &Netns, addr: SocketAddr, key: &str, n: usize, into: &mut Answers) {
    let statuses: Vec<u16> = ns.run(|| (0..n).map(|_| post(addr, key)).collect());
    for s in statuses {
        match s {
            200 => into.allowed += 1,
            429 => into.limited += 1,
            other => panic!("unexpected status {other} from the gateway"),
        }
    }
}

/// `(allowed total, limited total)` of `tier` in the tiers pane.
fn tier_totals(screen: &str, tier: &str) -> Option<(u64, u64)> {
    screen.lines().find_map(|line| {
        let start = line.find(&format!("│{tier} "))? + "│".len();
        let cells: Vec<&str> = line[start..]
            .split('│')
            .next()?
            .split_whitespace()
            .collect();
        match cells[..] {
            [name, _, _, ok, lim] if name == tier => Some((ok.parse().ok()?, lim.parse().ok()?)),
            _ => None,
        }
    })
}

/// The `banned` drop total in the drops pane.
fn banned_total(screen: &str) -> Option<u64> {
    screen.lines().find_map(|line| {
        let rest = line.split("│banned").nth(1)?;
        rest.split("total")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

fn listen_addr(d: &Daemon) -> SocketAddr {
    let s = d.cli_json(&["status", "--json"]);
    s["gateway"]["listen"][0]
        .as_str()
        .unwrap_or_else(|| panic!("no gateway in status: {s}"))
        .parse()
        .expect("a socket address")
}

fn add_key(d: &Daemon, tenant: &str, tier: &str) -> String {
    let v = d.cli_json(&["keys", "add", "--tenant", tenant, "--tier", tier, "--json"]);
    v["key"].as_str().expect("key").to_owned()
}

#[test]
fn top_shows_live_drops_bans_and_tiers_and_quits_cleanly() {
    if !privileged() {
        return;
    }
    let server = Netns::new();
    let client = Netns::new();
    let veth = VethPair::new(
        &server,
        &["10.241.1.1/24", "10.242.1.1/24"],
        &client,
        &["10.241.1.2/24", "10.242.1.2/24"],
    );
    // Bound inside the server's namespace: the daemon there reaches it on its loopback.
    let upstream = server.run(|| Upstream::start(UpstreamOptions::default()));
    let config = format!(
        "[gateway]\nlisten = [\"127.0.0.1:0\"]\nupstreams = [\"{}\"]\ndefault_tier = \"free\"\n\
         [tiers.free]\nrequests_per_minute = 2\n[tiers.paid]\nrequests_per_minute = 6000\n",
        upstream.url()
    );
    let daemon = Daemon::start_with_config(
        &server,
        &config,
        &["-i", veth.server_if.as_str(), "--no-metrics"],
    );
    let addr = listen_addr(&daemon);
    let free = add_key(&daemon, "acme", "free");
    let paid = add_key(&daemon, "globex", "paid");
    daemon.cli_ok(&["ban", BANNED, "--reason", "top test"]);

    let (mut free_n, mut paid_n) = (Answers::default(), Answers::default());
    requests(&server, addr, &free, 4, &mut free_n);
    requests(&server, addr, &paid, 3, &mut paid_n);
    assert!(
        free_n.allowed > 0 && free_n.limited > 0,
        "the free tier allows 2 a minute: {free_n:?}"
    );
    let banned_src = IpAddr::V4(Ipv4Addr::new(10, 242, 1, 2));
    let sink = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 242, 1, 1)), 9);
    let sent = udp_send(&client, banned_src, sink, 50, None, Duration::from_secs(5))
        .join()
        .expect("the sender");
    assert!(sent.sent > 0, "no datagram sent");

    let mut top = top_at(daemon.socket());
    let first = top.wait_for("the three panes with the gateway's numbers", |s| {
        s.contains("Drops/s at the NIC")
            && s.contains("Top banned ranges")
            && s.contains("Gateway requests/s by tier")
            && s.contains(BANNED)
            && tier_totals(s, "free") == Some((free_n.allowed, free_n.limited))
            && tier_totals(s, "paid") == Some((paid_n.allowed, paid_n.limited))
            && banned_total(s).is_some_and(|n| n > 0)
    });
    assert!(
        top.screen.screen().alternate_screen(),
        "drawn on the alternate screen"
    );
    assert!(first.contains("aiguard top  node "), "{first}");
    assert!(first.contains("store: embedded"), "{first}");
    assert!(first.contains(&veth.server_if), "{first}");
    let drops_before = banned_total(&first).expect("a banned total");

    // More traffic while it runs: the next refreshes show it.
    requests(&server, addr, &paid, 5, &mut paid_n);
    requests(&server, addr, &free, 2, &mut free_n);
    udp_send(&client, banned_src, sink, 50, None, Duration::from_secs(5))
        .join()
        .expect("the sender");
    let later = top.wait_for("the new totals", |s| {
        tier_totals(s, "free") == Some((free_n.allowed, free_n.limited))
            && tier_totals(s, "paid") == Some((paid_n.allowed, paid_n.limited))
            && banned_total(s).is_some_and(|n| n > drops_before)
    });
    eprintln!("aiguard top at {COLS}x{ROWS}:\n{later}");

    top.send(b"q");
    let status = top.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "q exits 0: {status:?}");
    assert!(
        !top.screen.screen().alternate_screen(),
        "back on the main screen after q"
    );
    assert!(top.cooked(), "the terminal is out of raw mode after q");
}

#[test]
fn escape_and_ctrl_c_quit_and_a_resize_is_redrawn() {
    if !privileged() {
        return;
    }
    let upstream = Upstream::start(UpstreamOptions::default());
    let daemon = Daemon::start_host(
        Some(&format!(
            "[gateway]\nlisten = [\"127.0.0.1:0\"]\nupstreams = [\"{}\"]\n",
            upstream.url()
        )),
        &["--no-metrics"],
    );
    for key in [&b"\x1b"[..], b"\x03"] {
        let mut top = top_at(daemon.socket());
        top.wait_for("the panes", |s| s.contains("Top banned ranges"));
        // A wider terminal: the panes are laid out again for it.
        let size = libc::winsize {
            ws_row: ROWS,
            ws_col: 100,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: a valid winsize on an open pty master.
        let rc = unsafe { libc::ioctl(top.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        assert_eq!(rc, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
        top.screen.set_size(ROWS, 100);
        top.wait_for("the panes at 100 columns", |s| {
            s.lines()
                .any(|l| l.contains("Drops/s") && l.chars().count() == 100 && l.ends_with('┐'))
        });
        top.send(key);
        let status = top.wait_exit(Duration::from_secs(5));
        assert!(status.success(), "{key:?} exits 0: {status:?}");
        assert!(!top.screen.screen().alternate_screen());
        assert!(top.cooked());
    }
}

#[test]
fn an_unreachable_daemon_is_named_and_exits_nonzero() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let socket = dir.path().join("nobody.sock");
    let mut top = top_at(&socket);
    let status = top.wait_exit(Duration::from_secs(10));
    let text = top.text();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains(&socket.display().to_string()), "{text}");
    assert!(text.contains("Is it running?"), "{text}");
    // It never switched screens or modes.
    assert!(
        !top.raw.windows(8).any(|w| w == b"\x1b[?1049h"),
        "no alternate screen for an error"
    );
    assert!(top.cooked());
}
