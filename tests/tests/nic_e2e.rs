//! End to end: the real `aiguard` daemon protecting one end of a veth pair in a network
//! namespace, driven through the real CLI, with TCP and UDP traffic from the other end.
//!
//! Address plan (only inside the namespaces each test makes): the server end holds
//! 10.231.X.1/24 and 10.232.X.1/24, the client end 10.231.X.2 and 10.232.X.2. Binding the client
//! socket to one or the other picks the source range: A = 10.231.X.0/24, B = 10.232.X.0/24.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Output,
    sync::atomic::{AtomicU8, Ordering},
    thread,
    time::{Duration, Instant},
};

use aiguard_tests::{
    daemon::{Daemon, cli_at},
    netns::{Netns, Reach, TcpService, UdpCounter, VethPair, connect_from, udp_send},
};
use serde_json::Value;

/// The TCP service clients connect to.
const SERVICE_PORT: u16 = 8000;
/// Shorter than the first SYN retransmission (1 s): a blocked attempt sends exactly one SYN.
const BLOCKED_WAIT: Duration = Duration::from_millis(700);
/// Generous for an open path (the first attempt also resolves ARP).
const OPEN_WAIT: Duration = Duration::from_secs(3);
/// Bound on the helper threads of one test.
const TRAFFIC_LIFETIME: Duration = Duration::from_secs(90);

