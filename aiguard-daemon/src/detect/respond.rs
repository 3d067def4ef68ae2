//! What happens when a detector fires: the finding is logged with its evidence and counted,
//! and, unless the detector is in shadow mode, acted on: the prefix banned at the NIC for an
//! escalating TTL (its offenses are remembered in the embedded store, so a restart does not
//! reset a repeat offender to the first TTL), challenged with a proof of work, or the key
//! suspended. The allowlists (`detect.allowlist` and the NIC's) always win.
use std::{
    sync::{Arc, OnceLock, RwLock},
    time::Duration,
};

use ipnetwork::IpNetwork;
use redb::TableDefinition;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use super::{
    engine::{Engine, Finding, Subject},
    settings::{Action, DetectSettings},
};
use crate::{keys::KeyRing, metrics::detect::DetectMetrics, store::Store};

/// Past offenses per prefix (escalation survives restarts).
const OFFENSES: TableDefinition<&str, &[u8]> = TableDefinition::new("offenses.v1");

/// Where bans go: the node's ban list and XDP maps (and the shared store). Absent when the
/// gateway runs without a node (library use, tests): bans are then logged only.
pub trait Enforcer: Send + Sync {
    /// Bans `range` for `ttl`; the error says why not (the allowlist, a full map).
    fn ban(&self, range: IpNetwork, ttl: Duration, reason: &str) -> Result<(), String>;
    /// Whether the NIC's allowlist overlaps `range`.
    fn allowlisted(&self, range: IpNetwork) -> bool;
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Offense {
    count: u32,
    last_ms: u64,
}

/// How bans escalate and how long challenges last.
#[derive(Debug, Clone)]
struct Escalation {
    ban_ttls: Vec<Duration>,
    offense_memory: Duration,
    challenge_for: Duration,
    allowlist: Vec<IpNetwork>,
}

impl Escalation {
    fn new(s: &DetectSettings) -> Self {
        Self {
            ban_ttls: s.ban_ttls.clone(),
            offense_memory: s.offense_memory,
            challenge_for: s.challenge.challenge_for,
            allowlist: s.allowlist.clone(),
        }
    }
}

pub struct Responder {
    engine: Arc<Engine>,
    keys: Arc<KeyRing>,
    store: Store,
    enforcer: OnceLock<Arc<dyn Enforcer>>,
    escalation: RwLock<Escalation>,
    metrics: DetectMetrics,
}

impl Responder {
    pub fn new(
        engine: Arc<Engine>,
        keys: Arc<KeyRing>,
        store: Store,
        settings: &DetectSettings,
        metrics: DetectMetrics,
    ) -> Result<Self, crate::store::StoreError> {
        store.write(|txn| {
            txn.open_table(OFFENSES)?;
            Ok(())
        })?;
        Ok(Self {
            engine,
            keys,
            store,
            enforcer: OnceLock::new(),
            escalation: RwLock::new(Escalation::new(settings)),
            metrics,
        })
    }

    /// Gives bans somewhere to go (once the node is up).
    pub fn set_enforcer(&self, enforcer: Arc<dyn Enforcer>) {
        let _ = self.enforcer.set(enforcer);
    }

    pub fn configure(&self, settings: &DetectSettings) {
        *self.escalation.write().unwrap_or_else(|p| p.into_inner()) = Escalation::new(settings);
    }

