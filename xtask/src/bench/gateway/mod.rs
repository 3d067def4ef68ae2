//! `cargo xtask bench gateway`: what aiguard's gateway costs per request, beside nginx doing the
//! equivalent job, how much latency it adds, and what one limiter decision costs in it.
//!
//! # Layout
//!
//! - [`limiter`]: the cost of one in-memory limiter decision (criterion, `benches/limiter.rs`),
//!   run before the HTTP parts, or alone with `--only limiter`;
//! - [`chat`]: the request and the upstream's answer, and the probe that checks a server answers;
//! - [`nginx`]: the upstream every leg ends at, and the `limit_req` proxy;
//! - [`aiguard`]: the daemon with its gateway and tier, and the keys the load uses;
//! - [`process`]: pinned server processes, stopped by PID, and their CPU time;
//! - [`wrk`]: closed-loop load for throughput and CPU per request at saturation;
//! - [`open_loop`]: fixed-rate load for latency as service time;
//! - [`report`]: medians, ratios, the targets; markdown and `target/bench/gateway.json`.
//!
//! The limiter part runs first, on the proxy CPU, before any server starts; see [`limiter`].
//!
//! Three legs, each carrying the same load (64 kept-alive connections, requests spread over the
//! same 1,000 keys) to the same upstream: (a) the upstream directly, (b) nginx proxying with
//! `limit_req` keyed on the Authorization header, (c) aiguard's gateway with a per-key limit in
//! the keys' tier. Both limits are set far above what the load offers per key, so every request
//! is checked and counted and none is refused: what is measured is the cost of the check. A
//! refused request (429) or any other error fails the run.
//!
//! The VM's speed drifts over minutes, so the legs are interleaved round by round (the order
//! rotating each round) and the report gives medians over rounds, and ratios of the same round.
//! Each round measures throughput (wrk at saturation), then latency at a fixed rate: half of
//! nginx's throughput in that round, so that latency is service time rather than queueing.
//!
//! Both proxies are pinned to one CPU (the last by default), alone; the load generators and the
//! upstream share the other (CPU 0). The proxy's CPU time per request is its processes' user +
//! system time over the window (`/proc/PID/stat`; nginx's master and worker) divided by the
//! requests completed in it.

mod aiguard;
mod chat;
mod limiter;
mod nginx;
mod open_loop;
pub(super) mod process;
mod report;
mod wrk;

