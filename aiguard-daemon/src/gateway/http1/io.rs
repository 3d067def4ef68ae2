//! Socket reads and writes, and the one timer a connection needs.
//!
//! Reads spend no system call only to hear `EAGAIN`: a read that returns less than it had
//! room for has drained the socket, so its readiness is cleared then and the next read waits
//! for epoll (nginx does the same). With edge-triggered epoll this loses nothing: data that
//! arrives after the read raises a new event, and tokio only clears readiness it has not seen
//! change since.
use std::{
    future::Future,
    io::{self, IoSlice},
    os::fd::AsRawFd as _,
    pin::{Pin, pin},
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncWrite, Interest},
    net::TcpStream,
    time::{Instant, Sleep, sleep_until},
};

/// Room a read asks the kernel to fill at least; a buffer with less spare room grows first.
const MIN_READ: usize = 4096;
/// How much a buffer grows by when it runs out of room.
const GROW: usize = 16 << 10;

/// Reads what `stream` has into the spare room of `buf`; `Ok(0)` is the end of the stream.
pub fn poll_read(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < MIN_READ {
        buf.reserve(GROW);
    }
    let fd = stream.as_raw_fd();
    loop {
        ready!(stream.poll_read_ready(cx))?;
        let mut got = 0;
        let outcome = stream.try_io(Interest::READABLE, || {
            let spare = buf.spare_capacity_mut();
            let room = spare.len();
            // SAFETY: `spare` is writable memory of `room` bytes that `buf` owns.
            let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), room, 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            // SAFETY: the kernel initialised the first `n` bytes of the spare room.
            unsafe { buf.set_len(buf.len() + n) };
            got = n;
            if n > 0 && n < room {
                // Drained: clear the readiness (see the module's doc).
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match outcome {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => {
                return Poll::Ready(Ok(got));
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// Reads more into `buf` (see [`poll_read`]).
pub async fn read(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    std::future::poll_fn(|cx| poll_read(stream, cx, buf)).await
}

/// Writes all of `parts`, in as few system calls as the socket allows (one, normally).
pub async fn write_all(stream: &mut TcpStream, parts: &[&[u8]]) -> io::Result<()> {
    let mut skip = 0usize;
    let total: usize = parts.iter().map(|p| p.len()).sum();
    while skip < total {
        let mut slices: [IoSlice<'_>; 4] = [IoSlice::new(&[]); 4];
        let mut n = 0;
        let mut offset = 0;
        for p in parts {
            let end = offset + p.len();
            if end > skip && n < slices.len() {
                let from = skip.saturating_sub(offset);
                slices[n] = IoSlice::new(&p[from..]);
                n += 1;
            }
            offset = end;
        }
        let wrote =
            std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_write_vectored(cx, &slices[..n]))
                .await?;
        if wrote == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        skip += wrote;
    }
    Ok(())
}

/// A connection's deadline: one timer, moved lazily. Setting a later deadline only writes it
/// down; the timer, when it fires early, re-arms itself for the deadline then in force. A
/// busy connection so touches the timer wheel about once per timeout period, not per request.
pub struct Deadline {
    timer: Pin<Box<Sleep>>,
    /// When the timer fires.
    armed: Instant,
    /// When the current wait must end; `None`: it may last forever.
    due: Option<Instant>,
}

/// A wait ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

impl Default for Deadline {
    fn default() -> Self {
        let far = Instant::now() + Duration::from_secs(86_400);
        Self {
            timer: Box::pin(sleep_until(far)),
            armed: far,
            due: None,
        }
    }
}

impl Deadline {
    /// The current wait must end at `due`.
    pub fn set(&mut self, due: Instant) {
        self.due = Some(due);
        if due < self.armed {
            self.armed = due;
            self.timer.as_mut().reset(due);
        }
    }

    /// The current wait must end `after` from now.
    pub fn set_in(&mut self, after: Duration) {
        self.set(Instant::now() + after);
    }

    /// The current wait may last forever.
    pub fn clear(&mut self) {
        self.due = None;
    }

    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    fn poll_elapsed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(due) = self.due else {
            return Poll::Pending;
        };
        loop {
            ready!(self.timer.as_mut().poll(cx));
            if Instant::now() >= due {
                return Poll::Ready(());
            }
            self.armed = due;
            self.timer.as_mut().reset(due);
        }
    }

    /// Runs `work` until it finishes or the deadline passes.
    pub async fn run<F: Future>(&mut self, work: F) -> Result<F::Output, Elapsed> {
        let mut work = pin!(work);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = work.as_mut().poll(cx) {
                return Poll::Ready(Ok(v));
            }
            ready!(self.poll_elapsed(cx));
            Poll::Ready(Err(Elapsed))
        })
        .await
    }
}

impl Deadline {
    /// Runs `work` until it finishes or the deadline `due()` gives passes; `due` is asked
    /// (and the clock read) only if the work has to wait at all, which most work that may wait
    /// does not.
    pub async fn run_lazy<F: Future>(
        &mut self,
        due: impl FnOnce() -> Instant,
        work: F,
    ) -> Result<F::Output, Elapsed> {
        let mut work = pin!(work);
        let mut due = Some(due);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = work.as_mut().poll(cx) {
                return Poll::Ready(Ok(v));
            }
            if let Some(due) = due.take() {
                self.set(due());
            }
            ready!(self.poll_elapsed(cx));
            Poll::Ready(Err(Elapsed))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let a = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (b, _) = l.accept().await.expect("accept");
        (a, b)
    }

    #[tokio::test]
    async fn a_drained_socket_waits_for_new_data_and_sees_the_end() {
        let (mut a, b) = pair().await;
        let mut buf = BytesMut::new();
        a.write_all(b"hello").await.expect("write");
        assert_eq!(read(&b, &mut buf).await.expect("read"), 5);
        // Readiness was cleared by the short read; new data still wakes the reader.
        let reader = async {
            let n = read(&b, &mut buf).await.expect("read");
            (n, buf.clone())
        };
        let writer = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            a.write_all(b" world").await.expect("write");
            a.shutdown().await.expect("shutdown");
        };
        let ((n, got), ()) = tokio::join!(reader, writer);
        assert_eq!(n, 6);
        assert_eq!(&got[..], b"hello world");
        let mut buf = BytesMut::new();
        assert_eq!(read(&b, &mut buf).await.expect("read"), 0, "end of stream");
    }

    #[tokio::test]
    async fn write_all_writes_every_part_even_past_the_socket_buffer() {
        let (mut a, b) = pair().await;
        let big = vec![7u8; 4 << 20];
        let reader = async {
            let mut buf = BytesMut::new();
            let mut total = 0;
            loop {
                buf.clear();
                let n = read(&b, &mut buf).await.expect("read");
                if n == 0 {
                    return total;
                }
                total += n;
            }
        };
        let writer = async {
            write_all(&mut a, &[b"head", &big, b"", b"tail"])
                .await
                .expect("write");
            a.shutdown().await.expect("shutdown");
        };
        let (total, ()) = tokio::join!(reader, writer);
        assert_eq!(total, 8 + (4 << 20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_moved_later_is_kept_and_an_earlier_one_fires() {
        let mut d = Deadline::default();
        d.set_in(Duration::from_secs(1));
        // Moved later: the timer fires at 1 s, re-arms, and the wait ends at 3 s.
        d.set_in(Duration::from_secs(3));
        let started = Instant::now();
        let r = d.run(std::future::pending::<()>()).await;
        assert_eq!(r, Err(Elapsed));
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        // An earlier one re-arms at once.
        d.set_in(Duration::from_millis(10));
        let started = Instant::now();
        assert_eq!(d.run(std::future::pending::<()>()).await, Err(Elapsed));
        assert_eq!(started.elapsed(), Duration::from_millis(10));
        // Work that finishes first wins; no deadline at all waits for the work.
        d.set_in(Duration::from_secs(5));
        assert_eq!(d.run(async { 7 }).await, Ok(7));
        // Lazy: work that needs no waiting never reads the clock; work that waits gets the
        // deadline from when it started waiting.
        d.clear();
        assert_eq!(
            d.run_lazy(|| unreachable!("no wait"), async { 3 }).await,
            Ok(3)
        );
        let started = Instant::now();
        let r = d
            .run_lazy(
                || Instant::now() + Duration::from_millis(40),
                std::future::pending::<()>(),
            )
            .await;
        assert_eq!(
            (r, started.elapsed()),
            (Err(Elapsed), Duration::from_millis(40))
        );
        d.clear();
        let slow = async {
            tokio::time::sleep(Duration::from_secs(100)).await;
            1
        };
        assert_eq!(d.run(slow).await, Ok(1));
    }
}
