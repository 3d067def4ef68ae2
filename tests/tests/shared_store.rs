//! The shared store against a real `redis-server` (and a real Redis Cluster): several gateways
//! (each with its own embedded store, as on separate nodes) share one set of limits and
//! quotas; when Redis is slow or gone each tier behaves as configured, and the usage counted
//! meanwhile is written back when it returns. In this process over loopback: no privilege.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use aiguard_daemon::{
    gateway::decide::Decider,
    limits::{Demand, Limiter},
    shared::{Backend, FailureMode, Shared, StoreSettings},
    store::Store,
    tiers::{Limits, QuotaEnforcement, TenantPolicy},
    usage::Today,
};
use aiguard_tests::{
    gateway::{Answer, TestGateway, chat_request, client, send},
    redis::{RedisCluster, RedisServer, redis_available},
    upstream::{Upstream, UpstreamOptions, headers as up},
};
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::json;
use tokio::{sync::watch, task::JoinHandle};

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

/// The failure-mode tests want Redis given up on quickly; the exactness tests want every
/// decision taken by Redis however loaded the machine is.
const SHORT_DECISION: &str = "decision_timeout = \"100ms\"";
const PATIENT_DECISION: &str = "decision_timeout = \"3s\"";

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
        // Exactness is Redis's: a loaded machine must not push decisions to the fallback.
        .replace(SHORT_DECISION, PATIENT_DECISION)
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
    for g in &gws {
        let status = g.gw.decider.shared().expect("shared store").status();
        assert_eq!(
            status.fallbacks, 0,
            "every decision was Redis's: {status:?}"
        );
    }
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
        .replace(SHORT_DECISION, PATIENT_DECISION)
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

/// `[store]` for one node on `url`, timed for tests.
fn store_settings(url: &str, node: &str, lease: Duration) -> StoreSettings {
    StoreSettings {
        backend: Backend::Redis,
        urls: vec![url.to_owned()],
        node_name: Some(node.to_owned()),
        prefix: "test:".into(),
        decision_timeout: Duration::from_millis(100),
        connect_timeout: Duration::from_secs(1),
        retry_interval: Duration::from_millis(100),
        lease,
        ..StoreSettings::default()
    }
}

/// A node's shared store over an embedded store in `dir`, with its maintenance loop running.
/// Dropping it stops the loop without its shutdown work, as a crash would.
struct SharedNode {
    shared: Arc<Shared>,
    _shutdown: watch::Sender<bool>,
    maintain: JoinHandle<()>,
}

impl SharedNode {
    async fn open(settings: &StoreSettings, dir: &std::path::Path) -> Self {
        let store = Store::open(dir).expect("embedded store");
        let shared = Shared::open(settings, store).await.expect("shared store");
        let (shutdown, rx) = watch::channel(false);
        let maintain = tokio::spawn(shared.clone().maintain(rx));
        Self {
            shared,
            _shutdown: shutdown,
            maintain,
        }
    }

    /// Stops the loop with no chance to persist or write back anything, and waits until the
    /// embedded store is closed (every handle to it dropped), so that it can be opened again.
    async fn crash(self) {
        self.maintain.abort();
        let _ = self.maintain.await;
        let shared = self.shared;
        wait_until(
            "nothing else holds the shared store",
            Duration::from_secs(5),
            async || Arc::strong_count(&shared) == 1,
        )
        .await;
        drop(shared);
    }
}

fn unlimited() -> TenantPolicy {
    TenantPolicy {
        tenant: Limits::default(),
        per_key: Limits::default(),
        monthly_tokens: None,
        quota: QuotaEnforcement::Hard,
    }
}

fn demand<'a>(
    tenant: &'a str,
    key: &'a Arc<str>,
    policy: &'a TenantPolicy,
    tokens: u64,
) -> Demand<'a> {
    let today = Today::now();
    Demand {
        tenant,
        key,
        policy,
        model: None,
        tokens,
        min_tokens: 1,
        month: today.month_index(),
        month_left: today.month_left(),
    }
}

