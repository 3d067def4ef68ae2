//! One request through the gateway: who is calling, may they, what will it cost, forward it,
//! and hand the response to [`super::metered`] for accounting on its way out.
use std::{net::IpAddr, sync::Arc, sync::atomic::Ordering};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde_json::Value;
use tracing::{debug, warn};

use super::{
    Gateway, Policy, answers, client_addr,
    decide::Refusal,
    http1::{
        head::{Headers, RequestHead, write},
        server::{BodyError, Incoming, Relay, Reply, Service},
        upstream::Upstream,
    },
    metered::{Metered, ResponseKind, Settlement},
};
use crate::{
    bans::now_ms,
    detect::prompt::RuleAction,
    keys::LiveKey,
    limits::{Demand, Denial},
    metrics::{Outcome, gateway::NO_TIER},
    tiers::ClientAddressSource,
    tokens::{self, Shape},
    usage::Today,
};

/// Bodies above this are tokenized off the async workers.
const TOKENIZE_INLINE_BYTES: usize = 64 << 10;
/// Longest model name kept in usage records.
const MAX_MODEL_LEN: usize = 128;

/// Identity headers the gateway sets for the upstream; a client's own are removed.
const TENANT_HEADER: &str = "x-aiguard-tenant";
const KEY_ID_HEADER: &str = "x-aiguard-key-id";
/// The prompt rules with the `tag` action that a request matched, for the upstream.
const FLAGS_HEADER: &str = "x-aiguard-flags";
/// A solved proof of work: `<token>:<solution>`.
const PROOF_HEADER: &str = crate::detect::challenge::PROOF_HEADER;

/// A client's header field that does not go upstream: those about the connection (RFC 9110
/// §7.6.1), the API key, the client address in any spelling (the gateway writes its own),
/// the gateway's own identity fields, and the framing (the gateway writes the length).
fn stays_behind(name: &[u8]) -> bool {
    matches!(
        name,
        b"connection"
            | b"keep-alive"
            | b"proxy-connection"
            | b"proxy-authenticate"
            | b"proxy-authorization"
            | b"te"
            | b"trailer"
            | b"transfer-encoding"
            | b"upgrade"
            | b"authorization"
            | b"x-api-key"
            | b"api-key"
            | b"host"
            | b"forwarded"
            | b"x-real-ip"
            | b"x-forwarded-for"
            | b"x-forwarded-proto"
            | b"expect"
            | b"content-length"
    ) || name == TENANT_HEADER.as_bytes()
        || name == KEY_ID_HEADER.as_bytes()
        || name == FLAGS_HEADER.as_bytes()
        || name == PROOF_HEADER.as_bytes()
}

impl Service for Gateway {
    async fn call(&self, req: &mut Incoming<'_>) -> Reply {
        handle(self, req).await
    }
}

async fn handle(gw: &Gateway, req: &mut Incoming<'_>) -> Reply {
    gw.counters.requests.fetch_add(1, Ordering::Relaxed);
    let policy = gw.policy();
    let client_ip = match policy.settings.client_address {
        ClientAddressSource::XForwardedFor => client_addr::from_forwarded_for(
            &policy.settings.trusted_proxies,
            req.peer.ip(),
            req.head.headers.get_all("x-forwarded-for"),
        ),
        ClientAddressSource::ProxyProtocol => req.client,
    };
    // One reading of the wall clock for the decisions up to the upstream.
    let now = now_ms();
    let detection = &gw.detection;
    if let Err(r) = challenge(gw, client_ip, &req.head.headers, now) {
        detection.engine.answered(client_ip, 428, now);
        return Reply::Answer(r);
    }
    let reply = match proxy(gw, &policy, client_ip, req, now).await {
        Ok(relay) => Reply::Relay(relay),
        Err(answer) => Reply::Answer(answer),
    };
    let status = match &reply {
        Reply::Answer(r) => r.status().as_u16(),
        Reply::Relay(r) => r.status,
    };
    detection.engine.answered(client_ip, status, now_ms());
    reply
}

