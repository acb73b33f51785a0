//! The on-disk store, on redb.
//!
//! Every [`Store::commit`] is one redb write transaction with `Durability::Immediate` and two-phase
//! commit: when it returns, the batch is on disk and a crash at any moment keeps either all of it or
//! none of it. Reads run in their own read transactions and never block the writer.
//!
//! Index writes and document records are deferred (see [`crate::deferred`]): each commit appends
//! them to a log table and to memory, and every [`StoreOptions::fold_index_after`] entries the
//! later commits fold them into their tables in key order, a slice each.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::deferred::{Entries, Pending, lookup, scan_merged};
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
    /// Index entries and document records (a demo Patient writes about ten entries and one
    /// record) kept in the log and in memory, about 130 bytes each, at most. Half this many
    /// make a generation that the commits that follow fold into their tables, a slice each (at
    /// least twice what each adds), while the next half fills. Larger: fewer folds, each writing
    /// the tables once.
    pub fold_index_after: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 16 * 1024 * 1024,
            quarantine: QuarantineBudget::default(),
            fold_index_after: 196_608,
        }
    }
}

fn def(t: Table) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
    TableDefinition::new(t.name())
}

/// The largest fold size taken (about 130 MB of pending writes in memory).
pub const MAX_FOLD: usize = 1 << 20;

/// Document records [`Store::doc_metas`] reads in one read, at most.
const META_READ: usize = 4096;

/// `position (u64)` → the index writes of one commit not yet folded ([`Pending::encode`]).
const DEFERRED: TableDefinition<'static, u64, &'static [u8]> =
    TableDefinition::new("deferred_index");

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
    /// The index writes in the log, not yet folded. A reader takes it before its snapshot and
    /// holds it for the whole read; a commit updates it only after it lands, so the snapshot
    /// holds at least the log it was read from (the rest: [`ReadTxn`]'s `newer`).
    pending: std::sync::RwLock<Pending>,
    /// One commit at a time, from its transaction to the update of `pending`.
    committing: std::sync::Mutex<()>,
    /// The pending writes in memory may lack a commit that failed late (after its data landed):
    /// the next commit reads them from the log again.
    stale: std::sync::atomic::AtomicBool,
    fold_at: usize,
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
            pending: std::sync::RwLock::new(Pending::default()),
            committing: std::sync::Mutex::new(()),
            stale: std::sync::atomic::AtomicBool::new(false),
            fold_at: options.fold_index_after.clamp(1, MAX_FOLD),
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
            let deferred = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                txn.open_table(DEFERRED).map(|_| ())
            }));
            missing || matches!(deferred, Ok(Err(redb::TableError::TableDoesNotExist(_))))
        };
        if missing {
            let txn = store.begin_write()?;
            for t in Table::ALL {
                txn.open_table(def(t)).map_err(|e| store.err(e))?;
            }
            txn.open_table(DEFERRED).map_err(|e| store.err(e))?;
            txn.commit().map_err(|e| store.err(e))?;
        }
        store.load_pending();
        let counted = store.reading(|r| ops::type_counts_kept(r)).unwrap_or(true);
        match store.store_id() {
            // An empty commit gives a new store its id, and a store written before the
            // per-type counters were kept its counters.
            Ok(id) if id == [0; 16] || !counted => {
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
        // The failed commit may have landed or not: the log says which, and the next commit
        // reads it again (readers meanwhile read what the memory lacks from the log).
        self.stale.store(true, Ordering::Release);
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
    fn reading<T>(
        &self,
        f: impl Fn(&ReadTxn<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        shield(&self.path, || {
            let seen = self.generation.load(std::sync::atomic::Ordering::Acquire);
            // The read (and its hold on the pending index writes) ends before any reopen.
            let first = f(&self.read()?);
            match first {
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

    fn read(&self) -> Result<ReadTxn<'_>, StoreError> {
        let pending = self
            .pending
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let txn = self.begin_read()?;
        Ok(ReadTxn {
            txn,
            path: self.path.clone(),
            pending,
            newer: std::cell::OnceCell::new(),
        })
    }

    /// Reads the deferred index log into memory (at open). A record that cannot be read is
    /// reported and skipped (and kept in the log): the store still opens, and `fieldmesh check`
    /// finds the entries it held missing.
    fn load_pending(&self) {
        let mut loaded = Pending::default();
        let read = shield(&self.path, || {
            let txn = self.begin_read()?;
            let log = txn.open_table(DEFERRED).map_err(|e| self.err(e))?;
            replay_log(&log, &mut loaded, None, &self.path)
        });
        if let Err(e) = read {
            tracing::error!(path = %self.path.display(), error = %e, "the deferred index log cannot be read");
        }
        loaded.replayed = !loaded.is_empty();
        *self
            .pending
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = loaded;
    }
}

/// Replays the log records after position `after` (all with `None`) onto `into`, reporting those
/// that cannot be read.
fn replay_log(
    log: &impl ReadableTable<u64, &'static [u8]>,
    into: &mut Pending,
    after: Option<u64>,
    path: &Path,
) -> Result<(), StoreError> {
    let from = after.map_or(0, |a| a.saturating_add(1));
    if after == Some(u64::MAX) {
        return Ok(());
    }
    for entry in log.range::<u64>(from..).map_err(|e| engine(e, path))? {
        let (k, v) = entry.map_err(|e| engine(e, path))?;
        if let Err(e) = into.replay_at(k.value(), v.value()) {
            tracing::error!(path = %path.display(), record = k.value(), error = %e, "a deferred index record cannot be read");
        }
    }
    Ok(())
}

struct ReadTxn<'a> {
    txn: redb::ReadTransaction,
    path: PathBuf,
    /// The pending writes in memory, held for the whole read: a commit updates them only after
    /// it lands, so this read's snapshot holds at least the log they were read from.
    pending: std::sync::RwLockReadGuard<'a, Pending>,
    /// Log records of this snapshot that the memory does not hold yet (a commit that landed
    /// between taking `pending` and beginning the snapshot), read on first use.
    newer: std::cell::OnceCell<Pending>,
}

impl ReadTxn<'_> {
    /// The pending layers of `table`, newest first.
    fn layers(&self, table: Table) -> Vec<&Entries> {
        if self.pending.entries(table).is_none() {
            return Vec::new();
        }
        let newer = self.newer.get_or_init(|| {
            let mut newer = Pending::default();
            let read = self
                .txn
                .open_table(DEFERRED)
                .map_err(|e| engine(e, &self.path))
                .and_then(|log| replay_log(&log, &mut newer, self.pending.through, &self.path));
            if let Err(e) = read {
                tracing::error!(path = %self.path.display(), error = %e, "the deferred index log cannot be read");
            }
            newer
        });
        newer
            .layers(table)
            .chain(self.pending.layers(table))
            .collect()
    }
}

impl KvRead for ReadTxn<'_> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = lookup(&self.layers(table), key) {
            return Ok(v.map(<[u8]>::to_vec));
        }
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
        scan_table(&t, &self.layers(table), prefix, Some(prefix), f, &self.path)
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
        scan_table(&t, &self.layers(table), start, None, f, &self.path)
    }
}

