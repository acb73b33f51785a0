//! `fieldmesh salvage`: rebuild a damaged store from what can still be read.

use std::path::Path;

use anyhow::{Context, Result};
use fieldmesh_engine::{Engine, NodeIdentity};
use fieldmesh_node::config::DataDir;
use fieldmesh_storage::{RedbStore, StoreOptions};

/// Salvages the store of the (stopped) node in `data`: the readable documents go into a fresh
/// store file, which takes the place of the damaged one; the damaged file is kept beside it.
pub fn run(data: &Path) -> Result<()> {
    let dir = DataDir::open(data)?;
    let damaged_path = dir.store_path();
    let fresh_path = damaged_path.with_extension("salvage.redb");
    let damaged = RedbStore::open(&damaged_path, StoreOptions::default()).with_context(|| {
        format!(
            "{} cannot be opened at all; restore a backup, or initialise the node again and let it sync",
            damaged_path.display()
        )
    })?;
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
    let report = engine.salvage(&damaged, "the damaged store")?;
    drop(engine);
    drop(damaged);
    let stamp = fieldmesh_engine::now();
    let aside = damaged_path.with_extension(format!("damaged-{stamp}.redb"));
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
