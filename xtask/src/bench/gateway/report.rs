//! One run's results: medians over rounds, aiguard against nginx round by round, the limiter's
//! ns per decision, the targets; printed as markdown and written as JSON
//! (`target/bench/gateway.json`).

use std::{fmt::Write as _, fs, path::Path, process::Command};

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::{
    FOREIGN_WARNING, GatewayBenchArgs, LAG_WARNING_US, LatencySample, Layout, Leg, NGINX_BURST,
    PER_MINUTE, Samples, ThroughputSample,
    limiter::{self, LimiterRun, LimiterSample, Role},
    medians_by_leg, paired_median,
};
use crate::{bench::median, workspace_root};

/// aiguard's CPU per request at most this times nginx limit_req's.
const CPU_RATIO_TARGET: f64 = 0.8;
/// aiguard's throughput at least this times nginx limit_req's.
const THROUGHPUT_RATIO_TARGET: f64 = 1.0;
/// p99 latency aiguard adds over the direct leg at the fixed rate, below this.
const ADDED_P99_TARGET_US: f64 = 1_000.0;

#[derive(Debug, Serialize)]
pub struct Report {
    pub command: String,
    pub kernel: String,
    pub cpus: usize,
    pub layout: Layout,
    /// nginx and wrk versions.
    pub tools: Vec<String>,
    pub rounds: usize,
    pub seconds: u64,
    pub connections: usize,
    pub keys: usize,
    /// Each key's limit, in both proxies.
    pub limit_per_minute: u64,
    pub nginx_burst: u64,
    pub throughput: Vec<ThroughputRow>,
    pub latency: Vec<LatencyRow>,
    pub ratios: Ratios,
    /// The limiter part, when it ran.
    pub limiter: Option<LimiterReport>,
    pub targets: Vec<Target>,
    pub notes: Vec<String>,
    pub samples: Samples,
}

/// The limiter part: criterion's median per case, median over rounds.
#[derive(Debug, Serialize)]
pub struct LimiterReport {
    pub target_ns: f64,
    pub cpu: usize,
    pub command: String,
    pub rounds: usize,
    pub warm_up_secs: f64,
    pub measurement_secs: f64,
    pub rows: Vec<LimiterRow>,
    /// Per round, the share of the bench CPU that went to other processes.
    pub cpu_foreign: Vec<f64>,
    pub samples: Vec<LimiterSample>,
}

/// One case, over rounds.
#[derive(Debug, Serialize)]
pub struct LimiterRow {
    pub case: &'static str,
    pub what: &'static str,
    pub role: Role,
    /// Median over rounds of criterion's median, ns per iteration; and the rounds' extremes.
    pub median_ns: f64,
    pub min_ns: f64,
    pub max_ns: f64,
    /// Under the target; none for cases the target is not about (releases).
    pub met: Option<bool>,
}

/// Medians over rounds of one leg at saturation.
#[derive(Debug, Serialize)]
pub struct ThroughputRow {
    pub leg: Leg,
    pub requests_per_sec: f64,
    pub proxy_cpu_us_per_request: Option<f64>,
    pub upstream_cpu_us_per_request: f64,
    pub proxy_cpu_busy: f64,
    pub load_cpu_busy: f64,
    pub proxy_cpu_foreign: f64,
}

/// Medians over rounds of one leg at the fixed rate.
#[derive(Debug, Serialize)]
pub struct LatencyRow {
    pub leg: Leg,
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Over the direct leg of the same round, median over rounds.
    pub added_p50_us: Option<f64>,
    pub added_p99_us: Option<f64>,
    pub proxy_cpu_us_per_request: Option<f64>,
    pub lag_p99_us: f64,
}

