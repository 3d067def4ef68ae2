//! The kernel side as the daemon sees it: load the XDP object, pin its maps and links under the
//! bpffs directory (adopting what a previous daemon pinned), attach to interfaces, and read and
//! write the maps.
//!
//! Adoption: maps are pinned by name, so loading again reuses them with their contents (bans,
//! hit counts, buckets, counters). A pinned XDP link is kept attached by its pin while no daemon
//! runs; a new daemon swaps its freshly loaded program into that link atomically
//! (`bpf_link_update`), so the interface is never unprotected.
use std::{
    collections::BTreeMap,
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use aiguard_common::{
    AllowEntry, BanEntry, CFG_ALLOWLIST_INLINE, CFG_HAS_ALLOWLIST, IFACE_STAT_SLOTS, IFINDEX_SLOTS,
    INLINE_ALLOW_V4, INLINE_ALLOW_V6, PROGRAM_NAME, XdpConfig, map_name, stat,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues, lpm_trie::Key},
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use tracing::{info, warn};

use crate::{config::AttachMode, range};

/// The XDP object built from `aiguard-ebpf` by the build script.
static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/aiguard"));

/// Magic number of the BPF filesystem (statfs f_type).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// What went wrong on the kernel side.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The pin directory is not on a BPF filesystem and could not be put on one.
    #[error("{path} is not on a BPF filesystem: {reason}")]
    Bpffs { path: PathBuf, reason: String },
    /// The object could not be loaded (verifier, missing privileges, incompatible pinned map).
    #[error("cannot load the XDP program: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    /// A program operation failed (load, attach, link update).
    #[error("{what}: {source}")]
    Program {
        what: String,
        #[source]
        source: ProgramError,
    },
    /// A map operation failed.
    #[error("{what}: {source}")]
    Map {
        what: String,
        #[source]
        source: MapError,
    },
    /// The interface does not exist.
    #[error("interface {0:?} does not exist (see `ip link`)")]
    NoSuchInterface(String),
    /// Filesystem work on pins failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn map_err(what: impl Into<String>) -> impl FnOnce(MapError) -> DataplaneError {
    let what = what.into();
    move |source| DataplaneError::Map { what, source }
}

/// A delete of an absent key: aya reports it as a syscall error with ENOENT.
fn is_absent(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn prog_err(what: impl Into<String>) -> impl FnOnce(ProgramError) -> DataplaneError {
    let what = what.into();
    move |source| DataplaneError::Program { what, source }
}

/// How a program ended up attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachedMode {
    Native,
    Generic,
}

impl AttachedMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
        }
    }

    fn xdp_mode(self) -> XdpMode {
        match self {
            Self::Native => XdpMode::Driver,
            Self::Generic => XdpMode::Skb,
        }
    }
}

/// One interface the program is attached to.
#[derive(Debug)]
pub struct Attachment {
    pub interface: String,
    pub ifindex: u32,
    pub mode: AttachedMode,
    /// The link was already pinned by an earlier daemon and was adopted.
    pub adopted: bool,
    /// Counter slot of this interface in the STATS map.
    pub stat_slot: u32,
    link: Option<FdLink>,
}

/// Per-interface verdict counters summed over CPUs, indexed by [`aiguard_common::stat`].
pub type Counters = [u64; stat::COUNT as usize];

/// The loaded program and its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    log_reader: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    bans_v4: LpmTrie<MapData, [u8; 4], BanEntry>,
    bans_v6: LpmTrie<MapData, [u8; 16], BanEntry>,
    /// Second handles on the ban tries, for BPF_MAP_UPDATE_BATCH (aya does not expose it).
    ban_batch_fds: [MapData; 2],
    allow_v4: LpmTrie<MapData, [u8; 4], AllowEntry>,
    allow_v6: LpmTrie<MapData, [u8; 16], AllowEntry>,
    config: Array<MapData, XdpConfig>,
    rate_ports: Array<MapData, u32>,
    iface_slot: Array<MapData, u32>,
    stats: PerCpuArray<MapData, u64>,
    bpffs_dir: PathBuf,
    attachments: Vec<Attachment>,
    /// The bucket knobs last set; the config map is these plus flags the dataplane derives.
    bucket: XdpConfig,
    /// Exclusive lock on the pin directory: one daemon per set of pins.
    _pins_lock: nix::fcntl::Flock<std::fs::File>,
}

