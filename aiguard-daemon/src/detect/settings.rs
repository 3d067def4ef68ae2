//! `[detect]`: which detectors run, their thresholds and windows, what each does when it
//! fires, and whether it only logs (shadow mode, the default: an operator watches what a
//! detector would do before letting it act).
use std::time::Duration;

use ipnetwork::IpNetwork;
use serde::Deserialize;

use crate::config::{ConfigError, invalid};

/// What a detector does to what it caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Log and count only.
    Log,
    /// Ban the source prefix at the NIC, for the escalating TTLs of `detect.ban_ttls`.
    Ban,
    /// Require a proof of work from the source prefix for `detect.challenge.challenge_for`.
    Challenge,
    /// Suspend the key for `suspend_for` (key detectors only).
    Suspend,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Log => "log",
            Action::Ban => "ban",
            Action::Challenge => "challenge",
            Action::Suspend => "suspend",
        }
    }
}

/// One detector's threshold, window and action, as the detectors use them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rule {
    pub enabled: bool,
    /// Log and count what it would do, and do nothing.
    pub shadow: bool,
    pub window: Duration,
    /// The count (failures, prefixes, keys) above which it fires, within `window`.
    pub threshold: u64,
    /// Error storms and rate spikes: least requests in the window before it may fire.
    pub min_requests: u64,
    /// Error storms: share of 4xx answers above which it fires.
    pub ratio: f64,
    /// Rate spikes: how many times the key's baseline rate.
    pub factor: f64,
    /// Rate spikes: how long the baseline averages over.
    pub baseline: Duration,
    pub action: Action,
    /// Suspensions: how long.
    pub suspend_for: Duration,
}

/// `[detect.<detector>]` as written: every field optional, over the detector's defaults.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuleConfig {
    pub enabled: Option<bool>,
    pub shadow: Option<bool>,
    #[serde(with = "humantime_serde")]
    pub window: Option<Duration>,
    pub threshold: Option<u64>,
    pub min_requests: Option<u64>,
    pub ratio: Option<f64>,
    pub factor: Option<f64>,
    #[serde(with = "humantime_serde")]
    pub baseline: Option<Duration>,
    pub action: Option<Action>,
    #[serde(with = "humantime_serde")]
    pub suspend_for: Option<Duration>,
}

impl RuleConfig {
    fn over(&self, d: Rule) -> Rule {
        Rule {
            enabled: self.enabled.unwrap_or(d.enabled),
            shadow: self.shadow.unwrap_or(d.shadow),
            window: self.window.unwrap_or(d.window),
            threshold: self.threshold.unwrap_or(d.threshold),
            min_requests: self.min_requests.unwrap_or(d.min_requests),
            ratio: self.ratio.unwrap_or(d.ratio),
            factor: self.factor.unwrap_or(d.factor),
            baseline: self.baseline.unwrap_or(d.baseline),
            action: self.action.unwrap_or(d.action),
            suspend_for: self.suspend_for.unwrap_or(d.suspend_for),
        }
    }
}

/// The detectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Detector {
    /// Authentication failures, or distinct invalid keys, per source prefix.
    CredentialStuffing,
    /// 4xx answers' share per source prefix.
    ErrorStorm,
    /// One key used from many prefixes: leaked or shared.
    KeySharing,
    /// Many keys used from one prefix.
    KeySpraying,
    /// A key's request rate far above its own baseline.
    RateSpike,
}

impl Detector {
    pub const ALL: [Detector; 5] = [
        Detector::CredentialStuffing,
        Detector::ErrorStorm,
        Detector::KeySharing,
        Detector::KeySpraying,
        Detector::RateSpike,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Detector::CredentialStuffing => "credential_stuffing",
            Detector::ErrorStorm => "error_storm",
            Detector::KeySharing => "key_sharing",
            Detector::KeySpraying => "key_spraying",
            Detector::RateSpike => "rate_spike",
        }
    }

    /// What it acts on: a source prefix, or a key.
    pub fn watches_keys(self) -> bool {
        matches!(self, Detector::KeySharing | Detector::RateSpike)
    }

    fn default_rule(self) -> Rule {
        let base = Rule {
            enabled: true,
            shadow: true,
            window: MIN,
            threshold: 0,
            min_requests: 0,
            ratio: 0.0,
            factor: 0.0,
            baseline: 60 * MIN,
            action: Action::Log,
            suspend_for: 60 * MIN,
        };
        match self {
            Detector::CredentialStuffing => Rule {
                threshold: 120,
                action: Action::Ban,
                ..base
            },
            Detector::ErrorStorm => Rule {
                min_requests: 50,
                ratio: 0.8,
                action: Action::Challenge,
                ..base
            },
            Detector::KeySharing => Rule {
                window: 10 * MIN,
                threshold: 20,
                action: Action::Suspend,
                ..base
            },
            Detector::KeySpraying => Rule {
                window: 10 * MIN,
                threshold: 20,
                action: Action::Ban,
                ..base
            },
            Detector::RateSpike => Rule {
                min_requests: 120,
                factor: 10.0,
                action: Action::Suspend,
                suspend_for: 15 * MIN,
                ..base
            },
        }
    }

    fn actions(self) -> &'static [Action] {
        if self.watches_keys() {
            &[Action::Log, Action::Suspend]
        } else {
            &[Action::Log, Action::Ban, Action::Challenge]
        }
    }
}

