//! One run's results: medians, ratios and the targets, printed as markdown and written
//! as JSON (`target/bench/xdp.json`) for the README to quote.

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path, process::Command};

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::{
    Bench,
    load::{LoadRow, Loader},
    median,
    prog_cost::ProgCost,
    veth::{Mechanism, VethResults},
};
use crate::stdout_of;

/// The ban count the per-packet and veth targets are stated at.
const TARGET_BANS: usize = 1_000_000;

#[derive(Debug, Serialize)]
pub struct Report {
    pub command: String,
    pub kernel: String,
    pub cpus: usize,
    /// Versions of the netfilter tools compared against (iptables says which backend it uses).
    pub tools: Vec<String>,
    pub prog: Option<ProgCost>,
    pub veth: Option<VethSummary>,
    pub load: Option<Vec<LoadRow>>,
    pub targets: Vec<Target>,
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct VethSummary {
    pub medians: Vec<VethMedian>,
    /// Receive CPU per drop, aiguard over each other mechanism: the median of per-round ratios
    /// (rounds pair the mechanisms in time, so the VM's drift cancels).
    pub aiguard_rx_cpu_ratio: BTreeMap<Mechanism, f64>,
    pub results: VethResults,
}

#[derive(Debug, Serialize)]
pub struct VethMedian {
    pub mechanism: Mechanism,
    pub drops_per_sec: f64,
    pub rx_cpu_ns_per_drop: f64,
    pub cpu_ns_per_drop: f64,
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
        bench: &Bench,
        prog: Option<ProgCost>,
        veth: Option<VethResults>,
        load: Option<Vec<LoadRow>>,
        notes: Vec<String>,
    ) -> Result<Self> {
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .context("reading the kernel release")?
            .trim()
            .to_owned();
        let veth = veth.map(summarize);
        let tools = [
            ["nft", "--version"],
            ["ipset", "--version"],
            ["iptables", "--version"],
        ]
        .iter()
        .filter_map(|[tool, flag]| stdout_of(Command::new(tool).arg(flag)).ok())
        .filter_map(|version| version.lines().next().map(str::to_owned))
        .collect();
        let mut report = Self {
            command,
            kernel,
            cpus,
            tools,
            prog,
            veth,
            load,
            targets: Vec::new(),
            notes,
        };
        report.targets = report.targets(bench);
        Ok(report)
    }

    fn targets(&self, bench: &Bench) -> Vec<Target> {
        let mut targets = Vec::new();
        if let Some(prog) = &self.prog {
            let at = |bans: usize| prog.rows.iter().find(|row| row.bans == bans);
            if let Some(row) = at(TARGET_BANS) {
                targets.push(Target {
                    target: "ban verdict at 1M bans < 100 ns".into(),
                    measured: format!("{:.0} ns", row.ban_ns),
                    met: row.ban_ns < 100.0,
                });
                targets.push(Target {
                    target: "pass verdict at 1M bans < 150 ns".into(),
                    measured: format!("{:.0} ns", row.pass_ns),
                    met: row.pass_ns < 150.0,
                });
                if let Some(one) = at(1) {
                    for (what, small, large) in [
                        ("ban", one.ban_ns, row.ban_ns),
                        ("pass", one.pass_ns, row.pass_ns),
                    ] {
                        let growth = large / small;
                        targets.push(Target {
                            target: format!("{what} verdict within 2x from 1 to 1M bans"),
                            measured: format!("{growth:.2}x ({small:.0} -> {large:.0} ns)"),
                            met: growth <= 2.0,
                        });
                    }
                }
            }
        }
        if let Some(veth) = &self.veth {
            let bans = bench.args.veth_bans;
            for (other, limit) in [(Mechanism::Nftables, 0.6), (Mechanism::DropAll, 1.1)] {
                if let Some(&ratio) = veth.aiguard_rx_cpu_ratio.get(&other) {
                    targets.push(Target {
                        target: format!(
                            "receive CPU per drop at {} bans <= {limit}x {}",
                            grouped(bans as f64),
                            other.label()
                        ),
                        measured: format!("{ratio:.2}x"),
                        met: ratio <= limit,
                    });
                }
            }
        }
        targets
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = self.write_markdown(&mut out);
        out
    }

