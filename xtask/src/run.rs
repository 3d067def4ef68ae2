//! `cargo xtask run -- ARGS...`: the daemon as a developer tries it, built as CI builds it.
//!
//! `cargo xtask run -- --interface eth0` sets the machine up, builds the release daemon and
//! becomes `aiguard run --interface eth0` (on the embedded default store unless ARGS say
//! otherwise).

use std::{
    ffi::OsString,
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, setup, shown};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Arguments for `aiguard run`, after `--` (e.g. `-- --interface eth0`).
    #[arg(last = true)]
    pub daemon_args: Vec<OsString>,
}

pub fn run(args: RunArgs) -> Result<()> {
    setup::run()?;
    let daemon = build_daemon()?;
    let mut cmd = Command::new(&daemon);
    cmd.arg("run").args(&args.daemon_args);
    eprintln!("+ {}", shown(&cmd));
    // exec rather than spawn: the daemon takes over this process, so a terminal's Ctrl-C or a
    // supervisor's SIGTERM reaches it directly, and its exit code is the one `cargo` reports.
    let error = cmd.exec();
    Err(error).with_context(|| format!("could not execute {}", daemon.display()))
}

/// Builds the release daemon and returns the path of the `aiguard` binary.
///
/// The path comes from cargo's own build messages rather than `target/release/aiguard`, so a
/// `CARGO_TARGET_DIR` in the environment is honoured instead of running a stale binary.
pub(crate) fn build_daemon() -> Result<PathBuf> {
    let mut build = cargo();
    build.args([
        "build",
        "--release",
        "-p",
        "aiguard-daemon",
        "--bin",
        "aiguard",
    ]);
    built_artifact(build, "aiguard", daemon_executable)
}

/// Builds one of aiguard-daemon's examples, release, and returns its executable's path.
pub(crate) fn build_example(name: &str) -> Result<PathBuf> {
    let mut build = cargo();
    build.args([
        "build",
        "--release",
        "-p",
        "aiguard-daemon",
        "--example",
        name,
    ]);
    built_artifact(build, name, |message| example_executable(message, name))
}

/// Runs a cargo build (`build`, without `--message-format`) and returns the path of the
/// artifact `pick` finds in its JSON messages; `what` names it in errors.
pub(crate) fn built_artifact(
    mut build: Command,
    what: &str,
    pick: impl Fn(&str) -> Option<PathBuf>,
) -> Result<PathBuf> {
    build
        // Diagnostics and progress still go to stderr, rendered; only the JSON is captured.
        .arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped());
    let line = shown(&build);
    eprintln!("+ {line}");
    let mut child = build
        .spawn()
        .with_context(|| format!("could not start `{line}`"))?;
    let stdout = child
        .stdout
        .take()
        .context("cargo's stdout was not captured")?;
    let mut executable = None;
    for message in BufReader::new(stdout).lines() {
        let message = message.context("reading cargo's build messages")?;
        if let Some(path) = pick(&message) {
            executable = Some(path);
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    executable.with_context(|| format!("`{line}` reported no `{what}` executable"))
}

/// The executable path when `message` is cargo's artifact message for the `aiguard` binary.
fn daemon_executable(message: &str) -> Option<PathBuf> {
    let message: serde_json::Value = serde_json::from_str(message).ok()?;
    if message["reason"] != "compiler-artifact" || message["target"]["name"] != "aiguard" {
        return None;
    }
    message["executable"].as_str().map(PathBuf::from)
}

/// The executable path when `message` is cargo's artifact message for the example `name`.
fn example_executable(message: &str, name: &str) -> Option<PathBuf> {
    let message: serde_json::Value = serde_json::from_str(message).ok()?;
    let target = &message["target"];
    let is_example = target["kind"]
        .as_array()
        .is_some_and(|kinds| kinds.iter().any(|kind| kind == "example"));
    if message["reason"] != "compiler-artifact" || target["name"] != name || !is_example {
        return None;
    }
    message["executable"].as_str().map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_daemon_in_cargo_messages() {
        let artifact = r#"{"reason":"compiler-artifact","target":{"name":"aiguard","kind":["bin"]},"executable":"/t/release/aiguard"}"#;
        assert_eq!(
            daemon_executable(artifact),
            Some(PathBuf::from("/t/release/aiguard"))
        );
        let library = r#"{"reason":"compiler-artifact","target":{"name":"aiguard_common","kind":["lib"]},"executable":null}"#;
        assert_eq!(daemon_executable(library), None);
        assert_eq!(
            daemon_executable(r#"{"reason":"build-finished","success":true}"#),
            None
        );
    }

    #[test]
    fn finds_an_example_in_cargo_messages() {
        let example = r#"{"reason":"compiler-artifact","target":{"name":"passthrough","kind":["example"]},"executable":"/t/release/examples/passthrough"}"#;
        assert_eq!(
            example_executable(example, "passthrough"),
            Some(PathBuf::from("/t/release/examples/passthrough"))
        );
        assert_eq!(example_executable(example, "other"), None);
        let bin = r#"{"reason":"compiler-artifact","target":{"name":"passthrough","kind":["bin"]},"executable":"/t/release/passthrough"}"#;
        assert_eq!(example_executable(bin, "passthrough"), None);
    }
}
