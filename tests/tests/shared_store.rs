//! The shared store against a real `redis-server` (and a real Redis Cluster): several gateways
//! (each with its own embedded store, as on separate nodes) share one set of limits and
//! quotas; when Redis is slow or gone each tier behaves as configured, and the usage counted
//! meanwhile is written back when it returns. In this process over loopback: no privilege.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use aiguard_daemon::usage::Today;
use aiguard_tests::{
    gateway::{Answer, TestGateway, chat_request, client, send},
    redis::{RedisCluster, RedisServer, redis_available},
    upstream::{Upstream, UpstreamOptions, headers as up},
};
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::json;

fn config(upstream: &Upstream, urls: &[String], node: &str, extra: &str) -> String {
    let urls: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    format!(
        "[gateway]\nlisten = [\"127.0.0.1:0\"]\nupstreams = [\"{}\"]\ndefault_tier = \"free\"\n\
         [store]\nbackend = \"redis\"\nurls = [{}]\nnode_name = \"{node}\"\nprefix = \"test:\"\n\
         decision_timeout = \"100ms\"\nretry_interval = \"100ms\"\nconnect_timeout = \"1s\"\n{extra}",
        upstream.url(),
        urls.join(", ")
    )
}

fn hello(max_tokens: u64) -> serde_json::Value {
    json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens})
}

/// Starts `n` gateways on one Redis, sharing the first one's keys.
async fn gateways(n: usize, make: impl Fn(&str) -> String) -> Vec<TestGateway> {
    let mut out: Vec<TestGateway> = Vec::new();
    for i in 0..n {
        let g = TestGateway::start(&make(&format!("node-{i}"))).await;
        out.push(g);
    }
    out
}

/// Fires one request per entry of `targets` at once and returns the answers.
async fn burst(targets: Vec<Request<Full<Bytes>>>) -> Vec<Answer> {
    let n = targets.len();
    let client = client();
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for req in targets {
        let (client, barrier) = (client.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            send(&client, req).await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("client task"));
    }
    out
}

fn count(answers: &[Answer], status: u16) -> usize {
    answers.iter().filter(|a| a.status == status).count()
}

fn need_redis() -> bool {
    redis_available()
}

/// 3 gateways × 32 concurrent clients on one key limited to 12/minute: exactly 12 pass.
async fn one_request_limit_across_three(urls: Vec<String>) {
    let upstream = Upstream::start(UpstreamOptions::default());
    let gws = gateways(3, |node| {
        config(
            &upstream,
            &urls,
            node,
            "[tiers.free]\n[tiers.free.per_key]\nrequests_per_minute = 12\n",
        )
    })
    .await;
    let key = gws[0].add_key("acme", "free");
    for g in &gws[1..] {
        g.import_keys(&gws[0]);
    }
    let mut reqs = Vec::new();
    for i in 0..96 {
        let url = gws[i % 3].url("/v1/chat/completions");
        reqs.push(chat_request(&url, &key, &hello(16), &[]));
    }
    let started = Instant::now();
    let answers = burst(reqs).await;
    // One request refills every 5 s: the burst must fit inside one interval to be exact.
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        count(&answers, 200),
        12,
        "statuses: {:?}",
        statuses(&answers)
    );
    assert_eq!(count(&answers, 429), 84);
    let refused = answers.iter().find(|a| a.status == 429).expect("a 429");
    assert_eq!(refused.json()["error"]["code"], "rate_limit_exceeded");
    assert!(refused.header("retry-after").is_some());
    assert_eq!(refused.header("x-ratelimit-limit-requests"), Some("12"));
    assert_eq!(refused.header("x-ratelimit-remaining-requests"), Some("0"));
    let ok = answers.iter().find(|a| a.status == 200).expect("a 200");
    assert_eq!(ok.header("x-ratelimit-limit-requests"), Some("12"));
    for g in gws {
        g.stop().await;
    }
}

