//! What officers do each day: enrol families, edit insurees, crash; and, for byzantine ones,
//! forge what they may not write.

use fieldmesh_engine::WriteError;
use fieldmesh_fhir_docs::openimis::LOCATION_EXTENSION;
use fieldmesh_fhir_docs::openimis::demo::{Reference, Village, write_families};
use fieldmesh_storage::Store as _;
use serde_json::{Value, json};

use super::{Tracked, World, fail};
use crate::SimError;

impl World {
    /// An officer's day of work: enrol families (each resource acknowledged once flushed),
    /// maybe edit an insuree, maybe crash; a byzantine officer also forges.
    pub(crate) fn work(&mut self, i: usize, day: u32) -> Result<(), SimError> {
        self.clock(i);
        self.take_up_scope(i)?;
        if self.nodes[i].next_villages.is_some() {
            // Told of the re-assignment, the officer syncs before working again: a write in the
            // old villages after the new certificate starts would be refused (and quarantined)
            // by every node, as a revoked key's would.
            return Ok(());
        }
        let rate = self.sc.families_per_officer_day;
        let mut families = rate.floor() as u64;
        if self.chance(rate - rate.floor()) {
            families += 1;
        }
        let villages: Vec<Village> = self.nodes[i]
            .villages
            .iter()
            .map(|v| self.refdata.villages[*v].clone())
            .collect();
        let mut resources: Vec<Value> = Vec::new();
        let tag = format!("{}-{day}", self.nodes[i].name);
        let start = self.insuree_no;
        self.insuree_no += families * 8;
        write_families(
            &self.refdata,
            &mut self.nodes[i].fam_rng,
            families,
            &villages,
            &tag,
            start,
            &mut |v| {
                if v["resourceType"] != "Claim" {
                    resources.push(v.clone());
                }
                Ok(())
            },
        )
        .map_err(|e| fail(&tag, e))?;
        let crash_at = if self.chance(self.sc.crash_probability) && !resources.is_empty() {
            Some(self.rng.below(resources.len() as u64) as usize)
        } else {
            None
        };
        for (k, r) in resources.into_iter().enumerate() {
            let village = village_of(&r, &self.refdata);
            let name = self.nodes[i].name.clone();
            if crash_at == Some(k) {
                // Staged, not flushed: the phone dies before acknowledging it. After the
                // restart the officer enters it again (it was never confirmed).
                let _ = self.nodes[i]
                    .engine()
                    .create(r.clone(), None, true, &|_| None);
                let engine = self.nodes[i].engine.take().expect("engine");
                engine.crash();
                self.start_engine(i);
                // The process restarts: its scheduler starts afresh from what the store holds.
                let seq = self.nodes[i].store.stats().map(|s| s.last_seq).unwrap_or(0);
                let key = self.nodes[i].key;
                self.nodes[i].sched =
                    fieldmesh_protocol::Scheduler::new(key, super::limits(), 0, seq, false);
                self.out.crashes += 1;
                self.record(format!("{name} crashed"));
            }
            let result = self.nodes[i].engine().create(r, None, true, &|_| None);
            let id = match result {
                Ok(id) => id,
                Err(WriteError::Forbidden(_)) => {
                    self.out.refused_local += 1;
                    continue;
                }
                Err(e) => return Err(fail(&name, e)),
            };
            self.acknowledge(i, &id, village)?;
            self.record(format!("{name} wrote {id}"));
        }
        if self.chance(self.sc.edit_probability) {
            self.edit(i)?;
        }
        if !self.nodes[i].byzantine && self.chance(self.sc.duplicate_probability) {
            self.register_again(i)?;
        }
        if !self.nodes[i].byzantine && self.chance(self.sc.move_probability) {
            self.move_insuree(i)?;
        }
        if self.nodes[i].byzantine {
            self.forge(i, day)?;
        }
        Ok(())
    }

    /// Commits officer `i`'s write of `id` (in `village`) and, for an honest officer, tracks it
    /// as acknowledged: it must never be lost.
    pub(crate) fn acknowledge(
        &mut self,
        i: usize,
        id: &fieldmesh_fhir_docs::DocId,
        village: Option<usize>,
    ) -> Result<(), SimError> {
        let name = self.nodes[i].name.clone();
        self.nodes[i].engine().flush().map_err(|e| fail(&name, e))?;
        self.drain_events(i);
        if !self.nodes[i].byzantine {
            self.tracked.insert(
                *id.as_bytes(),
                Tracked {
                    created: self.now,
                    author: i,
                    village,
                },
            );
            self.out.acknowledged += 1;
        }
        Ok(())
    }

