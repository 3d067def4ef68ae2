//! Message heads: a request's from a client, a response's from the upstream. Each is parsed
//! once (httparse) and kept as the bytes it came in, with where each header lies in them;
//! header names are lower-cased in place, so a lookup is a byte comparison.
//!
//! The rules that keep requests from being smuggled past the gateway (RFC 9112 §6) are
//! decided here: one body length, or `chunked` as the final coding (which then wins over a
//! Content-Length, and the connection closes after the answer); one Host.
use std::{cell::RefCell, mem::MaybeUninit, time::SystemTime};

use bytes::{Bytes, BytesMut};
use http::Method;

/// Most header fields a head may have (hyper's limit, which the gateway had before).
pub const MAX_HEADERS: usize = 100;
/// Largest head, request line and header fields together.
pub const MAX_HEAD_BYTES: usize = 64 << 10;

/// Where something lies in a head's bytes.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    fn of(base: *const u8, part: &[u8]) -> Self {
        let start = part.as_ptr() as usize - base as usize;
        Self {
            start: start as u32,
            end: (start + part.len()) as u32,
        }
    }

    fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }
}

/// The header fields of a head, in order, names lower-case.
#[derive(Debug, Clone)]
pub struct Headers {
    bytes: Bytes,
    fields: Vec<(Span, Span)>,
}

impl Headers {
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields
            .iter()
            .map(|(n, v)| (&self.bytes[n.range()], &self.bytes[v.range()]))
    }

    /// Values of every field called `name` (lower-case).
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |(n, _)| *n == name.as_bytes())
            .map(|(_, v)| v)
    }

    /// The first field called `name` (lower-case).
    pub fn get<'a>(&'a self, name: &'a str) -> Option<&'a [u8]> {
        self.get_all(name).next()
    }

    /// The first field called `name`, if it is text.
    pub fn get_str<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// The field names a `Connection` field lists: fields about this connection only.
    pub fn connection_options(&self) -> Vec<&[u8]> {
        self.get_all("connection")
            .flat_map(|v| v.split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.is_empty())
            .collect()
    }

    /// Whether a comma-separated field `name` lists `token` (case-insensitive).
    pub fn lists(&self, name: &str, token: &str) -> bool {
        self.get_all(name).any(|v| {
            v.split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the sender closes the connection (responses only).
    UntilClose,
}

/// Why a head was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("the head is larger than {MAX_HEAD_BYTES} bytes")]
    TooLarge,
    #[error("the head has more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("{0}")]
    Malformed(&'static str),
}

impl HeadError {
    /// The status a client is answered with.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge | HeadError::TooManyHeaders => 431,
            HeadError::Malformed(_) => 400,
        }
    }
}

/// A client's request head.
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: Method,
    pub version: Version,
    pub headers: Headers,
    pub framing: Framing,
    /// The connection closes after this exchange: the client asked, or spoke HTTP/1.0 without
    /// keep-alive, or sent both Content-Length and Transfer-Encoding.
    pub close: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    path: Span,
}

impl RequestHead {
    /// The path and query, as the client sent them (from an absolute-form target, its path).
    pub fn path_and_query(&self) -> &str {
        let p = &self.headers.bytes[self.path.range()];
        if p.is_empty() {
            return "/";
        }
        // Checked to be visible ASCII when parsed.
        std::str::from_utf8(p).unwrap_or("/")
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        let pq = self.path_and_query();
        pq.split_once('?').map_or(pq, |(p, _)| p)
    }

    pub fn is_head(&self) -> bool {
        self.method == Method::HEAD
    }
}

/// A response head from the upstream.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: Headers,
    pub framing: Framing,
    /// The upstream closes the connection after this response.
    pub close: bool,
}

fn uninit_headers<'b>() -> [MaybeUninit<httparse::Header<'b>>; MAX_HEADERS] {
    [const { MaybeUninit::uninit() }; MAX_HEADERS]
}

