//! Types shared by aiguard's XDP program and its daemon.
//!
//! # Layout
//! - map names: the contract between the kernel object and userspace (and the pin file names
//!   under the bpffs directory);
//! - [`BanEntry`], [`AllowEntry`], [`BucketState`], [`XdpConfig`]: `#[repr(C)]` map values,
//!   with no implicit padding and no enums, so both sides agree on every byte;
//! - [`stat`]: indices of the per-CPU verdict counters;
//! - [`reason`]: the reason codes a ban carries in the kernel.
//!
//! Addresses in map keys are in network byte order (`[u8; 4]` / `[u8; 16]`), exactly as they
//! appear in the packet, so the kernel side never swaps bytes.
#![no_std]

/// Map names. They double as pin file names under the daemon's bpffs directory.
pub mod map_name {
    pub const BANS_V4: &str = "BANS_V4";
    pub const BANS_V6: &str = "BANS_V6";
    pub const ALLOW_V4: &str = "ALLOW_V4";
    pub const ALLOW_V6: &str = "ALLOW_V6";
    pub const BUCKETS_V4: &str = "BUCKETS_V4";
    pub const BUCKETS_V6: &str = "BUCKETS_V6";
    pub const CONFIG: &str = "CONFIG";
    pub const RATE_PORTS: &str = "RATE_PORTS";
    pub const IFACE_SLOT: &str = "IFACE_SLOT";
    pub const STATS: &str = "STATS";
}

/// Name of the XDP program in the object file.
pub const PROGRAM_NAME: &str = "aiguard_xdp";

/// Default capacity of each ban trie (IPv4 and IPv6 separately); the daemon may raise it at load.
pub const DEFAULT_MAX_BANS: u32 = 1 << 21;
/// Default capacity of each allowlist trie.
pub const MAX_ALLOW: u32 = 1 << 16;
/// Default number of per-source bucket entries per address family (LRU: the coldest go first).
pub const DEFAULT_BUCKET_ENTRIES: u32 = 1 << 20;
/// Interfaces are counted separately in up to this many slots; slot 0 collects any interface
/// the daemon has not assigned a slot (for example one whose ifindex is beyond [`IFINDEX_SLOTS`]).
pub const IFACE_STAT_SLOTS: u32 = 16;
/// The ifindex -> slot table is a plain array indexed by ifindex, so the lookup costs nothing.
pub const IFINDEX_SLOTS: u32 = 1 << 16;
/// Destination ports table: one entry per port, non-zero means "the bucket applies".
pub const PORT_SLOTS: u32 = 1 << 16;

/// Indices of the per-CPU verdict counters. Every packet lands in exactly one of
/// `PASSED`, `DROP_BANNED`, `DROP_RATE`, `ALLOWLISTED`, `UNPARSED`, `NON_IP`;
/// `SHADOW` additionally counts packets a shadow ban would have dropped.
pub mod stat {
    /// Parsed, not banned, within its bucket (or no bucket applies).
    pub const PASSED: u32 = 0;
    /// Dropped: the source matched an active ban.
    pub const DROP_BANNED: u32 = 1;
    /// Dropped: the source's token bucket was empty.
    pub const DROP_RATE: u32 = 2;
    /// Matched a shadow ban: counted, not dropped (the packet then goes on to the bucket).
    pub const SHADOW: u32 = 3;
    /// The source matched the allowlist: passed without any further check.
    pub const ALLOWLISTED: u32 = 4;
    /// Could not be parsed far enough to decide (truncated, bad header, non-first fragment
    /// from an unbanned source): passed.
    pub const UNPARSED: u32 = 5;
    /// Not IPv4/IPv6 (ARP, LLDP, ...): passed.
    pub const NON_IP: u32 = 6;
    /// Number of counters per interface slot.
    pub const COUNT: u32 = 7;

    /// Names used in metrics and `aiguard status`, indexed by the constants above.
    pub const NAMES: [&str; COUNT as usize] = [
        "passed",
        "dropped_banned",
        "dropped_rate",
        "shadow",
        "allowlisted",
        "unparsed",
        "non_ip",
    ];
}