impl Dataplane {
    /// Loads the program, creating or adopting the maps pinned in `bpffs_dir`.
    pub fn load(bpffs_dir: &Path, max_bans: u32) -> Result<Self, DataplaneError> {
        ensure_bpffs(bpffs_dir)?;
        std::fs::create_dir_all(bpffs_dir).map_err(|source| DataplaneError::Io {
            what: format!("creating {}", bpffs_dir.display()),
            source,
        })?;
        // Pins are the kernel's state: only root may read or change them.
        let _ = std::fs::set_permissions(bpffs_dir, std::fs::Permissions::from_mode(0o700));
        let pins_lock = lock_pins(bpffs_dir)?;
        retire_incompatible_pins(bpffs_dir, max_bans)?;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(bpffs_dir)
            .map_max_entries(map_name::BANS_V4, max_bans)
            .map_max_entries(map_name::BANS_V6, max_bans)
            .load(XDP_OBJECT)
            .map_err(|e| DataplaneError::Load(Box::new(e)))?;

        // The logger owns the log ring buffer; it must live as long as the program.
        let log_reader = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(error = %e, "eBPF logs will not be forwarded");
                None
            }
        };

        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| DataplaneError::Program {
                what: format!("the object has no program {PROGRAM_NAME}"),
                source: ProgramError::NotLoaded,
            })?
            .try_into()
            .map_err(prog_err("the program is not XDP"))?;
        program
            .load()
            .map_err(prog_err("loading the XDP program (verifier)"))?;

        macro_rules! take {
            ($ty:ident, $name:expr) => {
                $ty::try_from(
                    ebpf.take_map($name)
                        .ok_or_else(|| DataplaneError::Program {
                            what: format!("the object has no map {}", $name),
                            source: ProgramError::NotLoaded,
                        })?,
                )
                .map_err(map_err(format!("map {}", $name)))?
            };
        }
        let pinned = |name: &str| {
            MapData::from_pin(bpffs_dir.join(name))
                .map_err(map_err(format!("opening pinned map {name}")))
        };
        let ban_batch_fds = [pinned(map_name::BANS_V4)?, pinned(map_name::BANS_V6)?];
        Ok(Self {
            ban_batch_fds,
            bans_v4: take!(LpmTrie, map_name::BANS_V4),
            bans_v6: take!(LpmTrie, map_name::BANS_V6),
            allow_v4: take!(LpmTrie, map_name::ALLOW_V4),
            allow_v6: take!(LpmTrie, map_name::ALLOW_V6),
            config: take!(Array, map_name::CONFIG),
            rate_ports: take!(Array, map_name::RATE_PORTS),
            iface_slot: take!(Array, map_name::IFACE_SLOT),
            stats: take!(PerCpuArray, map_name::STATS),
            ebpf,
            log_reader,
            bpffs_dir: bpffs_dir.to_owned(),
            attachments: Vec::new(),
            bucket: XdpConfig::default(),
            _pins_lock: pins_lock,
        })
    }

    /// The reader of the program's aya-log ring buffer; the daemon forwards it to tracing.
    pub fn take_log_reader(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.log_reader.take()
    }

    /// The XDP program, for BPF_PROG_TEST_RUN in tests and benchmarks.
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(PROGRAM_NAME)
            .and_then(|p| <&Xdp>::try_from(p).ok())
            .expect("loaded in Dataplane::load")
    }

    fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
            .expect("loaded in Dataplane::load")
    }

    /// Interfaces the program is attached to.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Attaches to `interface`, adopting a link pinned by an earlier daemon if there is one.
    /// `stat_slot` (1..IFACE_STAT_SLOTS) is where this interface's counters go.
    pub fn attach(
        &mut self,
        interface: &str,
        mode: AttachMode,
        stat_slot: u32,
    ) -> Result<&Attachment, DataplaneError> {
        let ifindex = nix::net::if_::if_nametoindex(interface)
            .map_err(|_| DataplaneError::NoSuchInterface(interface.to_owned()))?;
        let slot = stat_slot.min(IFACE_STAT_SLOTS - 1);
        self.claim_counter_slot(ifindex, slot)?;

        let (link, mode, adopted) = match self.adopt_link(interface, mode)? {
            Some((link, mode)) => (Some(link), mode, true),
            None => {
                let (link, mode) = self.attach_fresh(interface, mode)?;
                (link, mode, false)
            }
        };
        if adopted {
            info!(
                interface,
                mode = mode.as_str(),
                "adopted the pinned XDP link"
            );
        } else {
            info!(interface, mode = mode.as_str(), "attached XDP program");
        }
        self.attachments.push(Attachment {
            interface: interface.to_owned(),
            ifindex,
            mode,
            adopted,
            stat_slot: slot,
            link,
        });
        Ok(self.attachments.last().expect("just pushed"))
    }

    /// Gives counter slot `slot` to `ifindex` alone. The counters are pinned and adopted, so a
    /// slot that changes hands (the configured interfaces changed) starts from zero, and no
    /// other interface keeps writing into it.
    fn claim_counter_slot(&mut self, ifindex: u32, slot: u32) -> Result<(), DataplaneError> {
        if ifindex >= IFINDEX_SLOTS {
            // Counted in slot 0 by the program.
            return Ok(());
        }
        let owned = self
            .iface_slot
            .get(&ifindex, 0)
            .map_err(map_err("reading IFACE_SLOT"))?;
        let others: Vec<u32> = self
            .iface_slot
            .iter()
            .enumerate()
            .filter_map(|(i, s)| (i as u32 != ifindex && s.ok() == Some(slot)).then_some(i as u32))
            .collect();
        for other in others {
            self.iface_slot
                .set(other, 0, 0)
                .map_err(map_err("releasing a counter slot"))?;
        }
        if owned != slot {
            let cpus = aya::util::nr_cpus().map_err(|(_, source)| DataplaneError::Io {
                what: "counting possible CPUs".into(),
                source,
            })?;
            for i in 0..stat::COUNT {
                let zeros = PerCpuValues::try_from(vec![0u64; cpus]).map_err(|source| {
                    DataplaneError::Io {
                        what: "preparing zeroed counters".into(),
                        source,
                    }
                })?;
                self.stats
                    .set(slot * stat::COUNT + i, zeros, 0)
                    .map_err(map_err("zeroing a counter slot"))?;
            }
            self.iface_slot
                .set(ifindex, slot, 0)
                .map_err(map_err("assigning the interface's counter slot"))?;
        }
        Ok(())
    }

    fn link_pin(&self, interface: &str, mode: AttachedMode) -> PathBuf {
        // The mode is part of the name: the kernel does not report it for a link.
        self.bpffs_dir
            .join(format!("link-{}-{interface}", mode.as_str()))
    }

    /// Swaps this program into a pinned link for `interface`, if a usable one exists.
    fn adopt_link(
        &mut self,
        interface: &str,
        wanted: AttachMode,
    ) -> Result<Option<(FdLink, AttachedMode)>, DataplaneError> {
        for mode in [AttachedMode::Native, AttachedMode::Generic] {
            let pin = self.link_pin(interface, mode);
            if !pin.exists() {
                continue;
            }
            let fits = matches!(
                (wanted, mode),
                (AttachMode::Auto, _)
                    | (AttachMode::Native, AttachedMode::Native)
                    | (AttachMode::Generic, AttachedMode::Generic)
            );
            if !fits {
                // A mode change: the old link must go before a new one can attach (one XDP
                // link per interface), so the interface is briefly unprotected.
                warn!(
                    interface,
                    from = mode.as_str(),
                    "attach mode changed: detaching the old program to attach in the configured mode"
                );
                let _ = std::fs::remove_file(&pin);
                continue;
            }
            let adopted = PinnedLink::from_pin(&pin)
                .map_err(|e| e.to_string())
                .and_then(|p| XdpLink::try_from(FdLink::from(p)).map_err(|e| e.to_string()))
                .and_then(|link| {
                    let program = self.program_mut();
                    let id = program.attach_to_link(link).map_err(|e| e.to_string())?;
                    let link = program.take_link(id).map_err(|e| e.to_string())?;
                    FdLink::try_from(link).map_err(|e| e.to_string())
                });
            match adopted {
                Ok(link) => return Ok(Some((link, mode))),
                Err(reason) => {
                    // The interface was recreated, or the pin is from something else: start over.
                    warn!(interface, pin = %pin.display(), %reason, "pinned XDP link is unusable; attaching anew");
                    let _ = std::fs::remove_file(&pin);
                }
            }
        }
        Ok(None)
    }

    fn attach_fresh(
        &mut self,
        interface: &str,
        mode: AttachMode,
    ) -> Result<(Option<FdLink>, AttachedMode), DataplaneError> {
        let program = self.program_mut();
        let (id, mode) = match mode {
            AttachMode::Native => (
                program
                    .attach(interface, XdpMode::Driver)
                    .map_err(prog_err(format!("attaching to {interface} in native mode")))?,
                AttachedMode::Native,
            ),
            AttachMode::Generic => (
                program
                    .attach(interface, XdpMode::Skb)
                    .map_err(prog_err(format!(
                        "attaching to {interface} in generic mode"
                    )))?,
                AttachedMode::Generic,
            ),
            AttachMode::Auto => match program.attach(interface, XdpMode::Driver) {
                Ok(id) => (id, AttachedMode::Native),
                Err(e) => {
                    warn!(interface, error = %e, "native XDP unavailable; falling back to generic mode");
                    (
                        program
                            .attach(interface, AttachedMode::Generic.xdp_mode())
                            .map_err(prog_err(format!(
                                "attaching to {interface} in generic mode"
                            )))?,
                        AttachedMode::Generic,
                    )
                }
            },
        };
        let link = program
            .take_link(id)
            .map_err(prog_err("taking the XDP link"))?;
        match FdLink::try_from(link) {
            Ok(fd_link) => {
                let pin = self.link_pin(interface, mode);
                let pinned = fd_link.pin(&pin).map_err(|e| DataplaneError::Io {
                    what: format!("pinning the XDP link at {}", pin.display()),
                    source: io::Error::other(e.to_string()),
                })?;
                Ok((Some(FdLink::from(pinned)), mode))
            }
            Err(e) => {
                // Netlink attachment (kernels before 5.9): it cannot be pinned, and it ends
                // with this process.
                warn!(interface, error = %e, "the kernel gave no bpf_link: the program will detach when the daemon exits");
                Ok((None, mode))
            }
        }
    }

    /// Detaches every link this daemon holds and removes their pins.
    pub fn detach_all(&mut self) {
        for a in self.attachments.drain(..) {
            let pin = self
                .bpffs_dir
                .join(format!("link-{}-{}", a.mode.as_str(), a.interface));
            let _ = std::fs::remove_file(&pin);
            drop(a.link);
            info!(interface = %a.interface, "detached XDP program");
        }
    }

    /// Unpins links left by an earlier daemon for interfaces no longer configured, so the
    /// configuration stays the source of truth. Returns the interfaces detached.
    pub fn detach_unconfigured(&self, configured: &[String]) -> Vec<String> {
        let mut gone = Vec::new();
        let Ok(dir) = std::fs::read_dir(&self.bpffs_dir) else {
            return gone;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("link-") else {
                continue;
            };
            let Some((_, iface)) = rest.split_once('-') else {
                continue;
            };
            if !configured.iter().any(|c| c == iface) && std::fs::remove_file(entry.path()).is_ok()
            {
                info!(
                    interface = iface,
                    "detached XDP program from an interface no longer configured"
                );
                gone.push(iface.to_owned());
            }
        }
        gone
    }

    /// Writes the bucket knobs: ports first, then the config the kernel reads them under.
    pub fn set_bucket(&mut self, cfg: XdpConfig, ports: &[u16]) -> Result<(), DataplaneError> {
        let mut wanted = vec![0u32; aiguard_common::PORT_SLOTS as usize];
        for p in ports {
            wanted[usize::from(*p)] = 1;
        }
        for (port, want) in wanted.iter().enumerate() {
            let port = port as u32;
            let have = self
                .rate_ports
                .get(&port, 0)
                .map_err(map_err("reading RATE_PORTS"))?;
            if have != *want {
                self.rate_ports
                    .set(port, *want, 0)
                    .map_err(map_err("writing RATE_PORTS"))?;
            }
        }
        self.bucket = cfg;
        self.write_config()
    }

    /// Writes the config map: the bucket knobs, whether the allowlist has entries, and the
    /// allowlist itself when it is small enough to scan inline.
    fn write_config(&mut self) -> Result<(), DataplaneError> {
        // Only as many entries as fit inline (plus one, to know when they do not): a single
        // allowlist change costs a handful of syscalls, whatever the allowlist's size.
        let mut v4 = Vec::new();
        for k in self.allow_v4.keys().take(INLINE_ALLOW_V4 + 1) {
            let k = k.map_err(map_err("listing ALLOW_V4"))?;
            v4.push(
                Ipv4Network::new(k.data().into(), k.prefix_len() as u8)
                    .expect("trie keys are valid prefixes"),
            );
        }
        let mut v6 = Vec::new();
        for k in self.allow_v6.keys().take(INLINE_ALLOW_V6 + 1) {
            let k = k.map_err(map_err("listing ALLOW_V6"))?;
            v6.push(
                Ipv6Network::new(k.data().into(), k.prefix_len() as u8)
                    .expect("trie keys are valid prefixes"),
            );
        }
        let mut cfg = self.bucket;
        cfg.flags &= !(CFG_HAS_ALLOWLIST | CFG_ALLOWLIST_INLINE);
        cfg.allow_v4 = Default::default();
        cfg.allow_v6 = Default::default();
        cfg.allow_v4_len = 0;
        cfg.allow_v6_len = 0;
        if !v4.is_empty() || !v6.is_empty() {
            cfg.flags |= CFG_HAS_ALLOWLIST;
            if v4.len() <= INLINE_ALLOW_V4 && v6.len() <= INLINE_ALLOW_V6 {
                cfg.flags |= CFG_ALLOWLIST_INLINE;
                for (slot, n) in cfg.allow_v4.iter_mut().zip(&v4) {
                    *slot = [
                        u32::from_ne_bytes(n.network().octets()),
                        u32::from_ne_bytes(n.mask().octets()),
                    ];
                }
                for (slot, n) in cfg.allow_v6.iter_mut().zip(&v6) {
                    let (net, mask) = (n.network().octets(), n.mask().octets());
                    let half = |b: &[u8; 16], i: usize| {
                        u64::from_ne_bytes(b[i..i + 8].try_into().expect("8 bytes"))
                    };
                    *slot = [half(&net, 0), half(&net, 8), half(&mask, 0), half(&mask, 8)];
                }
                cfg.allow_v4_len = v4.len() as u32;
                cfg.allow_v6_len = v6.len() as u32;
            }
        }
        self.config
            .set(0, cfg, 0)
            .map_err(map_err("writing the XDP config"))
    }

    /// The bucket knobs the kernel currently reads.
    pub fn bucket_config(&self) -> Result<XdpConfig, DataplaneError> {
        self.config
            .get(&0, 0)
            .map_err(map_err("reading the XDP config"))
    }

    /// Inserts or replaces a ban (its `prefix_len` is set from `net`).
    pub fn put_ban(&mut self, net: &IpNetwork, entry: BanEntry) -> Result<(), DataplaneError> {
        let entry = BanEntry {
            prefix_len: u16::from(net.prefix()),
            ..entry
        };
        by_family(
            net,
            |k| self.bans_v4.insert(&k, entry, 0),
            |k| self.bans_v6.insert(&k, entry, 0),
        )
        .map_err(map_err(format!("inserting ban {net}")))
    }

    /// Inserts or replaces many bans. Sorted input is much faster: each insert then walks the
    /// part of the trie the previous one just warmed (1M prefixes: ~1 s sorted, ~2.7 s not).
    /// One BPF_MAP_UPDATE_BATCH syscall per chunk; per-entry updates where the kernel lacks
    /// batch support for tries.
    pub fn put_bans(&mut self, bans: &[(IpNetwork, BanEntry)]) -> Result<(), DataplaneError> {
        let mut v4: Vec<(range::TrieKey<4>, BanEntry)> = Vec::new();
        let mut v6: Vec<(range::TrieKey<16>, BanEntry)> = Vec::new();
        for (net, entry) in bans {
            let entry = &BanEntry {
                prefix_len: u16::from(net.prefix()),
                ..*entry
            };
            match net {
                IpNetwork::V4(n) => v4.push((range::TrieKey::v4(n), *entry)),
                IpNetwork::V6(n) => v6.push((range::TrieKey::v6(n), *entry)),
            }
        }
        self.update_batch(0, &v4)?;
        self.update_batch(1, &v6)
    }

    fn update_batch<const N: usize>(
        &mut self,
        which: usize,
        entries: &[(range::TrieKey<N>, BanEntry)],
    ) -> Result<(), DataplaneError> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        const CHUNK: usize = 1 << 16;
        let fd = self.ban_batch_fds[which].fd().as_fd().as_raw_fd();
        for chunk in entries.chunks(CHUNK) {
            let keys: Vec<range::TrieKey<N>> = chunk.iter().map(|(k, _)| *k).collect();
            let values: Vec<BanEntry> = chunk.iter().map(|(_, v)| *v).collect();
            match bpf_update_batch(fd, &keys, &values) {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP | 524)) => {
                    // No batch support for this map type on this kernel: one syscall each.
                    for (k, v) in chunk {
                        self.put_ban(&k.network(), *v)?;
                    }
                }
                Err(source) => {
                    return Err(DataplaneError::Io {
                        what: format!(
                            "BPF_MAP_UPDATE_BATCH on the ban table ({} entries)",
                            chunk.len()
                        ),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Removes a ban; absent is not an error.
    pub fn remove_ban(&mut self, net: &IpNetwork) -> Result<(), DataplaneError> {
        match by_family(
            net,
            |k| self.bans_v4.remove(&k),
            |k| self.bans_v6.remove(&k),
        ) {
            Err(e) if !is_absent(&e) => Err(map_err(format!("removing ban {net}"))(e)),
            _ => Ok(()),
        }
    }

    /// The kernel's value for exactly this ban, if the trie holds it.
    pub fn ban_entry(&self, net: &IpNetwork) -> Result<Option<BanEntry>, DataplaneError> {
        match by_family(
            net,
            |k| self.bans_v4.get(&k, 0),
            |k| self.bans_v6.get(&k, 0),
        ) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_absent(&e) => Ok(None),
            Err(e) => Err(map_err(format!("reading ban {net}"))(e)),
        }
    }

    /// Every ban in the kernel's tries.
    pub fn ban_entries(&self) -> Result<BTreeMap<IpNetwork, BanEntry>, DataplaneError> {
        let mut out = BTreeMap::new();
        for kv in self.bans_v4.iter() {
            let (k, v) = kv.map_err(map_err("listing BANS_V4"))?;
            out.insert(range::from_v4_key(k.prefix_len(), k.data()), v);
        }
        for kv in self.bans_v6.iter() {
            let (k, v) = kv.map_err(map_err("listing BANS_V6"))?;
            out.insert(range::from_v6_key(k.prefix_len(), k.data()), v);
        }
        Ok(out)
    }

    /// Inserts an allowlist range.
    pub fn put_allow(&mut self, net: &IpNetwork) -> Result<(), DataplaneError> {
        let v = AllowEntry { flags: 0 };
        by_family(
            net,
            |k| self.allow_v4.insert(&k, v, 0),
            |k| self.allow_v6.insert(&k, v, 0),
        )
        .map_err(map_err(format!("inserting allowlist range {net}")))?;
        // The entry is in place before the program is told to look.
        self.write_config()
    }

    /// Removes an allowlist range; absent is not an error.
    pub fn remove_allow(&mut self, net: &IpNetwork) -> Result<(), DataplaneError> {
        match by_family(
            net,
            |k| self.allow_v4.remove(&k),
            |k| self.allow_v6.remove(&k),
        ) {
            Err(e) if !is_absent(&e) => Err(map_err(format!("removing allowlist range {net}"))(e)),
            _ => self.write_config(),
        }
    }

    /// Every allowlist range in the kernel's tries.
    pub fn allow_entries(&self) -> Result<Vec<IpNetwork>, DataplaneError> {
        let mut out = Vec::new();
        for k in self.allow_v4.keys() {
            let k = k.map_err(map_err("listing ALLOW_V4"))?;
            out.push(range::from_v4_key(k.prefix_len(), k.data()));
        }
        for k in self.allow_v6.keys() {
            let k = k.map_err(map_err("listing ALLOW_V6"))?;
            out.push(range::from_v6_key(k.prefix_len(), k.data()));
        }
        Ok(out)
    }

    /// Verdict counters per interface slot, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<Counters>, DataplaneError> {
        let mut out = vec![[0u64; stat::COUNT as usize]; IFACE_STAT_SLOTS as usize];
        for (slot, row) in out.iter_mut().enumerate() {
            for (i, c) in row.iter_mut().enumerate() {
                let index = slot as u32 * stat::COUNT + i as u32;
                let per_cpu = self
                    .stats
                    .get(&index, 0)
                    .map_err(map_err("reading STATS"))?;
                *c = per_cpu.iter().sum();
            }
        }
        Ok(out)
    }
}

