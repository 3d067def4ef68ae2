//! In-memory request limits: requests per minute and per day, tokens per minute, concurrency and
//! the monthly token quota, at three levels (tenant, key, model), decided all at once.
//!
//! Rates are GCRA buckets (one "theoretical arrival time" per bucket): a limit of N per period
//! admits N at once and then refills one every period/N, exactly, with no window edges to game.
//! Token buckets take the reservation as their cost and give back what a response did not use.
//!
//! One mutex per tenant holds every bucket of the tenant, its keys and its models, so a
//! decision over all levels is atomic (no level is charged for a request another level refused)
//! and tenants never contend with each other.
// Fx hashing: tenant names and key ids come from the operator and the key ring, not from
// clients, so a hash-flooding defence is not needed, and Fx is several times faster on short
// strings.
use rustc_hash::FxHashMap;
use std::{
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use serde::Serialize;

use crate::tiers::{Limits, QuotaEnforcement, TenantPolicy};

const MINUTE_NS: u64 = 60_000_000_000;
const DAY_NS: u64 = 86_400_000_000_000;

/// A GCRA bucket: `limit` units per `period`, all of which may be spent at once.
#[derive(Debug, Clone, Copy, Default)]
struct Gcra {
    /// When the bucket will be full again (ns on the limiter's clock); ≤ now means full.
    tat: u64,
    /// The limit `tat` was charged under (0: never charged). When a reload changes the limit,
    /// the units in use are kept and re-timed to the new limit, so that raising a limit takes
    /// effect at once instead of after the old, slower refill.
    limit: u64,
}

/// What a limit is at one moment, for the rate-limit headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RateState {
    pub limit: u64,
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

impl Gcra {
    /// Time `cost` units occupy in a bucket of `limit` per `period` (rounded up, so that N
    /// units of a limit N never fit more than N).
    fn weight(cost: u64, limit: u64, period: u64) -> u64 {
        // u64 arithmetic when it fits (always, for sane limits): a u128 division is a
        // library call several times slower, and this runs for every bucket of every request.
        match cost.checked_mul(period) {
            Some(p) => p.div_ceil(limit),
            None => {
                let w = (u128::from(cost) * u128::from(period)).div_ceil(u128::from(limit));
                u64::try_from(w).unwrap_or(u64::MAX)
            }
        }
    }

    /// The arrival time as if every unit in use had been charged under `limit`.
    fn tat_for(&self, now: u64, limit: u64) -> u64 {
        if self.limit == limit || self.limit == 0 || self.tat <= now {
            return self.tat;
        }
        let in_use = u128::from(self.tat - now) * u128::from(self.limit) / u128::from(limit);
        now.saturating_add(u64::try_from(in_use).unwrap_or(u64::MAX))
    }

    fn set(&mut self, tat: u64, limit: u64) {
        self.tat = tat;
        self.limit = limit;
    }

    /// The new arrival time if `cost` is admitted now, or how long until it would be.
    fn try_take(&self, now: u64, cost: u64, limit: u64, period: u64) -> Result<u64, Duration> {
        let tat = self
            .tat_for(now, limit)
            .max(now)
            .saturating_add(Self::weight(cost, limit, period));
        let ahead = tat - now;
        if ahead <= period {
            Ok(tat)
        } else {
            Err(Duration::from_nanos(ahead - period))
        }
    }

    /// Gives back `cost` units (never filling beyond full).
    fn give_back(&mut self, now: u64, cost: u64, limit: u64, period: u64) {
        let tat = self.tat_for(now, limit);
        self.set(tat, limit);
        if self.tat > now {
            self.tat = self
                .tat
                .saturating_sub(Self::weight(cost, limit, period))
                .max(now);
        }
    }

    /// Charges `cost` more units unconditionally (a response that used more than reserved).
    fn charge(&mut self, now: u64, cost: u64, limit: u64, period: u64) {
        let tat = self.tat_for(now, limit);
        self.set(tat, limit);
        self.tat = self
            .tat
            .max(now)
            .saturating_add(Self::weight(cost, limit, period));
    }

    fn state(&self, now: u64, limit: u64, period: u64) -> RateState {
        let tat = self.tat_for(now, limit);
        let used_ns = tat.saturating_sub(now).min(period);
        let free_ns = period - used_ns;
        let remaining = match free_ns.checked_mul(limit) {
            Some(x) => x / period,
            None => (u128::from(free_ns) * u128::from(limit) / u128::from(period)) as u64,
        };
        RateState {
            limit,
            remaining,
            reset: Duration::from_nanos(tat.saturating_sub(now)),
        }
    }
}

/// The buckets of one level (a tenant, a key, or a tenant's use of one model).
#[derive(Debug, Clone, Default)]
struct Buckets {
    per_minute: Gcra,
    per_day: Gcra,
    tokens: Gcra,
    in_flight: u64,
}

/// Which level a limit belongs to, for answers and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Tenant,
    Key,
    Model,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Tenant => "tenant",
            Level::Key => "key",
            Level::Model => "model",
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// A requests-per-minute or per-day limit.
    Requests {
        level: Level,
        per: &'static str,
        limit: u64,
        retry_after: Duration,
    },
    /// Tokens per minute.
    Tokens {
        level: Level,
        limit: u64,
        requested: u64,
        retry_after: Duration,
    },
    /// The request alone needs more tokens than the per-minute limit ever allows.
    TooLarge {
        level: Level,
        limit: u64,
        requested: u64,
    },
    /// Too many requests in flight.
    Concurrency { level: Level, limit: u64 },
    /// The monthly token quota is spent (or this request would pass it).
    Quota {
        limit: u64,
        used: u64,
        requested: u64,
        resets_in: Duration,
    },
}

