//! Closing the loop: the gateway sees what the NIC cannot (who fails to authenticate, who
//! gets errors, which key comes from where, what prompts say), and turns it into bans at the
//! NIC, proof-of-work challenges and key suspensions.
//!
//! # Layout
//! - [`settings`]: `[detect]`, the detectors' thresholds, windows, actions and shadow modes;
//! - [`windows`]: sliding counts and distinct-item sets in constant memory;
//! - [`engine`]: the detectors' state, fed by the gateway on every request;
//! - [`respond`]: what a finding leads to: logged with its evidence, counted, and acted on;
//! - [`challenge`]: the hashcash-style proof-of-work exchange;
//! - [`prompt`]: prompt-injection rules over each request's messages.
pub mod challenge;
pub mod engine;
pub mod prompt;
pub mod respond;
pub mod settings;
pub mod windows;

use std::sync::{Arc, Mutex, RwLock};

use rand::RngCore as _;
use redb::{ReadableTable as _, TableDefinition};
use tokio::sync::mpsc;

use crate::{
    keys::KeyRing,
    metrics::detect::DetectMetrics,
    store::{Store, StoreError},
};
use challenge::{ChallengeSettings, Challenger};
use engine::{Engine, Finding};
use prompt::PromptRules;
use respond::Responder;
use settings::DetectSettings;

/// The challenge tokens' MAC key: made once per state directory and kept, so that tokens a
/// client is solving survive a restart.
const SECRETS: TableDefinition<&str, &[u8]> = TableDefinition::new("detect_secrets.v1");

/// Everything detection needs, one per gateway.
pub struct Detection {
    pub engine: Arc<Engine>,
    pub responder: Arc<Responder>,
    pub challenger: Challenger,
    pub metrics: DetectMetrics,
    rules: RwLock<Arc<PromptRules>>,
    findings: Mutex<Option<mpsc::Receiver<Finding>>>,
}

fn challenge_settings(s: &DetectSettings) -> ChallengeSettings {
    ChallengeSettings {
        difficulty: s.challenge.difficulty,
        token_ttl: s.challenge.token_ttl,
    }
}

impl Detection {
    /// `settings` must have been validated (the prompt rules compile).
    pub fn new(
        settings: &DetectSettings,
        keys: Arc<KeyRing>,
        store: Store,
    ) -> Result<Self, StoreError> {
        let secret = challenge_secret(&store)?;
        let metrics = DetectMetrics::new();
        let (engine, findings) = Engine::new(settings);
        let responder = Arc::new(Responder::new(
            engine.clone(),
            keys,
            store,
            settings,
            metrics.clone(),
        )?);
        let rules = PromptRules::compile(&settings.prompt_rules).expect("validated prompt rules");
        add_rule_series(&metrics, settings);
        Ok(Self {
            engine,
            responder,
            challenger: Challenger::new(secret, challenge_settings(settings)),
            metrics,
            rules: RwLock::new(Arc::new(rules)),
            findings: Mutex::new(Some(findings)),
        })
    }

    /// Applies a reloaded (validated) `[detect]`; what detectors counted so far stays.
    pub fn configure(&self, settings: &DetectSettings) {
        self.engine.configure(settings);
        self.responder.configure(settings);
        self.challenger.set_settings(challenge_settings(settings));
        add_rule_series(&self.metrics, settings);
        if let Ok(rules) = PromptRules::compile(&settings.prompt_rules) {
            *self.rules.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(rules);
        }
    }

    pub fn prompt_rules(&self) -> Arc<PromptRules> {
        self.rules.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The findings, for the one task that responds to them.
    pub fn take_findings(&self) -> Option<mpsc::Receiver<Finding>> {
        self.findings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

/// Each configured prompt rule's match counter, from zero.
fn add_rule_series(metrics: &DetectMetrics, settings: &DetectSettings) {
    metrics.add_prompt_rules(settings.prompt_rules.iter().map(|r| {
        let action = if r.shadow {
            "shadow"
        } else {
            r.action.as_str()
        };
        (r.name.as_str(), action)
    }));
}

fn challenge_secret(store: &Store) -> Result<[u8; 32], StoreError> {
    let mut secret = [0u8; 32];
    store.write(|txn| {
        let mut t = txn.open_table(SECRETS)?;
        let existing = t.get("challenge")?.map(|v| v.value().to_vec());
        match existing {
            Some(v) if v.len() == 32 => secret.copy_from_slice(&v),
            _ => {
                rand::rng().fill_bytes(&mut secret);
                t.insert("challenge", secret.as_slice())?;
            }
        }
        Ok(())
    })?;
    Ok(secret)
}
