//! The table layout and the key/value seam both stores implement.
//!
//! Every table maps bytes to bytes. Keys made of several strings are encoded as length-prefixed
//! parts (`u16` big-endian length, then the bytes) so that a prefix of parts is a prefix of keys
//! and no value can forge a separator.

use crate::StoreError;

/// The tables of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// `doc id (16 bytes)` → document record ([`crate::DocMeta`]).
    Docs,
    /// `doc id ‖ chunk number (u32 BE)` → Automerge bytes; chunk 0 is a full save, later chunks
    /// incremental saves. Concatenated in order they load as one document.
    Chunks,
    /// `type ‖ value ‖ system ‖ doc id` → empty: the identifier index. Value before system, so
    /// that one table answers both `system|value` and value-only searches.
    Ident,
    /// `target type ‖ target system ‖ target value ‖ source doc id` → empty: who points at what.
    Refs,
    /// `sequence (u64 BE)` → doc id: the latest change of each document, in commit order.
    Log,
    /// `peer` → sequence (u64 BE): how far of our log a peer has seen.
    Checkpoints,
    /// `sequence (u64 BE)` → quarantine record (what was refused, why, from whom, and the hash of
    /// its payload).
    Quarantine,
    /// `name` → u64 BE counters (`next_seq`, `documents`).
    Meta,
    /// `doc id` → the signed envelopes of the document's changes, concatenated (opaque to the
    /// store; appended to as changes arrive).
    Envelopes,
    /// `payload hash (32 bytes)` → the refused bytes, kept once however often they are sent.
    Payloads,
    /// `source` → bytes of quarantined payloads from that source (for its budget).
    QuarantineSources,
}

impl Table {
    /// Every table, in the order of the variants (stores index their open tables by it).
    pub const ALL: [Table; 11] = [
        Table::Docs,
        Table::Chunks,
        Table::Ident,
        Table::Refs,
        Table::Log,
        Table::Checkpoints,
        Table::Quarantine,
        Table::Meta,
        Table::Envelopes,
        Table::Payloads,
        Table::QuarantineSources,
    ];

    /// The table's name on disk.
    pub fn name(self) -> &'static str {
        match self {
            Table::Docs => "docs",
            Table::Chunks => "chunks",
            Table::Ident => "ident",
            Table::Refs => "refs",
            Table::Log => "log",
            Table::Checkpoints => "checkpoints",
            Table::Quarantine => "quarantine",
            Table::Meta => "meta",
            Table::Envelopes => "envelopes",
            Table::Payloads => "quarantine_payloads",
            Table::QuarantineSources => "quarantine_sources",
        }
    }
}

/// Read access to the tables.
pub trait KvRead {
    /// The value under `key`.
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Calls `f` on every entry whose key starts with `prefix`, in key order, until it returns
    /// `false`.
    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError>;
    /// Calls `f` on every entry with key ≥ `start`, in key order, until it returns `false`.
    fn scan_from(
        &self,
        table: Table,
        start: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError>;
}

/// Write access to the tables, inside one transaction.
pub trait KvWrite: KvRead {
    /// Sets `key` to `value`.
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    /// Removes `key`.
    fn del(&mut self, table: Table, key: &[u8]) -> Result<(), StoreError>;
}

/// Builds a key of length-prefixed parts.
pub fn key(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 2).sum());
    for p in parts {
        let len = u16::try_from(p.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&p[..usize::from(len)]);
    }
    out
}

/// Splits a key of length-prefixed parts.
pub fn parts(mut key: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    while !key.is_empty() {
        if key.len() < 2 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([key[0], key[1]]));
        let rest = &key[2..];
        if rest.len() < len {
            return None;
        }
        out.push(&rest[..len]);
        key = &rest[len..];
    }
    Some(out)
}

/// A minimal binary writer for records (length-prefixed strings, big-endian integers).
#[derive(Default)]
pub(crate) struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(b);
        self
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }
}

/// The reading side of [`Writer`]; every read checks bounds.
pub(crate) struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.0.len() < n {
            return Err(StoreError::Corrupt("a record ends early".into()));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    pub fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32, StoreError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Result<u64, StoreError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub fn str(&mut self) -> Result<String, StoreError> {
        String::from_utf8(self.bytes()?.to_vec())
            .map_err(|_| StoreError::Corrupt("a record holds text that is not UTF-8".into()))
    }
}

/// Reads a big-endian u64 value.
pub fn be_u64(v: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(v)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt("a counter is not 8 bytes".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_back() {
        let k = key(&[b"Patient", b"", b"a\0b"]);
        assert_eq!(parts(&k).unwrap(), vec![&b"Patient"[..], b"", b"a\0b"]);
        assert!(parts(&k[..k.len() - 1]).is_none());
        // A prefix of parts is a prefix of keys.
        assert!(k.starts_with(&key(&[b"Patient", b""])));
    }
}