/// Scans a table from `start` (under `prefix`), through its pending writes (`layers`, newest
/// first) if it has any.
fn scan_table(
    t: &impl ReadableTable<&'static [u8], &'static [u8]>,
    layers: &[&Entries],
    start: &[u8],
    prefix: Option<&[u8]>,
    f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    path: &Path,
) -> Result<(), StoreError> {
    let range = t.range::<&[u8]>(start..).map_err(|e| engine(e, path))?;
    if layers.iter().any(|l| !l.is_empty()) {
        let entries = range.map(|entry| entry.map_err(|e| engine(e, path)));
        return scan_merged(
            layers,
            start,
            prefix,
            entries,
            |(k, v)| (k.value(), v.value()),
            f,
        );
    }
    for entry in range {
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
    /// Index writes of earlier commits, not yet folded.
    committed: &'a Pending,
    /// This commit's index writes.
    local: Pending,
}

impl WriteTxn<'_> {
    fn table(&self, t: Table) -> &redb::Table<'_, &'static [u8], &'static [u8]> {
        &self.tables[t as usize]
    }

    /// The pending layers of `t`, newest first.
    fn layers(&self, t: Table) -> Vec<&Entries> {
        self.local
            .entries(t)
            .into_iter()
            .chain(self.committed.layers(t))
            .collect()
    }
}

impl KvRead for WriteTxn<'_> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = lookup(&self.layers(table), key) {
            return Ok(v.map(<[u8]>::to_vec));
        }
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
        let layers = self.layers(table);
        scan_table(
            self.table(table),
            &layers,
            prefix,
            Some(prefix),
            f,
            self.path,
        )
    }
    fn scan_from(
        &self,
        table: Table,
        start: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let layers = self.layers(table);
        scan_table(self.table(table), &layers, start, None, f, self.path)
    }
}

