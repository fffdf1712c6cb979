//! The seeds' two clients: not written yet.

/// `multiecho client`.
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// Server address: HOST:PORT, [V6]:PORT or PORT (loopback).
    #[arg(value_parser = crate::cli::parse_addr, default_value = crate::net::DEFAULT_LISTEN)]
    pub addr: std::net::SocketAddr,
    /// Send and receive at the same time (the seeds' echo_mpclient).
    #[arg(long)]
    pub split: bool,
}

/// Runs the client.
pub fn run(_args: &ClientArgs) -> anyhow::Result<()> {
    anyhow::bail!("the client is not written yet")
}
