//! The admin API: newline-delimited JSON over a root-only unix socket. The daemon is the only
//! writer of the maps; the CLI (and anything else an operator scripts) talks to it here.
//!
//! One request per line, one reply per line, any number per connection:
//! `{"op":"ban","ranges":["203.0.113.0/24"],"ttl_ms":3600000,"reason":"stuffing"}`
//! -> `{"reply":"banned","bans":[...]}` or `{"reply":"error","kind":"...","message":"..."}`.
pub mod client;
mod gateway_ops;
pub mod server;
pub mod snapshot;

use std::collections::BTreeMap;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::{
    bans::{AllowRecord, BanRecord, BanView},
    keys::KeyRecord,
    usage::UsageRow,
};

/// Largest request line accepted (a ban file of a few million ranges fits).
pub const MAX_REQUEST_BYTES: usize = 256 << 20;

/// How many bans a `Banned` reply echoes.
pub const BANNED_ECHO_LIMIT: usize = 100;

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Ban one or more ranges, all or nothing.
    Ban {
        ranges: Vec<String>,
        #[serde(default)]
        ttl_ms: Option<u64>,
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        shadow: bool,
        #[serde(default)]
        force: bool,
    },
    Unban {
        range: String,
    },
    Bans,
    Allow {
        range: String,
        #[serde(default)]
        force: bool,
    },
    Unallow {
        range: String,
    },
    Allowlist,
    Status,
    /// Create an API key for a tenant (the secret is in the reply, and nowhere else, ever).
    KeysAdd {
        tenant: String,
        #[serde(default)]
        tier: Option<String>,
    },
    KeysList {
        #[serde(default)]
        tenant: Option<String>,
    },
    KeysRevoke {
        id: String,
    },
    /// Suspends a key for `for_ms` (403 until then).
    KeysSuspend {
        id: String,
        for_ms: u64,
        #[serde(default)]
        reason: Option<String>,
    },
    KeysResume {
        id: String,
    },
    /// A tenant's monthly token quota: used, reserved, remaining.
    Quota {
        tenant: String,
    },
    /// Usage per day, tenant, key and model, with cost.
    Usage {
        /// `YYYY-MM`; this month by default.
        #[serde(default)]
        month: Option<String>,
        #[serde(default)]
        tenant: Option<String>,
    },
    /// Re-read the configuration (as SIGHUP does).
    Reload,
    /// Everything `aiguard top` shows, in one reply: verdict counters, the most hit bans,
    /// requests per tier, store health.
    Top,
}

/// What the daemon answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Banned {
        /// Distinct ranges banned.
        count: usize,
        /// The first [`BANNED_ECHO_LIMIT`] of them (a million-line file is not echoed back).
        bans: Vec<BanRecord>,
    },
    Unbanned {
        ban: BanRecord,
    },
    Bans {
        bans: Vec<BanView>,
    },
    Allowed {
        entry: AllowRecord,
        /// Active bans inside this range: they no longer drop these sources.
        overlapping_bans: Vec<IpNetwork>,
    },
    Unallowed {
        entry: AllowRecord,
    },
    Allowlist {
        entries: Vec<AllowRecord>,
    },
    Status(Box<StatusReport>),
    KeyCreated {
        key: KeyRecord,
        /// The API key itself: shown once.
        secret: String,
    },
    Keys {
        keys: Vec<KeyRecord>,
    },
    KeyRevoked {
        key: KeyRecord,
    },
    KeySuspended {
        key: KeyRecord,
    },
    KeyResumed {
        key: KeyRecord,
    },
    Quota(QuotaReport),
    Usage {
        month: String,
        rows: Vec<UsageRow>,
    },
    Reloaded {
        /// Changed settings that only take effect after a restart.
        needs_restart: Vec<String>,
    },
    Top(Box<TopSnapshot>),
    /// The request was refused or failed; nothing was changed.
    Error {
        kind: ErrorKind,
        message: String,
        /// For a batch: which item (0-based) was refused.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        index: Option<usize>,
    },
}

/// Broad class of an error, for scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request itself is wrong (bad range, TTL, unknown op): fix the input.
    InvalidRequest,
    /// It conflicts with current state (allowlist overlap, not banned, table full).
    Conflict,
    /// The daemon failed (store, kernel): see its log.
    Internal,
}

/// `aiguard status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    pub interfaces: Vec<InterfaceStatus>,
    /// Verdict counters over all interfaces, by name (see aiguard_common::stat::NAMES).
    pub totals: BTreeMap<String, u64>,
    pub bans: usize,
    pub allowlist: usize,
    pub bucket: BucketStatus,
    pub bpffs_dir: String,
    pub state_dir: String,
    /// The request-path gateway, when it runs.
    #[serde(default)]
    pub gateway: Option<GatewayStatus>,
    /// The shared store, when `[store] backend = "redis"`.
    #[serde(default)]
    pub shared: Option<crate::shared::SharedStatus>,
}

