//! The cost of one in-memory limiter decision ([`Limiter::admit`]: every level checked and
//! charged at once) and of its release ([`Admission::settle`]: tokens reconciled, slots
//! released), as the gateway pays them per request.
//!
//! `cargo bench -p aiguard-daemon --bench limiter`, or `cargo xtask bench gateway --only limiter`,
//! which runs this pinned to one CPU, reads each case's median from
//! `target/criterion/limiter/<case>/new/estimates.json` and reports it against the target (a
//! decision under 200 ns). The case names below are the ones xtask reads
//! (`xtask/src/bench/gateway/limiter.rs`): rename both together.
//!
//! Cases (group `limiter`), all with every limit set so every check runs: requests per minute
//! and per day, tokens per minute and concurrency at each level, and the monthly quota:
//! - `admit_tenant_key`: a decision on one key, tenant and key levels;
//! - `admit_tenant_key_model`: the same with the model level (the tier's
//!   `[tiers.T.models."M"]` limits, which the handler passes as `Demand::model`);
//! - `admit_1000_keys`: all three levels, each decision on the next of 1,000 keys (one tenant
//!   each, as the HTTP legs' load) in a shuffled order, so no two consecutive decisions share
//!   state. Its working set (~1,000 tenants' buckets) outgrows L1 but fits L2: a real request's
//!   parsing and proxying between two decisions evicts more, so this is a lower bound too;
//! - `admit_with_calendar`: `admit_tenant_key_model` with the `Demand` built as the handler
//!   builds it, reading the calendar per request (`Today::now()`, `month_left()`). The other
//!   decision cases build the month once, outside the timed loop: that is the limiter's own
//!   cost, and the difference is the handler's calendar read;
//! - `refuse_concurrency`: a decision refused at the tenant's concurrency limit;
//! - `settle`: the release alone (one key, three levels). It reads the calendar itself (the
//!   month a settlement counts into is the month it settles in), which is included;
//! - `admit_settle`, `admit_settle_1000_keys`: both, as one request pays them.
//!
//! Limits are within what the configuration accepts (1 to 1,000,000,000) and far above what a
//! run uses: every `CHUNK` decisions go to a fresh limiter (warmed: every tenant, key and model
//! seen, as a running gateway's are), untimed, so that a bucket never fills and every decision
//! takes the admitting path. The per-minute limits stay where `RateState` is computed in u64, as
//! it is for real tiers (above ~3e8 per minute it falls back to u128).
use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use aiguard_daemon::{
    limits::{Admission, Demand, Limiter},
    tiers::{Limits, QuotaEnforcement, TenantPolicy},
    usage::Today,
};
use criterion::{Criterion, criterion_group, criterion_main};

// The daemon's allocator (`src/main.rs`): a decision with a model level allocates the model's
// name for its admission, and the release frees it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Decisions per fresh limiter: 10,000 requests and 10M tokens per key, far below the limits.
const CHUNK: u64 = 10_000;
/// Admissions held at once while decisions are timed: as many as the HTTP load's connections.
/// Their release (settle on drop) is untimed, and measured by `settle`. The clock is read once
/// per batch of them: under 1 ns per decision.
const IN_FLIGHT: usize = 64;
/// Tokens each request reserves (prompt estimate + the most its completion may take), the least
/// it needs (its prompt), and what it turns out to have used.
const RESERVED: u64 = 1_000;
const PROMPT: u64 = 200;
const USED: u64 = 600;
const MODEL: &str = "llama-70b";

fn limits() -> Limits {
    Limits {
        requests_per_minute: Some(1_000_000),
        requests_per_day: Some(1_000_000_000),
        tokens_per_minute: Some(100_000_000),
        max_concurrent: Some(1_000_000),
    }
}

/// Keys, their tenants, the model level and the month, built once: what a decision is asked.
struct Workload {
    policy: TenantPolicy,
    model: Option<Limits>,
    tenants: Vec<String>,
    keys: Vec<Arc<str>>,
    /// The order decisions visit the keys in.
    order: Vec<usize>,
    month: u32,
    month_left: Duration,
}

impl Workload {
    fn new(keys: usize, with_model: bool) -> Self {
        let today = Today::now();
        // A fixed permutation (multiplicative stepping, coprime with 1,000): neighbours in time
        // are far apart in the key list.
        let step = (0..)
            .map(|s| 7919 + s)
            .find(|s| gcd(*s, keys) == 1)
            .expect("a step");
        Self {
            policy: TenantPolicy {
                tenant: limits(),
                per_key: limits(),
                monthly_tokens: Some(1 << 50),
                quota: QuotaEnforcement::Hard,
            },
            model: with_model.then(limits),
            tenants: (0..keys).map(|i| format!("tenant-{i:04}")).collect(),
            // Shaped like the key ring's ids (`key_` and 12 hex digits).
            keys: (0..keys)
                .map(|i| {
                    let id = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 16;
                    Arc::from(format!("key_{id:012x}"))
                })
                .collect(),
            order: (0..keys).map(|i| i * step % keys).collect(),
            month: today.month_index(),
            month_left: today.month_left(),
        }
    }

