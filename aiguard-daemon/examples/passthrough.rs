//! The gateway's HTTP stack with none of its work: the floor under what aiguard's gateway can
//! cost per request, for `cargo xtask bench gateway` (its `passthrough` leg).
//!
//! ```text
//! passthrough --listen 127.0.0.1:8080 --upstream 127.0.0.1:8000
//! ```
//!
//! Built as the daemon is (the gateway's own HTTP/1.1 server and pooled upstream connections,
//! the multi-thread runtime, mimalloc), it reads each request's body whole (the gateway needs
//! it to count tokens), forwards it, and relays the answer. No identity, no limits, no
//! tokenizer, no accounting, no header rewriting beyond the connection's own fields: whatever
//! aiguard costs beyond this is aiguard's own work.
use std::{net::SocketAddr, time::Duration};

use aiguard_daemon::gateway::http1::{
    head::write,
    server::{Incoming, Relay, Reply, Service, Timeouts, Untouched, serve_connection},
    upstream::{Pool, PoolSettings, Upstream},
};
use bytes::Bytes;
use tokio::net::TcpListener;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MAX_BODY: u64 = 4 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

fn args() -> (SocketAddr, SocketAddr) {
    let (mut listen, mut upstream) = (None, None);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value: SocketAddr = it
            .next()
            .unwrap_or_else(|| panic!("{flag} needs an address"))
            .parse()
            .unwrap_or_else(|e| panic!("{flag}: {e}"));
        match flag.as_str() {
            "--listen" => listen = Some(value),
            "--upstream" => upstream = Some(value),
            other => panic!("unknown argument {other}"),
        }
    }
    (
        listen.expect("--listen ADDR is required"),
        upstream.expect("--upstream ADDR is required"),
    )
}

fn error(status: http::StatusCode) -> Reply {
    let mut r = http::Response::new(Bytes::new());
    *r.status_mut() = status;
    Reply::Answer(r)
}

struct Passthrough {
    pool: Pool,
    upstream: Upstream,
}

impl Service for Passthrough {
    async fn call(&self, req: &mut Incoming<'_>) -> Reply {
        let Ok(body) = req.read_body(MAX_BODY, TIMEOUT).await else {
            return error(http::StatusCode::BAD_REQUEST);
        };
        let mut head = Vec::with_capacity(256);
        head.extend_from_slice(req.head.method.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(req.head.path_and_query().as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\n");
        write::header(&mut head, b"host", self.upstream.authority.as_bytes());
        for (name, value) in req.head.headers.iter() {
            if !matches!(
                name,
                b"host" | b"connection" | b"keep-alive" | b"transfer-encoding" | b"content-length"
            ) {
                write::header(&mut head, name, value);
            }
        }
        write::header_u64(&mut head, b"content-length", body.len() as u64);
        head.extend_from_slice(b"\r\n");
        match self
            .pool
            .send(&self.upstream, &head, &body, req.head.is_head())
            .await
        {
            Ok(r) => Reply::Relay(Relay {
                status: r.head.status,
                headers: r.head.headers,
                body: r.body,
                extra: Vec::new(),
                replaced: |_| false,
                filter: Box::new(Untouched),
            }),
            Err(_) => error(http::StatusCode::BAD_GATEWAY),
        }
    }
}

fn main() {
    let (listen, upstream) = args();
    let runtime = tokio::runtime::Runtime::new().expect("starting the async runtime");
    runtime.block_on(async move {
        let service: &'static Passthrough = Box::leak(Box::new(Passthrough {
            pool: Pool::new(PoolSettings {
                connect_timeout: TIMEOUT,
                idle_timeout: Duration::from_secs(90),
                max_idle: 1024,
            }),
            upstream: Upstream::from_uri(
                &format!("http://{upstream}").parse().expect("upstream URL"),
            )
            .expect("upstream"),
        }));
        let listener = TcpListener::bind(listen)
            .await
            .unwrap_or_else(|e| panic!("binding {listen}: {e}"));
        let (_never, shutdown) = tokio::sync::watch::channel(false);
        let timeouts = Timeouts {
            header_read: TIMEOUT,
            idle: Duration::from_secs(60),
        };
        // The bench stops it with SIGTERM and expects a clean exit.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = term.recv() => return,
            };
            let Ok((stream, peer)) = accepted else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                serve_connection(service, stream, peer, peer.ip(), timeouts, shutdown).await;
            });
        }
    });
}
