//! Decisions against the shared store: the same limits as [`crate::limits`] (GCRA rates,
//! concurrency, the monthly quota, at the tenant, key and model levels), held in Redis and
//! decided by one script call per request, so that every node's requests count against one
//! set of buckets.
//!
//! Admission charges the monthly counter with the reservation at once (requests in flight on
//! other nodes see it); settlement moves it by what was really used. A settlement Redis does
//! not take is retried until it does (the concurrency leases it held expire on their own after
//! `store.lease`). One that comes after its request's record expired (a stream longer than
//! `store.lease`, or a settlement that waited out an outage) still moves the counter: the
//! reservation is still in it. Each settlement leaves a mark for `store.lease`, so a retry of
//! one that ran (its answer lost) does nothing.
use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tracing::{debug, error, warn};

use super::{Shared, StoreFailure};
use crate::{
    limits::{Demand, Denial, Level, Progress, RateHeaders, RateState},
    tiers::{Limits, QuotaEnforcement},
};

/// A request admitted by the shared store.
pub struct SharedAdmission {
    shared: Arc<Shared>,
    tenant: String,
    month: String,
    /// Bucket and lease keys per level, then the month counter (the scripts' KEYS).
    keys: Vec<String>,
    lease: String,
    /// Per level: tokens per minute and max concurrent as admitted (0: none).
    levels: Vec<(u64, u64)>,
    reserved: u64,
    /// What admission added to the monthly counter.
    quota_reserved: u64,
    /// What the quota had left after admission (None: no quota).
    left_after: Option<u64>,
    monthly_limit: Option<u64>,
    /// The monthly counter after admission.
    month_used: u64,
    quota: QuotaEnforcement,
    pub headers: RateHeaders,
    settled: bool,
    /// A level's leases were over half its cap at admission: its settlement frees the slot at
    /// once instead of waiting to ride.
    tight: bool,
}

fn level_args(limits: &Limits) -> [u64; 4] {
    [
        limits.requests_per_minute.unwrap_or(0),
        limits.requests_per_day.unwrap_or(0),
        limits.tokens_per_minute.unwrap_or(0),
        limits.max_concurrent.unwrap_or(0),
    ]
}

/// `YYYY-MM` of a month index (`year*12 + month-1`).
pub fn month_name(index: u32) -> String {
    format!("{:04}-{:02}", index / 12, index % 12 + 1)
}

const LEVELS: [Level; 3] = [Level::Tenant, Level::Key, Level::Model];

