//! What claim administrators do each day: enter claims at their facility, as the openIMIS
//! claims app posts them (code references), for insurees of their catchment and, now and then,
//! for one from another district whom the facility's device has never seen. And what must hold
//! at the end: central adjudicated every claim, its verdict reached the facility, and the
//! facility never received the insuree from elsewhere.

use fieldmesh_engine::WriteError;
use fieldmesh_engine::central::business_number;
use fieldmesh_engine::claims::response_id;
use fieldmesh_fhir_docs::DocId;
use fieldmesh_fhir_docs::openimis::IG;
use fieldmesh_fhir_docs::openimis::dates::Date;
use fieldmesh_storage::Store as _;
use serde_json::{Value, json};

use super::{World, fail};
use crate::SimError;

fn code_ref(ty: &str, code: &str) -> Value {
    json!({"type": ty, "identifier": {"type": {"coding": [{"system": format!("{IG}/CodeSystem/openimis-identifiers"), "code": "Code"}]}, "value": code}})
}

impl World {
    /// Claim administrator `i` enters the day's claims.
    pub(crate) fn enter_claims(&mut self, i: usize) -> Result<(), SimError> {
        self.clock(i);
        let rate = self.sc.claims_per_admin_day;
        let mut count = rate.floor() as u64;
        if self.chance(rate - rate.floor()) {
            count += 1;
        }
        for _ in 0..count {
            let foreign = self.chance(self.sc.foreign_claim_probability);
            let candidates = if foreign {
                self.insurees_elsewhere(i)
            } else {
                self.tracked_in_villages(i, true)
            };
            if candidates.is_empty() {
                continue;
            }
            let patient = candidates[self.rng.below(candidates.len() as u64) as usize];
            // The card the patient shows: the number as the node that knows the insuree holds
            // it (the facility's own device, or central for someone from elsewhere).
            let knows = if foreign { 0 } else { i };
            let sid = uuid::Uuid::from_bytes(patient).to_string();
            let Ok(served) = self.nodes[knows].engine().served("Patient", &sid) else {
                continue;
            };
            let Some(card) = served
                .resource
                .as_object()
                .and_then(business_number)
                .map(String::from)
            else {
                continue;
            };
            let claim = self.claim_for(i, &card);
            let name = self.nodes[i].name.clone();
            let id = match self.nodes[i]
                .engine()
                .create(claim, Some("Claim"), true, &|_| None)
            {
                Ok(id) => id,
                Err(WriteError::Forbidden(_)) => {
                    self.out.refused_local += 1;
                    continue;
                }
                Err(e) => return Err(fail(&name, e)),
            };
            let answer = self.nodes[i].engine().take_claim_answer();
            let verdict = answer
                .as_ref()
                .map(|a| {
                    let reasons: Vec<String> = a["item"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|l| {
                            l["adjudication"]
                                .as_array()
                                .and_then(|a| a.last())
                                .map(|a| a["reason"]["coding"][0]["code"].to_string())
                                .unwrap_or_default()
                        })
                        .collect();
                    format!("{} {}", a["outcome"], reasons.join(","))
                })
                .unwrap_or_default();
            if answer.as_ref().is_some_and(|a| a["outcome"] == "complete") {
                self.out.claims_rejected.0 += 1;
            }
            self.acknowledge(i, &id, None)?;
            self.out.claims += 1;
            if foreign {
                self.out.foreign_claims += 1;
            }
            self.claims.push((*id.as_bytes(), i, patient, foreign));
            self.record(format!(
                "{name} entered claim {id} for {card}{}: {verdict}",
                if foreign { " (from elsewhere)" } else { "" }
            ));
        }
        Ok(())
    }

