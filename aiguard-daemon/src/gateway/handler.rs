//! One request through the gateway: who is calling, may they, what will it cost, forward it,
//! and hand the response to [`super::metered`] for accounting on its way out.
use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use serde_json::Value;
use tracing::{debug, warn};

use super::{
    Gateway, Policy,
    answers::{self, Body},
    client_addr,
    decide::Refusal,
    idle,
    metered::{self, Metered, ResponseKind, Settlement},
};
use crate::{
    bans::now_ms,
    detect::prompt::RuleAction,
    keys::LiveKey,
    limits::{Demand, Denial},
    metrics::{Outcome, gateway::NO_TIER},
    tiers::ClientAddressSource,
    tokens,
    usage::Today,
};

/// What the gateway knows about a client connection.
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The client's address from the PROXY protocol header, else the peer's.
    pub client: std::net::IpAddr,
    pub active: idle::Active,
}

/// Bodies above this are tokenized off the async workers.
const TOKENIZE_INLINE_BYTES: usize = 64 << 10;
/// Longest model name kept in usage records.
const MAX_MODEL_LEN: usize = 128;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the client's
/// API key headers, which never go upstream.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Identity headers the gateway sets for the upstream; a client's own are removed.
const TENANT_HEADER: &str = "x-aiguard-tenant";
const KEY_ID_HEADER: &str = "x-aiguard-key-id";
/// The prompt rules with the `tag` action that a request matched, for the upstream.
const FLAGS_HEADER: &str = "x-aiguard-flags";
/// A solved proof of work: `<token>:<solution>`.
const PROOF_HEADER: &str = crate::detect::challenge::PROOF_HEADER;

pub async fn handle(
    gw: Arc<Gateway>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Response<Body> {
    let active = conn.active.enter();
    gw.counters.requests.fetch_add(1, Ordering::Relaxed);
    let policy = gw.policy();
    let client_ip = match policy.settings.client_address {
        ClientAddressSource::XForwardedFor => client_addr::from_forwarded_for(
            &policy.settings.trusted_proxies,
            conn.peer.ip(),
            req.headers(),
        ),
        ClientAddressSource::ProxyProtocol => conn.client,
    };
    let detection = &gw.detection;
    if let Err(r) = challenge(&gw, client_ip, req.headers()) {
        detection.engine.answered(client_ip, 428, now_ms());
        return r;
    }
    let response = match proxy(&gw, &policy, &conn, client_ip, req, active).await {
        Ok(r) => r,
        Err(r) => r,
    };
    detection
        .engine
        .answered(client_ip, response.status().as_u16(), now_ms());
    response
}

/// A source that detection challenged must show a proof of work (see
/// [`crate::detect::challenge`]); others pass untouched.
// The error is the answer itself, built only for a refused request.
#[allow(clippy::result_large_err)]
fn challenge(
    gw: &Gateway,
    ip: std::net::IpAddr,
    headers: &HeaderMap,
) -> Result<(), Response<Body>> {
    let d = &gw.detection;
    let now = now_ms();
    let Some(prefix) = d.engine.challenged(ip, now) else {
        return Ok(());
    };
    let subject = prefix.to_string();
    let failure = match headers.get(PROOF_HEADER).map(|v| v.to_str()) {
        None => None,
        Some(Ok(proof)) => match d.challenger.verify(&subject, proof, now) {
            Ok(()) => {
                d.metrics.challenge("passed");
                return Ok(());
            }
            Err(e) => Some(e.to_string()),
        },
        Some(Err(_)) => Some("the proof header is not visible ASCII".to_owned()),
    };
    d.metrics.challenge(if failure.is_some() {
        "failed"
    } else {
        "issued"
    });
    gw.counters.challenged.fetch_add(1, Ordering::Relaxed);
    gw.metrics.count(NO_TIER, Outcome::Challenged);
    let c = d.challenger.challenge(&subject, now);
    Err(answers::challenge(
        &c.token,
        c.difficulty,
        failure.as_deref(),
    ))
}

/// Which API a request speaks, by its path (after any prefix): it decides what is read from the
/// body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Chat,
    Completions,
    Embeddings,
    Responses,
    Other,
}

