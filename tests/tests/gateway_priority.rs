//! Paid traffic first under surge, over real loopback HTTP against the fake upstream: the
//! upstream serves `SLOTS` requests at once (`gateway.upstream_slots`), each taking
//! `SERVICE_MS`; a free-tier flood at several times that capacity leaves the paid tier's p99
//! latency within 1.5x of its unloaded value, and every free request is either served or shed
//! with a proper answer (429 while paid traffic competes for the slots, 503 while the free
//! tier alone saturates the upstream), each with `Retry-After`. No privilege needed.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use aiguard_tests::{
    gateway::{Answer, TestGateway, chat_request, client, config, hello, send},
    upstream::{Upstream, UpstreamOptions, headers as up},
};

const SLOTS: u32 = 4;
/// Each request's time at the upstream.
const SERVICE_MS: u64 = 50;
/// The upstream's capacity, requests/s, and the free flood's multiple of it.
const CAPACITY: f64 = SLOTS as f64 * 1000.0 / SERVICE_MS as f64;
const FLOOD_FACTOR: f64 = 4.0;
const FLOOD_SECS: f64 = 3.0;
const PAID_REQUESTS: usize = 40;
const FREE_TENANTS: usize = 20;

/// Free may hold 3 of the 4 slots (headroom for paid) and queue 16 requests for 200 ms; paid
/// weighs 50 times as much.
fn tiers() -> String {
    format!(
        "upstream_slots = {SLOTS}\n\
         [tiers.paid]\nrequests_per_minute = 100000\nmax_concurrent = 1000\nweight = 50\n\
         max_queued = 1000\nmax_queue_wait = \"10s\"\n\
         [tiers.free]\nrequests_per_minute = 100000\nmax_concurrent = 1000\nweight = 1\n\
         max_queued = 16\nmax_queue_wait = \"200ms\"\nmax_upstream_slots = {}\n",
        SLOTS - 1
    )
}

fn p99(latencies: &mut [Duration]) -> Duration {
    latencies.sort();
    let i = ((latencies.len() as f64 * 0.99).ceil() as usize).clamp(1, latencies.len()) - 1;
    latencies[i]
}

/// `n` paid requests one after the other; their latencies (all must succeed).
async fn paid_latencies(gw: &TestGateway, key: &str, n: usize) -> Vec<Duration> {
    let c = client();
    let delay = SERVICE_MS.to_string();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let req = chat_request(
            &gw.url("/v1/chat/completions"),
            key,
            &hello(16),
            &[(up::DELAY_MS, &delay)],
        );
        let started = Instant::now();
        let a = send(&c, req).await;
        out.push(started.elapsed());
        assert_eq!(a.status, 200, "a paid request failed: {}", a.text());
    }
    out
}

/// Free requests at `rate` per second for `secs`, each in its own task; their answers.
async fn free_flood(gw: &TestGateway, keys: Arc<Vec<String>>, rate: f64, secs: f64) -> Vec<Answer> {
    let c = client();
    let url = gw.url("/v1/chat/completions");
    let total = (rate * secs) as usize;
    let every = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        tokio::time::sleep_until(start + every * i as u32).await;
        let (c, url, keys) = (c.clone(), url.clone(), keys.clone());
        tasks.push(tokio::spawn(async move {
            let delay = SERVICE_MS.to_string();
            let req = chat_request(
                &url,
                &keys[i % keys.len()],
                &hello(16),
                &[(up::DELAY_MS, &delay)],
            );
            send(&c, req).await
        }));
    }
    let mut out = Vec::with_capacity(total);
    for t in tasks {
        out.push(t.await.expect("free client task"));
    }
    out
}

