//! The admin API's gateway requests: keys, quota, usage, reload, and the gateway's status.
use super::{ErrorKind, GatewayStatus, QuotaReport, Reply, Request, server::error};
use crate::{
    bans::now_ms,
    daemon::{self, Node},
    keys::KeyError,
    tiers::is_valid_name,
    usage::{Today, parse_month},
};

pub fn is_gateway_request(r: &Request) -> bool {
    matches!(
        r,
        Request::KeysAdd { .. }
            | Request::KeysList { .. }
            | Request::KeysRevoke { .. }
            | Request::KeysSuspend { .. }
            | Request::KeysResume { .. }
            | Request::Quota { .. }
            | Request::Usage { .. }
            | Request::Reload
    )
}

pub fn status(node: &Node) -> Option<GatewayStatus> {
    let gw = node.gateway.as_ref()?;
    let c = &gw.counters;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    Some(GatewayStatus {
        listen: node.gateway_listen.clone(),
        upstreams: gw.policy().settings.upstreams.clone(),
        keys: node
            .keys
            .list()
            .iter()
            .filter(|k| k.revoked_ms.is_none())
            .count(),
        requests: get(&c.requests),
        allowed: get(&c.allowed),
        rate_limited: get(&c.rate_limited),
        quota_exceeded: get(&c.quota_exceeded),
        unauthorized: get(&c.unauthorized),
        bad_requests: get(&c.bad_requests),
        upstream_errors: get(&c.upstream_errors),
        store_unavailable: get(&c.store_unavailable),
        shed: get(&c.shed),
    })
}

fn key_error(e: KeyError) -> Reply {
    let kind = match e {
        KeyError::NotFound(_) | KeyError::AlreadyRevoked(_) | KeyError::NotSuspended(_) => {
            ErrorKind::Conflict
        }
        KeyError::Store(_) => ErrorKind::Internal,
    };
    error(kind, e.to_string(), None)
}

fn invalid(message: String) -> Reply {
    error(ErrorKind::InvalidRequest, message, None)
}

