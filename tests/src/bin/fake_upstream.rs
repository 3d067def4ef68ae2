//! `aiguard-fake-upstream`: the fake OpenAI-compatible server of `aiguard_tests::upstream` as a
//! process, for the Python client tests and the benchmarks. Prints `listening on ADDR` once
//! bound, then serves until SIGTERM or SIGINT.
use std::{io::Write as _, net::SocketAddr, time::Duration};

use aiguard_tests::upstream::{UpstreamOptions, serve};
use anyhow::{Context as _, Result};
use clap::Parser;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};

#[derive(Parser)]
#[command(about = "A fake OpenAI-compatible inference server for aiguard's tests and benchmarks")]
struct Args {
    /// Address to listen on (port 0: any free port; the bound one is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Words in each completion, unless a request's x-test-completion-words says otherwise.
    #[arg(long, default_value_t = 8)]
    completion_words: usize,
    /// Milliseconds between streamed events, unless x-test-chunk-delay-ms says otherwise.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// The model listed by GET /v1/models.
    #[arg(long, default_value = "gpt-test")]
    model: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let mut terminate = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    // A parent reads this line to learn the port: it must not wait in a buffer.
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on {addr}").context("writing to stdout")?;
    stdout.flush().context("flushing stdout")?;

    let options = UpstreamOptions {
        completion_words: args.completion_words,
        chunk_delay: Duration::from_millis(args.chunk_delay_ms),
        model: args.model,
        // Nobody reads the log of a separate process, and under load it would only grow.
        record_requests: false,
        capacity: None,
    };
    serve(listener, options, async {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
    .await;
    Ok(())
}
