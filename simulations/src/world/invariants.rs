//! The invariants: what must hold as the world runs and at its end.

use std::collections::HashMap;

use fieldmesh_storage::Store as _;
use sha2::{Digest, Sha256};

use super::contact::Items;
use super::{Kind, World, fail};
use crate::SimError;

impl World {
    /// Notes when tracked documents reach central or their village's other officers, and
    /// checks that no honest node holds a forged document.
    pub(crate) fn arrivals(&mut self, node: usize, ids: &[[u8; 16]]) {
        let interesting = node == 0 || self.nodes[node].kind == Kind::Officer;
        if interesting {
            for id in ids {
                let Some(t) = self.tracked.get(id) else {
                    continue;
                };
                if t.author == node || self.arrived.contains_key(&(*id, node)) {
                    continue;
                }
                let village_peer = t.village.is_some_and(|v| {
                    self.nodes[node].kind == Kind::Officer && self.nodes[node].villages.contains(&v)
                });
                if (node == 0 || village_peer)
                    && self.nodes[node].store.doc_meta(id).ok().flatten().is_some()
                {
                    let secs = (self.now - t.created) as f64;
                    self.arrived.insert((*id, node), self.now);
                    if node == 0 {
                        self.out.latency_central.push(secs);
                    } else {
                        self.out.latency_village.push(secs);
                    }
                }
            }
        }
        if !self.nodes[node].byzantine {
            for bad in ids.iter().filter(|id| self.bad_docs.contains(*id)) {
                if self.nodes[node]
                    .store
                    .doc_meta(bad)
                    .ok()
                    .flatten()
                    .is_some()
                {
                    let v = format!(
                        "honest {} applied forged document {} at {}",
                        self.nodes[node].name,
                        uuid::Uuid::from_bytes(*bad),
                        self.now
                    );
                    self.out.violations.push(v);
                }
            }
        }
    }

    /// What central's services must have settled once the world converged: every resource
    /// created elsewhere has exactly one canonical id, no two resources of a type share one;
    /// of the insurees holding one card number exactly one keeps it (the others are flagged);
    /// every insuree registered twice is linked to the other registration.
    fn central_invariants(&mut self) -> Result<(), SimError> {
        use fieldmesh_fhir_docs::openimis::flags::{FlagCode, flags_of};
        use fieldmesh_fhir_docs::openimis::persons::blocking_keys;
        let system = "urn:fieldmesh:node:central";
        let dump = self.nodes[0]
            .store
            .index_entries()
            .map_err(|e| fail("central", e))?;
        let mut canonical: HashMap<(String, String), Vec<[u8; 16]>> = HashMap::new();
        let mut numbers: HashMap<String, Vec<[u8; 16]>> = HashMap::new();
        for (ty, sys, value, doc) in &dump.identifiers {
            if sys == system {
                canonical
                    .entry((ty.clone(), value.clone()))
                    .or_default()
                    .push(*doc);
            }
            if ty == "Patient" && sys == "openimis-type:Code" {
                numbers.entry(value.clone()).or_default().push(*doc);
            }
        }
        let shared: Vec<_> = canonical.iter().filter(|(_, d)| d.len() > 1).collect();
        if let Some(((ty, v), docs)) = shared.first() {
            self.out.violations.push(format!(
                "{} canonical ids name several resources, e.g. {ty} {v} ({} documents)",
                shared.len(),
                docs.len()
            ));
        }
        let with_id: std::collections::HashSet<[u8; 16]> =
            canonical.values().flatten().copied().collect();
        let mut missing = Vec::new();
        let ids: Vec<[u8; 16]> = {
            let mut v: Vec<[u8; 16]> = self.tracked.keys().copied().collect();
            v.sort();
            v
        };
        for id in ids {
            let held = self.nodes[0].store.doc_meta(&id).ok().flatten();
            if held.is_some() && !with_id.contains(&id) {
                missing.push(uuid::Uuid::from_bytes(id).to_string());
            }
        }
        if !missing.is_empty() {
            self.out.violations.push(format!(
                "{} resources created elsewhere have no canonical id on central, e.g. {}",
                missing.len(),
                missing[0]
            ));
        }
        let reader = self.nodes[0].engine().reader();
        let read = |doc: &[u8; 16]| {
            reader
                .read("Patient", &uuid::Uuid::from_bytes(*doc).to_string())
                .ok()
                .and_then(|s| s.resource.as_object().cloned())
                .unwrap_or_default()
        };
        let mut numbers: Vec<(String, Vec<[u8; 16]>)> =
            numbers.into_iter().filter(|(_, d)| d.len() > 1).collect();
        numbers.sort();
        for (number, docs) in numbers {
            let keep = docs
                .iter()
                .filter(|d| {
                    !flags_of(&read(d))
                        .iter()
                        .any(|f| f.code == FlagCode::NumberTaken)
                })
                .count();
            if keep != 1 {
                self.out.violations.push(format!(
                    "card number {number} is held by {} insurees, {keep} of them unflagged (exactly one keeps it)",
                    docs.len()
                ));
            }
        }
        let linked = |j: &serde_json::Map<String, serde_json::Value>| {
            j.get("link")
                .and_then(serde_json::Value::as_array)
                .is_some_and(|l| l.iter().any(|x| x["type"] == "replaced-by"))
        };
        for (original, copy) in self.duplicates.clone() {
            let (a, b) = (read(&original), read(&copy));
            // Still the same person by the rule (one of them may have moved since).
            let ka = blocking_keys("Patient", &a);
            let same = blocking_keys("Patient", &b).iter().any(|k| ka.contains(k));
            if same && !linked(&a) && !linked(&b) {
                self.out.violations.push(format!(
                    "insuree {} registered again as {} and neither is linked replaced-by",
                    uuid::Uuid::from_bytes(original),
                    uuid::Uuid::from_bytes(copy)
                ));
            }
        }
        Ok(())
    }

