//! Time to load a ban set: aiguard's raw map fill (one BPF syscall per prefix) and its daemon's
//! `ban --file` end to end, against `nft -f` and `ipset restore`.
//!
//! Loads the other parts already did count as samples (the per-packet part fills the trie at
//! each ban count, the veth part loads every mechanism each round); this part tops every loader
//! up to `--load-samples` per size, interleaved. Each netfilter load gets a fresh namespace pair,
//! as in the veth part.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Read as _, Seek as _, SeekFrom},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use aiguard_common::map_name;
use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde::Serialize;

use super::{
    Bench, median, netfilter,
    netns::{Netns, RX_IF, VethPair},
    object::{Loaded, PinDir, pinned_trie_covers},
    prefixes::{Prefix, PrefixFiles},
};
use crate::stdout_of;

/// How long the daemon may take to answer `status` after it starts.
const DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the daemon may take to have the whole set in the kernel after `ban` returns.
const DAEMON_APPLY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the daemon may take to exit after SIGTERM before it gets SIGKILL.
const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Loader {
    AiguardMapFill,
    AiguardDaemon,
    Nft,
    Ipset,
}

impl Loader {
    pub fn label(self) -> &'static str {
        match self {
            Self::AiguardMapFill => "aiguard map fill (BPF syscall per prefix)",
            Self::AiguardDaemon => "aiguard daemon, `ban --file` end to end",
            Self::Nft => "nft -f (interval set)",
            Self::Ipset => "ipset restore (hash:net)",
        }
    }
}

/// Every load time measured in this run, by loader and set size, in seconds.
#[derive(Debug, Default)]
pub struct LoadTimes {
    samples: BTreeMap<(Loader, usize), Vec<f64>>,
}

impl LoadTimes {
    pub fn record(&mut self, loader: Loader, prefixes: usize, took: Duration) {
        self.samples
            .entry((loader, prefixes))
            .or_default()
            .push(took.as_secs_f64());
    }

    pub fn samples(&self, loader: Loader, prefixes: usize) -> &[f64] {
        self.samples
            .get(&(loader, prefixes))
            .map_or(&[], Vec::as_slice)
    }
}

#[derive(Debug, Serialize)]
pub struct LoadRow {
    pub loader: Loader,
    pub prefixes: usize,
    pub seconds: Vec<f64>,
    pub median_secs: f64,
    pub prefixes_per_sec: f64,
}

pub fn run(bench: &Bench, loads: &mut LoadTimes, notes: &mut Vec<String>) -> Result<Vec<LoadRow>> {
    let mut daemon = daemon_binary(bench, notes);
    let wanted = bench.args.load_samples;
    for &size in &bench.args.load_sizes {
        let bans = bench.prefixes.bans(size);
        let files = bench.files.get(&bench.prefixes, size)?;
        let mut loaders = vec![Loader::AiguardMapFill, Loader::Nft, Loader::Ipset];
        while let Some(loader) = loaders
            .iter()
            .copied()
            .chain(daemon.as_ref().map(|_| Loader::AiguardDaemon))
            .find(|&loader| loads.samples(loader, size).len() < wanted)
        {
            eprintln!(
                "bench load: {} with {size} prefixes (sample {}/{wanted})",
                loader.label(),
                loads.samples(loader, size).len() + 1
            );
            let took = match loader {
                Loader::AiguardMapFill => Loaded::aiguard(&bench.objects.aiguard)
                    .and_then(|mut object| object.fill_bans(&bans)),
                Loader::Nft => nft_once(&files),
                Loader::Ipset => ipset_once(&files),
                Loader::AiguardDaemon => {
                    let binary = daemon.as_deref().context("no daemon binary")?;
                    match daemon_once(bench, binary, &files, &bans) {
                        Ok(took) => Ok(took),
                        Err(error) => {
                            let note = format!(
                                "aiguard daemon end to end: skipped after an error: {error:#}"
                            );
                            eprintln!("bench load: {note}");
                            notes.push(note);
                            daemon = None;
                            continue;
                        }
                    }
                }
            }
            .with_context(|| format!("{} with {size} prefixes", loader.label()))?;
            eprintln!("bench load:   {:.2} s", took.as_secs_f64());
            loads.record(loader, size, took);
            // Keeps the order fair: a loader that just ran goes to the back.
            loaders.retain(|&l| l != loader);
            loaders.push(loader);
        }
    }

    let mut rows = Vec::new();
    for &size in &bench.args.load_sizes {
        for loader in [
            Loader::AiguardMapFill,
            Loader::AiguardDaemon,
            Loader::Nft,
            Loader::Ipset,
        ] {
            let seconds = loads.samples(loader, size).to_vec();
            if seconds.is_empty() {
                continue;
            }
            let median_secs = median(&seconds);
            rows.push(LoadRow {
                loader,
                prefixes: size,
                seconds,
                median_secs,
                prefixes_per_sec: size as f64 / median_secs,
            });
        }
    }
    Ok(rows)
}

fn nft_once(files: &PrefixFiles) -> Result<Duration> {
    let pair = VethPair::create()?;
    let took = netfilter::nft_load(&pair.rx, &files.nft)?;
    netfilter::nft_unload(&pair.rx)?;
    Ok(took)
}

fn ipset_once(files: &PrefixFiles) -> Result<Duration> {
    let pair = VethPair::create()?;
    let took = netfilter::ipset_load(&pair.rx, &files.ipset)?;
    netfilter::ipset_destroy(&pair.rx)?;
    Ok(took)
}

