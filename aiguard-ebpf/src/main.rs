//! aiguard's XDP program: parse, look up, count, decide.
//!
//! Order of checks for a packet whose source address could be read:
//! allowlist (pass) -> active ban (drop, or count only when shadow) -> per-source bucket on the
//! configured destination ports (drop when empty) -> pass.
//! Whatever cannot be parsed far enough to decide passes and is counted: the program never
//! drops what it did not match.
#![no_std]
#![no_main]
// The BPF target has no compare-and-swap, so `AtomicU64::fetch_add` does not exist there; the
// intrinsic lowers to the BPF atomic add instruction.
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic_xadd is the only way to emit BPF_ATOMIC add"
)]

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    mem,
};

use aiguard_common::{
    AllowEntry, BAN_ENTRY_HITS_OFFSET, BAN_FLAG_SHADOW, BanEntry, BucketState, CFG_ALL_PORTS,
    CFG_ALLOWLIST_INLINE, CFG_HAS_ALLOWLIST, CFG_RATE_LIMIT, CFG_SYN_ONLY, DEFAULT_BUCKET_ENTRIES,
    DEFAULT_MAX_BANS, IFACE_STAT_SLOTS, IFINDEX_SLOTS, INLINE_ALLOW_V4, INLINE_ALLOW_V6, MAX_ALLOW,
    PORT_SLOTS, XdpConfig, stat,
};
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_ktime_get_boot_ns, bpf_ktime_get_coarse_ns},
    macros::{map, xdp},
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use aya_log_ebpf::info;

// Maps are pinned by name so that a restarted daemon adopts them (and the bans in them).
#[map]
static BANS_V4: LpmTrie<[u8; 4], BanEntry> = LpmTrie::pinned(DEFAULT_MAX_BANS, 0);
#[map]
static BANS_V6: LpmTrie<[u8; 16], BanEntry> = LpmTrie::pinned(DEFAULT_MAX_BANS, 0);
#[map]
static ALLOW_V4: LpmTrie<[u8; 4], AllowEntry> = LpmTrie::pinned(MAX_ALLOW, 0);
#[map]
static ALLOW_V6: LpmTrie<[u8; 16], AllowEntry> = LpmTrie::pinned(MAX_ALLOW, 0);
#[map]
static BUCKETS_V4: LruHashMap<[u8; 4], BucketState> = LruHashMap::pinned(DEFAULT_BUCKET_ENTRIES, 0);
#[map]
static BUCKETS_V6: LruHashMap<[u8; 16], BucketState> =
    LruHashMap::pinned(DEFAULT_BUCKET_ENTRIES, 0);
#[map]
static CONFIG: Array<XdpConfig> = Array::pinned(1, 0);
#[map]
static RATE_PORTS: Array<u32> = Array::pinned(PORT_SLOTS, 0);
#[map]
static IFACE_SLOT: Array<u32> = Array::pinned(IFINDEX_SLOTS, 0);
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(IFACE_STAT_SLOTS * stat::COUNT, 0);

const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPV6_HDR_LEN: usize = 40;
/// IPv6 extension headers walked before giving up on finding the transport header (RFC 8200's
/// recommended order has at most 7, the destination options header appearing twice).
const MAX_IPV6_EXT_HEADERS: usize = 8;
/// Bans looked at per packet when more specific ones are expired or shadow.
const MAX_BAN_LEVELS: usize = 4;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

// Plain structs with every field set on every path, rather than enums with payloads: LLVM
// leaves an enum's unused payload bytes undefined, may fill them from whatever register is at
// hand (a map pointer, say), and the verifier then rejects the arithmetic that packs them.

/// A source address; IPv4 uses the first four bytes of `addr`, the rest stay zero.
#[derive(Clone, Copy)]
struct Source {
    v6: bool,
    addr: [u8; 16],
}

