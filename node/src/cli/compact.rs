//! `fieldmesh compact`: give free space in the store file back to the disk.

use std::path::Path;

use anyhow::Result;
use fieldmesh_node::config::DataDir;
use fieldmesh_storage::{RedbStore, StoreOptions};

/// Compacts the store of the (stopped) node in `data`.
pub fn run(data: &Path) -> Result<()> {
    compact(&DataDir::open(data)?)
}

/// Compacts the store of `dir` and says how much it saved.
pub fn compact(dir: &DataDir) -> Result<()> {
    let path = dir.store_path();
    let before = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let mut store = RedbStore::open(&path, StoreOptions::default())?;
    while store.compact()? {}
    drop(store);
    let after = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    println!(
        "store compacted: {:.1} MB → {:.1} MB",
        before as f64 / 1e6,
        after as f64 / 1e6
    );
    Ok(())
}
