//! `cargo xtask bench metrics`: what one `/metrics` scrape costs on a loaded node, so that
//! monitoring never becomes the bottleneck.
//!
//! The real daemon runs in a receiver namespace with XDP on one end of a veth pair
//! ([`VethPair`]), holding `--bans` bans (loaded with `aiguard ban --file`) and `--tenants`
//! tenants with a monthly quota, each with a live key and one request settled through the
//! gateway (what makes a tenant's quota gauges exist, see the daemon's `metrics::gateway`).
//! Requests come from the sender namespace over the veth; the upstream and the scraper are
//! threads that joined the receiver namespace, so nothing leaves the namespaces.
//!
//! Each round, in this order:
//! - quiet: `--scrapes` scrapes back to back and nothing else: wall time, bytes, and the
//!   daemon's CPU time per scrape (`/proc/PID/stat`);
//! - idle: `--seconds` of probes and no scrape: gateway requests at `--rate` per second and an
//!   admin `status` every 100 ms, each timed;
//! - scraping: the same probes while scrapes run back to back.
//!
//! Figures are medians over rounds (the VM's speed drifts; see BENCHMARKING.md). The table goes
//! to stdout, the figures to `target/bench/metrics.json`.

use std::{
    fs,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd as _, unix::net::UnixStream, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde::Serialize;

use super::{
    gateway::process::{TreeCpu, log_tail},
    median,
    netns::{self, RX_ADDR, RX_IF, VethPair},
    object::{self, PinDir},
    percentile, unique_name,
};
use crate::{setup, stdout_of, workspace_root};

/// The tier of every benchmark key: a monthly quota and nothing else, so no request is limited.
const TIER: &str = "bench";
const MONTHLY_TOKENS: u64 = 1_000_000;
/// The gateway's port on the receiver's veth address.
const GATEWAY_PORT: u16 = 8080;
const METRICS_LISTEN: &str = "127.0.0.1:9464";
const CHAT_PATH: &str = "/v1/chat/completions";
const REQUEST_BODY: &str =
    r#"{"model":"bench","messages":[{"role":"user","content":"hello"}],"max_tokens":16}"#;
const RESPONSE_BODY: &str = concat!(
    r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench","#,
    r#""choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"#,
    r#""finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}"#
);
/// Clients adding keys and making the first requests at once.
const PARALLEL: usize = 8;
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const APPLY_TIMEOUT: Duration = Duration::from_secs(300);
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const STATUS_EVERY: Duration = Duration::from_millis(100);
const POLL: Duration = Duration::from_millis(100);

#[derive(clap::Args, Debug)]
pub struct MetricsBenchArgs {
    /// Active bans the daemon holds (distinct IPv4 /24s).
    #[arg(long, default_value_t = 100_000)]
    pub bans: usize,
    /// Tenants with a monthly quota, a key and one settled request each.
    #[arg(long, default_value_t = 10_000)]
    pub tenants: usize,
    /// Rounds; the figures are medians over rounds.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Back-to-back scrapes in each round's quiet phase.
    #[arg(long, default_value_t = 10)]
    pub scrapes: usize,
    /// Seconds of each probe phase (idle, scraping) per round.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Gateway requests per second while probing (open loop, one connection each).
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    /// aiguard daemon binary; by default the release daemon is built.
    #[arg(long)]
    pub daemon: Option<PathBuf>,
}

fn validate(args: &MetricsBenchArgs) -> Result<()> {
    ensure!(
        (1..=1_000_000).contains(&args.bans),
        "--bans must be in 1..=1000000"
    );
    ensure!(
        (1..=100_000).contains(&args.tenants),
        "--tenants must be in 1..=100000"
    );
    ensure!(
        (1..=50).contains(&args.rounds),
        "--rounds must be in 1..=50"
    );
    ensure!(
        (2..=1000).contains(&args.scrapes),
        "--scrapes must be in 2..=1000"
    );
    ensure!(
        args.seconds > 0.0 && args.seconds <= 60.0,
        "--seconds must be in (0, 60]"
    );
    ensure!(
        (1..=2000).contains(&args.rate),
        "--rate must be in 1..=2000"
    );
    Ok(())
}

pub fn run(args: MetricsBenchArgs) -> Result<()> {
    setup::require_root("`cargo xtask bench metrics` (XDP, network namespaces)")?;
    validate(&args)?;
    let binary = match &args.daemon {
        Some(path) => path.clone(),
        None => crate::run::build_daemon().context("building the daemon")?,
    };
    netns::remove_stale()?;
    object::remove_stale_pin_dirs()?;
    let bench_dir = workspace_root().join("target/bench");
    fs::create_dir_all(&bench_dir)?;
    let work = WorkDir::create(&bench_dir)?;

    let pair = VethPair::create()?;
    let rx = pair.rx.open()?;
    let tx = pair.tx.open()?;
    let stop = AtomicBool::new(false);
    let upstream_listener = in_netns(&rx, || {
        TcpListener::bind("127.0.0.1:0").context("binding the upstream")
    })?;
    let upstream = upstream_listener.local_addr()?;

    thread::scope(|scope| -> Result<()> {
        scope.spawn(|| serve_upstream(upstream_listener, &stop));
        let result = (|| -> Result<Report> {
            let pins = PinDir::create()?;
            let config = work.0.join("aiguard.toml");
            fs::write(&config, config_toml(upstream))?;
            let mut daemon = Daemon::start(&binary, &rx, &work.0, &config, &pins)?;
            let result = measure(&args, &mut daemon, &rx, &tx, &work.0, &binary);
            let stopped = daemon.stop();
            drop(pins);
            let report = result?;
            stopped?;
            Ok(report)
        })();
        stop.store(true, Ordering::Relaxed);
        let report = result?;
        print!("{}", report.markdown());
        let json = bench_dir.join("metrics.json");
        fs::write(&json, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", json.display()))?;
        eprintln!("bench metrics: results written to {}", json.display());
        Ok(())
    })
}

/// Loads the node, then runs the rounds.
fn measure(
    args: &MetricsBenchArgs,
    daemon: &mut Daemon,
    rx: &fs::File,
    tx: &fs::File,
    work: &Path,
    binary: &Path,
) -> Result<Report> {
    let gateway = SocketAddr::from((RX_ADDR, GATEWAY_PORT));
    let metrics: SocketAddr = METRICS_LISTEN.parse()?;

    // Bans, through the CLI as an operator would.
    let file = work.join("bans.txt");
    fs::write(&file, ban_lines(args.bans))?;
    let started = Instant::now();
    stdout_of(
        Command::new(binary)
            .arg("--socket")
            .arg(&daemon.socket)
            .args(["ban", "--file"])
            .arg(&file),
    )?;
    let want = format!("aiguard_bans_active{{origin=\"cli\"}} {}", args.bans);
    wait_for(daemon, APPLY_TIMEOUT, "the bans in the metrics", || {
        Ok(in_netns(rx, || scrape(metrics))?.page.contains(&want))
    })?;
    eprintln!(
        "bench metrics: {} bans in force after {:.1?}",
        args.bans,
        started.elapsed()
    );

    // Tenants: a key each, then one request each through the gateway.
    let started = Instant::now();
    let keys = add_keys(&daemon.socket, args.tenants)?;
    eprintln!(
        "bench metrics: {} keys added in {:.1?}",
        keys.len(),
        started.elapsed()
    );
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let failed = Mutex::new(None);
    thread::scope(|scope| {
        for _ in 0..PARALLEL {
            scope.spawn(|| {
                let outcome = in_netns(tx, || {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(key) = keys.get(i) else {
                            return Ok(());
                        };
                        let status = chat(gateway, key)?.0;
                        ensure!(status == 200, "tenant t{i}'s first request got {status}");
                    }
                });
                if let Err(error) = outcome {
                    *failed.lock().expect("not poisoned") = Some(error);
                }
            });
        }
    });
    if let Some(error) = failed.into_inner().expect("not poisoned") {
        return Err(error.context("the tenants' first requests"));
    }
    eprintln!(
        "bench metrics: {} requests through the gateway in {:.1?}",
        keys.len(),
        started.elapsed()
    );
    let page = in_netns(rx, || scrape(metrics))?.page;
    let tenant_series = page
        .lines()
        .filter(|l| l.starts_with("aiguard_tenant_monthly_tokens_used{"))
        .count();
    let tenants_with_usage = page
        .lines()
        .filter(|l| l.starts_with("aiguard_tenant_monthly_tokens_used{") && !l.ends_with(" 0"))
        .count();
    ensure!(
        tenant_series == args.tenants,
        "the page has {tenant_series} tenant quota series, expected {}",
        args.tenants
    );
    let series = page
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();

    let probe_key = keys.first().context("no keys")?.clone();
    let mut rounds = Vec::with_capacity(args.rounds);
    for round in 0..args.rounds {
        daemon.ensure_running()?;
        let r = one_round(args, daemon, rx, tx, gateway, metrics, &probe_key)?;
        eprintln!(
            "bench metrics: round {}/{}: scrape p50 {:.0} ms, CPU {:.0} ms/scrape; gateway p99 {:.2} -> {:.2} ms; status p99 {:.2} -> {:.2} ms",
            round + 1,
            args.rounds,
            r.scrape_p50_ms,
            r.cpu_ms_per_scrape,
            r.idle.gateway_p99_ms,
            r.scraping.gateway_p99_ms,
            r.idle.status_p99_ms,
            r.scraping.status_p99_ms
        );
        rounds.push(r);
    }
    Ok(Report::new(
        args,
        series,
        tenant_series,
        tenants_with_usage,
        rounds,
    ))
}

fn one_round(
    args: &MetricsBenchArgs,
    daemon: &Daemon,
    rx: &fs::File,
    tx: &fs::File,
    gateway: SocketAddr,
    metrics: SocketAddr,
    key: &str,
) -> Result<Round> {
    // Quiet: scrapes alone.
    let (walls, bytes, cpu) = in_netns(rx, || {
        let mut walls = Vec::with_capacity(args.scrapes);
        let mut bytes = 0;
        let before = TreeCpu::read(daemon.pid())?;
        for _ in 0..args.scrapes {
            let s = scrape(metrics)?;
            walls.push(s.wall.as_secs_f64() * 1e3);
            bytes = s.body_bytes;
        }
        let cpu = TreeCpu::read(daemon.pid())?.secs_since(&before)?;
        Ok((walls, bytes, cpu))
    })?;
    let seconds = Duration::from_secs_f64(args.seconds);
    let idle = probe(args, daemon, tx, gateway, key, seconds)?;
    let busy = AtomicBool::new(true);
    let scraping = thread::scope(|scope| {
        let scraper = scope.spawn(|| {
            in_netns(rx, || {
                let mut count = 0usize;
                while busy.load(Ordering::Relaxed) {
                    scrape(metrics)?;
                    count += 1;
                }
                Ok(count)
            })
        });
        let probed = probe(args, daemon, tx, gateway, key, seconds);
        busy.store(false, Ordering::Relaxed);
        let count = scraper.join().expect("the scraper does not panic")?;
        let mut probed = probed?;
        probed.scrapes = count;
        Ok::<_, anyhow::Error>(probed)
    })?;
    Ok(Round {
        scrape_p50_ms: percentile(&walls, 50.0),
        scrape_p99_ms: percentile(&walls, 99.0),
        scrape_max_ms: percentile(&walls, 100.0),
        body_bytes: bytes,
        cpu_ms_per_scrape: cpu * 1e3 / args.scrapes as f64,
        idle,
        scraping,
    })
}

/// Gateway requests at `args.rate` per second from the sender namespace and an admin `status`
/// every [`STATUS_EVERY`], for `seconds`.
fn probe(
    args: &MetricsBenchArgs,
    daemon: &Daemon,
    tx: &fs::File,
    gateway: SocketAddr,
    key: &str,
    seconds: Duration,
) -> Result<Probes> {
    let started = Instant::now();
    thread::scope(|scope| {
        let statuses = scope.spawn(|| -> Result<Vec<f64>> {
            let mut out = Vec::new();
            let mut next = started;
            while next < started + seconds {
                sleep_until(next);
                let t = Instant::now();
                let reply = admin_call(&daemon.socket, r#"{"op":"status"}"#)?;
                ensure!(
                    reply.contains(r#""reply":"status""#),
                    "status answered {reply}"
                );
                out.push(t.elapsed().as_secs_f64() * 1e3);
                next += STATUS_EVERY;
            }
            Ok(out)
        });
        let requests = in_netns(tx, || {
            let every = Duration::from_secs_f64(1.0 / f64::from(args.rate));
            let mut out = Vec::new();
            let mut next = started;
            while next < started + seconds {
                sleep_until(next);
                // From the intended start: a stalled gateway delays what follows (no
                // coordinated omission).
                let status = chat(gateway, key)?.0;
                ensure!(status == 200, "a probe request got {status}");
                out.push(next.elapsed().as_secs_f64() * 1e3);
                next += every;
            }
            Ok(out)
        });
        let statuses = statuses.join().expect("the status prober does not panic")?;
        let requests = requests?;
        Ok(Probes {
            gateway_p50_ms: percentile(&requests, 50.0),
            gateway_p99_ms: percentile(&requests, 99.0),
            gateway_max_ms: percentile(&requests, 100.0),
            status_p50_ms: percentile(&statuses, 50.0),
            status_p99_ms: percentile(&statuses, 99.0),
            status_max_ms: percentile(&statuses, 100.0),
            requests: requests.len(),
            scrapes: 0,
        })
    })
}

fn sleep_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        thread::sleep(at - now);
    }
}

/// `count` distinct /24s from 20.0.0.0 up: clear of the veth's 10.77.0.0/16.
fn ban_lines(count: usize) -> String {
    let mut out = String::with_capacity(count * 16);
    for i in 0..count as u32 {
        let [a, b, c, _] = (0x1400_0000u32 + (i << 8)).to_be_bytes();
        out.push_str(&format!("{a}.{b}.{c}.0/24\n"));
    }
    out
}

fn config_toml(upstream: SocketAddr) -> String {
    let [a, b, c, d] = RX_ADDR;
    format!(
        "# Written by `cargo xtask bench metrics`.
[gateway]
listen = [\"{a}.{b}.{c}.{d}:{GATEWAY_PORT}\"]
upstreams = [\"http://{upstream}\"]
default_tier = \"{TIER}\"

[tiers.{TIER}]
monthly_tokens = {MONTHLY_TOKENS}

[metrics]
enabled = true
listen = \"{METRICS_LISTEN}\"
"
    )
}

/// Runs `f` on a thread that joined the namespace behind `handle`.
pub(super) fn in_netns<T: Send>(
    handle: &fs::File,
    f: impl FnOnce() -> Result<T> + Send,
) -> Result<T> {
    thread::scope(|scope| {
        scope
            .spawn(|| {
                netns::enter(handle)?;
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

struct Scrape {
    wall: Duration,
    body_bytes: usize,
    page: String,
}

/// One `GET /metrics` on a connection of its own, as Prometheus' first scrape makes it.
fn scrape(addr: SocketAddr) -> Result<Scrape> {
    let started = Instant::now();
    let (status, body) = http(
        addr,
        &format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )?;
    let wall = started.elapsed();
    ensure!(status == 200, "/metrics answered {status}");
    Ok(Scrape {
        wall,
        body_bytes: body.len(),
        page: String::from_utf8(body).context("the page is not UTF-8")?,
    })
}

/// One chat completion with `key`.
fn chat(addr: SocketAddr, key: &str) -> Result<(u16, Vec<u8>)> {
    http(
        addr,
        &format!(
            "POST {CHAT_PATH} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n\
             {REQUEST_BODY}",
            REQUEST_BODY.len()
        ),
    )
}

/// Sends `request` (with `Connection: close`) and returns the status and the body as sent
/// (chunk framing, if any, left in).
fn http(addr: SocketAddr, request: &str) -> Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .with_context(|| format!("reading the answer of {addr}"))?;
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("{addr} answered without a full head"))?;
    let head = String::from_utf8_lossy(&response[..head_end]);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{addr} answered {head:?}"))?;
    Ok((status, response[head_end + 4..].to_vec()))
}

/// One request on the admin socket (one JSON line each way), as the CLI makes it.
fn admin_call(socket: &Path, request: &str) -> Result<String> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    (&stream).write_all(format!("{request}\n").as_bytes())?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    Ok(reply)
}

/// Creates a key for each of `t0` .. `t{count-1}` in [`TIER`], through the admin socket (the
/// request `aiguard keys add` sends; 10k CLI processes would only time process start-up).
fn add_keys(socket: &Path, count: usize) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Created {
        secret: String,
    }
    let next = AtomicUsize::new(0);
    let keys = Mutex::new(vec![String::new(); count]);
    thread::scope(|scope| {
        let workers: Vec<_> = (0..PARALLEL)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            return Ok(());
                        }
                        let reply = admin_call(
                            socket,
                            &format!(r#"{{"op":"keys_add","tenant":"t{i}","tier":"{TIER}"}}"#),
                        )?;
                        let created: Created = serde_json::from_str(&reply)
                            .with_context(|| format!("keys_add answered {reply}"))?;
                        keys.lock().expect("not poisoned")[i] = created.secret;
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("no panic")?;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(keys.into_inner().expect("not poisoned"))
}

/// A fixed chat completion for every request, on keep-alive connections, until `stop`.
fn serve_upstream(listener: TcpListener, stop: &AtomicBool) {
    listener
        .set_nonblocking(true)
        .expect("a nonblocking listener");
    thread::scope(|scope| {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    scope.spawn(move || {
                        let _ = serve_upstream_connection(stream, stop);
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    eprintln!("warning: upstream accept: {e}");
                    thread::sleep(Duration::from_millis(50));
                }
            }
        }
    });
}

fn serve_upstream_connection(stream: TcpStream, stop: &AtomicBool) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{RESPONSE_BODY}",
        RESPONSE_BODY.len()
    );
    while !stop.load(Ordering::Relaxed) {
        let mut length = 0usize;
        let mut line = String::new();
        // The head, line by line; a read timeout only means an idle connection.
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    continue;
                }
                Err(e) => return Err(e),
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        writer.write_all(answer.as_bytes())?;
    }
    Ok(())
}

/// `target/bench/agbench-PID-N`: the daemon's config, state, socket and log; removed on drop.
pub(super) struct WorkDir(pub(super) PathBuf);

impl WorkDir {
    pub(super) fn create(bench_dir: &Path) -> Result<Self> {
        let path = bench_dir.join(unique_name());
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(error) = fs::remove_dir_all(&self.0) {
            eprintln!("warning: removing {}: {error}", self.0.display());
        }
    }
}

/// The daemon in the receiver namespace; stopped by PID on drop.
pub(super) struct Daemon {
    child: Child,
    pub(super) socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    pub(super) fn start(
        binary: &Path,
        rx: &fs::File,
        work: &Path,
        config: &Path,
        pins: &PinDir,
    ) -> Result<Self> {
        let log = work.join("daemon.log");
        let output =
            fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let state = work.join("state");
        fs::create_dir(&state)?;
        let socket = work.join("aiguard.sock");
        let netns_fd = rx.as_raw_fd();
        let mut cmd = Command::new(binary);
        cmd.arg("--socket")
            .arg(&socket)
            .args(["run", "--interface", RX_IF, "--config"])
            .arg(config)
            .arg("--bpffs-dir")
            .arg(pins.path())
            .arg("--state-dir")
            .arg(&state)
            .arg("--detach-on-exit")
            // Nothing logged per request.
            .arg("--log=warn")
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output);
        // SAFETY: the hook makes only async-signal-safe calls (setns, prctl) on a descriptor
        // `rx` keeps open until after spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0
                    || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        eprintln!("+ {}", crate::shown(&cmd));
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut daemon = Self { child, socket, log };
        let socket = daemon.socket.clone();
        wait_for(&mut daemon, READY_TIMEOUT, "`status`", || {
            Ok(admin_call(&socket, r#"{"op":"status"}"#).is_ok())
        })?;
        Ok(daemon)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the daemon exited ({status}); its log ends:\n{}",
                log_tail(&self.log)
            );
        }
        Ok(())
    }

    pub(super) fn stop(mut self) -> Result<()> {
        let status = self.terminate()?;
        ensure!(
            status.success(),
            "the daemon exited with {status} on SIGTERM; its log ends:\n{}",
            log_tail(&self.log)
        );
        Ok(())
    }

    fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM)?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        Ok(self.child.wait()?)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(error) = self.terminate() {
            eprintln!("warning: stopping the daemon: {error:#}");
        }
    }
}

