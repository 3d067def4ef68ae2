//! `[store]`: where limits, quotas and bans live when several nodes share them.
use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use crate::config::{ConfigError, invalid};

/// A URL for an error message: without its password, even when it does not parse.
fn shown_url(u: &str) -> String {
    if redis::parse_redis_url(u).is_some_and(|url| url.host_str().is_some_and(|h| !h.is_empty())) {
        return super::redact(u);
    }
    match (u.find(':'), u.rfind('@')) {
        (Some(colon), Some(at)) if at > colon => format!("{}:***@{}", &u[..colon], &u[at + 1..]),
        _ => u.to_owned(),
    }
}

/// Which store holds the shared state.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// This node alone: limits in memory, keys, bans and usage in the embedded store.
    #[default]
    Embedded,
    /// Redis (or Redis Cluster): every node's limits, quotas and bans are one set.
    Redis,
}

/// The `[store]` section.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    pub backend: Backend,
    /// `redis://` or `rediss://` URLs. One URL is a single Redis (or a proxy in front of one);
    /// several, or `cluster = true`, are the seeds of a Redis Cluster.
    pub urls: Vec<String>,
    /// Treat the URLs as Cluster seeds even when there is only one.
    pub cluster: Option<bool>,
    /// Prepended to every key and channel, so that environments can share one Redis.
    pub prefix: String,
    /// Longest a request's decision may wait for Redis; past it, the tier's
    /// `on_store_failure` decides.
    #[serde(with = "humantime_serde")]
    pub decision_timeout: Duration,
    /// Longest a connection attempt may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Nodes sharing the limits: with `on_store_failure = "local"`, each node enforces
    /// its tier's limits divided by this while Redis is out of reach.
    pub nodes: u32,
    /// This node's name in ban origins and concurrency leases; the host name by default.
    pub node_name: Option<String>,
    /// Longest a request holds a concurrency slot in Redis: a node that dies mid-request frees
    /// its slots after this. Make it longer than the longest stream.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often an unreachable Redis is tried again.
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
    /// Longest a settlement waits to ride with the next admission of its tenant, key and model
    /// on this node (one script call for both, about a third of Redis's work per request
    /// saved); past it, it goes alone. 0 sends every settlement at once.
    #[serde(with = "humantime_serde")]
    pub settle_delay: Duration,
    /// PEM file of the CAs whose certificates `rediss://` servers may present: trusted instead
    /// of the system's roots (a private CA, e.g. an internal Redis's). Without it, the system's.
    pub tls_ca: Option<PathBuf>,
    /// PEM certificate (chain) this node presents to Redis, for mutual TLS (Redis's
    /// `tls-auth-clients`); with `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// The unencrypted PEM private key of `tls_cert` (PKCS#8, RSA or EC).
    pub tls_key: Option<PathBuf>,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            backend: Backend::Embedded,
            urls: Vec::new(),
            cluster: None,
            prefix: "aiguard:".into(),
            decision_timeout: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(2),
            nodes: 1,
            node_name: None,
            lease: Duration::from_secs(15 * 60),
            retry_interval: Duration::from_millis(500),
            settle_delay: Duration::from_millis(100),
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// What a tier's requests get while the shared store cannot answer in time.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Admit without limits (usage is still counted and written back later).
    FailOpen,
    /// Refuse with 503 and Retry-After.
    FailClosed,
    /// This node's own in-memory limits, at the tier's limits divided by `store.nodes`.
    #[default]
    Local,
}

impl StoreSettings {
    pub fn is_shared(&self) -> bool {
        self.backend == Backend::Redis
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster.unwrap_or(self.urls.len() > 1)
    }

