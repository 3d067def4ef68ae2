//! The admin API's `top` request: everything `aiguard top` draws, read in one go so that a
//! refresh is one round trip and its numbers come from one moment.
use std::{collections::BTreeMap, sync::Mutex};

use aiguard_common::stat;
use ipnetwork::IpNetwork;

use super::{ErrorKind, Reply, TOP_BANS_LIMIT, TierRequests, TopBan, TopSnapshot, server::error};
use crate::{
    bans::now_ms,
    daemon::Node,
    dataplane,
    metrics::{GatewayMetrics, node::BanTables},
};

/// The family the gateway counts its requests in, by tier and outcome.
const REQUESTS_FAMILY: &str = "aiguard_gateway_requests_total";

/// The node's counters as they are now. The lock is held for the counters and the registry,
/// not for the walk of the ban tables that finds the most hit bans.
pub fn top(node: &Mutex<Node>) -> Reply {
    let guard = node.lock().unwrap_or_else(|p| p.into_inner());
    let counters = match guard.dataplane.counters() {
        Ok(c) => c,
        Err(e) => return error(ErrorKind::Internal, e.to_string(), None),
    };
    let mut drops = BTreeMap::new();
    let mut passed = 0;
    for a in guard.dataplane.attachments() {
        let Some(row) = counters.get(a.stat_slot as usize) else {
            continue;
        };
        for (i, v) in row.iter().enumerate() {
            match i as u32 {
                stat::DROP_BANNED => *drops.entry("banned".to_owned()).or_insert(0) += v,
                stat::DROP_RATE => *drops.entry("rate".to_owned()).or_insert(0) += v,
                stat::SHADOW => {}
                _ => passed += v,
            }
        }
    }
    // Both reasons are always present, so that a sparkline starts at zero.
    for reason in ["banned", "rate"] {
        drops.entry(reason.to_owned()).or_insert(0);
    }
    let node_name = match &guard.shared {
        Some(s) => s.node().to_string(),
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "-".into()),
    };
    let mut snapshot = TopSnapshot {
        node: node_name,
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_secs: guard.started.elapsed().as_secs(),
        now_ms: now_ms(),
        interfaces: guard
            .dataplane
            .attachments()
            .iter()
            .map(|a| a.interface.clone())
            .collect(),
        passed,
        drops,
        bans: guard.bans.len(),
        top_bans: Vec::new(),
        gateway: guard.gateway.is_some(),
        tiers: guard
            .gateway
            .as_ref()
            .map(|gw| tier_requests(&gw.metrics))
            .unwrap_or_default(),
        store: guard.shared.as_ref().map(|s| s.status()),
    };
    let bpffs_dir = guard.config.daemon.bpffs_dir.clone();
    drop(guard);

    let most_hit = match BanTables::open(&bpffs_dir).and_then(|t| t.entries()) {
        Ok(entries) => {
            let now = dataplane::boot_ns_now();
            let mut live: Vec<(IpNetwork, u64)> = entries
                .into_iter()
                .filter(|(_, e)| e.expires_boot_ns == 0 || e.expires_boot_ns > now)
                .map(|(net, e)| (net, e.hits))
                .collect();
            live.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            live.truncate(TOP_BANS_LIMIT);
            live
        }
        // No pins to read (a dataplane without bpffs): the registry's listing, under the lock.
        Err(_) => {
            let guard = node.lock().unwrap_or_else(|p| p.into_inner());
            match guard.bans.list(&guard.dataplane) {
                Ok(views) => views.iter().map(|v| (v.record.range, v.hits)).collect(),
                Err(e) => return error(ErrorKind::Internal, e.to_string(), None),
            }
        }
    };
    let guard = node.lock().unwrap_or_else(|p| p.into_inner());
    let mut top_bans: Vec<TopBan> = most_hit
        .into_iter()
        .filter_map(|(range, hits)| {
            // A ban lifted since the walk is left out.
            let record = guard.bans.get(&range)?;
            Some(TopBan {
                range: range.to_string(),
                hits,
                reason: record.reason.to_string(),
                shadow: record.shadow,
            })
        })
        .collect();
    drop(guard);
    top_bans.sort_by(|a, b| b.hits.cmp(&a.hits).then_with(|| a.range.cmp(&b.range)));
    top_bans.truncate(TOP_BANS_LIMIT);
    snapshot.top_bans = top_bans;
    Reply::Top(Box::new(snapshot))
}

/// Requests per tier by outcome, read from the gateway's own counters (the ones `/metrics`
/// exports), so that `top` and Grafana agree.
pub fn tier_requests(metrics: &GatewayMetrics) -> Vec<TierRequests> {
    let mut tiers: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for collector in metrics.collectors() {
        for family in collector.collect() {
            if family.name() != REQUESTS_FAMILY {
                continue;
            }
            for m in family.get_metric() {
                let label = |name: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_owned())
                };
                let (Some(tier), Some(outcome)) = (label("tier"), label("outcome")) else {
                    continue;
                };
                *tiers.entry(tier).or_default().entry(outcome).or_insert(0) +=
                    m.get_counter().get_value() as u64;
            }
        }
    }
    tiers
        .into_iter()
        .map(|(tier, outcomes)| TierRequests { tier, outcomes })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Outcome, gateway::NO_TIER};

    #[test]
    fn tier_rows_carry_every_outcome_of_every_tier() {
        let m = GatewayMetrics::new(["free", "paid"]);
        m.count("paid", Outcome::Allowed);
        m.count("paid", Outcome::Allowed);
        m.count("free", Outcome::RateLimited);
        m.count("free", Outcome::QuotaExceeded);
        m.count(NO_TIER, Outcome::Unauthorized);
        let rows = tier_requests(&m);
        let names: Vec<&str> = rows.iter().map(|r| r.tier.as_str()).collect();
        assert_eq!(names, ["free", "none", "paid"]);
        let free = &rows[0];
        assert_eq!(free.allowed(), 0);
        assert_eq!(free.limited(), 2);
        assert_eq!(free.outcomes["rate_limited"], 1);
        let paid = &rows[2];
        assert_eq!(paid.allowed(), 2);
        assert_eq!(paid.limited(), 0);
        assert_eq!(rows[1].outcomes["unauthorized"], 1);
    }
}