impl Shared {
    /// Admits a request against every level in Redis, or refuses it (charging nothing), or
    /// says that Redis could not decide within the budget.
    pub async fn admit(
        self: &Arc<Self>,
        d: &Demand<'_>,
    ) -> Result<Result<SharedAdmission, Denial>, StoreFailure> {
        let month = month_name(d.month);
        let mut keys = Vec::with_capacity(7);
        let mut levels: Vec<(&Limits, String)> = vec![
            (&d.policy.tenant, "t".to_owned()),
            (&d.policy.per_key, format!("k:{}", d.key)),
        ];
        if let Some((model, limits)) = d.model {
            levels.push((limits, format!("m:{model}")));
        }
        for (_, name) in &levels {
            keys.push(self.tenant_key(d.tenant, &format!("b:{name}")));
            keys.push(self.tenant_key(d.tenant, &format!("c:{name}")));
        }
        keys.push(self.month_key(d.tenant, &month));
        // Parked under these keys (its levels' and month's): the settlements it can carry.
        let carried = self.take_parked(&keys);
        let lease = self.lease_id();
        keys.push(self.tenant_key(d.tenant, &format!("r:{lease}")));
        let gone = super::month_gone_ms(&month).unwrap_or(0);
        let lease_ms = self.settings().lease.as_millis() as u64;

        let mut inv = self.scripts.admit.prepare_invoke();
        for k in keys
            .iter()
            .chain(carried.iter().filter_map(|c| c.keys.last()))
        {
            inv.key(k);
        }
        let levels_admitted: Vec<(u64, u64)> = levels
            .iter()
            .map(|(l, _)| {
                (
                    l.tokens_per_minute.unwrap_or(0),
                    l.max_concurrent.unwrap_or(0),
                )
            })
            .collect();
        inv.arg(levels.len())
            .arg(&lease)
            .arg(lease_ms)
            .arg(d.tokens)
            .arg(d.min_tokens)
            .arg(d.policy.monthly_tokens.unwrap_or(0))
            .arg(gone);
        for (limits, _) in &levels {
            for a in level_args(limits) {
                inv.arg(a);
            }
        }
        inv.arg(carried.len());
        for c in &carried {
            inv.arg(&c.lease)
                .arg(c.reserved)
                .arg(c.used)
                .arg(c.delta)
                .arg(c.level_mask());
        }
        let sent = Instant::now();
        let reply: Vec<i64> = match self
            .run(
                self.decision_budget(),
                |c| async move { c.invoke(&inv).await },
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                // The settlements it carried may have run: each goes alone, as a retry.
                for c in carried {
                    self.queue(c.sent_at(sent, &e));
                }
                // Sent, perhaps run (or to run, once a hung Redis resumes): cancel it, so a
                // request the node refused or served without Redis is not charged there too.
                if e != StoreFailure::Down {
                    self.queue(
                        SettleCall {
                            tenant: d.tenant.to_owned(),
                            month: month.clone(),
                            keys,
                            lease,
                            levels: levels_admitted,
                            reserved: d.tokens,
                            used: 0,
                            delta: 0,
                            cancel: true,
                            unanswered: None,
                            refusals: 0,
                        }
                        .sent_at(sent, &e),
                    );
                }
                return Err(e);
            }
        };
        // Answered: what it carried was applied, whatever the answer.
        if !carried.is_empty() {
            self.settlements_carried
                .fetch_add(carried.len() as u64, Ordering::Relaxed);
        }
        let at = |i: usize| reply.get(i).copied().unwrap_or(0).max(0) as u64;
        let level = |i: usize| LEVELS[(at(i) as usize).clamp(1, 3) - 1];
        let us = |i: usize| Duration::from_micros(at(i));
        let denial = match reply.first().copied() {
            Some(0) => None,
            Some(1) => Some(Denial::Concurrency {
                level: level(1),
                limit: at(2),
            }),
            Some(2) => Some(Denial::Quota {
                limit: at(3),
                used: at(1),
                requested: at(2),
                resets_in: d.month_left,
            }),
            Some(3) => Some(Denial::Requests {
                level: level(1),
                per: if at(2) == 2 { "day" } else { "minute" },
                limit: at(3),
                retry_after: us(4),
            }),
            Some(4) => Some(Denial::Tokens {
                level: level(1),
                limit: at(2),
                requested: d.tokens,
                retry_after: us(3),
            }),
            Some(5) => Some(Denial::TooLarge {
                level: level(1),
                limit: at(2),
                requested: d.tokens,
            }),
            Some(6) => {
                return Err(StoreFailure::Refused(
                    "the request was cancelled before Redis ran its admission".into(),
                ));
            }
            other => {
                return Err(StoreFailure::Refused(format!(
                    "the admission script answered {other:?}"
                )));
            }
        };
        if let Some(denial) = denial {
            return Ok(Err(denial));
        }
        let state = |limit: i64, remaining: i64, reset_us: u64| {
            (limit >= 0).then(|| RateState {
                limit: limit as u64,
                remaining: remaining.max(0) as u64,
                reset: Duration::from_micros(reset_us),
            })
        };
        let headers = RateHeaders {
            requests: state(reply[3], reply[4], at(5)),
            tokens: state(reply[6], reply[7], at(8)),
        };
        let month_used = at(2);
        Ok(Ok(SharedAdmission {
            shared: self.clone(),
            tenant: d.tenant.to_owned(),
            month,
            keys,
            lease,
            levels: levels_admitted,
            reserved: d.tokens,
            quota_reserved: at(1),
            left_after: d
                .policy
                .monthly_tokens
                .map(|limit| limit.saturating_sub(month_used)),
            monthly_limit: d.policy.monthly_tokens,
            month_used,
            quota: d.policy.quota,
            headers,
            settled: false,
            tight: reply.get(9) == Some(&1),
        }))
    }
}

impl SharedAdmission {
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    pub fn quota_enforcement(&self) -> QuotaEnforcement {
        self.quota
    }

    /// The tenant's monthly counter right after this admission.
    pub fn month_used(&self) -> u64 {
        self.month_used
    }

    /// A stream has used `tokens` so far. Past its reservation, it may go on into what the
    /// quota had left at admission (other nodes' use since is seen at the next admission).
    pub fn progress(&mut self, tokens: u64) -> Progress {
        if tokens <= self.quota_reserved {
            return Progress::Continue;
        }
        if let (Some(limit), Some(left)) = (self.monthly_limit, self.left_after)
            && self.quota == QuotaEnforcement::Hard
            && tokens - self.quota_reserved > left
        {
            return Progress::QuotaExhausted { limit };
        }
        Progress::Continue
    }

