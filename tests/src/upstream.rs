//! A fake OpenAI-compatible inference server: the upstream behind the gateway in tests and
//! benchmarks.
//!
//! It speaks enough of the OpenAI API for the official clients (`POST /v1/chat/completions`,
//! streaming or not, `GET /v1/models`, `GET /health`) over real HTTP/1.1 with keep-alive, and
//! answers deterministically, so a test can predict every body and token count. Request headers
//! steer it (see [`headers`]); every request is recorded so a test can check what the gateway
//! forwarded, and the number of requests open at once is tracked for concurrency caps.
//!
//! [`Upstream::start`] runs it on a background thread with a runtime of its own, so sync and
//! async tests use it alike; [`serve`] runs it on an already-bound listener of the caller's
//! runtime (the `aiguard-fake-upstream` binary).
use std::{
    convert::Infallible,
    future::Future,
    net::{SocketAddr, TcpListener as StdTcpListener},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    thread::{self, JoinHandle},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};

/// Request headers that steer one answer.
pub mod headers {
    /// Number of words in the completion (default: [`super::UpstreamOptions::completion_words`]).
    pub const COMPLETION_WORDS: &str = "x-test-completion-words";
    /// `usage.prompt_tokens` to report (default: words in the messages + 3 per message).
    pub const PROMPT_TOKENS: &str = "x-test-prompt-tokens";
    /// Milliseconds between two streamed events (default: [`super::UpstreamOptions::chunk_delay`]).
    pub const CHUNK_DELAY_MS: &str = "x-test-chunk-delay-ms";
    /// `1`: report no usage at all, streaming or not (the gateway must count tokens itself).
    pub const NO_USAGE: &str = "x-test-no-usage";
    /// Answer this status with an OpenAI-style error body instead.
    pub const STATUS: &str = "x-test-status";
    /// Milliseconds to wait before the response head.
    pub const DELAY_MS: &str = "x-test-delay-ms";
}

/// How long a stopping server waits for open connections to finish their responses.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// What the server answers when a request does not say otherwise.
#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    /// Words in each completion, `w0 w1 ...`. Default 8.
    pub completion_words: usize,
    /// Pause between two streamed events. Default none.
    pub chunk_delay: Duration,
    /// The model `GET /v1/models` lists. Default `gpt-test`.
    pub model: String,
    /// Keep every request for [`Upstream::requests`]. Default on; a benchmark turns it off, or
    /// memory grows with every request.
    pub record_requests: bool,
    /// Requests worked on at once, like an inference server's batch size: more wait their
    /// turn, first come first served. Default: no limit.
    pub capacity: Option<usize>,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        Self {
            completion_words: 8,
            chunk_delay: Duration::ZERO,
            model: "gpt-test".to_owned(),
            record_requests: true,
            capacity: None,
        }
    }
}

/// One request as the server received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: Method,
    /// Path and query, as sent.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl RecordedRequest {
    /// The body as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// A header's value, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }
}

/// State shared by every connection of one server.
struct Shared {
    options: UpstreamOptions,
    // std Mutex: held only to push or clone, never across an await.
    requests: Mutex<Vec<RecordedRequest>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// TCP connections accepted, for tests of the gateway's connection pool.
    connections: AtomicUsize,
    next_id: AtomicU64,
    /// [`UpstreamOptions::capacity`]'s permits (tokio's semaphore is fair: FIFO).
    capacity: Option<tokio::sync::Semaphore>,
}

impl Shared {
    fn new(options: UpstreamOptions) -> Arc<Self> {
        Arc::new(Self {
            capacity: options.capacity.map(tokio::sync::Semaphore::new),
            options,
            requests: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
        })
    }
}

