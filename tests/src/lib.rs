//! Support for aiguard's privileged integration tests.
//!
//! # Layout
//! - this file: the privilege gate and unique names, shared by every test;
//! - [`packets`]: crafted Ethernet frames for BPF_PROG_TEST_RUN verdict tests;
//! - [`netns`]: network namespaces and veth pairs that clean up on drop;
//! - [`daemon`]: the real `aiguard` binary as a child process, and its CLI;
//! - [`upstream`]: a fake OpenAI-compatible server for the gateway to proxy to;
//! - [`gateway`]: the gateway in the test's own process, and an HTTP client for it;
//! - [`redis`]: a real `redis-server` (alone or as a cluster) for the shared-store tests.
pub mod daemon;
pub mod gateway;
pub mod netns;
pub mod packets;
pub mod redis;
pub mod upstream;

use std::sync::atomic::{AtomicU32, Ordering};

/// Privileged tests need root (BPF, netns, bpffs). Under `CI=true` missing privileges fail the
/// test; elsewhere the test says loudly that it did not run and returns `false`.
#[must_use]
pub fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("this test needs root (BPF, network namespaces) and CI=true: refusing to skip");
    }
    eprintln!(
        "NOT RUN: this test needs root (BPF, network namespaces); run `cargo xtask test` as root"
    );
    false
}

/// A name unique to this process and call, short enough for an interface name (15 bytes).
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // Fixed-width pid, so that (pid, counter) pairs of two processes never spell the same name.
    let name = format!("{prefix}{:05}{n}", std::process::id() % 100_000);
    assert!(name.len() <= 15, "{name} is too long for an interface name");
    name
}
