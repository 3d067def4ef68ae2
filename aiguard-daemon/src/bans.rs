//! Bans and the allowlist: the rules an operator (or the detector) sets, kept in step between
//! the embedded store (what survives a reboot) and the kernel maps (what drops packets).
//!
//! Every change is validated whole before anything is written, then applied to the maps and
//! committed to the store; if the commit fails the maps are put back, so a refused change
//! changes nothing.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aiguard_common::{BAN_FLAG_SHADOW, BanEntry, reason};
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    dataplane::{Dataplane, DataplaneError, boot_ns_now},
    range::{self, RangeError},
    store::{Store, StoreError},
};

/// Longest TTL accepted; longer is almost certainly a typo (use no TTL for a permanent ban).
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Longest free-text reason kept.
pub const MAX_REASON_LEN: usize = 256;

/// Who made a ban.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// An operator, through the CLI or the admin API.
    Cli,
    /// Abuse detection on this node.
    Detector,
    /// Another node, through the shared store.
    Replicated,
}

impl Origin {
    fn reason_code(self) -> u16 {
        match self {
            Self::Cli => reason::MANUAL,
            Self::Detector => reason::DETECTOR,
            Self::Replicated => reason::REPLICATED,
        }
    }
}

/// A ban as stored and listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BanRecord {
    pub range: IpNetwork,
    /// Shared: a batch of a million bans has one reason, not a million copies.
    pub reason: Arc<str>,
    pub origin: Origin,
    /// Unix time in milliseconds.
    pub created_ms: u64,
    /// Unix time in milliseconds; `None` = until unbanned.
    pub expires_ms: Option<u64>,
    /// Count matches, drop nothing.
    pub shadow: bool,
    /// The node that made it, when bans are shared (see [`crate::shared::bans`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Arc<str>>,
}

/// An allowlist range: its sources are never dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AllowRecord {
    pub range: IpNetwork,
    pub created_ms: u64,
}

/// How to ban: what a request says about every range it lists.
#[derive(Debug, Clone)]
pub struct BanSpec {
    pub ttl: Option<Duration>,
    pub reason: Option<String>,
    pub shadow: bool,
    /// Accept a /0.
    pub force: bool,
    pub origin: Origin,
    /// This node's name, when bans are shared.
    pub node: Option<Arc<str>>,
}

/// A ban with its kernel hit count, for listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BanView {
    #[serde(flatten)]
    pub record: BanRecord,
    pub hits: u64,
}

/// Why a change to bans or the allowlist was refused. Nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum BanError {
    /// The range is malformed, has host bits set, or is a /0 without force.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// Banning this range would contradict the allowlist.
    #[error(
        "{range} overlaps allowlisted range {allowed}; the allowlist always wins, so this ban would not drop those sources. Remove it with `aiguard unallow {allowed}` first, or ban a range outside it"
    )]
    AllowlistOverlap {
        range: IpNetwork,
        allowed: IpNetwork,
    },
    /// TTL of zero or beyond [`MAX_TTL`].
    #[error(
        "TTL {ttl} is out of range: expected more than 0s and at most 10 years (omit --ttl for a ban that lasts until unbanned)"
    )]
    Ttl { ttl: String },
    /// Reason longer than [`MAX_REASON_LEN`] or with control characters.
    #[error("reason is invalid: {0}")]
    Reason(String),
    /// No such ban.
    #[error("{0} is not banned (see `aiguard bans`)")]
    NotBanned(IpNetwork),
    /// No such allowlist range.
    #[error("{0} is not in the allowlist (see `aiguard allowlist`)")]
    NotAllowed(IpNetwork),
    /// The ban trie has no room.
    #[error(
        "the {family} ban table is full ({max} entries); raise xdp.max_bans in the config and restart, or remove bans"
    )]
    Full { family: &'static str, max: u32 },
    /// One item of a batch was refused; the whole batch was.
    #[error("item {index}: {source}")]
    InBatch {
        index: usize,
        #[source]
        source: Box<BanError>,
    },
    /// The embedded store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The kernel maps failed.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

/// Unix time now in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What `restore` found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    /// Bans restored from the store.
    pub bans: usize,
    /// Of those, bans already in the pinned maps (their hit counts carried on).
    pub adopted: usize,
    /// Bans that expired while the daemon was away, now removed.
    pub expired: usize,
    /// Kernel entries that had no record (from a crash mid-change), now removed.
    pub orphans_removed: usize,
    pub allowlist: usize,
}

