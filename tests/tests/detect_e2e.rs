//! End to end: the real daemon with its gateway and XDP on the server end of a veth pair, and
//! clients in another namespace with many addresses. A botnet of 50 addresses in one /24, each
//! failing to authenticate once (below any per-address threshold), ends with the /24 banned at
//! the NIC; clients in another range are served throughout; a repeat offense earns a longer
//! ban; and a normal traffic mix (many tenants, typos in keys, bursts) bans nobody.
//!
//! Address plan (only inside the namespaces each test makes): the server end holds
//! 10.245.X.1/24 and 10.246.X.1/24; the client end 10.245.X.10-59 (the botnet) and
//! 10.246.X.2-21 (everyone else).
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::atomic::{AtomicU8, Ordering},
    time::{Duration, Instant},
};

use aiguard_tests::{
    daemon::Daemon,
    netns::{Netns, Reach, VethPair, connect_from, http_from},
    upstream::{Upstream, UpstreamOptions},
};
use serde_json::Value;

const GATEWAY_PORT: u16 = 18080;
const BOTNET: u8 = 50;
const WAIT: Duration = Duration::from_secs(3);
/// Shorter than the first SYN retransmission: a dropped attempt sends one SYN.
const BLOCKED_WAIT: Duration = Duration::from_millis(700);

fn next_subnet() -> u8 {
    static NEXT: AtomicU8 = AtomicU8::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn botnet_ip(x: u8, i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 245, x, 10 + i))
}

fn other_ip(x: u8, i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 246, x, 2 + i))
}

/// The daemon on the server end, its gateway on both server addresses in front of a fake
/// upstream on the server namespace's loopback. Fields drop in order.
struct Testbed {
    daemon: Daemon,
    _upstream: Upstream,
    _veth: VethPair,
    client: Netns,
    _server: Netns,
    x: u8,
}

impl Testbed {
    fn new(detect: &str) -> Self {
        let x = next_subnet();
        let server = Netns::new();
        let client = Netns::new();
        let mut client_addrs: Vec<String> = (0..BOTNET)
            .map(|i| format!("{}/24", botnet_ip(x, i)))
            .collect();
        client_addrs.extend((0..20).map(|i| format!("{}/24", other_ip(x, i))));
        let client_refs: Vec<&str> = client_addrs.iter().map(String::as_str).collect();
        let veth = VethPair::new(
            &server,
            &[&format!("10.245.{x}.1/24"), &format!("10.246.{x}.1/24")],
            &client,
            &client_refs,
        );
        let upstream = server.run(|| Upstream::start(UpstreamOptions::default()));
        let config = format!(
            "[gateway]\nlisten = [\"0.0.0.0:{GATEWAY_PORT}\"]\nupstreams = [\"{}\"]\n\
             default_tier = \"free\"\n\
             [tiers.free]\nrequests_per_minute = 100000\nmax_concurrent = 1000\n\
             [detect]\n{detect}",
            upstream.url()
        );
        let daemon = Daemon::start_with_config(&server, &config, &["-i", &veth.server_if]);
        Self {
            daemon,
            _upstream: upstream,
            _veth: veth,
            client,
            _server: server,
            x,
        }
    }

    fn gateway(&self, range: u8) -> SocketAddr {
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(10, range, self.x, 1)),
            GATEWAY_PORT,
        )
    }

    /// A chat request from `src` with `key`; the status, or how the connection failed.
    fn post(&self, src: IpAddr, key: &str, timeout: Duration) -> Result<u16, Reach> {
        self.post_with(src, key, "", timeout)
            .map(|(status, _)| status)
    }

    /// [`Testbed::post`] with extra header lines (each ending in `\r\n`); the whole answer.
    fn post_with(
        &self,
        src: IpAddr,
        key: &str,
        headers: &str,
        timeout: Duration,
    ) -> Result<(u16, String), Reach> {
        let dst = self.gateway(if src.to_string().starts_with("10.245.") {
            245
        } else {
            246
        });
        let body =
            r#"{"model":"gpt-test","messages":[{"role":"user","content":"hi"}],"max_tokens":16}"#;
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n{headers}connection: close\r\n\r\n{body}",
            body.len()
        );
        http_from(&self.client, src, dst, &request, timeout)
    }

    fn add_key(&self, tenant: &str) -> String {
        self.daemon
            .cli_ok(&["keys", "add", "--tenant", tenant, "--tier", "free"])
            .trim()
            .to_owned()
    }

    fn bans(&self) -> Vec<Value> {
        let v = self.daemon.cli_json(&["bans", "--json"]);
        v.as_array()
            .cloned()
            .or_else(|| v["bans"].as_array().cloned())
            .unwrap_or_default()
    }

    fn ban_of(&self, range: &str) -> Option<Value> {
        self.bans().into_iter().find(|b| b["range"] == range)
    }
}

