//! Several real daemons sharing one `redis-server`: a ban made on one drops packets at
//! another's XDP interface within a second (and an unban lets them through again), a daemon
//! that was down catches up on start, keys made on one node work on every node, and the
//! monthly quota is one counter for all of them. And what Redis being away must not lose: an
//! unban made meanwhile (even across a crash) reaches every node, and usage counted meanwhile
//! survives a SIGKILL and is written back once.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use aiguard_daemon::usage::Today;
use aiguard_tests::{
    daemon::Daemon,
    netns::{Netns, Reach, TcpService, VethPair, connect_from},
    privileged,
    redis::{RedisServer, redis_available},
    upstream::{Upstream, UpstreamOptions},
};

const SERVICE_PORT: u16 = 8080;
/// Long enough for every check of a test.
const TRAFFIC_LIFETIME: Duration = Duration::from_secs(120);

fn bans(d: &Daemon) -> Vec<serde_json::Value> {
    d.cli_json(&["bans", "--json"])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn ban_of(d: &Daemon, range: &str) -> Option<serde_json::Value> {
    bans(d).into_iter().find(|b| b["range"] == range)
}

/// Polls `ok` every 10 ms until it holds; returns how long that took (panics past `limit`).
fn within(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !ok() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        thread::sleep(Duration::from_millis(10));
    }
    started.elapsed()
}

#[test]
fn a_ban_on_one_daemon_drops_at_another_daemons_interface_within_a_second() {
    if !privileged() || !redis_available() {
        return;
    }
    let (server, client) = (Netns::new(), Netns::new());
    let veth = VethPair::new(
        &server,
        &["10.241.0.1/24", "10.242.0.1/24"],
        &client,
        &["10.241.0.2/24", "10.242.0.2/24"],
    );
    let service_a = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 241, 0, 1)), SERVICE_PORT);
    let service_b = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 242, 0, 1)), SERVICE_PORT);
    let from_a = IpAddr::V4(Ipv4Addr::new(10, 241, 0, 2));
    let from_b = IpAddr::V4(Ipv4Addr::new(10, 242, 0, 2));
    // Redis on the server namespace's loopback, where both daemons run.
    let redis = server.run(RedisServer::start);
    let url = redis.url();
    // Node B protects the interface; node A only serves a gateway (and takes the ban).
    let mut b = Daemon::start(
        &server,
        &[
            "-i",
            &veth.server_if,
            "--redis",
            &url,
            "--node-name",
            "node-b",
        ],
    );
    let a = Daemon::start(
        &server,
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:9",
            "--redis",
            &url,
            "--node-name",
            "node-a",
        ],
    );
    // After the daemons (whose first start may build the binary): the service has a lifetime.
    let _service = TcpService::start(&server, &[service_a, service_b], TRAFFIC_LIFETIME);
    let reach = |src| {
        connect_from(
            &client,
            src,
            if src == from_a { service_a } else { service_b },
            Duration::from_millis(300),
        )
    };
    assert_eq!(reach(from_a), Reach::Connected);

    a.cli_ok(&[
        "ban",
        "10.241.0.0/24",
        "--ttl",
        "1h",
        "--reason",
        "credential stuffing",
    ]);
    let took = within("the ban reaches node B", Duration::from_secs(1), || {
        ban_of(&b, "10.241.0.0/24").is_some()
    });
    eprintln!("ban replicated in {took:?}");
    assert_eq!(
        reach(from_a),
        Reach::TimedOut,
        "node B drops the banned range"
    );
    assert_eq!(reach(from_b), Reach::Connected, "and nothing else");
    let (at_a, at_b) = (
        ban_of(&a, "10.241.0.0/24").expect("on A"),
        ban_of(&b, "10.241.0.0/24").expect("on B"),
    );
    assert_eq!(at_a["origin"], "cli");
    assert_eq!(at_a["node"], "node-a");
    assert_eq!(at_b["origin"], "replicated", "{at_b}");
    assert_eq!(at_b["node"], "node-a", "B shows where it came from");
    assert_eq!(
        at_b["expires_ms"], at_a["expires_ms"],
        "it ends at the same moment"
    );
    assert_eq!(at_b["reason"], "credential stuffing");
    assert!(b.cli_ok(&["bans"]).contains("node-a"));

    // An unban on B lifts it on A too, and traffic flows again.
    b.cli_ok(&["unban", "10.241.0.0/24"]);
    within("the unban reaches node A", Duration::from_secs(1), || {
        ban_of(&a, "10.241.0.0/24").is_none()
    });
    assert_eq!(reach(from_a), Reach::Connected);

    // B misses a ban while it is down, and catches up on start (the resync).
    b.stop();
    a.cli_ok(&["ban", "10.242.0.0/24", "--ttl", "10m"]);
    b.restart();
    within("node B resyncs on start", Duration::from_secs(5), || {
        ban_of(&b, "10.242.0.0/24").is_some()
    });
    assert_eq!(reach(from_b), Reach::TimedOut);
    let status = b.cli_json(&["status", "--json"]);
    assert_eq!(status["shared"]["up"], true, "{status}");
    assert_eq!(status["shared"]["node"], "node-b");
    drop(a);
    drop(b);
    drop(redis);
}

