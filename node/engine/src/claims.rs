//! Claims on the write path: a Claim written here is checked as openIMIS checks it
//! ([`fieldmesh_fhir_docs::openimis::claims`]) from what this node holds, and answered with a
//! ClaimResponse.
//!
//! - On a **claim administrator's device** the answer is provisional: the device holds the
//!   facility's price list, the items and services, the insurees of its catchment with their
//!   policies and the claims of its facility, not insurees from elsewhere nor claims at other
//!   facilities; the checks it could not make with all the data are named in the answer. The
//!   verdict is kept beside the claim (a local record, `local:claim-verdict/<claim>`, written in
//!   the same commit), so later claims of the insuree count its lines that passed; it is served
//!   as the claim's ClaimResponse until central's arrives.
//! - A line without a `unitPrice` takes the price list's price (the claims app fills it from
//!   the list too); a price the client sent is kept as sent, and what is approved is valued at
//!   the list's price (see the rules' module for why).
//! - **Central** adjudicates every claim that arrives or changes, with everything
//!   ([`crate::central`]): its verdict is a `ClaimResponse` document ([`response_id`]), signed by
//!   central, held where the claim is (the facility), that syncs back to the device as the
//!   authoritative answer.

use fieldmesh_fhir_docs::identifiers::IdentKey;
use fieldmesh_fhir_docs::openimis::claims::{
    ClaimFacts, History, Inputs, Insuree, Medical, PolicyFacts, PriceList, ProductCover, Verdict,
    evaluate, facility_care_type,
};
use fieldmesh_fhir_docs::openimis::dates::Date;
use fieldmesh_fhir_docs::openimis::policy::{Lookup, Money, product_reference, stage_of};
use fieldmesh_fhir_docs::{DocId, IdentifierQuery, Prepared, ValidationError};
use fieldmesh_storage::Write;
use serde_json::{Map, Value, json};

use crate::Engine;
use crate::enrolment::Held;
use crate::error::WriteError;

/// Prefix of the local records of the verdicts this device gave its claims.
pub const VERDICT_PREFIX: &str = "local:claim-verdict/";

/// Extension of a ClaimResponse carrying the claim's category (so that later claims count it
/// against the product's maxima without reading its services again).
pub const CATEGORY_EXTENSION: &str = "urn:fieldmesh:StructureDefinition/claim-category";

/// The id of a claim's ClaimResponse: derived from the claim's, so that central's verdict and
/// the device's provisional answer name the same resource.
pub fn response_id(claim: &DocId) -> DocId {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"fieldmesh-claim-response\0");
    h.update(claim.as_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    DocId(uuid::Builder::from_custom_bytes(bytes).into_uuid())
}

/// What the checks of a claim read, gathered from a node's documents.
pub(crate) struct Gathered {
    pub(crate) inputs_owned: Owned,
}

/// The owned parts of [`Inputs`].
pub(crate) struct Owned {
    insuree: Option<Insuree>,
    policies: Vec<PolicyFacts>,
    facility_care_type: Option<char>,
    price_list: Option<PriceList>,
    medical: Vec<Option<Medical>>,
    history: History,
}

fn str_at<'a>(v: &'a Value, path: &str) -> Option<&'a str> {
    v.pointer(path).and_then(Value::as_str)
}

fn date_at(v: &Value, path: &str) -> Option<Date> {
    str_at(v, path).and_then(|s| Date::parse(s.get(..10).unwrap_or(s)))
}

/// A policy (Contract) as the claim checks read it.
fn policy_facts(id: &str, contract: &Map<String, Value>, held: &mut Held<'_>) -> PolicyFacts {
    let c = Value::Object(contract.clone());
    let asset = c.pointer("/term/0/asset/0").cloned().unwrap_or(Value::Null);
    let product = product_reference(contract)
        .and_then(|r| held.resolve(r))
        .map(|(_, p)| ProductCover::from_insurance_plan(&p));
    PolicyFacts {
        id: id.to_string(),
        active: contract
            .get("status")
            .and_then(Value::as_str)
            .is_some_and(|s| s.eq_ignore_ascii_case("policy")),
        effective: date_at(&asset, "/usePeriod/0/start"),
        expiry: date_at(&asset, "/period/0/end"),
        stage: stage_of(contract),
        product,
    }
}

