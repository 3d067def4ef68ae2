//! The cost of one in-memory limiter decision: admit (every level checked and charged at once)
//! and settle (tokens reconciled, slots released), as the gateway does per request.
//!
//! `cargo bench -p aiguard-daemon --bench limiter` (or `cargo xtask bench gateway`).
use std::{hint::black_box, sync::Arc, time::Duration};

use aiguard_daemon::{
    limits::{Demand, Limiter},
    tiers::{Limits, QuotaEnforcement, TenantPolicy},
};
use criterion::{Criterion, criterion_group, criterion_main};

fn policy() -> TenantPolicy {
    // Every limit set, so every check runs; high enough that the benchmark is never refused.
    TenantPolicy {
        tenant: Limits {
            requests_per_minute: Some(1_000_000_000),
            requests_per_day: Some(1_000_000_000),
            tokens_per_minute: Some(1_000_000_000),
            max_concurrent: Some(1_000_000),
        },
        per_key: Limits {
            requests_per_minute: Some(1_000_000_000),
            requests_per_day: None,
            tokens_per_minute: Some(1_000_000_000),
            max_concurrent: Some(1_000_000),
        },
        monthly_tokens: Some(u64::MAX / 2),
        quota: QuotaEnforcement::Hard,
    }
}

fn decisions(c: &mut Criterion) {
    let policy = policy();
    let limiter = Limiter::new();
    let tenants: Vec<String> = (0..1000).map(|i| format!("tenant-{i}")).collect();
    let keys: Vec<Arc<str>> = (0..1000).map(|i| format!("key_{i:012}").into()).collect();
    let demand = |i: usize| Demand {
        tenant: &tenants[i % 1000],
        key: &keys[i % 1000],
        policy: &policy,
        model: None,
        tokens: 100,
        min_tokens: 10,
        month: aiguard_daemon::usage::Today::now().month_index(),
        month_left: Duration::from_secs(86_400),
    };
    // Warm every tenant's state, as a running gateway has.
    for i in 0..1000 {
        limiter.admit(&demand(i)).expect("admitted").settle(100);
    }
    let mut i = 0usize;
    c.bench_function("admit+settle, 1000 tenants, all limits", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let a = limiter.admit(black_box(&demand(i))).expect("admitted");
            a.settle(black_box(80));
        })
    });
    c.bench_function("admit (decision), 1000 tenants, all limits", |b| {
        b.iter_batched(
            || {
                i = i.wrapping_add(1);
                i
            },
            |i| limiter.admit(black_box(&demand(i))).expect("admitted"),
            criterion::BatchSize::SmallInput,
        )
    });
    c.bench_function("admit only (refused: concurrency)", |b| {
        let tight = TenantPolicy {
            tenant: Limits {
                max_concurrent: Some(1),
                ..Limits::default()
            },
            ..policy.clone()
        };
        let k: Arc<str> = "k".into();
        let held = limiter
            .admit(&Demand {
                tenant: "busy",
                key: &k,
                policy: &tight,
                model: None,
                tokens: 0,
                min_tokens: 0,
                month: aiguard_daemon::usage::Today::now().month_index(),
                month_left: Duration::from_secs(86_400),
            })
            .expect("first");
        b.iter(|| {
            let r = limiter.admit(black_box(&Demand {
                tenant: "busy",
                key: &k,
                policy: &tight,
                model: None,
                tokens: 0,
                min_tokens: 0,
                month: aiguard_daemon::usage::Today::now().month_index(),
                month_left: Duration::from_secs(86_400),
            }));
            assert!(r.is_err());
        });
        drop(held);
    });
}

criterion_group!(benches, decisions);
criterion_main!(benches);