/// A POST on its own connection; returns the status.
fn post(addr: SocketAddr, key: &str) -> u16 {
    let body =
        r#"{"model":"gpt-test","messages":[{"role":"user","content":"hi"}],"max_tokens":20}"#;
    let mut s = TcpStream::connect(addr).expect("connect to the gateway");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out.get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {out:?}"))
}

fn listen_addr(d: &Daemon) -> SocketAddr {
    let s = d.cli_json(&["status", "--json"]);
    s["gateway"]["listen"][0]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no gateway in status: {s}"))
}

#[test]
fn keys_and_the_monthly_quota_are_shared_by_every_node() {
    if !privileged() || !redis_available() {
        return;
    }
    let redis = RedisServer::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let config = |node: &str| {
        format!(
            "[gateway]\nlisten = [\"127.0.0.1:0\"]\nupstreams = [\"{}\"]\ndefault_tier = \"free\"\n\
             [store]\nbackend = \"redis\"\nurls = [\"{}\"]\nnode_name = \"{node}\"\n\
             [tiers.free]\nmonthly_tokens = 100000\n",
            upstream.url(),
            redis.url()
        )
    };
    let a = Daemon::start_host(Some(&config("node-a")), &[]);
    let b = Daemon::start_host(Some(&config("node-b")), &[]);
    let (addr_a, addr_b) = (listen_addr(&a), listen_addr(&b));

    let made = a.cli_json(&["keys", "add", "--tenant", "acme", "--json"]);
    let (secret, id) = (
        made["key"].as_str().expect("key").to_owned(),
        made["id"].as_str().expect("id").to_owned(),
    );
    assert_eq!(post(addr_a, &secret), 200);
    within("the key works on node B", Duration::from_secs(1), || {
        post(addr_b, &secret) == 200
    });
    let listed = b.cli_ok(&["keys", "list"]);
    assert!(listed.contains(&id), "{listed}");
    assert!(!listed.contains(&secret), "no secrets in listings");

    // One counter: both nodes report the usage both served.
    let quota = |d: &Daemon| d.cli_json(&["quota", "acme", "--json"])["used"].as_u64();
    within(
        "both nodes agree on the month's usage",
        Duration::from_secs(3),
        || {
            let (qa, qb) = (quota(&a), quota(&b));
            qa.is_some_and(|u| u > 0) && qa == qb
        },
    );

    // Revoked on B: refused on A.
    b.cli_ok(&["keys", "revoke", &id]);
    within(
        "the revocation reaches node A",
        Duration::from_secs(1),
        || post(addr_a, &secret) == 401,
    );
}

