//! aiguard's gateway leg: the release daemon with a `[gateway]` in front of the same upstream
//! and a tier whose limit every request is checked against, and the API keys the load uses
//! (one tenant per key, created through the CLI as an operator would).
//!
//! The daemon loads its XDP program (no interface is needed when a gateway is configured), so it
//! runs as root, with its maps pinned in a bpffs directory of its own that goes when the run
//! ends.

use std::{
    ffi::OsStr,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use super::{chat, process::Pinned};
use crate::bench::object::PinDir;

/// How long the daemon may take to answer `status` after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// `keys add` calls in flight at once.
const PARALLEL_KEY_ADDS: usize = 8;
const POLL: Duration = Duration::from_millis(50);

/// The tier every benchmark key belongs to.
const TIER: &str = "bench";

/// Whether abuse detection and priority queueing are on: the same daemon is reloaded between
/// the two legs that measure what they cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection {
    /// Every detector enforcing (none fires: the thresholds are above what the load does),
    /// and the upstream's slots shared by weight (more slots than the load's connections, so
    /// nothing waits: the cost of the bookkeeping, not of queueing).
    On,
    /// `[detect] enabled = false`, no `upstream_slots`.
    Off,
}

/// A running daemon; stopped by PID, and its pins removed, on drop.
pub struct Gateway {
    // Declared before `pins`: the daemon stops before its pin directory goes.
    process: Pinned,
    pins: PinDir,
    binary: PathBuf,
    socket: PathBuf,
    pub addr: SocketAddr,
    config: PathBuf,
    upstream: SocketAddr,
    per_minute: u64,
    protection: Protection,
}