/// Reason codes a ban carries in the kernel. The free-text reason lives in the daemon's store;
/// the code says which kind of decision made the ban.
pub mod reason {
    /// Banned by an operator (CLI or admin API).
    pub const MANUAL: u16 = 1;
    /// Banned by abuse detection on this node.
    pub const DETECTOR: u16 = 2;
    /// Replicated from another node.
    pub const REPLICATED: u16 = 3;
}

/// `BanEntry::flags`: count matches but do not drop.
pub const BAN_FLAG_SHADOW: u32 = 1;

/// Value of the ban tries.
///
/// The hit counter lives in the value itself and the kernel bumps it with an atomic add: exact,
/// and memory stays proportional to the number of bans (a per-CPU counter array sized for a
/// million bans would cost `8 B x bans x CPUs`, over a gigabyte on a large GPU node).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct BanEntry {
    /// CLOCK_BOOTTIME nanoseconds after which the ban no longer matches; 0 = never expires.
    /// BOOTTIME keeps counting through suspend, so an expiry is a real deadline.
    pub expires_boot_ns: u64,
    /// Packets that matched this ban (dropped, or counted only for a shadow ban).
    pub hits: u64,
    /// One of [`reason`].
    pub reason: u16,
    /// The ban's own prefix length (the trie does not return it): when this ban is expired or
    /// shadow, the kernel looks for a less specific one below it.
    pub prefix_len: u16,
    /// [`BAN_FLAG_SHADOW`] or 0.
    pub flags: u32,
}

/// Byte offset of [`BanEntry::hits`]; the kernel side relies on it for its atomic add.
pub const BAN_ENTRY_HITS_OFFSET: usize = 8;

/// Value of the allowlist tries (presence is what matters; the value is kept for future use).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct AllowEntry {
    pub flags: u32,
}

/// Per-source bucket state, GCRA form: the theoretical arrival time of the next conforming
/// packet. One u64 per source and no division in the kernel.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct BucketState {
    pub tat_ns: u64,
}

/// `XdpConfig::flags`: the per-source bucket is on.
pub const CFG_RATE_LIMIT: u32 = 1;
/// `XdpConfig::flags`: only TCP SYNs (new connections) take a token; other packets pass the bucket.
pub const CFG_SYN_ONLY: u32 = 2;
/// `XdpConfig::flags`: the bucket applies to every destination port (and to non-TCP/UDP traffic).
pub const CFG_ALL_PORTS: u32 = 4;

/// `XdpConfig::flags`: the allowlist has entries (when it is empty the program skips the lookup).
pub const CFG_HAS_ALLOWLIST: u32 = 8;

/// `XdpConfig::flags`: the whole allowlist is inline in the config map (`allow_v4`/`allow_v6`),
/// so the program scans it instead of looking up the trie.
pub const CFG_ALLOWLIST_INLINE: u32 = 16;
/// IPv4 allowlist ranges kept inline when the allowlist is this small (the common case: a few
/// monitoring, office or load-balancer ranges). An LPM trie lookup costs ~25 ns per packet;
/// scanning a handful of (address, mask) pairs costs a few.
pub const INLINE_ALLOW_V4: usize = 8;
/// IPv6 ranges kept inline.
pub const INLINE_ALLOW_V6: usize = 4;

