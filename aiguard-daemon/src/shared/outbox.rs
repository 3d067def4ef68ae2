//! Usage counted while Redis was out of reach (requests admitted by a tier's failure mode,
//! settlements that could not be written), kept until it is written back into the monthly
//! counters, so that an outage loses no quota usage.
//!
//! It lives in memory and in the embedded store (`shared_outbox.v1`, and the write-backs under
//! way in `shared_outbox_writes.v1`), and every change is committed there before the call that
//! made it returns: a crash (SIGKILL, an OOM kill, a power cut) loses none of it. Commits are
//! grouped: callers that change the outbox while a commit runs share the next one, so a burst
//! of settlements costs about two commits, not one each. A commit is one small redb
//! transaction (an fsync: about 0.1 ms on an SSD, a few ms on a network disk), and there is
//! one only while Redis is out of reach or its usage is being written back.
//!
//! A write-back is recorded (with its id) before it is sent, and forgotten only once Redis has
//! taken it: after a crash in between, the next start sends it again with the same id, and
//! Redis counts it once.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use redb::{ReadableTable as _, TableDefinition};
use tracing::warn;

use crate::store::{Store, StoreError};

/// (tenant, month `YYYY-MM`) → tokens not yet in Redis.
const OUTBOX: TableDefinition<(&str, &str), i64> = TableDefinition::new("shared_outbox.v1");
/// (tenant, month) → (tokens, write id) of a write-back sent (or about to be) to Redis.
const WRITES: TableDefinition<(&str, &str), (i64, u64)> =
    TableDefinition::new("shared_outbox_writes.v1");

/// A tenant's month: (tenant, `YYYY-MM`).
type TenantMonth = (String, String);

#[derive(Default)]
struct State {
    pending: BTreeMap<TenantMonth, i64>,
    /// Writes under way: (tokens, write id). A write that failed is retried with the same
    /// tokens and id, so Redis counts it once even if the first try ran late.
    attempts: BTreeMap<TenantMonth, (i64, u64)>,
    /// What changed since the last commit.
    changed: BTreeSet<TenantMonth>,
    /// Bumped by every change.
    version: u64,
}

pub struct Outbox {
    state: Mutex<State>,
    /// The last version committed to disk. Held while a commit runs (a std mutex: redb's
    /// transaction is synchronous, never an await), so commits run one at a time and a caller
    /// that waited for one may find its change already in it.
    committed: Mutex<u64>,
    next_id: AtomicU64,
    store: Store,
}

