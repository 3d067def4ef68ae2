//! The shared store: Redis (or Redis Cluster) holding the limits, monthly quotas and bans of
//! every node, so that several nodes enforce one set of limits.
//!
//! # Layout
//! - [`settings`]: the `[store]` section and the tiers' failure modes;
//! - [`tls`]: the TLS files of `rediss://` connections, and failed handshakes in words;
//! - [`scripts`]: the Lua scripts, one atomic round trip per decision;
//! - [`limits`]: admissions and settlements against Redis;
//! - [`outbox`]: usage counted while Redis was out of reach, kept on disk until written back;
//! - [`bans`]: bans replicated to every node (pub/sub, and a full resync on every connect);
//! - [`keys`]: API keys replicated the same way.
//!
//! The connection is watched: a decision that fails or passes its time budget marks Redis
//! down, and from then on decisions do not wait for it (each tier's `on_store_failure`
//! decides) until a background probe reaches it again, writes back what was counted
//! meanwhile, and marks it up.
pub mod bans;
pub mod keys;
pub mod limits;
pub mod outbox;
pub mod scripts;
pub mod settings;
pub mod tls;

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redis::{
    FromRedisValue, RedisError, RedisResult,
    aio::{ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
};
use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{store::Store, usage::Today};

pub use settings::{Backend, FailureMode, StoreSettings};

use outbox::Outbox;
use scripts::Scripts;

/// A connection to Redis or to a Redis Cluster; clones share it (requests from many tasks are
/// pipelined on one socket per node).
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    pub async fn invoke<T: FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
    ) -> RedisResult<T> {
        match self.clone() {
            Conn::Single(mut c) => inv.invoke_async(&mut c).await,
            Conn::Cluster(mut c) => inv.invoke_async(&mut c).await,
        }
    }

    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> RedisResult<T> {
        match self.clone() {
            Conn::Single(mut c) => cmd.query_async(&mut c).await,
            Conn::Cluster(mut c) => cmd.query_async(&mut c).await,
        }
    }
}

/// Why the shared store could not decide.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreFailure {
    /// Marked down: nothing was sent.
    #[error("the shared store is marked down")]
    Down,
    /// No answer within the budget (the operation may still run, late).
    #[error("the shared store did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis is out of reach (the connection failed or was lost).
    #[error("the shared store failed: {0}")]
    Error(String),
    /// Redis answered with an error: it refused this operation, and is still up.
    #[error("the shared store refused the operation: {0}")]
    Refused(String),
}

/// Whether Redis answers, and what went wrong; counted for `aiguard status` and metrics.
#[derive(Debug, Default)]
pub struct Health {
    up: AtomicBool,
    /// Set while a probe that reached Redis writes back what waited for it (before the
    /// store is marked up); operations may use Redis meanwhile.
    probing: AtomicBool,
    /// Operations sent to Redis (decisions, settlements, write-backs, ban replication).
    pub operations: AtomicU64,
    pub errors: AtomicU64,
    pub timeouts: AtomicU64,
    /// Decisions taken without Redis (by a tier's failure mode).
    pub fallbacks: AtomicU64,
    pub recoveries: AtomicU64,
    pub outages: AtomicU64,
    last: Mutex<(Option<Instant>, Option<String>)>,
}

/// The shared store's state, for `aiguard status`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct SharedStatus {
    pub backend: String,
    pub node: String,
    pub up: bool,
    /// Seconds in the current state.
    pub state_secs: Option<u64>,
    pub last_error: Option<String>,
    #[serde(default)]
    pub operations: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub fallbacks: u64,
    pub outages: u64,
    pub recoveries: u64,
    /// Tokens counted while Redis was out of reach, not yet written back.
    pub outbox_tokens: i64,
    /// Settlements and cancellations waiting for Redis.
    pub retries_pending: u64,
    /// Settlements that rode with an admission instead of a call of their own.
    #[serde(default)]
    pub settlements_carried: u64,
    /// Settlements waiting on this node for an admission to carry them.
    #[serde(default)]
    pub settlements_waiting: u64,
    pub bans_replicated: u64,
}

impl Health {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn failures(&self) -> u64 {
        self.errors.load(Ordering::Relaxed) + self.timeouts.load(Ordering::Relaxed)
    }

