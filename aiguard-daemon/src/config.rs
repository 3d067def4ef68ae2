//! The daemon's TOML configuration: sections, documented defaults, validation that names the
//! field, the value and what is expected.
//!
//! ```toml
//! [daemon]
//! admin_socket = "/run/aiguard/admin.sock"
//! state_dir = "/var/lib/aiguard"
//! bpffs_dir = "/sys/fs/bpf/aiguard"
//! log = "info"
//!
//! [xdp]
//! interfaces = ["eth0"]
//! mode = "auto"            # auto (native, else generic), native, generic
//! detach_on_exit = false
//! max_bans = 2097152
//! sweep_interval = "1s"
//!
//! [xdp.bucket]             # per-source token bucket, only on the listed ports
//! rate = 1000              # packets per second per source
//! burst = 2000
//! ports = [8000]
//! all_ports = false
//! syn_only = false         # only new TCP connections take a token
//! ipv4_prefix = 32
//! ipv6_prefix = 64
//!
//! [metrics]                # Prometheus /metrics
//! enabled = true
//! listen = "127.0.0.1:9464"  # loopback: tenant names are not for everyone
//! ```
//!
//! The gateway's sections (`[gateway]`, `[tiers.*]`, `[tenants.*]`, `[prices.*]`) are
//! described in [`crate::tiers`].
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::shared::StoreSettings;
use crate::tiers::{BUILTIN_TIER, GatewaySettings, Price, TenantSettings, TierSettings, TierTable};

/// Why a configuration could not be used. The daemon refuses to start (or keeps its old
/// configuration) rather than run with a half-understood one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown field, or a value of the wrong type.
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value parsed but is out of range or inconsistent.
    #[error("config field `{field}` = {value} is invalid: expected {expected}")]
    Invalid {
        field: String,
        value: String,
        expected: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub daemon: DaemonSettings,
    pub xdp: XdpSettings,
    pub gateway: GatewaySettings,
    pub tiers: BTreeMap<String, TierSettings>,
    pub tenants: BTreeMap<String, TenantSettings>,
    pub prices: BTreeMap<String, Price>,
    pub store: StoreSettings,
    pub metrics: MetricsSettings,
    pub detect: crate::detect::settings::DetectSettings,
}

/// Where the daemon keeps its socket, state and pins.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonSettings {
    /// Unix socket of the admin API (created mode 0600: root only).
    pub admin_socket: PathBuf,
    /// Embedded store (bans, allowlist) lives here.
    pub state_dir: PathBuf,
    /// Maps and XDP links are pinned here, so they outlive the daemon.
    pub bpffs_dir: PathBuf,
    /// tracing filter, e.g. "info" or "aiguard=debug"; RUST_LOG overrides it.
    pub log: String,
}

impl Default for DaemonSettings {
    fn default() -> Self {
        Self {
            admin_socket: PathBuf::from(DEFAULT_ADMIN_SOCKET),
            state_dir: PathBuf::from("/var/lib/aiguard"),
            bpffs_dir: PathBuf::from("/sys/fs/bpf/aiguard"),
            log: "info".into(),
        }
    }
}

/// Default admin socket path, shared with the CLI.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/aiguard/admin.sock";

/// Default address of the `/metrics` endpoint: loopback, Prometheus' port range (9464 is the
/// one OpenTelemetry's Prometheus exporter made conventional).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// The Prometheus endpoint.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// Serve `/metrics` at all.
    pub enabled: bool,
    /// `IP:port` to serve it on. Loopback by default: the page names tenants. When the default
    /// address is taken (a second daemon on the host), the daemon runs without metrics and says
    /// so; an address set explicitly that cannot be bound stops start-up.
    pub listen: String,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: DEFAULT_METRICS_LISTEN.into(),
        }
    }
}

impl MetricsSettings {
    /// The validated listen address, or `None` when metrics are off.
    pub fn listen_addr(&self) -> Option<std::net::SocketAddr> {
        self.enabled.then(|| self.listen.parse().ok()).flatten()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "metrics.listen",
                format!("{:?}", self.listen),
                "an IP address and port, e.g. \"127.0.0.1:9464\" or \"[::1]:9464\"",
            ));
        }
        Ok(())
    }
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic mode with a warning.
    #[default]
    Auto,
    /// Native mode or fail.
    Native,
    /// Generic (skb) mode: works on any interface, costs more per packet.
    Generic,
}

/// The NIC layer.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct XdpSettings {
    /// Interfaces to protect.
    pub interfaces: Vec<String>,
    pub mode: AttachMode,
    /// Detach the program when the daemon exits. Off by default: the NIC stays protected (and
    /// bans keep dropping) while the daemon is stopped or restarting.
    pub detach_on_exit: bool,
    /// Capacity of each ban trie (IPv4 and IPv6 separately).
    pub max_bans: u32,
    /// How often expired bans are removed from the maps and the store (the kernel already
    /// ignores them from the moment they expire).
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    pub bucket: BucketSettings,
}

