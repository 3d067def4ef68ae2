//! The usage ledger: what every tenant, key and model used per day (requests, prompt and
//! completion tokens), and each tenant's monthly token total, kept so that a crash loses none
//! of it.
//!
//! Each settled request is appended to a journal segment (a shared file mapping, see
//! [`journal`]) before its usage counts anywhere else: the page cache keeps it through a
//! SIGKILL of the daemon. A flusher
//! moves the journal into the store (one redb transaction per interval, which also records the
//! journal generation it applied) and deletes the file; on start-up, journals newer than the
//! last applied generation are replayed. So a record is in the store exactly once, whenever
//! the daemon dies.
mod journal;

use std::{
    cell::RefCell,
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use journal::Segment;
use rustc_hash::FxHashMap;

use redb::{ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize};
use time::{Date, Month, OffsetDateTime};

use crate::store::{Store, StoreError};

const USAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("usage.v1");
const MONTHLY: TableDefinition<&str, u64> = TableDefinition::new("monthly_tokens.v1");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta.v1");
const APPLIED: &str = "usage_journal_applied";

/// The calendar as the ledger and the quota see it: UTC days and months.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Today {
    pub date: Date,
}

impl Today {
    pub fn now() -> Self {
        Self {
            date: OffsetDateTime::now_utc().date(),
        }
    }

    /// The UTC day of `unix_ms`, and the time from then to the end of its month; the
    /// calendar arithmetic is done once a day per thread.
    pub fn at(unix_ms: u64) -> (Self, Duration) {
        thread_local! {
            static CACHED: RefCell<Option<(u64, Today, u64)>> = const { RefCell::new(None) };
        }
        const DAY_MS: u64 = 86_400_000;
        let day = unix_ms / DAY_MS;
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            let (today, month_end_ms) = match *c {
                Some((d, t, end)) if d == day => (t, end),
                _ => {
                    let at = OffsetDateTime::from_unix_timestamp((day * 86_400) as i64)
                        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
                    let today = Today { date: at.date() };
                    let end = today.month_end().unix_timestamp().max(0) as u64 * 1000;
                    *c = Some((day, today, end));
                    (today, end)
                }
            };
            (
                today,
                Duration::from_millis(month_end_ms.saturating_sub(unix_ms)),
            )
        })
    }

    /// 00:00 UTC on the 1st of the next month.
    fn month_end(&self) -> OffsetDateTime {
        let (y, m) = match self.date.month() {
            Month::December => (self.date.year() + 1, Month::January),
            m => (self.date.year(), m.next()),
        };
        Date::from_calendar_date(y, m, 1)
            .expect("the 1st exists")
            .midnight()
            .assume_utc()
    }

    /// `YYYY-MM-DD`.
    pub fn day(&self) -> String {
        format!(
            "{:04}-{:02}-{:02}",
            self.date.year(),
            u8::from(self.date.month()),
            self.date.day()
        )
    }

    /// `YYYY-MM`.
    pub fn month(&self) -> String {
        format!("{:04}-{:02}", self.date.year(), u8::from(self.date.month()))
    }

    /// Months since year 0, for cheap comparisons.
    pub fn month_index(&self) -> u32 {
        (self.date.year().max(0) as u32) * 12 + u32::from(u8::from(self.date.month())) - 1
    }

    /// From now until the month ends (00:00 UTC on the 1st of the next).
    pub fn month_left(&self) -> Duration {
        let left = self.month_end() - OffsetDateTime::now_utc();
        Duration::try_from(left).unwrap_or_default()
    }
}

/// Parses `YYYY-MM` (for `aiguard usage --month`).
pub fn parse_month(s: &str) -> Option<(i32, u8)> {
    let (y, m) = s.split_once('-')?;
    let (y, m): (i32, u8) = (y.parse().ok()?, m.parse().ok()?);
    (y.to_string().len() == 4 && m.to_string().len() <= 2 && s.len() == 7 && (1..=12).contains(&m))
        .then_some((y, m))
}

/// What one day's use of one model by one key came to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.requests += o.requests;
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
    }

    fn encode(&self) -> [u8; 24] {
        let mut b = [0; 24];
        b[..8].copy_from_slice(&self.requests.to_le_bytes());
        b[8..16].copy_from_slice(&self.prompt_tokens.to_le_bytes());
        b[16..].copy_from_slice(&self.completion_tokens.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let f = |r: std::ops::Range<usize>| Some(u64::from_le_bytes(b.get(r)?.try_into().ok()?));
        Some(Self {
            requests: f(0..8)?,
            prompt_tokens: f(8..16)?,
            completion_tokens: f(16..24)?,
        })
    }
}

