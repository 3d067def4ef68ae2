//! `[store]`: where limits, quotas and bans live when several nodes share them.
use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigError, invalid};

/// Which store holds the shared state.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// This node alone: limits in memory, keys, bans and usage in the embedded store.
    #[default]
    Embedded,
    /// Redis (or Redis Cluster): every node's limits, quotas and bans are one set.
    Redis,
}

/// The `[store]` section.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    pub backend: Backend,
    /// `redis://` or `rediss://` URLs. One URL is a single Redis (or a proxy in front of one);
    /// several, or `cluster = true`, are the seeds of a Redis Cluster.
    pub urls: Vec<String>,
    /// Treat the URLs as Cluster seeds even when there is only one.
    pub cluster: Option<bool>,
    /// Prepended to every key and channel, so that environments can share one Redis.
    pub prefix: String,
    /// Longest a request's decision may wait for Redis; past it, the tier's
    /// `on_store_failure` decides.
    #[serde(with = "humantime_serde")]
    pub decision_timeout: Duration,
    /// Longest a connection attempt may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Nodes sharing the limits: with `on_store_failure = "local"`, each node enforces
    /// its tier's limits divided by this while Redis is out of reach.
    pub nodes: u32,
    /// This node's name in ban origins and concurrency leases; the host name by default.
    pub node_name: Option<String>,
    /// Longest a request holds a concurrency slot in Redis: a node that dies mid-request frees
    /// its slots after this. Make it longer than the longest stream.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often an unreachable Redis is tried again.
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            backend: Backend::Embedded,
            urls: Vec::new(),
            cluster: None,
            prefix: "aiguard:".into(),
            decision_timeout: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(2),
            nodes: 1,
            node_name: None,
            lease: Duration::from_secs(15 * 60),
            retry_interval: Duration::from_millis(500),
        }
    }
}

/// What a tier's requests get while the shared store cannot answer in time.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Admit without limits (usage is still counted and written back later).
    FailOpen,
    /// Refuse with 503 and Retry-After.
    FailClosed,
    /// This node's own in-memory limits, at the tier's limits divided by `store.nodes`.
    #[default]
    Local,
}

impl StoreSettings {
    pub fn is_shared(&self) -> bool {
        self.backend == Backend::Redis
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster.unwrap_or(self.urls.len() > 1)
    }

    /// This node's name: configured, else the host name.
    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "aiguard".into())
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.backend == Backend::Embedded {
            if !self.urls.is_empty() {
                return Err(invalid(
                    "store.urls",
                    format!("{:?}", self.urls),
                    "no URLs with backend = \"embedded\" (set backend = \"redis\" to use them)",
                ));
            }
            return Ok(());
        }
        if self.urls.is_empty() {
            return Err(invalid(
                "store.urls",
                "[]",
                "at least one redis:// or rediss:// URL with backend = \"redis\"",
            ));
        }
        for u in &self.urls {
            let ok = redis::parse_redis_url(u)
                .is_some_and(|url| matches!(url.scheme(), "redis" | "rediss"));
            if !ok {
                return Err(invalid(
                    "store.urls",
                    format!("{u:?}"),
                    "URLs like \"redis://10.0.0.5:6379/0\" or \"rediss://user:password@host:6380\"",
                ));
            }
        }
        if self.prefix.contains(['{', '}', ' ']) || self.prefix.len() > 64 {
            return Err(invalid(
                "store.prefix",
                format!("{:?}", self.prefix),
                "up to 64 characters without braces or spaces (braces are Redis Cluster hash tags)",
            ));
        }
        let ms = |d: Duration| d.as_millis();
        if !(1..=10_000).contains(&ms(self.decision_timeout)) {
            return Err(invalid(
                "store.decision_timeout",
                format!("{:?}", self.decision_timeout),
                "from 1ms to 10s",
            ));
        }
        if !(1..=60_000).contains(&ms(self.connect_timeout)) {
            return Err(invalid(
                "store.connect_timeout",
                format!("{:?}", self.connect_timeout),
                "from 1ms to 60s",
            ));
        }
        if !(10..=60_000).contains(&ms(self.retry_interval)) {
            return Err(invalid(
                "store.retry_interval",
                format!("{:?}", self.retry_interval),
                "from 10ms to 60s",
            ));
        }
        if self.lease < Duration::from_secs(1) || self.lease > Duration::from_secs(24 * 3600) {
            return Err(invalid(
                "store.lease",
                format!("{:?}", self.lease),
                "from 1s to 24h",
            ));
        }
        if !(1..=10_000).contains(&self.nodes) {
            return Err(invalid("store.nodes", self.nodes, "from 1 to 10000"));
        }
        if let Some(n) = &self.node_name
            && !crate::tiers::is_valid_name(n)
        {
            return Err(invalid(
                "store.node_name",
                format!("{n:?}"),
                "1 to 64 letters, digits, '-', '_' or '.'",
            ));
        }
        Ok(())
    }
}
