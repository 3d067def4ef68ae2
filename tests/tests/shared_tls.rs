//! The shared store over TLS (`rediss://`) against a real `redis-server` that speaks TLS only,
//! with a private CA made by the `openssl` CLI: trusted through `store.tls_ca`, Redis decides
//! (and a limit holds exactly); not trusted (no `tls_ca`, or another CA), the store is down with
//! an error that says so, and the tier's failure mode applies; with `tls-auth-clients yes`, this
//! node's certificate (`tls_cert`, `tls_key`) gets it in, and its absence is told. A TLS Redis
//! Cluster is reached through its seeds the same way. In this process over loopback: no
//! privilege.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use aiguard_tests::{
    gateway::{TestGateway, chat_request, client, send},
    redis::{Issued, RedisCluster, RedisServer, TestCa, tls_available},
    upstream::{Upstream, UpstreamOptions},
};
use serde_json::json;

/// What a node's `[store]` says about TLS.
#[derive(Default)]
struct Tls<'a> {
    ca: Option<&'a Path>,
    client: Option<&'a Issued>,
}

fn config(upstream: &Upstream, urls: &[String], tls: &Tls, tiers: &str) -> String {
    let urls: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    let path = |p: &Path| format!("{:?}", p.display().to_string());
    let mut store = String::new();
    if let Some(ca) = tls.ca {
        store += &format!("tls_ca = {}\n", path(ca));
    }
    if let Some(client) = tls.client {
        store += &format!(
            "tls_cert = {}\ntls_key = {}\n",
            path(&client.cert),
            path(&client.key)
        );
    }
    // Decisions wait long enough for Redis however loaded the machine is: every one is
    // Redis's, or none is (when the store is down, nothing waits).
    format!(
        "[gateway]\nlisten = [\"127.0.0.1:0\"]\nupstreams = [\"{}\"]\ndefault_tier = \"free\"\n\
         [store]\nbackend = \"redis\"\nurls = [{}]\nnode_name = \"node-tls\"\nprefix = \"test:\"\n\
         decision_timeout = \"3s\"\nretry_interval = \"100ms\"\nconnect_timeout = \"2s\"\n{store}{tiers}",
        upstream.url(),
        urls.join(", ")
    )
}

/// N requests a minute per key, decided by Redis or refused while it cannot decide.
const LIMITED: &str = "[tiers.free]\non_store_failure = \"fail_closed\"\n[tiers.free.per_key]\nrequests_per_minute = 5\n";
const LIMIT: usize = 5;

fn hello() -> serde_json::Value {
    json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16})
}

/// Sends `n` requests with `key`, one after the other; returns their statuses.
async fn statuses(g: &TestGateway, key: &str, n: usize) -> Vec<u16> {
    let c = client();
    let mut out = Vec::new();
    for _ in 0..n {
        let a = send(
            &c,
            chat_request(&g.url("/v1/chat/completions"), key, &hello(), &[]),
        )
        .await;
        out.push(a.status);
    }
    out
}

/// Redis decided every request of `g`: the store is up, nothing fell back, nothing failed.
fn assert_redis_decided(g: &TestGateway) {
    let status = g.shared.as_ref().expect("shared store").status();
    assert!(status.up, "{status:?}");
    assert_eq!(
        status.fallbacks, 0,
        "every decision was Redis's: {status:?}"
    );
    assert_eq!(status.errors, 0, "{status:?}");
    assert_eq!(status.outages, 0, "{status:?}");
    assert_eq!(status.last_error, None, "{status:?}");
}

