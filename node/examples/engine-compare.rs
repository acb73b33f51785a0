//! sled against redb on the same workload: the same store logic (`fieldmesh_storage::ops`), the same
//! engine and loader, the same NDJSON. Prints load time, peak memory and size on disk.
//!
//! ```sh
//! cargo run --release -p fieldmesh-node --example engine-compare -- sled  FILE.ndjson
//! cargo run --release -p fieldmesh-node --example engine-compare -- redb  FILE.ndjson
//! ```
//!
//! The sled store here writes each table as its own `sled::Tree` and calls `Db::flush` after every
//! batch (sled 0.34's durable point); multi-tree atomicity is not implemented, which only makes sled
//! look better than a faithful port would.

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result};
use fieldmesh_engine::{Engine, NodeIdentity};
use fieldmesh_storage::kv::{KvRead, KvWrite, Table};
use fieldmesh_storage::{
    DocId, DocMeta, IndexDump, Quarantined, RedbStore, Stats, Store, StoreError, StoreOptions,
    Write, ops,
};

struct SledStore {
    db: sled::Db,
    trees: Vec<sled::Tree>,
    commit_lock: Mutex<()>,
}

fn e(err: sled::Error) -> StoreError {
    StoreError::Engine(err.to_string())
}

impl SledStore {
    fn open(path: &Path) -> Result<Self> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(16 * 1024 * 1024)
            .open()?;
        let trees = Table::ALL
            .iter()
            .map(|t| db.open_tree(t.name()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            db,
            trees,
            commit_lock: Mutex::new(()),
        })
    }
}

struct Trees<'a>(&'a [sled::Tree]);

impl KvRead for Trees<'_> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.0[table as usize]
            .get(key)
            .map_err(e)?
            .map(|v| v.to_vec()))
    }
    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        for kv in self.0[table as usize].scan_prefix(prefix) {
            let (k, v) = kv.map_err(e)?;
            if !f(&k, &v) {
                break;
            }
        }
        Ok(())
    }
    fn scan_from(
        &self,
        table: Table,
        start: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        for kv in self.0[table as usize].range(start..) {
            let (k, v) = kv.map_err(e)?;
            if !f(&k, &v) {
                break;
            }
        }
        Ok(())
    }
}

impl KvWrite for Trees<'_> {
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.0[table as usize].insert(key, value).map_err(e)?;
        Ok(())
    }
    fn del(&mut self, table: Table, key: &[u8]) -> Result<(), StoreError> {
        self.0[table as usize].remove(key).map_err(e)?;
        Ok(())
    }
}

impl Store for SledStore {
    fn commit(&self, writes: Vec<Write>) -> Result<Vec<u64>, StoreError> {
        let _g = self
            .commit_lock
            .lock()
            .map_err(|_| StoreError::Engine("poisoned".into()))?;
        let seqs = ops::apply(
            &mut Trees(&self.trees),
            writes,
            &fieldmesh_storage::QuarantineBudget::default(),
        )?;
        self.db.flush().map_err(e)?;
        Ok(seqs)
    }
    fn doc_meta(&self, id: &DocId) -> Result<Option<DocMeta>, StoreError> {
        ops::doc_meta(&Trees(&self.trees), id)
    }
    fn doc_bytes(&self, id: &DocId) -> Result<Option<Vec<u8>>, StoreError> {
        ops::doc_bytes(&Trees(&self.trees), id)
    }
    fn find(&self, ty: &str, system: &str, value: &str) -> Result<Vec<DocId>, StoreError> {
        ops::find(&Trees(&self.trees), ty, system, value)
    }
    fn find_value(&self, ty: &str, value: &str) -> Result<Vec<DocId>, StoreError> {
        ops::find_value(&Trees(&self.trees), ty, value)
    }
    fn referrers(&self, ty: &str, system: &str, value: &str) -> Result<Vec<DocId>, StoreError> {
        ops::referrers(&Trees(&self.trees), ty, system, value)
    }
    fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, DocId)>, StoreError> {
        ops::changes_since(&Trees(&self.trees), after, limit)
    }
    fn checkpoint(&self, peer: &str) -> Result<Option<Vec<u8>>, StoreError> {
        ops::checkpoint(&Trees(&self.trees), peer)
    }
    fn of_type(&self, ty: &str) -> Result<Vec<DocId>, StoreError> {
        ops::of_type(&Trees(&self.trees), ty)
    }
    fn envelopes(&self, id: &DocId) -> Result<Vec<u8>, StoreError> {
        ops::envelopes(&Trees(&self.trees), id)
    }
    fn store_id(&self) -> Result<[u8; 16], StoreError> {
        ops::store_id(&Trees(&self.trees))
    }
    fn quarantined(&self, limit: usize) -> Result<Vec<Quarantined>, StoreError> {
        ops::quarantined(&Trees(&self.trees), limit)
    }
    fn quarantined_payload(&self, hash: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        ops::quarantined_payload(&Trees(&self.trees), hash)
    }
    fn stats(&self) -> Result<Stats, StoreError> {
        ops::stats(&Trees(&self.trees))
    }
    fn verify(&self) -> Result<Vec<String>, StoreError> {
        ops::verify(&Trees(&self.trees))
    }
    fn index_entries(&self) -> Result<IndexDump, StoreError> {
        ops::index_entries(&Trees(&self.trees))
    }
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| {
                    let m = e.metadata().ok();
                    match m {
                        Some(m) if m.is_dir() => dir_size(&e.path()),
                        Some(m) => m.len(),
                        None => 0,
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let engine_name = args
        .next()
        .context("usage: engine-compare sled|redb FILE.ndjson")?;
    let file = args
        .next()
        .context("usage: engine-compare sled|redb FILE.ndjson")?;
    let dir = std::path::PathBuf::from(format!("/tmp/fieldmesh-compare-{engine_name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let store: Box<dyn Store> = match engine_name.as_str() {
        "sled" => Box::new(SledStore::open(&dir.join("sled"))?),
        "redb" => Box::new(RedbStore::open(
            dir.join("store.redb"),
            StoreOptions::default(),
        )?),
        other => anyhow::bail!("unknown engine {other}"),
    };
    // A central node: its own root of trust, so it may write everything.
    let key = fieldmesh_trust::ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let me = NodeIdentity::new(
        "urn:fieldmesh:node:compare".into(),
        &[9; 32],
        key.verifying_key().to_bytes(),
    );
    let mut engine = Engine::new(store, me, 256);
    let t = Instant::now();
    let summary = fieldmesh_node::load::load_files(&mut engine, &[&file], false)?;
    let secs = t.elapsed().as_secs_f64();
    drop(engine);
    if engine_name == "redb" {
        let mut s = RedbStore::open(dir.join("store.redb"), StoreOptions::default())?;
        while s.compact()? {}
    }
    let input = std::fs::metadata(&file)?.len() as f64;
    let size = dir_size(&dir) as f64;
    println!(
        "{engine_name}: {} resources in {secs:.1} s ({:.0}/s), peak RSS {:.0} MB, on disk {:.1} MB = {:.2}× the NDJSON ({:.1} MB)",
        summary.loaded,
        summary.loaded as f64 / secs,
        peak_rss_mb(),
        size / 1e6,
        size / input,
        input / 1e6
    );
    Ok(())
}
