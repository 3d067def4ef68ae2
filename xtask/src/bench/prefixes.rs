//! The ban sets every mechanism is loaded with, and their files.
//!
//! A set of `n` bans is `n - 1` random, non-overlapping IPv4 prefixes of mixed lengths (/16 to
//! /32, weighted towards long ones as real blocklists are) followed by the /24 of the banned
//! test source. The generator is seeded, so every run and every mechanism sees the same
//! prefixes; 10.0.0.0/8, where all of the benchmark's own addresses live, is never drawn.
//!
//! The files are the inputs of each loader: a plain list (the daemon's `ban --file`), an
//! `nft -f` script and an `ipset restore` script. They live in a work directory under
//! `target/bench` that is removed when the run ends.

use std::{
    cell::RefCell,
    collections::BTreeMap,
    fmt,
    fs::{self, File},
    io::{BufWriter, Write as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use super::netns::RX_IF;

/// Source address of the banned test packets (the sender's address in the veth comparison).
pub const BANNED_SOURCE: [u8; 4] = [10, 77, 1, 2];
/// Source address of the passing test packet: in no ban.
pub const PASSING_SOURCE: [u8; 4] = [10, 88, 0, 2];
/// What one ban trie holds by default; the random prefixes then cover about a third of the
/// address space, so drawing more never runs dry.
pub const MAX_PREFIXES: usize = aiguard_common::DEFAULT_MAX_BANS as usize;

/// nftables table (netdev family) holding the `bans` interval set and the ingress chain.
pub const NFT_TABLE: &str = "agbench";
/// ipset holding the bans (hash:net).
pub const IPSET_NAME: &str = "agbench_bans";

/// Prefix lengths and their weights per thousand. Long prefixes dominate real blocklists; the
/// short ones are few because each covers so much (1% of 1M prefixes as /16s would be 10k of
/// the 65k /16s there are).
const LENGTH_WEIGHTS: [(u8, u32); 17] = [
    (16, 5),
    (17, 5),
    (18, 5),
    (19, 5),
    (20, 5),
    (21, 5),
    (22, 5),
    (23, 5),
    (24, 160),
    (25, 20),
    (26, 20),
    (27, 20),
    (28, 20),
    (29, 20),
    (30, 20),
    (31, 20),
    (32, 660),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    /// Network address in network byte order, host bits zero.
    pub addr: [u8; 4],
    pub len: u8,
}

impl Prefix {
    fn new(addr: u32, len: u8) -> Self {
        Self {
            addr: (addr & mask(len)).to_be_bytes(),
            len,
        }
    }

    /// The banned test source's /24: the last entry of every ban set.
    pub fn banned_source_net() -> Self {
        Self::new(u32::from_be_bytes(BANNED_SOURCE), 24)
    }

    fn first(self) -> u32 {
        u32::from_be_bytes(self.addr)
    }

    fn last(self) -> u32 {
        self.first() | !mask(self.len)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.addr;
        write!(f, "{a}.{b}.{c}.{d}/{}", self.len)
    }
}

fn mask(len: u8) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - len) }
}

/// The random prefixes, generated once for the largest set any part needs.
pub struct Prefixes {
    random: Vec<Prefix>,
}

impl Prefixes {
    pub fn generate(largest: usize) -> Self {
        let mut rng = SplitMix64(0x6167_6265_6e63_6821);
        let total_weight: u32 = LENGTH_WEIGHTS.iter().map(|&(_, w)| w).sum();
        // Taken ranges, first address -> last address; 10/8 is reserved for our own addresses.
        let mut taken = BTreeMap::from([(10u32 << 24, (11u32 << 24) - 1)]);
        let mut random = Vec::with_capacity(largest.saturating_sub(1));
        while random.len() + 1 < largest {
            let bits = rng.next();
            let mut pick = (bits >> 32) as u32 % total_weight;
            let len = LENGTH_WEIGHTS
                .iter()
                .find(|&&(_, w)| {
                    let here = pick < w;
                    pick = pick.saturating_sub(w);
                    here
                })
                .map_or(32, |&(len, _)| len);
            let candidate = Prefix::new(bits as u32, len);
            // Ranges in `taken` are disjoint, so the one starting last at or before the
            // candidate's end is the only one that can overlap it.
            let overlaps = taken
                .range(..=candidate.last())
                .next_back()
                .is_some_and(|(_, &end)| end >= candidate.first());
            if !overlaps {
                taken.insert(candidate.first(), candidate.last());
                random.push(candidate);
            }
        }
        Self { random }
    }

    /// A set of `count` bans: `count - 1` random prefixes, then the banned source's /24.
    pub fn bans(&self, count: usize) -> Vec<Prefix> {
        let mut bans = self.random[..count - 1].to_vec();
        bans.push(Prefix::banned_source_net());
        bans
    }
}

