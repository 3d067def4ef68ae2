//! Bans shared by every node (and the replication loop that also carries
//! [`super::keys`]): a ban or unban on any node reaches every node's XDP maps.
//!
//! Redis holds the set (`{bans}:all`, a hash of range → record, with `{bans}:expiry` ordering
//! them by expiry so that ended bans are deleted and nothing grows), and announces each change
//! on a pub/sub channel for speed. On start and on every reconnection each node resyncs in
//! full, for certainty: it subscribes first (so nothing published meanwhile is missed), then
//! pushes the bans it made while Redis was out of reach, then applies the set.
//!
//! Records keep their absolute expiry (unix ms), so a ban ends at the same moment on every
//! node (each converts it to its own boot clock for the kernel). A node stores a ban from
//! another node with origin `replicated` and that node's name, which `aiguard bans` shows.
//!
//! An unban is kept on disk (`shared_pending_unbans.v1`) until Redis has it, so one made while
//! Redis is out of reach reaches it when it returns, even across a restart. It leaves a
//! tombstone with its time (`{bans}:unbanned:RANGE`, for [`UNBAN_MEMORY`]): a node that
//! holds the ban as its own and missed the unban (it was down) lifts it on its resync instead
//! of pushing it back; a ban made after the unban wins over it, on every path.
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use futures_util::StreamExt as _;
use ipnetwork::IpNetwork;
use redb::{ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use super::Shared;
use crate::{
    bans::{BanRecord, Origin, now_ms},
    daemon::Node,
    store::{Store, StoreError},
};

/// Bans per HSET and per announcement; a larger batch is announced as "resync".
const BATCH: usize = 10_000;

/// How long Redis remembers an unban (its tombstone): a node away for longer that held the
/// ban as its own pushes it back when it returns. Unbans are operators' acts: few.
pub const UNBAN_MEMORY: Duration = Duration::from_secs(30 * 86_400);

/// Unbans Redis does not have yet: range → when it was unbanned (unix ms).
const PENDING_UNBANS: TableDefinition<&str, u64> = TableDefinition::new("shared_pending_unbans.v1");

/// A change, as announced on the channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Change {
    Ban {
        node: String,
        bans: Vec<BanRecord>,
    },
    Unban {
        node: String,
        ranges: Vec<IpNetwork>,
        /// When it was unbanned (unix ms): a ban made after it stays. Absent from older
        /// nodes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at_ms: Option<u64>,
    },
    /// Too many to announce one by one: read the set.
    Resync {
        node: String,
    },
}

impl Shared {
    fn bans_key(&self) -> String {
        format!("{}{{bans}}:all", self.prefix())
    }

    fn expiry_key(&self) -> String {
        format!("{}{{bans}}:expiry", self.prefix())
    }

    fn bans_channel(&self) -> String {
        format!("{}bans", self.prefix())
    }

    fn unbanned_key(&self, range: &IpNetwork) -> String {
        format!("{}{{bans}}:unbanned:{range}", self.prefix())
    }
}

/// Unbans made here that Redis does not have yet, in memory and on disk: to push when it is
/// back, even after a restart.
pub struct PendingUnbans {
    /// Range → when it was unbanned (unix ms). A std mutex: never held across an await.
    ranges: Mutex<HashMap<IpNetwork, u64>>,
    store: Store,
}

