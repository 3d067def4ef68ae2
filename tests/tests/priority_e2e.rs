//! End to end: paid traffic first under surge, with the real daemon's gateway in one network
//! namespace in front of an upstream that works on `SLOTS` requests at once (the rest wait
//! their turn, as an inference server's batch does), and the clients in another namespace: a
//! free-tier flood at four times the upstream's capacity leaves the paid tier's p99 within
//! 1.5x of its unloaded value, and every free request is served or shed with 429/503 and
//! `Retry-After`.
//!
//! Address plan (inside the namespaces the test makes): the server end 10.249.1.1/24, the
//! paid client 10.249.1.2, the free clients 10.249.1.10-45.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use aiguard_tests::{
    daemon::Daemon,
    netns::{Netns, VethPair, http_from},
    upstream::{Upstream, UpstreamOptions, headers as up},
};

const GATEWAY_PORT: u16 = 18080;
const SLOTS: usize = 4;
const SERVICE_MS: u64 = 50;
/// Free clients, each sending up to `PER_CLIENT_RATE` requests/s: about 4x the upstream's 80/s
/// (a client waits for each answer, so it falls a little behind its schedule).
const FREE_CLIENTS: u8 = 36;
const PER_CLIENT_RATE: f64 = 10.0;
const FLOOD_FOR: Duration = Duration::from_secs(4);
const PAID_REQUESTS: usize = 40;
const WAIT: Duration = Duration::from_secs(10);

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 249, 1, last))
}

fn request(key: &str) -> String {
    let body =
        r#"{"model":"gpt-test","messages":[{"role":"user","content":"hi"}],"max_tokens":16}"#;
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\n{}: {SERVICE_MS}\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        up::DELAY_MS,
        body.len()
    )
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    let i = ((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

fn paid_latencies(client: &Netns, gateway: SocketAddr, key: &str) -> Vec<Duration> {
    (0..PAID_REQUESTS)
        .map(|_| {
            let started = Instant::now();
            let (status, answer) =
                http_from(client, ip(2), gateway, &request(key), WAIT).expect("a paid answer");
            assert_eq!(status, 200, "a paid request failed: {answer}");
            started.elapsed()
        })
        .collect()
}

#[test]
fn a_free_flood_from_another_namespace_leaves_paid_latency_alone() {
    let server = Netns::new();
    let client = Netns::new();
    let mut addrs = vec![format!("{}/24", ip(2))];
    addrs.extend((0..FREE_CLIENTS).map(|i| format!("{}/24", ip(10 + i))));
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let veth = VethPair::new(&server, &["10.249.1.1/24"], &client, &refs);
    let upstream = server.run(|| {
        Upstream::start(UpstreamOptions {
            record_requests: false,
            capacity: Some(SLOTS),
            ..UpstreamOptions::default()
        })
    });
    let config = format!(
        "[gateway]\nlisten = [\"0.0.0.0:{GATEWAY_PORT}\"]\nupstreams = [\"{}\"]\n\
         default_tier = \"free\"\nupstream_slots = {SLOTS}\n\
         [tiers.paid]\nweight = 50\nmax_queue_wait = \"10s\"\n\
         [tiers.free]\nweight = 1\nmax_queued = 16\nmax_queue_wait = \"200ms\"\n\
         max_upstream_slots = {}\n",
        upstream.url(),
        SLOTS - 1
    );
    let daemon = Daemon::start_with_config(&server, &config, &["-i", &veth.server_if]);
    let gateway = SocketAddr::new(ip(1), GATEWAY_PORT);
    let key = |tenant: &str, tier: &str| {
        daemon
            .cli_ok(&["keys", "add", "--tenant", tenant, "--tier", tier])
            .trim()
            .to_owned()
    };
    let paid = key("acme", "paid");
    let free: Vec<String> = (0..8).map(|i| key(&format!("trial-{i}"), "free")).collect();

    paid_latencies(&client, gateway, &paid);
    let alone = p99(paid_latencies(&client, gateway, &paid));

    let answers = Mutex::new(Vec::new());
    let every = Duration::from_secs_f64(1.0 / PER_CLIENT_RATE);
    let loaded = thread::scope(|scope| {
        for i in 0..FREE_CLIENTS {
            let (client, answers) = (&client, &answers);
            let req = request(&free[usize::from(i) % free.len()]);
            scope.spawn(move || {
                let started = Instant::now();
                let mut n = 0u32;
                while started.elapsed() < FLOOD_FOR {
                    let due = started + every * n;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    n += 1;
                    let got = http_from(client, ip(10 + i), gateway, &req, WAIT);
                    answers.lock().expect("answers").push(got);
                }
            });
        }
        thread::sleep(Duration::from_millis(500));
        p99(paid_latencies(&client, gateway, &paid))
    });
    eprintln!("paid p99 from another namespace: {alone:?} alone, {loaded:?} under the flood");
    assert!(
        loaded.as_secs_f64() <= 1.5 * alone.as_secs_f64(),
        "paid p99 {loaded:?} under the flood, {alone:?} without"
    );

    let answers = answers.lock().expect("answers");
    let (mut served, mut shed) = (0, 0);
    for got in answers.iter() {
        let (status, answer) = got
            .as_ref()
            .unwrap_or_else(|e| panic!("a free request: {e:?}"));
        match status {
            200 => served += 1,
            429 | 503 => {
                shed += 1;
                assert!(
                    answer.contains("queue_full") || answer.contains("upstream_saturated"),
                    "{answer}"
                );
                assert!(
                    answer.to_ascii_lowercase().contains("\r\nretry-after: "),
                    "{answer}"
                );
            }
            other => panic!("a free request answered {other}: {answer}"),
        }
    }
    eprintln!("free: {} sent, {served} served, {shed} shed", answers.len());
    assert!(
        served > 0 && shed > answers.len() / 2,
        "served {served}, shed {shed}"
    );
    assert!(
        upstream.max_in_flight() <= SLOTS,
        "{}",
        upstream.max_in_flight()
    );
    let status = daemon.cli_json(&["status", "--json"]);
    assert_eq!(status["gateway"]["shed"], shed, "{status}");
}