impl Gateway {
    /// Starts `binary` with a gateway on `addr` in front of `upstream`, pinned to `cpu`, and
    /// waits until it answers `status`. Its config, state, socket and log go in `dir`.
    pub fn start(
        binary: &Path,
        dir: &Path,
        cpu: usize,
        addr: SocketAddr,
        upstream: SocketAddr,
        per_minute: u64,
    ) -> Result<Self> {
        let config = dir.join("aiguard.toml");
        fs::write(
            &config,
            config_toml(addr, upstream, per_minute, Protection::On),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let state = dir.join("aiguard-state");
        fs::create_dir(&state).with_context(|| format!("creating {}", state.display()))?;
        let socket = dir.join("aiguard.sock");
        let pins = PinDir::create()?;
        let args: [&OsStr; 10] = [
            "--socket".as_ref(),
            socket.as_os_str(),
            "run".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
            "--bpffs-dir".as_ref(),
            pins.path().as_os_str(),
            "--state-dir".as_ref(),
            state.as_os_str(),
            // Like nginx's `error_log warn` and `access_log off`: nothing logged per request.
            "--log=warn".as_ref(),
        ];
        let process = Pinned::spawn("aiguard", cpu, binary, &args, &dir.join("aiguard.log"))?;
        let mut gateway = Self {
            process,
            pins,
            binary: binary.to_owned(),
            socket,
            addr,
            config,
            upstream,
            per_minute,
            protection: Protection::On,
        };
        gateway.wait_ready()?;
        Ok(gateway)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// An error, with the end of its log, if the daemon has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        self.process.ensure_running()
    }

    /// Turns detection and queueing on or off (`aiguard reload` of a rewritten config).
    pub fn set_protection(&mut self, protection: Protection) -> Result<()> {
        if protection == self.protection {
            return Ok(());
        }
        let toml = config_toml(self.addr, self.upstream, self.per_minute, protection);
        fs::write(&self.config, toml)
            .with_context(|| format!("writing {}", self.config.display()))?;
        let mut cmd = self.cli();
        cmd.arg("reload");
        let line = crate::shown(&cmd);
        let output = cmd
            .output()
            .with_context(|| format!("could not run `{line}`"))?;
        if !output.status.success() {
            bail!(
                "`{line}` failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        self.protection = protection;
        Ok(())
    }

    /// The CLI talking to this daemon.
    fn cli(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--socket").arg(&self.socket);
        cmd
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.process.ensure_running()?;
            let status = self
                .cli()
                .arg("status")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .context("running aiguard status")?;
            if status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the daemon did not answer `status` within {READY_TIMEOUT:?}; its log ends:\n{}",
                    self.process.log_tail()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Creates `count` keys in tier [`TIER`], tenant `t0`, `t1`, ..., a few CLI calls at a time,
    /// and returns them once the gateway answers a request made with the first.
    pub fn add_keys(&mut self, count: usize) -> Result<Vec<String>> {
        let started = Instant::now();
        let mut keys = Vec::with_capacity(count);
        let tenants: Vec<usize> = (0..count).collect();
        for batch in tenants.chunks(PARALLEL_KEY_ADDS) {
            let mut calls = Vec::with_capacity(batch.len());
            for &tenant in batch {
                let mut cmd = self.cli();
                cmd.args(["keys", "add", "--tenant", &format!("t{tenant}")])
                    .args(["--tier", TIER, "--json"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                let line = crate::shown(&cmd);
                let child = cmd
                    .spawn()
                    .with_context(|| format!("could not start `{line}`"))?;
                calls.push((line, child));
            }
            for (line, child) in calls {
                let output = child
                    .wait_with_output()
                    .with_context(|| format!("waiting for `{line}`"))?;
                if !output.status.success() {
                    bail!(
                        "`{line}` failed ({}): {}",
                        output.status,
                        String::from_utf8_lossy(&output.stderr).trim()
                    );
                }
                let stdout = String::from_utf8_lossy(&output.stdout);
                keys.push(parse_added_key(&stdout).with_context(|| format!("`{line}`"))?);
            }
        }
        eprintln!(
            "bench gateway: {count} keys added in {:.1?}",
            started.elapsed()
        );
        let first = keys.first().context("no keys")?;
        if let Err(error) = chat::wait_until_serving(self.addr, first, READY_TIMEOUT) {
            self.process.ensure_running()?;
            return Err(error).with_context(|| {
                format!(
                    "aiguard's gateway; the daemon's log ends:\n{}",
                    self.process.log_tail()
                )
            });
        }
        Ok(keys)
    }

    /// SIGTERM by PID; an error if the daemon exits unsuccessfully. The pins go afterwards.
    pub fn stop(self) -> Result<()> {
        let Self { process, pins, .. } = self;
        let stopped = process.stop();
        drop(pins);
        stopped
    }
}

/// The daemon's configuration: a gateway on `listen` in front of `upstream`, and the tier the
/// benchmark's keys are in, limited to `per_minute` requests per key; with or without
/// detection and queueing.
pub fn config_toml(
    listen: SocketAddr,
    upstream: SocketAddr,
    per_minute: u64,
    protection: Protection,
) -> String {
    let (slots, weight, detect) = match protection {
        // The load's 1,000 keys all come from 127.0.0.1: key spraying's threshold is above it.
        Protection::On => (
            "upstream_slots = 4096\n",
            "weight = 10\n",
            "[detect]
[detect.credential_stuffing]
shadow = false
[detect.error_storm]
shadow = false
[detect.key_sharing]
shadow = false
[detect.key_spraying]
shadow = false
threshold = 1000000
[detect.rate_spike]
shadow = false
",
        ),
        Protection::Off => ("", "", "[detect]\nenabled = false\n"),
    };
    format!(
        "# Written by `cargo xtask bench gateway`.
[gateway]
listen = [\"{listen}\"]
upstreams = [\"http://{upstream}\"]
{slots}
[tiers.{TIER}]
requests_per_minute = {per_minute}
{weight}
{detect}"
    )
}

/// The key in `aiguard keys add --json`'s output.
fn parse_added_key(stdout: &str) -> Result<String> {
    #[derive(Deserialize)]
    struct Added {
        key: String,
    }
    let added: Added = serde_json::from_str(stdout.trim())
        .with_context(|| format!("expected a JSON object with a \"key\", got {stdout:?}"))?;
    if added.key.is_empty()
        || added
            .key
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        bail!("unusable key {:?}", added.key);
    }
    Ok(added.key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_gateway_upstream_and_tier() {
        let toml = config_toml(
            SocketAddr::from(([127, 0, 0, 1], 8002)),
            SocketAddr::from(([127, 0, 0, 1], 8001)),
            600_000,
            Protection::On,
        );
        assert!(toml.contains("[gateway]\nlisten = [\"127.0.0.1:8002\"]\n"));
        assert!(toml.contains("upstreams = [\"http://127.0.0.1:8001\"]\n"));
        assert!(toml.contains("[tiers.bench]\nrequests_per_minute = 600000\n"));
        assert!(toml.contains("upstream_slots = 4096\n"));
        let off = config_toml(
            SocketAddr::from(([127, 0, 0, 1], 8002)),
            SocketAddr::from(([127, 0, 0, 1], 8001)),
            600_000,
            Protection::Off,
        );
        assert!(off.contains("[detect]\nenabled = false\n"));
        assert!(!off.contains("upstream_slots"));
    }

    #[test]
    fn reads_the_added_key() {
        let out = r#"{"id": "k_01", "key": "aig_abc123", "tenant": "t7", "tier": "bench"}"#;
        assert_eq!(parse_added_key(&format!("{out}\n")).unwrap(), "aig_abc123");
        assert!(parse_added_key("added key aig_abc").is_err());
        assert!(parse_added_key(r#"{"key": ""}"#).is_err());
        assert!(parse_added_key(r#"{"key": "a b"}"#).is_err());
    }
}
