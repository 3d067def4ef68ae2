//! `cargo xtask test`: what CI runs (`.ci/run`), and what a developer runs before pushing.
//!
//! Sets the machine up, then checks formatting, lints the host crates (stable) and the eBPF crate
//! (nightly, its own target), and builds and runs every test in release mode (the eBPF object
//! and the timing-sensitive tests are faster that way). Every step runs even when an earlier
//! one failed, so one CI run reports everything; the summary lists what failed.

use std::{
    env,
    ffi::OsString,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::{cargo, nightly_cargo, run_checked, setup};

/// The eBPF crate is `no_std` and needs nightly features: the stable host steps leave it out and
/// a nightly step lints it for its own target.
const EBPF_CRATE: &str = "aiguard-ebpf";

#[derive(clap::Args, Debug)]
pub struct TestArgs {
    /// Skip the format check and clippy, to iterate on a failing test. CI never skips them.
    #[arg(long)]
    pub no_lint: bool,
    /// Extra arguments for `cargo test`, after `--`: a test name filter, `-p PACKAGE` (instead
    /// of the whole workspace), or `-- --nocapture` for the test binaries.
    #[arg(last = true)]
    pub cargo_test_args: Vec<OsString>,
}

struct Outcome {
    step: &'static str,
    passed: bool,
    took: Duration,
}

pub fn run(args: TestArgs) -> Result<()> {
    if running_in_ci() {
        // The tests attach XDP programs, create namespaces and pin maps: without root they
        // would fail one by one, or worse be skipped and pass.
        setup::require_root("CI=true: `cargo xtask test`")?;
    }
    setup::run()?;

    let mut steps: Vec<(&'static str, Command)> = Vec::new();
    if args.no_lint {
        eprintln!("test: --no-lint: skipping the format check and clippy");
    } else {
        let mut fmt = cargo();
        fmt.args(["fmt", "--all", "--", "--check"]);
        steps.push(("fmt", fmt));

        let mut clippy = cargo();
        clippy
            .args(["clippy", "--workspace", "--exclude", EBPF_CRATE])
            .args(["--release", "--all-targets", "--", "-D", "warnings"]);
        steps.push(("clippy", clippy));

        let mut clippy_ebpf = nightly_cargo();
        clippy_ebpf
            .args(["clippy", "-p", EBPF_CRATE, "--release"])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .args(["--", "-D", "warnings"]);
        steps.push(("clippy (eBPF)", clippy_ebpf));
    }

    let mut tests = cargo();
    tests.arg("test");
    // cargo ignores `-p` next to `--workspace`: let a chosen package narrow the run.
    if !selects_packages(&args.cargo_test_args) {
        tests.args(["--workspace", "--exclude", EBPF_CRATE]);
    }
    tests
        .arg("--release")
        .args(&args.cargo_test_args)
        // The tests must be safe to run in parallel; a thread count inherited from the
        // environment would hide it when they are not.
        .env_remove("RUST_TEST_THREADS");
    steps.push(("test", tests));

    let mut outcomes = Vec::new();
    for (step, mut cmd) in steps {
        eprintln!("\n=== test: {step}");
        let started = Instant::now();
        let result = run_checked(&mut cmd);
        if let Err(error) = &result {
            eprintln!("test: {step} failed: {error:#}");
        }
        outcomes.push(Outcome {
            step,
            passed: result.is_ok(),
            took: started.elapsed(),
        });
    }

    eprintln!("\n=== test: summary");
    for outcome in &outcomes {
        eprintln!(
            "  {:<4}  {:<14} {:>8.1?}",
            if outcome.passed { "ok" } else { "FAIL" },
            outcome.step,
            outcome.took
        );
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|outcome| !outcome.passed)
        .map(|outcome| outcome.step)
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} steps failed: {}",
            failed.len(),
            outcomes.len(),
            failed.join(", ")
        );
    }
    eprintln!("test: all {} steps passed", outcomes.len());
    Ok(())
}

/// Whether the `cargo test` arguments (before a `--` that starts the test binaries' own) name
/// packages.
fn selects_packages(cargo_test_args: &[OsString]) -> bool {
    cargo_test_args
        .iter()
        .map(|arg| arg.to_string_lossy())
        .take_while(|arg| arg != "--")
        .any(|arg| arg == "--package" || arg.starts_with("--package=") || arg.starts_with("-p"))
}

/// CI services set `CI=true` (some `CI=1`).
fn running_in_ci() -> bool {
    env::var("CI").is_ok_and(|value| value.eq_ignore_ascii_case("true") || value == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn package_selection_is_seen_before_the_test_binary_arguments_only() {
        assert!(selects_packages(&args(&["-p", "aiguard-tests"])));
        assert!(selects_packages(&args(&["-paiguard-tests"])));
        assert!(selects_packages(&args(&[
            "--package=aiguard-daemon",
            "bans"
        ])));
        assert!(!selects_packages(&args(&["bans", "--", "--nocapture"])));
        assert!(!selects_packages(&args(&["--", "-p"])));
        assert!(!selects_packages(&[]));
    }
}