/// aiguard over nginx limit_req: medians of per-round ratios.
#[derive(Debug, Default, Serialize)]
pub struct Ratios {
    pub cpu_per_request: Option<f64>,
    pub throughput: Option<f64>,
    pub cpu_per_request_at_fixed_rate: Option<f64>,
    /// The HTTP stack alone (pass-through) over nginx limit_req, CPU per request at
    /// saturation: the floor under `cpu_per_request`.
    pub passthrough_cpu_per_request: Option<f64>,
    /// aiguard with detection and queueing over aiguard without, at saturation: what they cost.
    pub protection_cpu_per_request: Option<f64>,
    pub protection_throughput: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Target {
    pub target: String,
    pub measured: String,
    pub met: bool,
}

impl Report {
    pub fn new(
        command: String,
        cpus: usize,
        layout: Layout,
        args: &GatewayBenchArgs,
        samples: Samples,
        notes: Vec<String>,
        limiter: Option<LimiterRun>,
    ) -> Result<Self> {
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .context("reading the kernel release")?
            .trim()
            .to_owned();
        let mut tools = Vec::new();
        if args.runs_http() {
            tools.extend(
                [["nginx", "-v"], ["wrk", "-v"]]
                    .iter()
                    .filter_map(|[tool, flag]| first_line_of(Command::new(tool).arg(flag))),
            );
        }
        let limiter = limiter.map(|run| limiter_report(run, args.rounds));
        if limiter.is_some() {
            // The workspace's toolchain: the one that built the bench.
            tools.extend(first_line_of(
                Command::new("rustc")
                    .arg("-V")
                    .current_dir(workspace_root()),
            ));
        }
        let mut notes = notes;
        notes.extend(quality_notes(&samples));
        notes.extend(limiter.as_ref().and_then(limiter_quality_note));
        if args.runs_http() && !args.legs().contains(&Leg::Aiguard) {
            notes.push(
                "no aiguard leg: keys made up in aiguard's shape, the HTTP targets not evaluated"
                    .into(),
            );
        }
        let mut report = Self {
            command,
            kernel,
            cpus,
            layout,
            tools,
            rounds: args.rounds,
            seconds: args.seconds,
            connections: args.connections,
            keys: args.keys,
            limit_per_minute: PER_MINUTE,
            nginx_burst: NGINX_BURST,
            throughput: throughput_rows(&samples.throughput),
            latency: latency_rows(&samples.latency),
            ratios: ratios(&samples),
            limiter,
            targets: Vec::new(),
            notes,
            samples,
        };
        report.targets = report.targets();
        Ok(report)
    }

    fn targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        if let Some(ratio) = self.ratios.cpu_per_request {
            targets.push(Target {
                target: format!(
                    "aiguard's CPU per request <= {CPU_RATIO_TARGET}x nginx limit_req's"
                ),
                measured: format!("{ratio:.2}x"),
                met: ratio <= CPU_RATIO_TARGET,
            });
        }
        if let Some(ratio) = self.ratios.throughput {
            targets.push(Target {
                target: "aiguard's throughput >= nginx limit_req's".into(),
                measured: format!("{ratio:.2}x"),
                met: ratio >= THROUGHPUT_RATIO_TARGET,
            });
        }
        if let Some(row) = self.latency.iter().find(|row| row.leg == Leg::Aiguard)
            && let Some(added) = row.added_p99_us
        {
            targets.push(Target {
                target: format!(
                    "p99 latency aiguard adds over direct at {} requests/s < 1 ms",
                    grouped(row.rate)
                ),
                measured: format!("{added:.0} us"),
                met: added < ADDED_P99_TARGET_US,
            });
        }
        if let Some(limiter) = &self.limiter
            && let Some(worst) = worst_decision(limiter)
        {
            targets.push(Target {
                target: format!(
                    "a limiter decision < {:.0} ns (the slowest decision case)",
                    limiter.target_ns
                ),
                measured: format!("{:.0} ns ({})", worst.median_ns, worst.case),
                met: worst.median_ns < limiter.target_ns,
            });
        }
        targets
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = self.write_markdown(&mut out);
        out
    }

    fn write_markdown(&self, out: &mut String) -> std::fmt::Result {
        writeln!(out, "\n## aiguard gateway benchmark\n")?;
        writeln!(out, "Command: `{}`  ", self.command)?;
        writeln!(out, "Kernel {}, {} CPUs.  ", self.kernel, self.cpus)?;
        writeln!(out, "Tools: {}.  ", self.tools.join("; "))?;
        if !self.throughput.is_empty() || !self.latency.is_empty() {
            self.write_http_setup(out)?;
        } else {
            writeln!(out)?;
        }
        if let Some(limiter) = &self.limiter {
            write_limiter(out, limiter)?;
        }
        self.write_http(out)?;

        if !self.targets.is_empty() {
            writeln!(out, "### Targets\n")?;
            writeln!(out, "| target | measured | met |")?;
            writeln!(out, "|---|---:|:---:|")?;
            for target in &self.targets {
                writeln!(
                    out,
                    "| {} | {} | {} |",
                    target.target,
                    target.measured,
                    if target.met { "yes" } else { "**no**" }
                )?;
            }
            writeln!(out)?;
        }

        if !self.notes.is_empty() {
            writeln!(out, "Notes:")?;
            for note in &self.notes {
                writeln!(out, "- {note}")?;
            }
            writeln!(out)?;
        }
        Ok(())
    }

