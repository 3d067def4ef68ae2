//! The `aiguard` command line: the daemon (`run`) and the operator commands that talk to it over
//! the admin socket. Exit status: 0 on success, 1 when the daemon refuses or cannot be reached,
//! 2 on a usage error.
use std::{
    io::IsTerminal as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

mod gateway;
mod top;

use crate::{
    admin::{Reply, Request, StatusReport, client},
    bans::{BanView, now_ms},
    config::{AttachMode, Config, DEFAULT_ADMIN_SOCKET},
};

/// Protects an AI inference node: drops banned and flooding sources at the NIC (XDP) and
/// enforces per-key limits and quotas in front of the inference server.
#[derive(Debug, Parser)]
#[command(name = "aiguard", version, propagate_version = true)]
pub struct Cli {
    /// Admin socket of the daemon [default: /run/aiguard/admin.sock, or daemon.admin_socket
    /// from the config for `run`].
    #[arg(long, env = "AIGUARD_SOCKET", global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: attach to the interfaces, restore bans, serve the admin socket.
    Run(RunArgs),
    /// Ban ranges at the NIC. `aiguard ban 203.0.113.0/24 --ttl 1h --reason "credential stuffing"`
    Ban(BanArgs),
    /// Lift a ban.
    Unban {
        /// The banned range, as listed by `aiguard bans`.
        range: String,
    },
    /// List bans: range, reason, origin, created, expires, packets matched.
    Bans {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Never drop sources in this range (the allowlist wins over every ban and bucket).
    Allow {
        range: String,
        /// Accept a /0.
        #[arg(long)]
        force: bool,
    },
    /// Remove a range from the allowlist.
    Unallow { range: String },
    /// List the allowlist.
    Allowlist {
        #[arg(long)]
        json: bool,
    },
    /// Interfaces, attach mode, verdict counters, gateway, uptime.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// API keys: add (prints the key once), list, revoke.
    #[command(subcommand)]
    Keys(gateway::KeysCommand),
    /// A tenant's monthly token quota: used, reserved, remaining.
    Quota {
        tenant: String,
        #[arg(long)]
        json: bool,
    },
    /// Usage per day, tenant, key and model, with cost from the configured prices.
    Usage(gateway::UsageArgs),
    /// Re-read the configuration (tiers, tenants, prices, gateway settings), as SIGHUP does.
    Reload,
    /// Live view, refreshed each second: drops/s by reason, the most hit bans, requests/s per
    /// tier. `q`, Esc or Ctrl-C quits.
    Top,
}

/// `aiguard run`: flags override the config file, which overrides the defaults.
#[derive(Debug, Args, Default, Clone)]
pub struct RunArgs {
    /// TOML config file (see the README for every field).
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Interface to protect (repeatable); replaces xdp.interfaces.
    #[arg(long = "interface", short = 'i', value_name = "IF")]
    pub interfaces: Vec<String>,
    /// Attach mode: auto (native, falling back to generic), native, generic.
    #[arg(long, value_enum, value_name = "MODE")]
    pub xdp_mode: Option<AttachMode>,
    /// Where maps and links are pinned [default: /sys/fs/bpf/aiguard].
    #[arg(long, env = "AIGUARD_BPFFS", value_name = "DIR")]
    pub bpffs_dir: Option<PathBuf>,
    /// Where the embedded store lives [default: /var/lib/aiguard].
    #[arg(long, env = "AIGUARD_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Detach the XDP program when the daemon exits (by default it stays, with its bans).
    #[arg(long)]
    pub detach_on_exit: bool,
    /// Per-source bucket: sustained packets per second (0 = off).
    #[arg(long, value_name = "PPS")]
    pub bucket_rate: Option<u32>,
    /// Per-source bucket: burst in packets.
    #[arg(long, value_name = "PACKETS")]
    pub bucket_burst: Option<u32>,
    /// Per-source bucket: destination port it applies to (repeatable); replaces xdp.bucket.ports.
    #[arg(long = "bucket-port", value_name = "PORT")]
    pub bucket_ports: Vec<u16>,
    /// Per-source bucket: only TCP SYNs (new connections) take a token.
    #[arg(long)]
    pub bucket_syn_only: bool,
    /// Capacity of each ban table (IPv4 and IPv6 separately).
    #[arg(long, value_name = "N")]
    pub max_bans: Option<u32>,
    /// Log filter, e.g. info or aiguard=debug (RUST_LOG wins).
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,
    /// Gateway: address to accept clients on (repeatable); replaces gateway.listen.
    #[arg(long = "listen", value_name = "ADDR")]
    pub listen: Vec<std::net::SocketAddr>,
    /// Gateway: inference server URL (repeatable, round robin); replaces gateway.upstreams.
    #[arg(long = "upstream", value_name = "URL")]
    pub upstreams: Vec<String>,
    /// Shared store: a redis:// or rediss:// URL (repeatable: Cluster seeds); sets
    /// store.backend = "redis" and replaces store.urls.
    #[arg(long = "redis", value_name = "URL")]
    pub redis: Vec<String>,
    /// Shared store: this node's name in ban origins and leases (store.node_name).
    #[arg(long = "node-name", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Prometheus /metrics on IP:PORT (metrics.listen) [default: 127.0.0.1:9464].
    #[arg(long = "metrics-listen", value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Serve no /metrics (metrics.enabled = false).
    #[arg(long, conflicts_with = "metrics_listen")]
    pub no_metrics: bool,
}

/// `aiguard ban`.
#[derive(Debug, Args)]
pub struct BanArgs {
    /// Ranges (CIDR or single address).
    #[arg(required_unless_present = "file", value_name = "CIDR")]
    pub ranges: Vec<String>,
    /// Read ranges from a file, one per line ('#' starts a comment); '-' reads stdin. The whole
    /// file is applied or none of it.
    #[arg(long, short, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// How long the ban lasts, e.g. 90s, 30m, 1h, 7d [default: until unbanned].
    #[arg(long, value_parser = parse_ttl, value_name = "DURATION")]
    pub ttl: Option<Duration>,
    /// Why (shown by `aiguard bans`).
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    /// Count what the ban would drop, drop nothing.
    #[arg(long)]
    pub shadow: bool,
    /// Accept a /0 (every address of a family).
    #[arg(long)]
    pub force: bool,
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(s).map_err(|e| {
        format!("invalid TTL {s:?} ({e}): expected a duration such as 90s, 30m, 1h, 1h30m or 7d")
    })?;
    // Refused here rather than wrapped into a short TTL on the way to the daemon.
    if ttl > crate::bans::MAX_TTL {
        return Err(format!(
            "TTL {s:?} is longer than 10 years; omit --ttl for a ban that lasts until unbanned"
        ));
    }
    Ok(ttl)
}

impl RunArgs {
    /// The effective configuration: defaults, then the file, then flags and environment.
    pub fn resolve(&self, socket: Option<&Path>) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(s) = socket {
            c.daemon.admin_socket = s.to_owned();
        }
        if !self.interfaces.is_empty() {
            c.xdp.interfaces = self.interfaces.clone();
        }
        if let Some(m) = self.xdp_mode {
            c.xdp.mode = m;
        }
        if let Some(d) = &self.bpffs_dir {
            c.daemon.bpffs_dir = d.clone();
        }
        if let Some(d) = &self.state_dir {
            c.daemon.state_dir = d.clone();
        }
        if self.detach_on_exit {
            c.xdp.detach_on_exit = true;
        }
        if let Some(r) = self.bucket_rate {
            c.xdp.bucket.rate = r;
        }
        if let Some(b) = self.bucket_burst {
            c.xdp.bucket.burst = b;
        }
        if !self.bucket_ports.is_empty() {
            c.xdp.bucket.ports = self.bucket_ports.clone();
        }
        if self.bucket_syn_only {
            c.xdp.bucket.syn_only = true;
        }
        if let Some(m) = self.max_bans {
            c.xdp.max_bans = m;
        }
        if let Some(l) = &self.log {
            c.daemon.log = l.clone();
        }
        if !self.listen.is_empty() {
            c.gateway.listen = self.listen.clone();
        }
        if !self.upstreams.is_empty() {
            c.gateway.upstreams = self.upstreams.clone();
        }
        if !self.redis.is_empty() {
            c.store.backend = crate::shared::Backend::Redis;
            c.store.urls = self.redis.clone();
        }
        if let Some(n) = &self.node_name {
            c.store.node_name = Some(n.clone());
        }
        if let Some(a) = &self.metrics_listen {
            c.metrics.enabled = true;
            c.metrics.listen = a.clone();
        }
        if self.no_metrics {
            c.metrics.enabled = false;
        }
        c.validate()?;
        Ok(c)
    }
}

/// Entry point of the `aiguard` binary.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, skipping a cause whose text the message already carries (our
/// error types print their source inline).
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let socket = cli.socket.clone();
    let admin_socket = || {
        socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET))
    };
    match cli.command {
        Command::Run(args) => run_daemon(&args, socket.as_deref()),
        Command::Ban(args) => ban(&admin_socket(), args),
        Command::Unban { range } => match ask(&admin_socket(), &Request::Unban { range })? {
            Reply::Unbanned { ban } => {
                println!("unbanned {}", ban.range);
                Ok(())
            }
            other => unexpected(other),
        },
        Command::Bans { json } => match ask(&admin_socket(), &Request::Bans)? {
            Reply::Bans { bans } => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&bans)?);
                } else {
                    print_bans(&bans);
                }
                Ok(())
            }
            other => unexpected(other),
        },
        Command::Allow { range, force } => {
            match ask(&admin_socket(), &Request::Allow { range, force })? {
                Reply::Allowed {
                    entry,
                    overlapping_bans,
                } => {
                    println!("allowlisted {}", entry.range);
                    if !overlapping_bans.is_empty() {
                        let list: Vec<String> =
                            overlapping_bans.iter().map(ToString::to_string).collect();
                        eprintln!(
                            "warning: these bans no longer drop sources inside {}: {}",
                            entry.range,
                            list.join(", ")
                        );
                    }
                    Ok(())
                }
                other => unexpected(other),
            }
        }
        Command::Unallow { range } => match ask(&admin_socket(), &Request::Unallow { range })? {
            Reply::Unallowed { entry } => {
                println!("removed {} from the allowlist", entry.range);
                Ok(())
            }
            other => unexpected(other),
        },
        Command::Allowlist { json } => match ask(&admin_socket(), &Request::Allowlist)? {
            Reply::Allowlist { entries } => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&entries)?);
                } else if entries.is_empty() {
                    println!("the allowlist is empty");
                } else {
                    println!("{:<43}  ADDED", "RANGE");
                    for e in entries {
                        println!("{:<43}  {}", e.range.to_string(), fmt_time(e.created_ms));
                    }
                }
                Ok(())
            }
            other => unexpected(other),
        },
        Command::Status { json } => match ask(&admin_socket(), &Request::Status)? {
            Reply::Status(s) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&s)?);
                } else {
                    print_status(&s);
                }
                Ok(())
            }
            other => unexpected(other),
        },
        Command::Keys(cmd) => gateway::keys(&admin_socket(), cmd),
        Command::Quota { tenant, json } => gateway::quota(&admin_socket(), tenant, json),
        Command::Usage(args) => gateway::usage(&admin_socket(), args),
        Command::Reload => gateway::reload(&admin_socket()),
        Command::Top => top::run(&admin_socket()),
    }
}

