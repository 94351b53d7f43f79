//! The `local-nix-cache` binary: parses the command line (and `serve`'s config file), sets up
//! logging and the runtime, and hands over to the library. Errors become a message and exit code
//! 1 here, and only here.

use anyhow::Context;
use local_nix_cache::cli::{self, CliError, Command};
use local_nix_cache::settings::LogFormat;
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let cli = match cli::parse(std::env::args_os().collect()) {
        Ok(c) => c,
        Err(CliError::Clap(e)) => e.exit(),
        Err(e) => return Err(e.into()),
    };
    let log_format = match &cli.command {
        Command::Serve(args) => args.log_format,
        _ => LogFormat::Plain,
    };
    init_logging(log_format);
    local_nix_cache::http::raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        match cli.command {
            Command::Serve(args) => {
                let shutdown = CancellationToken::new();
                let node = local_nix_cache::node::start(&args.settings(), shutdown.clone())?;
                let s = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    tracing::info!("shutting down");
                    s.cancel();
                });
                node.wait().await?;
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
            Command::Status(args) => {
                local_nix_cache::status::print(&args.proxy, args.json).await?;
                Ok(())
            }
        }
    })
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Plain => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}
