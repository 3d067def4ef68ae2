//! The Prometheus `/metrics` endpoint: what the NIC and the gateway decided, in the
//! exposition format, named by Prometheus' conventions (`aiguard_` prefix, `_total` counters,
//! seconds).
//!
//! # Layout
//! - this module: the [`Exporter`] (one registry per daemon) and the HTTP server;
//! - [`gateway`]: the request path's own counters (requests by tier and outcome, tokens,
//!   in-flight requests, upstream latency) and the per-tenant quota gauges computed at scrape
//!   time;
//! - [`node`]: what already lives elsewhere and is read at scrape time: the XDP program's
//!   per-CPU verdict counters, the bans in the kernel's tries, the shared store's health;
//! - [`detect`]: abuse detection: detector triggers, actions, proofs of work, prompt rules;
//! - [`families`]: metric families built at scrape time from plain numbers.
//!
//! Labels never carry an API key or a key id: tiers, tenants (operator-chosen names), interfaces,
//! verdicts, ban origins and banned ranges only.
pub mod detect;
pub mod families;
pub mod gateway;
pub mod node;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder as _, IntGaugeVec, Opts, Registry, TextEncoder};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tracing::{debug, warn};

pub use gateway::{GatewayMetrics, Outcome};

use crate::{daemon::Node, gateway::Gateway};

/// A scrape's request head must arrive within this; also how long an idle keep-alive
/// connection is kept.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent connections served; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;

/// Why the metrics could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listen address could not be bound.
    #[error("metrics cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Two collectors claimed the same metric (a daemon bug).
    #[error("registering metrics: {0}")]
    Register(#[source] prometheus::Error),
}

/// Every metric this daemon exports, in one registry.
pub struct Exporter {
    registry: Registry,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").finish_non_exhaustive()
    }
}

impl Exporter {
    /// An exporter with `aiguard_build_info` only.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let build = IntGaugeVec::new(
            Opts::new(
                "aiguard_build_info",
                "Always 1; the labels say which aiguard build is running.",
            ),
            &["version"],
        )
        .map_err(MetricsError::Register)?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry
            .register(Box::new(build))
            .map_err(MetricsError::Register)?;
        Ok(Self { registry })
    }

    /// Adds the gateway's metrics.
    pub fn with_gateway(self, gw: Arc<Gateway>) -> Result<Self, MetricsError> {
        for c in gw.metrics.collectors() {
            self.registry.register(c).map_err(MetricsError::Register)?;
        }
        for c in gw.detection.metrics.collectors() {
            self.registry.register(c).map_err(MetricsError::Register)?;
        }
        self.registry
            .register(Box::new(gateway::QuotaCollector::new(gw.clone())))
            .map_err(MetricsError::Register)?;
        self.registry
            .register(Box::new(gateway::QueueCollector::new(gw)))
            .map_err(MetricsError::Register)?;
        Ok(self)
    }

    /// Adds what the node reads at scrape time: XDP counters, bans, the shared store.
    pub fn with_node(self, node: Arc<Mutex<Node>>) -> Result<Self, MetricsError> {
        self.registry
            .register(Box::new(node::NodeCollector::new(node)))
            .map_err(MetricsError::Register)?;
        Ok(self)
    }

    /// The whole page in the text exposition format. Blocking: it may wait for the node's
    /// lock (held for seconds by a large ban batch), so call it off the async workers.
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        let mut out = Vec::with_capacity(16 << 10);
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).expect("the text encoder writes UTF-8")
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Serves `GET /metrics` on `listener` until `shutdown` turns true. Scrapes are short: at
/// shutdown, connections still open are closed rather than drained.
pub async fn serve(
    listener: TcpListener,
    exporter: Arc<Exporter>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept(), if conns.len() < MAX_CONNECTIONS => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                conns.spawn(serve_connection(stream, peer, exporter.clone()));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    conns.abort_all();
}

async fn serve_connection(stream: tokio::net::TcpStream, peer: SocketAddr, e: Arc<Exporter>) {
    let service = service_fn(move |req| {
        let e = e.clone();
        async move { Ok::<_, Infallible>(answer(&e, &req).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true)
        .max_headers(64);
    if let Err(err) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        debug!(%peer, error = %err, "metrics connection ended with an error");
    }
}

async fn answer(e: &Arc<Exporter>, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    match req.uri().path() {
        "/metrics" => {}
        "/" => return plain(StatusCode::OK, "aiguard: metrics are at /metrics\n"),
        _ => {
            return plain(
                StatusCode::NOT_FOUND,
                "not found: metrics are at /metrics\n",
            );
        }
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let exporter = e.clone();
    let Ok(page) = tokio::task::spawn_blocking(move || exporter.render()).await else {
        return plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "collecting metrics failed\n",
        );
    };
    let mut r = Response::new(Full::new(Bytes::from(page)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(prometheus::TEXT_FORMAT),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_names_the_version() {
        let page = Exporter::new().expect("exporter").render();
        assert!(
            page.contains(&format!(
                "aiguard_build_info{{version=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            )),
            "{page}"
        );
        assert!(page.contains("# TYPE aiguard_build_info gauge"), "{page}");
    }

    #[tokio::test]
    async fn the_endpoint_serves_the_page_and_nothing_else() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(serve(
            listener,
            Arc::new(Exporter::new().expect("exporter")),
            rx,
        ));
        let get = |path: &'static str, method: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.write_all(
                format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .expect("write");
            let mut out = String::new();
            tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
                .await
                .expect("answer in time")
                .expect("read");
            out
        };
        let page = get("/metrics", "GET").await;
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(page.contains("text/plain; version=0.0.4"), "{page}");
        assert!(page.contains("aiguard_build_info"), "{page}");
        assert!(get("/nope", "GET").await.starts_with("HTTP/1.1 404"));
        assert!(get("/metrics", "POST").await.starts_with("HTTP/1.1 405"));
        stop.send(true).expect("stop");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops")
            .expect("no panic");
    }
}