impl KvWrite for WriteTxn<'_> {
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        if self.local.record(table, key, Some(value)) {
            return Ok(());
        }
        let path = self.path;
        self.tables[table as usize]
            .insert(key, value)
            .map_err(|e| engine(e, path))?;
        Ok(())
    }
    fn del(&mut self, table: Table, key: &[u8]) -> Result<(), StoreError> {
        if self.local.record(table, key, None) {
            return Ok(());
        }
        let path = self.path;
        self.tables[table as usize]
            .remove(key)
            .map_err(|e| engine(e, path))?;
        Ok(())
    }
}

impl RedbStore {
    /// See [`Store::fold_index`].
    fn fold_unshielded(&self, at_least: usize) -> Result<usize, StoreError> {
        let held = self
            .pending
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len();
        if held == 0 || held < at_least {
            return Ok(0);
        }
        self.commit_unshielded(Vec::new(), true)?;
        Ok(held)
    }

    /// Commits `writes`; `fold` folds the index writes held so far whatever their number.
    fn commit_unshielded(&self, writes: Vec<Write>, fold: bool) -> Result<Vec<u64>, StoreError> {
        use std::sync::atomic::Ordering;
        let _one = self
            .committing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut txn = self.begin_write()?;
        // Quick repair saves the allocator state with each commit (and implies two-phase commit),
        // so reopening after a crash or a pulled battery takes milliseconds, not a full scan.
        txn.set_quick_repair(true);
        txn.set_durability(redb::Durability::Immediate)
            .map_err(|e| StoreError::Engine(e.to_string()))?;
        if self.stale.swap(false, Ordering::AcqRel) {
            let mut fresh = Pending::default();
            let log = txn.open_table(DEFERRED).map_err(|e| self.err(e))?;
            replay_log(&log, &mut fresh, None, &self.path)?;
            fresh.replayed = !fresh.is_empty();
            *self.pending_mut() = fresh;
        }
        let applied = {
            let committed = self
                .pending
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut tables = Vec::with_capacity(Table::ALL.len());
            for t in Table::ALL {
                tables.push(txn.open_table(def(t)).map_err(|e| self.err(e))?);
            }
            let mut w = WriteTxn {
                tables,
                path: &self.path,
                committed: &committed,
                local: Pending::default(),
            };
            match ops::apply(&mut w, writes, &self.budget) {
                Ok(seqs) => self
                    .defer_or_fold(&txn, &mut w, fold)
                    .map(|logged| (seqs, w.local, logged)),
                Err(e) => Err(e),
            }
        };
        let (seqs, local, logged) = match applied {
            Ok(applied) => applied,
            Err(e) => {
                // Dropping the transaction aborts it; report the original error.
                let _ = txn.abort();
                return Err(e);
            }
        };
        if let Err(e) = txn.commit() {
            // It may have landed all the same: the next commit reads the log again.
            self.stale.store(true, Ordering::Release);
            return Err(self.err(e));
        }
        // Readers hold the pending writes while they read: they see the memory as it was
        // before this commit, with what their snapshot's log adds (`ReadTxn::newer`), or after.
        let mut pending = self.pending_mut();
        match logged {
            Logged::Nothing => {}
            Logged::Appended {
                at,
                previous,
                folded,
                start_folding,
            } if pending.through == previous => {
                pending.forget_folded(folded);
                pending.absorb(local);
                pending.through = Some(at);
                if start_folding {
                    pending.start_folding();
                }
            }
            Logged::Appended { .. } => self.stale.store(true, Ordering::Release),
            Logged::Folded { at } => {
                let unreadable = std::mem::take(&mut pending.unreadable);
                *pending = local;
                pending.through = Some(at);
                pending.unreadable = unreadable;
            }
        }
        Ok(seqs)
    }

