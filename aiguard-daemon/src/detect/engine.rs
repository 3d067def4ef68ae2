//! The detectors' state and what the gateway tells them: authentication failures, answers,
//! and which key came from where. Every call is a lock and a few hash lookups (it runs on
//! each request). A detector that fires hands a [`Finding`] to the responder
//! ([`super::respond`]) and starts counting that subject afresh: the next finding needs new
//! evidence (a banned prefix sends nothing until its ban ends; a repeat offense then counts
//! from zero and earns the next TTL).
use std::{
    hash::BuildHasher as _,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use ipnetwork::IpNetwork;
use rustc_hash::{FxBuildHasher, FxHashMap};
use tokio::sync::mpsc;

use super::{
    settings::{Action, DetectSettings, Detector, Rule},
    windows::{RecentSet, SlidingCount},
};

/// What a finding is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    Prefix(IpNetwork),
    Key { id: Arc<str>, tenant: Arc<str> },
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Prefix(p) => write!(f, "{p}"),
            Subject::Key { id, tenant } => write!(f, "key {id} (tenant {tenant})"),
        }
    }
}

/// A detector fired.
#[derive(Debug, Clone)]
pub struct Finding {
    pub detector: Detector,
    pub subject: Subject,
    pub action: Action,
    pub shadow: bool,
    /// What it saw, for the log: counts against thresholds.
    pub evidence: String,
    pub at_ms: u64,
}

#[derive(Default)]
struct PrefixState {
    failures: SlidingCount,
    /// Every answer, in the credential-stuffing window: failures count only as most of them.
    answers: SlidingCount,
    invalid_keys: RecentSet,
    requests: SlidingCount,
    errors: SlidingCount,
    keys: RecentSet,
    last_seen_ms: u64,
}

#[derive(Default)]
struct KeyState {
    tenant: Option<Arc<str>>,
    prefixes: RecentSet,
    rate: SlidingCount,
    /// Requests per window, averaged over the baseline (exponentially weighted).
    baseline: f64,
    first_seen_ms: u64,
    last_seen_ms: u64,
    /// Rate spikes: quiet until (the baseline is kept, so the spike would fire on every
    /// request of the window otherwise).
    spike_quiet_until_ms: u64,
}

struct State {
    prefixes: FxHashMap<IpNetwork, PrefixState>,
    keys: FxHashMap<Arc<str>, KeyState>,
    /// Prefixes that must show a proof of work, and until when.
    challenged: FxHashMap<IpNetwork, u64>,
}

/// The detectors' configuration, resolved once per (re)load.
#[derive(Debug, Clone)]
pub struct Tuning {
    pub enabled: bool,
    pub ipv4_prefix: u8,
    pub ipv6_prefixes: Vec<u8>,
    pub allowlist: Vec<IpNetwork>,
    pub distinct_invalid_keys: u64,
    pub max_tracked: usize,
    rules: FxHashMap<Detector, Rule>,
}

impl Tuning {
    pub fn new(s: &DetectSettings) -> Self {
        Self {
            enabled: s.enabled,
            ipv4_prefix: s.ipv4_prefix,
            ipv6_prefixes: s.ipv6_prefixes.clone(),
            allowlist: s.allowlist.clone(),
            distinct_invalid_keys: s.distinct_invalid_keys,
            max_tracked: s.max_tracked,
            rules: Detector::ALL.into_iter().map(|d| (d, s.rule(d))).collect(),
        }
    }

    pub fn rule(&self, d: Detector) -> Rule {
        self.rules[&d]
    }

    /// The prefixes `ip` is counted under (one for IPv4, one per IPv6 length).
    fn prefixes(&self, ip: IpAddr) -> impl Iterator<Item = IpNetwork> + '_ {
        let lens: &[u8] = match ip {
            IpAddr::V4(_) => std::slice::from_ref(&self.ipv4_prefix),
            IpAddr::V6(_) => &self.ipv6_prefixes,
        };
        lens.iter().filter_map(move |&len| {
            IpNetwork::new(ip, len)
                .ok()
                .and_then(|n| IpNetwork::new(n.network(), len).ok())
        })
    }

    fn allowlisted(&self, ip: IpAddr) -> bool {
        self.allowlist.iter().any(|n| n.contains(ip))
    }
}

