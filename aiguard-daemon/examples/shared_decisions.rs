//! Decisions per second and their latency against a shared store (Redis), or in memory, for
//! `cargo xtask bench redis`. One run, one mode; prints one JSON object.
//!
//! ```text
//! shared_decisions --mode memory|sequential|pipelined|rate [--url redis://...] [--seconds 5]
//!                  [--concurrency 64] [--rate 10000] [--tenants 1000]
//! ```
//!
//! - `memory`: the in-memory limiter, one decision after another;
//! - `sequential`: Redis without pipelining: one request at a time (admit, then its settlement,
//!   each a round trip);
//! - `pipelined`: `--concurrency` requests at a time over the one multiplexed connection, so
//!   their scripts share round trips;
//! - `rate`: requests started at a fixed `--rate` (open loop), latency from the scheduled start:
//!   what a request waits for its decision when Redis is not saturated.
//!
//! Every request is a full decision as the gateway makes it: tenant and key levels with every
//! limit set (never refused), a token reservation, the monthly quota, then a settlement.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aiguard_daemon::{
    limits::{Demand, Limiter},
    shared::{Backend, Shared, StoreSettings},
    store::Store,
    tiers::{Limits, QuotaEnforcement, TenantPolicy},
    usage::Today,
};

struct Args {
    mode: String,
    url: String,
    seconds: f64,
    concurrency: usize,
    rate: f64,
    tenants: usize,
}

