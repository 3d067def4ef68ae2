//! The netfilter mechanisms aiguard is compared with, set up in the receiver namespace as an
//! operator would: nftables with an interval set on the netdev ingress hook (`nft -f`), and
//! iptables matching an ipset hash:net in the raw table's PREROUTING (`ipset restore`).
//!
//! Nothing here lists an nftables ruleset: with a large set, any `nft list` (even of a counter
//! in another table) dumps every element, minutes at 1M. The benchmark counts drops from the
//! interface and protocol statistics instead (see [`super::veth`]).

use std::{
    fs::File,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    netns::Netns,
    prefixes::{IPSET_NAME, NFT_TABLE},
};
use crate::stdout_of;

/// Loads an `nft -f` script (table, set and chain in one transaction); returns how long it took.
pub fn nft_load(rx: &Netns, script: &Path) -> Result<Duration> {
    let started = Instant::now();
    stdout_of(rx.command("nft").arg("-f").arg(script))
        .with_context(|| format!("loading {} with nft -f", script.display()))?;
    Ok(started.elapsed())
}

/// Deletes the table, so the kernel frees the set now rather than in the background while the
/// next mechanism is measured.
pub fn nft_unload(rx: &Netns) -> Result<()> {
    stdout_of(
        rx.command("nft")
            .args(["delete", "table", "netdev", NFT_TABLE]),
    )
    .context("deleting the nftables table")?;
    Ok(())
}

/// Loads an `ipset restore` script; returns how long it took.
pub fn ipset_load(rx: &Netns, script: &Path) -> Result<Duration> {
    let input = File::open(script).with_context(|| format!("opening {}", script.display()))?;
    let started = Instant::now();
    stdout_of(rx.command("ipset").arg("restore").stdin(Stdio::from(input)))
        .with_context(|| format!("loading {} with ipset restore", script.display()))?;
    Ok(started.elapsed())
}

/// The rule, in the raw table's PREROUTING: the earliest iptables hook (before conntrack),
/// where a blocklist goes.
const IPTABLES_RULE: [&str; 7] = ["-m", "set", "--match-set", IPSET_NAME, "src", "-j", "DROP"];

/// Adds the rule that drops what the ipset matches.
pub fn iptables_hook(rx: &Netns) -> Result<()> {
    stdout_of(
        rx.command("iptables")
            .args(["-w", "-t", "raw", "-A", "PREROUTING"])
            .args(IPTABLES_RULE),
    )
    .context("adding the iptables rule")?;
    Ok(())
}

/// Packets the rule has dropped so far (listing iptables rules does not list the ipset).
pub fn iptables_dropped(rx: &Netns) -> Result<u64> {
    let listing = stdout_of(rx.command("iptables").args([
        "-w",
        "-t",
        "raw",
        "-L",
        "PREROUTING",
        "-n",
        "-v",
        "-x",
    ]))?;
    // Two header lines, then one line per rule starting with its packet count.
    let Some(rule) = listing.lines().find(|line| line.contains(IPSET_NAME)) else {
        bail!("the iptables rule is gone:\n{listing}");
    };
    rule.split_whitespace()
        .next()
        .and_then(|packets| packets.parse().ok())
        .with_context(|| format!("no packet count in `{rule}`"))
}

/// Removes the rule.
pub fn iptables_unhook(rx: &Netns) -> Result<()> {
    stdout_of(
        rx.command("iptables")
            .args(["-w", "-t", "raw", "-F", "PREROUTING"]),
    )
    .context("flushing the iptables rule")?;
    Ok(())
}

/// Destroys the set, so the kernel frees it now rather than in the background later.
pub fn ipset_destroy(rx: &Netns) -> Result<()> {
    stdout_of(rx.command("ipset").args(["destroy", IPSET_NAME])).context("destroying the ipset")?;
    Ok(())
}
