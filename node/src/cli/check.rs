//! `fieldmesh check`: a stopped node's counters, space per table, what it holds by scope and
//! what waits outside it, and the index check; on a damaged store, what can still be read and
//! how to salvage it.

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
    let scope = engine.scope_report();
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
    match scope {
        Ok(r) => {
            let holds = match &r.reach {
                fieldmesh_engine::Reach::All => "everything".to_string(),
                fieldmesh_engine::Reach::Places { places, .. } => {
                    format!("{} place name(s) by its certificate", places.len())
                }
            };
            println!(
                "scope: holds {holds}; {} document(s) outside it wait to be handed off (they leave \
                 once central or a hub holds every change of them, at the next sync with one)",
                r.waiting.len()
            );
            for (ty, id) in r.waiting.iter().take(10) {
                println!("  waiting: {ty}/{id}");
            }
        }
        Err(e) => println!("scope: cannot be told: {e}"),
    }
    if problems.is_empty() {
        println!("store is consistent");
        Ok(())
    } else {
        let (found, readable, _, _) = damage_report(&store);
        bail!(
            "store problems: {}: {readable} of the {found} documents it lists can be read; \
             `fieldmesh salvage --data {}` rebuilds the store from them (the rest comes back from peers)",
            problems.join("; "),
            data.display()
        )
    }
}

/// Documents a damaged store lists, how many of them can be read whole (record, data,
/// envelopes), the ones that cannot with why, and what stopped the listing.
type DamageReport = (usize, usize, Vec<(uuid::Uuid, String)>, Vec<String>);

/// Whether Automerge loads `bytes` (which checks every change hash): the data of a damaged page
/// may still decompress.
fn loads(bytes: &[u8]) -> Result<(), String> {
    let load = || fieldmesh_fhir_docs::automerge::AutoCommit::load(bytes).map(|_| ());
    match std::panic::catch_unwind(load) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("its data does not load: {e}")),
        Err(_) => Err("its data does not load (the Automerge library failed on it)".into()),
    }
}

fn damage_report(store: &dyn Store) -> DamageReport {
    let (ids, damage) = store.doc_ids_tolerant();
    let mut lost = Vec::new();
    for id in &ids {
        let read = store.doc_meta(id).and_then(|m| {
            let bytes = store.doc_bytes(id)?;
            store.envelopes(id)?;
            Ok(m.and(bytes))
        });
        let why = match read {
            Ok(Some(bytes)) => loads(&bytes).err(),
            Ok(None) => Some("its record is missing".into()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = why {
            lost.push((uuid::Uuid::from_bytes(*id), why));
        }
    }
    (ids.len(), ids.len() - lost.len(), lost, damage)
}
