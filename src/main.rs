//! The `local-nix-cache` binary: parses the command line, sets up logging and the runtime, and
//! hands over to the library. Errors become a message and exit code 1 here, and only here.

use anyhow::Context;
use clap::Parser;
use local_nix_cache::cli::{self, Cli, Command};
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        match cli.command {
            Command::Serve(args) => {
                let shutdown = CancellationToken::new();
                let node = cli::start(&args, shutdown.clone())?;
                wait_for_signal().await;
                tracing::info!("shutting down");
                shutdown.cancel();
                node.wait().await;
                Ok(())
            }
            Command::Peers(args) => {
                let stop = CancellationToken::new();
                let s = stop.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    s.cancel();
                });
                local_nix_cache::peers::run(args.options(), stop).await?;
                Ok(())
            }
        }
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}
