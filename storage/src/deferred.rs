//! Deferred writes: the entries a commit adds to or removes from the identifier and reference
//! indexes, and the records of the documents it writes, are appended to a log (one record per
//! commit, under a sequential key) and kept in memory, and folded into their tables in sorted
//! passes once enough have piled up.
//!
//! Their keys are random (identifier values and document ids are mostly UUIDs), so inserting a
//! batch's entries straight into the tables touches a different B-tree page for almost every
//! entry, and a copy-on-write B-tree rewrites every page a commit touches: that was most of what
//! a first sync wrote to disk (the document records alone: a 4 KiB page rewritten per document
//! received). A fold writes each page once for many thousand entries.
//!
//! Reads see the tables and the log as one: a lookup or scan consults the entries not yet folded
//! (newest first) before the table. The log is part of each commit's transaction, so a crash
//! keeps a commit's documents and its index entries together; opening the store replays the log.
//!
//! A fold does not stop the commits behind it: once the entries held reach half the fold size
//! they become a generation of their own ([`Folding`]), and each later commit writes the next
//! slice of it (twice what the commit adds, at least), in key order, into the tables, besides
//! its own work; the generation and the writes held since stay under the fold size together. Writing a generation slice by
//! slice touches each table page once, as a fold in one commit does, but a node receiving a
//! first sync keeps preparing documents on every core meanwhile instead of waiting for one long
//! commit. The generation's log records are removed by the commit that writes its last slice;
//! until then a crash replays them, and writing an entry to its table twice changes nothing.

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::StoreError;
use crate::kv::{Reader, Table, Writer};

/// Entries of one table not yet folded: key → value, or `None` for a removed key.
pub(crate) type Entries = BTreeMap<Box<[u8]>, Option<Box<[u8]>>>;

/// The tables whose writes are deferred, in the order a fold writes them; a log record names
/// each by its place here.
const TABLES: [Table; 3] = [Table::Ident, Table::Refs, Table::Docs];

/// Where `table`'s writes are kept, if they are deferred.
fn slot(table: Table) -> Option<usize> {
    TABLES.iter().position(|t| *t == table)
}

/// Every entry of `tables`, table by table ([`TABLES`]' order), each in key order.
fn entries_of(tables: &[Entries; 3]) -> impl Iterator<Item = (Table, &[u8], Option<&[u8]>)> {
    TABLES
        .iter()
        .zip(tables)
        .flat_map(|(t, e)| e.iter().map(move |(k, v)| (*t, &k[..], v.as_deref())))
}

/// Writes not yet folded into their tables, per table (the identifier and reference indexes
/// and the document records; other tables are written at once); later writes replace earlier
/// ones.
#[derive(Debug, Default, Clone)]
pub(crate) struct Pending {
    tables: [Entries; 3],
    /// The position of the last log record these writes include.
    pub through: Option<u64>,
    /// Positions of log records that could not be read: kept in the log, never folded away.
    pub unreadable: Vec<u64>,
    /// Older writes, being folded into the tables a slice per commit.
    pub folding: Option<Folding>,
    /// Read back from the whole log (at open, or after a commit failed late): these writes may
    /// hold a generation that was partly folded, so the next fold writes them all at once (the
    /// log would otherwise grow with every restart that comes before a generation is done).
    pub replayed: bool,
}

/// A generation of writes being folded into the tables, a slice per commit, in key order
/// (table by table). Newer writes ([`Pending`]'s own) replace its entries where they meet.
#[derive(Debug, Default, Clone)]
pub(crate) struct Folding {
    tables: [Entries; 3],
    /// The last log record it includes: the records up to it are removed when it is all folded.
    pub through: Option<u64>,
}

impl Folding {
    /// Entries not folded yet.
    pub fn len(&self) -> usize {
        self.tables.iter().map(BTreeMap::len).sum()
    }

    /// Entries not folded yet, in the order they are folded.
    pub fn iter(&self) -> impl Iterator<Item = (Table, &[u8], Option<&[u8]>)> {
        entries_of(&self.tables)
    }

    /// Forgets the first `n` entries of [`Folding::iter`] (folded into the tables).
    fn forget_first(&mut self, mut n: usize) {
        for e in &mut self.tables {
            while n > 0 && e.pop_first().is_some() {
                n -= 1;
            }
        }
    }
}

impl Pending {
    /// The entries of `table` (`None` for a table whose writes are not deferred).
    pub fn entries(&self, table: Table) -> Option<&Entries> {
        slot(table).map(|i| &self.tables[i])
    }

    /// Records a write; false if `table` is not deferred.
    pub fn record(&mut self, table: Table, key: &[u8], value: Option<&[u8]>) -> bool {
        match slot(table) {
            Some(i) => {
                self.tables[i].insert(key.into(), value.map(Into::into));
                true
            }
            None => false,
        }
    }