/// The active bans and allowlist.
pub struct BanList {
    store: Store,
    bans: HashMap<IpNetwork, BanRecord>,
    /// (expiry ms, range): what the sweeper removes next.
    expiries: BTreeSet<(u64, IpNetwork)>,
    allow: BTreeMap<IpNetwork, AllowRecord>,
    max_bans: u32,
}

impl BanList {
    /// Loads the store and brings the kernel maps in line with it: the store is the truth,
    /// pinned entries that match it are kept as they are (with their hit counts).
    pub fn restore(
        store: Store,
        dp: &mut Dataplane,
        max_bans: u32,
    ) -> Result<(Self, RestoreReport), BanError> {
        let now = now_ms();
        let boot_now = boot_ns_now();
        let mut report = RestoreReport::default();

        let mut expired = Vec::new();
        let mut bans = HashMap::new();
        for rec in store.bans()? {
            if rec.expires_ms.is_some_and(|e| e <= now) {
                expired.push(rec.range);
            } else {
                bans.insert(rec.range, rec);
            }
        }
        report.expired = expired.len();
        store.remove_bans(&expired)?;

        // A smaller xdp.max_bans than the store holds: say so, rather than fail mid-insert.
        for (family, is_v4) in [("IPv4", true), ("IPv6", false)] {
            if bans.keys().filter(|r| r.is_ipv4() == is_v4).count() > max_bans as usize {
                return Err(BanError::Full {
                    family,
                    max: max_bans,
                });
            }
        }

        let mut in_kernel = dp.ban_entries()?;
        let mut missing: Vec<(IpNetwork, BanEntry)> = Vec::new();
        for rec in bans.values() {
            let want = kernel_entry(rec, now, boot_now);
            match in_kernel.remove(&rec.range) {
                Some(have) if same_ban(&have, &want) => report.adopted += 1,
                have => missing.push((
                    rec.range,
                    BanEntry {
                        hits: have.map_or(0, |h| h.hits),
                        ..want
                    },
                )),
            }
        }
        // One sorted batch: after a reboot this is every ban.
        missing.sort_by_key(|(r, _)| *r);
        dp.put_bans(&missing)?;
        for orphan in in_kernel.keys() {
            dp.remove_ban(orphan)?;
        }
        report.orphans_removed = in_kernel.len();
        for r in &expired {
            dp.remove_ban(r)?;
        }
        report.bans = bans.len();

        let allow: BTreeMap<_, _> = store
            .allowlist()?
            .into_iter()
            .map(|a| (a.range, a))
            .collect();
        let kernel_allow: BTreeSet<_> = dp.allow_entries()?.into_iter().collect();
        for r in allow.keys() {
            if !kernel_allow.contains(r) {
                dp.put_allow(r)?;
            }
        }
        for r in kernel_allow.iter().filter(|r| !allow.contains_key(r)) {
            dp.remove_allow(r)?;
        }
        report.allowlist = allow.len();

        let expiries = bans
            .values()
            .filter_map(|b| b.expires_ms.map(|e| (e, b.range)))
            .collect();
        Ok((
            Self {
                store,
                bans,
                expiries,
                allow,
                max_bans,
            },
            report,
        ))
    }

    /// Number of active bans.
    pub fn len(&self) -> usize {
        self.bans.len()
    }

    /// Whether there are no bans.
    pub fn is_empty(&self) -> bool {
        self.bans.is_empty()
    }

    /// Number of allowlist ranges.
    pub fn allow_len(&self) -> usize {
        self.allow.len()
    }

