//! `cargo xtask bench detect`: how long a credential-stuffing botnet is served before the
//! detector's ban drops its packets at the NIC.
//!
//! Each round makes two namespaces joined by a veth pair ([`VethPair`]). The server end holds
//! 10.247.R.1/24 (the botnet's range) and 10.248.R.1/24; the client end holds the botnet,
//! 10.247.R.10 to 10.247.R.59, and a bystander, 10.248.R.2 (R is the round's number). The
//! release daemon runs in the server namespace with XDP on its end of the pair and a gateway on
//! port 18080 whose credential-stuffing detector enforces: more than 10 distinct invalid keys
//! from one /24 and the /24 is banned at the NIC, through the same ban path as `aiguard ban`
//! (origin "detector"). The upstream is never reached: every attack request fails
//! authentication first.
//!
//! The attack is sequential, one request at a time, as a low-and-slow botnet's requests would
//! arrive: each address in turn sends one `POST /v1/chat/completions` with a key of the right
//! shape that does not exist (and the botnet goes round again, with fresh keys, if all 50 are
//! answered). Each is answered 401 until the ban lands; then the next attempt's SYN is dropped
//! and its connect times out. The round's figure is the time from sending the first request to
//! starting that attempt (its SYN was the first packet dropped), so it is dominated by the 11
//! round trips the detector needs to see 11 distinct keys, plus the time the responder takes to
//! ban.
//!
//! Also recorded: the 401s before the drop (at least 11, since the 11th distinct key fires the
//! detector; more when requests are answered while the responder bans); the time from the start
//! of the request that fired the detector to the first drop, which is when the ban was in the
//! kernel to within one round trip (it landed after the last answered attempt's request got
//! through, before the first dropped SYN); how many offenses the ban's reason counts (the
//! detector fires again on every 11 further distinct keys while its first ban is on its way);
//! the packets the ban has dropped (the kernel's hit count); and that the bystander, in another
//! /24, is still answered. The ban's `created_ms` is not used: each further finding bans the
//! range again and replaces it (and a thread polling the pinned ban trie lags the drops by
//! milliseconds on a busy machine).
//!
//! Neighbours are static on both ends, as a server's one neighbour (its router) would be
//! resolved: no ARP exchange for each new botnet address inside the measured round trips.
//!
//! Every round has a fresh daemon, state and namespaces; the summary is the median, minimum and
//! maximum over rounds (and the 90th percentile from 10 rounds on). The daemon's state is under
//! `target/bench`: the responder commits each offense there before it bans, so that disk is part
//! of the figure, and the report names its filesystem. The table goes to stdout, the figures to
//! `target/bench/detect.json`.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::{
    errno::Errno,
    sys::{
        socket::{
            AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket,
            sockopt,
        },
        time::{TimeVal, TimeValLike as _},
    },
};
use serde::{Deserialize, Serialize};

use super::{
    command_line, median,
    metrics::{Daemon, WorkDir, in_netns},
    netns::{self, RX_IF, RX_MAC, TX_IF, TX_MAC, VethPair},
    object::{self, PinDir},
    percentile,
};
use crate::{setup, stdout_of, workspace_root};

const GATEWAY_PORT: u16 = 18080;
/// The second octet of the botnet's range and of the bystander's.
const BOTNET_NET: u8 = 247;
const BYSTANDER_NET: u8 = 248;
/// The botnet: 10.247.R.10 onwards.
const BOTNET: u8 = 50;
const FIRST_BOT: u8 = 10;
const BYSTANDER_HOST: u8 = 2;
/// Bounds on one attack. The botnet goes round again (fresh keys, same addresses) when the ban
/// takes longer than its 50 requests.
const MAX_ATTEMPTS: u32 = 5_000;
const ATTACK_TIMEOUT: Duration = Duration::from_secs(10);
/// The detector's threshold: one more distinct invalid key than this fires it.
const DISTINCT_INVALID_KEYS: usize = 10;
const CHAT_PATH: &str = "/v1/chat/completions";
const REQUEST_BODY: &str =
    r#"{"model":"bench","messages":[{"role":"user","content":"hello"}],"max_tokens":16}"#;
/// How long a request that connected may take to be answered; far above a 401's round trip.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// The bystander's requests: these must get through, so no hurry.
const BYSTANDER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the gateway may take to answer its first request after the daemon is up.
const SERVING_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);
/// Rounds from which the 90th percentile says more than the maximum (nearest rank).
const P90_ROUNDS: usize = 10;