    /// Where the HTTP parts ran and what load they carried.
    fn write_http_setup(&self, out: &mut String) -> std::fmt::Result {
        writeln!(
            out,
            "Layout: the proxy (nginx or aiguard, one at a time) alone on CPU {}; the load \
             generator (wrk or the fixed-rate one) and the upstream (nginx, one worker) on CPU {}.  ",
            self.layout.proxy_cpu, self.layout.load_cpu
        )?;
        writeln!(
            out,
            "Load: {} kept-alive connections, `POST /v1/chat/completions`, each request with the \
             next of {} keys. Limit in both proxies: {} requests/minute per key (nginx: \
             `limit_req_zone $http_authorization`, `burst={} nodelay`), far above what the load \
             offers a key, so every request is checked and none refused (a 429 fails the run).  ",
            self.connections,
            grouped(self.keys as f64),
            grouped(self.limit_per_minute as f64),
            self.nginx_burst
        )?;
        writeln!(
            out,
            "Median of {} rounds, legs interleaved (order rotating), {} s measured per leg and part.\n",
            self.rounds, self.seconds
        )?;
        Ok(())
    }

    /// The throughput, latency and ratio tables, for the parts that ran.
    fn write_http(&self, out: &mut String) -> std::fmt::Result {
        if !self.throughput.is_empty() {
            writeln!(out, "### Throughput at saturation (wrk)\n")?;
            writeln!(
                out,
                "Proxy CPU = user + system time of the proxy's processes / requests. Busy = share \
                 of the CPU's time spent running anything.\n"
            )?;
            writeln!(
                out,
                "| leg | requests/s | proxy CPU/request (us) | upstream CPU/request (us) | proxy CPU busy | of which other processes | load CPU busy |"
            )?;
            writeln!(out, "|---|---:|---:|---:|---:|---:|---:|")?;
            for row in &self.throughput {
                writeln!(
                    out,
                    "| {} | {} | {} | {:.1} | {:.0}% | {:.0}% | {:.0}% |",
                    row.leg.label(),
                    grouped(row.requests_per_sec),
                    optional(row.proxy_cpu_us_per_request, 1),
                    row.upstream_cpu_us_per_request,
                    row.proxy_cpu_busy * 100.0,
                    row.proxy_cpu_foreign * 100.0,
                    row.load_cpu_busy * 100.0
                )?;
            }
            writeln!(out)?;
        }

        if !self.latency.is_empty() {
            writeln!(out, "### Latency at a fixed rate (open loop)\n")?;
            writeln!(
                out,
                "Requests evenly spaced at half of nginx's throughput in the same round; latency \
                 from each request's due time (so a held-up connection counts), less the \
                 generator's own lateness, shown as lag. Added = this leg minus the direct leg, \
                 same round.\n"
            )?;
            writeln!(
                out,
                "| leg | rate (requests/s) | p50 (us) | p99 (us) | added p50 (us) | added p99 (us) | proxy CPU/request (us) | generator lag p99 (us) |"
            )?;
            writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
            for row in &self.latency {
                writeln!(
                    out,
                    "| {} | {} | {:.0} | {:.0} | {} | {} | {} | {:.0} |",
                    row.leg.label(),
                    grouped(row.rate),
                    row.p50_us,
                    row.p99_us,
                    optional(row.added_p50_us, 0),
                    optional(row.added_p99_us, 0),
                    optional(row.proxy_cpu_us_per_request, 1),
                    row.lag_p99_us
                )?;
            }
            writeln!(out)?;
        }

        let ratios = [
            ("CPU per request at saturation", self.ratios.cpu_per_request),
            ("throughput", self.ratios.throughput),
            (
                "CPU per request at the fixed rate",
                self.ratios.cpu_per_request_at_fixed_rate,
            ),
            (
                "CPU per request at saturation of the HTTP stack alone (pass-through, \
                 no checks): the floor",
                self.ratios.passthrough_cpu_per_request,
            ),
        ];
        write_ratios(
            out,
            "aiguard / nginx limit_req (median of per-round ratios)",
            &ratios,
        )?;
        let protection = [
            (
                "CPU per request at saturation",
                self.ratios.protection_cpu_per_request,
            ),
            ("throughput", self.ratios.protection_throughput),
        ];
        write_ratios(
            out,
            "aiguard with / without detection and priority queueing (median of per-round ratios)",
            &protection,
        )?;
        Ok(())
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let json = serde_json::to_string_pretty(self).context("serializing the results")?;
        fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
    }
}