    /// This node's name: configured, else the host name.
    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "aiguard".into())
        })
    }

    /// The TLS files that are set, as `(field, path)`.
    fn tls_files(&self) -> impl Iterator<Item = (&'static str, &PathBuf)> {
        [
            ("store.tls_ca", &self.tls_ca),
            ("store.tls_cert", &self.tls_cert),
            ("store.tls_key", &self.tls_key),
        ]
        .into_iter()
        .filter_map(|(field, path)| path.as_ref().map(|p| (field, p)))
    }

    /// What `rediss://` connections trust and present, read from the TLS files now (the
    /// shared store does so when it opens, at start); `None` when no TLS file is set.
    pub fn tls_certificates(&self) -> Result<Option<redis::TlsCertificates>, ConfigError> {
        super::tls::certificates(self)
    }

    /// Checks every field; the TLS files are read (so that a missing, unreadable or broken
    /// one refuses the configuration, not a connection later).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.backend == Backend::Embedded {
            if let Some((field, path)) = self.tls_files().next() {
                return Err(invalid(
                    field,
                    format!("{:?}", path.display().to_string()),
                    "no TLS files with backend = \"embedded\" (they are for rediss:// URLs, with backend = \"redis\")",
                ));
            }
            if !self.urls.is_empty() {
                return Err(invalid(
                    "store.urls",
                    format!("{:?}", self.urls),
                    "no URLs with backend = \"embedded\" (set backend = \"redis\" to use them)",
                ));
            }
            return Ok(());
        }
        if self.urls.is_empty() {
            return Err(invalid(
                "store.urls",
                "[]",
                "at least one redis:// or rediss:// URL with backend = \"redis\"",
            ));
        }
        for u in &self.urls {
            let Some(url) = redis::parse_redis_url(u)
                .filter(|url| matches!(url.scheme(), "redis" | "rediss"))
                .filter(|url| url.host_str().is_some_and(|h| !h.is_empty()))
            else {
                return Err(invalid(
                    "store.urls",
                    format!("{:?}", shown_url(u)),
                    "URLs like \"redis://10.0.0.5:6379/0\" or \"rediss://user:password@host:6380\"",
                ));
            };
            // Redis Cluster has database 0 only.
            let db = url.path().trim_matches('/');
            if self.is_cluster() && !db.is_empty() && db != "0" {
                return Err(invalid(
                    "store.urls",
                    format!("{:?}", shown_url(u)),
                    "no database number but 0 for Redis Cluster seeds (a cluster has database 0 only)",
                ));
            }
        }
        // Every node of a cluster is reached the way its seeds are.
        if self.is_cluster()
            && let Some(odd) = self
                .urls
                .iter()
                .find(|u| is_tls_url(u) != is_tls_url(&self.urls[0]))
        {
            return Err(invalid(
                "store.urls",
                format!("{:?}", shown_url(odd)),
                &format!(
                    "Cluster seeds of one scheme: all rediss:// (TLS) or all redis:// (the first is {:?})",
                    shown_url(&self.urls[0])
                ),
            ));
        }
        if let Some((field, path)) = self.tls_files().next()
            && !self.urls.iter().any(|u| is_tls_url(u))
        {
            return Err(invalid(
                field,
                format!("{:?}", path.display().to_string()),
                "rediss:// URLs in store.urls: TLS files are for TLS connections, and every URL is redis:// (plain TCP)",
            ));
        }
        if self.cluster == Some(false) && self.urls.len() > 1 {
            return Err(invalid(
                "store.cluster",
                "false",
                "true, or one URL: several URLs are the seeds of one Redis Cluster",
            ));
        }
        if self.prefix.len() > 64
            || self
                .prefix
                .chars()
                .any(|c| matches!(c, '{' | '}') || c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "store.prefix",
                format!("{:?}", self.prefix),
                "up to 64 characters without braces, spaces or control characters (braces are Redis Cluster hash tags)",
            ));
        }
        let ms = |d: Duration| d.as_millis();
        if !(1..=10_000).contains(&ms(self.decision_timeout)) {
            return Err(invalid(
                "store.decision_timeout",
                format!("{:?}", self.decision_timeout),
                "from 1ms to 10s",
            ));
        }
        if !(1..=60_000).contains(&ms(self.connect_timeout)) {
            return Err(invalid(
                "store.connect_timeout",
                format!("{:?}", self.connect_timeout),
                "from 1ms to 60s",
            ));
        }
        if !(10..=60_000).contains(&ms(self.retry_interval)) {
            return Err(invalid(
                "store.retry_interval",
                format!("{:?}", self.retry_interval),
                "from 10ms to 60s",
            ));
        }
        if self.settle_delay > Duration::from_secs(1) {
            return Err(invalid(
                "store.settle_delay",
                format!("{:?}", self.settle_delay),
                "from 0 (off) to 1s",
            ));
        }
        if self.lease < Duration::from_secs(1) || self.lease > Duration::from_secs(24 * 3600) {
            return Err(invalid(
                "store.lease",
                format!("{:?}", self.lease),
                "from 1s to 24h",
            ));
        }
        if !(1..=10_000).contains(&self.nodes) {
            return Err(invalid("store.nodes", self.nodes, "from 1 to 10000"));
        }
        if let Some(n) = &self.node_name
            && !crate::tiers::is_valid_name(n)
        {
            return Err(invalid(
                "store.node_name",
                format!("{n:?}"),
                "1 to 64 letters, digits, '-', '_' or '.'",
            ));
        }
        // Last: files are read only for an otherwise valid section.
        self.tls_certificates()?;
        Ok(())
    }
}

