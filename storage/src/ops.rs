//! Store logic written once over the [`KvRead`]/[`KvWrite`] seam: applying writes with their index
//! maintenance, the queries, and the integrity check. Public so that another engine can implement
//! [`crate::Store`] by providing the seam and delegating here (as `RedbStore` and `MemStore` do).

use std::collections::BTreeSet;

use crate::kv::{KvRead, KvWrite, Reader, Table, Writer, be_u64, key, parts};
use sha2::{Digest, Sha256};

use crate::{
    DocData, DocId, DocMeta, DocWrite, IndexDump, LOCAL_CHECKPOINT_PREFIX, Quarantine,
    QuarantineBudget, Quarantined, Stats, StoreError, Write, codec,
};

const NEXT_SEQ: &[u8] = b"next_seq";
const DOCUMENTS: &[u8] = b"documents";
const QUARANTINED: &[u8] = b"quarantined";
const QUARANTINE_BYTES: &[u8] = b"quarantine_bytes";
const QUARANTINE_EVICTED: &[u8] = b"quarantine_evicted";
/// Set once the per-type document counters (`count:<type>`) are kept; a store written before
/// has them counted on its first commit.
const TYPE_COUNTS: &[u8] = b"type_counts_v1";

fn type_count_key(ty: &str) -> Vec<u8> {
    let mut k = b"count:".to_vec();
    k.extend_from_slice(ty.as_bytes());
    k
}
/// Quarantine records written before payloads were kept apart.
const QUARANTINE_V3: u8 = 3;
/// Quarantine records with their payload kept once in [`Table::Payloads`].
const QUARANTINE_V4: u8 = 4;
/// Document records whose chunks and envelopes are kept under the document's id (written before
/// slots, and still read and updated as they are).
const RECORD_BY_ID: u8 = 3;
/// Document records with a slot: chunks and envelopes kept under it ([`stored_at`]).
const RECORD_SLOTTED: u8 = 4;