    /// Validates and applies bans, all or nothing. A range already banned is updated (new TTL,
    /// reason, shadow) and keeps its hit count. A range listed twice counts once.
    pub fn ban(
        &mut self,
        dp: &mut Dataplane,
        ranges: &[String],
        spec: &BanSpec,
    ) -> Result<Vec<BanRecord>, BanError> {
        let started = std::time::Instant::now();
        let now = now_ms();
        let boot_now = boot_ns_now();

        // Validate everything first.
        let common = self.validate_spec(spec, now)?;
        let mut records: Vec<BanRecord> = Vec::with_capacity(ranges.len());
        for (index, text) in ranges.iter().enumerate() {
            let range = range::parse_range(text, spec.force).map_err(BanError::from);
            let range = range
                .and_then(|r| self.check_allowlist(r))
                .map_err(|e| in_batch(ranges.len(), index, e))?;
            records.push(BanRecord {
                range,
                ..common.clone()
            });
        }
        // Sorted, the kernel inserts several times faster (see Dataplane::put_bans).
        records.sort_by_key(|r| r.range);
        records.dedup_by_key(|r| r.range);
        self.check_capacity(&records)?;
        let validated = started.elapsed();
        self.apply(dp, records, now, boot_now, started, validated)
    }

    /// Applies bans that came from another node through the shared store, as they were made
    /// there (same expiry, reason and node). Ranges that overlap this node's allowlist are
    /// left out (the allowlist wins) and so are bans already over; returns what was applied.
    pub fn apply_replicated(
        &mut self,
        dp: &mut Dataplane,
        mut records: Vec<BanRecord>,
    ) -> Result<Vec<BanRecord>, BanError> {
        let started = std::time::Instant::now();
        let now = now_ms();
        let boot_now = boot_ns_now();
        records.retain(|r| {
            if r.expires_ms.is_some_and(|e| e <= now) {
                return false;
            }
            if let Err(e) = self.check_allowlist(r.range) {
                warn!(range = %r.range, node = ?r.node, "replicated ban not applied here: {e}");
                return false;
            }
            // Unchanged: nothing to do (and its hit count stays untouched).
            self.bans.get(&r.range) != Some(r)
        });
        if records.is_empty() {
            return Ok(records);
        }
        records.sort_by_key(|r| r.range);
        records.dedup_by_key(|r| r.range);
        self.check_capacity(&records)?;
        let validated = started.elapsed();
        self.apply(dp, records, now, boot_now, started, validated)
    }

    /// Every active ban's record.
    pub fn records(&self) -> impl Iterator<Item = &BanRecord> {
        self.bans.values()
    }

    /// The record of one banned range.
    pub fn get(&self, range: &IpNetwork) -> Option<&BanRecord> {
        self.bans.get(range)
    }