fn limiter_report(run: LimiterRun, rounds: usize) -> LimiterReport {
    let rows = limiter::CASES
        .iter()
        .filter_map(|case| {
            let values: Vec<f64> = run
                .samples
                .iter()
                .filter(|s| s.case == case.id)
                .map(|s| s.median_ns)
                .collect();
            if values.is_empty() {
                return None;
            }
            let median_ns = median(&values);
            Some(LimiterRow {
                case: case.id,
                what: case.what,
                role: case.role,
                median_ns,
                min_ns: values.iter().copied().fold(f64::INFINITY, f64::min),
                max_ns: values.iter().copied().fold(0.0, f64::max),
                met: (case.role != Role::Release).then_some(median_ns < limiter::TARGET_NS),
            })
        })
        .collect();
    LimiterReport {
        target_ns: limiter::TARGET_NS,
        cpu: run.cpu,
        command: run.command,
        rounds,
        warm_up_secs: run.warm_up_secs,
        measurement_secs: run.measurement_secs,
        rows,
        cpu_foreign: run.cpu_foreign,
        samples: run.samples,
    }
}

/// The slowest of the cases the target is about (the limiter's own decisions).
fn worst_decision(limiter: &LimiterReport) -> Option<&LimiterRow> {
    limiter
        .rows
        .iter()
        .filter(|row| row.role == Role::Decision)
        .max_by(|a, b| a.median_ns.total_cmp(&b.median_ns))
}

fn write_limiter(out: &mut String, limiter: &LimiterReport) -> std::fmt::Result {
    writeln!(out, "### Limiter decision (criterion)\n")?;
    writeln!(
        out,
        "`aiguard-daemon/benches/limiter.rs`, pinned to CPU {} with nothing else of the benchmark \
         running: `{}`. Every limit set at every level (requests per minute and per day, tokens \
         per minute, concurrency; the tenant's monthly quota). ns per iteration: criterion's \
         median of {} s of samples after {} s of warm-up, median over {} rounds (and the rounds' \
         range). Decisions build their `Demand` before the timed loop, as the limiter is asked \
         for it; the calendar row adds what the handler does per request to build it \
         (`Today::now()`, `month_left()`). `settle` reads the calendar itself, which is in its \
         figure.\n",
        limiter.cpu,
        limiter.command,
        limiter.measurement_secs,
        limiter.warm_up_secs,
        limiter.rounds
    )?;
    writeln!(
        out,
        "| case | what | ns (median) | rounds' range (ns) | < {:.0} ns |",
        limiter.target_ns
    )?;
    writeln!(out, "|---|---|---:|---:|:---:|")?;
    for row in &limiter.rows {
        let verdict = match (row.met, row.role) {
            (None, _) => "-",
            (Some(true), Role::Decision) => "PASS",
            (Some(false), Role::Decision) => "**MISS**",
            // Shown against the target, not counted in it.
            (Some(true), _) => "(PASS)",
            (Some(false), _) => "(MISS)",
        };
        writeln!(
            out,
            "| `{}` | {} | {:.1} | {:.1}-{:.1} | {verdict} |",
            row.case, row.what, row.median_ns, row.min_ns, row.max_ns
        )?;
    }
    writeln!(out)?;
    if let Some(worst) = worst_decision(limiter) {
        let met = worst.median_ns < limiter.target_ns;
        writeln!(
            out,
            "**{}**: a limiter decision under {:.0} ns: the slowest decision case, `{}`, takes \
             {:.0} ns.\n",
            if met { "PASS" } else { "MISS" },
            limiter.target_ns,
            worst.case,
            worst.median_ns
        )?;
    }
    Ok(())
}