/// The detectors: one per gateway.
pub struct Engine {
    state: Mutex<State>,
    tuning: std::sync::RwLock<Arc<Tuning>>,
    findings: mpsc::Sender<Finding>,
    /// Findings dropped because the responder fell behind.
    pub dropped: std::sync::atomic::AtomicU64,
}

/// Share of a prefix's answers that must be authentication failures before their count alone
/// makes credential stuffing (distinct invalid keys need no share).
const STUFFING_SHARE: f64 = 0.5;

/// Findings waiting for the responder at most.
pub const FINDINGS_QUEUE: usize = 1024;

fn hash_of(x: impl std::hash::Hash) -> u64 {
    FxBuildHasher.hash_one(x)
}

impl Engine {
    pub fn new(settings: &DetectSettings) -> (Arc<Self>, mpsc::Receiver<Finding>) {
        let (tx, rx) = mpsc::channel(FINDINGS_QUEUE);
        let engine = Arc::new(Self {
            state: Mutex::new(State {
                prefixes: FxHashMap::default(),
                keys: FxHashMap::default(),
                challenged: FxHashMap::default(),
            }),
            tuning: std::sync::RwLock::new(Arc::new(Tuning::new(settings))),
            findings: tx,
            dropped: Default::default(),
        });
        (engine, rx)
    }

