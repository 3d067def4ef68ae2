//! What the benchmark's clients and upstream say to each other: one chat-completions call with a
//! small body, answered by a fixed `chat.completion` with a `usage` object; and a one-shot probe
//! that checks a server answers it before it is measured.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// The endpoint every request goes to.
pub const PATH: &str = "/v1/chat/completions";

/// The request body every client sends.
pub const REQUEST_BODY: &str =
    r#"{"model":"bench","messages":[{"role":"user","content":"hello"}],"max_tokens":16}"#;

/// The upstream's answer to every request. No single quotes: nginx's `return` takes it quoted.
pub const RESPONSE_BODY: &str = concat!(
    r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench","#,
    r#""choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"#,
    r#""finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}"#
);

const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);

/// Sends one request with `key` (on a connection of its own) until `addr` answers it with the
/// upstream's body, or fails after `timeout` with the last answer or error.
pub fn wait_until_serving(addr: SocketAddr, key: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let outcome = probe(addr, key).and_then(|(status, body)| {
            if status == 200 && body.contains(r#""object":"chat.completion""#) {
                Ok(())
            } else {
                bail!("answered {status}: {body}")
            }
        });
        match outcome {
            Ok(()) => return Ok(()),
            Err(error) if Instant::now() > deadline => {
                return Err(error).with_context(|| {
                    format!("{addr} did not answer POST {PATH} within {timeout:?}")
                });
            }
            Err(_) => thread::sleep(POLL),
        }
    }
}

/// One `POST PATH` with `Connection: close`: the status and the body (with any chunk framing
/// left in; the probe only looks for a marker).
fn probe(addr: SocketAddr, key: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
    stream.set_write_timeout(Some(PROBE_TIMEOUT))?;
    let request = format!(
        "POST {PATH} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n\
         {REQUEST_BODY}",
        REQUEST_BODY.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .with_context(|| format!("reading the answer of {addr}"))?;
    let response = String::from_utf8_lossy(&response);
    let status = status_code(&response).with_context(|| format!("{addr} answered {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_owned();
    Ok((status, body))
}

/// The status code of an HTTP/1.x response.
fn status_code(response: &str) -> Option<u16> {
    let line = response.lines().next()?;
    let mut parts = line.split(' ');
    parts.next()?.strip_prefix("HTTP/1.")?;
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_codes() {
        assert_eq!(status_code("HTTP/1.1 200 OK\r\n\r\n"), Some(200));
        assert_eq!(status_code("HTTP/1.0 429 Too Many Requests\r\n"), Some(429));
        assert_eq!(status_code("HTTP/2 200\r\n"), None);
        assert_eq!(status_code("garbage"), None);
        assert_eq!(status_code(""), None);
    }

    #[test]
    fn bodies_are_json_nginx_can_quote() {
        for body in [REQUEST_BODY, RESPONSE_BODY] {
            serde_json::from_str::<serde_json::Value>(body).expect("valid JSON");
            assert!(!body.contains('\''));
        }
        let response: serde_json::Value = serde_json::from_str(RESPONSE_BODY).unwrap();
        assert_eq!(response["usage"]["total_tokens"], 11);
    }
}
