//! `multiecho client`'s flags, and their validation into a [`ClientConfig`].

use std::time::Duration;

use clap::Args;

use super::groups::TargetArgs;
use super::parse::parse_duration;
use crate::client::ClientConfig;
use crate::listen::ListenerKind;

/// `multiecho client`.
#[derive(Debug, Args)]
pub struct ClientArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Send and receive at the same time (the seeds' echo_mpclient): lines go out without
    /// waiting for their echo. At a terminal, a line `q` or `Q` ends the input.
    #[arg(long)]
    pub split: bool,
    /// Give up connecting after this long, e.g. 5s (default: the system's own timeout). For
    /// udp://, how long each echo may take before its datagram counts as lost (default 1s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    #[command(flatten)]
    pub tls: super::tls::TlsClientArgs,
}

impl ClientArgs {
    /// What the client is to do; a bad address or a flag its target cannot use is one error.
    pub fn config(&self) -> anyhow::Result<ClientConfig> {
        let target = self.target.spec("client")?;
        if self.split && target.kind == ListenerKind::Udp {
            anyhow::bail!("--split is for TCP; a udp:// target gets a datagram per line");
        }
        Ok(ClientConfig {
            target,
            addr_text: self.target.addr.clone(),
            split: self.split,
            timeout: self.timeout,
            tls: self.tls.options(),
        })
    }
}