/// What one request asks of the limiter.
#[derive(Debug, Clone)]
pub struct Demand<'a> {
    pub tenant: &'a str,
    pub key: &'a Arc<str>,
    pub policy: &'a TenantPolicy,
    /// The model and its limits, when the tier limits that model.
    pub model: Option<(&'a str, &'a Limits)>,
    /// Tokens reserved: estimated prompt plus the most the completion may take.
    pub tokens: u64,
    /// The least the request needs (its prompt): a monthly quota with less than this left
    /// refuses it; with more, the request is admitted with what is left, and a stream that runs
    /// out is ended.
    pub min_tokens: u64,
    /// The calendar month (UTC) the request counts towards, as `YYYY*12 + month-1`.
    pub month: u32,
    /// Until that month ends.
    pub month_left: Duration,
}

#[derive(Debug, Default)]
struct MonthUsage {
    month: u32,
    /// Tokens settled this month (persisted through the usage ledger).
    used: u64,
    /// Tokens reserved by requests in flight.
    reserved: u64,
}

#[derive(Debug, Default)]
struct TenantState {
    tenant: Buckets,
    keys: FxHashMap<Arc<str>, Buckets>,
    models: FxHashMap<Box<str>, Buckets>,
    month: MonthUsage,
}

impl TenantState {
    fn roll_month(&mut self, month: u32) {
        if self.month.month != month {
            // Reservations made last month settle into this one: keep them reserved.
            self.month = MonthUsage {
                month,
                used: 0,
                reserved: self.month.reserved,
            };
        }
    }
}

/// Where the limiter reads time: the system's monotonic clock, or tokio's (which tests can
/// pause and advance).
#[derive(Debug, Clone, Copy)]
enum Clock {
    System(std::time::Instant),
    Tokio(tokio::time::Instant),
}

impl Clock {
    /// Nanoseconds since the limiter started, offset by a day so that a fresh bucket (arrival
    /// time 0) is full from the start.
    fn now_ns(&self) -> u64 {
        let elapsed = match self {
            Clock::System(epoch) => epoch.elapsed(),
            Clock::Tokio(epoch) => epoch.elapsed(),
        };
        elapsed.as_nanos() as u64 + DAY_NS
    }
}

/// The limits of every tenant on this node.
#[derive(Debug)]
pub struct Limiter {
    tenants: RwLock<FxHashMap<Box<str>, Arc<Mutex<TenantState>>>>,
    clock: Clock,
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new()
    }
}

/// Rate-limit state after an admission, for the `x-ratelimit-*` headers: the tightest
/// requests-per-minute and tokens-per-minute limit that applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateHeaders {
    pub requests: Option<RateState>,
    pub tokens: Option<RateState>,
}