impl PendingUnbans {
    pub(super) fn open(store: Store) -> Result<Self, StoreError> {
        store.write(|txn| {
            txn.open_table(PENDING_UNBANS)?;
            Ok(())
        })?;
        let rows = store.read(|txn| {
            let mut rows = Vec::new();
            for row in txn.open_table(PENDING_UNBANS)?.iter()? {
                let (k, v) = row?;
                rows.push((k.value().to_owned(), v.value()));
            }
            Ok(rows)
        })?;
        let mut ranges = HashMap::new();
        for (range, at) in rows {
            match range.parse::<IpNetwork>() {
                Ok(r) => {
                    ranges.insert(r, at);
                }
                Err(e) => warn!(%range, error = %e, "ignoring an unreadable pending unban"),
            }
        }
        Ok(Self {
            ranges: Mutex::new(ranges),
            store,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpNetwork, u64>> {
        self.ranges.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records unbans made at `at`, on disk before Redis is told (a crash between the two
    /// leaves them for the next start to push).
    fn add(&self, ranges: &[IpNetwork], at: u64) {
        self.lock().extend(ranges.iter().map(|r| (*r, at)));
        let written = self.store.write(|txn| {
            let mut t = txn.open_table(PENDING_UNBANS)?;
            for r in ranges {
                t.insert(r.to_string().as_str(), at)?;
            }
            Ok(())
        });
        if let Err(e) = written {
            warn!(error = %e, "keeping an unban for the shared store on disk failed: a restart before Redis has it would lose it");
        }
    }

    fn list(&self) -> Vec<(IpNetwork, u64)> {
        self.lock().iter().map(|(r, at)| (*r, *at)).collect()
    }

    /// Redis has these: forgotten, unless the range was unbanned again since.
    fn done(&self, pushed: &[(IpNetwork, u64)]) {
        let gone: Vec<IpNetwork> = {
            let mut p = self.lock();
            let gone: Vec<IpNetwork> = pushed
                .iter()
                .filter(|(r, at)| p.get(r) == Some(at))
                .map(|(r, _)| *r)
                .collect();
            for r in &gone {
                p.remove(r);
            }
            gone
        };
        if gone.is_empty() {
            return;
        }
        let written = self.store.write(|txn| {
            let mut t = txn.open_table(PENDING_UNBANS)?;
            for r in &gone {
                t.remove(r.to_string().as_str())?;
            }
            Ok(())
        });
        if let Err(e) = written {
            // Pushed again at the next start: harmless.
            warn!(error = %e, "forgetting replicated unbans on disk failed");
        }
    }
}

/// Writes bans made on this node to Redis and announces them (in the background; while Redis
/// is out of reach they stay local and the next resync pushes them).
pub fn announce_bans(shared: &Arc<Shared>, bans: &[BanRecord]) {
    let own: Vec<BanRecord> = bans
        .iter()
        .filter(|b| b.origin != Origin::Replicated)
        .cloned()
        .collect();
    if own.is_empty() {
        return;
    }
    let shared = shared.clone();
    spawn(async move {
        if let Err(e) = push_bans(&shared, &own).await {
            warn!(error = %e, count = own.len(), "bans not replicated yet: the next resync pushes them");
        }
    });
}

/// Deletes unbanned ranges from Redis and announces it (in the background; while Redis is
/// out of reach they wait on disk, and the next resync pushes them).
pub fn announce_unban(shared: &Arc<Shared>, ranges: &[IpNetwork]) {
    if ranges.is_empty() {
        return;
    }
    let at = now_ms();
    shared.pending_unbans.add(ranges, at);
    let shared = shared.clone();
    let unbans: Vec<(IpNetwork, u64)> = ranges.iter().map(|r| (*r, at)).collect();
    spawn(async move {
        match push_unbans(&shared, &unbans).await {
            Ok(()) => shared.pending_unbans.done(&unbans),
            Err(e) => warn!(
                error = %e,
                "unban not replicated yet: it is pushed when the shared store is back"
            ),
        }
    });
}

fn spawn(f: impl Future<Output = ()> + Send + 'static) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(f);
    }
}

async fn push_bans(shared: &Shared, bans: &[BanRecord]) -> Result<(), String> {
    let key = shared.bans_key();
    let expiry = shared.expiry_key();
    for chunk in bans.chunks(BATCH) {
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut set = redis::cmd("HSET");
        set.arg(&key);
        for b in chunk {
            let json = serde_json::to_string(b).map_err(|e| e.to_string())?;
            set.arg(b.range.to_string()).arg(json);
        }
        pipe.add_command(set).ignore();
        let expiring: Vec<&BanRecord> = chunk.iter().filter(|b| b.expires_ms.is_some()).collect();
        if !expiring.is_empty() {
            let mut z = redis::cmd("ZADD");
            z.arg(&expiry);
            for b in &expiring {
                z.arg(b.expires_ms.unwrap_or(0)).arg(b.range.to_string());
            }
            pipe.add_command(z).ignore();
        }
        // Permanent now: no longer expiring.
        let permanent: Vec<String> = chunk
            .iter()
            .filter(|b| b.expires_ms.is_none())
            .map(|b| b.range.to_string())
            .collect();
        if !permanent.is_empty() {
            pipe.cmd("ZREM").arg(&expiry).arg(&permanent).ignore();
        }
        let change = if bans.len() > BATCH {
            None
        } else {
            Some(Change::Ban {
                node: shared.node().to_string(),
                bans: chunk.to_vec(),
            })
        };
        run_pipe(shared, pipe).await?;
        if let Some(change) = change {
            publish(shared, &change).await?;
        }
    }
    if bans.len() > BATCH {
        publish(
            shared,
            &Change::Resync {
                node: shared.node().to_string(),
            },
        )
        .await?;
    }
    Ok(())
}

/// Lifts unbans (range, when) in Redis (see [`super::scripts::UNBAN`]) and announces those
/// it lifted.
async fn push_unbans(shared: &Shared, unbans: &[(IpNetwork, u64)]) -> Result<(), String> {
    for chunk in unbans.chunks(BATCH) {
        let mut inv = shared.scripts.unban.prepare_invoke();
        inv.key(shared.bans_key()).key(shared.expiry_key());
        for (r, _) in chunk {
            inv.key(shared.unbanned_key(r));
        }
        inv.arg(UNBAN_MEMORY.as_millis() as u64);
        for (r, at) in chunk {
            inv.arg(r.to_string()).arg(*at);
        }
        let lifted: Vec<String> = shared
            .run(shared.background_budget(), |c| async move {
                c.invoke(&inv).await
            })
            .await
            .map_err(|e| e.to_string())?;
        let lifted: HashSet<&str> = lifted.iter().map(String::as_str).collect();
        // One announcement per time (an unban's ranges share one).
        let mut by_time: HashMap<u64, Vec<IpNetwork>> = HashMap::new();
        for (r, at) in chunk {
            if lifted.contains(r.to_string().as_str()) {
                by_time.entry(*at).or_default().push(*r);
            }
        }
        for (at, ranges) in by_time {
            publish(
                shared,
                &Change::Unban {
                    node: shared.node().to_string(),
                    ranges,
                    at_ms: Some(at),
                },
            )
            .await?;
        }
    }
    Ok(())
}

/// When each of `ranges` was last unbanned anywhere, as Redis remembers it.
async fn unbanned_at(
    shared: &Shared,
    ranges: &[IpNetwork],
) -> Result<HashMap<IpNetwork, u64>, String> {
    let mut out = HashMap::new();
    for chunk in ranges.chunks(BATCH) {
        let keys: Vec<String> = chunk.iter().map(|r| shared.unbanned_key(r)).collect();
        let at: Vec<Option<u64>> = shared
            .run(shared.background_budget(), |c| async move {
                c.query(redis::cmd("MGET").arg(&keys)).await
            })
            .await
            .map_err(|e| e.to_string())?;
        for (r, at) in chunk.iter().zip(at) {
            if let Some(at) = at {
                out.insert(*r, at);
            }
        }
    }
    Ok(out)
}

async fn run_pipe(shared: &Shared, pipe: redis::Pipeline) -> Result<(), String> {
    shared
        .run(shared.background_budget(), |c| async move {
            match c {
                super::Conn::Single(mut c) => pipe.query_async::<()>(&mut c).await,
                super::Conn::Cluster(mut c) => pipe.query_async::<()>(&mut c).await,
            }
        })
        .await
        .map_err(|e| e.to_string())
}

async fn publish(shared: &Shared, change: &Change) -> Result<(), String> {
    let text = serde_json::to_string(change).map_err(|e| e.to_string())?;
    let channel = shared.bans_channel();
    shared
        .run(shared.background_budget(), |c| async move {
            c.query::<i64>(redis::cmd("PUBLISH").arg(&channel).arg(&text))
                .await
        })
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Deletes bans whose time is up from Redis (any node may; it is idempotent).
async fn delete_ended(shared: &Shared) -> Result<usize, String> {
    let expiry = shared.expiry_key();
    let due: Vec<String> = shared
        .run(shared.background_budget(), |c| async move {
            c.query(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(&expiry)
                    .arg("-inf")
                    .arg(now_ms())
                    .arg("LIMIT")
                    .arg(0)
                    .arg(BATCH),
            )
            .await
        })
        .await
        .map_err(|e| e.to_string())?;
    if due.is_empty() {
        return Ok(0);
    }
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("HDEL")
        .arg(shared.bans_key())
        .arg(&due)
        .ignore()
        .cmd("ZREM")
        .arg(shared.expiry_key())
        .arg(&due)
        .ignore();
    run_pipe(shared, pipe).await?;
    Ok(due.len())
}

/// Keeps this node's bans in step with every other node's until shutdown.
pub async fn replicate(
    shared: Arc<Shared>,
    node: Arc<Mutex<Node>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = shared.connections();
    let retry = shared.settings().retry_interval;
    let mut cleanup = tokio::time::interval(Duration::from_secs(60));
    cleanup.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if *shutdown.borrow() {
            return;
        }
        if !shared.health.is_up() {
            tokio::select! {
                _ = stopped(&mut shutdown) => return,
                _ = connections.changed() => {}
                _ = tokio::time::sleep(retry) => {}
            }
            continue;
        }
        let mut stream = match subscribe(&shared).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot subscribe to ban changes; retrying");
                tokio::select! {
                    _ = stopped(&mut shutdown) => return,
                    _ = tokio::time::sleep(retry) => {}
                }
                continue;
            }
        };
        connections.borrow_and_update();
        let ring = node.lock().unwrap_or_else(|p| p.into_inner()).keys.clone();
        let synced = match super::keys::resync(&shared, &ring).await {
            Ok(()) => resync(&shared, &node).await,
            Err(e) => Err(e),
        };
        if let Err(e) = synced {
            warn!(error = %e, "ban resync failed; retrying");
            tokio::select! {
                _ = stopped(&mut shutdown) => return,
                _ = tokio::time::sleep(retry) => {}
            }
            continue;
        }
        loop {
            tokio::select! {
                _ = stopped(&mut shutdown) => return,
                // Reconnected (Redis was out of reach): resync.
                _ = connections.changed() => break,
                _ = cleanup.tick() => {
                    if let Err(e) = delete_ended(&shared).await {
                        warn!(error = %e, "deleting ended bans from the shared store failed");
                    }
                }
                msg = stream.next() => {
                    let Some(msg) = msg else {
                        warn!("ban change subscription lost; resubscribing and resyncing");
                        break;
                    };
                    let payload: String = match msg.get_payload() {
                        Ok(p) => p,
                        Err(e) => {
                            warn!(error = %e, "unreadable ban change message");
                            continue;
                        }
                    };
                    if msg.get_channel_name() == shared.keys_channel() {
                        let ring = node.lock().unwrap_or_else(|p| p.into_inner()).keys.clone();
                        if let Err(e) = super::keys::apply(&shared, &ring, &payload) {
                            warn!(error = %e, "applying a replicated key change failed");
                        }
                        continue;
                    }
                    match serde_json::from_str::<Change>(&payload) {
                        Ok(change) => {
                            if let Err(e) = apply(&shared, &node, change).await {
                                warn!(error = %e, "applying a replicated ban change failed; resyncing");
                                break;
                            }
                        }
                        Err(e) => warn!(error = %e, "ignoring a malformed ban change message"),
                    }
                }
            }
        }
    }
}

/// Resolves when shutdown starts (its output holds no watch guard across the select's await).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn subscribe(shared: &Shared) -> Result<redis::aio::PubSubStream, String> {
    // Cluster nodes forward PUBLISH to every node: one seed that answers is enough.
    let mut last = String::from("no URL");
    for url in &shared.settings().urls {
        let attempt = async {
            let client = shared.client(url).map_err(|e| e.to_string())?;
            let mut ps = client
                .get_async_pubsub()
                .await
                .map_err(|e| super::tls::explain(&e))?;
            ps.subscribe(&[shared.bans_channel(), shared.keys_channel()])
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(ps.into_on_message())
        };
        match tokio::time::timeout(shared.background_budget(), attempt).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = e,
            Err(_) => last = format!("{}: no answer in time", super::redact(url)),
        }
    }
    Err(last)
}

