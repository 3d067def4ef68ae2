//! The gateway's part of the configuration: where it listens and forwards, and what each tier,
//! tenant and model may spend.
//!
//! ```toml
//! [gateway]
//! listen = ["0.0.0.0:8080"]
//! upstreams = ["http://127.0.0.1:8000"]   # round robin
//! default_tier = "free"                   # for keys whose tier is not configured
//! max_request_bytes = 4194304
//! header_read_timeout = "10s"             # slowloris; also how long a keep-alive client may idle
//! idle_timeout = "60s"                    # nothing moves on the client connection either way
//! upstream_connect_timeout = "5s"
//! upstream_response_timeout = "300s"      # until the upstream's response head
//! trusted_proxies = ["10.0.0.0/8"]        # load balancers whose client address is believed
//! client_address = "x-forwarded-for"      # from trusted proxies: x-forwarded-for or proxy-protocol
//! default_max_tokens = 4096               # reserved when a request names no max_tokens
//! tokenizer = "o200k_base"                # or cl100k_base
//! upstream_authorization = "Bearer ..."   # sent upstream instead of the client's key
//!
//! [tiers.free]                 # limits of one tenant (shared by all its keys)
//! requests_per_minute = 5
//! requests_per_day = 500
//! tokens_per_minute = 20000
//! max_concurrent = 2
//! monthly_tokens = 1000000     # calendar month, UTC
//! quota = "hard"               # hard: streams end at the quota; soft: checked at admission only
//! [tiers.free.per_key]         # sub-limits of each key of such a tenant
//! requests_per_minute = 3
//! [tiers.free.models."llama-70b"]   # per model, for the tenant
//! tokens_per_minute = 5000
//! [tiers.free.prices]          # default price of this tier's usage, per 1k tokens
//! prompt_per_1k = 0.0
//! completion_per_1k = 0.0
//!
//! [tenants.acme]               # per-tenant overrides of its tier's tenant limits
//! monthly_tokens = 50000000
//!
//! [prices."llama-70b"]         # per model, wins over the tier's price
//! prompt_per_1k = 0.0009
//! completion_per_1k = 0.0009
//! ```
use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, invalid};
use crate::shared::FailureMode;

/// The tier used when no config file names one: every valid key gets it.
pub const BUILTIN_TIER: &str = "default";

/// The request-path gateway. Off unless it has somewhere to listen and somewhere to forward.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewaySettings {
    /// Addresses to accept clients on.
    pub listen: Vec<SocketAddr>,
    /// Inference servers (`http://host:port`, optionally with a path prefix), used round robin.
    pub upstreams: Vec<String>,
    /// Tier of keys whose own tier is not configured (and of every key without a config file).
    pub default_tier: String,
    /// Largest request body accepted (413 above it).
    pub max_request_bytes: u64,
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub upstream_connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub upstream_response_timeout: Duration,
    /// Peers whose word on the client's address is taken.
    pub trusted_proxies: Vec<IpNetwork>,
    /// How a trusted peer tells the client's address.
    pub client_address: ClientAddressSource,
    /// Completion tokens reserved when a request does not say (`max_tokens` and friends).
    pub default_max_tokens: u64,
    pub tokenizer: TokenizerName,
    /// Authorization header value sent to the upstream (clients' keys never are).
    pub upstream_authorization: Option<String>,
    /// How often settled usage moves from the journal into the store.
    #[serde(with = "humantime_serde")]
    pub usage_flush_interval: Duration,
    /// Requests the upstreams serve at once; above it requests queue per tier and are served
    /// by weight (see `gateway::priority`). None: no queueing.
    pub upstream_slots: Option<u32>,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            upstreams: Vec::new(),
            default_tier: BUILTIN_TIER.into(),
            max_request_bytes: 4 << 20,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_response_timeout: Duration::from_secs(300),
            trusted_proxies: Vec::new(),
            client_address: ClientAddressSource::XForwardedFor,
            default_max_tokens: 4096,
            tokenizer: TokenizerName::O200kBase,
            upstream_authorization: None,
            usage_flush_interval: Duration::from_secs(1),
            upstream_slots: None,
        }
    }
}

impl GatewaySettings {
    /// Whether the gateway runs at all.
    pub fn is_enabled(&self) -> bool {
        !self.listen.is_empty() && !self.upstreams.is_empty()
    }
}

/// How a trusted proxy passes the client's address on.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAddressSource {
    /// The last address in `X-Forwarded-For` that is not itself a trusted proxy.
    XForwardedFor,
    /// A PROXY protocol (v1 or v2) header at the start of each connection from a trusted peer.
    ProxyProtocol,
}