/// One settled request, as journalled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub day: String,
    pub tenant: String,
    pub key: String,
    pub model: String,
    #[serde(flatten)]
    pub counts: Counts,
}

impl UsageRecord {
    fn row_key(&self) -> String {
        let mut k = String::new();
        self.as_usage().row_key_into(&mut k);
        k
    }

    fn as_usage(&self) -> Usage<'_> {
        Usage {
            day: &self.day,
            tenant: &self.tenant,
            key: &self.key,
            model: &self.model,
            counts: self.counts,
        }
    }
}

/// One settled request, borrowed: what the gateway hands the ledger.
#[derive(Debug, Clone, Copy)]
pub struct Usage<'a> {
    /// `YYYY-MM-DD`, UTC (see [`with_today`]).
    pub day: &'a str,
    pub tenant: &'a str,
    pub key: &'a str,
    pub model: &'a str,
    pub counts: Counts,
}

impl Usage<'_> {
    fn row_key_into(&self, out: &mut String) {
        out.clear();
        let _ = write!(
            out,
            "{}\t{}\t{}\t{}",
            self.day, self.tenant, self.key, self.model
        );
    }

    /// The journal line: the JSON a [`UsageRecord`] deserializes from, written directly.
    fn journal_line(&self) -> Vec<u8> {
        let mut line = Vec::with_capacity(
            112 + self.day.len() + self.tenant.len() + self.key.len() + self.model.len(),
        );
        for (i, (name, value)) in [
            ("day", self.day),
            ("tenant", self.tenant),
            ("key", self.key),
            ("model", self.model),
        ]
        .into_iter()
        .enumerate()
        {
            line.extend_from_slice(if i == 0 { b"{\"" } else { b",\"" });
            line.extend_from_slice(name.as_bytes());
            line.extend_from_slice(b"\":");
            serde_json::to_writer(&mut line, value).expect("a string serializes");
        }
        let mut n = itoa::Buffer::new();
        for (name, value) in [
            ("requests", self.counts.requests),
            ("prompt_tokens", self.counts.prompt_tokens),
            ("completion_tokens", self.counts.completion_tokens),
        ] {
            line.extend_from_slice(b",\"");
            line.extend_from_slice(name.as_bytes());
            line.extend_from_slice(b"\":");
            line.extend_from_slice(n.format(value).as_bytes());
        }
        line.extend_from_slice(b"}\n");
        line
    }

    fn to_record(self) -> UsageRecord {
        UsageRecord {
            day: self.day.to_owned(),
            tenant: self.tenant.to_owned(),
            key: self.key.to_owned(),
            model: self.model.to_owned(),
            counts: self.counts,
        }
    }
}

/// Calls `f` with today's date (UTC) as `YYYY-MM-DD`, formatted once a day per thread.
pub fn with_today<R>(f: impl FnOnce(&str) -> R) -> R {
    thread_local! {
        static TODAY: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) };
    }
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let day = secs.div_euclid(86_400);
    TODAY.with(|t| {
        let mut t = t.borrow_mut();
        if t.0 != day {
            let date = OffsetDateTime::from_unix_timestamp(day * 86_400)
                .map(|d| Today { date: d.date() })
                .unwrap_or_else(|_| Today::now());
            *t = (day, date.day());
        }
        f(&t.1)
    })
}

/// A row of `aiguard usage`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRow {
    pub day: String,
    pub tenant: String,
    pub key: String,
    pub model: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Filled in by the gateway from the configured prices.
    pub cost: f64,
}

/// Why the ledger could not record or report.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("usage journal {path}: {source}")]
    Journal {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

type Batch = FxHashMap<String, (UsageRecord, Counts)>;

struct Journal {
    segment: Segment,
    /// The oldest segment whose records are not in the store yet.
    first_unflushed: u64,
    pending: Batch,
    /// Where a record's row key is built to look it up in `pending` (no allocation when the
    /// row is there already).
    row_key: String,
    /// A batch (of segments `first..=last`) whose commit failed: retried before the next one.
    retry: Option<(u64, u64, Batch)>,
}

/// The usage ledger.
pub struct Ledger {
    store: Store,
    dir: PathBuf,
    journal: Mutex<Journal>,
    /// One flush at a time (the flusher task and `aiguard usage`).
    flushing: Mutex<()>,
}

fn journal_err(path: &Path) -> impl FnOnce(std::io::Error) -> LedgerError + '_ {
    move |source| LedgerError::Journal {
        path: path.to_owned(),
        source,
    }
}

