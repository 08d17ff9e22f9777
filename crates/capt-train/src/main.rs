//! `capt-train`: the command line around capt's trainer crates (data checks, tuning,
//! evaluation, benchmarks). Thin: argument parsing and reporting only.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod data_cmd;

#[derive(Parser)]
#[command(name = "capt-train", version, about = "Confusion-Aware Prompt Tuning for CLIP")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Dataset tools (validate a CoOp-layout dataset folder).
    Data(data_cmd::DataArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Data(args) => data_cmd::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
