//! API keys shared by every node: a key made (or revoked) on one node works (or stops
//! working) on all of them.
//!
//! Redis holds every key record (`{keys}:all`, id → record with the secret's SHA-256, never
//! the secret); changes are announced on a channel and every node resyncs in full on each
//! connection, like bans. Revocation wins: a key revoked anywhere is revoked everywhere.
use std::{collections::HashMap, sync::Arc};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::Shared;
use crate::keys::{KeyRecord, KeyRing};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct KeyChange {
    pub node: String,
    pub keys: Vec<KeyRecord>,
}

impl Shared {
    fn keys_key(&self) -> String {
        format!("{}{{keys}}:all", self.prefix())
    }

    pub(super) fn keys_channel(&self) -> String {
        format!("{}keys", self.prefix())
    }
}

/// Writes a key made or revoked here to Redis and announces it (in the background; if Redis
/// is out of reach, the next resync pushes it).
pub fn announce_key(shared: &Arc<Shared>, record: &KeyRecord) {
    let shared = shared.clone();
    let record = record.clone();
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        if let Err(e) = push(&shared, std::slice::from_ref(&record)).await {
            warn!(error = %e, key = %record.id, "key not replicated yet: the next resync pushes it");
        }
    });
}

async fn push(shared: &Shared, records: &[KeyRecord]) -> Result<(), String> {
    let key = shared.keys_key();
    let mut set = redis::cmd("HSET");
    set.arg(&key);
    for r in records {
        set.arg(&r.id)
            .arg(serde_json::to_string(r).map_err(|e| e.to_string())?);
    }
    shared
        .run(shared.background_budget(), |c| async move {
            c.query::<i64>(&set).await
        })
        .await
        .map_err(|e| e.to_string())?;
    let change = serde_json::to_string(&KeyChange {
        node: shared.node().to_string(),
        keys: records.to_vec(),
    })
    .map_err(|e| e.to_string())?;
    let channel = shared.keys_channel();
    shared
        .run(shared.background_budget(), |c| async move {
            c.query::<i64>(redis::cmd("PUBLISH").arg(&channel).arg(&change))
                .await
        })
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Applies an announced change from another node.
pub(super) fn apply(shared: &Shared, ring: &KeyRing, payload: &str) -> Result<(), String> {
    let change: KeyChange = serde_json::from_str(payload).map_err(|e| e.to_string())?;
    if change.node == **shared.node() {
        return Ok(());
    }
    let changed = ring.merge(&change.keys).map_err(|e| e.to_string())?;
    for k in &changed {
        info!(key = %k.id, tenant = %k.tenant, revoked = k.revoked_ms.is_some(), node = %change.node, "key replicated");
    }
    Ok(())
}

/// Brings the key ring and Redis in step, both ways.
pub(super) async fn resync(shared: &Shared, ring: &KeyRing) -> Result<(), String> {
    let key = shared.keys_key();
    let remote: HashMap<String, String> = shared
        .run(shared.background_budget(), |c| async move {
            c.query(redis::cmd("HGETALL").arg(&key)).await
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut theirs = Vec::with_capacity(remote.len());
    for (id, json) in &remote {
        match serde_json::from_str::<KeyRecord>(json) {
            Ok(r) => theirs.push(r),
            Err(e) => warn!(key = %id, error = %e, "ignoring an unreadable shared key"),
        }
    }
    let merged = ring.merge(&theirs).map_err(|e| e.to_string())?;
    let by_id: HashMap<&str, &KeyRecord> = theirs.iter().map(|r| (r.id.as_str(), r)).collect();
    let missing: Vec<KeyRecord> = ring
        .list()
        .into_iter()
        .filter(|r| match by_id.get(r.id.as_str()) {
            None => true,
            Some(t) => t.revoked_ms.is_none() && r.revoked_ms.is_some(),
        })
        .collect();
    if !missing.is_empty() {
        push(shared, &missing).await?;
    }
    info!(
        received = merged.len(),
        pushed = missing.len(),
        "keys resynced with the shared store"
    );
    Ok(())
}