impl Ledger {
    /// Opens the ledger: replays journals a crash left behind into the store, then starts a new
    /// journal in `dir`.
    pub fn open(store: Store, dir: &Path) -> Result<(Self, ReplayReport), LedgerError> {
        fs::create_dir_all(dir).map_err(journal_err(dir))?;
        store.write(|txn| {
            txn.open_table(USAGE)?;
            txn.open_table(MONTHLY)?;
            txn.open_table(META)?;
            Ok(())
        })?;
        let applied = store.read(|txn| {
            Ok(txn
                .open_table(META)?
                .get(APPLIED)?
                .map(|v| v.value())
                .unwrap_or(0))
        })?;
        let mut generations = Vec::new();
        for entry in fs::read_dir(dir).map_err(journal_err(dir))? {
            let entry = entry.map_err(journal_err(dir))?;
            let name = entry.file_name();
            if let Some(g) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".log"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                generations.push(g);
            }
        }
        generations.sort_unstable();
        let mut report = ReplayReport::default();
        let mut batch = Batch::default();
        for &g in generations.iter().filter(|g| **g > applied) {
            let path = journal::path(dir, g);
            let bytes = journal::read(&path).map_err(journal_err(&path))?;
            for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                // A torn last line (the daemon died while copying it) is skipped: its request
                // never finished settling.
                match serde_json::from_slice::<UsageRecord>(line) {
                    Ok(r) => {
                        report.records += 1;
                        merge(&mut batch, r);
                    }
                    Err(_) => report.torn_lines += 1,
                }
            }
        }
        let last = generations.last().copied().unwrap_or(0).max(applied);
        if !batch.is_empty() {
            commit(&store, &batch, last)?;
        }
        for g in generations {
            let path = journal::path(dir, g);
            fs::remove_file(&path).map_err(journal_err(&path))?;
        }
        let generation = last + 1;
        let segment = Segment::create(dir, generation)
            .map_err(journal_err(&journal::path(dir, generation)))?;
        Ok((
            Self {
                store,
                dir: dir.to_owned(),
                journal: Mutex::new(Journal {
                    segment,
                    first_unflushed: generation,
                    pending: Batch::default(),
                    row_key: String::new(),
                    retry: None,
                }),
                flushing: Mutex::new(()),
            },
            report,
        ))
    }

    /// Records a settled request: journalled before this returns.
    pub fn record(&self, usage: Usage<'_>) -> Result<(), LedgerError> {
        let line = usage.journal_line();
        // A std mutex: a copy into the mapping and a map update, never an await.
        let mut j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        if !j.segment.append(&line) {
            // Full: the next segment; the flusher commits every segment up to the current one.
            let next = j.segment.generation + 1;
            j.segment = Segment::create(&self.dir, next)
                .map_err(journal_err(&journal::path(&self.dir, next)))?;
            if !j.segment.append(&line) {
                return Err(LedgerError::Journal {
                    path: j.segment.path.clone(),
                    source: std::io::Error::other("a usage record larger than a journal segment"),
                });
            }
        }
        let Journal {
            pending, row_key, ..
        } = &mut *j;
        usage.row_key_into(row_key);
        match pending.get_mut(row_key.as_str()) {
            Some((_, counts)) => counts.add(&usage.counts),
            None => {
                pending.insert(row_key.clone(), (usage.to_record(), usage.counts));
            }
        }
        Ok(())
    }

    /// Moves the journal's records into the store. Returns how many rows it wrote.
    pub fn flush(&self) -> Result<usize, LedgerError> {
        let _one = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        let (first, last, batch) = {
            let mut j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(retry) = j.retry.take() {
                retry
            } else {
                if j.pending.is_empty() {
                    return Ok(0);
                }
                let last = j.segment.generation;
                j.segment = Segment::create(&self.dir, last + 1)
                    .map_err(journal_err(&journal::path(&self.dir, last + 1)))?;
                let first = std::mem::replace(&mut j.first_unflushed, last + 1);
                (first, last, std::mem::take(&mut j.pending))
            }
        };
        match commit(&self.store, &batch, last) {
            Ok(()) => {
                for g in first..=last {
                    let _ = fs::remove_file(journal::path(&self.dir, g));
                }
                Ok(batch.len())
            }
            Err(e) => {
                self.journal.lock().unwrap_or_else(|p| p.into_inner()).retry =
                    Some((first, last, batch));
                Err(e.into())
            }
        }
    }

    /// Each tenant's token total for `month` (`YYYY-MM`) as stored (flush first for the
    /// latest).
    pub fn monthly_totals(&self, month: &str) -> Result<BTreeMap<String, u64>, LedgerError> {
        let prefix = format!("{month}\t");
        Ok(self.store.read(|txn| {
            let t = txn.open_table(MONTHLY)?;
            let mut out = BTreeMap::new();
            for row in t.range(prefix.as_str()..)? {
                let (k, v) = row?;
                let Some(tenant) = k.value().strip_prefix(&prefix) else {
                    break;
                };
                out.insert(tenant.to_owned(), v.value());
            }
            Ok(out)
        })?)
    }

    /// Usage rows of `month` (`YYYY-MM`), optionally of one tenant, after a flush.
    pub fn report(&self, month: &str, tenant: Option<&str>) -> Result<Vec<UsageRow>, LedgerError> {
        self.flush()?;
        let prefix = format!("{month}-");
        let mut bad = None;
        let rows = self.store.read(|txn| {
            let t = txn.open_table(USAGE)?;
            let mut out = Vec::new();
            for row in t.range(prefix.as_str()..)? {
                let (k, v) = row?;
                let key = k.value();
                if !key.starts_with(&prefix) {
                    break;
                }
                let parts: Vec<&str> = key.split('\t').collect();
                let (Some(counts), [day, t, key_id, model]) =
                    (Counts::decode(v.value()), &parts[..])
                else {
                    bad = Some(format!("row {key:?}"));
                    continue;
                };
                if tenant.is_some_and(|want| want != *t) {
                    continue;
                }
                out.push(UsageRow {
                    day: (*day).to_owned(),
                    tenant: (*t).to_owned(),
                    key: (*key_id).to_owned(),
                    model: (*model).to_owned(),
                    requests: counts.requests,
                    prompt_tokens: counts.prompt_tokens,
                    completion_tokens: counts.completion_tokens,
                    cost: 0.0,
                });
            }
            Ok(out)
        })?;
        if let Some(reason) = bad {
            return Err(self.store.decode_error("usage", reason).into());
        }
        Ok(rows)
    }
}

