//! `fieldmesh load`: FHIR JSON, Bundles and NDJSON files as local writes.

use std::path::{Path, PathBuf};

use anyhow::Result;
use fieldmesh_node::config::DataDir;
use fieldmesh_node::{load, node};

/// Loads `files` into the (stopped) node in `data`; compacts the store afterwards if asked.
pub fn run(data: &Path, files: &[PathBuf], compact_after: bool) -> Result<()> {
    let dir = DataDir::open(data)?;
    let mut engine = node::open_engine(&dir)?;
    let summary = load::load_files(&mut engine, files, true)?;
    let stats = engine.stats()?;
    drop(engine);
    println!(
        "loaded {} resources in {:.1} s ({:.0}/s, {:.1} s of it waiting for commits); rejected {}; the store now holds {} documents",
        summary.loaded,
        summary.seconds,
        summary.loaded as f64 / summary.seconds.max(1e-9),
        summary.commit_seconds,
        summary.rejected.len(),
        stats.documents
    );
    for (at, why) in summary.rejected.iter().take(20) {
        println!("  rejected {at}: {why}");
    }
    if summary.rejected.len() > 20 {
        println!("  … and {} more", summary.rejected.len() - 20);
    }
    if compact_after && summary.loaded > 0 {
        super::compact::compact(&dir)?;
    }
    Ok(())
}
