//! One client connection: its requests read, handed to the [`Service`], and answered in turn,
//! all in the connection's own task, the upstream exchange included.
//!
//! Timeouts: a head must be complete within the header timeout of when the server started
//! waiting for it (a slowloris client is cut off), and a connection with nothing arriving is
//! closed after the idle timeout; a request body must arrive within the time the service
//! gives it; a response write that makes no progress for the idle timeout closes the
//! connection (a client that stops reading does not hold its request forever). Waiting for the
//! upstream is not idleness.
use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::{io::AsyncWriteExt as _, net::TcpStream, sync::watch, time::Instant};
use tracing::debug;

use super::{
    body::{self, ChunkError, ChunkedDecoder, Decoded},
    head::{self, Framing, HeadError, RequestHead, Version, write},
    io::{self as wire, Deadline, Elapsed},
    upstream::ResponseBody,
};
use crate::gateway::answers;

/// Read buffer of a new client connection.
const READ_BUFFER: usize = 8 << 10;
/// After an answer that leaves request bytes unread, how long and how much the server keeps
/// reading (and discarding) before it closes, so that the client reads the answer rather than
/// a reset.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 4 << 20;

/// Fields of a response that describe its connection, not the message (RFC 9110 §7.6.1); the
/// framing fields are the server's to write.
const HOP_BY_HOP: &[&[u8]] = &[
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
];

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub header_read: Duration,
    pub idle: Duration,
}

/// What answers requests.
pub trait Service: Send + Sync {
    fn call(&self, req: &mut Incoming<'_>) -> impl Future<Output = Reply> + Send;
}

/// The answer to a request.
pub enum Reply {
    /// Made by the gateway, whole.
    Answer(http::Response<Bytes>),
    /// The upstream's, relayed.
    Relay(Relay),
}

/// An upstream response on its way to the client.
pub struct Relay {
    pub status: u16,
    pub headers: head::Headers,
    pub body: ResponseBody,
    /// Header lines the gateway adds (`name: value\r\n` each).
    pub extra: Vec<u8>,
    /// Fields of the upstream's head left out (the gateway writes its own in `extra`).
    pub replaced: fn(&[u8]) -> bool,
    /// Sees the body on its way; may rewrite or end it.
    pub filter: Box<dyn Filter>,
}

/// Whether a relayed body goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// End the body after what was returned (the filter has done its accounting).
    Stop,
}

/// Sees a relayed body as it passes.
pub trait Filter: Send {
    /// Whether the client's body may differ from the upstream's (then its length is not
    /// known in advance).
    fn rewrites(&self) -> bool;
    /// A piece of the upstream's body; returns what the client gets for it.
    fn data(&mut self, piece: Bytes) -> (Option<Bytes>, Flow);
    /// The upstream's body ended (`complete`) or broke off; returns any last bytes.
    fn end(&mut self, complete: bool) -> Option<Bytes>;
}

/// Passes a body through untouched.
pub struct Untouched;