impl Source {
    #[inline(always)]
    fn v4(a: [u8; 4]) -> Self {
        Self {
            v6: false,
            addr: [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    }

    #[inline(always)]
    fn v4_bytes(&self) -> [u8; 4] {
        [self.addr[0], self.addr[1], self.addr[2], self.addr[3]]
    }
}

/// What the transport header told us: `kind` is one of the `TRANSPORT_*` constants.
#[derive(Clone, Copy)]
struct Transport {
    kind: u8,
    tcp_syn: bool,
    dport: u16,
}

/// TCP or UDP with a readable destination port.
const TRANSPORT_PORTS: u8 = 0;
/// Parsed, but a protocol without ports (ICMP, GRE, ...).
const TRANSPORT_OTHER: u8 = 1;
/// Could not be read: truncated, or a non-first fragment.
const TRANSPORT_UNPARSED: u8 = 2;

impl Transport {
    const OTHER: Self = Self {
        kind: TRANSPORT_OTHER,
        tcp_syn: false,
        dport: 0,
    };
    const UNPARSED: Self = Self {
        kind: TRANSPORT_UNPARSED,
        tcp_syn: false,
        dport: 0,
    };
}

/// The parse result: `kind` is one of the `PARSED_*` constants; `src` and `transport` are
/// meaningful for `PARSED_IP` only.
struct Parsed {
    kind: u8,
    src: Source,
    transport: Transport,
}

const PARSED_IP: u8 = 0;
const PARSED_NON_IP: u8 = 1;
const PARSED_UNPARSED: u8 = 2;

impl Parsed {
    const NON_IP: Self = Self {
        kind: PARSED_NON_IP,
        src: Source {
            v6: false,
            addr: [0; 16],
        },
        transport: Transport::UNPARSED,
    };
    const UNPARSED: Self = Self {
        kind: PARSED_UNPARSED,
        ..Self::NON_IP
    };

    #[inline(always)]
    fn ip(src: Source, transport: Transport) -> Self {
        Self {
            kind: PARSED_IP,
            src,
            transport,
        }
    }
}

#[xdp]
pub fn aiguard_xdp(ctx: XdpContext) -> u32 {
    let slot = iface_slot(&ctx);
    let (action, counter) = decide(&ctx, slot);
    count(slot, counter);
    action
}

fn decide(ctx: &XdpContext, slot: u32) -> (u32, u32) {
    let parsed = parse(ctx);
    match parsed.kind {
        PARSED_NON_IP => return (xdp_action::XDP_PASS, stat::NON_IP),
        PARSED_UNPARSED => return (xdp_action::XDP_PASS, stat::UNPARSED),
        _ => {}
    }
    let (src, transport) = (parsed.src, parsed.transport);

    let cfg = CONFIG.get(0);
    if let Some(cfg) = cfg
        && cfg.flags & CFG_HAS_ALLOWLIST != 0
        && is_allowlisted(cfg, src)
    {
        return (xdp_action::XDP_PASS, stat::ALLOWLISTED);
    }

    // The trie answers with the most specific ban. When that one is expired or shadow, a less
    // specific ban may still cover the source (a shadow /32 inside an enforced /24): look
    // below it, a bounded number of levels.
    let mut shadow_matched = false;
    let mut max_len = if src.v6 { 128 } else { 32 };
    for _ in 0..MAX_BAN_LEVELS {
        let Some(ban) = ban_for(src, max_len) else {
            break;
        };
        // The clock costs ~30 ns: read it only for a ban that can expire.
        if ban.expires_boot_ns == 0 || boot_ns() < ban.expires_boot_ns {
            record_hit(ctx, ban, src);
            if ban.flags & BAN_FLAG_SHADOW == 0 {
                return (xdp_action::XDP_DROP, stat::DROP_BANNED);
            }
            shadow_matched = true;
        }
        if ban.prefix_len == 0 {
            break;
        }
        max_len = u32::from(ban.prefix_len) - 1;
    }
    if shadow_matched {
        count(slot, stat::SHADOW);
    }

    if let Some(cfg) = cfg
        && bucket_applies(cfg, transport)
        && !take_token(cfg, src, bucket_ns())
    {
        return (xdp_action::XDP_DROP, stat::DROP_RATE);
    }

    if transport.kind == TRANSPORT_UNPARSED {
        (xdp_action::XDP_PASS, stat::UNPARSED)
    } else {
        (xdp_action::XDP_PASS, stat::PASSED)
    }
}

/// The clock ban expiries are set in: CLOCK_BOOTTIME, which keeps counting through suspend.
#[inline(always)]
fn boot_ns() -> u64 {
    // SAFETY: a helper without arguments, available to XDP programs since Linux 5.8.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// The buckets' clock: CLOCK_MONOTONIC_COARSE, a fraction of the cost of a precise read, with
/// one jiffy (1-10 ms) resolution. GCRA stays exact on average; the daemon requires a burst of
/// at least one jiffy's worth of packets so the coarse steps never cap the rate.
#[inline(always)]
fn bucket_ns() -> u64 {
    // SAFETY: a helper without arguments, available to XDP programs since Linux 5.11.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
fn iface_slot(ctx: &XdpContext) -> u32 {
    // SAFETY: reading a field of the context the kernel handed us.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    if ifindex < IFINDEX_SLOTS {
        match IFACE_SLOT.get(ifindex) {
            Some(&slot) if slot < IFACE_STAT_SLOTS => slot,
            _ => 0,
        }
    } else {
        0
    }
}

#[inline(always)]
fn count(slot: u32, counter: u32) {
    if let Some(c) = STATS.get_ptr_mut(slot * stat::COUNT + counter) {
        // SAFETY: per-CPU slot, nothing else writes it while this program runs on this CPU.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn is_allowlisted(cfg: &XdpConfig, src: Source) -> bool {
    if cfg.flags & CFG_ALLOWLIST_INLINE != 0 {
        return in_inline_allowlist(cfg, src);
    }
    if src.v6 {
        ALLOW_V6.get(Key::new(128, src.addr)).is_some()
    } else {
        ALLOW_V4.get(Key::new(32, src.v4_bytes())).is_some()
    }
}

/// Scans the few allowlist ranges the daemon keeps in the config map.
#[inline(always)]
fn in_inline_allowlist(cfg: &XdpConfig, src: Source) -> bool {
    if src.v6 {
        let a = &src.addr;
        let hi = u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
        let lo = u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]);
        for i in 0..INLINE_ALLOW_V6 {
            if i as u32 >= cfg.allow_v6_len {
                break;
            }
            let [net_hi, net_lo, mask_hi, mask_lo] = cfg.allow_v6[i];
            if hi & mask_hi == net_hi && lo & mask_lo == net_lo {
                return true;
            }
        }
    } else {
        let addr = u32::from_ne_bytes(src.v4_bytes());
        for i in 0..INLINE_ALLOW_V4 {
            if i as u32 >= cfg.allow_v4_len {
                break;
            }
            let [net, mask] = cfg.allow_v4[i];
            if addr & mask == net {
                return true;
            }
        }
    }
    false
}

/// The most specific ban covering `src` with a prefix of at most `max_len` bits.
#[inline(always)]
fn ban_for(src: Source, max_len: u32) -> Option<&'static BanEntry> {
    if src.v6 {
        BANS_V6.get(Key::new(max_len, src.addr))
    } else {
        BANS_V4.get(Key::new(max_len, src.v4_bytes()))
    }
}

/// Counts a match on the ban's own counter; logs the first one so the operator sees a ban bite.
#[inline(always)]
fn record_hit(ctx: &XdpContext, ban: &BanEntry, src: Source) {
    let hits = (ban as *const BanEntry as usize + BAN_ENTRY_HITS_OFFSET) as *mut u64;
    // SAFETY: `hits` points at the 8-byte aligned `hits` field of a live map value; the kernel
    // keeps the value alive for the duration of the program, and every writer adds atomically.
    if unsafe { hits.read_volatile() } == 0 {
        if src.v6 {
            info!(ctx, "ban matched its first packet, from {:i}", src.addr);
        } else {
            info!(
                ctx,
                "ban matched its first packet, from {:i}",
                src.v4_bytes()
            );
        }
    }
    // SAFETY: as above.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(hits, 1) };
}

#[inline(always)]
fn bucket_applies(cfg: &XdpConfig, transport: Transport) -> bool {
    if cfg.flags & CFG_RATE_LIMIT == 0 {
        return false;
    }
    let syn_only = cfg.flags & CFG_SYN_ONLY != 0;
    let all_ports = cfg.flags & CFG_ALL_PORTS != 0;
    match transport.kind {
        TRANSPORT_PORTS => {
            if syn_only && !transport.tcp_syn {
                return false;
            }
            all_ports || matches!(RATE_PORTS.get(transport.dport as u32), Some(&v) if v != 0)
        }
        TRANSPORT_OTHER => all_ports && !syn_only,
        _ => false,
    }
}

/// GCRA: a packet conforms when the theoretical arrival time is at most `tolerance` ahead.
#[inline(always)]
fn take_token(cfg: &XdpConfig, src: Source, now: u64) -> bool {
    let fresh = BucketState {
        tat_ns: now + cfg.emission_ns,
    };
    let state = if !src.v6 {
        {
            let key = mask_v4(src.v4_bytes(), cfg);
            match BUCKETS_V4.get_ptr_mut(key) {
                Some(p) => p,
                None => {
                    let _ = BUCKETS_V4.insert(key, fresh, 0);
                    return true;
                }
            }
        }
    } else {
        let key = mask_v6(src.addr, cfg);
        match BUCKETS_V6.get_ptr_mut(key) {
            Some(p) => p,
            None => {
                let _ = BUCKETS_V6.insert(key, fresh, 0);
                return true;
            }
        }
    };
    // SAFETY: pointer to a live LRU map value. Two CPUs may race on one source's state; the
    // bucket is coarse by design and a lost update only lets one extra packet through.
    unsafe {
        let tat = if (*state).tat_ns > now {
            (*state).tat_ns
        } else {
            now
        };
        if tat - now > cfg.tolerance_ns {
            return false;
        }
        (*state).tat_ns = tat + cfg.emission_ns;
    }
    true
}

#[inline(always)]
fn mask_v4(a: [u8; 4], cfg: &XdpConfig) -> [u8; 4] {
    (u32::from_ne_bytes(a) & cfg.v4_mask).to_ne_bytes()
}

#[inline(always)]
fn mask_v6(a: [u8; 16], cfg: &XdpConfig) -> [u8; 16] {
    let hi = u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]) & cfg.v6_mask[0];
    let lo =
        u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]) & cfg.v6_mask[1];
    let (hi, lo) = (hi.to_ne_bytes(), lo.to_ne_bytes());
    [
        hi[0], hi[1], hi[2], hi[3], hi[4], hi[5], hi[6], hi[7], lo[0], lo[1], lo[2], lo[3], lo[4],
        lo[5], lo[6], lo[7],
    ]
}

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: ptr_at checked that size_of::<T>() bytes at offset lie inside the packet.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { p.read_unaligned() })
}

