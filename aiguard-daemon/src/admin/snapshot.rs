//! The admin API's `top` request: everything `aiguard top` draws, read in one go so that a
//! refresh is one round trip and its numbers come from one moment.
use std::collections::BTreeMap;

use aiguard_common::stat;

use super::{ErrorKind, Reply, TOP_BANS_LIMIT, TierRequests, TopBan, TopSnapshot, server::error};
use crate::{bans::now_ms, daemon::Node, metrics::GatewayMetrics};

/// The family the gateway counts its requests in, by tier and outcome.
const REQUESTS_FAMILY: &str = "aiguard_gateway_requests_total";

/// The node's counters as they are now.
pub fn top(node: &Node) -> Reply {
    let counters = match node.dataplane.counters() {
        Ok(c) => c,
        Err(e) => return error(ErrorKind::Internal, e.to_string(), None),
    };
    let mut drops = BTreeMap::new();
    let mut passed = 0;
    for a in node.dataplane.attachments() {
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
    let views = match node.bans.list(&node.dataplane) {
        Ok(v) => v,
        Err(e) => return error(ErrorKind::Internal, e.to_string(), None),
    };
    let mut top_bans: Vec<TopBan> = views
        .into_iter()
        .map(|v| TopBan {
            range: v.record.range.to_string(),
            hits: v.hits,
            reason: v.record.reason.to_string(),
            shadow: v.record.shadow,
        })
        .collect();
    top_bans.sort_by(|a, b| b.hits.cmp(&a.hits).then_with(|| a.range.cmp(&b.range)));
    top_bans.truncate(TOP_BANS_LIMIT);
    let node_name = match &node.shared {
        Some(s) => s.node().to_string(),
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "-".into()),
    };
    Reply::Top(Box::new(TopSnapshot {
        node: node_name,
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_secs: node.started.elapsed().as_secs(),
        now_ms: now_ms(),
        interfaces: node
            .dataplane
            .attachments()
            .iter()
            .map(|a| a.interface.clone())
            .collect(),
        passed,
        drops,
        bans: node.bans.len(),
        top_bans,
        gateway: node.gateway.is_some(),
        tiers: node
            .gateway
            .as_ref()
            .map(|gw| tier_requests(&gw.metrics))
            .unwrap_or_default(),
        store: node.shared.as_ref().map(|s| s.status()),
    }))
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
