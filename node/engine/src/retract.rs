//! Revoked keys: what central vouches for when it revokes one, and taking out of the documents a
//! node holds the changes it accepted from a key before it learnt the key was revoked.
//!
//! A revocation lists, per document, the last change by the key that central held
//! ([`fieldmesh_trust::Vouched`]). Once a node holds the revocation, a change by the key is
//! accepted only if it is one of those or their ancestors (see `fieldmesh-trust`); a node that
//! accepted other changes by the key earlier (they reached it before the revocation did) takes
//! them out, with every change built on them, into quarantine: every honest node then holds the
//! same changes of the key, the ones central vouched for.

use std::collections::HashSet;

use automerge::AutoCommit;
use fieldmesh_fhir_docs::{DocId, actor_for_key, document_to_json};
use fieldmesh_storage::{DocData, IndexEntries, Quarantine, Write};
use fieldmesh_trust::{PublicKey, Vouched};

use crate::Engine;

/// Changes to take out of the documents, once the trust state that rules them out is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Retraction {
    /// A key was revoked: its changes central did not vouch for.
    Revoked(PublicKey),
    /// A key equivocated in a document: its changes there from `seq` on.
    Equivocated {
        /// The key.
        key: PublicKey,
        /// The document.
        doc: [u8; 16],
        /// The equivocated sequence number.
        seq: u64,
    },
}
use crate::core::{entries_of_json, heads_bytes, with_left};
use crate::error::ReadError;
use crate::source::Source;

impl Engine {
    /// For a revocation of `key` issued here (central): the key's last change in every document
    /// this node holds, the changes central vouches for. Reads every document.
    pub fn authored_heads(&mut self, key: &PublicKey) -> Result<Vec<Vouched>, ReadError> {
        self.flush()?;
        let actor = actor_for_key(key);
        let mut out = Vec::new();
        for (id, _, _) in self.items_where(|m| m.ty != "Basic")? {
            let doc_id = DocId(uuid::Uuid::from_bytes(id));
            let Some(mut live) = self.take(&doc_id)? else {
                continue;
            };
            let last = live.doc(&doc_id).ok().and_then(|doc| {
                doc.get_changes_meta(&[])
                    .into_iter()
                    .filter(|m| *m.actor == actor)
                    .max_by_key(|m| m.seq)
                    .map(|m| m.hash.0)
            });
            self.put_back(doc_id, live, false);
            if let Some(head) = last {
                out.push(Vouched {
                    doc: doc_id.to_string(),
                    head: hex::encode(head),
                });
            }
        }
        Ok(out)
    }

    /// Takes out of the documents the changes that newly learnt revocations and evidence rule
    /// out: by a revoked key, those central did not vouch for (central holds nothing it did not
    /// vouch for and skips this); by an equivocating key, its changes in the document from the
    /// equivocated sequence number on. Everything built on them goes too, into quarantine.
    /// Returns the documents changed.
    pub(crate) fn retract(&mut self) -> Result<usize, ReadError> {
        let jobs = std::mem::take(&mut self.retractions);
        let central = self.me.public() == *self.trust.root();
        let revoked: Vec<PublicKey> = jobs
            .iter()
            .filter_map(|j| match j {
                Retraction::Revoked(k) if !central => Some(*k),
                _ => None,
            })
            .collect();
        let mut changed = 0;
        if !revoked.is_empty() {
            for (id, _, _) in self.items_where(|m| m.ty != "Basic")? {
                let doc_id = DocId(uuid::Uuid::from_bytes(id));
                for key in &revoked {
                    if self.retract_in(doc_id, key, None)? {
                        changed += 1;
                    }
                }
            }
        }
        for j in &jobs {
            if let Retraction::Equivocated { key, doc, seq } = j {
                let doc_id = DocId(uuid::Uuid::from_bytes(*doc));
                if self.retract_in(doc_id, key, Some(*seq))? {
                    changed += 1;
                }
            }
        }
        self.flush()?;
        if changed > 0 {
            tracing::warn!(
                documents = changed,
                "took changes by revoked keys out of documents"
            );
        }
        Ok(changed)
    }

