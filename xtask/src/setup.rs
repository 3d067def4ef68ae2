//! `cargo xtask setup`: bring a fresh machine to where aiguard builds and its tests run.
//!
//! Each step checks before it acts, so a second run is quick (no network, no `apt-get update`)
//! and changes nothing. Only the steps that have something to do need root.

use std::{
    env, fs,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{run_checked, stdout_of, workspace_root};

/// The toolchain that builds the eBPF crate. The plain name, never a dated one: with
/// `RUSTUP_AUTO_INSTALL=0` a dated name would be a toolchain that is not there.
pub(crate) const NIGHTLY: &str = "nightly";

/// `rust-src` for `-Z build-std=core`; `llvm-tools` (LLVM's tools at the nightly's own LLVM
/// version) completes the set verified to build aya eBPF crates.
const EBPF_COMPONENTS: &[&str] = &["rust-src", "llvm-tools"];

/// What `cargo xtask test` runs before the tests, on both toolchains (stable for the host
/// crates, nightly for the eBPF crate).
const LINT_COMPONENTS: &[&str] = &["rustfmt", "clippy"];

/// The bpf-linker release known to work with aya 0.14 and the nightly's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the tests and benchmarks call, with what they are needed for.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip: network namespaces and veth pairs"),
    ("nftables", "nft"),
    ("ipset", "ipset"),
    ("iptables", "iptables"),
    ("netsniff-ng", "trafgen: packet floods for the benchmarks"),
    ("ethtool", "ethtool: NIC and veth settings"),
    ("util-linux", "nsenter: commands inside a test namespace"),
    (
        "nginx",
        "nginx: the reverse proxy the gateway benchmark compares against",
    ),
    ("wrk", "wrk: HTTP load for the gateway benchmark"),
    (
        "redis-server",
        "redis-server: the shared store (limits, quotas, bans) of the multi-daemon tests",
    ),
    (
        "redis-tools",
        "redis-cli (cluster forming, assertions on stored keys) and the server binary itself",
    ),
    (
        "prometheus",
        "promtool (alert rules checked and unit-tested) and the Prometheus the metrics test scrapes with",
    ),
];

/// Debian's policy hook: while it exits 101, package scripts start no services (nginx's would
/// otherwise take port 80 on the build machine, redis-server's port 6379, prometheus' 9090; the
/// tests start their own redis-server and prometheus on free ports).
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

const BPFFS: &str = "/sys/fs/bpf";

/// The venv the official OpenAI Python client's tests run in, relative to the workspace root.
const PYTHON_VENV: &str = "target/pyenv";
/// What goes into it, relative to the workspace root.
const PYTHON_REQUIREMENTS: &str = "tests/python/requirements.txt";
/// In the venv: the SHA-256 of the requirements it was installed from, so that a second run
/// knows without asking PyPI.
const REQUIREMENTS_STAMP: &str = "requirements.sha256";

pub fn run() -> Result<()> {
    let started = Instant::now();
    ensure_ebpf_toolchain()?;
    ensure_rust_components(None, LINT_COMPONENTS)?;
    ensure_rust_components(Some(NIGHTLY), LINT_COMPONENTS)?;
    ensure_debian_packages()?;
    ensure_bpffs()?;
    ensure_python_venv()?;
    eprintln!("setup: done in {:.1?}", started.elapsed());
    Ok(())
}

/// What building the eBPF crate needs (nightly's `rust-src`, `llvm-tools`, bpf-linker). None of
/// it needs root, so `build-ebpf` calls this alone.
pub(crate) fn ensure_ebpf_toolchain() -> Result<()> {
    ensure_rust_components(Some(NIGHTLY), EBPF_COMPONENTS)?;
    ensure_bpf_linker()
}

