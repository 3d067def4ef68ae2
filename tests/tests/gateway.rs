//! The gateway in front of a fake OpenAI-compatible upstream, in this process over real
//! loopback HTTP: limits exact under concurrency, token accounting against real-shaped
//! responses (JSON and SSE), quotas, identity, client addresses, streaming pass-through, reload.
//! No privilege needed: the XDP part is not involved.
use std::time::{Duration, Instant};

use aiguard_tests::{
    gateway::{HELLO_PROMPT, TestGateway, burst, chat_request, client, config, count, hello, send},
    upstream::{Upstream, UpstreamOptions, headers as up},
};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt as _, Full};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_clients_on_one_key_get_exactly_the_request_limit() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(
        &upstream,
        "[tiers.free]\n[tiers.free.per_key]\nrequests_per_minute = 10\n",
    ))
    .await;
    let key = g.add_key("acme", "free");
    let url = g.url("/v1/chat/completions");
    let started = Instant::now();
    // 64 clients, two requests each, all inside one window (one request refills every 6 s).
    let answers = burst(128, move |_| chat_request(&url, &key, &hello(16), &[])).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the burst must fit in one refill interval"
    );
    assert_eq!(count(&answers, 200), 10, "exactly the limit passes");
    assert_eq!(count(&answers, 429), 118, "everything else is refused");
    let refused = answers.iter().find(|a| a.status == 429).expect("a 429");
    let e = refused.json();
    assert_eq!(e["error"]["code"], "rate_limit_exceeded");
    assert_eq!(e["error"]["type"], "requests");
    let retry: u64 = refused
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!((1..=6).contains(&retry), "retry after {retry}s");
    assert_eq!(refused.header("x-ratelimit-limit-requests"), Some("10"));
    assert_eq!(refused.header("x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(
        upstream.requests().len(),
        10,
        "refused requests never reach the upstream"
    );
    let ok = answers.iter().find(|a| a.status == 200).expect("a 200");
    for h in [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    ] {
        assert!(ok.header(h).is_some(), "{h} on a success");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_clients_get_exactly_the_token_limit() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(
        &upstream,
        "[tiers.free]\ntokens_per_minute = 1000\n",
    ))
    .await;
    let key = g.add_key("acme", "free");
    let url = g.url("/v1/chat/completions");
    // Each request reserves 8 + 92 = 100 tokens, and uses exactly that.
    let answers = burst(64, move |_| {
        chat_request(
            &url,
            &key,
            &hello(100 - HELLO_PROMPT),
            &[(up::PROMPT_TOKENS, "8"), (up::COMPLETION_WORDS, "92")],
        )
    })
    .await;
    assert_eq!(count(&answers, 200), 10);
    assert_eq!(count(&answers, 429), 54);
    let refused = answers.iter().find(|a| a.status == 429).expect("a 429");
    assert_eq!(refused.json()["error"]["type"], "tokens");
    assert_eq!(refused.header("x-ratelimit-limit-tokens"), Some("1000"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_clients_get_exactly_the_concurrency_cap() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(&upstream, "[tiers.free]\nmax_concurrent = 4\n")).await;
    let key = g.add_key("acme", "free");
    let url = g.url("/v1/chat/completions");
    let answers = burst(64, move |_| {
        chat_request(&url, &key, &hello(16), &[(up::DELAY_MS, "1500")])
    })
    .await;
    assert_eq!(count(&answers, 200), 4);
    assert_eq!(count(&answers, 429), 60);
    assert_eq!(upstream.max_in_flight(), 4);
    // Slots come back when requests finish.
    let key = g.add_key("acme", "free");
    let a = send(
        &client(),
        chat_request(&g.url("/v1/chat/completions"), &key, &hello(16), &[]),
    )
    .await;
    assert_eq!(a.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_reconciled_from_json_usage_and_the_rest_refunded() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(
        &upstream,
        "[tiers.free]\ntokens_per_minute = 100000\n",
    ))
    .await;
    let key = g.add_key("acme", "free");
    let c = client();
    let url = g.url("/v1/chat/completions");
    let a = send(
        &c,
        chat_request(
            &url,
            &key,
            &hello(500),
            &[(up::PROMPT_TOKENS, "11"), (up::COMPLETION_WORDS, "5")],
        ),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["usage"]["total_tokens"], 16);
    // The next request sees the first one's 16 tokens charged, not its 508 reserved.
    let b = send(&c, chat_request(&url, &key, &hello(500), &[])).await;
    let remaining: u64 = b
        .header("x-ratelimit-remaining-tokens")
        .expect("header")
        .parse()
        .expect("number");
    let expected = 100_000 - 16 - (HELLO_PROMPT + 500);
    assert!(
        (expected..=expected + 20).contains(&remaining),
        "remaining {remaining}, expected about {expected}"
    );
    let rows =
        g.gw.ledger
            .report(&aiguard_daemon::usage::Today::now().month(), Some("acme"))
            .expect("report");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].requests, 2);
    // The fake counts "hi" as 1 word + 3 per message, and answers 8 words by default.
    assert_eq!(rows[0].prompt_tokens, 11 + 4);
    assert_eq!(rows[0].completion_tokens, 5 + 8);
}

