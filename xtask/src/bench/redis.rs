//! `cargo xtask bench redis`: how many decisions per second one node gets from one Redis, and
//! what a decision adds to a request's latency, beside the in-memory store in the same run.
//!
//! Each mode is a run of the `shared_decisions` example (aiguard-daemon's own code: the
//! admission and settlement scripts the gateway runs), interleaved round by round with the
//! order rotating, medians over rounds:
//! - `memory`: the embedded store's in-memory limiter;
//! - `sequential`: Redis without pipelining, one request (admit, settle) at a time;
//! - `pipelined`: `--concurrency` requests at a time over the one multiplexed connection;
//! - `rate-N`: requests due at a fixed N per second (open loop, paced to the microsecond), so
//!   latency is what a decision adds when the node is offered that load. 20,000/s, the target,
//!   by default: the latency target is judged there.
//!
//! Every mode measures the same things: decisions/s (requests admitted, their settlements
//! handed over as the gateway does; failures counted apart and shown), the admission's latency
//! (what a request waits for before it is forwarded; at a fixed rate from the instant it was
//! sent, the generator's lateness apart), the share of settlements that rode with the next
//! admission of their tenant and key instead of a call of their own, and CPU time per request
//! of the node and of redis-server. Each run ends by checking that Redis's month counters hold
//! exactly the tokens its requests used.
//!
//! redis-server runs pinned to one CPU, the node to the other; both on loopback, so the
//! figures are Redis's and the node's costs without a network's round trip (add the
//! network's RTT for a remote Redis).
use std::{
    ffi::OsStr,
    fmt::Write as _,
    fs,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use super::{
    cpu::CpuTimes,
    gateway::process::{Pinned, TreeCpu},
    median,
};
use crate::{run_checked, workspace_root};

#[derive(clap::Args, Debug)]
pub struct RedisBenchArgs {
    /// Rounds; each runs every mode once, in an order that rotates.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Measured seconds per mode and round.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Seconds before each measurement (connecting, loading the scripts), not counted.
    #[arg(long, default_value_t = 0.5)]
    pub warmup: f64,
    /// Requests in flight in the pipelined mode.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Requests per second of the fixed-rate modes (comma-separated), one mode each. The
    /// latency target is judged at 20000/s; add a lower rate to see latency off the target.
    #[arg(long, value_delimiter = ',', default_values_t = [TARGET_DECISIONS_PER_S])]
    pub rates: Vec<f64>,
    /// Tenants (each with one key) the requests are spread over.
    #[arg(long, default_value_t = 1_000)]
    pub tenants: usize,
    /// CPU for redis-server; 0 by default.
    #[arg(long, default_value_t = 0)]
    pub redis_cpu: usize,
    /// CPU for the node; the last by default.
    #[arg(long)]
    pub node_cpu: Option<usize>,
}

/// The targets.
const TARGET_DECISIONS_PER_S: f64 = 20_000.0;
const TARGET_P99_US: f64 = 2_000.0;
/// A fixed-rate run kept its schedule when it decided at least this share of the requested
/// rate and sent 99% of its requests at most `LAG_LIMIT_US` late.
const KEPT_UP_SHARE: f64 = 0.97;
const LAG_LIMIT_US: f64 = 1_000.0;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Memory,
    Sequential,
    Pipelined,
    Rate(f64),
}

impl Mode {
    /// Its name in the JSON and on the progress lines.
    fn name(self) -> String {
        match self {
            Mode::Memory => "memory".into(),
            Mode::Sequential => "sequential".into(),
            Mode::Pipelined => "pipelined".into(),
            Mode::Rate(rate) => format!("rate-{rate}"),
        }
    }

    fn label(self, concurrency: usize) -> String {
        match self {
            Mode::Memory => "in memory (embedded store)".into(),
            Mode::Sequential => "Redis, no pipelining (1 in flight)".into(),
            Mode::Pipelined => format!("Redis, pipelined ({concurrency} in flight)"),
            Mode::Rate(rate) => format!("Redis at a fixed {}/s (open loop)", thousands(rate)),
        }
    }