    fn pending_mut(&self) -> std::sync::RwLockWriteGuard<'_, Pending> {
        self.pending
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends the commit's deferred writes to the log, and writes the next slice of the
    /// generation being folded ([`crate::deferred::Folding`]) into the tables: at least a
    /// sixteenth of the fold size, and twice what the commit adds. Once the writes held since the
    /// last generation began reach half the fold size, they become the next generation to fold
    /// (what is left of the one before is folded whole first, so that memory stays bounded).
    /// Writes read back from the whole log are folded at once when they reach the fold size. When `force`d, writes
    /// everything held into the tables at once and removes the records folded. The commit's own
    /// writes stay in the log either way (a fold writes them to the tables too), so that a reader
    /// whose memory predates the fold reads them from its snapshot.
    fn defer_or_fold(
        &self,
        txn: &redb::WriteTransaction,
        w: &mut WriteTxn<'_>,
        force: bool,
    ) -> Result<Logged, StoreError> {
        // Nothing of this commit to log, and nothing held to fold (or no fold asked).
        if w.local.is_empty() && (!force || w.committed.is_empty()) {
            return Ok(Logged::Nothing);
        }
        let mut log = txn.open_table(DEFERRED).map_err(|e| self.err(e))?;
        let previous = log.last().map_err(|e| self.err(e))?.map(|(k, _)| k.value());
        let at = previous.map_or(0, |p| p.saturating_add(1));
        let started = std::time::Instant::now();
        let held = w.committed.fresh_len() + w.local.len();
        // Writes read back from the whole log are folded at once (see `Pending::replayed`).
        let force = force || (w.committed.replayed && held >= self.fold_at);
        // A generation of half the fold size: it and the writes held since it began stay under
        // the fold size together.
        let start_folding = !force && held >= (self.fold_at / 2).max(1);
        let mut folded = 0;
        if let Some(folding) = &w.committed.folding {
            let slice = if force || start_folding {
                usize::MAX
            } else {
                (self.fold_at / 16).max(2 * w.local.len()).max(1)
            };
            for (table, key, value) in folding.iter().take(slice) {
                write_entry(&mut w.tables[table as usize], key, value).map_err(|e| self.err(e))?;
                folded += 1;
            }
            if folded == folding.len() && !force {
                remove_folded(&mut log, folding.through, &w.committed.unreadable)
                    .map_err(|e| self.err(e))?;
            }
        }
        if force {
            // The earlier writes first: this commit's replace them where they meet.
            for (table, key, value) in w.committed.iter().chain(w.local.iter()) {
                write_entry(&mut w.tables[table as usize], key, value).map_err(|e| self.err(e))?;
            }
            remove_folded(&mut log, w.committed.through, &w.committed.unreadable)
                .map_err(|e| self.err(e))?;
        }
        if force || folded > 0 {
            tracing::debug!(
                entries = if force {
                    w.committed.len() + w.local.len()
                } else {
                    folded
                },
                whole = force,
                ms = started.elapsed().as_millis() as u64,
                "folded deferred index writes"
            );
        }
        log.insert(at, w.local.encode().as_slice())
            .map_err(|e| self.err(e))?;
        Ok(if force {
            Logged::Folded { at }
        } else {
            Logged::Appended {
                at,
                previous,
                folded,
                start_folding,
            }
        })
    }
}

/// Removes the log records up to `through`, now folded; only what the memory held is folded
/// away: the records it could not read (`unreadable`) stay.
fn remove_folded(
    log: &mut redb::Table<'_, u64, &'static [u8]>,
    through: Option<u64>,
    unreadable: &[u64],
) -> Result<(), redb::StorageError> {
    log.retain(|k, _| through.is_none_or(|t| k > t) || unreadable.contains(&k))
}

/// Writes one deferred index entry into its table: `None` removes the key.
fn write_entry(
    table: &mut redb::Table<'_, &'static [u8], &'static [u8]>,
    key: &[u8],
    value: Option<&[u8]>,
) -> Result<(), redb::StorageError> {
    match value {
        Some(v) => table.insert(key, v).map(|_| ()),
        None => table.remove(key).map(|_| ()),
    }
}

