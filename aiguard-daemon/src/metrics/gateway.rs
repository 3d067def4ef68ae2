//! The request path's metrics. Requests, tokens, in-flight requests and upstream latency are
//! counted by the gateway as they happen (nothing else keeps them per tier); monthly quota use
//! lives in the limiter and is read at scrape time.
use std::{
    collections::BTreeMap,
    sync::{Arc, OnceLock, RwLock},
    time::Instant,
};

use rustc_hash::FxHashMap;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    core::{Collector, Desc},
    proto::MetricFamily,
};

use super::families::{self, Spec};
use crate::{gateway::Gateway, usage::Today};

/// The `tier` label of requests refused before a key said which tier they are in.
pub const NO_TIER: &str = "none";

/// How a request through the gateway ended: exactly one per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Admitted, and the upstream answered (any status below 500).
    Allowed,
    /// Over a rate or concurrency limit (429).
    RateLimited,
    /// Over the monthly quota (429 `insufficient_quota`).
    QuotaExceeded,
    /// No key, or an unknown or revoked one (401).
    Unauthorized,
    /// Malformed: key header, method, body (400, 405, 408, 413).
    BadRequest,
    /// Admitted, but the upstream could not be reached, timed out or answered 5xx.
    UpstreamError,
    /// The shared store could not decide and the tier fails closed (503).
    StoreUnavailable,
    /// Admitted by its limits, but shed while waiting for an upstream slot: the tier's queue
    /// was full or its wait ran out (429, or 503 when the upstream itself is saturated).
    QueueFull,
    /// A challenged source without a valid proof of work (428).
    Challenged,
    /// A suspended key (403).
    Suspended,
}

impl Outcome {
    pub const ALL: [Outcome; 10] = [
        Outcome::Allowed,
        Outcome::RateLimited,
        Outcome::QuotaExceeded,
        Outcome::Unauthorized,
        Outcome::BadRequest,
        Outcome::UpstreamError,
        Outcome::StoreUnavailable,
        Outcome::QueueFull,
        Outcome::Challenged,
        Outcome::Suspended,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::RateLimited => "rate_limited",
            Outcome::QuotaExceeded => "quota_exceeded",
            Outcome::Unauthorized => "unauthorized",
            Outcome::BadRequest => "bad_request",
            Outcome::UpstreamError => "upstream_error",
            Outcome::StoreUnavailable => "store_unavailable",
            Outcome::QueueFull => "queue_full",
            Outcome::Challenged => "challenged",
            Outcome::Suspended => "suspended",
        }
    }
}

/// Upstream response-head latency buckets, seconds: 5 ms to about 5 min (an LLM's time to
/// first byte ranges from milliseconds for a cached embedding to minutes for a long prompt).
const UPSTREAM_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// The gateway's own counters. Cloning a handle shares the series.
#[derive(Debug, Clone)]
pub struct GatewayMetrics {
    requests: IntCounterVec,
    tokens: IntCounterVec,
    in_flight: IntGauge,
    upstream_seconds: Histogram,
    queue_wait: HistogramVec,
    /// Each tier's series, resolved once: a label lookup per request costs more than the
    /// counting. Bounded by the configured tiers.
    tiers: Arc<RwLock<FxHashMap<String, Arc<TierSeries>>>>,
}

/// One tier's request and token series. An outcome's series is made the first time it
/// happens (or at start, for those [`GatewayMetrics::add_tiers`] shows from zero).
#[derive(Debug)]
struct TierSeries {
    outcomes: [OnceLock<IntCounter>; Outcome::ALL.len()],
    tokens: TierTokens,
}

/// Queue-wait buckets, seconds: 1 ms to 1 min (the longest `max_queue_wait` is an hour, but
/// waits of more than a minute are rare and alike).
const QUEUE_WAIT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Token counters of one tier, resolved once per request.
#[derive(Debug, Clone)]
pub struct TierTokens {
    pub prompt: IntCounter,
    pub completion: IntCounter,
}

