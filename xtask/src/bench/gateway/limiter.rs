//! The limiter part: what one in-memory limiter decision costs, measured by criterion
//! (`aiguard-daemon/benches/limiter.rs`), against the target of a decision under 200 ns.
//!
//! The bench is built once (`cargo bench --no-run`, on every CPU), then its executable runs once
//! per round the way `cargo bench` runs it (`--bench`), under `taskset -c CPU` on the proxy CPU,
//! before any server starts: every round runs the same build on an otherwise idle machine. A
//! round's figure for a case is criterion's median (over its samples, of the mean time per
//! iteration), read from `target/criterion/limiter/<case>/new/estimates.json`; the report gives
//! the median over rounds. The group's directory is removed before each round, so that a case
//! that did not run is never read from an earlier run.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, ensure};
use serde::{Deserialize, Serialize};

use super::super::cpu::CpuTimes;
use crate::{shown, workspace_root};

/// The target: a limiter decision under this.
pub const TARGET_NS: f64 = 200.0;
/// criterion's benchmark group in `benches/limiter.rs`.
const GROUP: &str = "limiter";
/// criterion's warm-up per case (its measurement time is `--limiter-seconds`).
const WARM_UP_SECS: f64 = 0.5;

/// What a case's figure says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A decision by the limiter alone: held to the target.
    Decision,
    /// A decision with the handler's own per-request work on its `Demand` (the calendar read):
    /// shown against the target, not counted in it.
    HandlerDecision,
    /// The release of a decision, or a request's whole limiter cost: no target.
    Release,
}

/// One criterion benchmark of the group.
pub struct Case {
    /// The benchmark's name in `benches/limiter.rs` (and its directory under the group's).
    pub id: &'static str,
    pub what: &'static str,
    pub role: Role,
}

/// Every case of `benches/limiter.rs`, in its order. A case missing from a run fails it.
pub const CASES: [Case; 8] = [
    Case {
        id: "admit_tenant_key",
        what: "decision, one key: tenant + key levels, monthly quota",
        role: Role::Decision,
    },
    Case {
        id: "admit_tenant_key_model",
        what: "decision, one key: tenant + key + model levels, monthly quota",
        role: Role::Decision,
    },
    Case {
        id: "admit_1000_keys",
        what: "decision over 1,000 keys (one tenant each, shuffled): three levels",
        role: Role::Decision,
    },
    Case {
        id: "refuse_concurrency",
        what: "decision refused: the tenant's concurrency is full",
        role: Role::Decision,
    },
    Case {
        id: "admit_with_calendar",
        what: "decision, three levels, with the handler's calendar read per request",
        role: Role::HandlerDecision,
    },
    Case {
        id: "settle",
        what: "settle (release): tokens reconciled, slots freed; three levels",
        role: Role::Release,
    },
    Case {
        id: "admit_settle",
        what: "admit + settle, one key, three levels: a request's limiter cost",
        role: Role::Release,
    },
    Case {
        id: "admit_settle_1000_keys",
        what: "admit + settle over 1,000 keys, three levels",
        role: Role::Release,
    },
];

/// What to run.
pub struct Plan {
    pub cpu: usize,
    pub rounds: usize,
    /// criterion's measurement time per case.
    pub measurement_secs: f64,
}

/// One case in one round.
#[derive(Clone, Debug, Serialize)]
pub struct LimiterSample {
    pub round: usize,
    pub case: &'static str,
    /// criterion's median, ns per iteration, and its 95% confidence interval.
    pub median_ns: f64,
    pub median_low_ns: f64,
    pub median_high_ns: f64,
    pub mean_ns: f64,
}

/// The part's results.
#[derive(Debug, Serialize)]
pub struct LimiterRun {
    pub cpu: usize,
    /// How each round ran the bench.
    pub command: String,
    pub warm_up_secs: f64,
    pub measurement_secs: f64,
    /// Per round, the share of the CPU's time that went to other processes while the bench
    /// ran: above a few percent, that round's figures are not the limiter's alone.
    pub cpu_foreign: Vec<f64>,
    pub samples: Vec<LimiterSample>,
}