fn args() -> Args {
    let mut a = Args {
        mode: "memory".into(),
        url: "redis://127.0.0.1:6379".into(),
        seconds: 5.0,
        concurrency: 64,
        rate: 10_000.0,
        tenants: 1000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--mode" => a.mode = value(),
            "--url" => a.url = value(),
            "--seconds" => a.seconds = value().parse().expect("--seconds"),
            "--concurrency" => a.concurrency = value().parse().expect("--concurrency"),
            "--rate" => a.rate = value().parse().expect("--rate"),
            "--tenants" => a.tenants = value().parse().expect("--tenants"),
            // `cargo bench` passes this to every bench target.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn policy() -> TenantPolicy {
    let high = Limits {
        requests_per_minute: Some(1_000_000_000),
        requests_per_day: Some(1_000_000_000),
        tokens_per_minute: Some(1_000_000_000),
        max_concurrent: Some(1_000_000),
    };
    TenantPolicy {
        tenant: high.clone(),
        per_key: Limits {
            requests_per_day: None,
            ..high
        },
        monthly_tokens: Some(1 << 50),
        quota: QuotaEnforcement::Hard,
    }
}

struct Work {
    tenants: Vec<String>,
    keys: Vec<Arc<str>>,
    policy: TenantPolicy,
    month: u32,
    month_left: Duration,
}

impl Work {
    fn new(n: usize) -> Self {
        let today = Today::now();
        Self {
            tenants: (0..n).map(|i| format!("bench-{i}")).collect(),
            keys: (0..n).map(|i| format!("key_{i:012}").into()).collect(),
            policy: policy(),
            month: today.month_index(),
            month_left: today.month_left(),
        }
    }

    fn demand(&self, i: usize) -> Demand<'_> {
        let n = self.tenants.len();
        Demand {
            tenant: &self.tenants[i % n],
            key: &self.keys[(i / n + i) % n],
            policy: &self.policy,
            model: None,
            tokens: 120,
            min_tokens: 20,
            month: self.month,
            month_left: self.month_left,
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn report(mode: &str, decisions: u64, elapsed: Duration, mut latencies_ns: Vec<u64>, errors: u64) {
    latencies_ns.sort_unstable();
    let out = serde_json::json!({
        "mode": mode,
        "decisions": decisions,
        "seconds": elapsed.as_secs_f64(),
        "decisions_per_s": decisions as f64 / elapsed.as_secs_f64(),
        "p50_us": percentile(&latencies_ns, 0.50),
        "p99_us": percentile(&latencies_ns, 0.99),
        "errors": errors,
    });
    println!("{out}");
}

fn memory(a: &Args) {
    let work = Work::new(a.tenants);
    let limiter = Limiter::new();
    let run_for = Duration::from_secs_f64(a.seconds);
    let mut lat = Vec::with_capacity(1 << 20);
    let started = Instant::now();
    let mut i = 0usize;
    while started.elapsed() < run_for {
        let t = Instant::now();
        let adm = limiter.admit(&work.demand(i)).expect("admitted");
        adm.settle(100);
        lat.push(t.elapsed().as_nanos() as u64);
        i += 1;
    }
    report("memory", i as u64, started.elapsed(), lat, 0);
}

async fn shared(url: &str) -> Arc<Shared> {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    std::mem::forget(dir);
    let settings = StoreSettings {
        backend: Backend::Redis,
        urls: vec![url.to_owned()],
        prefix: format!("bench{}:", std::process::id()),
        decision_timeout: Duration::from_secs(2),
        ..StoreSettings::default()
    };
    let s = Shared::open(&settings, store).await.expect("shared store");
    assert!(s.health.is_up(), "Redis at {url} does not answer");
    s
}

async fn sequential(a: &Args) {
    let shared = shared(&a.url).await;
    let work = Work::new(a.tenants);
    let run_for = Duration::from_secs_f64(a.seconds);
    let mut lat = Vec::new();
    let mut errors = 0;
    let started = Instant::now();
    let mut i = 0usize;
    while started.elapsed() < run_for {
        let t = Instant::now();
        match shared.admit(&work.demand(i)).await {
            Ok(Ok(adm)) => {
                lat.push(t.elapsed().as_nanos() as u64);
                if adm.settle_and_wait(100).await.is_err() {
                    errors += 1;
                }
            }
            _ => errors += 1,
        }
        i += 1;
    }
    report("sequential", i as u64, started.elapsed(), lat, errors);
}

async fn pipelined(a: &Args) {
    let shared = shared(&a.url).await;
    let work = Arc::new(Work::new(a.tenants));
    let run_for = Duration::from_secs_f64(a.seconds);
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.concurrency {
        let (shared, work, next, errors) =
            (shared.clone(), work.clone(), next.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while started.elapsed() < run_for {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let t = Instant::now();
                match shared.admit(&work.demand(i)).await {
                    Ok(Ok(adm)) => {
                        lat.push(t.elapsed().as_nanos() as u64);
                        if adm.settle_and_wait(100).await.is_err() {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("task"));
    }
    let elapsed = started.elapsed();
    report(
        "pipelined",
        lat.len() as u64,
        elapsed,
        lat,
        errors.load(Ordering::Relaxed),
    );
}

async fn fixed_rate(a: &Args) {
    let shared = shared(&a.url).await;
    let work = Arc::new(Work::new(a.tenants));
    let total = (a.rate * a.seconds) as u64;
    let interval = Duration::from_secs_f64(1.0 / a.rate);
    let lat = Arc::new(std::sync::Mutex::new(Vec::with_capacity(total as usize)));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let due = started + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let (shared, work, lat, errors) =
            (shared.clone(), work.clone(), lat.clone(), errors.clone());
        tasks.spawn(async move {
            match shared.admit(&work.demand(i as usize)).await {
                Ok(Ok(adm)) => {
                    let took = due.elapsed().as_nanos() as u64;
                    lat.lock().expect("lock").push(took);
                    let _ = adm.settle_and_wait(100).await;
                }
                _ => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let lat = std::mem::take(&mut *lat.lock().expect("lock"));
    report(
        "rate",
        lat.len() as u64,
        elapsed,
        lat,
        errors.load(Ordering::Relaxed),
    );
}

fn main() {
    let a = args();
    if a.mode == "memory" {
        memory(&a);
        return;
    }
    // One worker: a node's gateway shares its CPU with everything else.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        match a.mode.as_str() {
            "sequential" => sequential(&a).await,
            "pipelined" => pipelined(&a).await,
            "rate" => fixed_rate(&a).await,
            other => panic!("unknown mode {other}"),
        }
    });
}