    /// The layers of `table` these writes hold, newest first: the writes since the last fold,
    /// then the generation being folded (none for a table whose writes are not deferred).
    pub fn layers(&self, table: Table) -> impl Iterator<Item = &Entries> {
        let folding = self
            .folding
            .as_ref()
            .and_then(|f| slot(table).map(|i| &f.tables[i]));
        self.entries(table).into_iter().chain(folding)
    }

    /// Entries held, all tables together, the generation being folded included.
    pub fn len(&self) -> usize {
        self.fresh_len() + self.folding.as_ref().map_or(0, Folding::len)
    }

    /// Entries held since the last fold began (the generation being folded left out).
    pub fn fresh_len(&self) -> usize {
        self.tables.iter().map(BTreeMap::len).sum()
    }

    /// Makes the writes held a generation to fold (there must be none being folded already).
    pub fn start_folding(&mut self) {
        debug_assert!(
            self.folding.is_none(),
            "a generation was still being folded"
        );
        self.folding = Some(Folding {
            tables: std::mem::take(&mut self.tables),
            through: self.through,
        });
    }

    /// Forgets the first `n` entries of the generation being folded (now in the tables), and
    /// the generation once none is left.
    pub fn forget_folded(&mut self, n: usize) {
        if let Some(f) = self.folding.as_mut() {
            f.forget_first(n);
            if f.len() == 0 {
                self.folding = None;
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes in `later`'s writes, which replace these where they meet.
    pub fn absorb(&mut self, later: Pending) {
        for (mine, theirs) in self.tables.iter_mut().zip(later.tables) {
            mine.extend(theirs);
        }
    }

    /// Every entry held since the last fold began, table by table, each in key order.
    pub fn iter(&self) -> impl Iterator<Item = (Table, &[u8], Option<&[u8]>)> {
        entries_of(&self.tables)
    }

    /// The log record of these writes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(LOG_VERSION);
        for (table, key, value) in self.iter() {
            w.u8(tag(table)).bytes(key);
            match value {
                Some(v) => w.u8(1).bytes(v),
                None => w.u8(0),
            };
        }
        w.0
    }

    /// Replays the log record at `position` on top of these writes; a record that cannot be read
    /// changes nothing and is noted in [`Pending::unreadable`].
    pub fn replay_at(&mut self, position: u64, record: &[u8]) -> Result<(), StoreError> {
        self.through = Some(position);
        self.replay(record)
            .inspect_err(|_| self.unreadable.push(position))
    }

    /// Replays a log record on top of these writes.
    pub fn replay(&mut self, record: &[u8]) -> Result<(), StoreError> {
        let mut r = Reader(record);
        let version = r.u8()?;
        if version != LOG_VERSION {
            return Err(StoreError::Corrupt(format!(
                "deferred index record version {version} is not one this build reads"
            )));
        }
        // Decoded whole before anything is applied: a damaged record changes nothing.
        let mut decoded = Pending::default();
        while !r.0.is_empty() {
            let t = r.u8()?;
            let Some(&table) = TABLES.get(usize::from(t)) else {
                return Err(StoreError::Corrupt(format!(
                    "deferred index record names table {t}"
                )));
            };
            let key = r.bytes()?;
            let value = match r.u8()? {
                0 => None,
                1 => Some(r.bytes()?),
                v => {
                    return Err(StoreError::Corrupt(format!(
                        "deferred index record holds presence flag {v}"
                    )));
                }
            };
            decoded.record(table, key, value);
        }
        self.absorb(decoded);
        Ok(())
    }
}

const LOG_VERSION: u8 = 1;

/// The number a log record names a deferred table by (its place in [`TABLES`]).
fn tag(table: Table) -> u8 {
    slot(table)
        .and_then(|i| u8::try_from(i).ok())
        .unwrap_or(u8::MAX)
}

/// The value of `key` as the layers (newest first) say, if any of them holds it: `Some(None)`
/// when the newest that holds it removed it.
pub(crate) fn lookup<'a>(layers: &[&'a Entries], key: &[u8]) -> Option<Option<&'a [u8]>> {
    layers.iter().find_map(|l| l.get(key)).map(|v| v.as_deref())
}

