//! Decisions per second and their latency against a shared store (Redis), or in memory, for
//! `cargo xtask bench redis`. One run, one mode; prints one JSON object.
//!
//! ```text
//! shared_decisions --mode memory|sequential|pipelined|rate [--url redis://...] [--seconds 3]
//!                  [--warmup 0.5] [--concurrency 64] [--rate 20000] [--tenants 1000]
//! ```
//!
//! Every request is a full decision as the gateway makes it: an admission (tenant and key
//! levels with every limit set, never refused; a token reservation; the monthly quota), then
//! its settlement, handed over as the gateway does after the response: in the background,
//! riding with the next admission of the same tenant and key when one comes within
//! `store.settle_delay`, else alone. Requests go round-robin over `--tenants` tenants of one
//! key each. The admission is timed from its call to its answer: what a decision adds to a
//! request's latency (the gateway forwards the request only then).
//!
//! A decision counts when it was admitted; failed admissions, refusals (and, in the fixed-rate
//! mode, requests still unanswered at the end) are counted apart, and the first error's message
//! is kept. At the end every settlement still waiting is written, and Redis's month counters
//! must hold exactly what the admitted requests used: each request's worth missing (or extra)
//! is a settlement error. The first `--warmup` seconds (connecting, loading the scripts, first
//! allocations) are not counted.
//!
//! - `memory`: the in-memory limiter, one decision after another;
//! - `sequential`: Redis without pipelining: one request at a time (admission, then its
//!   settlement, each a round trip);
//! - `pipelined`: `--concurrency` requests at a time over the one multiplexed connection, so
//!   their scripts share round trips (closed loop: latency here includes queueing);
//! - `rate`: requests due at a fixed `--rate` (open loop), paced by a timerfd armed at each due
//!   time (tokio's timer ticks in milliseconds, which would send in bursts). An admission is
//!   timed from the instant it is sent; how late the generator sent it (sent - due) is reported
//!   apart as `lag`, and `achieved_rate` says whether the schedule held.
//!
//! Redis runs on one tokio worker, the mode's own loop included: a node's gateway shares its
//! CPU with everything else.
use std::{
    io,
    os::fd::{AsFd as _, AsRawFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aiguard_daemon::{
    limits::{Demand, Limiter},
    shared::{Backend, Shared, StoreSettings},
    store::Store,
    tiers::{Limits, QuotaEnforcement, TenantPolicy},
    usage::Today,
};
use nix::sys::{
    time::TimeSpec,
    timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags},
};
use serde::Serialize;
use tokio::{
    io::unix::AsyncFd,
    sync::watch,
    task::{JoinHandle, JoinSet},
};

/// Tokens each request reserves, then reports as used.
const RESERVED: u64 = 120;
const USED: u64 = 100;
/// Long enough that a slow answer is measured, not cut off: the gateway's default is 50 ms.
const DECISION_TIMEOUT: Duration = Duration::from_secs(2);
/// Once the last request is due, how long the fixed-rate mode waits for the answers.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Between setting up and the first due time.
const LEAD_IN: Duration = Duration::from_millis(20);

struct Args {
    mode: String,
    url: String,
    seconds: f64,
    warmup: f64,
    concurrency: usize,
    rate: f64,
    tenants: usize,
}

fn args() -> Args {
    let mut a = Args {
        mode: "memory".into(),
        url: "redis://127.0.0.1:6379".into(),
        seconds: 3.0,
        warmup: 0.5,
        concurrency: 64,
        rate: 20_000.0,
        tenants: 1000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--mode" => a.mode = value(),
            "--url" => a.url = value(),
            "--seconds" => a.seconds = value().parse().expect("--seconds"),
            "--warmup" => a.warmup = value().parse().expect("--warmup"),
            "--concurrency" => a.concurrency = value().parse().expect("--concurrency"),
            "--rate" => a.rate = value().parse().expect("--rate"),
            "--tenants" => a.tenants = value().parse().expect("--tenants"),
            // `cargo bench` passes this to every bench target.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(a.seconds > 0.0, "--seconds must be positive");
    assert!(a.warmup >= 0.0, "--warmup must not be negative");
    assert!(a.concurrency >= 1, "--concurrency must be at least 1");
    assert!(
        a.rate >= 1.0 && a.rate.is_finite(),
        "--rate must be at least 1"
    );
    assert!(a.tenants >= 1, "--tenants must be at least 1");
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
    /// Requests admitted in the whole run, warm-up included: what the month counters hold.
    admitted: AtomicU64,
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
            admitted: AtomicU64::new(0),
        }
    }

    fn demand(&self, i: usize) -> Demand<'_> {
        let n = self.tenants.len();
        Demand {
            tenant: &self.tenants[i % n],
            key: &self.keys[i % n],
            policy: &self.policy,
            model: None,
            tokens: RESERVED,
            min_tokens: 20,
            month: self.month,
            month_left: self.month_left,
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock the pacing timerfd is armed on.
fn now_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock_gettime");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

/// CPU time of the whole process (every thread), in seconds.
fn process_cpu_secs() -> f64 {
    let spent = nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID)
        .expect("clock_gettime(CLOCK_PROCESS_CPUTIME_ID)");
    spent.tv_sec() as f64 + spent.tv_nsec() as f64 / 1e9
}

fn secs_ns(secs: f64) -> u64 {
    (secs * 1e9) as u64
}

/// Percentiles of one run, in microseconds.
#[derive(Debug, Serialize)]
struct Percentiles {
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

impl Percentiles {
    /// Of `values_ns`, which this sorts; `None` when there are none.
    fn of(values_ns: &mut [u64]) -> Option<Self> {
        values_ns.sort_unstable();
        let us = |ns: u64| ns as f64 / 1e3;
        Some(Self {
            p50_us: us(percentile(values_ns, 0.50)?),
            p99_us: us(percentile(values_ns, 0.99)?),
            max_us: us(*values_ns.last()?),
        })
    }
}

/// The nearest-rank percentile `p` (0 < p <= 1) of ascending `sorted`.
fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() || !(p > 0.0 && p <= 1.0) {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// How one request went.
enum Outcome {
    /// Admitted (and its settlement handed over).
    Decided { admit_ns: u64 },
    /// Refused (the limits are set so that none is).
    Refused,
    /// Redis did not decide.
    AdmitFailed { error: String },
}

/// The counted requests of a run.
#[derive(Default)]
struct Tally {
    /// Admission latency of every admitted request.
    admit_ns: Vec<u64>,
    decisions: u64,
    admit_errors: u64,
    refused: u64,
    first_error: Option<String>,
}

impl Tally {
    fn add(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Decided { admit_ns } => {
                self.decisions += 1;
                self.admit_ns.push(admit_ns);
            }
            Outcome::Refused => {
                self.refused += 1;
                self.first_error
                    .get_or_insert_with(|| "admission: refused".to_owned());
            }
            Outcome::AdmitFailed { error } => {
                self.admit_errors += 1;
                self.first_error
                    .get_or_insert(format!("admission: {error}"));
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        self.admit_ns.extend(other.admit_ns);
        self.decisions += other.decisions;
        self.admit_errors += other.admit_errors;
        self.refused += other.refused;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn requests(&self) -> u64 {
        self.decisions + self.admit_errors + self.refused
    }
}

/// What one run prints.
#[derive(Debug, Serialize)]
struct Report {
    mode: String,
    /// The fixed-rate mode's requested rate.
    rate: Option<f64>,
    /// The counted window: from the first counted request's start (its due time at a fixed
    /// rate) to the last counted answer.
    seconds: f64,
    /// Requests started in the window.
    requests: u64,
    /// Of those, admitted.
    decisions: u64,
    decisions_per_s: f64,
    admit_errors: u64,
    refused: u64,
    /// Requests' worth of tokens missing from (or extra in) Redis's month counters at the end.
    settle_errors: u64,
    /// Of the run's settlements (warm-up included), the share that rode with an admission.
    carried: Option<f64>,
    /// Fixed rate: requests still unanswered `DRAIN_TIMEOUT` after the last was due.
    unfinished: u64,
    first_error: Option<String>,
    /// Admission latency: what a decision adds to a request.
    admit: Option<Percentiles>,
    /// Fixed rate: how late each counted request was sent (sent - due).
    lag: Option<Percentiles>,
    /// Fixed rate: decisions over the window; the requested rate when the node kept up.
    achieved_rate: Option<f64>,
    /// Process CPU time (every thread) over the window, per counted request (decided or not).
    node_cpu_us_per_request: f64,
    /// Requests sent in the whole run, warm-up included.
    requests_total: u64,
}

/// A run's raw figures, before they become a [`Report`].
struct Run {
    tally: Tally,
    window_ns: u64,
    cpu_secs: f64,
    requests_total: u64,
    lag_ns: Option<Vec<u64>>,
    unfinished: u64,
    settled: Option<Settled>,
}

/// How a run's settlements went, checked once every one was written.
struct Settled {
    carried_share: f64,
    /// Requests' worth of tokens the month counters miss (or hold extra).
    wrong: u64,
    error: Option<String>,
}

impl Run {
    fn report(mut self, mode: &str, rate: Option<f64>) -> Report {
        let seconds = self.window_ns.max(1) as f64 / 1e9;
        let decisions_per_s = self.tally.decisions as f64 / seconds;
        let unfinished = self.unfinished;
        let settled = self.settled.take();
        if let Some(e) = settled.as_ref().and_then(|s| s.error.clone()) {
            self.tally.first_error.get_or_insert(e);
        }
        Report {
            mode: mode.to_owned(),
            rate,
            seconds,
            requests: self.tally.requests() + unfinished,
            decisions: self.tally.decisions,
            decisions_per_s,
            admit_errors: self.tally.admit_errors,
            refused: self.tally.refused,
            settle_errors: settled.as_ref().map_or(0, |s| s.wrong),
            carried: settled.as_ref().map(|s| s.carried_share),
            unfinished,
            first_error: self
                .tally
                .first_error
                .take()
                .or_else(|| (unfinished > 0).then(|| format!("{unfinished} requests unanswered"))),
            admit: Percentiles::of(&mut self.tally.admit_ns),
            lag: self.lag_ns.as_mut().and_then(|l| Percentiles::of(l)),
            achieved_rate: rate.map(|_| decisions_per_s),
            node_cpu_us_per_request: self.cpu_secs * 1e6
                / (self.tally.requests() + unfinished).max(1) as f64,
            requests_total: self.requests_total,
        }
    }
}

fn memory(a: &Args) -> Run {
    let work = Work::new(a.tenants);
    let limiter = Limiter::new();
    let window_start = now_ns() + secs_ns(a.warmup);
    let end = window_start + secs_ns(a.seconds);
    let mut tally = Tally::default();
    let mut first: Option<(u64, f64)> = None;
    let mut last_ns = window_start;
    let mut i = 0usize;
    loop {
        let t0 = now_ns();
        if t0 >= end {
            break;
        }
        let outcome = match limiter.admit(&work.demand(i)) {
            Ok(admission) => {
                let t1 = now_ns();
                admission.settle(USED);
                last_ns = now_ns();
                Outcome::Decided { admit_ns: t1 - t0 }
            }
            Err(_) => {
                last_ns = now_ns();
                Outcome::Refused
            }
        };
        i += 1;
        if t0 >= window_start {
            first.get_or_insert_with(|| (t0, process_cpu_secs()));
            tally.add(outcome);
        }
    }
    let cpu_end = process_cpu_secs();
    let (first_ns, cpu_start) = first.unwrap_or((window_start, cpu_end));
    Run {
        tally,
        window_ns: last_ns.saturating_sub(first_ns),
        cpu_secs: cpu_end - cpu_start,
        requests_total: i as u64,
        lag_ns: None,
        unfinished: 0,
        settled: None,
    }
}

/// A node's shared store, over an embedded store in a directory of its own that goes with it,
/// with its maintenance loop (which sends the settlements no admission carried).
struct Node {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    maintain: JoinHandle<()>,
    /// Declared after `shared`, so the store is closed before its directory is removed.
    _dir: tempfile::TempDir,
}

impl Node {
    async fn open(url: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let settings = StoreSettings {
            backend: Backend::Redis,
            urls: vec![url.to_owned()],
            prefix: format!("bench{}:", std::process::id()),
            decision_timeout: DECISION_TIMEOUT,
            ..StoreSettings::default()
        };
        let shared = Shared::open(&settings, store).await.expect("shared store");
        assert!(shared.health.is_up(), "Redis at {url} does not answer");
        let (shutdown, rx) = watch::channel(false);
        let maintain = tokio::spawn(shared.clone().maintain(rx));
        Self {
            shared,
            shutdown,
            maintain,
            _dir: dir,
        }
    }

    /// Shuts the node down as the daemon does (every settlement still waiting is written),
    /// then checks Redis's month counters against what the admitted requests used.
    async fn finish(self, work: &Work) -> Settled {
        self.shutdown.send_replace(true);
        self.maintain.await.expect("the maintenance loop panicked");
        let status = self.shared.status();
        let admitted = work.admitted.load(Ordering::Relaxed);
        // This month's counters: a run across the end of a month would be misread.
        let today = Today::now();
        let mut counted: u64 = 0;
        let mut error = (status.retries_pending > 0)
            .then(|| format!("{} settlements not written", status.retries_pending));
        for tenant in &work.tenants {
            match self.shared.month_used(tenant, &today).await {
                Ok(used) => counted += used,
                Err(e) => {
                    error.get_or_insert(format!("reading {tenant}'s month counter: {e}"));
                }
            }
        }
        let expected = admitted * USED;
        let wrong = expected.abs_diff(counted).div_ceil(USED);
        if wrong > 0 {
            error.get_or_insert(format!(
                "settlement: the month counters hold {counted} tokens, the {admitted} \
                 admitted requests used {expected}"
            ));
        }
        Settled {
            carried_share: status.settlements_carried as f64 / admitted.max(1) as f64,
            wrong,
            error,
        }
    }
}

/// One request against Redis, as the gateway makes it: admission, then its settlement handed
/// over.
async fn decide(shared: &Arc<Shared>, work: &Work, i: usize) -> Outcome {
    let t0 = now_ns();
    match shared.admit(&work.demand(i)).await {
        Ok(Ok(admission)) => {
            let t1 = now_ns();
            work.admitted.fetch_add(1, Ordering::Relaxed);
            admission.settle(USED);
            Outcome::Decided { admit_ns: t1 - t0 }
        }
        Ok(Err(_)) => Outcome::Refused,
        Err(e) => Outcome::AdmitFailed {
            error: e.to_string(),
        },
    }
}

/// `tasks` requests at a time (1: sequential), each task starting its next one when its last
/// is settled, until the window ends.
async fn closed_loop(a: &Args, tasks: usize) -> Run {
    let node = Node::open(&a.url).await;
    let work = Arc::new(Work::new(a.tenants));
    let window_start = now_ns() + secs_ns(a.warmup);
    let end = window_start + secs_ns(a.seconds);
    let next = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for _ in 0..tasks {
        let (shared, work, next) = (node.shared.clone(), work.clone(), next.clone());
        set.spawn(async move {
            let mut tally = Tally::default();
            let mut first_ns = u64::MAX;
            let mut last_ns = 0;
            loop {
                let started = now_ns();
                if started >= end {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let outcome = decide(&shared, &work, i).await;
                if started >= window_start {
                    first_ns = first_ns.min(started);
                    last_ns = now_ns();
                    tally.add(outcome);
                }
            }
            (tally, first_ns, last_ns)
        });
    }
    // CPU from the window's start (to the timer's millisecond, against seconds of window).
    tokio::time::sleep(Duration::from_nanos(window_start.saturating_sub(now_ns()))).await;
    let cpu_start = process_cpu_secs();
    let mut tally = Tally::default();
    let (mut first_ns, mut last_ns) = (u64::MAX, 0);
    while let Some(joined) = set.join_next().await {
        let (t, first, last) = joined.expect("a request task panicked");
        tally.merge(t);
        first_ns = first_ns.min(first);
        last_ns = last_ns.max(last);
    }
    let cpu_secs = process_cpu_secs() - cpu_start;
    let settled = node.finish(&work).await;
    Run {
        tally,
        window_ns: last_ns.saturating_sub(first_ns),
        cpu_secs,
        requests_total: next.load(Ordering::Relaxed),
        lag_ns: None,
        unfinished: 0,
        settled: Some(settled),
    }
}

/// One fixed-rate request's record.
struct Paced {
    counted: bool,
    lag_ns: u64,
    done_ns: u64,
    outcome: Outcome,
}

impl Paced {
    fn record(self, tally: &mut Tally, lags: &mut Vec<u64>, last_ns: &mut u64) {
        if self.counted {
            lags.push(self.lag_ns);
            *last_ns = (*last_ns).max(self.done_ns);
            tally.add(self.outcome);
        }
    }
}

async fn fixed_rate(a: &Args) -> Run {
    let node = Node::open(&a.url).await;
    let work = Arc::new(Work::new(a.tenants));
    let warmup = (a.warmup * a.rate).round() as u64;
    let total = warmup + (a.seconds * a.rate).round() as u64;
    let timer = Timer::new().expect("timerfd");
    let start = now_ns() + LEAD_IN.as_nanos() as u64;
    let due_at = |i: u64| start + (i as f64 * 1e9 / a.rate) as u64;
    let first_counted_due = due_at(warmup);

    let mut tally = Tally::default();
    let mut lags = Vec::with_capacity(total.saturating_sub(warmup) as usize);
    let mut last_ns = first_counted_due;
    let mut tasks = JoinSet::new();
    let mut cpu_start = None;
    let mut next = 0;
    while next < total {
        timer.sleep_until(due_at(next)).await.expect("timerfd");
        let now = now_ns();
        // Everything due by now goes out, late or not: the schedule never slips.
        while next < total && due_at(next) <= now {
            if next == warmup {
                cpu_start = Some(process_cpu_secs());
            }
            let (shared, work) = (node.shared.clone(), work.clone());
            let (i, due_ns, counted) = (next, due_at(next), next >= warmup);
            tasks.spawn(async move {
                // Sent now: the admission is timed from here, the wait for it was the
                // generator's.
                let sent_ns = now_ns();
                let outcome = decide(&shared, &work, i as usize).await;
                Paced {
                    counted,
                    lag_ns: sent_ns.saturating_sub(due_ns),
                    done_ns: now_ns(),
                    outcome,
                }
            });
            next += 1;
        }
        while let Some(joined) = tasks.try_join_next() {
            joined
                .expect("a request task panicked")
                .record(&mut tally, &mut lags, &mut last_ns);
        }
    }
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(joined) = tasks.join_next().await {
            joined
                .expect("a request task panicked")
                .record(&mut tally, &mut lags, &mut last_ns);
        }
    })
    .await;
    let cpu_secs = cpu_start.map_or(0.0, |c| process_cpu_secs() - c);
    // Unanswered: a decision gives up after DECISION_TIMEOUT, a settlement after the
    // background budget, so none should be; any is an error of the run.
    let unfinished = if drained.is_err() {
        let left = tasks.len() as u64;
        tasks.abort_all();
        left
    } else {
        0
    };
    let settled = node.finish(&work).await;
    Run {
        tally,
        window_ns: last_ns.saturating_sub(first_counted_due),
        cpu_secs,
        requests_total: total,
        lag_ns: Some(lags),
        unfinished,
        settled: Some(settled),
    }
}

/// A one-shot timerfd on CLOCK_MONOTONIC, awaited through the runtime's reactor.
struct Timer(AsyncFd<TimerHandle>);

struct TimerHandle(TimerFd);

impl AsRawFd for TimerHandle {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl Timer {
    fn new() -> io::Result<Self> {
        let fd = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        // SAFETY: the TimerFd owns its descriptor and closes it only when dropped, which is
        // when the AsyncFd holding it drops; as_raw_fd always returns that descriptor.
        let registered = unsafe { AsyncFd::register(TimerHandle(fd)) };
        Ok(Self(registered.map_err(io::Error::from)?))
    }

    /// Returns at `at_ns` (CLOCK_MONOTONIC), at once if that has passed.
    async fn sleep_until(&self, at_ns: u64) -> io::Result<()> {
        let at = TimeSpec::from_duration(Duration::from_nanos(at_ns));
        self.0.get_ref().0.set(
            Expiration::OneShot(at),
            TimerSetTimeFlags::TFD_TIMER_ABSTIME,
        )?;
        loop {
            let mut ready = self.0.readable().await?;
            // Reading the expiry count clears the readiness; EAGAIN means a stale wake-up.
            match ready.try_io(|fd| fd.get_ref().0.wait().map_err(io::Error::from)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

fn main() {
    let a = Arc::new(args());
    let run = if a.mode == "memory" {
        memory(&a)
    } else {
        // One worker: a node's gateway shares its CPU with everything else. The mode's own
        // loop runs on it too (spawned), not on the thread that waits for it.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let mode = a.clone();
        rt.block_on(async move {
            tokio::spawn(async move {
                match mode.mode.as_str() {
                    "sequential" => closed_loop(&mode, 1).await,
                    "pipelined" => closed_loop(&mode, mode.concurrency).await,
                    "rate" => fixed_rate(&mode).await,
                    other => panic!("unknown mode {other}"),
                }
            })
            .await
            .expect("the run panicked")
        })
    };
    let rate = (a.mode == "rate").then_some(a.rate);
    let report = run.report(&a.mode, rate);
    println!(
        "{}",
        serde_json::to_string(&report).expect("a report is JSON")
    );
}