use std::{
    collections::BTreeMap,
    fs,
    net::{SocketAddr, TcpListener},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Serialize;

use super::{cpu::CpuTimes, median};
use crate::{setup, workspace_root};

/// Each key's limit, in both proxies: 10,000 requests/s, some 200 times what the load offers a
/// key (at most a few tens per second: tens of thousands per second over 1,000 keys).
const PER_MINUTE: u64 = 600_000;
/// nginx's `burst`, so that two requests of one key in the same millisecond are never refused.
const NGINX_BURST: u64 = 1_000;
/// How long the pass-through proxy may take to answer after it starts.
const PASSTHROUGH_READY: Duration = Duration::from_secs(10);
/// wrk's warm-up before each measured run, in seconds.
const WRK_WARMUP_SECS: u64 = 1;
/// The fixed-rate load's warm-up, sent at the rate and not counted.
const OPEN_LOOP_WARMUP: Duration = Duration::from_secs(1);
/// nginx's throughput run when only latency is measured and no `--rate` is given.
const CALIBRATION_SECS: u64 = 2;
/// A generator lag p99 above this means the load CPU was too busy to keep to the schedule.
pub(super) const LAG_WARNING_US: f64 = 200.0;
/// A CPU this busy is saturated.
const SATURATED: f64 = 0.95;
/// A leg whose answers came at less than this share of the fixed rate did not keep up.
const KEPT_UP: f64 = 0.97;
/// Other processes taking more than this share of the proxy CPU get a note.
pub(super) const FOREIGN_WARNING: f64 = 0.05;
/// Set on the optimized re-run of the benchmark, so that it never re-runs itself again.
const OPTIMIZED_ENV: &str = "AIGUARD_BENCH_OPTIMIZED";

#[derive(clap::Args, Debug)]
pub struct GatewayBenchArgs {
    /// Run only these parts (comma-separated); all by default. `--only limiter` needs neither
    /// root nor nginx and takes well under a minute per round.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Part>,
    /// Legs to run (comma-separated); all three by default. Without aiguard the keys are made
    /// up (no root needed) and the targets are not evaluated.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub legs: Vec<Leg>,
    /// Rounds; each runs every leg once per part, in an order that rotates, and the limiter's
    /// criterion bench once. The figures are medians over rounds.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Measured seconds per leg and part (after a warm-up).
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// criterion's measurement time per limiter case and round, in seconds (after 0.5 s of
    /// warm-up); a second is millions of decisions.
    #[arg(long, default_value_t = 1.0)]
    pub limiter_seconds: f64,
    /// Connections of both load generators.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Keys the requests are spread over (one tenant each).
    #[arg(long, default_value_t = 1_000)]
    pub keys: usize,
    /// wrk threads.
    #[arg(long, default_value_t = 1)]
    pub wrk_threads: usize,
    /// Fixed rate of the latency part, requests/s; by default half of nginx's throughput in
    /// the same round.
    #[arg(long)]
    pub rate: Option<f64>,
    /// CPU for the proxies (nginx and aiguard, one at a time) and the limiter bench; the last
    /// CPU by default.
    #[arg(long)]
    pub proxy_cpu: Option<usize>,
    /// CPU for the load generators and the upstream; CPU 0 by default.
    #[arg(long)]
    pub load_cpu: Option<usize>,
    /// aiguard binary; by default the release daemon is built (as `cargo xtask run` builds it).
    #[arg(long)]
    pub daemon: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// wrk at saturation: requests/s and CPU per request.
    Throughput,
    /// Open loop at a fixed rate: p50/p99 latency.
    Latency,
    /// criterion: ns per in-memory limiter decision (and release), against 200 ns.
    Limiter,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Leg {
    /// The upstream directly.
    Direct,
    /// nginx with limit_req.
    Nginx,
    /// aiguard's gateway.
    Aiguard,
    /// aiguard's gateway with detection and priority queueing off (the same daemon, reloaded).
    AiguardPlain,
    /// aiguard's HTTP stack alone (the `passthrough` example): no checks, no accounting.
    Passthrough,
}

impl Leg {
    const ALL: [Self; 5] = [
        Self::Direct,
        Self::Nginx,
        Self::Aiguard,
        Self::AiguardPlain,
        Self::Passthrough,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Direct => "upstream directly",
            Self::Nginx => "nginx limit_req",
            Self::Aiguard => "aiguard gateway",
            Self::AiguardPlain => "aiguard, detection and queueing off",
            Self::Passthrough => "HTTP pass-through (no checks)",
        }
    }
}

impl GatewayBenchArgs {
    fn runs(&self, part: Part) -> bool {
        self.only.is_empty() || self.only.contains(&part)
    }

    /// Whether any part that sends HTTP load runs (and so needs the servers).
    fn runs_http(&self) -> bool {
        self.runs(Part::Throughput) || self.runs(Part::Latency)
    }

    fn legs(&self) -> Vec<Leg> {
        Leg::ALL
            .into_iter()
            .filter(|leg| self.legs.is_empty() || self.legs.contains(leg))
            .collect()
    }
}

/// Where things run.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Layout {
    /// nginx proxy and aiguard.
    pub proxy_cpu: usize,
    /// wrk, the fixed-rate generator and the upstream nginx.
    pub load_cpu: usize,
}

/// One leg's throughput run in one round.
#[derive(Clone, Debug, Serialize)]
pub struct ThroughputSample {
    pub round: usize,
    pub leg: Leg,
    pub requests: u64,
    pub seconds: f64,
    pub requests_per_sec: f64,
    /// The proxy's CPU time per request; none for the direct leg.
    pub proxy_cpu_us_per_request: Option<f64>,
    pub upstream_cpu_us_per_request: f64,
    /// Busy share of the proxy CPU and of the load CPU over the window.
    pub proxy_cpu_busy: f64,
    pub load_cpu_busy: f64,
    /// Share of the proxy CPU's window spent on anything but the proxy (other processes on a
    /// shared machine): above a few percent, the round's throughput is not the proxy's own.
    pub proxy_cpu_foreign: f64,
    pub wrk: wrk::Summary,
}