fn statuses(answers: &[Answer]) -> Vec<u16> {
    answers.iter().map(|a| a.status).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gateways_share_one_request_limit() {
    if !need_redis() {
        return;
    }
    let redis = RedisServer::start();
    one_request_limit_across_three(vec![redis.url()]).await;
    // Every key Redis holds expires: nothing grows without bound.
    let keys = redis.cli(&["--scan", "--pattern", "test:*"]);
    for k in keys.lines().filter(|k| !k.is_empty()) {
        let ttl: i64 = redis.cli(&["PTTL", k]).trim().parse().expect("PTTL");
        assert!(ttl > 0, "{k} has no expiry ({ttl})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gateways_share_one_request_limit_on_a_redis_cluster() {
    if !need_redis() {
        return;
    }
    let cluster = RedisCluster::start(3);
    one_request_limit_across_three(cluster.urls()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gateways_never_over_admit_a_monthly_quota_or_the_concurrency_cap() {
    if !need_redis() {
        return;
    }
    let redis = RedisServer::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    // Each request reserves 8 (prompt) + 92 = 100 tokens; the quota holds 10 of them.
    let gws = gateways(3, |node| {
        config(
            &upstream,
            &[redis.url()],
            node,
            "[tiers.free]\nmonthly_tokens = 1000\n[tiers.capped]\nmax_concurrent = 4\n",
        )
    })
    .await;
    let key = gws[0].add_key("acme", "free");
    let capped = gws[0].add_key("beta", "capped");
    for g in &gws[1..] {
        g.import_keys(&gws[0]);
    }
    // The upstream holds every response, so all reservations overlap.
    let slow = [(up::DELAY_MS, "400")];
    let reqs = (0..60)
        .map(|i| {
            chat_request(
                &gws[i % 3].url("/v1/chat/completions"),
                &key,
                &hello(92),
                &slow,
            )
        })
        .collect();
    let answers = burst(reqs).await;
    assert_eq!(count(&answers, 200), 10, "{:?}", statuses(&answers));
    let over = answers.iter().find(|a| a.status == 429).expect("a 429");
    assert_eq!(over.json()["error"]["code"], "insufficient_quota");

    // Settled: the counter holds what the responses really used, as the three nodes'
    // ledgers recorded it, and no longer the reservations.
    let shared = gws[0].shared.clone().expect("shared");
    let today = Today::now();
    let want: u64 = gws.iter().map(|g| ledger_total(g, "acme")).sum();
    assert!(want > 0 && want < 1000, "{want}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let used = shared.month_used("acme", &today).await.expect("month");
        if used == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "month counter {used}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let reqs = (0..30)
        .map(|i| {
            chat_request(
                &gws[i % 3].url("/v1/chat/completions"),
                &capped,
                &hello(16),
                &slow,
            )
        })
        .collect();
    let answers = burst(reqs).await;
    assert_eq!(count(&answers, 200), 4, "{:?}", statuses(&answers));
    // The leases were given back: the next four pass again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reqs = (0..4)
        .map(|i| {
            chat_request(
                &gws[i % 3].url("/v1/chat/completions"),
                &capped,
                &hello(16),
                &[],
            )
        })
        .collect();
    assert_eq!(count(&burst(reqs).await, 200), 4);
    for g in gws {
        g.stop().await;
    }
}

/// What the node's own ledger says a tenant used this month (every request it served).
fn ledger_total(g: &TestGateway, tenant: &str) -> u64 {
    g.gw.ledger.flush().expect("flush");
    g.gw.ledger
        .monthly_totals(&Today::now().month())
        .expect("totals")
        .get(tenant)
        .copied()
        .unwrap_or(0)
}

async fn wait_until(what: &str, timeout: Duration, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_redis_hangs_or_restarts_each_tier_does_as_configured_and_no_usage_is_lost() {
    if !need_redis() {
        return;
    }
    let mut redis = RedisServer::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let tiers = "[tiers.free]\non_store_failure = \"local\"\n[tiers.free.per_key]\nrequests_per_minute = 8\n\
                 [tiers.open]\non_store_failure = \"fail_open\"\nrequests_per_minute = 1000\n\
                 [tiers.closed]\non_store_failure = \"fail_closed\"\nrequests_per_minute = 1000\n";
    let g = TestGateway::start(&config(
        &upstream,
        &[redis.url()],
        "node-0",
        &format!("nodes = 2\n{tiers}"),
    ))
    .await;
    let local = g.add_key("loc", "free");
    let open = g.add_key("opn", "open");
    let closed = g.add_key("cls", "closed");
    let shared = g.shared.clone().expect("shared");
    let c = client();
    let url = g.url("/v1/chat/completions");
    let call = |key: &str| chat_request(&url, key, &hello(16), &[]);
    for k in [&local, &open, &closed] {
        assert_eq!(send(&c, call(k)).await.status, 200);
    }

    for outage in ["hang", "restart"] {
        match outage {
            "hang" => redis.pause(),
            _ => {
                // A Redis that persists: what it held comes back after the restart.
                redis.cli(&["SAVE"]);
                redis.stop();
            }
        }
        // fail_closed: 503 with Retry-After, within the decision budget.
        let started = Instant::now();
        let a = send(&c, call(&closed)).await;
        assert_eq!(a.status, 503, "{outage}: {}", a.text());
        assert!(a.header("retry-after").is_some());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{outage}: the decision waited {:?}",
            started.elapsed()
        );
        // Marked down: the next decisions do not wait at all.
        let started = Instant::now();
        assert_eq!(send(&c, call(&closed)).await.status, 503);
        assert!(started.elapsed() < Duration::from_millis(90));
        // fail_open: served.
        for _ in 0..3 {
            assert_eq!(send(&c, call(&open)).await.status, 200, "{outage}");
        }
        // local: this node's share of the per-key limit (8 per minute over 2 nodes).
        let statuses: Vec<u16> = {
            let mut v = Vec::new();
            for _ in 0..6 {
                v.push(send(&c, call(&local)).await.status);
            }
            v
        };
        // The first outage has the whole local share; the second (seconds later, in the same
        // minute) what refilled since, at most one.
        let served = statuses.iter().filter(|s| **s == 200).count();
        match outage {
            "hang" => assert_eq!(served, 4, "{outage}: {statuses:?}"),
            _ => assert!(served <= 1, "{outage}: {statuses:?}"),
        }
        assert!(statuses.contains(&429), "{outage}: {statuses:?}");
        let status = shared.status();
        assert!(!status.up, "{outage}: {status:?}");
        assert!(status.outbox_tokens > 0);

        match outage {
            "hang" => redis.resume(),
            _ => redis.restart(),
        }
        wait_until(
            "Redis is marked up again",
            Duration::from_secs(10),
            async || shared.health.is_up() && shared.outbox.is_empty(),
        )
        .await;
        // Every token this node counted is in Redis: nothing was lost.
        for tenant in ["loc", "opn", "cls"] {
            let want = ledger_total(&g, tenant);
            wait_until(
                "Redis holds the ledger's usage",
                Duration::from_secs(5),
                async || shared.month_used(tenant, &Today::now()).await.ok() == Some(want),
            )
            .await;
        }
        assert_eq!(send(&c, call(&closed)).await.status, 200, "{outage}");
    }
    let status = shared.status();
    assert_eq!(status.recoveries, 2, "{status:?}");
    g.stop().await;
}
