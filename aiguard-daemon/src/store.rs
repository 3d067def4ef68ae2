//! The embedded store: bans and the allowlist on disk, so a reboot (or a crash) restores them.
//!
//! redb: pure Rust (nothing to install or link), ACID with copy-on-write B-trees, so a crash
//! mid-write leaves the last committed state; one file in the state directory. A batch of bans
//! is one transaction: a million-line ban file commits (or fails) as a whole.
//!
//! Records are binary, keyed so that byte order is address order: a sorted batch then appends
//! to the B-tree instead of splitting pages all over it (a million bans commit in about a second
//! instead of several).
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use std::sync::Arc;

use crate::bans::{AllowRecord, BanRecord, Origin};

const BANS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("bans.v1");
const ALLOW: TableDefinition<&[u8], &[u8]> = TableDefinition::new("allowlist.v1");

/// File name of the database inside the state directory.
pub const DB_FILE: &str = "aiguard.redb";

/// A store operation that failed. Nothing is applied to the maps when the store refuses a
/// change, so disk and kernel never disagree for long.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state directory could not be created.
    #[error("cannot create state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// redb reported an error (I/O, corruption, lock held by another process).
    #[error("embedded store {path}: {source}")]
    Db {
        path: PathBuf,
        // Boxed: redb's error is large, and this travels up every Result in the ban path.
        #[source]
        source: Box<redb::Error>,
    },
    /// A stored record could not be decoded (damaged, or written by an incompatible version).
    #[error("embedded store {path}: a {table} record is unreadable: {reason}")]
    Decode {
        path: PathBuf,
        table: &'static str,
        reason: String,
    },
}

/// Bans and allowlist entries on disk; the gateway's keys and usage live in the same file
/// (see [`crate::keys`] and [`crate::usage`]). Clones share the one open database.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) the store in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::StateDir {
            path: state_dir.to_owned(),
            source,
        })?;
        let path = state_dir.join(DB_FILE);
        let db = Database::create(&path).map_err(|e| db_err(&path, e))?;
        let store = Self {
            db: Arc::new(db),
            path,
        };
        // Create the tables up front so readers never see "table does not exist".
        store.write(|txn| {
            txn.open_table(BANS)?;
            txn.open_table(ALLOW)?;
            Ok(())
        })?;
        Ok(store)
    }

    /// Inserts or replaces bans, all in one transaction.
    pub fn put_bans(&self, bans: &[BanRecord]) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut t = txn.open_table(BANS)?;
            let mut value = Vec::with_capacity(64);
            for ban in bans {
                value.clear();
                encode_ban(ban, &mut value);
                t.insert(range_key(&ban.range).as_slice(), value.as_slice())?;
            }
            Ok(())
        })
    }

    /// Removes bans (absent ones are ignored), all in one transaction.
    pub fn remove_bans(&self, ranges: &[IpNetwork]) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut t = txn.open_table(BANS)?;
            for r in ranges {
                t.remove(range_key(r).as_slice())?;
            }
            Ok(())
        })
    }

    /// Every stored ban.
    pub fn bans(&self) -> Result<Vec<BanRecord>, StoreError> {
        self.read_all(BANS, "ban", decode_ban)
    }

    /// Inserts or replaces an allowlist entry.
    pub fn put_allow(&self, entry: &AllowRecord) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut t = txn.open_table(ALLOW)?;
            t.insert(
                range_key(&entry.range).as_slice(),
                entry.created_ms.to_le_bytes().as_slice(),
            )?;
            Ok(())
        })
    }

    /// Removes an allowlist entry (absent is fine).
    pub fn remove_allow(&self, range: &IpNetwork) -> Result<(), StoreError> {
        self.write(|txn| {
            txn.open_table(ALLOW)?.remove(range_key(range).as_slice())?;
            Ok(())
        })
    }

    /// Every allowlist entry.
    pub fn allowlist(&self) -> Result<Vec<AllowRecord>, StoreError> {
        self.read_all(ALLOW, "allowlist", |key, value| {
            Some(AllowRecord {
                range: decode_range(key)?,
                created_ms: u64::from_le_bytes(value.try_into().ok()?),
            })
        })
    }

    pub(crate) fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StoreError> {
        let run = || -> Result<(), redb::Error> {
            let txn = self.db.begin_write()?;
            f(&txn)?;
            txn.commit()?;
            Ok(())
        };
        run().map_err(|e| db_err(&self.path, e))
    }

    /// Runs `f` in a read transaction.
    pub(crate) fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_read().map_err(|e| db_err(&self.path, e))?;
        f(&txn).map_err(|e| db_err(&self.path, e))
    }

    pub(crate) fn decode_error(&self, table: &'static str, reason: String) -> StoreError {
        StoreError::Decode {
            path: self.path.clone(),
            table,
            reason,
        }
    }

    pub(crate) fn read_all<T>(
        &self,
        table: TableDefinition<&[u8], &[u8]>,
        what: &'static str,
        decode: impl Fn(&[u8], &[u8]) -> Option<T>,
    ) -> Result<Vec<T>, StoreError> {
        let read = || -> Result<Result<Vec<T>, String>, redb::Error> {
            let txn = self.db.begin_read()?;
            let t = txn.open_table(table)?;
            let mut out = Vec::with_capacity(t.len()? as usize);
            for row in t.iter()? {
                let (k, v) = row?;
                match decode(k.value(), v.value()) {
                    Some(record) => out.push(record),
                    None => return Ok(Err(format!("key {:02x?}", k.value()))),
                }
            }
            Ok(Ok(out))
        };
        read()
            .map_err(|e| db_err(&self.path, e))?
            .map_err(|reason| StoreError::Decode {
                path: self.path.clone(),
                table: what,
                reason,
            })
    }
}

