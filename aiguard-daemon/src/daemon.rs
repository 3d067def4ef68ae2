//! `aiguard run`: bring the node up, serve until SIGTERM/SIGINT, shut down cleanly.
//!
//! Start-up order matters: the admin socket is bound first (a second daemon on the same socket
//! stops before touching anything), then the store is opened (its file lock keeps two daemons off
//! one state directory), then the program is loaded and attached, then the maps are reconciled
//! with the store.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing::{error, info, warn};

use crate::{
    admin::{self, server::BindError},
    bans::{BanError, BanList, now_ms},
    config::Config,
    dataplane::{Dataplane, DataplaneError},
    gateway::{self, Gateway, Listeners},
    keys::KeyRing,
    shared::Shared,
    store::{Store, StoreError},
    tokens::Tokenizer,
    usage::{Ledger, LedgerError},
};

/// Produces the configuration again (file, environment and flags), for reloads.
pub type ConfigSource = Box<dyn Fn() -> anyhow::Result<Config> + Send + Sync>;

/// Everything the daemon manages on this node. Handlers lock it for synchronous work only.
pub struct Node {
    pub dataplane: Dataplane,
    pub bans: BanList,
    pub config: Config,
    pub started: Instant,
    pub keys: Arc<KeyRing>,
    pub ledger: Arc<Ledger>,
    pub gateway: Option<Arc<Gateway>>,
    /// The gateway's bound addresses.
    pub gateway_listen: Vec<SocketAddr>,
    pub reload: Option<ConfigSource>,
    /// The shared store, when `[store] backend = "redis"`.
    pub shared: Option<Arc<Shared>>,
}

/// Detection's bans go where the CLI's go: the ban list, the XDP maps and (with a shared
/// store) every other node. Weak: the node owns the gateway that owns this.
struct NodeEnforcer(std::sync::Weak<Mutex<Node>>);

impl crate::detect::respond::Enforcer for NodeEnforcer {
    fn ban(
        &self,
        range: ipnetwork::IpNetwork,
        ttl: std::time::Duration,
        reason: &str,
    ) -> Result<(), String> {
        let node = self.0.upgrade().ok_or("the daemon is stopping")?;
        let mut guard = node.lock().unwrap_or_else(|p| p.into_inner());
        let Node {
            dataplane,
            bans,
            shared,
            ..
        } = &mut *guard;
        let spec = crate::bans::BanSpec {
            ttl: Some(ttl),
            reason: Some(reason.to_owned()),
            shadow: false,
            force: false,
            origin: crate::bans::Origin::Detector,
            node: shared.as_ref().map(|s| s.node().clone()),
        };
        let made = bans
            .ban(dataplane, &[range.to_string()], &spec)
            .map_err(|e| e.to_string())?;
        if let Some(s) = shared {
            crate::shared::bans::announce_bans(s, &made);
        }
        Ok(())
    }

    fn allowlisted(&self, range: ipnetwork::IpNetwork) -> bool {
        self.0.upgrade().is_some_and(|node| {
            node.lock()
                .unwrap_or_else(|p| p.into_inner())
                .bans
                .allowlist()
                .iter()
                .any(|a| crate::range::overlaps(&a.range, &range))
        })
    }
}

