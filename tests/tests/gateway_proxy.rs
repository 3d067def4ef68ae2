//! The gateway as a proxy, over real loopback HTTP: the upstream connect timeout, the client
//! connection's idle timeout (idle keep-alive, a client that stops reading its stream, and what
//! is not idleness), upstream connection reuse, chunked responses passed through as they
//! arrive, the body cap on chunked requests, and hostile clients that do not slow others down.
//! No privilege needed: the XDP part is not involved. Every address is 127.0.0.1.
use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use aiguard_daemon::{
    tiers::TokenizerName,
    tokens::Tokenizer,
    usage::{Today, UsageRow},
};
use aiguard_tests::{
    gateway::{Answer, TestGateway, chat_request, client, send},
    upstream::{Upstream, UpstreamOptions, headers as up},
};
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::{
    body::{Body, Frame, Incoming},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::mpsc,
};

fn config(upstream: &str, gateway: &str, tiers: &str) -> String {
    format!(
        "[gateway]\nlisten = [\"127.0.0.1:0\"]\nupstreams = [\"{upstream}\"]\ndefault_tier = \"free\"\n{gateway}\n[tiers.free]\n{tiers}"
    )
}

fn hello(max_tokens: u64) -> serde_json::Value {
    json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens})
}

/// Prompt tokens the gateway estimates for [`hello`]: 3 per message + "user" + "hi" + 3.
const HELLO_PROMPT: u64 = 8;

fn month_usage(g: &TestGateway, tenant: &str) -> (u64, u64) {
    g.gw.limiter.month_usage(tenant, Today::now().month_index())
}

fn usage_rows(g: &TestGateway, tenant: &str) -> Vec<UsageRow> {
    g.gw.ledger
        .report(&Today::now().month(), Some(tenant))
        .expect("usage report")
}

/// The id of the only key of `tenant`.
fn key_id(g: &TestGateway, tenant: &str) -> String {
    let ids: Vec<String> = g
        .keys
        .list()
        .into_iter()
        .filter(|k| k.tenant == tenant)
        .map(|k| k.id)
        .collect();
    assert_eq!(ids.len(), 1, "one key for {tenant}");
    ids[0].clone()
}

