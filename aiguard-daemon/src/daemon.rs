//! `aiguard run`: bring the node up, serve until SIGTERM/SIGINT, shut down cleanly.
//!
//! Start-up order matters: the admin socket is bound first (a second daemon on the same socket
//! stops before touching anything), then the store is opened (its file lock keeps two daemons off
//! one state directory), then the program is loaded and attached, then the maps are reconciled
//! with the store.
use std::{
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
    store::{Store, StoreError},
};

/// Everything the daemon manages on this node. Handlers lock it for synchronous work only.
pub struct Node {
    pub dataplane: Dataplane,
    pub bans: BanList,
    pub config: Config,
    pub started: Instant,
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Nothing to protect.
    #[error(
        "no interface to protect: pass --interface IF (repeatable) or set xdp.interfaces in the config"
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
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), StartError> {
    if config.xdp.interfaces.is_empty() {
        return Err(StartError::NoInterface);
    }
    let socket_path = config.daemon.admin_socket.clone();
    let listener = admin::server::bind(&socket_path)?;
    let result = serve(config, listener).await;
    let _ = std::fs::remove_file(&socket_path);
    result
}

async fn serve(config: Config, listener: tokio::net::UnixListener) -> Result<(), StartError> {
    // First, so that a SIGTERM during a long start-up still takes the clean way out.
    let mut term = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;

    let store = Store::open(&config.daemon.state_dir)?;
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
    let node = Arc::new(Mutex::new(Node {
        dataplane,
        bans,
        config,
        started: Instant::now(),
    }));

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

    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
    let _ = shutdown_tx.send(true);
    let _ = admin.await;
    let _ = sweeper.await;
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