/// Re-reads the configuration and applies what can change while running: tiers, tenants,
/// prices and the gateway's settings. In-flight requests finish under the limits they were
/// admitted with. An invalid configuration changes nothing. Returns the changed settings that
/// need a restart.
pub fn reload(node: &mut Node) -> Result<Vec<String>, String> {
    let Some(source) = &node.reload else {
        return Err("this daemon was started without a reloadable configuration".into());
    };
    let new = source()
        .map_err(|e| format!("the new configuration is refused, the old one stays: {e:#}"))?;
    let mut needs_restart = Vec::new();
    if new.xdp != node.config.xdp {
        needs_restart.push("xdp".to_owned());
    }
    if new.daemon != node.config.daemon {
        needs_restart.push("daemon".to_owned());
    }
    if new.metrics != node.config.metrics {
        needs_restart.push("metrics".to_owned());
    }
    // The shared store's connections (URLs, TLS files, prefix) are made at start.
    if new.store != node.config.store {
        needs_restart.push("store".to_owned());
    }
    if new.gateway.is_enabled() != node.config.gateway.is_enabled() {
        needs_restart.push("gateway (enabling or disabling it)".to_owned());
    }
    if let Some(gw) = &node.gateway {
        needs_restart.extend(gw.reload(&new));
    }
    // Keep what was not applied, so that a later reload compares against what runs.
    let mut applied = new;
    applied.xdp = node.config.xdp.clone();
    applied.daemon = node.config.daemon.clone();
    applied.metrics = node.config.metrics.clone();
    applied.store = node.config.store.clone();
    node.config = applied;
    info!(?needs_restart, "configuration reloaded");
    Ok(needs_restart)
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Nothing to protect.
    #[error(
        "nothing to protect: pass --interface IF (repeatable) or set xdp.interfaces, and/or run the gateway with --listen ADDR --upstream URL (or [gateway] in the config)"
    )]
    NoInterface,
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("restoring bans: {0}")]
    Restore(#[from] BanError),
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("{0}")]
    Listen(#[source] std::io::Error),
    #[error("shared store: {0}")]
    Shared(String),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config, reload: Option<ConfigSource>) -> Result<(), StartError> {
    if config.xdp.interfaces.is_empty() && !config.gateway.is_enabled() {
        return Err(StartError::NoInterface);
    }
    let socket_path = config.daemon.admin_socket.clone();
    let listener = admin::server::bind(&socket_path)?;
    let result = serve(config, listener, reload).await;
    let _ = std::fs::remove_file(&socket_path);
    result
}