/// Polls `ready` until it says yes, the daemon exits, or `timeout` passes.
fn wait_for(
    daemon: &mut Daemon,
    timeout: Duration,
    what: &str,
    mut ready: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        daemon.ensure_running()?;
        if ready().unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the daemon did not show {what} within {timeout:?}; its log ends:\n{}",
                log_tail(&daemon.log)
            );
        }
        thread::sleep(POLL);
    }
}

#[derive(Serialize, Clone, Copy, Debug)]
struct Probes {
    gateway_p50_ms: f64,
    gateway_p99_ms: f64,
    gateway_max_ms: f64,
    status_p50_ms: f64,
    status_p99_ms: f64,
    status_max_ms: f64,
    requests: usize,
    /// Scrapes completed during the phase (0 when idle).
    scrapes: usize,
}

#[derive(Serialize, Clone, Copy, Debug)]
struct Round {
    scrape_p50_ms: f64,
    scrape_p99_ms: f64,
    scrape_max_ms: f64,
    body_bytes: usize,
    cpu_ms_per_scrape: f64,
    idle: Probes,
    scraping: Probes,
}

#[derive(Serialize, Debug)]
struct Report {
    command: String,
    cpus: usize,
    bans: usize,
    tenants: usize,
    tenant_series: usize,
    tenants_with_usage: usize,
    series: usize,
    rounds: Vec<Round>,
    median: Round,
}