    /// The `n`th decision's demand, the month read before the timed loop.
    fn demand(&self, n: usize) -> Demand<'_> {
        self.demand_of(self.order[n])
    }

    /// A demand on the `k`th key.
    fn demand_of(&self, k: usize) -> Demand<'_> {
        Demand {
            tenant: &self.tenants[k],
            key: &self.keys[k],
            policy: &self.policy,
            model: self.model.as_ref().map(|l| (MODEL, l)),
            tokens: RESERVED,
            min_tokens: PROMPT,
            month: self.month,
            month_left: self.month_left,
        }
    }

    /// The `n`th decision's demand as the handler builds it: the calendar read per request.
    fn demand_now(&self, n: usize) -> Demand<'_> {
        let today = Today::now();
        Demand {
            month: today.month_index(),
            month_left: today.month_left(),
            ..self.demand(n)
        }
    }

    /// The decision after the `n`th (wrapping, without a division per decision).
    fn next(&self, n: usize) -> usize {
        if n + 1 == self.order.len() { 0 } else { n + 1 }
    }

    /// A limiter that has seen every tenant, key and model, as a running gateway's has. Keys
    /// are first seen in their own order, not the decisions': consecutive decisions do not find
    /// their state in consecutive allocations.
    fn warm_limiter(&self) -> Limiter {
        let limiter = Limiter::new();
        for k in 0..self.keys.len() {
            admitted(limiter.admit(&self.demand_of(k))).settle(USED);
        }
        limiter
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn admitted<E: std::fmt::Debug>(r: Result<Admission, E>) -> Admission {
    r.expect("admitted: the limits are far above what a chunk uses")
}

/// Whether the timed loop reads the calendar per decision, as the handler does.
#[derive(Clone, Copy)]
enum Calendar {
    Hoisted,
    PerRequest,
}

/// `iters` decisions, `IN_FLIGHT` at a time: the admissions are dropped (settled) outside the
/// timed part.
fn time_admits(w: &Workload, calendar: Calendar, iters: u64) -> Duration {
    let mut timed = Duration::ZERO;
    let mut held: Vec<Admission> = Vec::with_capacity(IN_FLIGHT);
    let mut n = 0;
    let mut left = iters;
    while left > 0 {
        let chunk = left.min(CHUNK);
        left -= chunk;
        let limiter = w.warm_limiter();
        let mut in_chunk = chunk;
        while in_chunk > 0 {
            let batch = in_chunk.min(IN_FLIGHT as u64);
            in_chunk -= batch;
            let start = Instant::now();
            for _ in 0..batch {
                let demand = match calendar {
                    Calendar::Hoisted => w.demand(n),
                    Calendar::PerRequest => w.demand_now(n),
                };
                held.push(admitted(limiter.admit(black_box(&demand))));
                n = w.next(n);
            }
            timed += start.elapsed();
            held.clear();
        }
    }
    timed
}

/// `iters` releases, `IN_FLIGHT` at a time, of admissions made outside the timed part.
fn time_settles(w: &Workload, iters: u64) -> Duration {
    let mut timed = Duration::ZERO;
    let mut held: Vec<Admission> = Vec::with_capacity(IN_FLIGHT);
    let mut n = 0;
    let mut left = iters;
    while left > 0 {
        let chunk = left.min(CHUNK);
        left -= chunk;
        let limiter = w.warm_limiter();
        let mut in_chunk = chunk;
        while in_chunk > 0 {
            let batch = in_chunk.min(IN_FLIGHT as u64);
            in_chunk -= batch;
            for _ in 0..batch {
                held.push(admitted(limiter.admit(&w.demand(n))));
                n = w.next(n);
            }
            let start = Instant::now();
            for admission in held.drain(..) {
                black_box(admission).settle(black_box(USED));
            }
            timed += start.elapsed();
        }
    }
    timed
}

/// `iters` requests' admission and release, one after the other.
fn time_requests(w: &Workload, iters: u64) -> Duration {
    let mut timed = Duration::ZERO;
    let mut n = 0;
    let mut left = iters;
    while left > 0 {
        let chunk = left.min(CHUNK);
        left -= chunk;
        let limiter = w.warm_limiter();
        let start = Instant::now();
        for _ in 0..chunk {
            admitted(limiter.admit(black_box(&w.demand(n)))).settle(black_box(USED));
            n = w.next(n);
        }
        timed += start.elapsed();
    }
    timed
}

fn decisions(c: &mut Criterion) {
    let one_key = Workload::new(1, false);
    let one_key_model = Workload::new(1, true);
    let spread = Workload::new(1_000, true);
    let mut group = c.benchmark_group("limiter");

    group.bench_function("admit_tenant_key", |b| {
        b.iter_custom(|iters| time_admits(&one_key, Calendar::Hoisted, iters))
    });
    group.bench_function("admit_tenant_key_model", |b| {
        b.iter_custom(|iters| time_admits(&one_key_model, Calendar::Hoisted, iters))
    });
    group.bench_function("admit_1000_keys", |b| {
        b.iter_custom(|iters| time_admits(&spread, Calendar::Hoisted, iters))
    });
    group.bench_function("admit_with_calendar", |b| {
        b.iter_custom(|iters| time_admits(&one_key_model, Calendar::PerRequest, iters))
    });
    group.bench_function("refuse_concurrency", |b| {
        // The tenant's one slot held: every decision is refused at the first check, and a
        // refusal charges nothing, so one limiter serves the whole run.
        let mut full = Workload::new(1, true);
        full.policy.tenant.max_concurrent = Some(1);
        let limiter = Limiter::new();
        let _held = admitted(limiter.admit(&full.demand(0)));
        let demand = full.demand(0);
        b.iter(|| {
            let refused = limiter.admit(black_box(&demand));
            assert!(refused.is_err(), "the tenant's only slot is held");
        })
    });
    group.bench_function("settle", |b| {
        b.iter_custom(|iters| time_settles(&one_key_model, iters))
    });
    group.bench_function("admit_settle", |b| {
        b.iter_custom(|iters| time_requests(&one_key_model, iters))
    });
    group.bench_function("admit_settle_1000_keys", |b| {
        b.iter_custom(|iters| time_requests(&spread, iters))
    });
    group.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
