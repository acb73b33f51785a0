//! An in-memory store with the same interface and semantics, for simulations and tests.

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::kv::{KvRead, KvWrite, Table};
use crate::{DocId, DocMeta, QuarantineBudget, Quarantined, Stats, Store, StoreError, Write, ops};

pub(crate) type Tables = BTreeMap<Table, BTreeMap<Vec<u8>, Vec<u8>>>;

/// A store held in memory. A commit is atomic: if it fails, nothing of it remains.
#[derive(Debug, Default)]
pub struct MemStore {
    tables: std::sync::RwLock<Tables>,
    budget: QuarantineBudget,
}

impl Clone for MemStore {
    fn clone(&self) -> Self {
        Self {
            tables: std::sync::RwLock::new(self.read().map(|t| t.clone()).unwrap_or_default()),
            budget: self.budget,
        }
    }
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store with this quarantine budget.
    pub fn with_budget(budget: QuarantineBudget) -> Self {
        Self {
            budget,
            ..Self::default()
        }
    }

    fn read(&self) -> Result<std::sync::RwLockReadGuard<'_, Tables>, StoreError> {
        self.tables
            .read()
            .map_err(|_| StoreError::Engine("the in-memory store was poisoned by a panic".into()))
    }
}

fn scan_range(
    tables: &Tables,
    table: Table,
    start: &[u8],
    prefix: Option<&[u8]>,
    f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
) {
    let Some(t) = tables.get(&table) else { return };
    for (k, v) in t.range::<[u8], _>((Bound::Included(start), Bound::Unbounded)) {
        if prefix.is_some_and(|p| !k.starts_with(p)) || !f(k, v) {
            break;
        }
    }
}

impl KvRead for Tables {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(BTreeMap::get(self, &table)
            .and_then(|t| t.get(key))
            .cloned())
    }
    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        scan_range(self, table, prefix, Some(prefix), f);
        Ok(())
    }
    fn scan_from(
        &self,
        table: Table,
        start: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        scan_range(self, table, start, None, f);
        Ok(())
    }
}

/// A transaction over [`Tables`] that remembers what it overwrote, to roll back on failure.
pub(crate) struct Txn<'a> {
    tables: &'a mut Tables,
    undo: Vec<(Table, Vec<u8>, Option<Vec<u8>>)>,
}

impl<'a> Txn<'a> {
    /// A transaction over `tables`, nothing written yet.
    pub(crate) fn new(tables: &'a mut Tables) -> Self {
        Self {
            tables,
            undo: Vec::new(),
        }
    }
}

impl KvRead for Txn<'_> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        KvRead::get(&*self.tables, table, key)
    }
    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        self.tables.scan(table, prefix, f)
    }
    fn scan_from(
        &self,
        table: Table,
        start: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        self.tables.scan_from(table, start, f)
    }
}

impl KvWrite for Txn<'_> {
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let old = self
            .tables
            .entry(table)
            .or_default()
            .insert(key.to_vec(), value.to_vec());
        self.undo.push((table, key.to_vec(), old));
        Ok(())
    }
    fn del(&mut self, table: Table, key: &[u8]) -> Result<(), StoreError> {
        let old = self.tables.entry(table).or_default().remove(key);
        self.undo.push((table, key.to_vec(), old));
        Ok(())
    }
}

impl Store for MemStore {
    fn commit(&self, writes: Vec<Write>) -> Result<Vec<u64>, StoreError> {
        let mut guard = self.tables.write().map_err(|_| {
            StoreError::Engine("the in-memory store was poisoned by a panic".into())
        })?;
        let mut txn = Txn::new(&mut guard);
        match ops::apply(&mut txn, writes, &self.budget) {
            Ok(seqs) => Ok(seqs),
            Err(e) => {
                let Txn { tables, undo } = txn;
                for (table, key, old) in undo.into_iter().rev() {
                    let t = tables.entry(table).or_default();
                    match old {
                        Some(v) => t.insert(key, v),
                        None => t.remove(&key),
                    };
                }
                Err(e)
            }
        }
    }
    fn doc_meta(&self, id: &DocId) -> Result<Option<DocMeta>, StoreError> {
        ops::doc_meta(&*self.read()?, id)
    }
    fn doc_bytes(&self, id: &DocId) -> Result<Option<Vec<u8>>, StoreError> {
        ops::doc_bytes(&*self.read()?, id)
    }
    fn find(&self, ty: &str, system: &str, value: &str) -> Result<Vec<DocId>, StoreError> {
        ops::find(&*self.read()?, ty, system, value)
    }
    fn find_value(&self, ty: &str, value: &str) -> Result<Vec<DocId>, StoreError> {
        ops::find_value(&*self.read()?, ty, value)
    }
    fn referrers(&self, ty: &str, system: &str, value: &str) -> Result<Vec<DocId>, StoreError> {
        ops::referrers(&*self.read()?, ty, system, value)
    }
    fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, DocId)>, StoreError> {
        ops::changes_since(&*self.read()?, after, limit)
    }
    fn of_type(&self, ty: &str) -> Result<Vec<DocId>, StoreError> {
        ops::of_type(&*self.read()?, ty)
    }
    fn count_of_type(&self, ty: &str) -> Result<usize, StoreError> {
        ops::count_of_type(&*self.read()?, ty)
    }
    fn envelopes(&self, id: &DocId) -> Result<Vec<u8>, StoreError> {
        ops::envelopes(&*self.read()?, id)
    }
    fn checkpoint(&self, peer: &str) -> Result<Option<Vec<u8>>, StoreError> {
        ops::checkpoint(&*self.read()?, peer)
    }
    fn store_id(&self) -> Result<[u8; 16], StoreError> {
        ops::store_id(&*self.read()?)
    }
    fn quarantined(&self, limit: usize) -> Result<Vec<Quarantined>, StoreError> {
        ops::quarantined(&*self.read()?, limit)
    }
    fn quarantined_payload(&self, hash: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        ops::quarantined_payload(&*self.read()?, hash)
    }
    fn stats(&self) -> Result<Stats, StoreError> {
        ops::stats(&*self.read()?)
    }
    fn verify(&self) -> Result<Vec<String>, StoreError> {
        ops::verify(&*self.read()?)
    }
    fn index_entries(&self) -> Result<crate::IndexDump, StoreError> {
        ops::index_entries(&*self.read()?)
    }
}
