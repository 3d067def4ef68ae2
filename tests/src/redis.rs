//! A real `redis-server` as a child process on loopback, alone or as a Redis Cluster, plain or
//! over TLS, for the tests where several daemons share limits, quotas and bans; `redis-cli` to
//! look at what they stored; and a private CA (made with the `openssl` CLI) for the TLS ones.
//!
//! Every server gets free ports and a private directory, persists nothing, and is stopped by
//! PID. Debian ships `redis-server` and `redis-cli` in `redis-tools` (the `redis-server` package
//! adds the service around it), built with TLS; `cargo xtask setup` installs both.
use std::{
    fs::{self, OpenOptions},
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tempfile::TempDir;

use crate::daemon::output_within;

const REDIS_SERVER: &str = "/usr/bin/redis-server";
const REDIS_CLI: &str = "/usr/bin/redis-cli";
const OPENSSL: &str = "/usr/bin/openssl";

/// How long a started server may take to answer on its port.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server may take to exit after SIGTERM before it gets SIGKILL. Redis acts on
/// SIGTERM at its next cron tick (100 ms), so this is generous.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one `redis-cli` command may take (a paused server makes it hang).
const CLI_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a cluster may take to agree on its slots once its nodes have met.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a restart may wait for its port to be free again.
const RESTART_PORT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one `openssl` command may take.
const OPENSSL_TIMEOUT: Duration = Duration::from_secs(30);
/// How many fresh ports a start tries when another process takes the one it picked.
const PORT_ATTEMPTS: u32 = 10;
/// Redis Cluster's hash slots.
const CLUSTER_SLOTS: usize = 16384;

const INSTALL_HINT: &str = "install Debian's redis-server and redis-tools with `cargo xtask setup`";

/// Redis tests need `redis-server` and `redis-cli`. Under `CI=true` a missing one fails the
/// test; elsewhere the test says loudly that it did not run and returns `false`.
#[must_use]
pub fn redis_available() -> bool {
    let missing: Vec<&str> = [REDIS_SERVER, REDIS_CLI]
        .into_iter()
        .filter(|bin| !Path::new(bin).is_file())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let missing = missing.join(" and ");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("this test needs {missing} and CI=true: refusing to skip ({INSTALL_HINT})");
    }
    eprintln!("NOT RUN: this test needs {missing}; {INSTALL_HINT}");
    false
}

/// TLS tests also need `openssl`, to make their CA and certificates. Under `CI=true` a missing
/// tool fails the test; elsewhere the test says loudly that it did not run and returns `false`.
#[must_use]
pub fn tls_available() -> bool {
    if !redis_available() {
        return false;
    }
    if Path::new(OPENSSL).is_file() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("this test needs {OPENSSL} and CI=true: refusing to skip (apt-get install openssl)");
    }
    eprintln!("NOT RUN: this test needs {OPENSSL} (apt-get install openssl)");
    false
}

/// A private certificate authority in its own directory (removed on drop), made with the
/// `openssl` CLI: EC P-256 keys, certificates valid two days.
pub struct TestCa {
    cert: PathBuf,
    key: PathBuf,
    /// openssl's extension sections, for the CA and what it signs.
    extensions: PathBuf,
    issued: std::cell::Cell<u32>,
    dir: TempDir,
}

/// A certificate [`TestCa`] signed, and its (unencrypted PKCS#8) key.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

const EXTENSIONS: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
# Cluster nodes present theirs as clients of each other, and redis-cli here uses it too.
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

impl TestCa {
    /// A new self-signed CA whose subject is `CN=<name>`.
    pub fn create(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("aiguard-ca-")
            .tempdir()
            .expect("creating a directory for a test CA");
        let extensions = dir.path().join("openssl.cnf");
        fs::write(&extensions, EXTENSIONS).expect("writing openssl.cnf");
        let ca = Self {
            cert: dir.path().join("ca.pem"),
            key: dir.path().join("ca.key"),
            extensions,
            issued: std::cell::Cell::new(0),
            dir,
        };
        let mut cmd = Command::new(OPENSSL);
        cmd.args(["req", "-x509", "-config"])
            .arg(&ca.extensions)
            .args(["-extensions", "ca"])
            .args([
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
            ])
            .arg("-keyout")
            .arg(&ca.key)
            .arg("-out")
            .arg(&ca.cert)
            .args(["-days", "2", "-subj"])
            .arg(format!("/CN={name}"));
        openssl(cmd);
        ca
    }

    /// The CA's certificate (PEM): what a client or server that trusts this CA is given.
    pub fn cert(&self) -> &Path {
        &self.cert
    }