/// Calls `f` on the entries from `start` on (under `prefix`, if given) of a table read through
/// its pending layers (newest first): `table` yields the table's own entries in key order (`kv`
/// reads an entry's key and value), and pending writes replace or hide them. Stops when `f`
/// returns false. Streams, and copies nothing.
pub(crate) fn scan_merged<T, E>(
    layers: &[&Entries],
    start: &[u8],
    prefix: Option<&[u8]>,
    table: impl Iterator<Item = Result<T, E>>,
    kv: impl Fn(&T) -> (&[u8], &[u8]),
    f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
) -> Result<(), E> {
    enum Take {
        Pending,
        PendingOverTable,
        Table,
    }
    let within = |k: &[u8]| prefix.is_none_or(|p| k.starts_with(p));
    let mut heads: Vec<_> = layers
        .iter()
        .map(|l| {
            l.range::<[u8], _>((Bound::Included(start), Bound::Unbounded))
                .map(|(k, v)| (&k[..], v.as_deref()))
                .peekable()
        })
        .collect();
    let mut table = table.peekable();
    loop {
        // The smallest key among the layers' heads, from the newest layer holding it.
        let mut next: Option<(&[u8], Option<&[u8]>)> = None;
        for h in heads.iter_mut() {
            if let Some(&(k, v)) = h.peek()
                && within(k)
                && next.is_none_or(|(n, _)| k < n)
            {
                next = Some((k, v));
            }
        }
        let take = match table.peek() {
            Some(Err(_)) => {
                return match table.next() {
                    Some(Err(e)) => Err(e),
                    _ => Ok(()),
                };
            }
            Some(Ok(t)) if within(kv(t).0) => {
                let tk = kv(t).0;
                match next {
                    Some((pk, _)) if pk < tk => Take::Pending,
                    Some((pk, _)) if pk == tk => Take::PendingOverTable,
                    _ => Take::Table,
                }
            }
            Some(Ok(_)) | None => match next {
                Some(_) => Take::Pending,
                None => return Ok(()),
            },
        };
        let go_on = match (take, next) {
            (Take::Table, _) => match table.next() {
                Some(Ok(t)) => {
                    let (k, v) = kv(&t);
                    f(k, v)
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
            (how, Some((pk, pv))) => {
                if matches!(how, Take::PendingOverTable) {
                    table.next();
                }
                // Older layers' writes of the same key are replaced by this one.
                for h in heads.iter_mut() {
                    while h.next_if(|(k, _)| *k == pk).is_some() {}
                }
                pv.is_none_or(|v| f(pk, v))
            }
            (_, None) => return Ok(()),
        };
        if !go_on {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entries(items: &[(&str, Option<&str>)]) -> Entries {
        items
            .iter()
            .map(|(k, v)| (k.as_bytes().into(), v.map(|v| v.as_bytes().into())))
            .collect()
    }

    fn scan(
        layers: &[&Entries],
        table: &[(&str, &str)],
        start: &str,
        prefix: Option<&str>,
    ) -> Vec<String> {
        let mut out = Vec::new();
        let it = table
            .iter()
            .filter(|(k, _)| *k >= start)
            .map(|(k, v)| Ok::<_, ()>((k.as_bytes(), v.as_bytes())));
        scan_merged(
            layers,
            start.as_bytes(),
            prefix.map(str::as_bytes),
            it,
            |t| *t,
            &mut |k, v| {
                out.push(format!(
                    "{}={}",
                    String::from_utf8_lossy(k),
                    String::from_utf8_lossy(v)
                ));
                true
            },
        )
        .unwrap();
        out
    }

    #[test]
    fn pending_writes_replace_and_hide_the_tables_entries() {
        let older = entries(&[("a2", Some("x")), ("b1", None), ("c", Some("old"))]);
        let newer = entries(&[("a2", None), ("a3", Some("n")), ("c", Some("new"))]);
        let table = [("a1", ""), ("b1", ""), ("b2", ""), ("c", "base")];
        assert_eq!(
            scan(&[&newer, &older], &table, "", None),
            ["a1=", "a3=n", "b2=", "c=new"]
        );
        assert_eq!(
            scan(&[&newer, &older], &table, "a", Some("a")),
            ["a1=", "a3=n"]
        );
        assert_eq!(scan(&[&newer, &older], &table, "b", Some("b")), ["b2="]);
        assert_eq!(
            scan(&[&newer, &older], &table, "b2", None),
            ["b2=", "c=new"]
        );
        assert_eq!(lookup(&[&newer, &older], b"b1"), Some(None));
        assert_eq!(lookup(&[&newer, &older], b"c"), Some(Some(&b"new"[..])));
        assert_eq!(lookup(&[&newer, &older], b"a1"), None);
    }

    #[test]
    fn a_log_record_replays_what_was_recorded_and_a_damaged_one_changes_nothing() {
        let mut p = Pending::default();
        p.record(Table::Ident, b"k1", Some(b""));
        p.record(Table::Refs, b"k2", None);
        p.record(Table::Docs, b"k3", Some(b"meta"));
        assert!(!p.record(Table::Chunks, b"k4", Some(b"")));
        let record = p.encode();
        let mut q = Pending::default();
        q.replay_at(7, &record).unwrap();
        assert_eq!((q.through, q.unreadable.len()), (Some(7), 0));
        assert_eq!(q.tables, p.tables);
        for cut in 0..record.len() {
            let mut r = Pending::default();
            if r.replay(&record[..cut]).is_err() {
                assert!(r.is_empty(), "a record cut at {cut} applied part of itself");
            }
        }
    }
}
