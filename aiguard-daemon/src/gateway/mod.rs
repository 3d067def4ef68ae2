//! The request path: a reverse proxy in front of an OpenAI-compatible (or any HTTP) inference
//! server that knows API keys, tenants and tiers, and enforces their limits.
//!
//! # Layout
//! - this module: the shared [`Gateway`] state, listeners, connections, reload, shutdown;
//! - [`http1`]: the HTTP/1.1 the gateway speaks, both to clients and to the upstream;
//! - [`handler`]: one request, from key to upstream and back;
//! - [`metered`]: the response body on its way out: usage read from JSON or SSE, quota cut-off,
//!   settlement;
//! - [`decide`]: where limits are decided (memory, or the shared store and its fallback);
//! - [`answers`]: OpenAI-style errors and rate-limit headers;
//! - [`client_addr`]: the client's address behind trusted proxies (X-Forwarded-For, PROXY);
//! - [`priority`]: the upstream's slots shared across tiers by weight when it is saturated.
pub mod answers;
pub mod client_addr;
pub mod decide;
mod handler;
pub mod http1;
mod metered;
pub mod priority;

use std::{
    net::SocketAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tracing::{debug, info, warn};

use crate::{
    config::Config,
    keys::KeyRing,
    limits::Limiter,
    tiers::{ClientAddressSource, GatewaySettings, TierTable},
    tokens::Tokenizer,
    usage::Ledger,
};
use http1::{
    server::Timeouts,
    upstream::{Pool, PoolSettings, Upstream},
};

/// How long in-flight requests may take to finish once shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle upstream connections: how long one is kept, how many per upstream, how often the
/// expired ones are closed.
const UPSTREAM_IDLE: Duration = Duration::from_secs(90);
const UPSTREAM_MAX_IDLE: usize = 1024;
const UPSTREAM_SWEEP: Duration = Duration::from_secs(30);

/// The parts of the configuration a reload may change.
#[derive(Debug, Clone)]
pub struct Policy {
    pub settings: GatewaySettings,
    pub tiers: TierTable,
    upstreams: Vec<Upstream>,
}

impl Policy {
    pub fn from_config(config: &Config) -> Self {
        let upstreams = config
            .gateway
            .upstreams
            .iter()
            .map(|u| {
                let uri: http::Uri = u.parse().expect("validated upstream URL");
                Upstream::from_uri(&uri).expect("validated upstream URL")
            })
            .collect();
        Self {
            settings: config.gateway.clone(),
            tiers: config.tier_table(),
            upstreams,
        }
    }
}

/// Counters the admin API reports (metrics build on them).
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub allowed: AtomicU64,
    pub rate_limited: AtomicU64,
    pub quota_exceeded: AtomicU64,
    pub unauthorized: AtomicU64,
    pub bad_requests: AtomicU64,
    pub upstream_errors: AtomicU64,
    /// Refused because the shared store could not decide and the tier fails closed.
    pub store_unavailable: AtomicU64,
    /// Shed because the tier's queue for an upstream slot was full or its wait ran out.
    pub shed: AtomicU64,
    /// Told to show a proof of work (428).
    pub challenged: AtomicU64,
    /// A suspended key (403).
    pub suspended: AtomicU64,
    /// Refused by a prompt rule (400).
    pub prompt_rejected: AtomicU64,
    pub in_flight: AtomicU64,
}

/// The gateway's shared state: one per daemon, used by every connection.
pub struct Gateway {
    policy: RwLock<Arc<Policy>>,
    pub keys: Arc<KeyRing>,
    /// In-memory limits: all of them with the embedded store; the fallback with Redis.
    pub limiter: Limiter,
    pub decider: decide::Decider,
    pub ledger: Arc<Ledger>,
    tokenizer: Tokenizer,
    /// Kept-alive connections to the upstreams.
    pool: Pool,
    next_upstream: AtomicUsize,
    pub counters: Counters,
    /// The upstream's slots, when `gateway.upstream_slots` is set.
    pub scheduler: priority::Scheduler,
    /// Abuse detection: detectors, their responder, challenges, prompt rules.
    pub detection: Arc<crate::detect::Detection>,
    /// Requests and tokens by tier, in-flight requests, upstream latency (`/metrics`).
    pub metrics: crate::metrics::GatewayMetrics,
}