/// Adds the `wanted` rustup components to `toolchain` (the workspace's own toolchain when
/// `None`) unless they are all there already.
fn ensure_rust_components(toolchain: Option<&str>, wanted: &[&str]) -> Result<()> {
    let label = toolchain.unwrap_or("workspace toolchain");
    let mut list = Command::new("rustup");
    list.args(["component", "list", "--installed"]);
    toolchain_arg(&mut list, toolchain);
    let installed = stdout_of(list.current_dir(workspace_root()))
        .with_context(|| format!("listing the rust components of {label}"))?;
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|component| {
            !installed
                .lines()
                .any(|line| is_component(line.trim(), component))
        })
        .collect();
    if missing.is_empty() {
        eprintln!(
            "setup: rust components {} ({label}): installed",
            wanted.join(", ")
        );
        return Ok(());
    }
    let mut add = Command::new("rustup");
    add.args(["component", "add"]).args(&missing);
    toolchain_arg(&mut add, toolchain);
    run_checked(add.current_dir(workspace_root()))
        .with_context(|| format!("adding rust components to {label}"))
}

fn toolchain_arg(cmd: &mut Command, toolchain: Option<&str>) {
    if let Some(toolchain) = toolchain {
        cmd.args(["--toolchain", toolchain]);
    }
}

/// rustup lists most components with the host triple appended (`clippy-x86_64-unknown-linux-gnu`)
/// but target-independent ones bare (`rust-src`).
fn is_component(listed: &str, component: &str) -> bool {
    listed
        .strip_prefix(component)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
}

/// Installs bpf-linker, built against the nightly toolchain's own libLLVM: it must read the
/// bitcode that this rustc emits, and Debian's LLVM is older. Skipped when the right version
/// already runs (which also proves it still finds its libLLVM).
fn ensure_bpf_linker() -> Result<()> {
    // With CARGO_INSTALL_ROOT set, `cargo install` puts it there: check that copy, not whatever
    // PATH finds, or an existing one elsewhere would make the install never happen.
    let install_root = env::var_os("CARGO_INSTALL_ROOT").map(PathBuf::from);
    let linker = match &install_root {
        Some(root) => root.join("bin/bpf-linker"),
        None => PathBuf::from("bpf-linker"),
    };
    if bpf_linker_version(&linker).as_deref() == Some(BPF_LINKER_VERSION) {
        eprintln!("setup: bpf-linker {BPF_LINKER_VERSION}: installed");
        return Ok(());
    }
    install_bpf_linker()?;

    let installed = bpf_linker_version(&linker);
    if installed.as_deref() != Some(BPF_LINKER_VERSION) {
        bail!(
            "installed bpf-linker {BPF_LINKER_VERSION} but `{} --version` reports {installed:?}",
            linker.display()
        );
    }
    // rustc looks bpf-linker up on PATH when it links for bpfel-unknown-none.
    if bpf_linker_version(Path::new("bpf-linker")).as_deref() != Some(BPF_LINKER_VERSION) {
        eprintln!(
            "setup: warning: the bpf-linker found on PATH is not {}; put its directory first in PATH",
            linker.display()
        );
    }
    Ok(())
}

/// The version `linker --version` reports (`bpf-linker 0.13.0`), or `None` when it does not run.
fn bpf_linker_version(linker: &Path) -> Option<String> {
    let output = Command::new(linker).arg("--version").output().ok()?;
    if !output.status.success() {
        return None;
    }
    let stdout = String::from_utf8(output.stdout).ok()?;
    stdout.split_whitespace().last().map(str::to_owned)
}

fn install_bpf_linker() -> Result<()> {
    let sysroot =
        stdout_of(Command::new("rustup").args(["run", NIGHTLY, "rustc", "--print", "sysroot"]))
            .context("locating the nightly sysroot")?;
    let sysroot = PathBuf::from(sysroot.trim());
    let lib_dir = sysroot.join("lib");
    let libllvm = nightly_libllvm(&lib_dir)?;
    let llvm_major = llvm_major_version(&libllvm)?;

    // bpf-linker's build script links `-lLLVM` from $LLVM_PREFIX/lib and sets its rpath there;
    // the toolchain only ships the versioned file, so give it the unversioned name.
    let link = lib_dir.join("libLLVM.so");
    if fs::read_link(&link).ok().as_deref() != Some(Path::new(&libllvm)) {
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        symlink(&libllvm, &link)
            .with_context(|| format!("linking {} -> {libllvm}", link.display()))?;
        eprintln!("setup: linked {} -> {libllvm}", link.display());
    }

    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm_major} from the nightly toolchain (a few minutes)"
    );
    run_checked(
        Command::new("cargo")
            .env("LLVM_PREFIX", &sysroot)
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{llvm_major}")),
    )
    .context("installing bpf-linker")
}