impl Filter for Untouched {
    fn rewrites(&self) -> bool {
        false
    }
    fn data(&mut self, piece: Bytes) -> (Option<Bytes>, Flow) {
        (Some(piece), Flow::Continue)
    }
    fn end(&mut self, _: bool) -> Option<Bytes> {
        None
    }
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the body is larger than {0} bytes")]
    TooLarge(u64),
    #[error("the body did not arrive in time")]
    TimedOut,
    #[error("the client closed the connection before the body was complete")]
    Closed,
    #[error("{0}")]
    Chunked(#[from] ChunkError),
    #[error("reading the body: {0}")]
    Io(#[from] io::Error),
    #[error("the body was read already")]
    AlreadyRead,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Unread,
    Read,
    /// Partly read or refused: the connection cannot carry another request.
    Broken,
}

struct Client {
    stream: TcpStream,
    buf: BytesMut,
    deadline: Deadline,
    timeouts: Timeouts,
}

/// A request being handled: its head, who sent it, and its body still on the connection.
pub struct Incoming<'c> {
    pub head: RequestHead,
    /// The socket's peer.
    pub peer: SocketAddr,
    /// The client's address as the connection established it (the PROXY header's, when a
    /// trusted balancer sent one; else the peer's).
    pub client: IpAddr,
    conn: &'c mut Client,
    body: BodyState,
}

impl Incoming<'_> {
    /// Reads the whole body: at most `max` bytes, all of it within `within`.
    pub async fn read_body(&mut self, max: u64, within: Duration) -> Result<Bytes, BodyError> {
        if self.body != BodyState::Unread {
            return Err(BodyError::AlreadyRead);
        }
        self.body = BodyState::Broken;
        let Client {
            stream,
            buf,
            deadline,
            ..
        } = &mut *self.conn;
        let body = match self.head.framing {
            Framing::Empty | Framing::UntilClose => Bytes::new(),
            Framing::Length(n) => {
                if n > max {
                    return Err(BodyError::TooLarge(max));
                }
                let n = n as usize;
                if buf.len() < n {
                    if self.head.expect_continue {
                        wire::write_all(stream, &[b"HTTP/1.1 100 Continue\r\n\r\n"]).await?;
                    }
                    buf.reserve(n - buf.len());
                    deadline
                        .run_lazy(|| Instant::now() + within, async {
                            while buf.len() < n {
                                if wire::read(stream, buf).await? == 0 {
                                    return Err(BodyError::Closed);
                                }
                            }
                            Ok(())
                        })
                        .await
                        .map_err(|_| BodyError::TimedOut)??;
                }
                buf.split_to(n).freeze()
            }
            Framing::Chunked => {
                if self.head.expect_continue && buf.is_empty() {
                    wire::write_all(stream, &[b"HTTP/1.1 100 Continue\r\n\r\n"]).await?;
                }
                let mut decoder = ChunkedDecoder::default();
                let mut body = BytesMut::new();
                deadline
                    .run_lazy(|| Instant::now() + within, async {
                        loop {
                            match decoder.decode(buf)? {
                                Decoded::Data(piece) => {
                                    if (body.len() + piece.len()) as u64 > max {
                                        return Err(BodyError::TooLarge(max));
                                    }
                                    body.extend_from_slice(&piece);
                                }
                                Decoded::Done => return Ok(()),
                                Decoded::NeedMore => {
                                    if wire::read(stream, buf).await? == 0 {
                                        return Err(BodyError::Closed);
                                    }
                                }
                            }
                        }
                    })
                    .await
                    .map_err(|_| BodyError::TimedOut)??;
                body.freeze()
            }
        };
        self.body = BodyState::Read;
        Ok(body)
    }

    /// Runs `work` until `limit` after `start`, on the connection's timer (no timer of its
    /// own).
    pub async fn within<F: Future>(
        &mut self,
        start: Instant,
        limit: Duration,
        work: F,
    ) -> Result<F::Output, Elapsed> {
        self.conn.deadline.set(start + limit);
        self.conn.deadline.run(work).await
    }

    /// After the answer: whether the body is off the connection. A body never read is
    /// skipped when it has arrived whole (a refused request keeps its connection).
    fn body_consumed(&mut self) -> bool {
        match (self.body, self.head.framing) {
            (BodyState::Read, _) | (BodyState::Unread, Framing::Empty) => true,
            (BodyState::Unread, Framing::Length(n)) if self.conn.buf.len() as u64 >= n => {
                let _ = self.conn.buf.split_to(n as usize);
                true
            }
            _ => false,
        }
    }
}

