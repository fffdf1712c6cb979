//! The verifying load generator: not written yet.

pub mod compare;

/// `multiecho bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Server address.
    #[arg(value_parser = crate::cli::parse_addr, default_value = crate::net::DEFAULT_LISTEN)]
    pub addr: std::net::SocketAddr,
}

/// Runs `multiecho bench`.
pub fn run(_args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench is not written yet")
}