/// The BPE used to estimate prompt tokens before the upstream counts them.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerName {
    O200kBase,
    Cl100kBase,
}

/// One set of limits. Absent means unlimited.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub requests_per_minute: Option<u64>,
    pub requests_per_day: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent: Option<u64>,
}

impl Limits {
    /// `self`, with each limit `over` sets replacing it.
    pub fn overridden_by(&self, over: &Limits) -> Limits {
        Limits {
            requests_per_minute: over.requests_per_minute.or(self.requests_per_minute),
            requests_per_day: over.requests_per_day.or(self.requests_per_day),
            tokens_per_minute: over.tokens_per_minute.or(self.tokens_per_minute),
            max_concurrent: over.max_concurrent.or(self.max_concurrent),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        for (name, v) in [
            ("requests_per_minute", self.requests_per_minute),
            ("requests_per_day", self.requests_per_day),
            ("tokens_per_minute", self.tokens_per_minute),
            ("max_concurrent", self.max_concurrent),
        ] {
            if let Some(v) = v
                && !(1..=1_000_000_000).contains(&v)
            {
                return Err(invalid(
                    format!("{at}.{name}"),
                    v,
                    "a number from 1 to 1000000000 (leave it out for no limit)",
                ));
            }
        }
        Ok(())
    }
}

/// Whether the monthly quota also ends a response that runs past it.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QuotaEnforcement {
    /// Checked at admission and while a stream runs: a stream that would pass it is ended.
    #[default]
    Hard,
    /// Checked at admission only: a response that runs past it completes (and is counted).
    Soft,
}

/// Price per 1,000 tokens, in whatever currency the operator bills in.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Price {
    pub prompt_per_1k: f64,
    pub completion_per_1k: f64,
}

/// A tier: the limits of each tenant in it, of each of their keys, and per model.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TierSettings {
    pub requests_per_minute: Option<u64>,
    pub requests_per_day: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent: Option<u64>,
    /// Tokens (prompt + completion) a tenant may spend per calendar month (UTC).
    pub monthly_tokens: Option<u64>,
    pub quota: QuotaEnforcement,
    /// Sub-limits of each key.
    pub per_key: Limits,
    /// Limits per model (the request's `model`), for the tenant.
    pub models: BTreeMap<String, Limits>,
    pub prices: Option<Price>,
    /// What requests get while the shared store cannot decide in time.
    pub on_store_failure: FailureMode,
    /// Share of the upstream's slots (`gateway.upstream_slots`) while tiers compete: backlogged
    /// tiers get slots in proportion to their weights (default 1).
    pub weight: Option<u32>,
    /// Requests of the tier that may wait for a slot at once (default 256); more are shed.
    pub max_queued: Option<u32>,
    /// Longest a request waits for a slot (default 2 s) before it is shed.
    #[serde(default, with = "humantime_serde")]
    pub max_queue_wait: Option<Duration>,
    /// At most this many slots at once for the tier, however idle the others (none: all).
    pub max_upstream_slots: Option<u32>,
}

/// A tier's queueing when nothing configures it.
pub const DEFAULT_WEIGHT: u32 = 1;
pub const DEFAULT_MAX_QUEUED: u32 = 256;
pub const DEFAULT_MAX_QUEUE_WAIT: Duration = Duration::from_secs(2);

impl TierSettings {
    /// The tier's share of the upstream's slots.
    pub fn share(&self) -> crate::gateway::priority::TierShare {
        crate::gateway::priority::TierShare {
            weight: self.weight.unwrap_or(DEFAULT_WEIGHT),
            max_queued: self.max_queued.unwrap_or(DEFAULT_MAX_QUEUED),
            max_queue_wait: self.max_queue_wait.unwrap_or(DEFAULT_MAX_QUEUE_WAIT),
            max_slots: self.max_upstream_slots,
        }
    }

    /// The tenant-level limits (without the monthly quota).
    pub fn tenant_limits(&self) -> Limits {
        Limits {
            requests_per_minute: self.requests_per_minute,
            requests_per_day: self.requests_per_day,
            tokens_per_minute: self.tokens_per_minute,
            max_concurrent: self.max_concurrent,
        }
    }

    /// What a tier gets when nothing configures it: generous enough for a trial, bounded
    /// enough that one key cannot take the node.
    pub fn builtin() -> Self {
        Self {
            requests_per_minute: Some(600),
            tokens_per_minute: Some(1_000_000),
            max_concurrent: Some(64),
            ..Self::default()
        }
    }
}