/// Key of a range: family byte (4 or 6), address bytes, prefix length. Byte order is address
/// order, so sorted ranges are sorted keys.
fn range_key(range: &IpNetwork) -> Vec<u8> {
    let mut k = Vec::with_capacity(18);
    match range {
        IpNetwork::V4(n) => {
            k.push(4);
            k.extend_from_slice(&n.network().octets());
        }
        IpNetwork::V6(n) => {
            k.push(6);
            k.extend_from_slice(&n.network().octets());
        }
    }
    k.push(range.prefix());
    k
}

fn decode_range(key: &[u8]) -> Option<IpNetwork> {
    match key {
        [4, a @ .., len] if a.len() == 4 => {
            let a: [u8; 4] = a.try_into().ok()?;
            IpNetwork::new(a.into(), *len).ok()
        }
        [6, a @ .., len] if a.len() == 16 => {
            let a: [u8; 16] = a.try_into().ok()?;
            IpNetwork::new(a.into(), *len).ok()
        }
        _ => None,
    }
}

const NO_EXPIRY: u64 = u64::MAX;

/// Value of a ban: flags (bit 0 shadow), origin, created ms, expiry ms (MAX = none), reason.
/// Set in the origin byte when a node name (one length byte, then the name) precedes the
/// reason; records written before shared stores existed do not have it.
const HAS_NODE: u8 = 0x80;

fn encode_ban(ban: &BanRecord, out: &mut Vec<u8>) {
    out.push(u8::from(ban.shadow));
    let origin = match ban.origin {
        Origin::Cli => 0,
        Origin::Detector => 1,
        Origin::Replicated => 2,
    };
    let node = ban.node.as_deref().filter(|n| n.len() <= 255);
    out.push(if node.is_some() {
        origin | HAS_NODE
    } else {
        origin
    });
    out.extend_from_slice(&ban.created_ms.to_le_bytes());
    out.extend_from_slice(&ban.expires_ms.unwrap_or(NO_EXPIRY).to_le_bytes());
    if let Some(n) = node {
        out.push(n.len() as u8);
        out.extend_from_slice(n.as_bytes());
    }
    out.extend_from_slice(ban.reason.as_bytes());
}

