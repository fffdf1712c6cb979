//! `multiecho merge`'s flags.

use std::path::PathBuf;

use clap::Args;

/// `multiecho merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// `multiecho bench --json` reports, one per load generator (at least two).
    #[arg(value_name = "FILE", required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,
    /// Print the merged report as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}