/// An invalid key of the right shape, different for each `i`.
fn guess(i: usize) -> String {
    format!(
        "aig_{:048x}",
        (i as u128 + 7).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    )
}

/// Enforcing credential-stuffing detection with short escalating bans, everything else off.
const STUFFING: &str = "ban_ttls = [\"4s\", \"8s\"]\ndistinct_invalid_keys = 10\n\
    [detect.credential_stuffing]\nshadow = false\nthreshold = 30\n\
    [detect.error_storm]\nenabled = false\n[detect.key_sharing]\nenabled = false\n\
    [detect.key_spraying]\nenabled = false\n[detect.rate_spike]\nenabled = false\n";

/// The botnet attacks: each address fails once, in turn, until the NIC drops it. Returns the
/// time from the first request to the first connection that timed out, and how many got 401.
fn attack(bed: &Testbed, first_guess: usize) -> (Duration, usize) {
    let started = Instant::now();
    let mut refused = 0;
    for i in 0..BOTNET {
        let sent = Instant::now();
        match bed.post(
            botnet_ip(bed.x, i),
            &guess(first_guess + usize::from(i)),
            BLOCKED_WAIT,
        ) {
            Ok(401) => refused += 1,
            Ok(other) => panic!("an invalid key answered {other}"),
            // The SYN of this attempt was the first one dropped.
            Err(Reach::TimedOut) => return (sent - started, refused),
            Err(e) => panic!("attacker {i}: {e:?}"),
        }
    }
    panic!("all {BOTNET} attackers were answered: the range was never banned");
}

