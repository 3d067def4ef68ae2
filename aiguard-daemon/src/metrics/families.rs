//! Metric families built at scrape time from numbers that live elsewhere (kernel maps, the
//! limiter, the shared store's health): each scrape fills a fresh, unregistered vector and
//! collects it, so nothing is counted twice and nothing goes stale between scrapes.
use std::collections::HashMap;

use prometheus::{GaugeVec, IntCounterVec, Opts, core::Desc};

/// Name, help and label names of one family.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub name: &'static str,
    pub help: &'static str,
    pub labels: &'static [&'static str],
}

impl Spec {
    pub const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> Self {
        Self { name, help, labels }
    }

    /// What the registry checks names against at registration.
    pub fn desc(&self) -> Desc {
        Desc::new(
            self.name.into(),
            self.help.into(),
            self.labels.iter().map(ToString::to_string).collect(),
            HashMap::new(),
        )
        .expect("a metric spec is valid")
    }

    fn opts(&self) -> Opts {
        Opts::new(self.name, self.help)
    }

    /// A fresh counter vector to fill for one scrape.
    pub fn counters(&self) -> IntCounterVec {
        IntCounterVec::new(self.opts(), self.labels).expect("a metric spec is valid")
    }

    /// A fresh gauge vector to fill for one scrape.
    pub fn gauges(&self) -> GaugeVec {
        GaugeVec::new(self.opts(), self.labels).expect("a metric spec is valid")
    }
}

/// Collected families of a filled vector.
pub fn collect(v: &impl prometheus::core::Collector) -> Vec<prometheus::proto::MetricFamily> {
    v.collect()
}

/// The text exposition of `families`, for tests.
#[cfg(test)]
pub fn text(families: &[prometheus::proto::MetricFamily]) -> String {
    use prometheus::Encoder as _;
    let mut out = Vec::new();
    prometheus::TextEncoder::new()
        .encode(families, &mut out)
        .expect("encodes");
    String::from_utf8(out).expect("utf-8")
}