    /// Takes out of `doc_id` the changes by `key` that are ruled out: from sequence number
    /// `equivocated` on if given, else those central did not vouch for.
    fn retract_in(
        &mut self,
        doc_id: DocId,
        key: &PublicKey,
        equivocated: Option<u64>,
    ) -> Result<bool, ReadError> {
        let Some(mut live) = self.take(&doc_id)? else {
            return Ok(false);
        };
        let actor = actor_for_key(key);
        let was_dirty = self.has_pending_write(&doc_id);
        let doc = match live.doc(&doc_id) {
            Ok(d) => d,
            Err(_) => {
                self.put_back(doc_id, live, was_dirty);
                return Ok(false);
            }
        };
        let metas = doc.get_changes_meta(&[]);
        if !metas.iter().any(|m| *m.actor == actor) {
            self.put_back(doc_id, live, was_dirty);
            return Ok(false);
        }
        let all: Vec<([u8; 32], Vec<[u8; 32]>)> = metas
            .iter()
            .map(|m| (m.hash.0, m.deps.iter().map(|d| d.0).collect()))
            .collect();
        let vouched = self.trust.vouched_changes(key, doc_id.as_bytes(), &all);
        // The history is in causal order: a change is out if its author is the key and central
        // did not vouch for it, or if it builds on a change that is out.
        let ruled_out = |m: &automerge::ChangeMetadata<'_>| {
            *m.actor == actor
                && match equivocated {
                    Some(seq) => m.seq >= seq,
                    None => !vouched.contains(&m.hash.0),
                }
        };
        let mut out: HashSet<[u8; 32]> = HashSet::new();
        for m in &metas {
            if ruled_out(m) || m.deps.iter().any(|d| out.contains(&d.0)) {
                out.insert(m.hash.0);
            }
        }
        if out.is_empty() {
            self.put_back(doc_id, live, was_dirty);
            return Ok(false);
        }
        let (kept, removed): (Vec<_>, Vec<_>) = doc
            .get_changes(&[])
            .into_iter()
            .partition(|c| !out.contains(&c.hash().0));
        let gone = kept.is_empty();
        let mut rebuilt = AutoCommit::new().with_actor(self.me.actor.clone());
        let json = if gone {
            Ok(serde_json::Map::new())
        } else {
            rebuilt
                .apply_changes(kept)
                .map_err(ReadError::from)
                .and_then(|()| document_to_json(&rebuilt).map_err(ReadError::from))
        };
        let json = match json {
            Ok(j) => j,
            Err(e) => {
                self.put_back(doc_id, live, was_dirty);
                return Err(e);
            }
        };
        let mut payload = Vec::new();
        for c in &removed {
            payload.extend_from_slice(c.raw_bytes());
        }
        let (reason, from) = match equivocated {
            Some(seq) => (
                format!(
                    "{} {doc_id}: {} change(s) by a key that signed two different changes numbered {seq} here, and what was built on them, were taken out",
                    live.meta.ty,
                    removed.len()
                ),
                format!("evidence of an equivocation by {}", hex::encode(&key[..8])),
            ),
            None => {
                let number = self.trust.revocation_of(key).map_or(0, |r| r.number);
                (
                    format!(
                        "{} {doc_id}: {} change(s) by a revoked key (revocation #{number}) that central did not hold, and what was built on them, were taken out",
                        live.meta.ty,
                        removed.len()
                    ),
                    format!("revocation #{number}"),
                )
            }
        };
        tracing::warn!(doc = %doc_id, ty = %live.meta.ty, changes = removed.len(), "retracted changes by a revoked key");
        self.push(
            Write::Quarantine(Quarantine {
                reason,
                from,
                doc: *doc_id.as_bytes(),
                ty: live.meta.ty.clone(),
                changes: u32::try_from(removed.len()).unwrap_or(u32::MAX),
                data: payload,
            }),
            None,
        );
        if gone {
            // Nothing of the document is left: it goes (its changes are in quarantine).
            self.push(
                Write::Remove {
                    id: *doc_id.as_bytes(),
                    entries: live.entries.clone(),
                    purge: vec![
                        fieldmesh_fhir_docs::openimis::LEFT_INDEX.to_string(),
                        fieldmesh_fhir_docs::openimis::AUTHOR_INDEX.to_string(),
                    ],
                },
                None,
            );
            return Ok(true);
        }
        live.meta.heads = heads_bytes(&rebuilt.get_heads());
        live.meta.chunks = 1;
        live.meta.updated = self.me.time();
        let entries = with_left(entries_of_json(&json), &live.entries);
        let previous = std::mem::replace(&mut live.entries, entries);
        let data = DocData::Full(rebuilt.save_nocompress());
        live.doc = Some(Box::new(rebuilt));
        let meta = live.meta.clone();
        let entries: IndexEntries = live.entries.clone();
        self.stage(
            &doc_id,
            &meta,
            &entries,
            data,
            previous,
            Vec::new(),
            Source::Local,
        );
        self.put_back(doc_id, live, true);
        Ok(true)
    }
}
