//! `cargo xtask bench`: what aiguard's XDP path costs, measured beside what an operator would
//! otherwise use.
//!
//! `cargo xtask bench xdp` has three parts, each selectable with `--only`:
//! - `prog` ([`prog_cost`]): the program's own cost per packet through BPF_PROG_TEST_RUN, for a
//!   banned and a passing packet, from 1 to 1M bans, and how fast the ban trie fills;
//! - `veth` ([`veth`]): packets dropped per second and receive CPU per dropped packet on a veth
//!   pair, aiguard against nftables netdev ingress, iptables+ipset and a drop-everything XDP
//!   program, all holding the same bans, interleaved round by round;
//! - `load` ([`load`]): time to load 100k and 1M prefixes: aiguard's map fill and its daemon's
//!   `ban --file`, against `nft -f` and `ipset restore`.
//!
//! The results go to stdout as a markdown table and to `target/bench/xdp.json`.
//!
//! `cargo xtask bench gateway` ([`gateway`]) measures the HTTP gateway against nginx with
//! `limit_req`: throughput, CPU per request, and latency at a fixed rate
//! (`target/bench/gateway.json`).
//!
//! `cargo xtask bench redis` ([`redis`]) measures decisions against the shared store (Redis)
//! beside the in-memory store (`target/bench/redis.json`).
//!
//! `cargo xtask bench metrics` ([`metrics`]) measures one `/metrics` scrape of the real daemon
//! holding 100k bans and 10k tenants: time, size, daemon CPU, and its effect on gateway and
//! admin latency (`target/bench/metrics.json`).
//!
//! `cargo xtask bench detect` ([`detect`]) measures how long a credential-stuffing botnet is
//! served before the detector's ban drops its packets at the NIC (`target/bench/detect.json`).
//!
//! The XDP, metrics and detect benchmarks' traffic stays inside network namespaces they create
//! (and delete, see [`netns`]), the gateway benchmark's on loopback; every loop is bounded in
//! count and time.

mod cpu;
mod detect;
mod gateway;
mod load;
mod metrics;
mod netfilter;
mod netns;
mod object;
mod prefixes;
mod prog_cost;
mod redis;
mod report;
mod sender;
mod veth;

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, ensure};

use crate::{setup, workspace_root};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchTarget,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchTarget {
    /// The XDP path: per-packet cost (BPF_PROG_TEST_RUN), drop rate and receive CPU on veth
    /// against nftables, iptables+ipset and a drop-all ceiling, and prefix load time. Needs root.
    Xdp(XdpBenchArgs),
    /// The gateway: requests/s, CPU per request and latency at a fixed rate through aiguard,
    /// against nginx with limit_req and the upstream directly. The aiguard leg needs root.
    Gateway(gateway::GatewayBenchArgs),
    /// The shared store: decisions/s per node against one Redis, with and without
    /// pipelining, and the latency a decision adds, beside the in-memory store.
    Redis(redis::RedisBenchArgs),
    /// One `/metrics` scrape with 100k bans and 10k tenants: wall time, size, daemon CPU, and
    /// what it does to gateway and admin latency. Needs root.
    Metrics(metrics::MetricsBenchArgs),
    /// Detection to enforcement: the time from a credential-stuffing botnet's first request
    /// to the first of its packets dropped at the NIC. Needs root.
    Detect(detect::DetectBenchArgs),
}

#[derive(clap::Args, Debug)]
pub struct XdpBenchArgs {
    /// Run only these parts (comma-separated); all three by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Part>,
    /// Rounds of the veth comparison. A round runs every mechanism once, each in a fresh
    /// namespace pair; the figures are medians over rounds.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Measured seconds per mechanism and round (after a short warm-up).
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Ban counts for the per-packet cost.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 10_000, 100_000, 1_000_000])]
    pub bans: Vec<usize>,
    /// Bans every mechanism holds in the veth comparison.
    #[arg(long, default_value_t = 1_000_000)]
    pub veth_bans: usize,
    /// Prefix counts for the load-time comparison.
    #[arg(long, value_delimiter = ',', default_values_t = [100_000, 1_000_000])]
    pub load_sizes: Vec<usize>,
    /// Samples per load time (loader and size); the veth part's loads count towards them.
    #[arg(long, default_value_t = 3)]
    pub load_samples: usize,
    /// BPF_PROG_TEST_RUN samples per case; the figure is their median.
    #[arg(long, default_value_t = 9)]
    pub samples: usize,
    /// Program runs per BPF_PROG_TEST_RUN sample (the kernel reports their mean).
    #[arg(long, default_value_t = 1_000_000)]
    pub test_runs: u32,
    /// CPU for the packet generator, and so for veth's receive path; the last CPU by default.
    #[arg(long)]
    pub cpu: Option<usize>,
    /// aiguard daemon binary for the end-to-end load time; by default the release daemon is
    /// built (`cargo xtask run` builds the same), and the end-to-end figure is skipped with a
    /// note when that fails.
    #[arg(long)]
    pub daemon: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Prog,
    Veth,
    Load,
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.what {
        BenchTarget::Xdp(args) => xdp(args),
        BenchTarget::Gateway(args) => gateway::run(args),
        BenchTarget::Redis(args) => redis::run(args),
        BenchTarget::Metrics(args) => metrics::run(args),
        BenchTarget::Detect(args) => detect::run(args),
    }
}

/// The inference service's port: in RATE_PORTS, and the destination of every test packet, so a
/// packet that is not banned goes through the per-source bucket.
const SERVICE_PORT: u16 = 8000;

