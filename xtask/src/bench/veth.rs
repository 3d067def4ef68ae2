//! The veth comparison: packets dropped per second and receive CPU per dropped packet, for
//! aiguard's XDP program, nftables netdev ingress, iptables+ipset and a drop-everything XDP
//! program (the ceiling), all holding the same bans and flooded by one banned source.
//!
//! Mechanisms are interleaved round by round (A B C D, A B C D, ...) because this VM's speed
//! drifts over minutes; each runs in a fresh namespace pair (iptables leaves its hooks behind
//! in a namespace once used), loaded fresh, so every round also times each loader at this size.
//!
//! On veth the receive path runs in the sender's softirq on the sender's CPU. The sender is
//! pinned to one CPU, and that CPU's softirq time over the window, divided by the packets
//! dropped, is the receive cost per drop. Drops are counted the same way for every mechanism:
//! packets the receiving veth took in, minus those that reached the receiver's UDP layer.
//! aiguard's and iptables' own counters cross-check that figure.

use std::{
    collections::BTreeMap,
    fs, thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::programs::{XdpMode, xdp::XdpLinkId};
use serde::Serialize;

use super::{
    Bench, SERVICE_PORT,
    cpu::CpuTimes,
    load::{LoadTimes, Loader},
    netfilter,
    netns::{Netns, RX_ADDR, RX_IF, RX_MAC, TX_IF, TX_MAC, VethPair},
    object::Loaded,
    prefixes::{BANNED_SOURCE, Prefix, PrefixFiles},
    sender::{self, Limits, Progress},
};

/// Long enough for the sender to reach its pace and the caches to warm.
const WARMUP: Duration = Duration::from_millis(500);
/// The sender stops by itself this long after the window should have ended.
const SENDER_GRACE: Duration = Duration::from_secs(10);
/// Far above what one CPU can push through veth: only bounds the sender's count.
const MAX_RATE_PPS: f64 = 20e6;
/// Counters that disagree by more than this share get a warning.
const TOLERANCE: f64 = 0.02;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    Aiguard,
    Nftables,
    IptablesIpset,
    DropAll,
}

impl Mechanism {
    /// The order of every round.
    pub const ALL: [Self; 4] = [
        Self::Aiguard,
        Self::Nftables,
        Self::IptablesIpset,
        Self::DropAll,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Aiguard => "aiguard XDP (native)",
            Self::Nftables => "nftables netdev ingress, interval set",
            Self::IptablesIpset => "iptables raw PREROUTING + ipset hash:net",
            Self::DropAll => "XDP drop-all (ceiling)",
        }
    }
}

/// One mechanism's measurement window in one round.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub round: usize,
    pub seconds: f64,
    pub sent: u64,
    pub dropped: u64,
    /// Packets that got past the mechanism (reached the UDP layer); 0 when it works.
    pub passed: u64,
    pub drops_per_sec: f64,
    /// Softirq time of the sender's CPU per dropped packet: veth's receive path.
    pub rx_cpu_ns_per_drop: f64,
    /// All the sender CPU's busy time per dropped packet: sending and receiving.
    pub cpu_ns_per_drop: f64,
    /// Share of the window the hypervisor gave the sender's CPU to someone else.
    pub steal_share: f64,
    /// `sendmmsg` calls the kernel refused because the receiver backed up.
    pub refused_batches: u64,
}

#[derive(Debug, Serialize)]
pub struct VethResults {
    pub bans: usize,
    pub rounds: usize,
    pub seconds_per_window: f64,
    pub sender_cpu: usize,
    pub samples: BTreeMap<Mechanism, Vec<Sample>>,
}

pub fn run(bench: &Bench, loads: &mut LoadTimes) -> Result<VethResults> {
    let count = bench.args.veth_bans;
    let rounds = bench.args.rounds;
    let bans = bench.prefixes.bans(count);
    let files = bench.files.get(&bench.prefixes, count)?;
    let mut samples: BTreeMap<Mechanism, Vec<Sample>> = BTreeMap::new();
    for round in 1..=rounds {
        for mechanism in Mechanism::ALL {
            eprintln!(
                "bench veth: round {round}/{rounds}: {} with {count} bans",
                mechanism.label()
            );
            let sample = run_once(bench, mechanism, round, &bans, &files, loads)
                .with_context(|| format!("veth, round {round}: {}", mechanism.label()))?;
            eprintln!(
                "bench veth:   {:.0} drops/s, receive {:.0} ns/drop, sender CPU {:.0} ns/drop",
                sample.drops_per_sec, sample.rx_cpu_ns_per_drop, sample.cpu_ns_per_drop
            );
            samples.entry(mechanism).or_default().push(sample);
        }
    }
    Ok(VethResults {
        bans: count,
        rounds,
        seconds_per_window: bench.args.seconds,
        sender_cpu: bench.sender_cpu,
        samples,
    })
}