    /// Acts on findings until shutdown.
    pub async fn run(
        self: Arc<Self>,
        mut findings: mpsc::Receiver<Finding>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let finding = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                f = findings.recv() => match f {
                    Some(f) => f,
                    None => return,
                },
            };
            let me = self.clone();
            // Bans take the node's lock and write the store: not on an async worker.
            let _ = tokio::task::spawn_blocking(move || me.respond(&finding)).await;
        }
    }

    /// Logs, counts and (unless in shadow mode) carries out one finding.
    pub fn respond(&self, f: &Finding) {
        let mode = if f.shadow { "shadow" } else { "enforce" };
        self.metrics
            .finding(f.detector.as_str(), f.action.as_str(), mode);
        let esc = self
            .escalation
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if f.shadow {
            warn!(
                detector = f.detector.as_str(),
                subject = %f.subject,
                action = f.action.as_str(),
                evidence = %f.evidence,
                "detector fired (shadow mode: nothing done)"
            );
            return;
        }
        let outcome = match (&f.subject, f.action) {
            (_, Action::Log) => Ok("logged".to_owned()),
            (Subject::Prefix(range), Action::Ban) => self.ban(*range, f, &esc),
            (Subject::Prefix(range), Action::Challenge) => self.challenge(*range, f, &esc),
            (Subject::Key { id, .. }, Action::Suspend) => {
                let until = f.at_ms + self.suspend_for(f).as_millis() as u64;
                let reason = format!("{}: {}", f.detector.as_str(), f.evidence);
                self.keys
                    .suspend(id, until, &reason)
                    .map(|_| format!("suspended until {}", crate::cli::fmt_time(until)))
                    .map_err(|e| e.to_string())
            }
            (subject, action) => Err(format!(
                "{} cannot be applied to {subject}",
                action.as_str()
            )),
        };
        match outcome {
            Ok(done) => {
                self.metrics.action(f.action.as_str(), "done");
                warn!(
                    detector = f.detector.as_str(),
                    subject = %f.subject,
                    action = f.action.as_str(),
                    evidence = %f.evidence,
                    outcome = %done,
                    "detector acted"
                );
            }
            Err(why) => {
                self.metrics.action(f.action.as_str(), "refused");
                info!(
                    detector = f.detector.as_str(),
                    subject = %f.subject,
                    action = f.action.as_str(),
                    evidence = %f.evidence,
                    reason = %why,
                    "detector fired; no action taken"
                );
            }
        }
    }

    fn suspend_for(&self, f: &Finding) -> Duration {
        self.engine.tuning().rule(f.detector).suspend_for
    }

    fn allowlisted(&self, range: IpNetwork, esc: &Escalation) -> bool {
        esc.allowlist
            .iter()
            .any(|a| crate::range::overlaps(a, &range))
            || self.enforcer.get().is_some_and(|e| e.allowlisted(range))
    }

    fn ban(&self, range: IpNetwork, f: &Finding, esc: &Escalation) -> Result<String, String> {
        if self.allowlisted(range, esc) {
            return Err("the range overlaps the allowlist, which always wins".into());
        }
        let Some(enforcer) = self.enforcer.get() else {
            return Err("no NIC attached to this gateway: ban not applied".into());
        };
        // The count is read, the ban made, and only then the offense committed: a commit
        // (an fsync) before the ban would let the attack run on meanwhile.
        let offense = self
            .offense_after(range, f.at_ms, esc)
            .map_err(|e| format!("reading past offenses: {e}"))?;
        let i = (offense.count as usize - 1).min(esc.ban_ttls.len() - 1);
        let ttl = esc.ban_ttls[i];
        let reason = format!(
            "{} (offense {}): {}",
            f.detector.as_str(),
            offense.count,
            f.evidence
        );
        enforcer.ban(range, ttl, &reason)?;
        if let Err(e) = self.record_offense(range, offense) {
            error!(%range, error = %e, "recording the offense failed: the next ban of this range may be shorter");
        }
        Ok(format!(
            "banned at the NIC for {} (offense {})",
            humantime::format_duration(ttl),
            offense.count
        ))
    }

    fn challenge(&self, range: IpNetwork, f: &Finding, esc: &Escalation) -> Result<String, String> {
        if self.allowlisted(range, esc) {
            return Err("the range overlaps the allowlist, which always wins".into());
        }
        let until = f.at_ms + esc.challenge_for.as_millis() as u64;
        self.engine.challenge(range, until);
        Ok(format!(
            "proof of work required for {}",
            humantime::format_duration(esc.challenge_for)
        ))
    }

    /// The offense `range` commits now: one more than its past ones, or the first when those are
    /// older than `offense_memory`.
    fn offense_after(
        &self,
        range: IpNetwork,
        now_ms: u64,
        esc: &Escalation,
    ) -> Result<Offense, crate::store::StoreError> {
        let key = range.to_string();
        let memory = esc.offense_memory.as_millis() as u64;
        let mut prior = None;
        self.store.read(|txn| {
            let t = txn.open_table(OFFENSES)?;
            prior = t
                .get(key.as_str())?
                .and_then(|v| serde_json::from_slice::<Offense>(v.value()).ok());
            Ok(())
        })?;
        let count = match prior {
            Some(p) if now_ms.saturating_sub(p.last_ms) < memory => p.count,
            _ => 0,
        };
        Ok(Offense {
            count: count.saturating_add(1),
            last_ms: now_ms,
        })
    }

    fn record_offense(
        &self,
        range: IpNetwork,
        offense: Offense,
    ) -> Result<(), crate::store::StoreError> {
        let key = range.to_string();
        let value = serde_json::to_vec(&offense).expect("an offense serializes");
        self.store.write(|txn| {
            txn.open_table(OFFENSES)?
                .insert(key.as_str(), value.as_slice())?;
            Ok(())
        })
    }

    /// Forgets offenses older than `offense_memory` (run with the ban sweep).
    pub fn sweep(&self, now_ms: u64) {
        let memory = self
            .escalation
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .offense_memory
            .as_millis() as u64;
        let result = self.store.write(|txn| {
            let mut t = txn.open_table(OFFENSES)?;
            t.retain(|_, v| {
                serde_json::from_slice::<Offense>(v)
                    .is_ok_and(|o| now_ms.saturating_sub(o.last_ms) < memory)
            })?;
            Ok(())
        });
        if let Err(e) = result {
            error!(error = %e, "forgetting old offenses failed; retrying at the next sweep");
        }
        self.engine.sweep(now_ms);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::detect::{engine::Engine, settings::Detector};

    #[derive(Default)]
    struct Recorder {
        bans: Mutex<Vec<(IpNetwork, Duration)>>,
        allow: Vec<IpNetwork>,
    }

    impl Enforcer for Recorder {
        fn ban(&self, range: IpNetwork, ttl: Duration, _reason: &str) -> Result<(), String> {
            self.bans.lock().expect("lock").push((range, ttl));
            Ok(())
        }
        fn allowlisted(&self, range: IpNetwork) -> bool {
            self.allow.iter().any(|a| crate::range::overlaps(a, &range))
        }
    }

    fn responder(dir: &std::path::Path, s: &DetectSettings) -> (Responder, Arc<Recorder>) {
        let store = Store::open(dir).expect("store");
        let keys = Arc::new(KeyRing::open(store.clone()).expect("keys"));
        let (engine, _rx) = Engine::new(s);
        let r = Responder::new(engine, keys, store, s, DetectMetrics::new()).expect("responder");
        let rec = Arc::new(Recorder {
            allow: vec!["192.0.2.0/24".parse().expect("net")],
            ..Recorder::default()
        });
        r.set_enforcer(rec.clone());
        (r, rec)
    }

    fn finding(range: &str, at_ms: u64, action: Action) -> Finding {
        Finding {
            detector: Detector::CredentialStuffing,
            subject: Subject::Prefix(range.parse().expect("net")),
            action,
            shadow: false,
            evidence: "test".into(),
            at_ms,
        }
    }

    #[test]
    fn repeat_offenders_get_longer_bans_across_restarts_and_old_offenses_are_forgotten() {
        let dir = tempfile::tempdir().expect("dir");
        let s = DetectSettings {
            ban_ttls: vec![Duration::from_secs(600), Duration::from_secs(3600)],
            offense_memory: Duration::from_secs(86_400),
            ..DetectSettings::default()
        };
        let range: IpNetwork = "198.51.100.0/24".parse().expect("net");
        {
            let (r, rec) = responder(dir.path(), &s);
            r.respond(&finding("198.51.100.0/24", 1_000, Action::Ban));
            r.respond(&finding("198.51.100.0/24", 2_000, Action::Ban));
            assert_eq!(
                *rec.bans.lock().expect("lock"),
                vec![
                    (range, Duration::from_secs(600)),
                    (range, Duration::from_secs(3600))
                ]
            );
        }
        // A restart keeps the count: the third offense gets the last (longest) TTL again.
        let (r, rec) = responder(dir.path(), &s);
        r.respond(&finding("198.51.100.0/24", 3_000, Action::Ban));
        assert_eq!(
            rec.bans.lock().expect("lock")[0],
            (range, Duration::from_secs(3600))
        );
        // A day later it starts over.
        r.sweep(3_000 + 86_400_000 + 1);
        r.respond(&finding(
            "198.51.100.0/24",
            3_000 + 86_400_000 + 2,
            Action::Ban,
        ));
        assert_eq!(
            rec.bans.lock().expect("lock")[1],
            (range, Duration::from_secs(600))
        );
    }

    #[test]
    fn the_allowlist_wins_and_shadow_mode_does_nothing() {
        let dir = tempfile::tempdir().expect("dir");
        let (r, rec) = responder(dir.path(), &DetectSettings::default());
        r.respond(&finding("192.0.2.0/24", 1_000, Action::Ban));
        r.respond(&finding("192.0.2.0/24", 1_000, Action::Challenge));
        let mut shadow = finding("198.51.100.0/24", 1_000, Action::Ban);
        shadow.shadow = true;
        r.respond(&shadow);
        assert!(rec.bans.lock().expect("lock").is_empty());
        assert_eq!(
            r.engine.challenged("192.0.2.1".parse().expect("ip"), 2_000),
            None
        );
        r.respond(&finding("203.0.113.0/24", 1_000, Action::Challenge));
        assert!(
            r.engine
                .challenged("203.0.113.1".parse().expect("ip"), 2_000)
                .is_some()
        );
    }
}