/// Reads a streamed answer event by event, with the time each arrived.
async fn stream_events(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    req: Request<Full<Bytes>>,
) -> (u16, Vec<(Duration, String)>) {
    let started = Instant::now();
    let resp = client.request(req).await.expect("request sent");
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut buf = String::new();
    let mut events = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("frame");
        if let Ok(data) = frame.into_data() {
            buf.push_str(std::str::from_utf8(&data).expect("utf-8"));
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                events.push((started.elapsed(), event.trim().to_owned()));
            }
        }
    }
    (status, events)
}

fn stream_body(include_usage: Option<bool>) -> serde_json::Value {
    let mut b = json!({"model": "gpt-test", "stream": true, "max_tokens": 50,
        "messages": [{"role": "user", "content": "hi"}]});
    if let Some(u) = include_usage {
        b["stream_options"] = json!({"include_usage": u});
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_pass_through_as_they_arrive_and_usage_is_reconciled() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(
        &upstream,
        "[tiers.free]\ntokens_per_minute = 100000\n",
    ))
    .await;
    let key = g.add_key("acme", "free");
    let c = client();
    let url = g.url("/v1/chat/completions");

    // The client did not ask for usage: the gateway asks upstream, reads it, hides the chunk.
    let (status, events) = stream_events(
        &c,
        chat_request(
            &url,
            &key,
            &stream_body(None),
            &[(up::CHUNK_DELAY_MS, "150"), (up::PROMPT_TOKENS, "7")],
        ),
    )
    .await;
    assert_eq!(status, 200);
    let forwarded = upstream
        .requests()
        .pop()
        .expect("forwarded")
        .json()
        .expect("json");
    assert_eq!(forwarded["stream_options"]["include_usage"], true);
    assert!(
        events.iter().all(|(_, e)| !e.contains("\"usage\":{")),
        "usage chunk hidden: {events:?}"
    );
    assert_eq!(events.last().expect("events").1, "data: [DONE]");
    // Flushed one by one: the first event came long before the last.
    let (first, last) = (events[0].0, events.last().expect("last").0);
    assert!(
        last - first >= Duration::from_millis(600),
        "events arrived together: {first:?} .. {last:?}"
    );

    // The client asked: it gets the usage chunk, untouched.
    let (_, events) = stream_events(
        &c,
        chat_request(
            &url,
            &key,
            &stream_body(Some(true)),
            &[(up::PROMPT_TOKENS, "7")],
        ),
    )
    .await;
    assert!(events.iter().any(|(_, e)| e.contains("\"usage\":{")));

    // No usage at all: the gateway counts the streamed text with its tokenizer.
    let (_, events) = stream_events(
        &c,
        chat_request(&url, &key, &stream_body(None), &[(up::NO_USAGE, "1")]),
    )
    .await;
    assert_eq!(events.last().expect("events").1, "data: [DONE]");

    let rows =
        g.gw.ledger
            .report(&aiguard_daemon::usage::Today::now().month(), Some("acme"))
            .expect("report");
    assert_eq!(rows[0].requests, 3);
    // 7 + 7 reported, plus the gateway's own estimate (8) for the stream without usage.
    assert_eq!(rows[0].prompt_tokens, 7 + 7 + HELLO_PROMPT);
    // 8 words reported twice, and the tokenizer's count of "w0 w1 ... w7" (16 tokens: "w", "0"
    // and so on) for the third.
    let counted =
        aiguard_daemon::tokens::Tokenizer::load(aiguard_daemon::tiers::TokenizerName::O200kBase)
            .count("w0 w1 w2 w3 w4 w5 w6 w7");
    assert_eq!(rows[0].completion_tokens, 8 + 8 + counted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monthly_quota_refuses_with_insufficient_quota_and_ends_a_stream() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(&upstream, "[tiers.free]\nmonthly_tokens = 300\n")).await;
    let key = g.add_key("acme", "free");
    let c = client();
    let url = g.url("/v1/chat/completions");
    // Reserve 100, use 100: three fit.
    for _ in 0..3 {
        let a = send(
            &c,
            chat_request(
                &url,
                &key,
                &hello(92),
                &[(up::PROMPT_TOKENS, "8"), (up::COMPLETION_WORDS, "92")],
            ),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
    let a = send(&c, chat_request(&url, &key, &hello(1), &[])).await;
    assert_eq!(a.status, 429);
    assert_eq!(a.json()["error"]["code"], "insufficient_quota");
    assert_eq!(a.json()["error"]["type"], "insufficient_quota");
    assert_eq!(a.header("x-should-retry"), Some("false"));
    assert!(a.header("retry-after").is_some());

    // A request without max_tokens reserves the default (4096): admitted with the 300 left,
    // its stream is ended with an error event, without [DONE], when the quota runs out.
    let key = g.add_key("beta", "free");
    let mut body = stream_body(None);
    body.as_object_mut().expect("object").remove("max_tokens");
    let (status, events) = stream_events(
        &c,
        chat_request(&url, &key, &body, &[(up::COMPLETION_WORDS, "400")]),
    )
    .await;
    assert_eq!(status, 200);
    let last = &events.last().expect("events").1;
    assert!(last.contains("insufficient_quota"), "last event: {last}");
    assert!(events.iter().all(|(_, e)| e != "data: [DONE]"));
    assert!(
        events.len() < 400,
        "the stream was cut short ({} events)",
        events.len()
    );
    let (used, reserved) =
        g.gw.limiter
            .month_usage("beta", aiguard_daemon::usage::Today::now().month_index());
    assert_eq!(reserved, 0);
    assert!(used <= 300, "never past the quota: {used}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_missing_and_revoked_keys_get_401_and_keys_never_go_upstream() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(&upstream, "[tiers.free]\n")).await;
    let key = g.add_key("acme", "free");
    let c = client();
    let url = g.url("/v1/chat/completions");
    for (name, value) in [
        ("authorization", format!("Bearer {key}")),
        ("x-api-key", key.clone()),
        ("api-key", key.clone()),
    ] {
        let req = Request::post(&url)
            .header(name, value)
            .body(Full::new(Bytes::from(hello(5).to_string())))
            .expect("request");
        assert_eq!(send(&c, req).await.status, 200, "{name}");
    }
    for r in upstream.requests() {
        for h in ["authorization", "x-api-key", "api-key"] {
            assert!(r.header(h).is_none(), "{h} forwarded");
        }
        assert_eq!(r.header("x-aiguard-tenant"), Some("acme"));
    }
    let bad = send(&c, chat_request(&url, "aig_not_a_key", &hello(5), &[])).await;
    assert_eq!(bad.status, 401);
    assert_eq!(bad.json()["error"]["code"], "invalid_api_key");
    assert_eq!(bad.json()["error"]["type"], "invalid_request_error");
    let none = send(
        &c,
        Request::post(&url)
            .body(Full::new(Bytes::from(hello(5).to_string())))
            .expect("request"),
    )
    .await;
    assert_eq!(none.status, 401);
    let id = g.keys.list()[0].id.clone();
    g.keys.revoke(&id, 1).expect("revoke");
    assert_eq!(
        send(&c, chat_request(&url, &key, &hello(5), &[]))
            .await
            .status,
        401
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_model_limits_and_tenant_overrides_apply() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(
        &upstream,
        "[tiers.free]\nrequests_per_minute = 3\n[tiers.free.models.\"big\"]\nrequests_per_minute = 1\n[tenants.vip]\nrequests_per_minute = 50\n",
    ))
    .await;
    let c = client();
    let url = g.url("/v1/chat/completions");
    let key = g.add_key("acme", "free");
    let big =
        json!({"model": "big", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5});
    assert_eq!(
        send(&c, chat_request(&url, &key, &big, &[])).await.status,
        200
    );
    let second = send(&c, chat_request(&url, &key, &big, &[])).await;
    assert_eq!(second.status, 429, "model limit");
    assert!(
        second.json()["error"]["message"]
            .as_str()
            .expect("message")
            .contains("model")
    );
    // Other models still have the tenant's allowance.
    assert_eq!(
        send(&c, chat_request(&url, &key, &hello(5), &[]))
            .await
            .status,
        200
    );
    assert_eq!(
        send(&c, chat_request(&url, &key, &hello(5), &[]))
            .await
            .status,
        200
    );
    assert_eq!(
        send(&c, chat_request(&url, &key, &hello(5), &[]))
            .await
            .status,
        429
    );
    // The overridden tenant gets its own limit.
    let vip = g.add_key("vip", "free");
    for _ in 0..10 {
        assert_eq!(
            send(&c, chat_request(&url, &vip, &hello(5), &[]))
                .await
                .status,
            200
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_a_limit_while_requests_are_in_flight() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let before = config(&upstream, "[tiers.free]\nrequests_per_minute = 1\n");
    let g = TestGateway::start(&before).await;
    let key = g.add_key("acme", "free");
    let url = g.url("/v1/chat/completions");
    let (k, u) = (key.clone(), url.clone());
    let in_flight = tokio::spawn(async move {
        send(
            &client(),
            chat_request(&u, &k, &hello(5), &[(up::DELAY_MS, "1500")]),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(upstream.in_flight(), 1, "the slow request is upstream");
    let c = client();
    assert_eq!(
        send(&c, chat_request(&url, &key, &hello(5), &[]))
            .await
            .status,
        429
    );
    let after = config(&upstream, "[tiers.free]\nrequests_per_minute = 100\n");
    let needs_restart = g.gw.reload(
        &aiguard_daemon::config::Config::from_toml(&after, std::path::Path::new("t.toml"))
            .expect("valid"),
    );
    assert!(needs_restart.is_empty(), "{needs_restart:?}");
    assert_eq!(
        send(&c, chat_request(&url, &key, &hello(5), &[]))
            .await
            .status,
        200,
        "new limit"
    );
    let slow = in_flight.await.expect("task");
    assert_eq!(slow.status, 200, "the in-flight request completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_address_comes_from_trusted_proxies_only() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&format!(
        "{}\n",
        config(&upstream, "[tiers.free]\n").replace(
            "default_tier = \"free\"",
            "default_tier = \"free\"\ntrusted_proxies = [\"127.0.0.0/8\"]"
        )
    ))
    .await;
    let key = g.add_key("acme", "free");
    let c = client();
    let url = g.url("/v1/chat/completions");
    let a = send(
        &c,
        chat_request(
            &url,
            &key,
            &hello(5),
            &[("x-forwarded-for", "1.1.1.1, 198.51.100.7")],
        ),
    )
    .await;
    assert_eq!(a.status, 200);
    let seen = upstream.requests().pop().expect("request");
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("1.1.1.1, 198.51.100.7, 127.0.0.1")
    );

    // Not trusted: the header is replaced by the socket address.
    let upstream2 = Upstream::start(UpstreamOptions::default());
    let g2 = TestGateway::start(&config(&upstream2, "[tiers.free]\n")).await;
    let key2 = g2.add_key("acme", "free");
    let a = send(
        &c,
        chat_request(
            &g2.url("/v1/chat/completions"),
            &key2,
            &hello(5),
            &[("x-forwarded-for", "198.51.100.7")],
        ),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        upstream2
            .requests()
            .pop()
            .expect("request")
            .header("x-forwarded-for"),
        Some("127.0.0.1")
    );

    // PROXY protocol from a trusted balancer.
    let upstream3 = Upstream::start(UpstreamOptions::default());
    let g3 = TestGateway::start(&config(&upstream3, "[tiers.free]\n").replace(
        "default_tier = \"free\"",
        "default_tier = \"free\"\ntrusted_proxies = [\"127.0.0.1/32\"]\nclient_address = \"proxy-protocol\"",
    ))
    .await;
    let key3 = g3.add_key("acme", "free");
    let body = hello(5).to_string();
    let raw = format!(
        "PROXY TCP4 203.0.113.9 127.0.0.1 40000 80\r\nPOST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key3}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let reply = raw_exchange(g3.addr, raw.as_bytes(), Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(
        upstream3
            .requests()
            .pop()
            .expect("request")
            .header("x-forwarded-for"),
        Some("203.0.113.9")
    );
}

/// Writes `bytes` on a fresh connection and reads until the server closes it (or `limit`).
async fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8], limit: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_input_gets_clean_errors_and_others_are_unaffected() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(&upstream, "[tiers.free]\n").replace(
        "default_tier = \"free\"",
        "default_tier = \"free\"\nmax_request_bytes = 4096\nheader_read_timeout = \"1s\"",
    ))
    .await;
    let key = g.add_key("acme", "free");
    let addr = g.addr;

    // Slowloris: a client that sends its headers a byte at a time, forever.
    let slowloris = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let started = Instant::now();
        let head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-slow: ";
        s.write_all(head).await.expect("write");
        loop {
            if s.write_all(b"a").await.is_err() {
                break;
            }
            let mut buf = [0u8; 256];
            match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                _ => {}
            }
            if started.elapsed() > Duration::from_secs(10) {
                panic!("the slowloris connection was never closed");
            }
        }
        started.elapsed()
    });

    let c = client();
    let url = g.url("/v1/chat/completions");
    // Meanwhile a normal client is served, promptly.
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(
            send(&c, chat_request(&url, &key, &hello(5), &[]))
                .await
                .status,
            200
        );
        assert!(t.elapsed() < Duration::from_millis(500));
    }

    let invalid = send(
        &c,
        Request::post(&url)
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::from_static(b"{\"model\": ")))
            .expect("request"),
    )
    .await;
    assert_eq!(invalid.status, 400);
    assert_eq!(invalid.json()["error"]["type"], "invalid_request_error");

    let big = json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(10_000)}]});
    let too_big = send(&c, chat_request(&url, &key, &big, &[])).await;
    assert_eq!(too_big.status, 413);
    assert_eq!(too_big.json()["error"]["code"], "request_too_large");

    let body = hello(5).to_string();
    // Two different Content-Lengths.
    let r = raw_exchange(addr, format!("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-length: {}\r\ncontent-length: 3\r\n\r\n{body}", body.len()).as_bytes(), Duration::from_secs(3)).await;
    assert!(
        r.is_empty() || r.starts_with("HTTP/1.1 400"),
        "conflicting lengths: {r}"
    );
    // Content-Length and chunked together: the length is ignored, never both.
    let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let r = raw_exchange(addr, format!("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n{chunked}").as_bytes(), Duration::from_secs(3)).await;
    assert!(
        r.is_empty() || r.starts_with("HTTP/1.1 400") || r.starts_with("HTTP/1.1 200"),
        "CL+TE: {r}"
    );
    assert!(
        !r.contains("HTTP/1.1 200") || r.matches("HTTP/1.1").count() == 1,
        "no smuggled second request: {r}"
    );
    // A malformed header line.
    let r = raw_exchange(
        addr,
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\nbad header line\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(
        r.is_empty() || r.starts_with("HTTP/1.1 400"),
        "malformed header: {r}"
    );
    // Two API keys.
    let r = send(
        &c,
        Request::post(&url)
            .header("authorization", format!("Bearer {key}"))
            .header("x-api-key", "other")
            .body(Full::new(Bytes::from(body.clone())))
            .expect("request"),
    )
    .await;
    assert_eq!(r.status, 200, "authorization wins over x-api-key");
    let mut two = Request::post(&url)
        .body(Full::new(Bytes::from(body.clone())))
        .expect("request");
    two.headers_mut()
        .append("authorization", format!("Bearer {key}").parse().expect("v"));
    two.headers_mut()
        .append("authorization", "Bearer other".parse().expect("v"));
    assert_eq!(send(&c, two).await.status, 401);
    // Garbage instead of HTTP.
    let r = raw_exchange(
        addr,
        b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(
        r.is_empty() || r.starts_with("HTTP/1.1 400"),
        "garbage: {r}"
    );

    let held = slowloris.await.expect("slowloris task");
    assert!(
        held < Duration::from_secs(3),
        "slowloris held its connection for {held:?}"
    );
    // And the gateway still serves.
    assert_eq!(
        send(&c, chat_request(&url, &key, &hello(5), &[]))
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_and_slow_bodies_get_clean_answers() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(
        &config(
            &upstream,
            "[tiers.free]\nmonthly_tokens = 100000\nrequests_per_minute = 1000\ntokens_per_minute = 100000\n",
        )
        .replace(
            "default_tier = \"free\"",
            "default_tier = \"free\"\nupstream_response_timeout = \"500ms\"\nidle_timeout = \"1s\"",
        ),
    )
    .await;
    let key = g.add_key("acme", "free");
    let c = client();
    let url = g.url("/v1/chat/completions");

    // No usage in a JSON answer: the gateway counts the message with its tokenizer.
    let a = send(
        &c,
        chat_request(&url, &key, &hello(50), &[(up::NO_USAGE, "1")]),
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(a.json().get("usage").is_none_or(|u| u.is_null()));
    let (used, _) =
        g.gw.limiter
            .month_usage("acme", aiguard_daemon::usage::Today::now().month_index());
    let tokenizer =
        aiguard_daemon::tokens::Tokenizer::load(aiguard_daemon::tiers::TokenizerName::O200kBase);
    assert_eq!(
        used,
        HELLO_PROMPT + tokenizer.count("w0 w1 w2 w3 w4 w5 w6 w7")
    );

    // Slower than the response timeout: 504, and the upstream error is an OpenAI error.
    let slow = send(
        &c,
        chat_request(&url, &key, &hello(5), &[(up::DELAY_MS, "2000")]),
    )
    .await;
    assert_eq!(slow.status, 504);
    assert_eq!(slow.json()["error"]["code"], "upstream_timeout");
    // Answers the gateway makes itself carry the limits too, once the key is known.
    let rate_headers_of = |a: &aiguard_tests::gateway::Answer| {
        (
            a.header("x-ratelimit-limit-requests").map(str::to_owned),
            a.header("x-ratelimit-limit-tokens").map(str::to_owned),
            a.header("x-ratelimit-remaining-requests").is_some(),
        )
    };
    let expected = (Some("1000".to_owned()), Some("100000".to_owned()), true);
    assert_eq!(rate_headers_of(&slow), expected);
    let invalid = send(
        &c,
        Request::post(&url)
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{\"model\": ")))
            .expect("request"),
    )
    .await;
    assert_eq!(invalid.status, 400);
    assert_eq!(rate_headers_of(&invalid), expected);

    // The upstream's own errors pass through with their status, and charge no tokens.
    let before =
        g.gw.limiter
            .month_usage("acme", aiguard_daemon::usage::Today::now().month_index())
            .0;
    let err = send(
        &c,
        chat_request(&url, &key, &hello(5), &[(up::STATUS, "503")]),
    )
    .await;
    assert_eq!(err.status, 503);
    let after =
        g.gw.limiter
            .month_usage("acme", aiguard_daemon::usage::Today::now().month_index())
            .0;
    assert_eq!(before, after);

    // A body that stops arriving: 408 after the idle timeout.
    let mut s = TcpStream::connect(g.addr).await.expect("connect");
    s.write_all(format!("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-length: 100\r\n\r\n{{\"model\"").as_bytes()).await.expect("write");
    let started = Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(out.contains("x-ratelimit-limit-requests: 1000"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // The upstream gone: 502 with Retry-After.
    drop(upstream);
    let gone = send(&c, chat_request(&url, &key, &hello(5), &[])).await;
    assert_eq!(gone.status, 502, "{}", gone.text());
    assert_eq!(gone.json()["error"]["code"], "upstream_unavailable");
    assert_eq!(gone.header("retry-after"), Some("1"));
    assert_eq!(rate_headers_of(&gone), expected);
}
