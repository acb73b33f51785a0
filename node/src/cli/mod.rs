//! The commands of the `fieldmesh` binary, one file each.

pub mod cert;
pub mod check;
pub mod compact;
pub mod day;
pub mod demo;
pub mod init;
pub mod keys;
pub mod load;
pub mod quarantine;
pub mod run;
pub mod salvage;

use anyhow::{Context, Result};

use crate::{Command, DemoCommand};

/// Sets up logging: to stderr (`info` for commands that run nodes, `warn` otherwise), except for
/// `demo run`, whose walk-through is for a person to read: its logs go to `fieldmesh.log` in the
/// demo folder. `RUST_LOG` overrides the level, and sends the demo's logs to stderr too.
pub fn logging(cmd: &Command) -> Result<()> {
    let default_level = match cmd {
        Command::Run { .. } | Command::Demo(DemoCommand::Run { .. }) => "info",
        _ => "warn",
    };
    // Automerge opens a tracing span per load; formatting them costs more than the load.
    let default_level = format!("{default_level},automerge=warn");
    let from_env = std::env::var_os("RUST_LOG").is_some();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&default_level));
    match cmd {
        Command::Demo(DemoCommand::Run { out, .. }) if !from_env => {
            std::fs::create_dir_all(out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let path = out.join("fieldmesh.log");
            let file = std::fs::File::create(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
        _ => tracing_subscriber::fmt()
            .with_env_filter(filter)
            // Colours only on a terminal: a log redirected to a file stays readable.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .init(),
    }
    Ok(())
}

/// The async runtime of commands that run nodes: two worker threads (the engine has a thread of
/// its own; reads use the blocking pool).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}
