//! What the node already keeps, read at scrape time: the XDP program's per-CPU verdict
//! counters (summed over CPUs, as `aiguard status` shows them), the bans in the kernel's tries
//! (origin and hit count are in each ban's map value) and the shared store's health counters.
//!
//! The ban tries are read through handles of the collector's own, opened from their pins, so
//! that walking a large table (about 0.6 s per 100k bans) does not hold the node's lock, which
//! admin requests need.
use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use aiguard_common::{BanEntry, map_name, reason, stat};
use aya::maps::{LpmTrie, Map, MapData, MapError};
use ipnetwork::IpNetwork;
use prometheus::{
    core::{Collector, Desc},
    proto::MetricFamily,
};
use tracing::warn;

use super::families::{self, Spec};
use crate::{
    daemon::Node,
    dataplane::{self, Counters},
    shared::SharedStatus,
};

const NO_LABELS: &[&str] = &[];

/// Bans listed by name in the hit counters; the others are summed as `range="other"`.
pub const TOP_BANS: usize = 10;

const PACKETS: Spec = Spec::new(
    "aiguard_xdp_packets_total",
    "Packets the XDP program decided on, by interface, verdict (pass, drop) and reason.",
    &["interface", "verdict", "reason"],
);
const SHADOW: Spec = Spec::new(
    "aiguard_xdp_shadow_matches_total",
    "Packets that matched a shadow ban: counted, not dropped (also counted in aiguard_xdp_packets_total by their verdict).",
    &["interface"],
);
const BANS: Spec = Spec::new(
    "aiguard_bans_active",
    "Bans in force in the kernel's tables, by origin (cli, detector, replicated).",
    &["origin"],
);
const BAN_HITS: Spec = Spec::new(
    "aiguard_xdp_ban_hits_total",
    "Packets that matched a ban in force: the most hit bans by range, the rest as range=\"other\".",
    &["range"],
);
const STORE_UP: Spec = Spec::new(
    "aiguard_store_up",
    "1 while the shared store (Redis) answers, 0 while it is out of reach.",
    &["backend"],
);
const STORE_ERRORS: Spec = Spec::new(
    "aiguard_store_errors_total",
    "Shared store operations that failed, by kind (error, timeout).",
    &["kind"],
);
const STORE_FALLBACKS: Spec = Spec::new(
    "aiguard_store_fallback_decisions_total",
    "Requests decided by a tier's failure mode because the shared store could not decide.",
    &[],
);
const STORE_OUTAGES: Spec = Spec::new(
    "aiguard_store_outages_total",
    "Times the shared store went out of reach.",
    &[],
);
const STORE_RECOVERIES: Spec = Spec::new(
    "aiguard_store_recoveries_total",
    "Times the shared store came back (after what waited for it was written back).",
    &[],
);
const STORE_OPERATIONS: Spec = Spec::new(
    "aiguard_store_operations_total",
    "Operations sent to the shared store (decisions, settlements, write-backs, replication).",
    &[],
);
const STORE_CARRIED: Spec = Spec::new(
    "aiguard_store_settlements_carried_total",
    "Settlements that rode with the next admission of their tenant, key and model instead of \
     a call of their own.",
    &[],
);
const STORE_WAITING: Spec = Spec::new(
    "aiguard_store_settlements_waiting",
    "Settlements waiting on this node (at most store.settle_delay) for an admission to carry them.",
    &[],
);
const STORE_OUTBOX: Spec = Spec::new(
    "aiguard_store_outbox_tokens",
    "Tokens counted while the shared store was out of reach, not yet written back.",
    &[],
);
const STORE_REPLICATED: Spec = Spec::new(
    "aiguard_store_bans_replicated_total",
    "Bans received from other nodes through the shared store.",
    &[],
);

const ALL: [Spec; 14] = [
    PACKETS,
    SHADOW,
    BANS,
    BAN_HITS,
    STORE_UP,
    STORE_ERRORS,
    STORE_FALLBACKS,
    STORE_OUTAGES,
    STORE_RECOVERIES,
    STORE_OPERATIONS,
    STORE_CARRIED,
    STORE_WAITING,
    STORE_OUTBOX,
    STORE_REPLICATED,
];