/// A note when other processes shared the limiter bench's CPU.
fn limiter_quality_note(limiter: &LimiterReport) -> Option<String> {
    let busy = limiter
        .cpu_foreign
        .iter()
        .filter(|&&share| share > FOREIGN_WARNING)
        .count();
    (busy > 0).then(|| {
        format!(
            "the machine was not quiet during the limiter part: other processes took more than \
             {:.0}% of CPU {} in {busy} of {} rounds (up to {:.1}%); those rounds' ns are not \
             the limiter's alone.",
            FOREIGN_WARNING * 100.0,
            limiter.cpu,
            limiter.cpu_foreign.len(),
            limiter.cpu_foreign.iter().copied().fold(0.0, f64::max) * 100.0
        )
    })
}

fn throughput_rows(samples: &[ThroughputSample]) -> Vec<ThroughputRow> {
    let of = |value: fn(&ThroughputSample) -> f64| medians_by_leg(samples, |s| s.leg, value);
    let rate = of(|s| s.requests_per_sec);
    let proxy_cpu = of(|s| s.proxy_cpu_us_per_request.unwrap_or(f64::NAN));
    let upstream_cpu = of(|s| s.upstream_cpu_us_per_request);
    let proxy_busy = of(|s| s.proxy_cpu_busy);
    let load_busy = of(|s| s.load_cpu_busy);
    let foreign = of(|s| s.proxy_cpu_foreign);
    rate.into_iter()
        .map(|(leg, requests_per_sec)| ThroughputRow {
            leg,
            requests_per_sec,
            proxy_cpu_us_per_request: proxy_cpu.get(&leg).copied().filter(|us| !us.is_nan()),
            upstream_cpu_us_per_request: upstream_cpu[&leg],
            proxy_cpu_busy: proxy_busy[&leg],
            load_cpu_busy: load_busy[&leg],
            proxy_cpu_foreign: foreign[&leg],
        })
        .collect()
}

fn latency_rows(samples: &[LatencySample]) -> Vec<LatencyRow> {
    let of = |value: fn(&LatencySample) -> f64| medians_by_leg(samples, |s| s.leg, value);
    let rate = of(|s| s.rate);
    let p50 = of(|s| s.latency.p50_us);
    let p99 = of(|s| s.latency.p99_us);
    let proxy_cpu = of(|s| s.proxy_cpu_us_per_request.unwrap_or(f64::NAN));
    let lag = of(|s| s.lag.p99_us);
    let added = |leg: Leg, value: fn(&LatencySample) -> f64| {
        (leg != Leg::Direct)
            .then(|| {
                paired_median(
                    samples,
                    |s| s.round,
                    |s| s.leg,
                    |s| Some(value(s)),
                    (leg, Leg::Direct),
                    |ours, direct| ours - direct,
                )
            })
            .flatten()
    };
    rate.into_iter()
        .map(|(leg, rate)| LatencyRow {
            leg,
            rate,
            p50_us: p50[&leg],
            p99_us: p99[&leg],
            added_p50_us: added(leg, |s| s.latency.p50_us),
            added_p99_us: added(leg, |s| s.latency.p99_us),
            proxy_cpu_us_per_request: proxy_cpu.get(&leg).copied().filter(|us| !us.is_nan()),
            lag_p99_us: lag[&leg],
        })
        .collect()
}

