//! `streampipe-publisher`: not built yet (see the crate documentation).

use clap::Parser;

/// streampipe publisher (not implemented yet; see docs/architecture.md).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!("streampipe-publisher is not implemented yet")
}