/// One leg's fixed-rate run in one round.
#[derive(Clone, Debug, Serialize)]
pub struct LatencySample {
    pub round: usize,
    pub leg: Leg,
    pub rate: f64,
    /// Requests over the time from the first due time to the last answer: below the rate when
    /// the leg did not keep up (and latency is then queueing).
    pub achieved_rate: f64,
    /// Requests counted (the warm-up's are not).
    pub requests: usize,
    pub latency: open_loop::Percentiles,
    /// The generator's own lateness, not counted in the latency.
    pub lag: open_loop::Percentiles,
    /// Over the whole run, warm-up included.
    pub proxy_cpu_us_per_request: Option<f64>,
    pub proxy_cpu_busy: f64,
    pub load_cpu_busy: f64,
    pub proxy_cpu_foreign: f64,
    /// The generator's own CPU time per request (it shares the load CPU with the upstream).
    pub generator_cpu_us_per_request: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Samples {
    pub throughput: Vec<ThroughputSample>,
    pub latency: Vec<LatencySample>,
}

pub fn run(args: GatewayBenchArgs) -> Result<()> {
    validate(&args)?;
    let http = args.runs_http();
    // The optimized re-run is for the HTTP parts' load generator; the limiter's criterion bench
    // is its own optimized process either way.
    if http && cfg!(debug_assertions) && std::env::var_os(OPTIMIZED_ENV).is_none() {
        return run_optimized();
    }
    let legs = args.legs();
    let with_aiguard = http && (legs.contains(&Leg::Aiguard) || legs.contains(&Leg::AiguardPlain));
    if with_aiguard {
        setup::require_root("the aiguard leg of `cargo xtask bench gateway` (it loads XDP)")?;
        // Installs nginx and wrk, and what building the daemon needs, when missing.
        setup::run()?;
    }
    let tools: &[&str] = if http {
        &["nginx", "wrk", "taskset"]
    } else {
        &["taskset"]
    };
    for tool in tools {
        ensure!(
            which(tool),
            "`{tool}` is not installed: run `cargo xtask setup`"
        );
    }
    let cpus = super::online_cpus()?;
    ensure!(
        cpus >= 2 || !http,
        "the gateway benchmark needs 2 CPUs, this machine has {cpus}"
    );
    let layout = Layout {
        proxy_cpu: args.proxy_cpu.unwrap_or(cpus - 1),
        load_cpu: args.load_cpu.unwrap_or(0),
    };
    ensure!(
        layout.proxy_cpu < cpus && layout.load_cpu < cpus,
        "CPUs are 0..{}",
        cpus - 1
    );
    ensure!(
        layout.proxy_cpu != layout.load_cpu || !http,
        "--proxy-cpu and --load-cpu must differ"
    );
    // Built before any server starts: a first build takes minutes.
    let daemon = if with_aiguard {
        Some(match &args.daemon {
            Some(path) if path.is_file() => path.clone(),
            Some(path) => bail!("--daemon {}: no such file", path.display()),
            None => crate::run::build_daemon().context("building the daemon")?,
        })
    } else {
        None
    };
    let passthrough = if http && legs.contains(&Leg::Passthrough) {
        Some(crate::run::build_example("passthrough").context("building the pass-through proxy")?)
    } else {
        None
    };
    let command = super::command_line();

    // First, while nothing else runs: the decision's cost is nanoseconds, and any server on the
    // machine would be in it.
    let limiter = if args.runs(Part::Limiter) {
        let plan = limiter::Plan {
            cpu: layout.proxy_cpu,
            rounds: args.rounds,
            measurement_secs: args.limiter_seconds,
        };
        Some(limiter::run(&plan).context("the limiter part")?)
    } else {
        None
    };
    let (samples, notes) = if http {
        let binaries = Binaries {
            daemon: daemon.as_deref(),
            passthrough: passthrough.as_deref(),
        };
        http_parts(&args, &legs, layout, binaries)?
    } else {
        (Samples::default(), Vec::new())
    };

    let report = report::Report::new(command, cpus, layout, &args, samples, notes, limiter)?;
    print!("{}", report.markdown());
    let json = workspace_root().join("target/bench/gateway.json");
    report.write_json(&json)?;
    eprintln!("bench gateway: results written to {}", json.display());
    Ok(())
}

/// The proxies built for the run (none when their leg does not run).
#[derive(Clone, Copy)]
struct Binaries<'a> {
    daemon: Option<&'a Path>,
    passthrough: Option<&'a Path>,
}