/// What says how far to trust the run: other processes on the proxy CPU while a proxy was
/// measured, and a generator that fell behind its schedule.
fn quality_notes(samples: &Samples) -> Vec<String> {
    let mut notes = Vec::new();
    let foreign: Vec<f64> = samples
        .throughput
        .iter()
        .filter(|s| s.leg != Leg::Direct)
        .map(|s| s.proxy_cpu_foreign)
        .chain(
            samples
                .latency
                .iter()
                .filter(|s| s.leg != Leg::Direct)
                .map(|s| s.proxy_cpu_foreign),
        )
        .collect();
    let busy = foreign
        .iter()
        .filter(|&&share| share > FOREIGN_WARNING)
        .count();
    if busy > 0 {
        let worst = foreign.iter().copied().fold(0.0, f64::max);
        notes.push(format!(
            "the machine was not quiet: other processes took more than {:.0}% of the proxy CPU in \
             {busy} of {} proxy windows (up to {:.0}%). Throughput then is not the proxy's own; \
             CPU per request is less affected (it counts the proxy's own time), latency is.",
            FOREIGN_WARNING * 100.0,
            foreign.len(),
            worst * 100.0
        ));
    }
    let lags: Vec<f64> = samples.latency.iter().map(|s| s.lag.p99_us).collect();
    let late = lags.iter().filter(|&&lag| lag > LAG_WARNING_US).count();
    if late > 0 {
        notes.push(format!(
            "the fixed-rate generator's lag p99 exceeded {LAG_WARNING_US:.0} us in {late} of {} \
             windows (up to {:.0} us): the load CPU was too busy to keep to the schedule. Its \
             lag is left out of the latency, but requests then came in bunches.",
            lags.len(),
            lags.iter().copied().fold(0.0, f64::max)
        ));
    }
    notes
}

/// A table of the ratios that were measured, under `title`; nothing when none was.
fn write_ratios(out: &mut String, title: &str, ratios: &[(&str, Option<f64>)]) -> std::fmt::Result {
    if ratios.iter().all(|(_, ratio)| ratio.is_none()) {
        return Ok(());
    }
    writeln!(out, "### {title}\n")?;
    writeln!(out, "| measure | ratio |")?;
    writeln!(out, "|---|---:|")?;
    for (measure, ratio) in ratios {
        if let Some(ratio) = ratio {
            writeln!(out, "| {measure} | {ratio:.2}x |")?;
        }
    }
    writeln!(out)
}

fn ratios(samples: &Samples) -> Ratios {
    let pair = (Leg::Aiguard, Leg::Nginx);
    let divide = |ours: f64, theirs: f64| ours / theirs;
    Ratios {
        cpu_per_request: paired_median(
            &samples.throughput,
            |s| s.round,
            |s| s.leg,
            |s| s.proxy_cpu_us_per_request,
            pair,
            divide,
        ),
        throughput: paired_median(
            &samples.throughput,
            |s| s.round,
            |s| s.leg,
            |s| Some(s.requests_per_sec),
            pair,
            divide,
        ),
        cpu_per_request_at_fixed_rate: paired_median(
            &samples.latency,
            |s| s.round,
            |s| s.leg,
            |s| s.proxy_cpu_us_per_request,
            pair,
            divide,
        ),
        passthrough_cpu_per_request: paired_median(
            &samples.throughput,
            |s| s.round,
            |s| s.leg,
            |s| s.proxy_cpu_us_per_request,
            (Leg::Passthrough, Leg::Nginx),
            divide,
        ),
        protection_cpu_per_request: paired_median(
            &samples.throughput,
            |s| s.round,
            |s| s.leg,
            |s| s.proxy_cpu_us_per_request,
            (Leg::Aiguard, Leg::AiguardPlain),
            divide,
        ),
        protection_throughput: paired_median(
            &samples.throughput,
            |s| s.round,
            |s| s.leg,
            |s| Some(s.requests_per_sec),
            (Leg::Aiguard, Leg::AiguardPlain),
            divide,
        ),
    }
}

/// The first line a tool prints about itself, on stdout or stderr, whatever its exit status
/// (`nginx -v` writes to stderr, `wrk -v` exits 1).
fn first_line_of(cmd: &mut Command) -> Option<String> {
    let output = cmd.output().ok()?;
    let text = [output.stdout, output.stderr].concat();
    String::from_utf8_lossy(&text)
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .map(str::to_owned)
}

fn optional(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |value| format!("{value:.decimals$}"))
}