/// A document record: its metadata, and the slot its chunks and envelopes are kept under
/// (`None` for a record written before slots, whose data is kept under its id).
pub(crate) fn encode_meta(m: &DocMeta, slot: Option<u64>) -> Vec<u8> {
    let mut w = Writer::default();
    w.u8(if slot.is_some() {
        RECORD_SLOTTED
    } else {
        RECORD_BY_ID
    })
    .str(&m.ty)
    .str(&m.origin)
    .u32(m.chunks)
    .u64(m.seq)
    .u64(m.updated as u64)
    .u32(len32(m.heads.len()));
    for h in &m.heads {
        w.bytes(h);
    }
    if let Some(slot) = slot {
        w.u64(slot);
    }
    w.0
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

pub(crate) fn decode_meta(b: &[u8]) -> Result<DocMeta, StoreError> {
    decode_record(b).map(|(m, _)| m)
}

/// A document record and its slot (see [`encode_meta`]).
fn decode_record(b: &[u8]) -> Result<(DocMeta, Option<u64>), StoreError> {
    let mut r = Reader(b);
    let version = r.u8()?;
    if version != RECORD_BY_ID && version != RECORD_SLOTTED {
        return Err(StoreError::Corrupt(format!(
            "document record version {version} is not one this build reads"
        )));
    }
    let ty = r.str()?;
    let origin = r.str()?;
    let chunks = r.u32()?;
    let seq = r.u64()?;
    let updated = r.u64()? as i64;
    let mut heads = Vec::new();
    for _ in 0..r.u32()? {
        let h = r.bytes()?;
        heads.push(
            <[u8; 32]>::try_from(h)
                .map_err(|_| StoreError::Corrupt("a head is not 32 bytes".into()))?,
        );
    }
    let slot = match version {
        RECORD_SLOTTED => Some(r.u64()?),
        _ => None,
    };
    Ok((
        DocMeta {
            ty,
            origin,
            chunks,
            seq,
            heads,
            updated,
        },
        slot,
    ))
}

/// An identifier value in a key: UUIDs (most values) take 17 bytes instead of 36.
fn enc_value(v: &str) -> Vec<u8> {
    match uuid::Uuid::try_parse(v) {
        Ok(u) if u.hyphenated().to_string() == v => {
            let mut out = Vec::with_capacity(17);
            out.push(1);
            out.extend_from_slice(u.as_bytes());
            out
        }
        _ => {
            let mut out = Vec::with_capacity(v.len() + 1);
            out.push(0);
            out.extend_from_slice(v.as_bytes());
            out
        }
    }
}

fn dec_value(b: &[u8]) -> Option<String> {
    match b.split_first()? {
        (1, rest) => Some(uuid::Uuid::from_slice(rest).ok()?.hyphenated().to_string()),
        (0, rest) => String::from_utf8(rest.to_vec()).ok(),
        _ => None,
    }
}

/// Where a document's data is kept in [`Table::Chunks`] and [`Table::Envelopes`]: under its
/// slot, the sequence number of the write that created it (8 bytes, big-endian), or under its
/// id (16 bytes) for a record written before slots. A new document's chunks and envelopes thus
/// land at the end of their tables, in a few pages, where keys by id would put each in a random
/// page of tables far larger than the page cache (a commit then reads a page back and writes it
/// out again for every document). The two forms differ in length and never meet.
fn stored_at(id: &DocId, slot: Option<u64>) -> Vec<u8> {
    match slot {
        Some(s) => s.to_be_bytes().to_vec(),
        None => id.to_vec(),
    }
}

/// The key of chunk `n` of a document kept at `slot` (see [`stored_at`]).
fn chunk_key(id: &DocId, slot: Option<u64>, n: u32) -> Vec<u8> {
    let mut k = stored_at(id, slot);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// A document's record and slot, if it is stored.
fn record(kv: &dyn KvRead, id: &DocId) -> Result<Option<(DocMeta, Option<u64>)>, StoreError> {
    kv.get(Table::Docs, id)?
        .map(|b| decode_record(&b))
        .transpose()
}

/// Identifier index key: value before system (see [`Table::Ident`]).
fn ident_key(ty: &str, system: &str, value: &str, id: &DocId) -> Vec<u8> {
    key(&[ty.as_bytes(), &enc_value(value), system.as_bytes(), id])
}

/// Reference index key: the target identity, then the source.
fn ref_key(ty: &str, system: &str, value: &str, id: &DocId) -> Vec<u8> {
    key(&[ty.as_bytes(), system.as_bytes(), &enc_value(value), id])
}

fn counter(kv: &dyn KvRead, name: &[u8]) -> Result<u64, StoreError> {
    kv.get(Table::Meta, name)?
        .map(|v| be_u64(&v))
        .transpose()
        .map(Option::unwrap_or_default)
}

fn set_counter(kv: &mut dyn KvWrite, name: &[u8], v: u64) -> Result<(), StoreError> {
    kv.put(Table::Meta, name, &v.to_be_bytes())
}

/// Applies a batch of writes inside the caller's transaction. Returns, for each write, the log
/// sequence number it was given (0 for writes that do not enter the log).
pub fn apply(
    kv: &mut dyn KvWrite,
    writes: Vec<Write>,
    budget: &QuarantineBudget,
) -> Result<Vec<u64>, StoreError> {
    ensure_store_id(kv)?;
    ensure_type_counts(kv)?;
    let mut next_seq = counter(kv, NEXT_SEQ)?.max(1);
    let mut documents = counter(kv, DOCUMENTS)?;
    let mut by_type: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    let mut seqs = Vec::with_capacity(writes.len());
    for w in writes {
        match w {
            Write::Doc(d) => {
                let seq = next_seq;
                next_seq += 1;
                let ty = d.ty.clone();
                if write_doc(kv, d, seq)? {
                    documents += 1;
                    *by_type.entry(ty).or_default() += 1;
                }
                seqs.push(seq);
            }
            Write::Checkpoint { peer, value } => {
                kv.put(Table::Checkpoints, peer.as_bytes(), &value)?;
                seqs.push(0);
            }
            Write::ForgetCheckpoints => {
                let mut peers = Vec::new();
                kv.scan(Table::Checkpoints, b"", &mut |k, _| {
                    peers.push(k.to_vec());
                    true
                })?;
                for p in peers
                    .into_iter()
                    .filter(|p| !p.starts_with(LOCAL_CHECKPOINT_PREFIX.as_bytes()))
                {
                    kv.del(Table::Checkpoints, &p)?;
                }
                seqs.push(0);
            }
            Write::Remove { id, entries, purge } => {
                if let Some(ty) = remove_doc(kv, &id, &entries, &purge)? {
                    documents = documents.saturating_sub(1);
                    *by_type.entry(ty).or_default() -= 1;
                }
                seqs.push(0);
            }
            Write::Quarantine(q) => {
                if quarantine(kv, q, next_seq, budget)? {
                    seqs.push(next_seq);
                    next_seq += 1;
                } else {
                    seqs.push(0);
                }
            }
        }
    }
    set_counter(kv, NEXT_SEQ, next_seq)?;
    set_counter(kv, DOCUMENTS, documents)?;
    for (ty, delta) in by_type {
        if delta != 0 {
            let key = type_count_key(&ty);
            let n = counter(kv, &key)?.saturating_add_signed(delta);
            set_counter(kv, &key, n)?;
        }
    }
    Ok(seqs)
}

/// Counts the documents of each type once, in a store written before the counters were kept.
fn ensure_type_counts(kv: &mut dyn KvWrite) -> Result<(), StoreError> {
    if type_counts_kept(kv)? {
        return Ok(());
    }
    let mut counts: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    let mut unreadable = 0u64;
    kv.scan(Table::Docs, &[], &mut |_, v| {
        match decode_meta(v) {
            Ok(m) => *counts.entry(m.ty).or_default() += 1,
            // A damaged record is not counted; it must not stop every later commit.
            Err(_) => unreadable += 1,
        }
        true
    })?;
    if unreadable > 0 {
        tracing::warn!(
            unreadable,
            "document records that cannot be read are left out of the counts by type"
        );
    }
    for (ty, n) in counts {
        set_counter(kv, &type_count_key(&ty), n)?;
    }
    kv.put(Table::Meta, TYPE_COUNTS, &[1])
}

/// Whether the store keeps its per-type document counters (a store written before does not
/// until its next commit).
pub fn type_counts_kept(kv: &dyn KvRead) -> Result<bool, StoreError> {
    Ok(kv.get(Table::Meta, TYPE_COUNTS)?.is_some())
}

/// See [`crate::Store::count_of_type`].
pub fn count_of_type(kv: &dyn KvRead, ty: &str) -> Result<usize, StoreError> {
    if !type_counts_kept(kv)? {
        return Ok(of_type(kv, ty)?.len());
    }
    Ok(usize::try_from(counter(kv, &type_count_key(ty))?).unwrap_or(usize::MAX))
}

fn payload_hash(q: &Quarantine) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"fieldmesh-quarantine-v1");
    h.update(q.doc);
    h.update(&q.data);
    h.finalize().into()
}