impl Report {
    fn new(
        args: &MetricsBenchArgs,
        series: usize,
        tenant_series: usize,
        tenants_with_usage: usize,
        rounds: Vec<Round>,
    ) -> Self {
        let m = |f: fn(&Round) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
        let probes = |f: fn(&Round) -> &Probes| {
            let of =
                |g: fn(&Probes) -> f64| median(&rounds.iter().map(|r| g(f(r))).collect::<Vec<_>>());
            Probes {
                gateway_p50_ms: of(|p| p.gateway_p50_ms),
                gateway_p99_ms: of(|p| p.gateway_p99_ms),
                gateway_max_ms: of(|p| p.gateway_max_ms),
                status_p50_ms: of(|p| p.status_p50_ms),
                status_p99_ms: of(|p| p.status_p99_ms),
                status_max_ms: of(|p| p.status_max_ms),
                requests: f(&rounds[0]).requests,
                scrapes: of(|p| p.scrapes as f64) as usize,
            }
        };
        let median_round = Round {
            scrape_p50_ms: m(|r| r.scrape_p50_ms),
            scrape_p99_ms: m(|r| r.scrape_p99_ms),
            scrape_max_ms: m(|r| r.scrape_max_ms),
            body_bytes: m(|r| r.body_bytes as f64) as usize,
            cpu_ms_per_scrape: m(|r| r.cpu_ms_per_scrape),
            idle: probes(|r| &r.idle),
            scraping: probes(|r| &r.scraping),
        };
        Self {
            command: format!(
                "cargo xtask {}",
                std::env::args().skip(1).collect::<Vec<_>>().join(" ")
            ),
            cpus: thread::available_parallelism().map_or(0, |n| n.get()),
            bans: args.bans,
            tenants: args.tenants,
            tenant_series,
            tenants_with_usage,
            series,
            median: median_round,
            rounds,
        }
    }