/// An admitted request being served: counted in `aiguard_gateway_in_flight_requests` until
/// dropped.
#[derive(Debug)]
pub struct InFlight(IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl GatewayMetrics {
    /// Counters with a zero series for every tier and outcome, so that rates start at zero
    /// rather than at a request's first appearance.
    pub fn new<'a>(tiers: impl IntoIterator<Item = &'a str>) -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "aiguard_gateway_requests_total",
                "Requests through the gateway by tier and outcome (one outcome per request; tier \"none\" before a key is known).",
            ),
            &["tier", "outcome"],
        )
        .expect("valid metric");
        let tokens = IntCounterVec::new(
            Opts::new(
                "aiguard_gateway_tokens_total",
                "Tokens settled by tier and kind (prompt, completion): reported by the upstream, else counted by the gateway.",
            ),
            &["tier", "kind"],
        )
        .expect("valid metric");
        let in_flight = IntGauge::new(
            "aiguard_gateway_in_flight_requests",
            "Admitted requests being served now (until their response body ends).",
        )
        .expect("valid metric");
        let upstream_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "aiguard_gateway_upstream_response_seconds",
                "Time from sending a request upstream to its response head (or the failure).",
            )
            .buckets(UPSTREAM_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let queue_wait = HistogramVec::new(
            HistogramOpts::new(
                "aiguard_gateway_queue_wait_seconds",
                "Time admitted requests waited for an upstream slot (gateway.upstream_slots), by tier and how the wait ended (slot, shed); requests that found a free slot count with 0.",
            )
            .buckets(QUEUE_WAIT_BUCKETS.to_vec()),
            &["tier", "result"],
        )
        .expect("valid metric");
        let m = Self {
            requests,
            tokens,
            in_flight,
            upstream_seconds,
            queue_wait,
            tiers: Arc::default(),
        };
        m.add_tiers(tiers);
        m
    }

    /// Zero series for tiers (again at reload, for tiers that are new).
    pub fn add_tiers<'a>(&self, tiers: impl IntoIterator<Item = &'a str>) {
        for o in [
            Outcome::Unauthorized,
            Outcome::BadRequest,
            Outcome::Challenged,
            Outcome::Suspended,
        ] {
            self.requests.with_label_values(&[NO_TIER, o.as_str()]);
        }
        for tier in tiers {
            for o in Outcome::ALL {
                if !matches!(
                    o,
                    Outcome::Unauthorized | Outcome::Challenged | Outcome::Suspended
                ) {
                    self.requests.with_label_values(&[tier, o.as_str()]);
                }
            }
            self.tier_tokens(tier);
            for result in ["slot", "shed"] {
                self.queue_wait.with_label_values(&[tier, result]);
            }
        }
    }

    /// How long a request waited for an upstream slot, and whether it got one.
    pub fn observe_queue_wait(&self, tier: &str, since: Instant, got_slot: bool) {
        let result = if got_slot { "slot" } else { "shed" };
        self.queue_wait
            .with_label_values(&[tier, result])
            .observe(since.elapsed().as_secs_f64());
    }

    fn series(&self, tier: &str) -> Arc<TierSeries> {
        if let Some(s) = self
            .tiers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(tier)
        {
            return s.clone();
        }
        let s = Arc::new(TierSeries {
            outcomes: Default::default(),
            tokens: TierTokens {
                prompt: self.tokens.with_label_values(&[tier, "prompt"]),
                completion: self.tokens.with_label_values(&[tier, "completion"]),
            },
        });
        self.tiers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(tier.to_owned())
            .or_insert(s)
            .clone()
    }

    /// Counts how a request ended.
    pub fn count(&self, tier: &str, outcome: Outcome) {
        self.series(tier).outcomes[outcome as usize]
            .get_or_init(|| self.requests.with_label_values(&[tier, outcome.as_str()]))
            .inc();
    }

    pub fn tier_tokens(&self, tier: &str) -> TierTokens {
        self.series(tier).tokens.clone()
    }

    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    pub fn observe_upstream(&self, since: Instant) {
        self.upstream_seconds.observe(since.elapsed().as_secs_f64());
    }

    /// The collectors the [`super::Exporter`] registers.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.requests.clone()),
            Box::new(self.tokens.clone()),
            Box::new(self.in_flight.clone()),
            Box::new(self.upstream_seconds.clone()),
            Box::new(self.queue_wait.clone()),
        ]
    }
}