/// `g` started with the store down for `why` (the status's last error says it), and its
/// tier's `fail_closed` answers 503 with Retry-After meanwhile.
async fn assert_down_because(g: &TestGateway, key: &str, why: &str) {
    let shared = g.shared.as_ref().expect("shared store");
    let status = shared.status();
    assert!(!status.up, "{status:?}");
    assert_eq!(status.outages, 1, "{status:?}");
    let last = status.last_error.clone().unwrap_or_default();
    assert!(
        last.contains(why),
        "the last error says {why:?}: {status:?}"
    );
    let c = client();
    let a = send(
        &c,
        chat_request(&g.url("/v1/chat/completions"), key, &hello(), &[]),
    )
    .await;
    assert_eq!(a.status, 503, "fail_closed: {}", a.text());
    assert!(a.header("retry-after").is_some());
    assert!(shared.status().fallbacks >= 1, "{:?}", shared.status());
    // The probes that follow (every retry_interval) meet the same refusal, and say so.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let status = shared.status();
    assert!(!status.up, "{status:?}");
    assert_eq!(status.recoveries, 0, "{status:?}");
    let last = status.last_error.clone().unwrap_or_default();
    assert!(last.contains(why), "after probes too: {status:?}");
}

fn assert_exact(statuses: &[u16], admitted: usize) {
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(ok, admitted, "{statuses:?}");
    assert_eq!(refused, statuses.len() - admitted, "{statuses:?}");
    // The first N pass, then every one is refused.
    assert!(
        statuses[..admitted].iter().all(|s| *s == 200),
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_private_ca_in_tls_ca_lets_redis_over_tls_decide_and_a_limit_holds_exactly() {
    if !tls_available() {
        return;
    }
    let ca = TestCa::create("aiguard test CA");
    let server = ca.issue_server("redis");
    let mut redis = RedisServer::start_tls(ca.server_tls(&server, false));
    assert!(redis.url().starts_with("rediss://127.0.0.1:"));
    let upstream = Upstream::start(UpstreamOptions::default());
    let tls = Tls {
        ca: Some(ca.cert()),
        ..Tls::default()
    };
    let g = TestGateway::start(&config(&upstream, &[redis.url()], &tls, LIMITED)).await;
    let key = g.add_key("acme", "free");

    let got = statuses(&g, &key, LIMIT + 4).await;
    assert_exact(&got, LIMIT);
    assert_redis_decided(&g);
    assert_eq!(g.shared.as_ref().expect("shared").status().backend, "redis");
    // The state is in Redis (read over TLS), not in this node's memory.
    let keys = redis.cli(&["--scan", "--pattern", "test:{acme}:*"]);
    assert!(!keys.trim().is_empty(), "Redis holds the tenant's buckets");

    // A Redis restart (it persists nothing: the buckets start full again): the node
    // reconnects over TLS with the same files and Redis decides again.
    redis.restart();
    let shared = g.shared.clone().expect("shared");
    let other = g.add_key("beta", "free");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = statuses(&g, &other, 1).await;
        if got == [200] && shared.status().up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no decision by Redis within 10 s of its restart: {got:?} {:?}",
            shared.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let keys = redis.cli(&["--scan", "--pattern", "test:{beta}:*"]);
    assert!(
        !keys.trim().is_empty(),
        "Redis holds the new tenant's buckets"
    );
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_untrusted_certificate_is_reported_and_the_tier_fails_as_configured() {
    if !tls_available() {
        return;
    }
    let ca = TestCa::create("aiguard test CA");
    let server = ca.issue_server("redis");
    let redis = RedisServer::start_tls(ca.server_tls(&server, false));
    let upstream = Upstream::start(UpstreamOptions::default());

    // No tls_ca: the system's roots, which do not hold the test CA.
    let g = TestGateway::start(&config(&upstream, &[redis.url()], &Tls::default(), LIMITED)).await;
    let key = g.add_key("acme", "free");
    assert_down_because(&g, &key, "certificate is not trusted").await;
    let last = g.shared.as_ref().expect("shared").status().last_error;
    assert!(
        last.as_deref().is_some_and(|e| e.contains("store.tls_ca")),
        "the error names the setting that fixes it: {last:?}"
    );
    g.stop().await;

    // Another CA in tls_ca: not the one that signed the server's certificate.
    let other = TestCa::create("another CA");
    let tls = Tls {
        ca: Some(other.cert()),
        ..Tls::default()
    };
    let g = TestGateway::start(&config(&upstream, &[redis.url()], &tls, LIMITED)).await;
    let key = g.add_key("acme", "free");
    assert_down_because(&g, &key, "certificate is not trusted").await;
    g.stop().await;

    // The right CA, but a host the certificate is not for (it names 127.0.0.1 only).
    let tls = Tls {
        ca: Some(ca.cert()),
        ..Tls::default()
    };
    let by_name = redis.url().replace("127.0.0.1", "localhost");
    let g = TestGateway::start(&config(&upstream, &[by_name], &tls, LIMITED)).await;
    let key = g.add_key("acme", "free");
    assert_down_because(&g, &key, "not valid for the host").await;
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_gets_in_with_the_nodes_certificate_and_its_absence_is_told() {
    if !tls_available() {
        return;
    }
    let ca = TestCa::create("aiguard test CA");
    let server = ca.issue_server("redis");
    let node = ca.issue_client("node-tls");
    let redis = RedisServer::start_tls(ca.server_tls(&server, true));
    let upstream = Upstream::start(UpstreamOptions::default());

    let tls = Tls {
        ca: Some(ca.cert()),
        client: Some(&node),
    };
    let g = TestGateway::start(&config(&upstream, &[redis.url()], &tls, LIMITED)).await;
    let key = g.add_key("acme", "free");
    let got = statuses(&g, &key, LIMIT + 3).await;
    assert_exact(&got, LIMIT);
    assert_redis_decided(&g);
    g.stop().await;

    // Without a client certificate, Redis refuses the node.
    let tls = Tls {
        ca: Some(ca.cert()),
        ..Tls::default()
    };
    let g = TestGateway::start(&config(&upstream, &[redis.url()], &tls, LIMITED)).await;
    let key = g.add_key("acme", "free");
    assert_down_because(&g, &key, "requires a client certificate").await;
    g.stop().await;

    // A client certificate of a CA Redis does not trust: refused, and said so.
    let stranger_ca = TestCa::create("a CA Redis does not trust");
    let stranger = stranger_ca.issue_client("node-tls");
    let tls = Tls {
        ca: Some(ca.cert()),
        client: Some(&stranger),
    };
    let g = TestGateway::start(&config(&upstream, &[redis.url()], &tls, LIMITED)).await;
    let key = g.add_key("acme", "free");
    assert_down_because(&g, &key, "refused this node's client certificate").await;
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tls_cluster_is_reached_through_its_seeds_with_the_private_ca() {
    if !tls_available() {
        return;
    }
    let ca = TestCa::create("aiguard test CA");
    let server = ca.issue_server("redis-cluster");
    let node = ca.issue_client("node-tls");
    // Mutual TLS too: every node the seeds lead to gets this node's certificate.
    let cluster = RedisCluster::start_tls(3, ca.server_tls(&server, true));
    let urls = cluster.urls();
    assert!(urls.iter().all(|u| u.starts_with("rediss://")), "{urls:?}");
    let upstream = Upstream::start(UpstreamOptions::default());
    let tls = Tls {
        ca: Some(ca.cert()),
        client: Some(&node),
    };
    // One seed is enough to find the others (and their TLS ports).
    let g = TestGateway::start(
        &config(&upstream, &urls[..1], &tls, LIMITED)
            .replace("[store]\n", "[store]\ncluster = true\n"),
    )
    .await;
    assert_eq!(
        g.shared.as_ref().expect("shared").status().backend,
        "redis-cluster"
    );
    // Tenants whose hash tags fall on every node's slots.
    let tenants = ["acme", "beta", "gamma", "delta", "omega", "zeta"];
    for tenant in tenants {
        let key = g.add_key(tenant, "free");
        let got = statuses(&g, &key, LIMIT + 2).await;
        assert_exact(&got, LIMIT);
    }
    assert_redis_decided(&g);
    for (i, n) in cluster.nodes().iter().enumerate() {
        let keys: u64 = n.cli(&["DBSIZE"]).trim().parse().expect("DBSIZE");
        assert!(
            keys > 0,
            "node {i} holds some tenant's state (reached over TLS)"
        );
    }
    g.stop().await;
}