/// The gateway's addresses and counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayStatus {
    /// Bound addresses (with the real port when configured as 0).
    pub listen: Vec<std::net::SocketAddr>,
    pub upstreams: Vec<String>,
    pub keys: usize,
    pub requests: u64,
    pub allowed: u64,
    pub rate_limited: u64,
    pub quota_exceeded: u64,
    pub unauthorized: u64,
    pub bad_requests: u64,
    pub upstream_errors: u64,
    /// Refused with 503: the shared store could not decide and the tier fails closed.
    #[serde(default)]
    pub store_unavailable: u64,
    /// Shed (429/503) while waiting for an upstream slot: the tier's queue was full or its
    /// wait ran out.
    #[serde(default)]
    pub shed: u64,
}

/// How many bans a `Top` reply names (the most hit).
pub const TOP_BANS_LIMIT: usize = 10;

/// `aiguard top`: the node's counters at one moment. Counters are totals since they started;
/// the viewer turns two snapshots into rates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopSnapshot {
    /// The shared store's node name, else the host name.
    pub node: String,
    pub version: String,
    pub uptime_secs: u64,
    /// The daemon's clock (Unix ms) when the snapshot was taken.
    pub now_ms: u64,
    pub interfaces: Vec<String>,
    /// Packets passed, for every reason, over all interfaces.
    pub passed: u64,
    /// Packets dropped at the NIC by reason (`banned`, `rate`), over all interfaces.
    pub drops: BTreeMap<String, u64>,
    /// Bans in the table.
    pub bans: usize,
    /// The [`TOP_BANS_LIMIT`] most hit bans, most hit first.
    pub top_bans: Vec<TopBan>,
    /// Whether the gateway runs.
    pub gateway: bool,
    /// Gateway requests per tier (`none`: refused before a key named one).
    pub tiers: Vec<TierRequests>,
    /// The shared store's health; none with the embedded store only.
    pub store: Option<crate::shared::SharedStatus>,
}

/// One ban and the packets it matched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopBan {
    pub range: String,
    pub hits: u64,
    pub reason: String,
    pub shadow: bool,
}

/// Gateway requests of one tier, by outcome (`allowed`, `rate_limited`, `quota_exceeded`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TierRequests {
    pub tier: String,
    pub outcomes: BTreeMap<String, u64>,
}

impl TierRequests {
    pub fn allowed(&self) -> u64 {
        self.outcomes.get("allowed").copied().unwrap_or(0)
    }

    /// Refused by a rate, concurrency or quota limit.
    pub fn limited(&self) -> u64 {
        ["rate_limited", "quota_exceeded"]
            .iter()
            .map(|o| self.outcomes.get(*o).copied().unwrap_or(0))
            .sum()
    }
}

/// `aiguard quota TENANT`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuotaReport {
    pub tenant: String,
    /// `YYYY-MM` (UTC).
    pub month: String,
    /// Tokens settled this month.
    pub used: u64,
    /// Tokens reserved by requests in flight.
    pub reserved: u64,
    /// The monthly quota; none means unlimited.
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    /// Seconds until the quota resets (start of next month, UTC).
    pub resets_in_secs: u64,
    /// `hard` or `soft`.
    pub enforcement: crate::tiers::QuotaEnforcement,
    /// Tiers of the tenant's live keys.
    pub tiers: Vec<String>,
}

/// One protected interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub ifindex: u32,
    pub mode: crate::dataplane::AttachedMode,
    /// Adopted from a previous daemon's pinned link.
    pub adopted: bool,
    pub counters: BTreeMap<String, u64>,
}

/// The per-source bucket as configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BucketStatus {
    pub active: bool,
    pub rate: u32,
    pub burst: u32,
    pub ports: Vec<u16>,
    pub all_ports: bool,
    pub syn_only: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_top_request_and_its_reply_keep_their_shape_on_the_wire() {
        assert_eq!(
            serde_json::to_string(&Request::Top).expect("serialises"),
            r#"{"op":"top"}"#
        );
        let snapshot = TopSnapshot {
            node: "n1".into(),
            version: "0.1.0".into(),
            uptime_secs: 5,
            now_ms: 1_000,
            interfaces: vec!["eth0".into()],
            passed: 10,
            drops: [("banned".to_owned(), 3), ("rate".to_owned(), 0)].into(),
            bans: 1,
            top_bans: vec![TopBan {
                range: "203.0.113.0/24".into(),
                hits: 3,
                reason: "stuffing".into(),
                shadow: false,
            }],
            gateway: true,
            tiers: vec![TierRequests {
                tier: "free".into(),
                outcomes: [("allowed".to_owned(), 4), ("rate_limited".to_owned(), 2)].into(),
            }],
            store: None,
        };
        let reply = Reply::Top(Box::new(snapshot));
        let line = serde_json::to_string(&reply).expect("serialises");
        assert!(line.starts_with(r#"{"reply":"top","node":"n1""#), "{line}");
        assert_eq!(serde_json::from_str::<Reply>(&line).expect("parses"), reply);
    }
}
