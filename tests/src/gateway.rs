//! The gateway in the test's own process, on `127.0.0.1:0`, with its own store: the library's
//! real listeners, limiter, key ring and ledger, without the XDP part (so these tests need no
//! privilege), plus an HTTP client for it.
use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use aiguard_daemon::{
    config::Config,
    gateway::{self, Gateway, Listeners},
    keys::KeyRing,
    shared::Shared,
    store::Store,
    tokens::Tokenizer,
    usage::Ledger,
};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt as _, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::{sync::watch, task::JoinHandle};

pub struct TestGateway {
    pub addr: SocketAddr,
    pub gw: Arc<Gateway>,
    pub keys: Arc<KeyRing>,
    /// The shared store, when the config's `[store]` asks for Redis.
    pub shared: Option<Arc<Shared>>,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    maintain: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TestGateway {
    /// Starts the gateway with `config` (TOML); its listen address is replaced by
    /// `127.0.0.1:0`.
    pub async fn start(config: &str) -> Self {
        let mut config = Config::from_toml(config, Path::new("test.toml"))
            .unwrap_or_else(|e| panic!("test config refused: {e}"));
        config.gateway.listen = vec!["127.0.0.1:0".parse().expect("addr")];
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let keys = Arc::new(KeyRing::open(store.clone()).expect("key ring"));
        let (ledger, _) = Ledger::open(store.clone(), &dir.path().join("journal")).expect("ledger");
        let tokenizer = Tokenizer::load(config.gateway.tokenizer);
        let shared = if config.store.is_shared() {
            Some(
                Shared::open(&config.store, store.clone())
                    .await
                    .unwrap_or_else(|e| panic!("shared store: {e}")),
            )
        } else {
            None
        };
        let gw = Arc::new(
            Gateway::new(
                &config,
                keys.clone(),
                Arc::new(ledger),
                tokenizer,
                shared.clone(),
                store,
            )
            .expect("gateway"),
        );
        let listeners = Listeners::bind(&config.gateway.listen)
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listeners.local_addrs()[0];
        let (shutdown, rx) = watch::channel(false);
        let maintain = shared.clone().map(|s| tokio::spawn(s.maintain(rx.clone())));
        let task = tokio::spawn(gateway::serve(gw.clone(), listeners, rx));
        Self {
            addr,
            gw,
            keys,
            shared,
            shutdown,
            task: Some(task),
            maintain,
            _dir: dir,
        }
    }

    /// Makes the keys of `other` valid here too (as the shared store's key replication does
    /// between daemons).
    pub fn import_keys(&self, other: &TestGateway) {
        self.keys.merge(&other.keys.list()).expect("merge keys");
    }

    /// Creates a key and returns its secret.
    pub fn add_key(&self, tenant: &str, tier: &str) -> String {
        self.keys.create(tenant, tier, 0).expect("create key").1
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops accepting and waits for in-flight requests (bounded by the gateway's drain time).
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(40), t).await;
        }
        if let Some(t) = self.maintain.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// A pooled keep-alive HTTP/1.1 client.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(128)
        .build_http()
}

/// A response with its whole body.
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `req` and reads the whole answer.
pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Answer {
    let resp: Response<_> = client.request(req).await.expect("request sent");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body read").to_bytes();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// A chat completion request with `key` and `body`, plus extra headers.
pub fn chat_request(
    url: &str,
    key: &str,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let mut b = Request::post(url)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json");
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(Full::new(Bytes::from(
        serde_json::to_vec(body).expect("json"),
    )))
    .expect("request")
}

/// A config for one gateway on `127.0.0.1:0` in front of `upstream`, the `free` tier as the
/// default, plus `tiers` (TOML).
pub fn config(upstream: &crate::upstream::Upstream, tiers: &str) -> String {
    format!(
        "[gateway]\nlisten = [\"127.0.0.1:0\"]\nupstreams = [\"{}\"]\ndefault_tier = \"free\"\n{tiers}",
        upstream.url()
    )
}

/// A one-message chat request body for `model`.
pub fn chat(model: &str, max_tokens: u64) -> serde_json::Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens})
}

/// [`chat`] with the model `gpt-test`.
pub fn hello(max_tokens: u64) -> serde_json::Value {
    chat("gpt-test", max_tokens)
}

/// Prompt tokens the gateway estimates for [`chat`]: 3 per message + "user" + "hi" + 3.
pub const HELLO_PROMPT: u64 = 8;

/// Fires `n` requests at once, each from its own task, and returns the answers.
pub async fn burst(
    n: usize,
    make: impl Fn(usize) -> Request<Full<Bytes>> + Send + Sync + 'static,
) -> Vec<Answer> {
    let make = Arc::new(make);
    let client = client();
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (client, make, barrier) = (client.clone(), make.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            send(&client, make(i)).await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("client task"));
    }
    out
}

/// How many of `answers` have `status`.
pub fn count(answers: &[Answer], status: u16) -> usize {
    answers.iter().filter(|a| a.status == status).count()
}
