//! `fieldmesh check`: a stopped node's counters, space per table, and the index check.

use std::path::Path;

use anyhow::{Result, bail};
use fieldmesh_node::config::DataDir;
use fieldmesh_node::node;
use fieldmesh_storage::{RedbStore, StoreOptions};

/// Checks the store of the node in `data`.
pub fn run(data: &Path) -> Result<()> {
    let dir = DataDir::open(data)?;
    let mut engine = node::open_engine(&dir)?;
    let stats = engine.stats()?;
    let problems = engine.check_indexes()?;
    drop(engine);
    let store = RedbStore::open(dir.store_path(), StoreOptions::default())?;
    println!(
        "{:<12} {:>9} {:>12} {:>12} {:>12}",
        "table", "entries", "stored B", "metadata B", "fragment B"
    );
    for (name, s) in store.table_sizes()? {
        println!(
            "{name:<12} {:>9} {:>12} {:>12} {:>12}",
            s.entries, s.stored, s.metadata, s.fragmented
        );
    }
    println!(
        "{}: {} documents, {} quarantined, last sequence {}",
        dir.config.name, stats.documents, stats.quarantined, stats.last_seq
    );
    if problems.is_empty() {
        println!("store is consistent");
        Ok(())
    } else {
        bail!("store problems: {}", problems.join("; "))
    }
}
