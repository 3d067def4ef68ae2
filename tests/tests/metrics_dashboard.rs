//! The shipped Grafana dashboard (`deploy/grafana/dashboards/aiguard.json`) and alert rules
//! (`deploy/prometheus/alerts.yml`) against a real Prometheus scraping real daemons while
//! traffic flows: packets through XDP on a veth (from an allowed and a banned source) and
//! requests through the gateway (allowed, rate limited, unauthorized). Every query of every
//! panel must parse and return data; every alert expression must parse and stay quiet.
//!
//! Two daemons run in the server namespace, because the quota gauges and the store's health
//! never come from the same daemon: one protects the veth and serves a gateway with the
//! embedded store (per-tenant quota gauges), the other a gateway with a shared store (Redis, on
//! the namespace's loopback: the `aiguard_store_*` families). Prometheus runs in that namespace
//! too (it scrapes their loopback ports), and the test asks its HTTP API from there.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use aiguard_tests::{
    daemon::Daemon,
    netns::{Netns, Reach, TcpService, VethPair, connect_from},
    privileged,
    redis::{RedisServer, redis_available},
    upstream::{Upstream, UpstreamOptions, headers as up},
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::Value;

const SERVER_ADDR: &str = "10.244.1.1";
const ALLOWED_SRC: &str = "10.244.1.2";
const BANNED_SRC: &str = "10.244.1.3";
/// A TCP service behind XDP, for the packet traffic.
const SERVICE_PORT: u16 = 8000;
/// The XDP daemon's gateway, on the veth: its requests cross XDP too.
const GATEWAY_PORT: u16 = 8080;
/// How long traffic flows: several scrapes (1 s apart) see it.
const TRAFFIC_FOR: Duration = Duration::from_secs(10);
/// Long enough for the whole test; the service stops by itself after it.
const SERVICE_LIFETIME: Duration = Duration::from_secs(180);
/// How long a query that returned nothing is asked again (scrapes are 1 s apart).
const DATA_WAIT: Duration = Duration::from_secs(20);

/// What the dashboard's variables stand for in the test's queries: Grafana's built-in
/// intervals with a 1 s scrape interval, and the dashboard's own variables at their `All`.
const BUILTINS: &[(&str, &str)] = &[
    ("__rate_interval", "30s"),
    ("__interval", "5s"),
    ("interval", "5s"),
    ("__range", "5m"),
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_owned()
}