/// The throughput and latency parts: the servers started, the rounds run, the servers stopped.
fn http_parts(
    args: &GatewayBenchArgs,
    legs: &[Leg],
    layout: Layout,
    binaries: Binaries<'_>,
) -> Result<(Samples, Vec<String>)> {
    let runs_dir = workspace_root().join("target/bench/gateway");
    for dir in super::leftovers(&runs_dir)? {
        eprintln!(
            "bench gateway: removing {} left by an earlier run",
            dir.display()
        );
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    if binaries.daemon.is_some() {
        super::object::remove_stale_pin_dirs()?;
    }
    let work = WorkDir::create(&runs_dir.join(super::unique_name()))?;

    let servers = Servers::start(args, legs, layout, binaries, work)?;
    let script = servers.work.path().join("keys.lua");
    fs::write(&script, wrk::script(&servers.keys)?)
        .with_context(|| format!("writing {}", script.display()))?;
    let mut bench = Bench {
        args,
        legs: legs.to_vec(),
        layout,
        servers,
        script,
    };
    let mut notes = Vec::new();
    let samples = bench.rounds(&mut notes)?;
    // Stopped before the report: a server that fails on SIGTERM fails the run.
    bench.servers.stop()?;
    Ok((samples, notes))
}

/// Becomes the same command in an optimized build of xtask (`cargo xtask` builds it
/// unoptimized): the fixed-rate generator shares the load CPU with the upstream, and
/// unoptimized tokio costs several times the CPU per request and keeps to the schedule
/// less well.
fn run_optimized() -> Result<()> {
    let mut cmd = crate::cargo();
    cmd.args(["run", "--quiet", "--release", "--package", "xtask", "--"])
        .args(std::env::args_os().skip(1))
        .env(OPTIMIZED_ENV, "1");
    eprintln!("+ {}", crate::shown(&cmd));
    let error = cmd.exec();
    Err(error).context("could not execute cargo")
}

fn validate(args: &GatewayBenchArgs) -> Result<()> {
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    ensure!(
        (1..=60).contains(&args.seconds),
        "--seconds must be in 1..=60"
    );
    ensure!(
        (0.1..=60.0).contains(&args.limiter_seconds),
        "--limiter-seconds must be in 0.1..=60"
    );
    ensure!(
        (1..=1_000).contains(&args.connections),
        "--connections must be in 1..=1000"
    );
    ensure!(
        (1..=100_000).contains(&args.keys),
        "--keys must be in 1..=100000"
    );
    ensure!(
        (1..=args.connections).contains(&args.wrk_threads),
        "--wrk-threads must be in 1..=--connections"
    );
    if let Some(rate) = args.rate {
        ensure!(
            rate.is_finite() && (1.0..=1e6).contains(&rate),
            "--rate must be in 1..=1000000"
        );
    }
    let legs = args.legs();
    ensure!(!legs.is_empty(), "no legs to run");
    if args.runs(Part::Latency) && args.rate.is_none() {
        ensure!(
            legs.contains(&Leg::Nginx),
            "the latency part's rate is half of nginx's throughput: run the nginx leg or give --rate"
        );
    }
    Ok(())
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// The run's directory (configurations, logs, pid files, the daemon's state), removed on drop.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create(path: &Path) -> Result<Self> {
        fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path.to_owned()))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(error) = fs::remove_dir_all(&self.0) {
            eprintln!("warning: removing {}: {error}", self.0.display());
        }
    }
}

/// Every server of the run. Fields drop in order: the servers stop before their directory goes.
struct Servers {
    gateway: Option<aiguard::Gateway>,
    passthrough: Option<(process::Pinned, SocketAddr)>,
    proxy: Option<nginx::Nginx>,
    upstream: nginx::Nginx,
    keys: Arc<[String]>,
    work: WorkDir,
}

impl Servers {
    fn start(
        args: &GatewayBenchArgs,
        legs: &[Leg],
        layout: Layout,
        binaries: Binaries<'_>,
        work: WorkDir,
    ) -> Result<Self> {
        let dir = work.path().to_owned();
        let made_up = made_up_keys(args.keys);
        let upstream_addr = free_port()?;
        let upstream = nginx::Nginx::start(
            "upstream",
            &dir,
            &nginx::upstream_conf(&dir, "upstream", upstream_addr),
            layout.load_cpu,
            upstream_addr,
            &made_up[0],
        )?;
        let mut servers = Self {
            gateway: None,
            passthrough: None,
            proxy: None,
            upstream,
            keys: made_up.into(),
            work,
        };
        if let Some(binary) = binaries.passthrough {
            let addr = free_port()?;
            let (listen, upstream) = (addr.to_string(), upstream_addr.to_string());
            let args: [&std::ffi::OsStr; 4] = [
                "--listen".as_ref(),
                listen.as_ref(),
                "--upstream".as_ref(),
                upstream.as_ref(),
            ];
            let process = process::Pinned::spawn(
                "passthrough",
                layout.proxy_cpu,
                binary,
                &args,
                &dir.join("passthrough.log"),
            )?;
            chat::wait_until_serving(addr, &servers.keys[0], PASSTHROUGH_READY)?;
            servers.passthrough = Some((process, addr));
        }
        if let Some(binary) = binaries.daemon {
            let addr = free_port()?;
            let mut gateway = aiguard::Gateway::start(
                binary,
                &dir,
                layout.proxy_cpu,
                addr,
                upstream_addr,
                PER_MINUTE,
            )?;
            servers.keys = gateway.add_keys(args.keys)?.into();
            servers.gateway = Some(gateway);
        }
        if legs.contains(&Leg::Nginx) {
            let addr = free_port()?;
            let conf = nginx::proxy_conf(
                &dir,
                "nginx-proxy",
                addr,
                upstream_addr,
                PER_MINUTE,
                NGINX_BURST,
            );
            servers.proxy = Some(nginx::Nginx::start(
                "nginx-proxy",
                &dir,
                &conf,
                layout.proxy_cpu,
                addr,
                &servers.keys[0],
            )?);
        }
        Ok(servers)
    }

