//! The `sniplex` binary: CLI, logging, config loading, binding, signals. Everything else is in
//! the library.

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sniplex::config::{Config, DEFAULT_PATH};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "sniplex",
    version,
    about = "TLS SNI router: one port 443, many services, spliced zero-copy"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file.
    #[arg(short, long, global = true, default_value = DEFAULT_PATH)]
    config: PathBuf,
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Worker threads (default: one per core).
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    /// Less log output (-q warnings, -qq errors only).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "verbose")]
    quiet: u8,
    /// How bytes are moved (for benchmarks: auto is what every other mode is measured against).
    #[arg(long, global = true, hide = true, value_enum, default_value_t = Forward::Auto)]
    forward: Forward,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Forward {
    Auto,
    Splice,
    Copy,
}

impl From<Forward> for sniplex::splice::ForwardMode {
    fn from(f: Forward) -> Self {
        match f {
            Forward::Auto => Self::Auto,
            Forward::Splice => Self::Splice,
            Forward::Copy => Self::Copy,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the router (the default).
    Run,
    /// Parse and validate the config, print a summary, exit 0 (valid) or 2 (invalid).
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sniplex: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::Check) => {
            println!("{}", config.summary());
            ExitCode::SUCCESS
        }
        Some(Command::Run) | None => match serve(config, cli.threads, cli.forward.into()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn serve(
    config: Config,
    threads: Option<u16>,
    forward: sniplex::splice::ForwardMode,
) -> anyhow::Result<()> {
    // Before any thread exists: adopting inherited fds edits the environment.
    let activated = sniplex::systemd::take_activated()?;
    let activated = match activated {
        Some(a) => {
            let names: Vec<&str> = a.tcp.iter().map(|(_, n)| n.as_str()).collect();
            tracing::info!(
                "socket-activated: serving {} inherited TCP socket(s) [{}]; `listen` is ignored",
                a.tcp.len(),
                names.join(", ")
            );
            anyhow::ensure!(
                !a.tcp.is_empty(),
                "socket activation passed no TCP listening socket"
            );
            let udp: Vec<std::net::UdpSocket> = a.udp.into_iter().map(|(u, _)| u).collect();
            (a.tcp.into_iter().map(|(l, _)| l).collect(), true, udp)
        }
        None => (
            sniplex::listener::bind_all(&config.listen)?,
            false,
            Vec::new(),
        ),
    };
    let (listeners, is_activated, inherited_udp) = activated;
    // QUIC: datagram sockets from systemd when it passed any, else `[quic] listen`.
    let quic_activated = config.quic.is_some() && !inherited_udp.is_empty();
    let quic = match &config.quic {
        None if !inherited_udp.is_empty() => {
            tracing::warn!(
                "ignoring {} inherited datagram socket(s): the config has no [quic] table",
                inherited_udp.len()
            );
            Vec::new()
        }
        None => Vec::new(),
        Some(_) if !inherited_udp.is_empty() => {
            tracing::info!(
                "socket-activated: serving QUIC on {} inherited datagram socket(s); `quic.listen` is ignored",
                inherited_udp.len()
            );
            inherited_udp
        }
        Some(q) => sniplex::listener::bind_udp_all(&q.listen)?,
    };
    let metrics = match &config.metrics {
        Some(mc) => {
            let listener = mc.listen.as_ref().map(sniplex::metrics::bind).transpose()?;
            let handle =
                sniplex::metrics::install().context("cannot install the metrics recorder")?;
            if let Some(l) = &listener {
                tracing::info!(addr = %l.local_addr(), "metrics endpoint");
            }
            Some((listener, handle))
        }
        None => None,
    };
    // Everything privileged (binding) is done: drop root for good before serving.
    if let Some((uid, gid)) =
        sniplex::privileges::drop_to(config.user.as_deref(), config.group.as_deref())?
    {
        tracing::info!(uid, gid, "dropped privileges");
    }
    let threads = threads
        .map(usize::from)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // The main thread runs a single-threaded runtime for signals, reload, ACME, QUIC and the
    // metrics endpoint; with more than one thread, TCP connections run on that many workers,
    // each a single-threaded runtime of its own (see `sniplex::workers`).
    let mut builder = tokio::runtime::Builder::new_current_thread();
    let runtime = builder
        .enable_all()
        .thread_name("sniplex")
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        forward_signals(tx)?;
        let options = sniplex::Options {
            activated: is_activated,
            metrics,
            quic,
            quic_activated,
            workers: threads,
            forward,
        };
        sniplex::run(config, listeners, options, rx).await?;
        Ok(())
    })
}

/// SIGTERM/SIGINT -> shutdown, SIGHUP -> reload (also what systemd's notify-reload sends).
fn forward_signals(tx: tokio::sync::mpsc::UnboundedSender<sniplex::Control>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); sniplex::Control::Shutdown }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); sniplex::Control::Shutdown }
                _ = hup.recv() => { tracing::info!("SIGHUP: reloading"); sniplex::Control::Reload(None) }
            };
            if tx.send(msg).is_err() {
                break;
            }
        }
    });
    Ok(())
}

fn init_logging(verbose: u8, quiet: u8) {
    use std::io::IsTerminal;
    let level = match (verbose, quiet) {
        (0, 0) => "info",
        (1, _) => "debug",
        (v, _) if v >= 2 => "trace",
        (_, 1) => "warn",
        _ => "error",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("sniplex={level},warn")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}