/// The file name of the nightly's shared libLLVM, e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`.
fn nightly_libllvm(lib_dir: &Path) -> Result<String> {
    let mut candidates: Vec<String> = fs::read_dir(lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("libLLVM.so."))
        .collect();
    candidates.sort();
    candidates.into_iter().next().with_context(|| {
        format!(
            "no libLLVM.so.* in {}: is the nightly toolchain complete?",
            lib_dir.display()
        )
    })
}

/// `libLLVM.so.22.1-rust-...` -> `22`: bpf-linker picks its LLVM bindings by a `llvm-N` feature.
fn llvm_major_version(libllvm: &str) -> Result<&str> {
    libllvm
        .strip_prefix("libLLVM.so.")
        .and_then(|version| version.split(['.', '-']).next())
        .filter(|major| !major.is_empty() && major.bytes().all(|b| b.is_ascii_digit()))
        .with_context(|| format!("no LLVM major version in {libllvm}"))
}

fn ensure_debian_packages() -> Result<()> {
    let mut missing = Vec::new();
    for &(package, why) in DEBIAN_PACKAGES {
        if !dpkg_installed(package)? {
            eprintln!("setup: Debian package {package} ({why}) is missing");
            missing.push(package);
        }
    }
    let names: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .map(|&(package, _)| package)
        .collect();
    if missing.is_empty() {
        eprintln!("setup: Debian packages {}: installed", names.join(", "));
        return Ok(());
    }
    install_debian_packages(&missing)
}

fn install_debian_packages(missing: &[&str]) -> Result<()> {
    require_root(&format!(
        "installing Debian packages ({})",
        missing.join(", ")
    ))?;
    // Only now: the package lists may be absent on a fresh machine, and updating them is the
    // slow, network-bound part that a second run must not repeat.
    run_checked(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .arg("update"),
    )
    .context("updating the Debian package lists")?;
    let had_policy = Path::new(POLICY_RC_D).exists();
    if !had_policy {
        fs::write(POLICY_RC_D, "#!/bin/sh\nexit 101\n")
            .with_context(|| format!("writing {POLICY_RC_D}"))?;
        fs::set_permissions(POLICY_RC_D, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {POLICY_RC_D} executable"))?;
    }
    let installed = run_checked(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(missing),
    )
    .context("installing Debian packages");
    if !had_policy {
        let _ = fs::remove_file(POLICY_RC_D);
    }
    installed
}

/// `dpkg -s` also succeeds for removed packages whose config files remain, so read the status.
fn dpkg_installed(package: &str) -> Result<bool> {
    let output = Command::new("dpkg")
        .args(["-s", package])
        .output()
        .context("running dpkg (setup expects a Debian system)")?;
    Ok(output.status.success()
        && String::from_utf8_lossy(&output.stdout)
            .lines()
            .any(|line| line.trim() == "Status: install ok installed"))
}

/// The daemon pins its maps under /sys/fs/bpf so a restarted daemon adopts them; the kernel does
/// not mount bpffs at boot here.
pub(crate) fn ensure_bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some(BPFFS) && fields.next() == Some("bpf")
    });
    if mounted {
        eprintln!("setup: bpffs at {BPFFS}: mounted");
        return Ok(());
    }
    require_root(&format!("mounting bpffs at {BPFFS}"))?;
    run_checked(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
        .with_context(|| format!("mounting bpffs at {BPFFS}"))
}