impl Default for XdpSettings {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            mode: AttachMode::Auto,
            detach_on_exit: false,
            max_bans: aiguard_common::DEFAULT_MAX_BANS,
            sweep_interval: Duration::from_secs(1),
            bucket: BucketSettings::default(),
        }
    }
}

/// The coarse per-source token bucket applied at the NIC.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BucketSettings {
    /// Sustained packets per second per source (0 turns the bucket off).
    pub rate: u32,
    /// Packets a source may send at once above the sustained rate.
    pub burst: u32,
    /// Destination ports the bucket applies to; with none (and `all_ports` off) it is off, so
    /// SSH and other services on the node are untouched unless asked for.
    pub ports: Vec<u16>,
    /// Apply to every destination port and to traffic without ports (ICMP, ...).
    pub all_ports: bool,
    /// Only TCP SYNs (new connections) take a token.
    pub syn_only: bool,
    /// IPv4 sources share one bucket per prefix of this length.
    pub ipv4_prefix: u32,
    /// IPv6 sources share one bucket per prefix of this length (a host usually owns a /64).
    pub ipv6_prefix: u32,
}

impl Default for BucketSettings {
    fn default() -> Self {
        Self {
            rate: 1000,
            burst: 2000,
            ports: Vec::new(),
            all_ports: false,
            syn_only: false,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
        }
    }
}

impl BucketSettings {
    /// Whether the bucket applies to any packet at all.
    pub fn is_active(&self) -> bool {
        self.rate > 0 && (self.all_ports || !self.ports.is_empty())
    }

    /// The knobs the kernel reads: GCRA emission interval and tolerance, flags, masks.
    pub fn to_kernel(&self) -> aiguard_common::XdpConfig {
        use aiguard_common::{CFG_ALL_PORTS, CFG_RATE_LIMIT, CFG_SYN_ONLY, XdpConfig};
        let mut flags = 0;
        if self.is_active() {
            flags |= CFG_RATE_LIMIT;
        }
        if self.all_ports {
            flags |= CFG_ALL_PORTS;
        }
        if self.syn_only {
            flags |= CFG_SYN_ONLY;
        }
        let emission_ns = 1_000_000_000 / u64::from(self.rate.max(1));
        XdpConfig {
            emission_ns,
            tolerance_ns: emission_ns * u64::from(self.burst.max(1) - 1),
            flags,
            ..XdpConfig::default()
        }
        .with_prefixes(self.ipv4_prefix, self.ipv6_prefix)
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates TOML text; `path` is only used in messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges and consistency; every error names the field and the value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let x = &self.xdp;
        for name in &x.interfaces {
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                return Err(invalid(
                    "xdp.interfaces",
                    format!("{name:?}"),
                    "interface names of 1 to 15 characters without '/' or spaces",
                ));
            }
        }
        let max = aiguard_common::IFACE_STAT_SLOTS as usize - 1;
        if x.interfaces.len() > max {
            return Err(invalid(
                "xdp.interfaces",
                format!("{} interfaces", x.interfaces.len()),
                &format!("at most {max} interfaces per daemon (run a second daemon for more)"),
            ));
        }
        if let Some((i, dup)) = x
            .interfaces
            .iter()
            .enumerate()
            .find(|(i, n)| x.interfaces[..*i].contains(n))
        {
            return Err(invalid(
                "xdp.interfaces",
                format!(
                    "{dup:?} (listed twice, at positions {} and {})",
                    x.interfaces.iter().position(|n| n == dup).unwrap_or(0) + 1,
                    i + 1
                ),
                "each interface once",
            ));
        }
        if !(1..=1 << 24).contains(&x.max_bans) {
            return Err(invalid(
                "xdp.max_bans",
                x.max_bans,
                "a number from 1 to 16777216",
            ));
        }
        if x.sweep_interval < Duration::from_millis(100)
            || x.sweep_interval > Duration::from_secs(3600)
        {
            return Err(invalid(
                "xdp.sweep_interval",
                format!(
                    "{:?}",
                    humantime::format_duration(x.sweep_interval).to_string()
                ),
                "a duration from 100ms to 1h, e.g. \"1s\"",
            ));
        }
        let b = &x.bucket;
        if b.rate > 100_000_000 {
            return Err(invalid(
                "xdp.bucket.rate",
                b.rate,
                "packets per second per source, 0 (off) to 100000000",
            ));
        }
        if b.rate > 0 && !(1..=100_000_000).contains(&b.burst) {
            return Err(invalid(
                "xdp.bucket.burst",
                b.burst,
                "at least 1 packet (and at most 100000000) when a rate is set",
            ));
        }
        // The kernel reads a coarse clock for buckets (one jiffy, up to 10 ms): a burst smaller
        // than one tick's worth of packets would cap the rate below the configured one.
        let min_burst = b.rate.div_ceil(100);
        if b.rate > 0 && b.burst < min_burst {
            return Err(invalid(
                "xdp.bucket.burst",
                b.burst,
                &format!(
                    "at least {min_burst} packets at rate {} (the bucket's kernel clock ticks every 1-10 ms; a smaller burst would cap the rate below the one set)",
                    b.rate
                ),
            ));
        }
        if let Some(p) = b.ports.iter().find(|p| **p == 0) {
            return Err(invalid("xdp.bucket.ports", p, "ports from 1 to 65535"));
        }
        if !(1..=32).contains(&b.ipv4_prefix) {
            return Err(invalid(
                "xdp.bucket.ipv4_prefix",
                b.ipv4_prefix,
                "a prefix length from 1 to 32",
            ));
        }
        if !(1..=128).contains(&b.ipv6_prefix) {
            return Err(invalid(
                "xdp.bucket.ipv6_prefix",
                b.ipv6_prefix,
                "a prefix length from 1 to 128",
            ));
        }
        if self.daemon.admin_socket.as_os_str().is_empty() {
            return Err(invalid("daemon.admin_socket", "\"\"", "a path"));
        }
        self.gateway.validate()?;
        self.store.validate()?;
        self.metrics.validate()?;
        self.detect.validate()?;
        self.tier_table().validate()?;
        Ok(())
    }

    /// Tiers, tenants and prices as the gateway uses them: with the built-in tier when the
    /// default tier is the built-in one and the file does not define it.
    pub fn tier_table(&self) -> TierTable {
        let mut tiers = self.tiers.clone();
        if self.gateway.default_tier == BUILTIN_TIER {
            tiers
                .entry(BUILTIN_TIER.to_owned())
                .or_insert_with(TierSettings::builtin);
        }
        TierTable {
            tiers,
            tenants: self.tenants.clone(),
            prices: self.prices.clone(),
            default_tier: self.gateway.default_tier.clone(),
        }
    }
}

