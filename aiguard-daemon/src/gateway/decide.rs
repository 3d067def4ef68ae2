//! Where a request's limits are decided: in this node's memory (the embedded store), or in
//! the shared store, with each tier's failure mode taking over while Redis cannot answer.
use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use rustc_hash::FxHashMap;

use crate::{
    limits::{Admission, Demand, Denial, Limiter, Progress, RateHeaders, RateState},
    shared::{FailureMode, Shared, limits::SharedAdmission, limits::month_name},
    tiers::{Limits, QuotaEnforcement, TenantPolicy},
};

/// Why a request was not admitted.
#[derive(Debug)]
pub enum Refusal {
    /// Over a limit.
    Denied(Denial, RateHeaders),
    /// The shared store cannot decide and the tier fails closed.
    StoreUnavailable { retry_after: Duration },
}

/// A request admitted: it holds its slots and reservation until settled (or dropped).
pub enum Ticket {
    Local(Admission),
    Shared(SharedAdmission),
    /// Admitted by a tier's failure mode while Redis could not decide: the local limits (if
    /// any) hold it, and its usage waits in the outbox for Redis.
    Fallback(Fallback),
}

pub struct Fallback {
    local: Option<Admission>,
    shared: Arc<Shared>,
    tenant: String,
    month: String,
    reserved: u64,
    quota: QuotaEnforcement,
    settled: bool,
}

impl Fallback {
    fn finish(&mut self, used: u64) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        if let Some(a) = self.local.take() {
            a.settle(used);
        }
        // On disk when this returns (one small group-committed transaction, only while Redis
        // is away): a crash now does not lose the usage Redis has not seen.
        self.shared
            .outbox
            .add(&self.tenant, &self.month, used as i64);
    }
}

impl Drop for Fallback {
    fn drop(&mut self) {
        let reserved = self.reserved;
        self.finish(reserved);
    }
}

impl Ticket {
    pub fn headers(&self) -> RateHeaders {
        match self {
            Ticket::Local(a) => a.headers,
            Ticket::Shared(a) => a.headers,
            Ticket::Fallback(f) => f.local.as_ref().map(|a| a.headers).unwrap_or_default(),
        }
    }

    pub fn reserved(&self) -> u64 {
        match self {
            Ticket::Local(a) => a.reserved(),
            Ticket::Shared(a) => a.reserved(),
            Ticket::Fallback(f) => f.reserved,
        }
    }

    pub fn quota_enforcement(&self) -> QuotaEnforcement {
        match self {
            Ticket::Local(a) => a.quota_enforcement(),
            Ticket::Shared(a) => a.quota_enforcement(),
            Ticket::Fallback(f) => f.quota,
        }
    }

    pub fn progress(&mut self, tokens: u64) -> Progress {
        match self {
            Ticket::Local(a) => a.progress(tokens),
            Ticket::Shared(a) => a.progress(tokens),
            Ticket::Fallback(f) => match &mut f.local {
                Some(a) => a.progress(tokens),
                None => Progress::Continue,
            },
        }
    }

    pub fn settle(self, used: u64) {
        match self {
            Ticket::Local(a) => a.settle(used),
            Ticket::Shared(a) => a.settle(used),
            Ticket::Fallback(mut f) => f.finish(used),
        }
    }
}

/// Decides requests: in memory, or in Redis with a fallback.
pub struct Decider {
    shared: Option<Arc<Shared>>,
    /// What each tenant's monthly counter said at its last shared admission: the local
    /// fallback's quota starts from there.
    last_month: std::sync::Mutex<FxHashMap<String, (u32, u64)>>,
}

impl Decider {
    pub fn new(shared: Option<Arc<Shared>>) -> Self {
        Self {
            shared,
            last_month: Default::default(),
        }
    }

    pub fn shared(&self) -> Option<&Arc<Shared>> {
        self.shared.as_ref()
    }

