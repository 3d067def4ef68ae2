//! The gateway of the real daemon, driven through its CLI: quota usage that survives SIGKILL,
//! reload by SIGHUP and by `aiguard reload` with requests in flight, an invalid configuration
//! refused, keys that never reach the log, usage export with prices, and the gateway started
//! from flags alone.
use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use aiguard_tests::{
    daemon::Daemon,
    privileged,
    upstream::{Upstream, UpstreamOptions, headers as up},
};
use nix::{sys::signal::Signal, unistd::Pid};

fn listen_addr(d: &Daemon) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = d.cli_json(&["status", "--json"]);
        if let Some(a) = s["gateway"]["listen"][0].as_str() {
            return a.parse().expect("a socket address");
        }
        assert!(Instant::now() < deadline, "no gateway in status: {s}");
        thread::sleep(Duration::from_millis(100));
    }
}

fn add_key(d: &Daemon, tenant: &str, tier: &str) -> (String, String) {
    let v = d.cli_json(&["keys", "add", "--tenant", tenant, "--tier", tier, "--json"]);
    (
        v["key"].as_str().expect("key").to_owned(),
        v["id"].as_str().expect("id").to_owned(),
    )
}

/// One HTTP/1.1 request on its own connection; returns (status, body).
fn post(addr: SocketAddr, key: &str, body: &str, extra: &[(&str, &str)]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the gateway");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (n, v) in extra {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("write");
    s.write_all(body.as_bytes()).expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the answer");
    let status = out
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {out:?}"));
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

const HELLO: &str =
    r#"{"model":"gpt-test","messages":[{"role":"user","content":"hi"}],"max_tokens":50}"#;

fn gateway_config(upstream: &Upstream, tiers: &str) -> String {
    format!(
        "[gateway]\nlisten = [\"127.0.0.1:0\"]\nupstreams = [\"{}\"]\ndefault_tier = \"free\"\n# flushed rarely: a SIGKILL finds usage in the journal\nusage_flush_interval = \"1h\"\n{tiers}",
        upstream.url()
    )
}

#[test]
fn quota_usage_survives_sigkill_and_restart() {
    if !privileged() {
        return;
    }
    let upstream = Upstream::start(UpstreamOptions::default());
    let mut d = Daemon::start_host(
        Some(&gateway_config(
            &upstream,
            "[tiers.free]\nmonthly_tokens = 1000\n",
        )),
        &[],
    );
    let addr = listen_addr(&d);
    let (key, id) = add_key(&d, "acme", "free");
    // Each request uses 10 prompt + 30 completion tokens, as the upstream reports.
    for _ in 0..5 {
        let (status, body) = post(
            addr,
            &key,
            HELLO,
            &[(up::PROMPT_TOKENS, "10"), (up::COMPLETION_WORDS, "30")],
        );
        assert_eq!(status, 200, "{body}");
    }
    let q = d.cli_json(&["quota", "acme", "--json"]);
    assert_eq!(q["used"], 200);
    d.kill();
    d.restart();
    let q = d.cli_json(&["quota", "acme", "--json"]);
    assert_eq!(q["used"], 200, "no usage lost to the SIGKILL: {q}");
    assert_eq!(q["remaining"], 800);
    assert_eq!(q["limit"], 1000);
    let usage = d.cli_json(&["usage", "--tenant", "acme", "--format", "json"]);
    let rows = usage["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 1, "{usage}");
    assert_eq!(rows[0]["key"], id.as_str());
    assert_eq!(rows[0]["requests"], 5);
    assert_eq!(rows[0]["prompt_tokens"], 50);
    assert_eq!(rows[0]["completion_tokens"], 150);
    // The key itself survived too, and its quota holds across the restart.
    let addr = listen_addr(&d);
    let (status, _) = post(addr, &key, HELLO, &[]);
    assert_eq!(status, 200);
    d.kill();
    d.restart();
    let q = d.cli_json(&["quota", "acme", "--json"]);
    assert!(q["used"].as_u64().expect("used") > 200);
}

#[test]
fn sighup_and_reload_change_limits_with_requests_in_flight() {
    if !privileged() {
        return;
    }
    let upstream = Upstream::start(UpstreamOptions::default());
    let mut d = Daemon::start_host(
        Some(&gateway_config(
            &upstream,
            "[tiers.free]\nrequests_per_minute = 1\n",
        )),
        &[],
    );
    let config_path = d.scratch_file("aiguard.toml");
    let addr = listen_addr(&d);
    let (key, _) = add_key(&d, "acme", "free");
    let k = key.clone();
    let slow = thread::spawn(move || post(addr, &k, HELLO, &[(up::DELAY_MS, "2000")]));
    thread::sleep(Duration::from_millis(400));
    assert_eq!(post(addr, &key, HELLO, &[]).0, 429, "1 request per minute");

    // SIGHUP with a raised limit.
    fs::write(
        &config_path,
        gateway_config(&upstream, "[tiers.free]\nrequests_per_minute = 5\n"),
    )
    .expect("rewrite config");
    nix::sys::signal::kill(
        Pid::from_raw(d.pid().expect("running") as i32),
        Signal::SIGHUP,
    )
    .expect("SIGHUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while post(addr, &key, HELLO, &[]).0 != 200 {
        assert!(Instant::now() < deadline, "SIGHUP did not raise the limit");
        thread::sleep(Duration::from_millis(100));
    }

    // An invalid configuration is refused with its reason; the old one stays.
    fs::write(
        &config_path,
        gateway_config(&upstream, "[tiers.free]\nrequests_per_minute = 0\n"),
    )
    .expect("rewrite config");
    let out = d.cli(&["reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tiers.free.requests_per_minute"), "{err}");
    assert!(err.contains("old one stays"), "{err}");

    // `aiguard reload` with another limit.
    fs::write(
        &config_path,
        gateway_config(&upstream, "[tiers.free]\nrequests_per_minute = 600\n"),
    )
    .expect("rewrite config");
    let out = d.cli_ok(&["reload"]);
    assert!(out.contains("reloaded"), "{out}");
    let passed = (0..20)
        .filter(|_| post(addr, &key, HELLO, &[]).0 == 200)
        .count();
    assert_eq!(passed, 20, "the new limit applies");

    let (status, _) = slow.join().expect("slow client");
    assert_eq!(
        status, 200,
        "the request in flight across both reloads completed"
    );
    assert!(d.stop().success());
}

#[test]
fn keys_cli_usage_export_and_logs_without_secrets() {
    if !privileged() {
        return;
    }
    let upstream = Upstream::start(UpstreamOptions::default());
    let d = Daemon::start_host(
        Some(&gateway_config(
            &upstream,
            "[tiers.free]\n[tiers.paid]\n[tiers.paid.prices]\nprompt_per_1k = 1.0\ncompletion_per_1k = 2.0\n[prices.\"gpt-test\"]\nprompt_per_1k = 0.5\ncompletion_per_1k = 1.0\n",
        )),
        &["--log", "debug"],
    );
    let addr = listen_addr(&d);
    let (paid, paid_id) = add_key(&d, "acme", "paid");
    let (free, free_id) = add_key(&d, "beta", "free");
    let refused = d.cli(&["keys", "add", "--tenant", "acme", "--tier", "gold"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no tier \"gold\""));
    let bad_tenant = d.cli(&["keys", "add", "--tenant", "a b"]);
    assert!(!bad_tenant.status.success());

    // The model has its own price; another model falls back to the tier's.
    assert_eq!(
        post(
            addr,
            &paid,
            HELLO,
            &[(up::PROMPT_TOKENS, "1000"), (up::COMPLETION_WORDS, "10")]
        )
        .0,
        200
    );
    let other = r#"{"model":"other","messages":[{"role":"user","content":"hi"}],"max_tokens":50}"#;
    assert_eq!(
        post(
            addr,
            &paid,
            other,
            &[(up::PROMPT_TOKENS, "1000"), (up::COMPLETION_WORDS, "10")]
        )
        .0,
        200
    );
    assert_eq!(post(addr, &free, HELLO, &[]).0, 200);
    assert_eq!(post(addr, "aig_0000", HELLO, &[]).0, 401);

    let list = d.cli_ok(&["keys", "list"]);
    assert!(list.contains(&paid_id) && list.contains(&free_id), "{list}");
    let json = d.cli_ok(&["keys", "list", "--json"]);
    for secret in [&paid, &free] {
        assert!(
            !list.contains(&secret[8..]) && !json.contains(&secret[8..]),
            "no secret listed"
        );
    }
    assert!(!json.contains("sha256"), "no hash listed: {json}");

    let usage = d.cli_json(&["usage", "--format", "json"]);
    let rows = usage["rows"].as_array().expect("rows");
    let cost_of = |model: &str| {
        rows.iter()
            .find(|r| r["tenant"] == "acme" && r["model"] == model)
            .and_then(|r| r["cost"].as_f64())
            .unwrap_or_else(|| panic!("no acme row for {model}: {usage}"))
    };
    assert!((cost_of("gpt-test") - (1000.0 * 0.5 + 10.0 * 1.0) / 1000.0).abs() < 1e-9);
    assert!((cost_of("other") - (1000.0 * 1.0 + 10.0 * 2.0) / 1000.0).abs() < 1e-9);
    let csv = d.cli_ok(&["usage", "--tenant", "acme", "--format", "csv"]);
    assert!(
        csv.starts_with("day,tenant,key,model,requests,prompt_tokens,completion_tokens,cost\n"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 3, "{csv}");
    let table = d.cli_ok(&["usage"]);
    assert!(table.contains("total"), "{table}");
    let bad_month = d.cli(&["usage", "--month", "2026-13"]);
    assert!(!bad_month.status.success());
    assert!(String::from_utf8_lossy(&bad_month.stderr).contains("YYYY-MM"));

    d.cli_ok(&["keys", "revoke", &free_id]);
    assert_eq!(post(addr, &free, HELLO, &[]).0, 401);
    let again = d.cli(&["keys", "revoke", &free_id]);
    assert!(!again.status.success());

    let log = d.log();
    for secret in [&paid, &free] {
        assert!(!log.contains(&secret[4..]), "a key in the daemon log");
    }
}

#[test]
fn the_gateway_runs_from_flags_alone() {
    if !privileged() {
        return;
    }
    let upstream = Upstream::start(UpstreamOptions::default());
    let url = upstream.url();
    let d = Daemon::start_host(None, &["--listen", "127.0.0.1:0", "--upstream", &url]);
    let addr = listen_addr(&d);
    // No config file: keys get the built-in default tier.
    let v = d.cli_json(&["keys", "add", "--tenant", "acme", "--json"]);
    assert_eq!(v["tier"], "default");
    let key = v["key"].as_str().expect("key");
    let (status, body) = post(addr, key, HELLO, &[]);
    assert_eq!(status, 200, "{body}");
    let status = d.cli_ok(&["status"]);
    assert!(status.contains("gateway: 127.0.0.1:"), "{status}");
    let bad = d.cli(&["keys", "add", "--tenant", "acme", "--tier", "paid"]);
    assert!(!bad.status.success(), "unconfigured tiers are refused");
}