    /// `--mode` of the example.
    fn example_mode(self) -> &'static str {
        match self {
            Mode::Memory => "memory",
            Mode::Sequential => "sequential",
            Mode::Pipelined => "pipelined",
            Mode::Rate(_) => "rate",
        }
    }
}

/// Percentiles of one run, in microseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Percentiles {
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

/// One run of the example, as it reports it, and what this adds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Sample {
    #[serde(default)]
    round: usize,
    mode: String,
    rate: Option<f64>,
    seconds: f64,
    requests: u64,
    decisions: u64,
    decisions_per_s: f64,
    admit_errors: u64,
    refused: u64,
    settle_errors: u64,
    unfinished: u64,
    first_error: Option<String>,
    admit: Option<Percentiles>,
    /// Of the run's settlements, the share that rode with an admission.
    #[serde(default)]
    carried: Option<f64>,
    lag: Option<Percentiles>,
    achieved_rate: Option<f64>,
    node_cpu_us_per_request: f64,
    requests_total: u64,
    /// redis-server's CPU time over the whole run (warm-up included) per request sent.
    #[serde(default)]
    redis_cpu_us_per_request: Option<f64>,
    /// Fixed rate: whether the schedule held (see `KEPT_UP_SHARE`, `LAG_LIMIT_US`).
    #[serde(default)]
    kept_up: Option<bool>,
    /// Share of the node's CPU that other processes took during the run.
    #[serde(default)]
    node_cpu_foreign: f64,
    /// Share of redis-server's CPU that other processes took during the run.
    #[serde(default)]
    redis_cpu_foreign: f64,
}

impl Sample {
    fn errors(&self) -> u64 {
        self.admit_errors + self.refused + self.settle_errors + self.unfinished
    }
}

/// A mode's medians over rounds.
#[derive(Debug, Serialize)]
struct ModeFigures {
    mode: String,
    label: String,
    rate: Option<f64>,
    decisions_per_s: f64,
    decisions_per_s_min: f64,
    decisions_per_s_max: f64,
    admit_p50_us: Option<f64>,
    admit_p99_us: Option<f64>,
    admit_p99_us_max: Option<f64>,
    carried: Option<f64>,
    node_cpu_us_per_request: f64,
    redis_cpu_us_per_request: Option<f64>,
    achieved_rate: Option<f64>,
    lag_p99_us: Option<f64>,
    /// Fixed rate: rounds whose schedule held, of all.
    rounds_kept_up: Option<usize>,
    node_cpu_foreign: f64,
    /// `None` in memory, where Redis takes no part.
    redis_cpu_foreign: Option<f64>,
    /// Summed over rounds.
    admit_errors: u64,
    refused: u64,
    settle_errors: u64,
    unfinished: u64,
    first_error: Option<String>,
    samples: Vec<Sample>,
}

impl ModeFigures {
    fn of(mode: Mode, concurrency: usize, samples: Vec<Sample>) -> Self {
        let pick = |f: &dyn Fn(&Sample) -> Option<f64>| {
            let values: Vec<f64> = samples.iter().filter_map(f).collect();
            (!values.is_empty()).then(|| median(&values))
        };
        let rates: Vec<f64> = samples.iter().map(|s| s.decisions_per_s).collect();
        let sum = |f: fn(&Sample) -> u64| samples.iter().map(f).sum();
        Self {
            mode: mode.name(),
            label: mode.label(concurrency),
            rate: match mode {
                Mode::Rate(rate) => Some(rate),
                _ => None,
            },
            decisions_per_s: median(&rates),
            decisions_per_s_min: rates.iter().copied().fold(f64::INFINITY, f64::min),
            decisions_per_s_max: rates.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            admit_p50_us: pick(&|s| s.admit.as_ref().map(|p| p.p50_us)),
            admit_p99_us: pick(&|s| s.admit.as_ref().map(|p| p.p99_us)),
            admit_p99_us_max: samples
                .iter()
                .filter_map(|s| s.admit.as_ref().map(|p| p.p99_us))
                .reduce(f64::max),
            carried: pick(&|s| s.carried),
            node_cpu_us_per_request: median(
                &samples
                    .iter()
                    .map(|s| s.node_cpu_us_per_request)
                    .collect::<Vec<_>>(),
            ),
            redis_cpu_us_per_request: pick(&|s| s.redis_cpu_us_per_request),
            achieved_rate: pick(&|s| s.achieved_rate),
            lag_p99_us: pick(&|s| s.lag.as_ref().map(|p| p.p99_us)),
            rounds_kept_up: matches!(mode, Mode::Rate(_))
                .then(|| samples.iter().filter(|s| s.kept_up == Some(true)).count()),
            node_cpu_foreign: median(
                &samples
                    .iter()
                    .map(|s| s.node_cpu_foreign)
                    .collect::<Vec<_>>(),
            ),
            redis_cpu_foreign: (mode != Mode::Memory).then(|| {
                median(
                    &samples
                        .iter()
                        .map(|s| s.redis_cpu_foreign)
                        .collect::<Vec<_>>(),
                )
            }),
            admit_errors: sum(|s| s.admit_errors),
            refused: sum(|s| s.refused),
            settle_errors: sum(|s| s.settle_errors),
            unfinished: sum(|s| s.unfinished),
            first_error: samples.iter().find_map(|s| s.first_error.clone()),
            samples,
        }
    }