async fn serve(
    config: Config,
    listener: tokio::net::UnixListener,
    reload_source: Option<ConfigSource>,
) -> Result<(), StartError> {
    // First, so that a SIGTERM during a long start-up still takes the clean way out.
    let mut term = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(StartError::Signals)?;

    let store = Store::open(&config.daemon.state_dir)?;
    let keys = Arc::new(KeyRing::open(store.clone())?);
    let (ledger, replay) = Ledger::open(
        store.clone(),
        &config.daemon.state_dir.join("usage-journal"),
    )?;
    if replay.records > 0 || replay.torn_lines > 0 {
        info!(
            records = replay.records,
            torn_lines = replay.torn_lines,
            "usage journal replayed into the store"
        );
    }
    let ledger = Arc::new(ledger);
    let shared = if config.store.is_shared() {
        Some(
            Shared::open(&config.store, store.clone())
                .await
                .map_err(StartError::Shared)?,
        )
    } else {
        None
    };
    let gateway = if config.gateway.is_enabled() {
        let name = config.gateway.tokenizer;
        // Loading the BPE tables takes about half a second: not on the first request.
        let tokenizer = tokio::task::spawn_blocking(move || Tokenizer::load(name))
            .await
            .expect("loading the tokenizer does not panic");
        let gw = Gateway::new(
            &config,
            keys.clone(),
            ledger.clone(),
            tokenizer,
            shared.clone(),
            store.clone(),
        )?;
        let listeners = Listeners::bind(&config.gateway.listen)
            .await
            .map_err(StartError::Listen)?;
        Some((Arc::new(gw), listeners))
    } else {
        None
    };
    let metrics_listener = bind_metrics(&config.metrics).await?;
    let mut dataplane = Dataplane::load(&config.daemon.bpffs_dir, config.xdp.max_bans)?;
    // Fill the maps before the program goes onto the interfaces: a freshly loaded program is
    // swapped into a pinned link at once, and it must not run against empty tables meanwhile.
    dataplane.set_bucket(config.xdp.bucket.to_kernel(), &config.xdp.bucket.ports)?;
    let (bans, report) = BanList::restore(store, &mut dataplane, config.xdp.max_bans)?;
    info!(
        bans = report.bans,
        adopted = report.adopted,
        expired_while_down = report.expired,
        orphans_removed = report.orphans_removed,
        allowlist = report.allowlist,
        "state restored"
    );
    dataplane.detach_unconfigured(&config.xdp.interfaces);
    for (i, iface) in config.xdp.interfaces.iter().enumerate() {
        dataplane.attach(iface, config.xdp.mode, i as u32 + 1)?;
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let log_task = dataplane.take_log_reader().map(|reader| {
        let rx = shutdown_rx.clone();
        tokio::spawn(forward_ebpf_logs(reader, rx))
    });

    let detach_on_exit = config.xdp.detach_on_exit;
    let sweep_every = config.xdp.sweep_interval;
    let usage_every = config.gateway.usage_flush_interval;
    let (gateway, gateway_listen, gateway_task) = match gateway {
        Some((gw, listeners)) => {
            let addrs = listeners.local_addrs();
            gateway::log_ready(&addrs, &gw.policy());
            let task = tokio::spawn(gateway::serve(gw.clone(), listeners, shutdown_rx.clone()));
            (Some(gw), addrs, Some(task))
        }
        None => (None, Vec::new(), None),
    };
    let shared_task = shared
        .clone()
        .map(|s| tokio::spawn(s.maintain(shutdown_rx.clone())));
    let flusher = tokio::spawn(gateway::flush_usage(
        ledger.clone(),
        usage_every,
        shutdown_rx.clone(),
    ));
    let node = Arc::new(Mutex::new(Node {
        dataplane,
        bans,
        config,
        started: Instant::now(),
        keys,
        ledger,
        gateway,
        gateway_listen,
        reload: reload_source,
        shared: shared.clone(),
    }));
    if let Some(gw) = node
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .gateway
        .as_ref()
    {
        gw.detection
            .responder
            .set_enforcer(Arc::new(NodeEnforcer(Arc::downgrade(&node))));
    }
    let metrics_task = match metrics_listener {
        Some(listener) => {
            let mut exporter = crate::metrics::Exporter::new()?;
            let gw = node
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .gateway
                .clone();
            if let Some(gw) = gw {
                exporter = exporter.with_gateway(gw)?;
            }
            let exporter = exporter.with_node(node.clone())?;
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, "metrics at http://{addr}/metrics");
            }
            Some(tokio::spawn(crate::metrics::serve(
                listener,
                Arc::new(exporter),
                shutdown_rx.clone(),
            )))
        }
        None => None,
    };
    let replication = shared.map(|s| {
        tokio::spawn(crate::shared::bans::replicate(
            s,
            node.clone(),
            shutdown_rx.clone(),
        ))
    });

    let sweeper = tokio::spawn(sweep_expired(
        node.clone(),
        sweep_every,
        shutdown_rx.clone(),
    ));
    let admin = tokio::spawn(admin::server::serve(
        listener,
        node.clone(),
        shutdown_rx.clone(),
    ));
    info!(socket = %node.lock().unwrap_or_else(|p| p.into_inner()).config.daemon.admin_socket.display(), "aiguard ready");

    loop {
        tokio::select! {
            _ = term.recv() => {
                info!("SIGTERM: shutting down");
                break;
            }
            _ = int.recv() => {
                info!("SIGINT: shutting down");
                break;
            }
            _ = hup.recv() => {
                let node = node.clone();
                let result = tokio::task::spawn_blocking(move || {
                    reload(&mut node.lock().unwrap_or_else(|p| p.into_inner()))
                })
                .await;
                match result {
                    Ok(Ok(_)) => {}
                    Ok(Err(message)) => warn!("SIGHUP: {message}"),
                    Err(e) => error!(error = %e, "reload task failed"),
                }
            }
        }
    }
    let _ = shutdown_tx.send(true);
    let _ = admin.await;
    let _ = sweeper.await;
    if let Some(t) = gateway_task {
        let _ = t.await;
    }
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    let _ = flusher.await;
    if let Some(t) = replication {
        let _ = t.await;
    }
    if let Some(t) = shared_task {
        let _ = t.await;
    }
    let ledger = node
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .ledger
        .clone();
    if let Err(e) = ledger.flush() {
        warn!(error = %e, "flushing usage at shutdown failed; the journal keeps it for the next start");
    }
    if let Some(t) = log_task {
        let _ = t.await;
    }

    let mut node = node.lock().unwrap_or_else(|p| p.into_inner());
    if detach_on_exit {
        node.dataplane.detach_all();
    } else {
        info!(
            "leaving the XDP program attached and the maps pinned: bans keep dropping while the daemon is down"
        );
    }
    Ok(())
}