    /// Settles now and waits for Redis (for benchmarks and tests; the gateway settles in the
    /// background). A settlement Redis does not take is queued for retry, as in the background.
    pub async fn settle_and_wait(mut self, used: u64) -> Result<(), StoreFailure> {
        self.settled = true;
        let mut call = self.call(used);
        let shared = self.shared.clone();
        match shared.settle_call(&mut call).await {
            Ok(_) => Ok(()),
            Err(e) => {
                shared.queue(call);
                Err(e)
            }
        }
    }

    fn call(&mut self, used: u64) -> SettleCall {
        SettleCall {
            tenant: std::mem::take(&mut self.tenant),
            month: std::mem::take(&mut self.month),
            keys: std::mem::take(&mut self.keys),
            lease: std::mem::take(&mut self.lease),
            levels: std::mem::take(&mut self.levels),
            reserved: self.reserved,
            used,
            delta: used as i64 - self.quota_reserved as i64,
            cancel: false,
            unanswered: None,
            refusals: 0,
        }
    }

    /// Settles with the tokens really used, in the background: the response is not held
    /// for it. What Redis does not take is retried until it does.
    pub fn settle(mut self, used: u64) {
        self.finish(used);
    }

    fn finish(&mut self, used: u64) {
        if self.settled {
            return;
        }
        self.settled = true;
        let call = self.call(used);
        // It waits to ride with the next admission of its tenant, key and model, unless it
        // holds a slot others may need soon or it charges more than admission did (that usage
        // is not left in memory to wait).
        if !self.tight
            && call.delta <= 0
            && !self.shared.settings().settle_delay.is_zero()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            self.shared.park(call);
            return;
        }
        self.shared.send_settlements(vec![call]);
    }
}

/// A settlement (or the cancellation of an admission) to run in Redis; idempotent through the
/// request's record (and the mark a settlement leaves), so it can be retried until Redis
/// takes it.
#[derive(Debug, Clone)]
pub struct SettleCall {
    tenant: String,
    month: String,
    keys: Vec<String>,
    lease: String,
    levels: Vec<(u64, u64)>,
    reserved: u64,
    used: u64,
    delta: i64,
    cancel: bool,
    /// When the first try that may have run in Redis without this node hearing back (a
    /// timeout, a connection lost mid-way) was sent.
    unanswered: Option<Instant>,
    /// Tries Redis answered with an error (it refused the script).
    refusals: u32,
}

/// A settlement waiting for an admission to carry it.
pub(super) struct Parked {
    call: SettleCall,
    since: Instant,
}

/// Most settlements one admission carries (each adds a key and five arguments).
const MAX_CARRIED: usize = 8;

/// Tries of a settlement that Redis refuses (answers with an error) before it is given up.
const MAX_REFUSALS: u32 = 10;

impl SettleCall {
    /// For an admission that carries it: bit i-1 when it holds a lease at level i, bit i+2 when
    /// its tokens were charged there.
    fn level_mask(&self) -> u64 {
        self.levels
            .iter()
            .enumerate()
            .map(|(i, (tpm, maxc))| u64::from(*maxc != 0) << i | u64::from(*tpm != 0) << (i + 3))
            .sum()
    }

    /// Notes a try sent at `sent` that failed with `e`.
    fn sent_at(mut self, sent: Instant, e: &StoreFailure) -> Self {
        self.failed(sent, e);
        self
    }

    fn failed(&mut self, sent: Instant, e: &StoreFailure) {
        match e {
            // Never sent.
            StoreFailure::Down => {}
            StoreFailure::Timeout(_) | StoreFailure::Error(_) => {
                self.unanswered.get_or_insert(sent);
            }
            // A script that failed mid-way may have written part of what it does.
            StoreFailure::Refused(_) => {
                self.unanswered.get_or_insert(sent);
                self.refusals += 1;
            }
        }
    }

    /// Whether a missing record means that this settlement never ran (so it must count): a
    /// try that ran left a mark for `mark_for` (a hung Redis runs it late, when it resumes,
    /// so the mark lasts at least that long from when it was sent).
    fn missing_record_means_unsettled(&self, mark_for: Duration) -> bool {
        self.unanswered.is_none_or(|t| t.elapsed() < mark_for)
    }
}

/// The settlement script's answer when the record is gone and the node could not rule out
/// that an earlier try ran (-1: nothing left to do; 0 and up: the month's counter).
const CANNOT_TELL: i64 = -2;