fn api_of(method: &http::Method, path: &str) -> Api {
    if method != http::Method::POST {
        return Api::Other;
    }
    // As the upstream's router will see it: percent-decoded, without doubled slashes.
    let decoded = percent_decode(path).to_ascii_lowercase();
    let mut path = decoded.as_str();
    let collapsed;
    if path.contains("//") {
        let mut p = String::with_capacity(path.len());
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            p.push('/');
            p.push_str(seg);
        }
        collapsed = p;
        path = &collapsed;
    }
    let path = path.trim_end_matches('/');
    if path.ends_with("/chat/completions") {
        Api::Chat
    } else if path.ends_with("/completions") {
        Api::Completions
    } else if path.ends_with("/embeddings") {
        Api::Embeddings
    } else if path.ends_with("/responses") {
        Api::Responses
    } else {
        Api::Other
    }
}

/// `%XX` escapes decoded (bytes that do not form UTF-8 are kept escaped).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(h << 4 | l);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_owned())
}

/// A POST to a path the gateway does not know, whose JSON body is shaped like an inference
/// request (another API's route, or a route alias of the upstream's): metered as that shape.
fn api_of_body(body: &[u8]) -> Api {
    if body.first() != Some(&b'{') {
        return Api::Other;
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Map<String, Value>>(body) else {
        return Api::Other;
    };
    if v.contains_key("messages") {
        Api::Chat
    } else if v.contains_key("prompt") {
        Api::Completions
    } else if v.contains_key("input") && v.contains_key("model") {
        Api::Responses
    } else {
        Api::Other
    }
}

/// The API key a request presents: `Authorization: Bearer`, `x-api-key` or `api-key`.
fn presented_key(headers: &HeaderMap) -> Result<Option<&str>, &'static str> {
    for name in ["authorization", "x-api-key", "api-key"] {
        let mut values = headers.get_all(name).iter();
        let Some(v) = values.next() else { continue };
        if values.next().is_some() {
            return Err("more than one API key header: send exactly one");
        }
        let v = v
            .to_str()
            .map_err(|_| "the API key header is not visible ASCII")?
            .trim();
        if name == "authorization" {
            let Some((scheme, token)) = v.split_once(' ') else {
                return Err("the Authorization header must be `Bearer <key>`");
            };
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err("the Authorization header must be `Bearer <key>`");
            }
            return Ok(Some(token.trim()));
        }
        return Ok(Some(v));
    }
    Ok(None)
}

/// What the request body says about its cost.
struct Inspected {
    body: Bytes,
    model: Option<String>,
    prompt_tokens: u64,
    reserve: u64,
    /// Whether the client itself asked for the usage chunk of a stream (if not, the gateway
    /// asked for it and hides it from the client).
    client_wants_usage: bool,
    /// Prompt rules (`tag`) the request matched.
    flags: Vec<Arc<str>>,
}

async fn inspect(
    gw: &Gateway,
    policy: &Policy,
    api: Api,
    body: Bytes,
) -> Result<Inspected, Response<Body>> {
    if api == Api::Other || body.is_empty() {
        return Ok(Inspected {
            body,
            model: None,
            prompt_tokens: 0,
            reserve: 0,
            client_wants_usage: true,
            flags: Vec::new(),
        });
    }
    let json: Value = serde_json::from_slice(&body).map_err(|e| {
        answers::bad_request(&format!(
            "We could not parse the JSON body of your request ({e}). The body must be a JSON object."
        ))
    })?;
    if !json.is_object() {
        return Err(answers::bad_request(
            "The request body must be a JSON object.",
        ));
    }
    let flags = apply_prompt_rules(gw, &json)?;
    let model = json
        .get("model")
        .and_then(Value::as_str)
        .map(|m| m.chars().take(MAX_MODEL_LEN).collect::<String>());
    let stream = json.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let tokenizer = gw.tokenizer;
    let (json, prompt_tokens) = if body.len() > TOKENIZE_INLINE_BYTES {
        tokio::task::spawn_blocking(move || {
            let n = tokenizer.prompt_tokens(&json);
            (json, n)
        })
        .await
        .map_err(|_| {
            answers::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The gateway failed to count the prompt.",
                "server_error",
                None,
            )
        })?
    } else {
        let n = tokenizer.prompt_tokens(&json);
        (json, n)
    };
    let mut json = json;
    let completion = match api {
        Api::Embeddings => 0,
        _ => {
            let per_choice =
                tokens::max_completion_tokens(&json).unwrap_or(policy.settings.default_max_tokens);
            if per_choice > tokens::MAX_COMPLETION_TOKENS {
                return Err(answers::bad_request(&format!(
                    "max_tokens is {per_choice}; the most a request may ask for is {}.",
                    tokens::MAX_COMPLETION_TOKENS
                )));
            }
            // `n` (and `best_of`) choices each generate up to the limit.
            let choices = ["n", "best_of"]
                .iter()
                .filter_map(|f| json.get(*f).and_then(Value::as_u64))
                .max()
                .unwrap_or(1)
                .clamp(1, 128);
            per_choice * choices
        }
    };
    let wants_usage = json
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut body = body;
    if stream && !wants_usage && matches!(api, Api::Chat | Api::Completions) {
        // Ask for the final usage chunk: without it the gateway could only estimate.
        let obj = json.as_object_mut().expect("checked above");
        let opts = obj
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(o) = opts.as_object_mut() {
            o.insert("include_usage".into(), Value::Bool(true));
            body = serde_json::to_vec(&json)
                .expect("a parsed body serializes")
                .into();
        }
    }
    Ok(Inspected {
        body,
        model,
        prompt_tokens,
        reserve: prompt_tokens.saturating_add(completion),
        client_wants_usage: wants_usage || !stream,
        flags,
    })
}