    pub fn configure(&self, settings: &DetectSettings) {
        *self.tuning.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Tuning::new(settings));
    }

    pub fn tuning(&self) -> Arc<Tuning> {
        self.tuning
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fire(&self, finding: Finding) {
        if self.findings.try_send(finding).is_err() {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A request with no valid key: `presented` is what it sent (None: no key at all).
    pub fn auth_failure(&self, ip: IpAddr, presented: Option<&str>, now_ms: u64) {
        let t = self.tuning();
        let rule = t.rule(Detector::CredentialStuffing);
        if !t.enabled || !rule.enabled || t.allowlisted(ip) {
            return;
        }
        let window = rule.window.as_millis() as u64;
        let cap = (t.distinct_invalid_keys as usize).saturating_add(1);
        let mut st = self.lock();
        for prefix in t.prefixes(ip) {
            let p = prefix_state(&mut st, &t, prefix, now_ms);
            let failures = p.failures.add(now_ms, window, 1);
            let distinct =
                presented.map_or(0, |k| p.invalid_keys.note(hash_of(k), now_ms, window, cap));
            // A busy network's typos are many failures but few of its answers.
            let answers = p.answers.estimate(now_ms, window) + 1.0;
            let over_failures =
                failures > rule.threshold as f64 && failures / answers > STUFFING_SHARE;
            let over_keys = distinct as u64 > t.distinct_invalid_keys;
            if over_failures || over_keys {
                p.failures = SlidingCount::default();
                p.answers = SlidingCount::default();
                p.invalid_keys = RecentSet::default();
                self.fire(Finding {
                    detector: Detector::CredentialStuffing,
                    subject: Subject::Prefix(prefix),
                    action: rule.action,
                    shadow: rule.shadow,
                    evidence: format!(
                        "{failures:.0} authentication failures (threshold {}) and {distinct}{} distinct invalid keys (threshold {}) from {prefix} within {}",
                        rule.threshold,
                        if distinct >= cap { "+" } else { "" },
                        t.distinct_invalid_keys,
                        humantime::format_duration(rule.window)
                    ),
                    at_ms: now_ms,
                });
            }
        }
    }

    /// Any answer the gateway gave a source: error storms are 4xx shares per prefix.
    pub fn answered(&self, ip: IpAddr, status: u16, now_ms: u64) {
        let t = self.tuning();
        let rule = t.rule(Detector::ErrorStorm);
        let stuffing = t.rule(Detector::CredentialStuffing);
        if !t.enabled || !(rule.enabled || stuffing.enabled) || t.allowlisted(ip) {
            return;
        }
        let window = rule.window.as_millis() as u64;
        let stuffing_window = stuffing.window.as_millis() as u64;
        let error = (400..500).contains(&status);
        let mut st = self.lock();
        for prefix in t.prefixes(ip) {
            let p = prefix_state(&mut st, &t, prefix, now_ms);
            if stuffing.enabled {
                p.answers.add(now_ms, stuffing_window, 1);
            }
            if !rule.enabled {
                continue;
            }
            let requests = p.requests.add(now_ms, window, 1);
            let errors = p.errors.add(now_ms, window, u32::from(error));
            if error && requests >= rule.min_requests as f64 && errors / requests > rule.ratio {
                p.requests = SlidingCount::default();
                p.errors = SlidingCount::default();
                self.fire(Finding {
                    detector: Detector::ErrorStorm,
                    subject: Subject::Prefix(prefix),
                    action: rule.action,
                    shadow: rule.shadow,
                    evidence: format!(
                        "{errors:.0} of {requests:.0} answers to {prefix} were 4xx ({:.0}%, threshold {:.0}%) within {}",
                        100.0 * errors / requests,
                        100.0 * rule.ratio,
                        humantime::format_duration(rule.window)
                    ),
                    at_ms: now_ms,
                });
            }
        }
    }

    /// A request with a valid key: key sharing, key spraying and rate spikes.
    pub fn key_used(&self, ip: IpAddr, key: &Arc<str>, tenant: &Arc<str>, now_ms: u64) {
        let t = self.tuning();
        if !t.enabled || t.allowlisted(ip) {
            return;
        }
        let sharing = t.rule(Detector::KeySharing);
        let spraying = t.rule(Detector::KeySpraying);
        let spike = t.rule(Detector::RateSpike);
        let mut st = self.lock();
        if spraying.enabled {
            let window = spraying.window.as_millis() as u64;
            let cap = (spraying.threshold as usize).saturating_add(1);
            for prefix in t.prefixes(ip) {
                let p = prefix_state(&mut st, &t, prefix, now_ms);
                let keys = p.keys.note(hash_of(&**key), now_ms, window, cap);
                if keys as u64 > spraying.threshold {
                    p.keys = RecentSet::default();
                    self.fire(Finding {
                        detector: Detector::KeySpraying,
                        subject: Subject::Prefix(prefix),
                        action: spraying.action,
                        shadow: spraying.shadow,
                        evidence: format!(
                            "more than {} distinct valid keys used from {prefix} within {}",
                            spraying.threshold,
                            humantime::format_duration(spraying.window)
                        ),
                        at_ms: now_ms,
                    });
                }
            }
        }
        if !sharing.enabled && !spike.enabled {
            return;
        }
        // The length first: the lookup only matters when the table is full.
        if st.keys.len() >= t.max_tracked && !st.keys.contains_key(key) {
            forget_idlest_keys(&mut st, t.max_tracked / 10);
        }
        let k = st.keys.entry(key.clone()).or_default();
        if k.first_seen_ms == 0 {
            k.first_seen_ms = now_ms;
            k.tenant = Some(tenant.clone());
        }
        k.last_seen_ms = now_ms;
        let subject = || Subject::Key {
            id: key.clone(),
            tenant: tenant.clone(),
        };
        if sharing.enabled {
            let window = sharing.window.as_millis() as u64;
            let cap = (sharing.threshold as usize).saturating_add(1);
            // The shortest IPv6 prefix: one household's /64s are one prefix for this.
            let prefix = t.prefixes(ip).last();
            let prefixes = prefix.map_or(0, |p| k.prefixes.note(hash_of(p), now_ms, window, cap));
            if prefixes as u64 > sharing.threshold {
                k.prefixes = RecentSet::default();
                self.fire(Finding {
                    detector: Detector::KeySharing,
                    subject: subject(),
                    action: sharing.action,
                    shadow: sharing.shadow,
                    evidence: format!(
                        "used from more than {} source prefixes within {}",
                        sharing.threshold,
                        humantime::format_duration(sharing.window)
                    ),
                    at_ms: now_ms,
                });
            }
        }
        if spike.enabled {
            let window = spike.window.as_millis() as u64;
            if let Some(closed) = k.rate.closed_window(now_ms, window) {
                // Exponentially weighted over the baseline's span of windows.
                let alpha = (spike.window.as_secs_f64() / spike.baseline.as_secs_f64()).min(1.0);
                k.baseline += alpha * (f64::from(closed) - k.baseline);
            }
            let now_rate = k.rate.add(now_ms, window, 1);
            // A key needs a baseline's worth of history before its rate can be "far above" it.
            let known = now_ms.saturating_sub(k.first_seen_ms) >= spike.baseline.as_millis() as u64;
            let base = k.baseline.max(1.0);
            if known
                && now_rate >= spike.min_requests as f64
                && now_rate > spike.factor * base
                && k.spike_quiet_until_ms <= now_ms
            {
                k.spike_quiet_until_ms = now_ms + window;
                self.fire(Finding {
                    detector: Detector::RateSpike,
                    subject: subject(),
                    action: spike.action,
                    shadow: spike.shadow,
                    evidence: format!(
                        "{now_rate:.0} requests within {}, {:.1}x its baseline of {:.1} (threshold {}x)",
                        humantime::format_duration(spike.window),
                        now_rate / base,
                        k.baseline,
                        spike.factor
                    ),
                    at_ms: now_ms,
                });
            }
        }
    }

    /// Requires a proof of work from `prefix` until `until_ms`.
    pub fn challenge(&self, prefix: IpNetwork, until_ms: u64) {
        let mut st = self.lock();
        let e = st.challenged.entry(prefix).or_insert(0);
        *e = (*e).max(until_ms);
    }

    /// The challenged prefix `ip` is in, if any.
    pub fn challenged(&self, ip: IpAddr, now_ms: u64) -> Option<IpNetwork> {
        let st = self.lock();
        if st.challenged.is_empty() {
            return None;
        }
        st.challenged
            .iter()
            .filter(|(p, until)| **until > now_ms && p.contains(ip))
            .map(|(p, _)| *p)
            .max_by_key(|p| p.prefix())
    }

    /// Challenged prefixes now, with until when.
    pub fn challenges(&self, now_ms: u64) -> Vec<(IpNetwork, u64)> {
        let st = self.lock();
        let mut v: Vec<_> = st
            .challenged
            .iter()
            .filter(|(_, until)| **until > now_ms)
            .map(|(p, u)| (*p, *u))
            .collect();
        v.sort();
        v
    }

    /// Forgets sources and keys idle for longer than every window, and challenges that ended.
    pub fn sweep(&self, now_ms: u64) {
        let t = self.tuning();
        let longest = Detector::ALL
            .iter()
            .map(|d| {
                let r = t.rule(*d);
                r.window.max(if *d == Detector::RateSpike {
                    r.baseline
                } else {
                    r.window
                })
            })
            .max()
            .unwrap_or_default()
            .as_millis() as u64;
        let idle = now_ms.saturating_sub(2 * longest);
        let mut st = self.lock();
        st.prefixes.retain(|_, p| p.last_seen_ms > idle);
        st.keys.retain(|_, k| k.last_seen_ms > idle);
        st.challenged.retain(|_, until| *until > now_ms);
    }

    /// Sources and keys tracked now.
    pub fn tracked(&self) -> (usize, usize) {
        let st = self.lock();
        (st.prefixes.len(), st.keys.len())
    }
}

fn prefix_state<'a>(
    st: &'a mut State,
    t: &Tuning,
    prefix: IpNetwork,
    now_ms: u64,
) -> &'a mut PrefixState {
    if st.prefixes.len() >= t.max_tracked && !st.prefixes.contains_key(&prefix) {
        forget_idlest_prefixes(st, t.max_tracked / 10);
    }
    let p = st.prefixes.entry(prefix).or_default();
    p.last_seen_ms = now_ms;
    p
}