/// What a commit did with its index writes.
enum Logged {
    Nothing,
    /// Appended at `at`; `previous` was the log's last record before. The first `folded` entries
    /// of the generation being folded were written to the tables; `start_folding`: the writes
    /// held, this commit's included, are the next generation to fold.
    Appended {
        at: u64,
        previous: Option<u64>,
        folded: usize,
        start_folding: bool,
    },
    /// Folded everything held before into the tables; its own writes logged at `at`.
    Folded {
        at: u64,
    },
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
        shield(&self.path, || self.commit_unshielded(writes, false))
    }
    fn fold_index(&self, at_least: usize) -> Result<usize, StoreError> {
        shield(&self.path, || self.fold_unshielded(at_least))
    }
    fn doc_meta(&self, id: &DocId) -> Result<Option<DocMeta>, StoreError> {
        self.reading(|r| ops::doc_meta(r, id))
    }
    fn doc_metas(
        &self,
        ids: &[DocId],
    ) -> Result<Vec<Result<Option<DocMeta>, StoreError>>, StoreError> {
        // In key order, a read per few thousand records (a read holds the writes in memory,
        // which a commit waits for), the table opened once for each.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i]);
        let mut out: Vec<Result<Option<DocMeta>, StoreError>> =
            ids.iter().map(|_| Ok(None)).collect();
        for part in order.chunks(META_READ) {
            let read = self.reading(|r| {
                // A table that cannot be opened fails each read, as one read at a time would.
                let t = match r.txn.open_table(def(Table::Docs)) {
                    Ok(t) => t,
                    Err(e) => match engine(e, &r.path) {
                        StoreError::Reopening => return Err(StoreError::Reopening),
                        e => return Ok(part.iter().map(|_| Err(e.clone())).collect()),
                    },
                };
                // Records not folded into the table yet are read from memory first.
                let layers = r.layers(Table::Docs);
                let mut metas = Vec::with_capacity(part.len());
                for &i in part {
                    if let Some(held) = lookup(&layers, &ids[i]) {
                        metas.push(held.map(ops::decode_meta).transpose());
                        continue;
                    }
                    metas.push(match t.get(&ids[i][..]) {
                        Ok(v) => v.map(|g| ops::decode_meta(g.value())).transpose(),
                        Err(e) => match engine(e, &r.path) {
                            StoreError::Reopening => return Err(StoreError::Reopening),
                            e => Err(e),
                        },
                    });
                }
                Ok(metas)
            });
            let metas = match read {
                // A damaged page stops the whole read: read each record alone, so that only
                // those it hides fail.
                Err(StoreError::Corrupt(_)) => {
                    part.iter().map(|&i| self.doc_meta(&ids[i])).collect()
                }
                other => other?,
            };
            for (&i, meta) in part.iter().zip(metas) {
                out[i] = meta;
            }
        }
        Ok(out)
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
    fn count_of_type(&self, ty: &str) -> Result<usize, StoreError> {
        self.reading(|r| ops::count_of_type(r, ty))
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
        let log = txn.open_table(DEFERRED).map_err(|e| self.err(e))?;
        let s = log.stats().map_err(|e| self.err(e))?;
        out.push((
            "deferred_index",
            TableSize {
                entries: log.len().map_err(|e| self.err(e))?,
                stored: s.stored_bytes(),
                metadata: s.metadata_bytes(),
                fragmented: s.fragmented_bytes(),
            },
        ));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{DocData, DocWrite, IndexEntries};

    fn patient(n: u8, chfid: &str) -> Write {
        Write::Doc(DocWrite {
            id: [n; 16],
            ty: "Patient".into(),
            origin: "urn:fieldmesh:node:a".into(),
            data: DocData::Full(vec![n; 4]),
            heads: vec![[n; 32]],
            updated: 0,
            identifiers: vec![("chfid".into(), chfid.into())],
            references: Vec::new(),
            previous: IndexEntries::default(),
            envelopes: Vec::new(),
        })
    }

    /// A store in `dir` folding its index writes every `fold` entries.
    fn folding_every(dir: &tempfile::TempDir, fold: usize) -> RedbStore {
        let options = StoreOptions {
            fold_index_after: fold,
            ..StoreOptions::default()
        };
        RedbStore::open(dir.path().join("s.redb"), options).unwrap()
    }

    /// Records in the deferred index log.
    fn log_records(store: &RedbStore) -> u64 {
        store
            .table_sizes()
            .unwrap()
            .into_iter()
            .find(|(name, _)| *name == "deferred_index")
            .unwrap()
            .1
            .entries
    }

    /// Entries of the generation being folded, if one is.
    fn folding_len(store: &RedbStore) -> Option<usize> {
        store.pending_mut().folding.as_ref().map(|f| f.len())
    }

    /// Patients 1 to `last` (written by [`patient`] as `C1`, `C2`...) are found by their
    /// identifier and have their record.
    fn assert_found(store: &RedbStore, last: u8) {
        for n in 1..=last {
            let c = format!("C{n}");
            assert_eq!(store.find("Patient", "chfid", &c).unwrap(), vec![[n; 16]]);
            assert!(store.doc_meta(&[n; 16]).unwrap().is_some());
        }
    }

    /// A reader whose memory of the pending writes lags behind its snapshot (a commit that
    /// landed before the memory took it in) reads what is missing from the snapshot's log; a
    /// commit that finds the memory stale reads the log again before it folds, and folds what
    /// it read back at once.
    #[test]
    fn the_log_covers_what_the_memory_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let store = folding_every(&dir, 3);
        store.commit(vec![patient(1, "C1")]).unwrap();
        // The memory forgets the commit, as if it had not taken it in yet.
        *store.pending_mut() = Pending::default();
        assert_eq!(store.find("Patient", "chfid", "C1").unwrap(), vec![[1; 16]]);
        assert!(store.doc_meta(&[1; 16]).unwrap().is_some());
        // A commit after a late failure reads the log again: the fold keeps C1.
        store
            .stale
            .store(true, std::sync::atomic::Ordering::Release);
        store
            .commit(vec![patient(2, "C2"), patient(3, "C3")])
            .unwrap();
        // It folded all three (the log keeps only its own record), C1 included.
        assert_eq!(
            log_records(&store),
            1,
            "the commit did not fold what the log held"
        );
        assert_found(&store, 3);
        assert!(store.verify().unwrap().is_empty());
    }

    /// Writes held past half the fold size become a generation that the next commits fold a
    /// slice each (twice what each adds), the last removing its records from the log.
    #[test]
    fn a_generation_is_folded_a_slice_per_commit() {
        let dir = tempfile::tempdir().unwrap();
        // A patient writes two entries: its identifier and its record. Generations of six.
        let store = folding_every(&dir, 12);
        store
            .commit((1..=3).map(|n| patient(n, &format!("C{n}"))).collect())
            .unwrap();
        assert_eq!(folding_len(&store), Some(6));
        store.commit(vec![patient(4, "C4")]).unwrap();
        assert_eq!(folding_len(&store), Some(2));
        assert_eq!(log_records(&store), 2);
        store.commit(vec![patient(5, "C5")]).unwrap();
        assert_eq!(folding_len(&store), None);
        assert_eq!(store.pending_mut().len(), 4);
        assert_eq!(
            log_records(&store),
            2,
            "the last slice did not remove the generation's record"
        );
        assert_found(&store, 5);
        assert_eq!(store.stats().unwrap().documents, 5);
        assert!(store.verify().unwrap().is_empty());
    }

    /// A generation half folded when the store closes (or the node is killed) is read back from
    /// the log and folded again, whole: no entry is lost, and none written twice shows twice.
    #[test]
    fn a_generation_half_folded_is_folded_again_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = folding_every(&dir, 8);
        store
            .commit((1..=4).map(|n| patient(n, &format!("C{n}"))).collect())
            .unwrap();
        store.commit(vec![patient(5, "C5")]).unwrap();
        assert_eq!(folding_len(&store), Some(4));
        drop(store);
        let store = folding_every(&dir, 8);
        assert_eq!(folding_len(&store), None);
        assert_eq!(store.pending_mut().len(), 10);
        assert_found(&store, 5);
        // The first commit past the fold size writes them all at once: a restart before a
        // generation is done never leaves the log longer than the fold size.
        store.commit(vec![patient(6, "C6")]).unwrap();
        assert_eq!(folding_len(&store), None);
        assert_eq!(store.pending_mut().len(), 2);
        assert_eq!(log_records(&store), 1);
        assert_found(&store, 6);
        assert!(store.verify().unwrap().is_empty());
    }

    #[test]
    fn an_idle_fold_empties_the_memory_and_keeps_every_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = folding_every(&dir, 1000);
        store.commit(vec![patient(1, "C1")]).unwrap();
        store.commit(vec![patient(2, "C2")]).unwrap();
        let held = store.pending_mut().len();
        assert!(held > 0);
        // Fewer than asked for: nothing is folded.
        assert_eq!(store.fold_index(held + 1).unwrap(), 0);
        assert_eq!(store.pending_mut().len(), held);
        assert_eq!(store.fold_index(1).unwrap(), held);
        assert_eq!(store.pending_mut().len(), 0);
        assert_eq!(store.fold_index(1).unwrap(), 0);
        // The entries are in the tables, and the log holds only the fold's own (empty) record.
        assert_eq!(log_records(&store), 1);
        assert_found(&store, 2);
        drop(store);
        let store = folding_every(&dir, 1000);
        assert_eq!(store.pending_mut().len(), 0);
        assert_found(&store, 2);
        assert!(store.verify().unwrap().is_empty());
    }
}
