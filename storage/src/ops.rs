//! Store logic written once over the [`KvRead`]/[`KvWrite`] seam: applying writes with their index
//! maintenance, the queries, and the integrity check.

use std::collections::BTreeSet;

use crate::kv::{KvRead, KvWrite, Reader, Table, Writer, be_u64, key, parts};
use crate::{DocData, DocId, DocMeta, DocWrite, Quarantined, Stats, StoreError, Write};

const NEXT_SEQ: &[u8] = b"next_seq";
const DOCUMENTS: &[u8] = b"documents";
const QUARANTINED: &[u8] = b"quarantined";
const RECORD_VERSION: u8 = 1;

pub(crate) fn encode_meta(m: &DocMeta) -> Vec<u8> {
    let mut w = Writer::default();
    w.u8(RECORD_VERSION)
        .str(&m.ty)
        .str(&m.origin)
        .u32(m.chunks)
        .u64(m.seq)
        .u32(len32(m.heads.len()));
    for h in &m.heads {
        w.bytes(h);
    }
    w.u32(len32(m.identifiers.len()));
    for (s, v) in &m.identifiers {
        w.str(s).str(v);
    }
    w.u32(len32(m.references.len()));
    for (t, s, v) in &m.references {
        w.str(t).str(s).str(v);
    }
    w.0
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

pub(crate) fn decode_meta(b: &[u8]) -> Result<DocMeta, StoreError> {
    let mut r = Reader(b);
    let version = r.u8()?;
    if version != RECORD_VERSION {
        return Err(StoreError::Corrupt(format!(
            "document record version {version} is not one this build reads"
        )));
    }
    let ty = r.str()?;
    let origin = r.str()?;
    let chunks = r.u32()?;
    let seq = r.u64()?;
    let mut heads = Vec::new();
    for _ in 0..r.u32()? {
        let h = r.bytes()?;
        heads.push(
            <[u8; 32]>::try_from(h)
                .map_err(|_| StoreError::Corrupt("a head is not 32 bytes".into()))?,
        );
    }
    let mut identifiers = Vec::new();
    for _ in 0..r.u32()? {
        identifiers.push((r.str()?, r.str()?));
    }
    let mut references = Vec::new();
    for _ in 0..r.u32()? {
        references.push((r.str()?, r.str()?, r.str()?));
    }
    Ok(DocMeta {
        ty,
        origin,
        chunks,
        seq,
        heads,
        identifiers,
        references,
    })
}

fn chunk_key(id: &DocId, n: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(20);
    k.extend_from_slice(id);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

fn ident_key(ty: &str, system: &str, value: &str, id: &DocId) -> Vec<u8> {
    key(&[ty.as_bytes(), system.as_bytes(), value.as_bytes(), id])
}

fn value_key(ty: &str, value: &str, id: &DocId) -> Vec<u8> {
    key(&[ty.as_bytes(), value.as_bytes(), id])
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
pub(crate) fn apply(kv: &mut dyn KvWrite, writes: Vec<Write>) -> Result<Vec<u64>, StoreError> {
    let mut next_seq = counter(kv, NEXT_SEQ)?.max(1);
    let mut documents = counter(kv, DOCUMENTS)?;
    let mut quarantined = counter(kv, QUARANTINED)?;
    let mut seqs = Vec::with_capacity(writes.len());
    for w in writes {
        match w {
            Write::Doc(d) => {
                let seq = next_seq;
                next_seq += 1;
                if write_doc(kv, d, seq)? {
                    documents += 1;
                }
                seqs.push(seq);
            }
            Write::Checkpoint { peer, seq } => {
                kv.put(Table::Checkpoints, peer.as_bytes(), &seq.to_be_bytes())?;
                seqs.push(0);
            }
            Write::Quarantine(q) => {
                let seq = next_seq;
                next_seq += 1;
                let mut w = Writer::default();
                w.u8(RECORD_VERSION)
                    .str(&q.reason)
                    .str(&q.from)
                    .bytes(&q.data);
                kv.put(Table::Quarantine, &seq.to_be_bytes(), &w.0)?;
                quarantined += 1;
                seqs.push(seq);
            }
        }
    }
    set_counter(kv, NEXT_SEQ, next_seq)?;
    set_counter(kv, DOCUMENTS, documents)?;
    set_counter(kv, QUARANTINED, quarantined)?;
    Ok(seqs)
}

/// Writes one document; returns whether it is new.
fn write_doc(kv: &mut dyn KvWrite, d: DocWrite, seq: u64) -> Result<bool, StoreError> {
    let old = kv
        .get(Table::Docs, &d.id)?
        .map(|b| decode_meta(&b))
        .transpose()?;
    let chunks = match (&d.data, &old) {
        (DocData::Full(bytes), old) => {
            for n in 1..old.as_ref().map_or(0, |m| m.chunks) {
                kv.del(Table::Chunks, &chunk_key(&d.id, n))?;
            }
            kv.put(Table::Chunks, &chunk_key(&d.id, 0), bytes)?;
            1
        }
        (DocData::Append(bytes), Some(m)) => {
            kv.put(Table::Chunks, &chunk_key(&d.id, m.chunks), bytes)?;
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
                m.identifiers.iter().cloned().collect::<BTreeSet<_>>(),
                m.references.iter().cloned().collect::<BTreeSet<_>>(),
            )
        }
        None => Default::default(),
    };
    let new_idents: BTreeSet<_> = d.identifiers.iter().cloned().collect();
    let new_refs: BTreeSet<_> = d.references.iter().cloned().collect();
    let old_ty = old
        .as_ref()
        .map_or(d.ty.as_str(), |m| m.ty.as_str())
        .to_string();
    for (s, v) in old_idents.difference(&new_idents) {
        kv.del(Table::Ident, &ident_key(&old_ty, s, v, &d.id))?;
    }
    let old_values: BTreeSet<&String> = old_idents.iter().map(|(_, v)| v).collect();
    let new_values: BTreeSet<&String> = new_idents.iter().map(|(_, v)| v).collect();
    for v in old_values.difference(&new_values) {
        kv.del(Table::IdentValue, &value_key(&old_ty, v, &d.id))?;
    }
    for (s, v) in new_idents.difference(&old_idents) {
        kv.put(Table::Ident, &ident_key(&d.ty, s, v, &d.id), &[])?;
    }
    for v in new_values.difference(&old_values) {
        kv.put(Table::IdentValue, &value_key(&d.ty, v, &d.id), &[])?;
    }
    for (t, s, v) in old_refs.difference(&new_refs) {
        kv.del(Table::Refs, &ident_key(t, s, v, &d.id))?;
    }
    for (t, s, v) in new_refs.difference(&old_refs) {
        kv.put(Table::Refs, &ident_key(t, s, v, &d.id), &[])?;
    }
    kv.put(Table::Log, &seq.to_be_bytes(), &d.id)?;
    let meta = DocMeta {
        ty: d.ty,
        origin: d.origin,
        chunks,
        seq,
        heads: d.heads,
        identifiers: new_idents.into_iter().collect(),
        references: new_refs.into_iter().collect(),
    };
    kv.put(Table::Docs, &d.id, &encode_meta(&meta))?;
    Ok(old.is_none())
}

pub(crate) fn doc_meta(kv: &dyn KvRead, id: &DocId) -> Result<Option<DocMeta>, StoreError> {
    kv.get(Table::Docs, id)?
        .map(|b| decode_meta(&b))
        .transpose()
}

pub(crate) fn doc_bytes(kv: &dyn KvRead, id: &DocId) -> Result<Option<Vec<u8>>, StoreError> {
    let Some(meta) = doc_meta(kv, id)? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for n in 0..meta.chunks {
        let chunk = kv.get(Table::Chunks, &chunk_key(id, n))?.ok_or_else(|| {
            StoreError::Corrupt(format!(
                "document {} is missing part {n} of its data",
                uuid::Uuid::from_bytes(*id)
            ))
        })?;
        out.extend_from_slice(&chunk);
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

pub(crate) fn find(
    kv: &dyn KvRead,
    ty: &str,
    system: &str,
    value: &str,
) -> Result<Vec<DocId>, StoreError> {
    collect_ids(
        kv,
        Table::Ident,
        key(&[ty.as_bytes(), system.as_bytes(), value.as_bytes()]),
    )
}

pub(crate) fn find_value(kv: &dyn KvRead, ty: &str, value: &str) -> Result<Vec<DocId>, StoreError> {
    collect_ids(
        kv,
        Table::IdentValue,
        key(&[ty.as_bytes(), value.as_bytes()]),
    )
}

pub(crate) fn referrers(
    kv: &dyn KvRead,
    ty: &str,
    system: &str,
    value: &str,
) -> Result<Vec<DocId>, StoreError> {
    collect_ids(
        kv,
        Table::Refs,
        key(&[ty.as_bytes(), system.as_bytes(), value.as_bytes()]),
    )
}

pub(crate) fn changes_since(
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

pub(crate) fn checkpoint(kv: &dyn KvRead, peer: &str) -> Result<u64, StoreError> {
    kv.get(Table::Checkpoints, peer.as_bytes())?
        .map(|v| be_u64(&v))
        .transpose()
        .map(Option::unwrap_or_default)
}

pub(crate) fn quarantined(kv: &dyn KvRead, limit: usize) -> Result<Vec<Quarantined>, StoreError> {
    let mut out = Vec::new();
    let mut err = None;
    kv.scan(Table::Quarantine, &[], &mut |_, v| {
        let mut r = Reader(v);
        let rec = (|| -> Result<Quarantined, StoreError> {
            let _version = r.u8()?;
            Ok(Quarantined {
                reason: r.str()?,
                from: r.str()?,
                data: r.bytes()?.to_vec(),
            })
        })();
        match rec {
            Ok(q) => out.push(q),
            Err(e) => err = Some(e),
        }
        err.is_none() && out.len() < limit
    })?;
    err.map_or(Ok(out), Err)
}

pub(crate) fn stats(kv: &dyn KvRead) -> Result<Stats, StoreError> {
    Ok(Stats {
        documents: counter(kv, DOCUMENTS)?,
        last_seq: counter(kv, NEXT_SEQ)?.saturating_sub(1),
        quarantined: counter(kv, QUARANTINED)?,
    })
}

/// Checks that the indexes, the log and the counters agree with the document records. Returns
/// every disagreement found (empty when the store is consistent).
pub(crate) fn verify(kv: &dyn KvRead) -> Result<Vec<String>, StoreError> {
    let mut problems = Vec::new();
    let mut expected_ident = BTreeSet::new();
    let mut expected_value = BTreeSet::new();
    let mut expected_refs = BTreeSet::new();
    let mut expected_log = BTreeSet::new();
    let mut expected_chunks = BTreeSet::new();
    let mut docs = 0u64;
    let mut decode_err = None;
    kv.scan(Table::Docs, &[], &mut |k, v| {
        let Ok(id) = DocId::try_from(k) else {
            decode_err = Some(StoreError::Corrupt("a document key is not 16 bytes".into()));
            return false;
        };
        match decode_meta(v) {
            Ok(m) => {
                docs += 1;
                for (s, val) in &m.identifiers {
                    expected_ident.insert(ident_key(&m.ty, s, val, &id));
                    expected_value.insert(value_key(&m.ty, val, &id));
                }
                for (t, s, val) in &m.references {
                    expected_refs.insert(ident_key(t, s, val, &id));
                }
                expected_log.insert((m.seq.to_be_bytes().to_vec(), id.to_vec()));
                for n in 0..m.chunks {
                    expected_chunks.insert(chunk_key(&id, n));
                }
            }
            Err(e) => decode_err = Some(e),
        }
        decode_err.is_none()
    })?;
    if let Some(e) = decode_err {
        return Err(e);
    }
    let mut compare =
        |table: Table, expected: &BTreeSet<Vec<u8>>, what: &str| -> Result<(), StoreError> {
            let mut found = BTreeSet::new();
            kv.scan(table, &[], &mut |k, _| {
                found.insert(k.to_vec());
                true
            })?;
            let missing = expected.difference(&found).count();
            let stray = found.difference(expected).count();
            if missing > 0 || stray > 0 {
                problems.push(format!(
                    "{what}: {missing} entries missing, {stray} entries without a document"
                ));
            }
            Ok(())
        };
    compare(Table::Ident, &expected_ident, "identifier index")?;
    compare(Table::IdentValue, &expected_value, "identifier value index")?;
    compare(Table::Refs, &expected_refs, "reference index")?;
    compare(Table::Chunks, &expected_chunks, "document data")?;
    let mut log = BTreeSet::new();
    kv.scan(Table::Log, &[], &mut |k, v| {
        log.insert((k.to_vec(), v.to_vec()));
        true
    })?;
    if log != expected_log {
        problems.push(format!(
            "change log: {} entries, {} expected from the documents",
            log.len(),
            expected_log.len()
        ));
    }
    let counted = counter(kv, DOCUMENTS)?;
    if counted != docs {
        problems.push(format!(
            "document counter says {counted}, the store holds {docs}"
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