    /// Insurees that central holds, registered in villages outside administrator `i`'s
    /// catchment, sorted.
    fn insurees_elsewhere(&self, i: usize) -> Vec<[u8; 16]> {
        let mine = &self.nodes[i].villages;
        let mut ids: Vec<[u8; 16]> = self
            .tracked
            .iter()
            .filter(|(id, t)| {
                t.village.is_some_and(|v| !mine.contains(&v))
                    && self.nodes[0]
                        .store
                        .doc_meta(id)
                        .ok()
                        .flatten()
                        .is_some_and(|m| m.ty == "Patient")
            })
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// A claim at administrator `i`'s facility for the insuree with card `card`, today: one to
    /// three items and services of the reference data, quantities 1–3, prices asked or left
    /// to the price list.
    fn claim_for(&mut self, i: usize, card: &str) -> Value {
        let hf = self.refdata.facilities[self.nodes[i].hub - 1].1.clone();
        let admin = self.refdata.claim_admins[self.nodes[i].hub - 1].1.clone();
        let today = Date::from_unix(self.now).to_string();
        let mut lines = Vec::new();
        for seq in 1..=1 + self.rng.below(3) {
            let service = self.rng.below(2) == 0;
            let (kind, ty, list) = if service {
                ("service", "ActivityDefinition", &self.refdata.services)
            } else {
                ("item", "Medication", &self.refdata.items)
            };
            let (_, code, price) = list[self.rng.below(list.len() as u64) as usize].clone();
            let mut l = json!({"sequence": seq, "category": {"text": kind}, "productOrService": {"text": code},
                "quantity": {"value": 1 + self.rng.below(3)},
                "extension": [{"url": ty, "valueReference": code_ref(ty, &code)}]});
            if self.rng.below(2) == 0 {
                l["unitPrice"] =
                    json!({"value": price.parse::<f64>().unwrap_or(0.0), "currency": "$"});
            }
            lines.push(l);
        }
        json!({"resourceType": "Claim", "id": self.rng.uuid(), "status": "active", "use": "claim",
            "type": {"coding": [{"system": format!("{IG}/CodeSystem-claim-visit-type.html"), "code": "O"}]},
            "patient": code_ref("Patient", card), "provider": code_ref("Organization", &hf),
            "enterer": code_ref("Practitioner", &admin),
            "created": today, "billablePeriod": {"start": today, "end": today},
            "diagnosis": [{"sequence": 1, "diagnosisCodeableConcept": {"coding": [{"system": format!("{IG}/CodeSystem/diagnosis-ICD10-level1"), "code": "B54"}]}}],
            "item": lines})
    }

    /// Once the world converged: central adjudicated every claim (its ClaimResponse), the
    /// claim's facility holds that verdict, and a facility never holds an insuree from another
    /// district it entered a claim for.
    pub(crate) fn claim_invariants(&mut self) -> Result<(), SimError> {
        let mut unadjudicated = Vec::new();
        let mut not_back = Vec::new();
        let mut leaked = Vec::new();
        for (claim, admin, patient, foreign) in self.claims.clone() {
            let rid = *response_id(&DocId(uuid::Uuid::from_bytes(claim))).as_bytes();
            let at_central = self.nodes[0]
                .store
                .doc_meta(&rid)
                .ok()
                .flatten()
                .is_some_and(|m| m.ty == "ClaimResponse");
            if !at_central {
                unadjudicated.push(uuid::Uuid::from_bytes(claim));
                continue;
            }
            let sid = uuid::Uuid::from_bytes(rid).to_string();
            let r = self.nodes[0]
                .engine()
                .served("ClaimResponse", &sid)
                .map_err(|e| fail("central", e))?;
            if r.resource["outcome"] == "complete" {
                self.out.claims_rejected.1 += 1;
            }
            if self.nodes[admin]
                .store
                .doc_meta(&rid)
                .ok()
                .flatten()
                .is_none()
            {
                not_back.push(format!("{sid} on {}", self.nodes[admin].name));
            }
            if foreign
                && self.nodes[admin]
                    .store
                    .doc_meta(&patient)
                    .ok()
                    .flatten()
                    .is_some()
            {
                leaked.push(format!(
                    "{} holds {}",
                    self.nodes[admin].name,
                    uuid::Uuid::from_bytes(patient)
                ));
            }
        }
        if !unadjudicated.is_empty() {
            self.out.violations.push(format!(
                "{} claims central never adjudicated, e.g. {}",
                unadjudicated.len(),
                unadjudicated[0]
            ));
        }
        if !not_back.is_empty() {
            self.out.violations.push(format!(
                "{} verdicts of central did not reach the claim's facility, e.g. {}",
                not_back.len(),
                not_back[0]
            ));
        }
        if !leaked.is_empty() {
            self.out.violations.push(format!(
                "{} insurees from another district reached the facility that claimed for them, e.g. {}",
                leaked.len(),
                leaked[0]
            ));
        }
        Ok(())
    }
}
