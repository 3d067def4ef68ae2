//! The embedded store: bans and the allowlist on disk, so a reboot (or a crash) restores them.
//!
//! redb: pure Rust (nothing to install or link), ACID with copy-on-write B-trees, so a crash
//! mid-write leaves the last committed state; one file in the state directory. A batch of bans
//! is one transaction: a million-line ban file commits (or fails) as a whole.
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::bans::{AllowRecord, BanRecord};

const BANS: TableDefinition<&str, &[u8]> = TableDefinition::new("bans");
const ALLOW: TableDefinition<&str, &[u8]> = TableDefinition::new("allowlist");

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
    /// A stored record could not be decoded (written by an incompatible version).
    #[error("embedded store {path}: record {key:?} is unreadable: {source}")]
    Decode {
        path: PathBuf,
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Bans and allowlist entries on disk.
pub struct Store {
    db: Database,
    path: PathBuf,
}

#[expect(
    clippy::result_large_err,
    reason = "closures inside a transaction return redb's error as is; it is boxed on the way out"
)]
impl Store {
    /// Opens (or creates) the store in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::StateDir {
            path: state_dir.to_owned(),
            source,
        })?;
        let path = state_dir.join(DB_FILE);
        let db = Database::create(&path).map_err(|e| db_err(&path, e))?;
        let store = Self { db, path };
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
            for ban in bans {
                let value = serde_json::to_vec(ban).expect("a ban record always serialises");
                t.insert(ban.range.to_string().as_str(), value.as_slice())?;
            }
            Ok(())
        })
    }

    /// Removes bans (absent ones are ignored), all in one transaction.
    pub fn remove_bans(&self, ranges: &[IpNetwork]) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut t = txn.open_table(BANS)?;
            for r in ranges {
                t.remove(r.to_string().as_str())?;
            }
            Ok(())
        })
    }

    /// Every stored ban.
    pub fn bans(&self) -> Result<Vec<BanRecord>, StoreError> {
        self.read_all(BANS)
    }

    /// Inserts or replaces an allowlist entry.
    pub fn put_allow(&self, entry: &AllowRecord) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut t = txn.open_table(ALLOW)?;
            let value = serde_json::to_vec(entry).expect("an allow record always serialises");
            t.insert(entry.range.to_string().as_str(), value.as_slice())?;
            Ok(())
        })
    }

    /// Removes an allowlist entry (absent is fine).
    pub fn remove_allow(&self, range: &IpNetwork) -> Result<(), StoreError> {
        self.write(|txn| {
            txn.open_table(ALLOW)?.remove(range.to_string().as_str())?;
            Ok(())
        })
    }

    /// Every allowlist entry.
    pub fn allowlist(&self) -> Result<Vec<AllowRecord>, StoreError> {
        self.read_all(ALLOW)
    }

    fn write(
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

    fn read_all<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, StoreError> {
        let read = || -> Result<Vec<(String, Vec<u8>)>, redb::Error> {
            let txn = self.db.begin_read()?;
            let t = txn.open_table(table)?;
            let mut out = Vec::with_capacity(t.len()? as usize);
            for row in t.iter()? {
                let (k, v) = row?;
                out.push((k.value().to_owned(), v.value().to_vec()));
            }
            Ok(out)
        };
        let rows = read().map_err(|e| db_err(&self.path, e))?;
        rows.into_iter()
            .map(|(key, value)| {
                serde_json::from_slice(&value).map_err(|source| StoreError::Decode {
                    path: self.path.clone(),
                    key,
                    source,
                })
            })
            .collect()
    }
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
    use crate::bans::Origin;

    fn ban(range: &str) -> BanRecord {
        BanRecord {
            range: range.parse().unwrap(),
            reason: "test".into(),
            origin: Origin::Cli,
            created_ms: 1,
            expires_ms: Some(2),
            shadow: false,
        }
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
    fn second_open_of_the_same_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).err().expect("the file is locked");
        assert!(err.to_string().contains(DB_FILE), "{err}");
    }
}
