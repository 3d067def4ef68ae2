//! The gateway's limits beyond requests per minute, over real loopback HTTP against the fake
//! upstream: requests per day (tier and per key), each tenant override taking the place of its
//! tier's value for that tenant only, and per-model limits that leave other models alone.
//! No privilege needed: the XDP part is not involved.
use aiguard_daemon::usage::Today;
use aiguard_tests::{
    gateway::{
        Answer, HELLO_PROMPT, TestGateway, burst, chat, chat_request, client, config, count, hello,
        send,
    },
    upstream::{Upstream, UpstreamOptions, headers as up},
};
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::json;

const DAY_MS: u64 = 86_400_000;

/// How long a test's bursts may take at most; every refusal's wait is checked against it.
const ELAPSED_SLACK_MS: u64 = 30_000;

/// Headers that make the fake upstream report exactly `prompt` + `completion` tokens used.
fn uses(prompt: &'static str, completion: &'static str) -> [(&'static str, &'static str); 2] {
    [
        (up::PROMPT_TOKENS, prompt),
        (up::COMPLETION_WORDS, completion),
    ]
}

/// Sends `n` requests one after the other and returns their statuses.
async fn statuses(n: usize, make: impl Fn() -> Request<Full<Bytes>>) -> Vec<u16> {
    let c = client();
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(send(&c, make()).await.status);
    }
    out
}