    /// The acknowledged writes of officer `i`'s villages, sorted (the draws pick among them);
    /// with `held_patients`, only the insuree documents the officer holds.
    pub(crate) fn tracked_in_villages(&self, i: usize, held_patients: bool) -> Vec<[u8; 16]> {
        let n = &self.nodes[i];
        let mut ids: Vec<[u8; 16]> = self
            .tracked
            .iter()
            .filter(|(id, t)| {
                t.village.is_some_and(|v| n.villages.contains(&v))
                    && (!held_patients
                        || n.store
                            .doc_meta(id)
                            .ok()
                            .flatten()
                            .is_some_and(|m| m.ty == "Patient"))
            })
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Registers again an insuree of the officer's villages that it holds: same name, birth
    /// date, address and card number, a new registration (as a second officer who did not know
    /// of the first would).
    fn register_again(&mut self, i: usize) -> Result<(), SimError> {
        let candidates = self.tracked_in_villages(i, true);
        if candidates.is_empty() {
            return Ok(());
        }
        let original = candidates[self.rng.below(candidates.len() as u64) as usize];
        let name = self.nodes[i].name.clone();
        let sid = uuid::Uuid::from_bytes(original).to_string();
        let served = self.nodes[i]
            .engine()
            .served("Patient", &sid)
            .map_err(|e| fail(&name, e))?;
        let mut copy = served.resource;
        let Some(map) = copy.as_object_mut() else {
            return Ok(());
        };
        map.remove("meta");
        map.remove("link");
        let new_id = uuid::Uuid::from_u64_pair(self.rng.next_u64(), self.rng.next_u64());
        map.insert("id".into(), json!(new_id.to_string()));
        // Only the card number: the other identifiers named the first registration.
        if let Some(Value::Array(ids)) = map.get_mut("identifier") {
            ids.retain(|x| x.get("system").is_none());
        }
        if let Some(Value::Array(ext)) = map.get_mut("extension") {
            ext.retain(|e| {
                e.get("url").and_then(Value::as_str)
                    != Some(fieldmesh_fhir_docs::openimis::flags::FLAG_EXTENSION)
            });
        }
        let village = village_of(&copy, &self.refdata);
        let id = match self.nodes[i]
            .engine()
            .create(copy, Some("Patient"), true, &|_| None)
        {
            Ok(id) => id,
            Err(WriteError::Forbidden(_)) => return Ok(()),
            Err(e) => return Err(fail(&name, e)),
        };
        self.acknowledge(i, &id, village)?;
        self.out.duplicates += 1;
        self.duplicates.push((original, *id.as_bytes()));
        self.record(format!("{name} registered {sid} again as {id}"));
        Ok(())
    }

    /// Edits an insuree of the officer's villages that it holds (officers sharing a village
    /// edit the same people: concurrent edits).
    fn edit(&mut self, i: usize) -> Result<(), SimError> {
        let candidates = self.tracked_in_villages(i, false);
        if candidates.is_empty() {
            return Ok(());
        }
        let id = candidates[self.rng.below(candidates.len() as u64) as usize];
        let sid = uuid::Uuid::from_bytes(id).to_string();
        let phone = format!("+227 9{}", self.rng.below(10_000_000));
        let name = self.nodes[i].name.clone();
        let e = self.nodes[i].engine();
        let Ok(served) = e.reader().read("Patient", &sid) else {
            return Ok(());
        };
        let mut r = served.resource;
        r["telecom"] = json!([{"system": "phone", "value": phone}]);
        match e.update("Patient", &sid, r, None) {
            Ok(_) => {
                e.flush().map_err(|er| fail(&name, er))?;
                self.drain_events(i);
                self.edited.insert(id);
                self.record(format!("{name} edited {sid}"));
            }
            Err(WriteError::Forbidden(_)) => self.out.refused_local += 1,
            Err(er) => return Err(fail(&name, er)),
        }
        Ok(())
    }

    /// A byzantine officer writes a Location (central's alone) and an insuree outside its
    /// villages; neither may reach an honest node.
    fn forge(&mut self, i: usize, day: u32) -> Result<(), SimError> {
        let loc_id = self.rng.uuid();
        let outside = (self.nodes[i].villages[0] + 6) % self.refdata.villages.len();
        let village = self.refdata.villages[outside].0.clone();
        let pid = self.rng.uuid();
        let name = self.nodes[i].name.clone();
        let e = self.nodes[i].engine();
        for r in [
            json!({"resourceType": "Location", "id": loc_id, "name": format!("Forged {day}")}),
            json!({"resourceType": "Patient", "id": pid, "name": [{"family": "Forged"}], "birthDate": "1990",
                "address": [{"extension": [{"url": LOCATION_EXTENSION,
                    "valueReference": {"reference": format!("Location/{village}")}}]}]}),
        ] {
            let id = e
                .create(r, None, true, &|_| None)
                .map_err(|er| fail(&name, er))?;
            self.bad_docs.insert(*id.as_bytes());
        }
        e.flush().map_err(|er| fail(&name, er))?;
        self.drain_events(i);
        Ok(())
    }
}

/// The demo village a generated resource lives in (its address's Location).
fn village_of(r: &Value, refdata: &Reference) -> Option<usize> {
    let text = r.to_string();
    refdata
        .villages
        .iter()
        .position(|v| text.contains(&format!("Location/{}", v.0)))
}