/// Keeps a quarantine record within the budget; returns whether a record was written (the same
/// payload kept before adds nothing).
fn quarantine(
    kv: &mut dyn KvWrite,
    q: Quarantine,
    seq: u64,
    budget: &QuarantineBudget,
) -> Result<bool, StoreError> {
    let hash = payload_hash(&q);
    if kv.get(Table::Payloads, &hash)?.is_some() {
        return Ok(false);
    }
    let len = q.data.len() as u64;
    // A payload larger than a source may keep is recorded, but not kept.
    let keep = len <= budget.per_source_bytes && len <= budget.total_bytes;
    let cost = if keep { len } else { 0 };
    let source_bytes = |kv: &dyn KvRead| -> Result<u64, StoreError> {
        kv.get(Table::QuarantineSources, q.from.as_bytes())?
            .map(|v| be_u64(&v))
            .transpose()
            .map(Option::unwrap_or_default)
    };
    loop {
        let over_source = source_bytes(kv)? + cost > budget.per_source_bytes;
        let over_total = counter(kv, QUARANTINE_BYTES)? + cost > budget.total_bytes
            || counter(kv, QUARANTINED)? + 1 > budget.records;
        if !over_source && !over_total {
            break;
        }
        let only = over_source.then_some(q.from.as_str());
        if !evict_oldest(kv, only)? {
            break;
        }
    }
    let mut w = Writer::default();
    w.u8(QUARANTINE_V4)
        .str(&q.reason)
        .str(&q.from)
        .bytes(&q.doc)
        .str(&q.ty)
        .u32(q.changes)
        .u64(len)
        .bytes(if keep { &hash } else { &[] });
    kv.put(Table::Quarantine, &seq.to_be_bytes(), &w.0)?;
    if keep {
        kv.put(Table::Payloads, &hash, &q.data)?;
        let now = source_bytes(kv)? + len;
        kv.put(
            Table::QuarantineSources,
            q.from.as_bytes(),
            &now.to_be_bytes(),
        )?;
        let total = counter(kv, QUARANTINE_BYTES)? + len;
        set_counter(kv, QUARANTINE_BYTES, total)?;
    }
    let records = counter(kv, QUARANTINED)? + 1;
    set_counter(kv, QUARANTINED, records)?;
    Ok(true)
}

/// Deletes the oldest quarantine record (of `source`, if given) and its payload; returns
/// whether there was one.
fn evict_oldest(kv: &mut dyn KvWrite, source: Option<&str>) -> Result<bool, StoreError> {
    let mut found = None;
    kv.scan(Table::Quarantine, &[], &mut |k, v| {
        match decode_quarantined(k, v) {
            Ok(r) if source.is_none_or(|s| s == r.from) => {
                found = Some((k.to_vec(), r));
                false
            }
            // An unreadable record is the oldest thing to drop.
            Err(_) if source.is_none() => {
                found = Some((k.to_vec(), Quarantined::unreadable()));
                false
            }
            _ => true,
        }
    })?;
    let Some((key, r)) = found else {
        return Ok(false);
    };
    kv.del(Table::Quarantine, &key)?;
    if r.payload != [0; 32] && kv.get(Table::Payloads, &r.payload)?.is_some() {
        kv.del(Table::Payloads, &r.payload)?;
        let total = counter(kv, QUARANTINE_BYTES)?.saturating_sub(r.bytes);
        set_counter(kv, QUARANTINE_BYTES, total)?;
        let left = kv
            .get(Table::QuarantineSources, r.from.as_bytes())?
            .map(|v| be_u64(&v))
            .transpose()?
            .unwrap_or_default()
            .saturating_sub(r.bytes);
        if left == 0 {
            kv.del(Table::QuarantineSources, r.from.as_bytes())?;
        } else {
            kv.put(
                Table::QuarantineSources,
                r.from.as_bytes(),
                &left.to_be_bytes(),
            )?;
        }
    }
    let records = counter(kv, QUARANTINED)?.saturating_sub(1);
    set_counter(kv, QUARANTINED, records)?;
    let evicted = counter(kv, QUARANTINE_EVICTED)? + 1;
    set_counter(kv, QUARANTINE_EVICTED, evicted)?;
    Ok(true)
}

