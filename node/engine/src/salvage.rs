//! Salvage: the readable documents of a damaged store, taken into a fresh one.
//!
//! A store file damaged on disk (a bad sector, a flipped bit, a copy cut short) loses the records
//! on the damaged pages. Salvage lists every document the damaged store can still find
//! ([`Store::doc_ids_tolerant`]), reads each (record, Automerge bytes, envelopes) and merges it
//! into this engine's store as a file would hand it in: every change is checked again (signature,
//! author, scope), so what a damaged page garbled is refused, never stored. Certificates and
//! revocations go first, as in any merge. What cannot be read is reported by id; a node that
//! syncs after salvage gets it back from its peers (the fresh store has a new id and no
//! checkpoints, so its first sessions reconcile everything).

use fieldmesh_protocol::DocPayload;
use fieldmesh_storage::Store;
use fieldmesh_trust::Envelope;

use crate::error::MergeError;
use crate::{Engine, Source};

/// Documents merged per batch.
const BATCH: usize = 256;

/// What [`Engine::salvage`] did.
#[derive(Debug, Default)]
pub struct SalvageReport {
    /// Documents found in the damaged store.
    pub found: usize,
    /// Documents taken into this store.
    pub kept: usize,
    /// Documents whose records or data could not be read, with why.
    pub unreadable: Vec<(uuid::Uuid, String)>,
    /// Documents read but refused by the checks (quarantined here, with the reason).
    pub refused: usize,
    /// What stopped the listing on the way (damaged tables).
    pub damage: Vec<String>,
}

impl Engine {
    /// Takes every readable document of `damaged` into this engine's store.
    pub fn salvage(
        &mut self,
        damaged: &dyn Store,
        name: &str,
    ) -> Result<SalvageReport, MergeError> {
        let (ids, damage) = damaged.doc_ids_tolerant();
        let mut report = SalvageReport {
            found: ids.len(),
            damage,
            ..SalvageReport::default()
        };
        // Types first (records are small), then the documents in batches, certificates and
        // revocations first: a large hub's store is never held in memory at once.
        let mut order = Vec::with_capacity(ids.len());
        for id in ids {
            match damaged.doc_meta(&id) {
                Ok(Some(meta)) => order.push((meta.ty != "Basic", id)),
                Ok(None) => report
                    .unreadable
                    .push((uuid::Uuid::from_bytes(id), "its record is missing".into())),
                Err(e) => report
                    .unreadable
                    .push((uuid::Uuid::from_bytes(id), e.to_string())),
            }
        }
        order.sort();
        let source = Source::File(name.to_string());
        for batch in order.chunks(BATCH) {
            let mut payloads = Vec::with_capacity(batch.len());
            for (_, id) in batch {
                let read = || -> Result<Option<DocPayload>, fieldmesh_storage::StoreError> {
                    let Some(meta) = damaged.doc_meta(id)? else {
                        return Ok(None);
                    };
                    let Some(data) = damaged.doc_bytes(id)? else {
                        return Ok(None);
                    };
                    Ok(Some(DocPayload {
                        id: *id,
                        ty: meta.ty,
                        data,
                        envelopes: Envelope::stored_to_wire(&damaged.envelopes(id)?, |_| true),
                    }))
                };
                match read() {
                    Ok(Some(p)) => payloads.push(p),
                    Ok(None) => report
                        .unreadable
                        .push((uuid::Uuid::from_bytes(*id), "its data is missing".into())),
                    Err(e) => report
                        .unreadable
                        .push((uuid::Uuid::from_bytes(*id), e.to_string())),
                }
            }
            let r = self.merge(payloads, &source)?;
            report.refused += r.refused;
        }
        self.flush()?;
        report.kept = usize::try_from(self.store().stats()?.documents).unwrap_or(usize::MAX);
        Ok(report)
    }
}
