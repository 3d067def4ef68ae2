//! The response on its way to the client: passed through frame by frame as it arrives (SSE
//! events are flushed one by one), while the gateway learns what the request really used:
//! `usage` from a JSON body or from a stream's final chunk, else the output counted with the
//! tokenizer. When the body ends (or the client goes away) the request is settled: the
//! limiter gets back what was reserved and not used, and the ledger records the usage.
//!
//! A stream that would pass a hard monthly quota is ended with a final SSE error event.
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use serde_json::Value;
use tracing::error;

use super::answers;
use super::decide::Ticket;
use super::http1::server::{Filter, Flow};
use crate::{
    limits::Progress,
    tokens::Tokenizer,
    usage::{Counts, Ledger, Usage},
};

/// JSON bodies larger than this are passed through but not parsed for usage (the estimate
/// stands).
const MAX_JSON_PARSE: usize = 8 << 20;
/// An SSE event larger than this is passed through unparsed.
const MAX_EVENT: usize = 1 << 20;

/// What kind of response is being metered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseKind {
    /// `application/json`: usage is in the body.
    Json,
    /// `text/event-stream`: usage is in the last chunk (asked for by the gateway when the client
    /// did not, in which case that chunk is hidden from the client).
    EventStream { hide_usage_chunk: bool },
    /// Anything else: the prompt estimate is charged.
    Other,
    /// The upstream refused or failed: nothing was generated.
    Failed,
}

/// Who to charge, and how to count when the upstream does not say.
pub struct Settlement {
    pub ledger: Arc<Ledger>,
    pub tokenizer: Tokenizer,
    pub tenant: Arc<str>,
    pub key_id: Arc<str>,
    pub model: String,
    pub prompt_estimate: u64,
    /// The tier's token counters (`/metrics`).
    pub tokens: crate::metrics::gateway::TierTokens,
    /// Counts the request as in flight until it is settled and its body dropped.
    pub _in_flight: crate::metrics::gateway::InFlight,
    /// The upstream slot the request holds (with `gateway.upstream_slots`), until its response
    /// body ends.
    pub _slot: Option<super::priority::Slot>,
}

impl Settlement {
    /// Settles and records a request; `prompt` and `completion` are what it used.
    fn settle(&self, admission: Ticket, prompt: u64, completion: u64) {
        admission.settle(prompt + completion);
        self.tokens.prompt.inc_by(prompt);
        self.tokens.completion.inc_by(completion);
        let counts = Counts {
            requests: 1,
            prompt_tokens: prompt,
            completion_tokens: completion,
        };
        let recorded = crate::usage::with_today(|day| {
            self.ledger.record(Usage {
                day,
                tenant: &self.tenant,
                key: &self.key_id,
                model: &self.model,
                counts,
            })
        });
        if let Err(e) = recorded {
            error!(error = %e, tenant = %self.tenant, "recording usage failed: this request's tokens are counted in memory only");
        }
    }

    /// The upstream could not be reached: the request counts, its tokens do not.
    pub fn settle_without_response(&self, admission: Ticket) {
        self.settle(admission, 0, 0);
    }
}