#[inline(always)]
fn read_u16_be(ctx: &XdpContext, offset: usize) -> Option<u16> {
    read::<[u8; 2]>(ctx, offset).map(u16::from_be_bytes)
}

fn parse(ctx: &XdpContext) -> Parsed {
    let Some(mut ethertype) = read_u16_be(ctx, 12) else {
        return Parsed::UNPARSED;
    };
    let mut offset = ETH_HDR_LEN;
    // Up to two VLAN tags (802.1ad outer, 802.1Q inner).
    for _ in 0..2 {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let Some(inner) = read_u16_be(ctx, offset + 2) else {
            return Parsed::UNPARSED;
        };
        ethertype = inner;
        offset += 4;
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(ctx, offset),
        ETH_P_IPV6 => parse_ipv6(ctx, offset),
        // A third VLAN tag is more than this program reads: it cannot tell what is inside.
        ETH_P_8021Q | ETH_P_8021AD => Parsed::UNPARSED,
        _ => Parsed::NON_IP,
    }
}

fn parse_ipv4(ctx: &XdpContext, offset: usize) -> Parsed {
    // One bounds check for the fixed header; the verifier then knows every field is readable.
    let Some(h) = read::<[u8; 20]>(ctx, offset) else {
        return Parsed::UNPARSED;
    };
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return Parsed::UNPARSED;
    }
    // Options, if any, must be present too before the source is trusted.
    if ptr_at::<u8>(ctx, offset + ihl - 1).is_none() {
        return Parsed::UNPARSED;
    }
    let src = Source::v4([h[12], h[13], h[14], h[15]]);
    let frag = u16::from_be_bytes([h[6], h[7]]);
    if frag & 0x1fff != 0 {
        // Beyond the first fragment there is no transport header.
        return Parsed::ip(src, Transport::UNPARSED);
    }
    Parsed::ip(src, parse_transport(ctx, h[9], offset + ihl))
}