    fn errors(&self) -> u64 {
        self.admit_errors + self.refused + self.settle_errors + self.unfinished
    }

    /// "0", or the count and what failed.
    fn errors_cell(&self) -> String {
        if self.errors() == 0 {
            return "0".into();
        }
        let parts: Vec<String> = [
            (self.admit_errors, "admission"),
            (self.refused, "refused"),
            (self.settle_errors, "settlement"),
            (self.unfinished, "unanswered"),
        ]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{} {what}", thousands(n as f64)))
        .collect();
        format!(
            "**{}** ({})",
            thousands(self.errors() as f64),
            parts.join(", ")
        )
    }
}

/// Whether a target was met.
#[derive(Debug, Serialize)]
#[serde(tag = "result", content = "why", rename_all = "snake_case")]
enum Verdict {
    Met,
    Missed(String),
    NotJudged(String),
}

impl Verdict {
    fn cell(&self) -> String {
        match self {
            Verdict::Met => "met".into(),
            Verdict::Missed(why) => format!("**missed**: {why}"),
            Verdict::NotJudged(why) => format!("not judged: {why}"),
        }
    }
}

#[derive(Debug, Serialize)]
struct Target {
    target: String,
    figure: String,
    verdict: Verdict,
}

/// One command's line of `INFO commandstats`.
#[derive(Debug, Serialize, PartialEq)]
struct ScriptStat {
    command: String,
    calls: u64,
    usec_per_call: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    command: String,
    redis_version: String,
    cpus: usize,
    redis_cpu: usize,
    node_cpu: usize,
    /// /proc/loadavg before and after: others' work on the machine shows here.
    loadavg_before: String,
    loadavg_after: String,
    rounds: usize,
    seconds: f64,
    warmup: f64,
    concurrency: usize,
    rates: Vec<f64>,
    tenants: usize,
    modes: Vec<ModeFigures>,
    /// Redis's own time per script call (`INFO commandstats`, every run together): the
    /// scripts' execution, without reading, parsing and answering.
    scripts: Vec<ScriptStat>,
    pipelined_vs_sequential: f64,
    memory_vs_pipelined: f64,
    target_decisions_per_s: f64,
    target_p99_us: f64,
    targets: Vec<Target>,
}