pub(crate) fn invalid(
    field: impl Into<String>,
    value: impl ToString,
    expected: &str,
) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        value: value.to_string(),
        expected: expected.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"))
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let c = parse(include_str!("../../deploy/aiguard.toml")).expect("deploy/aiguard.toml");
        assert!(c.gateway.is_enabled());
        let t = c.tier_table();
        assert_eq!(t.policy("acme", "paid").monthly_tokens, Some(200_000_000));
        assert_eq!(t.price("paid", "other").completion_per_1k, 0.0015);
    }

    #[test]
    fn gateway_errors_name_the_field() {
        for (text, field) in [
            (
                "[tiers.free]\nrequests_per_minute = 0\n",
                "tiers.free.requests_per_minute",
            ),
            (
                "[gateway]\nlisten = [\"127.0.0.1:1\"]\nupstreams = [\"https://x\"]\n",
                "gateway.upstreams",
            ),
            (
                "[gateway]\ndefault_tier = \"gold\"\n",
                "gateway.default_tier",
            ),
            ("[tenants.\"a b\"]\n", "tenants"),
            (
                "[prices.m]\nprompt_per_1k = -1.0\n",
                "prices.\"m\".prompt_per_1k",
            ),
        ] {
            let e = parse(text).expect_err(text).to_string();
            assert!(e.contains(&format!("`{field}`")), "{text}: {e}");
        }
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = parse("").expect("empty config is valid");
        assert_eq!(c, Config::default());
        assert_eq!(c.xdp.bucket.ipv6_prefix, 64);
        assert!(!c.xdp.detach_on_exit);
        assert!(!c.xdp.bucket.is_active(), "no ports: the bucket is off");
    }

    #[test]
    fn full_file_parses() {
        let c = parse(
            r#"
            [daemon]
            admin_socket = "/tmp/a.sock"
            [xdp]
            interfaces = ["eth0", "eth1"]
            mode = "generic"
            sweep_interval = "250ms"
            [xdp.bucket]
            rate = 50
            burst = 10
            ports = [8000, 443]
            syn_only = true
            "#,
        )
        .expect("valid config");
        assert_eq!(c.xdp.interfaces, ["eth0", "eth1"]);
        assert_eq!(c.xdp.mode, AttachMode::Generic);
        assert_eq!(c.xdp.sweep_interval, Duration::from_millis(250));
        let k = c.xdp.bucket.to_kernel();
        assert_eq!(k.emission_ns, 20_000_000);
        assert_eq!(k.tolerance_ns, 9 * 20_000_000);
        assert_eq!(
            k.flags,
            aiguard_common::CFG_RATE_LIMIT | aiguard_common::CFG_SYN_ONLY
        );
    }

    #[test]
    fn metrics_listen_on_loopback_by_default_and_a_bad_address_is_named() {
        let c = parse("").expect("empty config");
        assert_eq!(
            c.metrics.listen_addr(),
            Some("127.0.0.1:9464".parse().expect("addr"))
        );
        let c = parse("[metrics]\nenabled = false\n").expect("valid");
        assert_eq!(c.metrics.listen_addr(), None);
        let c = parse("[metrics]\nlisten = \"[::1]:9100\"\n").expect("valid");
        assert_eq!(
            c.metrics.listen_addr(),
            Some("[::1]:9100".parse().expect("addr"))
        );
        for bad in ["localhost:9464", "127.0.0.1", "127.0.0.1:99999", ""] {
            let err = parse(&format!("[metrics]\nlisten = {bad:?}\n"))
                .expect_err(bad)
                .to_string();
            assert_eq!(
                err,
                format!(
                    "config field `metrics.listen` = {bad:?} is invalid: expected an IP address and port, e.g. \"127.0.0.1:9464\" or \"[::1]:9464\""
                )
            );
        }
        let err = parse("[metrics]\nport = 1\n")
            .expect_err("unknown")
            .to_string();
        assert!(err.contains("port"), "{err}");
    }

    #[test]
    fn priority_queueing_is_configured_and_bad_values_are_named() {
        let c = parse(
            "[gateway]\nupstream_slots = 8\n[tiers.paid]\nweight = 10\nmax_queue_wait = \"5s\"\n\
             [tiers.free]\nmax_queued = 0\nmax_upstream_slots = 6\n",
        )
        .expect("valid");
        assert_eq!(c.gateway.upstream_slots, Some(8));
        let t = c.tier_table();
        let paid = t.tier("paid").share();
        assert_eq!(
            (paid.weight, paid.max_queue_wait),
            (10, Duration::from_secs(5))
        );
        let free = t.tier("free").share();
        assert_eq!(
            (free.weight, free.max_queued, free.max_slots),
            (1, 0, Some(6))
        );
        for (bad, field) in [
            ("[gateway]\nupstream_slots = 0\n", "gateway.upstream_slots"),
            ("[tiers.paid]\nweight = 0\n", "tiers.paid.weight"),
            (
                "[tiers.paid]\nmax_queue_wait = \"0s\"\n",
                "tiers.paid.max_queue_wait",
            ),
            (
                "[tiers.paid]\nmax_queue_wait = \"2h\"\n",
                "tiers.paid.max_queue_wait",
            ),
            (
                "[tiers.paid]\nmax_upstream_slots = 0\n",
                "tiers.paid.max_upstream_slots",
            ),
            (
                "[tiers.paid]\nmax_queued = 2000000\n",
                "tiers.paid.max_queued",
            ),
        ] {
            let err = parse(bad).expect_err(bad).to_string();
            assert!(err.contains(&format!("`{field}`")), "{bad}: {err}");
        }
    }

    #[test]
    fn unknown_field_is_named() {
        let err = parse("[xdp]\ninterfacez = [\"eth0\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("interfacez"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = parse("[xdp.bucket]\nrate = \"fast\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("rate"), "{err}");
    }

    #[test]
    fn out_of_range_values_name_field_value_and_expectation() {
        let err = parse("[xdp.bucket]\nipv6_prefix = 130\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "config field `xdp.bucket.ipv6_prefix` = 130 is invalid: expected a prefix length from 1 to 128"
        );
        let err = parse("[xdp.bucket]\nrate = 10\nburst = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("xdp.bucket.burst` = 0"), "{err}");
        let err = parse("[xdp.bucket]\nrate = 100000\nburst = 50\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("at least 1000 packets at rate 100000"),
            "{err}"
        );
        let err = parse("[xdp]\ninterfaces = [\"eth0\", \"eth1\", \"eth0\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("listed twice") && err.contains("xdp.interfaces"),
            "{err}"
        );
        let many: Vec<String> = (0..16).map(|i| format!("\"eth{i}\"")).collect();
        let err = parse(&format!("[xdp]\ninterfaces = [{}]\n", many.join(",")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most 15 interfaces"), "{err}");
        let err = parse("[xdp]\nmode = \"turbo\"\n").unwrap_err().to_string();
        assert!(err.contains("turbo") && err.contains("native"), "{err}");
        let err = parse("[xdp]\nsweep_interval = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sweep_interval"), "{err}");
    }
}
