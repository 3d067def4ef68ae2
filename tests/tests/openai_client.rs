//! The official `openai` Python client (tests/python/test_openai_client.py) against the gateway
//! of the real daemon, in front of the fake upstream: what a customer's code does, including its
//! error classes and its retries on `Retry-After`.
//!
//! The daemon runs in the test process's own network namespace: the gateway listens on
//! loopback and attaches to no interface. The Python side runs in `target/pyenv`, which
//! `cargo xtask setup` creates.
use std::{
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use aiguard_tests::{
    daemon::{Daemon, output_within},
    privileged,
    upstream::{Upstream, UpstreamOptions},
};

/// The whole pytest run; the retry test alone waits ~3 s for a refill.
const PYTEST_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the gateway may take to show its bound address in `status`.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

const PYTEST_FILE: &str = "tests/python/test_openai_client.py";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_owned()
}

/// The tiers test_openai_client.py expects: `free` refuses the 3rd request of a minute,
/// `trickle` refills one request every 3 s, `paid` never gets in the way (and limits tokens
/// too, so that its answers carry the `x-ratelimit-*-tokens` headers).
fn config(upstream: &Upstream) -> String {
    format!(
        r#"
[gateway]
listen = ["127.0.0.1:0"]
upstreams = ["{}"]

[tiers.free]
requests_per_minute = 2

[tiers.paid]
requests_per_minute = 1000
tokens_per_minute = 1000000

[tiers.trickle]
requests_per_minute = 20
"#,
        upstream.url()
    )
}

/// A new key of `tier`, for a tenant of its own (so that no two keys share a tenant's limits).
fn add_key(daemon: &Daemon, tier: &str) -> String {
    let tenant = format!("openai-client-{tier}");
    let added = daemon.cli_json(&["keys", "add", "--tenant", &tenant, "--tier", tier, "--json"]);
    assert_eq!(added["tier"], tier, "`keys add` answered {added}");
    added["key"]
        .as_str()
        .unwrap_or_else(|| panic!("`keys add` printed no key: {added}"))
        .to_owned()
}

/// The gateway's first bound address, from `status --json`.
fn gateway_listen(daemon: &Daemon) -> String {
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    loop {
        let status = daemon.cli_json(&["status", "--json"]);
        if let Some(addr) = status["gateway"]["listen"][0].as_str() {
            return addr.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "`status --json` shows no gateway.listen address within {LISTEN_TIMEOUT:?}: {status}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn official_python_client_against_the_gateway() {
    if !privileged() {
        return;
    }
    let root = workspace_root();
    let python = root.join("target/pyenv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run `cargo xtask setup` (it creates the venv with the openai client)",
        python.display()
    );

    let upstream = Upstream::start(UpstreamOptions::default());
    let daemon = Daemon::start_host(Some(&config(&upstream)), &[]);
    let keys = [
        ("AIGUARD_PAID_KEY", add_key(&daemon, "paid")),
        ("AIGUARD_FREE_KEY", add_key(&daemon, "free")),
        ("AIGUARD_TRICKLE_KEY", add_key(&daemon, "trickle")),
    ];
    let listen = gateway_listen(&daemon);

    let mut pytest = Command::new(&python);
    pytest
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", PYTEST_FILE])
        .current_dir(&root)
        .env("AIGUARD_BASE_URL", format!("http://{listen}/v1"))
        // Nothing written into the source tree.
        .env("PYTHONDONTWRITEBYTECODE", "1");
    for (var, key) in &keys {
        pytest.env(var, key);
    }
    let out = output_within(pytest, PYTEST_TIMEOUT);
    assert!(
        out.status.success(),
        "pytest {PYTEST_FILE} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The customer's key is the gateway's business: none reaches the upstream.
    let forwarded = upstream.requests();
    assert!(!forwarded.is_empty(), "the upstream saw no request");
    for request in &forwarded {
        for (name, value) in &request.headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            for (var, key) in &keys {
                assert!(
                    !value.contains(key.as_str()),
                    "{var} reached the upstream in {name}: {} {}",
                    request.method,
                    request.path
                );
            }
        }
    }
}
