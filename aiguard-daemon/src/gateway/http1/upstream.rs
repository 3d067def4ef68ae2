//! The upstream side: keep-alive connections to the inference servers, pooled, each used by
//! one request at a time from the client connection's own task. The request is written and
//! its response read where it is handled: no connection task, no channel in between, which
//! is most of what a pooled HTTP client costs per request.
use std::{
    collections::VecDeque,
    io,
    os::fd::AsRawFd as _,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::Interest,
    net::TcpStream,
    time::{Instant, timeout},
};

use super::{
    body::{ChunkError, ChunkedDecoder, Decoded},
    head::{self, Framing, HeadError, ResponseHead},
    io as wire,
};

/// Read buffer of a new upstream connection.
const READ_BUFFER: usize = 8 << 10;

/// One upstream server, from its URL: where to connect, what to call it, the path it is under.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `host:port`, to connect to and to send as `Host`.
    pub authority: Arc<str>,
    /// The URL's path, without a trailing slash: requests' paths are appended to it.
    pub prefix: Arc<str>,
}

impl Upstream {
    /// An `http://` URL (validated by the configuration).
    pub fn from_uri(uri: &http::Uri) -> Result<Self, String> {
        if uri.scheme_str() != Some("http") {
            return Err(format!("{uri}: only http:// upstreams are supported"));
        }
        let host = uri
            .host()
            .ok_or_else(|| format!("{uri}: the URL names no host"))?;
        let port = uri.port_u16().unwrap_or(80);
        let authority = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Self {
            authority: authority.into(),
            prefix: uri.path().trim_end_matches('/').into(),
        })
    }
}