/// What every part shares: the options, the built objects, the ban sets and their files.
struct Bench {
    args: XdpBenchArgs,
    objects: crate::EbpfObjects,
    prefixes: prefixes::Prefixes,
    files: prefixes::FileCache,
    sender_cpu: usize,
}

impl XdpBenchArgs {
    fn runs(&self, part: Part) -> bool {
        self.only.is_empty() || self.only.contains(&part)
    }
}

fn xdp(args: XdpBenchArgs) -> Result<()> {
    setup::require_root("`cargo xtask bench xdp` (XDP programs, network namespaces)")?;
    validate(&args)?;
    // Installs nft, ipset and iptables and mounts bpffs when missing; only checks otherwise.
    setup::run()?;
    let objects = crate::build_ebpf()?;

    netns::remove_stale()?;
    object::remove_stale_pin_dirs()?;
    let bench_dir = workspace_root().join("target/bench");
    prefixes::remove_stale_work_dirs(&bench_dir)?;

    let cpus = online_cpus()?;
    let sender_cpu = args.cpu.unwrap_or(cpus - 1);
    ensure!(
        sender_cpu < cpus,
        "--cpu {sender_cpu}: this machine has CPUs 0..{}",
        cpus - 1
    );

    let mut needed = Vec::new();
    if args.runs(Part::Prog) {
        needed.extend(&args.bans);
    }
    if args.runs(Part::Veth) {
        needed.push(args.veth_bans);
    }
    if args.runs(Part::Load) {
        needed.extend(&args.load_sizes);
    }
    let largest = needed.into_iter().max().unwrap_or(1);
    eprintln!("bench: generating {largest} non-overlapping prefixes");
    let prefixes = prefixes::Prefixes::generate(largest);
    let files = prefixes::FileCache::create(&bench_dir)?;
    let command = command_line();
    let bench = Bench {
        args,
        objects,
        prefixes,
        files,
        sender_cpu,
    };

    let mut loads = load::LoadTimes::default();
    let mut notes = Vec::new();
    let prog = if bench.args.runs(Part::Prog) {
        Some(prog_cost::run(&bench, &mut loads)?)
    } else {
        None
    };
    let veth = if bench.args.runs(Part::Veth) {
        Some(veth::run(&bench, &mut loads)?)
    } else {
        None
    };
    let load = if bench.args.runs(Part::Load) {
        Some(load::run(&bench, &mut loads, &mut notes)?)
    } else {
        None
    };

    let report = report::Report::new(command, cpus, &bench, prog, veth, load, notes)?;
    print!("{}", report.markdown());
    let json = bench_dir.join("xdp.json");
    report.write_json(&json)?;
    eprintln!("bench: results written to {}", json.display());
    Ok(())
}

fn validate(args: &XdpBenchArgs) -> Result<()> {
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    ensure!(
        args.seconds > 0.0 && args.seconds <= 60.0,
        "--seconds must be in (0, 60]"
    );
    ensure!(args.samples >= 1, "--samples must be at least 1");
    ensure!(args.load_samples >= 1, "--load-samples must be at least 1");
    ensure!(args.test_runs >= 1, "--test-runs must be at least 1");
    for &count in args
        .bans
        .iter()
        .chain(&args.load_sizes)
        .chain([&args.veth_bans])
    {
        ensure!(
            (1..=prefixes::MAX_PREFIXES).contains(&count),
            "prefix counts must be in 1..={}, got {count}",
            prefixes::MAX_PREFIXES
        );
    }
    Ok(())
}

/// The command as the operator typed it, for the report.
fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("cargo xtask {}", args.join(" "))
}

fn online_cpus() -> Result<usize> {
    Ok(std::thread::available_parallelism()
        .context("counting CPUs")?
        .get())
}

/// Names for what the benchmark creates (namespaces, bpffs directories, work directories):
/// `agbench-<pid>-<n>`, so two runs never collide and a later run can tell which were left
/// behind by a run that no longer exists.
fn unique_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{NAME_PREFIX}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

const NAME_PREFIX: &str = "agbench-";

/// Whether `name` is one of [`unique_name`]'s, made by a process that is gone.
fn left_behind(name: &str) -> bool {
    let Some(pid) = name
        .strip_prefix(NAME_PREFIX)
        .and_then(|rest| rest.split('-').next())
        .and_then(|pid| pid.parse::<u32>().ok())
    else {
        return false;
    };
    pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
}

/// Entries of `dir` that [`left_behind`] says are leftovers.
fn leftovers(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error).with_context(|| format!("listing {}", dir.display())),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if entry.file_name().to_str().is_some_and(left_behind) {
            found.push(entry.path());
        }
    }
    Ok(found)
}

/// The median of `values` (the mean of the middle two for an even count); NaN when empty.
fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// The nearest-rank percentile of `values` (100 = the largest); NaN when empty.
fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 90.0), 90.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        // Nearest rank of ten: the ninth value.
        let ten: Vec<f64> = (1..=10).rev().map(f64::from).collect();
        assert_eq!(percentile(&ten, 90.0), 9.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn only_dead_runs_leave_things_behind() {
        assert!(!left_behind(&unique_name()));
        assert!(!left_behind("agbench-notapid-1"));
        assert!(!left_behind("other-1-2"));
        // PIDs are below 2^22 on Linux.
        assert!(left_behind("agbench-4294967295-0"));
    }
}
