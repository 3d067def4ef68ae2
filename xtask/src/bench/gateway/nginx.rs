//! The two nginx instances: the upstream every leg ends at, and the `limit_req` proxy compared
//! against aiguard. Each has its own configuration, pid file, log and temp directories in the
//! run's work directory, one worker, no access log, and runs in the foreground (`daemon off`) so
//! its master is the process the benchmark started and stops.
//!
//! Both keep client and upstream connections alive for the whole run (nginx otherwise closes a
//! connection after 1,000 requests): reconnecting is not what is measured.

use std::{
    ffi::OsStr,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};

use super::{chat, process::Pinned};

/// How long nginx may take to answer its first request.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running nginx, stopped by its master's PID on drop.
pub struct Nginx {
    pub process: Pinned,
    pub addr: SocketAddr,
}

impl Nginx {
    /// Writes `conf` to `DIR/NAME.conf` and starts nginx on it, pinned to `cpu`; returns once
    /// it answers a request with `key`.
    pub fn start(
        name: &'static str,
        dir: &Path,
        conf: &str,
        cpu: usize,
        addr: SocketAddr,
        key: &str,
    ) -> Result<Self> {
        // nginx makes its temp directories, not their parent.
        let temp = temp_dir(dir, name);
        fs::create_dir_all(&temp).with_context(|| format!("creating {}", temp.display()))?;
        let path = dir.join(format!("{name}.conf"));
        fs::write(&path, conf).with_context(|| format!("writing {}", path.display()))?;
        let log = log_path(dir, name);
        let args: [&OsStr; 6] = [
            // Where errors go before the configuration's error_log is read.
            "-e".as_ref(),
            log.as_os_str(),
            "-p".as_ref(),
            dir.as_os_str(),
            "-c".as_ref(),
            path.as_os_str(),
        ];
        let mut process = Pinned::spawn(name, cpu, Path::new("nginx"), &args, &log)?;
        if let Err(error) = chat::wait_until_serving(addr, key, READY_TIMEOUT) {
            process.ensure_running()?;
            return Err(error)
                .with_context(|| format!("{name}; its log ends:\n{}", process.log_tail()));
        }
        Ok(Self { process, addr })
    }
}

fn log_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.log"))
}

fn temp_dir(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}-temp"))
}

/// The upstream: answers `POST PATH` with [`chat::RESPONSE_BODY`].
pub fn upstream_conf(dir: &Path, name: &str, listen: SocketAddr) -> String {
    let main = main_context(dir, name);
    let response = chat::RESPONSE_BODY;
    let path = chat::PATH;
    format!(
        "{main}
http {{
{http}
    server {{
        listen {listen};
        location = {path} {{
            default_type application/json;
            return 200 '{response}';
        }}
    }}
}}
",
        http = http_context(dir, name),
    )
}

/// The proxy: `limit_req` keyed on the Authorization header (every request is checked and
/// counted; `per_minute` and `burst` are set so that none is refused), to `upstream` over a
/// pool of kept-alive connections.
pub fn proxy_conf(
    dir: &Path,
    name: &str,
    listen: SocketAddr,
    upstream: SocketAddr,
    per_minute: u64,
    burst: u64,
) -> String {
    let main = main_context(dir, name);
    format!(
        "{main}
http {{
{http}
    limit_req_zone $http_authorization zone=keys:10m rate={per_minute}r/m;

    upstream inference {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}

    server {{
        listen {listen};
        location / {{
            limit_req zone=keys burst={burst} nodelay;
            limit_req_status 429;
            proxy_pass http://inference;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
",
        http = http_context(dir, name),
    )
}

/// One worker in the foreground; pid file and error log in the work directory.
fn main_context(dir: &Path, name: &str) -> String {
    let dir = dir.display();
    format!(
        "# Written by `cargo xtask bench gateway`.
daemon off;
master_process on;
worker_processes 1;
pid {dir}/{name}.pid;
error_log {dir}/{name}.log warn;
events {{
    worker_connections 1024;
}}"
    )
}

/// No access log, temp files in the work directory (the package's are root's and may not
/// exist), keep-alive for the whole run.
fn http_context(dir: &Path, name: &str) -> String {
    let temp = temp_dir(dir, name);
    let temp = temp.display();
    format!(
        "    access_log off;
    client_body_temp_path {temp}/client_body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    keepalive_timeout 300s;
    keepalive_requests 1000000;"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn upstream_answers_the_chat_path() {
        let conf = upstream_conf(Path::new("/w"), "upstream", addr(8001));
        assert!(conf.contains("listen 127.0.0.1:8001;"));
        assert!(conf.contains("location = /v1/chat/completions {"));
        assert!(conf.contains(&format!("return 200 '{}';", chat::RESPONSE_BODY)));
        assert!(conf.contains("worker_processes 1;"));
        assert!(conf.contains("daemon off;"));
        assert!(conf.contains("pid /w/upstream.pid;"));
        assert!(conf.contains("access_log off;"));
        assert!(conf.contains("client_body_temp_path /w/upstream-temp/client_body;"));
        assert_eq!(conf.matches('{').count(), conf.matches('}').count());
    }

    #[test]
    fn proxy_limits_on_the_authorization_header() {
        let conf = proxy_conf(
            Path::new("/w"),
            "proxy",
            addr(8002),
            addr(8001),
            600_000,
            1000,
        );
        assert!(conf.contains("limit_req_zone $http_authorization zone=keys:10m rate=600000r/m;"));
        assert!(conf.contains("limit_req zone=keys burst=1000 nodelay;"));
        assert!(conf.contains("limit_req_status 429;"));
        assert!(conf.contains("server 127.0.0.1:8001;"));
        assert!(conf.contains("keepalive 64;"));
        assert!(conf.contains("listen 127.0.0.1:8002;"));
        assert!(conf.contains("proxy_set_header Connection \"\";"));
        assert!(conf.contains("error_log /w/proxy.log warn;"));
        assert_eq!(conf.matches('{').count(), conf.matches('}').count());
    }
}
