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
        // A full disk, or the user's disk quota (EDQUOT) used up: the same for whoever writes.
        redb::Error::Io(io)
            if io.kind() == std::io::ErrorKind::StorageFull
                || io.kind() == std::io::ErrorKind::QuotaExceeded =>
        {
            StoreError::DiskFull(io.to_string())
        }
        // What redb read is not what it wrote (a header overwritten: "not a redb database").
        redb::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
            StoreError::Corrupt(format!("{}: {io}", path.display()))
        }
        redb::Error::Io(io) => StoreError::Io(format!("{}: {io}", path.display())),
        redb::Error::Corrupted(msg) => StoreError::Corrupt(msg),
        redb::Error::PreviousIo | redb::Error::DatabaseClosed | redb::Error::LockPoisoned(_) => {
            StoreError::Reopening
        }
        other => StoreError::Engine(other.to_string()),
    }
}

/// Runs `f`, turning a panic inside redb into [`StoreError::Corrupt`]: redb trusts the pages it
/// reads, and a damaged page (a bad sector, a flipped bit, a truncated copy) makes it index out
/// of bounds. One damaged page must cost the records on it, not the process.
fn shield<T>(path: &Path, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(path = %path.display(), %what, "a page of the store file could not be read");
            Err(StoreError::Corrupt(format!(
                "a page of {} could not be read ({what})",
                path.display()
            )))
        }
    }
}

/// A key and its value, as read from a table.
type Entry = (Vec<u8>, Vec<u8>);

