//! The `local-nix-cache` binary: parses the command line (and `serve`'s config file), sets up
//! logging and the runtime, and hands over to the library. Errors become a message and exit code
//! 1 here, and only here.

use std::future::Future;

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
    match cli.command {
        Command::Completions(args) => {
            cli::write_completions(args.shell, &mut std::io::stdout().lock());
            return Ok(());
        }
        Command::Man => {
            return cli::write_man_page(&mut std::io::stdout().lock()).context("writing the manual page");
        }
        _ => {}
    }
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
                until_signal(node.wait(), &shutdown, || tracing::info!("shutting down")).await?;
                Ok(())
            }
            Command::Peers(args) => {
                let stop = CancellationToken::new();
                until_signal(local_nix_cache::peers::run(args.options(), stop.clone()), &stop, || {}).await?;
                Ok(())
            }
            Command::Status(args) => {
                local_nix_cache::status::print(&args.proxy, args.json).await?;
                Ok(())
            }
            Command::Completions(_) | Command::Man => Ok(()),
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

/// Runs `work` to its end. A SIGINT or SIGTERM on the way calls `on_signal` and cancels `stop`,
/// and `work` (which watches `stop`) still runs to its end: no task is left behind.
async fn until_signal<T>(work: impl Future<Output = T>, stop: &CancellationToken, on_signal: impl FnOnce()) -> T {
    tokio::pin!(work);
    tokio::select! {
        r = &mut work => r,
        () = wait_for_signal() => {
            on_signal();
            stop.cancel();
            work.await
        }
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