fn run_daemon(args: &RunArgs, socket: Option<&Path>) -> anyhow::Result<()> {
    let config = args.resolve(socket)?;
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| config.daemon.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .with_context(|| format!("invalid log filter {filter:?}"))?,
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let (args, socket) = (args.clone(), socket.map(Path::to_owned));
    let reload: crate::daemon::ConfigSource = Box::new(move || args.resolve(socket.as_deref()));
    runtime.block_on(crate::daemon::run(config, Some(reload)))?;
    Ok(())
}

fn ban(socket: &Path, args: BanArgs) -> anyhow::Result<()> {
    let mut ranges = args.ranges;
    // Line numbers of file entries, to name the line the daemon refuses.
    let mut lines: Vec<(String, usize)> = Vec::new();
    if let Some(path) = &args.file {
        let text = if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).context("reading ranges from stdin")?
        } else {
            std::fs::read_to_string(path)
                .with_context(|| format!("reading ranges from {}", path.display()))?
        };
        let first = ranges.len();
        for (n, line) in text.lines().enumerate() {
            let entry = line.split('#').next().unwrap_or("").trim();
            if !entry.is_empty() {
                lines.push((path.display().to_string(), n + 1));
                ranges.push(entry.to_owned());
            }
        }
        if ranges.len() == first {
            anyhow::bail!("{} holds no ranges", path.display());
        }
    }
    let count = ranges.len();
    let from_args = count - lines.len();
    let request = Request::Ban {
        ranges,
        ttl_ms: args.ttl.map(|t| t.as_millis() as u64),
        reason: args.reason,
        shadow: args.shadow,
        force: args.force,
    };
    match client::call(socket, &request)? {
        Reply::Banned {
            count: distinct,
            bans,
        } => {
            if count == 1 {
                let b = &bans[0];
                let until = match b.expires_ms {
                    Some(e) => format!("until {} ({})", fmt_time(e), fmt_in(e)),
                    None => "until unbanned".into(),
                };
                let mode = if b.shadow {
                    " (shadow: counting only)"
                } else {
                    ""
                };
                println!("banned {} {until}, reason: {}{mode}", b.range, b.reason);
            } else {
                println!("banned {count} ranges ({distinct} distinct)");
            }
            Ok(())
        }
        Reply::Error {
            message,
            index: Some(i),
            ..
        } if i >= from_args => {
            let (file, line) = &lines[i - from_args];
            anyhow::bail!("{file} line {line}: {message}; nothing was banned")
        }
        Reply::Error { message, index, .. } => match index {
            Some(_) if count > 1 => anyhow::bail!("{message}; nothing was banned"),
            _ => anyhow::bail!("{message}"),
        },
        other => unexpected(other),
    }
}