    /// A server certificate for 127.0.0.1 (its only subject alternative name).
    pub fn issue_server(&self, name: &str) -> Issued {
        self.issue(name, "server")
    }

    /// A client certificate, for mutual TLS.
    pub fn issue_client(&self, name: &str) -> Issued {
        self.issue(name, "client")
    }

    fn issue(&self, name: &str, extensions: &str) -> Issued {
        let n = self.issued.get() + 1;
        self.issued.set(n);
        let base = self.dir.path().join(format!("{n}-{name}"));
        let issued = Issued {
            cert: base.with_extension("pem"),
            key: base.with_extension("key"),
        };
        let csr = base.with_extension("csr");
        let mut req = Command::new(OPENSSL);
        req.args(["req", "-new", "-config"])
            .arg(&self.extensions)
            .args([
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
            ])
            .arg("-keyout")
            .arg(&issued.key)
            .arg("-out")
            .arg(&csr)
            .arg("-subj")
            .arg(format!("/CN={name}"));
        openssl(req);
        let mut sign = Command::new(OPENSSL);
        sign.args(["x509", "-req", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(&self.cert)
            .arg("-CAkey")
            .arg(&self.key)
            // Serials differ per certificate of this CA (nothing else reads them).
            .args([
                "-set_serial",
                &(n + 1).to_string(),
                "-days",
                "2",
                "-extfile",
            ])
            .arg(&self.extensions)
            .args(["-extensions", extensions])
            .arg("-out")
            .arg(&issued.cert);
        openssl(sign);
        issued
    }

    /// TLS settings for a server presenting `server`, trusting this CA for client
    /// certificates, and requiring one if `auth_clients`.
    pub fn server_tls(&self, server: &Issued, auth_clients: bool) -> ServerTls {
        ServerTls {
            cert: server.cert.clone(),
            key: server.key.clone(),
            ca: self.cert.clone(),
            auth_clients,
        }
    }
}

/// Runs one `openssl` command, panicking with its output when it fails.
fn openssl(mut cmd: Command) {
    cmd.stdin(Stdio::null());
    let shown = format!("{cmd:?}");
    let out = output_within(cmd, OPENSSL_TIMEOUT);
    assert!(
        out.status.success(),
        "{shown} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How a server speaks TLS: only TLS (no plain port), with this certificate and key, trusting
/// `ca` for client certificates (`--tls-ca-cert-file`) and requiring one if `auth_clients`.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub auth_clients: bool,
}

/// How a spawn ended.
enum Spawned {
    Ready,
    /// Another process holds the port (or the cluster bus port): the server exited.
    PortTaken,
}

/// One `redis-server` on 127.0.0.1, with its own directory (its log is `redis.log` there).
/// Dropping it stops the server.
pub struct RedisServer {
    /// The port it serves on: its TLS port when it speaks TLS (it has no plain one then).
    port: u16,
    tls: Option<ServerTls>,
    /// The cluster bus port, for a cluster node.
    cluster_port: Option<u16>,
    log: PathBuf,
    child: Option<Child>,
    paused: bool,
    // Last: removed after the server that writes into it has stopped.
    dir: TempDir,
}

impl RedisServer {
    /// Starts a standalone server on a free port and waits until it answers.
    pub fn start() -> Self {
        Self::start_on_free_ports(false, None)
    }

    /// Starts a standalone server speaking only TLS (`--port 0 --tls-port PORT`) on a free
    /// port and waits until it is ready.
    pub fn start_tls(tls: ServerTls) -> Self {
        Self::start_on_free_ports(false, Some(tls))
    }

    /// Starts a cluster-enabled server (no slots, knowing no other node yet); with `tls`, its
    /// clients and the cluster bus speak TLS only.
    fn start_cluster_node(tls: Option<ServerTls>) -> Self {
        Self::start_on_free_ports(true, tls)
    }

    fn start_on_free_ports(cluster: bool, tls: Option<ServerTls>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("aiguard-redis-")
            .tempdir()
            .expect("creating a directory for redis-server");
        let log = dir.path().join("redis.log");
        let mut server = Self {
            port: 0,
            tls,
            cluster_port: None,
            log,
            child: None,
            paused: false,
            dir,
        };
        for _ in 0..PORT_ATTEMPTS {
            let ports = free_ports(if cluster { 2 } else { 1 });
            server.port = ports[0];
            server.cluster_port = ports.get(1).copied();
            match server.spawn() {
                Spawned::Ready => return server,
                Spawned::PortTaken => continue,
            }
        }
        panic!(
            "redis-server found its port taken {PORT_ATTEMPTS} times in a row; its log:\n{}",
            server.log_tail()
        );
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://127.0.0.1:PORT` for a TLS server.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's directory (its log, and `nodes.conf` for a cluster node).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the server (every run of it) logged.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn spawn(&mut self) -> Spawned {
        assert!(self.child.is_none(), "redis-server is already running");
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.log.display()));
        let err = out.try_clone().expect("duplicating the log file handle");
        let mut cmd = Command::new(REDIS_SERVER);
        cmd.args(["--bind", "127.0.0.1"]);
        match &self.tls {
            None => {
                cmd.arg("--port").arg(self.port.to_string());
            }
            Some(tls) => {
                cmd.args(["--port", "0", "--tls-port"])
                    .arg(self.port.to_string())
                    .arg("--tls-cert-file")
                    .arg(&tls.cert)
                    .arg("--tls-key-file")
                    .arg(&tls.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&tls.ca)
                    .args([
                        "--tls-auth-clients",
                        if tls.auth_clients { "yes" } else { "no" },
                    ]);
                if self.cluster_port.is_some() {
                    cmd.args(["--tls-cluster", "yes"]);
                }
            }
        }
        cmd.arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&self.log)
            // Nothing persists: a restarted server starts empty.
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"]);
        if let Some(cluster_port) = self.cluster_port {
            cmd.args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", "2000"])
                .arg("--cluster-port")
                .arg(cluster_port.to_string());
        }
        // Before `--logfile` takes effect (a bad argument), Redis writes to stdout and stderr.
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {REDIS_SERVER} ({INSTALL_HINT}): {e}"));
        let pid = child.id();
        self.child = Some(child);
        self.paused = false;

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("just spawned");
            if let Some(status) = child.try_wait().expect("polling redis-server") {
                self.child = None;
                if self.log().contains("Address already in use") {
                    return Spawned::PortTaken;
                }
                panic!(
                    "redis-server exited ({status}) before it answered on port {}; its log:\n{}",
                    self.port,
                    self.log_tail()
                );
            }
            // Another server on a port we just released answers too: only ours counts.
            if self.tls.is_none()
                && answering_pid(self.port, Duration::from_millis(500)) == Some(pid)
            {
                return Spawned::Ready;
            }
            // A TLS server has no plain port to ask: it logs (as `PID:M ...`) that it is ready
            // once it holds its ports, so that line of our PID says the port is ours.
            if self.tls.is_some() && self.logged_ready(pid) {
                return Spawned::Ready;
            }
            if Instant::now() >= deadline {
                self.kill_and_reap();
                panic!(
                    "redis-server (pid {pid}) did not answer on port {} within {READY_TIMEOUT:?}; its log:\n{}",
                    self.port,
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn logged_ready(&self, pid: u32) -> bool {
        let ours = format!("{pid}:");
        self.log()
            .lines()
            .any(|l| l.starts_with(&ours) && l.contains("Ready to accept connections"))
    }

    /// SIGTERM by PID, then (after [`EXIT_TIMEOUT`]) SIGKILL. Nothing to do if it is not running.
    pub fn stop(&mut self) {
        let Some(pid) = self.pid() else { return };
        let pid = Pid::from_raw(pid as i32);
        let _ = kill(pid, Signal::SIGTERM);
        if self.paused {
            // A stopped process acts on SIGTERM only once it runs again.
            let _ = kill(pid, Signal::SIGCONT);
            self.paused = false;
        }
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while Instant::now() < deadline {
            let child = self.child.as_mut().expect("running");
            if child.try_wait().ok().flatten().is_some() {
                self.child = None;
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        eprintln!("redis-server (pid {pid}) ignored SIGTERM for {EXIT_TIMEOUT:?}: SIGKILL");
        self.kill_and_reap();
    }

    fn kill_and_reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            // SIGKILL cannot be ignored, even by a stopped process: this wait is short.
            let _ = child.wait();
        }
        self.paused = false;
    }

    /// Starts the server again on the same port(s) and directory, stopping it first if it runs.
    /// Data does not survive; a cluster node keeps its identity and slots (`nodes.conf`).
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + RESTART_PORT_TIMEOUT;
        loop {
            match self.spawn() {
                Spawned::Ready => return,
                Spawned::PortTaken if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(100));
                }
                Spawned::PortTaken => panic!(
                    "another process took port {} (or cluster port {:?}) while redis-server was stopped; its log:\n{}",
                    self.port,
                    self.cluster_port,
                    self.log_tail()
                ),
            }
        }
    }

