//! `fieldmesh check`: a stopped node's counters, space per table, and the index check; on a
//! damaged store, what can still be read and how to salvage it.

use std::path::Path;

use anyhow::{Result, bail};
use fieldmesh_node::config::DataDir;
use fieldmesh_node::node;
use fieldmesh_storage::{RedbStore, Store, StoreOptions};

/// Checks the store of the node in `data`.
pub fn run(data: &Path) -> Result<()> {
    let dir = DataDir::open(data)?;
    let mut engine = node::open_engine(&dir)?;
    let checked = engine
        .stats()
        .map_err(anyhow::Error::from)
        .and_then(|stats| Ok((stats, engine.check_indexes()?)));
    let (stats, problems) = match checked {
        Ok(c) => c,
        Err(e) => {
            let (found, readable, lost, damage) = damage_report(engine.store());
            for d in &damage {
                println!("damaged: {d}");
            }
            for (id, why) in &lost {
                println!("unreadable: {id}: {why}");
            }
            bail!(
                "{e:#}: {readable} of the {found} documents it lists can be read; \
                 `fieldmesh salvage --data {}` rebuilds the store from them (the rest comes back from peers)",
                data.display()
            );
        }
    };
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

/// Documents a damaged store lists, how many of them can be read whole (record, data,
/// envelopes), the ones that cannot with why, and what stopped the listing.
type DamageReport = (usize, usize, Vec<(uuid::Uuid, String)>, Vec<String>);

fn damage_report(store: &dyn Store) -> DamageReport {
    let (ids, damage) = store.doc_ids_tolerant();
    let mut lost = Vec::new();
    for id in &ids {
        let read = store.doc_meta(id).and_then(|m| {
            store.doc_bytes(id)?;
            store.envelopes(id)?;
            Ok(m)
        });
        match read {
            Ok(Some(_)) => {}
            Ok(None) => lost.push((uuid::Uuid::from_bytes(*id), "its record is missing".into())),
            Err(e) => lost.push((uuid::Uuid::from_bytes(*id), e.to_string())),
        }
    }
    (ids.len(), ids.len() - lost.len(), lost, damage)
}