/// The prompt rules over a request's messages: each match logged with its evidence and
/// counted; `reject` answers 400; `tag` names the rule to the upstream (returned here).
#[allow(clippy::result_large_err)]
fn apply_prompt_rules(gw: &Gateway, json: &Value) -> Result<Vec<Arc<str>>, Response<Body>> {
    let rules = gw.detection.prompt_rules();
    if rules.is_empty() {
        return Ok(Vec::new());
    }
    let mut flags = Vec::new();
    for m in rules.check(json) {
        let action = match m.action {
            RuleAction::Log => "log",
            RuleAction::Tag => "tag",
            RuleAction::Reject => "reject",
        };
        let counted = if m.shadow { "shadow" } else { action };
        gw.detection.metrics.prompt_rule(&m.rule, counted);
        warn!(rule = %m.rule, action, shadow = m.shadow, evidence = %m.evidence, "prompt rule matched");
        if m.shadow {
            continue;
        }
        match m.action {
            RuleAction::Log => {}
            RuleAction::Tag => flags.push(m.rule.clone()),
            RuleAction::Reject => {
                gw.counters.prompt_rejected.fetch_add(1, Ordering::Relaxed);
                return Err(answers::prompt_rejected(&m.rule));
            }
        }
    }
    Ok(flags)
}

