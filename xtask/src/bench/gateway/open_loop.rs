//! Open-loop load at a fixed rate, for latency that is service time rather than queueing.
//!
//! wrk is closed-loop: at saturation, its latency is the queue. Here request `i` is due at
//! `start + i / rate` whatever happened before (evenly spaced, spread over the connections
//! round-robin and over the keys in turn), and its latency is counted from when it was due, so
//! a slow answer that holds up the next request on its connection counts against the server
//! (no coordinated omission).
//!
//! What is not counted is the generator's own lateness: the time between the moment the
//! connection could have sent (the due time, or the previous answer if that came later) and the
//! moment it did. That time is the generator's wake-up and scheduling on a shared CPU, not the
//! server's; it is reported separately (`lag`) so a run can show it stayed small.
//!
//! Pacing uses a periodic `timerfd` ticking at the request interval (microsecond precision,
//! no re-arming per request), not tokio's timer, whose millisecond ticks would send requests in
//! bursts that queue in the server; each tick sends whatever the absolute schedule says is due.
//! Everything runs on one thread pinned to the load CPU, in a current-thread runtime.
//!
//! The generator shares that CPU with the upstream, so it must cost little, or at half of a
//! proxy's maximum rate it would fill the CPU and its own queueing would be the latency it
//! measures: each connection writes prebuilt request bytes and reads the answer by its
//! Content-Length on a raw socket, with no HTTP client machinery in between.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd, RawFd},
    sync::Arc,
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use bytes::{Buf as _, Bytes, BytesMut};
use nix::{
    sched::{CpuSet, sched_setaffinity},
    sys::{
        time::TimeSpec,
        timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags},
    },
    time::clock_gettime,
    unistd::Pid,
};
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, unix::AsyncFd},
    net::TcpStream,
    sync::mpsc,
    task::JoinSet,
};

use super::chat;

/// A request that takes longer than this fails the run.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Once every request has been dealt out, how long the answers may take to come in.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Between connecting and the first due time.
const LEAD_IN: Duration = Duration::from_millis(20);

/// One fixed-rate run.
pub struct Plan {
    pub addr: SocketAddr,
    pub rate: f64,
    pub connections: usize,
    /// Sent at the rate, not counted.
    pub warmup: Duration,
    /// Counted.
    pub window: Duration,
    pub cpu: usize,
    pub keys: Arc<[String]>,
}

/// What a run saw: latencies of the counted window, and every answer's status.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Latency of each counted request (ns), from its due time less the generator's lag.
    pub latencies_ns: Vec<u64>,
    /// The generator's lag before each counted request (ns).
    pub lags_ns: Vec<u64>,
    /// Every request sent, warm-up included.
    pub sent: u64,
    pub ok: u64,
    pub rate_limited: u64,
    pub other_status: u64,
    /// CPU time the generator's thread spent, connecting included.
    pub generator_cpu_secs: f64,
    /// Requests over the time from the first due time to the last answer: the rate when the
    /// server kept up, less when answers queued.
    pub achieved_rate: f64,
}

/// Percentiles of one run, in microseconds.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Percentiles {
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl Percentiles {
    /// Of `values_ns`, which this sorts.
    pub fn of(values_ns: &mut [u64]) -> Option<Self> {
        values_ns.sort_unstable();
        let us = |ns: u64| ns as f64 / 1e3;
        Some(Self {
            p50_us: us(percentile(values_ns, 0.50)?),
            p99_us: us(percentile(values_ns, 0.99)?),
            max_us: us(*values_ns.last()?),
        })
    }
}