/// A source that detection challenged must show a proof of work (see
/// [`crate::detect::challenge`]); others pass untouched.
// The error is the answer itself, built only for a refused request.
#[allow(clippy::result_large_err)]
fn challenge(gw: &Gateway, ip: IpAddr, headers: &Headers, now: u64) -> Result<(), Response<Bytes>> {
    let d = &gw.detection;
    let Some(prefix) = d.engine.challenged(ip, now) else {
        return Ok(());
    };
    let subject = prefix.to_string();
    let failure = match headers.get(PROOF_HEADER).map(visible_ascii) {
        None => None,
        Some(Some(proof)) => match d.challenger.verify(&subject, proof, now) {
            Ok(()) => {
                d.metrics.challenge("passed");
                return Ok(());
            }
            Err(e) => Some(e.to_string()),
        },
        Some(None) => Some("the proof header is not visible ASCII".to_owned()),
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

/// A header value as text, if it is visible ASCII (with spaces and tabs).
fn visible_ascii(v: &[u8]) -> Option<&str> {
    v.iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
        .then(|| std::str::from_utf8(v).ok())
        .flatten()
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
fn api_of_shape(shape: &Shape) -> Api {
    if !shape.is_object {
        Api::Other
    } else if shape.has_messages {
        Api::Chat
    } else if shape.has_prompt {
        Api::Completions
    } else if shape.has_input && shape.has_model {
        Api::Responses
    } else {
        Api::Other
    }
}

/// The API key a request presents: `Authorization: Bearer`, `x-api-key` or `api-key`.
fn presented_key(headers: &Headers) -> Result<Option<&str>, &'static str> {
    for name in ["authorization", "x-api-key", "api-key"] {
        let mut values = headers.get_all(name);
        let Some(v) = values.next() else { continue };
        if values.next().is_some() {
            return Err("more than one API key header: send exactly one");
        }
        let v = visible_ascii(v)
            .ok_or("the API key header is not visible ASCII")?
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

/// Reads a body's shape (its tokens counted), off the async workers when it is large:
/// tokenizing is the cost.
async fn read_shape(gw: &Gateway, body: &Bytes) -> Result<Shape, Response<Bytes>> {
    let tokenizer = gw.tokenizer;
    let parsed = if body.len() > TOKENIZE_INLINE_BYTES {
        let body = body.clone();
        tokio::task::spawn_blocking(move || tokenizer.shape(&body))
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
        tokenizer.shape(body)
    };
    parsed.map_err(|e| {
        answers::bad_request(&format!(
            "We could not parse the JSON body of your request ({e}). The body must be a JSON object."
        ))
    })
}

/// What a request will cost, and the body that goes upstream. `shape`: the body's, if it was
/// read already.
async fn inspect(
    gw: &Gateway,
    policy: &Policy,
    api: Api,
    body: Bytes,
    shape: Option<Shape>,
) -> Result<Inspected, Response<Bytes>> {
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
    let shape = match shape {
        Some(s) => s,
        None => read_shape(gw, &body).await?,
    };
    if !shape.is_object {
        return Err(answers::bad_request(
            "The request body must be a JSON object.",
        ));
    }
    let stream = shape.stream.unwrap_or(false);
    let wants_usage = shape.include_usage.unwrap_or(false);
    // Ask a stream for its final usage chunk: without it the gateway could only estimate.
    let ask_usage = stream && !wants_usage && matches!(api, Api::Chat | Api::Completions);
    // The tree only when something needs it: prompt rules, or that rewrite.
    let mut tree = if ask_usage || !gw.detection.prompt_rules().is_empty() {
        Some(serde_json::from_slice::<Value>(&body).map_err(|e| {
            answers::bad_request(&format!(
                "We could not parse the JSON body of your request ({e})."
            ))
        })?)
    } else {
        None
    };
    let flags = match &tree {
        Some(json) => apply_prompt_rules(gw, json)?,
        None => Vec::new(),
    };
    let model = shape
        .model
        .as_deref()
        .map(|m| m.chars().take(MAX_MODEL_LEN).collect::<String>());
    let prompt_tokens = shape.prompt_tokens;
    let completion = match api {
        Api::Embeddings => 0,
        _ => {
            let per_choice = shape
                .max_completion_tokens()
                .unwrap_or(policy.settings.default_max_tokens);
            if per_choice > tokens::MAX_COMPLETION_TOKENS {
                return Err(answers::bad_request(&format!(
                    "max_tokens is {per_choice}; the most a request may ask for is {}.",
                    tokens::MAX_COMPLETION_TOKENS
                )));
            }
            // `n` (and `best_of`) choices each generate up to the limit.
            let choices = [shape.n, shape.best_of]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(1)
                .clamp(1, 128);
            per_choice * choices
        }
    };
    let mut body = body;
    if ask_usage && let Some(obj) = tree.as_mut().and_then(Value::as_object_mut) {
        let opts = obj
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(o) = opts.as_object_mut() {
            o.insert("include_usage".into(), Value::Bool(true));
            body = serde_json::to_vec(&obj)
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
fn apply_prompt_rules(gw: &Gateway, json: &Value) -> Result<Vec<Arc<str>>, Response<Bytes>> {
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

/// The whole request body, or the answer that refuses it.
async fn read_body(policy: &Policy, req: &mut Incoming<'_>) -> Result<Bytes, Response<Bytes>> {
    let max = policy.settings.max_request_bytes;
    // The client must send its whole body within the idle timeout.
    match req.read_body(max, policy.settings.idle_timeout).await {
        Ok(body) => Ok(body),
        Err(BodyError::TooLarge(_)) => Err(answers::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("The request body is larger than the gateway accepts ({max} bytes)."),
            "invalid_request_error",
            Some("request_too_large"),
        )),
        Err(BodyError::TimedOut) => Err(answers::error(
            StatusCode::REQUEST_TIMEOUT,
            "The request body did not arrive in time.",
            "invalid_request_error",
            None,
        )),
        Err(e) => Err(answers::bad_request(&format!(
            "The request body could not be read: {e}"
        ))),
    }
}

/// The request line and header fields the upstream gets: the client's, minus what
/// [`stays_behind`], plus who the caller is.
struct UpstreamHead<'a> {
    up: &'a Upstream,
    client_ip: IpAddr,
    /// The X-Forwarded-For value to send.
    forwarded: &'a str,
    tenant: &'a str,
    key_id: &'a str,
    flags: &'a [Arc<str>],
    authorization: Option<&'a str>,
    body_len: usize,
}

impl UpstreamHead<'_> {
    fn write(&self, req: &RequestHead) -> Vec<u8> {
        let mut out = Vec::with_capacity(384);
        out.extend_from_slice(req.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.up.prefix.as_bytes());
        out.extend_from_slice(req.path_and_query().as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        write::header(&mut out, b"host", self.up.authority.as_bytes());
        // Fields the client's Connection names are about its connection too (rarely any).
        let listed = req.headers.connection_options();
        for (name, value) in req.headers.iter() {
            if stays_behind(name) || listed.iter().any(|l| l.eq_ignore_ascii_case(name)) {
                continue;
            }
            write::header(&mut out, name, value);
        }
        if !self.flags.is_empty() {
            let joined = self.flags.join(",");
            if write::is_valid_value(joined.as_bytes()) {
                write::header(&mut out, FLAGS_HEADER.as_bytes(), joined.as_bytes());
            }
        }
        if let Some(a) = self.authorization
            && write::is_valid_value(a.as_bytes())
        {
            write::header(&mut out, b"authorization", a.as_bytes());
        }
        let forwarded = if write::is_valid_value(self.forwarded.as_bytes()) {
            self.forwarded.to_owned()
        } else {
            self.client_ip.to_string()
        };
        write::header(&mut out, b"x-forwarded-for", forwarded.as_bytes());
        write::header(&mut out, b"x-forwarded-proto", b"http");
        for (name, value) in [(TENANT_HEADER, self.tenant), (KEY_ID_HEADER, self.key_id)] {
            if write::is_valid_value(value.as_bytes()) {
                write::header(&mut out, name.as_bytes(), value.as_bytes());
            }
        }
        write::header_u64(&mut out, b"content-length", self.body_len as u64);
        out.extend_from_slice(b"\r\n");
        out
    }
}

async fn proxy(
    gw: &Gateway,
    policy: &Policy,
    client_ip: IpAddr,
    req: &mut Incoming<'_>,
    now: u64,
) -> Result<Relay, Response<Bytes>> {
    let s = &policy.settings;
    if matches!(req.head.method, http::Method::CONNECT | http::Method::TRACE) {
        gw.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
        gw.metrics.count(NO_TIER, Outcome::BadRequest);
        let mut r = answers::error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{} is not served by this API.", req.head.method),
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
    let key: Arc<LiveKey> = match presented_key(&req.head.headers) {
        Err(why) => {
            gw.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
            gw.metrics.count(NO_TIER, Outcome::BadRequest);
            engine.auth_failure(client_ip, None, now);
            return Err(answers::unauthorized(why));
        }
        Ok(None) => {
            gw.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
            gw.metrics.count(NO_TIER, Outcome::Unauthorized);
            engine.auth_failure(client_ip, None, now);
            return Err(answers::unauthorized(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
            ));
        }
        Ok(Some(secret)) => match gw.keys.authenticate(secret) {
            Some(k) => k,
            None => {
                gw.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
                gw.metrics.count(NO_TIER, Outcome::Unauthorized);
                engine.auth_failure(client_ip, Some(secret), now);
                debug!(client = %client_ip, "unknown or revoked API key");
                return Err(answers::unauthorized(
                    "Incorrect API key provided. Check the key, or ask your administrator for a new one.",
                ));
            }
        },
    };
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
    let refused = |mut r: Response<Bytes>| {
        gw.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
        gw.metrics.count(tier_label, Outcome::BadRequest);
        if gw.decider.shared().is_none() {
            let rate = gw.limiter.peek(&key.tenant, &key.id, &tenant_policy, None);
            answers::rate_headers(r.headers_mut(), &rate);
        }
        r
    };

    let api = api_of(&req.head.method, req.head.path());
    let body = read_body(policy, req).await.map_err(refused)?;
    let mut shape = None;
    let api = match api {
        // Another route: metered by what its body looks like, if it is JSON at all.
        Api::Other if req.head.method == http::Method::POST && body.first() == Some(&b'{') => {
            match read_shape(gw, &body).await {
                Ok(s) => {
                    let api = api_of_shape(&s);
                    shape = Some(s);
                    api
                }
                Err(_) => Api::Other,
            }
        }
        known => known,
    };
    let inspected = inspect(gw, policy, api, body, shape)
        .await
        .map_err(refused)?;

    let tier = policy.tiers.tier(&key.tier);
    let model_limits = inspected
        .model
        .as_deref()
        .and_then(|m| tier.models.get(m).map(|l| (m, l)));
    let (today, month_left) = Today::at(now);
    let demand = Demand {
        tenant: &key.tenant,
        key: &key.id,
        policy: &tenant_policy,
        model: model_limits,
        tokens: inspected.reserve,
        min_tokens: inspected.prompt_tokens,
        month: today.month_index(),
        month_left,
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

    // X-Forwarded-For: behind a PROXY-protocol balancer the client's own is its word only;
    // behind a trusted X-Forwarded-For one, the chain so far plus the balancer.
    let peer_ip = client_addr::canonical(req.peer.ip());
    let forwarded = match s.client_address {
        ClientAddressSource::ProxyProtocol => client_ip.to_string(),
        ClientAddressSource::XForwardedFor => {
            let prior: Vec<&str> = req
                .head
                .headers
                .get_all("x-forwarded-for")
                .filter_map(|v| std::str::from_utf8(v).ok())
                .collect();
            if !prior.is_empty() && client_addr::is_trusted(&s.trusted_proxies, peer_ip) {
                format!("{}, {peer_ip}", prior.join(", "))
            } else {
                client_ip.to_string()
            }
        }
    };
    let up = gw.upstream(policy);
    let head = UpstreamHead {
        up,
        client_ip,
        forwarded: &forwarded,
        tenant: &key.tenant,
        key_id: &key.id,
        flags: &inspected.flags,
        authorization: s.upstream_authorization.as_deref(),
        body_len: inspected.body.len(),
    }
    .write(&req.head);

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

    let sent_at = tokio::time::Instant::now();
    let to_head = req.head.is_head();
    let sent = req
        .within(
            sent_at,
            s.upstream_response_timeout,
            gw.pool.send(up, &head, &inspected.body, to_head),
        )
        .await;
    gw.metrics.observe_upstream(sent_at.into_std());
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

    let status = response.head.status;
    let rate = admission.headers();
    let mut extra = Vec::with_capacity(256);
    answers::rate_headers(&mut extra, &rate);
    if status >= 500 {
        gw.counters.upstream_errors.fetch_add(1, Ordering::Relaxed);
        gw.metrics.count(tier_label, Outcome::UpstreamError);
    } else {
        gw.metrics.count(tier_label, Outcome::Allowed);
    }
    let kind = if !(200..300).contains(&status) {
        ResponseKind::Failed
    } else {
        match response.head.headers.get("content-type") {
            Some(ct) if ct.starts_with(b"text/event-stream") => ResponseKind::EventStream {
                hide_usage_chunk: !inspected.client_wants_usage,
            },
            Some(ct) if ct.starts_with(b"application/json") => ResponseKind::Json,
            _ => ResponseKind::Other,
        }
    };
    Ok(Relay {
        status,
        headers: response.head.headers,
        body: response.body,
        extra,
        replaced: answers::replaced_by(&rate),
        filter: Box::new(Metered::new(kind, admission, settlement)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn request(lines: &str) -> RequestHead {
        let text = format!("POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: gw\r\n{lines}\r\n");
        crate::gateway::http1::head::parse_request(&mut BytesMut::from(text.as_str()))
            .expect("valid")
            .expect("complete")
    }

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
        let t = crate::tokens::Tokenizer::load(crate::tiers::TokenizerName::O200kBase);
        let api_of_body = |b: &[u8]| api_of_shape(&t.shape(b).expect("valid"));
        assert_eq!(api_of_body(br#"{"model":"m","messages":[]}"#), Api::Chat);
        assert_eq!(
            api_of_body(br#"{"model":"m","prompt":"hi"}"#),
            Api::Completions
        );
        assert_eq!(
            api_of_body(br#"{"model":"m","input":"hi"}"#),
            Api::Responses
        );
        assert_eq!(api_of_body(br#"{"input":"no model"}"#), Api::Other);
        assert_eq!(api_of_body(b"[1]"), Api::Other);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn keys_are_read_from_the_three_headers() {
        let key = |lines: &str| {
            let r = request(lines);
            presented_key(&r.headers).map(|k| k.map(str::to_owned))
        };
        assert_eq!(
            key("authorization: Bearer aig_x\r\n"),
            Ok(Some("aig_x".into()))
        );
        assert_eq!(key("X-Api-Key: aig_y\r\n"), Ok(Some("aig_y".into())));
        assert_eq!(key("api-key: aig_z\r\n"), Ok(Some("aig_z".into())));
        assert_eq!(key(""), Ok(None));
        assert!(key("authorization: Bearer a\r\nauthorization: Bearer b\r\n").is_err());
        assert!(key("authorization: Basic abc\r\n").is_err());
        assert!(key("x-api-key: café\r\n").is_err(), "not visible ASCII");
    }

    #[test]
    fn the_upstream_head_drops_connection_and_identity_fields_and_adds_the_callers() {
        let req = request(
            "Connection: keep-alive, x-secret\r\nx-secret: 1\r\nTransfer-Encoding: chunked\r\n\
             Authorization: Bearer aig_k\r\nX-Forwarded-For: 6.6.6.6\r\nx-aiguard-tenant: evil\r\n\
             Expect: 100-continue\r\nx-kept: yes\r\nContent-Type: application/json\r\n",
        );
        let up = Upstream::from_uri(&"http://127.0.0.1:8000/api/".parse().expect("uri"))
            .expect("upstream");
        let flags = [Arc::<str>::from("pii")];
        let head = UpstreamHead {
            up: &up,
            client_ip: "192.0.2.7".parse().expect("ip"),
            forwarded: "192.0.2.7",
            tenant: "acme",
            key_id: "key_1",
            flags: &flags,
            authorization: Some("Bearer upstream-secret"),
            body_len: 42,
        }
        .write(&req);
        let text = String::from_utf8(head).expect("text");
        assert_eq!(
            text,
            "POST /api/v1/chat/completions?x=1 HTTP/1.1\r\nhost: 127.0.0.1:8000\r\n\
             x-kept: yes\r\ncontent-type: application/json\r\nx-aiguard-flags: pii\r\n\
             authorization: Bearer upstream-secret\r\nx-forwarded-for: 192.0.2.7\r\n\
             x-forwarded-proto: http\r\nx-aiguard-tenant: acme\r\nx-aiguard-key-id: key_1\r\n\
             content-length: 42\r\n\r\n"
        );
    }
}