/// Every free answer is a success or a shed with one of `shed_statuses`, an OpenAI-style
/// error, and a `Retry-After`; returns (served, shed with 429, shed with 503).
fn check_free_answers(answers: &[Answer], shed_statuses: &[u16]) -> (usize, usize, usize) {
    let (mut served, mut busy, mut saturated) = (0, 0, 0);
    for a in answers {
        match a.status {
            200 => served += 1,
            s if shed_statuses.contains(&s) => {
                if s == 429 {
                    busy += 1;
                } else {
                    saturated += 1;
                }
                let e = a.json();
                let code = if s == 429 {
                    "queue_full"
                } else {
                    "upstream_saturated"
                };
                assert_eq!(e["error"]["code"], code, "{e}");
                assert!(e["error"]["message"].as_str().is_some(), "{e}");
                let retry: u64 = a
                    .header("retry-after")
                    .unwrap_or_else(|| panic!("a shed answer without Retry-After: {e}"))
                    .parse()
                    .expect("Retry-After in seconds");
                assert!((1..=60).contains(&retry), "Retry-After {retry}");
                // The tier's limits still answer as on every response.
                assert!(a.header("x-ratelimit-limit-requests").is_some(), "{e}");
            }
            other => panic!("a free request answered {other}: {}", a.text()),
        }
    }
    (served, busy, saturated)
}

/// The gateway's part of `/metrics`, as the exporter renders it.
fn metrics_page(gw: &TestGateway) -> String {
    aiguard_daemon::metrics::Exporter::new()
        .and_then(|e| e.with_gateway(gw.gw.clone()))
        .expect("exporter")
        .render()
}

fn series_value(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series).map(str::trim))
        .unwrap_or_else(|| panic!("no {series} in\n{page}"))
        .parse()
        .expect("a number")
}

/// The fake upstream as an inference server that works on `SLOTS` requests at once and makes
/// the rest wait, first come first served.
fn saturable_upstream() -> Upstream {
    Upstream::start(UpstreamOptions {
        record_requests: false,
        capacity: Some(SLOTS as usize),
        ..UpstreamOptions::default()
    })
}

fn free_keys(gw: &TestGateway) -> Arc<Vec<String>> {
    Arc::new(
        (0..FREE_TENANTS)
            .map(|i| gw.add_key(&format!("trial-{i}"), "free"))
            .collect(),
    )
}

