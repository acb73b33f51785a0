//! Serving sync sessions: what a session with a peer starts from, the documents it sends, and the
//! checkpoint it records at the end.

use std::collections::HashSet;

use automerge::ChangeHash;
use fieldmesh_fhir_docs::DocId;
use fieldmesh_protocol::{Checkpoint, DocPayload, Heads, Item, Local, Start};
use fieldmesh_storage::{DocMeta, StoreError, Write};
use fieldmesh_trust::{Envelope, PeerKey, SUBJECT_SYSTEM};

use crate::Engine;
use crate::error::SyncError;
use crate::source::Source;

/// Log entries read per page when listing documents.
const PAGE: usize = 4096;

impl Engine {
    /// Every document this node holds, as `(id, heads, log sequence)`, in log order.
    pub fn items(&self) -> Result<Vec<Item>, StoreError> {
        self.items_where(|_| true)
    }

    /// The documents whose record `keep` accepts, as [`Engine::items`] lists them.
    ///
    /// A damaged store still serves what it can read: a record that cannot be read is skipped
    /// (and logged), and if the log itself cannot be read the documents are found by
    /// [`fieldmesh_storage::Store::doc_ids_tolerant`].
    pub(crate) fn items_where(
        &self,
        keep: impl Fn(&DocMeta) -> bool,
    ) -> Result<Vec<Item>, StoreError> {
        let mut items = Vec::new();
        let mut after = 0;
        loop {
            let page = match self.store.changes_since(after, PAGE) {
                Ok(page) => page,
                Err(e @ StoreError::Corrupt(_)) => {
                    tracing::error!(error = %e, "the store's log cannot be read: listing the documents that can");
                    return Ok(self.items_tolerant(keep));
                }
                Err(e) => return Err(e),
            };
            let Some((last, _)) = page.last() else { break };
            after = *last;
            let page: Vec<(u64, [u8; 16])> = page
                .into_iter()
                .filter(|(_, id)| !self.unreadable.contains(id))
                .collect();
            let ids: Vec<[u8; 16]> = page.iter().map(|(_, id)| *id).collect();
            for ((seq, id), meta) in page.into_iter().zip(self.store.doc_metas(&ids)?) {
                match meta {
                    Ok(Some(meta)) if keep(&meta) => items.push((id, meta.heads, seq)),
                    Ok(_) => {}
                    Err(e @ StoreError::Corrupt(_)) => {
                        tracing::error!(doc = %uuid::Uuid::from_bytes(id), error = %e, "a document record cannot be read: skipped");
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(items)
    }

    /// [`Engine::items_where`] on a store whose log cannot be read.
    fn items_tolerant(&self, keep: impl Fn(&DocMeta) -> bool) -> Vec<Item> {
        let (ids, problems) = self.store.doc_ids_tolerant();
        for p in &problems {
            tracing::error!(problem = %p, "the store is damaged");
        }
        let mut items: Vec<Item> = ids
            .into_iter()
            .filter(|id| !self.unreadable.contains(id))
            .filter_map(|id| match self.store.doc_meta(&id) {
                Ok(Some(meta)) => keep(&meta).then_some((id, meta.heads, meta.seq)),
                Ok(None) => None,
                Err(e) => {
                    tracing::error!(doc = %uuid::Uuid::from_bytes(id), error = %e, "a document record cannot be read: skipped");
                    None
                }
            })
            .collect();
        items.sort_by_key(|i| i.2);
        items
    }

    /// The only documents a peer without a valid certificate is shown: the certificates and
    /// revocations about its own key (a device whose certificate expired gets its renewal this
    /// way) and about this node's key (so two nodes that have never met learn each other's
    /// certificates in their first session), found through the subject index, not by reading
    /// the log.
    fn restricted_documents(&self, peer: &PeerKey) -> Result<Vec<Item>, StoreError> {
        let mut items = Vec::new();
        let mut subjects = vec![hex::encode(peer.0), hex::encode(self.me.public())];
        subjects.dedup();
        for subject in subjects {
            for id in self.store.find("Basic", SUBJECT_SYSTEM, &subject)? {
                if let Some(meta) = self.store.doc_meta(&id)? {
                    items.push((id, meta.heads, meta.seq));
                }
            }
        }
        items.sort_by_key(|i| i.2);
        items.dedup_by_key(|i| i.0);
        Ok(items)
    }

    /// What a session with `peer` starts from (commits first): this store's id and log
    /// position, the checkpoint recorded for the peer, and the documents it may be offered, all
    /// taken at one instant. A peer without a valid certificate (none, expired or revoked, by
    /// this node's clock and revocations) is offered only the certificates and revocations about
    /// itself, and no checkpoint is used for it.
    pub fn sync_start(&mut self, peer: &PeerKey, node: &str) -> Result<Start, SyncError> {
        self.flush()?;
        let restricted = !self.certified(&Source::Peer(*peer));
        let (items, outside, checkpoint) = if restricted {
            let own = self.restricted_documents(peer)?;
            tracing::warn!(peer = %peer, offered = own.len(), "the peer has no valid certificate: offering it only its own certificates and this node's");
            self.scope.fingerprints.remove(peer);
            (own, Vec::new(), None)
        } else {
            let (items, outside, fingerprints) = self.share_with(peer)?;
            tracing::debug!(peer = %peer, offered = items.len(), outside = outside.len(), "session share");
            // A checkpoint counts only under the reaches it was recorded under: documents
            // newly within either would never be announced on the checkpoint path.
            let checkpoint = self.store.checkpoint(&peer.peer_id())?.and_then(|b| {
                (b.len() > 64 && b[..64] == fingerprints[..])
                    .then(|| Checkpoint::from_bytes(&b[64..]))
                    .flatten()
            });
            (items, outside, checkpoint)
        };
        Ok(Start {
            local: Local {
                node: node.to_string(),
                store: self.store.store_id()?,
                seq: self.store.stats()?.last_seq,
                checkpoint,
                outside,
            },
            items,
            restricted,
        })
    }

    /// Records the checkpoint of a completed session with `peer`, after every merge it brought
    /// is durable.
    pub fn record_checkpoint(
        &mut self,
        peer: &PeerKey,
        checkpoint: &Checkpoint,
    ) -> Result<(), SyncError> {
        self.flush()?;
        let Some(fingerprints) = self.scope.fingerprints.remove(peer) else {
            return Ok(());
        };
        self.scope.offered.remove(peer);
        self.scope.announced.remove(peer);
        let mut value = fingerprints.to_vec();
        if self.scope.unchecked.remove(peer) {
            // Changes by a key without a certificate here were refused: the next session
            // reconciles everything (an empty record is no checkpoint).
            value.clear();
        } else {
            value.extend(checkpoint.to_bytes());
        }
        self.store.commit(vec![Write::Checkpoint {
            peer: peer.peer_id(),
            value,
        }])?;
        Ok(())
    }

    /// The documents `wanted` as sent to `peer`: type, Automerge bytes (whole, or the changes
    /// after the heads the peer holds) and the envelopes of the changes sent. Only its own
    /// certificates and revocations (and this node's) for a peer without a valid certificate.
    pub fn payloads(
        &mut self,
        peer: &PeerKey,
        wanted: &[(fieldmesh_storage::DocId, Heads)],
    ) -> Result<Vec<DocPayload>, SyncError> {
        self.flush()?;
        let allowed: Option<HashSet<fieldmesh_storage::DocId>> =
            if self.certified(&Source::Peer(*peer)) {
                None
            } else {
                Some(
                    self.restricted_documents(peer)?
                        .into_iter()
                        .map(|i| i.0)
                        .collect(),
                )
            };
        let mut out = Vec::with_capacity(wanted.len());
        for (id, their_heads) in wanted {
            if allowed.as_ref().is_some_and(|a| !a.contains(id)) {
                continue;
            }
            if allowed.is_none() && !self.may_send(peer, id, their_heads)? {
                tracing::warn!(peer = %peer, doc = %uuid::Uuid::from_bytes(*id), "asked for a document outside its scope that it does not prove to hold: not sent");
                continue;
            }
            // A document this (damaged) store cannot read is skipped, not the session.
            match self.payload(id, their_heads) {
                Ok(Some(p)) => out.push(p),
                Ok(None) => {}
                Err(SyncError::Store(e @ StoreError::Corrupt(_))) => {
                    // This session may fail for it (the peer asked for it); the next ones no
                    // longer offer it.
                    tracing::error!(peer = %peer, doc = %uuid::Uuid::from_bytes(*id), error = %e, "a document cannot be read: not sent, and no longer offered (`fieldmesh salvage`)");
                    self.unreadable.insert(*id);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// One document as sent: the changes after `their_heads` if this node holds them, else
    /// the whole document.
    fn payload(
        &mut self,
        id: &fieldmesh_storage::DocId,
        their_heads: &Heads,
    ) -> Result<Option<DocPayload>, SyncError> {
        let Some(meta) = self.store.doc_meta(id)? else {
            return Ok(None);
        };
        if !their_heads.is_empty()
            && let Some(p) = self.changes_after(id, &meta.ty, their_heads)?
        {
            return Ok(Some(p));
        }
        let Some(data) = self.store.doc_bytes(id)? else {
            return Ok(None);
        };
        Ok(Some(DocPayload {
            id: *id,
            ty: meta.ty,
            data,
            envelopes: Envelope::stored_to_wire(&self.store.envelopes(id)?, |_| true),
        }))
    }

    /// The changes of `id` after `their_heads`, if this node's copy contains those heads.
    fn changes_after(
        &mut self,
        id: &fieldmesh_storage::DocId,
        ty: &str,
        their_heads: &Heads,
    ) -> Result<Option<DocPayload>, SyncError> {
        let doc_id = DocId(uuid::Uuid::from_bytes(*id));
        let Ok(Some(mut live)) = self.take(&doc_id) else {
            return Ok(None);
        };
        let heads: Vec<ChangeHash> = their_heads.iter().map(|h| ChangeHash(*h)).collect();
        let found = live.doc.as_mut().and_then(|doc| {
            heads
                .iter()
                .all(|h| doc.get_change_by_hash(h).is_some())
                .then(|| {
                    let hashes: HashSet<[u8; 32]> = doc
                        .get_changes_meta(&heads)
                        .into_iter()
                        .map(|m| m.hash.0)
                        .collect();
                    (doc.save_after(&heads), hashes)
                })
        });
        self.put_back(doc_id, live, false);
        let Some((data, hashes)) = found else {
            return Ok(None);
        };
        let envelopes =
            Envelope::stored_to_wire(&self.store.envelopes(id)?, |h| hashes.contains(h));
        Ok(Some(DocPayload {
            id: *id,
            ty: ty.to_string(),
            data,
            envelopes,
        }))
    }
}