    fn write_markdown(&self, out: &mut String) -> std::fmt::Result {
        writeln!(out, "\n## aiguard XDP benchmark\n")?;
        writeln!(out, "Command: `{}`  ", self.command)?;
        writeln!(out, "Kernel {}, {} CPUs.  ", self.kernel, self.cpus)?;
        writeln!(out, "Tools: {}.\n", self.tools.join("; "))?;

        if let Some(prog) = &self.prog {
            writeln!(out, "### Program cost per packet (BPF_PROG_TEST_RUN)\n")?;
            writeln!(
                out,
                "Median of {} samples, each the kernel's mean over {} runs. The harness alone \
                 (drop-all program) costs {:.0} ns.\n",
                prog.samples,
                grouped(f64::from(prog.test_runs)),
                prog.harness_ns
            )?;
            writeln!(
                out,
                "| bans | banned packet (ns) | passing packet (ns) | banned, empty allowlist (ns) | passing, empty allowlist (ns) | trie fill (s) | fill (prefixes/s) |"
            )?;
            writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|")?;
            for row in &prog.rows {
                writeln!(
                    out,
                    "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {} |",
                    grouped(row.bans as f64),
                    row.ban_ns,
                    row.pass_ns,
                    row.ban_ns_no_allowlist,
                    row.pass_ns_no_allowlist,
                    row.fill_secs,
                    grouped(row.fill_per_sec)
                )?;
            }
            writeln!(out)?;
        }

        if let Some(veth) = &self.veth {
            let results = &veth.results;
            writeln!(
                out,
                "### veth: one banned source flooding 64-byte UDP, {} bans\n",
                grouped(results.bans as f64)
            )?;
            writeln!(
                out,
                "Median of {} interleaved rounds of {} s per mechanism, each in a fresh namespace \
                 pair; sender pinned to CPU {}, where veth also runs the receive path. Receive \
                 CPU = that CPU's softirq time / drops; sender CPU = all its busy time / drops.\n",
                results.rounds, results.seconds_per_window, results.sender_cpu
            )?;
            writeln!(
                out,
                "| mechanism | drops/s | receive CPU/drop (ns) | sender CPU/drop (ns) | aiguard's receive CPU vs this |"
            )?;
            writeln!(out, "|---|---:|---:|---:|---:|")?;
            for row in &veth.medians {
                let ratio = veth
                    .aiguard_rx_cpu_ratio
                    .get(&row.mechanism)
                    .map_or_else(|| "-".to_owned(), |ratio| format!("{ratio:.2}x"));
                writeln!(
                    out,
                    "| {} | {} | {:.0} | {:.0} | {ratio} |",
                    row.mechanism.label(),
                    grouped(row.drops_per_sec),
                    row.rx_cpu_ns_per_drop,
                    row.cpu_ns_per_drop
                )?;
            }
            writeln!(out)?;
        }

        if let Some(load) = &self.load {
            writeln!(out, "### Time to load the bans (median seconds)\n")?;
            writeln!(
                out,
                "| loader | prefixes | seconds | prefixes/s | samples |"
            )?;
            writeln!(out, "|---|---:|---:|---:|---:|")?;
            for row in load {
                writeln!(
                    out,
                    "| {} | {} | {:.2} | {} | {} |",
                    row.loader.label(),
                    grouped(row.prefixes as f64),
                    row.median_secs,
                    grouped(row.prefixes_per_sec),
                    row.seconds.len()
                )?;
            }
            if !load.iter().any(|row| row.loader == Loader::AiguardDaemon) {
                writeln!(out, "\n(no end-to-end daemon figure: see the notes)")?;
            }
            writeln!(out)?;
        }

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

    pub fn write_json(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let json = serde_json::to_string_pretty(self).context("serializing the results")?;
        fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
    }
}

fn summarize(results: VethResults) -> VethSummary {
    let medians = results
        .samples
        .iter()
        .map(|(&mechanism, samples)| {
            let of = |value: fn(&super::veth::Sample) -> f64| {
                median(&samples.iter().map(value).collect::<Vec<_>>())
            };
            VethMedian {
                mechanism,
                drops_per_sec: of(|s| s.drops_per_sec),
                rx_cpu_ns_per_drop: of(|s| s.rx_cpu_ns_per_drop),
                cpu_ns_per_drop: of(|s| s.cpu_ns_per_drop),
            }
        })
        .collect();
    let mut aiguard_rx_cpu_ratio = BTreeMap::new();
    if let Some(aiguard) = results.samples.get(&Mechanism::Aiguard) {
        for (&other, samples) in &results.samples {
            if other == Mechanism::Aiguard {
                continue;
            }
            let ratios: Vec<f64> = aiguard
                .iter()
                .zip(samples)
                .map(|(ours, theirs)| ours.rx_cpu_ns_per_drop / theirs.rx_cpu_ns_per_drop)
                .collect();
            aiguard_rx_cpu_ratio.insert(other, median(&ratios));
        }
    }
    VethSummary {
        medians,
        aiguard_rx_cpu_ratio,
        results,
    }
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

    #[test]
    fn groups_thousands() {
        assert_eq!(grouped(0.0), "0");
        assert_eq!(grouped(999.4), "999");
        assert_eq!(grouped(1000.0), "1,000");
        assert_eq!(grouped(1_234_567.8), "1,234,568");
    }
}