impl Shared {
    /// Runs a settlement once; on failure, notes what the try may have done in `call`.
    pub(super) async fn settle_call(&self, call: &mut SettleCall) -> Result<i64, StoreFailure> {
        let gone = super::month_gone_ms(&call.month).unwrap_or(0);
        let lease = self.settings().lease;
        let mut inv = self.scripts.settle.prepare_invoke();
        for k in &call.keys {
            inv.key(k);
        }
        inv.arg(call.levels.len())
            .arg(&call.lease)
            .arg(call.reserved)
            .arg(call.used)
            .arg(call.delta)
            .arg(gone)
            .arg(if call.cancel { "cancel" } else { "settle" })
            .arg(lease.as_millis() as u64)
            .arg(u8::from(call.missing_record_means_unsettled(lease)));
        for (tpm, maxc) in &call.levels {
            inv.arg(*tpm).arg(*maxc);
        }
        let sent = Instant::now();
        let done = self
            .run(self.background_budget(), |c| async move {
                c.invoke::<i64>(&inv).await
            })
            .await;
        match &done {
            Ok(CANNOT_TELL) => warn!(
                tenant = %call.tenant,
                tokens = call.delta,
                "a settlement retried after its request's record expired was not counted: an earlier try may have counted it"
            ),
            Ok(_) => {}
            Err(e) => call.failed(sent, e),
        }
        done
    }

    /// Runs settlements in the background, each alone; what Redis does not take is queued
    /// for retry.
    pub(super) fn send_settlements(self: &Arc<Self>, calls: Vec<SettleCall>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            for call in calls {
                self.queue(call);
            }
            return;
        };
        for mut call in calls {
            let shared = self.clone();
            rt.spawn(async move {
                if let Err(e) = shared.settle_call(&mut call).await {
                    debug!(error = %e, tenant = %call.tenant, "settlement queued for retry");
                    shared.queue(call);
                }
            });
        }
    }

    /// Leaves a settlement for the next admission of the same tenant, key and model to carry,
    /// for at most `store.settle_delay`; parked under its keys but its record (the last).
    fn park(&self, call: SettleCall) {
        let since = Instant::now();
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        let ride = &call.keys[..call.keys.len().saturating_sub(1)];
        if let Some(waiting) = parked.get_mut(ride) {
            waiting.push(Parked { call, since });
        } else {
            parked.insert(ride.to_vec(), vec![Parked { call, since }]);
        }
    }

    /// The settlements an admission with these keys (its levels' and month's) carries (the
    /// oldest, at most [`MAX_CARRIED`]).
    fn take_parked(&self, ride: &[String]) -> Vec<SettleCall> {
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        let Some(waiting) = parked.get_mut(ride) else {
            return Vec::new();
        };
        let n = waiting.len().min(MAX_CARRIED);
        let taken = waiting.drain(..n).map(|p| p.call).collect();
        if waiting.is_empty() {
            parked.remove(ride);
        }
        taken
    }

    /// Settlements that waited `store.settle_delay` without an admission to carry them (all of
    /// them with `all`), taken out to go alone.
    pub(super) fn take_overdue(&self, all: bool) -> Vec<SettleCall> {
        let delay = self.settings().settle_delay;
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        let mut overdue = Vec::new();
        parked.retain(|_, waiting| {
            // Oldest first: the overdue ones lead.
            let n = waiting
                .iter()
                .take_while(|p| all || p.since.elapsed() >= delay)
                .count();
            overdue.extend(waiting.drain(..n).map(|p| p.call));
            !waiting.is_empty()
        });
        overdue
    }

    /// Settlements waiting to ride with an admission.
    pub fn parked_pending(&self) -> usize {
        self.parked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }

    pub(super) fn queue(&self, call: SettleCall) {
        self.retries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(call);
    }

    /// Runs the queued settlements and cancellations, each until Redis takes it (a record
    /// that expired meanwhile does not stop it counting), or refuses it [`MAX_REFUSALS`]
    /// times.
    pub(super) async fn run_retries(&self) {
        let calls = std::mem::take(&mut *self.retries.lock().unwrap_or_else(|p| p.into_inner()));
        let mut left = Vec::new();
        let mut calls = calls.into_iter();
        while let Some(mut call) = calls.next() {
            match self.settle_call(&mut call).await {
                Ok(_) => {}
                Err(StoreFailure::Refused(_)) if call.refusals >= MAX_REFUSALS => error!(
                    tenant = %call.tenant,
                    tokens = call.delta,
                    cancel = call.cancel,
                    "the shared store keeps refusing a settlement: given up"
                ),
                Err(StoreFailure::Refused(_)) => left.push(call),
                Err(_) => {
                    // Out of reach again: the rest waits for the next recovery.
                    left.push(call);
                    left.extend(calls);
                    break;
                }
            }
        }
        self.retries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(left);
    }

    pub fn retries_pending(&self) -> usize {
        self.retries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for SharedAdmission {
    fn drop(&mut self) {
        // Abandoned before any usage was known: the whole reservation stays charged, as in
        // the in-memory limiter.
        let reserved = self.reserved;
        self.finish(reserved);
    }
}
