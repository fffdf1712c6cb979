//! The command line, as one layer: every clap type and value parser of multiecho, and the
//! validation of each subcommand's flags into the typed plan the library runs
//! ([`ServerConfig`](crate::ServerConfig), [`ClientConfig`](crate::client::ClientConfig),
//! [`BenchPlan`](crate::bench::BenchPlan), [`ComparePlan`](crate::compare::ComparePlan),
//! [`CheckPlan`](crate::check::CheckPlan)), as ripgrep turns its low args into high args.
//!
//! One file per subcommand holds its flags and their validation; [`parse`] holds the value
//! parsers and `groups` the flag groups several subcommands flatten in (the target, the
//! worker count, churn, CPU pinning), so two subcommands that take the same value accept the
//! same values. Nothing outside `cli` imports from it but `main.rs`: the modules it
//! configures know nothing of clap. A value clap rejects gets clap's error; a combination
//! the plan rejects gets one `multiecho: error:` line; both exit non-zero.

mod bench;
mod check;
mod client;
mod compare;
mod groups;
mod merge;
pub mod parse;
mod serve;
mod tls;

use clap::{Parser, Subcommand};

pub use bench::BenchArgs;
pub use check::CheckArgs;
pub use client::ClientArgs;
pub use compare::CompareArgs;
pub use groups::{ChurnArgs, PinningArgs, TargetArgs, WorkersArgs};
pub use merge::MergeArgs;
pub use parse::{
    parse_addr, parse_duration, parse_idle_timeout, parse_rate, parse_size, parse_thread_stack,
    parse_usable_cpu_list, MIN_IDLE_TIMEOUT, RATE_RANGE, THREAD_STACK_RANGE,
};
pub use serve::{AdmissionArgs, ServeArgs, UdpArgs};