/// A raw HTTP/1.1 request to the chat endpoint, with `extra` header lines (each ending in
/// CRLF) and a Content-Length body.
fn raw_chat(key: &str, extra: &str, body: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// `body` as chunked transfer coding, in pieces of the given sizes (the rest in the last).
fn chunked(body: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    for &n in sizes {
        let n = n.min(rest.len());
        let (piece, tail) = rest.split_at(n);
        out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
        rest = tail;
    }
    if !rest.is_empty() {
        out.extend_from_slice(format!("{:x}\r\n", rest.len()).as_bytes());
        out.extend_from_slice(rest);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Writes `bytes` on a fresh connection and reads until the server closes it, for at most
/// `limit`. A reset after the answer keeps what was read.
async fn raw_exchange(addr: SocketAddr, bytes: &[u8], limit: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let read = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "the gateway did not close the connection within {limit:?}; read so far: {}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// The status of the first response in `reply`.
fn status_of(reply: &str) -> Option<u16> {
    reply.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// A scripted upstream: real HTTP/1.1 (hyper) whose answers each test writes, for what the fake
// OpenAI server cannot do (bodies fed chunk by chunk, streams that never end).

type UpBody = UnsyncBoxBody<Bytes, Infallible>;

/// A response body fed through a channel: each message is one chunk, the body ends when the
/// sender is dropped, and the sender fails once the connection is gone.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

fn whole(content_type: &str, body: impl Into<Bytes>) -> Response<UpBody> {
    let mut r = Response::new(Full::new(body.into()).boxed_unsync());
    r.headers_mut()
        .insert(header::CONTENT_TYPE, content_type.parse().expect("type"));
    r
}

/// A chunked response and the sender that feeds it.
fn fed(content_type: &str) -> (Response<UpBody>, mpsc::Sender<Bytes>) {
    let (tx, rx) = mpsc::channel(1);
    let mut r = Response::new(ChannelBody(rx).boxed_unsync());
    r.headers_mut()
        .insert(header::CONTENT_TYPE, content_type.parse().expect("type"));
    (r, tx)
}

/// A chat completion as JSON, with usage 8 + 2.
const SMALL_COMPLETION: &str = r#"{"object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":8,"completion_tokens":2,"total_tokens":10}}"#;

struct Scripted {
    addr: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Scripted {
    /// Serves on `127.0.0.1:0` (keep-alive), answering each request with `answer`.
    async fn start<F, Fut>(answer: F) -> Self
    where
        F: Fn(http::request::Parts, Bytes) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<UpBody>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the scripted upstream");
        let addr = listener.local_addr().expect("its address");
        let answer = Arc::new(answer);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let answer = answer.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let answer = answer.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            Ok::<_, Infallible>(answer(parts, body).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, accept }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

// ---------------------------------------------------------------------------------------------

/// A loopback address whose TCP handshake never completes: a listener with a backlog of 0
/// that never accepts, its one accept slot taken, drops every further SYN. Keep the returned
/// listener and connection alive while the address is used.
async fn address_that_never_connects() -> (TcpListener, std::net::TcpStream, SocketAddr) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind 127.0.0.1:0");
    let listener = socket.listen(0).expect("listen with a backlog of 0");
    let addr = listener.local_addr().expect("address");
    let filler = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .expect("the first connection fills the accept queue");
    // Check the trick works on this kernel: a further handshake must hang, not fail fast.
    let probe = tokio::task::spawn_blocking(move || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300))
    })
    .await
    .expect("probe task");
    match probe {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
        other => panic!(
            "a connection to a full accept queue should hang (SYN dropped), got {other:?}; \
             this kernel does not drop SYNs to a full queue (net.ipv4.tcp_abort_on_overflow?)"
        ),
    }
    (listener, filler, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_accepts_gets_502_within_the_connect_timeout() {
    let (_listener, _filler, addr) = address_that_never_connects().await;
    let g = TestGateway::start(&config(
        &format!("http://{addr}"),
        "upstream_connect_timeout = \"300ms\"\nupstream_response_timeout = \"20s\"",
        "max_concurrent = 1\nmonthly_tokens = 100000",
    ))
    .await;
    let key = g.add_key("acme", "free");
    let url = g.url("/v1/chat/completions");
    let c = client();
    for attempt in 0..2 {
        let started = Instant::now();
        let a = tokio::time::timeout(
            Duration::from_secs(10),
            send(&c, chat_request(&url, &key, &hello(5), &[])),
        )
        .await
        .expect("the gateway must answer, not hang on the connect");
        let took = started.elapsed();
        // The second attempt also gets 502, not 429: the first one's concurrency slot came back.
        assert_eq!(a.status, 502, "attempt {attempt}: {}", a.text());
        assert_eq!(a.json()["error"]["code"], "upstream_unavailable");
        assert_eq!(a.header("retry-after"), Some("1"));
        assert!(
            took >= Duration::from_millis(290),
            "attempt {attempt}: answered in {took:?}, before the 300ms connect timeout"
        );
        assert!(
            took < Duration::from_secs(3),
            "attempt {attempt}: answered in {took:?}: the connect timeout is 300ms"
        );
    }
    // Nothing was generated: no tokens charged, nothing left reserved; the requests count.
    assert_eq!(month_usage(&g, "acme"), (0, 0));
    let rows = usage_rows(&g, "acme");
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (
            rows[0].requests,
            rows[0].prompt_tokens,
            rows[0].completion_tokens
        ),
        (2, 0, 0)
    );
}

/// One HTTP/1.1 connection to the gateway, and when the gateway closed it.
async fn one_connection(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<Instant>,
) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    let closed = tokio::spawn(async move {
        let _ = conn.await;
        Instant::now()
    });
    (sender, closed)
}

async fn send_on(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Answer {
    sender.ready().await.expect("the connection is open");
    let resp = sender.send_request(req).await.expect("a response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("the body").to_bytes();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_connection_is_closed_after_the_idle_timeout_but_a_slow_answer_is_not_idleness()
 {
    let upstream = Upstream::start(UpstreamOptions::default());
    // The header timeout (which also bounds keep-alive idling) is far longer: what closes the
    // connections below at 400ms is the idle timeout.
    let g = TestGateway::start(&config(
        &upstream.url(),
        "idle_timeout = \"400ms\"\nheader_read_timeout = \"5s\"",
        "",
    ))
    .await;
    let key = g.add_key("acme", "free");
    let path = "/v1/chat/completions";
    let (mut conn, closed) = one_connection(g.addr).await;

    // Being served is not idleness: an upstream three times slower than the idle timeout...
    let a = send_on(
        &mut conn,
        chat_request(path, &key, &hello(5), &[(up::DELAY_MS, "1200")]),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    // ...a stream with pauses longer than the idle timeout between its events...
    let stream = json!({"model": "gpt-test", "stream": true, "max_tokens": 3,
        "messages": [{"role": "user", "content": "hi"}]});
    let a = send_on(
        &mut conn,
        chat_request(
            path,
            &key,
            &stream,
            &[(up::CHUNK_DELAY_MS, "600"), (up::COMPLETION_WORDS, "3")],
        ),
    )
    .await;
    assert_eq!(a.status, 200);
    let text = a.text();
    assert!(text.contains("w0") && text.contains(" w2"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    // ...and the same connection still serves the next request.
    let a = send_on(&mut conn, chat_request(path, &key, &hello(5), &[])).await;
    assert_eq!(a.status, 200);
    let answered = Instant::now();
    assert!(!closed.is_finished(), "closed while being served");

    // Then nothing moves: closed after the idle timeout.
    let closed_at = tokio::time::timeout(Duration::from_secs(4), closed)
        .await
        .expect("an idle keep-alive connection must be closed")
        .expect("connection task");
    let idle = closed_at - answered;
    assert!(
        (Duration::from_millis(300)..Duration::from_millis(2500)).contains(&idle),
        "closed after {idle:?} idle; the idle timeout is 400ms"
    );

    // A connection that never sends a byte: the same.
    let mut s = TcpStream::connect(g.addr).await.expect("connect");
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(4), s.read(&mut buf))
        .await
        .expect("a silent connection must be closed");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "closed without an answer: {read:?}"
    );
    let idle = started.elapsed();
    assert!(
        (Duration::from_millis(300)..Duration::from_millis(2500)).contains(&idle),
        "closed after {idle:?}; the idle timeout is 400ms"
    );
    assert_eq!(upstream.requests().len(), 3);
}

/// What the endless stream's producer saw.
#[derive(Debug)]
enum StreamEnd {
    /// The gateway dropped the upstream connection after `events` events.
    Dropped { events: usize, at: Instant },
    /// Every event was delivered: the gateway never stopped reading.
    Finished,
}

/// Padding events of an endless stream: 16 KiB, no text and no usage.
const PAD_EVENTS: usize = 8192;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_stops_reading_its_stream_is_cut_off_and_its_request_settled() {
    let (ends_tx, mut ends) = mpsc::unbounded_channel::<StreamEnd>();
    let first_text = "w0 w1 w2";
    let upstream = Scripted::start(move |parts, _body| {
        let ends_tx = ends_tx.clone();
        async move {
            if parts.headers.get("x-endless").is_none() {
                return whole("application/json", SMALL_COMPLETION);
            }
            let (response, tx) = fed("text/event-stream");
            tokio::spawn(async move {
                let first = format!(
                    "data: {}\n\n",
                    json!({"choices": [{"index": 0, "delta": {"content": first_text}}]})
                );
                let pad = Bytes::from(format!(
                    "data: {}\n\n",
                    json!({"choices": [], "pad": "x".repeat(16 << 10)})
                ));
                if tx.send(Bytes::from(first)).await.is_err() {
                    let _ = ends_tx.send(StreamEnd::Dropped {
                        events: 0,
                        at: Instant::now(),
                    });
                    return;
                }
                for i in 0..PAD_EVENTS {
                    if tx.send(pad.clone()).await.is_err() {
                        let _ = ends_tx.send(StreamEnd::Dropped {
                            events: i + 1,
                            at: Instant::now(),
                        });
                        return;
                    }
                }
                let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                let _ = ends_tx.send(StreamEnd::Finished);
            });
            response
        }
    })
    .await;
    let g = TestGateway::start(&config(
        &upstream.url(),
        "idle_timeout = \"400ms\"\nheader_read_timeout = \"5s\"",
        "max_concurrent = 1",
    ))
    .await;
    let key = g.add_key("acme", "free");
    let stall_key = key_id(&g, "acme");
    let body = json!({"model": "gpt-test", "stream": true, "max_tokens": 1000000,
        "messages": [{"role": "user", "content": "hi"}]});

    // A client with a small receive window, which reads the start of its stream and stops.
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut stalled = socket.connect(g.addr).await.expect("connect");
    stalled
        .write_all(raw_chat(&key, "x-endless: 1\r\n", &body.to_string()).as_bytes())
        .await
        .expect("write");
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 4096];
    tokio::time::timeout(Duration::from_secs(5), async {
        while !String::from_utf8_lossy(&seen).contains(first_text) {
            let n = stalled.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the stream's first event");
    assert!(
        String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    let stalled_at = Instant::now();

    // The stream holds the tenant's one slot while it runs.
    let url = g.url("/v1/chat/completions");
    let c = client();
    let second = g.add_key("acme", "free");
    let held = send(&c, chat_request(&url, &second, &hello(5), &[])).await;
    assert_eq!(held.status, 429, "the stalled stream holds the slot");

    // Meanwhile another tenant is served, promptly.
    let other = g.add_key("bystander", "free");
    for _ in 0..10 {
        let t = Instant::now();
        let a = send(&c, chat_request(&url, &other, &hello(5), &[])).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }

    // The gateway's writes stop moving once the buffers are full; the idle timeout then closes
    // the client connection and drops the upstream one.
    let end = tokio::time::timeout(Duration::from_secs(15), ends.recv())
        .await
        .expect("the gateway must drop the stalled stream")
        .expect("the producer reports");
    let StreamEnd::Dropped { events, at } = end else {
        panic!("the whole endless stream was delivered to a client that stopped reading")
    };
    eprintln!(
        "stream dropped after {events} events of 16 KiB, {:?} after the client stopped reading",
        at - stalled_at
    );
    assert!(events < PAD_EVENTS, "{events} events");
    let after = at - stalled_at;
    assert!(
        after >= Duration::from_millis(400),
        "dropped {after:?} after the client stopped reading: before the idle timeout"
    );
    assert!(
        after < Duration::from_secs(10),
        "dropped only after {after:?}"
    );

    // Settled: the slot is back, nothing stays reserved, and the usage is what was delivered
    // (the gateway's prompt estimate and the tokens of the one text event).
    let tokenizer = Tokenizer::load(TokenizerName::O200kBase);
    let prompt = tokenizer.prompt_tokens(&body);
    let completion = tokenizer.count(first_text);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let a = send(&c, chat_request(&url, &second, &hello(5), &[])).await;
        if a.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the slot never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(month_usage(&g, "acme"), (prompt + completion + 10, 0));
    let row = usage_rows(&g, "acme")
        .into_iter()
        .find(|r| r.key == stall_key)
        .expect("the stalled request's usage");
    assert_eq!(
        (row.requests, row.prompt_tokens, row.completion_tokens),
        (1, prompt, completion)
    );

    // The client, reading again, gets what was buffered and then the end: no [DONE].
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => rest.extend_from_slice(&buf[..n]),
            }
            assert!(rest.len() < 256 << 20, "unbounded");
        }
    })
    .await;
    assert!(read.is_ok(), "the stalled connection was not closed");
    assert!(!String::from_utf8_lossy(&rest).contains("[DONE]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_pooled_and_reused() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(&upstream.url(), "", "")).await;
    let key = g.add_key("acme", "free");
    let url = g.url("/v1/chat/completions");
    let c = client();
    // One after the other: one upstream connection for all of them.
    for i in 0..20 {
        let a = send(&c, chat_request(&url, &key, &hello(5), &[])).await;
        assert_eq!(a.status, 200, "request {i}");
        // Time for the connection to go back to the pool before the next request.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(upstream.requests().len(), 20);
    assert_eq!(
        upstream.connections(),
        1,
        "20 sequential requests, one connection"
    );

    // Four at a time, for five rounds: four connections, opened in the first round.
    for round in 0..5 {
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (c, url, key) = (client(), url.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                send(
                    &c,
                    chat_request(&url, &key, &hello(5), &[(up::DELAY_MS, "200")]),
                )
                .await
                .status
            }));
        }
        for t in tasks {
            assert_eq!(t.await.expect("client task"), 200, "round {round}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(upstream.max_in_flight(), 4);
    assert_eq!(upstream.requests().len(), 40);
    assert_eq!(
        upstream.connections(),
        4,
        "40 requests, at most 4 at once: 4 connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_response_is_passed_through_chunk_by_chunk_and_intact() {
    let (feeds_tx, mut feeds) = mpsc::unbounded_channel::<mpsc::Sender<Bytes>>();
    let upstream = Scripted::start(move |parts, _body| {
        let feeds_tx = feeds_tx.clone();
        async move {
            let ct = parts
                .headers
                .get("x-content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/json")
                .to_owned();
            let (response, tx) = fed(&ct);
            let _ = feeds_tx.send(tx);
            response
        }
    })
    .await;
    let g = TestGateway::start(&config(&upstream.url(), "", "")).await;
    let url = g.url("/v1/chat/completions");
    let c = client();

    let json_body = br#"{"object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"a b c"},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}"#;
    let binary: Vec<u8> = (0..=255u8).cycle().take(100_003).collect();
    let cases: [(&str, &str, Vec<Bytes>); 2] = [
        (
            "json",
            "application/json",
            vec![
                Bytes::copy_from_slice(&json_body[..40]),
                Bytes::copy_from_slice(&json_body[40..130]),
                Bytes::copy_from_slice(&json_body[130..]),
            ],
        ),
        (
            "binary",
            "application/octet-stream",
            vec![
                Bytes::copy_from_slice(&binary[..1]),
                Bytes::copy_from_slice(&binary[1..70_001]),
                Bytes::copy_from_slice(&binary[70_001..]),
            ],
        ),
    ];
    for (tenant, ct, chunks) in cases {
        let key = g.add_key(tenant, "free");
        let req = chat_request(&url, &key, &hello(50), &[("x-content-type", ct)]);
        let c2 = c.clone();
        let response = tokio::spawn(async move { c2.request(req).await.expect("a response") });
        let feed = tokio::time::timeout(Duration::from_secs(5), feeds.recv())
            .await
            .expect("the request reaches the upstream")
            .expect("a feed");
        let response = tokio::time::timeout(Duration::from_secs(5), response)
            .await
            .expect("the response head arrives before any chunk")
            .expect("client task");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], ct);
        assert!(
            response.headers().get(header::CONTENT_LENGTH).is_none(),
            "a chunked body stays chunked"
        );
        let mut body = response.into_body();
        let mut received = Vec::new();
        let mut expected = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            feed.send(chunk.clone())
                .await
                .expect("the gateway reads on");
            expected.extend_from_slice(chunk);
            // This chunk must reach the client before the upstream sends the next one.
            tokio::time::timeout(Duration::from_secs(3), async {
                while received.len() < expected.len() {
                    let frame = body
                        .frame()
                        .await
                        .expect("the body goes on")
                        .expect("a frame");
                    if let Ok(data) = frame.into_data() {
                        received.extend_from_slice(&data);
                    }
                }
            })
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{tenant}: chunk {i} was held back: {} of {} bytes arrived",
                    received.len(),
                    expected.len()
                )
            });
            assert_eq!(received, expected, "{tenant}: the bytes so far, intact");
        }
        drop(feed);
        let end = tokio::time::timeout(Duration::from_secs(3), body.frame())
            .await
            .expect("the body ends when the upstream's does");
        assert!(end.is_none(), "{tenant}: nothing after the last chunk");
    }
    // The JSON's usage was read from its pieces; the binary body is charged the prompt.
    assert_eq!(month_usage(&g, "json"), (18, 0));
    assert_eq!(month_usage(&g, "binary"), (HELLO_PROMPT, 0));
}

/// A chat request body of exactly `len` bytes.
fn body_of_len(len: usize) -> String {
    let shell = hello(5);
    let empty = {
        let mut b = shell.clone();
        b["messages"][0]["content"] = json!("");
        b.to_string().len()
    };
    let mut b = shell;
    b["messages"][0]["content"] = json!("x".repeat(len - empty));
    let s = b.to_string();
    assert_eq!(s.len(), len);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_cap_holds_for_chunked_requests_without_a_length() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(&upstream.url(), "max_request_bytes = 4096", "")).await;
    let key = g.add_key("acme", "free");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    let exchange = |body: &str, sizes: &[usize]| {
        let mut bytes = head.clone().into_bytes();
        bytes.extend_from_slice(&chunked(body.as_bytes(), sizes));
        bytes
    };

    // Exactly the cap, in three chunks: passes, and goes upstream with its length.
    let at_cap = body_of_len(4096);
    let r = raw_exchange(
        g.addr,
        &exchange(&at_cap, &[1000, 3000]),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&r), Some(200), "{r}");
    let seen = upstream.requests().pop().expect("forwarded");
    assert_eq!(seen.body.len(), 4096);
    assert_eq!(seen.header("content-length"), Some("4096"));
    assert!(seen.header("transfer-encoding").is_none());
    assert_eq!(
        seen.json().expect("json"),
        serde_json::from_str::<serde_json::Value>(&at_cap).expect("json")
    );

    // One byte over: 413.
    let over = body_of_len(4097);
    let r = raw_exchange(
        g.addr,
        &exchange(&over, &[1000, 3000]),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&r), Some(413), "{r}");
    assert!(r.contains("request_too_large"), "{r}");

    // A large upload that keeps coming: 413 without reading it all, and the connection closed.
    let mut s = TcpStream::connect(g.addr).await.expect("connect");
    let (mut rd, mut wr) = s.split();
    let write = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = wr.write_all(head.as_bytes()).await;
        let piece = vec![b'x'; 16 << 10];
        for _ in 0..64 {
            let mut c = format!("{:x}\r\n", piece.len()).into_bytes();
            c.extend_from_slice(&piece);
            c.extend_from_slice(b"\r\n");
            if wr.write_all(&c).await.is_err() {
                break;
            }
        }
    });
    let read = async {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut out)).await;
        out
    };
    let (_, out) = tokio::join!(write, read);
    let r = String::from_utf8_lossy(&out);
    assert_eq!(status_of(&r), Some(413), "{r}");
    assert_eq!(
        upstream.requests().len(),
        1,
        "nothing over the cap went upstream"
    );
    assert_eq!(g.gw.counters.bad_requests.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_clients_at_once_do_not_slow_a_good_one_down() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(
        &upstream.url(),
        "max_request_bytes = 4096\nheader_read_timeout = \"1s\"",
        "",
    ))
    .await;
    let good = g.add_key("acme", "free");
    let bad = g.add_key("mallory", "free");
    let addr = g.addr;
    let url = g.url("/v1/chat/completions");
    let stop = Arc::new(AtomicBool::new(false));
    /// Bounds every hostile loop, whatever happens to the stop flag.
    const MAX_ROUNDS: usize = 2000;
    let pace = Duration::from_millis(10);

    type Hostile = tokio::task::JoinHandle<(&'static str, usize)>;
    let mut hostiles: Vec<Hostile> = Vec::new();
    let started = Arc::new(AtomicUsize::new(0));

    // Slowloris: four connections that send their head a byte at a time; each is closed by
    // the header timeout (1 s) and comes back.
    for _ in 0..4 {
        let (stop, started) = (stop.clone(), started.clone());
        hostiles.push(tokio::spawn(async move {
            let mut closed = 0;
            started.fetch_add(1, Ordering::SeqCst);
            while !stop.load(Ordering::SeqCst) && closed < MAX_ROUNDS {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                let opened = Instant::now();
                s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-slow: ")
                    .await
                    .expect("write");
                loop {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let wrote = s.write_all(b"a").await;
                    let mut buf = [0u8; 256];
                    let read =
                        tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await;
                    if wrote.is_err() || matches!(read, Ok(Ok(0)) | Ok(Err(_))) {
                        closed += 1;
                        break;
                    }
                    let held = opened.elapsed();
                    assert!(
                        held < Duration::from_secs(3),
                        "a slowloris connection held for {held:?}; the header timeout is 1s"
                    );
                }
            }
            ("slowloris closed", closed)
        }));
    }

    // Invalid JSON, and bodies over the cap (declared, and chunked without a length).
    {
        let (stop, started, url, key) = (stop.clone(), started.clone(), url.clone(), bad.clone());
        hostiles.push(tokio::spawn(async move {
            let c = client();
            let mut n = 0;
            started.fetch_add(1, Ordering::SeqCst);
            while !stop.load(Ordering::SeqCst) && n < MAX_ROUNDS {
                let a = send(
                    &c,
                    Request::post(&url)
                        .header("authorization", format!("Bearer {key}"))
                        .body(Full::new(Bytes::from_static(b"{\"model\": ")))
                        .expect("request"),
                )
                .await;
                assert_eq!(a.status, 400, "invalid JSON: {}", a.text());
                n += 1;
                tokio::time::sleep(pace).await;
            }
            ("invalid json", n)
        }));
    }
    {
        let (stop, started, key) = (stop.clone(), started.clone(), bad.clone());
        hostiles.push(tokio::spawn(async move {
            let mut n = 0;
            let big = json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(10_000)}]});
            let bytes = raw_chat(&key, "connection: close\r\n", &big.to_string());
            started.fetch_add(1, Ordering::SeqCst);
            while !stop.load(Ordering::SeqCst) && n < MAX_ROUNDS {
                let r = raw_exchange(addr, bytes.as_bytes(), Duration::from_secs(5)).await;
                assert_eq!(status_of(&r), Some(413), "declared oversize: {r}");
                assert_eq!(r.matches("HTTP/1.1 ").count(), 1, "{r}");
                n += 1;
                tokio::time::sleep(pace).await;
            }
            ("oversized, declared", n)
        }));
    }
    {
        let (stop, started, key) = (stop.clone(), started.clone(), bad.clone());
        hostiles.push(tokio::spawn(async move {
            let mut n = 0;
            let mut bytes = format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
            )
            .into_bytes();
            bytes.extend_from_slice(&chunked(&[b'x'; 5000], &[2000, 2000]));
            started.fetch_add(1, Ordering::SeqCst);
            while !stop.load(Ordering::SeqCst) && n < MAX_ROUNDS {
                let r = raw_exchange(addr, &bytes, Duration::from_secs(5)).await;
                assert_eq!(status_of(&r), Some(413), "chunked oversize: {r}");
                n += 1;
                tokio::time::sleep(pace).await;
            }
            ("oversized, chunked", n)
        }));
    }
    // Content-Length with Transfer-Encoding, with a second request smuggled behind the chunked
    // body: the chunked body wins, and the connection is closed after one answer.
    {
        let (stop, started, key) = (stop.clone(), started.clone(), bad.clone());
        hostiles.push(tokio::spawn(async move {
            let mut n = 0;
            let body = hello(5).to_string();
            let mut bytes = format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            .into_bytes();
            bytes.extend_from_slice(&chunked(body.as_bytes(), &[]));
            bytes.extend_from_slice(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n");
            started.fetch_add(1, Ordering::SeqCst);
            while !stop.load(Ordering::SeqCst) && n < MAX_ROUNDS {
                let r = raw_exchange(addr, &bytes, Duration::from_secs(5)).await;
                assert_eq!(status_of(&r), Some(200), "CL+TE: {r}");
                assert_eq!(r.matches("HTTP/1.1 ").count(), 1, "smuggled: {r}");
                n += 1;
                tokio::time::sleep(pace).await;
            }
            ("content-length with chunked", n)
        }));
    }
    // Two Content-Lengths: different ones are refused by the parser; equal ones are one.
    let dup_same = Arc::new(AtomicUsize::new(0));
    {
        let (stop, started, key, dup_same) =
            (stop.clone(), started.clone(), bad.clone(), dup_same.clone());
        hostiles.push(tokio::spawn(async move {
            let mut n = 0;
            let body = hello(5).to_string();
            let differ = raw_chat(&key, "content-length: 3\r\n", &body);
            let same = raw_chat(
                &key,
                &format!("connection: close\r\ncontent-length: {}\r\n", body.len()),
                &body,
            );
            started.fetch_add(1, Ordering::SeqCst);
            while !stop.load(Ordering::SeqCst) && n < MAX_ROUNDS {
                let r = raw_exchange(addr, differ.as_bytes(), Duration::from_secs(5)).await;
                assert_eq!(status_of(&r), Some(400), "conflicting lengths: {r}");
                let r = raw_exchange(addr, same.as_bytes(), Duration::from_secs(5)).await;
                assert_eq!(status_of(&r), Some(200), "equal lengths: {r}");
                assert_eq!(r.matches("HTTP/1.1 ").count(), 1, "{r}");
                dup_same.fetch_add(1, Ordering::SeqCst);
                n += 1;
                tokio::time::sleep(pace).await;
            }
            ("duplicate content-length", n)
        }));
    }
    let hostile_count = hostiles.len();
    let deadline = Instant::now() + Duration::from_secs(5);
    while started.load(Ordering::SeqCst) < hostile_count {
        assert!(
            Instant::now() < deadline,
            "the hostile clients did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The good client: 50 requests, one every 50 ms, through the whole attack.
    let c = client();
    let mut slowest = Duration::ZERO;
    for i in 0..50 {
        let t = Instant::now();
        let a = send(&c, chat_request(&url, &good, &hello(5), &[])).await;
        let took = t.elapsed();
        assert_eq!(a.status, 200, "good request {i}: {}", a.text());
        assert!(
            took < Duration::from_millis(500),
            "good request {i} took {took:?} during the attack"
        );
        slowest = slowest.max(took);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut done = Vec::new();
    for h in hostiles {
        done.push(
            tokio::time::timeout(Duration::from_secs(10), h)
                .await
                .expect("a hostile client stops")
                .expect("hostile client task (its assertions)"),
        );
    }
    eprintln!("slowest good request: {slowest:?}; hostile rounds: {done:?}");
    let rounds = |name: &str| -> usize {
        done.iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, k)| *k)
            .sum()
    };
    // Every kind of attack ran all along (the good client took 2.5 s or more).
    assert!(rounds("slowloris closed") >= 4, "{done:?}");
    for name in [
        "invalid json",
        "oversized, declared",
        "oversized, chunked",
        "content-length with chunked",
        "duplicate content-length",
    ] {
        assert!(rounds(name) >= 5, "{name}: {done:?}");
    }
    // The gateway's own count agrees: what it refused, and what it let through.
    let counters = &g.gw.counters;
    let allowed = 50 + rounds("content-length with chunked") + dup_same.load(Ordering::SeqCst);
    let refused =
        rounds("invalid json") + rounds("oversized, declared") + rounds("oversized, chunked");
    assert_eq!(counters.allowed.load(Ordering::Relaxed) as usize, allowed);
    assert_eq!(
        counters.bad_requests.load(Ordering::Relaxed) as usize,
        refused
    );
    assert_eq!(
        counters.requests.load(Ordering::Relaxed) as usize,
        allowed + refused
    );
    assert_eq!(upstream.requests().len(), allowed);
    // And the gateway still serves.
    let a = send(&c, chat_request(&url, &good, &hello(5), &[])).await;
    assert_eq!(a.status, 200);
}