pub fn run(plan: &Plan) -> Result<LimiterRun> {
    let bench = build()?;
    let home = workspace_root().join("target/criterion");
    let group_dir = home.join(GROUP);
    let mut cmd = Command::new("taskset");
    cmd.arg("-c")
        .arg(plan.cpu.to_string())
        .arg(&bench)
        .arg("--bench")
        .args(["--warm-up-time", &WARM_UP_SECS.to_string()])
        .args(["--measurement-time", &plan.measurement_secs.to_string()])
        .arg("--noplot")
        .env("CRITERION_HOME", &home)
        // Where `cargo bench` runs it.
        .current_dir(workspace_root().join("aiguard-daemon"))
        .stdin(Stdio::null())
        // criterion's progress goes with the benchmark's own, to stderr: stdout is the report.
        .stdout(std::io::stderr());
    let line = shown(&cmd);
    let mut run = LimiterRun {
        cpu: plan.cpu,
        command: line.clone(),
        warm_up_secs: WARM_UP_SECS,
        measurement_secs: plan.measurement_secs,
        cpu_foreign: Vec::new(),
        samples: Vec::new(),
    };
    for round in 1..=plan.rounds {
        eprintln!("bench gateway: round {round}/{}: limiter", plan.rounds);
        match fs::remove_dir_all(&group_dir) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(error).with_context(|| format!("removing {}", group_dir.display()));
            }
        }
        eprintln!("+ {line}");
        let cpu_before = CpuTimes::read(plan.cpu)?;
        let children_before = children_cpu_secs()?;
        let status = cmd
            .status()
            .with_context(|| format!("could not run `{line}`"))?;
        let bench_secs = children_cpu_secs()? - children_before;
        let window = CpuTimes::read(plan.cpu)?.since(&cpu_before);
        ensure!(status.success(), "`{line}` failed ({status})");
        let foreign = if window.total_secs() > 0.0 {
            ((window.busy_secs() - bench_secs) / window.total_secs()).clamp(0.0, 1.0)
        } else {
            0.0
        };
        if foreign > super::FOREIGN_WARNING {
            eprintln!(
                "bench gateway: warning: round {round}, limiter: other processes took {:.0}% of \
                 CPU {}",
                foreign * 100.0,
                plan.cpu
            );
        }
        run.cpu_foreign.push(foreign);
        for case in &CASES {
            let sample = read_case(&group_dir, round, case)?;
            eprintln!(
                "bench gateway:   {:<24} {:>7.1} ns",
                case.id, sample.median_ns
            );
            run.samples.push(sample);
        }
    }
    Ok(run)
}

/// Builds the bench (`cargo bench --no-run`): its executable.
fn build() -> Result<PathBuf> {
    let mut build = crate::cargo();
    build.args([
        "bench",
        "-p",
        "aiguard-daemon",
        "--bench",
        GROUP,
        "--no-run",
    ]);
    crate::run::built_artifact(build, &format!("{GROUP} bench"), bench_executable)
}

/// The executable path when `message` is cargo's artifact message for the limiter bench.
fn bench_executable(message: &str) -> Option<PathBuf> {
    let message: serde_json::Value = serde_json::from_str(message).ok()?;
    let target = &message["target"];
    let is_bench = target["kind"]
        .as_array()
        .is_some_and(|kinds| kinds.iter().any(|kind| kind == "bench"));
    if message["reason"] != "compiler-artifact" || target["name"] != GROUP || !is_bench {
        return None;
    }
    message["executable"].as_str().map(PathBuf::from)
}

/// The part of criterion's `estimates.json` the report uses (nanoseconds per iteration).
#[derive(Deserialize)]
struct Estimates {
    mean: Estimate,
    median: Estimate,
}

#[derive(Deserialize)]
struct Estimate {
    point_estimate: f64,
    confidence_interval: Interval,
}

#[derive(Deserialize)]
struct Interval {
    lower_bound: f64,
    upper_bound: f64,
}

