//! The daemon's side of the admin socket: bind it root-only, read requests, apply them to the
//! node, answer.
use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use aiguard_common::stat;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::watch,
    task::JoinSet,
};
use tracing::{debug, warn};

use super::{
    BANNED_ECHO_LIMIT, BucketStatus, ErrorKind, InterfaceStatus, MAX_REQUEST_BYTES, Reply, Request,
    StatusReport,
};
use crate::{
    bans::{BanError, BanSpec, Origin},
    daemon::Node,
};

/// Why the admin socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A live daemon already answers there.
    #[error(
        "another aiguard daemon is already listening on {0}; stop it, or give this one its own --socket"
    )]
    InUse(String),
    /// Something other than a socket is at the path.
    #[error("{0} exists and is not a socket; remove it or choose another --socket")]
    NotASocket(String),
    /// Filesystem or socket error.
    #[error("cannot create the admin socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the admin socket with mode 0600, replacing a stale socket file left by a crash.
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    let io = |source| BindError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt as _;
        if !meta.file_type().is_socket() {
            // A mistyped --socket must not delete somebody's file.
            return Err(BindError::NotASocket(path.display().to_string()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(BindError::InUse(path.display().to_string()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    // Created 0600 from the start: no window in which another user could connect.
    let old_mask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old_mask);
    let listener = bound.map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Accepts connections until `shutdown` turns true, then drains: a request already being
/// applied is answered, idle connections are closed (waiting at most [`DRAIN_TIMEOUT`]).
pub async fn serve(
    listener: UnixListener,
    node: Arc<Mutex<Node>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    // Each connection watches its own copy of the shutdown signal.
    let for_connections = shutdown.clone();
    loop {
        tokio::select! {
            // The wait's guard is dropped inside: it must not live across the awaits below.
            () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(connection(stream, node.clone(), for_connections.clone()));
                }
                Err(e) => {
                    warn!(error = %e, "admin socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            // Reap finished connections so the set does not grow with every client.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!("admin requests still running at shutdown were abandoned");
        connections.abort_all();
    }
}

/// How long shutdown waits for admin requests in flight (a large ban file takes seconds).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

async fn connection(
    stream: UnixStream,
    node: Arc<Mutex<Node>>,
    mut shutdown: watch::Receiver<bool>,
) {
    // The socket's mode already keeps others out; the peer's credentials say so for certain.
    let peer_uid = stream.peer_cred().map(|c| c.uid()).ok();
    let (read, mut write) = stream.into_split();
    if peer_uid != Some(0) {
        warn!(
            ?peer_uid,
            "refused an admin connection from a non-root peer"
        );
        let _ = send(
            &mut write,
            &error(
                ErrorKind::InvalidRequest,
                "the admin API accepts root only".into(),
                None,
            ),
        )
        .await;
        return;
    }
    // The cap bounds what one client can make the daemon buffer.
    let mut lines = BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
    loop {
        // The cap is per request, not per connection.
        lines.get_mut().set_limit(MAX_REQUEST_BYTES as u64 + 1);
        let mut line = String::new();
        // Between requests a connection ends with the daemon; a request being applied (below,
        // outside this select) is finished and answered first.
        let read = tokio::select! {
            () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => return,
            read = lines.read_line(&mut line) => read,
        };
        match read {
            Ok(0) => return,
            Ok(n) if n > MAX_REQUEST_BYTES => {
                let _ = send(
                    &mut write,
                    &error(
                        ErrorKind::InvalidRequest,
                        format!("request larger than {MAX_REQUEST_BYTES} bytes"),
                        None,
                    ),
                )
                .await;
                return;
            }
            Ok(_) => {}
            Err(e) => {
                debug!(error = %e, "admin connection closed");
                return;
            }
        }
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                let node = node.clone();
                tokio::task::spawn_blocking(move || handle(&node, request))
                    .await
                    .unwrap_or_else(|e| {
                        error(
                            ErrorKind::Internal,
                            format!("request handler failed: {e}"),
                            None,
                        )
                    })
            }
            Err(e) => error(
                ErrorKind::InvalidRequest,
                format!("malformed request: {e}"),
                None,
            ),
        };
        if send(&mut write, &reply).await.is_err() {
            return;
        }
    }
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, reply: &Reply) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(reply).expect("replies always serialise");
    bytes.push(b'\n');
    write.write_all(&bytes).await
}

pub(super) fn error(kind: ErrorKind, message: String, index: Option<usize>) -> Reply {
    Reply::Error {
        kind,
        message,
        index,
    }
}

fn ban_error(e: BanError) -> Reply {
    let (index, e) = match e {
        BanError::InBatch { index, source } => (Some(index), *source),
        e => (None, e),
    };
    let kind = match &e {
        BanError::Range(_) | BanError::Ttl { .. } | BanError::Reason(_) => {
            ErrorKind::InvalidRequest
        }
        BanError::AllowlistOverlap { .. }
        | BanError::NotBanned(_)
        | BanError::NotAllowed(_)
        | BanError::Full { .. } => ErrorKind::Conflict,
        BanError::Store(_) | BanError::Dataplane(_) | BanError::InBatch { .. } => {
            ErrorKind::Internal
        }
    };
    if kind == ErrorKind::Internal {
        warn!(error = %e, "admin request failed");
    }
    error(kind, e.to_string(), index)
}

/// Applies one request. Runs on a blocking thread: map updates for a large batch take seconds.
pub fn handle(node: &Mutex<Node>, request: Request) -> Reply {
    if request == Request::Top {
        return super::snapshot::top(node);
    }
    // std Mutex: held only for synchronous map and store work, never across an await.
    let mut guard = node.lock().unwrap_or_else(|p| p.into_inner());
    if super::gateway_ops::is_gateway_request(&request) {
        return super::gateway_ops::handle(&mut guard, request);
    }
    let gateway = super::gateway_ops::status(&guard);
    let Node {
        dataplane,
        bans,
        config,
        started,
        shared,
        ..
    } = &mut *guard;
    match request {
        Request::Ban {
            ranges,
            ttl_ms,
            reason,
            shadow,
            force,
        } => {
            if ranges.is_empty() {
                return error(ErrorKind::InvalidRequest, "no range given".into(), None);
            }
            let spec = BanSpec {
                ttl: ttl_ms.map(Duration::from_millis),
                reason,
                shadow,
                force,
                origin: Origin::Cli,
                node: shared.as_ref().map(|s| s.node().clone()),
            };
            match bans.ban(dataplane, &ranges, &spec) {
                Ok(mut bans) => {
                    if let Some(s) = shared {
                        crate::shared::bans::announce_bans(s, &bans);
                    }
                    Reply::Banned {
                        count: bans.len(),
                        bans: {
                            bans.truncate(BANNED_ECHO_LIMIT);
                            bans
                        },
                    }
                }
                Err(e) => ban_error(e),
            }
        }
        Request::Unban { range } => match bans.unban(dataplane, &range) {
            Ok(ban) => {
                if let Some(s) = shared {
                    crate::shared::bans::announce_unban(s, &[ban.range]);
                }
                Reply::Unbanned { ban }
            }
            Err(e) => ban_error(e),
        },
        Request::Bans => match bans.list(dataplane) {
            Ok(bans) => Reply::Bans { bans },
            Err(e) => ban_error(e),
        },
        Request::Allow { range, force } => match bans.allow(dataplane, &range, force) {
            Ok((entry, overlapping_bans)) => Reply::Allowed {
                entry,
                overlapping_bans,
            },
            Err(e) => ban_error(e),
        },
        Request::Unallow { range } => match bans.unallow(dataplane, &range) {
            Ok(entry) => Reply::Unallowed { entry },
            Err(e) => ban_error(e),
        },
        Request::Allowlist => Reply::Allowlist {
            entries: bans.allowlist(),
        },
        Request::Status => {
            let counters = match dataplane.counters() {
                Ok(c) => c,
                Err(e) => return error(ErrorKind::Internal, e.to_string(), None),
            };
            let named = |row: &[u64]| -> BTreeMap<String, u64> {
                stat::NAMES
                    .iter()
                    .zip(row)
                    .map(|(n, v)| ((*n).to_owned(), *v))
                    .collect()
            };
            let mut totals = [0u64; stat::COUNT as usize];
            for row in &counters {
                for (t, v) in totals.iter_mut().zip(row) {
                    *t += v;
                }
            }
            let b = &config.xdp.bucket;
            Reply::Status(Box::new(StatusReport {
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
                uptime_secs: started.elapsed().as_secs(),
                interfaces: dataplane
                    .attachments()
                    .iter()
                    .map(|a| InterfaceStatus {
                        name: a.interface.clone(),
                        ifindex: a.ifindex,
                        mode: a.mode,
                        adopted: a.adopted,
                        counters: named(&counters[a.stat_slot as usize]),
                    })
                    .collect(),
                totals: named(&totals),
                bans: bans.len(),
                allowlist: bans.allow_len(),
                bucket: BucketStatus {
                    active: b.is_active(),
                    rate: b.rate,
                    burst: b.burst,
                    ports: b.ports.clone(),
                    all_ports: b.all_ports,
                    syn_only: b.syn_only,
                },
                bpffs_dir: config.daemon.bpffs_dir.display().to_string(),
                state_dir: config.daemon.state_dir.display().to_string(),
                gateway,
                shared: shared.as_ref().map(|s| s.status()),
            }))
        }
        _ => error(
            ErrorKind::Internal,
            "request not routed (a daemon bug)".into(),
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_at_the_socket_path_is_left_alone() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("notes.txt");
        std::fs::write(&path, "keep me").expect("writing a file");
        let err = bind(&path).expect_err("not a socket");
        assert!(matches!(err, BindError::NotASocket(_)), "{err}");
        assert_eq!(
            std::fs::read_to_string(&path).expect("still there"),
            "keep me"
        );
    }

    #[tokio::test]
    async fn the_socket_is_private_and_a_live_one_is_not_replaced() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("admin.sock");
        let _live = bind(&path).expect("binding");
        let mode = std::fs::metadata(&path)
            .expect("the socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(bind(&path), Err(BindError::InUse(_))));
    }
}
