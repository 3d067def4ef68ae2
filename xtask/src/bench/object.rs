//! The XDP objects loaded into the kernel for the benchmark, and what it does with their maps.
//!
//! aiguard's object declares its maps pinned by name, so every load gets a throwaway directory
//! on bpffs of its own: a shared one would hand one load's bans to the next. The directory goes
//! when the object is dropped; a later run removes the ones a killed run left behind.
//!
//! aya-log's `AYA_LOGS` ring buffer stays inside [`Ebpf`] for the object's lifetime: the program
//! logs a ban's first hit, so the map must stay valid, and nobody needs to read the one record
//! the benchmark's single banned source produces.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aiguard_common::{
    AllowEntry, BanEntry, CFG_ALLOWLIST_INLINE, CFG_HAS_ALLOWLIST, CFG_RATE_LIMIT, XdpConfig,
    map_name, reason, stat,
};
use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, lpm_trie::Key, lpm_trie::LpmTrie},
    programs::Xdp,
};

use super::prefixes::Prefix;

const BPFFS: &str = "/sys/fs/bpf";

/// A loaded object with its XDP program loaded (not attached).
pub struct Loaded {
    // Dropped first: closes the maps and programs (detaching any link) before the pins go.
    ebpf: Ebpf,
    program: &'static str,
    _pins: PinDir,
}

impl Loaded {
    /// Loads aiguard's object and its program, [`aiguard_common::PROGRAM_NAME`].
    pub fn aiguard(object: &Path) -> Result<Self> {
        Self::load(object, aiguard_common::PROGRAM_NAME)
    }

    /// Loads the drop-everything object, the benchmark's ceiling.
    pub fn drop_all(object: &Path) -> Result<Self> {
        Self::load(object, "drop_all")
    }

