//! `/metrics` end to end: the gateway in this process in front of a fake upstream, its
//! exporter on a loopback port, scraped over real HTTP; the shipped alert rules checked and
//! unit-tested by promtool; and a real Prometheus scraping the exporter and evaluating them.
//! No privilege needed: the XDP part is not involved (its families are unit-tested in the
//! daemon crate).
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use aiguard_daemon::{gateway::Gateway, metrics};
use aiguard_tests::{
    gateway::{Answer, TestGateway, chat_request, client, send},
    upstream::{Upstream, UpstreamOptions, headers as up},
};
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::{Value, json};
use tokio::{sync::watch, task::JoinHandle};

/// The gateway's exporter on `127.0.0.1:0`, served until dropped.
struct Exported {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Exported {
    async fn start(gw: Arc<Gateway>) -> Self {
        let exporter = metrics::Exporter::new()
            .expect("exporter")
            .with_gateway(gw)
            .expect("gateway metrics register");
        let listener = metrics::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind the metrics port");
        let addr = listener.local_addr().expect("local addr");
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(metrics::serve(listener, Arc::new(exporter), rx));
        Self {
            addr,
            stop,
            task: Some(task),
        }
    }

    async fn scrape(&self) -> String {
        let a = get(&format!("http://{}/metrics", self.addr)).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(
            a.header("content-type"),
            Some("text/plain; version=0.0.4"),
            "the exposition format's content type"
        );
        a.text()
    }

    async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("the metrics server stops")
                .expect("no panic");
        }
    }
}

async fn get(url: &str) -> Answer {
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    tokio::time::timeout(Duration::from_secs(20), send(&client(), req))
        .await
        .unwrap_or_else(|_| panic!("GET {url} timed out"))
}

/// `name{labels}` -> value, for every sample line of a scrape.
fn samples(page: &str) -> BTreeMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("`series value`");
            (
                series.to_owned(),
                value.parse().unwrap_or_else(|e| panic!("{l}: {e}")),
            )
        })
        .collect()
}

fn config(upstream: &Upstream) -> String {
    format!(
        r#"
[gateway]
listen = ["127.0.0.1:0"]
upstreams = ["{}"]
default_tier = "free"
[tiers.free]
[tiers.free.per_key]
requests_per_minute = 2
[tiers.paid]
monthly_tokens = 1000
"#,
        upstream.url()
    )
}

fn hello() -> Value {
    json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16})
}

/// Prompt and completion tokens the fake upstream reports for each request of [`traffic`].
const STEER: &[(&str, &str)] = &[(up::PROMPT_TOKENS, "10"), (up::COMPLETION_WORDS, "5")];

/// Known traffic: paid (tenant acme) 3 allowed, 1 upstream 500, 1 malformed body; free (tenant
/// beta) 2 allowed then 1 over its per-key limit; 2 without a valid key. Returns the secrets.
async fn traffic(g: &TestGateway) -> Vec<String> {
    let paid = g.add_key("acme", "paid");
    let free = g.add_key("beta", "free");
    let url = g.url("/v1/chat/completions");
    let c = client();
    for _ in 0..3 {
        let a = send(&c, chat_request(&url, &paid, &hello(), STEER)).await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
    let a = send(
        &c,
        chat_request(&url, &paid, &hello(), &[(up::STATUS, "500")]),
    )
    .await;
    assert_eq!(a.status, 500, "{}", a.text());
    let malformed = Request::post(&url)
        .header("authorization", format!("Bearer {paid}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{not json")))
        .expect("request");
    assert_eq!(send(&c, malformed).await.status, 400);
    for expected in [200, 200, 429] {
        let a = send(&c, chat_request(&url, &free, &hello(), STEER)).await;
        assert_eq!(a.status, expected, "{}", a.text());
    }
    let a = send(
        &c,
        Request::post(&url)
            .body(Full::new(Bytes::from(hello().to_string())))
            .expect("request"),
    )
    .await;
    assert_eq!(a.status, 401);
    let wrong = format!("aig_{}", "0".repeat(48));
    let a = send(&c, chat_request(&url, &wrong, &hello(), &[])).await;
    assert_eq!(a.status, 401);
    vec![paid, free, wrong]
}