/// Hooks `mechanism` to a fresh pair, measures it and unhooks it.
fn run_once(
    bench: &Bench,
    mechanism: Mechanism,
    round: usize,
    bans: &[Prefix],
    files: &PrefixFiles,
    loads: &mut LoadTimes,
) -> Result<Sample> {
    let pair = VethPair::create()?;
    let sample = match mechanism {
        Mechanism::Aiguard => {
            let mut object = Loaded::aiguard(&bench.objects.aiguard)?;
            object.enable_bucket(SERVICE_PORT)?;
            let took = object.fill_bans(bans)?;
            loads.record(Loader::AiguardMapFill, bans.len(), took);
            let link = attach(&pair, &mut object)?;
            let sample = measure(bench, &pair, round, Some(&|| object.dropped_banned()))?;
            detach(&pair, &mut object, link)?;
            sample
        }
        Mechanism::Nftables => {
            let took = netfilter::nft_load(&pair.rx, &files.nft)?;
            loads.record(Loader::Nft, bans.len(), took);
            let sample = measure(bench, &pair, round, None)?;
            netfilter::nft_unload(&pair.rx)?;
            sample
        }
        Mechanism::IptablesIpset => {
            let took = netfilter::ipset_load(&pair.rx, &files.ipset)?;
            loads.record(Loader::Ipset, bans.len(), took);
            netfilter::iptables_hook(&pair.rx)?;
            let sample = measure(
                bench,
                &pair,
                round,
                Some(&|| netfilter::iptables_dropped(&pair.rx)),
            )?;
            netfilter::iptables_unhook(&pair.rx)?;
            netfilter::ipset_destroy(&pair.rx)?;
            sample
        }
        Mechanism::DropAll => {
            let mut object = Loaded::drop_all(&bench.objects.drop_all)?;
            let link = attach(&pair, &mut object)?;
            let sample = measure(bench, &pair, round, None)?;
            detach(&pair, &mut object, link)?;
            sample
        }
    };
    Ok(sample)
}

/// Attaches in native (driver) mode, which veth supports, from inside the receiver namespace
/// (interface names and indexes are per namespace).
fn attach(pair: &VethPair, object: &mut Loaded) -> Result<XdpLinkId> {
    let xdp = object.xdp()?;
    pair.rx.run(|| {
        xdp.attach(RX_IF, XdpMode::Driver)
            .with_context(|| format!("attaching XDP to {RX_IF} in native mode"))
    })
}

/// Detaches before the namespace goes, from inside it, whichever way aya attached.
fn detach(pair: &VethPair, object: &mut Loaded, link: XdpLinkId) -> Result<()> {
    let xdp = object.xdp()?;
    pair.rx.run(|| xdp.detach(link).context("detaching XDP"))
}

/// A mechanism's own count of its drops, to cross-check the interface counters.
type DropCounter<'a> = &'a dyn Fn() -> Result<u64>;