    fn markdown(&self) -> String {
        let m = &self.median;
        let (i, s) = (&m.idle, &m.scraping);
        let mut out = format!(
            "\n### One `/metrics` scrape: {} active bans, {} tenants\n\n\
             `{}`; {} CPUs; medians of {} rounds. The page: {} series ({} tenant quota series, {} with usage).\n\n",
            self.bans,
            self.tenants,
            self.command,
            self.cpus,
            self.rounds.len(),
            self.series,
            self.tenant_series,
            self.tenants_with_usage,
        );
        out += "| measure | value |\n|---|---:|\n";
        out += &format!("| scrape wall time, p50 | {:.0} ms |\n", m.scrape_p50_ms);
        out += &format!("| scrape wall time, p99 | {:.0} ms |\n", m.scrape_p99_ms);
        out += &format!(
            "| response size | {:.2} MB ({} bytes) |\n",
            m.body_bytes as f64 / 1e6,
            m.body_bytes
        );
        out += &format!(
            "| daemon CPU time per scrape | {:.0} ms |\n",
            m.cpu_ms_per_scrape
        );
        out += &format!(
            "| gateway request latency p50 / p99, idle | {:.2} / {:.2} ms |\n",
            i.gateway_p50_ms, i.gateway_p99_ms
        );
        out += &format!(
            "| gateway request latency p50 / p99, scraping back to back | {:.2} / {:.2} ms |\n",
            s.gateway_p50_ms, s.gateway_p99_ms
        );
        out += &format!(
            "| `aiguard status` latency p50 / p99, idle | {:.2} / {:.2} ms |\n",
            i.status_p50_ms, i.status_p99_ms
        );
        out += &format!(
            "| `aiguard status` latency p50 / p99, scraping back to back | {:.2} / {:.2} ms |\n",
            s.status_p50_ms, s.status_p99_ms
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_are_distinct_and_clear_of_the_veth() {
        let lines = ban_lines(70_000);
        let set: std::collections::HashSet<&str> = lines.lines().collect();
        assert_eq!(set.len(), 70_000);
        assert_eq!(lines.lines().next(), Some("20.0.0.0/24"));
        assert!(!lines.contains("\n10."));
    }

    #[test]
    fn config_has_gateway_tier_and_metrics() {
        let toml = config_toml(SocketAddr::from(([127, 0, 0, 1], 18000)));
        assert!(toml.contains("listen = [\"10.77.0.1:8080\"]"));
        assert!(toml.contains("[tiers.bench]\nmonthly_tokens = 1000000\n"));
        assert!(toml.contains("[metrics]\nenabled = true\nlisten = \"127.0.0.1:9464\"\n"));
    }
}
