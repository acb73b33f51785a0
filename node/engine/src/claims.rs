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
use fieldmesh_fhir_docs::identifiers::identities;
use fieldmesh_fhir_docs::openimis::claims::{
    ClaimFacts, History, Inputs, Insuree, Line, Medical, OrderKey, PRICE_LIST_INDEX, PolicyFacts,
    PriceList, ProductCover, Verdict, code_reference, evaluate, facility_care_type, order_key,
};
use fieldmesh_fhir_docs::openimis::dates::Date;
use fieldmesh_fhir_docs::openimis::flags::{FlagCode, flags_of};
use fieldmesh_fhir_docs::openimis::policy::{
    Lookup, Money, covered_references, product_reference, stage_of, subject_reference,
};
use fieldmesh_fhir_docs::{DocId, IdentifierQuery, Prepared, ValidationError};
use fieldmesh_storage::Write;
use serde_json::{Map, Value, json};

use crate::Engine;
use crate::enrolment::Held;
use crate::error::WriteError;

/// Prefix of the local records of the verdicts this device gave its claims.
pub const VERDICT_PREFIX: &str = "local:claim-verdict/";

/// The verdicts of the claims written here lately, until their commit is surely durable (a
/// bounded memory: the oldest go first).
#[derive(Debug, Default)]
pub(crate) struct RecentVerdicts {
    order: std::collections::VecDeque<DocId>,
    by_claim: std::collections::HashMap<DocId, Vec<u8>>,
}

/// Verdicts [`RecentVerdicts`] keeps.
const RECENT_VERDICTS: usize = 1024;

impl RecentVerdicts {
    fn insert(&mut self, id: DocId, raw: Vec<u8>) {
        if self.by_claim.insert(id, raw).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > RECENT_VERDICTS {
            if let Some(old) = self.order.pop_front() {
                self.by_claim.remove(&old);
            }
        }
    }

    fn get(&self, id: &DocId) -> Option<&Vec<u8>> {
        self.by_claim.get(id)
    }
}

/// Extension of central's ClaimResponse naming the insuree by its id on central.
pub const INSUREE_EXTENSION: &str = "urn:fieldmesh:StructureDefinition/claim-insuree";

/// Reference-index pseudo type of central's verdicts by insuree (`(CLAIMED_INDEX, "", <insuree
/// id>)`, from [`INSUREE_EXTENSION`]): whether an insuree has claims, in one lookup.
pub const CLAIMED_INDEX: &str = "urn:fieldmesh:claimed-insuree";