/// A request admitted: it holds its concurrency slots and its token reservation until
/// [`Admission::settle`] (or drop, which settles with nothing used beyond the reservation's
/// prompt estimate: an abandoned request still cost the upstream its prompt).
#[derive(Debug)]
pub struct Admission {
    state: Arc<Mutex<TenantState>>,
    clock: Clock,
    key: Arc<str>,
    model: Option<Box<str>>,
    limits: AdmittedLimits,
    reserved: u64,
    /// What the monthly quota holds for this request (the reservation, or what was left).
    quota_reserved: u64,
    monthly_limit: Option<u64>,
    quota: QuotaEnforcement,
    pub headers: RateHeaders,
    settled: bool,
}

/// The limits in force when the request was admitted: settling uses the same ones, so a reload
/// in between cannot unbalance the buckets.
#[derive(Debug, Clone)]
struct AdmittedLimits {
    tenant: Limits,
    key: Limits,
    model: Option<Limits>,
}

impl Limiter {
    pub fn new() -> Self {
        Self {
            tenants: RwLock::default(),
            clock: Clock::System(std::time::Instant::now()),
        }
    }

    /// A limiter on tokio's clock, for tests that pause and advance time.
    pub fn with_tokio_clock() -> Self {
        Self {
            tenants: RwLock::default(),
            clock: Clock::Tokio(tokio::time::Instant::now()),
        }
    }

    fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    fn tenant(&self, tenant: &str) -> Arc<Mutex<TenantState>> {
        if let Some(s) = self
            .tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
        {
            return s.clone();
        }
        self.tenants
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(tenant.into())
            .or_default()
            .clone()
    }

    /// Sets a tenant's settled usage for `month` (from the store, at start-up).
    pub fn preload_month(&self, tenant: &str, month: u32, used: u64) {
        let state = self.tenant(tenant);
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.roll_month(month);
        s.month.used = used;
    }

    /// A tenant's monthly usage: (settled, reserved in flight).
    pub fn month_usage(&self, tenant: &str, month: u32) -> (u64, u64) {
        let state = self.tenant(tenant);
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.roll_month(month);
        (s.month.used, s.month.reserved)
    }

    /// Admits a request against every limit at once, or refuses it and charges nothing.
    pub fn admit(&self, d: &Demand<'_>) -> Result<Admission, Denial> {
        let now = self.now_ns();
        let state = self.tenant(d.tenant);
        // A std mutex: held for a few hundred nanoseconds, never across an await.
        let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut *guard;
        s.roll_month(d.month);
        if !s.keys.contains_key(&**d.key) {
            s.keys.insert(d.key.clone(), Buckets::default());
        }
        if let Some((m, _)) = d.model
            && !s.models.contains_key(m)
        {
            s.models.insert(m.into(), Buckets::default());
        }
        let key_buckets = s.keys.get_mut(&**d.key).expect("inserted above");
        let model_level = match d.model {
            Some((m, limits)) => s.models.get_mut(m).map(|b| (Level::Model, limits, b)),
            None => None,
        };
        // At most three levels: a fixed array, no allocation per decision.
        let mut levels: [Option<(Level, &Limits, &mut Buckets)>; 3] = [
            Some((Level::Tenant, &d.policy.tenant, &mut s.tenant)),
            Some((Level::Key, &d.policy.per_key, key_buckets)),
            model_level,
        ];

        // Concurrency first: it is the cheapest answer and does not depend on time.
        for (level, limits, b) in levels.iter().flatten() {
            if let Some(max) = limits.max_concurrent
                && b.in_flight >= max
            {
                return Err(Denial::Concurrency {
                    level: *level,
                    limit: max,
                });
            }
        }
        let mut quota_reserved = d.tokens;
        if let Some(limit) = d.policy.monthly_tokens {
            let committed = s.month.used.saturating_add(s.month.reserved);
            let left = limit.saturating_sub(committed);
            if left == 0 || left < d.min_tokens.max(1) {
                return Err(Denial::Quota {
                    limit,
                    used: s.month.used,
                    requested: d.min_tokens.max(1),
                    resets_in: d.month_left,
                });
            }
            quota_reserved = d.tokens.min(left);
        }
        // Compute every new arrival time before changing any: all levels or none.
        let mut new_tats = [[None; 3]; 3];
        for ((level, limits, b), tats) in levels.iter().flatten().zip(new_tats.iter_mut()) {
            if let Some(limit) = limits.requests_per_minute {
                tats[0] = Some(b.per_minute.try_take(now, 1, limit, MINUTE_NS).map_err(
                    |retry_after| Denial::Requests {
                        level: *level,
                        per: "minute",
                        limit,
                        retry_after,
                    },
                )?);
            }
            if let Some(limit) = limits.requests_per_day {
                tats[1] = Some(b.per_day.try_take(now, 1, limit, DAY_NS).map_err(
                    |retry_after| Denial::Requests {
                        level: *level,
                        per: "day",
                        limit,
                        retry_after,
                    },
                )?);
            }
            if let Some(limit) = limits.tokens_per_minute {
                if d.tokens > limit {
                    return Err(Denial::TooLarge {
                        level: *level,
                        limit,
                        requested: d.tokens,
                    });
                }
                tats[2] = Some(b.tokens.try_take(now, d.tokens, limit, MINUTE_NS).map_err(
                    |retry_after| Denial::Tokens {
                        level: *level,
                        limit,
                        requested: d.tokens,
                        retry_after,
                    },
                )?);
            }
        }
        let mut headers = RateHeaders::default();
        for ((_, limits, b), tats) in levels.iter_mut().flatten().zip(new_tats) {
            if let (Some(t), Some(l)) = (tats[0], limits.requests_per_minute) {
                b.per_minute.set(t, l);
            }
            if let (Some(t), Some(l)) = (tats[1], limits.requests_per_day) {
                b.per_day.set(t, l);
            }
            if let (Some(t), Some(l)) = (tats[2], limits.tokens_per_minute) {
                b.tokens.set(t, l);
            }
            b.in_flight += 1;
            if let Some(limit) = limits.requests_per_minute {
                tighter(
                    &mut headers.requests,
                    b.per_minute.state(now, limit, MINUTE_NS),
                );
            }
            if let Some(limit) = limits.tokens_per_minute {
                tighter(&mut headers.tokens, b.tokens.state(now, limit, MINUTE_NS));
            }
        }
        s.month.reserved = s.month.reserved.saturating_add(quota_reserved);
        drop(guard);
        Ok(Admission {
            state,
            clock: self.clock,
            key: d.key.clone(),
            model: d.model.map(|(m, _)| m.into()),
            limits: AdmittedLimits {
                tenant: d.policy.tenant.clone(),
                key: d.policy.per_key.clone(),
                model: d.model.map(|(_, l)| l.clone()),
            },
            reserved: d.tokens,
            quota_reserved,
            monthly_limit: d.policy.monthly_tokens,
            quota: d.policy.quota,
            headers,
            settled: false,
        })
    }