/// A different third octet per test, so that logs and captures tell tests apart.
fn next_subnet() -> u8 {
    static NEXT: AtomicU8 = AtomicU8::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Source range A or B.
#[derive(Debug, Clone, Copy)]
enum Range {
    A,
    B,
}

/// Two namespaces joined by a veth pair, a TCP service on the server side, and the daemon
/// protecting the server end. Fields drop in order: the daemon first, the namespaces last.
struct Testbed {
    daemon: Daemon,
    _service: TcpService,
    veth: VethPair,
    client: Netns,
    server: Netns,
    x: u8,
}

impl Testbed {
    /// `aiguard run -i <server end> EXTRA...`, with `config` as its config file if given.
    fn new(config: Option<&str>, extra: &[&str]) -> Self {
        let x = next_subnet();
        let server = Netns::new();
        let client = Netns::new();
        let veth = VethPair::new(
            &server,
            &[&format!("10.231.{x}.1/24"), &format!("10.232.{x}.1/24")],
            &client,
            &[&format!("10.231.{x}.2/24"), &format!("10.232.{x}.2/24")],
        );
        let service = TcpService::start(
            &server,
            &[
                SocketAddr::new(server_ip(Range::A, x), SERVICE_PORT),
                SocketAddr::new(server_ip(Range::B, x), SERVICE_PORT),
            ],
            TRAFFIC_LIFETIME,
        );
        let mut args = vec!["-i", veth.server_if.as_str()];
        args.extend_from_slice(extra);
        let daemon = match config {
            Some(c) => Daemon::start_with_config(&server, c, &args),
            None => Daemon::start(&server, &args),
        };
        Self {
            daemon,
            _service: service,
            veth,
            client,
            server,
            x,
        }
    }

    /// The range as the operator types it.
    fn cidr(&self, r: Range) -> String {
        match r {
            Range::A => format!("10.231.{}.0/24", self.x),
            Range::B => format!("10.232.{}.0/24", self.x),
        }
    }

    fn client_ip(&self, r: Range) -> IpAddr {
        let third = match r {
            Range::A => 231,
            Range::B => 232,
        };
        IpAddr::V4(Ipv4Addr::new(10, third, self.x, 2))
    }

    fn service(&self, r: Range) -> SocketAddr {
        SocketAddr::new(server_ip(r, self.x), SERVICE_PORT)
    }

    fn reach(&self, r: Range, wait: Duration) -> Reach {
        connect_from(&self.client, self.client_ip(r), self.service(r), wait)
    }

    #[track_caller]
    fn assert_open(&self, r: Range, when: &str) {
        let got = self.reach(r, OPEN_WAIT);
        assert_eq!(
            got,
            Reach::Connected,
            "{when}: a client in range {r:?} ({}) should connect",
            self.client_ip(r)
        );
    }

    #[track_caller]
    fn assert_blocked(&self, r: Range, when: &str) {
        let got = self.reach(r, BLOCKED_WAIT);
        assert_eq!(
            got,
            Reach::TimedOut,
            "{when}: a client in range {r:?} ({}) should get no answer (its SYN dropped at the NIC)",
            self.client_ip(r)
        );
    }

    /// `aiguard bans --json`.
    fn bans(&self) -> Vec<Value> {
        match self.daemon.cli_json(&["bans", "--json"]) {
            Value::Array(list) => list,
            other => panic!("`bans --json` is not a list: {other}"),
        }
    }

    /// The listed ban on range `r`, if any.
    fn ban(&self, r: Range) -> Option<Value> {
        let cidr = self.cidr(r);
        self.bans()
            .into_iter()
            .find(|b| b["range"] == cidr.as_str())
    }

    /// `aiguard status --json`.
    fn status(&self) -> Value {
        self.daemon.cli_json(&["status", "--json"])
    }
}

fn server_ip(r: Range, x: u8) -> IpAddr {
    let third = match r {
        Range::A => 231,
        Range::B => 232,
    };
    IpAddr::V4(Ipv4Addr::new(10, third, x, 1))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn hits(ban: &Value) -> u64 {
    ban["hits"]
        .as_u64()
        .unwrap_or_else(|| panic!("ban without a numeric `hits`: {ban}"))
}

/// Waits (bounded) for `cond`, checking every `every`.
fn eventually(within: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(every);
    }
}

#[test]
fn ban_drops_only_the_banned_range_and_unban_lets_it_back() {
    if !aiguard_tests::privileged() {
        return;
    }
    let tb = Testbed::new(None, &[]);
    tb.assert_open(Range::A, "before the ban");

    let a = tb.cidr(Range::A);
    let out = tb
        .daemon
        .cli_ok(&["ban", &a, "--reason", "credential stuffing"]);
    assert!(out.contains(&format!("banned {a}")), "ban said: {out}");
    tb.assert_blocked(Range::A, "after `aiguard ban`");
    tb.assert_open(Range::B, "while only A is banned");

    let ban = tb
        .ban(Range::A)
        .unwrap_or_else(|| panic!("`bans --json` does not list {a}: {:?}", tb.bans()));
    assert_eq!(ban["reason"], "credential stuffing", "{ban}");
    assert_eq!(ban["origin"], "cli", "{ban}");
    assert_eq!(ban["shadow"], false, "{ban}");
    assert!(ban["expires_ms"].is_null(), "no TTL, no expiry: {ban}");
    assert!(ban["created_ms"].as_u64().is_some_and(|c| c > 0), "{ban}");
    assert!(
        hits(&ban) > 0,
        "the dropped SYN should count as a hit: {ban}"
    );
    let status = tb.status();
    assert!(
        status["totals"]["dropped_banned"]
            .as_u64()
            .is_some_and(|d| d > 0),
        "status should count the drop: {status}"
    );

    tb.daemon.cli_ok(&["unban", &a]);
    tb.assert_open(Range::A, "after `aiguard unban`");
    assert!(tb.ban(Range::A).is_none(), "unbanned range still listed");
}

#[test]
fn ipv6_ban_drops_only_the_banned_range() {
    if !aiguard_tests::privileged() {
        return;
    }
    let x = next_subnet();
    let (server, client) = (Netns::new(), Netns::new());
    // Machines of this kind start new interfaces with IPv6 disabled: enable it in the test's
    // own namespaces (these sysctls are per namespace) before the veth pair exists.
    for ns in [&server, &client] {
        ns.run(|| {
            for knob in ["all", "default"] {
                std::fs::write(format!("/proc/sys/net/ipv6/conf/{knob}/disable_ipv6"), "0")
                    .expect("enabling IPv6 in the test namespace");
            }
        });
    }
    let addr = |range: &str, host: u8| format!("fd31:{x}:{range}::{host}");
    let veth = VethPair::new(
        &server,
        &[
            &format!("{}/64", addr("a", 1)),
            &format!("{}/64", addr("b", 1)),
        ],
        &client,
        &[
            &format!("{}/64", addr("a", 2)),
            &format!("{}/64", addr("b", 2)),
        ],
    );
    let ip = |s: String| -> IpAddr { s.parse().expect("a test address") };
    let service_a = SocketAddr::new(ip(addr("a", 1)), SERVICE_PORT);
    let service_b = SocketAddr::new(ip(addr("b", 1)), SERVICE_PORT);
    let _service = TcpService::start(&server, &[service_a, service_b], TRAFFIC_LIFETIME);
    let daemon = Daemon::start(&server, &["-i", veth.server_if.as_str()]);
    let reach = |range: &str, service: SocketAddr, wait: Duration| {
        connect_from(&client, ip(addr(range, 2)), service, wait)
    };
    assert_eq!(
        reach("a", service_a, OPEN_WAIT),
        Reach::Connected,
        "before the ban"
    );

    let banned = format!("fd31:{x}:a::/64");
    daemon.cli_ok(&["ban", &banned, "--reason", "ipv6 scraper"]);
    assert_eq!(
        reach("a", service_a, BLOCKED_WAIT),
        Reach::TimedOut,
        "the banned /64 gets no answer"
    );
    assert_eq!(
        reach("b", service_b, OPEN_WAIT),
        Reach::Connected,
        "a neighbouring /64 is untouched"
    );
    let bans = daemon.cli_json(&["bans", "--json"]);
    let ban = bans
        .as_array()
        .and_then(|l| l.iter().find(|b| b["range"] == banned.as_str()))
        .unwrap_or_else(|| panic!("{banned} is listed: {bans}"));
    assert!(hits(ban) > 0, "the ban counted the dropped SYN: {ban}");

    daemon.cli_ok(&["unban", &banned]);
    assert_eq!(
        reach("a", service_a, OPEN_WAIT),
        Reach::Connected,
        "after the unban"
    );
}

#[test]
fn ttl_ban_stops_dropping_when_it_expires_and_is_swept() {
    if !aiguard_tests::privileged() {
        return;
    }
    let tb = Testbed::new(None, &[]);
    let a = tb.cidr(Range::A);
    let banned_at = Instant::now();
    tb.daemon
        .cli_ok(&["ban", &a, "--ttl", "2s", "--reason", "probe"]);
    tb.assert_blocked(Range::A, "within the TTL");
    let ban = tb.ban(Range::A).expect("the TTL ban is listed");
    let (created, expires) = (ban["created_ms"].as_u64(), ban["expires_ms"].as_u64());
    assert_eq!(
        expires.zip(created).map(|(e, c)| e - c),
        Some(2000),
        "expires_ms - created_ms should be the TTL: {ban}"
    );

    // Try again from just before the expiry until a few seconds after it.
    thread::sleep(Duration::from_millis(1900).saturating_sub(banned_at.elapsed()));
    let open = eventually(Duration::from_secs(4), Duration::from_millis(100), || {
        tb.reach(Range::A, Duration::from_millis(500)) == Reach::Connected
    });
    assert!(
        open,
        "range A still blocked {:?} after a 2s ban",
        banned_at.elapsed()
    );
    assert!(
        banned_at.elapsed() >= Duration::from_secs(2),
        "range A connected before its 2s TTL was over"
    );

    // The sweeper (every 1s by default) removes it from the list and the maps.
    let swept = eventually(Duration::from_secs(5), Duration::from_millis(200), || {
        tb.ban(Range::A).is_none()
    });
    assert!(swept, "expired ban still listed: {:?}", tb.bans());
}

#[test]
fn expired_ban_stops_dropping_before_the_sweeper_removes_it() {
    if !aiguard_tests::privileged() {
        return;
    }
    // The sweeper runs once an hour here: whatever lets traffic through is the kernel's check.
    let tb = Testbed::new(Some("[xdp]\nsweep_interval = \"1h\"\n"), &[]);
    let a = tb.cidr(Range::A);
    let banned_at = Instant::now();
    tb.daemon.cli_ok(&["ban", &a, "--ttl", "2s"]);
    tb.assert_blocked(Range::A, "within the TTL");

    thread::sleep(Duration::from_millis(2300).saturating_sub(banned_at.elapsed()));
    tb.assert_open(Range::A, "after the TTL, before any sweep");
    assert!(
        tb.ban(Range::A).is_some(),
        "with an hourly sweeper the expired ban should still be listed"
    );
}

#[test]
fn shadow_ban_counts_matches_and_drops_nothing() {
    if !aiguard_tests::privileged() {
        return;
    }
    let tb = Testbed::new(None, &[]);
    let a = tb.cidr(Range::A);
    let out = tb
        .daemon
        .cli_ok(&["ban", &a, "--shadow", "--reason", "trial run"]);
    assert!(
        out.contains("shadow"),
        "ban should say it only counts: {out}"
    );
    tb.assert_open(Range::A, "under a shadow ban");

    let ban = tb.ban(Range::A).expect("the shadow ban is listed");
    assert_eq!(ban["shadow"], true, "{ban}");
    assert!(
        hits(&ban) > 0,
        "a shadow ban counts what it would drop: {ban}"
    );
    let status = tb.status();
    let totals = &status["totals"];
    assert!(totals["shadow"].as_u64().is_some_and(|n| n > 0), "{status}");
    assert_eq!(totals["dropped_banned"], 0, "{status}");
}

#[test]
fn bucket_limits_a_flooding_source_and_spares_a_modest_one() {
    if !aiguard_tests::privileged() {
        return;
    }
    const RATE: u64 = 100;
    const BURST: u64 = 10;
    const PORT: u16 = 9000;
    let tb = Testbed::new(
        None,
        &[
            "--bucket-rate",
            &RATE.to_string(),
            "--bucket-burst",
            &BURST.to_string(),
            "--bucket-port",
            &PORT.to_string(),
        ],
    );
    let dst = |r| SocketAddr::new(server_ip(r, tb.x), PORT);
    // One receiving socket per range: the flood cannot crowd the modest sender out of a buffer.
    let a_rx = UdpCounter::start(&tb.server, dst(Range::A), TRAFFIC_LIFETIME);
    let b_rx = UdpCounter::start(&tb.server, dst(Range::B), TRAFFIC_LIFETIME);

    // Every datagram A gets through passes the program between here and the moment A's counter
    // stops: in that window the bucket lets at most burst + rate * window through.
    let window_start = Instant::now();
    let flood = udp_send(
        &tb.client,
        tb.client_ip(Range::A),
        dst(Range::A),
        20_000,
        None,
        Duration::from_secs(2),
    );
    // 50 packets 20 ms apart: half the bucket's rate, sent while the flood runs.
    let modest = udp_send(
        &tb.client,
        tb.client_ip(Range::B),
        dst(Range::B),
        50,
        Some(Duration::from_millis(20)),
        Duration::from_secs(10),
    );
    let flood = flood.join().expect("the flooding sender");
    // Let what is in flight land.
    thread::sleep(Duration::from_millis(100));
    let a_got = a_rx
        .finish()
        .get(&tb.client_ip(Range::A))
        .copied()
        .unwrap_or(0);
    let window = window_start.elapsed();
    let modest = modest.join().expect("the modest sender");
    thread::sleep(Duration::from_millis(100));
    let b_got = b_rx
        .finish()
        .get(&tb.client_ip(Range::B))
        .copied()
        .unwrap_or(0);
    eprintln!(
        "flood {flood:?}: {a_got} arrived within {window:?}; modest {modest:?}: {b_got} arrived"
    );

    assert!(
        flood.sent >= 1_000,
        "the flood is too small to tell anything: {flood:?}"
    );
    assert_eq!(modest.sent, 50, "{modest:?}");
    assert_eq!(
        b_got, 50,
        "the modest source stays within its bucket and must lose nothing"
    );
    // +2: rounding at both ends of the window.
    let bound = BURST + (RATE as f64 * window.as_secs_f64()).ceil() as u64 + 2;
    assert!(
        a_got <= bound,
        "the flooding source got {a_got} of {} datagrams through within {window:?}; the bucket allows at most {bound}",
        flood.sent
    );
    assert!(
        a_got >= BURST,
        "the bucket limits, it does not ban: the burst ({BURST}) should pass, got {a_got}"
    );

    let status = tb.status();
    let dropped_rate = |v: &Value| v["dropped_rate"].as_u64().unwrap_or(0);
    assert!(
        dropped_rate(&status["totals"]) > 0,
        "status should count rate drops: {status}"
    );
    let iface = &status["interfaces"][0];
    assert_eq!(iface["name"], tb.veth.server_if.as_str(), "{status}");
    assert!(dropped_rate(&iface["counters"]) > 0, "{status}");
    assert_eq!(status["bucket"]["active"], true, "{status}");
    assert_eq!(status["bucket"]["rate"], RATE, "{status}");
}

#[test]
fn bans_keep_dropping_and_counting_while_the_daemon_is_killed() {
    if !aiguard_tests::privileged() {
        return;
    }
    let mut tb = Testbed::new(None, &[]);
    let a = tb.cidr(Range::A);
    tb.daemon.cli_ok(&["ban", &a, "--reason", "scraping"]);
    tb.assert_blocked(Range::A, "after the ban");
    let hits_before = hits(&tb.ban(Range::A).expect("the ban is listed"));

    tb.daemon.kill();
    assert!(
        !tb.daemon.cli(&["status"]).status.success(),
        "the daemon should be gone after SIGKILL"
    );
    // The pinned link keeps the program attached, with the pinned ban map.
    assert!(
        tb.server.xdp_attached(&tb.veth.server_if),
        "XDP should stay attached while the daemon is down"
    );
    tb.assert_blocked(Range::A, "while the daemon is down");
    tb.assert_open(Range::B, "while the daemon is down");

    tb.daemon.restart();
    let ban = tb
        .ban(Range::A)
        .unwrap_or_else(|| panic!("the ban did not survive the kill: {:?}", tb.bans()));
    assert_eq!(ban["reason"], "scraping", "{ban}");
    // The SYN dropped while the daemon was down was counted in the pinned map too.
    assert!(
        hits(&ban) > hits_before,
        "hits should carry on from {hits_before}, plus the drop while down: {ban}"
    );
    let status = tb.status();
    let iface = &status["interfaces"][0];
    assert_eq!(iface["name"], tb.veth.server_if.as_str(), "{status}");
    assert_eq!(
        iface["adopted"], true,
        "the restarted daemon should adopt the pinned link: {status}"
    );
    tb.assert_blocked(Range::A, "after the restart");
    tb.assert_open(Range::B, "after the restart");
}

#[test]
fn cli_refusals_explain_and_change_nothing() {
    if !aiguard_tests::privileged() {
        return;
    }
    let tb = Testbed::new(None, &[]);
    let x = tb.x;
    let a = tb.cidr(Range::A);
    let b = tb.cidr(Range::B);
    tb.daemon.cli_ok(&["ban", &a, "--reason", "baseline"]);
    tb.daemon.cli_ok(&["allow", &b]);
    let before = tb.bans();

    let refused = |args: &[&str], code: i32, needles: &[&str]| {
        let out = tb.daemon.cli(args);
        let err = stderr(&out);
        assert_eq!(
            out.status.code(),
            Some(code),
            "`aiguard {}` should exit with {code}; stderr: {err}",
            args.join(" ")
        );
        for n in needles {
            assert!(
                err.contains(n),
                "`aiguard {}`: stderr should mention {n:?}: {err}",
                args.join(" ")
            );
        }
        assert_eq!(
            tb.bans(),
            before,
            "`aiguard {}` was refused but the bans changed",
            args.join(" ")
        );
    };

    refused(&["ban", "not-a-range"], 1, &["is not a valid IP range"]);
    refused(
        &["ban", &format!("10.231.{x}.0/33")],
        1,
        &["is not a valid IP range", "prefix length"],
    );
    refused(
        &["ban", &format!("10.231.{x}.7/24")],
        1,
        &["host bits", &format!("did you mean 10.231.{x}.0/24?")],
    );
    refused(&["ban", "0.0.0.0/0"], 1, &["--force"]);
    refused(
        &["ban", &format!("10.232.{x}.128/25")],
        1,
        &[
            &format!("overlaps allowlisted range {b}"),
            &format!("aiguard unallow {b}"),
        ],
    );
    refused(
        &["ban", "10.232.0.0/16"],
        1,
        &[&format!("overlaps allowlisted range {b}")],
    );
    // A TTL that does not parse is a usage error, caught before the daemon is asked.
    refused(
        &["ban", &format!("10.231.{x}.0/25"), "--ttl", "2 fortnights"],
        2,
        &["invalid TTL", "90s, 30m"],
    );
    refused(
        &["ban", &format!("10.231.{x}.0/25"), "--ttl", "0s"],
        1,
        &["out of range"],
    );
    refused(
        &["unban", &format!("10.231.{x}.128/25")],
        1,
        &["is not banned"],
    );

    // A ban file is applied whole or not at all; the refusal names the line.
    let file = tb.daemon.scratch_file("bans.txt");
    std::fs::write(
        &file,
        format!(
            "# from the abuse report\n10.231.{x}.16/28\n10.231.{x}.32/28  # second\n10.231.{x}.300/28\n10.231.{x}.64/28\n"
        ),
    )
    .expect("writing the ban file");
    let path = file.display().to_string();
    refused(
        &["ban", "--file", &path],
        1,
        &[
            &format!("{path} line 4"),
            "is not a valid IP range",
            "nothing was banned",
        ],
    );

    // No daemon at that socket: say how to start one.
    let out = cli_at("/nonexistent/x".as_ref(), &["status"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(err.contains("aiguard run --interface"), "{err}");
    assert!(err.contains("--socket"), "{err}");
}

#[test]
fn restart_without_an_interface_detaches_it() {
    if !aiguard_tests::privileged() {
        return;
    }
    let mut tb = Testbed::new(None, &["-i", "lo"]);
    let a = tb.cidr(Range::A);
    let server_if = tb.veth.server_if.clone();
    tb.daemon.cli_ok(&["ban", &a]);
    tb.assert_blocked(Range::A, "after the ban");

    // A clean stop leaves the program attached by default.
    let status = tb.daemon.stop();
    assert!(status.success(), "SIGTERM should exit cleanly: {status}");
    assert!(tb.server.xdp_attached(&server_if));
    tb.assert_blocked(Range::A, "while the daemon is stopped");

    let config = tb.daemon.scratch_file("only-lo.toml");
    std::fs::write(&config, "[xdp]\ninterfaces = [\"lo\"]\n").expect("writing the config");
    tb.daemon
        .restart_with(&["--config", &config.display().to_string()]);

    assert!(
        !tb.server.xdp_attached(&server_if),
        "{server_if} is no longer configured: its program should be detached"
    );
    let pins: Vec<String> = std::fs::read_dir(tb.daemon.bpffs_dir())
        .expect("listing the pins")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !pins.iter().any(|p| p.ends_with(&format!("-{server_if}"))),
        "the link pin of {server_if} should be gone: {pins:?}"
    );
    tb.assert_open(Range::A, "once its interface is no longer protected");
    assert!(tb.ban(Range::A).is_some(), "the ban itself stays");
    let status = tb.status();
    let names: Vec<&str> = status["interfaces"]
        .as_array()
        .expect("interfaces is a list")
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert_eq!(names, ["lo"], "{status}");
    assert_eq!(status["interfaces"][0]["adopted"], true, "{status}");
    // lo moved into the veth's old counter slot: it must not inherit the veth's drops.
    assert_eq!(
        status["interfaces"][0]["counters"]["dropped_banned"], 0,
        "lo never saw the banned traffic: {status}"
    );
}

#[test]
fn shutdown_is_not_held_up_by_idle_admin_connections() {
    use std::io::{BufRead as _, BufReader, Write as _};
    use std::os::unix::net::UnixStream;
    if !aiguard_tests::privileged() {
        return;
    }
    let mut tb = Testbed::new(None, &[]);
    // Idle admin clients must not hold the daemon up.
    let idle = UnixStream::connect(tb.daemon.socket()).expect("an idle admin connection");
    let mut asking = UnixStream::connect(tb.daemon.socket()).expect("an admin connection");
    let started = Instant::now();
    let status = tb.daemon.stop();
    assert!(status.success(), "SIGTERM should exit cleanly: {status}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "an idle admin connection held the shutdown up for {:?}",
        started.elapsed()
    );
    // The daemon closed them: a request sent now gets EOF, not a hang.
    asking
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("a read timeout");
    let _ = asking.write_all(b"{\"op\":\"status\"}\n");
    let mut reply = String::new();
    let read = BufReader::new(&asking).read_line(&mut reply);
    assert!(
        matches!(read, Ok(0)) || read.is_err(),
        "after shutdown the socket is closed: {read:?} {reply}"
    );
    drop(idle);
}

#[test]
fn detach_on_exit_unprotects_the_interface_on_a_clean_stop() {
    if !aiguard_tests::privileged() {
        return;
    }
    let mut tb = Testbed::new(None, &["--detach-on-exit"]);
    let a = tb.cidr(Range::A);
    let server_if = tb.veth.server_if.clone();
    tb.daemon.cli_ok(&["ban", &a]);
    tb.assert_blocked(Range::A, "after the ban");

    let status = tb.daemon.stop();
    assert!(status.success(), "SIGTERM should exit cleanly: {status}");
    assert!(
        !tb.server.xdp_attached(&server_if),
        "--detach-on-exit: the program should be gone after a clean stop"
    );
    tb.assert_open(Range::A, "after a clean stop with --detach-on-exit");

    // The ban was kept: the next daemon attaches anew and drops again.
    tb.daemon.restart();
    tb.assert_blocked(Range::A, "after the restart");
    let status = tb.status();
    assert_eq!(status["interfaces"][0]["adopted"], false, "{status}");
}
