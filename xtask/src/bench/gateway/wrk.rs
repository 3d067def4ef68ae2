//! Closed-loop load with wrk: as many requests as the server takes over 64 kept-alive
//! connections, for throughput and CPU per request at saturation.
//!
//! A Lua script spreads the requests over the keys (each request takes the next key; each wrk
//! thread starts at its own offset) and prints one `wrk-summary` line from `done()`, which is
//! what the benchmark reads: plain counters, unlike wrk's rounded human-readable report.

use std::{
    fmt::Write as _,
    io::Read as _,
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::chat;
use crate::shown;

/// wrk stops by itself after its duration; one that is still running this long after is killed.
const GRACE: Duration = Duration::from_secs(30);
/// Per-request timeout: far above any latency of a working run.
const REQUEST_TIMEOUT: &str = "5s";
const POLL: Duration = Duration::from_millis(50);
const SUMMARY_MARK: &str = "wrk-summary";

/// What wrk's `done()` reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub requests: u64,
    pub duration_us: u64,
    pub bytes: u64,
    pub connect_errors: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    /// Responses with a status outside 2xx and 3xx (429s among them).
    pub status_errors: u64,
    pub timeouts: u64,
}

impl Summary {
    pub fn errors(&self) -> u64 {
        self.connect_errors
            + self.read_errors
            + self.write_errors
            + self.status_errors
            + self.timeouts
    }

    pub fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / (self.duration_us as f64 / 1e6)
    }
}

/// How wrk is run.
pub struct Load<'a> {
    pub cpu: usize,
    pub threads: usize,
    pub connections: usize,
    pub script: &'a Path,
}

impl Load<'_> {
    /// Runs wrk against `addr` for `seconds` and returns its summary.
    pub fn run(&self, addr: SocketAddr, seconds: u64) -> Result<Summary> {
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", &self.cpu.to_string(), "wrk"])
            .args(["-t", &self.threads.to_string()])
            .args(["-c", &self.connections.to_string()])
            .args(["-d", &format!("{seconds}s"), "--timeout", REQUEST_TIMEOUT])
            .arg("-s")
            .arg(self.script)
            .arg(format!("http://{addr}{}", chat::PATH))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let line = shown(&cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("could not start `{line}`"))?;
        let deadline = Instant::now() + Duration::from_secs(seconds) + GRACE;
        let status = loop {
            if let Some(status) = child.try_wait().context("polling wrk")? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("`{line}` was still running {GRACE:?} after its duration; killed it");
            }
            thread::sleep(POLL);
        };
        // wrk's output is a few lines: the pipes never fill.
        let mut stdout = String::new();
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stdout.take() {
            pipe.read_to_string(&mut stdout)
                .context("reading wrk's output")?;
        }
        if let Some(mut pipe) = child.stderr.take() {
            pipe.read_to_string(&mut stderr)
                .context("reading wrk's errors")?;
        }
        if !status.success() {
            bail!(
                "`{line}` failed ({status}): {}{}",
                stdout.trim(),
                stderr.trim()
            );
        }
        parse_summary(&stdout).with_context(|| format!("`{line}` printed:\n{stdout}{stderr}"))
    }
}

/// The `wrk-summary key=value ...` line of wrk's output.
pub fn parse_summary(output: &str) -> Result<Summary> {
    let line = output
        .lines()
        .find_map(|line| line.trim().strip_prefix(SUMMARY_MARK))
        .context("no summary line (did the script's done() run?)")?;
    let mut summary = Summary::default();
    let mut seen = 0;
    for pair in line.split_whitespace() {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("not key=value: {pair:?}"))?;
        let value: u64 = value
            .parse()
            .with_context(|| format!("not a count: {pair:?}"))?;
        let field = match key {
            "requests" => &mut summary.requests,
            "duration_us" => &mut summary.duration_us,
            "bytes" => &mut summary.bytes,
            "connect" => &mut summary.connect_errors,
            "read" => &mut summary.read_errors,
            "write" => &mut summary.write_errors,
            "status" => &mut summary.status_errors,
            "timeout" => &mut summary.timeouts,
            _ => bail!("unknown field {key:?}"),
        };
        *field = value;
        seen += 1;
    }
    if seen != 8 {
        bail!("expected 8 fields, got {seen}: {line:?}");
    }
    if summary.duration_us == 0 {
        bail!("a run of no time: {line:?}");
    }
    Ok(summary)
}