/// Per-tenant overrides of its tier's tenant limits.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TenantSettings {
    pub requests_per_minute: Option<u64>,
    pub requests_per_day: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent: Option<u64>,
    pub monthly_tokens: Option<u64>,
    pub quota: Option<QuotaEnforcement>,
}

/// The tiers, tenants and prices, validated together.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TierTable {
    pub tiers: BTreeMap<String, TierSettings>,
    pub tenants: BTreeMap<String, TenantSettings>,
    pub prices: BTreeMap<String, Price>,
    pub default_tier: String,
}

/// The limits that apply to one tenant, resolved from its tier and its overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantPolicy {
    pub tenant: Limits,
    pub per_key: Limits,
    pub monthly_tokens: Option<u64>,
    pub quota: QuotaEnforcement,
}

impl TierTable {
    /// The tier's settings, or the default tier's when `tier` is not configured.
    pub fn tier(&self, tier: &str) -> &TierSettings {
        self.tiers
            .get(tier)
            .or_else(|| self.tiers.get(&self.default_tier))
            .expect("validation guarantees the default tier exists")
    }

    /// Whether `tier` is configured (keys may only be created in configured tiers).
    pub fn has_tier(&self, tier: &str) -> bool {
        self.tiers.contains_key(tier)
    }

    pub fn policy(&self, tenant: &str, tier: &str) -> TenantPolicy {
        let t = self.tier(tier);
        let over = self.tenants.get(tenant);
        let tenant_limits = match over {
            Some(o) => t.tenant_limits().overridden_by(&Limits {
                requests_per_minute: o.requests_per_minute,
                requests_per_day: o.requests_per_day,
                tokens_per_minute: o.tokens_per_minute,
                max_concurrent: o.max_concurrent,
            }),
            None => t.tenant_limits(),
        };
        TenantPolicy {
            tenant: tenant_limits,
            per_key: t.per_key.clone(),
            monthly_tokens: over.and_then(|o| o.monthly_tokens).or(t.monthly_tokens),
            quota: over.and_then(|o| o.quota).unwrap_or(t.quota),
        }
    }

