//! The program's own cost per packet, through BPF_PROG_TEST_RUN (no network involved), at each
//! ban count: a banned packet (parse, allowlist miss, ban hit and its counter) and a passing
//! one (parse, allowlist miss, ban miss, bucket lookup and update on the service port). Each is
//! measured twice on the same object: with an allowlist entry (every packet pays a real
//! allowlist miss; the figures the targets are judged on) and with the allowlist empty (the
//! program then skips that lookup).
//!
//! The kernel reports the mean time of `--test-runs` runs in whole nanoseconds, its loop
//! included; the drop-all program through the same harness shows what that loop costs. One
//! object per ban count is loaded and filled first (the fill is timed: aiguard's raw load
//! speed), then samples go round all of them in turn, as the VM's speed drifts; each figure is
//! the median of `--samples`.

use anyhow::{Context as _, Result, ensure};
use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use serde::Serialize;

use super::{
    Bench, SERVICE_PORT,
    load::{LoadTimes, Loader},
    median,
    netns::{RX_ADDR, RX_MAC, TX_MAC},
    object::Loaded,
    prefixes::{BANNED_SOURCE, PASSING_SOURCE},
    sender::udp_frame,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

#[derive(Debug, Serialize)]
pub struct ProgCost {
    pub test_runs: u32,
    pub samples: usize,
    /// Median per-run time of the drop-all program: the harness's own cost.
    pub harness_ns: f64,
    pub rows: Vec<ProgRow>,
}

#[derive(Debug, Serialize)]
pub struct ProgRow {
    pub bans: usize,
    pub fill_secs: f64,
    pub fill_per_sec: f64,
    /// With an allowlist entry (a real allowlist miss on every packet).
    pub ban_ns: f64,
    pub pass_ns: f64,
    /// With the allowlist empty.
    pub ban_ns_no_allowlist: f64,
    pub pass_ns_no_allowlist: f64,
    pub ban_samples: Vec<f64>,
    pub pass_samples: Vec<f64>,
}

pub fn run(bench: &Bench, loads: &mut LoadTimes) -> Result<ProgCost> {
    let runs = bench.args.test_runs;
    let samples = bench.args.samples;
    let banned = udp_frame(TX_MAC, RX_MAC, BANNED_SOURCE, RX_ADDR, SERVICE_PORT);
    let passing = udp_frame(TX_MAC, RX_MAC, PASSING_SOURCE, RX_ADDR, SERVICE_PORT);

    let mut drop_all = Loaded::drop_all(&bench.objects.drop_all)?;
    let mut objects = Vec::new();
    for &count in &bench.args.bans {
        let mut object = Loaded::aiguard(&bench.objects.aiguard)?;
        object.enable_bucket(SERVICE_PORT)?;
        let fill = object.fill_bans(&bench.prefixes.bans(count))?;
        loads.record(Loader::AiguardMapFill, count, fill);
        eprintln!(
            "bench prog: {count} bans filled in {:.2} s",
            fill.as_secs_f64()
        );
        objects.push((count, fill, object));
    }

    eprintln!("bench prog: {samples} rounds of {runs} runs per case");
    let mut harness = Vec::with_capacity(samples);
    let mut ban_samples = vec![Vec::with_capacity(samples); objects.len()];
    let mut pass_samples = vec![Vec::with_capacity(samples); objects.len()];
    let mut ban_bare = vec![Vec::with_capacity(samples); objects.len()];
    let mut pass_bare = vec![Vec::with_capacity(samples); objects.len()];
    for _ in 0..samples {
        harness.push(ns_per_run(drop_all.xdp()?, &banned, runs, XDP_DROP)?);
        for (i, (_, _, object)) in objects.iter_mut().enumerate() {
            object.set_allowlist_in_use(true)?;
            ban_samples[i].push(ns_per_run(object.xdp()?, &banned, runs, XDP_DROP)?);
            pass_samples[i].push(ns_per_run(object.xdp()?, &passing, runs, XDP_PASS)?);
            object.set_allowlist_in_use(false)?;
            ban_bare[i].push(ns_per_run(object.xdp()?, &banned, runs, XDP_DROP)?);
            pass_bare[i].push(ns_per_run(object.xdp()?, &passing, runs, XDP_PASS)?);
        }
    }

    let mut rows = Vec::new();
    for (((count, fill, object), (ban_samples, pass_samples)), (ban_bare, pass_bare)) in objects
        .into_iter()
        .zip(ban_samples.into_iter().zip(pass_samples))
        .zip(ban_bare.into_iter().zip(pass_bare))
    {
        ensure!(
            object.has_bucket(PASSING_SOURCE)?,
            "the passing packet did not go through the bucket"
        );
        let row = ProgRow {
            bans: count,
            fill_secs: fill.as_secs_f64(),
            fill_per_sec: count as f64 / fill.as_secs_f64(),
            ban_ns: median(&ban_samples),
            pass_ns: median(&pass_samples),
            ban_ns_no_allowlist: median(&ban_bare),
            pass_ns_no_allowlist: median(&pass_bare),
            ban_samples,
            pass_samples,
        };
        eprintln!(
            "bench prog: {count} bans: banned packet {:.0} ns, passing packet {:.0} ns \
             (empty allowlist: {:.0} ns, {:.0} ns)",
            row.ban_ns, row.pass_ns, row.ban_ns_no_allowlist, row.pass_ns_no_allowlist
        );
        rows.push(row);
    }
    Ok(ProgCost {
        test_runs: runs,
        samples,
        harness_ns: median(&harness),
        rows,
    })
}

/// Mean nanoseconds per run over `runs` runs on `frame`, checking the verdict.
fn ns_per_run(xdp: &Xdp, frame: &[u8], runs: u32, verdict: u32) -> Result<f64> {
    let result = xdp
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat: runs,
            ..TestRunOptions::new()
        })
        .context("BPF_PROG_TEST_RUN")?;
    ensure!(
        result.return_value == verdict,
        "the program returned {} where {verdict} was expected",
        result.return_value
    );
    Ok(result.duration.as_nanos() as f64)
}