impl Outbox {
    pub fn open(store: Store) -> Result<Self, StoreError> {
        store.write(|txn| {
            txn.open_table(OUTBOX)?;
            txn.open_table(WRITES)?;
            Ok(())
        })?;
        let (pending, attempts) = store.read(|txn| {
            let mut pending = BTreeMap::new();
            for row in txn.open_table(OUTBOX)?.iter()? {
                let (k, v) = row?;
                let (tenant, month) = k.value();
                pending.insert((tenant.to_owned(), month.to_owned()), v.value());
            }
            let mut attempts = BTreeMap::new();
            for row in txn.open_table(WRITES)?.iter()? {
                let (k, v) = row?;
                let (tenant, month) = k.value();
                attempts.insert((tenant.to_owned(), month.to_owned()), v.value());
            }
            Ok((pending, attempts))
        })?;
        let next_id = attempts.values().map(|(_, id)| id + 1).max().unwrap_or(0);
        Ok(Self {
            state: Mutex::new(State {
                pending,
                attempts,
                ..State::default()
            }),
            committed: Mutex::new(0),
            // Unique across restarts: ids start at the start-up time in microseconds (and past
            // any write a previous run left under way).
            next_id: AtomicU64::new(crate::bans::now_ms().saturating_mul(1000).max(next_id)),
            store,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts `tokens` (negative: a reservation given back) for a tenant's month; on disk
    /// when this returns (unless the embedded store refuses it, which is logged: the usage is
    /// then kept in memory and committed with the next change).
    pub fn add(&self, tenant: &str, month: &str, tokens: i64) {
        if tokens == 0 {
            return;
        }
        let version = {
            let mut s = self.state();
            let k = (tenant.to_owned(), month.to_owned());
            let v = s.pending.entry(k.clone()).or_insert(0);
            *v += tokens;
            if *v == 0 {
                s.pending.remove(&k);
            }
            s.changed.insert(k);
            s.version += 1;
            s.version
        };
        if let Err(e) = self.commit(version) {
            warn!(error = %e, tenant, tokens, "usage waiting for the shared store is not on disk yet: a crash now would lose it");
        }
    }

    /// Tokens pending for a tenant's month.
    pub fn tenant(&self, tenant: &str, month: &str) -> i64 {
        self.state()
            .pending
            .get(&(tenant.to_owned(), month.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        let s = self.state();
        s.pending.values().all(|v| *v == 0) && s.attempts.is_empty()
    }

    pub fn total(&self) -> i64 {
        self.state().pending.values().sum()
    }

    /// What to write back: (tenant, month, tokens, write id), a failed write's again as it
    /// was. New writes are on disk before this returns, so that a crash after Redis took one
    /// cannot make the next start send it under another id.
    pub fn attempts(&self) -> Result<Vec<(String, String, i64, u64)>, StoreError> {
        let (version, attempts) = {
            let mut s = self.state();
            let State {
                pending,
                attempts,
                changed,
                version,
            } = &mut *s;
            for (k, v) in pending.iter().filter(|(_, v)| **v != 0) {
                if !attempts.contains_key(k) {
                    attempts.insert(
                        k.clone(),
                        (*v, self.next_id.fetch_add(1, Ordering::Relaxed)),
                    );
                    changed.insert(k.clone());
                    *version += 1;
                }
            }
            let list: Vec<_> = attempts
                .iter()
                .map(|((t, m), (v, id))| (t.clone(), m.clone(), *v, *id))
                .collect();
            (*version, list)
        };
        self.commit(version)?;
        Ok(attempts)
    }

    /// The write of a tenant's month went through.
    pub fn done(&self, tenant: &str, month: &str) {
        let version = {
            let mut s = self.state();
            let k = (tenant.to_owned(), month.to_owned());
            let Some((tokens, _)) = s.attempts.remove(&k) else {
                return;
            };
            if let Some(v) = s.pending.get_mut(&k) {
                *v -= tokens;
                if *v == 0 {
                    s.pending.remove(&k);
                }
            } else {
                s.pending.insert(k.clone(), -tokens);
            }
            s.changed.insert(k);
            s.version += 1;
            s.version
        };
        // Not on disk: the next start sends the write again, under its id, and Redis
        // ignores it.
        if let Err(e) = self.commit(version) {
            warn!(error = %e, tenant, "recording a written-back outbox entry failed");
        }
    }

    /// What is pending, to write back.
    pub fn pending(&self) -> Vec<(String, String, i64)> {
        self.state()
            .pending
            .iter()
            .filter(|(_, v)| **v != 0)
            .map(|((t, m), v)| (t.clone(), m.clone(), *v))
            .collect()
    }

    /// Commits every change made so far (a no-op when they all are).
    pub fn persist(&self) -> Result<(), StoreError> {
        let version = self.state().version;
        self.commit(version)
    }

    /// Commits the changes up to `version` at least (with any made since).
    fn commit(&self, version: u64) -> Result<(), StoreError> {
        let mut committed = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        if *committed >= version {
            return Ok(());
        }
        let (version, rows) = {
            let mut s = self.state();
            let rows: Vec<_> = std::mem::take(&mut s.changed)
                .into_iter()
                .map(|k| {
                    let pending = s.pending.get(&k).copied();
                    let attempt = s.attempts.get(&k).copied();
                    (k, pending, attempt)
                })
                .collect();
            (s.version, rows)
        };
        let written = self.store.write(|txn| {
            let mut outbox = txn.open_table(OUTBOX)?;
            let mut writes = txn.open_table(WRITES)?;
            for ((tenant, month), pending, attempt) in &rows {
                let k = (tenant.as_str(), month.as_str());
                match pending {
                    Some(v) => {
                        outbox.insert(k, *v)?;
                    }
                    None => {
                        outbox.remove(k)?;
                    }
                }
                match attempt {
                    Some(a) => {
                        writes.insert(k, *a)?;
                    }
                    None => {
                        writes.remove(k)?;
                    }
                }
            }
            Ok(())
        });
        match written {
            Ok(()) => {
                *committed = version;
                Ok(())
            }
            Err(e) => {
                // For the next commit to write.
                self.state()
                    .changed
                    .extend(rows.into_iter().map(|(k, ..)| k));
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_change_is_on_disk_when_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let o = Outbox::open(store.clone()).unwrap();
        o.add("acme", "2026-12", 120);
        o.add("acme", "2026-12", -20);
        o.add("beta", "2026-12", 7);
        // No persist(): dropped as a crash would.
        drop(o);
        let o = Outbox::open(store.clone()).unwrap();
        assert_eq!(o.tenant("acme", "2026-12"), 100);
        assert_eq!(o.total(), 107);
        o.add("beta", "2026-12", -7);
        drop(o);
        let o = Outbox::open(store).unwrap();
        assert_eq!(o.pending(), vec![("acme".into(), "2026-12".into(), 100)]);
    }

    #[test]
    fn a_write_back_keeps_its_id_across_a_crash_until_it_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let o = Outbox::open(store.clone()).unwrap();
        o.add("acme", "2026-12", 50);
        let sent = o.attempts().unwrap();
        assert_eq!(sent.len(), 1);
        // More usage while the write is under way: not part of it.
        o.add("acme", "2026-12", 5);
        // The daemon dies before Redis's answer is recorded.
        drop(o);
        let o = Outbox::open(store.clone()).unwrap();
        assert_eq!(
            o.attempts().unwrap(),
            sent,
            "the same write, with the same id"
        );
        o.done("acme", "2026-12");
        assert_eq!(o.total(), 5);
        assert!(!o.is_empty());
        drop(o);
        let o = Outbox::open(store).unwrap();
        let again = o.attempts().unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].2, 5);
        o.done("acme", "2026-12");
        assert!(o.is_empty());
    }
}