#[derive(clap::Args, Debug)]
pub struct DetectBenchArgs {
    /// Rounds, each with a fresh daemon and namespaces; the summary is over rounds.
    #[arg(long, default_value_t = 7)]
    pub rounds: usize,
    /// How long an attempt's connect waits before its SYN counts as dropped, in milliseconds.
    /// Below the first SYN retransmission (1 s): a dropped attempt sends one SYN.
    #[arg(long, default_value_t = 300)]
    pub drop_timeout_ms: u64,
    /// aiguard daemon binary; by default the release daemon is built.
    #[arg(long)]
    pub daemon: Option<PathBuf>,
}

fn validate(args: &DetectBenchArgs) -> Result<()> {
    // The round's number is the third octet of its addresses.
    ensure!(
        (1..=200).contains(&args.rounds),
        "--rounds must be in 1..=200"
    );
    ensure!(
        (50..=900).contains(&args.drop_timeout_ms),
        "--drop-timeout-ms must be in 50..=900 (below the first SYN retransmission)"
    );
    Ok(())
}

pub fn run(args: DetectBenchArgs) -> Result<()> {
    setup::require_root("`cargo xtask bench detect` (XDP, network namespaces)")?;
    validate(&args)?;
    ensure!(
        on_path("ip"),
        "`ip` is not installed: run `cargo xtask setup`"
    );
    setup::ensure_bpffs()?;
    let binary = match &args.daemon {
        Some(path) if path.is_file() => path.clone(),
        Some(path) => bail!("--daemon {}: no such file", path.display()),
        None => crate::run::build_daemon().context("building the daemon")?,
    };
    netns::remove_stale()?;
    object::remove_stale_pin_dirs()?;
    let bench_dir = workspace_root().join("target/bench");
    fs::create_dir_all(&bench_dir)?;

    let drop_timeout = Duration::from_millis(args.drop_timeout_ms);
    let mut rounds = Vec::with_capacity(args.rounds);
    for n in 1..=args.rounds {
        let number = u8::try_from(n).expect("validated");
        let round = one_round(&binary, &bench_dir, number, drop_timeout)
            .with_context(|| format!("round {n}"))?;
        eprintln!(
            "bench detect: round {n}/{}: first drop {:.1} ms after the first request, \
             {} answered 401 (round trip {:.2} ms), {:.1} ms after the request that fired the \
             detector, offense {}",
            args.rounds,
            round.to_first_drop_ms,
            round.answered_401,
            round.round_trip_ms,
            round.fire_to_drop_ms,
            round.offenses,
        );
        rounds.push(round);
    }
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let state_fs = fs::canonicalize(&bench_dir)
        .ok()
        .and_then(|dir| filesystem_of(&mounts, &dir))
        .unwrap_or_else(|| "?".into());
    let report = Report::new(&args, kernel_release(), state_fs, rounds);
    print!("{}", report.markdown());
    let json = bench_dir.join("detect.json");
    fs::write(&json, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    eprintln!("bench detect: results written to {}", json.display());
    Ok(())
}

/// 10.`net`.`round`.`host`.
fn addr(net: u8, round: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, net, round, host)
}

fn bot(round: u8, i: u8) -> Ipv4Addr {
    addr(BOTNET_NET, round, FIRST_BOT + i)
}

/// The addresses (CIDR) of the server end and of the client end in round `round`.
fn addresses(round: u8) -> (Vec<String>, Vec<String>) {
    let server = [BOTNET_NET, BYSTANDER_NET]
        .map(|net| format!("{}/24", addr(net, round, 1)))
        .to_vec();
    let mut client: Vec<String> = (0..BOTNET)
        .map(|i| format!("{}/24", bot(round, i)))
        .collect();
    client.push(format!("{}/24", addr(BYSTANDER_NET, round, BYSTANDER_HOST)));
    (server, client)
}

/// `ip -batch` lines making each of `addrs` (CIDR) a permanent neighbour at `mac` on `dev`.
/// A server behind a router has its one neighbour resolved; without these, each new botnet
/// address would cost an ARP exchange inside the measured round trips.
fn neighbour_batch(addrs: &[String], mac: &str, dev: &str) -> String {
    addrs
        .iter()
        .map(|a| {
            let ip = a.split_once('/').map_or(a.as_str(), |(ip, _)| ip);
            format!("neigh replace {ip} lladdr {mac} dev {dev} nud permanent\n")
        })
        .collect()
}

