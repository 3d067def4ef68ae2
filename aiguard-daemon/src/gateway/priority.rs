//! Paid traffic first under surge: the upstream's concurrency slots (`gateway.upstream_slots`)
//! shared by weighted fair queueing across tiers.
//!
//! A request admitted by its limits takes a free slot at once when its tier has no queue and
//! is under its cap (`max_upstream_slots`); else it waits in its tier's queue (at most
//! `max_queued` long, for at most `max_queue_wait`). Each slot that frees goes to the queued
//! request with the smallest virtual finish tag (start-time fair queueing): a tier's tag grows
//! by `1 / weight` per request, so backlogged tiers share slots in proportion to their weights,
//! and a slot never idles while anyone eligible waits.
//!
//! A request that cannot wait (its queue is full, or its wait ran out) is shed: 429 while other
//! tiers hold or wait for slots (its tier is over its share), 503 when only its own tier does
//! (the upstream itself is saturated). Either way with a `Retry-After` from the queue's length
//! and the recent time a request holds a slot.
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use rustc_hash::FxHashMap;
use tokio::sync::oneshot;

use crate::tiers::TierTable;

/// A tier's share of the slots, as configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TierShare {
    pub weight: u32,
    pub max_queued: u32,
    pub max_queue_wait: Duration,
    /// At most this many slots at once (headroom kept for the other tiers).
    pub max_slots: Option<u32>,
}

/// Why a request was not given a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// Its tier's queue was full.
    QueueFull {
        retry_after: Duration,
        own_tier_only: bool,
    },
    /// It waited `max_queue_wait` without a slot.
    WaitedTooLong {
        retry_after: Duration,
        own_tier_only: bool,
    },
}

impl Shed {
    pub fn retry_after(self) -> Duration {
        match self {
            Shed::QueueFull { retry_after, .. } | Shed::WaitedTooLong { retry_after, .. } => {
                retry_after
            }
        }
    }

    /// Whether only the request's own tier held and wanted the slots: the upstream itself is
    /// saturated (503), rather than the tier being over its share (429).
    pub fn upstream_saturated(self) -> bool {
        match self {
            Shed::QueueFull { own_tier_only, .. } | Shed::WaitedTooLong { own_tier_only, .. } => {
                own_tier_only
            }
        }
    }
}

/// A held upstream slot; freed (and handed to the next waiter) on drop.
pub struct Slot {
    sched: Arc<Inner>,
    tier: Arc<str>,
    since: Instant,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let held_for = self.since.elapsed();
        let mut st = self.sched.lock();
        st.note_service(held_for);
        if let Some(q) = st.tiers.get_mut(&*self.tier) {
            q.held = q.held.saturating_sub(1);
        }
        st.busy = st.busy.saturating_sub(1);
        dispatch(&self.sched, &mut st);
    }
}

/// Queued and held slots of one tier, for `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierLoad {
    pub tier: String,
    pub queued: usize,
    pub held: u32,
}

/// The scheduler: one per gateway, reconfigured on reload.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct State {
    slots: u32,
    busy: u32,
    tiers: FxHashMap<Arc<str>, TierQueue>,
    /// The start tag of the request last given a slot.
    vtime: f64,
    next_id: u64,
    /// Recent time a request holds a slot (exponentially weighted), for `Retry-After`.
    service_secs: f64,
}

struct TierQueue {
    share: TierShare,
    held: u32,
    last_finish: f64,
    queue: VecDeque<Waiter>,
}

struct Waiter {
    id: u64,
    start: f64,
    finish: f64,
    grant: oneshot::Sender<Slot>,
}

/// Weight of the newest sample in the service-time average.
const SERVICE_EWMA: f64 = 0.05;
const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

impl State {
    fn note_service(&mut self, held_for: Duration) {
        let s = held_for.as_secs_f64();
        self.service_secs = if self.service_secs == 0.0 {
            s
        } else {
            self.service_secs + SERVICE_EWMA * (s - self.service_secs)
        };
    }

    /// How long until `ahead` queued requests (and this one) have had a slot, roughly.
    fn retry_after(&self, ahead: usize) -> Duration {
        let slots = f64::from(self.slots.max(1));
        let secs = (ahead as f64 + 1.0) * self.service_secs / slots;
        Duration::from_secs_f64(secs.ceil().max(1.0)).clamp(MIN_RETRY_AFTER, MAX_RETRY_AFTER)
    }

    /// Whether any tier but `tier` holds or waits for a slot.
    fn others_compete(&self, tier: &str) -> bool {
        self.tiers
            .iter()
            .any(|(name, q)| &**name != tier && (q.held > 0 || !q.queue.is_empty()))
    }
}