/// Gathers what the checks of `claim` (document `id`, stored form) read from what `held`
/// holds. `local` says whether this node keeps local verdicts (a device) besides central's
/// ClaimResponses.
pub(crate) fn gather(
    held: &mut Held<'_>,
    id: &DocId,
    claim_json: &Map<String, Value>,
    facts: &ClaimFacts,
) -> Gathered {
    let patient = claim_json
        .get("patient")
        .and_then(Value::as_object)
        .and_then(|r| held.resolve(r))
        .filter(|(_, p)| p.get("resourceType").and_then(Value::as_str) == Some("Patient"));
    let medical: Vec<Option<Medical>> = facts
        .lines
        .iter()
        .map(|l| {
            held.resolve(&l.reference)
                .and_then(|(mid, m)| Medical::from_json(&mid, &m))
        })
        .collect();
    let facility = claim_json
        .get("provider")
        .and_then(Value::as_object)
        .and_then(|r| held.resolve(r))
        .filter(|(_, o)| o.get("resourceType").and_then(Value::as_str) == Some("Organization"));
    let (facility_care_type, price_list) = match &facility {
        Some((fid, org)) => (
            Some(facility_care_type(org)),
            held.naming("List", "Organization", fid)
                .iter()
                .find_map(|(_, l)| PriceList::from_json(l)),
        ),
        None => (None, None),
    };
    let mut insuree = None;
    let mut policies = Vec::new();
    let mut history = History::default();
    if let Some((pid, p)) = &patient {
        let groups = held.naming("Group", "Patient", pid);
        let has_family = !groups.is_empty()
            || p.get("extension")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|e| {
                    e.get("url")
                        .and_then(Value::as_str)
                        .is_some_and(|u| u.ends_with("patient-group-reference"))
                });
        insuree = Some(Insuree::from_patient(p, has_family));
        let mut contracts = held.naming("Contract", "Patient", pid);
        for (gid, _) in &groups {
            contracts.extend(held.naming("Contract", "Group", gid));
        }
        contracts.sort_by(|a, b| a.0.cmp(&b.0));
        contracts.dedup_by(|a, b| a.0 == b.0);
        policies = contracts
            .iter()
            .map(|(cid, c)| policy_facts(cid, c, held))
            .collect();
        let own = id.to_string();
        for (cid, other) in held.naming("Claim", "Patient", pid) {
            if cid == own {
                continue;
            }
            let Some(doc) = DocId::parse(&cid) else {
                continue;
            };
            let Ok(prior) = ClaimFacts::parse(&other) else {
                continue;
            };
            let Some((verdict, category)) = verdict_of(held, &doc, &prior) else {
                continue;
            };
            let ids: Vec<Option<String>> = prior
                .lines
                .iter()
                .map(|l| held.resolve(&l.reference).map(|(mid, _)| mid))
                .collect();
            history.add(&prior, &verdict, category, &ids);
        }
    }
    Gathered {
        inputs_owned: Owned {
            insuree,
            policies,
            facility_care_type,
            price_list,
            medical,
            history,
        },
    }
}

/// The verdict on an earlier claim: central's ClaimResponse if held, else the one this device
/// gave it. `None`: not checked yet (entered only), which openIMIS does not count.
fn verdict_of(held: &mut Held<'_>, claim: &DocId, facts: &ClaimFacts) -> Option<(Verdict, char)> {
    let rid = response_id(claim);
    if let Some((ty, json)) = held.json(&rid)
        && ty == "ClaimResponse"
    {
        let category = json
            .get("extension")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|e| e.get("url").and_then(Value::as_str) == Some(CATEGORY_EXTENSION))
            .and_then(|e| e.get("valueString"))
            .and_then(Value::as_str)
            .and_then(|s| s.chars().next())
            .unwrap_or('V');
        return Verdict::from_claim_response(&json, facts).map(|v| (v, category));
    }
    let raw = held
        .engine
        .store()
        .checkpoint(&format!("{VERDICT_PREFIX}{claim}"))
        .ok()??;
    let v: Verdict = serde_json::from_slice(&raw).ok()?;
    let c = v.category;
    Some((v, c))
}

impl Gathered {
    pub(crate) fn evaluate(&self, facts: &ClaimFacts, complete: bool) -> Verdict {
        let o = &self.inputs_owned;
        evaluate(&Inputs {
            claim: facts,
            insuree: o.insuree.clone(),
            policies: o.policies.clone(),
            facility_care_type: o.facility_care_type,
            price_list: o.price_list.clone(),
            medical: o.medical.clone(),
            history: o.history.clone(),
            complete,
        })
    }
}

/// The ClaimResponse of `verdict` for claim `claim_id`, with its category.
pub fn response_json(
    verdict: &Verdict,
    claim_id: &DocId,
    claim: &Map<String, Value>,
    today: Date,
    by: &str,
) -> Value {
    let mut out = verdict.claim_response(
        &response_id(claim_id).to_string(),
        &claim_id.to_string(),
        claim,
        today,
        by,
    );
    let cat = json!({"url": CATEGORY_EXTENSION, "valueString": verdict.category.to_string()});
    match out.get_mut("extension").and_then(Value::as_array_mut) {
        Some(list) => list.push(cat),
        None => out["extension"] = json!([cat]),
    }
    out
}