impl Gateway {
    /// Builds the gateway; `preload` are this month's stored token totals per tenant.
    pub fn new(
        config: &Config,
        keys: Arc<KeyRing>,
        ledger: Arc<Ledger>,
        tokenizer: Tokenizer,
        shared: Option<Arc<crate::shared::Shared>>,
        store: crate::store::Store,
    ) -> Result<Self, crate::usage::LedgerError> {
        let policy = Policy::from_config(config);
        let detection = Arc::new(crate::detect::Detection::new(
            &config.detect,
            keys.clone(),
            store,
        )?);
        let pool = Pool::new(PoolSettings {
            connect_timeout: policy.settings.upstream_connect_timeout,
            idle_timeout: UPSTREAM_IDLE,
            max_idle: UPSTREAM_MAX_IDLE,
        });
        let limiter = Limiter::new();
        // With a shared store the monthly counters live in Redis; this node's own totals
        // would only be its share.
        if shared.is_none() {
            let today = crate::usage::Today::now();
            for (tenant, used) in ledger.monthly_totals(&today.month())? {
                limiter.preload_month(&tenant, today.month_index(), used);
            }
        }
        let metrics =
            crate::metrics::GatewayMetrics::new(policy.tiers.tiers.keys().map(String::as_str));
        let scheduler =
            priority::Scheduler::new(policy.settings.upstream_slots.unwrap_or(0), &policy.tiers);
        Ok(Self {
            metrics,
            policy: RwLock::new(Arc::new(policy)),
            keys,
            limiter,
            decider: decide::Decider::new(shared),
            ledger,
            tokenizer,
            pool,
            next_upstream: AtomicUsize::new(0),
            counters: Counters::default(),
            scheduler,
            detection,
        })
    }

    /// The policy in force now. Requests keep the one they started with.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Swaps in a new (already validated) configuration; returns what needs a restart to
    /// change, if anything did.
    pub fn reload(&self, config: &Config) -> Vec<String> {
        let new = Policy::from_config(config);
        self.metrics
            .add_tiers(new.tiers.tiers.keys().map(String::as_str));
        let mut needs_restart = Vec::new();
        let mut slot = self.policy.write().unwrap_or_else(|p| p.into_inner());
        let old = &slot.settings;
        if old.listen != new.settings.listen {
            needs_restart.push("gateway.listen".to_owned());
        }
        if old.tokenizer != new.settings.tokenizer {
            needs_restart.push("gateway.tokenizer".to_owned());
        }
        self.pool
            .set_connect_timeout(new.settings.upstream_connect_timeout);
        self.scheduler
            .configure(new.settings.upstream_slots.unwrap_or(0), &new.tiers);
        self.detection.configure(&config.detect);
        *slot = Arc::new(new);
        needs_restart
    }

    fn upstream<'p>(&self, policy: &'p Policy) -> &'p Upstream {
        let i = self.next_upstream.fetch_add(1, Ordering::Relaxed);
        &policy.upstreams[i % policy.upstreams.len()]
    }
}

/// The gateway's listeners, bound before the daemon reports ready (so a port in use fails
/// start-up with a clear error, and `--listen 127.0.0.1:0` can report its port).
pub struct Listeners {
    listeners: Vec<TcpListener>,
}

impl Listeners {
    pub async fn bind(addrs: &[SocketAddr]) -> Result<Self, std::io::Error> {
        let mut listeners = Vec::new();
        for a in addrs {
            let l = TcpListener::bind(a).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("gateway cannot listen on {a}: {e}"))
            })?;
            listeners.push(l);
        }
        Ok(Self { listeners })
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }
}

