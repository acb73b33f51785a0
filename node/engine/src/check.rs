//! The index check: every document's identities and reference targets must be exactly the index
//! entries that name it (`fieldmesh check`, and the end of the crash and sync tests).

use fieldmesh_storage::IndexDump;

use crate::Engine;
use crate::core::entries_of_json;
use crate::error::ReadError;

impl Engine {
    /// Commits what is staged, then checks the store (its own consistency) and every document
    /// against the indexes. Returns the disagreements, in words; empty when consistent.
    pub fn check_indexes(&mut self) -> Result<Vec<String>, ReadError> {
        self.flush()?;
        let mut problems = self.store.verify()?;
        let mut dump = self.store.index_entries()?;
        // The places a document left are history, not in the document: not checked.
        dump.references.retain(|(t, _, _, _)| {
            t != fieldmesh_fhir_docs::openimis::LEFT_INDEX
                && t != fieldmesh_fhir_docs::openimis::AUTHOR_INDEX
        });
        let mut expected = IndexDump::default();
        let mut after = 0u64;
        loop {
            let batch = self.store.changes_since(after, 1024)?;
            let Some((last, _)) = batch.last() else { break };
            after = *last;
            for (_, id) in batch {
                let Some(meta) = self.store.doc_meta(&id)? else {
                    continue;
                };
                let bytes = self.store.doc_bytes(&id)?.unwrap_or_default();
                let json = match crate::core::json_of_stored(&bytes) {
                    Ok(j) => j,
                    Err(e) => {
                        problems.push(format!("document {}: {e}", uuid::Uuid::from_bytes(id)));
                        continue;
                    }
                };
                let entries = entries_of_json(&json);
                for (s, v) in entries.identifiers {
                    expected.identifiers.insert((meta.ty.clone(), s, v, id));
                }
                for (t, s, v) in entries.references {
                    expected.references.insert((t, s, v, id));
                }
            }
        }
        if expected.identifiers != dump.identifiers {
            problems.push(format!(
                "identifier index: {} entries, the documents carry {}",
                dump.identifiers.len(),
                expected.identifiers.len()
            ));
        }
        if expected.references != dump.references {
            problems.push(format!(
                "reference index: {} entries, the documents point {} times",
                dump.references.len(),
                expected.references.len()
            ));
        }
        Ok(problems)
    }
}