/// Serves one client connection until it closes, fails, idles out, or `shutdown` turns true
/// (between requests; a request being served is finished first).
pub async fn serve_connection<S: Service>(
    service: &S,
    stream: TcpStream,
    peer: SocketAddr,
    client: IpAddr,
    timeouts: Timeouts,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conn = Client {
        stream,
        buf: BytesMut::with_capacity(READ_BUFFER),
        deadline: Deadline::default(),
        timeouts,
    };
    loop {
        let head = match read_head(&mut conn, &mut shutdown).await {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(e) => {
                debug!(%peer, error = %e, "refusing a malformed request head");
                let answer = answers::error(
                    http::StatusCode::from_u16(e.status()).unwrap_or(http::StatusCode::BAD_REQUEST),
                    &format!("The request could not be read: {e}."),
                    "invalid_request_error",
                    None,
                );
                if write_answer(&mut conn, answer, false, Version::Http11, true)
                    .await
                    .is_ok()
                {
                    linger(&mut conn).await;
                }
                return;
            }
        };
        let (head_only, version) = (head.is_head(), head.version);
        let mut req = Incoming {
            head,
            peer,
            client,
            conn: &mut conn,
            body: BodyState::Unread,
        };
        let reply = service.call(&mut req).await;
        let consumed = req.body_consumed();
        let close = req.head.close || !consumed || *shutdown.borrow();
        let kept = match reply {
            Reply::Answer(r) => write_answer(&mut conn, r, head_only, version, close)
                .await
                .is_ok(),
            Reply::Relay(r) => relay(&mut conn, r, version, close).await,
        };
        if close || !kept {
            if kept && !consumed {
                linger(&mut conn).await;
            }
            return;
        }
    }
}

/// Reads the next request head. `Ok(None)`: the connection is done (closed, idle or slow
/// too long, or shutting down between requests).
async fn read_head(
    conn: &mut Client,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<RequestHead>, HeadError> {
    // When the server started to wait for this head: read only if it has to wait.
    let mut since = None;
    loop {
        if !conn.buf.is_empty()
            && let Some(h) = head::parse_request(&mut conn.buf)?
        {
            return Ok(Some(h));
        }
        let t = conn.timeouts;
        let due = || {
            let now = Instant::now();
            (*since.get_or_insert(now) + t.header_read).min(now + t.idle)
        };
        let Client {
            stream,
            buf,
            deadline,
            ..
        } = conn;
        let read = if buf.is_empty() {
            // Between requests: shutting down closes the connection.
            if *shutdown.borrow() {
                return Ok(None);
            }
            deadline
                .run_lazy(due, async {
                    tokio::select! {
                        biased;
                        r = wire::read(stream, buf) => Some(r),
                        _ = shutdown_signal(shutdown) => None,
                    }
                })
                .await
        } else {
            deadline
                .run_lazy(due, async { Some(wire::read(stream, buf).await) })
                .await
        };
        match read {
            Ok(Some(Ok(n))) if n > 0 => {}
            _ => return Ok(None),
        }
    }
}

async fn shutdown_signal(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|s| *s).await.is_err() {
        // Nobody can ask for shutdown any more.
        std::future::pending::<()>().await;
    }
}

/// Writes `parts` to the client; fails if the client takes none of it for the idle timeout.
async fn send(conn: &mut Client, parts: &[&[u8]]) -> io::Result<()> {
    let Client {
        stream,
        deadline,
        timeouts,
        ..
    } = conn;
    let idle = timeouts.idle;
    deadline
        .run_lazy(|| Instant::now() + idle, wire::write_all(stream, parts))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading"))?
}

fn end_of_head(out: &mut Vec<u8>, version: Version, close: bool) {
    if close {
        write::header(out, b"connection", b"close");
    } else if version == Version::Http10 {
        write::header(out, b"connection", b"keep-alive");
    }
    out.extend_from_slice(b"\r\n");
}