/// The nearest-rank percentile `p` (0 < p <= 1) of ascending `sorted`: the smallest value with
/// at least `p` of the values at or below it.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() || !(p > 0.0 && p <= 1.0) {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Runs `plan` on a thread of its own, pinned to `plan.cpu`, and waits for it.
pub fn run(plan: &Plan) -> Result<Outcome> {
    ensure!(
        plan.rate > 0.0 && plan.rate.is_finite(),
        "rate {}",
        plan.rate
    );
    ensure!(plan.connections >= 1, "no connections");
    ensure!(!plan.keys.is_empty(), "no keys");
    thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut cpus = CpuSet::new();
                cpus.set(plan.cpu).context("CPU set")?;
                sched_setaffinity(Pid::from_raw(0), &cpus)
                    .with_context(|| format!("pinning the load generator to CPU {}", plan.cpu))?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("building the load generator's runtime")?;
                let cpu_before = thread_cpu_secs()?;
                let mut outcome = runtime.block_on(generate(plan))?;
                outcome.generator_cpu_secs = thread_cpu_secs()? - cpu_before;
                Ok(outcome)
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// A request's turn: its index (which picks its key) and when it is due.
#[derive(Clone, Copy)]
struct Due {
    index: u64,
    at_ns: u64,
}

/// The bytes of the request with each key: the same request the probe and wrk send.
fn requests(plan: &Plan) -> Arc<[Bytes]> {
    plan.keys
        .iter()
        .map(|key| {
            Bytes::from(format!(
                "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
                 Authorization: Bearer {key}\r\nContent-Length: {len}\r\n\r\n{body}",
                path = chat::PATH,
                host = plan.addr,
                len = chat::REQUEST_BODY.len(),
                body = chat::REQUEST_BODY,
            ))
        })
        .collect()
}

async fn generate(plan: &Plan) -> Result<Outcome> {
    let requests = requests(plan);
    let total = ((plan.warmup + plan.window).as_secs_f64() * plan.rate).round() as u64;
    let warmup = (plan.warmup.as_secs_f64() * plan.rate).round() as u64;
    let mut lanes = Vec::with_capacity(plan.connections);
    let mut tasks = JoinSet::new();
    for _ in 0..plan.connections {
        let stream = TcpStream::connect(plan.addr)
            .await
            .with_context(|| format!("connecting to {}", plan.addr))?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        let (lane, due) = mpsc::unbounded_channel();
        lanes.push(lane);
        let lane = Lane {
            stream,
            buf: BytesMut::with_capacity(8 << 10),
            due,
            requests: requests.clone(),
            counted_from: warmup,
        };
        tasks.spawn(lane.serve());
    }

    let start = now_ns()? + LEAD_IN.as_nanos() as u64;
    let due_at = |index: u64| start + (index as f64 * 1e9 / plan.rate) as u64;
    let timer = Timer::new().context("creating a timerfd")?;
    timer
        .tick_from(
            start,
            Duration::from_nanos((1e9 / plan.rate).max(1.0) as u64),
        )
        .context("arming the timerfd")?;
    let mut next = 0;
    'pacing: while next < total {
        timer.tick().await.context("timerfd")?;
        let now = now_ns()?;
        // Everything due by now goes out, late or not: the schedule never slips.
        while next < total && due_at(next) <= now {
            let due = Due {
                index: next,
                at_ns: due_at(next),
            };
            if lanes[(next % lanes.len() as u64) as usize]
                .send(due)
                .is_err()
            {
                // A lane only stops early on an error, which joining it reports.
                break 'pacing;
            }
            next += 1;
        }
    }
    drop(lanes);

    let mut outcome = Outcome::default();
    let mut first_error = None;
    let mut last_answer_ns = 0;
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(joined) = tasks.join_next().await {
            match joined.context("a connection task panicked")? {
                Ok(tally) => {
                    outcome.latencies_ns.extend(tally.latencies_ns);
                    outcome.lags_ns.extend(tally.lags_ns);
                    outcome.sent += tally.sent;
                    outcome.ok += tally.ok;
                    outcome.rate_limited += tally.rate_limited;
                    outcome.other_status += tally.other_status;
                    last_answer_ns = last_answer_ns.max(tally.last_answer_ns);
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        Ok::<_, anyhow::Error>(())
    })
    .await;
    drained
        .map_err(|_| {
            anyhow::anyhow!("requests still unanswered {DRAIN_TIMEOUT:?} after the last was due")
        })
        .and_then(|joined| joined)?;
    if let Some(error) = first_error {
        return Err(error);
    }
    if outcome.sent != total {
        bail!("sent {} of {total} requests", outcome.sent);
    }
    // What the server kept up with: the schedule spans `total / rate`; answers that end well
    // after it mean requests queued behind one another.
    let span_ns = last_answer_ns.saturating_sub(start).max(1);
    outcome.achieved_rate = total as f64 * 1e9 / span_ns as f64;
    Ok(outcome)
}

/// One kept-alive connection and the requests dealt to it.
struct Lane {
    stream: TcpStream,
    /// What has been read of the answers.
    buf: BytesMut,
    due: mpsc::UnboundedReceiver<Due>,
    requests: Arc<[Bytes]>,
    counted_from: u64,
}

#[derive(Default)]
struct Tally {
    latencies_ns: Vec<u64>,
    lags_ns: Vec<u64>,
    sent: u64,
    ok: u64,
    rate_limited: u64,
    other_status: u64,
    last_answer_ns: u64,
}

impl Lane {
    async fn serve(mut self) -> Result<Tally> {
        let mut tally = Tally::default();
        let mut previous_answer_ns = 0;
        while let Some(due) = self.due.recv().await {
            let request = self.requests[(due.index % self.requests.len() as u64) as usize].clone();
            let sent_ns = now_ns()?;
            let status = tokio::time::timeout(REQUEST_TIMEOUT, async {
                self.stream.write_all(&request).await?;
                self.answer().await
            })
            .await
            .with_context(|| format!("no answer within {REQUEST_TIMEOUT:?}"))?
            .context("a request failed")?;
            let answered_ns = now_ns()?;

            tally.sent += 1;
            match status {
                200..=299 => tally.ok += 1,
                429 => tally.rate_limited += 1,
                _ => tally.other_status += 1,
            }
            // The request could have gone at its due time, or when the previous answer freed
            // the connection if that was later: waiting for that answer is the server's doing,
            // the rest (until it did go) the generator's.
            let could_send_ns = due.at_ns.max(previous_answer_ns);
            previous_answer_ns = answered_ns;
            tally.last_answer_ns = answered_ns;
            if due.index >= self.counted_from {
                let service = answered_ns.saturating_sub(sent_ns);
                let held_up = could_send_ns.saturating_sub(due.at_ns);
                tally.latencies_ns.push(service + held_up);
                tally.lags_ns.push(sent_ns.saturating_sub(could_send_ns));
            }
        }
        Ok(tally)
    }

    /// Reads one answer (its head, then its Content-Length of body); returns its status.
    async fn answer(&mut self) -> Result<u16> {
        let (status, head_len, body_len) = loop {
            let mut fields = [httparse::EMPTY_HEADER; 32];
            let mut head = httparse::Response::new(&mut fields);
            match head.parse(&self.buf).context("an invalid response head")? {
                httparse::Status::Complete(len) => {
                    let length = head
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| {
                            std::str::from_utf8(h.value)
                                .ok()?
                                .trim()
                                .parse::<usize>()
                                .ok()
                        })
                        .context("an answer without Content-Length (every leg frames by length)")?;
                    break (head.code.unwrap_or(0), len, length);
                }
                httparse::Status::Partial => self.fill().await?,
            }
        };
        while self.buf.len() < head_len + body_len {
            self.fill().await?;
        }
        self.buf.advance(head_len + body_len);
        Ok(status)
    }

    async fn fill(&mut self) -> Result<()> {
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            bail!("the server closed the connection mid-answer");
        }
        Ok(())
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock the timerfd is armed on.
fn now_ns() -> Result<u64> {
    let now = clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).context("clock_gettime")?;
    Ok(now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
}

/// CPU time of the calling thread.
fn thread_cpu_secs() -> Result<f64> {
    let spent = clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .context("clock_gettime(CLOCK_THREAD_CPUTIME_ID)")?;
    Ok(spent.tv_sec() as f64 + spent.tv_nsec() as f64 / 1e9)
}

/// A one-shot timerfd on CLOCK_MONOTONIC, awaited through the runtime's reactor.
struct Timer(AsyncFd<TimerHandle>);

struct TimerHandle(TimerFd);

impl AsRawFd for TimerHandle {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl Timer {
    fn new() -> Result<Self> {
        let fd = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        // SAFETY: the TimerFd owns its descriptor and closes it only when dropped, which is
        // when the AsyncFd holding it drops; as_raw_fd always returns that descriptor.
        let registered = unsafe { AsyncFd::register(TimerHandle(fd)) };
        Ok(Self(registered.map_err(io::Error::from)?))
    }

    /// Ticks every `every` from `first_ns` (CLOCK_MONOTONIC) on.
    fn tick_from(&self, first_ns: u64, every: Duration) -> io::Result<()> {
        let first = TimeSpec::from_duration(Duration::from_nanos(first_ns));
        self.0.get_ref().0.set(
            Expiration::IntervalDelayed(first, TimeSpec::from_duration(every)),
            TimerSetTimeFlags::TFD_TIMER_ABSTIME,
        )?;
        Ok(())
    }

    /// Returns at the next tick (at once if one has passed since the last call).
    async fn tick(&self) -> io::Result<()> {
        loop {
            let mut ready = self.0.readable().await?;
            // Reading the expiry count disarms the readiness; EAGAIN means a stale wake-up.
            match ready.try_io(|fd| fd.get_ref().0.wait().map_err(io::Error::from)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 0.50), Some(50));
        assert_eq!(percentile(&values, 0.99), Some(99));
        assert_eq!(percentile(&values, 1.0), Some(100));
        assert_eq!(percentile(&values, 0.001), Some(1));
        assert_eq!(percentile(&[7], 0.99), Some(7));
        assert_eq!(percentile(&[1, 2], 0.5), Some(1));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&values, 0.0), None);
        assert_eq!(percentile(&values, f64::NAN), None);
    }

    #[test]
    fn percentiles_sort_first() {
        let mut values = vec![3_000, 1_000, 2_000];
        let p = Percentiles::of(&mut values).unwrap();
        assert_eq!((p.p50_us, p.p99_us, p.max_us), (2.0, 3.0, 3.0));
        assert!(Percentiles::of(&mut []).is_none());
    }

    #[test]
    fn the_timer_ticks_from_its_first_time_at_its_interval() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let timer = Timer::new().unwrap();
            let first = now_ns().unwrap() + 2_000_000;
            timer.tick_from(first, Duration::from_millis(3)).unwrap();
            timer.tick().await.unwrap();
            assert!(now_ns().unwrap() >= first);
            timer.tick().await.unwrap();
            assert!(now_ns().unwrap() >= first + 3_000_000);
        });
    }
}