/// Verdict and reason of each counter index; `None` for the shadow counter, which counts
/// matches on top of a verdict.
fn verdict_of(index: u32) -> Option<(&'static str, &'static str)> {
    Some(match index {
        stat::PASSED => ("pass", "checked"),
        stat::DROP_BANNED => ("drop", "banned"),
        stat::DROP_RATE => ("drop", "rate"),
        stat::ALLOWLISTED => ("pass", "allowlisted"),
        stat::UNPARSED => ("pass", "unparsed"),
        stat::NON_IP => ("pass", "non_ip"),
        _ => return None,
    })
}

fn origin_of(code: u16) -> &'static str {
    match code {
        reason::MANUAL => "cli",
        reason::DETECTOR => "detector",
        reason::REPLICATED => "replicated",
        _ => "unknown",
    }
}

/// Verdict counters per interface as families.
pub fn xdp_families(interfaces: &[(String, Counters)]) -> Vec<MetricFamily> {
    let packets = PACKETS.counters();
    let shadow = SHADOW.counters();
    for (name, row) in interfaces {
        for (i, v) in row.iter().enumerate() {
            match verdict_of(i as u32) {
                Some((verdict, why)) => packets
                    .with_label_values(&[name.as_str(), verdict, why])
                    .inc_by(*v),
                None => shadow.with_label_values(&[name.as_str()]).inc_by(*v),
            }
        }
    }
    let mut out = families::collect(&packets);
    out.extend(families::collect(&shadow));
    out
}