impl Quarantined {
    fn unreadable() -> Self {
        Quarantined {
            seq: 0,
            reason: String::new(),
            from: String::new(),
            doc: None,
            ty: String::new(),
            changes: 0,
            bytes: 0,
            payload: [0; 32],
        }
    }
}

fn decode_quarantined(k: &[u8], v: &[u8]) -> Result<Quarantined, StoreError> {
    let seq = be_u64(k)?;
    let mut r = Reader(v);
    match r.u8()? {
        QUARANTINE_V3 => {
            let reason = r.str()?;
            let from = r.str()?;
            let data = r.bytes()?;
            Ok(Quarantined {
                seq,
                reason,
                from,
                doc: None,
                ty: String::new(),
                changes: 1,
                bytes: data.len() as u64,
                payload: [0; 32],
            })
        }
        QUARANTINE_V4 => {
            let reason = r.str()?;
            let from = r.str()?;
            let doc = DocId::try_from(r.bytes()?).ok();
            let ty = r.str()?;
            let changes = r.u32()?;
            let bytes = r.u64()?;
            let payload = <[u8; 32]>::try_from(r.bytes()?).unwrap_or([0; 32]);
            Ok(Quarantined {
                seq,
                reason,
                from,
                doc,
                ty,
                changes,
                bytes,
                payload,
            })
        }
        v => Err(StoreError::Corrupt(format!(
            "quarantine record version {v} is not one this build reads"
        ))),
    }
}

/// Writes one document; returns whether it is new (a new document is counted under the type
/// it is written with, which never changes).
fn write_doc(kv: &mut dyn KvWrite, d: DocWrite, seq: u64) -> Result<bool, StoreError> {
    // A new document is kept at the slot of the write creating it; one stored before keeps its
    // place (a record written before slots, under its id).
    let (old, slot) = match record(kv, &d.id)? {
        Some((m, slot)) => (Some(m), slot),
        None => (None, Some(seq)),
    };
    let is_new = old.is_none();
    let chunks = match (&d.data, &old) {
        (DocData::Full(_) | DocData::FullEncoded(_), old) => {
            for n in 1..old.as_ref().map_or(0, |m| m.chunks) {
                kv.del(Table::Chunks, &chunk_key(&d.id, slot, n))?;
            }
            let stored = match &d.data {
                DocData::FullEncoded(b) => {
                    codec::check(b)?;
                    std::borrow::Cow::Borrowed(b.as_slice())
                }
                DocData::Full(b) | DocData::Append(b) => std::borrow::Cow::Owned(codec::encode(b)?),
            };
            kv.put(Table::Chunks, &chunk_key(&d.id, slot, 0), &stored)?;
            1
        }
        (DocData::Append(bytes), Some(m)) => {
            kv.put(
                Table::Chunks,
                &chunk_key(&d.id, slot, m.chunks),
                &codec::encode(bytes)?,
            )?;
            m.chunks + 1
        }
        (DocData::Append(_), None) => {
            return Err(StoreError::NotFound(format!(
                "cannot append to document {} which is not in the store",
                uuid::Uuid::from_bytes(d.id)
            )));
        }
    };
    let (old_idents, old_refs) = match &old {
        Some(m) => {
            kv.del(Table::Log, &m.seq.to_be_bytes())?;
            (
                d.previous
                    .identifiers
                    .iter()
                    .cloned()
                    .collect::<BTreeSet<_>>(),
                d.previous
                    .references
                    .iter()
                    .cloned()
                    .collect::<BTreeSet<_>>(),
            )
        }
        None => Default::default(),
    };
    let new_idents: BTreeSet<_> = d.identifiers.iter().cloned().collect();
    let new_refs: BTreeSet<_> = d.references.iter().cloned().collect();
    // resourceType never changes: index under the stored type.
    let ty = old
        .as_ref()
        .map_or(d.ty.as_str(), |m| m.ty.as_str())
        .to_string();
    for (s, v) in old_idents.difference(&new_idents) {
        kv.del(Table::Ident, &ident_key(&ty, s, v, &d.id))?;
    }
    for (s, v) in new_idents.difference(&old_idents) {
        kv.put(Table::Ident, &ident_key(&ty, s, v, &d.id), &[])?;
    }
    for (t, s, v) in old_refs.difference(&new_refs) {
        kv.del(Table::Refs, &ref_key(t, s, v, &d.id))?;
    }
    for (t, s, v) in new_refs.difference(&old_refs) {
        kv.put(Table::Refs, &ref_key(t, s, v, &d.id), &[])?;
    }
    kv.put(Table::Log, &seq.to_be_bytes(), &d.id)?;
    if !d.envelopes.is_empty() {
        let at = stored_at(&d.id, slot);
        let mut all = if is_new {
            Vec::new()
        } else {
            kv.get(Table::Envelopes, &at)?.unwrap_or_default()
        };
        all.extend_from_slice(&d.envelopes);
        kv.put(Table::Envelopes, &at, &all)?;
    }
    let meta = DocMeta {
        ty,
        origin: old.map_or(d.origin, |m| m.origin),
        chunks,
        seq,
        heads: d.heads,
        updated: d.updated,
    };
    kv.put(Table::Docs, &d.id, &encode_meta(&meta, slot))?;
    Ok(is_new)
}