/// Tokens the daemon's ledger holds for `tenant` this month.
fn ledger_tokens(d: &Daemon, tenant: &str) -> u64 {
    let usage = d.cli_json(&["usage", "--tenant", tenant, "--format", "json"]);
    usage["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("no rows: {usage}"))
        .iter()
        .map(|r| {
            r["prompt_tokens"].as_u64().unwrap_or(0) + r["completion_tokens"].as_u64().unwrap_or(0)
        })
        .sum()
}

/// The tenant's month counter as Redis holds it (default prefix; 0 when there is none).
fn month_counter(redis: &RedisServer, tenant: &str) -> u64 {
    let key = format!("aiguard:{{{tenant}}}:q:{}", Today::now().month());
    let v = redis.cli(&["GET", &key]);
    if v.is_empty() {
        0
    } else {
        v.parse()
            .unwrap_or_else(|e| panic!("{key} holds {v:?}: {e}"))
    }
}

fn shared_status(d: &Daemon) -> serde_json::Value {
    d.cli_json(&["status", "--json"])["shared"].clone()
}

#[test]
fn usage_counted_while_redis_is_down_survives_a_sigkill_and_is_written_back_once() {
    if !privileged() || !redis_available() {
        return;
    }
    let mut redis = RedisServer::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let config = format!(
        "[gateway]\nlisten = [\"127.0.0.1:0\"]\nupstreams = [\"{}\"]\ndefault_tier = \"free\"\n\
         [store]\nbackend = \"redis\"\nurls = [\"{}\"]\nnode_name = \"node-a\"\n\
         decision_timeout = \"100ms\"\nretry_interval = \"100ms\"\nconnect_timeout = \"1s\"\n\
         [tiers.free]\non_store_failure = \"fail_open\"\n",
        upstream.url(),
        redis.url()
    );
    let mut a = Daemon::start_host(Some(&config), &[]);
    let addr = listen_addr(&a);
    let made = a.cli_json(&["keys", "add", "--tenant", "acme", "--json"]);
    let secret = made["key"].as_str().expect("key").to_owned();
    assert_eq!(post(addr, &secret), 200);
    within(
        "the first request is settled in Redis",
        Duration::from_secs(5),
        || {
            let counted = month_counter(&redis, "acme");
            counted > 0 && counted == ledger_tokens(&a, "acme")
        },
    );
    let before = month_counter(&redis, "acme");

    // Redis goes away (keeping what it holds); fail_open serves on, counting into the outbox.
    assert_eq!(redis.cli(&["SAVE"]), "OK");
    redis.stop();
    for _ in 0..4 {
        assert_eq!(post(addr, &secret), 200);
    }
    within(
        "the outbox holds what Redis has not seen",
        Duration::from_secs(5),
        || {
            let s = shared_status(&a);
            s["up"] == false
                && s["outbox_tokens"].as_u64() == Some(ledger_tokens(&a, "acme") - before)
        },
    );
    let used = ledger_tokens(&a, "acme");
    assert!(used > before, "{used} {before}");

    // Killed: no shutdown, no last write-back. Redis returns, then the daemon.
    a.kill();
    redis.restart();
    assert_eq!(
        month_counter(&redis, "acme"),
        before,
        "Redis kept its counter"
    );
    a.restart();
    within("written back", Duration::from_secs(10), || {
        let s = shared_status(&a);
        s["up"] == true && s["outbox_tokens"] == 0
    });
    assert_eq!(ledger_tokens(&a, "acme"), used, "the ledger survived too");
    assert_eq!(month_counter(&redis, "acme"), used, "every token, once");
    thread::sleep(Duration::from_millis(500));
    assert_eq!(month_counter(&redis, "acme"), used, "and only once");
}

#[test]
fn an_unban_made_while_redis_is_down_reaches_every_node_even_across_a_crash() {
    if !privileged() || !redis_available() {
        return;
    }
    const RANGE: &str = "10.243.7.0/24";
    let mut redis = RedisServer::start();
    let url = redis.url();
    let args = |node: &'static str| -> Vec<String> {
        [
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:9",
            "--redis",
            &url,
            "--node-name",
            node,
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let start = |node| {
        let args = args(node);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start_host(None, &args)
    };
    let in_redis =
        |redis: &RedisServer| redis.cli(&["HEXISTS", "aiguard:{bans}:all", RANGE]) == "1";
    let mut a = start("node-a");
    let mut b = start("node-b");
    a.cli_ok(&["ban", RANGE, "--ttl", "1h", "--reason", "stuffing"]);
    within("the ban reaches node B", Duration::from_secs(2), || {
        ban_of(&b, RANGE).is_some()
    });
    assert!(in_redis(&redis));

    // A goes away (it will miss the unban), then Redis (keeping the ban).
    a.stop();
    assert_eq!(redis.cli(&["SAVE"]), "OK");
    redis.stop();
    b.cli_ok(&["unban", RANGE]);
    assert!(ban_of(&b, RANGE).is_none());
    // B crashes and starts again while Redis is still away: the unban is not forgotten.
    b.kill();
    b.restart();
    assert!(ban_of(&b, RANGE).is_none(), "{:?}", ban_of(&b, RANGE));

    redis.restart();
    assert!(in_redis(&redis), "Redis came back with the ban");
    within("the unban reaches Redis", Duration::from_secs(10), || {
        !in_redis(&redis)
    });
    assert!(ban_of(&b, RANGE).is_none(), "B did not take the ban back");

    // A returns holding the ban as its own: it lifts it rather than pushing it back.
    a.restart();
    within(
        "A lifts the ban unbanned while it was away",
        Duration::from_secs(10),
        || ban_of(&a, RANGE).is_none(),
    );
    thread::sleep(Duration::from_secs(1));
    assert!(!in_redis(&redis), "A did not push it back");
    assert!(ban_of(&a, RANGE).is_none());
    assert!(ban_of(&b, RANGE).is_none());

    // A ban made after the unban goes everywhere as before.
    a.cli_ok(&["ban", RANGE, "--ttl", "1h"]);
    within("a new ban reaches node B", Duration::from_secs(2), || {
        ban_of(&b, RANGE).is_some()
    });
    assert!(in_redis(&redis));
}