/// The paid tier's p99 alone, then under a free flood of `flood_secs` (starting half a second
/// before the paid requests, so that they run into a saturated upstream); and the flood's
/// answers.
async fn paid_p99_alone_and_under_flood(
    gw: &TestGateway,
    flood_secs: f64,
) -> (Duration, Duration, Vec<Answer>) {
    let paid = gw.add_key("acme", "paid");
    let free = free_keys(gw);
    // Warm the connections, then the paid tier alone.
    paid_latencies(gw, &paid, 5).await;
    let mut unloaded = paid_latencies(gw, &paid, PAID_REQUESTS).await;
    let flood = free_flood(gw, free, CAPACITY * FLOOD_FACTOR, flood_secs);
    let paid_run = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        paid_latencies(gw, &paid, PAID_REQUESTS).await
    };
    let (answers, mut loaded) = tokio::join!(flood, paid_run);
    (p99(&mut unloaded), p99(&mut loaded), answers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_latency_holds_under_a_free_flood_and_free_is_shed_with_answers() {
    let upstream = saturable_upstream();
    let gw = TestGateway::start(&config(&upstream, &tiers())).await;
    let (unloaded_p99, loaded_p99, free_answers) =
        paid_p99_alone_and_under_flood(&gw, FLOOD_SECS).await;
    eprintln!("paid p99: {unloaded_p99:?} alone, {loaded_p99:?} under the free flood");
    assert!(
        loaded_p99.as_secs_f64() <= 1.5 * unloaded_p99.as_secs_f64(),
        "paid p99 {loaded_p99:?} under the flood, {unloaded_p99:?} without: more than 1.5x"
    );

    // 429 while a paid request held or waited for a slot, 503 while free traffic was alone.
    let (served, busy, saturated) = check_free_answers(&free_answers, &[429, 503]);
    assert!(
        busy > 0,
        "no free request was told 429 while paid traffic competed"
    );
    let shed = busy + saturated;
    let offered = free_answers.len();
    eprintln!("free: {offered} sent, {served} served, {busy} told 429, {saturated} told 503");
    // The upstream could serve at most its free share of the flood's time; the rest was shed.
    let free_capacity = (SLOTS - 1) as f64 * 1000.0 / SERVICE_MS as f64 * (FLOOD_SECS + 1.0);
    assert!(served > 0, "no free request was served");
    assert!(
        (served as f64) <= free_capacity,
        "{served} free requests served, more than the free share of the upstream allows"
    );
    assert!(
        shed as f64 >= offered as f64 / 2.0,
        "only {shed} of {offered} free requests shed at 4x capacity"
    );

    let page = metrics_page(&gw);
    assert_eq!(
        series_value(
            &page,
            r#"aiguard_gateway_requests_total{outcome="queue_full",tier="free"}"#
        ),
        shed as f64
    );
    assert_eq!(
        series_value(
            &page,
            r#"aiguard_gateway_requests_total{outcome="queue_full",tier="paid"}"#
        ),
        0.0
    );
    assert!(
        series_value(
            &page,
            r#"aiguard_gateway_queue_wait_seconds_count{result="shed",tier="free"}"#
        ) >= shed as f64
    );
    assert!(
        series_value(
            &page,
            r#"aiguard_gateway_queue_wait_seconds_count{result="slot",tier="paid"}"#
        ) >= (2 * PAID_REQUESTS) as f64
    );
    assert_eq!(
        series_value(&page, "aiguard_gateway_upstream_slots"),
        f64::from(SLOTS)
    );
    assert_eq!(
        series_value(&page, r#"aiguard_gateway_queued_requests{tier="free"}"#),
        0.0
    );
    // Only requests given a slot count as allowed (shed ones were never sent).
    let allowed = gw
        .gw
        .counters
        .allowed
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(allowed as usize, served + 5 + 2 * PAID_REQUESTS);
    // The upstream never had more than its slots to work on.
    assert!(
        upstream.max_in_flight() <= SLOTS as usize,
        "{}",
        upstream.max_in_flight()
    );
    // Nothing is left queued or held.
    let (slots, load) = gw.gw.scheduler.load();
    assert_eq!(slots, SLOTS);
    assert!(
        load.iter().all(|l| l.queued == 0 && l.held == 0),
        "{load:?}"
    );
    gw.stop().await;
}

/// The control: the same flood without `gateway.upstream_slots` queues paid requests behind
/// free ones at the upstream, and the paid p99 is far above 1.5x.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_priority_the_same_flood_holds_paid_requests_up() {
    let upstream = saturable_upstream();
    let tiers = tiers().replacen(&format!("upstream_slots = {SLOTS}\n"), "", 1);
    let gw = TestGateway::start(&config(&upstream, &tiers)).await;
    let (unloaded_p99, loaded_p99, answers) = paid_p99_alone_and_under_flood(&gw, 1.5).await;
    eprintln!("without priority, paid p99: {unloaded_p99:?} alone, {loaded_p99:?} under the flood");
    assert!(
        loaded_p99.as_secs_f64() > 3.0 * unloaded_p99.as_secs_f64(),
        "paid p99 {loaded_p99:?} under the flood without priority, {unloaded_p99:?} without"
    );
    // Nothing shed: every free request waited its turn at the upstream.
    assert_eq!(answers.iter().filter(|a| a.status != 200).count(), 0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_that_alone_saturates_the_upstream_is_told_503() {
    let upstream = saturable_upstream();
    let gw = TestGateway::start(&config(&upstream, &tiers())).await;
    let answers = free_flood(&gw, free_keys(&gw), CAPACITY * FLOOD_FACTOR, 1.0).await;
    let (served, busy, saturated) = check_free_answers(&answers, &[503]);
    assert_eq!(busy, 0);
    assert!(
        served > 0 && saturated > 0,
        "served {served}, shed {saturated}"
    );
    gw.stop().await;
}