fn decode_ban(key: &[u8], v: &[u8]) -> Option<BanRecord> {
    if v.len() < 18 {
        return None;
    }
    let origin = match v[1] & !HAS_NODE {
        0 => Origin::Cli,
        1 => Origin::Detector,
        2 => Origin::Replicated,
        _ => return None,
    };
    let created_ms = u64::from_le_bytes(v[2..10].try_into().ok()?);
    let expires = u64::from_le_bytes(v[10..18].try_into().ok()?);
    let (node, reason) = if v[1] & HAS_NODE != 0 {
        let len = usize::from(*v.get(18)?);
        let name = std::str::from_utf8(v.get(19..19 + len)?).ok()?;
        (Some(Arc::from(name)), &v[19 + len..])
    } else {
        (None, &v[18..])
    };
    Some(BanRecord {
        range: decode_range(key)?,
        node,
        reason: Arc::from(std::str::from_utf8(reason).ok()?),
        origin,
        created_ms,
        expires_ms: (expires != NO_EXPIRY).then_some(expires),
        shadow: v[0] & 1 != 0,
    })
}

fn db_err(path: &Path, e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db {
        path: path.to_owned(),
        source: Box::new(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ban(range: &str) -> BanRecord {
        BanRecord {
            range: range.parse().unwrap(),
            reason: std::sync::Arc::from("test"),
            origin: Origin::Cli,
            created_ms: 1,
            expires_ms: Some(2),
            shadow: false,
            node: None,
        }
    }

    #[test]
    fn a_ban_keeps_the_node_that_made_it() {
        let mut b = ban("198.51.100.0/24");
        b.origin = Origin::Replicated;
        b.node = Some(std::sync::Arc::from("node-b"));
        let mut v = Vec::new();
        encode_ban(&b, &mut v);
        assert_eq!(decode_ban(&range_key(&b.range), &v), Some(b.clone()));
        // Records from before node names decode as before.
        b.node = None;
        v.clear();
        encode_ban(&b, &mut v);
        assert_eq!(v[1], 2);
        assert_eq!(decode_ban(&range_key(&b.range), &v), Some(b));
    }

    #[test]
    fn bans_and_allowlist_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.put_bans(&[ban("203.0.113.0/24"), ban("2001:db8::/32")])
                .unwrap();
            s.put_allow(&AllowRecord {
                range: "10.0.0.0/8".parse().unwrap(),
                created_ms: 5,
            })
            .unwrap();
            s.remove_bans(&["2001:db8::/32".parse().unwrap()]).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.bans().unwrap(), vec![ban("203.0.113.0/24")]);
        assert_eq!(s.allowlist().unwrap().len(), 1);
        s.remove_allow(&"10.0.0.0/8".parse().unwrap()).unwrap();
        assert!(s.allowlist().unwrap().is_empty());
    }

    #[test]
    fn records_round_trip_and_keys_sort_like_addresses() {
        let mut b = ban("2001:db8::/32");
        b.expires_ms = None;
        b.shadow = true;
        b.origin = Origin::Replicated;
        let mut v = Vec::new();
        encode_ban(&b, &mut v);
        assert_eq!(decode_ban(&range_key(&b.range), &v), Some(b));
        let mut ranges: Vec<IpNetwork> = ["10.0.0.0/8", "9.255.0.0/16", "10.0.0.0/16", "::1/128"]
            .iter()
            .map(|r| r.parse().unwrap())
            .collect();
        ranges.sort();
        let mut keys: Vec<Vec<u8>> = ranges.iter().map(range_key).collect();
        let in_range_order = keys.clone();
        keys.sort();
        assert_eq!(keys, in_range_order);
        assert_eq!(decode_range(&[4, 1, 2]), None);
        assert_eq!(decode_ban(&range_key(&ranges[0]), &[0; 5]), None);
    }

    #[test]
    fn second_open_of_the_same_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).err().expect("the file is locked");
        assert!(err.to_string().contains(DB_FILE), "{err}");
    }
}