    fn load(object: &Path, program: &'static str) -> Result<Self> {
        let pins = PinDir::create()?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pins.0)
            .load_file(object)
            .with_context(|| format!("loading {}", object.display()))?;
        let xdp: &mut Xdp = ebpf
            .program_mut(program)
            .with_context(|| format!("{} has no program {program}", object.display()))?
            .try_into()
            .with_context(|| format!("{program} is not an XDP program"))?;
        xdp.load()
            .with_context(|| format!("loading {program} into the kernel (verifier)"))?;
        Ok(Self {
            ebpf,
            program,
            _pins: pins,
        })
    }

    pub fn xdp(&mut self) -> Result<&mut Xdp> {
        let program = self.program;
        self.ebpf
            .program_mut(program)
            .with_context(|| format!("no program {program}"))?
            .try_into()
            .with_context(|| format!("{program} is not an XDP program"))
    }

    fn map(&self, name: &str) -> Result<&aya::maps::Map> {
        self.ebpf
            .map(name)
            .with_context(|| format!("the object has no map {name}"))
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("the object has no map {name}"))
    }

    /// Turns the per-source bucket on for [`super::SERVICE_PORT`], at a rate no test reaches,
    /// and puts one range (no benchmark source is in it) on the allowlist: a passing packet then
    /// pays for an allowlist miss, a ban miss and a bucket update, as on a protected node.
    pub fn enable_bucket(&mut self, port: u16) -> Result<()> {
        let mut allow: LpmTrie<&mut MapData, [u8; 4], AllowEntry> =
            LpmTrie::try_from(self.map_mut(map_name::ALLOW_V4)?)?;
        allow
            .insert(&Key::new(24, [192, 0, 2, 0]), AllowEntry { flags: 0 }, 0)
            .context("writing ALLOW_V4")?;
        // As the daemon writes a small allowlist: inline in the config as well as in the trie.
        let mut allow_v4 = [[0u32; 2]; aiguard_common::INLINE_ALLOW_V4];
        allow_v4[0] = [
            u32::from_ne_bytes([192, 0, 2, 0]),
            u32::from_ne_bytes([255, 255, 255, 0]),
        ];
        let config = XdpConfig {
            emission_ns: 1,
            tolerance_ns: 1_000_000_000,
            flags: CFG_RATE_LIMIT | CFG_HAS_ALLOWLIST | CFG_ALLOWLIST_INLINE,
            allow_v4,
            allow_v4_len: 1,
            ..XdpConfig::default()
        }
        .with_prefixes(32, 64);
        let mut configs: Array<&mut MapData, XdpConfig> =
            Array::try_from(self.map_mut(map_name::CONFIG)?)?;
        configs.set(0, config, 0).context("writing CONFIG")?;
        let mut ports: Array<&mut MapData, u32> =
            Array::try_from(self.map_mut(map_name::RATE_PORTS)?)?;
        ports
            .set(u32::from(port), 1, 0)
            .context("writing RATE_PORTS")?;
        Ok(())
    }

    /// Sets or clears the config flag that makes the program look the allowlist up (the daemon
    /// sets it exactly when the allowlist has entries); the entry itself stays.
    pub fn set_allowlist_in_use(&mut self, in_use: bool) -> Result<()> {
        let mut configs: Array<&mut MapData, XdpConfig> =
            Array::try_from(self.map_mut(map_name::CONFIG)?)?;
        let mut config = configs.get(&0, 0).context("reading CONFIG")?;
        config.flags &= !CFG_HAS_ALLOWLIST;
        if in_use {
            config.flags |= CFG_HAS_ALLOWLIST;
        }
        configs.set(0, config, 0).context("writing CONFIG")
    }

    /// Inserts `bans` into BANS_V4, one BPF_MAP_UPDATE_ELEM each, in the order given, and
    /// returns how long that took: the raw per-syscall path. (The daemon sorts and batches
    /// instead; its end-to-end figure is the `ban --file` row.)
    pub fn fill_bans(&mut self, bans: &[Prefix]) -> Result<Duration> {
        let mut trie: LpmTrie<&mut MapData, [u8; 4], BanEntry> =
            LpmTrie::try_from(self.map_mut(map_name::BANS_V4)?)?;
        let started = Instant::now();
        for ban in bans {
            // As the daemon writes them: permanent, enforced, knowing their own length.
            let entry = BanEntry {
                reason: reason::MANUAL,
                prefix_len: u16::from(ban.len),
                ..BanEntry::default()
            };
            trie.insert(&Key::new(u32::from(ban.len), ban.addr), entry, 0)
                .with_context(|| format!("inserting {ban} into BANS_V4"))?;
        }
        Ok(started.elapsed())
    }

    /// Packets dropped for a ban so far, over all CPUs and interfaces.
    pub fn dropped_banned(&self) -> Result<u64> {
        self.stat_total(stat::DROP_BANNED)
    }

    fn stat_total(&self, counter: u32) -> Result<u64> {
        let stats: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.map(map_name::STATS)?)?;
        let mut total = 0;
        for slot in 0..aiguard_common::IFACE_STAT_SLOTS {
            let values = stats
                .get(&(slot * stat::COUNT + counter), 0)
                .context("reading STATS")?;
            total += values.iter().sum::<u64>();
        }
        Ok(total)
    }

    /// Whether `source` has a bucket: proof that a passing packet went through the bucket.
    pub fn has_bucket(&self, source: [u8; 4]) -> Result<bool> {
        let buckets: HashMap<&MapData, [u8; 4], aiguard_common::BucketState> =
            HashMap::try_from(self.map(map_name::BUCKETS_V4)?)?;
        match buckets.get(&source, 0) {
            Ok(_) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(error) => Err(error).context("reading BUCKETS_V4"),
        }
    }
}

/// Whether the trie pinned at `pinned` holds `prefix` (or a shorter prefix covering it).
pub fn pinned_trie_covers(pinned: &Path, prefix: Prefix) -> Result<bool> {
    let data = MapData::from_pin(pinned)
        .with_context(|| format!("opening the map pinned at {}", pinned.display()))?;
    let trie: LpmTrie<MapData, [u8; 4], BanEntry> =
        LpmTrie::try_from(aya::maps::Map::LpmTrie(data))?;
    match trie.get(&Key::new(u32::from(prefix.len), prefix.addr), 0) {
        Ok(_) => Ok(true),
        Err(aya::maps::MapError::KeyNotFound) => Ok(false),
        Err(error) => Err(error).with_context(|| format!("looking {prefix} up")),
    }
}

/// A directory of its own under bpffs, removed (with the pins in it) on drop.
pub struct PinDir(PathBuf);

impl PinDir {
    pub fn create() -> Result<Self> {
        let path = Path::new(BPFFS).join(super::unique_name());
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(error) = remove_pin_dir(&self.0) {
            eprintln!("warning: {error:#}");
        }
    }
}

/// Unpins everything in `dir` (a pinned map lives on while a program or an fd holds it) and
/// removes it.
fn remove_pin_dir(dir: &Path) -> Result<()> {
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

/// Removes the bpffs directories that runs which no longer exist left behind.
pub fn remove_stale_pin_dirs() -> Result<()> {
    for dir in super::leftovers(Path::new(BPFFS))? {
        eprintln!("bench: removing {} left by an earlier run", dir.display());
        remove_pin_dir(&dir)?;
    }
    Ok(())
}