impl Engine {
    /// Checks a Claim written here (see the module's documentation): its code unique among the
    /// claims held here, prices filled from the price list, the verdict computed. Returns the
    /// verdict to keep once the write is staged ([`Engine::keep_verdict`]).
    pub(crate) fn check_claim(
        &mut self,
        prepared: &mut Prepared,
        id: &DocId,
    ) -> Result<Option<Verdict>, WriteError> {
        self.claim_answer = None;
        if prepared.ty != "Claim" || self.bulk_load {
            return Ok(None);
        }
        let facts = ClaimFacts::parse(&prepared.json).map_err(|e| {
            WriteError::Invalid(ValidationError::one("Claim".to_string(), e.to_string()))
        })?;
        if let Some(code) = &facts.code {
            let others: Vec<DocId> = self
                .find_ids(
                    "Claim",
                    &IdentifierQuery::Exact(IdentKey::openimis_code(code.clone())),
                )?
                .into_iter()
                .filter(|d| d != id)
                .collect();
            if let Some(other) = others.first() {
                return Err(WriteError::Invalid(ValidationError::one(
                    "Claim.identifier".to_string(),
                    format!(
                        "claim code {code} is already used by Claim/{other} (openIMIS: a claim \
                         code is unique among valid claims)"
                    ),
                )));
            }
        }
        let mut held = Held {
            engine: self,
            failed: None,
        };
        let gathered = gather(&mut held, id, &prepared.json, &facts);
        if let Some(e) = held.failed {
            return Err(e);
        }
        let complete = matches!(self.my_reach()?, crate::scope::Reach::All);
        let verdict = gathered.evaluate(&facts, complete);
        // A line without a price takes the list's.
        if let Some(items) = prepared.json.get_mut("item").and_then(Value::as_array_mut) {
            for (line, v) in facts.lines.iter().zip(&verdict.lines) {
                if line.asked.is_none()
                    && let (Some(price), Some(item)) = (v.price, items.get_mut(line.index))
                {
                    let currency = item
                        .pointer("/unitPrice/currency")
                        .cloned()
                        .unwrap_or_else(|| json!("XOF"));
                    item["unitPrice"] =
                        json!({"value": Money(price).to_json(), "currency": currency});
                }
            }
        }
        let today = Date::from_unix(self.me.time());
        self.claim_answer = Some(response_json(
            &verdict,
            id,
            &prepared.json,
            today,
            &self.me.system,
        ));
        Ok(Some(verdict))
    }

    /// Stages the local record of the verdict a claim written here got (with the claim's write).
    pub(crate) fn keep_verdict(&mut self, id: &DocId, verdict: &Verdict) {
        if let Ok(value) = serde_json::to_vec(verdict) {
            self.push(
                Write::Checkpoint {
                    peer: format!("{VERDICT_PREFIX}{id}"),
                    value,
                },
                None,
            );
        }
    }

    /// The ClaimResponse the last Claim written here got, taken (its references rendered as
    /// reads render them).
    pub fn take_claim_answer(&mut self) -> Option<Value> {
        let mut v = self.claim_answer.take()?;
        fieldmesh_fhir_docs::references::render(&mut v, &*self);
        Some(v)
    }

    /// Central's verdict on claim `id`, as a ClaimResponse to store (`None`: not a claim, or
    /// gone). Reads everything central holds, staged edits included.
    pub(crate) fn adjudicate(&mut self, id: &DocId) -> Result<Option<Value>, WriteError> {
        let Some((ty, claim)) = self.stored_json(id)? else {
            return Ok(None);
        };
        if ty != "Claim" {
            return Ok(None);
        }
        let Ok(facts) = ClaimFacts::parse(&claim) else {
            return Ok(None);
        };
        let mut held = Held {
            engine: self,
            failed: None,
        };
        let gathered = gather(&mut held, id, &claim, &facts);
        if let Some(e) = held.failed {
            return Err(e);
        }
        let verdict = gathered.evaluate(&facts, true);
        let today = Date::from_unix(self.me.time());
        Ok(Some(response_json(&verdict, id, &claim, today, "central")))
    }
}

impl crate::read::Reader {
    /// The provisional ClaimResponse this device gave claim `claim` (from its local record),
    /// while central's has not arrived. `None` when there is none.
    pub fn provisional_claim_response(
        &self,
        claim: &str,
        today: Date,
        by: &str,
    ) -> Result<Option<crate::read::Served>, crate::error::ReadError> {
        let (doc_id, meta, json) = match self.document("Claim", claim) {
            Ok(found) => found,
            Err(crate::error::ReadError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(raw) = self
            .store()
            .checkpoint(&format!("{VERDICT_PREFIX}{doc_id}"))?
        else {
            return Ok(None);
        };
        let Ok(verdict) = serde_json::from_slice::<Verdict>(&raw) else {
            return Ok(None);
        };
        let mut resource = response_json(&verdict, &doc_id, &json, today, by);
        fieldmesh_fhir_docs::references::render(
            &mut resource,
            &crate::read::StoreResolver(self.store()),
        );
        let heads: Vec<automerge::ChangeHash> = meta
            .heads
            .iter()
            .map(|h| automerge::ChangeHash(*h))
            .collect();
        Ok(Some(crate::read::Served {
            id: response_id(&doc_id).to_string(),
            version: fieldmesh_fhir_docs::version_id(&heads),
            resource,
            notes: Vec::new(),
        }))
    }
}