const QUOTA_RATIO: Spec = Spec::new(
    "aiguard_tenant_monthly_quota_used_ratio",
    "Share of the tenant's monthly token quota settled this calendar month (UTC); tenants with a quota only.",
    &["tenant"],
);
const QUOTA_USED: Spec = Spec::new(
    "aiguard_tenant_monthly_tokens_used",
    "Tokens the tenant settled this calendar month (UTC), counted against its quota.",
    &["tenant"],
);
const QUOTA_LIMIT: Spec = Spec::new(
    "aiguard_tenant_monthly_tokens_limit",
    "The tenant's monthly token quota.",
    &["tenant"],
);

/// Monthly quota use per tenant, read from the limiter at scrape time. Tenants are those that
/// hold a live key (created by an operator: bounded) and have a quota. With the shared store
/// the monthly counters live in Redis and this node's limiter holds only a fallback, so
/// nothing is exported then.
pub struct QuotaCollector {
    gw: Arc<Gateway>,
    descs: Vec<Desc>,
}

impl QuotaCollector {
    pub fn new(gw: Arc<Gateway>) -> Self {
        Self {
            gw,
            descs: [QUOTA_RATIO, QUOTA_USED, QUOTA_LIMIT]
                .iter()
                .map(Spec::desc)
                .collect(),
        }
    }
}

/// `(tenant, used, limit)` rows as families.
pub fn quota_families(rows: &[(String, u64, u64)]) -> Vec<MetricFamily> {
    let ratio = QUOTA_RATIO.gauges();
    let used = QUOTA_USED.gauges();
    let limit = QUOTA_LIMIT.gauges();
    for (tenant, u, l) in rows {
        ratio
            .with_label_values(&[tenant])
            .set(*u as f64 / (*l).max(1) as f64);
        used.with_label_values(&[tenant]).set(*u as f64);
        limit.with_label_values(&[tenant]).set(*l as f64);
    }
    let mut out = families::collect(&ratio);
    out.extend(families::collect(&used));
    out.extend(families::collect(&limit));
    out
}

impl Collector for QuotaCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if self.gw.decider.shared().is_some() {
            return Vec::new();
        }
        let policy = self.gw.policy();
        // A tenant's tier is its keys' (the oldest live key's, should they differ).
        let mut tenants = BTreeMap::new();
        for k in self.gw.keys.list() {
            if k.revoked_ms.is_none() {
                tenants.entry(k.tenant).or_insert(k.tier);
            }
        }
        let month = Today::now().month_index();
        let rows: Vec<(String, u64, u64)> = tenants
            .into_iter()
            .filter_map(|(tenant, tier)| {
                let limit = policy.tiers.policy(&tenant, &tier).monthly_tokens?;
                let (used, _reserved) = self.gw.limiter.month_usage(&tenant, month);
                Some((tenant, used, limit))
            })
            .collect();
        quota_families(&rows)
    }
}

const QUEUED: Spec = Spec::new(
    "aiguard_gateway_queued_requests",
    "Admitted requests waiting for an upstream slot now, by tier.",
    &["tier"],
);
const SLOTS_HELD: Spec = Spec::new(
    "aiguard_gateway_upstream_slots_held",
    "Upstream slots held now, by tier.",
    &["tier"],
);
const SLOTS: Spec = Spec::new(
    "aiguard_gateway_upstream_slots",
    "Requests the upstreams serve at once (gateway.upstream_slots); absent without queueing.",
    &[],
);

/// The upstream slots' queues, read at scrape time; nothing without `gateway.upstream_slots`.
pub struct QueueCollector {
    gw: Arc<Gateway>,
    descs: Vec<Desc>,
}

impl QueueCollector {
    pub fn new(gw: Arc<Gateway>) -> Self {
        Self {
            gw,
            descs: [QUEUED, SLOTS_HELD, SLOTS].iter().map(Spec::desc).collect(),
        }
    }
}