    /// Where `leg`'s load goes, and the PID of its proxy (none for the direct leg).
    fn target(&self, leg: Leg) -> Result<(SocketAddr, Option<u32>)> {
        Ok(match leg {
            Leg::Direct => (self.upstream.addr, None),
            Leg::Nginx => {
                let proxy = self.proxy.as_ref().context("no nginx proxy")?;
                (proxy.addr, Some(proxy.process.pid()))
            }
            Leg::Aiguard | Leg::AiguardPlain => {
                let gateway = self.gateway.as_ref().context("no aiguard gateway")?;
                (gateway.addr, Some(gateway.pid()))
            }
            Leg::Passthrough => {
                let (process, addr) = self.passthrough.as_ref().context("no pass-through proxy")?;
                (*addr, Some(process.pid()))
            }
        })
    }

    /// Readies `leg`'s server: the aiguard legs reload the daemon with detection and queueing
    /// on or off.
    fn prepare(&mut self, leg: Leg) -> Result<()> {
        let protection = match leg {
            Leg::Aiguard => aiguard::Protection::On,
            Leg::AiguardPlain => aiguard::Protection::Off,
            _ => return Ok(()),
        };
        self.gateway
            .as_mut()
            .context("no aiguard gateway")?
            .set_protection(protection)
    }

    /// An error if any server has exited.
    fn ensure_running(&mut self) -> Result<()> {
        self.upstream.process.ensure_running()?;
        if let Some(proxy) = &mut self.proxy {
            proxy.process.ensure_running()?;
        }
        if let Some(gateway) = &mut self.gateway {
            gateway.ensure_running()?;
        }
        if let Some((process, _)) = &mut self.passthrough {
            process.ensure_running()?;
        }
        Ok(())
    }

    /// Stops every server by PID, then removes the work directory; the first error wins.
    fn stop(self) -> Result<()> {
        let Self {
            gateway,
            passthrough,
            proxy,
            upstream,
            work,
            ..
        } = self;
        let mut result = Ok(());
        if let Some(gateway) = gateway {
            result = result.and(gateway.stop());
        }
        if let Some((process, _)) = passthrough {
            result = result.and(process.stop());
        }
        if let Some(proxy) = proxy {
            result = result.and(proxy.process.stop());
        }
        result = result.and(upstream.process.stop());
        drop(work);
        result
    }
}

/// Keys for runs without aiguard: the shape of aiguard's (`aig_` and 32 hex digits), so the
/// requests are the same size.
fn made_up_keys(count: usize) -> Vec<String> {
    (0..count)
        .map(|n| {
            format!(
                "aig_{:032x}",
                (n as u128 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
            )
        })
        .collect()
}

/// A loopback address with a port nobody listens on (the kernel picks it; the server binds it
/// a moment later).
fn free_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    listener.local_addr().context("finding a free port")
}

/// The run in progress.
struct Bench<'a> {
    args: &'a GatewayBenchArgs,
    legs: Vec<Leg>,
    layout: Layout,
    servers: Servers,
    script: PathBuf,
}