/// Floods the pair from the banned source for the warm-up and the window, and turns what the
/// counters say about the window into a [`Sample`].
fn measure(
    bench: &Bench,
    pair: &VethPair,
    round: usize,
    counter: Option<DropCounter<'_>>,
) -> Result<Sample> {
    let netns = pair.tx.open()?;
    let frame = sender::udp_frame(TX_MAC, RX_MAC, BANNED_SOURCE, RX_ADDR, SERVICE_PORT);
    let window = Duration::from_secs_f64(bench.args.seconds);
    let limits = Limits {
        max_packets: ((WARMUP + window + SENDER_GRACE).as_secs_f64() * MAX_RATE_PPS) as u64,
        max_time: WARMUP + window + SENDER_GRACE,
    };
    let cpu = bench.sender_cpu;
    let progress = Progress::default();
    let (report, observed) = thread::scope(|scope| {
        let sender = scope.spawn(|| sender::send(&netns, TX_IF, cpu, &frame, &limits, &progress));
        let observed = (|| {
            thread::sleep(WARMUP);
            ensure!(
                !sender.is_finished() && progress.sent() > 0,
                "the sender is not sending"
            );
            let before = Snapshot::take(&pair.rx, cpu, &progress, counter)?;
            thread::sleep(window);
            let after = Snapshot::take(&pair.rx, cpu, &progress, counter)?;
            Ok((before, after))
        })();
        progress.stop();
        let report = sender
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (report, observed)
    });
    // The sender's error, if any, explains a failed window best.
    let report = report.context("the packet sender failed")?;
    let (before, after) = observed?;

    let seconds = after.at.duration_since(before.at).as_secs_f64();
    let sent = after.sent - before.sent;
    let delivered = after.delivered - before.delivered;
    let passed = after.passed - before.passed;
    let dropped = delivered.saturating_sub(passed);
    if dropped == 0 {
        bail!("nothing was dropped ({sent} sent, {delivered} delivered, {passed} passed)");
    }
    if passed as f64 > TOLERANCE * delivered as f64 {
        eprintln!("warning: {passed} of {delivered} packets got past the mechanism");
    }
    if sent.abs_diff(delivered) as f64 > TOLERANCE * sent as f64 {
        eprintln!("warning: {sent} packets sent but {delivered} reached the receiving veth");
    }
    if let (Some(first), Some(last)) = (before.counted, after.counted) {
        let counted = last - first;
        if counted.abs_diff(dropped) as f64 > TOLERANCE * dropped as f64 {
            eprintln!(
                "warning: the mechanism counted {counted} drops, the interfaces say {dropped}"
            );
        }
    }
    let cpu = after.cpu.since(&before.cpu);
    let steal_share = if cpu.total_secs() > 0.0 {
        cpu.steal_secs() / cpu.total_secs()
    } else {
        0.0
    };
    Ok(Sample {
        round,
        seconds,
        sent,
        dropped,
        passed,
        drops_per_sec: dropped as f64 / seconds,
        rx_cpu_ns_per_drop: cpu.softirq_secs() * 1e9 / dropped as f64,
        cpu_ns_per_drop: cpu.busy_secs() * 1e9 / dropped as f64,
        steal_share,
        refused_batches: report.refused,
    })
}

/// The counters at one edge of the window. [`Snapshot::take`] reads them in the same order at
/// both edges, so the time between reads cancels out.
struct Snapshot {
    cpu: CpuTimes,
    at: Instant,
    /// Packets the receiving veth took in (XDP or not, dropped or not).
    delivered: u64,
    /// Packets that reached the receiver's UDP layer.
    passed: u64,
    sent: u64,
    counted: Option<u64>,
}

impl Snapshot {
    fn take(
        rx: &Netns,
        cpu: usize,
        progress: &Progress,
        counter: Option<DropCounter<'_>>,
    ) -> Result<Self> {
        let cpu = CpuTimes::read(cpu)?;
        let at = Instant::now();
        let (delivered, passed) = rx.run(|| Ok((rx_packets(RX_IF)?, udp_arrivals()?)))?;
        let sent = progress.sent();
        let counted = counter.map(|count| count()).transpose()?;
        Ok(Self {
            cpu,
            at,
            delivered,
            passed,
            sent,
            counted,
        })
    }
}

/// Received packets of `ifname`, from the calling thread's namespace. veth counts every
/// packet it hands to XDP or to the stack, before either decides anything.
fn rx_packets(ifname: &str) -> Result<u64> {
    let path = "/proc/thread-self/net/dev";
    let dev = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let line = dev
        .lines()
        .find_map(|line| line.trim_start().strip_prefix(&format!("{ifname}:")))
        .with_context(|| format!("{path} has no {ifname}"))?;
    // Receive bytes, then receive packets.
    line.split_whitespace()
        .nth(1)
        .and_then(|packets| packets.parse().ok())
        .with_context(|| format!("{path}: no packet count for {ifname}"))
}

/// Datagrams that reached UDP in the calling thread's namespace, delivered to a socket or not.
fn udp_arrivals() -> Result<u64> {
    let path = "/proc/thread-self/net/snmp";
    let snmp = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let mut udp = snmp.lines().filter(|line| line.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        bail!("{path} has no Udp lines");
    };
    let mut total = 0;
    for (name, value) in names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
    {
        if matches!(name, "InDatagrams" | "NoPorts" | "InErrors") {
            total += value
                .parse::<u64>()
                .with_context(|| format!("{path}: Udp {name} = {value}"))?;
        }
    }
    Ok(total)
}