/// A TCP echo server with every classic concurrency model, its clients, and a verifying
/// load generator.
#[derive(Debug, Parser)]
#[command(name = "multiecho", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log less (warnings and errors only). Repeat for errors only.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "verbose")]
    pub quiet: u8,
    /// Log more (-v debug, -vv trace). RUST_LOG overrides both.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// How log lines are written to stderr: text for people (coloured only on a terminal,
    /// unless NO_COLOR is set) or json, one object per line, for log collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The format of log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the echo server.
    Serve(ServeArgs),
    /// Talk to an echo server from the terminal (the seeds' clients).
    Client(ClientArgs),
    /// Load an echo server and verify every byte it sends back.
    Bench(BenchArgs),
    /// Start the models, benchmark them taking turns, and write a side-by-side report with
    /// charts.
    Compare(CompareArgs),
    /// Check any echo server (or a proxy in front of one) for the classic echo bugs.
    Check(CheckArgs),
    /// Merge `bench --json` reports from several load generators into one.
    Merge(MergeArgs),
    /// Print a shell completion script: multiecho completions bash > /etc/bash_completion.d/multiecho
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) of multiecho, or of one subcommand: multiecho man serve | man -l -
    Man {
        /// The subcommand whose page to print (its page is multiecho-SUBCOMMAND(1)).
        #[arg(conflicts_with = "out_dir")]
        subcommand: Option<String>,
        /// Write every page instead, as DIR/multiecho.1 and DIR/multiecho-SUBCOMMAND.1 (for
        /// packaging).
        #[arg(long, value_name = "DIR")]
        out_dir: Option<std::path::PathBuf>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listen::ListenSpec;
    use crate::server::Model;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("multiecho").chain(args.iter().copied()))
    }

    #[test]
    fn serve_defaults() {
        let cli = parse(&["serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.model, Model::Epoll);
        assert_eq!(
            args.listen,
            vec![ListenSpec::tcp(
                crate::net::parse_addr("127.0.0.1:4000").unwrap()
            )]
        );
        let config = args.config();
        assert_eq!(config.backlog, 1024);
        assert_eq!(config.idle_timeout, None);
        assert_eq!(config.splice, crate::server::SpliceMode::Auto);
        assert_eq!(config.udp_gro, crate::server::UdpGroMode::Off);
    }

    #[test]
    fn serve_splice_is_auto_or_off() {
        use crate::server::SpliceMode;
        let splice = |value: &str| {
            parse(&["serve", "--splice", value]).map(|cli| match cli.command {
                Command::Serve(args) => args.config().splice,
                _ => panic!("not serve"),
            })
        };
        assert_eq!(splice("auto").unwrap(), SpliceMode::Auto);
        assert_eq!(splice("off").unwrap(), SpliceMode::Off);
        assert!(splice("on").is_err());
        assert!(splice("").is_err());
    }

    /// compare runs bench with its connection counts, sizes and threads: it must refuse,
    /// before it starts a server, every value bench would refuse run by run, and accept the
    /// values bench accepts.
    #[test]
    fn compare_accepts_what_bench_accepts() {
        let cases: [(&str, &[&str]); 3] = [
            ("--conns", &["0", "1", "999999", "1000000", "-1", "many"]),
            (
                "--size",
                &["0", "1", "1GiB", "1073741825", "2GiB", "4 parsecs"],
            ),
            ("--threads", &["0", "1", "1024", "1025", "x"]),
        ];
        for (flag, values) in cases {
            assert!(parse(&["bench", flag, "1"]).is_ok(), "bench {flag} 1");
            assert!(parse(&["compare", flag, "1"]).is_ok(), "compare {flag} 1");
            for &value in values {
                let bench = parse(&["bench", flag, value]).map(|_| ());
                let compare = parse(&["compare", flag, value]).map(|_| ());
                assert_eq!(
                    bench.is_ok(),
                    compare.is_ok(),
                    "{flag} {value}: bench {bench:?}, compare {compare:?}"
                );
            }
        }
        // And in a list, each value is checked.
        assert!(parse(&["compare", "--conns", "1,1000000"]).is_err());
        assert!(parse(&["compare", "--size", "64,2GiB"]).is_err());
    }

    #[test]
    fn shared_groups_keep_their_flags() {
        let Command::Compare(compare) =
            parse(&["compare", "-w", "3", "--churn", "--server-cpus", "0"])
                .unwrap()
                .command
        else {
            panic!("not compare")
        };
        let plan = compare.plan();
        assert_eq!(plan.workers, Some(3));
        assert_eq!(plan.requests_per_conn, Some(1));
        assert_eq!(plan.server_cpus.map(|c| c.to_string()), Some("0".into()));
        assert!(parse(&["bench", "--churn", "--requests-per-conn", "2"]).is_err());
        assert!(parse(&["serve", "--workers", "4097"]).is_err());
        let Command::Serve(serve) = parse(&["serve", "-w", "2"]).unwrap().command else {
            panic!("not serve")
        };
        assert_eq!(serve.config().workers, 2);
    }

    /// What the plans refuse: one line each, naming what is wrong.
    #[test]
    fn plans_refuse_combinations_that_cannot_work() {
        let bench_error = |args: &[&str]| {
            let Command::Bench(bench) = parse(args).unwrap().command else {
                panic!("not bench")
            };
            bench.plan().unwrap_err().to_string()
        };
        let client_error = |args: &[&str]| {
            let Command::Client(client) = parse(args).unwrap().command else {
                panic!("not client")
            };
            client.config().unwrap_err().to_string()
        };
        for (err, expected) in [
            (
                bench_error(&["bench", "udp://127.0.0.1:7", "--size", "8"]),
                "--size for udp://",
            ),
            (
                bench_error(&["bench", "udp://127.0.0.1:7", "--churn"]),
                "--churn and --requests-per-conn are for TCP",
            ),
            (
                bench_error(&["bench", "udp://127.0.0.1:7", "--interval", "1s"]),
                "--interval is not supported for udp://",
            ),
            (
                bench_error(&["bench", "udp://127.0.0.1:7", "--udp-gso", "0"]),
                "--udp-gso must be 1 to 64 datagrams per train, not 0",
            ),
            (
                bench_error(&["bench", "udp://127.0.0.1:7", "--udp-gso", "65"]),
                "--udp-gso must be 1 to 64 datagrams per train, not 65",
            ),
            (
                bench_error(&[
                    "bench",
                    "udp://127.0.0.1:7",
                    "--udp-gso",
                    "8",
                    "--size",
                    "8189",
                ]),
                "a train of 65512 bytes does not fit one UDP send of 65507 bytes (at most 7",
            ),
            (
                bench_error(&["bench", "127.0.0.1:7", "--udp-gso", "8"]),
                "--udp-gso is for udp:// targets",
            ),
            (
                bench_error(&["bench", "tls://127.0.0.1:7", "--udp-gso", "1"]),
                "--udp-gso is for udp:// targets",
            ),
            (
                bench_error(&["bench", "tcp+proxy://127.0.0.1:7"]),
                "bench speaks tcp://, udp:// and tls://",
            ),
            (
                bench_error(&["bench", "127.0.0.1", "4000"]),
                "`multiecho bench 127.0.0.1:4000`",
            ),
            (
                bench_error(&["bench", "nowhere"]),
                "invalid address 'nowhere'",
            ),
            (
                client_error(&["client", "udp://127.0.0.1:7", "--split"]),
                "--split is for TCP",
            ),
            (
                client_error(&["client", "::1", "4000"]),
                "`multiecho client [::1]:4000`",
            ),
        ] {
            assert!(err.contains(expected), "{expected}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn bench_plan_defaults() {
        let Command::Bench(bench) = parse(&["bench"]).unwrap().command else {
            panic!("not bench")
        };
        let plan = bench.plan().unwrap();
        assert_eq!(plan.conns, 50);
        assert_eq!(plan.size, 512);
        assert_eq!(plan.udp_gso, 1, "one send per datagram");
        assert_eq!(plan.duration, Some(crate::bench::DEFAULT_DURATION));
        let Command::Bench(bench) = parse(&["bench", "-n", "100"]).unwrap().command else {
            panic!("not bench")
        };
        assert_eq!(bench.plan().unwrap().duration, None);
    }

    #[test]
    fn command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