/// Sends a request; a refusal becomes an error with the daemon's message.
pub(crate) fn ask(socket: &Path, request: &Request) -> anyhow::Result<Reply> {
    match client::call(socket, request)? {
        Reply::Error { message, .. } => anyhow::bail!("{message}"),
        reply => Ok(reply),
    }
}

pub(crate) fn unexpected(reply: Reply) -> anyhow::Result<()> {
    anyhow::bail!("unexpected reply from the daemon: {reply:?}")
}

pub(crate) fn fmt_time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn fmt_in(ms: u64) -> String {
    let now = now_ms();
    if ms <= now {
        return "expired".into();
    }
    let secs = (ms - now).div_ceil(1000);
    format!(
        "in {}",
        humantime::format_duration(Duration::from_secs(secs))
    )
}

fn print_bans(bans: &[BanView]) {
    if bans.is_empty() {
        println!("no bans");
        return;
    }
    println!(
        "{:<24} {:<6} {:<24} {:<11} {:<16} {:<20} {:<36} {:>12}",
        "RANGE", "MODE", "REASON", "ORIGIN", "NODE", "CREATED", "EXPIRES", "HITS"
    );
    for b in bans {
        let r = &b.record;
        let expires = match r.expires_ms {
            Some(e) => format!("{} ({})", fmt_time(e), fmt_in(e)),
            None => "never".into(),
        };
        let origin = serde_json::to_value(r.origin)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        println!(
            "{:<24} {:<6} {:<24} {:<11} {:<16} {:<20} {:<36} {:>12}",
            r.range.to_string(),
            if r.shadow { "shadow" } else { "drop" },
            truncate(&r.reason, 24),
            origin,
            truncate(r.node.as_deref().unwrap_or("-"), 16),
            fmt_time(r.created_ms),
            expires,
            b.hits
        );
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

fn print_status(s: &StatusReport) {
    println!(
        "aiguard {} (pid {}), up {}",
        s.version,
        s.pid,
        humantime::format_duration(Duration::from_secs(s.uptime_secs))
    );
    println!("interfaces:");
    for i in &s.interfaces {
        let mode = serde_json::to_value(i.mode)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        println!(
            "  {} (ifindex {}): {mode} mode{}",
            i.name,
            i.ifindex,
            if i.adopted {
                ", adopted from a previous run"
            } else {
                ""
            }
        );
    }
    println!("bans: {}   allowlist: {}", s.bans, s.allowlist);
    let b = &s.bucket;
    if b.active {
        let ports = if b.all_ports {
            "all ports".to_owned()
        } else {
            let p: Vec<String> = b.ports.iter().map(u16::to_string).collect();
            format!("ports {}", p.join(","))
        };
        println!(
            "per-source bucket: {} pkt/s, burst {}, {ports}{}",
            b.rate,
            b.burst,
            if b.syn_only { ", TCP SYN only" } else { "" }
        );
    } else {
        println!("per-source bucket: off (no ports configured)");
    }
    print!("{:<16} {:>14}", "PACKETS", "total");
    for i in &s.interfaces {
        print!(" {:>14}", i.name);
    }
    println!();
    // In verdict order (the report's maps are keyed by name).
    for name in aiguard_common::stat::NAMES {
        let total = s.totals.get(name).copied().unwrap_or(0);
        print!("{name:<16} {total:>14}");
        for i in &s.interfaces {
            print!(" {:>14}", i.counters.get(name).copied().unwrap_or(0));
        }
        println!();
    }
    if let Some(g) = &s.gateway {
        let listen: Vec<String> = g.listen.iter().map(ToString::to_string).collect();
        println!(
            "gateway: {} -> {}   keys: {}",
            listen.join(", "),
            g.upstreams.join(", "),
            g.keys
        );
        println!(
            "requests: {} allowed, {} rate-limited, {} over quota, {} unauthorized, {} bad, {} upstream errors",
            g.allowed,
            g.rate_limited,
            g.quota_exceeded,
            g.unauthorized,
            g.bad_requests,
            g.upstream_errors
        );
    }
    if let Some(sh) = &s.shared {
        let state = if sh.up { "up" } else { "DOWN" };
        let since = sh
            .state_secs
            .map(|s| {
                format!(
                    " for {}",
                    humantime::format_duration(Duration::from_secs(s))
                )
            })
            .unwrap_or_default();
        println!(
            "shared store: {} {state}{since}   node: {}   outages: {}   recoveries: {}",
            sh.backend, sh.node, sh.outages, sh.recoveries
        );
        println!(
            "  errors: {}   timeouts: {}   decisions without it: {}   tokens to write back: {}   bans replicated here: {}",
            sh.errors, sh.timeouts, sh.fallbacks, sh.outbox_tokens, sh.bans_replicated
        );
        println!(
            "  settlements carried by an admission: {}   waiting for one: {}   waiting for Redis: {}",
            sh.settlements_carried, sh.settlements_waiting, sh.retries_pending
        );
        if let (false, Some(e)) = (sh.up, &sh.last_error) {
            println!("  last error: {e}");
        }
    }
    println!("pins: {}   state: {}", s.bpffs_dir, s.state_dir);
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn ttl_errors_say_what_is_expected() {
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("1h30m").unwrap(), Duration::from_secs(5400));
        let err = parse_ttl("1x").unwrap_err();
        assert!(err.contains("90s, 30m, 1h"), "{err}");
        let err = parse_ttl("600000000y").unwrap_err();
        assert!(err.contains("longer than 10 years"), "{err}");
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[daemon]\nadmin_socket = \"/tmp/file.sock\"\n[xdp]\ninterfaces = [\"eth0\"]\n[xdp.bucket]\nrate = 5\nports = [80]\n",
        )
        .unwrap();
        let args = RunArgs {
            config: Some(path),
            interfaces: vec!["eth1".into()],
            bucket_rate: Some(7),
            ..RunArgs::default()
        };
        let c = args.resolve(None).unwrap();
        assert_eq!(c.xdp.interfaces, ["eth1"]);
        assert_eq!(c.xdp.bucket.rate, 7);
        assert_eq!(c.xdp.bucket.ports, [80]);
        assert_eq!(c.daemon.admin_socket, Path::new("/tmp/file.sock"));
        let c = args.resolve(Some(Path::new("/tmp/flag.sock"))).unwrap();
        assert_eq!(c.daemon.admin_socket, Path::new("/tmp/flag.sock"));
    }

    #[test]
    fn metrics_flags_set_the_address_or_turn_metrics_off() {
        let with = |args: RunArgs| args.resolve(None);
        let c = with(RunArgs {
            metrics_listen: Some("127.0.0.1:0".into()),
            ..RunArgs::default()
        })
        .expect("valid");
        assert_eq!(
            c.metrics.listen_addr(),
            Some("127.0.0.1:0".parse().expect("addr"))
        );
        let c = with(RunArgs {
            no_metrics: true,
            ..RunArgs::default()
        })
        .expect("valid");
        assert_eq!(c.metrics.listen_addr(), None);
        let err = with(RunArgs {
            metrics_listen: Some("localhost:9464".into()),
            ..RunArgs::default()
        })
        .expect_err("not an IP address");
        assert!(err.to_string().contains("`metrics.listen`"), "{err}");
    }

    #[test]
    fn no_config_file_means_defaults() {
        let c = RunArgs {
            interfaces: vec!["lo".into()],
            ..RunArgs::default()
        }
        .resolve(None)
        .unwrap();
        assert_eq!(c.xdp.interfaces, ["lo"]);
        assert_eq!(c.daemon.admin_socket, Path::new(DEFAULT_ADMIN_SOCKET));
    }
}