    /// SIGSTOP: the server keeps its port and accepts connections but answers nothing (a hung or
    /// very slow Redis) until [`RedisServer::resume`].
    pub fn pause(&mut self) {
        let pid = self.pid().expect("redis-server is running");
        kill(Pid::from_raw(pid as i32), Signal::SIGSTOP)
            .unwrap_or_else(|e| panic!("sending SIGSTOP to redis-server (pid {pid}): {e}"));
        self.paused = true;
    }

    /// SIGCONT after [`RedisServer::pause`].
    pub fn resume(&mut self) {
        let pid = self.pid().expect("redis-server is running");
        kill(Pid::from_raw(pid as i32), Signal::SIGCONT)
            .unwrap_or_else(|e| panic!("sending SIGCONT to redis-server (pid {pid}): {e}"));
        self.paused = false;
    }

    /// Whether the server answers PING within `timeout` (a paused one does not).
    pub fn answers_ping(&self, timeout: Duration) -> bool {
        match &self.tls {
            None => query(self.port, "PING", timeout).as_deref() == Some("PONG"),
            Some(tls) => {
                let mut cmd = cli_command(self.port, false, Some(tls), &["PING"]);
                cmd.stdin(Stdio::null());
                let (tx, rx) = std::sync::mpsc::channel();
                let child = cmd
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap_or_else(|e| panic!("starting {REDIS_CLI}: {e}"));
                let pid = child.id();
                thread::spawn(move || {
                    let _ = tx.send(child.wait_with_output());
                });
                match rx.recv_timeout(timeout) {
                    Ok(Ok(out)) => String::from_utf8_lossy(&out.stdout).trim() == "PONG",
                    Ok(Err(_)) => false,
                    Err(_) => {
                        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                        false
                    }
                }
            }
        }
    }