    /// Admits `d` in memory (`local`) or in the shared store.
    pub async fn admit(
        &self,
        local: &Limiter,
        d: &Demand<'_>,
        on_failure: FailureMode,
    ) -> Result<Ticket, Refusal> {
        let Some(shared) = &self.shared else {
            return match local.admit(d) {
                Ok(a) => Ok(Ticket::Local(a)),
                Err(denial) => {
                    let rate = local.peek(d.tenant, d.key, d.policy, d.model);
                    Err(Refusal::Denied(denial, rate))
                }
            };
        };
        let failure = match shared.admit(d).await {
            Ok(Ok(a)) => {
                if d.policy.monthly_tokens.is_some() {
                    self.last_month
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(d.tenant.to_owned(), (d.month, a.month_used()));
                }
                return Ok(Ticket::Shared(a));
            }
            Ok(Err(denial)) => {
                let rate = refused_headers(&denial);
                return Err(Refusal::Denied(denial, rate));
            }
            Err(failure) => failure,
        };
        shared.health.fallbacks.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(error = %failure, mode = ?on_failure, "deciding without the shared store");
        let month = month_name(d.month);
        let local = match on_failure {
            FailureMode::FailClosed => {
                return Err(Refusal::StoreUnavailable {
                    retry_after: shared.settings().retry_interval.max(Duration::from_secs(1)),
                });
            }
            FailureMode::FailOpen => None,
            FailureMode::Local => {
                let policy = self.fallback_policy(local, d, shared, &month);
                let demand = Demand {
                    policy: &policy,
                    ..d.clone()
                };
                match local.admit(&demand) {
                    Ok(a) => Some(a),
                    Err(denial) => {
                        let rate = local.peek(d.tenant, d.key, &policy, d.model);
                        return Err(Refusal::Denied(denial, rate));
                    }
                }
            }
        };
        Ok(Ticket::Fallback(Fallback {
            local,
            shared: shared.clone(),
            tenant: d.tenant.to_owned(),
            month,
            reserved: d.tokens,
            quota: d.policy.quota,
            settled: false,
        }))
    }

    /// The tier's limits divided among the nodes; the monthly quota is this node's share of
    /// what was left when Redis last answered, less what the outbox already holds.
    fn fallback_policy(
        &self,
        local: &Limiter,
        d: &Demand<'_>,
        shared: &Shared,
        month: &str,
    ) -> TenantPolicy {
        let nodes = u64::from(shared.settings().nodes.max(1));
        let split = |l: &Limits| Limits {
            requests_per_minute: l.requests_per_minute.map(|v| v.div_ceil(nodes)),
            requests_per_day: l.requests_per_day.map(|v| v.div_ceil(nodes)),
            tokens_per_minute: l.tokens_per_minute.map(|v| v.div_ceil(nodes)),
            max_concurrent: l.max_concurrent.map(|v| v.div_ceil(nodes)),
        };
        let monthly_tokens = d.policy.monthly_tokens.map(|limit| {
            let seen = self
                .last_month
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(d.tenant)
                .filter(|(m, _)| *m == d.month)
                .map(|(_, used)| *used)
                .unwrap_or(0);
            let local_used = local.month_usage(d.tenant, d.month).0;
            let pending = shared.outbox.tenant(d.tenant, month).max(0) as u64;
            // The local limiter counts every fallback token of the month; this outage's are
            // still in the outbox. Its quota: what it had counted before the outage, plus
            // this node's share of what was left.
            let share = limit.saturating_sub(seen) / nodes;
            (share + local_used).saturating_sub(pending).max(1)
        });
        TenantPolicy {
            tenant: split(&d.policy.tenant),
            per_key: split(&d.policy.per_key),
            monthly_tokens,
            quota: d.policy.quota,
        }
    }
}

/// Headers for an answer Redis refused: the refused limit, spent until it resets.
fn refused_headers(d: &Denial) -> RateHeaders {
    match *d {
        Denial::Requests {
            per: "minute",
            limit,
            retry_after,
            ..
        } => RateHeaders {
            requests: Some(RateState {
                limit,
                remaining: 0,
                reset: retry_after,
            }),
            tokens: None,
        },
        Denial::Tokens {
            limit, retry_after, ..
        } => RateHeaders {
            requests: None,
            tokens: Some(RateState {
                limit,
                remaining: 0,
                reset: retry_after,
            }),
        },
        _ => RateHeaders::default(),
    }
}
