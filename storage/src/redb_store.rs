//! The on-disk store, on redb.
//!
//! Every [`Store::commit`] is one redb write transaction with `Durability::Immediate` and two-phase
//! commit: when it returns, the batch is on disk and a crash at any moment keeps either all of it or
//! none of it. Reads run in their own read transactions and never block the writer.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::kv::{KvRead, KvWrite, Table};
use crate::{DocId, DocMeta, QuarantineBudget, Quarantined, Stats, Store, StoreError, Write, ops};

/// Tuning of an on-disk store.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// Bytes of page cache redb may hold. Small by default: documents are loaded on demand and
    /// phones have little memory.
    pub cache_bytes: usize,
    /// What refused data may cost.
    pub quarantine: QuarantineBudget,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 16 * 1024 * 1024,
            quarantine: QuarantineBudget::default(),
        }
    }
}

fn def(t: Table) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
    TableDefinition::new(t.name())
}

fn engine(e: impl Into<redb::Error>, path: &Path) -> StoreError {
    match e.into() {
        redb::Error::DatabaseAlreadyOpen => StoreError::InUse(path.display().to_string()),
        redb::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => {
            StoreError::DiskFull(io.to_string())
        }
        redb::Error::Io(io) => StoreError::Io(format!("{}: {io}", path.display())),
        redb::Error::Corrupted(msg) => StoreError::Corrupt(msg),
        other => StoreError::Engine(other.to_string()),
    }
}

/// A store in one redb file.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
    budget: QuarantineBudget,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish()
    }
}

impl RedbStore {
    /// Opens the store file at `path`, creating it if it does not exist.
    pub fn open(path: impl AsRef<Path>, options: StoreOptions) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let db = Database::builder()
            .set_cache_size(options.cache_bytes)
            .create(&path)
            .map_err(|e| engine(e, &path))?;
        let store = Self {
            db,
            path,
            budget: options.quarantine,
        };
        // Create every table once so that readers never meet a missing one.
        let txn = store.db.begin_write().map_err(|e| store.err(e))?;
        for t in Table::ALL {
            txn.open_table(def(t)).map_err(|e| store.err(e))?;
        }
        txn.commit().map_err(|e| store.err(e))?;
        if store.store_id()? == [0; 16] {
            // An empty commit gives a new store its id.
            store.commit(Vec::new())?;
        }
        Ok(store)
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        engine(e, &self.path)
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rewrites the file without free pages; returns whether anything was reclaimed.
    pub fn compact(&mut self) -> Result<bool, StoreError> {
        self.db.compact().map_err(|e| engine(e, &self.path))
    }

    fn read(&self) -> Result<ReadTxn, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        Ok(ReadTxn {
            txn,
            path: self.path.clone(),
        })
    }
}

struct ReadTxn {
    txn: redb::ReadTransaction,
    path: PathBuf,
}

impl KvRead for ReadTxn {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let t = self
            .txn
            .open_table(def(table))
            .map_err(|e| engine(e, &self.path))?;
        let v = t.get(key).map_err(|e| engine(e, &self.path))?;
        Ok(v.map(|g| g.value().to_vec()))
    }
    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let t = self
            .txn
            .open_table(def(table))
            .map_err(|e| engine(e, &self.path))?;
        scan_table(&t, prefix, Some(prefix), f, &self.path)
    }
    fn scan_from(
        &self,
        table: Table,
        start: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let t = self
            .txn
            .open_table(def(table))
            .map_err(|e| engine(e, &self.path))?;
        scan_table(&t, start, None, f, &self.path)
    }
}

fn scan_table(
    t: &impl ReadableTable<&'static [u8], &'static [u8]>,
    start: &[u8],
    prefix: Option<&[u8]>,
    f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    path: &Path,
) -> Result<(), StoreError> {
    for entry in t.range::<&[u8]>(start..).map_err(|e| engine(e, path))? {
        let (k, v) = entry.map_err(|e| engine(e, path))?;
        if prefix.is_some_and(|p| !k.value().starts_with(p)) || !f(k.value(), v.value()) {
            break;
        }
    }
    Ok(())
}

struct WriteTxn<'a> {
    tables: Vec<redb::Table<'a, &'static [u8], &'static [u8]>>,
    path: &'a Path,
}

impl WriteTxn<'_> {
    fn table(&self, t: Table) -> &redb::Table<'_, &'static [u8], &'static [u8]> {
        &self.tables[t as usize]
    }
}

impl KvRead for WriteTxn<'_> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let v = self
            .table(table)
            .get(key)
            .map_err(|e| engine(e, self.path))?;
        Ok(v.map(|g| g.value().to_vec()))
    }
    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        scan_table(self.table(table), prefix, Some(prefix), f, self.path)
    }
    fn scan_from(
        &self,
        table: Table,
        start: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        scan_table(self.table(table), start, None, f, self.path)
    }
}