    /// Runs `redis-cli ARGS` against this server (e.g. `["GET", "key"]`, `["KEYS", "*"]`,
    /// `["TTL", "key"]`) and returns what it printed, without the final newline. The output is
    /// redis-cli's raw form: a value as is, nil as an empty string, one array element a line,
    /// and an error reply as its text (`ERR ...`; redis-cli still exits 0).
    pub fn cli(&self, args: &[&str]) -> String {
        cli_at(self.port, false, self.tls.as_ref(), args)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!(
                "--- redis-server log (port {}) ---\n{}\n--- end ---",
                self.port,
                self.log_tail()
            );
        }
    }
}

/// A Redis Cluster of `masters` cluster-enabled servers (no replicas), every hash slot assigned.
/// Dropping it stops every node.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters` nodes on free ports, splits the slots evenly among them, makes them meet,
    /// and waits until every node reports `cluster_state:ok` and knows every other.
    pub fn start(masters: usize) -> Self {
        Self::start_with(masters, None)
    }

    /// As [`RedisCluster::start`], every node speaking TLS only (clients and cluster bus), so
    /// that the slots it announces are TLS ports.
    pub fn start_tls(masters: usize, tls: ServerTls) -> Self {
        Self::start_with(masters, Some(tls))
    }

    fn start_with(masters: usize, tls: Option<ServerTls>) -> Self {
        assert!(masters >= 1, "a cluster needs at least one master");
        let nodes: Vec<RedisServer> = (0..masters)
            .map(|_| RedisServer::start_cluster_node(tls.clone()))
            .collect();
        for (i, node) in nodes.iter().enumerate() {
            // Distinct epochs, as `redis-cli --cluster create` sets them, so that the nodes need
            // not resolve a collision before they agree.
            expect_ok(node, &["CLUSTER", "SET-CONFIG-EPOCH", &(i + 1).to_string()]);
            let first = i * CLUSTER_SLOTS / masters;
            let last = (i + 1) * CLUSTER_SLOTS / masters - 1;
            expect_ok(
                node,
                &[
                    "CLUSTER",
                    "ADDSLOTSRANGE",
                    &first.to_string(),
                    &last.to_string(),
                ],
            );
        }
        for node in &nodes[1..] {
            let cluster_port = node.cluster_port.expect("a cluster node");
            expect_ok(
                &nodes[0],
                &[
                    "CLUSTER",
                    "MEET",
                    "127.0.0.1",
                    &node.port.to_string(),
                    &cluster_port.to_string(),
                ],
            );
        }
        let cluster = Self { nodes };
        cluster.wait_ok();
        cluster
    }

    fn wait_ok(&self) {
        let wanted_nodes = format!("cluster_known_nodes:{}", self.nodes.len());
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let infos: Vec<String> = self
                .nodes
                .iter()
                .map(|node| node.cli(&["CLUSTER", "INFO"]))
                .collect();
            let agreed = infos.iter().all(|info| {
                let lines: Vec<&str> = info.lines().map(str::trim).collect();
                lines.contains(&"cluster_state:ok") && lines.contains(&wanted_nodes.as_str())
            });
            if agreed {
                return;
            }
            if Instant::now() >= deadline {
                let views: Vec<String> = self
                    .nodes
                    .iter()
                    .zip(&infos)
                    .map(|(node, info)| {
                        format!(
                            "node on port {}:\n{info}\n{}",
                            node.port,
                            node.cli(&["CLUSTER", "NODES"])
                        )
                    })
                    .collect();
                panic!(
                    "the cluster did not reach cluster_state:ok on every node within {CLUSTER_TIMEOUT:?}:\n{}",
                    views.join("\n")
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every node's `redis://127.0.0.1:PORT` (`rediss://` over TLS).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes, in the order of their slot ranges.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// One node, to stop, pause or restart it mid-test.
    pub fn node_mut(&mut self, index: usize) -> &mut RedisServer {
        &mut self.nodes[index]
    }

    /// `redis-cli -c ARGS` against the first node: keys are followed to the node that holds
    /// their slot. Output as for [`RedisServer::cli`].
    pub fn cli(&self, args: &[&str]) -> String {
        cli_at(self.nodes[0].port, true, self.nodes[0].tls.as_ref(), args)
    }
}

/// Runs a cluster-setup command on `node` and checks that it answered `OK`.
fn expect_ok(node: &RedisServer, args: &[&str]) {
    let answer = node.cli(args);
    assert_eq!(
        answer,
        "OK",
        "`{}` on the node on port {}",
        args.join(" "),
        node.port
    );
}

/// `redis-cli [-c] [--tls ...] -h 127.0.0.1 -p PORT ARGS`. Over TLS it trusts the server's CA
/// and presents the server's own certificate (which is also a client certificate).
fn cli_command(
    port: u16,
    follow_redirects: bool,
    tls: Option<&ServerTls>,
    args: &[&str],
) -> Command {
    let mut cmd = Command::new(REDIS_CLI);
    if follow_redirects {
        cmd.arg("-c");
    }
    if let Some(tls) = tls {
        cmd.args(["--tls", "--cacert"])
            .arg(&tls.ca)
            .arg("--cert")
            .arg(&tls.cert)
            .arg("--key")
            .arg(&tls.key);
    }
    cmd.args(["-h", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(args)
        // A user's ~/.redisclirc or REDISCLI_AUTH would change what it does.
        .env_remove("REDISCLI_AUTH")
        .env("REDISCLI_RCFILE", "/dev/null");
    cmd
}

/// [`cli_command`], bounded by [`CLI_TIMEOUT`]; panics when redis-cli fails (e.g. it cannot
/// connect).
fn cli_at(port: u16, follow_redirects: bool, tls: Option<&ServerTls>, args: &[&str]) -> String {
    let mut cmd = cli_command(port, follow_redirects, tls, args);
    cmd.stdin(Stdio::null());
    let out = output_within(cmd, CLI_TIMEOUT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "`redis-cli -p {port} {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.strip_suffix('\n').unwrap_or(&stdout).to_owned()
}

/// `n` distinct ports that were free a moment ago: all bound at once (so they differ), then
/// released for the server to take.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| {
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1:0 for a port")
        })
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("a bound listener's address").port())
        .collect()
}

/// The PID of the redis-server answering on `port`, if one answers within `timeout`.
fn answering_pid(port: u16, timeout: Duration) -> Option<u32> {
    let info = query(port, "INFO server", timeout)?;
    info.lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}

/// Sends one inline command and reads a simple-string or bulk reply; `None` for anything else
/// (no connection, no answer within `timeout`, an error such as `-LOADING`). Enough to probe a
/// server without starting a process each time.
fn query(port: u16, inline: &str, timeout: Duration) -> Option<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    stream.write_all(format!("{inline}\r\n").as_bytes()).ok()?;
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    reader.read_line(&mut first).ok()?;
    let first = first.trim_end();
    if let Some(simple) = first.strip_prefix('+') {
        return Some(simple.to_owned());
    }
    let len: usize = first.strip_prefix('$')?.parse().ok()?;
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    String::from_utf8(body).ok()
}