    fn mark_down(&self, why: &str) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.1 = Some(why.to_owned());
        if self.up.swap(false, Ordering::AcqRel) {
            last.0 = Some(Instant::now());
            self.outages.fetch_add(1, Ordering::Relaxed);
            warn!(
                error = why,
                "shared store unreachable: tiers fall back to their on_store_failure mode until it answers again"
            );
        }
    }

    /// A start without Redis: an outage like any other (logged, counted, and ended by a
    /// recovery), though the store was never up.
    fn down_at_start(&self, why: &str) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        self.up.store(false, Ordering::Release);
        *last = (Some(Instant::now()), Some(why.to_owned()));
        self.outages.fetch_add(1, Ordering::Relaxed);
        warn!(
            error = why,
            "shared store unreachable at start: tiers fall back to their on_store_failure mode until it answers"
        );
    }

    /// Marks the store up; returns how long it was down, or `None` if it was up already.
    fn mark_up(&self) -> Option<Duration> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if self.up.swap(true, Ordering::AcqRel) {
            return None;
        }
        let down_for = last.0.map(|t| t.elapsed()).unwrap_or_default();
        last.0 = Some(Instant::now());
        Some(down_for)
    }
}

/// The shared store, as one node sees it.
pub struct Shared {
    settings: StoreSettings,
    /// What `rediss://` connections trust and present: the TLS files, read at start.
    tls: Option<redis::TlsCertificates>,
    node: Arc<str>,
    conn: RwLock<Option<Conn>>,
    pub scripts: Scripts,
    pub health: Health,
    pub outbox: Outbox,
    lease_seq: AtomicU64,
    /// Bumped on every (re)connection, so that ban replication resyncs.
    connected: watch::Sender<u64>,
    pub bans_replicated: AtomicU64,
    /// Settlements that rode with an admission.
    settlements_carried: AtomicU64,
    pending_unbans: bans::PendingUnbans,
    /// Settlements and cancellations Redis has not taken yet.
    retries: Mutex<Vec<limits::SettleCall>>,
    /// Settlements waiting to ride with the next admission of their tenant, key and model,
    /// by those levels' and month's keys.
    parked: Mutex<HashMap<Vec<String>, Vec<limits::Parked>>>,
}

impl Shared {
    /// Opens the outbox and connects if Redis answers; if it does not, the node starts anyway
    /// (tiers fall back) and keeps trying in [`Shared::maintain`].
    pub async fn open(settings: &StoreSettings, store: Store) -> Result<Arc<Self>, String> {
        let tls = settings.tls_certificates().map_err(|e| e.to_string())?;
        let outbox = Outbox::open(store.clone()).map_err(|e| e.to_string())?;
        let pending_unbans = bans::PendingUnbans::open(store).map_err(|e| e.to_string())?;
        let shared = Arc::new(Self {
            settings: settings.clone(),
            tls,
            node: settings.node_name().into(),
            conn: RwLock::new(None),
            scripts: Scripts::new(),
            health: Health::default(),
            outbox,
            lease_seq: AtomicU64::new(0),
            connected: watch::channel(0).0,
            bans_replicated: AtomicU64::new(0),
            settlements_carried: AtomicU64::new(0),
            pending_unbans,
            retries: Mutex::new(Vec::new()),
            parked: Mutex::new(HashMap::new()),
        });
        // A client for every URL now, so that a malformed one fails the start, not a probe.
        shared.client_config_check()?;
        match shared.try_connect().await {
            // Usage a previous run left in the outbox (it crashed, or stopped while Redis was
            // away) goes into the counters before this node decides with them.
            Ok(()) => match shared.catch_up().await {
                Ok(written) => {
                    shared.health.mark_up();
                    shared.connected.send_modify(|n| *n += 1);
                    info!(urls = ?shared.redacted_urls(), node = %shared.node, "shared store connected");
                    if written != 0 {
                        info!(
                            tokens = written,
                            "usage counted by a previous run without the shared store written back"
                        );
                    }
                }
                Err(e) => shared.health.down_at_start(&e),
            },
            Err(e) => shared.health.down_at_start(&e),
        }
        Ok(shared)
    }