/// Serves every listener until `shutdown` turns true, then stops accepting and gives in-flight
/// requests [`DRAIN_TIMEOUT`] to finish (idle keep-alive connections close at once).
pub async fn serve(gw: Arc<Gateway>, listeners: Listeners, mut shutdown: watch::Receiver<bool>) {
    if let Some(findings) = gw.detection.take_findings() {
        let responder = gw.detection.responder.clone();
        tokio::spawn(responder.run(findings, shutdown.clone()));
        tokio::spawn(sweep_detection(gw.detection.clone(), shutdown.clone()));
    }
    tokio::spawn(sweep_upstreams(gw.pool.clone(), shutdown.clone()));
    // Every connection task holds a sender; all of them gone is "drained".
    let (live, mut drained) = tokio::sync::mpsc::channel::<()>(1);
    let mut accepts = JoinSet::new();
    for l in listeners.listeners {
        let (gw, live, shutdown) = (gw.clone(), live.clone(), shutdown.clone());
        accepts.spawn(async move {
            loop {
                match l.accept().await {
                    Ok((stream, peer)) => {
                        let (gw, live, shutdown) = (gw.clone(), live.clone(), shutdown.clone());
                        tokio::spawn(async move {
                            serve_connection(gw, stream, peer, shutdown).await;
                            drop(live);
                        });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "gateway accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    drop(live);
    let _ = shutdown.wait_for(|s| *s).await;
    accepts.abort_all();
    tokio::select! {
        _ = drained.recv() => debug!("gateway connections drained"),
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => {
            warn!("gateway requests still running after {DRAIN_TIMEOUT:?}: closing them");
        }
    }
    if let Err(e) = gw.ledger.flush() {
        warn!(error = %e, "flushing usage at shutdown failed; the journal keeps it for the next start");
    }
}

async fn serve_connection(
    gw: Arc<Gateway>,
    mut stream: tokio::net::TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let policy = gw.policy();
    let s = &policy.settings;
    let mut client = client_addr::canonical(peer.ip());
    if s.client_address == ClientAddressSource::ProxyProtocol
        && client_addr::is_trusted(&s.trusted_proxies, peer.ip())
    {
        match client_addr::read_proxy_header(&mut stream, s.header_read_timeout).await {
            Ok(Some(addr)) => client = client_addr::canonical(addr.ip()),
            Ok(None) => {}
            Err(e) => {
                debug!(%peer, error = %e, "closing a connection from a trusted proxy");
                return;
            }
        }
    }
    let timeouts = Timeouts {
        header_read: s.header_read_timeout,
        idle: s.idle_timeout,
    };
    drop(policy);
    http1::server::serve_connection(&*gw, stream, peer, client, timeouts, shutdown).await;
}

/// Closes upstream connections that have idled too long.
async fn sweep_upstreams(pool: Pool, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(UPSTREAM_SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tick.tick() => pool.sweep(),
        }
    }
}

/// How often idle detector state and old offenses are forgotten.
const DETECTION_SWEEP: Duration = Duration::from_secs(10);

async fn sweep_detection(
    detection: Arc<crate::detect::Detection>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(DETECTION_SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let d = detection.clone();
        let _ = tokio::task::spawn_blocking(move || d.responder.sweep(crate::bans::now_ms())).await;
    }
}

/// Moves settled usage from the journal into the store every interval.
pub async fn flush_usage(
    ledger: Arc<Ledger>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let l = ledger.clone();
        match tokio::task::spawn_blocking(move || l.flush()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "moving usage into the store failed; retrying (the journal keeps it)")
            }
            Err(e) => warn!(error = %e, "usage flush task failed"),
        }
    }
}

/// Logged once at start.
pub fn log_ready(addrs: &[SocketAddr], policy: &Policy) {
    info!(
        listen = ?addrs,
        upstreams = ?policy.settings.upstreams,
        tiers = ?policy.tiers.tiers.keys().collect::<Vec<_>>(),
        "gateway ready"
    );
}
