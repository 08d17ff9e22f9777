//! `capt-train data ...` (owned by the datasets work; see capt-data).
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct DataArgs {}

pub fn run(_args: DataArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`capt-train data` is not wired yet")
}