    pub fn node(&self) -> &Arc<str> {
        &self.node
    }

    pub fn settings(&self) -> &StoreSettings {
        &self.settings
    }

    pub fn prefix(&self) -> &str {
        &self.settings.prefix
    }

    /// A name for one request's concurrency leases, unique across nodes and restarts.
    pub fn lease_id(&self) -> String {
        let n = self.lease_seq.fetch_add(1, Ordering::Relaxed);
        format!("{}:{}:{n}", self.node, std::process::id())
    }

    /// Receives a new number every time the connection is (re)established.
    pub fn connections(&self) -> watch::Receiver<u64> {
        self.connected.subscribe()
    }

    /// URLs without passwords, for logs.
    pub fn redacted_urls(&self) -> Vec<String> {
        self.settings.urls.iter().map(|u| redact(u)).collect()
    }

    fn client_config_check(&self) -> Result<(), String> {
        for u in &self.settings.urls {
            self.client(u)
                .map_err(|e| format!("store.urls: {}: {e}", redact(u)))?;
        }
        Ok(())
    }

    /// A client for one of the URLs: with the TLS files for a `rediss://` one.
    pub(crate) fn client(&self, url: &str) -> RedisResult<redis::Client> {
        match &self.tls {
            Some(certs) if settings::is_tls_url(url) => {
                redis::Client::build_with_tls(url, certs.clone())
            }
            _ => redis::Client::open(url),
        }
    }

