//! Abuse detection's counters: what each detector found (acted on, or only logged in shadow
//! mode), what the responder did, proofs of work, and prompt rules that matched. Labels are
//! detector, action, result and rule names: never a key, and never an address (a botnet would
//! make every address a series).
use prometheus::{IntCounterVec, Opts, core::Collector};

/// Cloning a handle shares the series.
#[derive(Debug, Clone)]
pub struct DetectMetrics {
    findings: IntCounterVec,
    actions: IntCounterVec,
    challenges: IntCounterVec,
    prompt_rules: IntCounterVec,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

impl DetectMetrics {
    pub fn new() -> Self {
        let m = Self {
            findings: counter(
                "aiguard_detector_triggers_total",
                "Times a detector fired, by detector, the action it calls for, and mode (enforce, or shadow: logged only).",
                &["detector", "action", "mode"],
            ),
            actions: counter(
                "aiguard_detector_actions_total",
                "Actions the detectors' responder carried out (done) or could not (refused: the allowlist, no NIC, a full map).",
                &["action", "result"],
            ),
            challenges: counter(
                "aiguard_challenges_total",
                "Proof-of-work exchanges: issued (428 with a token), passed, failed (a bad, replayed or expired proof).",
                &["result"],
            ),
            prompt_rules: counter(
                "aiguard_prompt_rule_matches_total",
                "Requests a prompt rule matched, by rule and its action (log, tag, reject; shadow: logged only).",
                &["rule", "action"],
            ),
        };
        for d in crate::detect::settings::Detector::ALL {
            for mode in ["enforce", "shadow"] {
                let action = "log";
                m.findings.with_label_values(&[d.as_str(), action, mode]);
            }
        }
        for r in ["issued", "passed", "failed"] {
            m.challenges.with_label_values(&[r]);
        }
        for a in ["ban", "challenge", "suspend", "log"] {
            for r in ["done", "refused"] {
                m.actions.with_label_values(&[a, r]);
            }
        }
        m
    }

    /// Zero series for configured prompt rules (again at reload, for new ones).
    pub fn add_prompt_rules<'a>(&self, rules: impl IntoIterator<Item = (&'a str, &'a str)>) {
        for (rule, action) in rules {
            self.prompt_rules.with_label_values(&[rule, action]);
        }
    }

    pub fn finding(&self, detector: &str, action: &str, mode: &str) {
        self.findings
            .with_label_values(&[detector, action, mode])
            .inc();
    }

    pub fn action(&self, action: &str, result: &str) {
        self.actions.with_label_values(&[action, result]).inc();
    }

    pub fn challenge(&self, result: &str) {
        self.challenges.with_label_values(&[result]).inc();
    }

    pub fn prompt_rule(&self, rule: &str, action: &str) {
        self.prompt_rules.with_label_values(&[rule, action]).inc();
    }

    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.findings.clone()),
            Box::new(self.actions.clone()),
            Box::new(self.challenges.clone()),
            Box::new(self.prompt_rules.clone()),
        ]
    }
}

impl Default for DetectMetrics {
    fn default() -> Self {
        Self::new()
    }
}