/// Bans in force (not expired at `now_boot_ns`) by origin, and the [`TOP_BANS`] most hit.
pub fn ban_families<'a>(
    bans: impl IntoIterator<Item = (&'a IpNetwork, &'a BanEntry)>,
    now_boot_ns: u64,
) -> Vec<MetricFamily> {
    let by_origin = BANS.gauges();
    for o in ["cli", "detector", "replicated"] {
        by_origin.with_label_values(&[o]);
    }
    let mut hits: Vec<(u64, &IpNetwork)> = Vec::new();
    for (net, e) in bans {
        if e.expires_boot_ns != 0 && e.expires_boot_ns <= now_boot_ns {
            continue;
        }
        by_origin.with_label_values(&[origin_of(e.reason)]).inc();
        hits.push((e.hits, net));
    }
    let top = BAN_HITS.counters();
    let split = TOP_BANS.min(hits.len());
    if split > 0 {
        hits.select_nth_unstable_by(split - 1, |a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    }
    for (h, net) in &hits[..split] {
        top.with_label_values(&[&net.to_string()]).inc_by(*h);
    }
    top.with_label_values(&["other"])
        .inc_by(hits[split..].iter().map(|(h, _)| h).sum());
    let mut out = families::collect(&by_origin);
    out.extend(families::collect(&top));
    out
}

/// The shared store's health as families.
pub fn store_families(s: &SharedStatus) -> Vec<MetricFamily> {
    let up = STORE_UP.gauges();
    up.with_label_values(&[s.backend.as_str()])
        .set(if s.up { 1.0 } else { 0.0 });
    let errors = STORE_ERRORS.counters();
    errors.with_label_values(&["error"]).inc_by(s.errors);
    errors.with_label_values(&["timeout"]).inc_by(s.timeouts);
    let fallbacks = STORE_FALLBACKS.counters();
    fallbacks.with_label_values(NO_LABELS).inc_by(s.fallbacks);
    let outages = STORE_OUTAGES.counters();
    outages.with_label_values(NO_LABELS).inc_by(s.outages);
    let recoveries = STORE_RECOVERIES.counters();
    recoveries.with_label_values(NO_LABELS).inc_by(s.recoveries);
    let operations = STORE_OPERATIONS.counters();
    operations.with_label_values(NO_LABELS).inc_by(s.operations);
    let carried = STORE_CARRIED.counters();
    carried
        .with_label_values(NO_LABELS)
        .inc_by(s.settlements_carried);
    let waiting = STORE_WAITING.gauges();
    waiting
        .with_label_values(NO_LABELS)
        .set(s.settlements_waiting as f64);
    let outbox = STORE_OUTBOX.gauges();
    outbox
        .with_label_values(NO_LABELS)
        .set(s.outbox_tokens as f64);
    let replicated = STORE_REPLICATED.counters();
    replicated
        .with_label_values(NO_LABELS)
        .inc_by(s.bans_replicated);
    let mut out = families::collect(&up);
    out.extend(families::collect(&errors));
    out.extend(families::collect(&fallbacks));
    out.extend(families::collect(&outages));
    out.extend(families::collect(&recoveries));
    out.extend(families::collect(&operations));
    out.extend(families::collect(&carried));
    out.extend(families::collect(&waiting));
    out.extend(families::collect(&outbox));
    out.extend(families::collect(&replicated));
    out
}

/// Read-only handles on the pinned ban tries: walked without the node's lock (a walk of 100k
/// bans takes a fifth of a second of syscalls).
pub(crate) struct BanTables {
    v4: LpmTrie<MapData, [u8; 4], BanEntry>,
    v6: LpmTrie<MapData, [u8; 16], BanEntry>,
}

impl BanTables {
    pub(crate) fn open(bpffs_dir: &Path) -> Result<Self, MapError> {
        let open = |name: &str| Map::from_map_data(MapData::from_pin(bpffs_dir.join(name))?);
        Ok(Self {
            v4: LpmTrie::try_from(open(map_name::BANS_V4)?)?,
            v6: LpmTrie::try_from(open(map_name::BANS_V6)?)?,
        })
    }

    pub(crate) fn entries(&self) -> Result<Vec<(IpNetwork, BanEntry)>, MapError> {
        let mut out = Vec::new();
        for kv in self.v4.iter() {
            let (k, v) = kv?;
            out.push((crate::range::from_v4_key(k.prefix_len(), k.data()), v));
        }
        for kv in self.v6.iter() {
            let (k, v) = kv?;
            out.push((crate::range::from_v6_key(k.prefix_len(), k.data()), v));
        }
        Ok(out)
    }
}

/// Reads the node's maps and the shared store's health at each scrape.
pub struct NodeCollector {
    node: Arc<Mutex<Node>>,
    /// `None` if the pins could not be opened: the bans are then read under the node's lock.
    bans: Option<BanTables>,
    descs: Vec<Desc>,
}

impl NodeCollector {
    pub fn new(node: Arc<Mutex<Node>>) -> Self {
        let dir = node
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .config
            .daemon
            .bpffs_dir
            .clone();
        let bans = BanTables::open(&dir)
            .inspect_err(|e| {
                warn!(error = %e, dir = %dir.display(), "metrics: cannot open the pinned ban tables; scrapes will read them under the node's lock")
            })
            .ok();
        Self {
            node,
            bans,
            descs: ALL.iter().map(Spec::desc).collect(),
        }
    }
}

impl Collector for NodeCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // std Mutex: the reads below are syscalls, no await; the scrape runs on a blocking
        // thread because a large ban batch may hold the lock for seconds.
        let guard = self.node.lock().unwrap_or_else(|p| p.into_inner());
        let dp = &guard.dataplane;
        let mut out = Vec::new();
        match dp.counters() {
            Ok(rows) => {
                let interfaces: Vec<(String, Counters)> = dp
                    .attachments()
                    .iter()
                    .filter_map(|a| {
                        rows.get(a.stat_slot as usize)
                            .map(|r| (a.interface.clone(), *r))
                    })
                    .collect();
                out.extend(xdp_families(&interfaces));
            }
            Err(e) => warn!(error = %e, "metrics: reading the XDP counters failed"),
        }
        if self.bans.is_none() {
            match dp.ban_entries() {
                Ok(bans) => out.extend(ban_families(&bans, dataplane::boot_ns_now())),
                Err(e) => warn!(error = %e, "metrics: reading the ban tables failed"),
            }
        }
        let shared = guard.shared.clone();
        drop(guard);
        if let Some(tables) = &self.bans {
            match tables.entries() {
                Ok(bans) => out.extend(ban_families(
                    bans.iter().map(|(n, e)| (n, e)),
                    dataplane::boot_ns_now(),
                )),
                Err(e) => warn!(error = %e, "metrics: reading the ban tables failed"),
            }
        }
        if let Some(s) = shared {
            out.extend(store_families(&s.status()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::families::text;

    fn has(page: &str, line: &str) {
        assert!(
            page.lines().any(|l| l == line),
            "{line} missing from\n{page}"
        );
    }

    #[test]
    fn verdict_counters_are_named_by_interface_verdict_and_reason() {
        let mut eth0: Counters = Default::default();
        eth0[stat::PASSED as usize] = 100;
        eth0[stat::DROP_BANNED as usize] = 7;
        eth0[stat::DROP_RATE as usize] = 3;
        eth0[stat::SHADOW as usize] = 2;
        let p = text(&xdp_families(&[
            ("eth0".into(), eth0),
            ("eth1".into(), Counters::default()),
        ]));
        has(&p, "# TYPE aiguard_xdp_packets_total counter");
        has(
            &p,
            "aiguard_xdp_packets_total{interface=\"eth0\",reason=\"checked\",verdict=\"pass\"} 100",
        );
        has(
            &p,
            "aiguard_xdp_packets_total{interface=\"eth0\",reason=\"banned\",verdict=\"drop\"} 7",
        );
        has(
            &p,
            "aiguard_xdp_packets_total{interface=\"eth0\",reason=\"rate\",verdict=\"drop\"} 3",
        );
        has(
            &p,
            "aiguard_xdp_packets_total{interface=\"eth1\",reason=\"non_ip\",verdict=\"pass\"} 0",
        );
        has(&p, "aiguard_xdp_shadow_matches_total{interface=\"eth0\"} 2");
        // Six verdict series per interface: every packet in exactly one.
        assert_eq!(
            p.lines()
                .filter(|l| l.starts_with("aiguard_xdp_packets_total{interface=\"eth0\""))
                .count(),
            6
        );
    }

    #[test]
    fn bans_are_counted_by_origin_and_only_the_most_hit_are_named() {
        let entry = |hits, reason, expires_boot_ns| BanEntry {
            expires_boot_ns,
            hits,
            reason,
            ..BanEntry::default()
        };
        let mut bans = std::collections::BTreeMap::new();
        for i in 0..20u8 {
            let net: IpNetwork = format!("10.0.{i}.0/24").parse().expect("net");
            bans.insert(net, entry(u64::from(i) * 10, reason::MANUAL, 0));
        }
        bans.insert(
            "192.0.2.0/24".parse().expect("net"),
            entry(5, reason::DETECTOR, 2_000),
        );
        // Expired, not yet swept: not in force, not counted.
        bans.insert(
            "198.51.100.0/24".parse().expect("net"),
            entry(1_000_000, reason::REPLICATED, 500),
        );
        let p = text(&ban_families(&bans, 1_000));
        has(&p, "# TYPE aiguard_bans_active gauge");
        has(&p, "aiguard_bans_active{origin=\"cli\"} 20");
        has(&p, "aiguard_bans_active{origin=\"detector\"} 1");
        has(&p, "aiguard_bans_active{origin=\"replicated\"} 0");
        has(&p, "aiguard_xdp_ban_hits_total{range=\"10.0.19.0/24\"} 190");
        has(&p, "aiguard_xdp_ban_hits_total{range=\"10.0.10.0/24\"} 100");
        assert!(!p.contains("10.0.9.0/24"), "{p}");
        assert!(!p.contains("198.51.100.0/24"), "{p}");
        // The ten least hit in-force bans: 0 + 10 + ... + 90, and the detector's 5.
        has(&p, "aiguard_xdp_ban_hits_total{range=\"other\"} 455");
        assert_eq!(
            p.matches("aiguard_xdp_ban_hits_total{").count(),
            TOP_BANS + 1
        );
    }

    #[test]
    fn store_health_is_exported() {
        let s = SharedStatus {
            backend: "redis".into(),
            node: "n1".into(),
            up: false,
            state_secs: Some(3),
            last_error: Some("connection refused".into()),
            operations: 40,
            errors: 4,
            timeouts: 2,
            fallbacks: 9,
            outages: 1,
            recoveries: 2,
            outbox_tokens: 120,
            retries_pending: 0,
            settlements_carried: 7,
            settlements_waiting: 3,
            bans_replicated: 11,
        };
        let p = text(&store_families(&s));
        has(&p, "aiguard_store_up{backend=\"redis\"} 0");
        has(&p, "aiguard_store_errors_total{kind=\"error\"} 4");
        has(&p, "aiguard_store_errors_total{kind=\"timeout\"} 2");
        has(&p, "aiguard_store_fallback_decisions_total 9");
        has(&p, "aiguard_store_outages_total 1");
        has(&p, "aiguard_store_recoveries_total 2");
        has(&p, "aiguard_store_operations_total 40");
        has(&p, "aiguard_store_outbox_tokens 120");
        has(&p, "aiguard_store_settlements_carried_total 7");
        has(&p, "aiguard_store_settlements_waiting 3");
        has(&p, "aiguard_store_bans_replicated_total 11");
        assert!(!p.contains("connection refused"), "no free text in labels");
    }
}