/// Whether a URL is `rediss://` (TLS).
pub(crate) fn is_tls_url(u: &str) -> bool {
    redis::parse_redis_url(u).is_some_and(|url| url.scheme() == "rediss")
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn redis(urls: &[&str]) -> StoreSettings {
        StoreSettings {
            backend: Backend::Redis,
            urls: urls.iter().map(|u| (*u).to_owned()).collect(),
            ..StoreSettings::default()
        }
    }

    /// The error `s` is refused with; panics if it is accepted.
    fn refused(s: &StoreSettings) -> String {
        match s.validate() {
            Ok(()) => panic!("accepted: {s:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[track_caller]
    fn names(s: &StoreSettings, field: &str) -> String {
        let e = refused(s);
        assert!(
            e.contains(&format!("`{field}`")),
            "the error names {field}: {e}"
        );
        e
    }

    #[test]
    fn good_settings_pass() {
        StoreSettings::default().validate().expect("embedded");
        redis(&["redis://10.0.0.5:6379/0"]).validate().expect("one");
        redis(&["rediss://user:pw@redis.internal:6380"])
            .validate()
            .expect("tls");
        redis(&["redis://a:7000", "redis://b:7000", "redis://c:7000"])
            .validate()
            .expect("cluster seeds");
        let mut one_seed = redis(&["redis://a:7000/0"]);
        one_seed.cluster = Some(true);
        one_seed.validate().expect("one cluster seed, database 0");
        let mut edges = redis(&["redis://127.0.0.1:6379"]);
        edges.prefix = "p".repeat(64);
        edges.decision_timeout = Duration::from_millis(1);
        edges.connect_timeout = Duration::from_secs(60);
        edges.retry_interval = Duration::from_millis(10);
        edges.lease = Duration::from_secs(1);
        edges.nodes = 10_000;
        edges.node_name = Some("node-a.eu_1".into());
        edges.validate().expect("every bound included");
        let mut no_prefix = redis(&["redis://127.0.0.1:6379"]);
        no_prefix.prefix = String::new();
        no_prefix
            .validate()
            .expect("a dedicated Redis needs no prefix");
    }

    #[test]
    fn urls_must_match_the_backend() {
        let mut embedded = redis(&["redis://127.0.0.1:6379"]);
        embedded.backend = Backend::Embedded;
        let e = names(&embedded, "store.urls");
        assert!(e.contains("backend = \"redis\""), "{e}");
        let e = names(&redis(&[]), "store.urls");
        assert!(e.contains("at least one"), "{e}");
    }

    #[test]
    fn urls_need_a_redis_scheme_and_a_host() {
        for bad in [
            "http://10.0.0.5:6379",
            "unix:///run/redis.sock",
            "redis+unix:///run/redis.sock",
            "valkey://10.0.0.5:6379",
            "10.0.0.5:6379",
            "redis://",
            "",
        ] {
            let e = names(&redis(&[bad]), "store.urls");
            assert!(e.contains(&format!("{bad:?}")), "names the bad URL: {e}");
        }
        // One bad URL among good ones is named.
        let e = names(
            &redis(&["redis://a:7000", "redis//b:7000", "redis://c:7000"]),
            "store.urls",
        );
        assert!(e.contains("redis//b:7000"), "{e}");
    }

    #[test]
    fn a_refused_url_does_not_show_its_password() {
        for bad in [
            "http://admin:s3cret@10.0.0.5:6379",
            "redis:/admin:s3cret@10.0.0.5",
            "redis://admin:s3cret@/0",
        ] {
            let e = names(&redis(&[bad]), "store.urls");
            assert!(!e.contains("s3cret"), "{e}");
        }
        let mut cluster_db = redis(&["rediss://admin:s3cret@a:7000/2", "rediss://b:7000"]);
        cluster_db.cluster = Some(true);
        let e = names(&cluster_db, "store.urls");
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn cluster_seeds_take_database_0_only() {
        let e = names(
            &redis(&["redis://a:7000/3", "redis://b:7000"]),
            "store.urls",
        );
        assert!(e.contains("database 0"), "{e}");
        let mut one = redis(&["redis://a:7000/1"]);
        one.cluster = Some(true);
        names(&one, "store.urls");
        // A single Redis may use any database.
        redis(&["redis://a:6379/5"]).validate().expect("db 5");
    }

    #[test]
    fn several_urls_are_a_cluster() {
        let mut s = redis(&["redis://a:6379", "redis://b:6379"]);
        s.cluster = Some(false);
        let e = names(&s, "store.cluster");
        assert!(e.contains("seeds"), "{e}");
    }

    #[test]
    fn the_prefix_has_no_hash_tags_spaces_or_control_characters() {
        for bad in [
            "aiguard:{prod}:",
            "a}b",
            "aiguard prod:",
            "aiguard\tprod:",
            "aiguard:\n",
            "aiguard\u{7f}",
            &"p".repeat(65),
        ] {
            let mut s = redis(&["redis://127.0.0.1:6379"]);
            s.prefix = bad.to_owned();
            names(&s, "store.prefix");
        }
    }

    #[test]
    fn timeouts_lease_and_intervals_are_bounded() {
        type Set = fn(&mut StoreSettings, Duration);
        let cases: [(&str, Set, &[Duration]); 5] = [
            (
                "store.decision_timeout",
                |s, d| s.decision_timeout = d,
                &[
                    Duration::ZERO,
                    Duration::from_micros(500),
                    Duration::from_millis(10_001),
                ],
            ),
            (
                "store.connect_timeout",
                |s, d| s.connect_timeout = d,
                &[Duration::ZERO, Duration::from_secs(61)],
            ),
            (
                "store.retry_interval",
                |s, d| s.retry_interval = d,
                &[
                    Duration::ZERO,
                    Duration::from_millis(9),
                    Duration::from_secs(61),
                ],
            ),
            (
                "store.settle_delay",
                |s, d| s.settle_delay = d,
                &[Duration::from_millis(1_001), Duration::from_secs(60)],
            ),
            (
                "store.lease",
                |s, d| s.lease = d,
                &[
                    Duration::ZERO,
                    Duration::from_millis(999),
                    Duration::from_secs(24 * 3600 + 1),
                ],
            ),
        ];
        for (field, set, bad) in cases {
            for d in bad {
                let mut s = redis(&["redis://127.0.0.1:6379"]);
                set(&mut s, *d);
                let e = names(&s, field);
                assert!(e.contains(&format!("{d:?}")), "names the value: {e}");
            }
        }
    }

    #[test]
    fn nodes_and_the_node_name_are_checked() {
        for n in [0, 10_001] {
            let mut s = redis(&["redis://127.0.0.1:6379"]);
            s.nodes = n;
            names(&s, "store.nodes");
        }
        for bad in ["", "node a", "node:a", "nöde", &"n".repeat(65)] {
            let mut s = redis(&["redis://127.0.0.1:6379"]);
            s.node_name = Some(bad.to_owned());
            names(&s, "store.node_name");
        }
    }

    /// A fixture of `testdata/` (see its README).
    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/shared/testdata")
            .join(name)
    }

    fn tls(
        urls: &[&str],
        ca: Option<&str>,
        cert: Option<&str>,
        key: Option<&str>,
    ) -> StoreSettings {
        StoreSettings {
            tls_ca: ca.map(fixture),
            tls_cert: cert.map(fixture),
            tls_key: key.map(fixture),
            ..redis(urls)
        }
    }

    #[test]
    fn tls_files_are_read_into_what_the_client_trusts_and_presents() {
        let none = redis(&["rediss://redis.internal:6380"]);
        none.validate()
            .expect("rediss:// without files: the system's roots");
        assert!(none.tls_certificates().expect("no files").is_none());

        let ca = tls(
            &["rediss://redis.internal:6380"],
            Some("ca.pem"),
            None,
            None,
        );
        ca.validate().expect("a private CA");
        let certs = ca.tls_certificates().expect("read").expect("set");
        let pem = std::fs::read(fixture("ca.pem")).expect("fixture");
        assert_eq!(certs.root_cert.as_deref(), Some(&pem[..]));
        assert!(certs.client_tls.is_none());

        let mutual = tls(
            &["rediss://redis.internal:6380"],
            Some("ca.pem"),
            Some("client.pem"),
            Some("client.key"),
        );
        mutual.validate().expect("mutual TLS");
        let certs = mutual.tls_certificates().expect("read").expect("set");
        assert!(certs.client_tls.is_some());

        // A client certificate alone: the system's roots, and this node's identity.
        let identity_only = tls(
            &["rediss://redis.internal:6380"],
            None,
            Some("client.pem"),
            Some("client.key"),
        );
        identity_only.validate().expect("client certificate only");
        let certs = identity_only
            .tls_certificates()
            .expect("read")
            .expect("set");
        assert!(certs.root_cert.is_none() && certs.client_tls.is_some());

        // Cluster seeds, all rediss://.
        let cluster = tls(
            &["rediss://a:7000", "rediss://b:7000", "rediss://c:7000"],
            Some("ca.pem"),
            Some("client.pem"),
            Some("client.key"),
        );
        cluster.validate().expect("a TLS cluster");
    }

    #[test]
    fn a_missing_unreadable_or_non_pem_tls_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.pem");
        let der = dir.path().join("ca.der");
        std::fs::write(&der, [0x30, 0x82, 0x01, 0x85, 0x30, 0x82]).expect("write");
        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let url = ["rediss://redis.internal:6380"];
        let set_ca = |p: &Path| StoreSettings {
            tls_ca: Some(p.to_owned()),
            ..redis(&url)
        };

        let e = names(&set_ca(&missing), "store.tls_ca");
        assert!(e.contains("nope.pem") && e.contains("No such file"), "{e}");
        // A directory where a file should be: unreadable (even as root).
        let e = names(&set_ca(dir.path()), "store.tls_ca");
        assert!(e.contains("reading it failed"), "{e}");
        let e = names(&set_ca(&der), "store.tls_ca");
        assert!(
            e.contains("BEGIN CERTIFICATE") && e.contains("none"),
            "DER, not PEM: {e}"
        );
        let e = names(&set_ca(&broken), "store.tls_ca");
        assert!(e.contains("not valid PEM"), "{e}");
        let e = names(&set_ca(&garbage), "store.tls_ca");
        assert!(e.contains("certificate 1"), "PEM of no certificate: {e}");
        // A key where the CA should be: said so.
        let e = names(&set_ca(&fixture("client.key")), "store.tls_ca");
        assert!(e.contains("private key"), "{e}");

        let e = names(
            &tls(&url, None, Some("nope.pem"), Some("client.key")),
            "store.tls_cert",
        );
        assert!(e.contains("No such file"), "{e}");
        let e = names(
            &tls(&url, None, Some("client.key"), Some("client.key")),
            "store.tls_cert",
        );
        assert!(e.contains("none"), "a key is no certificate: {e}");
        let e = names(
            &tls(&url, None, Some("client.pem"), Some("nope.key")),
            "store.tls_key",
        );
        assert!(e.contains("No such file"), "{e}");
        let e = names(
            &tls(&url, None, Some("client.pem"), Some("client.pem")),
            "store.tls_key",
        );
        assert!(
            e.contains("unencrypted PEM private key") && e.contains("holds a certificate"),
            "a certificate is no key: {e}"
        );
        let e = names(
            &tls(&url, None, Some("client.pem"), Some("encrypted.key")),
            "store.tls_key",
        );
        assert!(e.contains("encrypted"), "{e}");
        let e = names(
            &tls(&url, None, Some("client.pem"), Some("other.key")),
            "store.tls_key",
        );
        assert!(
            e.contains("not that certificate's"),
            "a key of another certificate: {e}"
        );
    }

    #[test]
    fn a_client_certificate_needs_its_key_and_the_other_way_round() {
        let url = ["rediss://redis.internal:6380"];
        let e = names(
            &tls(&url, Some("ca.pem"), Some("client.pem"), None),
            "store.tls_key",
        );
        assert!(
            e.contains("needs its key") && e.contains("client.pem"),
            "{e}"
        );
        let e = names(&tls(&url, None, None, Some("client.key")), "store.tls_cert");
        assert!(e.contains("client.key"), "{e}");
    }

    #[test]
    fn tls_files_need_rediss_urls() {
        for (field, s) in [
            (
                "store.tls_ca",
                tls(&["redis://10.0.0.5:6379"], Some("ca.pem"), None, None),
            ),
            (
                "store.tls_cert",
                tls(
                    &["redis://a:7000", "redis://b:7000"],
                    None,
                    Some("client.pem"),
                    Some("client.key"),
                ),
            ),
        ] {
            let e = names(&s, field);
            assert!(e.contains("rediss://"), "{e}");
        }
        let mut embedded = tls(&[], Some("ca.pem"), None, None);
        embedded.backend = Backend::Embedded;
        let e = names(&embedded, "store.tls_ca");
        assert!(e.contains("embedded"), "{e}");
        // The files are not read for a section refused anyway.
        let e = names(
            &tls(&["redis://h:6379"], Some("nope.pem"), None, None),
            "store.tls_ca",
        );
        assert!(e.contains("rediss://"), "{e}");
    }

    #[test]
    fn cluster_seeds_are_all_tls_or_all_plain() {
        let e = names(
            &redis(&[
                "rediss://a:7000",
                "redis://admin:s3cret@b:7000",
                "rediss://c:7000",
            ]),
            "store.urls",
        );
        assert!(
            e.contains("redis://admin:***@b:7000") && !e.contains("s3cret"),
            "{e}"
        );
        assert!(e.contains("one scheme"), "{e}");
        redis(&["rediss://a:7000", "rediss://b:7000"])
            .validate()
            .expect("all TLS");
    }

    #[test]
    fn a_config_file_is_checked_the_same_way() {
        let from = |toml: &str| {
            crate::config::Config::from_toml(toml, std::path::Path::new("aiguard.toml"))
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        from("[store]\nbackend = \"redis\"\nurls = [\"redis://127.0.0.1:6379\"]\n")
            .expect("a good section");
        let e = from("[store]\nbackend = \"redis\"\n").unwrap_err();
        assert!(e.contains("`store.urls`"), "{e}");
        let e = from(
            "[store]\nbackend = \"redis\"\nurls = [\"redis://h\"]\ndecision_timeout = \"0s\"\n",
        )
        .unwrap_err();
        assert!(e.contains("`store.decision_timeout`"), "{e}");
        let e = from("[store]\nbackend = \"redis\"\nurls = [\"redis://h\"]\nlease = \"soon\"\n")
            .unwrap_err();
        assert!(e.contains("lease"), "{e}");
        let e = from("[store]\nbackend = \"memcached\"\n").unwrap_err();
        assert!(e.contains("memcached"), "{e}");
        let e = from("[store]\nbackend = \"redis\"\nurl = \"redis://h\"\n").unwrap_err();
        assert!(e.contains("unknown field `url`"), "{e}");
        let ca = fixture("ca.pem");
        let c = crate::config::Config::from_toml(
            &format!(
                "[store]\nbackend = \"redis\"\nurls = [\"rediss://redis.internal:6380\"]\ntls_ca = {:?}\n",
                ca.display().to_string()
            ),
            Path::new("aiguard.toml"),
        )
        .expect("tls_ca");
        assert_eq!(c.store.tls_ca.as_deref(), Some(ca.as_path()));
        let e = from("[store]\nbackend = \"redis\"\nurls = [\"rediss://h\"]\ntls_ca = \"/nonexistent/ca.pem\"\n")
            .unwrap_err();
        assert!(
            e.contains("`store.tls_ca` = \"/nonexistent/ca.pem\""),
            "{e}"
        );
    }
}