impl Bench<'_> {
    fn rounds(&mut self, notes: &mut Vec<String>) -> Result<Samples> {
        let rounds = self.args.rounds;
        let mut samples = Samples::default();
        for round in 1..=rounds {
            let mut order = self.legs.clone();
            let turn = (round - 1) % order.len();
            order.rotate_left(turn);
            let mut nginx_max = None;
            if self.args.runs(Part::Throughput) {
                for &leg in &order {
                    eprintln!(
                        "bench gateway: round {round}/{rounds}: throughput, {}",
                        leg.label()
                    );
                    let sample = self
                        .throughput_once(leg, round)
                        .with_context(|| format!("round {round}, throughput: {}", leg.label()))?;
                    eprintln!(
                        "bench gateway:   {:.0} requests/s, proxy CPU {} us/request, CPUs busy: proxy {:.0}%, load {:.0}%",
                        sample.requests_per_sec,
                        sample
                            .proxy_cpu_us_per_request
                            .map_or_else(|| "-".to_owned(), |us| format!("{us:.1}")),
                        sample.proxy_cpu_busy * 100.0,
                        sample.load_cpu_busy * 100.0
                    );
                    if leg != Leg::Direct
                        && sample.load_cpu_busy > SATURATED
                        && sample.proxy_cpu_busy < SATURATED
                    {
                        notes.push(format!(
                            "round {round}, {}: the load CPU was saturated ({:.0}%), the proxy's \
                             was not ({:.0}%): this throughput is the load side's limit",
                            leg.label(),
                            sample.load_cpu_busy * 100.0,
                            sample.proxy_cpu_busy * 100.0
                        ));
                    }
                    warn_foreign_work(round, leg, "throughput", sample.proxy_cpu_foreign);
                    if leg == Leg::Nginx {
                        nginx_max = Some(sample.requests_per_sec);
                    }
                    samples.throughput.push(sample);
                }
            }
            if self.args.runs(Part::Latency) {
                let rate = match (self.args.rate, nginx_max) {
                    (Some(rate), _) => rate,
                    (None, Some(max)) => max / 2.0,
                    (None, None) => self.calibrate().context("measuring nginx's throughput")? / 2.0,
                };
                for &leg in &order {
                    eprintln!(
                        "bench gateway: round {round}/{rounds}: latency at {rate:.0} requests/s, {}",
                        leg.label()
                    );
                    let sample = self
                        .latency_once(leg, round, rate)
                        .with_context(|| format!("round {round}, latency: {}", leg.label()))?;
                    eprintln!(
                        "bench gateway:   p50 {:.0} us, p99 {:.0} us (generator: lag p99 {:.0} us, \
                         CPU {:.1} us/request)",
                        sample.latency.p50_us,
                        sample.latency.p99_us,
                        sample.lag.p99_us,
                        sample.generator_cpu_us_per_request
                    );
                    warn_foreign_work(round, leg, "latency", sample.proxy_cpu_foreign);
                    if sample.achieved_rate < KEPT_UP * rate {
                        let note = format!(
                            "round {round}, {}: answered {:.0} requests/s of the {rate:.0} sent: \
                             it did not keep up, and its latency is queueing",
                            leg.label(),
                            sample.achieved_rate
                        );
                        eprintln!("bench gateway: warning: {note}");
                        notes.push(note);
                    }
                    samples.latency.push(sample);
                }
            }
        }
        Ok(samples)
    }

    fn wrk(&self) -> wrk::Load<'_> {
        wrk::Load {
            cpu: self.layout.load_cpu,
            threads: self.args.wrk_threads,
            connections: self.args.connections,
            script: &self.script,
        }
    }

    /// wrk at saturation after a warm-up; CPU time of the proxy and the upstream over the
    /// measured run.
    fn throughput_once(&mut self, leg: Leg, round: usize) -> Result<ThroughputSample> {
        self.servers.prepare(leg)?;
        let (addr, proxy) = self.servers.target(leg)?;
        let warmup = self.wrk().run(addr, WRK_WARMUP_SECS)?;
        refuse_errors(&warmup).context("warm-up")?;
        let before = Snapshot::take(self, proxy)?;
        let summary = self.wrk().run(addr, self.args.seconds)?;
        let after = Snapshot::take(self, proxy)?;
        self.servers.ensure_running()?;
        refuse_errors(&summary)?;
        ensure!(summary.requests > 0, "wrk completed no request");
        let window = after.since(&before)?;
        let per_request = |secs: f64| secs * 1e6 / summary.requests as f64;
        Ok(ThroughputSample {
            round,
            leg,
            requests: summary.requests,
            seconds: summary.duration_us as f64 / 1e6,
            requests_per_sec: summary.requests_per_sec(),
            proxy_cpu_us_per_request: window.proxy_secs.map(per_request),
            upstream_cpu_us_per_request: per_request(window.upstream_secs),
            proxy_cpu_busy: window.proxy_cpu_busy,
            load_cpu_busy: window.load_cpu_busy,
            proxy_cpu_foreign: window.proxy_cpu_foreign,
            wrk: summary,
        })
    }

    /// The fixed-rate load (its warm-up included); the proxy's CPU time over all of it.
    fn latency_once(&mut self, leg: Leg, round: usize, rate: f64) -> Result<LatencySample> {
        self.servers.prepare(leg)?;
        let (addr, proxy) = self.servers.target(leg)?;
        let plan = open_loop::Plan {
            addr,
            rate,
            connections: self.args.connections,
            warmup: OPEN_LOOP_WARMUP,
            window: Duration::from_secs(self.args.seconds),
            cpu: self.layout.load_cpu,
            keys: self.servers.keys.clone(),
        };
        let before = Snapshot::take(self, proxy)?;
        let mut outcome = open_loop::run(&plan)?;
        let after = Snapshot::take(self, proxy)?;
        self.servers.ensure_running()?;
        if outcome.rate_limited > 0 || outcome.other_status > 0 {
            bail!(
                "{} requests refused with 429 and {} answered another error, of {}: a limiter \
                 that refuses makes the comparison meaningless",
                outcome.rate_limited,
                outcome.other_status,
                outcome.sent
            );
        }
        let window = after.since(&before)?;
        let requests = outcome.latencies_ns.len();
        Ok(LatencySample {
            round,
            leg,
            rate,
            achieved_rate: outcome.achieved_rate,
            requests,
            latency: open_loop::Percentiles::of(&mut outcome.latencies_ns)
                .context("no request counted")?,
            lag: open_loop::Percentiles::of(&mut outcome.lags_ns).context("no request counted")?,
            proxy_cpu_us_per_request: window
                .proxy_secs
                .map(|secs| secs * 1e6 / outcome.sent as f64),
            proxy_cpu_busy: window.proxy_cpu_busy,
            load_cpu_busy: window.load_cpu_busy,
            proxy_cpu_foreign: window.proxy_cpu_foreign,
            generator_cpu_us_per_request: outcome.generator_cpu_secs * 1e6 / outcome.sent as f64,
        })
    }

    /// nginx's throughput, for the fixed rate when the throughput part does not run.
    fn calibrate(&mut self) -> Result<f64> {
        let (addr, _) = self.servers.target(Leg::Nginx)?;
        refuse_errors(&self.wrk().run(addr, WRK_WARMUP_SECS)?)?;
        let summary = self.wrk().run(addr, CALIBRATION_SECS)?;
        refuse_errors(&summary)?;
        eprintln!(
            "bench gateway: nginx's throughput: {:.0} requests/s",
            summary.requests_per_sec()
        );
        Ok(summary.requests_per_sec())
    }
}