    fn digest(items: &Items) -> [u8; 32] {
        let mut h = Sha256::new();
        for (id, heads) in items {
            h.update(id);
            for x in heads {
                h.update(x);
            }
        }
        h.finalize().into()
    }

    fn honest(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| !self.nodes[*i].byzantine)
            .collect()
    }

    /// Whether every honest node holds exactly the documents of its scope, with central's
    /// heads.
    pub(crate) fn converged(&mut self) -> Result<bool, SimError> {
        for i in self.honest() {
            let held = self.held(i)?;
            if Self::digest(&held) != Self::digest(&self.expected(i)?) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The invariants at the end.
    pub(crate) fn finish(&mut self) -> Result<(), SimError> {
        if self.out.converged_after.is_none() {
            let mut differ = Vec::new();
            for i in self.honest() {
                let held = self.held(i)?;
                let expected = self.expected(i)?;
                if held != expected {
                    let docs = self.documents(i);
                    let theirs: HashMap<[u8; 16], Vec<[u8; 32]>> = held.into_iter().collect();
                    let wanted: HashMap<[u8; 16], Vec<[u8; 32]>> =
                        expected.iter().cloned().collect();
                    let missing = expected
                        .iter()
                        .find(|(id, h)| theirs.get(id) != Some(h))
                        .map(|(id, h)| {
                            format!(
                                "; e.g. {} has {} heads on central, {} there",
                                uuid::Uuid::from_bytes(*id),
                                h.len(),
                                theirs.get(id).map_or(0, Vec::len)
                            )
                        });
                    let extra = theirs
                        .keys()
                        .find(|id| !wanted.contains_key(*id))
                        .map(|id| {
                            format!(
                                "; e.g. {} held outside its scope",
                                uuid::Uuid::from_bytes(*id)
                            )
                        });
                    differ.push(format!(
                        "{} ({docs} documents, {} expected{})",
                        self.nodes[i].name,
                        expected.len(),
                        missing.or(extra).unwrap_or_default()
                    ));
                }
            }
            let central_docs = self.documents(0);
            let v = format!(
                "honest nodes do not hold exactly their scope within {} rounds of full connectivity: central holds {central_docs} documents; {} differ: {}",
                self.sc.heal_rounds,
                differ.len(),
                differ.join(", ")
            );
            self.out.violations.push(v);
        }
        // Nothing acknowledged is lost: every acknowledged write is on central, and on its
        // author unless it left the author's scope (re-scoped, or the insuree moved away).
        let mut lost = Vec::new();
        let mut ids: Vec<[u8; 16]> = self.tracked.keys().copied().collect();
        ids.sort();
        let mut scopes: HashMap<usize, std::collections::HashSet<[u8; 16]>> = HashMap::new();
        for id in &ids {
            let author = self.tracked[id].author;
            if let std::collections::hash_map::Entry::Vacant(v) = scopes.entry(author) {
                let expected = {
                    let key = self.nodes[author].key.0;
                    let e = self.nodes[0].engine();
                    let reach = e.reach_of(&key).map_err(|er| fail("central", er))?;
                    e.placed_within(&reach)
                        .map_err(|er| fail("central", er))?
                        .into_iter()
                        .map(|i| i.0)
                        .collect()
                };
                v.insert(expected);
            }
        }
        for id in &ids {
            let id = *id;
            let t = &self.tracked[&id];
            for node in [t.author, 0] {
                let gone = self.nodes[node]
                    .store
                    .doc_meta(&id)
                    .ok()
                    .flatten()
                    .is_none();
                let must = if node == 0 {
                    self.out.converged_after.is_some()
                } else {
                    scopes.get(&node).is_none_or(|s| s.contains(&id))
                };
                if gone && must {
                    lost.push(format!(
                        "{} lost on {}",
                        uuid::Uuid::from_bytes(id),
                        self.nodes[node].name
                    ));
                }
            }
        }
        if !lost.is_empty() {
            self.out.violations.push(format!(
                "{} acknowledged writes missing, e.g. {}",
                lost.len(),
                lost[0]
            ));
        }
        // No honest node holds a forged document.
        for i in self.honest() {
            for bad in &self.bad_docs {
                if self.nodes[i].store.doc_meta(bad).ok().flatten().is_some() {
                    let v = format!(
                        "honest {} holds forged {}",
                        self.nodes[i].name,
                        uuid::Uuid::from_bytes(*bad)
                    );
                    self.out.violations.push(v);
                }
            }
            self.out.quarantined += self.nodes[i]
                .store
                .stats()
                .map(|s| s.quarantined)
                .unwrap_or(0);
            if std::env::var_os("FIELDMESH_SIM_TRACE").is_some() {
                for q in self.nodes[i].store.quarantined(10_000).unwrap_or_default() {
                    eprintln!(
                        "quarantine {}: {} (from {})",
                        self.nodes[i].name, q.reason, q.from
                    );
                }
            }
        }
        // Every reference on central resolves.
        let dump = self.nodes[0]
            .store
            .index_entries()
            .map_err(|e| fail("central", e))?;
        let mut unresolved = Vec::new();
        for (ty, system, value, src) in &dump.references {
            if ty.starts_with("urn:fieldmesh:") {
                // Where documents are held, not references.
                continue;
            }
            let store = &self.nodes[0].store;
            let found = !store.find(ty, system, value).unwrap_or_default().is_empty()
                || (uuid::Uuid::parse_str(value).is_ok()
                    && !store.find_value(ty, value).unwrap_or_default().is_empty());
            if !found {
                unresolved.push(format!(
                    "{ty} {system}|{value} from {}",
                    uuid::Uuid::from_bytes(*src)
                ));
            }
        }
        if !unresolved.is_empty() && self.out.converged_after.is_some() {
            self.out.violations.push(format!(
                "{} references on central do not resolve, e.g. {}",
                unresolved.len(),
                unresolved[0]
            ));
        }
        if self.services.is_some() && self.out.converged_after.is_some() {
            self.central_invariants()?;
            self.claim_invariants()?;
        }
        // Conflicts on central among edited documents.
        let mut edited: Vec<[u8; 16]> = self.edited.iter().copied().collect();
        edited.sort();
        for id in edited {
            let sid = uuid::Uuid::from_bytes(id).to_string();
            if let Ok(c) = self.nodes[0].engine().reader().conflicts("Patient", &sid)
                && !c.is_empty()
            {
                self.out.conflicts += 1;
            }
        }
        self.out.central_documents = self.documents(0);
        for i in 0..self.nodes.len() {
            let name = self.nodes[i].name.clone();
            self.out.left_devices += self.nodes[i]
                .engine()
                .scope_report_now()
                .map_err(|e| fail(&name, e))?
                .left;
        }
        let line = format!(
            "end: central {} docs, quarantined {}, converged {:?}",
            self.out.central_documents, self.out.quarantined, self.out.converged_after
        );
        self.record(line);
        self.out.trace = hex::encode(self.trace.clone().finalize());
        Ok(())
    }
}
