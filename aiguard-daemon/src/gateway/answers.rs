//! What the gateway answers itself: OpenAI-style error bodies and the rate-limit headers
//! OpenAI sends (`x-ratelimit-*`, `Retry-After`), so that OpenAI clients back off correctly.
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

use crate::limits::{Denial, RateHeaders, RateState};

/// The `{"error": {...}}` body OpenAI's API answers errors with.
pub fn error_body(message: &str, kind: &str, code: Option<&str>) -> Bytes {
    serde_json::to_vec(&serde_json::json!({
        "error": {"message": message, "type": kind, "param": null, "code": code}
    }))
    .expect("an error body serializes")
    .into()
}

/// An error answer.
pub fn error(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response<Bytes> {
    let mut r = Response::new(error_body(message, kind, code));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub fn unauthorized(message: &str) -> Response<Bytes> {
    error(
        StatusCode::UNAUTHORIZED,
        message,
        "invalid_request_error",
        Some("invalid_api_key"),
    )
}

pub fn bad_request(message: &str) -> Response<Bytes> {
    error(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        None,
    )
}

/// A duration the way OpenAI writes resets: `20ms`, `1s`, `1.5s`, `6m0s`, `1h2m3s`.
pub fn openai_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs();
    if secs < 60 {
        let tenths = (ms % 1000) / 100;
        return if tenths == 0 {
            format!("{secs}s")
        } else {
            format!("{secs}.{tenths}s")
        };
    }
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else {
        format!("{m}m{s}s")
    }
}

fn put(headers: &mut HeaderMap, name: &'static str, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(name, v);
    }
}

/// Where rate-limit headers go: an answer's header map, or the bytes of a relayed head.
pub trait HeaderSink {
    fn put(&mut self, name: &'static str, value: &[u8]);
}

impl HeaderSink for HeaderMap {
    fn put(&mut self, name: &'static str, value: &[u8]) {
        if let Ok(v) = HeaderValue::from_bytes(value) {
            self.insert(name, v);
        }
    }
}

impl HeaderSink for Vec<u8> {
    fn put(&mut self, name: &'static str, value: &[u8]) {
        super::http1::head::write::header(self, name.as_bytes(), value);
    }
}

const REQUESTS_HEADERS: [&str; 3] = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
];
const TOKENS_HEADERS: [&str; 3] = [
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

fn put_state(out: &mut impl HeaderSink, names: [&'static str; 3], s: &RateState) {
    let mut n = itoa::Buffer::new();
    out.put(names[0], n.format(s.limit).as_bytes());
    out.put(names[1], n.format(s.remaining).as_bytes());
    out.put(names[2], openai_duration(s.reset).as_bytes());
}

/// Adds the `x-ratelimit-*` headers for whichever limits are set.
pub fn rate_headers(out: &mut impl HeaderSink, h: &RateHeaders) {
    if let Some(s) = &h.requests {
        put_state(out, REQUESTS_HEADERS, s);
    }
    if let Some(s) = &h.tokens {
        put_state(out, TOKENS_HEADERS, s);
    }
}

/// Which of an upstream's own `x-ratelimit-*` fields the gateway's replace, for
/// [`rate_headers`] written with `h`.
pub fn replaced_by(h: &RateHeaders) -> fn(&[u8]) -> bool {
    fn requests(n: &[u8]) -> bool {
        REQUESTS_HEADERS.iter().any(|r| r.as_bytes() == n)
    }
    fn tokens(n: &[u8]) -> bool {
        TOKENS_HEADERS.iter().any(|r| r.as_bytes() == n)
    }
    fn both(n: &[u8]) -> bool {
        requests(n) || tokens(n)
    }
    fn neither(_: &[u8]) -> bool {
        false
    }
    match (h.requests.is_some(), h.tokens.is_some()) {
        (true, true) => both,
        (true, false) => requests,
        (false, true) => tokens,
        (false, false) => neither,
    }
}

fn retry_after(headers: &mut HeaderMap, d: Duration) {
    // Whole seconds, rounded up (the standard header), and OpenAI's exact milliseconds.
    let secs = d.as_millis().div_ceil(1000).max(1);
    put(headers, "retry-after", secs.to_string());
    put(headers, "retry-after-ms", d.as_millis().max(1).to_string());
}

/// The 429 (or 400 for a request that can never fit) for a refused request.
/// The shared store could not decide and the tier fails closed.
pub fn store_unavailable(retry: Duration) -> Response<Bytes> {
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "The rate-limit service is unavailable. Please retry shortly.",
        "server_error",
        Some("service_unavailable"),
    );
    retry_after(r.headers_mut(), retry);
    r
}

/// A challenged source without a (valid) proof of work: the token to solve, and how hard.
/// `failure` says what was wrong with the proof sent, if one was.
pub fn challenge(token: &str, difficulty: u8, failure: Option<&str>) -> Response<Bytes> {
    let why = failure.map_or_else(String::new, |f| {
        format!(" The proof sent was refused: {f}.")
    });
    let mut r = error(
        StatusCode::PRECONDITION_REQUIRED,
        &format!(
            "Requests from your network must carry a proof of work. Find a string S such that \
             SHA-256(\"<x-aiguard-challenge>:S\") starts with {difficulty} zero bits and repeat \
             the request with the header `x-aiguard-proof: <x-aiguard-challenge>:S`.{why}"
        ),
        "invalid_request_error",
        Some("challenge_required"),
    );
    if let Ok(v) = HeaderValue::from_str(token) {
        r.headers_mut().insert("x-aiguard-challenge", v);
    }
    r.headers_mut().insert(
        "x-aiguard-challenge-difficulty",
        HeaderValue::from(u32::from(difficulty)),
    );
    r
}

/// A suspended key (abuse detection or an operator).
pub fn suspended(until_ms: u64) -> Response<Bytes> {
    let mut r = error(
        StatusCode::FORBIDDEN,
        &format!(
            "This API key is suspended until {} (UTC) because of unusual activity. Contact your administrator.",
            crate::cli::fmt_time(until_ms)
        ),
        "invalid_request_error",
        Some("key_suspended"),
    );
    let secs = until_ms
        .saturating_sub(crate::bans::now_ms())
        .div_ceil(1000)
        .max(1);
    retry_after(r.headers_mut(), Duration::from_secs(secs));
    r
}

/// A request a prompt rule with the `reject` action matched.
pub fn prompt_rejected(rule: &str) -> Response<Bytes> {
    error(
        StatusCode::BAD_REQUEST,
        &format!("Your request was rejected by the content rule {rule:?}."),
        "invalid_request_error",
        Some("prompt_rejected"),
    )
}

/// A request shed while it waited for an upstream slot (see [`super::priority`]).
pub fn shed(shed: super::priority::Shed, tier: &str) -> Response<Bytes> {
    let mut r = if shed.upstream_saturated() {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "The inference server is at capacity. Please retry shortly.",
            "server_error",
            Some("upstream_saturated"),
        )
    } else {
        error(
            StatusCode::TOO_MANY_REQUESTS,
            &format!(
                "The inference server is busy serving higher-priority traffic and the {tier} \
                 tier's queue is full. Please try again in {}.",
                openai_duration(shed.retry_after())
            ),
            "requests",
            Some("queue_full"),
        )
    };
    retry_after(r.headers_mut(), shed.retry_after());
    r
}