/// A warning when something other than the proxy took a noticeable share of the proxy CPU
/// while a proxy was measured (the report sums these up).
fn warn_foreign_work(round: usize, leg: Leg, part: &str, share: f64) {
    if leg != Leg::Direct && share > FOREIGN_WARNING {
        eprintln!(
            "bench gateway: warning: round {round}, {part}, {}: other processes took {:.0}% of \
             the proxy CPU",
            leg.label(),
            share * 100.0
        );
    }
}

/// Fails on any error or non-2xx answer: a limiter that refused makes the comparison
/// meaningless, and errors mean something else is being measured.
fn refuse_errors(summary: &wrk::Summary) -> Result<()> {
    if summary.errors() > 0 {
        bail!(
            "{} of {} answers were not 2xx/3xx (429s if a limiter refused), plus errors: \
             {} connect, {} read, {} write, {} timeouts",
            summary.status_errors,
            summary.requests,
            summary.connect_errors,
            summary.read_errors,
            summary.write_errors,
            summary.timeouts
        );
    }
    Ok(())
}

/// CPU counters at one edge of a window.
struct Snapshot {
    proxy: Option<process::TreeCpu>,
    upstream: process::TreeCpu,
    proxy_cpu: CpuTimes,
    load_cpu: CpuTimes,
}

/// What a window cost.
struct Window {
    proxy_secs: Option<f64>,
    upstream_secs: f64,
    proxy_cpu_busy: f64,
    load_cpu_busy: f64,
    proxy_cpu_foreign: f64,
}