    /// Kernel, disk and index at once for validated records.
    fn apply(
        &mut self,
        dp: &mut Dataplane,
        records: Vec<BanRecord>,
        now: u64,
        boot_now: u64,
        started: std::time::Instant,
        validated: Duration,
    ) -> Result<Vec<BanRecord>, BanError> {
        let mut entries = Vec::with_capacity(records.len());
        let mut replaced: Vec<(BanRecord, BanEntry)> = Vec::new();
        for rec in &records {
            let mut entry = kernel_entry(rec, now, boot_now);
            if let Some(old) = self.bans.get(&rec.range) {
                let prior = dp.ban_entry(&rec.range)?.unwrap_or_default();
                entry.hits = prior.hits;
                replaced.push((old.clone(), prior));
            }
            entries.push((rec.range, entry));
        }

        // Kernel and disk at once, and the in-memory index while the disk commits: they are
        // independent until one of them fails.
        let timed = |f: &mut dyn FnMut() -> Result<(), BanError>| {
            let t = std::time::Instant::now();
            (f(), t.elapsed().as_millis() as u64)
        };
        let (store, bans, expiries) = (&self.store, &mut self.bans, &mut self.expiries);
        let ((kernel, kernel_ms), (disk, store_ms)) = std::thread::scope(|scope| {
            let disk = scope.spawn(|| timed(&mut || Ok(store.put_bans(&records)?)));
            let kernel = timed(&mut || Ok(dp.put_bans(&entries)?));
            if kernel.0.is_ok() {
                index(bans, expiries, &records);
            }
            (kernel, disk.join().expect("store thread panicked"))
        });
        if let Err(e) = kernel.and(disk) {
            // Put the index back as it was, whether or not it had been updated.
            for rec in &records {
                if let Some(e) = rec.expires_ms {
                    self.expiries.remove(&(e, rec.range));
                }
                self.bans.remove(&rec.range);
            }
            let old: Vec<BanRecord> = replaced.iter().map(|(r, _)| r.clone()).collect();
            index(&mut self.bans, &mut self.expiries, &old);
            self.undo_ban(dp, &records, &replaced);
            return Err(e);
        }

        if let [r] = records.as_slice() {
            let expires = r.expires_ms.map_or_else(
                || "never".to_owned(),
                |ms| {
                    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms))
                        .to_string()
                },
            );
            info!(range = %r.range, reason = %r.reason, origin = ?r.origin, node = ?r.node,
                  shadow = r.shadow, %expires, "banned");
        } else {
            info!(
                count = records.len(),
                validate_ms = validated.as_millis() as u64,
                kernel_ms,
                store_ms,
                total_ms = started.elapsed().as_millis() as u64,
                "banned a batch of ranges"
            );
        }
        Ok(records)
    }

    /// Puts kernel and disk back as they were before a failed `ban`.
    fn undo_ban(
        &self,
        dp: &mut Dataplane,
        records: &[BanRecord],
        replaced: &[(BanRecord, BanEntry)],
    ) {
        let fresh: Vec<IpNetwork> = records
            .iter()
            .filter(|r| !self.bans.contains_key(&r.range))
            .map(|r| r.range)
            .collect();
        let old: Vec<BanRecord> = replaced.iter().map(|(r, _)| r.clone()).collect();
        let restored = self
            .store
            .remove_bans(&fresh)
            .and_then(|()| self.store.put_bans(&old));
        if let Err(e) = restored {
            warn!(error = %e, "could not undo a failed ban in the store; the next restart reconciles it");
        }
        for range in &fresh {
            if let Err(e) = dp.remove_ban(range) {
                warn!(%range, error = %e, "could not undo a kernel ban entry; the next restart reconciles it");
            }
        }
        for (rec, entry) in replaced {
            if let Err(e) = dp.put_ban(&rec.range, *entry) {
                warn!(range = %rec.range, error = %e, "could not restore a kernel ban entry; the next restart reconciles it");
            }
        }
    }

    /// Everything about a ban except its range (filled in per item; 0.0.0.0/32 until then).
    fn validate_spec(&self, spec: &BanSpec, now: u64) -> Result<BanRecord, BanError> {
        if let Some(ttl) = spec.ttl
            && (ttl.is_zero() || ttl > MAX_TTL)
        {
            return Err(BanError::Ttl {
                ttl: humantime::format_duration(ttl).to_string(),
            });
        }
        let reason = spec.reason.as_deref().unwrap_or("manual");
        if reason.chars().count() > MAX_REASON_LEN {
            return Err(BanError::Reason(format!(
                "{} characters, at most {MAX_REASON_LEN} are kept",
                reason.chars().count()
            )));
        }
        if reason.chars().any(char::is_control) {
            return Err(BanError::Reason("it contains control characters".into()));
        }
        Ok(BanRecord {
            range: IpNetwork::from(std::net::IpAddr::from([0u8, 0, 0, 0])),
            reason: Arc::from(reason),
            origin: spec.origin,
            created_ms: now,
            expires_ms: spec.ttl.map(|t| now + t.as_millis() as u64),
            shadow: spec.shadow,
            node: spec.node.clone(),
        })
    }

    fn check_allowlist(&self, range: IpNetwork) -> Result<IpNetwork, BanError> {
        match self.allow.keys().find(|a| range::overlaps(a, &range)) {
            Some(allowed) => Err(BanError::AllowlistOverlap {
                range,
                allowed: *allowed,
            }),
            None => Ok(range),
        }
    }

    fn check_capacity(&self, records: &[BanRecord]) -> Result<(), BanError> {
        for (family, is_v4) in [("IPv4", true), ("IPv6", false)] {
            let fresh = records
                .iter()
                .filter(|r| r.range.is_ipv4() == is_v4 && !self.bans.contains_key(&r.range))
                .count();
            let have = self.bans.keys().filter(|r| r.is_ipv4() == is_v4).count();
            if have + fresh > self.max_bans as usize {
                return Err(BanError::Full {
                    family,
                    max: self.max_bans,
                });
            }
        }
        Ok(())
    }

    /// Lifts a ban.
    pub fn unban(&mut self, dp: &mut Dataplane, range: &str) -> Result<BanRecord, BanError> {
        let range = range::parse_range(range, true)?;
        let Some(rec) = self.bans.get(&range).cloned() else {
            return Err(BanError::NotBanned(range));
        };
        let prior = dp.ban_entry(&range)?;
        dp.remove_ban(&range)?;
        if let Err(e) = self.store.remove_bans(&[range]) {
            if let Some(p) = prior
                && let Err(re) = dp.put_ban(&range, p)
            {
                warn!(%range, error = %re, "could not restore a kernel ban entry; the next restart reconciles it");
            }
            return Err(e.into());
        }
        self.forget(&rec);
        info!(%range, "unbanned");
        Ok(rec)
    }

    fn forget(&mut self, rec: &BanRecord) {
        self.bans.remove(&rec.range);
        if let Some(e) = rec.expires_ms {
            self.expiries.remove(&(e, rec.range));
        }
    }

    /// Removes bans whose time is up (the kernel already ignores them). Returns them.
    pub fn sweep(&mut self, dp: &mut Dataplane, now: u64) -> Result<Vec<BanRecord>, BanError> {
        let due: Vec<IpNetwork> = self
            .expiries
            .iter()
            .take_while(|(e, _)| *e <= now)
            .map(|(_, r)| *r)
            .collect();
        if due.is_empty() {
            return Ok(Vec::new());
        }
        self.store.remove_bans(&due)?;
        let mut removed = Vec::with_capacity(due.len());
        for range in due {
            dp.remove_ban(&range)?;
            if let Some(rec) = self.bans.get(&range).cloned() {
                self.forget(&rec);
                info!(%range, reason = %rec.reason, "ban expired");
                removed.push(rec);
            }
        }
        Ok(removed)
    }

    /// Every ban with its hit count, sorted by range.
    pub fn list(&self, dp: &Dataplane) -> Result<Vec<BanView>, BanError> {
        let mut out = Vec::with_capacity(self.bans.len());
        for rec in self.bans.values() {
            let hits = dp.ban_entry(&rec.range)?.map_or(0, |e| e.hits);
            out.push(BanView {
                record: rec.clone(),
                hits,
            });
        }
        out.sort_by_key(|v| v.record.range);
        Ok(out)
    }

    /// Adds an allowlist range. Returns the active bans it overlaps (they stop dropping those
    /// sources: the allowlist wins).
    pub fn allow(
        &mut self,
        dp: &mut Dataplane,
        range: &str,
        force: bool,
    ) -> Result<(AllowRecord, Vec<IpNetwork>), BanError> {
        let range = range::parse_range(range, force)?;
        let rec = AllowRecord {
            range,
            created_ms: now_ms(),
        };
        dp.put_allow(&range)?;
        if let Err(e) = self.store.put_allow(&rec) {
            if !self.allow.contains_key(&range) {
                let _ = dp.remove_allow(&range);
            }
            return Err(e.into());
        }
        self.allow.insert(range, rec.clone());
        let shadowed: Vec<IpNetwork> = self
            .bans
            .keys()
            .filter(|b| range::overlaps(b, &range))
            .copied()
            .collect();
        info!(%range, "allowlisted");
        Ok((rec, shadowed))
    }

    /// Removes an allowlist range.
    pub fn unallow(&mut self, dp: &mut Dataplane, range: &str) -> Result<AllowRecord, BanError> {
        let range = range::parse_range(range, true)?;
        let Some(rec) = self.allow.get(&range).cloned() else {
            return Err(BanError::NotAllowed(range));
        };
        dp.remove_allow(&range)?;
        if let Err(e) = self.store.remove_allow(&range) {
            if let Err(re) = dp.put_allow(&range) {
                warn!(%range, error = %re, "could not restore a kernel allowlist entry; the next restart reconciles it");
            }
            return Err(e.into());
        }
        self.allow.remove(&range);
        info!(%range, "removed from the allowlist");
        Ok(rec)
    }

    /// The allowlist, sorted.
    pub fn allowlist(&self) -> Vec<AllowRecord> {
        self.allow.values().cloned().collect()
    }
}

