//! `fieldmesh salvage`: rebuild a damaged store from what can still be read.

use std::path::Path;

use anyhow::{Context, Result};
use fieldmesh_engine::{Engine, NodeIdentity, SalvageReport};
use fieldmesh_node::config::DataDir;
use fieldmesh_storage::{RedbStore, StoreError, StoreOptions};

/// Salvages the store of the (stopped) node in `data`: the readable documents go into a fresh
/// store file, which takes the place of the damaged one; the damaged file is kept beside it.
pub fn run(data: &Path) -> Result<()> {
    let dir = DataDir::open(data)?;
    let damaged_path = dir.store_path();
    let fresh_path = damaged_path.with_extension("salvage.redb");
    if !damaged_path.exists() && fresh_path.exists() {
        // An earlier salvage stopped between setting the damaged file aside and putting the
        // rebuilt one in place: finish it.
        std::fs::rename(&fresh_path, &damaged_path)
            .with_context(|| format!("putting {} in place", fresh_path.display()))?;
        println!(
            "finished an interrupted salvage: {} is the rebuilt store",
            damaged_path.display()
        );
        return Ok(());
    }
    if !damaged_path.exists() {
        anyhow::bail!("{} has no store to salvage", data.display());
    }
    // A store damaged where redb keeps its own structures cannot be opened at all: then
    // nothing can be read from it, and the node starts again from an empty store (keeping its
    // key, certificate file and configuration) to get everything back from its peers.
    let damaged = match RedbStore::open(&damaged_path, StoreOptions::default()) {
        Ok(store) => Some(store),
        Err(StoreError::Corrupt(why)) => {
            println!("the store cannot be opened at all ({why}): nothing can be read from it");
            None
        }
        Err(e) => {
            return Err(e).with_context(|| format!("opening {}", damaged_path.display()));
        }
    };
    if fresh_path.exists() {
        std::fs::remove_file(&fresh_path)
            .with_context(|| format!("removing an earlier attempt {}", fresh_path.display()))?;
    }
    let fresh = RedbStore::open(&fresh_path, StoreOptions::default())?;
    let mut engine = Engine::new(
        Box::new(fresh),
        NodeIdentity::new(dir.config.system.clone(), &dir.secret(), dir.root_key()?),
        dir.config.storage.cache_documents,
    );
    let report = match &damaged {
        Some(store) => engine.salvage(store, "the damaged store")?,
        None => SalvageReport::default(),
    };
    drop(engine);
    drop(damaged);
    let stamp = fieldmesh_engine::now();
    let mut aside = damaged_path.with_extension(format!("damaged-{stamp}.redb"));
    let mut n = 1;
    while aside.exists() {
        aside = damaged_path.with_extension(format!("damaged-{stamp}-{n}.redb"));
        n += 1;
    }
    std::fs::rename(&damaged_path, &aside)
        .with_context(|| format!("setting {} aside", damaged_path.display()))?;
    std::fs::rename(&fresh_path, &damaged_path)
        .with_context(|| format!("putting {} in place", fresh_path.display()))?;
    for d in &report.damage {
        println!("damaged: {d}");
    }
    for (id, why) in &report.unreadable {
        println!("lost: {id}: {why}");
    }
    println!(
        "{}: {} documents found, {} kept, {} unreadable, {} refused by the checks (see `fieldmesh quarantine`)",
        dir.config.name,
        report.found,
        report.kept,
        report.unreadable.len(),
        report.refused
    );
    println!(
        "the damaged file is kept as {}; what was lost comes back from peers at the next sync",
        aside.display()
    );
    Ok(())
}