/// An API key of the right shape (`aig_` and 48 hex digits) that no daemon issued, different
/// for every round and attempt.
fn invalid_key(round: u8, attempt: u32) -> String {
    let mut state = (u64::from(round) << 32) | u64::from(attempt);
    let mut next = || {
        // SplitMix64: its first output is a bijection of the seed, so keys never repeat.
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    format!("aig_{:016x}{:016x}{:016x}", next(), next(), next())
}

/// A chat request to `gateway` with `key` (`None`: no key at all), closing the connection.
fn chat_request(gateway: SocketAddrV4, key: Option<&str>) -> String {
    let auth = key.map_or_else(String::new, |k| format!("Authorization: Bearer {k}\r\n"));
    format!(
        "POST {CHAT_PATH} HTTP/1.1\r\nHost: {gateway}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{REQUEST_BODY}",
        REQUEST_BODY.len()
    )
}

/// How one attempt ended, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Answered with this status.
    Answered(u16),
    /// The connect timed out: the SYN was dropped.
    Dropped,
    /// Connected, but no answer came: the ban landed between the handshake and the request.
    Stalled,
}

/// Sends `request` from `src` (an address of the calling thread's namespace) to `dst`; the
/// connect waits at most `connect_timeout`.
fn attempt(
    src: Ipv4Addr,
    dst: SocketAddrV4,
    request: &str,
    connect_timeout: Duration,
) -> Result<Outcome> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("creating a TCP socket")?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(src, 0)))
        .with_context(|| format!("binding {src}"))?;
    // Linux bounds a blocking connect by the send timeout (EINPROGRESS when it runs out).
    let ms = i64::try_from(connect_timeout.as_millis()).context("the connect timeout")?;
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::milliseconds(ms))
        .context("setting SO_SNDTIMEO")?;
    match connect(fd.as_raw_fd(), &SockaddrIn::from(dst)) {
        Ok(()) => {}
        Err(Errno::EINPROGRESS | Errno::EAGAIN | Errno::ETIMEDOUT) => return Ok(Outcome::Dropped),
        Err(e) => bail!("connecting from {src} to {dst}: {e}"),
    }
    let mut stream = TcpStream::from(fd);
    stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    let timed_out = |e: &io::Error| {
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        )
    };
    let mut answer = Vec::new();
    if let Err(e) = stream
        .write_all(request.as_bytes())
        .and_then(|()| stream.read_to_end(&mut answer).map(drop))
    {
        if timed_out(&e) {
            return Ok(Outcome::Stalled);
        }
        return Err(e).with_context(|| format!("the request from {src} to {dst}"));
    }
    let status = parse_status(&answer)
        .with_context(|| format!("{dst} answered {:?}", String::from_utf8_lossy(&answer)))?;
    Ok(Outcome::Answered(status))
}