/// Removes a document and its index entries; returns whether it was there.
fn remove_doc(
    kv: &mut dyn KvWrite,
    id: &DocId,
    entries: &crate::IndexEntries,
    purge: &[String],
) -> Result<Option<String>, StoreError> {
    let Some((meta, slot)) = record(kv, id)? else {
        return Ok(None);
    };
    for n in 0..meta.chunks {
        kv.del(Table::Chunks, &chunk_key(id, slot, n))?;
    }
    for (s, v) in &entries.identifiers {
        kv.del(Table::Ident, &ident_key(&meta.ty, s, v, id))?;
    }
    for (t, s, v) in &entries.references {
        kv.del(Table::Refs, &ref_key(t, s, v, id))?;
    }
    for t in purge {
        let mut keys = Vec::new();
        kv.scan(Table::Refs, &key(&[t.as_bytes()]), &mut |k, _| {
            if trailing_id(k).as_ref() == Some(id) {
                keys.push(k.to_vec());
            }
            true
        })?;
        for k in keys {
            kv.del(Table::Refs, &k)?;
        }
    }
    kv.del(Table::Log, &meta.seq.to_be_bytes())?;
    kv.del(Table::Envelopes, &stored_at(id, slot))?;
    kv.del(Table::Docs, id)?;
    Ok(Some(meta.ty))
}

/// See [`crate::Store::envelopes`].
pub fn envelopes(kv: &dyn KvRead, id: &DocId) -> Result<Vec<u8>, StoreError> {
    let Some((_, slot)) = record(kv, id)? else {
        return Ok(Vec::new());
    };
    Ok(kv
        .get(Table::Envelopes, &stored_at(id, slot))?
        .unwrap_or_default())
}

/// See [`crate::Store::doc_meta`].
pub fn doc_meta(kv: &dyn KvRead, id: &DocId) -> Result<Option<DocMeta>, StoreError> {
    kv.get(Table::Docs, id)?
        .map(|b| decode_meta(&b))
        .transpose()
}

/// See [`crate::Store::doc_bytes`].
pub fn doc_bytes(kv: &dyn KvRead, id: &DocId) -> Result<Option<Vec<u8>>, StoreError> {
    let Some((meta, slot)) = record(kv, id)? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for n in 0..meta.chunks {
        let chunk = kv
            .get(Table::Chunks, &chunk_key(id, slot, n))?
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "document {} is missing part {n} of its data",
                    uuid::Uuid::from_bytes(*id)
                ))
            })?;
        codec::decode_into(&chunk, &mut out)?;
    }
    Ok(Some(out))
}

fn trailing_id(k: &[u8]) -> Option<DocId> {
    parts(k)?.last().and_then(|p| DocId::try_from(*p).ok())
}

fn collect_ids(kv: &dyn KvRead, table: Table, prefix: Vec<u8>) -> Result<Vec<DocId>, StoreError> {
    let mut out = Vec::new();
    kv.scan(table, &prefix, &mut |k, _| {
        if let Some(id) = trailing_id(k) {
            out.push(id);
        }
        true
    })?;
    Ok(out)
}

/// See [`crate::Store::find`].
pub fn find(
    kv: &dyn KvRead,
    ty: &str,
    system: &str,
    value: &str,
) -> Result<Vec<DocId>, StoreError> {
    collect_ids(
        kv,
        Table::Ident,
        key(&[ty.as_bytes(), &enc_value(value), system.as_bytes()]),
    )
}