impl Snapshot {
    fn take(bench: &Bench<'_>, proxy: Option<u32>) -> Result<Self> {
        Ok(Self {
            proxy: proxy.map(process::TreeCpu::read).transpose()?,
            upstream: process::TreeCpu::read(bench.servers.upstream.process.pid())?,
            proxy_cpu: CpuTimes::read(bench.layout.proxy_cpu)?,
            load_cpu: CpuTimes::read(bench.layout.load_cpu)?,
        })
    }

    fn since(&self, earlier: &Self) -> Result<Window> {
        let share = |secs: f64, of: &CpuTimes| {
            if of.total_secs() > 0.0 {
                (secs / of.total_secs()).clamp(0.0, 1.0)
            } else {
                0.0
            }
        };
        let proxy_secs = match (&self.proxy, &earlier.proxy) {
            (Some(now), Some(then)) => Some(now.secs_since(then).context("the proxy")?),
            _ => None,
        };
        let proxy_cpu = self.proxy_cpu.since(&earlier.proxy_cpu);
        let load_cpu = self.load_cpu.since(&earlier.load_cpu);
        Ok(Window {
            proxy_secs,
            upstream_secs: self
                .upstream
                .secs_since(&earlier.upstream)
                .context("the upstream")?,
            proxy_cpu_busy: share(proxy_cpu.busy_secs(), &proxy_cpu),
            load_cpu_busy: share(load_cpu.busy_secs(), &load_cpu),
            proxy_cpu_foreign: share(
                proxy_cpu.busy_secs() - proxy_secs.unwrap_or(0.0),
                &proxy_cpu,
            ),
        })
    }
}

/// Medians of `value` over `samples`, by leg.
fn medians_by_leg<S>(
    samples: &[S],
    leg: impl Fn(&S) -> Leg,
    value: impl Fn(&S) -> f64,
) -> BTreeMap<Leg, f64> {
    let mut by_leg: BTreeMap<Leg, Vec<f64>> = BTreeMap::new();
    for sample in samples {
        by_leg.entry(leg(sample)).or_default().push(value(sample));
    }
    by_leg
        .into_iter()
        .map(|(leg, values)| (leg, median(&values)))
        .collect()
}

/// Per round, `combine(value of a, value of b)` where both legs ran; the median over rounds.
/// Rounds pair the legs in time, so the VM's drift cancels out of the ratio or difference.
fn paired_median<S>(
    samples: &[S],
    round: impl Fn(&S) -> usize,
    leg: impl Fn(&S) -> Leg,
    value: impl Fn(&S) -> Option<f64>,
    (a, b): (Leg, Leg),
    combine: impl Fn(f64, f64) -> f64,
) -> Option<f64> {
    let find = |wanted: Leg, r: usize| {
        samples
            .iter()
            .find(|s| leg(s) == wanted && round(s) == r)
            .and_then(&value)
    };
    let values: Vec<f64> = samples
        .iter()
        .filter(|s| leg(s) == a)
        .filter_map(|s| Some(combine(find(a, round(s))?, find(b, round(s))?)))
        .collect();
    (!values.is_empty()).then(|| median(&values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_up_keys_are_distinct_and_shaped_like_aiguards() {
        let keys = made_up_keys(1_000);
        let distinct: std::collections::BTreeSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), 1_000);
        assert!(keys.iter().all(|k| k.len() == 36 && k.starts_with("aig_")));
    }

    #[test]
    fn pairs_legs_by_round() {
        // (round, leg, value)
        let samples = [
            (1, Leg::Nginx, 10.0),
            (1, Leg::Aiguard, 8.0),
            (2, Leg::Aiguard, 9.0),
            (2, Leg::Nginx, 10.0),
            (3, Leg::Aiguard, 100.0),
        ];
        let ratio = paired_median(
            &samples,
            |s| s.0,
            |s| s.1,
            |s| Some(s.2),
            (Leg::Aiguard, Leg::Nginx),
            |a, b| a / b,
        );
        // Rounds 1 and 2 (0.8 and 0.9); round 3 has no nginx.
        assert!((ratio.unwrap() - 0.85).abs() < 1e-12);
        let none = paired_median(
            &samples,
            |s| s.0,
            |s| s.1,
            |s| Some(s.2),
            (Leg::Aiguard, Leg::Direct),
            |a, b| a - b,
        );
        assert_eq!(none, None);
        let medians = medians_by_leg(&samples, |s| s.1, |s| s.2);
        assert_eq!(medians[&Leg::Aiguard], 9.0);
        assert_eq!(medians[&Leg::Nginx], 10.0);
    }
}