/// Whether a pinned kernel entry already says what the store says. Expiries were computed from
/// the wall clock at different moments, so they match within a second.
fn same_ban(have: &BanEntry, want: &BanEntry) -> bool {
    have.reason == want.reason
        && have.flags == want.flags
        && have.prefix_len == want.prefix_len
        && (have.expires_boot_ns == 0) == (want.expires_boot_ns == 0)
        && have.expires_boot_ns.abs_diff(want.expires_boot_ns) < 1_000_000_000
}

/// Adds records to the in-memory index (replacing any earlier record of the same range).
fn index(
    bans: &mut HashMap<IpNetwork, BanRecord>,
    expiries: &mut BTreeSet<(u64, IpNetwork)>,
    records: &[BanRecord],
) {
    for rec in records {
        if let Some(old) = bans.insert(rec.range, rec.clone())
            && let Some(e) = old.expires_ms
        {
            expiries.remove(&(e, old.range));
        }
        if let Some(e) = rec.expires_ms {
            expiries.insert((e, rec.range));
        }
    }
}

/// Names the item of a batch that was refused; a single ban's error stays as it is.
fn in_batch(len: usize, index: usize, e: BanError) -> BanError {
    if len > 1 {
        BanError::InBatch {
            index,
            source: Box::new(e),
        }
    } else {
        e
    }
}