fn read_case(group_dir: &Path, round: usize, case: &'static Case) -> Result<LimiterSample> {
    let path = group_dir.join(case.id).join("new/estimates.json");
    let text = fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (is `{}` still a case of aiguard-daemon/benches/limiter.rs?)",
            path.display(),
            case.id
        )
    })?;
    parse_estimates(&text, round, case).with_context(|| format!("parsing {}", path.display()))
}

fn parse_estimates(text: &str, round: usize, case: &'static Case) -> Result<LimiterSample> {
    let estimates: Estimates = serde_json::from_str(text)?;
    let median = estimates.median;
    ensure!(
        median.point_estimate.is_finite() && median.point_estimate > 0.0,
        "a median of {} ns",
        median.point_estimate
    );
    Ok(LimiterSample {
        round,
        case: case.id,
        median_ns: median.point_estimate,
        median_low_ns: median.confidence_interval.lower_bound,
        median_high_ns: median.confidence_interval.upper_bound,
        mean_ns: estimates.mean.point_estimate,
    })
}

/// User + system time of this process's waited-for children, in seconds.
fn children_cpu_secs() -> Result<f64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage writes a whole rusage through the valid pointer it is given.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getrusage");
    }
    // SAFETY: getrusage succeeded, so it filled `usage`.
    let usage = unsafe { usage.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(secs(usage.ru_utime) + secs(usage.ru_stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_bench_in_cargo_messages() {
        let bench = r#"{"reason":"compiler-artifact","target":{"name":"limiter","kind":["bench"]},"executable":"/t/release/deps/limiter-0123"}"#;
        assert_eq!(
            bench_executable(bench),
            Some(PathBuf::from("/t/release/deps/limiter-0123"))
        );
        let library = r#"{"reason":"compiler-artifact","target":{"name":"limiter","kind":["lib"]},"executable":null}"#;
        assert_eq!(bench_executable(library), None);
        assert_eq!(
            bench_executable(r#"{"reason":"build-finished","success":true}"#),
            None
        );
    }

    #[test]
    fn reads_criterions_median() {
        let text = r#"{"mean":{"confidence_interval":{"confidence_level":0.95,"lower_bound":118.1,"upper_bound":119.5},"point_estimate":118.7,"standard_error":0.35},"median":{"confidence_interval":{"confidence_level":0.95,"lower_bound":117.4,"upper_bound":118.0},"point_estimate":117.7,"standard_error":0.12},"median_abs_dev":{"confidence_interval":{"confidence_level":0.95,"lower_bound":0.7,"upper_bound":1.5},"point_estimate":1.0,"standard_error":0.18},"slope":null,"std_dev":{"confidence_interval":{"confidence_level":0.95,"lower_bound":2.0,"upper_bound":4.8},"point_estimate":3.5,"standard_error":0.7}}"#;
        let sample = parse_estimates(text, 2, &CASES[0]).expect("parses");
        assert_eq!(sample.round, 2);
        assert_eq!(sample.case, "admit_tenant_key");
        assert_eq!(sample.median_ns, 117.7);
        assert_eq!(
            (sample.median_low_ns, sample.median_high_ns),
            (117.4, 118.0)
        );
        assert_eq!(sample.mean_ns, 118.7);
        assert!(parse_estimates(r#"{"mean":{}}"#, 1, &CASES[0]).is_err());
    }

    #[test]
    fn every_case_is_a_benchmark_of_the_bench() {
        let path = workspace_root().join("aiguard-daemon/benches/limiter.rs");
        let bench = fs::read_to_string(&path).expect("the limiter bench exists");
        for case in &CASES {
            assert!(
                bench.contains(&format!("bench_function(\"{}\"", case.id)),
                "{} has no benchmark {}",
                path.display(),
                case.id
            );
        }
        assert_eq!(bench.matches("bench_function(").count(), CASES.len());
        assert!(bench.contains(&format!("benchmark_group(\"{GROUP}\")")));
    }

    #[test]
    fn case_ids_are_distinct() {
        let ids: std::collections::BTreeSet<_> = CASES.iter().map(|case| case.id).collect();
        assert_eq!(ids.len(), CASES.len());
    }
}