/// What start-up found in the journal.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplayReport {
    pub records: u64,
    pub torn_lines: u64,
}

fn merge(batch: &mut Batch, r: UsageRecord) {
    let counts = r.counts;
    batch
        .entry(r.row_key())
        .or_insert_with(|| (r, Counts::default()))
        .1
        .add(&counts);
}

fn commit(store: &Store, batch: &Batch, generation: u64) -> Result<(), StoreError> {
    store.write(|txn| {
        let mut usage = txn.open_table(USAGE)?;
        let mut monthly = txn.open_table(MONTHLY)?;
        for (row, (r, add)) in batch {
            let mut c = usage
                .get(row.as_str())?
                .and_then(|v| Counts::decode(v.value()))
                .unwrap_or_default();
            c.add(add);
            usage.insert(row.as_str(), c.encode().as_slice())?;
            let month_key = format!("{}\t{}", &r.day[..7.min(r.day.len())], r.tenant);
            let total = monthly
                .get(month_key.as_str())?
                .map(|v| v.value())
                .unwrap_or(0);
            monthly.insert(
                month_key.as_str(),
                total + add.prompt_tokens + add.completion_tokens,
            )?;
        }
        txn.open_table(META)?.insert(APPLIED, generation)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(day: &str, tenant: &str, p: u64, c: u64) -> UsageRecord {
        UsageRecord {
            day: day.into(),
            tenant: tenant.into(),
            key: "key_1".into(),
            model: "m".into(),
            counts: Counts {
                requests: 1,
                prompt_tokens: p,
                completion_tokens: c,
            },
        }
    }

    #[test]
    fn a_journal_line_is_the_json_of_its_record_whatever_the_names_hold() {
        let mut r = rec("2026-12-04", "ac\"me\\ \u{1}t", 9, 2);
        r.model = "gpt-4o\nmini".into();
        let line = r.as_usage().journal_line();
        assert_eq!(line.last(), Some(&b'\n'));
        assert!(!line[..line.len() - 1].contains(&b'\n'), "one line");
        let back: UsageRecord = serde_json::from_slice(&line).expect("decodes");
        assert_eq!(back, r);
        let mut serde_line = serde_json::to_vec(&r).expect("encodes");
        serde_line.push(b'\n');
        assert_eq!(line, serde_line, "the format journals always had");
    }

    #[test]
    fn the_day_and_the_month_left_come_from_one_clock_reading() {
        // 2026-12-31T23:59:59.500Z: half a second of December left.
        let ms = 1_798_761_599_500;
        let (today, left) = Today::at(ms);
        assert_eq!(today.day(), "2026-12-31");
        assert_eq!(left, Duration::from_millis(500));
        // The next day, from the cache's point of view a new one.
        let (today, left) = Today::at(ms + 1000);
        assert_eq!(today.day(), "2027-01-01");
        assert_eq!(
            left,
            Duration::from_secs(31 * 86_400) - Duration::from_millis(500)
        );
        let now = crate::bans::now_ms();
        assert_eq!(Today::at(now).0, Today::now());
    }

    #[test]
    fn today_is_the_utc_date() {
        assert_eq!(with_today(str::to_owned), Today::now().day());
    }

    #[test]
    fn journal_survives_a_crash_and_is_applied_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let journal = dir.path().join("journal");
        {
            let store = Store::open(&state).expect("store");
            let (ledger, _) = Ledger::open(store, &journal).expect("ledger");
            ledger
                .record(rec("2026-12-01", "acme", 10, 5).as_usage())
                .expect("record");
            ledger.flush().expect("flush");
            ledger
                .record(rec("2026-12-02", "acme", 1, 1).as_usage())
                .expect("record");
            // Dropped without a flush: as if killed. A torn line follows.
            let mut j = ledger.journal.lock().expect("lock");
            assert!(j.segment.append(b"{\"day\":\"2026-"), "torn write");
        }
        let store = Store::open(&state).expect("store");
        let (ledger, report) = Ledger::open(store, &journal).expect("ledger");
        assert_eq!(
            report,
            ReplayReport {
                records: 1,
                torn_lines: 1
            }
        );
        assert_eq!(
            ledger.monthly_totals("2026-12").expect("totals")["acme"],
            17
        );
        let rows = ledger.report("2026-12", Some("acme")).expect("report");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].prompt_tokens, 10);
        // Opening again applies nothing twice.
        drop(ledger);
        let (ledger, report) =
            Ledger::open(Store::open(&state).expect("store"), &journal).expect("ledger");
        assert_eq!(report.records, 0);
        assert_eq!(
            ledger.monthly_totals("2026-12").expect("totals")["acme"],
            17
        );
        assert!(ledger.report("2026-11", None).expect("report").is_empty());
    }

    #[test]
    fn a_full_segment_rolls_over_and_every_segment_is_replayed_or_flushed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let journal = dir.path().join("journal");
        let line = serde_json::to_vec(&rec("2026-12-01", "acme", 1, 1)).expect("json");
        // Enough records for more than two segments.
        let n = (2 * journal::SEGMENT_BYTES / (line.len() + 1) + 100) as u64;
        {
            let (ledger, _) =
                Ledger::open(Store::open(&state).expect("store"), &journal).expect("ledger");
            for _ in 0..n {
                ledger
                    .record(rec("2026-12-01", "acme", 1, 1).as_usage())
                    .expect("record");
            }
            assert!(ledger.journal.lock().expect("lock").segment.generation >= 3);
            // Killed before any flush: every segment must be replayed.
        }
        let (ledger, report) =
            Ledger::open(Store::open(&state).expect("store"), &journal).expect("ledger");
        assert_eq!(report.records, n);
        assert_eq!(
            ledger.monthly_totals("2026-12").expect("totals")["acme"],
            2 * n
        );
        // Rolled over again, then flushed: one commit takes every segment, and removes them.
        for _ in 0..n {
            ledger
                .record(rec("2026-12-02", "acme", 1, 0).as_usage())
                .expect("record");
        }
        ledger.flush().expect("flush");
        assert_eq!(
            ledger.monthly_totals("2026-12").expect("totals")["acme"],
            3 * n
        );
        let files = fs::read_dir(&journal).expect("dir").count();
        assert_eq!(files, 1, "only the segment being written is left");
    }

    #[test]
    fn months_parse_strictly() {
        assert_eq!(parse_month("2026-12"), Some((2026, 12)));
        for bad in ["2026-13", "2026-1", "26-12", "2026/12", ""] {
            assert_eq!(parse_month(bad), None, "{bad}");
        }
    }
}