/// Usage as an OpenAI response reports it.
fn usage_of(v: &Value) -> Option<(u64, u64)> {
    // Chat and completions: top-level `usage`; the Responses API's final event
    // (`response.completed`): `response.usage`.
    let u = v
        .get("usage")
        .filter(|u| u.is_object())
        .or_else(|| v.pointer("/response/usage"))?;
    let prompt = u
        .get("prompt_tokens")
        .or_else(|| u.get("input_tokens"))
        .and_then(Value::as_u64)?;
    let completion = u
        .get("completion_tokens")
        .or_else(|| u.get("output_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Some((prompt, completion))
}

/// The `usage` of a JSON response, read without building the whole document (the common
/// case, and the hot path: every other field is skipped unparsed).
fn reported_usage(body: &[u8]) -> Option<(u64, u64)> {
    #[derive(serde::Deserialize)]
    struct Reported {
        prompt_tokens: Option<u64>,
        input_tokens: Option<u64>,
        completion_tokens: Option<u64>,
        output_tokens: Option<u64>,
    }
    #[derive(serde::Deserialize)]
    struct Reply {
        usage: Option<Reported>,
    }
    let u = serde_json::from_slice::<Reply>(body).ok()?.usage?;
    let prompt = u.prompt_tokens.or(u.input_tokens)?;
    Some((prompt, u.completion_tokens.or(u.output_tokens).unwrap_or(0)))
}

/// Text generated in a response or chunk: `choices[].message.content`, `choices[].delta.content`
/// or `choices[].text`.
fn generated_text(v: &Value, out: &mut String) {
    // Responses API stream events: `response.output_text.delta` and the like carry `delta`.
    if let Some(kind) = v.get("type").and_then(Value::as_str)
        && kind.ends_with(".delta")
        && let Some(t) = v.get("delta").and_then(Value::as_str)
    {
        out.push_str(t);
        return;
    }
    let Some(Value::Array(choices)) = v.get("choices") else {
        return;
    };
    for c in choices {
        for path in [
            "/message/content",
            "/delta/content",
            "/text",
            "/delta/reasoning_content",
            "/delta/reasoning",
        ] {
            if let Some(t) = c.pointer(path).and_then(Value::as_str) {
                out.push_str(t);
            }
        }
        // Tool calls are generated tokens too.
        for calls in ["/message/tool_calls", "/delta/tool_calls"] {
            if let Some(Value::Array(calls)) = c.pointer(calls) {
                for call in calls {
                    if let Some(t) = call.pointer("/function/arguments").and_then(Value::as_str) {
                        out.push_str(t);
                    }
                }
            }
        }
    }
}

pub struct Metered {
    kind: ResponseKind,
    admission: Option<Ticket>,
    settlement: Settlement,
    /// JSON: the body so far (up to [`MAX_JSON_PARSE`]).
    json: Vec<u8>,
    json_overflow: bool,
    /// SSE: bytes of an event not yet complete.
    pending: BytesMut,
    usage: Option<(u64, u64)>,
    /// Tokens of the text streamed so far (for streams without usage and for the quota).
    streamed_tokens: u64,
    ended: bool,
}

impl Metered {
    pub fn new(kind: ResponseKind, admission: Ticket, settlement: Settlement) -> Self {
        Self {
            kind,
            admission: Some(admission),
            settlement,
            json: Vec::new(),
            json_overflow: false,
            pending: BytesMut::new(),
            usage: None,
            streamed_tokens: 0,
            ended: false,
        }
    }

    /// Splits complete SSE events off `pending`: what the client gets, and false when the
    /// stream must end (quota).
    fn take_events(&mut self) -> (Option<Bytes>, bool) {
        let hide_usage = matches!(
            self.kind,
            ResponseKind::EventStream {
                hide_usage_chunk: true
            }
        );
        let mut passed = BytesMut::new();
        let mut go_on = true;
        while let Some(end) = event_end(&self.pending) {
            let event = self.pending.split_to(end).freeze();
            let mut hide = false;
            if let Some(data) = event_data(&event)
                && data != "[DONE]"
                && let Ok(v) = serde_json::from_str::<Value>(&data)
            {
                if let Some(u) = usage_of(&v) {
                    self.usage = Some(u);
                    let no_choices = v
                        .get("choices")
                        .and_then(Value::as_array)
                        .is_none_or(|c| c.is_empty());
                    hide = hide_usage && no_choices;
                }
                let mut text = String::new();
                generated_text(&v, &mut text);
                if !text.is_empty() {
                    let chunk_tokens = self.settlement.tokenizer.count(&text);
                    self.streamed_tokens += chunk_tokens;
                    if let Some(a) = &mut self.admission
                        && let Progress::QuotaExhausted { limit } =
                            a.progress(self.settlement.prompt_estimate + self.streamed_tokens)
                    {
                        // This chunk is not delivered, so not charged.
                        self.streamed_tokens -= chunk_tokens;
                        passed.extend_from_slice(&answers::quota_event(limit));
                        go_on = false;
                        break;
                    }
                }
            }
            if !hide {
                passed.extend_from_slice(&event);
            }
        }
        if self.pending.len() > MAX_EVENT {
            // Not SSE as we know it: pass it on untouched.
            passed.extend_from_slice(&self.pending.split());
        }
        ((!passed.is_empty()).then(|| passed.freeze()), go_on)
    }

    fn finish(&mut self) {
        if self.ended {
            return;
        }
        self.ended = true;
        let Some(admission) = self.admission.take() else {
            return;
        };
        let s = &self.settlement;
        let (prompt, completion) = match self.kind {
            ResponseKind::Failed => (0, 0),
            ResponseKind::Other => (s.prompt_estimate, 0),
            ResponseKind::EventStream { .. } => self
                .usage
                .unwrap_or((s.prompt_estimate, self.streamed_tokens)),
            ResponseKind::Json => {
                if !self.json_overflow
                    && let Some(usage) = reported_usage(&self.json)
                {
                    s.settle(admission, usage.0, usage.1);
                    return;
                }
                let parsed = (!self.json_overflow)
                    .then(|| serde_json::from_slice::<Value>(&self.json).ok())
                    .flatten();
                match parsed {
                    Some(v) => usage_of(&v).unwrap_or_else(|| {
                        let mut text = String::new();
                        generated_text(&v, &mut text);
                        (s.prompt_estimate, s.tokenizer.count(&text))
                    }),
                    None => (s.prompt_estimate, 0),
                }
            }
        };
        s.settle(admission, prompt, completion);
    }
}

/// End of the first complete event in `buf` (after its blank line), if any.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' && buf[i + 1] == b'\n' {
            return Some(i + 2);
        }
        if buf[i] == b'\n' && buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
            return Some(i + 3);
        }
        // CR-only line endings (allowed by the SSE spec), not the CR of a CRLF.
        if buf[i] == b'\r' && buf[i + 1] == b'\r' {
            return Some(i + 2);
        }
        i += 1;
    }
    None
}