/// Why the upstream gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {0}: {1}")]
    Connect(Arc<str>, #[source] io::Error),
    #[error("connecting to {0} took longer than {1:?}")]
    ConnectTimeout(Arc<str>, Duration),
    #[error("the upstream closed the connection before its response was complete")]
    Closed,
    #[error("talking to the upstream: {0}")]
    Io(#[from] io::Error),
    #[error("the upstream's response head is invalid: {0}")]
    Head(#[from] HeadError),
    #[error("the upstream's chunked body is invalid: {0}")]
    Body(#[from] ChunkError),
}

/// How the pool keeps connections.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    /// An idle connection older than this is closed.
    pub idle_timeout: Duration,
    /// Most idle connections kept per upstream.
    pub max_idle: usize,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

struct Shared {
    settings: Mutex<PoolSettings>,
    // std Mutex: held for a push or pop, never across an await.
    idle: Mutex<Vec<(Arc<str>, VecDeque<Idle>)>>,
}

/// Idle keep-alive connections, per upstream; cloning shares the pool.
#[derive(Clone)]
pub struct Pool(Arc<Shared>);

/// A connection to an upstream, with what has been read from it and not yet used.
pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    authority: Arc<str>,
    reused: bool,
}

impl Pool {
    pub fn new(settings: PoolSettings) -> Self {
        Self(Arc::new(Shared {
            settings: Mutex::new(settings),
            idle: Mutex::new(Vec::new()),
        }))
    }

    fn settings(&self) -> PoolSettings {
        *self.0.settings.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_connect_timeout(&self, t: Duration) {
        self.0
            .settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .connect_timeout = t;
    }

    /// Idle connections kept now, over every upstream.
    pub fn idle_count(&self) -> usize {
        let idle = self.0.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.iter().map(|(_, q)| q.len()).sum()
    }

    /// Closes idle connections older than the idle timeout.
    pub fn sweep(&self) {
        let limit = self.settings().idle_timeout;
        let now = Instant::now();
        let mut idle = self.0.idle.lock().unwrap_or_else(|p| p.into_inner());
        for (_, q) in idle.iter_mut() {
            while q.front().is_some_and(|i| now - i.since > limit) {
                q.pop_front();
            }
        }
    }

    /// The newest live idle connection to `authority`, if any.
    fn take_idle(&self, authority: &str) -> Option<Conn> {
        let limit = self.settings().idle_timeout;
        let mut idle = self.0.idle.lock().unwrap_or_else(|p| p.into_inner());
        let (_, q) = idle.iter_mut().find(|(a, _)| &**a == authority)?;
        while let Some(i) = q.pop_back() {
            if i.since.elapsed() > limit {
                // Every older one has expired too.
                q.clear();
                return None;
            }
            if is_quiet(&i.conn.stream) {
                return Some(i.conn);
            }
        }
        None
    }

    fn put_idle(&self, mut conn: Conn) {
        let max = self.settings().max_idle;
        conn.reused = true;
        let mut idle = self.0.idle.lock().unwrap_or_else(|p| p.into_inner());
        let q = match idle.iter().position(|(a, _)| *a == conn.authority) {
            Some(i) => &mut idle[i].1,
            None => {
                idle.push((conn.authority.clone(), VecDeque::new()));
                &mut idle.last_mut().expect("just pushed").1
            }
        };
        if q.len() < max {
            q.push_back(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self, up: &Upstream) -> Result<Conn, UpstreamError> {
        let limit = self.settings().connect_timeout;
        let stream = match timeout(limit, TcpStream::connect(&*up.authority)).await {
            Err(_) => return Err(UpstreamError::ConnectTimeout(up.authority.clone(), limit)),
            Ok(Err(e)) => return Err(UpstreamError::Connect(up.authority.clone(), e)),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(READ_BUFFER),
            authority: up.authority.clone(),
            reused: false,
        })
    }

    /// Sends one request (its head and whole body) and reads the response head.
    ///
    /// A kept-alive connection that the upstream closed while it sat idle is noticed before
    /// use; one that fails as the request is written (so it was never delivered) is retried
    /// once on a new connection. After that, nothing is retried: the upstream may have
    /// started on it.
    pub async fn send(
        &self,
        up: &Upstream,
        head: &[u8],
        body: &[u8],
        to_head: bool,
    ) -> Result<Response, UpstreamError> {
        let mut conn = match self.take_idle(&up.authority) {
            Some(c) => c,
            None => self.connect(up).await?,
        };
        if let Err(e) = wire::write_all(&mut conn.stream, &[head, body]).await {
            if !conn.reused || !never_delivered(&e) {
                return Err(e.into());
            }
            conn = self.connect(up).await?;
            wire::write_all(&mut conn.stream, &[head, body]).await?;
        }
        loop {
            if let Some(h) = head::parse_response(&mut conn.buf, to_head)? {
                if (100..200).contains(&h.status) {
                    if h.status == 101 {
                        // Nothing upgrades through the gateway (Upgrade is never forwarded).
                        return Err(HeadError::Malformed("101 Switching Protocols").into());
                    }
                    // Informational (103 Early Hints and the like): the real head follows.
                    continue;
                }
                let framing = h.framing;
                let reusable = !h.close;
                return Ok(Response {
                    head: h,
                    body: ResponseBody {
                        conn: Some(conn),
                        pool: self.clone(),
                        framing,
                        left: match framing {
                            Framing::Length(n) => n,
                            _ => 0,
                        },
                        decoder: ChunkedDecoder::default(),
                        done: false,
                        reusable,
                    },
                });
            }
            if wire::read(&conn.stream, &mut conn.buf).await? == 0 {
                return Err(UpstreamError::Closed);
            }
        }
    }
}

/// Whether an idle connection has had nothing arrive on it (no data, no close): the usual
/// case is decided from the readiness epoll left behind, without a system call.
fn is_quiet(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            // Readiness can be left over from the last response: look without taking.
            let fd = stream.as_raw_fd();
            let peeked = stream.try_io(Interest::READABLE, || {
                let mut b = [0u8; 1];
                // SAFETY: one writable byte.
                let n = unsafe {
                    libc::recv(
                        fd,
                        b.as_mut_ptr().cast(),
                        1,
                        libc::MSG_PEEK | libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n)
                }
            });
            matches!(peeked, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        }
    }
}

/// A write error that means the request never reached the upstream's application.
fn never_delivered(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    )
}

/// The upstream's response: its head, and its body to be read.
pub struct Response {
    pub head: ResponseHead,
    pub body: ResponseBody,
}

/// A response body as it arrives. Its connection goes back to the pool the moment the body
/// has ended cleanly; dropped before that, the connection is closed (which is also how an
/// abandoned request stops the upstream generating).
pub struct ResponseBody {
    conn: Option<Conn>,
    pool: Pool,
    framing: Framing,
    /// Bytes left of a Content-Length body.
    left: u64,
    decoder: ChunkedDecoder,
    done: bool,
    /// The connection may carry another request once this body ends.
    reusable: bool,
}

impl ResponseBody {
    /// The framing the upstream chose.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The next piece of the body that has already arrived, without waiting; `None`:
    /// nothing yet (or the body has ended, see [`Self::is_done`]).
    pub fn buffered(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        let piece = match self.framing {
            Framing::Empty => {
                self.done = true;
                None
            }
            Framing::Length(_) => (self.left > 0 && !conn.buf.is_empty()).then(|| {
                let take = self.left.min(conn.buf.len() as u64) as usize;
                self.left -= take as u64;
                conn.buf.split_to(take).freeze()
            }),
            Framing::Chunked => match self.decoder.decode(&mut conn.buf)? {
                Decoded::Data(b) => Some(b),
                Decoded::NeedMore => None,
                Decoded::Done => {
                    self.done = true;
                    None
                }
            },
            Framing::UntilClose => (!conn.buf.is_empty()).then(|| conn.buf.split().freeze()),
        };
        if matches!(self.framing, Framing::Length(_)) && self.left == 0 {
            self.done = true;
        }
        if self.done {
            self.release();
        }
        Ok(piece)
    }

    /// The next piece of the body; `None` once it has ended.
    pub async fn next(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        loop {
            if let Some(piece) = self.buffered()? {
                return Ok(Some(piece));
            }
            if self.done {
                return Ok(None);
            }
            let conn = self.conn.as_mut().ok_or(UpstreamError::Closed)?;
            if wire::read(&conn.stream, &mut conn.buf).await? == 0 {
                if self.framing == Framing::UntilClose {
                    self.done = true;
                    self.reusable = false;
                    self.conn = None;
                    return Ok(None);
                }
                self.conn = None;
                return Err(UpstreamError::Closed);
            }
        }
    }

    /// Gives the connection back to the pool if it can carry another request.
    fn release(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        // Bytes beyond the body mean the upstream and the gateway disagree on framing.
        if self.reusable && conn.buf.is_empty() {
            self.pool.put_idle(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    fn settings() -> PoolSettings {
        PoolSettings {
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(90),
            max_idle: 4,
        }
    }

    /// An upstream that answers every request on a connection with `answer`, and closes a
    /// connection after `per_conn` requests; returns its address and its connection count.
    async fn upstream(answer: &'static [u8], per_conn: usize) -> (Upstream, Arc<Mutex<usize>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let conns = Arc::new(Mutex::new(0));
        let counted = conns.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.expect("accept");
                *counted.lock().expect("lock") += 1;
                tokio::spawn(async move {
                    for _ in 0..per_conn {
                        let mut buf = vec![0u8; 4096];
                        let mut got = Vec::new();
                        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                            let n = s.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            got.extend_from_slice(&buf[..n]);
                        }
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let up = Upstream::from_uri(&format!("http://{addr}/base/").parse().expect("uri"))
            .expect("upstream");
        (up, conns)
    }

    async fn body_of(mut r: Response) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(b) = r.body.next().await.expect("body") {
            out.extend_from_slice(&b);
        }
        out
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_body_has_ended() {
        let (up, conns) = upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", 100).await;
        assert_eq!(&*up.prefix, "/base");
        let pool = Pool::new(settings());
        for _ in 0..5 {
            let r = pool
                .send(&up, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", b"", false)
                .await
                .expect("response");
            assert_eq!(r.head.status, 200);
            assert_eq!(body_of(r).await, b"hello");
        }
        assert_eq!(*conns.lock().expect("lock"), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn chunked_and_informational_responses_are_read_whole() {
        let (up, _) = upstream(
            b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            100,
        )
        .await;
        let pool = Pool::new(settings());
        let r = pool
            .send(&up, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", b"", false)
            .await
            .expect("response");
        assert_eq!(r.head.status, 200);
        assert_eq!(body_of(r).await, b"abcde");
        assert_eq!(pool.idle_count(), 1, "reusable after the last chunk");
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_not_used() {
        // One request per connection, then the upstream closes it.
        let (up, conns) = upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", 1).await;
        let pool = Pool::new(settings());
        for _ in 0..3 {
            let r = pool
                .send(&up, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", b"", false)
                .await
                .expect("response");
            assert_eq!(body_of(r).await, b"ok");
            // Time for the close to arrive.
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert_eq!(*conns.lock().expect("lock"), 3);
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_and_its_connection_is_not_kept() {
        let (up, _) = upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhal", 1).await;
        let pool = Pool::new(settings());
        let mut r = pool
            .send(&up, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", b"", false)
            .await
            .expect("response");
        assert_eq!(
            r.body.next().await.expect("first piece").as_deref(),
            Some(&b"hal"[..])
        );
        assert!(matches!(r.body.next().await, Err(UpstreamError::Closed)));
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_body_until_close_ends_with_the_connection() {
        let (up, _) = upstream(b"HTTP/1.0 200 OK\r\n\r\nuntil the end", 1).await;
        let pool = Pool::new(settings());
        let r = pool
            .send(&up, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", b"", false)
            .await
            .expect("response");
        assert_eq!(body_of(r).await, b"until the end");
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        let up = Upstream::from_uri(&format!("http://{addr}").parse().expect("uri")).expect("up");
        let pool = Pool::new(settings());
        let e = pool.send(&up, b"GET / HTTP/1.1\r\n\r\n", b"", false).await;
        assert!(
            matches!(e, Err(UpstreamError::Connect(..))),
            "{:?}",
            e.err()
        );
        assert!(Upstream::from_uri(&"https://x".parse().expect("uri")).is_err());
        let v6 = Upstream::from_uri(&"http://[::1]:8000/v1".parse().expect("uri")).expect("v6");
        assert_eq!((&*v6.authority, &*v6.prefix), ("[::1]:8000", "/v1"));
    }
}