pub fn run(args: RedisBenchArgs) -> Result<()> {
    validate(&args)?;
    // As the gateway benchmark's parts without XDP: no root, no setup run, only its tools,
    // which `cargo xtask setup` installs.
    let redis_server = on_path("redis-server")
        .context("`redis-server` is not installed: run `cargo xtask setup`")?;
    on_path("taskset").context("`taskset` is not installed: run `cargo xtask setup`")?;
    let cpus = super::online_cpus()?;
    let node_cpu = args.node_cpu.unwrap_or(cpus - 1);
    ensure!(
        args.redis_cpu < cpus && node_cpu < cpus,
        "this machine has CPUs 0..{}",
        cpus - 1
    );
    ensure!(
        args.redis_cpu != node_cpu,
        "--redis-cpu and --node-cpu must differ (this machine has {cpus} CPUs)"
    );
    run_checked(Command::new("cargo").args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "aiguard-daemon",
        "--example",
        "shared_decisions",
    ]))?;
    let bin = workspace_root().join("target/release/examples/shared_decisions");
    // Kept after the run for redis.log; emptied at the start of the next.
    let dir = workspace_root().join("target/bench/redis");
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let loadavg_before = loadavg();

    let port = free_port()?;
    let port_s = port.to_string();
    let mut redis = Pinned::spawn(
        "redis-server",
        args.redis_cpu,
        &redis_server,
        &[
            "--bind",
            "127.0.0.1",
            "--port",
            &port_s,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
        ]
        .iter()
        .map(OsStr::new)
        .chain([dir.as_os_str()])
        .collect::<Vec<_>>(),
        &dir.join("redis.log"),
    )?;
    wait_for_redis(port)?;
    let version = redis_info(port, "redis_version").unwrap_or_else(|_| "?".into());
    let url = format!("redis://127.0.0.1:{port}");
    // Children's CPU time, to tell the example's share of its CPU from other processes'.
    let children = || -> Result<f64> {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes one rusage into the buffer it is given.
        ensure!(
            unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr()) } == 0,
            "getrusage: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: initialized by the successful call (and zeroed before it).
        let usage = unsafe { usage.assume_init() };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Ok(secs(usage.ru_utime) + secs(usage.ru_stime))
    };

    let modes: Vec<Mode> = [Mode::Memory, Mode::Sequential, Mode::Pipelined]
        .into_iter()
        .chain(args.rates.iter().map(|&r| Mode::Rate(r)))
        .collect();
    let mut samples: Vec<(Mode, Sample)> = Vec::new();
    for round in 0..args.rounds {
        for k in 0..modes.len() {
            let mode = modes[(round + k) % modes.len()];
            let before = TreeCpu::read(redis.pid())?;
            let (node_before, redis_cpu_before) =
                (CpuTimes::read(node_cpu)?, CpuTimes::read(args.redis_cpu)?);
            let children_before = children()?;
            let mut cmd = Command::new("taskset");
            cmd.arg("-c")
                .arg(node_cpu.to_string())
                .arg(&bin)
                .args(["--mode", mode.example_mode(), "--url", &url])
                .args(["--seconds", &args.seconds.to_string()])
                .args(["--warmup", &args.warmup.to_string()])
                .args(["--concurrency", &args.concurrency.to_string()])
                .args(["--tenants", &args.tenants.to_string()]);
            if let Mode::Rate(rate) = mode {
                cmd.args(["--rate", &rate.to_string()]);
            }
            let out = cmd.output().context("running shared_decisions")?;
            let redis_secs = TreeCpu::read(redis.pid())?.secs_since(&before)?;
            let node_window = CpuTimes::read(node_cpu)?.since(&node_before);
            let redis_window = CpuTimes::read(args.redis_cpu)?.since(&redis_cpu_before);
            let example_secs = children()? - children_before;
            if !out.status.success() {
                bail!(
                    "shared_decisions --mode {} failed ({}): {}\nredis log: {}",
                    mode.name(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr),
                    redis.log_tail()
                );
            }
            redis.ensure_running()?;
            let mut s: Sample = serde_json::from_slice(&out.stdout)
                .with_context(|| format!("reading {}", String::from_utf8_lossy(&out.stdout)))?;
            s.round = round + 1;
            s.mode = mode.name();
            s.node_cpu_foreign = foreign_share(&node_window, example_secs);
            s.redis_cpu_foreign = foreign_share(&redis_window, redis_secs);
            if mode != Mode::Memory {
                s.redis_cpu_us_per_request =
                    Some(redis_secs * 1e6 / s.requests_total.max(1) as f64);
            }
            if let Mode::Rate(rate) = mode {
                s.kept_up = Some(
                    s.achieved_rate.unwrap_or(0.0) >= KEPT_UP_SHARE * rate
                        && s.lag.as_ref().is_some_and(|l| l.p99_us <= LAG_LIMIT_US),
                );
            }
            eprintln!("bench redis: round {} {}", round + 1, progress_line(&s));
            samples.push((mode, s));
        }
    }
    let scripts = redis_command(port, "INFO commandstats")
        .map(|info| script_stats(&info))
        .unwrap_or_default();
    redis.stop()?;
    let loadavg_after = loadavg();

    let figures: Vec<ModeFigures> = modes
        .iter()
        .map(|&m| {
            let of = samples
                .iter()
                .filter(|(mode, _)| *mode == m)
                .map(|(_, s)| s.clone())
                .collect();
            ModeFigures::of(m, args.concurrency, of)
        })
        .collect();
    let get = |m: Mode| {
        figures
            .iter()
            .find(|f| f.mode == m.name())
            .expect("every mode ran")
    };
    let (mem, seq, pipe) = (
        get(Mode::Memory),
        get(Mode::Sequential),
        get(Mode::Pipelined),
    );
    let at_target = figures
        .iter()
        .find(|f| f.rate == Some(TARGET_DECISIONS_PER_S));
    let targets = vec![
        Target {
            target: format!(
                "≥ {} decisions/s per node on one Redis",
                thousands(TARGET_DECISIONS_PER_S)
            ),
            figure: format!("{}/s (pipelined)", thousands(pipe.decisions_per_s)),
            verdict: throughput_verdict(pipe),
        },
        Target {
            target: format!(
                "p99 added latency < {} ms at {}/s",
                TARGET_P99_US / 1e3,
                thousands(TARGET_DECISIONS_PER_S)
            ),
            figure: at_target
                .and_then(|f| f.admit_p99_us)
                .map_or_else(|| "–".into(), us),
            verdict: latency_verdict(at_target, args.rounds),
        },
    ];
    let report = Report {
        command: super::command_line(),
        redis_version: version,
        cpus,
        redis_cpu: args.redis_cpu,
        node_cpu,
        loadavg_before,
        loadavg_after,
        rounds: args.rounds,
        seconds: args.seconds,
        warmup: args.warmup,
        concurrency: args.concurrency,
        rates: args.rates.clone(),
        tenants: args.tenants,
        pipelined_vs_sequential: pipe.decisions_per_s / seq.decisions_per_s,
        memory_vs_pipelined: mem.decisions_per_s / pipe.decisions_per_s,
        target_decisions_per_s: TARGET_DECISIONS_PER_S,
        target_p99_us: TARGET_P99_US,
        targets,
        modes: figures,
        scripts,
    };
    print!("{}", markdown(&report));
    let json = workspace_root().join("target/bench/redis.json");
    fs::write(&json, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    eprintln!("bench: results written to {}", json.display());
    Ok(())
}

