//! The deployment files under `deploy/`: they parse, the daemon accepts their configuration and
//! command lines, and they keep the properties the README promises (capabilities rather than
//! full root, a restart policy, a state directory, bpffs from the host, a scrapable metrics
//! port). Unprivileged: nothing is installed or started.
//!
//! The DaemonSet is read with PyYAML in the tests' Python venv (`target/pyenv`, made by
//! `cargo xtask setup`; no YAML crate in the workspace), and the unit is checked by `systemd-analyze verify` when systemd is
//! installed.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use aiguard_daemon::{cli::Cli, config::Config};
use clap::Parser as _;
use serde_json::Value;

/// The capabilities XDP needs, and nothing that amounts to root.
const CAPABILITIES: [&str; 4] = ["BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"];
const METRICS_PORT: u64 = 9464;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn read(path: &str) -> String {
    let p = deploy(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

#[test]
fn the_sample_config_is_accepted_and_keeps_metrics_on_loopback() {
    let c = Config::from_file(&deploy("aiguard.toml")).expect("deploy/aiguard.toml is valid");
    let addr = c.metrics.listen_addr().expect("metrics are on");
    assert!(addr.ip().is_loopback(), "the default must stay loopback");
    assert_eq!(u64::from(addr.port()), METRICS_PORT);
    let text = read("aiguard.toml");
    assert!(
        text.contains("\n[metrics]"),
        "a documented [metrics] section"
    );
}

/// `Key=value` lines of a unit file's `[section]` (later lines win, as in systemd).
fn unit_values(unit: &str, section: &str, key: &str) -> Vec<String> {
    let mut current = "";
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            current = line;
            continue;
        }
        if current != format!("[{section}]") || line.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=')
            && k.trim() == key
        {
            out.push(v.trim().to_owned());
        }
    }
    out
}

#[test]
fn the_systemd_unit_runs_with_xdp_capabilities_only() {
    let unit = read("systemd/aiguard.service");
    let one = |key: &str| {
        let v = unit_values(&unit, "Service", key);
        assert_eq!(v.len(), 1, "exactly one {key}= in [Service]: {v:?}");
        v[0].clone()
    };
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let caps: Vec<String> = one(key).split_whitespace().map(str::to_owned).collect();
        let mut want: Vec<String> = CAPABILITIES.iter().map(|c| format!("CAP_{c}")).collect();
        want.sort();
        let mut got = caps.clone();
        got.sort();
        assert_eq!(got, want, "{key}");
    }
    assert_eq!(one("Restart"), "always");
    assert_eq!(one("StateDirectory"), "aiguard");
    assert_eq!(one("RuntimeDirectory"), "aiguard");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("ProtectSystem"), "strict");
    assert!(
        one("ReadWritePaths")
            .split_whitespace()
            .any(|p| p == "/sys/fs/bpf")
    );
    assert!(
        one("RestrictAddressFamilies").contains("AF_NETLINK"),
        "XDP attaches over netlink"
    );
    assert!(
        unit_values(&unit, "Service", "User").is_empty(),
        "root: bpffs is root's"
    );
    // The daemon accepts the command line.
    let exec = one("ExecStart");
    let argv: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(argv[0], "/usr/local/bin/aiguard");
    Cli::try_parse_from(argv).expect("ExecStart parses");

    let Ok(analyze) = which("systemd-analyze") else {
        eprintln!("systemd-analyze not installed: only the static checks ran");
        return;
    };
    // verify checks that ExecStart's binary exists: point it at the built one.
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = dir.path().join("aiguard");
    std::fs::write(&binary, "#!/bin/sh\n").expect("write");
    std::fs::set_permissions(&binary, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let copy = dir.path().join("aiguard.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/aiguard", &binary.display().to_string()),
    )
    .expect("write");
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}

fn which(tool: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .ok_or(())
}

/// The documents of a YAML file, as JSON, through PyYAML.
fn yaml_documents(path: &Path) -> Vec<Value> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run `cargo xtask setup` (it creates the tests' Python venv)",
        python.display()
    );
    let out = Command::new(&python)
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(path)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "parsing {} with PyYAML (tests/python/requirements.txt): {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).expect("python printed JSON") {
        Value::Array(docs) => docs,
        other => panic!("expected a list of documents, got {other}"),
    }
}

#[test]
fn the_daemonset_runs_on_the_host_network_with_bpffs_and_a_scrapable_port() {
    let docs = yaml_documents(&deploy("kubernetes/daemonset.yaml"));
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"] == k)
            .unwrap_or_else(|| panic!("no {k} in the file"))
    };
    let ds = kind("DaemonSet");
    assert_eq!(ds["apiVersion"], "apps/v1");
    let template = &ds["spec"]["template"];
    let notes = &template["metadata"]["annotations"];
    assert_eq!(notes["prometheus.io/scrape"], "true");
    assert_eq!(notes["prometheus.io/port"], METRICS_PORT.to_string());
    assert_eq!(notes["prometheus.io/path"], "/metrics");
    let spec = &template["spec"];
    assert_eq!(spec["hostNetwork"], true);

    let volumes = spec["volumes"].as_array().expect("volumes");
    let bpffs = volumes
        .iter()
        .find(|v| v["hostPath"]["path"] == "/sys/fs/bpf")
        .expect("a hostPath volume of /sys/fs/bpf");
    let containers = spec["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let mounts = c["volumeMounts"].as_array().expect("volumeMounts");
    assert!(
        mounts
            .iter()
            .any(|m| m["name"] == bpffs["name"] && m["mountPath"] == "/sys/fs/bpf"),
        "bpffs mounted at /sys/fs/bpf: {mounts:?}"
    );

    let sc = &c["securityContext"];
    assert_ne!(sc["privileged"], true);
    let added: Vec<&str> = sc["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|v| v.as_str().expect("a name"))
        .collect();
    let mut added_sorted = added.clone();
    added_sorted.sort_unstable();
    let mut want = CAPABILITIES.to_vec();
    want.sort_unstable();
    assert_eq!(added_sorted, want);
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");

    let ports = c["ports"].as_array().expect("ports");
    assert!(
        ports
            .iter()
            .any(|p| p["name"] == "metrics" && p["containerPort"] == METRICS_PORT),
        "{ports:?}"
    );
    // The metrics listen on the node's address, which only the downward API knows.
    let env = c["env"].as_array().expect("env");
    assert!(
        env.iter().any(|e| e["name"] == "NODE_IP"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"),
        "{env:?}"
    );
    let args: Vec<String> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("a string").to_owned())
        .collect();
    assert!(
        args.contains(&format!("--metrics-listen=$(NODE_IP):{METRICS_PORT}")),
        "{args:?}"
    );
    // The daemon accepts them once Kubernetes has put the address in.
    let expanded = args.iter().map(|a| a.replace("$(NODE_IP)", "10.0.0.7"));
    Cli::try_parse_from(std::iter::once("aiguard".to_owned()).chain(expanded))
        .expect("the container's args parse");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert!(c[probe].is_object(), "{probe}");
    }
    assert_ne!(
        c["readinessProbe"]["httpGet"]["path"], "/metrics",
        "a probe must not render the whole page"
    );

    let cm = kind("ConfigMap");
    let toml = cm["data"]["aiguard.toml"].as_str().expect("aiguard.toml");
    Config::from_toml(toml, Path::new("ConfigMap aiguard")).expect("the ConfigMap's config");
}