/// The [`CLAIMED_INDEX`] keys of a ClaimResponse.
pub(crate) fn claimed_keys(json: &Map<String, Value>) -> Vec<String> {
    json.get("extension")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|e| e.get("url").and_then(Value::as_str) == Some(INSUREE_EXTENSION))
        .filter_map(|e| {
            e.get("valueString")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .collect()
}

/// Extension of a ClaimResponse carrying the claim's category (so that later claims count it
/// against the product's maxima without reading its services again).
pub const CATEGORY_EXTENSION: &str = "urn:fieldmesh:StructureDefinition/claim-category";

/// The id of a claim's ClaimResponse: derived from the claim's, so that central's verdict and
/// the device's provisional answer name the same resource.
pub fn response_id(claim: &DocId) -> DocId {
    DocId(crate::central::derived_uuid(&[
        "fieldmesh-claim-response",
        &claim.to_string(),
    ]))
}

/// What the checks of a claim read, gathered from a node's documents (the owned parts of
/// [`Inputs`]).
pub(crate) struct Gathered {
    /// The insuree's id here, when held.
    patient: Option<String>,
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
    let asset = contract
        .get("term")
        .and_then(|t| t.pointer("/0/asset/0"))
        .unwrap_or(&Value::Null);
    let product = product_reference(contract)
        .and_then(|r| held.resolve(r))
        .map(|(_, p)| ProductCover::from_insurance_plan(&p));
    PolicyFacts {
        id: id.to_string(),
        // Active (`Policy`) or expired since (`Terminated`), as openIMIS's valid policies.
        active: contract
            .get("status")
            .and_then(Value::as_str)
            .is_some_and(|s| {
                s.eq_ignore_ascii_case("policy") || s.eq_ignore_ascii_case("terminated")
            }),
        effective: date_at(asset, "/usePeriod/0/start"),
        expiry: date_at(asset, "/period/0/end"),
        stage: stage_of(contract),
        product,
    }
}

/// Gathers what the checks of `claim` (document `id`, stored form) read from what `held`
/// holds: the earlier claims' verdicts are central's ClaimResponses, else this device's own.
pub(crate) fn gather(
    held: &mut Held<'_>,
    id: &DocId,
    claim_json: &Map<String, Value>,
    facts: &ClaimFacts,
) -> Gathered {
    let patient = claim_json
        .get("patient")
        .and_then(Value::as_object)
        .and_then(|r| resolve_any(held, r))
        .filter(|(_, p)| p.get("resourceType").and_then(Value::as_str) == Some("Patient"));
    let medical: Vec<Option<Medical>> = facts
        .lines
        .iter()
        .map(|l| resolve_line(held, l).and_then(|(mid, m)| Medical::from_json(&mid, &m)))
        .collect();
    let facility = claim_json
        .get("provider")
        .and_then(Value::as_object)
        .and_then(|r| resolve_any(held, r))
        .filter(|(_, o)| o.get("resourceType").and_then(Value::as_str) == Some("Organization"));
    let (facility_care_type, price_list) = match &facility {
        Some((fid, org)) => (Some(facility_care_type(org)), price_list_of(held, fid, org)),
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
        // The claims before this one in the order claims are checked (openIMIS: those
        // submitted before it), the latest first, at most `MAX_HISTORY`.
        let own = order_key(claim_json, &id.to_string());
        let mut earlier: Vec<(OrderKey, Map<String, Value>)> = held
            .naming("Claim", "Patient", pid)
            .into_iter()
            .map(|(cid, c)| (order_key(&c, &cid), c))
            .filter(|(k, _)| *k < own)
            .collect();
        earlier.sort_by(|a, b| b.0.cmp(&a.0));
        earlier.truncate(MAX_HISTORY);
        for ((_, _, cid), other) in earlier {
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
                .map(|l| resolve_line(held, l).map(|(mid, _)| mid))
                .collect();
            history.add(&prior, &verdict, category, &ids);
        }
    }
    Gathered {
        patient: patient.map(|(pid, _)| pid),
        insuree,
        policies,
        facility_care_type,
        price_list,
        medical,
        history,
    }
}

/// Earlier claims of an insuree a check reads, at most (the latest): bounds the work of one
/// write whatever an app posted before.
pub const MAX_HISTORY: usize = 500;

/// Resolves a reference to a resource this node holds; one to a `contained` resource (`#…`,
/// as openIMIS's claims may carry the insuree) by the identifier it also carries. A card number
/// two registrations hold (central flagged the later one) names the one that keeps it.
fn resolve_any(
    held: &mut Held<'_>,
    r: &Map<String, Value>,
) -> Option<(String, Map<String, Value>)> {
    if let Some(found) = held.resolve(r) {
        return Some(found);
    }
    let mut logical = r.clone();
    if r.get("reference")
        .and_then(Value::as_str)
        .is_some_and(|s| s.starts_with('#'))
    {
        logical.remove("reference");
        if let Some(found) = held.resolve(&logical) {
            return Some(found);
        }
    }
    let (ty, key) = fieldmesh_fhir_docs::references::logical_target(&logical)?;
    let ids = held
        .engine
        .find_ids(&ty, &IdentifierQuery::Exact(key))
        .ok()?;
    if ids.len() < 2 {
        return None;
    }
    let mut keeps = Vec::new();
    for d in ids {
        if let Some((t, json)) = held.json(&d)
            && t == ty
            && !flags_of(&json)
                .iter()
                .any(|f| f.code == FlagCode::NumberTaken)
        {
            keeps.push((d.to_string(), json));
        }
    }
    (keeps.len() == 1).then(|| keeps.remove(0))
}

/// The item or service a claim line names: by its reference, else (a definition sent
/// `contained`, which openIMIS creates on the fly) by the code the line gives.
fn resolve_line(held: &mut Held<'_>, l: &Line) -> Option<(String, Map<String, Value>)> {
    resolve_any(held, &l.reference).or_else(|| {
        l.code
            .as_deref()
            .and_then(|c| held.resolve(&code_reference(l.kind, c)))
    })
}

/// The price list of facility `fid` (its record `org`), found through the price-list index.
fn price_list_of(held: &mut Held<'_>, fid: &str, org: &Map<String, Value>) -> Option<PriceList> {
    let doc = DocId::parse(fid)?;
    let origin = held.engine.meta_of(&doc).ok()??.origin;
    let mut lists = Vec::new();
    for k in identities(org, &origin, fid) {
        if let Ok(found) =
            held.engine
                .referrers(PRICE_LIST_INDEX, "", &format!("{}|{}", k.system, k.value))
        {
            lists.extend(found);
        }
    }
    lists.sort();
    lists.dedup();
    lists
        .into_iter()
        .find_map(|d| held.json(&d).and_then(|(_, l)| PriceList::from_json(&l)))
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
    let raw = match held.engine.recent_verdicts.get(claim) {
        Some(raw) => raw.clone(),
        None => held
            .engine
            .store()
            .checkpoint(&format!("{VERDICT_PREFIX}{claim}"))
            .ok()??,
    };
    let v: Verdict = serde_json::from_slice(&raw).ok()?;
    let c = v.category;
    Some((v, c))
}

impl Gathered {
    /// The verdict on `facts` from what was gathered; `complete`: the node holds every claim.
    pub(crate) fn evaluate(self, facts: &ClaimFacts, complete: bool) -> Verdict {
        self.evaluate_for(facts, complete).0
    }

    /// [`Gathered::evaluate`], with the insuree's id here.
    fn evaluate_for(self, facts: &ClaimFacts, complete: bool) -> (Verdict, Option<String>) {
        let patient = self.patient;
        let verdict = evaluate(&Inputs {
            claim: facts,
            insuree: self.insuree,
            policies: self.policies,
            facility_care_type: self.facility_care_type,
            price_list: self.price_list,
            medical: self.medical,
            history: self.history,
            complete,
        });
        (verdict, patient)
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
            self.recent_verdicts.insert(*id, value.clone());
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

    /// The insurees a changed `ty` document concerns, whose claims central adjudicates again
    /// (a policy, a payment or a registration that reached central after a claim changes the
    /// claim's verdict): a Patient itself, a family's members, a policy's covered insurees and
    /// its family's members. Only those with claims.
    pub(crate) fn insurees_with_claims(
        &mut self,
        id: &DocId,
        ty: &str,
        json: &Map<String, Value>,
    ) -> Result<Vec<DocId>, WriteError> {
        // Found through the indexes: no insuree is read.
        let find = |engine: &Engine, r: &Map<String, Value>| -> Option<DocId> {
            let (ty, key) = fieldmesh_fhir_docs::references::logical_target(r)?;
            DocId::parse(&fieldmesh_fhir_docs::Resolver::find(engine, &ty, &key)?)
        };
        let members = |engine: &Engine, group: &Map<String, Value>| -> Vec<DocId> {
            group
                .get("member")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|m| m.get("entity").and_then(Value::as_object))
                .filter_map(|r| find(engine, r))
                .collect()
        };
        let mut patients: Vec<DocId> = Vec::new();
        match ty {
            "Patient" => patients.push(*id),
            "Group" => patients.extend(members(self, json)),
            "Contract" => {
                // The insurees it covers and its family's members: a claim's checks apply
                // every policy naming the family to each member.
                for r in covered_references(json) {
                    patients.extend(find(self, r));
                }
                if let Some(g) = subject_reference(json).and_then(|r| find(self, r))
                    && let Some((gty, group)) = self.stored_json(&g)?
                    && gty == "Group"
                {
                    patients.extend(members(self, &group));
                }
            }
            _ => {}
        }
        patients.sort();
        patients.dedup();
        let mut with_claims = Vec::with_capacity(patients.len());
        for pid in patients {
            if !self
                .referrers(CLAIMED_INDEX, "", &pid.to_string())?
                .is_empty()
            {
                with_claims.push(pid);
            }
        }
        Ok(with_claims)
    }

    /// The claims central adjudicates for `claims` that changed and `insurees` whose data
    /// changed: every claim of each insuree concerned (a claim's verdict depends on the claims
    /// before it, and those after it on it), in the order claims are checked; and of `claims`,
    /// those whose insuree is not held (yet).
    pub(crate) fn claims_to_adjudicate(
        &mut self,
        claims: Vec<DocId>,
        insurees: Vec<DocId>,
    ) -> Result<(Vec<DocId>, Vec<DocId>), WriteError> {
        let mut held = Held {
            engine: self,
            failed: None,
        };
        let mut patients: Vec<String> = insurees.iter().map(DocId::to_string).collect();
        let mut keyed: Vec<(OrderKey, DocId)> = Vec::new();
        let mut unresolved = Vec::new();
        for c in claims {
            let Some((ty, json)) = held.json(&c) else {
                continue;
            };
            if ty != "Claim" {
                continue;
            }
            // The claim itself, whatever its insuree's other claims are found to be (a
            // reference kept as `#contained` is not in the reference index).
            keyed.push((order_key(&json, &c.to_string()), c));
            let named = json.get("patient").and_then(Value::as_object);
            match named.and_then(|r| resolve_any(&mut held, r)) {
                Some((pid, _)) => patients.push(pid),
                // Tried again when insurees arrive; a claim naming no one never resolves.
                None if named.is_some() => unresolved.push(c),
                None => {}
            }
        }
        patients.sort();
        patients.dedup();
        for pid in patients {
            for (cid, json) in held.naming("Claim", "Patient", &pid) {
                if let Some(c) = DocId::parse(&cid) {
                    keyed.push((order_key(&json, &cid), c));
                }
            }
        }
        if let Some(e) = held.failed {
            return Err(e);
        }
        keyed.sort();
        keyed.dedup_by(|a, b| a.1 == b.1);
        Ok((keyed.into_iter().map(|(_, c)| c).collect(), unresolved))
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
        let today = Date::from_unix(self.me.time());
        let Ok(facts) = ClaimFacts::parse(&claim) else {
            // A claim a device should have refused: answered, not left without a verdict.
            return Ok(Some(response_json(
                &Verdict::invalid(),
                id,
                &claim,
                today,
                "central",
            )));
        };
        let mut held = Held {
            engine: self,
            failed: None,
        };
        let gathered = gather(&mut held, id, &claim, &facts);
        if let Some(e) = held.failed {
            return Err(e);
        }
        let (verdict, patient) = gathered.evaluate_for(&facts, true);
        let mut out = response_json(&verdict, id, &claim, today, "central");
        // The insuree as central knows it: indexed (`CLAIMED_INDEX`), so that a change to the
        // insuree's policy or family finds its claims without reading anything.
        if let (Some(pid), Some(list)) = (
            patient,
            out.get_mut("extension").and_then(Value::as_array_mut),
        ) {
            list.push(json!({"url": INSUREE_EXTENSION, "valueString": pid}));
        }
        Ok(Some(out))
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