/// What parsing found, before the names are lower-cased.
struct Raw {
    len: usize,
    fields: Vec<(Span, Span)>,
}

fn lower_names(buf: &mut BytesMut, raw: Raw) -> Headers {
    for (n, _) in &raw.fields {
        buf[n.range()].make_ascii_lowercase();
    }
    Headers {
        bytes: buf.split_to(raw.len).freeze(),
        fields: raw.fields,
    }
}

/// The length of a complete head (`None`: not complete yet), from what httparse said.
fn head_length(
    parsed: httparse::Result<usize>,
    buffered: usize,
    invalid: &'static str,
) -> Result<Option<usize>, HeadError> {
    match parsed {
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD_BYTES => Err(HeadError::TooLarge),
        Ok(httparse::Status::Complete(len)) => Ok(Some(len)),
        Ok(httparse::Status::Partial) if buffered > MAX_HEAD_BYTES => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooManyHeaders),
        Err(httparse::Error::Version) => Err(HeadError::Malformed(
            "only HTTP/1.0 and HTTP/1.1 are spoken here",
        )),
        Err(_) => Err(HeadError::Malformed(invalid)),
    }
}

/// Where each parsed field's name and value lie in the buffer that starts at `base`.
fn spans(base: *const u8, fields: &[httparse::Header<'_>]) -> Vec<(Span, Span)> {
    fields
        .iter()
        .map(|h| (Span::of(base, h.name.as_bytes()), Span::of(base, h.value)))
        .collect()
}

/// Parses a request head off the front of `buf`; `Ok(None)`: it is not complete yet.
pub fn parse_request(buf: &mut BytesMut) -> Result<Option<RequestHead>, HeadError> {
    let mut slots = uninit_headers();
    let mut req = httparse::Request::new(&mut []);
    let base = buf.as_ptr();
    let parsed = req.parse_with_uninit_headers(&buf[..], &mut slots);
    let Some(len) = head_length(parsed, buf.len(), "the request head is not valid HTTP/1.1")?
    else {
        return Ok(None);
    };
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| HeadError::Malformed("the request method is not valid"))?;
    let version = if req.version == Some(0) {
        Version::Http10
    } else {
        Version::Http11
    };
    let target = req.path.unwrap_or("").as_bytes();
    if !target.iter().all(|b| (0x21..0x7f).contains(b)) {
        return Err(HeadError::Malformed(
            "the request target must be visible ASCII",
        ));
    }
    let path = request_path(&method, target)?;
    let path = Span::of(base, path);
    let fields = spans(base, req.headers);
    let headers = lower_names(buf, Raw { len, fields });

    // More than one Host could route differently behind the gateway. None at all is
    // tolerated (as hyper did): the gateway sends the upstream's own.
    if headers.get_all("host").nth(1).is_some() {
        return Err(HeadError::Malformed("more than one Host header"));
    }
    let chunked = request_is_chunked(&headers, version)?;
    let length = content_length(&headers)?;
    let (framing, smuggled) = match (chunked, length) {
        // Both: the chunked coding wins, and the connection cannot be trusted after it.
        (true, Some(_)) => (Framing::Chunked, true),
        (true, None) => (Framing::Chunked, false),
        (false, Some(0)) | (false, None) => (Framing::Empty, false),
        (false, Some(n)) => (Framing::Length(n), false),
    };
    let close = smuggled
        || headers.lists("connection", "close")
        || (version == Version::Http10 && !headers.lists("connection", "keep-alive"));
    let expect_continue = version == Version::Http11
        && headers
            .get("expect")
            .is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"100-continue"));
    Ok(Some(RequestHead {
        method,
        version,
        headers,
        framing,
        close,
        expect_continue,
        path,
    }))
}