#[test]
fn credential_stuffing_from_a_24_is_banned_at_the_nic_and_repeat_bans_escalate() {
    let bed = Testbed::new(STUFFING);
    let key = bed.add_key("acme");
    let bystander = other_ip(bed.x, 0);
    assert_eq!(bed.post(bystander, &key, WAIT), Ok(200));

    let (to_first_drop, refused) = attack(&bed, 0);
    eprintln!(
        "attack to first drop at the NIC: {to_first_drop:?} ({refused} requests answered 401)"
    );
    // The 11th distinct invalid key fires the detector; the ban takes a moment to land.
    assert!(
        (11..BOTNET as usize).contains(&refused),
        "{refused} answered"
    );
    let range = format!("10.245.{}.0/24", bed.x);
    let ban = bed
        .ban_of(&range)
        .unwrap_or_else(|| panic!("no ban of {range}: {:?}", bed.bans()));
    assert_eq!(ban["origin"], "detector", "{ban}");
    let reason = ban["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("credential_stuffing (offense 1)"),
        "{reason}"
    );
    assert!(reason.contains("distinct invalid keys"), "{reason}");
    let ttl = |b: &Value| b["expires_ms"].as_u64().unwrap() - b["created_ms"].as_u64().unwrap();
    assert_eq!(ttl(&ban), 4_000);
    // Every botnet address is dropped; the other range is served meanwhile.
    for i in [0, 25, BOTNET - 1] {
        assert_eq!(
            connect_from(
                &bed.client,
                botnet_ip(bed.x, i),
                bed.gateway(245),
                BLOCKED_WAIT
            ),
            Reach::TimedOut
        );
    }
    assert_eq!(bed.post(bystander, &key, WAIT), Ok(200));
    assert!(bed.daemon.log().contains("detector acted"));

    // The ban expires on its own...
    let deadline = Instant::now() + Duration::from_secs(15);
    while bed.ban_of(&range).is_some() {
        assert!(Instant::now() < deadline, "the ban did not expire");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(bed.post(botnet_ip(bed.x, 0), &guess(999), WAIT), Ok(401));
    // ...and the second offense earns the next TTL (the detector counts afresh after it
    // fires: the new attack's keys are the evidence).
    let (again, _) = attack(&bed, 1_000);
    eprintln!("second attack to first drop: {again:?}");
    let ban = bed.ban_of(&range).expect("banned again");
    assert!(
        ban["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("(offense 2)"),
        "{ban}"
    );
    assert_eq!(ttl(&ban), 8_000);
    assert_eq!(bed.post(bystander, &key, WAIT), Ok(200));
}

#[test]
fn a_normal_traffic_mix_bans_nobody() {
    // Every detector enforcing, at its default thresholds.
    let bed = Testbed::new(
        "[detect.credential_stuffing]\nshadow = false\n[detect.error_storm]\nshadow = false\n\
         [detect.key_sharing]\nshadow = false\n[detect.key_spraying]\nshadow = false\n\
         [detect.rate_spike]\nshadow = false\n",
    );
    let keys: Vec<String> = (0..12)
        .map(|t| bed.add_key(&format!("tenant-{t}")))
        .collect();
    let mut rng_state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    let (mut ok, mut typos) = (0, 0);
    let started = Instant::now();
    // 20 clients (some behind one NAT address share keys of their tenant), a mistyped key now
    // and then, and bursts of 10 back to back.
    for round in 0..300 {
        for c in 0..20u8 {
            let src = other_ip(bed.x, c);
            let key = &keys[usize::from(c) % keys.len()];
            let burst = if next() % 10 == 0 { 10 } else { 1 };
            for _ in 0..burst {
                let typo = next() % 40 == 0;
                let k = if typo {
                    format!("{}x", &key[..key.len() - 1])
                } else {
                    key.clone()
                };
                let status = bed.post(src, &k, WAIT).unwrap_or_else(|e| {
                    panic!(
                        "round {round}, client {c}: {e:?} (banned? {:?})",
                        bed.bans()
                    )
                });
                match (typo, status) {
                    (true, 401) => typos += 1,
                    (false, 200) => ok += 1,
                    other => panic!("round {round}, client {c}: {other:?}"),
                }
            }
        }
    }
    eprintln!(
        "normal mix: {ok} served, {typos} typos, in {:?}",
        started.elapsed()
    );
    assert!(typos > 0, "the mix had no typos");
    assert!(bed.bans().is_empty(), "{:?}", bed.bans());
    let keys_listed = bed.daemon.cli_json(&["keys", "list", "--json"]);
    assert!(
        keys_listed
            .as_array()
            .expect("keys")
            .iter()
            .all(|k| k.get("suspended_until_ms").is_none()),
        "{keys_listed}"
    );
    assert!(
        !bed.daemon.log().contains("detector fired"),
        "{}",
        bed.daemon.log()
    );
}

/// The value of header `name` in a raw HTTP answer.
fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    answer.split("\r\n\r\n").next()?.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn a_challenged_range_passes_with_a_proof_and_a_key_used_from_two_ranges_is_suspended() {
    let bed = Testbed::new(
        "[detect.error_storm]\nshadow = false\nmin_requests = 10\nratio = 0.5\n\
         action = \"challenge\"\n[detect.challenge]\ndifficulty = 12\n\
         [detect.key_sharing]\nshadow = false\nthreshold = 1\nsuspend_for = \"1h\"\n",
    );
    let key = bed.add_key("acme");
    let scanner = |i| botnet_ip(bed.x, i);
    // A scanner's errors from ten addresses of one /24: the range must prove its work.
    for i in 0..10 {
        assert_eq!(bed.post(scanner(i), &guess(i.into()), WAIT), Ok(401));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let (status, answer) = loop {
        let got = bed
            .post_with(scanner(20), &key, "", WAIT)
            .expect("an answer");
        if got.0 == 428 || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status, 428, "{answer}");
    assert!(answer.contains("challenge_required"), "{answer}");
    let token = header(&answer, "x-aiguard-challenge")
        .expect("a token")
        .to_owned();
    let bits: u8 = header(&answer, "x-aiguard-challenge-difficulty")
        .expect("a difficulty")
        .parse()
        .expect("bits");
    let proof = format!(
        "x-aiguard-proof: {token}:{}\r\n",
        aiguard_daemon::detect::challenge::solve(&token, bits)
    );
    let (status, answer) = bed
        .post_with(scanner(20), &key, &proof, WAIT)
        .expect("an answer");
    assert_eq!(status, 200, "{answer}");
    // The same proof passes once; the other range never sees a challenge.
    let (status, _) = bed
        .post_with(scanner(21), &key, &proof, WAIT)
        .expect("an answer");
    assert_eq!(status, 428);

    // The key, used from the challenged range and now from the other one: suspended.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (status, answer) = loop {
        let got = bed
            .post_with(other_ip(bed.x, 0), &key, "", WAIT)
            .expect("an answer");
        if got.0 == 403 || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("key_suspended"), "{answer}");
    let listed = bed.daemon.cli_ok(&["keys", "list"]);
    assert!(listed.contains("suspended until"), "{listed}");
    let id = bed.daemon.cli_json(&["keys", "list", "--json"])[0]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    bed.daemon.cli_ok(&["keys", "resume", &id]);
    assert_eq!(bed.post(other_ip(bed.x, 0), &key, WAIT), Ok(200));
}
