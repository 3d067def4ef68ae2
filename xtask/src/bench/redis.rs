//! `cargo xtask bench redis`: how many decisions per second one node gets from one Redis, and
//! what a decision adds to a request's latency, beside the in-memory store in the same run.
//!
//! Four modes, each a run of the `shared_decisions` example (aiguard-daemon's own code: the
//! admission and settlement scripts the gateway runs), interleaved round by round with the
//! order rotating, medians over rounds:
//! - `memory`: the embedded store's in-memory limiter;
//! - `sequential`: Redis without pipelining, one request (admit, settle) at a time;
//! - `pipelined`: 64 requests at a time over the one multiplexed connection;
//! - `rate`: requests at a fixed rate (open loop), so latency is what a decision adds when
//!   Redis is not saturated.
//!
//! redis-server runs pinned to one CPU, the node to the other; both on loopback, so the
//! figures are Redis's and the node's costs without a network's round trip (add the
//! network's RTT for a remote Redis).
use std::{
    ffi::OsStr,
    fs,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Serialize;

use super::{gateway::process::Pinned, median};
use crate::{run_checked, setup, workspace_root};

#[derive(clap::Args, Debug)]
pub struct RedisBenchArgs {
    /// Rounds; each runs every mode once, in an order that rotates.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Measured seconds per mode and round.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Requests in flight in the pipelined mode.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Requests per second of the fixed-rate mode.
    #[arg(long, default_value_t = 5_000.0)]
    pub rate: f64,
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

const MODES: [&str; 4] = ["memory", "sequential", "pipelined", "rate"];

/// The targets.
const TARGET_DECISIONS_PER_S: f64 = 20_000.0;
const TARGET_P99_US: f64 = 2_000.0;

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct Sample {
    mode: String,
    decisions: u64,
    seconds: f64,
    decisions_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

#[derive(Debug, Serialize)]
struct ModeFigures {
    mode: String,
    decisions_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    samples: Vec<Sample>,
}

#[derive(Debug, Serialize)]
struct Report {
    command: String,
    redis_version: String,
    rounds: usize,
    seconds: f64,
    concurrency: usize,
    rate: f64,
    modes: Vec<ModeFigures>,
    pipelined_vs_sequential: f64,
    memory_vs_pipelined: f64,
    target_decisions_per_s: f64,
    target_p99_us: f64,
    decisions_target_met: bool,
    latency_target_met: bool,
}

pub fn run(args: RedisBenchArgs) -> Result<()> {
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    ensure!(
        args.seconds > 0.0 && args.seconds <= 60.0,
        "--seconds must be in (0, 60]"
    );
    ensure!(args.rate >= 1.0, "--rate must be at least 1");
    // Installs redis-server when it is missing; only checks otherwise.
    setup::run()?;
    let cpus = std::thread::available_parallelism()?.get();
    let node_cpu = args.node_cpu.unwrap_or(cpus - 1);
    ensure!(
        args.redis_cpu < cpus && node_cpu < cpus,
        "this machine has CPUs 0..{}",
        cpus - 1
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
    let dir = workspace_root().join("target/bench/redis");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    let port = free_port()?;
    let port_s = port.to_string();
    let redis = Pinned::spawn(
        "redis-server",
        args.redis_cpu,
        &PathBuf::from("/usr/bin/redis-server"),
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

    let mut samples: Vec<Sample> = Vec::new();
    for round in 0..args.rounds {
        for k in 0..MODES.len() {
            let mode = MODES[(round + k) % MODES.len()];
            let out = Command::new("taskset")
                .arg("-c")
                .arg(node_cpu.to_string())
                .arg(&bin)
                .args(["--mode", mode, "--url", &url])
                .args(["--seconds", &args.seconds.to_string()])
                .args(["--concurrency", &args.concurrency.to_string()])
                .args(["--rate", &args.rate.to_string()])
                .args(["--tenants", &args.tenants.to_string()])
                .output()
                .context("running shared_decisions")?;
            if !out.status.success() {
                bail!(
                    "shared_decisions --mode {mode} failed: {}\nredis log: {}",
                    String::from_utf8_lossy(&out.stderr),
                    redis.log_tail()
                );
            }
            let s: Sample = serde_json::from_slice(&out.stdout)
                .with_context(|| format!("reading {}", String::from_utf8_lossy(&out.stdout)))?;
            ensure!(
                s.errors == 0,
                "{mode}: {} decisions failed; redis log: {}",
                s.errors,
                redis.log_tail()
            );
            eprintln!(
                "bench redis: round {} {mode:<10} {:>9.0} decisions/s  p50 {:>7.1} us  p99 {:>7.1} us",
                round + 1,
                s.decisions_per_s,
                s.p50_us,
                s.p99_us
            );
            samples.push(s);
        }
    }
    redis.stop()?;

    let figures: Vec<ModeFigures> = MODES
        .iter()
        .map(|m| {
            let of: Vec<Sample> = samples.iter().filter(|s| s.mode == *m).cloned().collect();
            let pick = |f: fn(&Sample) -> f64| median(&of.iter().map(f).collect::<Vec<_>>());
            ModeFigures {
                mode: (*m).to_owned(),
                decisions_per_s: pick(|s| s.decisions_per_s),
                p50_us: pick(|s| s.p50_us),
                p99_us: pick(|s| s.p99_us),
                samples: of,
            }
        })
        .collect();
    let get = |m: &str| {
        figures
            .iter()
            .find(|f| f.mode == m)
            .expect("every mode ran")
    };
    let (mem, seq, pipe, rate) = (
        get("memory"),
        get("sequential"),
        get("pipelined"),
        get("rate"),
    );
    let report = Report {
        command: format!(
            "cargo xtask {}",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
        redis_version: version,
        rounds: args.rounds,
        seconds: args.seconds,
        concurrency: args.concurrency,
        rate: args.rate,
        pipelined_vs_sequential: pipe.decisions_per_s / seq.decisions_per_s,
        memory_vs_pipelined: mem.decisions_per_s / pipe.decisions_per_s,
        target_decisions_per_s: TARGET_DECISIONS_PER_S,
        target_p99_us: TARGET_P99_US,
        decisions_target_met: pipe.decisions_per_s >= TARGET_DECISIONS_PER_S,
        latency_target_met: rate.p99_us < TARGET_P99_US,
        modes: Vec::new(),
    };
    println!(
        "\n## Shared store (Redis {}) vs in memory\n",
        report.redis_version
    );
    println!(
        "{} rounds x {} s per mode, medians; redis-server on CPU {}, the node on CPU {node_cpu}; loopback.\n",
        args.rounds, args.seconds, args.redis_cpu
    );
    println!("| mode | decisions/s | p50 | p99 |");
    println!("|---|---:|---:|---:|");
    for f in &figures {
        let label = match f.mode.as_str() {
            "memory" => "in memory (embedded store)".to_owned(),
            "sequential" => "Redis, no pipelining (1 in flight)".to_owned(),
            "pipelined" => format!("Redis, pipelined ({} in flight)", args.concurrency),
            _ => format!("Redis at a fixed {:.0}/s", args.rate),
        };
        println!(
            "| {label} | {:.0} | {:.1} us | {:.1} us |",
            f.decisions_per_s, f.p50_us, f.p99_us
        );
    }
    println!(
        "\npipelined / sequential: {:.2}x; in memory / pipelined: {:.0}x",
        report.pipelined_vs_sequential, report.memory_vs_pipelined
    );
    println!(
        "targets: >= {:.0} decisions/s per node: {} ({:.0}); p99 added latency < {:.0} us: {} ({:.1} us)",
        TARGET_DECISIONS_PER_S,
        if report.decisions_target_met {
            "met"
        } else {
            "NOT met"
        },
        pipe.decisions_per_s,
        TARGET_P99_US,
        if report.latency_target_met {
            "met"
        } else {
            "NOT met"
        },
        rate.p99_us
    );
    let report = Report {
        modes: figures,
        ..report
    };
    let json = workspace_root().join("target/bench/redis.json");
    fs::write(&json, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    eprintln!("bench: results written to {}", json.display());
    Ok(())
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