/// Applies one announced change from another node.
async fn apply(
    shared: &Arc<Shared>,
    node: &Arc<Mutex<Node>>,
    change: Change,
) -> Result<(), String> {
    match change {
        Change::Ban { node: from, bans } if from != **shared.node() => {
            apply_bans(shared, node, bans).await
        }
        Change::Unban {
            node: from,
            ranges,
            at_ms,
        } if from != **shared.node() => {
            let node = node.clone();
            let removed = tokio::task::spawn_blocking(move || {
                let mut guard = node.lock().unwrap_or_else(|p| p.into_inner());
                let Node {
                    dataplane, bans, ..
                } = &mut *guard;
                let mut removed = 0;
                for r in ranges {
                    // A ban made here after the unban stays.
                    if bans
                        .get(&r)
                        .is_some_and(|b| at_ms.is_none_or(|at| b.created_ms <= at))
                    {
                        bans.unban(dataplane, &r.to_string())
                            .map_err(|e| e.to_string())?;
                        removed += 1;
                    }
                }
                Ok::<_, String>(removed)
            })
            .await
            .map_err(|e| e.to_string())??;
            info!(removed, node = %from, "replicated unban applied");
            Ok(())
        }
        Change::Resync { node: from } if from != **shared.node() => resync(shared, node).await,
        _ => Ok(()),
    }
}