/// Makes room: forgets the `n` prefixes seen least recently (a flood of new sources must not
/// grow memory without bound; what it forgets is what was quiet the longest).
fn forget_idlest_prefixes(st: &mut State, n: usize) {
    let mut seen: Vec<u64> = st.prefixes.values().map(|p| p.last_seen_ms).collect();
    let n = n.clamp(1, seen.len());
    let (_, cut, _) = seen.select_nth_unstable(n - 1);
    let cut = *cut;
    st.prefixes.retain(|_, p| p.last_seen_ms > cut);
}

fn forget_idlest_keys(st: &mut State, n: usize) {
    let mut seen: Vec<u64> = st.keys.values().map(|k| k.last_seen_ms).collect();
    if seen.is_empty() {
        return;
    }
    let n = n.clamp(1, seen.len());
    let (_, cut, _) = seen.select_nth_unstable(n - 1);
    let cut = *cut;
    st.keys.retain(|_, k| k.last_seen_ms > cut);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::detect::settings::RuleConfig;

    fn settings() -> DetectSettings {
        DetectSettings {
            distinct_invalid_keys: 10,
            credential_stuffing: RuleConfig {
                threshold: Some(30),
                shadow: Some(false),
                ..RuleConfig::default()
            },
            ..DetectSettings::default()
        }
    }

    fn drain(rx: &mut mpsc::Receiver<Finding>) -> Vec<Finding> {
        let mut v = Vec::new();
        while let Ok(f) = rx.try_recv() {
            v.push(f);
        }
        v
    }

    #[test]
    fn a_botnet_spread_over_a_24_fires_once_though_no_address_is_over_anything() {
        let (engine, mut rx) = Engine::new(&settings());
        let t0 = 1_000_000;
        // 50 addresses, one failure each, one invalid key each.
        for i in 0..50u8 {
            let ip: IpAddr = format!("198.51.100.{}", i + 1).parse().expect("ip");
            engine.auth_failure(ip, Some(&format!("aig_guess{i}")), t0 + u64::from(i) * 100);
        }
        let found = drain(&mut rx);
        // Every 11 new distinct keys are new evidence: 50 keys fire 4 times.
        assert_eq!(found.len(), 4, "{found:?}");
        let f = &found[0];
        assert_eq!(f.detector, Detector::CredentialStuffing);
        assert_eq!(
            f.subject,
            Subject::Prefix("198.51.100.0/24".parse().expect("net"))
        );
        assert_eq!(f.action, Action::Ban);
        assert!(!f.shadow);
        // The 11th distinct key fired it, before 30 failures.
        assert!(
            f.evidence.contains("11+ distinct invalid keys"),
            "{}",
            f.evidence
        );
        // Another range is not touched.
        engine.auth_failure("203.0.113.9".parse().expect("ip"), Some("x"), t0);
        assert!(drain(&mut rx).is_empty());
    }

    #[test]
    fn failures_alone_fire_only_when_they_are_most_of_a_prefixs_answers() {
        let s = DetectSettings {
            credential_stuffing: RuleConfig {
                threshold: Some(50),
                ..RuleConfig::default()
            },
            ..DetectSettings::default()
        };
        // A busy office: 1,000 answers, 60 of them a typo'd key (the same one).
        let (engine, mut rx) = Engine::new(&s);
        for i in 0..1_000u64 {
            let ip: IpAddr = format!("192.0.2.{}", i % 200 + 1).parse().expect("ip");
            if i % 16 == 0 {
                engine.auth_failure(ip, Some("aig_typo"), 1_000 + i);
                engine.answered(ip, 401, 1_000 + i);
            } else {
                engine.answered(ip, 200, 1_000 + i);
            }
        }
        assert!(drain(&mut rx).is_empty());
        // A scanner: nothing but failures, with one key.
        for i in 0..60u64 {
            let ip: IpAddr = "198.51.100.3".parse().expect("ip");
            engine.auth_failure(ip, Some("aig_guess"), 5_000 + i);
            engine.answered(ip, 401, 5_000 + i);
        }
        // (The error storm sees it too.)
        let found: Vec<_> = drain(&mut rx)
            .into_iter()
            .filter(|f| f.detector == Detector::CredentialStuffing)
            .collect();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].evidence.starts_with("51 authentication failures"),
            "{}",
            found[0].evidence
        );
    }

    #[test]
    fn ipv6_sources_are_counted_per_64_and_per_48() {
        let (engine, mut rx) = Engine::new(&settings());
        for i in 0..12u16 {
            // Each address in its own /64 of one /48.
            let ip: IpAddr = format!("2001:db8:7:{i:x}::1").parse().expect("ip");
            engine.auth_failure(ip, Some(&format!("k{i}")), 1_000 + u64::from(i));
        }
        let found = drain(&mut rx);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            found[0].subject,
            Subject::Prefix("2001:db8:7::/48".parse().expect("net"))
        );
    }

    #[test]
    fn allowlisted_sources_are_never_counted() {
        let mut s = settings();
        s.allowlist = vec!["198.51.100.0/24".parse().expect("net")];
        let (engine, mut rx) = Engine::new(&s);
        for i in 0..100 {
            engine.auth_failure(
                "198.51.100.7".parse().expect("ip"),
                Some(&format!("k{i}")),
                1_000 + i,
            );
        }
        assert!(drain(&mut rx).is_empty());
        assert_eq!(engine.tracked(), (0, 0));
    }

    #[test]
    fn an_error_storm_needs_enough_requests_and_a_high_share() {
        let (engine, mut rx) = Engine::new(&DetectSettings::default());
        let ip: IpAddr = "192.0.2.10".parse().expect("ip");
        // A normal client: mostly 200s, some 429s.
        for i in 0..200u64 {
            engine.answered(ip, if i % 10 == 0 { 429 } else { 200 }, 1_000 + i);
        }
        assert!(drain(&mut rx).is_empty());
        let ip2: IpAddr = "192.0.2.200".parse().expect("ip");
        let (engine, mut rx) = Engine::new(&DetectSettings::default());
        for i in 0..60u64 {
            engine.answered(ip2, 404, 1_000 + i);
        }
        let found = drain(&mut rx);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].detector, Detector::ErrorStorm);
        assert!(found[0].shadow, "shadow mode is the default");
        assert_eq!(found[0].action, Action::Challenge);
    }

    #[test]
    fn a_key_used_from_many_prefixes_and_many_keys_from_one_prefix() {
        let (engine, mut rx) = Engine::new(&DetectSettings::default());
        let key: Arc<str> = "key_1".into();
        let tenant: Arc<str> = "acme".into();
        for i in 0..25u8 {
            let ip: IpAddr = format!("10.{i}.0.1").parse().expect("ip");
            engine.key_used(ip, &key, &tenant, 1_000 + u64::from(i));
        }
        let found = drain(&mut rx);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].detector, Detector::KeySharing);
        assert_eq!(found[0].action, Action::Suspend);
        for i in 0..25u8 {
            let k: Arc<str> = format!("key_s{i}").into();
            engine.key_used(
                "172.16.5.5".parse().expect("ip"),
                &k,
                &tenant,
                2_000 + u64::from(i),
            );
        }
        let found = drain(&mut rx);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].detector, Detector::KeySpraying);
        assert_eq!(
            found[0].subject,
            Subject::Prefix("172.16.5.0/24".parse().expect("net"))
        );
    }

    #[test]
    fn a_rate_far_above_the_keys_own_baseline_fires_and_a_steady_one_does_not() {
        let s = DetectSettings {
            rate_spike: RuleConfig {
                window: Some(Duration::from_secs(1)),
                baseline: Some(Duration::from_secs(10)),
                min_requests: Some(20),
                factor: Some(5.0),
                ..RuleConfig::default()
            },
            ..DetectSettings::default()
        };
        let (engine, mut rx) = Engine::new(&s);
        let (key, tenant): (Arc<str>, Arc<str>) = ("key_r".into(), "t".into());
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        // 20 s steady at 10 requests/s: no spike.
        for i in 0..200u64 {
            engine.key_used(ip, &key, &tenant, 1_000 + i * 100);
        }
        assert!(drain(&mut rx).is_empty());
        // Then 100 in one second.
        for i in 0..100u64 {
            engine.key_used(ip, &key, &tenant, 21_000 + i * 10);
        }
        let found = drain(&mut rx);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].detector, Detector::RateSpike);
    }

    #[test]
    fn memory_is_bounded_and_idle_state_is_swept() {
        let mut s = settings();
        s.max_tracked = 1_000;
        let (engine, _rx) = Engine::new(&s);
        for i in 0..5_000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8)));
            engine.auth_failure(ip, None, 1_000 + u64::from(i));
        }
        assert!(engine.tracked().0 <= 1_000, "{:?}", engine.tracked());
        engine.sweep(1_000 + 100 * 86_400_000);
        assert_eq!(engine.tracked(), (0, 0));
    }

    #[test]
    fn challenges_cover_their_prefix_until_they_end() {
        let (engine, _rx) = Engine::new(&settings());
        let p: IpNetwork = "203.0.113.0/24".parse().expect("net");
        engine.challenge(p, 10_000);
        assert_eq!(
            engine.challenged("203.0.113.77".parse().expect("ip"), 5_000),
            Some(p)
        );
        assert_eq!(
            engine.challenged("203.0.114.1".parse().expect("ip"), 5_000),
            None
        );
        assert_eq!(
            engine.challenged("203.0.113.77".parse().expect("ip"), 10_000),
            None
        );
    }
}
