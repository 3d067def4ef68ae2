//! API keys: created once and shown once, stored only as SHA-256 hashes, looked up by the
//! first bytes of the hash and confirmed by a constant-time comparison of the whole hash.
//!
//! Keys are 192 random bits, so a plain hash is as good as a password hash here (nothing to
//! brute-force) and costs well under a microsecond per request.
use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    sync::{Arc, Mutex, RwLock},
};

use rand::RngCore as _;
use redb::{ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use crate::store::{Store, StoreError};

const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys.v1");

/// What every key starts with: recognisable in a leaked-secret scan.
pub const KEY_PREFIX: &str = "aig_";

/// A key as stored and listed: never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Public identifier (`key_` + 12 hex digits), used to revoke and in usage reports.
    pub id: String,
    pub tenant: String,
    pub tier: String,
    /// The first characters of the secret, to tell keys apart in a list.
    pub hint: String,
    pub created_ms: u64,
    pub revoked_ms: Option<u64>,
    /// Refused (403) until then: suspended by abuse detection or an operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspended_until_ms: Option<u64>,
    /// Why it was suspended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspended_reason: Option<String>,
    /// SHA-256 of the secret, hex (left out of what the admin API lists).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256: String,
}

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no key with id {0:?} (see `aiguard keys list`)")]
    NotFound(String),
    #[error("key {0} is already revoked")]
    AlreadyRevoked(String),
    #[error("key {0} is not suspended")]
    NotSuspended(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The key ring: every key ever created, and an index of the live ones by hash.
pub struct KeyRing {
    store: Store,
    state: RwLock<Ring>,
    /// Serialises create and revoke (each a store commit), without blocking lookups meanwhile.
    writer: Mutex<()>,
}

#[derive(Default)]
struct Ring {
    records: Vec<KeyRecord>,
    /// Live keys by the first 8 bytes of their hash (already uniform: no hashing of its
    /// own); the full hash is compared in constant time. One allocation per key, shared by
    /// the requests that carry it, reached straight from the table.
    live: HashMap<u64, Arc<LiveKey>, BuildHasherDefault<KeyBucketHasher>>,
    /// Keys whose first 8 bytes another key has already (about one in 2^64 pairs).
    collided: Vec<Arc<LiveKey>>,
}

/// What a request carrying a valid key learns about it.
#[derive(Debug, Clone)]
pub struct LiveKey {
    hash: [u8; 32],
    pub id: Arc<str>,
    pub tenant: Arc<str>,
    pub tier: Arc<str>,
    /// Refused until then (unix ms).
    pub suspended_until_ms: Option<u64>,
}

impl LiveKey {
    /// Whether the key is suspended at `now_ms`.
    pub fn suspended_at(&self, now_ms: u64) -> bool {
        self.suspended_until_ms.is_some_and(|until| until > now_ms)
    }
}

fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Hashes a key bucket (already the first bytes of a SHA-256) as itself.
#[derive(Default)]
struct KeyBucketHasher(u64);

impl Hasher for KeyBucketHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

fn bucket(hash: &[u8; 32]) -> u64 {
    u64::from_le_bytes(hash[..8].try_into().expect("8 bytes"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl KeyRing {
    /// Loads every key from the store.
    pub fn open(store: Store) -> Result<Self, StoreError> {
        store.write(|txn| {
            txn.open_table(KEYS)?;
            Ok(())
        })?;
        let mut records = Vec::new();
        let mut bad = None;
        store.read(|txn| {
            let t = txn.open_table(KEYS)?;
            for row in t.iter()? {
                let (k, v) = row?;
                match serde_json::from_slice::<KeyRecord>(v.value()) {
                    Ok(r) => records.push(r),
                    Err(e) => bad = Some(format!("key {}: {e}", k.value())),
                }
            }
            Ok(())
        })?;
        if let Some(reason) = bad {
            return Err(store.decode_error("keys", reason));
        }
        let ring = KeyRing {
            store,
            state: RwLock::default(),
            writer: Mutex::new(()),
        };
        ring.rebuild(records);
        Ok(ring)
    }

    fn rebuild(&self, records: Vec<KeyRecord>) {
        let mut live: HashMap<u64, Arc<LiveKey>, _> = HashMap::default();
        let mut collided = Vec::new();
        for r in records.iter().filter(|r| r.revoked_ms.is_none()) {
            let Some(h) = unhex(&r.sha256) else { continue };
            let key = Arc::new(LiveKey {
                hash: h,
                id: r.id.as_str().into(),
                tenant: r.tenant.as_str().into(),
                tier: r.tier.as_str().into(),
                suspended_until_ms: r.suspended_until_ms,
            });
            if let Some(taken) = live.insert(bucket(&h), key) {
                collided.push(taken);
            }
        }
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Ring {
            records,
            live,
            collided,
        };
    }

    /// The live key `secret` is, if any.
    pub fn authenticate(&self, secret: &str) -> Option<Arc<LiveKey>> {
        let h = hash(secret);
        let ring = self.state.read().unwrap_or_else(|p| p.into_inner());
        let first = ring.live.get(&bucket(&h))?;
        // Compare every candidate (there is almost always one) without stopping early.
        let mut found = None;
        for k in std::iter::once(first).chain(&ring.collided) {
            if bool::from(k.hash.ct_eq(&h)) {
                found = Some(k.clone());
            }
        }
        found
    }

    /// Creates a key; the secret is returned here and never again.
    pub fn create(
        &self,
        tenant: &str,
        tier: &str,
        now_ms: u64,
    ) -> Result<(KeyRecord, String), KeyError> {
        let mut secret_bytes = [0u8; 24];
        rand::rng().fill_bytes(&mut secret_bytes);
        let secret = format!("{KEY_PREFIX}{}", hex(&secret_bytes));
        let mut id_bytes = [0u8; 6];
        rand::rng().fill_bytes(&mut id_bytes);
        let record = KeyRecord {
            id: format!("key_{}", hex(&id_bytes)),
            tenant: tenant.to_owned(),
            tier: tier.to_owned(),
            hint: secret[..KEY_PREFIX.len() + 4].to_owned(),
            created_ms: now_ms,
            revoked_ms: None,
            suspended_until_ms: None,
            suspended_reason: None,
            sha256: hex(&hash(&secret)),
        };
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        self.put(&record)?;
        let mut records = self.list();
        records.push(record.clone());
        self.rebuild(records);
        Ok((record, secret))
    }

    /// Revokes a key: from now on it gets 401. The record stays for usage reports.
    pub fn revoke(&self, id: &str, now_ms: u64) -> Result<KeyRecord, KeyError> {
        self.change(id, |r| {
            if r.revoked_ms.is_some() {
                return Err(KeyError::AlreadyRevoked(r.id.clone()));
            }
            r.revoked_ms = Some(now_ms);
            Ok(())
        })
    }

    /// Suspends a key until `until_ms`: it gets 403 until then (or until resumed). A longer
    /// suspension already in force is kept.
    pub fn suspend(&self, id: &str, until_ms: u64, reason: &str) -> Result<KeyRecord, KeyError> {
        self.change(id, |r| {
            if r.revoked_ms.is_some() {
                return Err(KeyError::AlreadyRevoked(r.id.clone()));
            }
            if r.suspended_until_ms.is_none_or(|u| u < until_ms) {
                r.suspended_until_ms = Some(until_ms);
                r.suspended_reason = Some(reason.to_owned());
            }
            Ok(())
        })
    }

    /// Lifts a key's suspension.
    pub fn resume(&self, id: &str, now_ms: u64) -> Result<KeyRecord, KeyError> {
        self.change(id, |r| {
            if r.suspended_until_ms.is_none_or(|u| u <= now_ms) {
                return Err(KeyError::NotSuspended(r.id.clone()));
            }
            r.suspended_until_ms = None;
            r.suspended_reason = None;
            Ok(())
        })
    }

    fn change(
        &self,
        id: &str,
        f: impl FnOnce(&mut KeyRecord) -> Result<(), KeyError>,
    ) -> Result<KeyRecord, KeyError> {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut records = self.list();
        let r = records
            .iter_mut()
            .find(|r| r.id == id)
            .ok_or_else(|| KeyError::NotFound(id.to_owned()))?;
        f(r)?;
        let changed = r.clone();
        self.put(&changed)?;
        self.rebuild(records);
        Ok(changed)
    }

    /// Takes in keys made or revoked on other nodes (through the shared store): new ids are
    /// added, a revocation anywhere revokes here. Returns the records that changed here.
    pub fn merge(&self, incoming: &[KeyRecord]) -> Result<Vec<KeyRecord>, StoreError> {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut records = self.list();
        let mut changed = Vec::new();
        for r in incoming {
            if unhex(&r.sha256).is_none() || !crate::tiers::is_valid_name(&r.tenant) {
                continue;
            }
            match records.iter_mut().find(|have| have.id == r.id) {
                None => {
                    records.push(r.clone());
                    changed.push(r.clone());
                }
                Some(have) if have.revoked_ms.is_none() && r.revoked_ms.is_some() => {
                    have.revoked_ms = r.revoked_ms;
                    changed.push(have.clone());
                }
                Some(_) => {}
            }
        }
        if changed.is_empty() {
            return Ok(changed);
        }
        let value = |r: &KeyRecord| serde_json::to_vec(r).expect("a key record serializes");
        self.store.write(|txn| {
            let mut t = txn.open_table(KEYS)?;
            for r in &changed {
                t.insert(r.id.as_str(), value(r).as_slice())?;
            }
            Ok(())
        })?;
        self.rebuild(records);
        Ok(changed)
    }

    /// Every key, oldest first.
    pub fn list(&self) -> Vec<KeyRecord> {
        let mut v = self
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .records
            .clone();
        v.sort_by(|a, b| a.created_ms.cmp(&b.created_ms).then(a.id.cmp(&b.id)));
        v
    }

    fn put(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record).expect("a key record serializes");
        self.store.write(|txn| {
            txn.open_table(KEYS)?
                .insert(record.id.as_str(), value.as_slice())?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_authenticate_survive_reopen_and_revoke() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (rec, secret) = {
            let ring = KeyRing::open(Store::open(dir.path()).expect("store")).expect("ring");
            let (rec, secret) = ring.create("acme", "paid", 1).expect("create");
            assert!(secret.starts_with(KEY_PREFIX) && secret.len() == 52);
            let k = ring.authenticate(&secret).expect("valid key");
            assert_eq!(
                (&*k.tenant, &*k.tier, &*k.id),
                ("acme", "paid", rec.id.as_str())
            );
            assert!(ring.authenticate("aig_wrong").is_none());
            (rec, secret)
        };
        let ring = KeyRing::open(Store::open(dir.path()).expect("store")).expect("ring");
        assert!(ring.authenticate(&secret).is_some(), "keys persist");
        let listed = serde_json::to_string(&ring.list()).expect("json");
        assert!(
            !listed.contains(&secret[KEY_PREFIX.len() + 4..]),
            "no secret in the list"
        );
        ring.revoke(&rec.id, 2).expect("revoke");
        assert!(ring.authenticate(&secret).is_none());
        assert!(matches!(
            ring.revoke(&rec.id, 3),
            Err(KeyError::AlreadyRevoked(_))
        ));
        assert!(matches!(
            ring.revoke("key_nope", 3),
            Err(KeyError::NotFound(_))
        ));
    }
}