/// The Lua script: every request is `POST PATH` with the next key as a bearer token and
/// [`chat::REQUEST_BODY`]; `done()` prints the summary line.
pub fn script(keys: &[String]) -> Result<String> {
    let mut out = String::new();
    out.push_str(
        "-- Written by `cargo xtask bench gateway`: each request takes the next key (each thread\n\
         -- starting at its own offset); done() prints the counters the benchmark reads.\n\
         local keys = {\n",
    );
    for key in keys {
        let _ = writeln!(out, "  {},", lua_string(key)?);
    }
    let _ = write!(
        out,
        r#"}}
local body = {body}
local requests = {{}}
local index = 1

local threads = 0
function setup(thread)
  thread:set("offset", threads * 499)
  threads = threads + 1
end

function init(args)
  for i, key in ipairs(keys) do
    requests[i] = wrk.format("POST", {path}, {{
      ["Authorization"] = "Bearer " .. key,
      ["Content-Type"] = "application/json",
    }}, body)
  end
  index = (offset or 0) % #requests + 1
end

function request()
  local r = requests[index]
  index = index % #requests + 1
  return r
end

function done(summary, latency, reqs)
  local e = summary.errors
  io.write(string.format(
    "{SUMMARY_MARK} requests=%d duration_us=%d bytes=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"#,
        body = lua_string(chat::REQUEST_BODY)?,
        path = lua_string(chat::PATH)?,
    );
    Ok(out)
}

/// `value` as a double-quoted Lua string. Keys and bodies are printable ASCII; anything else is
/// refused rather than escaped.
fn lua_string(value: &str) -> Result<String> {
    if let Some(c) = value
        .chars()
        .find(|c| !c.is_ascii() || c.is_ascii_control())
    {
        bail!("{value:?}: unexpected character {c:?} for a Lua string");
    }
    Ok(format!(
        "\"{}\"",
        value.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What wrk 4.1 prints with the script, errors included.
    const OUTPUT: &str = "\
Running 5s test @ http://127.0.0.1:40001/v1/chat/completions
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.51ms  310.22us   9.87ms   91.02%
    Req/Sec    25.61k   812.33    26.90k    78.00%
  127453 requests in 5.00s, 52.15MB read
  Non-2xx or 3xx responses: 12
Requests/sec:  25487.12
Transfer/sec:     10.43MB
wrk-summary requests=127453 duration_us=5000612 bytes=54683904 connect=0 read=0 write=0 status=12 timeout=0
";

    #[test]
    fn parses_the_done_summary() {
        let summary = parse_summary(OUTPUT).unwrap();
        assert_eq!(
            summary,
            Summary {
                requests: 127_453,
                duration_us: 5_000_612,
                bytes: 54_683_904,
                status_errors: 12,
                ..Summary::default()
            }
        );
        assert_eq!(summary.errors(), 12);
        assert!((summary.requests_per_sec() - 127_453.0 / 5.000_612).abs() < 1e-9);
    }

    #[test]
    fn refuses_incomplete_summaries() {
        assert!(parse_summary("Requests/sec: 25487.12\n").is_err());
        assert!(parse_summary("wrk-summary requests=1 duration_us=10\n").is_err());
        assert!(
            parse_summary(
                "wrk-summary requests=1 duration_us=0 bytes=0 connect=0 read=0 write=0 status=0 timeout=0"
            )
            .is_err()
        );
        assert!(parse_summary("wrk-summary requests=x").is_err());
    }

    #[test]
    fn script_holds_every_key_quoted() {
        let keys = vec!["aig_one".to_owned(), "aig_\"two\"".to_owned()];
        let lua = script(&keys).unwrap();
        assert!(lua.contains("  \"aig_one\",\n"));
        assert!(lua.contains("  \"aig_\\\"two\\\"\",\n"));
        assert!(lua.contains("wrk.format(\"POST\", \"/v1/chat/completions\""));
        assert!(lua.contains(&format!(
            "local body = \"{}\"",
            chat::REQUEST_BODY.replace('"', "\\\"")
        )));
        assert!(script(&["bad\nkey".to_owned()]).is_err());
    }
}
