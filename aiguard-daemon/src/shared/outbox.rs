//! Usage counted while Redis was out of reach (requests admitted by a tier's failure mode,
//! settlements that could not be written), kept until it is written back into the monthly
//! counters, so that an outage loses no quota usage.
//!
//! It lives in memory and in the embedded store (`shared_outbox.v1`), written at every change
//! of state that matters: when a tenant's first tokens of an outage arrive, every
//! [`Outbox::persist`] (each probe and write-back), and at shutdown. A crash loses at most the
//! tokens since the last probe interval (500 ms by default), like the usage journal.
use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use redb::{ReadableTable as _, TableDefinition};

use crate::store::{Store, StoreError};

/// (tenant, month `YYYY-MM`) → tokens not yet in Redis.
const OUTBOX: TableDefinition<(&str, &str), i64> = TableDefinition::new("shared_outbox.v1");

pub struct Outbox {
    pending: Mutex<BTreeMap<(String, String), i64>>,
    /// Writes under way: (tenant, month) → (tokens, write id). A write that failed is retried
    /// with the same tokens and id, so Redis counts it once even if the first try ran late.
    attempts: Mutex<BTreeMap<(String, String), (i64, u64)>>,
    next_id: AtomicU64,
    dirty: AtomicBool,
    store: Store,
}

impl Outbox {
    pub fn open(store: Store) -> Result<Self, StoreError> {
        store.write(|txn| {
            txn.open_table(OUTBOX)?;
            Ok(())
        })?;
        let pending = store.read(|txn| {
            let t = txn.open_table(OUTBOX)?;
            let mut out = BTreeMap::new();
            for row in t.iter()? {
                let (k, v) = row?;
                let (tenant, month) = k.value();
                out.insert((tenant.to_owned(), month.to_owned()), v.value());
            }
            Ok(out)
        })?;
        Ok(Self {
            pending: Mutex::new(pending),
            attempts: Mutex::default(),
            // Unique across restarts: ids start at the start-up time in microseconds.
            next_id: AtomicU64::new(crate::bans::now_ms().saturating_mul(1000)),
            dirty: AtomicBool::new(false),
            store,
        })
    }

    /// Counts `tokens` (negative: a reservation given back) for a tenant's month.
    pub fn add(&self, tenant: &str, month: &str, tokens: i64) {
        if tokens == 0 {
            return;
        }
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        *p.entry((tenant.to_owned(), month.to_owned())).or_insert(0) += tokens;
        self.dirty.store(true, Ordering::Release);
    }

    /// Tokens pending for a tenant's month.
    pub fn tenant(&self, tenant: &str, month: &str) -> i64 {
        let p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        p.get(&(tenant.to_owned(), month.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .all(|v| *v == 0)
    }

    pub fn total(&self) -> i64 {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum()
    }

    /// What to write back: (tenant, month, tokens, write id), a failed write's again as it was.
    pub fn attempts(&self) -> Vec<(String, String, i64, u64)> {
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        for (k, v) in pending.iter().filter(|(_, v)| **v != 0) {
            attempts
                .entry(k.clone())
                .or_insert_with(|| (*v, self.next_id.fetch_add(1, Ordering::Relaxed)));
        }
        attempts
            .iter()
            .map(|((t, m), (v, id))| (t.clone(), m.clone(), *v, *id))
            .collect()
    }

    /// The write of a tenant's month went through.
    pub fn done(&self, tenant: &str, month: &str) {
        let k = (tenant.to_owned(), month.to_owned());
        let attempt = self
            .attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&k);
        if let Some((tokens, _)) = attempt {
            self.take(tenant, month, tokens);
        }
    }

    /// What is pending, to write back.
    pub fn pending(&self) -> Vec<(String, String, i64)> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, v)| **v != 0)
            .map(|((t, m), v)| (t.clone(), m.clone(), *v))
            .collect()
    }

    /// `tokens` of a tenant's month were written back (more may have arrived meanwhile).
    pub fn take(&self, tenant: &str, month: &str, tokens: i64) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let k = (tenant.to_owned(), month.to_owned());
        if let Some(v) = p.get_mut(&k) {
            *v -= tokens;
            if *v == 0 {
                p.remove(&k);
            }
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// Writes the pending usage to disk if it changed.
    pub fn persist(&self) -> Result<(), StoreError> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let snapshot = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let written = self.store.write(|txn| {
            txn.delete_table(OUTBOX)?;
            let mut t = txn.open_table(OUTBOX)?;
            for ((tenant, month), v) in &snapshot {
                t.insert((tenant.as_str(), month.as_str()), *v)?;
            }
            Ok(())
        });
        if written.is_err() {
            self.dirty.store(true, Ordering::Release);
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_usage_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let o = Outbox::open(store.clone()).unwrap();
        o.add("acme", "2026-12", 120);
        o.add("acme", "2026-12", -20);
        o.add("beta", "2026-12", 7);
        o.persist().unwrap();
        o.take("beta", "2026-12", 7);
        drop(o);
        let o = Outbox::open(store.clone()).unwrap();
        assert_eq!(o.tenant("acme", "2026-12"), 100);
        assert_eq!(
            o.total(),
            107,
            "the take was not persisted: beta is still pending"
        );
        o.take("beta", "2026-12", 7);
        o.persist().unwrap();
        let o = Outbox::open(store).unwrap();
        assert_eq!(o.pending(), vec![("acme".into(), "2026-12".into(), 100)]);
    }
}