/// `1234567.8` as `1,234,568`.
fn grouped(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::gateway::{open_loop::Percentiles, wrk};

    fn throughput(round: usize, leg: Leg, rps: f64, cpu_us: Option<f64>) -> ThroughputSample {
        ThroughputSample {
            round,
            leg,
            requests: 1,
            seconds: 1.0,
            requests_per_sec: rps,
            proxy_cpu_us_per_request: cpu_us,
            upstream_cpu_us_per_request: 10.0,
            proxy_cpu_busy: 1.0,
            load_cpu_busy: 0.5,
            proxy_cpu_foreign: 0.0,
            wrk: wrk::Summary::default(),
        }
    }

    fn latency(round: usize, leg: Leg, p99_us: f64) -> LatencySample {
        let percentiles = Percentiles {
            p50_us: p99_us / 2.0,
            p99_us,
            max_us: p99_us,
        };
        LatencySample {
            round,
            leg,
            rate: 10_000.0,
            achieved_rate: 10_000.0,
            requests: 1,
            latency: percentiles,
            lag: percentiles,
            proxy_cpu_us_per_request: None,
            proxy_cpu_busy: 0.5,
            load_cpu_busy: 0.5,
            proxy_cpu_foreign: 0.0,
            generator_cpu_us_per_request: 10.0,
        }
    }

    #[test]
    fn ratios_and_added_latency_pair_rounds() {
        let samples = Samples {
            throughput: vec![
                throughput(1, Leg::Direct, 30_000.0, None),
                throughput(1, Leg::Nginx, 20_000.0, Some(40.0)),
                throughput(1, Leg::Aiguard, 25_000.0, Some(30.0)),
                throughput(2, Leg::Nginx, 10_000.0, Some(80.0)),
                throughput(2, Leg::Aiguard, 11_000.0, Some(70.0)),
            ],
            latency: vec![
                latency(1, Leg::Direct, 100.0),
                latency(1, Leg::Aiguard, 300.0),
                latency(2, Leg::Direct, 200.0),
                latency(2, Leg::Aiguard, 250.0),
            ],
        };
        let ratios = ratios(&samples);
        // Rounds: 30/40 = 0.75 and 70/80 = 0.875.
        assert_eq!(ratios.cpu_per_request, Some(0.8125));
        assert_eq!(ratios.throughput, Some((1.25 + 1.1) / 2.0));
        assert_eq!(ratios.cpu_per_request_at_fixed_rate, None);

        let rows = latency_rows(&samples.latency);
        let aiguard = rows.iter().find(|r| r.leg == Leg::Aiguard).unwrap();
        assert_eq!(aiguard.added_p99_us, Some((200.0 + 50.0) / 2.0));
        let direct = rows.iter().find(|r| r.leg == Leg::Direct).unwrap();
        assert_eq!(direct.added_p99_us, None);

        let rows = throughput_rows(&samples.throughput);
        assert_eq!(rows[0].leg, Leg::Direct);
        assert_eq!(rows[0].proxy_cpu_us_per_request, None);
        assert_eq!(rows[2].proxy_cpu_us_per_request, Some(50.0));
    }

    #[test]
    fn notes_say_when_the_machine_was_busy() {
        let mut busy = throughput(1, Leg::Nginx, 1.0, Some(1.0));
        busy.proxy_cpu_foreign = 0.4;
        let mut direct = throughput(1, Leg::Direct, 1.0, None);
        direct.proxy_cpu_foreign = 1.0;
        let samples = Samples {
            throughput: vec![direct, busy, throughput(1, Leg::Aiguard, 1.0, Some(1.0))],
            latency: vec![
                latency(1, Leg::Direct, 100.0),
                latency(1, Leg::Nginx, 500.0),
            ],
        };
        let notes = quality_notes(&samples);
        assert_eq!(notes.len(), 2, "{notes:?}");
        // The direct leg does not use the proxy CPU: only the proxies' windows count.
        assert!(
            notes[0].contains("in 1 of 3 proxy windows (up to 40%)"),
            "{}",
            notes[0]
        );
        assert!(
            notes[1].contains("in 1 of 2 windows (up to 500 us)"),
            "{}",
            notes[1]
        );
        assert!(quality_notes(&Samples::default()).is_empty());
    }

    #[test]
    fn groups_thousands() {
        assert_eq!(grouped(999.4), "999");
        assert_eq!(grouped(1_234_567.8), "1,234,568");
        assert_eq!(optional(None, 1), "-");
        assert_eq!(optional(Some(1.26), 1), "1.3");
    }
}
