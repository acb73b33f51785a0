//! Starting a node: open its data directory and store, start the engine thread, serve the API,
//! run the network.

use std::future::IntoFuture;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use fieldmesh_engine::{Engine, NodeIdentity};
use fieldmesh_storage::{RedbStore, StoreOptions};

use crate::api::{NodeInfo, router};
use crate::config::DataDir;
use crate::engine_thread::{EngineHandle, Services};
use crate::net::{NetConfig, PeerTable};

/// Opens the engine of a data directory (the store is locked while it lives).
pub fn open_engine(dir: &DataDir) -> Result<Engine> {
    let rebuilt = dir.store_path().with_extension("salvage.redb");
    if !dir.store_path().exists() && rebuilt.exists() {
        anyhow::bail!(
            "a salvage of {} was interrupted: run `fieldmesh salvage --data {}` again to finish it",
            dir.path.display(),
            dir.path.display()
        );
    }
    let store = RedbStore::open(
        dir.store_path(),
        StoreOptions {
            cache_bytes: dir.config.storage.cache_mib * 1024 * 1024,
            fold_index_after: dir.config.storage.index_fold_entries,
            ..StoreOptions::default()
        },
    )
    .map_err(|e| match e {
        fieldmesh_storage::StoreError::Corrupt(_) => anyhow::anyhow!(
            "{e}; the store cannot be opened: `fieldmesh salvage --data {}` sets it aside, keeps what can still be read and lets the rest come back from peers",
            dir.path.display()
        ),
        other => other.into(),
    })?;
    Ok(Engine::new(
        Box::new(store),
        NodeIdentity::new(dir.config.system.clone(), &dir.secret(), dir.root_key()?),
        dir.config.storage.cache_documents,
    ))
}

/// Options of [`run_with`] beyond the network.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Play a modified device that skips its own write checks (tests of the trust model).
    pub byzantine: bool,
}

/// Runs a node until Ctrl-C or SIGTERM; every acknowledged write is on disk when it returns.
pub async fn run(dir: DataDir, http: Option<SocketAddr>, net: NetConfig) -> Result<()> {
    run_with(dir, http, net, RunOptions::default()).await
}

/// [`run`] with options.
pub async fn run_with(
    dir: DataDir,
    http: Option<SocketAddr>,
    net: NetConfig,
    options: RunOptions,
) -> Result<()> {
    let addr: SocketAddr = match http {
        Some(a) => a,
        None => dir.config.http.listen.parse().with_context(|| {
            format!(
                "http.listen = {:?} in the config is not an address like 127.0.0.1:8080",
                dir.config.http.listen
            )
        })?,
    };
    let mut engine = open_engine(&dir)?;
    if options.byzantine {
        tracing::warn!("playing a byzantine device: local writes are not checked");
        engine.play_byzantine();
    }
    engine.set_number_rules(dir.config.numbers.clone());
    let central = match dir.config.role {
        crate::config::Role::Central => {
            use fieldmesh_engine::central::{Central, CentralError};
            match Central::open(&mut engine, dir.config.numbers.clone()) {
                Ok(c) => Services::Running(Box::new(c)),
                // The store lost this node's certificate (salvaged afresh): serve and sync,
                // and start the services when the certificate comes back from a peer.
                Err(CentralError::NotCentral) => {
                    tracing::warn!(
                        data = %dir.path.display(),
                        "this node is configured as central but holds no central certificate: \
                         central's services wait for it (a peer brings it back after a salvage; \
                         or install it with `fieldmesh cert install`)"
                    );
                    Services::Waiting(dir.config.numbers.clone())
                }
                Err(e) => {
                    return Err(anyhow::anyhow!(
                        "{e}: is {} central's data directory?",
                        dir.path.display()
                    ));
                }
            }
        }
        _ => Services::None,
    };
    let (handle, engine_thread) = EngineHandle::spawn(engine, central)?;
    let info = NodeInfo {
        name: dir.config.name.clone(),
        role: dir.config.role.to_string(),
        system: dir.config.system.clone(),
        peer_id: dir.peer_id().to_string(),
    };
    let peers = PeerTable::default();
    let announce_api = net.announce;
    let network = tokio::spawn(crate::net::run(
        dir.keypair.clone(),
        net,
        dir.config.name.clone(),
        handle.clone(),
        peers.clone(),
    ));
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} (is another node or program using that port?)")
    })?;
    let local = listener.local_addr()?;
    // Tools on this machine (`fieldmesh quarantine`) find the API of the running node here.
    if let Err(e) = std::fs::write(dir.path.join(crate::config::ADDR_FILE), local.to_string()) {
        tracing::warn!(error = %e, "cannot record the API address in the data directory");
    }
    tracing::info!(name = %info.name, role = %info.role, peer_id = %info.peer_id, %local, "node running; FHIR API at http://{local}/fhir/");
    if announce_api {
        println!(
            "fieldmesh node {} ({}) serving http://{local}/fhir/",
            info.name, info.role
        );
    }
    let server = axum::serve(listener, router(handle.clone(), info, peers, dir.token()?));
    let mut network = network;
    // A dead engine must never look alive: if its thread ends before the node stops, the node
    // stops too (with an error, so that the service manager restarts it).
    let mut engine_thread = tokio::task::spawn_blocking(move || engine_thread.join());
    let outcome = tokio::select! {
        r = &mut engine_thread => {
            let why = match r {
                Ok(Ok(())) => "the document engine stopped".to_string(),
                Ok(Err(_)) | Err(_) => "the document engine failed (it panicked)".to_string(),
            };
            tracing::error!(%why, "stopping the node");
            network.abort();
            anyhow::bail!("{why}; every acknowledged write is on disk, start the node again");
        }
        r = server.into_future() => r.context("the HTTP server failed"),
        r = &mut network => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.context("the network failed")),
            Err(e) => Err(anyhow::anyhow!("the network task failed: {e}")),
        },
        () = shutdown_signal() => {
            tracing::info!("stopping");
            Ok(())
        }
    };
    // Sessions stop with the network; the engine commits what was sent to it before the stop,
    // answers it, and ends.
    network.abort();
    handle.stop().await;
    let _ = engine_thread.await;
    tracing::info!("node stopped");
    outcome
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