/// Hands free slots to waiters, smallest finish tag first, skipping tiers at their cap and
/// waiters that gave up.
fn dispatch(inner: &Arc<Inner>, st: &mut State) {
    while st.busy < st.slots {
        let next = st
            .tiers
            .iter()
            .filter(|(_, q)| q.share.max_slots.is_none_or(|cap| q.held < cap))
            .filter_map(|(name, q)| q.queue.front().map(|w| (w.finish, name.clone())))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        let Some((_, tier)) = next else { return };
        let q = st.tiers.get_mut(&tier).expect("found above");
        let w = q.queue.pop_front().expect("found above");
        let slot = Slot {
            sched: inner.clone(),
            tier: tier.clone(),
            since: Instant::now(),
        };
        match w.grant.send(slot) {
            Ok(()) => {
                q.held += 1;
                st.busy += 1;
                st.vtime = w.start;
            }
            // Gone (its client left): the slot was never counted; dropping it must not run
            // the release (this lock is held).
            Err(slot) => std::mem::forget(slot),
        }
    }
}

impl Scheduler {
    pub fn new(slots: u32, tiers: &TierTable) -> Self {
        let s = Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    slots,
                    busy: 0,
                    tiers: FxHashMap::default(),
                    vtime: 0.0,
                    next_id: 0,
                    service_secs: 0.0,
                }),
            }),
        };
        s.configure(slots, tiers);
        s
    }

    /// Applies a reloaded configuration: slots and shares change for the next decision;
    /// requests holding or waiting for slots keep them.
    pub fn configure(&self, slots: u32, tiers: &TierTable) {
        let mut st = self.inner.lock();
        st.slots = slots;
        for (name, t) in &tiers.tiers {
            let share = t.share();
            match st.tiers.get_mut(name.as_str()) {
                Some(q) => q.share = share,
                None => {
                    st.tiers.insert(
                        Arc::from(name.as_str()),
                        TierQueue {
                            share,
                            held: 0,
                            last_finish: 0.0,
                            queue: VecDeque::new(),
                        },
                    );
                }
            }
        }
        dispatch(&self.inner, &mut st);
    }

    /// A slot for a request of `tier` (a configured tier: the caller maps unknown ones to the
    /// default), now or after waiting its turn; or why not.
    pub async fn acquire(&self, tier: &str) -> Result<Slot, Shed> {
        let (id, wait, rx) = {
            let mut st = self.inner.lock();
            let Some(name) = st.tiers.get_key_value(tier).map(|(k, _)| k.clone()) else {
                // Not configured (cannot happen after the caller's mapping): not queued.
                return Ok(Slot {
                    sched: self.inner.clone(),
                    tier: Arc::from(tier),
                    since: Instant::now(),
                });
            };
            let (vtime, free) = (st.vtime, st.busy < st.slots);
            let q = st.tiers.get_mut(&name).expect("found above");
            let start = vtime.max(q.last_finish);
            let finish = start + 1.0 / f64::from(q.share.weight.max(1));
            let under_cap = q.share.max_slots.is_none_or(|cap| q.held < cap);
            if q.queue.is_empty() && free && under_cap {
                q.last_finish = finish;
                q.held += 1;
                st.busy += 1;
                st.vtime = start;
                return Ok(Slot {
                    sched: self.inner.clone(),
                    tier: name,
                    since: Instant::now(),
                });
            }
            if q.queue.len() >= q.share.max_queued as usize {
                let ahead = q.queue.len();
                return Err(Shed::QueueFull {
                    retry_after: st.retry_after(ahead),
                    own_tier_only: !st.others_compete(tier),
                });
            }
            q.last_finish = finish;
            let wait = q.share.max_queue_wait;
            let (grant, rx) = oneshot::channel();
            st.next_id += 1;
            let id = st.next_id;
            let q = st.tiers.get_mut(&name).expect("found above");
            q.queue.push_back(Waiter {
                id,
                start,
                finish,
                grant,
            });
            (id, wait, rx)
        };
        let mut waiting = Waiting {
            sched: &self.inner,
            tier,
            id,
            done: false,
        };
        let granted = tokio::time::timeout(wait, rx).await;
        waiting.done = true;
        match granted {
            Ok(Ok(slot)) => Ok(slot),
            // The sender went without a slot: only when the scheduler itself is gone.
            Ok(Err(_)) => Err(Shed::WaitedTooLong {
                retry_after: MIN_RETRY_AFTER,
                own_tier_only: true,
            }),
            Err(_) => {
                let mut st = self.inner.lock();
                let ahead = remove_waiter(&mut st, tier, id).unwrap_or(0);
                Err(Shed::WaitedTooLong {
                    retry_after: st.retry_after(ahead),
                    own_tier_only: !st.others_compete(tier),
                })
            }
        }
    }

    /// Slots, and each tier's queued and held requests.
    pub fn load(&self) -> (u32, Vec<TierLoad>) {
        let st = self.inner.lock();
        let mut tiers: Vec<TierLoad> = st
            .tiers
            .iter()
            .map(|(name, q)| TierLoad {
                tier: name.to_string(),
                queued: q.queue.len(),
                held: q.held,
            })
            .collect();
        tiers.sort_by(|a, b| a.tier.cmp(&b.tier));
        (st.slots, tiers)
    }
}

/// Removes a waiter that stopped waiting; how many were queued ahead of it (None: it was no
/// longer queued).
fn remove_waiter(st: &mut State, tier: &str, id: u64) -> Option<usize> {
    let q = st.tiers.get_mut(tier)?;
    let at = q.queue.iter().position(|w| w.id == id)?;
    q.queue.remove(at);
    Some(at)
}