/// Of a CPU's window, the share that was busy with something other than `own_secs` of work.
fn foreign_share(window: &CpuTimes, own_secs: f64) -> f64 {
    if window.total_secs() > 0.0 {
        ((window.busy_secs() - own_secs) / window.total_secs()).clamp(0.0, 1.0)
    } else {
        0.0
    }
}

/// The script calls (`EVALSHA`, `EVAL`) of `INFO commandstats`.
fn script_stats(info: &str) -> Vec<ScriptStat> {
    info.lines()
        .filter_map(|line| {
            let (name, fields) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            if name != "evalsha" && name != "eval" {
                return None;
            }
            let field = |key: &str| {
                fields
                    .split(',')
                    .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
            };
            Some(ScriptStat {
                command: name.to_uppercase(),
                calls: field("calls")?.parse().ok()?,
                usec_per_call: field("usec_per_call")?.parse().ok()?,
            })
        })
        .collect()
}

fn validate(args: &RedisBenchArgs) -> Result<()> {
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    ensure!(
        args.seconds > 0.0 && args.seconds <= 60.0,
        "--seconds must be in (0, 60]"
    );
    ensure!(
        (0.0..=10.0).contains(&args.warmup),
        "--warmup must be in [0, 10]"
    );
    ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    ensure!(args.tenants >= 1, "--tenants must be at least 1");
    ensure!(!args.rates.is_empty(), "--rates needs at least one rate");
    for (i, &rate) in args.rates.iter().enumerate() {
        ensure!(
            (1.0..=1e6).contains(&rate),
            "--rates: {rate} is not in [1, 1000000]"
        );
        ensure!(
            !args.rates[..i].contains(&rate),
            "--rates: {rate} is given twice"
        );
    }
    Ok(())
}