async fn write_answer(
    conn: &mut Client,
    answer: http::Response<Bytes>,
    head_only: bool,
    version: Version,
    close: bool,
) -> io::Result<()> {
    let (parts, body) = answer.into_parts();
    let mut out = Vec::with_capacity(256);
    write::status_line(&mut out, parts.status.as_u16());
    for (name, value) in &parts.headers {
        write::header(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    write::header_u64(&mut out, b"content-length", body.len() as u64);
    write::date(&mut out);
    end_of_head(&mut out, version, close);
    if head_only {
        send(conn, &[&out]).await
    } else {
        send(conn, &[&out, &body]).await
    }
}

/// How the client's copy of a relayed body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ToClient {
    None,
    Length(u64),
    Chunked,
    /// By closing the connection (an HTTP/1.0 client, which cannot take chunks).
    Close,
}

fn frame(out: &mut Vec<u8>, piece: &[u8], to: ToClient) {
    if piece.is_empty() {
        return;
    }
    if to == ToClient::Chunked {
        body::chunk_header(piece.len(), out);
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(piece);
    }
}

/// Relays an upstream response; returns whether the connection can carry another request.
async fn relay(conn: &mut Client, mut r: Relay, version: Version, close: bool) -> bool {
    let framing = r.body.framing();
    let to = match framing {
        Framing::Empty => ToClient::None,
        Framing::Length(n) if !r.filter.rewrites() => ToClient::Length(n),
        _ if version == Version::Http11 => ToClient::Chunked,
        _ => ToClient::Close,
    };
    let close = close || to == ToClient::Close;
    let mut out = Vec::with_capacity(512 + r.extra.len());
    write::status_line(&mut out, r.status);
    // Fields the upstream's Connection names are about its connection too.
    let listed = r.headers.connection_options();
    let mut dated = false;
    for (name, value) in r.headers.iter() {
        if HOP_BY_HOP.contains(&name)
            || (name == b"content-length" && framing != Framing::Empty)
            || (r.replaced)(name)
            || listed.iter().any(|l| l.eq_ignore_ascii_case(name))
        {
            continue;
        }
        dated |= name == b"date";
        write::header(&mut out, name, value);
    }
    out.extend_from_slice(&r.extra);
    match to {
        ToClient::Length(n) => write::header_u64(&mut out, b"content-length", n),
        ToClient::Chunked => write::header(&mut out, b"transfer-encoding", b"chunked"),
        ToClient::None | ToClient::Close => {}
    }
    if !dated {
        write::date(&mut out);
    }
    end_of_head(&mut out, version, close);

    // What has arrived of the body goes out with the head; the rest as it comes.
    let mut stopped = false;
    loop {
        match r.body.buffered() {
            Ok(Some(piece)) => {
                let (pass, flow) = r.filter.data(piece);
                frame(&mut out, pass.as_deref().unwrap_or_default(), to);
                if flow == Flow::Stop {
                    stopped = true;
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                debug!(error = %e, "the upstream's body broke off");
                r.filter.end(false);
                let _ = send(conn, &[&out]).await;
                return false;
            }
        }
    }
    if !stopped && !r.body.is_done() {
        if send(conn, &[&out]).await.is_err() {
            return false;
        }
        out.clear();
        loop {
            match r.body.next().await {
                Ok(Some(piece)) => {
                    let (pass, flow) = r.filter.data(piece);
                    let pass = pass.unwrap_or_default();
                    if flow == Flow::Stop {
                        frame(&mut out, &pass, to);
                        stopped = true;
                        break;
                    }
                    if pass.is_empty() {
                        continue;
                    }
                    let sent = if to == ToClient::Chunked {
                        body::chunk_header(pass.len(), &mut out);
                        send(conn, &[&out, &pass, b"\r\n"]).await
                    } else {
                        send(conn, &[&pass]).await
                    };
                    out.clear();
                    if sent.is_err() {
                        return false;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    debug!(error = %e, "the upstream's body broke off");
                    r.filter.end(false);
                    return false;
                }
            }
        }
    }
    if !stopped {
        let tail = r.filter.end(true);
        frame(&mut out, tail.as_deref().unwrap_or_default(), to);
    }
    if to == ToClient::Chunked {
        out.extend_from_slice(body::LAST_CHUNK);
    }
    // A body cut short by the filter cannot match a length announced up front.
    let whole = !(stopped && matches!(to, ToClient::Length(_)));
    send(conn, &[&out]).await.is_ok() && whole && !close
}

/// Closes gently after an answer that left request bytes unread: stops sending, then reads
/// and drops what the client still sends, for a bounded time and amount.
async fn linger(conn: &mut Client) {
    let Client {
        stream,
        buf,
        deadline,
        ..
    } = conn;
    if stream.shutdown().await.is_err() {
        return;
    }
    deadline.set_in(LINGER);
    let _ = deadline
        .run(async {
            let mut dropped = 0;
            while dropped < LINGER_BYTES {
                buf.clear();
                match wire::read(stream, buf).await {
                    Ok(n) if n > 0 => dropped += n,
                    _ => return,
                }
            }
        })
        .await;
}
