//! `multiecho compare`: not written yet.

/// `multiecho compare`.
#[derive(Debug, clap::Args)]
pub struct CompareArgs {}

/// Runs `multiecho compare`.
pub fn run(_args: &CompareArgs) -> anyhow::Result<()> {
    anyhow::bail!("compare is not written yet")
}