pub fn denied(d: &Denial, rate: &RateHeaders) -> Response<Bytes> {
    let mut r = match d {
        Denial::Requests {
            level,
            per,
            limit,
            retry_after: wait,
        } => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "Rate limit reached for requests per {per} ({} limit): limit {limit}. Please try again in {}.",
                    level.as_str(),
                    openai_duration(*wait)
                ),
                "requests",
                Some("rate_limit_exceeded"),
            );
            retry_after(r.headers_mut(), *wait);
            r
        }
        Denial::Tokens {
            level,
            limit,
            requested,
            retry_after: wait,
        } => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "Rate limit reached for tokens per minute ({} limit): limit {limit}, requested {requested}. Please try again in {}.",
                    level.as_str(),
                    openai_duration(*wait)
                ),
                "tokens",
                Some("rate_limit_exceeded"),
            );
            retry_after(r.headers_mut(), *wait);
            r
        }
        Denial::TooLarge {
            level,
            limit,
            requested,
        } => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "Request too large: it needs {requested} tokens (prompt plus max_tokens), more than the {} limit of {limit} tokens per minute. Lower max_tokens or shorten the prompt.",
                    level.as_str()
                ),
                "tokens",
                Some("rate_limit_exceeded"),
            );
            // Retrying cannot help.
            r.headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
            r
        }
        Denial::Concurrency { level, limit } => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "Too many concurrent requests ({} limit): limit {limit}. Please try again when one finishes.",
                    level.as_str()
                ),
                "requests",
                Some("rate_limit_exceeded"),
            );
            retry_after(r.headers_mut(), Duration::from_secs(1));
            r
        }
        Denial::Quota {
            limit,
            used,
            requested,
            resets_in,
        } => {
            let mut r = quota_exceeded(*limit, *used, *requested);
            retry_after(r.headers_mut(), *resets_in);
            r
        }
    };
    rate_headers(r.headers_mut(), rate);
    r
}

pub fn quota_message(limit: u64, used: u64, requested: u64) -> String {
    format!(
        "You exceeded your current quota: {used} of {limit} tokens used this month, this request needs up to {requested}. The quota resets at the start of next month (UTC)."
    )
}

fn quota_exceeded(limit: u64, used: u64, requested: u64) -> Response<Bytes> {
    let mut r = error(
        StatusCode::TOO_MANY_REQUESTS,
        &quota_message(limit, used, requested),
        "insufficient_quota",
        Some("insufficient_quota"),
    );
    // OpenAI's clients would otherwise retry; waiting seconds does not bring quota back.
    r.headers_mut()
        .insert("x-should-retry", HeaderValue::from_static("false"));
    r
}

/// The last event of a stream ended because the monthly quota ran out.
pub fn quota_event(limit: u64) -> Bytes {
    let body = error_body(
        &format!(
            "You exceeded your current quota of {limit} tokens this month; the response was ended. The quota resets at the start of next month (UTC)."
        ),
        "insufficient_quota",
        Some("insufficient_quota"),
    );
    let mut event = Vec::with_capacity(body.len() + 10);
    event.extend_from_slice(b"data: ");
    event.extend_from_slice(&body);
    event.extend_from_slice(b"\n\n");
    event.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_openai() {
        for (ms, s) in [
            (20, "20ms"),
            (1000, "1s"),
            (1500, "1.5s"),
            (360_000, "6m0s"),
            (3_723_000, "1h2m3s"),
        ] {
            assert_eq!(openai_duration(Duration::from_millis(ms)), s);
        }
    }

    #[test]
    fn a_refusal_carries_retry_after_and_an_openai_error() {
        let r = denied(
            &Denial::Requests {
                level: crate::limits::Level::Key,
                per: "minute",
                limit: 10,
                retry_after: Duration::from_millis(5400),
            },
            &RateHeaders::default(),
        );
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()["retry-after"], "6");
        assert_eq!(r.headers()["retry-after-ms"], "5400");
    }
}