impl Collector for QueueCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if self.gw.policy().settings.upstream_slots.is_none() {
            return Vec::new();
        }
        let (slots, tiers) = self.gw.scheduler.load();
        let queued = QUEUED.gauges();
        let held = SLOTS_HELD.gauges();
        for t in &tiers {
            queued.with_label_values(&[&t.tier]).set(t.queued as f64);
            held.with_label_values(&[&t.tier]).set(f64::from(t.held));
        }
        let total = SLOTS.gauges();
        total.with_label_values::<&str>(&[]).set(f64::from(slots));
        let mut out = families::collect(&queued);
        out.extend(families::collect(&held));
        out.extend(families::collect(&total));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::families::text;

    fn page(m: &GatewayMetrics) -> String {
        let mut fams = Vec::new();
        for c in m.collectors() {
            fams.extend(c.collect());
        }
        text(&fams)
    }

    #[test]
    fn requests_are_counted_by_tier_and_outcome_from_zero() {
        let m = GatewayMetrics::new(["free", "paid"]);
        m.count("paid", Outcome::Allowed);
        m.count("paid", Outcome::Allowed);
        m.count("free", Outcome::RateLimited);
        m.count(NO_TIER, Outcome::Unauthorized);
        let tokens = m.tier_tokens("paid");
        tokens.prompt.inc_by(8);
        tokens.completion.inc_by(92);
        let p = page(&m);
        for line in [
            "# TYPE aiguard_gateway_requests_total counter",
            "aiguard_gateway_requests_total{outcome=\"allowed\",tier=\"paid\"} 2",
            "aiguard_gateway_requests_total{outcome=\"rate_limited\",tier=\"free\"} 1",
            "aiguard_gateway_requests_total{outcome=\"quota_exceeded\",tier=\"free\"} 0",
            "aiguard_gateway_requests_total{outcome=\"store_unavailable\",tier=\"paid\"} 0",
            "aiguard_gateway_requests_total{outcome=\"unauthorized\",tier=\"none\"} 1",
            "aiguard_gateway_requests_total{outcome=\"bad_request\",tier=\"none\"} 0",
            "aiguard_gateway_tokens_total{kind=\"prompt\",tier=\"paid\"} 8",
            "aiguard_gateway_tokens_total{kind=\"completion\",tier=\"paid\"} 92",
            "aiguard_gateway_tokens_total{kind=\"completion\",tier=\"free\"} 0",
            "aiguard_gateway_in_flight_requests 0",
            "# TYPE aiguard_gateway_upstream_response_seconds histogram",
            "aiguard_gateway_upstream_response_seconds_count 0",
        ] {
            assert!(p.lines().any(|l| l == line), "{line} missing from\n{p}");
        }
        // A key's tier is the only way into a tier label: no tier "none" outcome other than
        // the two refused before a key is known.
        assert!(!p.contains("outcome=\"allowed\",tier=\"none\""), "{p}");
        assert!(!p.contains("outcome=\"unauthorized\",tier=\"paid\""), "{p}");
    }

    #[test]
    fn in_flight_follows_its_guards() {
        let m = GatewayMetrics::new(["free"]);
        let a = m.in_flight();
        let b = m.in_flight();
        assert!(page(&m).contains("aiguard_gateway_in_flight_requests 2\n"));
        drop(a);
        drop(b);
        assert!(page(&m).contains("aiguard_gateway_in_flight_requests 0\n"));
    }

    #[test]
    fn quota_gauges_are_per_tenant_ratios() {
        let p = text(&quota_families(&[
            ("acme".into(), 900, 1000),
            ("globex".into(), 0, 50),
        ]));
        for line in [
            "# TYPE aiguard_tenant_monthly_quota_used_ratio gauge",
            "aiguard_tenant_monthly_quota_used_ratio{tenant=\"acme\"} 0.9",
            "aiguard_tenant_monthly_quota_used_ratio{tenant=\"globex\"} 0",
            "aiguard_tenant_monthly_tokens_used{tenant=\"acme\"} 900",
            "aiguard_tenant_monthly_tokens_limit{tenant=\"acme\"} 1000",
        ] {
            assert!(p.lines().any(|l| l == line), "{line} missing from\n{p}");
        }
    }

    #[test]
    fn outcomes_index_their_tiers_series_in_order() {
        for (i, o) in Outcome::ALL.into_iter().enumerate() {
            assert_eq!(o as usize, i, "{o:?}");
        }
        let m = GatewayMetrics::new(["free"]);
        m.count("free", Outcome::Allowed);
        m.count("free", Outcome::Allowed);
        m.count("brand-new", Outcome::RateLimited);
        m.tier_tokens("free").prompt.inc_by(5);
        assert_eq!(m.requests.with_label_values(&["free", "allowed"]).get(), 2);
        assert_eq!(
            m.requests
                .with_label_values(&["brand-new", "rate_limited"])
                .get(),
            1
        );
        assert_eq!(m.tokens.with_label_values(&["free", "prompt"]).get(), 5);
    }
}
