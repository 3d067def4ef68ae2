//! The gateway's HTTP stack with none of its work: the floor under what aiguard's gateway can
//! cost per request, for `cargo xtask bench gateway` (its `passthrough` leg).
//!
//! ```text
//! passthrough --listen 127.0.0.1:8080 --upstream 127.0.0.1:8000
//! ```
//!
//! Built as the daemon is (hyper 1 HTTP/1 server, hyper-util's pooled client with the same
//! settings, the multi-thread runtime, mimalloc), it reads each request's body whole (the
//! gateway needs it to count tokens), forwards it, and streams the answer back. No identity,
//! no limits, no tokenizer, no accounting, no header rewriting: whatever aiguard costs beyond
//! this is aiguard's own work.
use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use tokio::net::TcpListener;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Body = BoxBody<Bytes, hyper::Error>;

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

fn error(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed());
    *response.status_mut() = status;
    response
}

async fn forward(
    client: &Client<HttpConnector, Full<Bytes>>,
    upstream: SocketAddr,
    request: Request<Incoming>,
) -> Response<Body> {
    let (mut parts, body) = request.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return error(StatusCode::BAD_REQUEST);
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = format!("http://{upstream}{path}").parse() else {
        return error(StatusCode::BAD_REQUEST);
    };
    parts.uri = uri;
    match client
        .request(Request::from_parts(parts, Full::new(body)))
        .await
    {
        Ok(response) => response.map(BodyExt::boxed),
        Err(_) => error(StatusCode::BAD_GATEWAY),
    }
}

fn main() {
    let (listen, upstream) = args();
    let runtime = tokio::runtime::Runtime::new().expect("starting the async runtime");
    runtime.block_on(async move {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .build(connector);
        let listener = TcpListener::bind(listen)
            .await
            .unwrap_or_else(|e| panic!("binding {listen}: {e}"));
        // The bench stops it with SIGTERM and expects a clean exit.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = term.recv() => return,
            };
            let Ok((stream, _)) = accepted else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let client = client.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let client = client.clone();
                    async move { Ok::<_, Infallible>(forward(&client, upstream, request).await) }
                });
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .keep_alive(true);
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