/// The path and query of a request target (origin-form, or the path of an absolute-form one).
fn request_path<'a>(method: &Method, target: &'a [u8]) -> Result<&'a [u8], HeadError> {
    if target.first() == Some(&b'/') {
        return Ok(target);
    }
    if *method == Method::CONNECT {
        // authority-form: answered 405 by the gateway; the path is not used.
        return Ok(&target[..0]);
    }
    if target == b"*" {
        return if *method == Method::OPTIONS {
            Ok(&target[..0])
        } else {
            Err(HeadError::Malformed("`*` is a target for OPTIONS only"))
        };
    }
    let lower = target.to_ascii_lowercase();
    let after_scheme = if lower.starts_with(b"http://") {
        7
    } else if lower.starts_with(b"https://") {
        8
    } else {
        return Err(HeadError::Malformed(
            "the request target must be a path starting with /",
        ));
    };
    let rest = &target[after_scheme..];
    match rest.iter().position(|&b| b == b'/' || b == b'?') {
        None => Ok(&rest[rest.len()..]),
        Some(i) if rest[i] == b'/' => Ok(&rest[i..]),
        Some(_) => Err(HeadError::Malformed(
            "an absolute request target needs a path before its query",
        )),
    }
}

/// Whether a request's body is chunked; refuses codings the gateway cannot take apart.
fn request_is_chunked(headers: &Headers, version: Version) -> Result<bool, HeadError> {
    let mut codings = headers
        .get_all("transfer-encoding")
        .flat_map(|v| v.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty())
        .peekable();
    if codings.peek().is_none() {
        return Ok(false);
    }
    if version == Version::Http10 {
        return Err(HeadError::Malformed(
            "Transfer-Encoding is not allowed in an HTTP/1.0 request",
        ));
    }
    let mut last_chunked = false;
    let mut chunked_seen = 0;
    for c in codings {
        last_chunked = c.eq_ignore_ascii_case(b"chunked");
        chunked_seen += usize::from(last_chunked);
    }
    if !last_chunked || chunked_seen > 1 {
        return Err(HeadError::Malformed(
            "a request's Transfer-Encoding must be `chunked`, once and last",
        ));
    }
    Ok(true)
}

/// The one Content-Length of a message (repeats of the same value are one), if any.
fn content_length(headers: &Headers) -> Result<Option<u64>, HeadError> {
    let mut found: Option<u64> = None;
    for v in headers.get_all("content-length") {
        for part in v.split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err(HeadError::Malformed("Content-Length must be a number"));
            }
            let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            match found {
                Some(m) if m != n => {
                    return Err(HeadError::Malformed("conflicting Content-Length values"));
                }
                _ => found = Some(n),
            }
        }
    }
    Ok(found)
}