pub fn handle(node: &mut Node, request: Request) -> Reply {
    let tiers = node.config.tier_table();
    match request {
        Request::KeysAdd { tenant, tier } => {
            if !is_valid_name(&tenant) {
                return invalid(format!(
                    "tenant {tenant:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
                ));
            }
            let tier = tier.unwrap_or_else(|| tiers.default_tier.clone());
            if !tiers.has_tier(&tier) {
                return invalid(format!(
                    "no tier {tier:?} in the configuration; configured tiers: {}",
                    tiers.tiers.keys().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
            match node.keys.create(&tenant, &tier, now_ms()) {
                Ok((mut key, secret)) => {
                    if let Some(s) = &node.shared {
                        crate::shared::keys::announce_key(s, &key);
                    }
                    key.sha256.clear();
                    Reply::KeyCreated { key, secret }
                }
                Err(e) => key_error(e),
            }
        }
        Request::KeysList { tenant } => Reply::Keys {
            keys: node
                .keys
                .list()
                .into_iter()
                .filter(|k| tenant.as_ref().is_none_or(|t| *t == k.tenant))
                .map(|mut k| {
                    k.sha256.clear();
                    k
                })
                .collect(),
        },
        Request::KeysRevoke { id } => match node.keys.revoke(&id, now_ms()) {
            Ok(mut key) => {
                if let Some(s) = &node.shared {
                    crate::shared::keys::announce_key(s, &key);
                }
                key.sha256.clear();
                Reply::KeyRevoked { key }
            }
            Err(e) => key_error(e),
        },
        Request::KeysSuspend { id, for_ms, reason } => {
            let reason = reason.unwrap_or_else(|| "suspended by an operator".into());
            match node
                .keys
                .suspend(&id, now_ms().saturating_add(for_ms), &reason)
            {
                Ok(mut key) => {
                    tracing::warn!(key = %key.id, tenant = %key.tenant, %reason, "key suspended");
                    key.sha256.clear();
                    Reply::KeySuspended { key }
                }
                Err(e) => key_error(e),
            }
        }
        Request::KeysResume { id } => match node.keys.resume(&id, now_ms()) {
            Ok(mut key) => {
                tracing::info!(key = %key.id, tenant = %key.tenant, "key resumed");
                key.sha256.clear();
                Reply::KeyResumed { key }
            }
            Err(e) => key_error(e),
        },
        Request::Quota { tenant } => {
            let live: Vec<_> = node
                .keys
                .list()
                .into_iter()
                .filter(|k| k.tenant == tenant)
                .collect();
            if live.is_empty() && !tiers.tenants.contains_key(&tenant) {
                return error(
                    ErrorKind::Conflict,
                    format!("no tenant {tenant:?}: it has no keys (see `aiguard keys list`)"),
                    None,
                );
            }
            let mut tier_names: Vec<String> = live
                .iter()
                .filter(|k| k.revoked_ms.is_none())
                .map(|k| k.tier.clone())
                .collect();
            tier_names.sort();
            tier_names.dedup();
            let tier = tier_names
                .first()
                .cloned()
                .unwrap_or_else(|| tiers.default_tier.clone());
            let policy = tiers.policy(&tenant, &tier);
            let today = Today::now();
            let shared_used = node.shared.as_ref().map(|s| {
                // On the admin API's blocking thread: waiting here holds no runtime worker.
                let pending = s.outbox.tenant(&tenant, &today.month()).max(0) as u64;
                tokio::runtime::Handle::current()
                    .block_on(s.month_used(&tenant, &today))
                    .map(|used| used + pending)
            });
            let (used, reserved) = match (shared_used, &node.gateway) {
                // Redis counts reservations in flight as used.
                (Some(Ok(used)), _) => (used, 0),
                (Some(Err(e)), _) => {
                    return error(
                        ErrorKind::Internal,
                        format!("the shared store cannot say: {e}"),
                        None,
                    );
                }
                (None, Some(gw)) => gw.limiter.month_usage(&tenant, today.month_index()),
                (None, None) => match node.ledger.monthly_totals(&today.month()) {
                    Ok(t) => (t.get(&tenant).copied().unwrap_or(0), 0),
                    Err(e) => return error(ErrorKind::Internal, e.to_string(), None),
                },
            };
            Reply::Quota(QuotaReport {
                tenant,
                month: today.month(),
                used,
                reserved,
                limit: policy.monthly_tokens,
                remaining: policy
                    .monthly_tokens
                    .map(|l| l.saturating_sub(used + reserved)),
                resets_in_secs: today.month_left().as_secs(),
                enforcement: policy.quota,
                tiers: tier_names,
            })
        }
        Request::Usage { month, tenant } => {
            let month = match month {
                Some(m) if parse_month(&m).is_none() => {
                    return invalid(format!("month {m:?}: use YYYY-MM, e.g. 2026-12"));
                }
                Some(m) => m,
                None => Today::now().month(),
            };
            let tier_of: std::collections::HashMap<String, String> = node
                .keys
                .list()
                .into_iter()
                .map(|k| (k.id, k.tier))
                .collect();
            match node.ledger.report(&month, tenant.as_deref()) {
                Ok(mut rows) => {
                    for r in &mut rows {
                        let tier = tier_of
                            .get(&r.key)
                            .map(String::as_str)
                            .unwrap_or(&tiers.default_tier);
                        let p = tiers.price(tier, &r.model);
                        r.cost = (r.prompt_tokens as f64 * p.prompt_per_1k
                            + r.completion_tokens as f64 * p.completion_per_1k)
                            / 1000.0;
                    }
                    Reply::Usage { month, rows }
                }
                Err(e) => error(ErrorKind::Internal, e.to_string(), None),
            }
        }
        Request::Reload => match daemon::reload(node) {
            Ok(needs_restart) => Reply::Reloaded { needs_restart },
            Err(message) => invalid(message),
        },
        _ => error(ErrorKind::Internal, "not a gateway request".into(), None),
    }
}