/// A running fake upstream on `127.0.0.1`, with its own thread and runtime. Stops on drop.
pub struct Upstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    /// Binds `127.0.0.1:0` and serves until dropped.
    pub fn start(options: UpstreamOptions) -> Self {
        let listener =
            StdTcpListener::bind("127.0.0.1:0").expect("binding the fake upstream on 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("making the fake upstream's listener non-blocking");
        let addr = listener
            .local_addr()
            .expect("the fake upstream's bound address");
        let shared = Shared::new(options);
        let (shutdown, stop) = oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-upstream")
            .enable_all()
            .build()
            .expect("building the fake upstream's runtime");
        let server_shared = shared.clone();
        let thread = thread::Builder::new()
            .name("fake-upstream".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener)
                        .expect("registering the fake upstream's listener");
                    run(listener, server_shared, async {
                        let _ = stop.await;
                    })
                    .await;
                });
                // Streams still being produced are dropped with their tasks.
                runtime.shutdown_timeout(Duration::from_millis(100));
            })
            .expect("starting the fake upstream's thread");
        Self {
            addr,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, as an `upstreams` entry of the gateway's config.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared
            .requests
            .lock()
            .expect("the request log is never poisoned")
            .clone()
    }

    /// Requests whose response has not been sent completely yet.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// The most requests that were open at once.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far (a client that reuses its connections opens few).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves on `listener` until `shutdown` completes, then lets open responses finish (bounded).
pub async fn serve(
    listener: TcpListener,
    options: UpstreamOptions,
    shutdown: impl Future<Output = ()>,
) {
    run(listener, Shared::new(options), shutdown).await;
}

async fn run(listener: TcpListener, shared: Arc<Shared>, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    eprintln!("fake upstream: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        // Streamed events go out one by one, not held back by Nagle.
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let conn = http1::Builder::new()
            .keep_alive(true)
            .timer(TokioTimer::new())
            .serve_connection(
                TokioIo::new(stream),
                service_fn(move |req| handle(shared.clone(), req)),
            );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(DRAIN_TIMEOUT) => {}
    }
}

/// Counts a request as open from its arrival until its response body is dropped (sent or
/// abandoned).
struct InFlight(Arc<Shared>);