/// The proof-of-work challenge.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChallengeConfig {
    /// Leading zero bits of SHA-256 a proof needs (18: about 260,000 hashes, a fraction of a
    /// second for a client, hours for a botnet's millions of requests).
    pub difficulty: u8,
    /// How long a token may be solved and used.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
    /// How long a source prefix stays challenged once a detector says so.
    #[serde(with = "humantime_serde")]
    pub challenge_for: Duration,
}

impl Default for ChallengeConfig {
    fn default() -> Self {
        Self {
            difficulty: 18,
            token_ttl: Duration::from_secs(300),
            challenge_for: Duration::from_secs(3600),
        }
    }
}

/// `[detect]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectSettings {
    /// Run the detectors at all (each also has its own `enabled` and `shadow`).
    pub enabled: bool,
    /// Prefix length IPv4 sources are grouped by.
    pub ipv4_prefix: u8,
    /// Prefix lengths IPv6 sources are grouped by (each is counted apart; the longest that
    /// fires is acted on).
    pub ipv6_prefixes: Vec<u8>,
    /// Never banned, challenged or counted (the NIC allowlist is honoured too).
    pub allowlist: Vec<IpNetwork>,
    /// TTL of a prefix's first ban, second, third...; the last repeats.
    #[serde(deserialize_with = "durations")]
    pub ban_ttls: Vec<Duration>,
    /// How long an offense counts towards the next ban's TTL.
    #[serde(with = "humantime_serde")]
    pub offense_memory: Duration,
    /// Authentication failures per prefix above `threshold` within the window (and more than
    /// half of the prefix's answers, so that a busy network's typos do not count).
    pub credential_stuffing: RuleConfig,
    /// Distinct invalid keys per prefix, within the credential-stuffing window, above which
    /// credential stuffing fires too.
    pub distinct_invalid_keys: u64,
    /// 4xx answers' share per prefix above `ratio` (after `min_requests`).
    pub error_storm: RuleConfig,
    /// One key used from more than `threshold` prefixes: leaked or shared.
    pub key_sharing: RuleConfig,
    /// More than `threshold` keys used from one prefix.
    pub key_spraying: RuleConfig,
    /// A key's requests in the window above `factor` times its baseline (after
    /// `min_requests`).
    pub rate_spike: RuleConfig,
    pub challenge: ChallengeConfig,
    /// Prompt-injection rules over each request's messages.
    pub prompt_rules: Vec<super::prompt::PromptRuleSettings>,
    /// Most sources and keys tracked at once; beyond it the idlest are forgotten.
    pub max_tracked: usize,
}

const MIN: Duration = Duration::from_secs(60);

impl Default for DetectSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            ipv4_prefix: 24,
            ipv6_prefixes: vec![64, 48],
            allowlist: Vec::new(),
            ban_ttls: vec![10 * MIN, 60 * MIN, 24 * 60 * MIN],
            offense_memory: 7 * 24 * 60 * MIN,
            credential_stuffing: RuleConfig::default(),
            distinct_invalid_keys: 20,
            error_storm: RuleConfig::default(),
            key_sharing: RuleConfig::default(),
            key_spraying: RuleConfig::default(),
            rate_spike: RuleConfig::default(),
            challenge: ChallengeConfig::default(),
            prompt_rules: Vec::new(),
            max_tracked: 100_000,
        }
    }
}

/// `["10m", "1h"]` as durations.
fn durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    let texts: Vec<String> = Vec::deserialize(d)?;
    texts
        .iter()
        .map(|t| {
            humantime::parse_duration(t)
                .map_err(|e| serde::de::Error::custom(format!("{t:?}: {e}")))
        })
        .collect()
}