/// See [`crate::Store::of_type`].
pub fn of_type(kv: &dyn KvRead, ty: &str) -> Result<Vec<DocId>, StoreError> {
    let mut ids = collect_ids(kv, Table::Ident, key(&[ty.as_bytes()]))?;
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// See [`crate::Store::find_value`].
pub fn find_value(kv: &dyn KvRead, ty: &str, value: &str) -> Result<Vec<DocId>, StoreError> {
    let mut ids = collect_ids(kv, Table::Ident, key(&[ty.as_bytes(), &enc_value(value)]))?;
    // One document may carry the value under several systems.
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// See [`crate::Store::referrers`].
pub fn referrers(
    kv: &dyn KvRead,
    ty: &str,
    system: &str,
    value: &str,
) -> Result<Vec<DocId>, StoreError> {
    collect_ids(
        kv,
        Table::Refs,
        key(&[ty.as_bytes(), system.as_bytes(), &enc_value(value)]),
    )
}

/// See [`crate::Store::changes_since`].
pub fn changes_since(
    kv: &dyn KvRead,
    after: u64,
    limit: usize,
) -> Result<Vec<(u64, DocId)>, StoreError> {
    let mut out = Vec::new();
    let mut err = None;
    kv.scan_from(Table::Log, &(after + 1).to_be_bytes(), &mut |k, v| {
        match (be_u64(k), DocId::try_from(v)) {
            (Ok(seq), Ok(id)) => out.push((seq, id)),
            _ => {
                err = Some(StoreError::Corrupt(
                    "a change-log entry is malformed".into(),
                ))
            }
        }
        err.is_none() && out.len() < limit
    })?;
    err.map_or(Ok(out), Err)
}

/// See [`crate::Store::checkpoint`].
pub fn checkpoint(kv: &dyn KvRead, peer: &str) -> Result<Option<Vec<u8>>, StoreError> {
    kv.get(Table::Checkpoints, peer.as_bytes())
}

const STORE_ID: &[u8] = b"store_id";

/// See [`crate::Store::store_id`].
pub fn store_id(kv: &dyn KvRead) -> Result<[u8; 16], StoreError> {
    match kv.get(Table::Meta, STORE_ID)? {
        None => Ok([0; 16]),
        Some(v) => <[u8; 16]>::try_from(v.as_slice())
            .map_err(|_| StoreError::Corrupt("the store id is malformed".into())),
    }
}

/// Gives the store its random id if it has none yet.
pub fn ensure_store_id(kv: &mut dyn KvWrite) -> Result<(), StoreError> {
    if kv.get(Table::Meta, STORE_ID)?.is_none() {
        kv.put(Table::Meta, STORE_ID, uuid::Uuid::new_v4().as_bytes())?;
    }
    Ok(())
}

/// See [`crate::Store::quarantined`].
pub fn quarantined(kv: &dyn KvRead, limit: usize) -> Result<Vec<Quarantined>, StoreError> {
    let mut out = Vec::new();
    let mut err = None;
    kv.scan(Table::Quarantine, &[], &mut |k, v| {
        match decode_quarantined(k, v) {
            Ok(q) => out.push(q),
            Err(e) => err = Some(e),
        }
        err.is_none() && out.len() < limit
    })?;
    err.map_or(Ok(out), Err)
}

/// See [`crate::Store::quarantined_payload`].
pub fn quarantined_payload(
    kv: &dyn KvRead,
    hash: &[u8; 32],
) -> Result<Option<Vec<u8>>, StoreError> {
    kv.get(Table::Payloads, hash)
}

/// See [`crate::Store::stats`].
pub fn stats(kv: &dyn KvRead) -> Result<Stats, StoreError> {
    Ok(Stats {
        documents: counter(kv, DOCUMENTS)?,
        last_seq: counter(kv, NEXT_SEQ)?.saturating_sub(1),
        quarantined: counter(kv, QUARANTINED)?,
        quarantine_bytes: counter(kv, QUARANTINE_BYTES)?,
        quarantine_evicted: counter(kv, QUARANTINE_EVICTED)?,
    })
}

/// Decodes an index key into `(type, system, value, doc)`; `value_first` for identifier keys.
fn split_index_key(k: &[u8], value_first: bool) -> Option<(String, String, String, DocId)> {
    let p = parts(k)?;
    let [ty, a, b, id] = p.as_slice() else {
        return None;
    };
    let (system, value) = if value_first { (b, a) } else { (a, b) };
    Some((
        String::from_utf8(ty.to_vec()).ok()?,
        String::from_utf8(system.to_vec()).ok()?,
        dec_value(value)?,
        DocId::try_from(*id).ok()?,
    ))
}

/// See [`crate::Store::index_entries`].
pub fn index_entries(kv: &dyn KvRead) -> Result<IndexDump, StoreError> {
    let mut dump = IndexDump::default();
    let mut bad = 0usize;
    kv.scan(Table::Ident, &[], &mut |k, _| {
        match split_index_key(k, true) {
            Some(e) => {
                dump.identifiers.insert(e);
            }
            None => bad += 1,
        }
        true
    })?;
    kv.scan(Table::Refs, &[], &mut |k, _| {
        match split_index_key(k, false) {
            Some(e) => {
                dump.references.insert(e);
            }
            None => bad += 1,
        }
        true
    })?;
    if bad > 0 {
        return Err(StoreError::Corrupt(format!(
            "{bad} index keys are malformed"
        )));
    }
    Ok(dump)
}

/// See [`crate::Store::verify`].
pub fn verify(kv: &dyn KvRead) -> Result<Vec<String>, StoreError> {
    let mut problems = Vec::new();
    let mut docs: std::collections::BTreeMap<DocId, DocMeta> = Default::default();
    let mut slots: std::collections::BTreeMap<DocId, Option<u64>> = Default::default();
    let mut decode_err = None;
    kv.scan(Table::Docs, &[], &mut |k, v| {
        match (DocId::try_from(k), decode_record(v)) {
            (Ok(id), Ok((m, slot))) => {
                docs.insert(id, m);
                slots.insert(id, slot);
            }
            (Err(_), _) => {
                decode_err = Some(StoreError::Corrupt("a document key is not 16 bytes".into()))
            }
            (_, Err(e)) => decode_err = Some(e),
        }
        decode_err.is_none()
    })?;
    if let Some(e) = decode_err {
        return Err(e);
    }
    // Every index entry belongs to a stored document of the indexed type.
    let dump = index_entries(kv)?;
    let stray_idents = dump
        .identifiers
        .iter()
        .filter(|(ty, _, _, id)| docs.get(id).is_none_or(|m| &m.ty != ty))
        .count();
    if stray_idents > 0 {
        problems.push(format!(
            "identifier index: {stray_idents} entries without a document of that type"
        ));
    }
    let stray_refs = dump
        .references
        .iter()
        .filter(|(_, _, _, id)| !docs.contains_key(id))
        .count();
    if stray_refs > 0 {
        problems.push(format!(
            "reference index: {stray_refs} entries from documents that are not stored"
        ));
    }
    // Chunks: exactly the ones the records name, each readable.
    let mut chunk_keys = BTreeSet::new();
    kv.scan(Table::Chunks, &[], &mut |k, _| {
        chunk_keys.insert(k.to_vec());
        true
    })?;
    let expected_chunks: BTreeSet<Vec<u8>> = docs
        .iter()
        .flat_map(|(id, m)| {
            let slot = slots.get(id).copied().flatten();
            (0..m.chunks).map(move |n| chunk_key(id, slot, n))
        })
        .collect();
    let mut named = BTreeSet::new();
    let shared = slots
        .values()
        .flatten()
        .filter(|s| !named.insert(**s))
        .count();
    if shared > 0 {
        problems.push(format!(
            "document data: {shared} documents name a slot another one names"
        ));
    }
    if chunk_keys != expected_chunks {
        problems.push(format!(
            "document data: {} chunks stored, {} named by the documents",
            chunk_keys.len(),
            expected_chunks.len()
        ));
    }
    for id in docs.keys() {
        if let Err(e) = doc_bytes(kv, id) {
            problems.push(format!("document {}: {e}", uuid::Uuid::from_bytes(*id)));
        }
    }
    let mut log = BTreeSet::new();
    kv.scan(Table::Log, &[], &mut |k, v| {
        log.insert((k.to_vec(), v.to_vec()));
        true
    })?;
    let expected_log: BTreeSet<(Vec<u8>, Vec<u8>)> = docs
        .iter()
        .map(|(id, m)| (m.seq.to_be_bytes().to_vec(), id.to_vec()))
        .collect();
    if log != expected_log {
        problems.push(format!(
            "change log: {} entries, {} expected from the documents",
            log.len(),
            expected_log.len()
        ));
    }
    let counted = counter(kv, DOCUMENTS)?;
    if counted != docs.len() as u64 {
        problems.push(format!(
            "document counter says {counted}, the store holds {}",
            docs.len()
        ));
    }
    let next = counter(kv, NEXT_SEQ)?;
    if let Some((last, _)) = log.iter().next_back()
        && be_u64(last)? >= next
    {
        problems.push("the change log is ahead of its sequence counter".into());
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IndexEntries;
    use crate::mem::{Tables as Kv, Txn};

    /// The keys the store wrote in `table`.
    fn keys(kv: &Kv, table: Table) -> Vec<Vec<u8>> {
        kv.get(&table)
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn doc(id: u8, data: DocData, envelopes: &[u8]) -> Write {
        Write::Doc(DocWrite {
            id: [id; 16],
            ty: "Patient".into(),
            origin: "urn:test".into(),
            data,
            heads: vec![[id; 32]],
            updated: 1,
            identifiers: vec![("urn:test".into(), format!("p{id}"))],
            references: Vec::new(),
            previous: IndexEntries::default(),
            envelopes: envelopes.to_vec(),
        })
    }

    fn apply_one(kv: &mut Kv, w: Write) -> u64 {
        apply(&mut Txn::new(kv), vec![w], &QuarantineBudget::default()).expect("applied")[0]
    }

    fn remove(id: u8) -> Write {
        Write::Remove {
            id: [id; 16],
            entries: IndexEntries {
                identifiers: vec![("urn:test".into(), format!("p{id}"))],
                references: Vec::new(),
            },
            purge: Vec::new(),
        }
    }

    #[test]
    fn new_documents_are_kept_under_sequential_slots() {
        let mut kv = Kv::default();
        let a = apply_one(&mut kv, doc(9, DocData::Full(b"first".to_vec()), b"env-a"));
        let b = apply_one(&mut kv, doc(1, DocData::Full(b"second".to_vec()), b"env-b"));
        assert!(b > a);
        // Keyed by the creating write's sequence, not by the (random) id: b's id sorts first,
        // its data after a's.
        let slot_key = |seq: u64, n: u32| {
            let mut k = seq.to_be_bytes().to_vec();
            k.extend_from_slice(&n.to_be_bytes());
            k
        };
        assert_eq!(
            keys(&kv, Table::Chunks),
            vec![slot_key(a, 0), slot_key(b, 0)]
        );
        assert_eq!(
            keys(&kv, Table::Envelopes),
            vec![a.to_be_bytes().to_vec(), b.to_be_bytes().to_vec()]
        );
        assert_eq!(
            doc_bytes(&kv, &[9; 16]).expect("read"),
            Some(b"first".to_vec())
        );
        assert_eq!(envelopes(&kv, &[1; 16]).expect("read"), b"env-b".to_vec());
        assert!(verify(&kv).expect("verified").is_empty());

        // Later writes stay at the slot, whatever their sequence.
        apply_one(&mut kv, doc(9, DocData::Append(b"+more".to_vec()), b"+env"));
        assert_eq!(
            doc_bytes(&kv, &[9; 16]).expect("read"),
            Some(b"first+more".to_vec())
        );
        assert_eq!(
            envelopes(&kv, &[9; 16]).expect("read"),
            b"env-a+env".to_vec()
        );
        assert!(keys(&kv, Table::Chunks).contains(&slot_key(a, 1)));
        apply_one(&mut kv, doc(9, DocData::Full(b"compacted".to_vec()), b""));
        assert_eq!(
            keys(&kv, Table::Chunks),
            vec![slot_key(a, 0), slot_key(b, 0)]
        );
        assert!(verify(&kv).expect("verified").is_empty());

        // Removed, then written again: a new slot, nothing left at the old one.
        apply_one(&mut kv, remove(9));
        assert_eq!(keys(&kv, Table::Chunks), vec![slot_key(b, 0)]);
        assert_eq!(keys(&kv, Table::Envelopes), vec![b.to_be_bytes().to_vec()]);
        let again = apply_one(&mut kv, doc(9, DocData::Full(b"back".to_vec()), b"e"));
        assert_eq!(
            keys(&kv, Table::Chunks),
            vec![slot_key(b, 0), slot_key(again, 0)]
        );
        assert!(verify(&kv).expect("verified").is_empty());
    }

    #[test]
    fn records_written_before_slots_are_read_updated_and_removed_in_place() {
        let mut kv = Kv::default();
        let seq = apply_one(&mut kv, doc(7, DocData::Full(b"old".to_vec()), b"env"));
        // Laid out as a store written before slots: record version 3, data under the id.
        let id = [7u8; 16];
        let (meta, slot) = record(&kv, &id).expect("read").expect("stored");
        assert_eq!(slot, Some(seq));
        let mut raw = Txn::new(&mut kv);
        for (table, from, to) in [
            (
                Table::Chunks,
                chunk_key(&id, slot, 0),
                chunk_key(&id, None, 0),
            ),
            (Table::Envelopes, stored_at(&id, slot), id.to_vec()),
        ] {
            let value = raw.get(table, &from).expect("read").expect("stored");
            raw.del(table, &from).expect("del");
            raw.put(table, &to, &value).expect("put");
        }
        raw.put(Table::Docs, &id, &encode_meta(&meta, None))
            .expect("put");
        assert_eq!(
            KvRead::get(&kv, Table::Docs, &id)
                .expect("get")
                .expect("record")[0],
            3
        );

        assert!(verify(&kv).expect("verified").is_empty());
        assert_eq!(doc_bytes(&kv, &id).expect("read"), Some(b"old".to_vec()));
        assert_eq!(envelopes(&kv, &id).expect("read"), b"env".to_vec());
        apply_one(&mut kv, doc(7, DocData::Append(b"+new".to_vec()), b"+e"));
        assert_eq!(
            doc_bytes(&kv, &id).expect("read"),
            Some(b"old+new".to_vec())
        );
        assert_eq!(envelopes(&kv, &id).expect("read"), b"env+e".to_vec());
        assert_eq!(
            keys(&kv, Table::Chunks),
            vec![chunk_key(&id, None, 0), chunk_key(&id, None, 1)]
        );
        // Still a record of version 3: a store stays readable by the build that wrote it.
        assert_eq!(
            KvRead::get(&kv, Table::Docs, &id)
                .expect("get")
                .expect("record")[0],
            3
        );
        assert!(verify(&kv).expect("verified").is_empty());
        apply_one(&mut kv, remove(7));
        assert!(keys(&kv, Table::Chunks).is_empty());
        assert!(keys(&kv, Table::Envelopes).is_empty());
        assert!(verify(&kv).expect("verified").is_empty());
    }

    #[test]
    fn verify_names_two_documents_at_one_slot_and_data_at_no_slot() {
        let mut kv = Kv::default();
        apply_one(&mut kv, doc(1, DocData::Full(b"a".to_vec()), b""));
        let b = apply_one(&mut kv, doc(2, DocData::Full(b"b".to_vec()), b""));
        let (meta, _) = record(&kv, &[1; 16]).expect("read").expect("stored");
        Txn::new(&mut kv)
            .put(Table::Docs, &[1; 16], &encode_meta(&meta, Some(b)))
            .expect("put");
        let problems = verify(&kv).expect("verified");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("slot another one names")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("chunks stored")),
            "{problems:?}"
        );
    }
}