async fn apply_bans(
    shared: &Arc<Shared>,
    node: &Arc<Mutex<Node>>,
    records: Vec<BanRecord>,
) -> Result<(), String> {
    let own = shared.node().clone();
    let records: Vec<BanRecord> = records
        .into_iter()
        .map(|mut r| {
            if r.node.as_deref() != Some(&*own) {
                r.origin = Origin::Replicated;
            }
            r
        })
        .collect();
    let node = node.clone();
    let applied = tokio::task::spawn_blocking(move || {
        let mut guard = node.lock().unwrap_or_else(|p| p.into_inner());
        let Node {
            dataplane, bans, ..
        } = &mut *guard;
        bans.apply_replicated(dataplane, records)
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())??;
    if !applied.is_empty() {
        shared
            .bans_replicated
            .fetch_add(applied.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// Brings this node and Redis in step: pending unbans and this node's own bans go up; the
/// set comes down; replicated bans no longer in the set are lifted.
async fn resync(shared: &Arc<Shared>, node: &Arc<Mutex<Node>>) -> Result<(), String> {
    let pending = shared.pending_unbans.list();
    if !pending.is_empty() {
        push_unbans(shared, &pending).await?;
        shared.pending_unbans.done(&pending);
        info!(
            count = pending.len(),
            "unbans made here pushed to the shared store"
        );
    }
    let _ = delete_ended(shared).await;
    let key = shared.bans_key();
    let remote: HashMap<String, String> = shared
        .run(
            shared.background_budget().max(Duration::from_secs(10)),
            |c| async move { c.query(redis::cmd("HGETALL").arg(&key)).await },
        )
        .await
        .map_err(|e| e.to_string())?;
    let now = now_ms();
    let mut records = Vec::with_capacity(remote.len());
    for (range, json) in &remote {
        match serde_json::from_str::<BanRecord>(json) {
            Ok(r) if r.expires_ms.is_none_or(|e| e > now) => records.push(r),
            Ok(_) => {}
            Err(e) => warn!(%range, error = %e, "ignoring an unreadable shared ban"),
        }
    }
    let in_redis: HashSet<IpNetwork> = records.iter().map(|r| r.range).collect();

    // What this node has that Redis does not: its own bans go up (unless unbanned elsewhere
    // since), others' were lifted.
    let (own_missing, mut lifted) = {
        let guard = node.lock().unwrap_or_else(|p| p.into_inner());
        let mut own = Vec::new();
        let mut lifted = Vec::new();
        for r in guard.bans.records() {
            if in_redis.contains(&r.range) || r.expires_ms.is_some_and(|e| e <= now) {
                continue;
            }
            if r.origin == Origin::Replicated {
                lifted.push(r.range);
            } else {
                let mut r = r.clone();
                r.node.get_or_insert_with(|| shared.node().clone());
                own.push(r);
            }
        }
        (own, lifted)
    };
    let own_ranges: Vec<IpNetwork> = own_missing.iter().map(|r| r.range).collect();
    let unbanned = unbanned_at(shared, &own_ranges).await?;
    let (own_missing, unbanned_elsewhere): (Vec<BanRecord>, Vec<BanRecord>) = own_missing
        .into_iter()
        .partition(|r| unbanned.get(&r.range).is_none_or(|at| r.created_ms > *at));
    lifted.extend(unbanned_elsewhere.iter().map(|r| r.range));
    if !own_missing.is_empty() {
        push_bans(shared, &own_missing).await?;
        info!(
            count = own_missing.len(),
            "bans made here pushed to the shared store"
        );
    }
    let received = records.len();
    apply_bans(shared, node, records).await?;
    if !lifted.is_empty() {
        let node = node.clone();
        let n = lifted.len();
        tokio::task::spawn_blocking(move || {
            let mut guard = node.lock().unwrap_or_else(|p| p.into_inner());
            let Node {
                dataplane, bans, ..
            } = &mut *guard;
            for r in lifted {
                if let Err(e) = bans.unban(dataplane, &r.to_string()) {
                    warn!(range = %r, error = %e, "lifting a ban unbanned elsewhere failed");
                }
            }
        })
        .await
        .map_err(|e| e.to_string())?;
        info!(
            count = n,
            "bans lifted on other nodes while this one was away, lifted here"
        );
    }
    info!(
        shared_bans = received,
        "bans resynced with the shared store"
    );
    Ok(())
}