    /// Price of `model` in `tier`: the model's own, else the tier's, else free.
    pub fn price(&self, tier: &str, model: &str) -> Price {
        self.prices
            .get(model)
            .copied()
            .or_else(|| self.tiers.get(tier).and_then(|t| t.prices))
            .unwrap_or_default()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, tier) in &self.tiers {
            check_name("tiers", name)?;
            let at = format!("tiers.{name}");
            tier.tenant_limits().validate(&at)?;
            tier.per_key.validate(&format!("{at}.per_key"))?;
            check_quota(&at, tier.monthly_tokens)?;
            for (model, limits) in &tier.models {
                if model.is_empty() {
                    return Err(invalid(format!("{at}.models"), "\"\"", "model names"));
                }
                limits.validate(&format!("{at}.models.{model:?}"))?;
            }
            if let Some(p) = &tier.prices {
                check_price(&format!("{at}.prices"), p)?;
            }
            check_share(&at, tier)?;
        }
        if !self.tiers.contains_key(&self.default_tier) {
            return Err(invalid(
                "gateway.default_tier",
                format!("{:?}", self.default_tier),
                &format!(
                    "one of the configured tiers ({})",
                    self.tiers.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        for (name, t) in &self.tenants {
            check_name("tenants", name)?;
            let at = format!("tenants.{name}");
            Limits {
                requests_per_minute: t.requests_per_minute,
                requests_per_day: t.requests_per_day,
                tokens_per_minute: t.tokens_per_minute,
                max_concurrent: t.max_concurrent,
            }
            .validate(&at)?;
            check_quota(&at, t.monthly_tokens)?;
        }
        for (model, p) in &self.prices {
            check_price(&format!("prices.{model:?}"), p)?;
        }
        Ok(())
    }
}

/// Tenant and tier names: what `keys add` accepts, so that logs and CSV stay unambiguous.
pub fn is_valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn check_name(section: &str, name: &str) -> Result<(), ConfigError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(invalid(
            section.to_owned(),
            format!("{name:?}"),
            "names of 1 to 64 letters, digits, '-', '_' or '.'",
        ))
    }
}

fn check_quota(at: &str, quota: Option<u64>) -> Result<(), ConfigError> {
    match quota {
        Some(0) => Err(invalid(
            format!("{at}.monthly_tokens"),
            0,
            "a positive number of tokens (leave it out for no quota)",
        )),
        _ => Ok(()),
    }
}

fn check_share(at: &str, tier: &TierSettings) -> Result<(), ConfigError> {
    if let Some(w) = tier.weight
        && !(1..=1_000_000).contains(&w)
    {
        return Err(invalid(
            format!("{at}.weight"),
            w,
            "a weight from 1 to 1000000",
        ));
    }
    if let Some(n) = tier.max_queued
        && n > 1_000_000
    {
        return Err(invalid(
            format!("{at}.max_queued"),
            n,
            "at most 1000000 waiting requests (0: shed whenever no slot is free)",
        ));
    }
    if let Some(d) = tier.max_queue_wait
        && (d.is_zero() || d > Duration::from_secs(3600))
    {
        return Err(invalid(
            format!("{at}.max_queue_wait"),
            humantime::format_duration(d),
            "a wait above zero and at most 1h, like \"2s\"",
        ));
    }
    if tier.max_upstream_slots == Some(0) {
        return Err(invalid(
            format!("{at}.max_upstream_slots"),
            0,
            "at least 1 slot (leave it out for no cap)",
        ));
    }
    Ok(())
}

fn check_price(at: &str, p: &Price) -> Result<(), ConfigError> {
    for (name, v) in [
        ("prompt_per_1k", p.prompt_per_1k),
        ("completion_per_1k", p.completion_per_1k),
    ] {
        if !v.is_finite() || v < 0.0 {
            return Err(invalid(
                format!("{at}.{name}"),
                v,
                "a price of zero or more per 1,000 tokens",
            ));
        }
    }
    Ok(())
}

impl GatewaySettings {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for u in &self.upstreams {
            let uri: http::Uri = u.parse().map_err(|e| {
                invalid(
                    "gateway.upstreams",
                    format!("{u:?} ({e})"),
                    "URLs like \"http://127.0.0.1:8000\"",
                )
            })?;
            if uri.scheme_str() != Some("http") || uri.host().is_none() {
                return Err(invalid(
                    "gateway.upstreams",
                    format!("{u:?}"),
                    "http:// URLs with a host (TLS to the upstream is not supported: run the gateway beside the inference server)",
                ));
            }
            if uri.query().is_some() {
                return Err(invalid(
                    "gateway.upstreams",
                    format!("{u:?}"),
                    "a URL without a query string",
                ));
            }
        }
        if !self.listen.is_empty() && self.upstreams.is_empty() {
            return Err(invalid(
                "gateway.upstreams",
                "[]",
                "at least one upstream URL when gateway.listen is set",
            ));
        }
        if !(1024..=1 << 30).contains(&self.max_request_bytes) {
            return Err(invalid(
                "gateway.max_request_bytes",
                self.max_request_bytes,
                "from 1024 to 1073741824 bytes",
            ));
        }
        for (name, d, min, max) in [
            (
                "gateway.header_read_timeout",
                self.header_read_timeout,
                Duration::from_millis(100),
                Duration::from_secs(3600),
            ),
            (
                "gateway.idle_timeout",
                self.idle_timeout,
                Duration::from_millis(100),
                Duration::from_secs(86400),
            ),
            (
                "gateway.upstream_connect_timeout",
                self.upstream_connect_timeout,
                Duration::from_millis(10),
                Duration::from_secs(600),
            ),
            (
                "gateway.upstream_response_timeout",
                self.upstream_response_timeout,
                Duration::from_millis(10),
                Duration::from_secs(86400),
            ),
            (
                "gateway.usage_flush_interval",
                self.usage_flush_interval,
                Duration::from_millis(10),
                Duration::from_secs(3600),
            ),
        ] {
            if d < min || d > max {
                return Err(invalid(
                    name,
                    format!("{:?}", humantime::format_duration(d).to_string()),
                    &format!(
                        "a duration from {} to {}",
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                ));
            }
        }
        if let Some(n) = self.upstream_slots
            && !(1..=1_000_000).contains(&n)
        {
            return Err(invalid(
                "gateway.upstream_slots",
                n,
                "from 1 to 1000000 concurrent upstream requests (leave it out for no queueing)",
            ));
        }
        if !(1..=10_000_000).contains(&self.default_max_tokens) {
            return Err(invalid(
                "gateway.default_max_tokens",
                self.default_max_tokens,
                "from 1 to 10000000",
            ));
        }
        if let Some(a) = &self.upstream_authorization
            && http::HeaderValue::from_str(a).is_err()
        {
            return Err(invalid(
                "gateway.upstream_authorization",
                "(hidden)",
                "a valid header value (visible ASCII)",
            ));
        }
        Ok(())
    }
}