fn parse_ipv6(ctx: &XdpContext, offset: usize) -> Parsed {
    let Some(first) = read::<u8>(ctx, offset) else {
        return Parsed::UNPARSED;
    };
    if first >> 4 != 6 {
        return Parsed::UNPARSED;
    }
    let Some(h) = read::<[u8; IPV6_HDR_LEN]>(ctx, offset) else {
        return Parsed::UNPARSED;
    };
    let mut next = h[6];
    let mut src = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    // An IPv4-mapped source (::ffff:a.b.c.d) is the IPv4 host it stands for.
    let src = if src[..10] == [0u8; 10] && src[10] == 0xff && src[11] == 0xff {
        Source::v4([src[12], src[13], src[14], src[15]])
    } else {
        Source {
            v6: true,
            addr: src,
        }
    };

    let mut at = offset + IPV6_HDR_LEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            // Hop-by-hop, routing, destination options: length in 8-octet units, minus one.
            0 | 43 | 60 => {
                let Some([nh, len]) = read::<[u8; 2]>(ctx, at) else {
                    return Parsed::ip(src, Transport::UNPARSED);
                };
                next = nh;
                at += (len as usize + 1) * 8;
            }
            // Fragment header: only the first fragment carries the transport header.
            44 => {
                let Some([nh, _, off_hi, off_lo]) = read::<[u8; 4]>(ctx, at) else {
                    return Parsed::ip(src, Transport::UNPARSED);
                };
                if u16::from_be_bytes([off_hi, off_lo]) & 0xfff8 != 0 {
                    return Parsed::ip(src, Transport::UNPARSED);
                }
                next = nh;
                at += 8;
            }
            // Authentication header: length in 4-octet units, minus two.
            51 => {
                let Some([nh, len]) = read::<[u8; 2]>(ctx, at) else {
                    return Parsed::ip(src, Transport::UNPARSED);
                };
                next = nh;
                at += (len as usize + 2) * 4;
            }
            _ => break,
        }
    }
    match next {
        // Still an extension header: more than this program walks.
        0 | 43 | 44 | 51 | 60 => Parsed::ip(src, Transport::UNPARSED),
        _ => Parsed::ip(src, parse_transport(ctx, next, at)),
    }
}

#[inline(always)]
fn parse_transport(ctx: &XdpContext, proto: u8, at: usize) -> Transport {
    // One fixed-size read per header: the verifier tracks a variable offset only through the
    // bounds check of the very pointer that is read.
    match proto {
        IPPROTO_TCP => match read::<[u8; 20]>(ctx, at) {
            // The fixed header: a TCP header cut short is not one to judge by its port.
            Some(h) => Transport {
                kind: TRANSPORT_PORTS,
                dport: u16::from_be_bytes([h[2], h[3]]),
                tcp_syn: h[13] & TCP_FLAG_SYN != 0 && h[13] & TCP_FLAG_ACK == 0,
            },
            None => Transport::UNPARSED,
        },
        IPPROTO_UDP => match read::<[u8; 8]>(ctx, at) {
            Some(h) => Transport {
                kind: TRANSPORT_PORTS,
                dport: u16::from_be_bytes([h[2], h[3]]),
                tcp_syn: false,
            },
            None => Transport::UNPARSED,
        },
        _ => Transport::OTHER,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
