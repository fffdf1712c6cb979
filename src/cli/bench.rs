//! `multiecho bench`'s flags, and their validation into a [`BenchPlan`]: every check of the
//! flags against each other and against the target's protocol happens here, before any
//! connection is opened.

use std::time::Duration;

use anyhow::bail;
use clap::Args;

use super::groups::{ChurnArgs, TargetArgs};
use super::parse::{
    conns, parse_duration, parse_interval, parse_message_size, parse_percent, parse_rate, threads,
};
use crate::bench::udp::{HEADER, MAX_GSO_SEGMENTS, MAX_SIZE};
use crate::bench::{BenchPlan, DEFAULT_DURATION};
use crate::listen::ListenerKind;

/// `multiecho bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Connections to open (for udp://, flows, each with its own source port).
    #[arg(short, long, value_name = "N", default_value_t = 50, value_parser = conns())]
    pub conns: u64,
    /// Bytes per message, e.g. 512, 4k, 1MiB.
    #[arg(short, long, value_name = "BYTES", default_value = "512", value_parser = parse_message_size)]
    pub size: u64,
    /// Measure for this long, e.g. 10s (default 10s unless --requests is given).
    #[arg(short, long, value_name = "DURATION", value_parser = parse_duration,
          conflicts_with = "requests")]
    pub duration: Option<Duration>,
    /// Measure this many round trips in total instead of a duration.
    #[arg(short = 'n', long, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,
    /// Load the server this long before measuring; warm-up round trips are not counted.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Messages in flight per connection.
    #[arg(short, long, value_name = "DEPTH", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub pipeline: u64,
    /// Open loop: send R requests per second in total on a fixed schedule; latency runs from
    /// the scheduled time, so queueing is not hidden.
    #[arg(short, long, value_name = "R", value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Event-loop threads (default: one per core).
    #[arg(short, long, value_name = "T", value_parser = threads())]
    pub threads: Option<u64>,
    /// Report throughput and latency percentiles for every interval of this length too,
    /// e.g. 1s, so drift during a run shows.
    #[arg(long, value_name = "DURATION", value_parser = parse_interval)]
    pub interval: Option<Duration>,
    #[command(flatten)]
    pub churn: ChurnArgs,
    /// udp://: a datagram whose echo is not back within this long counts as lost.
    #[arg(long, value_name = "DURATION", default_value = "200ms", value_parser = parse_duration)]
    pub udp_timeout: Duration,
    /// udp://: fail (non-zero exit) if more than this percentage of the datagrams were lost.
    /// Without it loss, duplicates and reordering are reported, not failures.
    #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
    pub max_loss: Option<f64>,
    /// udp://: send each flow's datagrams as segment trains of up to N (1 to 64): one sendmsg
    /// with a UDP_SEGMENT control message carrying N datagrams of --size bytes (N × size at
    /// most 65,507), which the kernel sends as N datagrams, each still checked on its own. A
    /// flow sends once a whole train fits in --pipeline (open loop: the datagrams due, up to
    /// N), so --pipeline should be N or more. 1 (the default): one send per datagram.
    #[arg(long, value_name = "N")]
    pub udp_gso: Option<u64>,
    /// Print one JSON object on stdout instead of the text report.
    #[arg(long)]
    pub json: bool,
    /// Write a line to stderr when the load starts (for `compare`'s CPU window).
    #[arg(long, hide = true)]
    pub announce_start: bool,
    #[command(flatten)]
    pub tls: super::tls::TlsClientArgs,
}

impl BenchArgs {
    /// The run these flags describe, or the one reason it cannot be run.
    pub fn plan(&self) -> anyhow::Result<BenchPlan> {
        let target = self.target.spec("bench")?;
        // Within the parsers' ranges (connections, 1 GiB, 1,024 threads), so they fit a usize.
        let size = self.size as usize;
        let requests_per_conn = self.churn.requests_per_conn();
        match target.kind {
            ListenerKind::Tcp | ListenerKind::Tls => {}
            ListenerKind::Udp => {
                if !(HEADER..=MAX_SIZE).contains(&size) {
                    bail!(
                        "--size for udp:// must be {HEADER} to {MAX_SIZE} bytes (flow, sequence \
                         number, fill)"
                    );
                }
                if self.interval.is_some() {
                    bail!("--interval is not supported for udp:// targets yet");
                }
                if requests_per_conn.is_some() {
                    bail!(
                        "--churn and --requests-per-conn are for TCP: a UDP flow has no \
                         connection"
                    );
                }
                if let Some(n) = self.udp_gso {
                    if !(1..=MAX_GSO_SEGMENTS as u64).contains(&n) {
                        bail!("--udp-gso must be 1 to {MAX_GSO_SEGMENTS} datagrams per train, not {n}");
                    }
                    if n as usize * size > MAX_SIZE {
                        bail!(
                            "--udp-gso {n} with --size {size}: a train of {} bytes does not fit \
                             one UDP send of {MAX_SIZE} bytes (at most {} datagrams of this size)",
                            n as usize * size,
                            MAX_SIZE / size
                        );
                    }
                }
            }
            kind => bail!("bench speaks tcp://, udp:// and tls://, not {kind}://"),
        }
        if self.udp_gso.is_some() && target.kind != ListenerKind::Udp {
            bail!("--udp-gso is for udp:// targets: segment trains are UDP datagrams");
        }
        let duration = match (self.duration, self.requests) {
            (None, None) => Some(DEFAULT_DURATION),
            (duration, _) => duration,
        };
        Ok(BenchPlan {
            target,
            target_text: self.target.addr.trim().to_string(),
            conns: self.conns as usize,
            size,
            duration,
            requests: self.requests,
            warmup: self.warmup,
            pipeline: self.pipeline as usize,
            rate: self.rate,
            threads: self.threads.map(|t| t as usize),
            interval: self.interval,
            requests_per_conn,
            udp_timeout: self.udp_timeout,
            max_loss: self.max_loss,
            // Checked above: 1 to 64.
            udp_gso: self.udp_gso.map_or(1, |n| n as usize),
            json: self.json,
            announce_start: self.announce_start,
            tls: self.tls.options(),
        })
    }
}