fn throughput_verdict(pipe: &ModeFigures) -> Verdict {
    if pipe.errors() > 0 {
        Verdict::Missed(format!("{} requests failed", pipe.errors()))
    } else if pipe.decisions_per_s >= TARGET_DECISIONS_PER_S {
        Verdict::Met
    } else {
        Verdict::Missed(format!(
            "{}/s short",
            thousands(TARGET_DECISIONS_PER_S - pipe.decisions_per_s)
        ))
    }
}

fn latency_verdict(at_target: Option<&ModeFigures>, rounds: usize) -> Verdict {
    let Some(f) = at_target else {
        return Verdict::NotJudged(format!(
            "no fixed-rate run at {}/s (see --rates)",
            thousands(TARGET_DECISIONS_PER_S)
        ));
    };
    let mut why = Vec::new();
    if f.errors() > 0 {
        why.push(format!("{} requests failed", thousands(f.errors() as f64)));
    }
    let kept_up = f.rounds_kept_up.unwrap_or(0);
    if kept_up < rounds {
        why.push(format!(
            "the node fell behind the schedule in {} of {rounds} rounds",
            rounds - kept_up
        ));
    }
    match f.admit_p99_us {
        Some(p99) if p99 < TARGET_P99_US => {}
        Some(p99) => why.push(format!("p99 {}", us(p99))),
        None => why.push("no request was admitted".into()),
    }
    if why.is_empty() {
        Verdict::Met
    } else {
        Verdict::Missed(why.join("; "))
    }
}

fn progress_line(s: &Sample) -> String {
    let p = |p: &Option<Percentiles>, f: fn(&Percentiles) -> f64| {
        p.as_ref().map_or_else(|| "–".into(), |p| us(f(p)))
    };
    let mut line = format!(
        "{:<12} {:>9.0} decisions/s  admit p50 {:>9} p99 {:>9}  carried {:>4}  node {:.1} us/request",
        s.mode,
        s.decisions_per_s,
        p(&s.admit, |p| p.p50_us),
        p(&s.admit, |p| p.p99_us),
        share(s.carried),
        s.node_cpu_us_per_request,
    );
    if let Some(lag) = &s.lag {
        let _ = write!(line, "  lag p99 {}", us(lag.p99_us));
    }
    if s.kept_up == Some(false) {
        line.push_str("  FELL BEHIND");
    }
    if s.errors() > 0 {
        let _ = write!(
            line,
            "  ERRORS {} (first: {})",
            s.errors(),
            s.first_error.as_deref().unwrap_or("?")
        );
    }
    line
}

