//! The real `aiguard` binary as a child process inside a test's network namespace (or the test
//! process's own, for the gateway on loopback), and its CLI.
//!
//! In a namespace, the daemon is started with `nsenter --net=/run/netns/NAME` rather than `ip netns exec`: the
//! latter also makes a new mount namespace, where bpffs pins vanish with the process, and the
//! tests need the pins to outlive a killed daemon. `nsenter` execs the binary, so the child's
//! PID is the daemon's and every signal goes to it by PID.
use std::{
    fs::{self, OpenOptions},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{OnceLock, mpsc},
    thread,
    time::{Duration, Instant, SystemTime},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::netns::Netns;

/// How long the daemon may take to answer `status` after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one CLI command may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the daemon may take to exit after a signal.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

const BUILD_HINT: &str = "build it with `cargo build --release -p aiguard-daemon`";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_owned()
}

/// The target directory this test binary was built into (`<target>/<profile>/deps/<test>`),
/// else `CARGO_TARGET_DIR`, else the workspace's `target`.
fn target_dir() -> PathBuf {
    let from_exe = std::env::current_exe().ok().and_then(|exe| {
        let deps = exe.parent()?;
        (deps.file_name()? == "deps").then_some(())?;
        Some(deps.parent()?.parent()?.to_owned())
    });
    from_exe
        .or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR").map(|d| {
                let d = PathBuf::from(d);
                if d.is_absolute() {
                    d
                } else {
                    workspace_root().join(d)
                }
            })
        })
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Newest modification time among the files the binary is built from.
fn newest_source() -> Option<SystemTime> {
    fn walk(p: &Path, newest: &mut Option<SystemTime>) {
        let Ok(meta) = fs::metadata(p) else { return };
        if meta.is_dir() {
            for e in fs::read_dir(p).into_iter().flatten().flatten() {
                walk(&e.path(), newest);
            }
        } else if let Ok(m) = meta.modified() {
            *newest = (*newest).max(Some(m));
        }
    }
    let root = workspace_root();
    let mut newest = None;
    for p in [
        "Cargo.lock",
        "aiguard-daemon/Cargo.toml",
        "aiguard-daemon/build.rs",
        "aiguard-daemon/src",
        "aiguard-common/Cargo.toml",
        "aiguard-common/src",
        "aiguard-ebpf/Cargo.toml",
        "aiguard-ebpf/src",
    ] {
        walk(&root.join(p), &mut newest);
    }
    newest
}

/// The release `aiguard` binary, built first (once per test process) when it is missing or
/// older than its sources: tests of another package cannot use `CARGO_BIN_EXE_aiguard`, and
/// `cargo test` does not build it for them. Cargo's own lock makes concurrent builds safe.
pub fn aiguard_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let target = target_dir();
        let bin = target.join("release").join("aiguard");
        let built = fs::metadata(&bin).and_then(|m| m.modified()).ok();
        let stale = match (built, newest_source()) {
            (None, _) => true,
            (Some(b), Some(src)) => b < src,
            (Some(_), None) => false,
        };
        if stale {
            eprintln!(
                "building {} (missing or older than its sources)",
                bin.display()
            );
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let out = Command::new(cargo)
                .args([
                    "build",
                    "--release",
                    "-p",
                    "aiguard-daemon",
                    "--bin",
                    "aiguard",
                ])
                .arg("--manifest-path")
                .arg(workspace_root().join("Cargo.toml"))
                .env("CARGO_TARGET_DIR", &target)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("running cargo to build aiguard ({BUILD_HINT}): {e}"));
            assert!(
                out.status.success(),
                "building aiguard failed ({BUILD_HINT}):\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(bin.is_file(), "{} is missing: {BUILD_HINT}", bin.display());
        bin
    })
    .clone()
}