/// Takes a waiter out of its queue when its request is dropped while waiting (the client went
/// away), so that it holds no place.
struct Waiting<'a> {
    sched: &'a Arc<Inner>,
    tier: &'a str,
    id: u64,
    done: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut st = self.sched.lock();
            remove_waiter(&mut st, self.tier, self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::tiers::TierSettings;

    fn table(shares: &[(&str, u32, u32, Option<u32>)]) -> TierTable {
        let mut tiers = BTreeMap::new();
        for &(name, weight, max_queued, max_slots) in shares {
            tiers.insert(
                name.to_owned(),
                TierSettings {
                    weight: Some(weight),
                    max_queued: Some(max_queued),
                    max_queue_wait: Some(Duration::from_secs(30)),
                    max_upstream_slots: max_slots,
                    ..TierSettings::default()
                },
            );
        }
        TierTable {
            default_tier: shares[0].0.to_owned(),
            tiers,
            ..TierTable::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn backlogged_tiers_share_slots_by_weight() {
        let sched = Scheduler::new(
            1,
            &table(&[("paid", 3, 1000, None), ("free", 1, 1000, None)]),
        );
        let first = sched.acquire("free").await.expect("a free slot");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..40 {
            let tier = if i % 2 == 0 { "paid" } else { "free" };
            let (sched, tx) = (sched.clone(), tx.clone());
            tasks.spawn(async move {
                let slot = sched.acquire(tier).await.expect("queued");
                tx.send(tier).expect("send");
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(slot);
            });
            // Queued in this order.
            tokio::task::yield_now().await;
        }
        drop(first);
        drop(tx);
        let mut order = Vec::new();
        while let Some(t) = rx.recv().await {
            order.push(t);
        }
        while tasks.join_next().await.is_some() {}
        // While both were backlogged (the first 20 grants), paid got three of every four.
        let paid = order[..20].iter().filter(|t| **t == "paid").count();
        assert!((14..=16).contains(&paid), "{order:?}");
        assert_eq!(order.len(), 40);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_sheds_at_once_and_says_who_competes() {
        let sched = Scheduler::new(1, &table(&[("paid", 10, 1, None), ("free", 1, 1, None)]));
        let held = sched.acquire("free").await.expect("slot");
        let s2 = sched.clone();
        let queued = tokio::spawn(async move { s2.acquire("free").await.map(|_| ()) });
        tokio::task::yield_now().await;
        // Free's own traffic only: the upstream is saturated.
        match sched.acquire("free").await {
            Err(shed @ Shed::QueueFull { .. }) => {
                assert!(shed.upstream_saturated());
                assert!(shed.retry_after() >= MIN_RETRY_AFTER);
            }
            other => panic!("expected a full queue, got {:?}", other.map(|_| ())),
        }
        drop(held);
        queued
            .await
            .expect("task")
            .expect("the queued one got the slot");
        let paid = sched.acquire("paid").await.expect("slot");
        let s3 = sched.clone();
        let _free_waits = tokio::spawn(async move { s3.acquire("free").await.map(|_| ()) });
        tokio::task::yield_now().await;
        // Paid holds the slot: free is over its share, not the upstream saturated.
        match sched.acquire("free").await {
            Err(shed) => assert!(!shed.upstream_saturated()),
            Ok(_) => panic!("free got a slot paid holds"),
        }
        drop(paid);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_runs_out_is_shed_and_leaves_the_queue() {
        let mut t = table(&[("free", 1, 10, None)]);
        t.tiers.get_mut("free").expect("tier").max_queue_wait = Some(Duration::from_millis(100));
        let sched = Scheduler::new(1, &t);
        let held = sched.acquire("free").await.expect("slot");
        let started = tokio::time::Instant::now();
        let shed = sched.acquire("free").await.err().expect("shed");
        assert!(matches!(shed, Shed::WaitedTooLong { .. }));
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        assert_eq!(sched.load().1[0].queued, 0);
        drop(held);
        assert_eq!(sched.load().1[0].held, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_capped_tier_leaves_headroom_and_a_gone_waiter_holds_nothing() {
        let sched = Scheduler::new(
            2,
            &table(&[("paid", 10, 10, None), ("free", 1, 10, Some(1))]),
        );
        let free = sched.acquire("free").await.expect("slot");
        let s2 = sched.clone();
        let waiting = tokio::spawn(async move { s2.acquire("free").await.map(|_| ()) });
        tokio::task::yield_now().await;
        // The second slot is kept for paid even though free waits.
        let paid = sched.acquire("paid").await.expect("headroom");
        waiting.abort();
        let _ = waiting.await;
        let (_, load) = sched.load();
        let free_load = load.iter().find(|l| l.tier == "free").expect("free");
        assert_eq!((free_load.queued, free_load.held), (0, 1));
        drop(free);
        drop(paid);
        let (_, load) = sched.load();
        assert!(
            load.iter().all(|l| l.held == 0 && l.queued == 0),
            "{load:?}"
        );
    }
}