/// The report, a markdown section ready for the README.
fn markdown(r: &Report) -> String {
    let mut out = String::new();
    let opt = |v: Option<f64>| v.map_or_else(|| "–".into(), us);
    let _ = writeln!(
        out,
        "\n## Shared store (Redis {}) vs in memory\n",
        r.redis_version
    );
    let _ = writeln!(out, "`{}`\n", r.command);
    let _ = writeln!(
        out,
        "{} rounds × {} s per mode (after {} s of warm-up), the order rotating, medians over \
         rounds; redis-server on CPU {}, the node (one tokio worker) on CPU {} of {}; loopback. \
         Load average before / after: {} / {}.\n",
        r.rounds,
        r.seconds,
        r.warmup,
        r.redis_cpu,
        r.node_cpu,
        r.cpus,
        r.loadavg_before,
        r.loadavg_after
    );
    let _ = writeln!(
        out,
        "| mode | decisions/s (min–max) | p50 added latency | p99 added latency | settlements carried | node CPU / request | Redis CPU / request | others' share of node / Redis CPU | errors |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for f in &r.modes {
        let _ = writeln!(
            out,
            "| {} | {} ({}–{}) | {} | {} | {} | {} | {} | {:.0}% / {} | {} |",
            f.label,
            thousands(f.decisions_per_s),
            thousands(f.decisions_per_s_min),
            thousands(f.decisions_per_s_max),
            opt(f.admit_p50_us),
            opt(f.admit_p99_us),
            share(f.carried),
            us(f.node_cpu_us_per_request),
            opt(f.redis_cpu_us_per_request),
            f.node_cpu_foreign * 100.0,
            f.redis_cpu_foreign
                .map_or_else(|| "–".into(), |share| format!("{:.0}%", share * 100.0)),
            f.errors_cell(),
        );
    }
    let _ = writeln!(
        out,
        "\nA decision is a request admitted (tenant and key levels, a token reservation, the \
         monthly quota) and then settled, over {} tenants of one key each in turn. Added latency \
         is the admission's: what a request waits for before it is forwarded; the settlement \
         runs after the response, riding with the next admission of its tenant and key when one \
         comes within `store.settle_delay` (carried: the share that did), else alone. Each run \
         ends with every settlement written and Redis's month counters checked against the \
         tokens used: a request's worth missing or extra is a settlement error. Pipelined, \
         {} requests wait in turn (closed loop), so its latency is mostly queueing; at a fixed \
         rate (open loop) each admission is timed from the instant it was sent, and the node's \
         CPU includes the generator's pacing. Redis CPU is redis-server's per request (both \
         scripts, reading and answering included). Others' share: what other processes on the \
         machine took of each CPU during the run.\n",
        r.tenants, r.concurrency
    );
    for s in &r.scripts {
        let _ = writeln!(
            out,
            "Inside Redis, {} (the scripts themselves, wall time, so with any time its CPU \
             spent on other processes): {} per call over {} calls.\n",
            s.command,
            us(s.usec_per_call),
            thousands(s.calls as f64)
        );
    }
    let _ = writeln!(
        out,
        "| fixed rate | achieved (median) | generator lag p99 | rounds on schedule |"
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|");
    for f in r.modes.iter().filter(|f| f.rate.is_some()) {
        let _ = writeln!(
            out,
            "| {}/s | {}/s | {} | {} of {} |",
            thousands(f.rate.unwrap_or(0.0)),
            thousands(f.achieved_rate.unwrap_or(0.0)),
            opt(f.lag_p99_us),
            f.rounds_kept_up.unwrap_or(0),
            f.samples.len()
        );
    }
    let _ = writeln!(
        out,
        "\nOn schedule: decided at ≥ {:.0}% of the requested rate and sent 99% of requests at \
         most {} late (the generator shares the node's CPU and worker).\n",
        KEPT_UP_SHARE * 100.0,
        us(LAG_LIMIT_US)
    );
    let _ = writeln!(out, "| target | figure | result |");
    let _ = writeln!(out, "|---|---:|---|");
    for t in &r.targets {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            t.target,
            t.figure,
            t.verdict.cell()
        );
    }
    let _ = writeln!(
        out,
        "\nPipelined / sequential: {:.1}x; in memory / pipelined: {:.0}x.",
        r.pipelined_vs_sequential, r.memory_vs_pipelined
    );
    for f in r.modes.iter().filter(|f| f.errors() > 0) {
        let _ = writeln!(
            out,
            "\n**Errors** in {}: {}; first: {}.",
            f.label,
            f.errors_cell(),
            f.first_error.as_deref().unwrap_or("?")
        );
    }
    out
}

/// A share as a percentage, "–" when there is none.
fn share(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{:.0}%", v * 100.0))
}

/// Microseconds, in ms from 1 ms on, in s from 1 s on.
fn us(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} s", v / 1e6)
    } else if v >= 1_000.0 {
        format!("{:.2} ms", v / 1e3)
    } else if v >= 10.0 {
        format!("{v:.0} us")
    } else {
        format!("{v:.2} us")
    }
}