/// A command of the real binary, with the operator's environment kept out of the test.
fn aiguard_command() -> Command {
    let mut cmd = Command::new(aiguard_bin());
    for var in [
        "AIGUARD_SOCKET",
        "AIGUARD_BPFFS",
        "AIGUARD_STATE_DIR",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs `cmd` to completion, at most `timeout` (then kills it by PID and panics).
pub fn output_within(mut cmd: Command, timeout: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let pid = Pid::from_raw(child.id() as i32);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.unwrap_or_else(|e| panic!("waiting for {cmd:?}: {e}")),
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
    }
}

/// Runs the CLI against the daemon listening at `socket`.
pub fn cli_at(socket: &Path, args: &[&str]) -> Output {
    let mut cmd = aiguard_command();
    cmd.arg("--socket").arg(socket).args(args);
    output_within(cmd, CLI_TIMEOUT)
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("aiguard-test-{name}"));
        // A leftover of an earlier run with the same PID would hold a stale store.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A running `aiguard run` in a namespace (or the host's), with its own socket, state and pin
/// directories. Dropping it kills the daemon and removes its pins (removing the link pin
/// detaches XDP).
pub struct Daemon {
    /// `None`: the test process's own network namespace.
    netns_path: Option<PathBuf>,
    run_args: Vec<String>,
    socket: PathBuf,
    bpffs_dir: PathBuf,
    state_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    // Last: removed after everything that lives in it.
    scratch: Scratch,
}

impl Daemon {
    /// Starts `aiguard run RUN_ARGS` in `ns` (the socket, state and bpffs directories are
    /// added) and waits until it answers `status`.
    pub fn start(ns: &Netns, run_args: &[&str]) -> Self {
        let mut daemon = Self::prepare(Some(ns), run_args);
        daemon.spawn();
        daemon
    }

    /// Like [`Daemon::start`], with `config` (TOML) written to a file passed as `--config`.
    pub fn start_with_config(ns: &Netns, config: &str, run_args: &[&str]) -> Self {
        let mut daemon = Self::prepare(Some(ns), run_args);
        daemon.use_config(config);
        daemon.spawn();
        daemon
    }

    /// Starts `aiguard run RUN_ARGS` in the test process's own network namespace, with
    /// `config` (TOML) as its `--config` if given, and waits until it answers `status`. For a
    /// daemon that attaches to no interface: the gateway, listening on loopback.
    pub fn start_host(config: Option<&str>, run_args: &[&str]) -> Self {
        let mut daemon = Self::prepare(None, run_args);
        if let Some(config) = config {
            daemon.use_config(config);
        }
        daemon.spawn();
        daemon
    }

    /// Writes `config` to a scratch file and passes it as `--config`.
    fn use_config(&mut self, config: &str) {
        let path = self.scratch_file("aiguard.toml");
        fs::write(&path, config).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        self.run_args.push("--config".into());
        self.run_args.push(path.display().to_string());
    }

    fn prepare(ns: Option<&Netns>, run_args: &[&str]) -> Self {
        // The full PID: unlike namespace names these are not limited to 15 bytes, and a
        // leftover of the same name is removed before use, so it must be this process's own.
        let name = format!("{}-{}", std::process::id(), crate::unique_name("d"));
        let scratch = Scratch::new(&name);
        let bpffs_dir = PathBuf::from("/sys/fs/bpf").join(format!("aiguard-test-{name}"));
        let _ = fs::remove_dir_all(&bpffs_dir);
        Self {
            netns_path: ns.map(Netns::path),
            run_args: run_args.iter().map(|s| (*s).to_owned()).collect(),
            socket: scratch.0.join("admin.sock"),
            bpffs_dir,
            state_dir: scratch.0.join("state"),
            log: scratch.0.join("daemon.log"),
            child: None,
            scratch,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    /// A file in the daemon's scratch directory (e.g. a config or ban file for the test).
    pub fn scratch_file(&self, name: &str) -> PathBuf {
        self.scratch.0.join(name)
    }

    /// The daemon's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the daemon (every run of it) wrote to stdout and stderr.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the daemon is already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.log.display()));
        let log_err = log.try_clone().expect("duplicating the log file handle");
        let mut cmd = match &self.netns_path {
            Some(netns) => {
                let mut net = std::ffi::OsString::from("--net=");
                net.push(netns);
                let mut cmd = Command::new("nsenter");
                cmd.arg(net).arg(aiguard_bin());
                cmd
            }
            None => Command::new(aiguard_bin()),
        };
        let child = cmd
            .arg("--socket")
            .arg(&self.socket)
            .arg("run")
            .args(&self.run_args)
            .arg("--bpffs-dir")
            .arg(&self.bpffs_dir)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .env_remove("AIGUARD_SOCKET")
            .env_remove("AIGUARD_BPFFS")
            .env_remove("AIGUARD_STATE_DIR")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting the aiguard daemon ({cmd:?}): {e}"));
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.try_wait() {
                panic!(
                    "the daemon exited ({status}) before it was ready; its log:\n{}",
                    self.log()
                );
            }
            if cli_at(&self.socket, &["status"]).status.success() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the daemon did not answer `status` within {READY_TIMEOUT:?}; its log:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The exit status, if the daemon has exited (it is then reaped).
    fn try_wait(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = child.try_wait().expect("polling the daemon process")?;
        self.child = None;
        Some(status)
    }

    /// Sends `signal` to the daemon by PID and waits (bounded) for it to exit.
    fn signal_and_wait(&mut self, signal: Signal) -> ExitStatus {
        let pid = self.pid().expect("the daemon is running");
        kill(Pid::from_raw(pid as i32), signal)
            .unwrap_or_else(|e| panic!("sending {signal} to the daemon (pid {pid}): {e}"));
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                panic!(
                    "the daemon (pid {pid}) did not exit within {EXIT_TIMEOUT:?} of {signal}; its log:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the daemon gets no chance to clean up (a crash, an OOM kill).
    pub fn kill(&mut self) {
        self.signal_and_wait(Signal::SIGKILL);
    }

    /// SIGTERM: a clean shutdown. Returns how the daemon exited.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal_and_wait(Signal::SIGTERM)
    }

    /// Starts the daemon again with the same socket, state and pins (stopping it first with
    /// SIGTERM if it runs).
    pub fn restart(&mut self) {
        if self.pid().is_some() {
            let status = self.stop();
            assert!(
                status.success(),
                "the daemon exited with {status} on SIGTERM; its log:\n{}",
                self.log()
            );
        }
        self.spawn();
    }

    /// Like [`Daemon::restart`], with other `run` arguments (a changed configuration).
    pub fn restart_with(&mut self, run_args: &[&str]) {
        self.run_args = run_args.iter().map(|s| (*s).to_owned()).collect();
        self.restart();
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli_at(&self.socket, args)
    }

    /// Runs the CLI and returns its stdout, panicking (with the daemon's log) if it fails.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "`aiguard {}` failed ({}): {}\ndaemon log:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            self.log()
        );
        String::from_utf8(out.stdout).expect("the CLI prints UTF-8")
    }

    /// Runs a `--json` CLI command and parses its output.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let text = self.cli_ok(args);
        serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("`aiguard {}` printed no JSON ({e}): {text}", args.join(" "))
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            if let Some(mut child) = self.child.take() {
                // SIGKILL cannot be ignored: this wait is short.
                let _ = child.wait();
            }
        }
        if thread::panicking() {
            eprintln!("--- aiguard daemon log ---\n{}--- end ---", self.log());
        }
        // Maps and the link pin: with no daemon holding them, removing the pins frees the maps
        // and detaches the program.
        if self.bpffs_dir.exists()
            && let Err(e) = fs::remove_dir_all(&self.bpffs_dir)
        {
            eprintln!("warning: removing {}: {e}", self.bpffs_dir.display());
        }
        let _ = fs::remove_file(&self.socket);
    }
}