async fn read_body(
    policy: &Policy,
    headers: &HeaderMap,
    body: Incoming,
) -> Result<Bytes, Response<Body>> {
    let max = policy.settings.max_request_bytes;
    let too_large = || {
        answers::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("The request body is larger than the gateway accepts ({max} bytes)."),
            "invalid_request_error",
            Some("request_too_large"),
        )
    };
    if let Some(len) = headers.get(header::CONTENT_LENGTH)
        && len
            .to_str()
            .ok()
            .and_then(|l| l.parse::<u64>().ok())
            .is_some_and(|l| l > max)
    {
        return Err(too_large());
    }
    let limited = Limited::new(body, max as usize);
    // The client must send its whole body within the idle timeout.
    match tokio::time::timeout(policy.settings.idle_timeout, limited.collect()).await {
        Err(_) => Err(answers::error(
            StatusCode::REQUEST_TIMEOUT,
            "The request body did not arrive in time.",
            "invalid_request_error",
            None,
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(answers::bad_request(&format!(
            "The request body could not be read: {e}"
        ))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(*n);
    }
}

fn upstream_uri(base: &Uri, req: &Uri) -> Uri {
    let prefix = base.path().trim_end_matches('/');
    let pq = req.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut b = Uri::builder();
    if let Some(s) = base.scheme() {
        b = b.scheme(s.clone());
    }
    if let Some(a) = base.authority() {
        b = b.authority(a.clone());
    }
    b.path_and_query(format!("{prefix}{pq}"))
        .build()
        .unwrap_or_else(|_| base.clone())
}

async fn proxy(
    gw: &Gateway,
    policy: &Policy,
    conn: &ConnInfo,
    client_ip: std::net::IpAddr,
    req: Request<Incoming>,
    active: idle::ActiveGuard,
) -> Result<Response<Body>, Response<Body>> {
    let s = &policy.settings;
    if matches!(req.method(), &http::Method::CONNECT | &http::Method::TRACE) {
        gw.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
        gw.metrics.count(NO_TIER, Outcome::BadRequest);
        let mut r = answers::error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{} is not served by this API.", req.method()),
            "invalid_request_error",
            Some("method_not_allowed"),
        );
        r.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        );
        return Err(r);
    }
    let engine = &gw.detection.engine;
    let key: LiveKey = match presented_key(req.headers()) {
        Err(why) => {
            gw.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
            gw.metrics.count(NO_TIER, Outcome::BadRequest);
            engine.auth_failure(client_ip, None, now_ms());
            return Err(answers::unauthorized(why));
        }
        Ok(None) => {
            gw.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
            gw.metrics.count(NO_TIER, Outcome::Unauthorized);
            engine.auth_failure(client_ip, None, now_ms());
            return Err(answers::unauthorized(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
            ));
        }
        Ok(Some(secret)) => match gw.keys.authenticate(secret) {
            Some(k) => k,
            None => {
                gw.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
                gw.metrics.count(NO_TIER, Outcome::Unauthorized);
                engine.auth_failure(client_ip, Some(secret), now_ms());
                debug!(client = %client_ip, "unknown or revoked API key");
                return Err(answers::unauthorized(
                    "Incorrect API key provided. Check the key, or ask your administrator for a new one.",
                ));
            }
        },
    };
    let now = now_ms();
    if key.suspended_at(now) {
        gw.counters.suspended.fetch_add(1, Ordering::Relaxed);
        gw.metrics.count(NO_TIER, Outcome::Suspended);
        return Err(answers::suspended(key.suspended_until_ms.unwrap_or(now)));
    }
    engine.key_used(client_ip, &key.id, &key.tenant, now);
    let tenant_policy = policy.tiers.policy(&key.tenant, &key.tier);
    // The tier as configured: a key whose tier is gone is served (and counted) in the default.
    let tier_label: &str = if policy.tiers.has_tier(&key.tier) {
        &key.tier
    } else {
        &policy.tiers.default_tier
    };
    // A request refused before admission still tells the client where its limits stand, as
    // OpenAI's answers do (in memory only: with a shared store that takes a round trip).
    let refused = |mut r: Response<Body>| {
        gw.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
        gw.metrics.count(tier_label, Outcome::BadRequest);
        if gw.decider.shared().is_none() {
            let rate = gw.limiter.peek(&key.tenant, &key.id, &tenant_policy, None);
            answers::rate_headers(r.headers_mut(), &rate);
        }
        r
    };

    let (parts, body) = req.into_parts();
    let api = api_of(&parts.method, parts.uri.path());
    let body = read_body(policy, &parts.headers, body)
        .await
        .map_err(refused)?;
    let api = match api {
        Api::Other if parts.method == http::Method::POST => api_of_body(&body),
        known => known,
    };
    let inspected = inspect(gw, policy, api, body).await.map_err(refused)?;

    let tier = policy.tiers.tier(&key.tier);
    let model_limits = inspected
        .model
        .as_deref()
        .and_then(|m| tier.models.get(m).map(|l| (m, l)));
    let today = Today::now();
    let demand = Demand {
        tenant: &key.tenant,
        key: &key.id,
        policy: &tenant_policy,
        model: model_limits,
        tokens: inspected.reserve,
        min_tokens: inspected.prompt_tokens,
        month: today.month_index(),
        month_left: today.month_left(),
    };
    let on_failure = tier.on_store_failure;
    let admission = match gw.decider.admit(&gw.limiter, &demand, on_failure).await {
        Ok(a) => a,
        Err(Refusal::Denied(denial, rate)) => {
            let (counter, outcome) = match denial {
                Denial::Quota { .. } => (&gw.counters.quota_exceeded, Outcome::QuotaExceeded),
                _ => (&gw.counters.rate_limited, Outcome::RateLimited),
            };
            counter.fetch_add(1, Ordering::Relaxed);
            gw.metrics.count(tier_label, outcome);
            return Err(answers::denied(&denial, &rate));
        }
        Err(Refusal::StoreUnavailable { retry_after }) => {
            gw.counters
                .store_unavailable
                .fetch_add(1, Ordering::Relaxed);
            gw.metrics.count(tier_label, Outcome::StoreUnavailable);
            return Err(answers::store_unavailable(retry_after));
        }
    };
    // Paid traffic first: wait for an upstream slot in the tier's queue (limits first, so that
    // a request over its limits is refused at once rather than after queueing).
    let slot = if s.upstream_slots.is_some() {
        let since = std::time::Instant::now();
        match gw.scheduler.acquire(tier_label).await {
            Ok(slot) => {
                gw.metrics.observe_queue_wait(tier_label, since, true);
                Some(slot)
            }
            Err(shed) => {
                gw.metrics.observe_queue_wait(tier_label, since, false);
                gw.counters.shed.fetch_add(1, Ordering::Relaxed);
                gw.metrics.count(tier_label, Outcome::QueueFull);
                debug!(
                    tier = tier_label,
                    ?shed,
                    "shed while waiting for an upstream slot"
                );
                let rate = admission.headers();
                // Never sent: nothing used, nothing recorded.
                admission.settle(0);
                let mut r = answers::shed(shed, tier_label);
                answers::rate_headers(r.headers_mut(), &rate);
                return Err(r);
            }
        }
    } else {
        None
    };
    gw.counters.allowed.fetch_add(1, Ordering::Relaxed);
    let in_flight = gw.metrics.in_flight();

    // The upstream request: the client's, minus connection and identity headers.
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    for n in [
        "authorization",
        "x-api-key",
        "api-key",
        "host",
        TENANT_HEADER,
        KEY_ID_HEADER,
        FLAGS_HEADER,
        PROOF_HEADER,
    ] {
        headers.remove(n);
    }
    if !inspected.flags.is_empty()
        && let Ok(v) = HeaderValue::from_str(&inspected.flags.join(","))
    {
        headers.insert(FLAGS_HEADER, v);
    }
    if let Some(a) = &s.upstream_authorization
        && let Ok(v) = HeaderValue::from_str(a)
    {
        headers.insert(header::AUTHORIZATION, v);
    }
    let peer_ip = client_addr::canonical(conn.peer.ip());
    let forwarded = match s.client_address {
        // Behind a PROXY-protocol balancer the client's own X-Forwarded-For is its word only.
        ClientAddressSource::ProxyProtocol => client_ip.to_string(),
        ClientAddressSource::XForwardedFor => {
            let prior: Vec<&str> = headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            if !prior.is_empty() && client_addr::is_trusted(&s.trusted_proxies, peer_ip) {
                format!("{}, {peer_ip}", prior.join(", "))
            } else {
                client_ip.to_string()
            }
        }
    };
    // Other spellings of the client address would contradict the one set here.
    for n in ["forwarded", "x-real-ip", "x-forwarded-for", "expect"] {
        headers.remove(n);
    }
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Ok(v) = HeaderValue::from_str(&key.tenant) {
        headers.insert(TENANT_HEADER, v);
    }
    if let Ok(v) = HeaderValue::from_str(&key.id) {
        headers.insert(KEY_ID_HEADER, v);
    }
    headers.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(inspected.body.len()),
    );
    let mut up = Request::new(Full::new(inspected.body));
    *up.method_mut() = parts.method;
    *up.uri_mut() = upstream_uri(&gw.upstream(policy), &parts.uri);
    *up.headers_mut() = headers;

    let settlement = Settlement {
        ledger: gw.ledger.clone(),
        tokenizer: gw.tokenizer,
        tenant: key.tenant.clone(),
        key_id: key.id.clone(),
        model: inspected.model.clone().unwrap_or_else(|| "-".into()),
        prompt_estimate: inspected.prompt_tokens,
        tokens: gw.metrics.tier_tokens(tier_label),
        _in_flight: in_flight,
        _slot: slot,
    };

    let sent_at = std::time::Instant::now();
    let sent = tokio::time::timeout(s.upstream_response_timeout, gw.client.request(up)).await;
    gw.metrics.observe_upstream(sent_at);
    let response = match sent {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            gw.counters.upstream_errors.fetch_add(1, Ordering::Relaxed);
            gw.metrics.count(tier_label, Outcome::UpstreamError);
            warn!(error = %e, "upstream request failed");
            let rate = admission.headers();
            settlement.settle_without_response(admission);
            let mut r = answers::error(
                StatusCode::BAD_GATEWAY,
                "The inference server could not be reached. Please retry.",
                "server_error",
                Some("upstream_unavailable"),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            answers::rate_headers(r.headers_mut(), &rate);
            return Err(r);
        }
        Err(_) => {
            gw.counters.upstream_errors.fetch_add(1, Ordering::Relaxed);
            gw.metrics.count(tier_label, Outcome::UpstreamError);
            warn!(timeout = ?s.upstream_response_timeout, "upstream did not answer in time");
            // The upstream may have worked on it: the reservation stays charged.
            let rate = admission.headers();
            drop(admission);
            let mut r = answers::error(
                StatusCode::GATEWAY_TIMEOUT,
                &format!(
                    "The inference server did not answer within {}.",
                    humantime::format_duration(s.upstream_response_timeout)
                ),
                "server_error",
                Some("upstream_timeout"),
            );
            answers::rate_headers(r.headers_mut(), &rate);
            return Err(r);
        }
    };

    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    answers::rate_headers(&mut parts.headers, &admission.headers());
    if parts.status.is_server_error() {
        gw.counters.upstream_errors.fetch_add(1, Ordering::Relaxed);
        gw.metrics.count(tier_label, Outcome::UpstreamError);
    } else {
        gw.metrics.count(tier_label, Outcome::Allowed);
    }
    let kind = if !parts.status.is_success() {
        ResponseKind::Failed
    } else {
        match parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
        {
            Some(ct) if ct.starts_with("text/event-stream") => ResponseKind::EventStream {
                hide_usage_chunk: !inspected.client_wants_usage,
            },
            Some(ct) if ct.starts_with("application/json") => ResponseKind::Json,
            _ => ResponseKind::Other,
        }
    };
    if matches!(
        kind,
        ResponseKind::EventStream {
            hide_usage_chunk: true
        }
    ) {
        // The body changes length when the usage chunk is hidden.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    let metered = Metered::new(body, kind, admission, settlement, active);
    Ok(Response::from_parts(parts, metered::boxed(metered)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_is_read_as_the_upstream_router_reads_the_path() {
        let post = http::Method::POST;
        assert_eq!(api_of(&post, "/v1/chat/completions"), Api::Chat);
        assert_eq!(api_of(&post, "/v1/chat/completion%73"), Api::Chat);
        assert_eq!(api_of(&post, "/v1//chat/completions/"), Api::Chat);
        assert_eq!(api_of(&post, "/V1/Chat/Completions"), Api::Chat);
        assert_eq!(api_of(&post, "/v1/completions"), Api::Completions);
        assert_eq!(api_of(&post, "/v1/responses"), Api::Responses);
        assert_eq!(
            api_of(&http::Method::GET, "/v1/chat/completions"),
            Api::Other
        );
        // Unknown routes are metered by what the body looks like.
        assert_eq!(api_of_body(br#"{"model":"m","messages":[]}"#), Api::Chat);
        assert_eq!(
            api_of_body(br#"{"model":"m","prompt":"hi"}"#),
            Api::Completions
        );
        assert_eq!(
            api_of_body(br#"{"model":"m","input":"hi"}"#),
            Api::Responses
        );
        assert_eq!(api_of_body(b"[1]"), Api::Other);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn keys_are_read_from_the_three_headers() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer aig_x".parse().expect("v"));
        assert_eq!(presented_key(&h), Ok(Some("aig_x")));
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "aig_y".parse().expect("v"));
        assert_eq!(presented_key(&h), Ok(Some("aig_y")));
        let mut h = HeaderMap::new();
        h.insert("api-key", "aig_z".parse().expect("v"));
        assert_eq!(presented_key(&h), Ok(Some("aig_z")));
        let mut h = HeaderMap::new();
        h.append("authorization", "Bearer a".parse().expect("v"));
        h.append("authorization", "Bearer b".parse().expect("v"));
        assert!(presented_key(&h).is_err());
        let mut h = HeaderMap::new();
        h.insert("authorization", "Basic abc".parse().expect("v"));
        assert!(presented_key(&h).is_err());
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-secret".parse().expect("v"));
        h.insert("x-secret", "1".parse().expect("v"));
        h.insert("transfer-encoding", "chunked".parse().expect("v"));
        h.insert("x-kept", "1".parse().expect("v"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn upstream_uri_keeps_the_prefix_and_query() {
        let base: Uri = "http://127.0.0.1:8000/api".parse().expect("uri");
        let req: Uri = "/v1/models?x=1".parse().expect("uri");
        assert_eq!(
            upstream_uri(&base, &req).to_string(),
            "http://127.0.0.1:8000/api/v1/models?x=1"
        );
    }
}