/// The Debian `prometheus` binary, if installed. Under `CI=true` its absence fails the test;
/// elsewhere the test says loudly that it did not run.
fn prometheus_binary() -> Option<PathBuf> {
    let path = PathBuf::from("/usr/bin/prometheus");
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

/// One request on its own connection, made from inside `ns`; returns the status and body.
/// HTTP/1.0, so that the answer is never chunked: its body is what follows the head.
fn http_in(ns: &Netns, addr: SocketAddr, request: &[u8]) -> (u16, String) {
    ns.run(|| {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("read timeout");
        s.write_all(request)
            .unwrap_or_else(|e| panic!("writing to {addr}: {e}"));
        let mut answer = Vec::new();
        s.read_to_end(&mut answer)
            .unwrap_or_else(|e| panic!("reading from {addr}: {e}"));
        let answer = String::from_utf8_lossy(&answer).into_owned();
        let status = answer
            .get(9..12)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP answer from {addr}: {answer:?}"));
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    })
}

fn get_in(ns: &Netns, addr: SocketAddr, path: &str) -> (u16, String) {
    http_in(
        ns,
        addr,
        format!("GET {path} HTTP/1.0\r\nhost: {addr}\r\n\r\n").as_bytes(),
    )
}

/// A chat completion through the gateway at `addr` with `key`, from inside `ns`.
fn chat_in(ns: &Netns, addr: SocketAddr, key: &str) -> u16 {
    let body =
        r#"{"model":"gpt-test","messages":[{"role":"user","content":"hi"}],"max_tokens":16}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nhost: gw\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}: 10\r\n{}: 5\r\n\r\n{body}",
        body.len(),
        up::PROMPT_TOKENS,
        up::COMPLETION_WORDS,
    );
    http_in(ns, addr, request.as_bytes()).0
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

/// A real Prometheus inside a namespace, on that namespace's loopback, with its own data
/// directory; stopped by its PID.
struct Prometheus<'a> {
    ns: &'a Netns,
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl<'a> Prometheus<'a> {
    fn start(binary: &Path, ns: &'a Netns, targets: &[SocketAddr]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let rules = workspace_root().join("deploy/prometheus/alerts.yml");
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: aiguard\n    static_configs:\n      - targets: [{}]\n",
            rules.display(),
            targets.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write the config");
        // A free port of the namespace's loopback: bound and released (Prometheus takes no
        // already-bound socket).
        let addr = ns.run(|| {
            TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
        });
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let mut net = std::ffi::OsString::from("--net=");
        net.push(ns.path());
        // nsenter execs Prometheus: the child's PID is Prometheus'.
        let child = Command::new("nsenter")
            .arg(net)
            .arg(binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        let mut prom = Self {
            ns,
            child,
            addr,
            dir,
        };
        prom.wait_ready();
        prom
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited with {status}:\n{}", self.log());
            }
            let ready = self
                .ns
                .run(|| TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok())
                && get_in(self.ns, self.addr, "/-/ready").0 == 200;
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready after 60 s:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// The API's whole answer to `GET path`.
    fn api(&self, path: &str) -> Value {
        let (status, body) = get_in(self.ns, self.addr, path);
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {path}: {status}, not JSON ({e}): {body}"))
    }

    /// An instant query's whole answer (`status` is "success" when the expression parsed and
    /// ran).
    fn query(&self, expr: &str) -> Value {
        self.api(&format!("/api/v1/query?query={}", form_encode(expr)))
    }

    /// The series (or the scalar) an accepted query returned; panics naming `what` otherwise.
    fn result(&self, what: &str, expr: &str) -> Vec<Value> {
        let v = self.query(expr);
        assert_eq!(v["status"], "success", "{what}: `{expr}` failed: {v}");
        match &v["data"]["result"] {
            Value::Array(series) => series.clone(),
            scalar => vec![scalar.clone()],
        }
    }
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One query of the dashboard: where it is, and the expression as Grafana would send it.
#[derive(Debug)]
struct PanelQuery {
    panel: String,
    ref_id: String,
    expr: String,
}

/// `$name` and `${name}` (also `${name:format}`) replaced by `value`.
fn substitute(expr: &str, name: &str, value: &str) -> String {
    let mut out = expr.replace(&format!("${{{name}}}"), value);
    for format in [":regex", ":pipe", ":raw"] {
        out = out.replace(&format!("${{{name}{format}}}"), value);
    }
    // `$name` not followed by a character of a longer name.
    let needle = format!("${name}");
    let mut result = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(i) = rest.find(&needle) {
        let after = &rest[i + needle.len()..];
        let longer = after
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        result.push_str(&rest[..i]);
        result.push_str(if longer { &needle } else { value });
        rest = after;
    }
    result.push_str(rest);
    result
}

/// Every panel's every target, rows' nested panels included. Panics naming a panel or target
/// that does not use the `datasource` variable.
fn panel_queries(dashboard: &Value) -> Vec<PanelQuery> {
    fn walk(panels: &Value, out: &mut Vec<PanelQuery>) {
        for p in panels.as_array().into_iter().flatten() {
            walk(&p["panels"], out);
            if p["type"] == "row" {
                continue;
            }
            let title = p["title"].as_str().unwrap_or("(untitled)").to_owned();
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "panel {title:?} must use the datasource variable"
            );
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            assert!(!targets.is_empty(), "panel {title:?} has no query");
            for t in targets {
                let ref_id = t["refId"].as_str().unwrap_or("?").to_owned();
                assert_eq!(
                    t["datasource"]["uid"], "${datasource}",
                    "panel {title:?} target {ref_id} must use the datasource variable"
                );
                let expr = t["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("panel {title:?} target {ref_id} has no expr"))
                    .to_owned();
                out.push(PanelQuery {
                    panel: title.clone(),
                    ref_id,
                    expr,
                });
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The dashboard's variables with the value the test gives each: a query variable's `All`
/// value; Grafana's built-in intervals.
fn variables(dashboard: &Value) -> Vec<(String, String)> {
    let list = dashboard["templating"]["list"]
        .as_array()
        .expect("the dashboard has template variables");
    let ds = list
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a `datasource` variable");
    assert_eq!(ds["type"], "datasource", "{ds}");
    assert_eq!(ds["query"], "prometheus", "{ds}");
    let mut vars: Vec<(String, String)> = BUILTINS
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect();
    for v in list.iter().filter(|v| v["type"] == "query") {
        let name = v["name"].as_str().expect("a variable's name");
        assert_eq!(
            v["datasource"]["uid"], "${datasource}",
            "variable {name} must use the datasource variable"
        );
        let all = v["allValue"]
            .as_str()
            .unwrap_or_else(|| panic!("variable {name}: an allValue for its `All`"));
        vars.push((name.to_owned(), all.to_owned()));
    }
    // Longest first, so that `$__rate_interval` is never read as `$__r...`.
    vars.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));
    vars
}

/// `label_values(metric, label)` of each query variable, as a PromQL query of the same
/// series.
fn variable_queries(dashboard: &Value) -> Vec<(String, String)> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let name = v["name"].as_str().expect("name").to_owned();
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap_or_else(|| panic!("variable {name} has no query"));
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .unwrap_or_else(|| panic!("variable {name}: label_values(metric, label): {q}"));
            let (metric, label) = inner
                .rsplit_once(',')
                .unwrap_or_else(|| panic!("variable {name}: {q}"));
            (
                name,
                format!("count by ({}) ({})", label.trim(), metric.trim()),
            )
        })
        .collect()
}

fn add_key(d: &Daemon, tenant: &str, tier: &str) -> String {
    let v = d.cli_json(&["keys", "add", "--tenant", tenant, "--tier", tier, "--json"]);
    v["key"].as_str().expect("a key's secret").to_owned()
}

fn gateway_addr(d: &Daemon) -> SocketAddr {
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

#[test]
fn every_dashboard_query_and_alert_runs_against_a_real_prometheus() {
    if !privileged() || !redis_available() {
        return;
    }
    let Some(binary) = prometheus_binary() else {
        return;
    };
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("deploy/grafana/dashboards/aiguard.json"))
            .expect("reading the dashboard"),
    )
    .expect("the dashboard is JSON");
    let queries = panel_queries(&dashboard);
    let vars = variables(&dashboard);
    let alerts_file =
        std::fs::read_to_string(workspace_root().join("deploy/prometheus/alerts.yml"))
            .expect("reading alerts.yml");
    let alert_count = alerts_file
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();

    let server = Netns::new();
    let client = Netns::new();
    let veth = VethPair::new(
        &server,
        &[&format!("{SERVER_ADDR}/24")],
        &client,
        &[&format!("{ALLOWED_SRC}/24"), &format!("{BANNED_SRC}/24")],
    );
    // Redis and the fake upstream on the server namespace's loopback, where the daemons run.
    let redis = server.run(RedisServer::start);
    let upstream = server.run(|| Upstream::start(UpstreamOptions::default()));

    let nic_metrics: SocketAddr = "127.0.0.1:9464".parse().expect("addr");
    let store_metrics: SocketAddr = "127.0.0.1:9465".parse().expect("addr");
    let gateway: SocketAddr = format!("{SERVER_ADDR}:{GATEWAY_PORT}")
        .parse()
        .expect("addr");
    let nic = Daemon::start_with_config(
        &server,
        &format!(
            "[gateway]\nlisten = [\"{gateway}\"]\nupstreams = [\"{}\"]\ndefault_tier = \"free\"\n\
             upstream_slots = 64\n\
             [tiers.free]\n[tiers.free.per_key]\nrequests_per_minute = 2\n\
             [tiers.paid]\nmonthly_tokens = 100000\nweight = 10\n\
             [[detect.prompt_rules]]\nname = \"override\"\nphrases = [\"ignore previous instructions\"]\n",
            upstream.url()
        ),
        &[
            "-i",
            &veth.server_if,
            "--metrics-listen",
            &nic_metrics.to_string(),
        ],
    );
    let shared = Daemon::start_with_config(
        &server,
        &format!(
            "[gateway]\nlisten = [\"127.0.0.1:0\"]\nupstreams = [\"{}\"]\ndefault_tier = \"free\"\n\
             [store]\nbackend = \"redis\"\nurls = [\"{}\"]\nnode_name = \"dashboard-b\"\n\
             [tiers.free]\n",
            upstream.url(),
            redis.url()
        ),
        &["--metrics-listen", &store_metrics.to_string()],
    );
    let shared_gateway = gateway_addr(&shared);
    // After the daemons (whose first start may build the binary): bounded lifetime.
    let service: SocketAddr = format!("{SERVER_ADDR}:{SERVICE_PORT}")
        .parse()
        .expect("addr");
    let _service = TcpService::start(&server, &[service], SERVICE_LIFETIME);
    let allowed: IpAddr = ALLOWED_SRC.parse().expect("addr");
    let banned: IpAddr = BANNED_SRC.parse().expect("addr");
    nic.cli_ok(&[
        "ban",
        &format!("{BANNED_SRC}/32"),
        "--reason",
        "dashboard test",
    ]);
    let paid = add_key(&nic, "acme", "paid");
    let free = add_key(&nic, "beta", "free");
    let shared_key = add_key(&shared, "gamma", "free");

    let prom = Prometheus::start(&binary, &server, &[nic_metrics, store_metrics]);
    // Traffic starts after a first scrape of both, so that rates see it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while prom.result("scrape", r#"up{job="aiguard"} == 1"#).len() != 2 {
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped both daemons: {}\n{}",
            prom.api("/api/v1/targets"),
            prom.log()
        );
        thread::sleep(Duration::from_millis(250));
    }

    let (mut ok, mut limited, mut unauthorized) = (0, 0, 0);
    let until = Instant::now() + TRAFFIC_FOR;
    while Instant::now() < until {
        assert_eq!(
            connect_from(&client, allowed, service, Duration::from_secs(2)),
            Reach::Connected,
            "an allowed source reaches the service through XDP"
        );
        assert_eq!(
            connect_from(&client, banned, service, Duration::from_millis(150)),
            Reach::TimedOut,
            "the ban drops the banned source's SYN"
        );
        assert_eq!(chat_in(&client, gateway, &paid), 200, "paid key");
        match chat_in(&client, gateway, &free) {
            200 => ok += 1,
            429 => limited += 1,
            s => panic!("free key: {s}"),
        }
        if chat_in(&client, gateway, "sk-not-a-key") == 401 {
            unauthorized += 1;
        }
        assert_eq!(
            chat_in(&server, shared_gateway, &shared_key),
            200,
            "the shared-store gateway"
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        ok >= 1 && limited >= 1,
        "free: {ok} allowed, {limited} limited"
    );
    assert!(unauthorized >= 1, "no 401 for an unknown key");

    // Every query of the dashboard, as Grafana would send it, parses and returns data.
    let mut empty = Vec::new();
    for q in &queries {
        let mut expr = q.expr.clone();
        for (name, value) in &vars {
            expr = substitute(&expr, name, value);
        }
        let what = format!("panel {:?} target {}", q.panel, q.ref_id);
        assert!(!expr.contains('$'), "{what}: a variable left in `{expr}`");
        // A rate needs two scrapes in its window: asked again for a while.
        let deadline = Instant::now() + DATA_WAIT;
        while prom.result(&what, &expr).is_empty() {
            if Instant::now() >= deadline {
                empty.push(format!("{what}: `{expr}`"));
                break;
            }
            thread::sleep(Duration::from_millis(500));
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data:\n{}\n{}",
        empty.join("\n"),
        prom.log()
    );
    for (name, expr) in variable_queries(&dashboard) {
        assert!(
            !prom.result(&format!("variable {name}"), &expr).is_empty(),
            "variable {name}: `{expr}` has no values"
        );
    }

    // Every alert rule loaded and evaluated; each expression parses and is quiet.
    let deadline = Instant::now() + Duration::from_secs(30);
    let rules = loop {
        let v = prom.api("/api/v1/rules");
        let rules: Vec<Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        if rules.len() == alert_count && rules.iter().all(|r| r["health"] == "ok") {
            break rules;
        }
        assert!(
            Instant::now() < deadline,
            "{alert_count} rules of alerts.yml not all loaded and evaluated ok: {v:#}"
        );
        thread::sleep(Duration::from_millis(250));
    };
    for r in &rules {
        let name = r["name"].as_str().unwrap_or("(unnamed)");
        let expr = r["query"].as_str().expect("a rule's query");
        let firing = prom.result(&format!("alert {name}"), expr);
        assert!(
            firing.is_empty(),
            "alert {name} is not quiet under normal traffic: `{expr}` gave {firing:?}"
        );
    }
    eprintln!(
        "{} dashboard queries returned data; {} alert expressions parsed and were quiet",
        queries.len(),
        rules.len()
    );
    drop(prom);
}

#[test]
fn variables_are_substituted_whole() {
    assert_eq!(
        substitute(
            "rate(x[$__rate_interval]) $__range",
            "__rate_interval",
            "30s"
        ),
        "rate(x[30s]) $__range"
    );
    assert_eq!(
        substitute("x{t=~\"$tier\"} ${tier} ${tier:regex}", "tier", ".*"),
        "x{t=~\".*\"} .* .*"
    );
    assert_eq!(substitute("$tiers", "tier", ".*"), "$tiers");
}
