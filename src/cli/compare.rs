//! `multiecho compare`'s flags, and their validation into a [`ComparePlan`]. A point's
//! connection count, message size and load-generator threads go through the parsers `bench`
//! uses, so a sweep that starts is one every bench run of it accepts.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::groups::{ChurnArgs, PinningArgs, WorkersArgs};
use super::parse::{conns, parse_duration, parse_message_size, parse_running_external, threads};
use crate::compare::{ComparePlan, External, TlsSweep};
use crate::server::Model;

/// `multiecho compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Models to compare, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Model::ALL)]
    pub models: Vec<Model>,
    /// Connection counts to sweep, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,50,500", value_parser = conns())]
    pub conns: Vec<u64>,
    /// Message sizes to sweep, comma-separated (e.g. 64,4k,16KiB).
    #[arg(long, value_delimiter = ',', default_value = "64,512,16384",
          value_parser = parse_message_size)]
    pub size: Vec<u64>,
    /// Measured time per point, e.g. 5, 500ms, 10s.
    #[arg(long, value_name = "DURATION", default_value = "5", value_parser = parse_duration)]
    pub duration: Duration,
    /// Unmeasured warm-up before each point's measured time.
    #[arg(long, value_name = "DURATION", default_value = "1", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Run each point N times and report the median of each figure. The servers take turns:
    /// each round gives every server one run at the point.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..1001))]
    pub repeat: u32,
    /// Load-generator threads (passed to bench as --threads).
    #[arg(long, value_name = "N", value_parser = threads())]
    pub threads: Option<u64>,
    #[command(flatten)]
    pub workers: WorkersArgs,
    #[command(flatten)]
    pub pinning: PinningArgs,
    /// Also compare an echo server that is already running: NAME=ADDR, or NAME=ADDR@PID to
    /// measure its CPU time and memory too. Repeatable.
    #[arg(long, value_name = "NAME=ADDR[@PID]", value_parser = parse_running_external)]
    pub external: Vec<External>,
    #[command(flatten)]
    pub churn: ChurnArgs,
    /// Compare UDP echo: the models that serve `udp://` listen on one too (with
    /// `--udp-rate 0`: every flow comes from this machine), the others are skipped, and
    /// `--external` servers are UDP echo servers. `--conns` counts flows; the report adds
    /// the datagrams lost, duplicated and reordered.
    #[arg(long, conflicts_with_all = ["churn", "requests_per_conn", "tls"])]
    pub udp: bool,
    /// Messages (datagrams with --udp) in flight per connection (bench's --pipeline).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub pipeline: Option<u64>,
    /// Sweep TLS too: every model also serves tls:// (as MODEL+tls) beside plain TCP, so the
    /// report shows each model's TLS cost; `--tls only` for TLS alone. Models that do not
    /// serve TLS are listed as skipped, with the server's reason. Externals speak TLS when
    /// named NAME=tls://ADDR.
    #[arg(long, value_enum, value_name = "WHICH", num_args = 0..=1,
          default_missing_value = "both")]
    pub tls: Option<TlsSweepArg>,
    /// The certificate (PEM) the TLS servers present, which bench then trusts (give tls://
    /// externals the same one). Default: a self-signed one for localhost and 127.0.0.1,
    /// made at start and written into the report directory.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Directory to write report.json, report.md and the charts into.
    #[arg(long, value_name = "DIR", default_value = "compare-report")]
    pub out: PathBuf,
    /// Measure nothing: rewrite report.md and the charts of an earlier comparison from the
    /// report.json in DIR (after a change to how they are drawn).
    #[arg(long, value_name = "DIR", hide = true)]
    pub redraw: Option<PathBuf>,
}

impl CompareArgs {
    /// The sweep these flags describe: models, connection counts and sizes each once, in
    /// the order first given.
    pub fn plan(&self) -> ComparePlan {
        ComparePlan {
            models: distinct(self.models.iter().copied()),
            // Within CONNS_RANGE and THREADS_RANGE, so they fit a usize.
            conns: distinct(self.conns.iter().map(|&c| c as usize)),
            sizes: distinct(self.size.iter().copied()),
            duration: self.duration,
            warmup: self.warmup,
            repeat: self.repeat,
            threads: self.threads.map(|t| t as usize),
            workers: self.workers.workers,
            server_cpus: self.pinning.server_cpus.clone(),
            client_cpus: self.pinning.client_cpus.clone(),
            external: self.external.clone(),
            requests_per_conn: self.churn.requests_per_conn(),
            udp: self.udp,
            pipeline: self.pipeline,
            tls: self.tls.map(|which| match which {
                TlsSweepArg::Both => TlsSweep::Both,
                TlsSweepArg::Only => TlsSweep::Only,
            }),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            out: self.out.clone(),
            redraw: self.redraw.clone(),
        }
    }
}

/// `--tls`'s values: which transports the sweep covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsSweepArg {
    /// Plain TCP and TLS, side by side.
    Both,
    /// TLS alone.
    Only,
}

/// `items` in their first order, without repeats.
fn distinct<T: PartialEq>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut out = Vec::new();
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_keeps_first_order() {
        assert_eq!(distinct([1, 50, 1, 500, 50]), [1, 50, 500]);
    }
}