/// Series and values [`traffic`] must leave, exactly.
const EXPECTED: &[(&str, f64)] = &[
    (
        r#"aiguard_gateway_requests_total{outcome="allowed",tier="paid"}"#,
        3.0,
    ),
    (
        r#"aiguard_gateway_requests_total{outcome="upstream_error",tier="paid"}"#,
        1.0,
    ),
    (
        r#"aiguard_gateway_requests_total{outcome="bad_request",tier="paid"}"#,
        1.0,
    ),
    (
        r#"aiguard_gateway_requests_total{outcome="rate_limited",tier="paid"}"#,
        0.0,
    ),
    (
        r#"aiguard_gateway_requests_total{outcome="allowed",tier="free"}"#,
        2.0,
    ),
    (
        r#"aiguard_gateway_requests_total{outcome="rate_limited",tier="free"}"#,
        1.0,
    ),
    (
        r#"aiguard_gateway_requests_total{outcome="quota_exceeded",tier="free"}"#,
        0.0,
    ),
    (
        r#"aiguard_gateway_requests_total{outcome="store_unavailable",tier="free"}"#,
        0.0,
    ),
    (
        r#"aiguard_gateway_requests_total{outcome="unauthorized",tier="none"}"#,
        2.0,
    ),
    (
        r#"aiguard_gateway_requests_total{outcome="bad_request",tier="none"}"#,
        0.0,
    ),
    (
        r#"aiguard_gateway_tokens_total{kind="prompt",tier="paid"}"#,
        30.0,
    ),
    (
        r#"aiguard_gateway_tokens_total{kind="completion",tier="paid"}"#,
        15.0,
    ),
    (
        r#"aiguard_gateway_tokens_total{kind="prompt",tier="free"}"#,
        20.0,
    ),
    (
        r#"aiguard_gateway_tokens_total{kind="completion",tier="free"}"#,
        10.0,
    ),
    ("aiguard_gateway_in_flight_requests", 0.0),
    ("aiguard_gateway_upstream_response_seconds_count", 6.0),
    (r#"aiguard_tenant_monthly_tokens_used{tenant="acme"}"#, 45.0),
    (
        r#"aiguard_tenant_monthly_tokens_limit{tenant="acme"}"#,
        1000.0,
    ),
    (
        r#"aiguard_tenant_monthly_quota_used_ratio{tenant="acme"}"#,
        0.045,
    ),
];

/// Scrapes until every expected value is there (a response is settled when its body is
/// dropped, just after the client has read it), or fails with the difference.
async fn scrape_until_settled(m: &Exported) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = samples(&m.scrape().await);
        let wrong: Vec<String> = EXPECTED
            .iter()
            .filter(|(s, v)| got.get(*s) != Some(v))
            .map(|(s, v)| format!("{s}: expected {v}, got {:?}", got.get(*s)))
            .collect();
        if wrong.is_empty() {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "after 10 s:\n{}\n\nscrape:\n{got:#?}",
            wrong.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_counts_each_outcome_per_tier_and_names_no_key() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(&upstream)).await;
    let m = Exported::start(g.gw.clone()).await;

    // Before any request every tier's series exist, at zero.
    let before = samples(&m.scrape().await);
    assert_eq!(
        before.get(r#"aiguard_gateway_requests_total{outcome="allowed",tier="paid"}"#),
        Some(&0.0)
    );
    assert_eq!(
        before.get(&format!(
            "aiguard_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        Some(&1.0)
    );

    let secrets = traffic(&g).await;
    let got = scrape_until_settled(&m).await;
    // Tenant beta's tier has no monthly quota: no quota series for it.
    assert!(
        !got.keys().any(|s| s.contains("tenant=\"beta\"")),
        "{got:#?}"
    );
    // Each request has exactly one outcome.
    let outcomes: f64 = got
        .iter()
        .filter(|(s, _)| s.starts_with("aiguard_gateway_requests_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(outcomes, 10.0, "{got:#?}");

    let page = m.scrape().await;
    for secret in &secrets {
        assert!(!page.contains(secret.as_str()), "a key in the page");
    }
    for k in g.keys.list() {
        assert!(!page.contains(&k.id), "a key id in the page");
        assert!(!page.contains(&k.hint), "a key hint in the page");
    }
    assert!(!page.contains("aig_"), "{page}");
    for line in page.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        assert!(name.starts_with("aiguard_"), "unprefixed series: {line}");
    }
    for line in page.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line.split(' ').skip(2);
        let (name, kind) = (parts.next().expect("name"), parts.next().expect("type"));
        assert_eq!(
            kind == "counter",
            name.ends_with("_total"),
            "counters and only counters end in _total: {line}"
        );
    }

    m.stop().await;
    g.stop().await;
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_owned()
}

fn deploy_prometheus() -> PathBuf {
    workspace_root().join("deploy/prometheus")
}

/// A Debian `prometheus` binary, if installed. Under `CI=true` its absence fails the test;
/// elsewhere the test says loudly that it did not run.
fn prometheus_tool(name: &str) -> Option<PathBuf> {
    let path = PathBuf::from("/usr/bin").join(name);
    if path.exists() {
        return Some(path);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{} is missing and CI=true: refusing to skip (run `cargo xtask setup`, which installs the Debian package prometheus)",
            path.display()
        );
    }
    eprintln!(
        "NOT RUN: {} is missing; `cargo xtask setup` installs it (Debian package prometheus)",
        path.display()
    );
    None
}

fn promtool_ok(promtool: &Path, args: &[&str]) {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(deploy_prometheus())
        .output()
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool {}: {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_shipped_rules_and_scrape_config_pass_promtool() {
    let Some(promtool) = prometheus_tool("promtool") else {
        return;
    };
    promtool_ok(&promtool, &["check", "rules", "alerts.yml"]);
    promtool_ok(&promtool, &["test", "rules", "alerts_test.yml"]);
    promtool_ok(&promtool, &["check", "config", "prometheus.yml"]);
}

/// A real Prometheus on a loopback port with its own data directory, stopped by its PID.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(binary: &Path, target: SocketAddr) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let rules = deploy_prometheus().join("alerts.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: aiguard\n    static_configs:\n      - targets: [\"{target}\"]\n",
            rules.display()
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write the config");
        // A free port: bound and released (Prometheus takes no already-bound socket).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited with {status}:\n{}", self.log());
            }
            let req = Request::get(format!("{}/-/ready", self.url))
                .body(Full::new(Bytes::new()))
                .expect("request");
            if let Ok(Ok(resp)) =
                tokio::time::timeout(Duration::from_secs(2), client().request(req)).await
                && resp.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready after 60 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// An instant query's `data`; panics unless Prometheus accepted the expression.
    async fn query(&self, expr: &str) -> Value {
        let a = get(&format!(
            "{}/api/v1/query?query={}",
            self.url,
            form_encode(expr)
        ))
        .await;
        let v = a.json();
        assert_eq!(v["status"], "success", "{expr}: {v}");
        v["data"].clone()
    }

    /// The value of a query expected to return one series.
    async fn value(&self, expr: &str) -> Option<f64> {
        let data = self.query(expr).await;
        let result = data["result"].as_array()?;
        if result.len() != 1 {
            return None;
        }
        result[0]["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `application/x-www-form-urlencoded` for a query parameter.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_gateway_and_evaluates_every_alert() {
    let Some(binary) = prometheus_tool("prometheus") else {
        return;
    };
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(&upstream)).await;
    let m = Exported::start(g.gw.clone()).await;
    let mut prom = Prometheus::start(&binary, m.addr);
    prom.wait_ready().await;
    // The traffic flows after a first scrape, so that rates see it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while prom.value(r#"up{job="aiguard"}"#).await != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped the exporter:\n{}",
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    traffic(&g).await;
    scrape_until_settled(&m).await;

    // Prometheus has the settled values once a scrape after the traffic is in.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let allowed = prom
            .value(r#"aiguard_gateway_requests_total{job="aiguard",tier="paid",outcome="allowed"}"#)
            .await;
        let tokens = prom
            .value(r#"aiguard_gateway_tokens_total{tier="free",kind="completion"}"#)
            .await;
        if allowed == Some(3.0) && tokens == Some(10.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus never saw the traffic: allowed {allowed:?}, tokens {tokens:?}\n{}",
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for (expr, want) in [
        (r#"up{job="aiguard"}"#, 1.0),
        (
            r#"sum(aiguard_gateway_requests_total{outcome="unauthorized"})"#,
            2.0,
        ),
        (
            r#"aiguard_tenant_monthly_quota_used_ratio{tenant="acme"}"#,
            0.045,
        ),
        ("aiguard_gateway_in_flight_requests", 0.0),
        ("sum(aiguard_gateway_upstream_response_seconds_count)", 6.0),
        ("count(aiguard_build_info)", 1.0),
    ] {
        assert_eq!(prom.value(expr).await, Some(want), "{expr}");
    }
    let p99 = "histogram_quantile(0.99, sum by (le) (rate(aiguard_gateway_upstream_response_seconds_bucket[1m])))";
    // A rate needs two scrapes in its window.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let data = prom.query(p99).await;
        if data["result"].as_array().map(Vec::len) == Some(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the latency histogram answers no percentile: {data}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Every rule of alerts.yml loaded, evaluated without error, and its expression runs as a
    // query. The gateway's rules see their series.
    let deadline = Instant::now() + Duration::from_secs(30);
    let rules = loop {
        let v = get(&format!("{}/api/v1/rules", prom.url)).await.json();
        let rules: Vec<Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        if !rules.is_empty() && rules.iter().all(|r| r["health"] == "ok") {
            break rules;
        }
        assert!(
            Instant::now() < deadline,
            "rules not all evaluated ok after 30 s: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let names: Vec<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();
    for wanted in [
        "AiguardDropSpike",
        "AiguardBanStorm",
        "AiguardTenantQuotaNearlySpent",
        "AiguardStoreErrors",
        "AiguardUpstreamErrors",
    ] {
        assert!(names.contains(&wanted), "{wanted} in {names:?}");
    }
    for r in &rules {
        let expr = r["query"].as_str().expect("a rule's query");
        prom.query(expr).await;
    }
    // The upstream-error share over admitted requests: 1 of 6 here.
    let share = prom
        .value(r#"sum(increase(aiguard_gateway_requests_total{outcome="upstream_error"}[5m])) / sum(increase(aiguard_gateway_requests_total{outcome=~"allowed|upstream_error"}[5m]))"#)
        .await
        .expect("the upstream error share");
    assert!((share - 1.0 / 6.0).abs() < 1e-6, "share {share}");

    drop(prom);
    m.stop().await;
    g.stop().await;
}

/// `GET /metrics` from inside `ns` (where the daemon's loopback address is), over plain
/// HTTP/1.1.
fn scrape_in(ns: &aiguard_tests::netns::Netns, addr: SocketAddr) -> String {
    use std::io::{Read as _, Write as _};
    ns.run(|| {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connecting to the metrics port {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("read timeout");
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: aiguard\r\nconnection: close\r\n\r\n")
            .expect("sending the scrape");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("reading the scrape");
        let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_owned()
    })
}

#[test]
fn the_daemon_exports_the_kernels_verdicts_and_bans() {
    use aiguard_tests::{
        daemon::Daemon,
        netns::{Netns, Reach, TcpService, VethPair, connect_from},
    };
    if !aiguard_tests::privileged() {
        return;
    }
    let server = Netns::new();
    let client = Netns::new();
    let veth = VethPair::new(&server, &["10.240.1.1/24"], &client, &["10.240.1.2/24"]);
    // The namespace's own loopback: the default port is free there.
    let metrics: SocketAddr = "127.0.0.1:9464".parse().expect("addr");
    let daemon = Daemon::start(
        &server,
        &[
            "-i",
            &veth.server_if,
            "--metrics-listen",
            &metrics.to_string(),
        ],
    );
    // After the daemon, which may first have to be built: the service's lifetime is bounded.
    let service: SocketAddr = "10.240.1.1:8000".parse().expect("addr");
    let _service = TcpService::start(&server, &[service], Duration::from_secs(90));
    let src = "10.240.1.2".parse().expect("addr");
    assert_eq!(
        connect_from(&client, src, service, Duration::from_secs(3)),
        Reach::Connected
    );
    daemon.cli_ok(&["ban", "10.240.1.0/24", "--reason", "metrics test"]);
    assert_eq!(
        connect_from(&client, src, service, Duration::from_millis(700)),
        Reach::TimedOut,
        "the ban drops the client's SYN"
    );

    let got = samples(&scrape_in(&server, metrics));
    let iface = &veth.server_if;
    let series = |verdict: &str, reason: &str| {
        format!(
            "aiguard_xdp_packets_total{{interface=\"{iface}\",reason=\"{reason}\",verdict=\"{verdict}\"}}"
        )
    };
    let status = daemon.cli_json(&["status", "--json"]);
    let dropped = got.get(&series("drop", "banned")).copied();
    assert!(dropped.is_some_and(|d| d >= 1.0), "{got:#?}");
    assert_eq!(
        dropped,
        status["totals"]["dropped_banned"].as_f64(),
        "the scrape and `aiguard status` read the same per-CPU counters"
    );
    assert!(
        got.get(&series("pass", "checked"))
            .is_some_and(|p| *p >= 1.0),
        "{got:#?}"
    );
    assert_eq!(got.get(&series("drop", "rate")), Some(&0.0), "{got:#?}");
    assert_eq!(
        got.get(&format!(
            "aiguard_xdp_shadow_matches_total{{interface=\"{iface}\"}}"
        )),
        Some(&0.0)
    );
    assert_eq!(got.get(r#"aiguard_bans_active{origin="cli"}"#), Some(&1.0));
    assert_eq!(
        got.get(r#"aiguard_bans_active{origin="detector"}"#),
        Some(&0.0)
    );
    assert!(
        got.get(r#"aiguard_xdp_ban_hits_total{range="10.240.1.0/24"}"#)
            .is_some_and(|h| *h >= 1.0),
        "{got:#?}"
    );
    assert_eq!(
        got.get(r#"aiguard_xdp_ban_hits_total{range="other"}"#),
        Some(&0.0)
    );
    // The embedded store: no shared-store series.
    assert!(
        !got.keys().any(|s| s.starts_with("aiguard_store_")),
        "{got:#?}"
    );
    assert!(
        daemon
            .log()
            .contains("metrics at http://127.0.0.1:9464/metrics"),
        "{}",
        daemon.log()
    );
}