/// A store in one redb file.
pub struct RedbStore {
    /// `None` only between closing the database after an I/O error and opening it again.
    db: std::sync::RwLock<Option<Database>>,
    path: PathBuf,
    budget: QuarantineBudget,
    cache_bytes: usize,
    /// Times the database was reopened: two threads that meet the same I/O error reopen it once.
    generation: std::sync::atomic::AtomicU64,
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
        shield(&path.clone(), || Self::open_unshielded(path, options))
    }

    fn open_unshielded(path: PathBuf, options: StoreOptions) -> Result<Self, StoreError> {
        let db = Database::builder()
            .set_cache_size(options.cache_bytes)
            .create(&path)
            .map_err(|e| engine(e, &path))?;
        // The file holds the personal data of insurees: its owner only.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path)
                .map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?;
            }
        }
        let store = Self {
            db: std::sync::RwLock::new(Some(db)),
            path,
            budget: options.quarantine,
            cache_bytes: options.cache_bytes,
            generation: std::sync::atomic::AtomicU64::new(0),
        };
        // Create every table once so that readers never meet a missing one. A store that has
        // them all is only read here: a damaged one still opens, to serve what it can.
        let missing = {
            let txn = store.begin_read()?;
            let mut missing = false;
            for t in Table::ALL {
                let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    txn.open_table(def(t)).map(|_| ())
                }));
                match opened {
                    Ok(Ok(())) => {}
                    Ok(Err(redb::TableError::TableDoesNotExist(_))) => missing = true,
                    // A damaged table is read as far as it can be, never written to here.
                    Ok(Err(e)) => {
                        tracing::error!(table = t.name(), error = %e, "a table of the store cannot be opened");
                    }
                    Err(_) => {
                        tracing::error!(
                            table = t.name(),
                            "a table of the store cannot be opened (a damaged page)"
                        );
                    }
                }
            }
            missing
        };
        if missing {
            let txn = store.begin_write()?;
            for t in Table::ALL {
                txn.open_table(def(t)).map_err(|e| store.err(e))?;
            }
            txn.commit().map_err(|e| store.err(e))?;
        }
        match store.store_id() {
            // An empty commit gives a new store its id.
            Ok(id) if id == [0; 16] => {
                store.commit(Vec::new())?;
            }
            Ok(_) => {}
            Err(StoreError::Corrupt(why)) => {
                tracing::error!(path = %store.path.display(), %why, "the store is damaged");
            }
            Err(e) => return Err(e),
        }
        Ok(store)
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        engine(e, &self.path)
    }

    /// Closes the database and opens it again: after an I/O error (a full disk) redb refuses
    /// every later write until it is reopened, which also repairs what the failed commit left.
    /// If it cannot be opened yet (the disk is still full), the next transaction tries again.
    fn reopen(&self, seen: u64) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        let mut db = self
            .db
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.generation.load(Ordering::Acquire) != seen && db.is_some() {
            // Another thread reopened it meanwhile.
            return Ok(());
        }
        // Transactions still running keep the old file open until they end.
        *db = None;
        let fresh = Database::builder()
            .set_cache_size(self.cache_bytes)
            .create(&self.path)
            .map_err(|e| self.err(e))?;
        *db = Some(fresh);
        self.generation.fetch_add(1, Ordering::AcqRel);
        tracing::info!(path = %self.path.display(), "the store was reopened after an I/O error");
        Ok(())
    }

    /// Begins a transaction with `begin`, reopening the database first if it is closed or
    /// refuses because of an earlier I/O error.
    fn begin<T>(
        &self,
        begin: impl Fn(&Database) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let seen = self.generation.load(std::sync::atomic::Ordering::Acquire);
        let first = {
            let db = self
                .db
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            db.as_ref().map(&begin)
        };
        match first {
            Some(Ok(t)) => return Ok(t),
            Some(Err(
                redb::Error::PreviousIo
                | redb::Error::DatabaseClosed
                | redb::Error::LockPoisoned(_),
            ))
            | None => {}
            Some(Err(e)) => return Err(self.err(e)),
        }
        self.reopen(seen)?;
        let db = self
            .db
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match db.as_ref() {
            Some(db) => begin(db).map_err(|e| self.err(e)),
            None => Err(StoreError::Engine("the store is closed".into())),
        }
    }

    /// Runs a read, once more on a reopened database if an earlier failed write makes redb
    /// refuse it (reads that miss the page cache meet that error too, not only writes).
    fn reading<T>(&self, f: impl Fn(&ReadTxn) -> Result<T, StoreError>) -> Result<T, StoreError> {
        shield(&self.path, || {
            let seen = self.generation.load(std::sync::atomic::Ordering::Acquire);
            match f(&self.read()?) {
                Err(StoreError::Reopening) => {
                    self.reopen(seen)?;
                    f(&self.read()?)
                }
                other => other,
            }
        })
    }

    fn begin_read(&self) -> Result<redb::ReadTransaction, StoreError> {
        self.begin(|db| db.begin_read().map_err(redb::Error::from))
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        self.begin(|db| db.begin_write().map_err(redb::Error::from))
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rewrites the file without free pages; returns whether anything was reclaimed.
    pub fn compact(&mut self) -> Result<bool, StoreError> {
        let path = self.path.clone();
        let db = self
            .db
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        shield(&path, || match db.as_mut() {
            Some(db) => db.compact().map_err(|e| engine(e, &path)),
            None => Ok(false),
        })
    }

    fn read(&self) -> Result<ReadTxn, StoreError> {
        let txn = self.begin_read()?;
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

impl RedbStore {
    fn commit_unshielded(&self, writes: Vec<Write>) -> Result<Vec<u64>, StoreError> {
        let mut txn = self.begin_write()?;
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
}

impl RedbStore {
    /// The entries of `table` that can be read: in key order until a damaged page stops the
    /// walk, then backwards from the last key until one stops it again (what lies between is
    /// lost). Also says what stopped each walk.
    fn tolerant_entries(&self, table: Table) -> (Vec<Entry>, Vec<String>) {
        let (mut forward, mut backward, mut problems) = (Vec::new(), Vec::new(), Vec::new());
        let walk = |out: &mut Vec<Entry>, rev: bool| {
            shield(&self.path, || {
                let txn = self.begin_read()?;
                let t = txn.open_table(def(table)).map_err(|e| self.err(e))?;
                let range = t.range::<&[u8]>(..).map_err(|e| self.err(e))?;
                let mut push = |entry: Result<_, redb::StorageError>| {
                    let (k, v): (redb::AccessGuard<'_, &[u8]>, redb::AccessGuard<'_, &[u8]>) =
                        entry.map_err(|e| self.err(e))?;
                    out.push((k.value().to_vec(), v.value().to_vec()));
                    Ok::<_, StoreError>(())
                };
                if rev {
                    for entry in range.rev() {
                        push(entry)?;
                    }
                } else {
                    for entry in range {
                        push(entry)?;
                    }
                }
                Ok(())
            })
        };
        if let Err(e) = walk(&mut forward, false) {
            problems.push(format!("table {}: {e}", table.name()));
            let last = forward.last().map(|(k, _)| k.clone());
            if let Err(e) = walk(&mut backward, true) {
                problems.push(format!("table {} (read backwards): {e}", table.name()));
            }
            backward.retain(|(k, _)| last.as_ref().is_none_or(|l| k > l));
            backward.reverse();
            forward.extend(backward);
        }
        (forward, problems)
    }
}

impl Store for RedbStore {
    fn doc_ids_tolerant(&self) -> (Vec<DocId>, Vec<String>) {
        let mut ids = std::collections::BTreeSet::new();
        let (docs, mut problems) = self.tolerant_entries(Table::Docs);
        ids.extend(
            docs.iter()
                .filter_map(|(k, _)| DocId::try_from(&k[..]).ok()),
        );
        // The log names every document too: what a damaged page hides in one table the other
        // may still show.
        let (log, more) = self.tolerant_entries(Table::Log);
        ids.extend(log.iter().filter_map(|(_, v)| DocId::try_from(&v[..]).ok()));
        problems.extend(more);
        (ids.into_iter().collect(), problems)
    }
    fn commit(&self, writes: Vec<Write>) -> Result<Vec<u64>, StoreError> {
        shield(&self.path, || self.commit_unshielded(writes))
    }
    fn doc_meta(&self, id: &DocId) -> Result<Option<DocMeta>, StoreError> {
        self.reading(|r| ops::doc_meta(r, id))
    }
    fn doc_bytes(&self, id: &DocId) -> Result<Option<Vec<u8>>, StoreError> {
        self.reading(|r| ops::doc_bytes(r, id))
    }
    fn find(&self, ty: &str, system: &str, value: &str) -> Result<Vec<DocId>, StoreError> {
        self.reading(|r| ops::find(r, ty, system, value))
    }
    fn find_value(&self, ty: &str, value: &str) -> Result<Vec<DocId>, StoreError> {
        self.reading(|r| ops::find_value(r, ty, value))
    }
    fn referrers(&self, ty: &str, system: &str, value: &str) -> Result<Vec<DocId>, StoreError> {
        self.reading(|r| ops::referrers(r, ty, system, value))
    }
    fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, DocId)>, StoreError> {
        self.reading(|r| ops::changes_since(r, after, limit))
    }
    fn of_type(&self, ty: &str) -> Result<Vec<DocId>, StoreError> {
        self.reading(|r| ops::of_type(r, ty))
    }
    fn envelopes(&self, id: &DocId) -> Result<Vec<u8>, StoreError> {
        self.reading(|r| ops::envelopes(r, id))
    }
    fn checkpoint(&self, peer: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.reading(|r| ops::checkpoint(r, peer))
    }
    fn store_id(&self) -> Result<[u8; 16], StoreError> {
        self.reading(|r| ops::store_id(r))
    }
    fn quarantined(&self, limit: usize) -> Result<Vec<Quarantined>, StoreError> {
        self.reading(|r| ops::quarantined(r, limit))
    }
    fn quarantined_payload(&self, hash: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        self.reading(|r| ops::quarantined_payload(r, hash))
    }
    fn stats(&self) -> Result<Stats, StoreError> {
        self.reading(|r| ops::stats(r))
    }
    fn verify(&self) -> Result<Vec<String>, StoreError> {
        self.reading(|r| ops::verify(r))
    }
    fn index_entries(&self) -> Result<crate::IndexDump, StoreError> {
        self.reading(|r| ops::index_entries(r))
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
        shield(&self.path, || self.table_sizes_unshielded())
    }

    fn table_sizes_unshielded(&self) -> Result<Vec<(&'static str, TableSize)>, StoreError> {
        let txn = self.begin_read()?;
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
