//! The network namespaces the benchmark makes for itself, and the veth pair between them.
//!
//! All benchmark traffic stays inside them: the sender namespace holds one end of the veth pair,
//! the receiver namespace the other, where the mechanism under test is hooked. Every namespace
//! is deleted when its guard drops (on errors and panics too); a later run deletes the ones a
//! killed run left behind.

use std::{fs::File, path::Path, process::Command, thread};

use anyhow::{Context as _, Result};
use nix::sched::{CloneFlags, setns};

use super::prefixes::BANNED_SOURCE;
use crate::stdout_of;

/// The sender's end of the veth pair.
pub const TX_IF: &str = "agtx";
/// The receiver's end, where XDP programs and nftables hooks go.
pub const RX_IF: &str = "agrx";
/// Fixed, locally administered MACs: the sender addresses its frames without asking.
pub const TX_MAC: [u8; 6] = [0x02, 0, 10, 77, 1, 2];
pub const RX_MAC: [u8; 6] = [0x02, 0, 10, 77, 0, 1];
/// The receiver's address; the sender's is the banned source.
pub const RX_ADDR: [u8; 4] = [10, 77, 0, 1];
const SUBNET_LEN: u8 = 16;

/// Where `ip netns` keeps its namespace handles.
const NETNS_DIR: &str = "/run/netns";

/// A named network namespace, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create() -> Result<Self> {
        let name = super::unique_name();
        stdout_of(Command::new("ip").args(["netns", "add", &name]))
            .with_context(|| format!("creating network namespace {name}"))?;
        let netns = Self { name };
        // No IPv6 on our links: router solicitations and DAD would be traffic of their own.
        stdout_of(netns.command("sysctl").args([
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ]))?;
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        stdout_of(Command::new("ip").args(["-n", &self.name]).args(args))?;
        Ok(())
    }

    /// `PROGRAM` to be run inside this namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// The namespace handle, for `setns`.
    pub fn open(&self) -> Result<File> {
        let path = Path::new(NETNS_DIR).join(&self.name);
        File::open(&path).with_context(|| format!("opening {}", path.display()))
    }

    /// Runs `f` on a thread of its own that has joined this namespace, and waits for it. The
    /// network namespace is per thread, so the rest of the process stays where it is.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let handle = self.open()?;
        let name = &self.name;
        thread::scope(|scope| {
            scope
                .spawn(move || {
                    enter(&handle).with_context(|| format!("joining namespace {name}"))?;
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = stdout_of(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!(
                "warning: deleting network namespace {}: {error:#}",
                self.name
            );
        }
    }
}

/// Moves the calling thread into the namespace behind `handle`.
pub fn enter(handle: &File) -> Result<()> {
    setns(handle, CloneFlags::CLONE_NEWNET).context("setns(CLONE_NEWNET)")
}

/// A sender namespace and a receiver namespace joined by a veth pair: [`TX_IF`] in `tx`,
/// [`RX_IF`] in `rx`, both up and addressed (by [`VethPair::create`], in 10.77.0.0/16).
/// Dropping it deletes both namespaces, and with them the pair and whatever was hooked to it.
pub struct VethPair {
    pub tx: Netns,
    pub rx: Netns,
}

impl VethPair {
    pub fn create() -> Result<Self> {
        let tx_addr = format!("{}/{SUBNET_LEN}", dotted(BANNED_SOURCE));
        let rx_addr = format!("{}/{SUBNET_LEN}", dotted(RX_ADDR));
        Self::with_addresses(&[tx_addr], &[rx_addr])
    }

    /// The same pair with other addresses (CIDR, e.g. "10.247.1.1/24") on each end.
    pub fn with_addresses(tx_addrs: &[String], rx_addrs: &[String]) -> Result<Self> {
        let pair = Self {
            tx: Netns::create()?,
            rx: Netns::create()?,
        };
        let (tx_mac, rx_mac) = (mac(TX_MAC), mac(RX_MAC));
        pair.tx.ip(&[
            "link",
            "add",
            TX_IF,
            "address",
            &tx_mac,
            "type",
            "veth",
            "peer",
            "name",
            RX_IF,
            "address",
            &rx_mac,
            "netns",
            pair.rx.name(),
        ])?;
        for addr in tx_addrs {
            pair.tx.ip(&["addr", "add", addr, "dev", TX_IF])?;
        }
        for addr in rx_addrs {
            pair.rx.ip(&["addr", "add", addr, "dev", RX_IF])?;
        }
        pair.tx.ip(&["link", "set", TX_IF, "up"])?;
        pair.rx.ip(&["link", "set", RX_IF, "up"])?;
        Ok(pair)
    }
}

/// `02:00:0a:...`, as `ip` takes it.
pub fn mac(bytes: [u8; 6]) -> String {
    bytes.map(|b| format!("{b:02x}")).join(":")
}

fn dotted([a, b, c, d]: [u8; 4]) -> String {
    format!("{a}.{b}.{c}.{d}")
}

/// Deletes the namespaces that runs which no longer exist left behind (killed by a signal,
/// so their guards never ran).
pub fn remove_stale() -> Result<()> {
    for path in super::leftovers(Path::new(NETNS_DIR))? {
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        eprintln!("bench: deleting namespace {name} left by an earlier run");
        stdout_of(Command::new("ip").args(["netns", "del", &name]))?;
    }
    Ok(())
}
