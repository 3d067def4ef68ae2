//! The servers the gateway benchmark starts, and what they cost.
//!
//! Every server runs under `taskset -c CPU` (taskset execs, so the child's PID is the server's),
//! dies with the benchmark if the benchmark is killed (`PR_SET_PDEATHSIG`), and is stopped by its
//! PID when its guard drops. CPU time comes from `/proc/PID/stat`: user + system time of the
//! whole thread group (exited threads included), which the kernel scales to the scheduler's
//! exact runtime and reports in clock ticks.

use std::{
    fs,
    io::{self, Read as _, Seek as _, SeekFrom},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::shown;

/// How long a server may take to exit after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

/// A server process pinned to one CPU, its output in a log file; stopped on drop.
pub struct Pinned {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Pinned {
    /// Starts `program ARGS...` as `taskset -c CPU program ARGS...`, stdout and stderr appended
    /// to `log`.
    pub fn spawn(
        name: &'static str,
        cpu: usize,
        program: &Path,
        args: &[&std::ffi::OsStr],
        log: &Path,
    ) -> Result<Self> {
        let output = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut cmd = Command::new("taskset");
        cmd.arg("-c")
            .arg(cpu.to_string())
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(output.try_clone().context("duplicating the log file")?)
            .stderr(output);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the hook only makes async-signal-safe system calls (prctl, getppid).
        unsafe {
            cmd.pre_exec(move || {
                // A benchmark killed by a signal runs no destructors: its servers go with it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before the prctl took effect.
                if libc::getppid() != parent {
                    return Err(io::Error::other("the benchmark exited"));
                }
                Ok(())
            });
        }
        let line = shown(&cmd);
        eprintln!("+ {line}");
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start `{line}`"))?;
        Ok(Self {
            name,
            child,
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error, with the end of the log, if the server has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait().context("polling a server")? {
            bail!(
                "{} exited ({status}); its log ends:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL if it lingers; an error if it exits unsuccessfully.
    pub fn stop(mut self) -> Result<()> {
        let status = self.terminate()?;
        if !status.success() {
            bail!(
                "{} exited with {status} on SIGTERM; its log ends:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    fn terminate(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait().context("polling a server")? {
            return Ok(status);
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        kill(pid, Signal::SIGTERM)
            .with_context(|| format!("sending SIGTERM to {} ({pid})", self.name))?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().context("polling a server")? {
                return Ok(status);
            }
            thread::sleep(POLL);
        }
        eprintln!(
            "warning: {} ignored SIGTERM for {STOP_TIMEOUT:?}; killing it",
            self.name
        );
        self.child.kill().context("killing a server")?;
        self.child.wait().context("waiting for a server")
    }

    /// The end of the server's log, for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Err(error) = self.terminate() {
            eprintln!("warning: stopping {}: {error:#}", self.name);
        }
    }
}

/// The last few kilobytes of `path`.
pub fn log_tail(path: &Path) -> String {
    const TAIL: u64 = 4096;
    let mut tail = String::new();
    if let Ok(mut file) = fs::File::open(path) {
        let length = file.metadata().map_or(0, |m| m.len());
        let _ = file.seek(SeekFrom::Start(length.saturating_sub(TAIL)));
        let _ = file.read_to_string(&mut tail);
    }
    tail
}

/// The fields of `/proc/PID/stat` the benchmark reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ProcStat {
    ppid: u32,
    /// utime + stime, in clock ticks.
    cpu_ticks: u64,
}

/// Parses a `/proc/PID/stat` line. The command name (field 2) is in parentheses and may hold
/// spaces and parentheses itself, so fields are counted from the last `)`.
fn parse_stat(line: &str) -> Result<ProcStat> {
    let rest = line
        .rfind(')')
        .map(|end| &line[end + 1..])
        .with_context(|| format!("no command name in {line:?}"))?;
    // After the name: state (3), ppid (4), ..., utime (14), stime (15).
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |number: usize| -> Result<u64> {
        fields
            .get(number - 3)
            .and_then(|value| value.parse().ok())
            .with_context(|| format!("no field {number} in {line:?}"))
    };
    Ok(ProcStat {
        ppid: u32::try_from(field(4)?).context("ppid out of range")?,
        cpu_ticks: field(14)? + field(15)?,
    })
}

fn read_stat(pid: u32) -> Result<ProcStat> {
    let path = format!("/proc/{pid}/stat");
    let line = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_stat(&line)
}

/// The PIDs of `pid`'s children (nginx's workers under its master).
fn children(pid: u32) -> Result<Vec<u32>> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").context("listing /proc")? {
        let entry = entry.context("listing /proc")?;
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        // Processes come and go while we look: one that is gone is not a child.
        if let Ok(stat) = read_stat(child)
            && stat.ppid == pid
        {
            found.push(child);
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// CPU time of a process and its children at one instant.
#[derive(Clone, Debug)]
pub struct TreeCpu {
    pids: Vec<u32>,
    ticks: u64,
}

impl TreeCpu {
    pub fn read(pid: u32) -> Result<Self> {
        let mut pids = vec![pid];
        pids.extend(children(pid)?);
        let mut ticks = 0;
        for &pid in &pids {
            ticks += read_stat(pid)?.cpu_ticks;
        }
        Ok(Self { pids, ticks })
    }

    /// Seconds spent since `earlier`; an error if a process of the tree came or went (a
    /// respawned nginx worker would take its predecessor's time with it).
    pub fn secs_since(&self, earlier: &Self) -> Result<f64> {
        if self.pids != earlier.pids {
            bail!(
                "the processes changed during the window ({:?} -> {:?})",
                earlier.pids,
                self.pids
            );
        }
        Ok(ticks_to_secs(self.ticks.saturating_sub(earlier.ticks)))
    }
}

fn ticks_to_secs(ticks: u64) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / per_second.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_counted_from_the_last_parenthesis() {
        let line = "4242 (nginx: (worker) x) S 4241 4241 4241 0 -1 4194624 250 0 0 0 \
                    117 53 0 0 20 0 1 0 1234 10000000 300 18446744073709551615 1 1 0 0 0 0 \
                    0 4096 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(line).unwrap(),
            ProcStat {
                ppid: 4241,
                cpu_ticks: 170
            }
        );
        assert!(parse_stat("4242 (short) S 1").is_err());
        assert!(parse_stat("no name").is_err());
    }

    #[test]
    fn reads_our_own_process() {
        let tree = TreeCpu::read(std::process::id()).unwrap();
        assert_eq!(tree.pids[0], std::process::id());
        assert!(tree.secs_since(&tree).unwrap() == 0.0);
    }
}