/// An integer with thousands separators (`1,234,567`).
fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < -0.5 {
        out.insert(0, '-');
    }
    out
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The first `tool` on PATH.
fn on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

fn wait_for_redis(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if redis_command(port, "PING").is_ok_and(|r| r.starts_with("+PONG")) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("redis-server on port {port} did not answer PING within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One inline command, its raw answer.
fn redis_command(port: u16, command: &str) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("{command}\r\n").as_bytes())?;
    let mut buf = vec![0; 64 * 1024];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn redis_info(port: u16, field: &str) -> Result<String> {
    let info = redis_command(port, "INFO server")?;
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_owned())
        .context("no such INFO field")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(20_000.0), "20,000");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
        assert_eq!(thousands(-1_500.0), "-1,500");
        assert_eq!(thousands(f64::NAN), "–");
    }

    #[test]
    fn microseconds_switch_to_milliseconds() {
        assert_eq!(us(0.456), "0.46 us");
        assert_eq!(us(345.6), "346 us");
        assert_eq!(us(2_345.0), "2.35 ms");
        assert_eq!(us(1_988_870.0), "1.99 s");
    }

    fn sample(errors: u64, p99_us: f64, kept_up: bool) -> Sample {
        Sample {
            round: 1,
            mode: "rate-20000".into(),
            rate: Some(TARGET_DECISIONS_PER_S),
            seconds: 3.0,
            requests: 60_000,
            decisions: 60_000 - errors,
            decisions_per_s: 20_000.0,
            admit_errors: 0,
            refused: 0,
            settle_errors: errors,
            unfinished: 0,
            first_error: (errors > 0).then(|| "settlement: x".into()),
            admit: Some(Percentiles {
                p50_us: p99_us / 2.0,
                p99_us,
                max_us: p99_us * 2.0,
            }),
            carried: None,
            lag: None,
            achieved_rate: Some(20_000.0),
            node_cpu_us_per_request: 20.0,
            requests_total: 70_000,
            redis_cpu_us_per_request: Some(10.0),
            kept_up: Some(kept_up),
            node_cpu_foreign: 0.0,
            redis_cpu_foreign: 0.0,
        }
    }

    #[test]
    fn reads_script_stats() {
        let info = "# Commandstats\r\ncmdstat_ping:calls=3,usec=4,usec_per_call=1.33,rejected_calls=0\r\n\
                    cmdstat_evalsha:calls=1200,usec=30000,usec_per_call=25.00,rejected_calls=0,failed_calls=0\r\n\
                    cmdstat_eval:calls=2,usec=100,usec_per_call=50.00\r\n";
        assert_eq!(
            script_stats(info),
            vec![
                ScriptStat {
                    command: "EVALSHA".into(),
                    calls: 1200,
                    usec_per_call: 25.0
                },
                ScriptStat {
                    command: "EVAL".into(),
                    calls: 2,
                    usec_per_call: 50.0
                },
            ]
        );
    }

    #[test]
    fn latency_target_needs_the_schedule_and_no_errors() {
        let mode = Mode::Rate(TARGET_DECISIONS_PER_S);
        let ok = ModeFigures::of(mode, 64, vec![sample(0, 500.0, true)]);
        assert!(matches!(latency_verdict(Some(&ok), 1), Verdict::Met));
        let slow = ModeFigures::of(mode, 64, vec![sample(0, 2_500.0, true)]);
        assert!(matches!(
            latency_verdict(Some(&slow), 1),
            Verdict::Missed(_)
        ));
        let behind = ModeFigures::of(mode, 64, vec![sample(0, 500.0, false)]);
        assert!(matches!(
            latency_verdict(Some(&behind), 1),
            Verdict::Missed(_)
        ));
        let failed = ModeFigures::of(mode, 64, vec![sample(3, 500.0, true)]);
        assert!(matches!(
            latency_verdict(Some(&failed), 1),
            Verdict::Missed(_)
        ));
        assert_eq!(failed.errors(), 3);
        assert!(failed.errors_cell().contains("3 settlement"));
        assert!(matches!(latency_verdict(None, 1), Verdict::NotJudged(_)));
    }
}