impl DetectSettings {
    /// A detector's rule: what the file says over the detector's defaults.
    pub fn rule(&self, d: Detector) -> Rule {
        let written = match d {
            Detector::CredentialStuffing => &self.credential_stuffing,
            Detector::ErrorStorm => &self.error_storm,
            Detector::KeySharing => &self.key_sharing,
            Detector::KeySpraying => &self.key_spraying,
            Detector::RateSpike => &self.rate_spike,
        };
        written.over(d.default_rule())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(8..=32).contains(&self.ipv4_prefix) {
            return Err(invalid(
                "detect.ipv4_prefix",
                self.ipv4_prefix,
                "a prefix length from 8 to 32",
            ));
        }
        if self.ipv6_prefixes.is_empty()
            || self.ipv6_prefixes.iter().any(|p| !(16..=128).contains(p))
        {
            return Err(invalid(
                "detect.ipv6_prefixes",
                format!("{:?}", self.ipv6_prefixes),
                "one or more prefix lengths from 16 to 128, e.g. [64, 48]",
            ));
        }
        if self.ban_ttls.is_empty()
            || self
                .ban_ttls
                .iter()
                .any(|t| *t < Duration::from_secs(1) || *t > Duration::from_secs(366 * 86_400))
        {
            return Err(invalid(
                "detect.ban_ttls",
                format!("{:?}", self.ban_ttls),
                "one or more TTLs from 1s to 366d, shortest first, e.g. [\"10m\", \"1h\", \"24h\"]",
            ));
        }
        if self.offense_memory.is_zero() {
            return Err(invalid(
                "detect.offense_memory",
                "0s",
                "a duration above zero, e.g. \"7d\"",
            ));
        }
        if !(1_000..=10_000_000).contains(&self.max_tracked) {
            return Err(invalid(
                "detect.max_tracked",
                self.max_tracked,
                "from 1000 to 10000000",
            ));
        }
        if self.distinct_invalid_keys == 0 {
            return Err(invalid(
                "detect.distinct_invalid_keys",
                0,
                "at least 1 distinct key",
            ));
        }
        for d in Detector::ALL {
            self.rule(d).validate(d)?;
        }
        let c = &self.challenge;
        if !(1..=32).contains(&c.difficulty) {
            return Err(invalid(
                "detect.challenge.difficulty",
                c.difficulty,
                "leading zero bits from 1 to 32 (18 takes a client a fraction of a second)",
            ));
        }
        if c.token_ttl < Duration::from_secs(1) || c.token_ttl > Duration::from_secs(3600) {
            return Err(invalid(
                "detect.challenge.token_ttl",
                humantime::format_duration(c.token_ttl),
                "a duration from 1s to 1h",
            ));
        }
        if c.challenge_for < Duration::from_secs(1) {
            return Err(invalid(
                "detect.challenge.challenge_for",
                humantime::format_duration(c.challenge_for),
                "at least 1s",
            ));
        }
        super::prompt::PromptRules::compile(&self.prompt_rules)?;
        Ok(())
    }
}

impl Rule {
    fn validate(&self, d: Detector) -> Result<(), ConfigError> {
        let at = format!("detect.{}", d.as_str());
        if self.window < Duration::from_secs(1) || self.window > Duration::from_secs(86_400) {
            return Err(invalid(
                format!("{at}.window"),
                humantime::format_duration(self.window),
                "a duration from 1s to 1d",
            ));
        }
        if !d.actions().contains(&self.action) {
            return Err(invalid(
                format!("{at}.action"),
                self.action.as_str(),
                &format!(
                    "one of {}",
                    d.actions()
                        .iter()
                        .map(|a| a.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        if self.suspend_for.is_zero() {
            return Err(invalid(
                format!("{at}.suspend_for"),
                "0s",
                "how long a key stays suspended, e.g. \"1h\"",
            ));
        }
        match d {
            Detector::CredentialStuffing | Detector::KeySharing | Detector::KeySpraying
                if self.threshold == 0 =>
            {
                Err(invalid(format!("{at}.threshold"), 0, "at least 1"))
            }
            Detector::ErrorStorm if !(self.ratio > 0.0 && self.ratio <= 1.0) => Err(invalid(
                format!("{at}.ratio"),
                self.ratio,
                "a share of 4xx answers above 0 and at most 1, e.g. 0.8",
            )),
            Detector::RateSpike if !(self.factor.is_finite() && self.factor > 1.0) => Err(invalid(
                format!("{at}.factor"),
                self.factor,
                "how many times the key's baseline rate, above 1, e.g. 10",
            )),
            Detector::RateSpike if self.baseline <= self.window => Err(invalid(
                format!("{at}.baseline"),
                humantime::format_duration(self.baseline),
                "a duration longer than the window, e.g. \"1h\"",
            )),
            Detector::ErrorStorm | Detector::RateSpike if self.min_requests == 0 => Err(invalid(
                format!("{at}.min_requests"),
                0,
                "at least 1 request",
            )),
            _ => Ok(()),
        }
    }
}
