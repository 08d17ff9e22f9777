use std::io::Write;
use std::process::ExitCode;

use capt_edge::cli::{Cli, Command, ServeArgs};
use capt_edge::engine::Engine;
use capt_edge::server::{shutdown_signal, Server};
use clap::Parser;

fn main() -> ExitCode {
    capt_edge::bench::mark_process_start();
    let cli = Cli::parse();
    // The serve command logs its life cycle; the others keep stderr quiet unless RUST_LOG says.
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.json_logs {
        // One JSON object per event; the request span's id and route come with it.
        logs.json()
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let stdout = std::io::stdout();
    match cli.command {
        Command::Classify(args) => {
            let ok = capt_edge::classify::run(&args, &mut stdout.lock())?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Bench(args) => {
            let report = capt_edge::bench::run(&args)?;
            if args.json {
                writeln!(stdout.lock(), "{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                capt_edge::bench::print_table(&report, &mut stdout.lock())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(args) => serve(&args),
        Command::AddClass(args) => class_edit(&args, true),
        Command::RemoveClass(args) => class_edit(&args, false),
        Command::Loadtest(args) => {
            let rt = tokio::runtime::Runtime::new()?;
            let reports = rt.block_on(capt_edge::loadtest::run(&args))?;
            if args.json {
                writeln!(stdout.lock(), "{}", serde_json::to_string_pretty(&reports)?)?;
            } else {
                capt_edge::loadtest::print_table(&reports, &mut stdout.lock())?;
            }
            let bad = reports
                .iter()
                .any(|r| r.non_2xx > 0 || r.transport_errors > 0);
            Ok(if bad && args.fail_on_error {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

fn class_edit(args: &capt_edge::cli::ClassEditArgs, add: bool) -> anyhow::Result<ExitCode> {
    let edit = if add {
        capt_package::classes::add_classes(&args.model, &args.names)?
    } else {
        capt_package::classes::remove_classes(&args.model, &args.names)?
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&edit)?)?;
    } else {
        let (verb, list) = if add {
            ("added", &edit.added)
        } else {
            ("removed", &edit.removed)
        };
        writeln!(
            out,
            "{verb} {} class(es): {}; the model now has {} classes ({} in {}, {:.2} s)",
            list.len(),
            list.join(", "),
            edit.classes,
            edit.classifier,
            args.model.display(),
            edit.seconds
        )?;
        writeln!(out, "restart running servers to pick up the new label set")?;
    }
    Ok(ExitCode::SUCCESS)
}

fn serve(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.server_config()?;
    let engine = Engine::load(&args.model, &args.engine)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.addr))?;
        let local = listener.local_addr()?;
        if !local.ip().is_loopback() && cfg.api_key.is_none() {
            tracing::warn!(addr = %local, "listening on a non-loopback address without --api-key: anyone who can reach it can use it");
        }
        let probes = match &args.metrics_addr {
            Some(a) => {
                let l = tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on --metrics-addr {a}: {e}"))?;
                tracing::info!(addr = %l.local_addr()?, "serving /metrics, /healthz, /readyz without the API key");
                Some(l)
            }
            None => None,
        };
        tracing::info!(addr = %local, auth = cfg.api_key.is_some(), "serving");
        let server = Server::new(engine.model, engine.backend, cfg)?;
        server
            .run_with_probes(listener, probes, shutdown_signal())
            .await?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