/// Knobs the kernel side reads on every packet (single-entry array). Userspace computes the
/// GCRA parameters so the kernel only adds and compares.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct XdpConfig {
    /// Nanoseconds between conforming packets (1e9 / rate).
    pub emission_ns: u64,
    /// How far ahead of now the theoretical arrival time may run: emission_ns * (burst - 1).
    pub tolerance_ns: u64,
    /// IPv6 bucket key mask, as the two halves of the address read in memory order (so the
    /// kernel ANDs without swapping bytes).
    pub v6_mask: [u64; 2],
    /// `CFG_*` bits.
    pub flags: u32,
    /// IPv4 bucket key mask, in memory order like `v6_mask`.
    pub v4_mask: u32,
    /// IPv4 sources share a bucket per prefix of this length (32 = per address); informational.
    pub v4_prefix_len: u32,
    /// IPv6 sources share a bucket per prefix of this length (64 by default); informational.
    pub v6_prefix_len: u32,
    /// Inline allowlist, IPv4: `[address, mask]` in memory order; the first `allow_v4_len` used.
    pub allow_v4: [[u32; 2]; INLINE_ALLOW_V4],
    /// Inline allowlist, IPv6: `[address hi, address lo, mask hi, mask lo]` in memory order.
    pub allow_v6: [[u64; 4]; INLINE_ALLOW_V6],
    pub allow_v4_len: u32,
    pub allow_v6_len: u32,
}

impl XdpConfig {
    /// The masks for the given bucket prefix lengths (clamped to 32 and 128).
    pub fn with_prefixes(mut self, v4_prefix_len: u32, v6_prefix_len: u32) -> Self {
        let v4 = v4_prefix_len.min(32);
        let v6 = v6_prefix_len.min(128);
        let v4_mask = if v4 == 0 { 0 } else { u32::MAX << (32 - v4) };
        let v6_mask = if v6 == 0 { 0 } else { u128::MAX << (128 - v6) };
        let v6_bytes = v6_mask.to_be_bytes();
        let mut hi = [0u8; 8];
        let mut lo = [0u8; 8];
        hi.copy_from_slice(&v6_bytes[..8]);
        lo.copy_from_slice(&v6_bytes[8..]);
        self.v4_mask = u32::from_ne_bytes(v4_mask.to_be_bytes());
        self.v6_mask = [u64::from_ne_bytes(hi), u64::from_ne_bytes(lo)];
        self.v4_prefix_len = v4;
        self.v6_prefix_len = v6;
        self
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are #[repr(C)] of integers with explicit padding fields, so every bit pattern
    // is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for super::BanEntry {}
    unsafe impl aya::Pod for super::AllowEntry {}
    unsafe impl aya::Pod for super::BucketState {}
    unsafe impl aya::Pod for super::XdpConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn values_have_no_implicit_padding() {
        assert_eq!(size_of::<BanEntry>(), 8 + 8 + 2 + 2 + 4);
        assert_eq!(core::mem::offset_of!(BanEntry, hits), BAN_ENTRY_HITS_OFFSET);
        assert_eq!(size_of::<AllowEntry>(), 4);
        assert_eq!(size_of::<BucketState>(), 8);
        assert_eq!(
            size_of::<XdpConfig>(),
            8 + 8 + 16 + 4 * 4 + 8 * INLINE_ALLOW_V4 + 32 * INLINE_ALLOW_V6 + 8
        );
    }

    #[test]
    fn bucket_masks_keep_the_prefix() {
        let cfg = XdpConfig::default().with_prefixes(24, 64);
        let a = u32::from_ne_bytes([203, 0, 113, 77]) & cfg.v4_mask;
        assert_eq!(a.to_ne_bytes(), [203, 0, 113, 0]);
        let v6 = [0x20, 0x01, 0x0d, 0xb8, 1, 2, 3, 4, 9, 9, 9, 9, 9, 9, 9, 9];
        let hi = u64::from_ne_bytes(v6[..8].try_into().unwrap()) & cfg.v6_mask[0];
        let lo = u64::from_ne_bytes(v6[8..].try_into().unwrap()) & cfg.v6_mask[1];
        assert_eq!(hi.to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8, 1, 2, 3, 4]);
        assert_eq!(lo, 0);
        assert_eq!(XdpConfig::default().with_prefixes(0, 0).v4_mask, 0);
        assert_eq!(
            XdpConfig::default().with_prefixes(40, 200).v6_mask,
            [u64::MAX; 2]
        );
    }

    #[test]
    fn stat_names_cover_every_counter() {
        assert_eq!(stat::NAMES.len(), stat::COUNT as usize);
        assert_eq!(stat::NAMES[stat::DROP_RATE as usize], "dropped_rate");
    }
}