/// The generator's own PRNG (SplitMix64): small, seeded, and good enough to scatter prefixes.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// One ban set rendered for each loader.
#[derive(Clone)]
pub struct PrefixFiles {
    /// One CIDR per line: `aiguard ban --file`.
    pub plain: PathBuf,
    /// `nft -f`: the table with the `bans` interval set and the ingress chain on [`RX_IF`] that
    /// drops what the set matches.
    pub nft: PathBuf,
    /// `ipset restore`: the hash:net set.
    pub ipset: PathBuf,
}

/// The work directory and the files written into it so far, by set size.
pub struct FileCache {
    dir: PathBuf,
    written: RefCell<BTreeMap<usize, PrefixFiles>>,
}

impl FileCache {
    pub fn create(bench_dir: &Path) -> Result<Self> {
        let dir = bench_dir.join(super::unique_name());
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            dir,
            written: RefCell::new(BTreeMap::new()),
        })
    }

    /// A scratch path in the work directory (removed with it).
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The files for the set of `count` bans, written on first use.
    pub fn get(&self, prefixes: &Prefixes, count: usize) -> Result<PrefixFiles> {
        if let Some(files) = self.written.borrow().get(&count) {
            return Ok(files.clone());
        }
        let bans = prefixes.bans(count);
        let files = PrefixFiles {
            plain: self.dir.join(format!("bans-{count}.txt")),
            nft: self.dir.join(format!("bans-{count}.nft")),
            ipset: self.dir.join(format!("bans-{count}.ipset")),
        };
        write_lines(&files.plain, |out| {
            for ban in &bans {
                writeln!(out, "{ban}")?;
            }
            Ok(())
        })?;
        write_lines(&files.nft, |out| {
            writeln!(out, "table netdev {NFT_TABLE} {{")?;
            writeln!(out, "\tset bans {{")?;
            writeln!(out, "\t\ttype ipv4_addr")?;
            writeln!(out, "\t\tflags interval")?;
            writeln!(out, "\t\telements = {{")?;
            for ban in &bans {
                writeln!(out, "\t\t\t{ban},")?;
            }
            writeln!(out, "\t\t}}")?;
            writeln!(out, "\t}}")?;
            // The earliest hook there is for nftables, as an operator would use for a blocklist.
            writeln!(out, "\tchain ingress {{")?;
            writeln!(
                out,
                "\t\ttype filter hook ingress device \"{RX_IF}\" priority -500; policy accept;"
            )?;
            writeln!(out, "\t\tip saddr @bans drop")?;
            writeln!(out, "\t}}")?;
            writeln!(out, "}}")
        })?;
        write_lines(&files.ipset, |out| {
            // Room for the whole set: hash:net refuses adds beyond maxelem.
            let size = (count * 2).next_power_of_two().max(1024);
            writeln!(
                out,
                "create {IPSET_NAME} hash:net family inet hashsize {size} maxelem {size}"
            )?;
            for ban in &bans {
                writeln!(out, "add {IPSET_NAME} {ban}")?;
            }
            Ok(())
        })?;
        self.written.borrow_mut().insert(count, files.clone());
        Ok(files)
    }
}

impl Drop for FileCache {
    fn drop(&mut self) {
        if let Err(error) = fs::remove_dir_all(&self.dir) {
            eprintln!("warning: could not remove {}: {error}", self.dir.display());
        }
    }
}

fn write_lines(
    path: &Path,
    body: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::new(file);
    body(&mut out)
        .and_then(|()| out.flush())
        .with_context(|| format!("writing {}", path.display()))
}

/// Removes work directories left under `bench_dir` by runs that were killed.
pub fn remove_stale_work_dirs(bench_dir: &Path) -> Result<()> {
    for dir in super::leftovers(bench_dir)? {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_do_not_overlap_and_end_with_the_banned_net() {
        let prefixes = Prefixes::generate(20_000);
        let bans = prefixes.bans(20_000);
        assert_eq!(bans.len(), 20_000);
        assert_eq!(bans.last(), Some(&Prefix::banned_source_net()));
        let mut ranges: Vec<(u32, u32)> = bans.iter().map(|p| (p.first(), p.last())).collect();
        ranges.sort_unstable();
        assert!(ranges.windows(2).all(|w| w[0].1 < w[1].0));
        let passing = u32::from_be_bytes(PASSING_SOURCE);
        assert!(!ranges.iter().any(|&(a, b)| (a..=b).contains(&passing)));
        for len in 16..=32 {
            assert!(bans.iter().any(|p| p.len == len), "no /{len}");
        }
    }

    #[test]
    fn generation_is_reproducible() {
        assert_eq!(
            Prefixes::generate(100).bans(50),
            Prefixes::generate(50).bans(50)
        );
    }

    #[test]
    fn prefixes_print_as_cidr() {
        assert_eq!(Prefix::banned_source_net().to_string(), "10.77.1.0/24");
        assert_eq!(Prefix::new(0xc0a8_01ff, 32).to_string(), "192.168.1.255/32");
    }
}