/// A venv at `target/pyenv` with `tests/python/requirements.txt` installed. Skipped when the
/// venv's interpreter runs and it was installed from requirements of the same hash.
fn ensure_python_venv() -> Result<()> {
    let root = workspace_root();
    let venv = root.join(PYTHON_VENV);
    let python = venv.join("bin/python");
    let requirements = root.join(PYTHON_REQUIREMENTS);
    let stamp = venv.join(REQUIREMENTS_STAMP);
    let wanted = sha256_of(&requirements)?;
    let runs = python_runs(&python);
    if runs && fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == wanted) {
        eprintln!("setup: Python venv {PYTHON_VENV} ({PYTHON_REQUIREMENTS}): installed");
        return Ok(());
    }
    if !runs {
        create_venv(&venv)?;
    }
    // Gone until the install succeeds, so that an interrupted one is redone.
    if stamp.exists() {
        fs::remove_file(&stamp).with_context(|| format!("removing {}", stamp.display()))?;
    }
    eprintln!("setup: installing {PYTHON_REQUIREMENTS} into {PYTHON_VENV}");
    run_checked(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(&requirements),
    )
    .with_context(|| format!("installing {PYTHON_REQUIREMENTS} into {PYTHON_VENV}"))?;
    fs::write(&stamp, format!("{wanted}\n")).with_context(|| format!("writing {}", stamp.display()))
}

/// Whether `python` starts (a venv whose base interpreter is gone does not).
fn python_runs(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", ""])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `python3 -m venv`, after installing Debian's python3-venv if the interpreter lacks ensurepip
/// (Debian splits it out of python3).
fn create_venv(venv: &Path) -> Result<()> {
    eprintln!("setup: creating the Python venv {PYTHON_VENV}");
    let attempt = || -> Result<std::process::Output> {
        // A venv that no longer runs, or the rest of a failed attempt.
        if venv.exists() {
            fs::remove_dir_all(venv).with_context(|| format!("removing {}", venv.display()))?;
        }
        Command::new("python3")
            .args(["-m", "venv"])
            .arg(venv)
            .output()
            .context("running python3 (setup expects it on PATH)")
    };
    let mut output = attempt()?;
    let says = |output: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    };
    if !output.status.success() && says(&output).contains("ensurepip") {
        eprintln!("setup: python3 has no ensurepip: installing Debian's python3-venv");
        install_debian_packages(&["python3-venv"])?;
        output = attempt()?;
    }
    if !output.status.success() {
        let _ = fs::remove_dir_all(venv);
        bail!(
            "`python3 -m venv {}` failed ({}): {}",
            venv.display(),
            output.status,
            says(&output).trim()
        );
    }
    Ok(())
}

/// The hex SHA-256 of `path`'s contents (coreutils' `sha256sum`).
fn sha256_of(path: &Path) -> Result<String> {
    let out = stdout_of(Command::new("sha256sum").arg(path))
        .with_context(|| format!("hashing {}", path.display()))?;
    out.split_whitespace()
        .next()
        .map(str::to_owned)
        .with_context(|| format!("`sha256sum {}` printed nothing", path.display()))
}

/// Fails with a message that says what needed root, instead of a confusing permission error
/// from apt-get or mount.
pub(crate) fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} needs root: run this as root (e.g. `sudo -E cargo xtask ...`)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_match_with_or_without_host_triple() {
        assert!(is_component("rust-src", "rust-src"));
        assert!(is_component("clippy-x86_64-unknown-linux-gnu", "clippy"));
        assert!(is_component(
            "llvm-tools-x86_64-unknown-linux-gnu",
            "llvm-tools"
        ));
        assert!(!is_component(
            "rust-std-x86_64-unknown-linux-gnu",
            "rust-src"
        ));
        assert!(!is_component("rustfmtx", "rustfmt"));
    }

    #[test]
    fn llvm_major_from_library_name() {
        assert_eq!(
            llvm_major_version("libLLVM.so.22.1-rust-1.97.0-nightly").unwrap(),
            "22"
        );
        assert_eq!(llvm_major_version("libLLVM.so.19-rust-1.80").unwrap(), "19");
        assert!(llvm_major_version("libLLVM.so.rust").is_err());
    }
}
