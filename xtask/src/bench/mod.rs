#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchTarget,
}
#[derive(clap::Subcommand, Debug)]
pub enum BenchTarget {
    /// XDP benchmarks
    Xdp(XdpBenchArgs),
}
#[derive(clap::Args, Debug)]
pub struct XdpBenchArgs {}
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("not yet")
}