/// Takes the pin directory for this daemon alone: a second daemon on the same pins would
/// count the first one's bans as orphans and unpin its links.
fn lock_pins(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, DataplaneError> {
    let file = std::fs::File::open(dir).map_err(|source| DataplaneError::Io {
        what: format!("opening {}", dir.display()),
        source,
    })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| DataplaneError::Io {
            what: format!(
                "another aiguard daemon uses the pin directory {}; give this one its own --bpffs-dir",
                dir.display()
            ),
            source: io::Error::from(errno),
        },
    )
}

/// The maps this build's program expects: (name, key size, value size, capacity if fixed by
/// the daemon's configuration).
fn expected_maps(max_bans: u32) -> [(&'static str, usize, usize, Option<u32>); 10] {
    use std::mem::size_of;
    let trie_key = |n: usize| 4 + n;
    [
        (
            map_name::BANS_V4,
            trie_key(4),
            size_of::<BanEntry>(),
            Some(max_bans),
        ),
        (
            map_name::BANS_V6,
            trie_key(16),
            size_of::<BanEntry>(),
            Some(max_bans),
        ),
        (
            map_name::ALLOW_V4,
            trie_key(4),
            size_of::<AllowEntry>(),
            None,
        ),
        (
            map_name::ALLOW_V6,
            trie_key(16),
            size_of::<AllowEntry>(),
            None,
        ),
        (
            map_name::BUCKETS_V4,
            4,
            size_of::<aiguard_common::BucketState>(),
            None,
        ),
        (
            map_name::BUCKETS_V6,
            16,
            size_of::<aiguard_common::BucketState>(),
            None,
        ),
        (map_name::CONFIG, 4, size_of::<XdpConfig>(), None),
        (map_name::RATE_PORTS, 4, 4, None),
        (map_name::IFACE_SLOT, 4, 4, None),
        (map_name::STATS, 4, 8, None),
    ]
}

/// aya reuses a pinned map whatever its shape. A pin left by an aiguard whose map layout differs
/// (an upgrade), or a ban table of another capacity (`max_bans` changed), is removed so that a
/// map of the right shape is created: bans and the allowlist are then rebuilt from the store;
/// counters and buckets start afresh. The interface stays protected meanwhile: the pinned link
/// keeps the old program (and its maps) until the new program is swapped in.
fn retire_incompatible_pins(dir: &Path, max_bans: u32) -> Result<(), DataplaneError> {
    for (name, key_size, value_size, capacity) in expected_maps(max_bans) {
        let pin = dir.join(name);
        if !pin.exists() {
            continue;
        }
        let reason = match aya::maps::MapInfo::from_pin(&pin) {
            Err(e) => Some(format!("unreadable: {e}")),
            Ok(info) => {
                let (k, v, max) = (info.key_size(), info.value_size(), info.max_entries());
                if k as usize != key_size || v as usize != value_size {
                    Some(format!(
                        "key/value size {k}/{v}, this version uses {key_size}/{value_size}"
                    ))
                } else if capacity.is_some_and(|c| c != max) {
                    Some(format!(
                        "capacity {max}, configured {}",
                        capacity.unwrap_or_default()
                    ))
                } else {
                    None
                }
            }
        };
        if let Some(reason) = reason {
            warn!(map = name, %reason, "pinned map does not fit this version or configuration: recreating it (bans and allowlist are restored from the store)");
            std::fs::remove_file(&pin).map_err(|source| DataplaneError::Io {
                what: format!("removing the pin {}", pin.display()),
                source,
            })?;
        }
    }
    Ok(())
}

/// Runs `v4` or `v6` with the LPM trie key of `net`.
fn by_family<R>(
    net: &IpNetwork,
    v4: impl FnOnce(Key<[u8; 4]>) -> R,
    v6: impl FnOnce(Key<[u8; 16]>) -> R,
) -> R {
    match net {
        IpNetwork::V4(n) => {
            let (len, data) = range::v4_key(n);
            v4(Key::new(len, data))
        }
        IpNetwork::V6(n) => {
            let (len, data) = range::v6_key(n);
            v6(Key::new(len, data))
        }
    }
}

/// Makes sure `dir` is on a BPF filesystem, mounting one at /sys/fs/bpf if that is where it
/// should be and nothing is mounted there yet (it is not mounted at boot on every distribution).
fn ensure_bpffs(dir: &Path) -> Result<(), DataplaneError> {
    let on_bpffs = |p: &Path| -> bool {
        // The nearest existing ancestor decides.
        let mut p = p;
        loop {
            if p.exists() {
                return nix::sys::statfs::statfs(p)
                    .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
                    .unwrap_or(false);
            }
            match p.parent() {
                Some(parent) => p = parent,
                None => return false,
            }
        }
    };
    if on_bpffs(dir) {
        return Ok(());
    }
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) {
        info!("mounting bpffs at /sys/fs/bpf");
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| DataplaneError::Bpffs {
            path: dir.to_owned(),
            reason: format!("mounting bpffs at /sys/fs/bpf failed: {e} (the daemon needs root)"),
        })?;
        if on_bpffs(dir) {
            return Ok(());
        }
    }
    Err(DataplaneError::Bpffs {
        path: dir.to_owned(),
        reason: "choose a directory under /sys/fs/bpf, or mount one with `mount -t bpf bpf DIR`"
            .into(),
    })
}

/// `union bpf_attr` as BPF_MAP_*_BATCH reads it.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

fn bpf_update_batch<K: Copy, V: Copy>(fd: i32, keys: &[K], values: &[V]) -> io::Result<()> {
    debug_assert_eq!(keys.len(), values.len());
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: fd as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: attr points at live key and value arrays of `count` elements each, laid out as the
    // map's key and value types; the kernel only reads them (and writes back `count`).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// CLOCK_BOOTTIME now, in nanoseconds: the clock the kernel checks ban expiry against.
pub fn boot_ns_now() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .expect("CLOCK_BOOTTIME is always available on Linux");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}