impl KvWrite for WriteTxn<'_> {
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let path = self.path;
        self.tables[table as usize]
            .insert(key, value)
            .map_err(|e| engine(e, path))?;
        Ok(())
    }
    fn del(&mut self, table: Table, key: &[u8]) -> Result<(), StoreError> {
        let path = self.path;
        self.tables[table as usize]
            .remove(key)
            .map_err(|e| engine(e, path))?;
        Ok(())
    }
}

impl Store for RedbStore {
    fn commit(&self, writes: Vec<Write>) -> Result<Vec<u64>, StoreError> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        // Quick repair saves the allocator state with each commit (and implies two-phase commit),
        // so reopening after a crash or a pulled battery takes milliseconds, not a full scan.
        txn.set_quick_repair(true);
        txn.set_durability(redb::Durability::Immediate)
            .map_err(|e| StoreError::Engine(e.to_string()))?;
        let seqs = {
            let mut tables = Vec::with_capacity(Table::ALL.len());
            for t in Table::ALL {
                tables.push(txn.open_table(def(t)).map_err(|e| self.err(e))?);
            }
            let mut w = WriteTxn {
                tables,
                path: &self.path,
            };
            ops::apply(&mut w, writes, &self.budget)
        };
        match seqs {
            Ok(seqs) => {
                txn.commit().map_err(|e| self.err(e))?;
                Ok(seqs)
            }
            Err(e) => {
                // Dropping the transaction aborts it; report the original error.
                let _ = txn.abort();
                Err(e)
            }
        }
    }
    fn doc_meta(&self, id: &DocId) -> Result<Option<DocMeta>, StoreError> {
        ops::doc_meta(&self.read()?, id)
    }
    fn doc_bytes(&self, id: &DocId) -> Result<Option<Vec<u8>>, StoreError> {
        ops::doc_bytes(&self.read()?, id)
    }
    fn find(&self, ty: &str, system: &str, value: &str) -> Result<Vec<DocId>, StoreError> {
        ops::find(&self.read()?, ty, system, value)
    }
    fn find_value(&self, ty: &str, value: &str) -> Result<Vec<DocId>, StoreError> {
        ops::find_value(&self.read()?, ty, value)
    }
    fn referrers(&self, ty: &str, system: &str, value: &str) -> Result<Vec<DocId>, StoreError> {
        ops::referrers(&self.read()?, ty, system, value)
    }
    fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, DocId)>, StoreError> {
        ops::changes_since(&self.read()?, after, limit)
    }
    fn of_type(&self, ty: &str) -> Result<Vec<DocId>, StoreError> {
        ops::of_type(&self.read()?, ty)
    }
    fn envelopes(&self, id: &DocId) -> Result<Vec<u8>, StoreError> {
        ops::envelopes(&self.read()?, id)
    }
    fn checkpoint(&self, peer: &str) -> Result<Option<Vec<u8>>, StoreError> {
        ops::checkpoint(&self.read()?, peer)
    }
    fn store_id(&self) -> Result<[u8; 16], StoreError> {
        ops::store_id(&self.read()?)
    }
    fn quarantined(&self, limit: usize) -> Result<Vec<Quarantined>, StoreError> {
        ops::quarantined(&self.read()?, limit)
    }
    fn quarantined_payload(&self, hash: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        ops::quarantined_payload(&self.read()?, hash)
    }
    fn stats(&self) -> Result<Stats, StoreError> {
        ops::stats(&self.read()?)
    }
    fn verify(&self) -> Result<Vec<String>, StoreError> {
        ops::verify(&self.read()?)
    }
    fn index_entries(&self) -> Result<crate::IndexDump, StoreError> {
        ops::index_entries(&self.read()?)
    }
}

/// Bytes used by one table.
#[derive(Debug, Clone, Copy, Default)]
pub struct TableSize {
    /// Number of entries.
    pub entries: u64,
    /// Bytes of keys and values.
    pub stored: u64,
    /// Bytes of B-tree metadata.
    pub metadata: u64,
    /// Bytes lost to fragmentation inside pages.
    pub fragmented: u64,
}

impl RedbStore {
    /// Space used per table, for reports and benchmarks.
    pub fn table_sizes(&self) -> Result<Vec<(&'static str, TableSize)>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for t in Table::ALL {
            let table = txn.open_table(def(t)).map_err(|e| self.err(e))?;
            let s = table.stats().map_err(|e| self.err(e))?;
            out.push((
                t.name(),
                TableSize {
                    entries: table.len().map_err(|e| self.err(e))?,
                    stored: s.stored_bytes(),
                    metadata: s.metadata_bytes(),
                    fragmented: s.fragmented_bytes(),
                },
            ));
        }
        Ok(out)
    }
}