/// Binds the metrics listener, if metrics are on. The default address being taken (a second
/// daemon on this host) costs this daemon its metrics, not its start; an address that was asked
/// for must be had.
async fn bind_metrics(
    settings: &crate::config::MetricsSettings,
) -> Result<Option<tokio::net::TcpListener>, StartError> {
    let Some(addr) = settings.listen_addr() else {
        return Ok(None);
    };
    match crate::metrics::bind(addr).await {
        Ok(l) => {
            if !addr.ip().is_loopback() {
                warn!(%addr, "metrics listen beyond loopback: the page names tenants and tiers");
            }
            Ok(Some(l))
        }
        Err(crate::metrics::MetricsError::Bind { source, .. })
            if settings.listen == crate::config::DEFAULT_METRICS_LISTEN
                && matches!(
                    source.kind(),
                    std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable
                ) =>
        {
            warn!(%addr, error = %source, "metrics are off: the default metrics address is not available (set metrics.listen, or --metrics-listen)");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

async fn sweep_expired(
    node: Arc<Mutex<Node>>,
    every: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            _ = tick.tick() => {}
        }
        let node = node.clone();
        let swept = tokio::task::spawn_blocking(move || {
            let mut guard = node.lock().unwrap_or_else(|p| p.into_inner());
            let Node {
                dataplane, bans, ..
            } = &mut *guard;
            bans.sweep(dataplane, now_ms())
        })
        .await;
        match swept {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "sweeping expired bans failed; retrying next tick"),
            Err(e) => error!(error = %e, "sweeper task failed"),
        }
    }
}

/// Forwards the XDP program's aya-log records to this process's logger (and so to tracing).
async fn forward_ebpf_logs(
    reader: aya_log::EbpfLogger<&'static dyn log::Log>,
    mut shutdown: watch::Receiver<bool>,
) {
    // SAFETY: the logger owns the ring buffer's fd; it stays open and the same for as long as
    // the AsyncFd owns the logger.
    let registered =
        unsafe { AsyncFd::register_with_interest(reader, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot poll the eBPF log buffer; eBPF logs will not be forwarded");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            ready = fd.readable_mut() => match ready {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(e) => {
                    warn!(error = %e, "eBPF log buffer failed");
                    return;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DEFAULT_METRICS_LISTEN, MetricsSettings};

    #[tokio::test]
    async fn a_taken_metrics_address_stops_start_up_unless_it_is_the_default() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let asked = MetricsSettings {
            enabled: true,
            listen: taken.local_addr().expect("addr").to_string(),
        };
        let err = bind_metrics(&asked).await.expect_err("the port is taken");
        assert!(
            err.to_string()
                .starts_with(&format!("metrics cannot listen on {}", asked.listen)),
            "{err}"
        );
        // The default address: taken here or by another daemon on this host, either way this
        // daemon runs, without metrics.
        let _held = std::net::TcpListener::bind(DEFAULT_METRICS_LISTEN);
        let default = MetricsSettings::default();
        assert!(
            bind_metrics(&default)
                .await
                .expect("the default address taken is not fatal")
                .is_none()
        );
        let off = MetricsSettings {
            enabled: false,
            ..MetricsSettings::default()
        };
        assert!(bind_metrics(&off).await.expect("off").is_none());
    }
}
