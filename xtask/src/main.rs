//! Developer and CI entry points for aiguard: `cargo xtask <command>`.
//!
//! A fresh machine has only rustup's `stable` and `nightly`, cargo, gcc and python3. Everything
//! else the project needs (nightly components, bpf-linker, Debian tools, bpffs) is installed from
//! here, so that CI (`.ci/run` is just `cargo xtask test`) and a developer's box run the very same
//! commands.

mod bench;
mod run;
mod setup;
mod test;

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Set up, build, run, test and benchmark aiguard"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand, Debug)]
enum Task {
    /// Install what building and testing needs (nightly components, bpf-linker, Debian tools,
    /// bpffs). Idempotent: a second run only checks.
    Setup,
    /// Set up, build the daemon (release) and run `aiguard run ARGS...`, so the daemon a
    /// developer tries is the one CI tests.
    Run(run::RunArgs),
    /// Set up, check formatting and lints, then build and run every test: what CI runs.
    Test(test::TestArgs),
    /// Build the XDP objects with the nightly toolchain and print their paths, for tools (the
    /// benchmarks) that load them without the daemon.
    BuildEbpf,
    /// Measure aiguard: per-packet cost and throughput.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    match run_task(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The cause chain on one line, never a backtrace (RUST_BACKTRACE is often set in CI):
            // what failed matters, not where in xtask.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_task(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup::run(),
        Task::Run(args) => run::run(args),
        Task::Test(args) => test::run(args),
        Task::BuildEbpf => {
            let objects = build_ebpf()?;
            // The paths are all that goes to stdout (progress, ours and cargo's, goes to stderr),
            // so scripts can capture them.
            println!("{}", objects.aiguard.display());
            println!("{}", objects.drop_all.display());
            Ok(())
        }
        Task::Bench(args) => bench::run(args),
    }
}

/// The workspace root. Every command runs from there, whatever directory `cargo xtask` was
/// started in, so relative paths (`target/...`) mean the same thing everywhere.
pub(crate) fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one directory below the workspace root")
}

/// `cargo` of the toolchain in effect for the workspace (stable), through rustup's proxy.
pub(crate) fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    cmd
}

/// `cargo` of the nightly toolchain: the eBPF crate needs `-Z build-std=core`. Spelled
/// `rustup run nightly` rather than `cargo +nightly` so it works even when the `cargo` found first
/// is not rustup's proxy.
pub(crate) fn nightly_cargo() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", setup::NIGHTLY, "cargo"])
        .current_dir(workspace_root());
    cmd
}

/// The command line as a shell would show it, for echoing before running and in errors.
pub(crate) fn shown(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter_map(|(key, value)| {
            value.map(|value| format!("{}={}", key.to_string_lossy(), value.to_string_lossy()))
        })
        .collect();
    parts.push(cmd.get_program().to_string_lossy().into_owned());
    parts.extend(cmd.get_args().map(quoted));
    parts.join(" ")
}

fn quoted(arg: &OsStr) -> String {
    let arg = arg.to_string_lossy();
    if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
        format!("'{}'", arg.replace('\'', r"'\''"))
    } else {
        arg.into_owned()
    }
}

/// Echoes `cmd` (to stderr, with cargo's own progress), runs it with inherited stdio (so its output streams) and fails on a non-zero
/// exit.
pub(crate) fn run_checked(cmd: &mut Command) -> Result<()> {
    let line = shown(cmd);
    eprintln!("+ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout; for the checks that decide whether a step is
/// needed.
pub(crate) fn stdout_of(cmd: &mut Command) -> Result<String> {
    let line = shown(cmd);
    let output = cmd
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !output.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).with_context(|| format!("`{line}` printed non-UTF-8"))
}

/// The two XDP objects that `build-ebpf` produces.
pub(crate) struct EbpfObjects {
    /// The daemon's program.
    pub aiguard: PathBuf,
    /// The drop-everything program: the benchmarks' ceiling.
    pub drop_all: PathBuf,
}

/// Builds the eBPF crate with nightly into `<workspace>/target/bpfel-unknown-none/release`.
///
/// `CARGO_TARGET_DIR` is removed so the objects always land at that well-known path, whatever
/// the caller's environment says.
pub(crate) fn build_ebpf() -> Result<EbpfObjects> {
    setup::ensure_ebpf_toolchain()?;
    run_checked(
        nightly_cargo()
            .env_remove("CARGO_TARGET_DIR")
            .args(["build", "-p", "aiguard-ebpf", "--release"])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"]),
    )
    .context("building the XDP programs")?;
    let dir = workspace_root().join("target/bpfel-unknown-none/release");
    let objects = EbpfObjects {
        aiguard: dir.join("aiguard"),
        drop_all: dir.join("aiguard-drop-all"),
    };
    for object in [&objects.aiguard, &objects.drop_all] {
        if !object.is_file() {
            bail!(
                "the eBPF build succeeded but {} does not exist",
                object.display()
            );
        }
    }
    Ok(objects)
}
