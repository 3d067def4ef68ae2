//! Time one CPU spent, by kind, from `/proc/stat`: how the benchmark charges a measurement
//! window's work on the sender's CPU (where veth runs the receive path, in softirq) to the packets
//! dropped in it.
//!
//! The kernel here samples on its tick (TICK_CPU_ACCOUNTING, no IRQ_TIME_ACCOUNTING) and
//! reports in USER_HZ ticks: a window of a few seconds holds hundreds of samples, fine for
//! medians over rounds.

use std::fs;

use anyhow::{Context as _, Result, bail};

/// Cumulative ticks of one CPU, in `/proc/stat` order.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTimes {
    user: u64,
    nice: u64,
    system: u64,
    idle: u64,
    iowait: u64,
    irq: u64,
    softirq: u64,
    steal: u64,
}

impl CpuTimes {
    pub fn read(cpu: usize) -> Result<Self> {
        let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let label = format!("cpu{cpu}");
        let Some(line) = stat
            .lines()
            .find(|line| line.split_whitespace().next() == Some(label.as_str()))
        else {
            bail!("/proc/stat has no line for CPU {cpu}");
        };
        let fields: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("parsing /proc/stat: {line}"))?;
        let [user, nice, system, idle, iowait, irq, softirq, steal, ..] = fields[..] else {
            bail!("/proc/stat: too few fields: {line}");
        };
        Ok(Self {
            user,
            nice,
            system,
            idle,
            iowait,
            irq,
            softirq,
            steal,
        })
    }

    /// What was spent between `earlier` and `self`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            user: self.user.saturating_sub(earlier.user),
            nice: self.nice.saturating_sub(earlier.nice),
            system: self.system.saturating_sub(earlier.system),
            idle: self.idle.saturating_sub(earlier.idle),
            iowait: self.iowait.saturating_sub(earlier.iowait),
            irq: self.irq.saturating_sub(earlier.irq),
            softirq: self.softirq.saturating_sub(earlier.softirq),
            steal: self.steal.saturating_sub(earlier.steal),
        }
    }

    pub fn softirq_secs(&self) -> f64 {
        seconds(self.softirq)
    }

    /// Time the CPU ran anything: user, system, interrupts and softirqs.
    pub fn busy_secs(&self) -> f64 {
        seconds(self.user + self.nice + self.system + self.irq + self.softirq)
    }

    /// Time the hypervisor ran something else instead; large values mean a noisy neighbour.
    pub fn steal_secs(&self) -> f64 {
        seconds(self.steal)
    }

    /// Every tick of the window, busy or not.
    pub fn total_secs(&self) -> f64 {
        seconds(
            self.user
                + self.nice
                + self.system
                + self.idle
                + self.iowait
                + self.irq
                + self.softirq
                + self.steal,
        )
    }
}

fn seconds(ticks: u64) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / per_second.max(1) as f64
}
