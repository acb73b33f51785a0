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
    let from_env = std::env::var_os("RUST_LOG").is_some();
    let filter = tracing_subscriber::EnvFilter::new(filter_directives(
        std::env::var("RUST_LOG").ok().as_deref(),
        default_level,
    ));
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

/// The log filter: `RUST_LOG` when set, else `default_level`. Automerge opens an `info` span per
/// document load, and formatting each one cost about 4 % of a receiver's CPU in a first sync of
/// 100,000 resources: it is kept at `warn` unless `RUST_LOG` names `automerge` itself.
fn filter_directives(from_env: Option<&str>, default_level: &str) -> String {
    match from_env {
        Some(env) if env.contains("automerge") => env.to_string(),
        Some(env) if env.trim().is_empty() => format!("{default_level},automerge=warn"),
        Some(env) => format!("{env},automerge=warn"),
        None => format!("{default_level},automerge=warn"),
    }
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

#[cfg(test)]
mod tests {
    use super::filter_directives;

    #[test]
    fn automerge_spans_stay_off_unless_rust_log_names_automerge() {
        assert_eq!(filter_directives(None, "info"), "info,automerge=warn");
        assert_eq!(filter_directives(Some(""), "warn"), "warn,automerge=warn");
        assert_eq!(
            filter_directives(Some("info,fieldmesh_storage=debug"), "warn"),
            "info,fieldmesh_storage=debug,automerge=warn"
        );
        assert_eq!(
            filter_directives(Some("debug,automerge=trace"), "info"),
            "debug,automerge=trace"
        );
        // With `RUST_LOG=info`, Automerge's load span is off and the node's own logs are on.
        use tracing_subscriber::layer::SubscriberExt;
        let filter = tracing_subscriber::EnvFilter::new(filter_directives(Some("info"), "warn"));
        let subscriber = tracing_subscriber::registry().with(filter);
        tracing::subscriber::with_default(subscriber, || {
            assert!(tracing::info_span!(target: "automerge::automerge", "load").is_disabled());
            assert!(!tracing::info_span!(target: "fieldmesh_node", "sync").is_disabled());
        });
    }
}