fn message(a: &Answer) -> String {
    a.json()["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("an error message: {}", a.text()))
        .to_owned()
}

/// Checks that `a` is a rate-limit refusal whose message names `what`, and whose
/// `Retry-After` is the wait a GCRA bucket of `limit` per day gives: one day / limit, less the
/// time the test has run since the bucket was first charged.
fn assert_refused_for_the_day(a: &Answer, what: &str, limit: u64) {
    assert_eq!(a.status, 429, "{}", a.text());
    let e = a.json();
    assert_eq!(e["error"]["code"], "rate_limit_exceeded", "{e}");
    assert_eq!(e["error"]["type"], "requests", "{e}");
    let msg = message(a);
    assert!(msg.contains(what), "message {msg:?} should name {what:?}");
    let interval_ms = DAY_MS / limit;
    let ms: u64 = a
        .header("retry-after-ms")
        .expect("Retry-After-Ms")
        .parse()
        .expect("milliseconds");
    assert!(
        (interval_ms - ELAPSED_SLACK_MS..=interval_ms).contains(&ms),
        "retry after {ms} ms; a day's bucket of {limit} refills one every {interval_ms} ms"
    );
    let secs: u64 = a
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert_eq!(
        secs,
        ms.div_ceil(1000),
        "Retry-After is Retry-After-Ms rounded up"
    );
}

fn month_usage(g: &TestGateway, tenant: &str) -> (u64, u64) {
    g.gw.limiter.month_usage(tenant, Today::now().month_index())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_per_day_of_a_tier_admit_exactly_the_limit_per_tenant() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(&upstream, "[tiers.free]\nrequests_per_day = 4\n")).await;
    let url = g.url("/v1/chat/completions");
    let acme = g.add_key("acme", "free");
    let (u, k) = (url.clone(), acme.clone());
    let answers = burst(32, move |_| chat_request(&u, &k, &hello(5), &[])).await;
    assert_eq!(count(&answers, 200), 4, "exactly the day's limit passes");
    assert_eq!(count(&answers, 429), 28, "everything else is refused");
    for a in answers.iter().filter(|a| a.status == 429) {
        assert_refused_for_the_day(a, "requests per day (tenant limit): limit 4", 4);
    }
    // A second key of the same tenant shares the tenant's day.
    let acme2 = g.add_key("acme", "free");
    let again = send(&client(), chat_request(&url, &acme2, &hello(5), &[])).await;
    assert_refused_for_the_day(&again, "requests per day (tenant limit): limit 4", 4);

    // Another tenant of the tier has a day of its own.
    let beta = g.add_key("beta", "free");
    let (u, k) = (url.clone(), beta.clone());
    let answers = burst(12, move |_| chat_request(&u, &k, &hello(5), &[])).await;
    assert_eq!(count(&answers, 200), 4);
    assert_eq!(count(&answers, 429), 8);
    assert_eq!(
        upstream.requests().len(),
        8,
        "refused requests never reach the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_per_day_per_key_limit_each_key_under_the_tenants_day() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(
        &upstream,
        "[tiers.free]\nrequests_per_day = 5\n[tiers.free.per_key]\nrequests_per_day = 2\n",
    ))
    .await;
    let url = g.url("/v1/chat/completions");
    let k1 = g.add_key("acme", "free");
    let (u, k) = (url.clone(), k1.clone());
    let answers = burst(16, move |_| chat_request(&u, &k, &hello(5), &[])).await;
    assert_eq!(count(&answers, 200), 2, "the key's day");
    assert_eq!(count(&answers, 429), 14);
    for a in answers.iter().filter(|a| a.status == 429) {
        assert_refused_for_the_day(a, "requests per day (key limit): limit 2", 2);
    }
    // The key's 14 refusals charged nothing at the tenant: a second key gets its full 2...
    let k2 = g.add_key("acme", "free");
    let s = statuses(3, || chat_request(&url, &k2, &hello(5), &[])).await;
    assert_eq!(s, [200, 200, 429]);
    // ...and a third the one request left of the tenant's 5.
    let k3 = g.add_key("acme", "free");
    let c = client();
    assert_eq!(
        send(&c, chat_request(&url, &k3, &hello(5), &[]))
            .await
            .status,
        200
    );
    let refused = send(&c, chat_request(&url, &k3, &hello(5), &[])).await;
    assert_refused_for_the_day(&refused, "requests per day (tenant limit): limit 5", 5);
    assert_eq!(upstream.requests().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_override_of_the_monthly_quota_and_its_enforcement_replaces_the_tiers() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(
        &upstream,
        "[tiers.free]\nmonthly_tokens = 300\n\
         [tenants.big]\nmonthly_tokens = 600\n\
         [tenants.lenient]\nquota = \"soft\"\n",
    ))
    .await;
    let url = g.url("/v1/chat/completions");
    // Each request reserves 8 + 92 = 100 tokens and uses exactly that.
    let hundred = || hello(100 - HELLO_PROMPT);
    for (tenant, fits, limit) in [("small", 3, 300), ("big", 6, 600)] {
        let key = g.add_key(tenant, "free");
        let s = statuses(fits, || {
            chat_request(&url, &key, &hundred(), &uses("8", "92"))
        })
        .await;
        assert_eq!(s, vec![200; fits], "{tenant}: {fits} requests of 100 fit");
        let refused = send(&client(), chat_request(&url, &key, &hello(1), &[])).await;
        assert_eq!(refused.status, 429, "{tenant}: {}", refused.text());
        assert_eq!(refused.json()["error"]["code"], "insufficient_quota");
        assert_eq!(refused.header("x-should-retry"), Some("false"));
        let msg = message(&refused);
        assert!(
            msg.contains(&format!("{limit} of {limit} tokens used")),
            "{tenant}: {msg}"
        );
        assert_eq!(month_usage(&g, tenant), (limit, 0), "{tenant}");
    }

    // `quota = "soft"` for one tenant: a stream that runs past the tier's 300 completes (a hard
    // quota would end it with an error event), and the next request is refused.
    let key = g.add_key("lenient", "free");
    let mut body = json!({"model": "gpt-test", "stream": true,
        "messages": [{"role": "user", "content": "hi"}]});
    let a = send(
        &client(),
        chat_request(&url, &key, &body, &uses("8", "400")),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let text = a.text();
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "a soft quota lets the stream finish: {}",
        &text[text.len().saturating_sub(300)..]
    );
    assert!(!text.contains("insufficient_quota"));
    assert_eq!(month_usage(&g, "lenient"), (408, 0), "counted in full");
    body["stream"] = json!(false);
    let refused = send(&client(), chat_request(&url, &key, &body, &[])).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["error"]["code"], "insufficient_quota");
    // The same stream on the tier's hard quota is ended at it.
    let key = g.add_key("strict", "free");
    body["stream"] = json!(true);
    let a = send(
        &client(),
        chat_request(&url, &key, &body, &uses("8", "400")),
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(a.text().contains("insufficient_quota"), "hard: ended");
    assert!(!a.text().contains("[DONE]"));
    let (used, reserved) = month_usage(&g, "strict");
    assert_eq!(reserved, 0);
    assert!(used <= 300, "never past the hard quota: {used}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_override_of_max_concurrent_replaces_the_tiers() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(
        &upstream,
        "[tiers.free]\nmax_concurrent = 2\n[tenants.wide]\nmax_concurrent = 5\n",
    ))
    .await;
    let url = g.url("/v1/chat/completions");
    let narrow = g.add_key("narrow", "free");
    let wide = g.add_key("wide", "free");
    let slow = [(up::DELAY_MS, "2000")];
    let (u1, u2) = (url.clone(), url.clone());
    // Both tenants at once: each has its own cap.
    let (n, w) = tokio::join!(
        burst(12, move |_| chat_request(&u1, &narrow, &hello(5), &slow)),
        burst(12, move |_| chat_request(&u2, &wide, &hello(5), &slow)),
    );
    assert_eq!((count(&n, 200), count(&n, 429)), (2, 10), "the tier's cap");
    assert_eq!((count(&w, 200), count(&w, 429)), (5, 7), "the override");
    assert_eq!(upstream.max_in_flight(), 7);
    for (answers, limit) in [(&n, 2), (&w, 5)] {
        for a in answers.iter().filter(|a| a.status == 429) {
            let msg = message(a);
            assert!(
                msg.contains(&format!(
                    "Too many concurrent requests (tenant limit): limit {limit}"
                )),
                "{msg}"
            );
            assert_eq!(a.json()["error"]["code"], "rate_limit_exceeded");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_override_of_tokens_per_minute_replaces_the_tiers() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(
        &upstream,
        "[tiers.free]\ntokens_per_minute = 600\n[tenants.rich]\ntokens_per_minute = 1800\n",
    ))
    .await;
    let url = g.url("/v1/chat/completions");
    // Each request reserves (and uses) 200 tokens: 600 fit 3, 1800 fit 9. One refills in 20 s
    // at 600/min and 6.7 s at 1800/min, far longer than a burst takes.
    for (tenant, fits, limit) in [("poor", 3, "600"), ("rich", 9, "1800")] {
        let key = g.add_key(tenant, "free");
        let u = url.clone();
        let answers = burst(16, move |_| {
            chat_request(&u, &key, &hello(200 - HELLO_PROMPT), &uses("8", "192"))
        })
        .await;
        assert_eq!(count(&answers, 200), fits, "{tenant}");
        assert_eq!(count(&answers, 429), 16 - fits, "{tenant}");
        for a in &answers {
            assert_eq!(
                a.header("x-ratelimit-limit-tokens"),
                Some(limit),
                "{tenant}"
            );
        }
        for a in answers.iter().filter(|a| a.status == 429) {
            assert_eq!(a.json()["error"]["type"], "tokens");
            let msg = message(a);
            assert!(
                msg.contains(&format!(
                    "tokens per minute (tenant limit): limit {limit}, requested 200"
                )),
                "{msg}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_override_of_requests_per_day_replaces_the_tiers_and_keeps_its_other_limits() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(
        &upstream,
        "[tiers.free]\nrequests_per_day = 2\ntokens_per_minute = 1000\n\
         [tenants.daily]\nrequests_per_day = 5\n",
    ))
    .await;
    let url = g.url("/v1/chat/completions");
    let plain = g.add_key("plain", "free");
    let s = statuses(2, || chat_request(&url, &plain, &hello(5), &[])).await;
    assert_eq!(s, [200, 200]);
    let refused = send(&client(), chat_request(&url, &plain, &hello(5), &[])).await;
    assert_refused_for_the_day(&refused, "requests per day (tenant limit): limit 2", 2);

    let daily = g.add_key("daily", "free");
    // The override sets only the day: the tier's tokens per minute still hold for the tenant
    // (and the refusal charges nothing against its day).
    let too_large = send(
        &client(),
        chat_request(&url, &daily, &hello(2000 - HELLO_PROMPT), &[]),
    )
    .await;
    assert_eq!(too_large.status, 429, "{}", too_large.text());
    assert_eq!(too_large.header("x-should-retry"), Some("false"));
    let msg = message(&too_large);
    assert!(
        msg.contains("it needs 2000 tokens") && msg.contains("tenant limit of 1000"),
        "{msg}"
    );
    let s = statuses(5, || chat_request(&url, &daily, &hello(5), &[])).await;
    assert_eq!(s, vec![200; 5], "the override's 5 requests a day");
    let refused = send(&client(), chat_request(&url, &daily, &hello(5), &[])).await;
    assert_refused_for_the_day(&refused, "requests per day (tenant limit): limit 5", 5);
    assert_eq!(upstream.requests().len(), 7);
}

/// A tier whose models have one limit each; the tenant itself is unlimited.
const MODEL_TIER: &str = "[tiers.free]\n\
    [tiers.free.models.\"alpha\"]\nrequests_per_day = 2\n\
    [tiers.free.models.\"beta\"]\nmax_concurrent = 1\n\
    [tiers.free.models.\"gamma\"]\ntokens_per_minute = 400\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_models_requests_per_day_leave_other_models_and_tenants_alone() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(&upstream, MODEL_TIER)).await;
    let url = g.url("/v1/chat/completions");
    let acme = g.add_key("acme", "free");
    let s = statuses(2, || chat_request(&url, &acme, &chat("alpha", 5), &[])).await;
    assert_eq!(s, [200, 200]);
    let refused = send(&client(), chat_request(&url, &acme, &chat("alpha", 5), &[])).await;
    assert_refused_for_the_day(&refused, "requests per day (model limit): limit 2", 2);
    // Other models of the same tenant and key: untouched.
    for model in ["gpt-test", "beta", "gamma"] {
        let s = statuses(3, || chat_request(&url, &acme, &chat(model, 5), &[])).await;
        assert_eq!(s, [200, 200, 200], "{model}");
    }
    // The model's limit is per tenant: another tenant has its own 2.
    let other = g.add_key("other", "free");
    let s = statuses(3, || chat_request(&url, &other, &chat("alpha", 5), &[])).await;
    assert_eq!(s, [200, 200, 429]);
    let models: Vec<String> = upstream
        .requests()
        .iter()
        .filter_map(|r| Some(r.json()?["model"].as_str()?.to_owned()))
        .collect();
    assert_eq!(models.iter().filter(|m| *m == "alpha").count(), 4);
    assert_eq!(models.len(), 4 + 3 * 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_models_concurrency_cap_leaves_other_models_alone() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(&upstream, MODEL_TIER)).await;
    let url = g.url("/v1/chat/completions");
    let key = g.add_key("acme", "free");
    let slow = [(up::DELAY_MS, "2000")];
    let (u1, k1, u2, k2) = (url.clone(), key.clone(), url.clone(), key.clone());
    let (beta, other) = tokio::join!(
        burst(8, move |_| chat_request(&u1, &k1, &chat("beta", 5), &slow)),
        burst(8, move |_| chat_request(
            &u2,
            &k2,
            &chat("gpt-test", 5),
            &slow
        )),
    );
    assert_eq!(
        (count(&beta, 200), count(&beta, 429)),
        (1, 7),
        "beta: 1 at once"
    );
    assert_eq!(count(&other, 200), 8, "gpt-test: unlimited");
    assert_eq!(upstream.max_in_flight(), 9);
    for a in beta.iter().filter(|a| a.status == 429) {
        let msg = message(a);
        assert!(
            msg.contains("Too many concurrent requests (model limit): limit 1"),
            "{msg}"
        );
    }
    // The slot came back when the request finished.
    let a = send(&client(), chat_request(&url, &key, &chat("beta", 5), &[])).await;
    assert_eq!(a.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_models_token_limit_leaves_other_models_alone() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let g = TestGateway::start(&config(&upstream, MODEL_TIER)).await;
    let url = g.url("/v1/chat/completions");
    let key = g.add_key("acme", "free");
    let c = client();
    // 200 tokens reserved and used per request: 400 a minute fit 2 (one refills in 30 s).
    let gamma = || chat_request(&url, &key, &chat("gamma", 192), &uses("8", "192"));
    let first = send(&c, gamma()).await;
    assert_eq!(first.status, 200);
    // The model's limit is the only token limit: the headers report it.
    assert_eq!(first.header("x-ratelimit-limit-tokens"), Some("400"));
    assert_eq!(first.header("x-ratelimit-remaining-tokens"), Some("200"));
    assert_eq!(send(&c, gamma()).await.status, 200);
    let refused = send(&c, gamma()).await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.json()["error"]["type"], "tokens");
    let msg = message(&refused);
    assert!(
        msg.contains("tokens per minute (model limit): limit 400, requested 200"),
        "{msg}"
    );
    let retry: u64 = refused
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!(
        (1..=30).contains(&retry),
        "200 of 400/min refill in 30 s: {retry}"
    );
    // The refusal reports the limit that refused it, as every response does.
    assert_eq!(
        refused.header("x-ratelimit-limit-tokens"),
        Some("400"),
        "a model-level refusal carries the model's token limit"
    );
    let remaining: u64 = refused
        .header("x-ratelimit-remaining-tokens")
        .expect("x-ratelimit-remaining-tokens")
        .parse()
        .expect("number");
    assert!(remaining < 200, "remaining {remaining} cannot fit 200");

    // Other models: no token limit.
    for model in ["gpt-test", "alpha-2", "beta"] {
        let s = statuses(5, || {
            chat_request(&url, &key, &chat(model, 192), &uses("8", "192"))
        })
        .await;
        assert_eq!(s, vec![200; 5], "{model}");
    }
    // And another tenant's use of gamma has its own 400.
    let other = g.add_key("other", "free");
    let s = statuses(3, || {
        chat_request(&url, &other, &chat("gamma", 192), &uses("8", "192"))
    })
    .await;
    assert_eq!(s, [200, 200, 429]);
}