/// The status code of an HTTP/1.1 answer.
fn parse_status(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// What the botnet saw.
#[derive(Debug)]
struct Attack {
    /// From the first request's start to the start of the first attempt not answered.
    to_first_drop: Duration,
    /// From the first request's start to the start of each attempt answered 401.
    answered_at: Vec<Duration>,
    /// Connect to the end of the answer, for each attempt answered 401.
    round_trips_ms: Vec<f64>,
    /// The first unanswered attempt connected, and its request was what got dropped.
    stalled: bool,
}

/// The botnet's addresses in turn, one request each with a fresh key, until one is not
/// answered. Runs in the client namespace.
fn attack(round: u8, drop_timeout: Duration) -> Result<Attack> {
    let gateway = SocketAddrV4::new(addr(BOTNET_NET, round, 1), GATEWAY_PORT);
    let mut answered_at = Vec::new();
    let mut round_trips_ms = Vec::new();
    let started = Instant::now();
    for n in 0..MAX_ATTEMPTS {
        let src = bot(
            round,
            u8::try_from(n % u32::from(BOTNET)).expect("below BOTNET"),
        );
        let request = chat_request(gateway, Some(&invalid_key(round, n)));
        let sent = Instant::now();
        if sent - started > ATTACK_TIMEOUT {
            break;
        }
        let outcome = attempt(src, gateway, &request, drop_timeout)?;
        match outcome {
            Outcome::Answered(401) => {
                round_trips_ms.push(sent.elapsed().as_secs_f64() * 1e3);
                answered_at.push(sent - started);
            }
            Outcome::Answered(status) => {
                bail!("{src}'s invalid key was answered {status}, not 401")
            }
            Outcome::Dropped | Outcome::Stalled => {
                return Ok(Attack {
                    to_first_drop: sent - started,
                    answered_at,
                    round_trips_ms,
                    stalled: outcome == Outcome::Stalled,
                });
            }
        }
    }
    bail!(
        "{} attempts in {:.1?} were all answered: the range was never banned",
        answered_at.len(),
        started.elapsed()
    )
}

/// A ban as `aiguard bans --json` lists it (the fields used here).
#[derive(Deserialize, Debug)]
struct ListedBan {
    range: String,
    origin: String,
    reason: String,
    hits: u64,
}

/// N in a detector ban's reason, "credential_stuffing (offense N): ...".
fn offense_of(reason: &str) -> Option<u32> {
    let (_, rest) = reason.split_once("(offense ")?;
    rest.split_once(')')?.0.parse().ok()
}

fn listed_bans(binary: &Path, socket: &Path) -> Result<Vec<ListedBan>> {
    let out = stdout_of(
        Command::new(binary)
            .arg("--socket")
            .arg(socket)
            .args(["bans", "--json"]),
    )?;
    serde_json::from_str(&out).with_context(|| format!("`aiguard bans --json` printed {out}"))
}

#[derive(Serialize, Clone, Debug, PartialEq)]
struct Round {
    /// The round's number: the third octet of its addresses.
    round: u8,
    /// First request sent to the start of the first attempt not answered.
    to_first_drop_ms: f64,
    /// Attempts answered 401 before it.
    answered_401: usize,
    /// Median of those attempts' round trips (connect to the end of the answer).
    round_trip_ms: f64,
    /// The slowest of them.
    round_trip_max_ms: f64,
    /// The start of the request that fired the detector (the one with the 11th distinct key)
    /// to the start of the first attempt not answered: the responder's time to ban, to within
    /// one round trip.
    fire_to_drop_ms: f64,
    /// Offenses the ban's reason counts: the findings acted on by the time it was listed.
    offenses: u32,
    /// Packets the ban had dropped when listed: the SYN that timed out and, as a rule, closing
    /// packets (FIN, ACK) of the last connections answered before it.
    ban_hits: u64,
    /// The first packet dropped was the request after a completed handshake, not a SYN.
    cut_mid_request: bool,
    /// What the bystander was answered after the ban.
    bystander_status: u16,
}

/// One round: fresh namespaces and daemon, the attack, the checks, the teardown.
fn one_round(binary: &Path, bench_dir: &Path, round: u8, drop_timeout: Duration) -> Result<Round> {
    let (server_addrs, client_addrs) = addresses(round);
    let pair = VethPair::with_addresses(&client_addrs, &server_addrs)?;
    let work = WorkDir::create(bench_dir)?;
    for (ns, neighbours, mac, dev) in [
        (&pair.rx, &client_addrs, TX_MAC, RX_IF),
        (&pair.tx, &server_addrs, RX_MAC, TX_IF),
    ] {
        let batch = work.0.join(format!("neighbours-{}", ns.name()));
        fs::write(&batch, neighbour_batch(neighbours, &netns::mac(mac), dev))?;
        ns.ip(&["-batch", &batch.to_string_lossy()])?;
    }
    let rx = pair.rx.open()?;
    let tx = pair.tx.open()?;
    let pins = PinDir::create()?;
    let config = work.0.join("aiguard.toml");
    fs::write(&config, config_toml())?;
    let mut daemon = Daemon::start(binary, &rx, &work.0, &config, &pins)?;
    let result = attack_and_check(binary, &mut daemon, &tx, round, drop_timeout);
    let stopped = daemon.stop();
    // The daemon is gone: its pins can go, then the namespaces (in that order, by drop).
    drop(pins);
    let round = result?;
    stopped?;
    Ok(round)
}

fn attack_and_check(
    binary: &Path,
    daemon: &mut Daemon,
    tx: &fs::File,
    round: u8,
    drop_timeout: Duration,
) -> Result<Round> {
    let bystander = addr(BYSTANDER_NET, round, BYSTANDER_HOST);
    let bystander_gateway = SocketAddrV4::new(addr(BYSTANDER_NET, round, 1), GATEWAY_PORT);
    let bystander_request = chat_request(bystander_gateway, None);
    let bystander_asks = || {
        in_netns(tx, || {
            attempt(
                bystander,
                bystander_gateway,
                &bystander_request,
                BYSTANDER_TIMEOUT,
            )
        })
    };

    // The gateway answers before the attack starts, so its start is not in the figure.
    let deadline = Instant::now() + SERVING_TIMEOUT;
    loop {
        daemon.ensure_running()?;
        match bystander_asks() {
            Ok(Outcome::Answered(401)) => break,
            Ok(Outcome::Answered(status)) => {
                bail!("a request without a key was answered {status}, not 401")
            }
            outcome if Instant::now() > deadline => {
                bail!("the gateway did not answer within {SERVING_TIMEOUT:?}: {outcome:?}")
            }
            _ => thread::sleep(POLL),
        }
    }

    let attack = in_netns(tx, || attack(round, drop_timeout))?;
    daemon.ensure_running()?;
    let answered = attack.answered_at.len();
    ensure!(
        answered > DISTINCT_INVALID_KEYS,
        "only {answered} attempts were answered before the first drop: the detector cannot have \
         fired before the {}th distinct key",
        DISTINCT_INVALID_KEYS + 1
    );

    let range = format!("{}/24", addr(BOTNET_NET, round, 0));
    let bans = listed_bans(binary, &daemon.socket)?;
    let ban = bans
        .iter()
        .find(|b| b.range == range)
        .with_context(|| format!("the attack was dropped, but {range} is not banned: {bans:?}"))?;
    ensure!(
        ban.origin == "detector",
        "{range} was banned by {}",
        ban.origin
    );
    let offenses = offense_of(&ban.reason)
        .with_context(|| format!("no offense count in the ban's reason {:?}", ban.reason))?;
    ensure!(
        ban.hits > 0,
        "an attempt went unanswered, but the ban of {range} has dropped nothing"
    );

    // The bystander's /24 was never attacked: it must still be served.
    let bystander_status = match bystander_asks()? {
        Outcome::Answered(status) => status,
        outcome => bail!("the bystander {bystander} was not served after the ban: {outcome:?}"),
    };
    ensure!(
        bystander_status == 401,
        "the bystander's request without a key was answered {bystander_status}, not 401"
    );

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(Round {
        round,
        to_first_drop_ms: ms(attack.to_first_drop),
        answered_401: answered,
        round_trip_ms: median(&attack.round_trips_ms),
        round_trip_max_ms: percentile(&attack.round_trips_ms, 100.0),
        fire_to_drop_ms: ms(attack.to_first_drop - attack.answered_at[DISTINCT_INVALID_KEYS]),
        offenses,
        ban_hits: ban.hits,
        cut_mid_request: attack.stalled,
        bystander_status,
    })
}

/// The daemon's configuration: the gateway, an upstream nothing reaches, and the
/// credential-stuffing detector enforcing at 10 distinct invalid keys.
fn config_toml() -> String {
    format!(
        "# Written by `cargo xtask bench detect`.
[gateway]
listen = [\"0.0.0.0:{GATEWAY_PORT}\"]
# Never reached: every attack request fails authentication first.
upstreams = [\"http://127.0.0.1:9\"]
default_tier = \"free\"

# The default tier must be one the file defines; no limit matters here.
[tiers.free]

[detect]
distinct_invalid_keys = {DISTINCT_INVALID_KEYS}
ban_ttls = [\"1h\"]

[detect.credential_stuffing]
shadow = false
"
    )
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "?".into(), |s| s.trim().to_owned())
}

/// The filesystem `path` (absolute, canonical) is on, from `/proc/mounts`' text: "TYPE on
/// MOUNT POINT (DEVICE)". The responder records each offense in the daemon's state before it
/// bans, so the disk under the state directory is part of the figure.
fn filesystem_of(mounts: &str, path: &Path) -> Option<String> {
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (device, at, kind) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(at).then_some((device, at, kind))
        })
        // The last of the longest: a later mount on the same point hides the earlier.
        .max_by_key(|(_, at, _)| Path::new(at).components().count())
        .map(|(device, at, kind)| format!("{kind} on {at} ({device})"))
}

#[derive(Serialize, Clone, Copy, Debug, PartialEq)]
struct Summary {
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
    /// From [`P90_ROUNDS`] rounds on.
    p90_ms: Option<f64>,
}

impl Summary {
    fn of(values: &[f64]) -> Self {
        Self {
            median_ms: median(values),
            min_ms: values.iter().copied().fold(f64::NAN, f64::min),
            max_ms: values.iter().copied().fold(f64::NAN, f64::max),
            p90_ms: (values.len() >= P90_ROUNDS).then(|| percentile(values, 90.0)),
        }
    }
}

#[derive(Serialize, Debug)]
struct Report {
    command: String,
    kernel: String,
    cpus: usize,
    /// The filesystem of the daemon's state directory.
    state_fs: String,
    botnet: u8,
    distinct_invalid_keys: usize,
    drop_timeout_ms: u64,
    rounds: Vec<Round>,
    /// First request to first drop, over rounds.
    to_first_drop: Summary,
    /// Median over rounds of each round's figures.
    median_answered_401: f64,
    median_round_trip_ms: f64,
    median_round_trip_max_ms: f64,
    median_fire_to_drop_ms: f64,
    median_offenses: f64,
}

impl Report {
    fn new(args: &DetectBenchArgs, kernel: String, state_fs: String, rounds: Vec<Round>) -> Self {
        let m = |f: fn(&Round) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
        Self {
            command: command_line(),
            kernel,
            state_fs,
            cpus: thread::available_parallelism().map_or(0, |n| n.get()),
            botnet: BOTNET,
            distinct_invalid_keys: DISTINCT_INVALID_KEYS,
            drop_timeout_ms: args.drop_timeout_ms,
            to_first_drop: Summary::of(
                &rounds
                    .iter()
                    .map(|r| r.to_first_drop_ms)
                    .collect::<Vec<_>>(),
            ),
            median_answered_401: m(|r| r.answered_401 as f64),
            median_round_trip_ms: m(|r| r.round_trip_ms),
            median_round_trip_max_ms: m(|r| r.round_trip_max_ms),
            median_fire_to_drop_ms: m(|r| r.fire_to_drop_ms),
            median_offenses: m(|r| f64::from(r.offenses)),
            rounds,
        }
    }

    fn markdown(&self) -> String {
        let s = &self.to_first_drop;
        let mut out = format!(
            "\n### Credential stuffing: first request to first packet dropped at the NIC\n\n\
             `{}`; kernel {}; {} CPUs; {} rounds, each with a fresh daemon and namespaces; the \
             daemon's state (where the responder records each offense before it bans) on {}.\n\n",
            self.command,
            self.kernel,
            self.cpus,
            self.rounds.len(),
            self.state_fs
        );
        out += &format!(
            "A botnet of {} addresses in one /24 sends `POST {CHAT_PATH}`, one address after \
             the other (round again if all are answered), each request with a distinct invalid \
             key; the detector bans the /24 at the NIC once it has seen \
             more than {} distinct invalid keys. Measured: from sending the first request to \
             starting the first attempt whose connect timed out ({} ms), i.e. whose SYN was the \
             first packet dropped. The attack is sequential (one request at a time, as a \
             low-and-slow botnet's requests would arrive), so the time is dominated by {} \
             request round trips plus the responder's ban; 401s beyond {} are requests answered \
             while the responder was banning. \"Detector fired to first drop\" runs from the \
             start of the request that fired the detector to the start of the first dropped \
             attempt: the ban reached the kernel between the attempt before that one and it, \
             so this is the responder's time to ban to within one round trip. Offenses are the \
             detector's findings acted on by the end (it fires again on every {} further \
             distinct keys, and each bans the range again). The packets the ban dropped are the \
             SYN that timed out and closing packets of the last connections answered before \
             it. The bystander, in another /24, is asked again after the ban.\n\n",
            self.botnet,
            self.distinct_invalid_keys,
            self.drop_timeout_ms,
            self.distinct_invalid_keys + 1,
            self.distinct_invalid_keys + 1,
            self.distinct_invalid_keys + 1,
        );
        out += "| round | first request to first drop | answered 401 \
                | 401 round trip, median / max | detector fired to first drop | offenses \
                | packets the ban dropped | bystander after the ban |\n";
        out += "|---:|---:|---:|---:|---:|---:|---:|---|\n";
        for r in &self.rounds {
            let cut = if r.cut_mid_request {
                " (request cut after its handshake)"
            } else {
                ""
            };
            out += &format!(
                "| {} | {:.1} ms{cut} | {} | {:.2} / {:.2} ms | {:.1} ms | {} | {} \
                 | answered {} |\n",
                r.round,
                r.to_first_drop_ms,
                r.answered_401,
                r.round_trip_ms,
                r.round_trip_max_ms,
                r.fire_to_drop_ms,
                r.offenses,
                r.ban_hits,
                r.bystander_status,
            );
        }
        out += &format!(
            "| **median** | **{:.1} ms** | {} | {:.2} / {:.2} ms | {:.1} ms | {} \
             | | |\n\n",
            s.median_ms,
            self.median_answered_401,
            self.median_round_trip_ms,
            self.median_round_trip_max_ms,
            self.median_fire_to_drop_ms,
            self.median_offenses,
        );
        out += &format!(
            "First request to first drop: median {:.1} ms, min {:.1} ms, max {:.1} ms",
            s.median_ms, s.min_ms, s.max_ms
        );
        out += &match s.p90_ms {
            Some(p90) => format!(", p90 {p90:.1} ms.\n"),
            None => format!(" (p90 from {P90_ROUNDS} rounds on).\n"),
        };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_keys_have_the_shape_and_never_repeat() {
        let mut seen = std::collections::HashSet::new();
        for round in 1..=200 {
            for attempt in 0..200 {
                let key = invalid_key(round, attempt);
                let hex = key.strip_prefix("aig_").expect("the key prefix");
                assert_eq!(hex.len(), 48, "{key}");
                assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()), "{key}");
                assert!(seen.insert(key));
            }
        }
        assert_eq!(invalid_key(3, 7), invalid_key(3, 7));
    }

    #[test]
    fn addresses_put_the_botnet_and_the_bystander_in_separate_24s() {
        let (server, client) = addresses(4);
        assert_eq!(server, ["10.247.4.1/24", "10.248.4.1/24"]);
        assert_eq!(client.len(), 51);
        assert_eq!(client[0], "10.247.4.10/24");
        assert_eq!(client[49], "10.247.4.59/24");
        assert_eq!(client[50], "10.248.4.2/24");
    }

    #[test]
    fn neighbours_are_permanent() {
        let batch = neighbour_batch(
            &["10.247.1.10/24".into(), "10.248.1.2/24".into()],
            "02:00:0a:4d:01:02",
            "agrx",
        );
        assert_eq!(
            batch,
            "neigh replace 10.247.1.10 lladdr 02:00:0a:4d:01:02 dev agrx nud permanent\n\
             neigh replace 10.248.1.2 lladdr 02:00:0a:4d:01:02 dev agrx nud permanent\n"
        );
    }

    #[test]
    fn requests_carry_the_key_and_a_correct_length() {
        let gateway = SocketAddrV4::new(Ipv4Addr::new(10, 247, 1, 1), GATEWAY_PORT);
        let with = chat_request(gateway, Some("aig_00"));
        assert!(
            with.starts_with("POST /v1/chat/completions HTTP/1.1\r\nHost: 10.247.1.1:18080\r\n")
        );
        assert!(with.contains("\r\nAuthorization: Bearer aig_00\r\n"));
        let (head, body) = with.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(head.ends_with("Connection: close"));
        assert!(!chat_request(gateway, None).contains("Authorization"));
    }

    #[test]
    fn reads_the_status_line() {
        assert_eq!(
            parse_status(b"HTTP/1.1 401 Unauthorized\r\nx: y\r\n\r\n"),
            Some(401)
        );
        assert_eq!(parse_status(b"HTTP/1.0 200 OK\r\n\r\n"), Some(200));
        assert_eq!(parse_status(b"SSH-2.0\r\n"), None);
        assert_eq!(parse_status(b""), None);
    }

    #[test]
    fn reads_the_offense_count() {
        let reason = "credential_stuffing (offense 3): 11 authentication failures (threshold 30)";
        assert_eq!(offense_of(reason), Some(3));
        assert_eq!(offense_of("manual"), None);
        assert_eq!(offense_of("x (offense two)"), None);
    }

    #[test]
    fn config_enforces_credential_stuffing_only() {
        let toml = config_toml();
        assert!(toml.contains("listen = [\"0.0.0.0:18080\"]\n"));
        assert!(toml.contains("default_tier = \"free\"\n"));
        assert!(toml.contains("\n[tiers.free]\n"));
        assert!(toml.contains("[detect]\ndistinct_invalid_keys = 10\nban_ttls = [\"1h\"]\n"));
        assert!(toml.contains("[detect.credential_stuffing]\nshadow = false\n"));
    }

    fn round(n: u8, to_first_drop_ms: f64) -> Round {
        Round {
            round: n,
            to_first_drop_ms,
            answered_401: 11,
            round_trip_ms: 0.9,
            round_trip_max_ms: 2.5,
            fire_to_drop_ms: 1.0,
            offenses: 1,
            ban_hits: 1,
            cut_mid_request: false,
            bystander_status: 401,
        }
    }

    fn args(rounds: usize) -> DetectBenchArgs {
        DetectBenchArgs {
            rounds,
            drop_timeout_ms: 300,
            daemon: None,
        }
    }

    #[test]
    fn finds_the_filesystem_of_a_path() {
        let mounts = "/dev/vda / ext4 rw 0 0\nproc /proc proc rw 0 0\n\
                      tmpfs /work/t tmpfs rw 0 0\ntmpfs2 /work/t tmpfs rw 0 0\n";
        let of = |p: &str| filesystem_of(mounts, Path::new(p));
        assert_eq!(
            of("/work/target/bench").as_deref(),
            Some("ext4 on / (/dev/vda)")
        );
        assert_eq!(
            of("/work/t/bench").as_deref(),
            Some("tmpfs on /work/t (tmpfs2)")
        );
        // Whole components only.
        assert_eq!(of("/work/tt").as_deref(), Some("ext4 on / (/dev/vda)"));
        assert_eq!(filesystem_of("", Path::new("/x")), None);
    }

    #[test]
    fn summary_over_rounds() {
        let s = Summary::of(&[12.0, 10.0, 14.0]);
        assert_eq!(
            (s.median_ms, s.min_ms, s.max_ms, s.p90_ms),
            (12.0, 10.0, 14.0, None)
        );
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(Summary::of(&ten).p90_ms, Some(9.0));
    }

    #[test]
    fn report_has_a_row_per_round_and_the_median() {
        let mut rounds = vec![round(1, 12.04), round(2, 10.0), round(3, 14.0)];
        rounds[1].cut_mid_request = true;
        let report = Report::new(
            &args(3),
            "6.1.0".into(),
            "ext4 on / (/dev/vda)".into(),
            rounds,
        );
        let md = report.markdown();
        assert!(md.contains("kernel 6.1.0;"), "{md}");
        assert!(
            md.contains("before it bans) on ext4 on / (/dev/vda)."),
            "{md}"
        );
        assert!(md.contains("3 rounds"), "{md}");
        assert!(md.contains("The attack is sequential"), "{md}");
        assert!(
            md.contains("| 1 | 12.0 ms | 11 | 0.90 / 2.50 ms | 1.0 ms | 1 | 1 | answered 401 |\n"),
            "{md}"
        );
        assert!(
            md.contains("| 2 | 10.0 ms (request cut after its handshake) |"),
            "{md}"
        );
        assert!(
            md.contains("| **median** | **12.0 ms** | 11 | 0.90 / 2.50 ms | 1.0 ms | 1 | | |\n"),
            "{md}"
        );
        assert!(
            md.contains("median 12.0 ms, min 10.0 ms, max 14.0 ms (p90 from 10 rounds on).\n"),
            "{md}"
        );

        let many: Vec<Round> = (1..=10).map(|n| round(n, f64::from(n))).collect();
        let md = Report::new(
            &args(10),
            "6.1.0".into(),
            "ext4 on / (/dev/vda)".into(),
            many,
        )
        .markdown();
        assert!(md.contains("max 10.0 ms, p90 9.0 ms.\n"), "{md}");
    }

    #[test]
    fn json_names_the_figures() {
        let report = Report::new(
            &args(1),
            "6.1.0".into(),
            "ext4 on / (/dev/vda)".into(),
            vec![round(1, 12.0)],
        );
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["to_first_drop"]["median_ms"], 12.0);
        assert!(json["to_first_drop"]["p90_ms"].is_null());
        assert_eq!(json["rounds"][0]["answered_401"], 11);
        assert_eq!(json["distinct_invalid_keys"], 10);
    }
}