/// The daemon to time: `--daemon`, or the release build (as `cargo xtask run` builds it). None,
/// with a note saying why, when there is none.
fn daemon_binary(bench: &Bench, notes: &mut Vec<String>) -> Option<PathBuf> {
    let found = match &bench.args.daemon {
        Some(path) if path.is_file() => Ok(path.clone()),
        Some(path) => Err(anyhow::anyhow!("{} does not exist", path.display())),
        None => crate::run::build_daemon().context("building the daemon"),
    };
    match found {
        Ok(path) => Some(path),
        Err(error) => {
            let note = format!("aiguard daemon end to end: skipped: {error:#}");
            eprintln!("bench load: {note}");
            notes.push(note);
            None
        }
    }
}

/// Starts the daemon on the receiving end of a fresh pair, bans the whole file through its CLI
/// and returns the time from the `ban` command's start until the kernel holds the set's last
/// prefix (`ban` may return before the daemon has applied everything).
fn daemon_once(
    bench: &Bench,
    binary: &Path,
    files: &PrefixFiles,
    bans: &[Prefix],
) -> Result<Duration> {
    let last = *bans.last().context("an empty ban set")?;
    let pair = VethPair::create()?;
    let pins = PinDir::create()?;
    let state = bench.files.scratch(&super::unique_name());
    fs::create_dir(&state).with_context(|| format!("creating {}", state.display()))?;
    let socket = state.join("aiguard.sock");
    let daemon = Daemon::start(binary, &pair.rx, &pins, &state, &socket)?;
    daemon.wait_ready(&socket)?;

    let started = Instant::now();
    stdout_of(
        daemon
            .cli(&socket)
            .args(["ban", "--file"])
            .arg(&files.plain),
    )
    .context("aiguard ban --file")?;
    let trie = pins.path().join(map_name::BANS_V4);
    let deadline = started + DAEMON_APPLY_TIMEOUT;
    while !pinned_trie_covers(&trie, last)? {
        if Instant::now() > deadline {
            bail!(
                "{last} (the file's last line) was not in {} after {DAEMON_APPLY_TIMEOUT:?}",
                trie.display()
            );
        }
        thread::sleep(POLL);
    }
    let took = started.elapsed();
    daemon.stop()?;
    fs::remove_dir_all(&state).with_context(|| format!("removing {}", state.display()))?;
    Ok(took)
}

/// A daemon process, stopped (by PID) on drop if [`Daemon::stop`] was not reached.
struct Daemon {
    child: Child,
    binary: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Runs `aiguard run` in the receiver namespace (network namespace only: it sees the same
    /// filesystem, bpffs included), with its output in a log file next to its state.
    fn start(
        binary: &Path,
        rx: &Netns,
        pins: &PinDir,
        state: &Path,
        socket: &Path,
    ) -> Result<Self> {
        let log = state.join("daemon.log");
        let output =
            fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let netns = rx.open()?;
        let netns_fd = netns.as_raw_fd();
        let mut cmd = Command::new(binary);
        cmd.args(["run", "--interface", RX_IF, "--socket"])
            .arg(socket)
            .arg("--bpffs-dir")
            .arg(pins.path())
            .arg("--state-dir")
            .arg(state)
            // Nothing of this run should outlive it, the attachment included.
            .arg("--detach-on-exit")
            .stdin(Stdio::null())
            .stdout(output.try_clone().context("duplicating the log file")?)
            .stderr(output);
        // SAFETY: the hook only calls setns(2), which is async-signal-safe, on a descriptor that
        // `netns` keeps open until after spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(netns_fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        drop(netns);
        Ok(Self {
            child,
            binary: binary.to_owned(),
            log,
        })
    }

    /// The CLI talking to this daemon.
    fn cli(&self, socket: &Path) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--socket").arg(socket);
        cmd
    }

    fn wait_ready(&self, socket: &Path) -> Result<()> {
        let deadline = Instant::now() + DAEMON_READY_TIMEOUT;
        loop {
            let status = self
                .cli(socket)
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
                    "the daemon did not answer `status` within {DAEMON_READY_TIMEOUT:?}; its log:\n{}",
                    self.log_tail()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// SIGTERM, then SIGKILL if it lingers; an error if it exits unsuccessfully.
    fn stop(mut self) -> Result<()> {
        let status = self.terminate()?;
        if !status.success() {
            bail!(
                "the daemon exited with {status} on SIGTERM; its log:\n{}",
                self.log_tail()
            );
        }
        Ok(())
    }

    fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        if let Some(status) = self.child.try_wait().context("polling the daemon")? {
            return Ok(status);
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        kill(pid, Signal::SIGTERM).context("sending SIGTERM to the daemon")?;
        let deadline = Instant::now() + DAEMON_STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().context("polling the daemon")? {
                return Ok(status);
            }
            thread::sleep(POLL);
        }
        self.child.kill().context("killing the daemon")?;
        self.child.wait().context("waiting for the daemon")
    }

    /// The end of the daemon's log, for error messages.
    fn log_tail(&self) -> String {
        const TAIL: u64 = 4096;
        let mut tail = String::new();
        if let Ok(mut file) = fs::File::open(&self.log) {
            let length = file.metadata().map_or(0, |m| m.len());
            let _ = file.seek(SeekFrom::Start(length.saturating_sub(TAIL)));
            let _ = file.read_to_string(&mut tail);
        }
        tail
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(error) = self.terminate() {
            eprintln!("warning: stopping the daemon: {error:#}");
        }
    }
}