    async fn try_connect(&self) -> Result<(), String> {
        let s = &self.settings;
        let conn = if s.is_cluster() {
            let mut builder = ClusterClient::builder(s.urls.clone())
                .connection_timeout(s.connect_timeout)
                .response_timeout(s.connect_timeout.max(s.decision_timeout))
                .retries(1);
            // Every node the seeds lead to is reached with them (the seeds are all rediss://).
            if let Some(certs) = &self.tls {
                builder = builder.certs(certs.clone());
            }
            let client = builder.build().map_err(|e| e.to_string())?;
            let c = tokio::time::timeout(s.connect_timeout, client.get_async_connection())
                .await
                .map_err(|_| format!("no answer within {:?}", s.connect_timeout))?
                .map_err(|e| tls::explain(&e))?;
            Conn::Cluster(c)
        } else {
            let client = self.client(&s.urls[0]).map_err(|e| e.to_string())?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(s.connect_timeout))
                .set_response_timeout(Some(s.connect_timeout.max(s.decision_timeout)))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(200));
            let c = ConnectionManager::new_lazy_with_config(client, config)
                .map_err(|e| e.to_string())?;
            Conn::Single(c)
        };
        // Prove it answers before marking it up.
        let pong: String = tokio::time::timeout(s.connect_timeout, conn.query(&redis::cmd("PING")))
            .await
            .map_err(|_| format!("no answer within {:?}", s.connect_timeout))?
            .map_err(|e| tls::explain(&e))?;
        if pong != "PONG" {
            return Err(format!("unexpected answer to PING: {pong}"));
        }
        // Not marked up yet: what waited for Redis goes in first (see `catch_up`).
        *self.conn.write().unwrap_or_else(|p| p.into_inner()) = Some(conn);
        Ok(())
    }

    fn conn(&self) -> Option<Conn> {
        self.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs one operation within `budget`, marking Redis down when it does not answer.
    pub async fn run<T, F, Fut>(&self, budget: Duration, f: F) -> Result<T, StoreFailure>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if !self.health.is_up() && !self.health.probing.load(Ordering::Acquire) {
            return Err(StoreFailure::Down);
        }
        let Some(conn) = self.conn() else {
            return Err(StoreFailure::Down);
        };
        self.health.operations.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(budget, f(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.health.errors.fetch_add(1, Ordering::Relaxed);
                let message = tls::explain(&e);
                if is_unreachable(&e) {
                    self.health.mark_down(&message);
                    Err(StoreFailure::Error(message))
                } else {
                    warn!(error = %message, "shared store refused an operation");
                    Err(StoreFailure::Refused(message))
                }
            }
            Err(_) => {
                self.health.timeouts.fetch_add(1, Ordering::Relaxed);
                self.health
                    .mark_down(&format!("no answer within {budget:?}"));
                Err(StoreFailure::Timeout(budget))
            }
        }
    }

    /// The budget of one request's decision.
    pub fn decision_budget(&self) -> Duration {
        self.settings.decision_timeout
    }

    /// The budget of work off the request path (settlements, write-back, resync).
    pub fn background_budget(&self) -> Duration {
        self.settings
            .connect_timeout
            .max(self.settings.decision_timeout)
    }

    /// Key of a tenant's state: the tenant is the Cluster hash tag, so one script sees it all.
    pub fn tenant_key(&self, tenant: &str, what: &str) -> String {
        format!("{}{{{tenant}}}:{what}", self.settings.prefix)
    }

    /// A tenant's token counter for `month` (`YYYY-MM`).
    pub fn month_key(&self, tenant: &str, month: &str) -> String {
        self.tenant_key(tenant, &format!("q:{month}"))
    }

    /// A tenant's tokens this month as Redis counts them (settled and reserved in flight).
    pub async fn month_used(&self, tenant: &str, today: &Today) -> Result<u64, StoreFailure> {
        let key = self.month_key(tenant, &today.month());
        let used: Option<i64> = self
            .run(self.background_budget(), |c| async move {
                c.query(redis::cmd("GET").arg(&key)).await
            })
            .await?;
        Ok(used.unwrap_or(0).max(0) as u64)
    }

    /// Keeps the connection: while Redis is down, probes it every `retry_interval`; when it
    /// answers, writes back the outbox, then marks it up (so that decisions see the usage
    /// counted meanwhile). While up, writes back what failed to settle.
    pub async fn maintain(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.settings.retry_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Settlements that found no admission to ride with go alone within a quarter of
        // their delay past it (none waits when the delay is 0).
        let parking = !self.settings.settle_delay.is_zero();
        let mut overdue =
            tokio::time::interval((self.settings.settle_delay / 4).max(Duration::from_millis(5)));
        overdue.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                _ = overdue.tick(), if parking => {
                    let calls = self.take_overdue(false);
                    if !calls.is_empty() {
                        self.send_settlements(calls);
                    }
                    continue;
                }
                _ = tick.tick() => {}
            }
            if self.health.is_up() {
                if self.retries_pending() > 0 {
                    self.run_retries().await;
                }
                if !self.outbox.is_empty() {
                    self.write_back().await;
                }
                continue;
            }
            if let Err(e) = self.probe().await {
                let mut last = self.health.last.lock().unwrap_or_else(|p| p.into_inner());
                last.1 = Some(e);
                continue;
            }
            let written = match self.catch_up().await {
                Ok(written) => written,
                // Redis failed again mid-way: stay down, try again next tick.
                Err(_) => continue,
            };
            // Only this loop marks a store that was down up (whether the outage began at
            // start or later): every recovery is logged and counted.
            if let Some(down_for) = self.health.mark_up() {
                self.health.recoveries.fetch_add(1, Ordering::Relaxed);
                info!(
                    down_for = ?down_for,
                    "shared store reachable again: limits are shared again"
                );
            }
            if written != 0 {
                info!(
                    tokens = written,
                    "usage counted while the shared store was unreachable written back"
                );
            }
            self.connected.send_modify(|n| *n += 1);
        }
        // Last chance: written back now, or (the outbox) kept on disk for the next start.
        for call in self.take_overdue(true) {
            self.queue(call);
        }
        if self.health.is_up() {
            self.run_retries().await;
            if !self.outbox.is_empty() {
                self.write_back().await;
            }
        }
        if let Err(e) = self.outbox.persist() {
            warn!(error = %e, "keeping the outbox on disk failed");
        }
    }

    /// With Redis answering again (or at start), and before it is marked up, runs what
    /// waited for it: cancellations and settlements first (so that admissions which ran late
    /// are undone before new decisions see the counters), then the outbox. Returns the tokens
    /// written back, or why Redis failed mid-way.
    async fn catch_up(&self) -> Result<i64, String> {
        let written = self.outbox.total();
        let failures = self.health.failures();
        self.health.probing.store(true, Ordering::Release);
        if self.retries_pending() > 0 {
            self.run_retries().await;
        }
        if !self.outbox.is_empty() {
            self.write_back().await;
        }
        self.health.probing.store(false, Ordering::Release);
        if self.health.failures() != failures {
            let last = self.health.last.lock().unwrap_or_else(|p| p.into_inner());
            return Err(last
                .1
                .clone()
                .unwrap_or_else(|| "the shared store failed".into()));
        }
        Ok(written - self.outbox.total())
    }

    async fn probe(&self) -> Result<(), String> {
        let Some(conn) = self.conn() else {
            return self.try_connect().await;
        };
        let budget = self.background_budget();
        match tokio::time::timeout(budget, conn.query::<String>(&redis::cmd("PING"))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(tls::explain(&e)),
            Err(_) => Err(format!("no answer within {budget:?}")),
        }
    }

    /// Writes the outbox's usage into the monthly counters, tenant by tenant, each write once
    /// (its id makes a retry after a timeout harmless).
    async fn write_back(&self) {
        let attempts = match self.outbox.attempts() {
            Ok(a) => a,
            Err(e) => {
                // Unrecorded, a write could count twice after a crash: not sent.
                warn!(error = %e, "outbox write-back postponed: the embedded store refused it");
                return;
            }
        };
        for (tenant, month, tokens, id) in attempts {
            let key = self.month_key(&tenant, &month);
            let id_key = self.tenant_key(&tenant, &format!("w:{}:{id}", self.node));
            let Some(gone) = month_gone_ms(&month) else {
                self.outbox.done(&tenant, &month);
                continue;
            };
            let script = &self.scripts.add_usage;
            let done = self
                .run(self.background_budget(), |c| async move {
                    let mut inv = script.prepare_invoke();
                    inv.key(&key).key(&id_key).arg(tokens).arg(gone);
                    c.invoke::<i64>(&inv).await
                })
                .await;
            match done {
                Ok(_) => self.outbox.done(&tenant, &month),
                Err(_) => break,
            }
        }
    }

    pub fn status(&self) -> SharedStatus {
        let h = &self.health;
        let last = h.last.lock().unwrap_or_else(|p| p.into_inner());
        SharedStatus {
            backend: if self.settings.is_cluster() {
                "redis-cluster".into()
            } else {
                "redis".into()
            },
            node: self.node.to_string(),
            up: h.is_up(),
            state_secs: last.0.map(|t| t.elapsed().as_secs()),
            last_error: last.1.clone(),
            operations: h.operations.load(Ordering::Relaxed),
            errors: h.errors.load(Ordering::Relaxed),
            timeouts: h.timeouts.load(Ordering::Relaxed),
            fallbacks: h.fallbacks.load(Ordering::Relaxed),
            outages: h.outages.load(Ordering::Relaxed),
            recoveries: h.recoveries.load(Ordering::Relaxed),
            outbox_tokens: self.outbox.total(),
            retries_pending: self.retries_pending() as u64,
            settlements_carried: self.settlements_carried.load(Ordering::Relaxed),
            settlements_waiting: self.parked_pending() as u64,
            bans_replicated: self.bans_replicated.load(Ordering::Relaxed),
        }
    }
}

/// Whether an error means Redis is out of reach (rather than that it refused one command).
fn is_unreachable(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(
            e.kind(),
            redis::ErrorKind::Server(
                redis::ServerErrorKind::BusyLoading
                    | redis::ServerErrorKind::ClusterDown
                    | redis::ServerErrorKind::MasterDown
                    | redis::ServerErrorKind::TryAgain
            )
        )
}

/// When a month's counter may go: 35 days after the month ends (so that `aiguard quota` and
/// late settlements still find it), as unix ms.
pub fn month_gone_ms(month: &str) -> Option<u64> {
    let (y, m) = crate::usage::parse_month(month)?;
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let first = time::Date::from_calendar_date(y, time::Month::try_from(m).ok()?, 1).ok()?;
    let end = first.midnight().assume_utc().unix_timestamp();
    Some((end as u64 + 35 * 86_400) * 1000)
}

/// A URL with its password replaced, for logs and status.
pub fn redact(url: &str) -> String {
    match redis::parse_redis_url(url) {
        Some(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Some(u) => u.to_string(),
        None => "(unparseable URL)".into(),
    }
}