/// The tenant's month counter as Redis holds it (0 when there is none).
fn month_counter(redis: &RedisServer, tenant: &str) -> u64 {
    let key = format!("test:{{{tenant}}}:q:{}", Today::now().month());
    let v = redis.cli(&["GET", &key]);
    if v.is_empty() {
        0
    } else {
        v.parse()
            .unwrap_or_else(|e| panic!("{key} holds {v:?}: {e}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_counted_while_redis_is_down_survives_a_crash_and_is_written_back_once() {
    if !need_redis() {
        return;
    }
    let mut redis = RedisServer::start();
    redis.stop();
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = store_settings(&redis.url(), "node-0", Duration::from_secs(60));

    let node = SharedNode::open(&settings, dir.path()).await;
    assert!(!node.shared.health.is_up());
    {
        let decider = Decider::new(Some(node.shared.clone()));
        let limiter = Limiter::new();
        let (key, policy) = (Arc::<str>::from("key-1"), unlimited());
        for used in [30, 40, 50] {
            let ticket = decider
                .admit(
                    &limiter,
                    &demand("acme", &key, &policy, 100),
                    FailureMode::FailOpen,
                )
                .await
                .unwrap_or_else(|r| panic!("fail_open serves without Redis: {r:?}"));
            ticket.settle(used);
        }
    }
    assert_eq!(node.shared.status().outbox_tokens, 120);
    // Killed with Redis still away: no write-back, no shutdown.
    node.crash().await;

    redis.restart();
    let node = SharedNode::open(&settings, dir.path()).await;
    assert!(node.shared.health.is_up(), "{:?}", node.shared.status());
    assert!(
        node.shared.outbox.is_empty(),
        "written back before marked up"
    );
    assert_eq!(month_counter(&redis, "acme"), 120, "every token, once");
    node.crash().await;

    // Another start has nothing left to write back.
    let node = SharedNode::open(&settings, dir.path()).await;
    assert!(node.shared.health.is_up());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(month_counter(&redis, "acme"), 120, "written back once");
    node.crash().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_start_without_redis_is_an_outage_whose_recovery_is_counted_after_the_write_back() {
    if !need_redis() {
        return;
    }
    let mut redis = RedisServer::start();
    redis.stop();
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(
        &upstream,
        &[redis.url()],
        "node-0",
        "[tiers.free]\non_store_failure = \"fail_open\"\n",
    ))
    .await;
    let key = g.add_key("acme", "free");
    let shared = g.shared.clone().expect("shared");
    let c = client();
    for _ in 0..3 {
        let a = send(
            &c,
            chat_request(&g.url("/v1/chat/completions"), &key, &hello(16), &[]),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
    // Settled once each body has ended (the ledger after the outbox).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = shared.status();
    assert!(!status.up, "{status:?}");
    assert_eq!(
        status.outages, 1,
        "a start without Redis is an outage: {status:?}"
    );
    assert_eq!(status.recoveries, 0, "{status:?}");
    assert!(status.state_secs.is_some(), "{status:?}");
    assert!(status.outbox_tokens > 0, "{status:?}");
    let want = ledger_total(&g, "acme");
    assert_eq!(status.outbox_tokens as u64, want);

    // Watch the recovery: never up while the outbox still waits.
    let watcher = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if shared.health.is_up() {
                    return shared.outbox.total();
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            panic!("Redis not marked up within 10 s: {:?}", shared.status());
        })
    };
    redis.restart();
    let waiting_when_up = watcher.await.expect("watcher");
    assert_eq!(
        waiting_when_up, 0,
        "marked up before the outbox was written back"
    );
    assert_eq!(
        shared
            .month_used("acme", &Today::now())
            .await
            .expect("month"),
        want
    );
    let status = shared.status();
    assert!(status.up, "{status:?}");
    assert_eq!(status.recoveries, 1, "the recovery is counted: {status:?}");
    assert_eq!(status.outages, 1, "{status:?}");
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_settlement_after_its_record_expired_still_counts_once_even_retried() {
    if !need_redis() {
        return;
    }
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    // The shortest lease: a request's record in Redis lives 1 s.
    let settings = store_settings(&redis.url(), "node-0", Duration::from_secs(1));
    let node = SharedNode::open(&settings, dir.path()).await;
    let shared = node.shared.clone();
    let (key, policy) = (Arc::<str>::from("key-1"), unlimited());
    let admit = async || {
        shared
            .admit(&demand("acme", &key, &policy, 100))
            .await
            .expect("Redis decides")
            .expect("admitted")
    };

    // Settled 1.3 s after admission: the record is gone, the 100 reserved are still counted.
    let first = admit().await;
    assert_eq!(month_counter(&redis, "acme"), 100);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    first.settle_and_wait(30).await.expect("settled");
    assert_eq!(
        month_counter(&redis, "acme"),
        30,
        "the late settlement counts"
    );

    // Late again, and Redis hangs while it runs: the node times out and retries it when
    // Redis is back, by when the hung try has run. Counted once.
    let second = admit().await;
    assert_eq!(month_counter(&redis, "acme"), 130);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    redis.pause();
    let e = second.settle_and_wait(40).await.expect_err("Redis is hung");
    assert_eq!(shared.retries_pending(), 1, "{e}: queued for retry");
    redis.resume();
    wait_until(
        "the retry went through",
        Duration::from_secs(10),
        async || shared.health.is_up() && shared.retries_pending() == 0,
    )
    .await;
    assert_eq!(month_counter(&redis, "acme"), 70, "30 + 40, each once");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(month_counter(&redis, "acme"), 70);
    assert_eq!(shared.status().recoveries, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scripts_flushed_from_redis_mid_run_are_loaded_again_without_a_fallback() {
    if !need_redis() {
        return;
    }
    let redis = RedisServer::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(
        &upstream,
        &[redis.url()],
        "node-0",
        "[tiers.free]\non_store_failure = \"fail_closed\"\nrequests_per_minute = 1000\n",
    ))
    .await;
    let key = g.add_key("acme", "free");
    let shared = g.shared.clone().expect("shared");
    let c = client();
    let url = g.url("/v1/chat/completions");
    let exists = |sha: &str| redis.cli(&["SCRIPT", "EXISTS", sha]);
    let admit_sha = shared.scripts.admit.get_hash().to_owned();
    let settle_sha = shared.scripts.settle.get_hash().to_owned();
    for _ in 0..2 {
        assert_eq!(
            send(&c, chat_request(&url, &key, &hello(16), &[]))
                .await
                .status,
            200
        );
    }
    wait_until("settled", Duration::from_secs(5), async || {
        shared.month_used("acme", &Today::now()).await.ok() == Some(ledger_total(&g, "acme"))
    })
    .await;
    assert_eq!(exists(&admit_sha), "1");
    assert_eq!(exists(&settle_sha), "1");

    assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]), "OK");
    assert_eq!(exists(&admit_sha), "0");
    assert_eq!(exists(&settle_sha), "0");
    for _ in 0..3 {
        // fail_closed: a decision without Redis would be a 503.
        let a = send(&c, chat_request(&url, &key, &hello(16), &[])).await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
    wait_until("settled again", Duration::from_secs(5), async || {
        shared.month_used("acme", &Today::now()).await.ok() == Some(ledger_total(&g, "acme"))
    })
    .await;
    assert_eq!(
        exists(&admit_sha),
        "1",
        "the admission script was loaded again"
    );
    assert_eq!(
        exists(&settle_sha),
        "1",
        "the settlement script was loaded again"
    );
    let status = shared.status();
    assert!(status.up, "{status:?}");
    assert_eq!(status.fallbacks, 0, "{status:?}");
    assert_eq!(status.errors, 0, "{status:?}");
    assert_eq!(status.timeouts, 0, "{status:?}");
    assert_eq!(status.outages, 0, "{status:?}");
    assert_eq!(status.retries_pending, 0, "{status:?}");
    g.stop().await;
}

/// Leases a level's set in Redis still holds (a settled one is scored 0 or gone).
fn live_leases(redis: &RedisServer, set: &str) -> u64 {
    redis
        .cli(&["ZCOUNT", &format!("test:{set}"), "1", "+inf"])
        .parse()
        .expect("ZCOUNT answers a number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_settlement_rides_with_the_next_admission_or_goes_alone_when_none_comes() {
    if !need_redis() {
        return;
    }
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = store_settings(&redis.url(), "node-0", Duration::from_secs(60));
    settings.settle_delay = Duration::from_secs(1);
    let node = SharedNode::open(&settings, dir.path()).await;
    let shared = node.shared.clone();
    let key = Arc::<str>::from("key-1");
    // 60,000 tokens a minute: one a millisecond comes back, so the refund shows in the
    // remaining tokens however long a step takes.
    let policy = TenantPolicy {
        tenant: Limits {
            tokens_per_minute: Some(60_000),
            max_concurrent: Some(100),
            ..Limits::default()
        },
        per_key: Limits {
            requests_per_minute: Some(3),
            ..Limits::default()
        },
        monthly_tokens: Some(1_000_000),
        quota: QuotaEnforcement::Hard,
    };
    let admit = async |tokens| {
        shared
            .admit(&demand("acme", &key, &policy, tokens))
            .await
            .expect("Redis decides")
    };
    let tokens_left = |a: &aiguard_daemon::shared::limits::SharedAdmission| {
        a.headers.tokens.expect("a tokens/minute limit").remaining
    };

    // Settled: it waits on the node, Redis still holds its reservation and its lease.
    let first = admit(1_000).await.expect("admitted");
    first.settle(300);
    assert_eq!(shared.parked_pending(), 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(month_counter(&redis, "acme"), 1_000, "not sent alone");
    assert_eq!(live_leases(&redis, "{acme}:c:t"), 1);

    // The next admission carries it: 700 tokens back to the month and the minute, the lease
    // freed, all in the one call.
    let second = admit(1_000).await.expect("admitted");
    assert_eq!(shared.parked_pending(), 0);
    assert_eq!(month_counter(&redis, "acme"), 300 + 1_000);
    assert_eq!(
        live_leases(&redis, "{acme}:c:t"),
        1,
        "the first's lease freed"
    );
    let left = tokens_left(&second);
    assert!(
        (58_700..58_700 + 1_000).contains(&left),
        "{left} tokens left: 60,000 less 300 used and 1,000 reserved (plus what came back \
         since); without the refund it would be under 58,000 + that"
    );

    // No admission comes: it goes alone once settle_delay has passed.
    second.settle(200);
    assert_eq!(shared.parked_pending(), 1);
    wait_until(
        "the settlement went alone",
        Duration::from_secs(3),
        async || shared.parked_pending() == 0 && month_counter(&redis, "acme") == 500,
    )
    .await;
    assert_eq!(live_leases(&redis, "{acme}:c:t"), 0);
    assert_eq!(shared.retries_pending(), 0);

    // A refused admission still applies what it carried: the key's fourth request this
    // minute is refused, the third's settlement rides with it.
    let third = admit(1_000).await.expect("admitted");
    third.settle(100);
    let refused = admit(1_000).await.err().expect("3 requests a minute");
    assert!(
        matches!(refused, aiguard_daemon::limits::Denial::Requests { .. }),
        "{refused:?}"
    );
    assert_eq!(shared.parked_pending(), 0);
    assert_eq!(
        month_counter(&redis, "acme"),
        600,
        "refused, but 100 settled"
    );
    assert_eq!(live_leases(&redis, "{acme}:c:t"), 0);

    // An admission that times out (Redis hung) may or may not have run: what it carried is
    // retried alone, and counted once either way; its own reservation is cancelled.
    let other = Arc::<str>::from("key-2");
    let fifth = shared
        .admit(&demand("acme", &other, &policy, 1_000))
        .await
        .expect("Redis decides")
        .expect("admitted");
    fifth.settle(50);
    assert_eq!(shared.parked_pending(), 1);
    redis.pause();
    let e = shared
        .admit(&demand("acme", &other, &policy, 1_000))
        .await
        .err()
        .expect("Redis is hung");
    assert_eq!(shared.parked_pending(), 0, "{e}");
    assert_eq!(
        shared.retries_pending(),
        2,
        "the carried one, and the cancellation"
    );
    redis.resume();
    wait_until(
        "the retries went through",
        Duration::from_secs(10),
        async || shared.health.is_up() && shared.retries_pending() == 0,
    )
    .await;
    assert_eq!(
        month_counter(&redis, "acme"),
        650,
        "50 once, the cancelled one not"
    );
    assert_eq!(live_leases(&redis, "{acme}:c:t"), 0);
    let status = shared.status();
    assert_eq!(status.recoveries, 1, "{status:?}");
    assert_eq!(status.settlements_carried, 2, "the first's and the third's");
    assert_eq!(status.settlements_waiting, 0, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_settlement_holding_a_scarce_slot_or_left_at_shutdown_is_not_kept_waiting() {
    if !need_redis() {
        return;
    }
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = store_settings(&redis.url(), "node-0", Duration::from_secs(60));
    settings.settle_delay = Duration::from_secs(1);
    let store = Store::open(dir.path()).expect("embedded store");
    let shared = Shared::open(&settings, store).await.expect("shared store");
    let (shutdown, rx) = watch::channel(false);
    let maintain = tokio::spawn(shared.clone().maintain(rx));
    let key = Arc::<str>::from("key-1");
    // One request at a time per key: its settlement frees the slot at once, long before
    // settle_delay.
    let policy = TenantPolicy {
        tenant: Limits::default(),
        per_key: Limits {
            max_concurrent: Some(1),
            ..Limits::default()
        },
        monthly_tokens: None,
        quota: QuotaEnforcement::Hard,
    };
    let started = Instant::now();
    for used in [10, 20, 30] {
        let a = shared
            .admit(&demand("acme", &key, &policy, 100))
            .await
            .expect("Redis decides")
            .expect("admitted: the last one's slot is free");
        a.settle(used);
        assert_eq!(shared.parked_pending(), 0, "sent at once");
        wait_until("the slot is free", Duration::from_millis(500), async || {
            live_leases(&redis, "{acme}:c:k:key-1") == 0
        })
        .await;
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(month_counter(&redis, "acme"), 60);

    // Parked at shutdown: written to Redis before the loop ends.
    let other = Arc::<str>::from("key-2");
    let loose = TenantPolicy {
        per_key: Limits::default(),
        ..policy
    };
    let a = shared
        .admit(&demand("acme", &other, &loose, 100))
        .await
        .expect("Redis decides")
        .expect("admitted");
    a.settle(40);
    assert_eq!(shared.parked_pending(), 1);
    shutdown.send_replace(true);
    maintain.await.expect("the loop ends");
    assert_eq!(shared.parked_pending(), 0);
    assert_eq!(shared.retries_pending(), 0);
    assert_eq!(month_counter(&redis, "acme"), 100, "40 written at shutdown");
}
