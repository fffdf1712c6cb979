//! `multiecho check`'s flags, and their validation into a [`CheckPlan`].

use std::time::Duration;

use clap::Args;

use super::parse::{parse_duration, parse_max_payload};
use crate::check::CheckPlan;

/// `multiecho check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The server to check: HOST:PORT or tcp://HOST:PORT, or tcp+proxy://HOST:PORT for a
    /// listener that wants a PROXY protocol header first (each connection sends a v1 line
    /// naming its own two ends, as HAProxy in front would).
    #[arg(value_name = "TARGET")]
    pub target: String,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Run only this check (repeat for several). `--list` names them.
    #[arg(long, value_name = "NAME")]
    pub only: Vec<String>,
    /// Do not run this check (repeat for several).
    #[arg(long, value_name = "NAME")]
    pub skip: Vec<String>,
    /// List the checks and what each one does, then exit.
    #[arg(long)]
    pub list: bool,
    /// Open at most N connections at once (the `concurrent` check opens this many).
    #[arg(long, value_name = "N", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(2..=10_000))]
    pub max_conns: u64,
    /// The largest payload of the `sizes` check, e.g. 1MiB (at most 64MiB).
    #[arg(long, value_name = "BYTES", default_value = "64MiB", value_parser = parse_max_payload)]
    pub max_size: u64,
    /// How long the `idle` check leaves a connection silent before using it again.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub idle_pause: Duration,
    /// Bound the whole battery: no check starts, and no exchange waits, past this long;
    /// checks not run count as failed.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub time_limit: Duration,
}

impl CheckArgs {
    /// The battery these flags describe.
    pub fn plan(&self) -> CheckPlan {
        CheckPlan {
            target: self.target.clone(),
            json: self.json,
            only: self.only.clone(),
            skip: self.skip.clone(),
            list: self.list,
            // Within the parsers' ranges (10,000 connections, 64 MiB), so they fit a usize.
            max_conns: self.max_conns as usize,
            max_size: self.max_size as usize,
            idle_pause: self.idle_pause,
            time_limit: self.time_limit,
        }
    }
}