/// The `data:` lines of an event, joined.
fn event_data(event: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(event).ok()?;
    let mut data: Option<String> = None;
    for line in text.split(['\n', '\r']) {
        if let Some(d) = line.strip_prefix("data:") {
            let d = d.strip_prefix(' ').unwrap_or(d);
            match &mut data {
                Some(s) => {
                    s.push('\n');
                    s.push_str(d);
                }
                None => data = Some(d.to_owned()),
            }
        }
    }
    data
}

impl Filter for Metered {
    /// A stream may lose its hidden usage chunk or be cut at the quota.
    fn rewrites(&self) -> bool {
        matches!(self.kind, ResponseKind::EventStream { .. })
    }

    fn data(&mut self, piece: Bytes) -> (Option<Bytes>, Flow) {
        match self.kind {
            ResponseKind::EventStream { .. } => {
                self.pending.extend_from_slice(&piece);
                let (passed, go_on) = self.take_events();
                if go_on {
                    (passed, Flow::Continue)
                } else {
                    // Quota: the error event goes out, then the stream ends (the upstream
                    // connection is dropped, which stops generation).
                    self.finish();
                    (passed, Flow::Stop)
                }
            }
            ResponseKind::Json => {
                if self.json.len() + piece.len() <= MAX_JSON_PARSE {
                    self.json.extend_from_slice(&piece);
                } else {
                    self.json_overflow = true;
                }
                (Some(piece), Flow::Continue)
            }
            ResponseKind::Other | ResponseKind::Failed => (Some(piece), Flow::Continue),
        }
    }

    fn end(&mut self, _complete: bool) -> Option<Bytes> {
        let rest = (!self.pending.is_empty()).then(|| self.pending.split().freeze());
        self.finish();
        rest
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        // A client may go away mid-response (or the connection's task be cut at shutdown):
        // settle with what was seen (the upstream stops when its connection drops).
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_api_and_tool_calls_are_metered() {
        let done = serde_json::json!({"type": "response.completed",
            "response": {"usage": {"input_tokens": 12, "output_tokens": 30}}});
        assert_eq!(usage_of(&done), Some((12, 30)));
        let mut text = String::new();
        generated_text(
            &serde_json::json!({"type": "response.output_text.delta", "delta": "Hel"}),
            &mut text,
        );
        generated_text(
            &serde_json::json!({"choices": [{"delta": {"tool_calls": [
                {"function": {"arguments": "{\"city\""}}]}}]}),
            &mut text,
        );
        assert_eq!(text, "Hel{\"city\"");
        assert_eq!(event_end(b"data: x\r\rdata: y"), Some(9));
        assert_eq!(event_data(b"data: x\r\r").as_deref(), Some("x"));
    }

    #[test]
    fn sse_events_are_split_on_blank_lines() {
        assert_eq!(event_end(b"data: a\n\ndata: b"), Some(9));
        assert_eq!(event_end(b"data: a\r\n\r\n"), Some(11));
        assert_eq!(event_end(b"data: a\n"), None);
        assert_eq!(
            event_data(b"data: {\"x\":1}\n\n").as_deref(),
            Some("{\"x\":1}")
        );
        assert_eq!(event_data(b": comment\n\n"), None);
    }

    #[test]
    fn usage_is_read_from_chat_and_responses_shapes() {
        let chat = serde_json::json!({"usage": {"prompt_tokens": 3, "completion_tokens": 5}});
        assert_eq!(usage_of(&chat), Some((3, 5)));
        let resp = serde_json::json!({"usage": {"input_tokens": 4, "output_tokens": 6}});
        assert_eq!(usage_of(&resp), Some((4, 6)));
        assert_eq!(usage_of(&serde_json::json!({"usage": null})), None);
        // The fast path reads the same numbers, and leaves anything else to the full parse.
        let reply = br#"{"id":"x","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":9,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":0}}}"#;
        assert_eq!(reported_usage(reply), Some((9, 2)));
        assert_eq!(
            reported_usage(br#"{"usage":{"input_tokens":4,"output_tokens":6}}"#),
            Some((4, 6))
        );
        assert_eq!(reported_usage(br#"{"usage":null}"#), None);
        assert_eq!(reported_usage(br#"{"usage":{"prompt_tokens":1.5}}"#), None);
        assert_eq!(reported_usage(b"not json"), None);
    }
}
