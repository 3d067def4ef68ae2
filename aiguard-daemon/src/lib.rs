//! aiguard: protects an AI inference node at the NIC (XDP) and, in the request path
//! (a gateway that enforces per-key limits and quotas).
//!
//! # Layout
//! - [`config`]: the TOML configuration, its defaults and validation.
//! - [`range`]: address ranges as operators type them (parsing, host bits, /0, overlap).
//! - [`dataplane`]: the XDP program and its maps through aya: load, pin and adopt, attach,
//!   map reads and writes.
//! - [`store`]: the embedded store (redb) that keeps bans and the allowlist across restarts.
//! - [`bans`]: bans and the allowlist as a domain: validation, all-or-nothing batches, expiry,
//!   keeping store and maps in step.
//! - [`admin`]: the root-only unix-socket API and its client.
//! - [`daemon`]: `aiguard run`, start-up order, signals, background tasks.
//! - [`tiers`]: the gateway's configuration: listeners, upstreams, tiers, tenants, prices.
//! - [`keys`]: API keys, stored as hashes, checked in constant time.
//! - [`limits`]: in-memory limits (GCRA rates, concurrency, monthly quota) per tenant, key, model.
//! - [`tokens`]: token estimates with a real tokenizer.
//! - [`usage`]: the usage ledger (journal + store), per day, tenant, key and model.
//! - [`shared`]: the shared store (Redis): limits, quotas and bans of many nodes as one.
//! - [`gateway`]: the reverse proxy in front of the inference server.
//! - [`detect`]: abuse detection that bans at the NIC, challenges and suspends keys.
//! - [`metrics`]: the Prometheus `/metrics` endpoint: XDP verdicts, bans, gateway outcomes,
//!   tokens, quotas, store health.
//! - [`cli`]: the `aiguard` command line.
pub mod admin;
pub mod bans;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod detect;
pub mod gateway;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod range;
pub mod shared;
pub mod store;
pub mod tiers;
pub mod tokens;
pub mod usage;