/// The kernel's view of a ban: expiry converted from wall-clock to CLOCK_BOOTTIME.
fn kernel_entry(rec: &BanRecord, now_ms: u64, boot_now_ns: u64) -> BanEntry {
    let expires_boot_ns = match rec.expires_ms {
        None => 0,
        Some(e) => boot_now_ns
            .saturating_add(e.saturating_sub(now_ms).saturating_mul(1_000_000))
            .max(1),
    };
    BanEntry {
        expires_boot_ns,
        hits: 0,
        reason: rec.origin.reason_code(),
        prefix_len: u16::from(rec.range.prefix()),
        flags: if rec.shadow { BAN_FLAG_SHADOW } else { 0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_entry_converts_expiry_to_boottime() {
        let rec = BanRecord {
            range: "203.0.113.0/24".parse().unwrap(),
            reason: Arc::from("x"),
            origin: Origin::Detector,
            created_ms: 1_000,
            expires_ms: Some(61_000),
            shadow: true,
            node: None,
        };
        let e = kernel_entry(&rec, 1_000, 5_000_000_000);
        assert_eq!(e.expires_boot_ns, 5_000_000_000 + 60_000_000_000);
        assert_eq!(e.reason, reason::DETECTOR);
        assert_eq!(e.flags, BAN_FLAG_SHADOW);
        let permanent = BanRecord {
            expires_ms: None,
            shadow: false,
            ..rec
        };
        assert_eq!(kernel_entry(&permanent, 1_000, 7).expires_boot_ns, 0);
    }
}