    /// The current requests/tokens state of a key, without taking anything (for headers on
    /// answers that were refused before admission).
    pub fn peek(
        &self,
        tenant: &str,
        key: &str,
        policy: &TenantPolicy,
        model: Option<(&str, &Limits)>,
    ) -> RateHeaders {
        let now = self.now_ns();
        let state = self.tenant(tenant);
        let s = state.lock().unwrap_or_else(|p| p.into_inner());
        let mut headers = RateHeaders::default();
        let key_b = s.keys.get(key).cloned().unwrap_or_default();
        let unlimited = Limits::default();
        let (model_limits, model_b) = match model {
            Some((m, limits)) => (limits, s.models.get(m).cloned().unwrap_or_default()),
            None => (&unlimited, Buckets::default()),
        };
        for (limits, b) in [
            (&policy.tenant, &s.tenant),
            (&policy.per_key, &key_b),
            (model_limits, &model_b),
        ] {
            if let Some(limit) = limits.requests_per_minute {
                tighter(
                    &mut headers.requests,
                    b.per_minute.state(now, limit, MINUTE_NS),
                );
            }
            if let Some(limit) = limits.tokens_per_minute {
                tighter(&mut headers.tokens, b.tokens.state(now, limit, MINUTE_NS));
            }
        }
        headers
    }
}

/// Keeps the state with the fewest remaining (the limit a client will hit first).
fn tighter(slot: &mut Option<RateState>, candidate: RateState) {
    match slot {
        Some(cur) if cur.remaining <= candidate.remaining => {}
        _ => *slot = Some(candidate),
    }
}

/// Whether a running response may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Continue,
    /// The hard monthly quota is spent: end the response.
    QuotaExhausted {
        limit: u64,
    },
}

impl Admission {
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    pub fn quota_enforcement(&self) -> QuotaEnforcement {
        self.quota
    }

    fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    /// A streaming response has used `tokens` so far (prompt + completion). Grows the
    /// reservation when it passes it; says when a hard monthly quota has none left to give.
    pub fn progress(&mut self, tokens: u64) -> Progress {
        if tokens <= self.quota_reserved {
            return Progress::Continue;
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.roll_month(crate::usage::Today::now().month_index());
        let extra = tokens - self.quota_reserved;
        if let Some(limit) = self.monthly_limit
            && self.quota == QuotaEnforcement::Hard
            && s.month
                .used
                .saturating_add(s.month.reserved)
                .saturating_add(extra)
                > limit
        {
            return Progress::QuotaExhausted { limit };
        }
        s.month.reserved = s.month.reserved.saturating_add(extra);
        self.quota_reserved = tokens;
        Progress::Continue
    }

    /// Settles the request with the tokens it really used: the monthly quota and the
    /// token buckets are charged that, the rest of the reservation is given back, and the
    /// concurrency slots are released.
    pub fn settle(mut self, used: u64) {
        self.finish(used);
    }

    fn finish(&mut self, used: u64) {
        if self.settled {
            return;
        }
        self.settled = true;
        let now = self.now_ns();
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut *guard;
        // Counted in the month it is now: a request admitted just before midnight on the last
        // day settles into the new month, like its usage record.
        s.roll_month(crate::usage::Today::now().month_index());
        s.month.used = s.month.used.saturating_add(used);
        s.month.reserved = s.month.reserved.saturating_sub(self.quota_reserved);
        let adjust = |limits: &Limits, b: &mut Buckets| {
            b.in_flight = b.in_flight.saturating_sub(1);
            if let Some(limit) = limits.tokens_per_minute {
                if used < self.reserved {
                    b.tokens
                        .give_back(now, self.reserved - used, limit, MINUTE_NS);
                } else if used > self.reserved {
                    b.tokens.charge(now, used - self.reserved, limit, MINUTE_NS);
                }
            }
        };
        adjust(&self.limits.tenant, &mut s.tenant);
        if let Some(b) = s.keys.get_mut(&self.key) {
            adjust(&self.limits.key, b);
        }
        if let (Some(m), Some(limits)) = (&self.model, &self.limits.model)
            && let Some(b) = s.models.get_mut(m)
        {
            adjust(limits, b);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        // Not settled: the request was abandoned before any usage was known. Keep what the
        // quota held for it charged: the upstream may have done the work.
        let reserved = self.reserved.min(self.quota_reserved);
        self.finish(reserved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(tenant: Limits, per_key: Limits, monthly: Option<u64>) -> TenantPolicy {
        TenantPolicy {
            tenant,
            per_key,
            monthly_tokens: monthly,
            quota: QuotaEnforcement::Hard,
        }
    }

    fn demand<'a>(p: &'a TenantPolicy, key: &str, tokens: u64) -> Demand<'a> {
        Demand {
            tenant: "acme",
            key: Box::leak(Box::new(Arc::from(key))),
            policy: p,
            model: None,
            tokens,
            min_tokens: 0,
            month: this_month(),
            month_left: Duration::from_secs(3600),
        }
    }

    /// Settlements count into the month it is now, so tests admit in it too.
    fn this_month() -> u32 {
        crate::usage::Today::now().month_index()
    }

    fn rpm(n: u64) -> Limits {
        Limits {
            requests_per_minute: Some(n),
            ..Limits::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn requests_per_minute_admits_the_limit_then_refills_evenly() {
        let l = Limiter::with_tokio_clock();
        let p = policy(rpm(10), Limits::default(), None);
        let admitted: Vec<_> = (0..20)
            .filter_map(|_| l.admit(&demand(&p, "k", 0)).ok())
            .collect();
        assert_eq!(admitted.len(), 10);
        let Err(Denial::Requests { retry_after, .. }) = l.admit(&demand(&p, "k", 0)) else {
            panic!("the 11th request must be refused")
        };
        assert_eq!(retry_after, Duration::from_secs(6));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(l.admit(&demand(&p, "k", 0)).is_ok());
        assert!(l.admit(&demand(&p, "k", 0)).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn key_sub_limit_and_tenant_limit_both_hold_and_refusals_charge_nothing() {
        let l = Limiter::with_tokio_clock();
        let p = policy(rpm(5), rpm(3), None);
        let a: Vec<_> = (0..10)
            .filter_map(|_| l.admit(&demand(&p, "k1", 0)).ok())
            .collect();
        assert_eq!(a.len(), 3, "key sub-limit");
        // The key's refusals did not use the tenant's allowance: k2 gets the remaining 2.
        let b: Vec<_> = (0..10)
            .filter_map(|_| l.admit(&demand(&p, "k2", 0)).ok())
            .collect();
        assert_eq!(b.len(), 2, "tenant limit shared by its keys");
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_are_reserved_then_refunded() {
        let l = Limiter::with_tokio_clock();
        let p = policy(
            Limits {
                tokens_per_minute: Some(1000),
                ..Limits::default()
            },
            Limits::default(),
            None,
        );
        let a = l.admit(&demand(&p, "k", 600)).expect("fits");
        assert!(matches!(
            l.admit(&demand(&p, "k", 600)),
            Err(Denial::Tokens { .. })
        ));
        a.settle(100);
        // 100 used: 900 left.
        assert!(l.admit(&demand(&p, "k", 900)).is_ok());
        assert!(matches!(
            l.admit(&demand(&p, "k", 2000)),
            Err(Denial::TooLarge { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_slots_are_released_on_settle_and_drop() {
        let l = Limiter::with_tokio_clock();
        let p = policy(
            Limits {
                max_concurrent: Some(2),
                ..Limits::default()
            },
            Limits::default(),
            None,
        );
        let a = l.admit(&demand(&p, "k", 0)).expect("1");
        let b = l.admit(&demand(&p, "k", 0)).expect("2");
        assert!(matches!(
            l.admit(&demand(&p, "k", 0)),
            Err(Denial::Concurrency { .. })
        ));
        a.settle(0);
        let c = l.admit(&demand(&p, "k", 0)).expect("slot freed by settle");
        drop(b);
        drop(c);
        assert!(l.admit(&demand(&p, "k", 0)).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn monthly_quota_counts_reservations_and_settled_usage() {
        let l = Limiter::with_tokio_clock();
        let p = policy(Limits::default(), Limits::default(), Some(1000));
        l.preload_month("acme", this_month(), 500);
        let a = l.admit(&demand(&p, "k", 400)).expect("500 + 400 fits");
        // 100 left: a request whose prompt alone needs 150 is refused...
        let mut big = demand(&p, "k", 200);
        big.min_tokens = 150;
        assert!(matches!(l.admit(&big), Err(Denial::Quota { .. })));
        // ...one that needs 50 is admitted with the 100 that are left.
        big.min_tokens = 50;
        let mut b = l.admit(&big).expect("admitted with what is left");
        assert_eq!(l.month_usage("acme", this_month()), (500, 500));
        assert_eq!(b.progress(100), Progress::Continue);
        assert_eq!(b.progress(101), Progress::QuotaExhausted { limit: 1000 });
        a.settle(300);
        // a gave back 100: b may grow into it.
        assert_eq!(b.progress(200), Progress::Continue);
        b.settle(200);
        assert_eq!(l.month_usage("acme", this_month()), (1000, 0));
        assert!(matches!(
            l.admit(&demand(&p, "k", 1)),
            Err(Denial::Quota { .. })
        ));
        // A new month starts from zero.
        assert_eq!(l.month_usage("acme", this_month() + 1).0, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_raised_limit_applies_at_once() {
        let l = Limiter::with_tokio_clock();
        let one = policy(rpm(1), Limits::default(), None);
        assert!(l.admit(&demand(&one, "k", 0)).is_ok());
        assert!(l.admit(&demand(&one, "k", 0)).is_err());
        // Reloaded to 100/min: the one request in use is 1 of 100, not 1 of 1.
        let hundred = policy(rpm(100), Limits::default(), None);
        let admitted = (0..200)
            .filter(|_| l.admit(&demand(&hundred, "k", 0)).is_ok())
            .count();
        assert_eq!(admitted, 99);
    }

    #[tokio::test(start_paused = true)]
    async fn headers_report_the_tightest_limit() {
        let l = Limiter::with_tokio_clock();
        let p = policy(rpm(100), rpm(4), None);
        let a = l.admit(&demand(&p, "k", 0)).expect("ok");
        let r = a.headers.requests.expect("requests limited");
        assert_eq!((r.limit, r.remaining), (4, 3));
        assert_eq!(r.reset, Duration::from_secs(15));
    }
}