/// Parses a response head off the front of `buf`; `Ok(None)`: it is not complete yet.
/// `to_head`: the request was HEAD, so no body follows whatever the head says.
pub fn parse_response(
    buf: &mut BytesMut,
    to_head: bool,
) -> Result<Option<ResponseHead>, HeadError> {
    let mut slots = uninit_headers();
    let mut resp = httparse::Response::new(&mut []);
    let base = buf.as_ptr();
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        &buf[..],
        &mut slots,
    );
    let Some(len) = head_length(parsed, buf.len(), "the response head is not valid HTTP/1.1")?
    else {
        return Ok(None);
    };
    let status = resp.code.unwrap_or(0);
    let version = if resp.version == Some(0) {
        Version::Http10
    } else {
        Version::Http11
    };
    let fields = spans(base, resp.headers);
    let headers = lower_names(buf, Raw { len, fields });
    let framing = if to_head || (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Empty
    } else if let Some(last) = headers
        .get_all("transfer-encoding")
        .flat_map(|v| v.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty())
        .last()
    {
        if last.eq_ignore_ascii_case(b"chunked") {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else {
        match content_length(&headers)? {
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    let close = framing == Framing::UntilClose
        || headers.lists("connection", "close")
        || (version == Version::Http10 && !headers.lists("connection", "keep-alive"));
    Ok(Some(ResponseHead {
        status,
        headers,
        framing,
        close,
    }))
}

/// Writing heads.
pub mod write {
    use super::*;

    /// `HTTP/1.1 <status> <reason>`.
    pub fn status_line(out: &mut Vec<u8>, status: u16) {
        out.extend_from_slice(b"HTTP/1.1 ");
        let mut n = itoa::Buffer::new();
        out.extend_from_slice(n.format(status).as_bytes());
        out.push(b' ');
        let reason = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Unknown");
        out.extend_from_slice(reason.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    pub fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }

    pub fn header_u64(out: &mut Vec<u8>, name: &[u8], value: u64) {
        let mut n = itoa::Buffer::new();
        header(out, name, n.format(value).as_bytes());
    }

    /// Whether `value` may be sent as a header value as it is (no control characters).
    pub fn is_valid_value(value: &[u8]) -> bool {
        value
            .iter()
            .all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
    }

    /// `date: <now>`, formatted once a second per thread.
    pub fn date(out: &mut Vec<u8>) {
        thread_local! {
            static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
        }
        let now = SystemTime::now();
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs || c.1.is_empty() {
                *c = (secs, httpdate::fmt_http_date(now));
            }
            header(out, b"date", c.1.as_bytes());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> Result<Option<RequestHead>, HeadError> {
        parse_request(&mut BytesMut::from(text))
    }

    fn ok(text: &str) -> RequestHead {
        req(text).expect("valid").expect("complete")
    }

    #[test]
    fn a_request_head_is_parsed_with_lower_case_names_and_the_body_left_behind() {
        let mut buf = BytesMut::from(
            "POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer k\r\nContent-Length: 2\r\nX-Two: a\r\nx-two: b\r\n\r\n{}",
        );
        let h = parse_request(&mut buf).expect("valid").expect("complete");
        assert_eq!(&buf[..], b"{}", "the body stays in the buffer");
        assert_eq!(h.method, Method::POST);
        assert_eq!(h.version, Version::Http11);
        assert_eq!(h.path_and_query(), "/v1/chat/completions?x=1");
        assert_eq!(h.path(), "/v1/chat/completions");
        assert_eq!(h.headers.get("authorization"), Some(&b"Bearer k"[..]));
        assert_eq!(h.headers.get_all("x-two").collect::<Vec<_>>(), [b"a", b"b"]);
        assert_eq!(h.framing, Framing::Length(2));
        assert!(!h.close && !h.expect_continue);
    }

    #[test]
    fn partial_heads_wait_and_oversized_ones_are_refused() {
        assert!(
            req("POST / HTTP/1.1\r\nhost: x\r\n")
                .expect("valid")
                .is_none()
        );
        let long = format!("GET / HTTP/1.1\r\nx: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(req(&long).err(), Some(HeadError::TooLarge));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x{i}: 1\r\n")).collect();
        let r = req(&format!("GET / HTTP/1.1\r\nhost: x\r\n{many}\r\n"));
        assert_eq!(r.err(), Some(HeadError::TooManyHeaders));
        assert_eq!(HeadError::TooManyHeaders.status(), 431);
    }

    #[test]
    fn lengths_and_codings_that_could_smuggle_a_request_are_refused_or_closed() {
        // Conflicting lengths: refused; the same length twice (or as a list) is one.
        assert!(
            req("POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 3\r\n\r\n")
                .is_err()
        );
        let same =
            ok("POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 5, 5\r\n\r\n");
        assert_eq!(same.framing, Framing::Length(5));
        for bad in ["-1", "+5", "0x5", "5 5", "", "99999999999999999999"] {
            assert!(
                req(&format!(
                    "POST / HTTP/1.1\r\nhost: x\r\ncontent-length: {bad}\r\n\r\n"
                ))
                .is_err(),
                "{bad:?}"
            );
        }
        // Both: chunked wins, and the connection closes after the answer.
        let both = ok(
            "POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
        );
        assert_eq!(both.framing, Framing::Chunked);
        assert!(both.close);
        // Codings other than a final, single chunked are refused.
        for te in ["gzip", "chunked, gzip", "chunked, chunked", "identity"] {
            assert!(
                req(&format!(
                    "POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: {te}\r\n\r\n"
                ))
                .is_err(),
                "{te}"
            );
        }
        assert_eq!(
            ok("POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, Chunked\r\n\r\n").framing,
            Framing::Chunked
        );
        assert!(req("POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        // Host: at most one.
        assert!(req("GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n").is_err());
        assert!(req("GET / HTTP/1.1\r\n\r\n").is_ok());
        assert!(ok("GET / HTTP/1.0\r\n\r\n").close, "1.0 closes by default");
        assert!(!ok("GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n").close);
        assert!(ok("GET / HTTP/1.1\r\nhost: x\r\nconnection: Close\r\n\r\n").close);
    }

    #[test]
    fn targets_garbage_and_expectations() {
        assert_eq!(
            ok("GET http://gw:8080/v1/models?a=b HTTP/1.1\r\nhost: gw\r\n\r\n").path_and_query(),
            "/v1/models?a=b"
        );
        assert_eq!(
            ok("GET http://gw HTTP/1.1\r\nhost: gw\r\n\r\n").path_and_query(),
            "/"
        );
        assert_eq!(
            ok("OPTIONS * HTTP/1.1\r\nhost: gw\r\n\r\n").path_and_query(),
            "/"
        );
        assert!(req("GET * HTTP/1.1\r\nhost: gw\r\n\r\n").is_err());
        assert!(req("GET v1/models HTTP/1.1\r\nhost: gw\r\n\r\n").is_err());
        assert_eq!(
            ok("CONNECT gw:443 HTTP/1.1\r\nhost: gw\r\n\r\n").method,
            Method::CONNECT
        );
        assert!(req("\x16\x03\x01\x02\x00garbage\r\n\r\n").is_err());
        assert!(req("GET / HTTP/1.1\r\nhost: x\r\nbad header line\r\n\r\n").is_err());
        assert!(req("GET / HTTP/2.0\r\nhost: x\r\n\r\n").is_err());
        let e =
            ok("POST / HTTP/1.1\r\nhost: x\r\nexpect: 100-Continue\r\ncontent-length: 1\r\n\r\n");
        assert!(e.expect_continue);
    }

    #[test]
    fn response_framing_follows_the_status_the_method_and_the_fields() {
        let parse = |t: &str, to_head| {
            parse_response(&mut BytesMut::from(t), to_head)
                .expect("valid")
                .expect("complete")
        };
        let r = parse("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", false);
        assert_eq!(
            (r.status, r.framing, r.close),
            (200, Framing::Length(3), false)
        );
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true).framing,
            Framing::Empty
        );
        assert_eq!(
            parse("HTTP/1.1 204 No Content\r\n\r\n", false).framing,
            Framing::Empty
        );
        let chunked = parse(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n\r\n",
            false,
        );
        assert_eq!(chunked.framing, Framing::Chunked);
        let eof = parse("HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!((eof.framing, eof.close), (Framing::UntilClose, true));
        assert!(parse("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", false).close);
        assert!(
            parse(
                "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n",
                false
            )
            .close
        );
        assert!(
            parse_response(
                &mut BytesMut::from(
                    "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"
                ),
                false
            )
            .is_err()
        );
    }

    #[test]
    fn heads_are_written_with_canonical_reasons_and_a_date() {
        let mut out = Vec::new();
        write::status_line(&mut out, 429);
        write::header_u64(&mut out, b"content-length", 12);
        write::date(&mut out);
        let text = String::from_utf8(out).expect("text");
        assert!(
            text.starts_with("HTTP/1.1 429 Too Many Requests\r\ncontent-length: 12\r\ndate: "),
            "{text}"
        );
        assert!(text.ends_with(" GMT\r\n"), "{text}");
        assert!(write::is_valid_value(b"tenant-a b"));
        assert!(!write::is_valid_value(b"a\r\nb"));
    }
}