impl InFlight {
    fn enter(shared: Arc<Shared>) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A whole body, or events sent one by one through a channel.
struct ReplyBody {
    kind: BodyKind,
    _in_flight: Option<InFlight>,
}

enum BodyKind {
    Whole(Option<Bytes>),
    Events(mpsc::Receiver<Bytes>),
}

impl Body for ReplyBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut self.get_mut().kind {
            BodyKind::Whole(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            BodyKind::Events(rx) => rx
                .poll_recv(cx)
                .map(|event| event.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.kind, BodyKind::Whole(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Whole(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            BodyKind::Events(_) => SizeHint::default(),
        }
    }
}

/// What the `x-test-*` headers of one request ask for.
struct Directives {
    completion_words: usize,
    prompt_tokens: Option<u64>,
    chunk_delay: Duration,
    no_usage: bool,
    status: Option<StatusCode>,
    delay: Duration,
}

impl Directives {
    /// Reads the directives, or says which header is malformed.
    fn parse(headers: &HeaderMap, options: &UpstreamOptions) -> Result<Self, String> {
        fn number<T: std::str::FromStr>(
            headers: &HeaderMap,
            name: &str,
        ) -> Result<Option<T>, String> {
            let Some(value) = headers.get(name) else {
                return Ok(None);
            };
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .map(Some)
                .ok_or_else(|| format!("{name}: {value:?} is not a number"))
        }
        let status = number::<u16>(headers, headers::STATUS)?
            .map(|code| {
                StatusCode::from_u16(code)
                    .map_err(|_| format!("{}: {code} is no status", headers::STATUS))
            })
            .transpose()?;
        Ok(Self {
            completion_words: number(headers, headers::COMPLETION_WORDS)?
                .unwrap_or(options.completion_words),
            prompt_tokens: number(headers, headers::PROMPT_TOKENS)?,
            chunk_delay: number(headers, headers::CHUNK_DELAY_MS)?
                .map_or(options.chunk_delay, Duration::from_millis),
            no_usage: headers
                .get(headers::NO_USAGE)
                .is_some_and(|v| !matches!(v.as_bytes(), b"0" | b"false" | b"")),
            status,
            delay: number(headers, headers::DELAY_MS)?
                .map_or(Duration::ZERO, Duration::from_millis),
        })
    }
}

/// The fields of a chat completion request this server looks at; the rest is ignored.
#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct ChatMessage {
    #[serde(default)]
    content: Option<MessageContent>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

impl ChatRequest {
    /// Whitespace-separated words in every message, plus 3 per message (OpenAI's per-message
    /// overhead).
    fn prompt_tokens(&self) -> u64 {
        let words: usize = self
            .messages
            .iter()
            .map(|m| match &m.content {
                None => 0,
                Some(MessageContent::Text(text)) => text.split_whitespace().count(),
                Some(MessageContent::Parts(parts)) => parts
                    .iter()
                    .filter_map(|p| p.text.as_deref())
                    .map(|t| t.split_whitespace().count())
                    .sum(),
            })
            .sum();
        (words + 3 * self.messages.len()) as u64
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<ReplyBody>, Infallible> {
    let in_flight = InFlight::enter(shared.clone());
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return Ok(error(
                StatusCode::BAD_REQUEST,
                &format!("reading the request body: {e}"),
                "invalid_request_error",
                None,
            ));
        }
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
    if shared.options.record_requests {
        shared
            .requests
            .lock()
            .expect("the request log is never poisoned")
            .push(RecordedRequest {
                method: parts.method.clone(),
                path: path.clone(),
                headers: parts.headers.clone(),
                body: body.clone(),
            });
    }
    let directives = match Directives::parse(&parts.headers, &shared.options) {
        Ok(d) => d,
        Err(message) => {
            return Ok(error(
                StatusCode::BAD_REQUEST,
                &message,
                "invalid_request_error",
                None,
            ));
        }
    };
    // The work (the delay) is done by at most `capacity` requests at once.
    let _working = match &shared.capacity {
        Some(permits) => Some(
            permits
                .acquire()
                .await
                .expect("the semaphore is never closed"),
        ),
        None => None,
    };
    if !directives.delay.is_zero() {
        tokio::time::sleep(directives.delay).await;
    }
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let mut response = if let Some(status) = directives.status {
        forced_error(status)
    } else {
        match (&parts.method, parts.uri.path()) {
            (&Method::POST, "/v1/chat/completions") => chat_completion(&body, &directives, id),
            (&Method::GET, "/v1/models") => json_response(
                StatusCode::OK,
                &json!({
                    "object": "list",
                    "data": [{
                        "id": shared.options.model,
                        "object": "model",
                        "created": 1_700_000_000,
                        "owned_by": "aiguard-tests",
                    }],
                }),
            ),
            (&Method::GET, "/health") => json_response(StatusCode::OK, &json!({"status": "ok"})),
            (method, path) => error(
                StatusCode::NOT_FOUND,
                &format!("Unknown request URL: {method} {path}."),
                "invalid_request_error",
                Some("unknown_url"),
            ),
        }
    };
    response.body_mut()._in_flight = Some(in_flight);
    response.headers_mut().insert(
        "x-request-id",
        HeaderValue::from_str(&format!("req_{id}")).expect("an ASCII request id"),
    );
    Ok(response)
}

fn chat_completion(body: &[u8], directives: &Directives, id: u64) -> Response<ReplyBody> {
    let request: ChatRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("We could not parse the JSON body of your request: {e}"),
                "invalid_request_error",
                None,
            );
        }
    };
    let cap = request.max_completion_tokens.or(request.max_tokens);
    let (words, finish_reason) = match cap {
        Some(cap) if (cap as usize) < directives.completion_words => (cap as usize, "length"),
        _ => (directives.completion_words, "stop"),
    };
    let prompt_tokens = directives
        .prompt_tokens
        .unwrap_or_else(|| request.prompt_tokens());
    let usage = (!directives.no_usage).then(|| {
        json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": words,
            "total_tokens": prompt_tokens + words as u64,
        })
    });
    let completion_id = format!("chatcmpl-aiguardtest{id}");
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());

    if request.stream != Some(true) {
        let text = (0..words)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        let mut completion = json!({
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": request.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
            "system_fingerprint": null,
        });
        if let Some(usage) = usage {
            completion["usage"] = usage;
        }
        return json_response(StatusCode::OK, &completion);
    }

    // Like OpenAI: usage only when asked for, then as `null` on every chunk and in full on an
    // extra chunk without choices.
    let include_usage = request
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let usage = usage.filter(|_| include_usage);
    let chunk = |delta: Value, finish: Option<&str>| {
        let mut chunk = json!({
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": request.model,
            "system_fingerprint": null,
            "choices": [{
                "index": 0,
                "delta": delta,
                "logprobs": null,
                "finish_reason": finish,
            }],
        });
        if usage.is_some() {
            chunk["usage"] = Value::Null;
        }
        event(&chunk)
    };
    let mut events = Vec::with_capacity(words + 4);
    events.push(chunk(json!({"role": "assistant", "content": ""}), None));
    for i in 0..words {
        let word = if i == 0 {
            "w0".to_owned()
        } else {
            format!(" w{i}")
        };
        events.push(chunk(json!({"content": word}), None));
    }
    events.push(chunk(json!({}), Some(finish_reason)));
    if let Some(usage) = usage {
        events.push(event(&json!({
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": request.model,
            "system_fingerprint": null,
            "choices": [],
            "usage": usage,
        })));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));

    let (tx, rx) = mpsc::channel(4);
    let delay = directives.chunk_delay;
    tokio::spawn(async move {
        for (i, event) in events.into_iter().enumerate() {
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            // The client went away: nothing left to send to.
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    let mut response = Response::new(ReplyBody {
        kind: BodyKind::Events(rx),
        _in_flight: None,
    });
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// One server-sent event carrying `value`.
fn event(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn json_response(status: StatusCode, value: &Value) -> Response<ReplyBody> {
    let mut response = Response::new(ReplyBody {
        kind: BodyKind::Whole(Some(Bytes::from(value.to_string()))),
        _in_flight: None,
    });
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`.
fn error(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response<ReplyBody> {
    json_response(
        status,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
    )
}

/// The error OpenAI would send with `status`, for `x-test-status`.
fn forced_error(status: StatusCode) -> Response<ReplyBody> {
    let (kind, code) = match status.as_u16() {
        401 => ("invalid_request_error", Some("invalid_api_key")),
        429 => ("requests", Some("rate_limit_exceeded")),
        500..=599 => ("server_error", None),
        _ => ("invalid_request_error", None),
    };
    error(
        status,
        &format!("{} asked for {}", headers::STATUS, status.as_u16()),
        kind,
        code,
    )
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use http_body_util::Full;
    use hyper::client::conn::http1 as client;

    use super::*;

    /// A response with its body frames and when each arrived.
    struct Reply {
        status: StatusCode,
        headers: HeaderMap,
        frames: Vec<(Instant, Bytes)>,
    }

    impl Reply {
        fn body(&self) -> Vec<u8> {
            self.frames
                .iter()
                .flat_map(|(_, b)| b.iter().copied())
                .collect()
        }

        fn json(&self) -> Value {
            serde_json::from_slice(&self.body()).expect("a JSON body")
        }

        /// The `data:` payloads of an event stream, checking its framing.
        fn events(&self) -> Vec<String> {
            let body = String::from_utf8(self.body()).expect("a UTF-8 body");
            assert!(
                body.ends_with("\n\n"),
                "unterminated event stream: {body:?}"
            );
            body.trim_end_matches("\n\n")
                .split("\n\n")
                .map(|e| {
                    e.strip_prefix("data: ")
                        .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                        .to_owned()
                })
                .collect()
        }
    }

    async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Reply {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connecting to the fake upstream");
        let (mut sender, conn) = client::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(conn);
        let response = sender.send_request(req).await.expect("a response");
        let (parts, mut body) = response.into_parts();
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("a body frame").into_data() {
                frames.push((Instant::now(), data));
            }
        }
        Reply {
            status: parts.status,
            headers: parts.headers,
            frames,
        }
    }

    fn chat(addr: SocketAddr, body: Value, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
        let mut req = Request::post("/v1/chat/completions")
            .header(header::HOST, addr.to_string())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, "Bearer sk-client");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.body(Full::new(Bytes::from(body.to_string())))
            .expect("a valid request")
    }

    fn get(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
        Request::get(path)
            .header(header::HOST, addr.to_string())
            .body(Full::new(Bytes::new()))
            .expect("a valid request")
    }

    fn hello(stream: Option<Value>) -> Value {
        let mut body = json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "say three words"}]},
            ],
        });
        if let Some(options) = stream {
            body["stream"] = json!(true);
            if !options.is_null() {
                body["stream_options"] = options;
            }
        }
        body
    }

    /// 2 + 3 words, 2 messages.
    const HELLO_PROMPT_TOKENS: u64 = 5 + 2 * 3;

    #[tokio::test]
    async fn non_streaming_has_openai_shape_and_usage() {
        let upstream = Upstream::start(UpstreamOptions::default());
        let reply = send(upstream.addr(), chat(upstream.addr(), hello(None), &[])).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.headers[header::CONTENT_TYPE], "application/json");
        let body = reply.json();
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["model"], "gpt-4o-mini");
        assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert!(body["created"].as_u64().unwrap() > 1_700_000_000);
        let choice = &body["choices"][0];
        assert_eq!(choice["index"], 0);
        assert_eq!(choice["message"]["role"], "assistant");
        assert_eq!(choice["message"]["content"], "w0 w1 w2 w3 w4 w5 w6 w7");
        assert_eq!(choice["finish_reason"], "stop");
        assert_eq!(
            body["usage"],
            json!({
                "prompt_tokens": HELLO_PROMPT_TOKENS,
                "completion_tokens": 8,
                "total_tokens": HELLO_PROMPT_TOKENS + 8,
            })
        );

        let requests = upstream.requests();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].method, Method::POST);
        assert_eq!(requests[0].path, "/v1/chat/completions");
        assert_eq!(
            requests[0].header("authorization"),
            Some("Bearer sk-client")
        );
        assert_eq!(requests[0].json().unwrap(), hello(None));
    }

    #[tokio::test]
    async fn headers_set_words_prompt_tokens_and_max_tokens_truncates() {
        let upstream = Upstream::start(UpstreamOptions::default());
        let addr = upstream.addr();
        let reply = send(
            addr,
            chat(
                addr,
                hello(None),
                &[
                    (headers::COMPLETION_WORDS, "3"),
                    (headers::PROMPT_TOKENS, "1000"),
                ],
            ),
        )
        .await;
        let body = reply.json();
        assert_eq!(body["choices"][0]["message"]["content"], "w0 w1 w2");
        assert_eq!(body["usage"]["prompt_tokens"], 1000);
        assert_eq!(body["usage"]["completion_tokens"], 3);
        assert_eq!(body["usage"]["total_tokens"], 1003);

        let mut capped = hello(None);
        capped["max_completion_tokens"] = json!(2);
        let body = send(addr, chat(addr, capped, &[])).await.json();
        assert_eq!(body["choices"][0]["message"]["content"], "w0 w1");
        assert_eq!(body["choices"][0]["finish_reason"], "length");
        assert_eq!(body["usage"]["completion_tokens"], 2);
    }

    #[tokio::test]
    async fn streaming_without_include_usage_sends_no_usage() {
        let upstream = Upstream::start(UpstreamOptions::default());
        let addr = upstream.addr();
        let reply = send(
            addr,
            chat(
                addr,
                hello(Some(Value::Null)),
                &[(headers::COMPLETION_WORDS, "3")],
            ),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(
            reply.headers[header::CONTENT_TYPE],
            "text/event-stream; charset=utf-8"
        );
        let events = reply.events();
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).expect("a JSON chunk"))
            .collect();
        // Role, three words, finish.
        assert_eq!(chunks.len(), 5);
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "w0 w1 w2");
        assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
        for chunk in &chunks {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["choices"].as_array().unwrap().len(), 1);
            assert!(chunk.get("usage").is_none(), "usage not asked for: {chunk}");
        }
    }

    #[tokio::test]
    async fn streaming_with_include_usage_ends_with_a_usage_chunk() {
        let upstream = Upstream::start(UpstreamOptions::default());
        let addr = upstream.addr();
        let reply = send(
            addr,
            chat(
                addr,
                hello(Some(json!({"include_usage": true}))),
                &[(headers::CHUNK_DELAY_MS, "30")],
            ),
        )
        .await;
        let events = reply.events();
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).expect("a JSON chunk"))
            .collect();
        // Role, eight words, finish, usage.
        assert_eq!(chunks.len(), 11);
        let (usage_chunk, rest) = chunks.split_last().unwrap();
        assert_eq!(usage_chunk["choices"], json!([]));
        assert_eq!(
            usage_chunk["usage"],
            json!({
                "prompt_tokens": HELLO_PROMPT_TOKENS,
                "completion_tokens": 8,
                "total_tokens": HELLO_PROMPT_TOKENS + 8,
            })
        );
        for chunk in rest {
            assert_eq!(chunk["usage"], Value::Null);
            assert_eq!(chunk["choices"].as_array().unwrap().len(), 1);
        }
        // Flushed one by one: the events arrive spread over the delays, not at once.
        assert!(reply.frames.len() >= 10, "{} frames", reply.frames.len());
        let spread = reply.frames.last().unwrap().0 - reply.frames[0].0;
        assert!(spread >= Duration::from_millis(250), "{spread:?}");
    }

    #[tokio::test]
    async fn no_usage_header_omits_usage_in_both_modes() {
        let upstream = Upstream::start(UpstreamOptions::default());
        let addr = upstream.addr();
        let no_usage = [(headers::NO_USAGE, "1")];
        let body = send(addr, chat(addr, hello(None), &no_usage)).await.json();
        assert_eq!(
            body["choices"][0]["message"]["content"],
            "w0 w1 w2 w3 w4 w5 w6 w7"
        );
        assert!(body.get("usage").is_none(), "{body}");

        let reply = send(
            addr,
            chat(addr, hello(Some(json!({"include_usage": true}))), &no_usage),
        )
        .await;
        let events = reply.events();
        assert_eq!(events.last().unwrap(), "[DONE]");
        for e in &events[..events.len() - 1] {
            let chunk: Value = serde_json::from_str(e).unwrap();
            assert!(chunk.get("usage").is_none(), "{chunk}");
            assert_eq!(chunk["choices"].as_array().unwrap().len(), 1);
        }
    }

    #[tokio::test]
    async fn status_header_answers_an_openai_error() {
        let upstream = Upstream::start(UpstreamOptions::default());
        let addr = upstream.addr();
        let reply = send(addr, chat(addr, hello(None), &[(headers::STATUS, "429")])).await;
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
        let body = reply.json();
        assert_eq!(body["error"]["type"], "requests");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        assert_eq!(body["error"]["param"], Value::Null);
        assert!(body["error"]["message"].is_string());

        let reply = send(addr, chat(addr, hello(None), &[(headers::STATUS, "503")])).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.json()["error"]["type"], "server_error");

        let reply = send(addr, chat(addr, hello(None), &[(headers::STATUS, "many")])).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn models_health_and_unknown_paths() {
        let upstream = Upstream::start(UpstreamOptions::default());
        let addr = upstream.addr();
        let models = send(addr, get(addr, "/v1/models")).await;
        assert_eq!(models.status, StatusCode::OK);
        assert_eq!(models.json()["data"][0]["id"], "gpt-test");
        assert_eq!(
            send(addr, get(addr, "/health")).await.status,
            StatusCode::OK
        );
        let unknown = send(addr, get(addr, "/v1/embeddings")).await;
        assert_eq!(unknown.status, StatusCode::NOT_FOUND);
        assert_eq!(unknown.json()["error"]["type"], "invalid_request_error");
        let bad = send(
            addr,
            Request::post("/v1/chat/completions")
                .header(header::HOST, addr.to_string())
                .body(Full::new(Bytes::from_static(b"{not json")))
                .unwrap(),
        )
        .await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        assert_eq!(upstream.requests().len(), 4);
    }

    #[tokio::test]
    async fn counts_requests_open_at_once() {
        let upstream = Upstream::start(UpstreamOptions::default());
        let addr = upstream.addr();
        let slow = |words: &'static str| {
            send(
                addr,
                chat(
                    addr,
                    hello(None),
                    &[
                        (headers::DELAY_MS, "200"),
                        (headers::COMPLETION_WORDS, words),
                    ],
                ),
            )
        };
        let started = Instant::now();
        let (a, b, c) = tokio::join!(slow("1"), slow("2"), slow("3"));
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(a.json()["choices"][0]["message"]["content"], "w0");
        assert_eq!(b.json()["choices"][0]["message"]["content"], "w0 w1");
        assert_eq!(c.json()["choices"][0]["message"]["content"], "w0 w1 w2");
        assert_eq!(upstream.max_in_flight(), 3);
        assert_eq!(upstream.in_flight(), 0);
    }

    #[test]
    fn keep_alive_serves_several_requests_on_one_connection() {
        use std::io::{BufRead as _, BufReader, Read as _, Write as _};

        let upstream = Upstream::start(UpstreamOptions::default());
        let mut stream = std::net::TcpStream::connect(upstream.addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        for _ in 0..3 {
            stream
                .write_all(b"GET /health HTTP/1.1\r\nhost: upstream\r\n\r\n")
                .unwrap();
            let mut status = String::new();
            reader.read_line(&mut status).unwrap();
            assert!(status.starts_with("HTTP/1.1 200"), "{status:?}");
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            assert_eq!(body, br#"{"status":"ok"}"#);
        }
        assert_eq!(upstream.requests().len(), 3);
    }
}
