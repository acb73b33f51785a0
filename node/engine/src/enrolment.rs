//! Enrolment on the write path: a policy (`Contract`) is priced by the server's rules
//! ([`fieldmesh_fhir_docs::openimis::policy`]) from what this node holds, as it is written.
//!
//! - On a **local write** (an officer's device, or central's API) the node computes the value,
//!   start, expiry and effective dates and the status from the product, the family's members
//!   and the contributions; what the client sent that disagrees is replaced, and the write's
//!   answer lists it ([`Engine::take_notes`]). A receipt already used for the product is
//!   refused (openIMIS: unique per product). A policy whose product or members this device
//!   does not hold is kept as sent, with a warning.
//! - **After a merge**, central prices every policy that arrives or changes again
//!   ([`crate::central`]), from the merged state: two officers who priced one family apart
//!   (each from what their own phone held) end with the one value the rules give, central's
//!   edit syncing back to both. Devices never re-price what they receive: only its author or
//!   central edits a policy, so no two nodes race to write derived fields.

use fieldmesh_fhir_docs::identifiers::{OPENIMIS_IDENTIFIER_TYPES, identities};
use fieldmesh_fhir_docs::openimis::dates::Date;
use fieldmesh_fhir_docs::openimis::policy::{
    ContractError, Lookup, Priced, Product, RECEIPT_INDEX, coverage, price_contract,
    product_reference, receipt_keys, subject_reference,
};
use fieldmesh_fhir_docs::references::logical_target;
use fieldmesh_fhir_docs::{DocId, Prepared, Resolver, ValidationError};
use serde_json::{Map, Value, json};

use crate::Engine;
use crate::error::{ReadError, WriteError};
use crate::read::{Reader, Served, StoreResolver};

/// The engine as the policy rules see it: what it holds, staged writes included.
pub(crate) struct Held<'a> {
    pub(crate) engine: &'a mut Engine,
    /// The first store failure met (the lookup answers "not held" and the write fails with it).
    pub(crate) failed: Option<WriteError>,
}

impl Held<'_> {
    pub(crate) fn json(&mut self, id: &DocId) -> Option<(String, Map<String, Value>)> {
        match self.engine.stored_json(id) {
            Ok(found) => found,
            Err(ReadError::Store(e)) => {
                self.failed.get_or_insert(e.into());
                None
            }
            Err(ReadError::Commit(e)) => {
                self.failed.get_or_insert(e.into());
                None
            }
            Err(_) => None,
        }
    }
}

impl Held<'_> {
    /// Documents of type `wanted` (id and stored JSON) whose references name `ty/id` under any
    /// of its identities.
    pub(crate) fn naming(
        &mut self,
        wanted: &str,
        ty: &str,
        id: &str,
    ) -> Vec<(String, Map<String, Value>)> {
        let Some(doc_id) = DocId::parse(id) else {
            return Vec::new();
        };
        let Some((_, target)) = self.json(&doc_id) else {
            return Vec::new();
        };
        let keys = match self.engine.meta_of(&doc_id) {
            Ok(Some(meta)) => identities(&target, &meta.origin, id),
            _ => fieldmesh_fhir_docs::identifiers::identifier_keys(&target),
        };
        let mut ids = Vec::new();
        for k in keys {
            match self.engine.referrers(ty, &k.system, &k.value) {
                Ok(found) => ids.extend(found),
                Err(e) => {
                    self.failed.get_or_insert(e.into());
                }
            }
        }
        ids.sort();
        ids.dedup();
        // The type from the document's record first: a facility or a product is named by
        // thousands of documents of other types, which are not read.
        let mut failed = None;
        ids.retain(|c| match self.engine.meta_of(c) {
            Ok(meta) => meta.is_some_and(|m| m.ty == wanted),
            Err(e) => {
                failed.get_or_insert(e);
                false
            }
        });
        if let Some(e) = failed {
            self.failed.get_or_insert(e.into());
        }
        ids.into_iter()
            .filter_map(|c| match self.json(&c)? {
                (t, json) if t == wanted => Some((c.to_string(), json)),
                _ => None,
            })
            .collect()
    }
}

impl Lookup for Held<'_> {
    fn resolve(&mut self, reference: &Map<String, Value>) -> Option<(String, Map<String, Value>)> {
        let (ty, key) = logical_target(reference)?;
        let id = DocId::parse(&Resolver::find(&*self.engine, &ty, &key)?)?;
        let (found_ty, json) = self.json(&id)?;
        (found_ty == ty).then(|| (id.to_string(), json))
    }

    fn contracts_naming(&mut self, ty: &str, id: &str) -> Vec<(String, Map<String, Value>)> {
        self.naming("Contract", ty, id)
    }
}

/// An OperationOutcome issue.
fn issue(severity: &str, code: &str, diagnostics: String, expression: Option<&str>) -> Value {
    let mut i = json!({"severity": severity, "code": code, "diagnostics": diagnostics});
    if let Some(e) = expression {
        i["expression"] = json!([e]);
    }
    i
}

impl Engine {
    /// The OperationOutcome issues of the last local write (what it replaced, what the writer
    /// should know), taken.
    pub fn take_notes(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.notes)
    }

    /// Prices a policy being written here ([`price_contract`]) from what this node holds, and
    /// refuses a receipt another policy of the product already carries. `old` is the
    /// document's state before the write (an update).
    pub(crate) fn price_policy(
        &mut self,
        prepared: &mut Prepared,
        id: &DocId,
        old: Option<&Map<String, Value>>,
    ) -> Result<(), WriteError> {
        self.notes.clear();
        if prepared.ty != "Contract" || self.bulk_load {
            return Ok(());
        }
        let today = Date::from_unix(self.me.time());
        let invalid = |e: ContractError| {
            WriteError::Invalid(ValidationError::one("Contract".to_string(), e.to_string()))
        };
        if let Some(enroll) = fieldmesh_fhir_docs::openimis::policy::enroll_date_of(&prepared.json)
            && enroll > today
            && old.is_none()
        {
            return Err(invalid(ContractError::EnrollInFuture(enroll)));
        }
        self.check_receipts(&prepared.json, id, old)?;
        let mut held = Held {
            engine: self,
            failed: None,
        };
        let priced = price_contract(&mut prepared.json, &id.to_string(), today, &mut held);
        if let Some(e) = held.failed {
            return Err(e);
        }
        let priced: Priced = priced.map_err(invalid)?;
        for r in &priced.replaced {
            let sent = r.sent.as_deref().unwrap_or("nothing");
            self.notes.push(issue(
                "information",
                "informational",
                format!(
                    "{} replaced: the client sent {sent}, openIMIS's rules give {}",
                    r.path, r.now
                ),
                Some(r.path),
            ));
        }
        for w in priced.warnings {
            self.notes
                .push(issue("warning", "business-rule", w, Some("Contract")));
        }
        if let Some(v) = &priced.valuation {
            tracing::debug!(doc = %id, value = %v.value, start = %v.start, expiry = %v.expiry, "policy priced");
        }
        Ok(())
    }

    /// Refuses a contribution whose receipt another policy of the same product carries here
    /// (openIMIS's `check_unique_premium_receipt_code_within_product`). Receipts the document
    /// already held are not checked again.
    fn check_receipts(
        &mut self,
        json: &Map<String, Value>,
        id: &DocId,
        old: Option<&Map<String, Value>>,
    ) -> Result<(), WriteError> {
        let before = old.map(receipt_keys).unwrap_or_default();
        for key in receipt_keys(json) {
            if before.contains(&key) {
                continue;
            }
            let others: Vec<DocId> = self
                .referrers(RECEIPT_INDEX, "", &key)?
                .into_iter()
                .filter(|d| d != id)
                .collect();
            if let Some(other) = others.first() {
                let receipt = key.split_once('|').map_or(key.as_str(), |(_, r)| r);
                return Err(WriteError::Invalid(ValidationError::one(
                    "Contract.term[0].asset[0].extension:contract-premium.receipt".to_string(),
                    format!(
                        "receipt {receipt} is already used for this product by policy \
                         Contract/{other} (openIMIS: a receipt is unique within a product)"
                    ),
                )));
            }
        }
        Ok(())
    }
}

/// A document held here: its id and stored JSON.
pub(crate) type HeldDoc = (DocId, Map<String, Value>);

/// The committed store as the policy rules see it: reads for clients, and central pricing
/// what arrived (every arrival is committed before central's services read the log; what
/// the services themselves staged since, identifiers and flags, is nothing pricing reads).
/// Read through the reader's cache, never loading a document again to edit it.
pub(crate) struct Committed<'a>(pub(crate) &'a Reader);

impl Lookup for Committed<'_> {
    fn resolve(&mut self, reference: &Map<String, Value>) -> Option<(String, Map<String, Value>)> {
        let (ty, key) = logical_target(reference)?;
        let id = StoreResolver(self.0.store()).find(&ty, &key)?;
        let (_, _, json) = self.0.document(&ty, &id).ok()?;
        Some((id, (*json).clone()))
    }

    fn contracts_naming(&mut self, ty: &str, id: &str) -> Vec<(String, Map<String, Value>)> {
        self.0
            .referring("Contract", ty, id)
            .unwrap_or_default()
            .into_iter()
            .map(|(id, json)| (id.to_string(), json))
            .collect()
    }
}

/// What central's services read of a step's arrivals, before the reader: the families and
/// insurees that arrived with the policies they price (the common case: a family is registered
/// and enrolled in one visit), read already in the step's read-ahead.
pub(crate) struct Prefetched<'a> {
    pub(crate) docs: &'a std::collections::HashMap<DocId, Map<String, Value>>,
    pub(crate) reader: &'a Reader,
}

impl Lookup for Prefetched<'_> {
    fn resolve(&mut self, reference: &Map<String, Value>) -> Option<(String, Map<String, Value>)> {
        let (ty, key) = logical_target(reference)?;
        let id = StoreResolver(self.reader.store()).find(&ty, &key)?;
        if let Some(json) = DocId::parse(&id).and_then(|d| self.docs.get(&d))
            && json.get("resourceType").and_then(Value::as_str) == Some(ty.as_str())
        {
            return Some((id, json.clone()));
        }
        Committed(self.reader).resolve(reference)
    }

    fn contracts_naming(&mut self, ty: &str, id: &str) -> Vec<(String, Map<String, Value>)> {
        Committed(self.reader).contracts_naming(ty, id)
    }
}

/// A reference to a held Patient by its local id, with its insurance number (CHFID) as
/// identifier when it has one.
fn patient_reference(id: &str, patient: &Map<String, Value>) -> Map<String, Value> {
    let mut r = Map::new();
    r.insert("reference".into(), Value::String(format!("Patient/{id}")));
    if let Some(chfid) = crate::central::business_number(patient) {
        r.insert(
            "identifier".into(),
            json!({"type": {"coding": [{"system": OPENIMIS_IDENTIFIER_TYPES, "code": "Code"}]}, "value": chfid}),
        );
    }
    r
}

/// Why a coverage inquiry has no answer.
#[derive(Debug, thiserror::Error)]
pub enum EligibilityError {
    /// The request is not one (no `patient.reference`).
    #[error("CoverageEligibilityRequest.patient.reference (Patient/<insurance number>) is missing")]
    NoPatient,
    /// No insuree with that number or id here.
    #[error("no insuree with insurance number or id {0:?} is held on this device")]
    UnknownPatient(String),
    /// The store failed.
    #[error(transparent)]
    Read(#[from] ReadError),
}

impl Reader {
    /// Documents of type `ty` whose references name `target_ty/target_id` under any of its
    /// identities, with their stored JSON.
    pub(crate) fn referring(
        &self,
        ty: &str,
        target_ty: &str,
        target_id: &str,
    ) -> Result<Vec<HeldDoc>, ReadError> {
        let (doc_id, meta, target) = match self.document(target_ty, target_id) {
            Ok(t) => t,
            Err(ReadError::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let keys = identities(&target, &meta.origin, &doc_id.to_string());
        let mut ids = Vec::new();
        for k in keys {
            ids.extend(self.store().referrers(target_ty, &k.system, &k.value)?);
        }
        ids.sort_unstable();
        ids.dedup();
        let mut out = Vec::new();
        for raw in ids {
            let id = DocId(uuid::Uuid::from_bytes(raw));
            match self.document(ty, &id.to_string()) {
                Ok((_, _, json)) => out.push((id, (*json).clone())),
                Err(ReadError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The `Coverage` of policy `id` on `today`, derived from its Contract (read-only, as
    /// openIMIS serves it; [`coverage`]). Its version is the Contract's.
    pub fn coverage(&self, id: &str, today: Date) -> Result<Served, ReadError> {
        let (doc_id, meta, json) = self.document("Contract", id).map_err(|e| match e {
            ReadError::NotFound { id, .. } => ReadError::NotFound {
                ty: "Coverage".into(),
                id,
            },
            e => e,
        })?;
        let mut look = Committed(self);
        let product = product_reference(&json)
            .and_then(|r| look.resolve(r))
            .and_then(|(_, p)| Product::from_insurance_plan(&p).ok());
        let offered = json
            .get("term")
            .and_then(|t| t.pointer("/0/offer/party/0/reference/0"))
            .and_then(Value::as_object);
        let head = offered
            .or_else(|| subject_reference(&json))
            .and_then(|r| look.resolve(r))
            .filter(|(_, p)| p.get("resourceType").and_then(Value::as_str) == Some("Patient"))
            .map(|(pid, p): (String, Map<String, Value>)| patient_reference(&pid, &p));
        let heads: Vec<automerge::ChangeHash> = meta
            .heads
            .iter()
            .map(|h| automerge::ChangeHash(*h))
            .collect();
        Ok(Served {
            id: doc_id.to_string(),
            version: fieldmesh_fhir_docs::version_id(&heads),
            resource: coverage(
                &doc_id.to_string(),
                &json,
                product.as_ref(),
                head.as_ref(),
                today,
            ),
            notes: Vec::new(),
        })
    }

    /// The Coverages of every policy that covers Patient `patient_id`: policies naming the
    /// insuree, and policies of the families it belongs to.
    pub fn coverages_of(&self, patient_id: &str, today: Date) -> Result<Vec<Served>, ReadError> {
        let mut ids: Vec<DocId> = self
            .referring("Contract", "Patient", patient_id)?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        for (group, _) in self.referring("Group", "Patient", patient_id)? {
            ids.extend(
                self.referring("Contract", "Group", &group.to_string())?
                    .into_iter()
                    .map(|(id, _)| id),
            );
        }
        ids.sort();
        ids.dedup();
        ids.iter()
            .map(|id| self.coverage(&id.to_string(), today))
            .collect()
    }

    /// Answers a coverage inquiry from what this node holds (openIMIS's
    /// `CoverageEligibilityRequest` → `CoverageEligibilityResponse`): the insuree named by
    /// `patient.reference` (`Patient/<insurance number>`, or a local id), and one `insurance`
    /// per policy in force on `today` (active, between its effective and expiry dates) with
    /// its Coverage, benefit period and product. Counts and amounts left need the product's
    /// limits and the claims of the period, which openIMIS computes on its server: the answer
    /// says so in `disposition`.
    pub fn eligibility(
        &self,
        request: &Value,
        today: Date,
        node: &str,
    ) -> Result<Value, EligibilityError> {
        let named = request
            .pointer("/patient/reference")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("Patient/"))
            .filter(|s| !s.is_empty())
            .ok_or(EligibilityError::NoPatient)?;
        let patient_id = match self.document("Patient", named) {
            Ok((id, _, _)) => id,
            Err(ReadError::NotFound { .. }) => {
                let ids = self
                    .find_ids(
                        "Patient",
                        &fieldmesh_fhir_docs::IdentifierQuery::ValueOnly(named.to_string()),
                    )
                    .map_err(ReadError::from)?;
                match ids.as_slice() {
                    [one] => *one,
                    _ => return Err(EligibilityError::UnknownPatient(named.to_string())),
                }
            }
            Err(e) => return Err(e.into()),
        };
        let (_, _, patient) = self.document("Patient", &patient_id.to_string())?;
        let mut insurance = Vec::new();
        for c in self.coverages_of(&patient_id.to_string(), today)? {
            let cov = &c.resource;
            if cov.get("status").and_then(Value::as_str) != Some("active") {
                continue;
            }
            let effective = cov
                .get("extension")
                .and_then(Value::as_array)
                .and_then(|e| e.get(1))
                .and_then(|e| e.get("valueDate"))
                .and_then(Value::as_str)
                .and_then(Date::parse);
            let expiry = cov
                .pointer("/period/end")
                .and_then(Value::as_str)
                .and_then(Date::parse);
            let (Some(effective), Some(expiry)) = (effective, expiry) else {
                continue;
            };
            if today < effective || today > expiry {
                continue;
            }
            let mut entry = json!({
                "coverage": {"reference": format!("Coverage/{}", c.id)},
                "inforce": true,
                "benefitPeriod": {"start": effective.to_string(), "end": expiry.to_string()},
            });
            if let Some(class) = cov.pointer("/class/0") {
                entry["extension"] = json!([{"url": "urn:fieldmesh:StructureDefinition/coverage-product",
                    "valueString": class.get("value").cloned().unwrap_or(Value::Null)}]);
            }
            insurance.push(entry);
        }
        let mut out = json!({
            "resourceType": "CoverageEligibilityResponse",
            "status": "active",
            "purpose": request.get("purpose").cloned().unwrap_or_else(|| json!(["benefits"])),
            "patient": patient_reference(&patient_id.to_string(), &patient),
            "created": today.to_string(),
            "outcome": "complete",
            "insurer": {"reference": "openIMIS"},
            "disposition": format!(
                "answered offline by {node} from the policies it holds: {} in force on {today}; \
                 counts and amounts left are computed by openIMIS's server",
                insurance.len()
            ),
            "insurance": insurance,
        });
        if let Some(id) = request
            .pointer("/identifier/0/value")
            .and_then(Value::as_str)
        {
            out["request"] = json!({"identifier": {"value": id}});
        }
        Ok(out)
    }
}

/// The extension by which an insuree names its family (openIMIS IG).
const GROUP_REFERENCE: &str = "patient-group-reference";
/// The extension marking the head of a family (openIMIS IG).
const IS_HEAD: &str = "patient-is-head";

/// The extension of `json` whose URL ends with `name` (openIMIS's IG and its older spellings).
fn openimis_extension<'a>(json: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    json.get("extension")?.as_array()?.iter().find(|e| {
        e.get("url")
            .and_then(Value::as_str)
            .is_some_and(|u| u.ends_with(name))
    })
}

fn is_head(patient: &Map<String, Value>) -> bool {
    openimis_extension(patient, IS_HEAD)
        .and_then(|e| e.get("valueBoolean"))
        .and_then(Value::as_bool)
        == Some(true)
}

/// A family edit a write leads to: document, its state before, after.
type FamilyEdit = (DocId, Map<String, Value>, Map<String, Value>);

impl Engine {
    /// The local id a stored reference resolves to here.
    fn target_of(&self, reference: &Value) -> Option<DocId> {
        let (ty, key) = logical_target(reference.as_object()?)?;
        DocId::parse(&Resolver::find(self, &ty, &key)?)
    }

    /// The stored logical reference to local document `id` of type `ty`.
    fn logical_reference(&self, ty: &str, id: &DocId) -> Result<Value, WriteError> {
        let origin = self
            .meta_of(id)?
            .map_or_else(|| self.me.system.clone(), |m| m.origin);
        Ok(json!({"type": ty, "identifier": {"system": origin, "value": id.to_string()}}))
    }

    fn family_doc(&mut self, id: &DocId) -> Result<Option<Map<String, Value>>, WriteError> {
        match self.stored_json(id) {
            Ok(found) => Ok(found.map(|(_, j)| j)),
            Err(ReadError::Store(e)) => Err(e.into()),
            Err(ReadError::Commit(e)) => Err(e.into()),
            Err(_) => Ok(None),
        }
    }

    /// The family edits that keep insurees and families consistent when `json` (a Patient or a
    /// Group, document `id`) is written here, as openIMIS's `change_family` moves an insuree:
    /// an insuree naming a family is listed among its members and leaves the family it was in;
    /// a family listing an insuree becomes the family the insuree names. The head of another
    /// family is not moved (openIMIS refuses it too).
    pub(crate) fn family_edits(
        &mut self,
        ty: &str,
        id: &DocId,
        json: &Map<String, Value>,
    ) -> Result<Vec<FamilyEdit>, WriteError> {
        let refuse = |why: String| WriteError::Invalid(ValidationError::one(ty.to_string(), why));
        let mut edits: Vec<FamilyEdit> = Vec::new();
        match ty {
            "Patient" => {
                let Some(family) = openimis_extension(json, GROUP_REFERENCE)
                    .and_then(|e| e.get("valueReference"))
                    .and_then(|r| self.target_of(r))
                else {
                    return Ok(edits);
                };
                let me = self.logical_reference("Patient", id)?;
                for other in self.referrers_of_patient(id, json)? {
                    if other == family {
                        continue;
                    }
                    let Some(old) = self.family_doc(&other)? else {
                        continue;
                    };
                    if is_head(json) && self.lists(&old, id) {
                        return Err(refuse(format!(
                            "insuree {id} is the head of family Group/{other}: openIMIS does not \
                             move a head to another family (change_family)"
                        )));
                    }
                    let mut new = old.clone();
                    self.drop_member(&mut new, id);
                    if new != old {
                        edits.push((other, old, new));
                    }
                }
                if let Some(old) = self.family_doc(&family)?
                    && !self.lists(&old, id)
                {
                    let mut new = old.clone();
                    let list = new
                        .entry("member")
                        .or_insert_with(|| Value::Array(Vec::new()));
                    if let Some(list) = list.as_array_mut() {
                        list.push(json!({"entity": me}));
                    }
                    edits.push((family, old, new));
                }
            }
            "Group" => {
                let this = self.logical_reference("Group", id)?;
                let members: Vec<DocId> = json
                    .get("member")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m.get("entity"))
                    .filter_map(|e| self.target_of(e))
                    .collect();
                for m in members {
                    let Some(old) = self.family_doc(&m)? else {
                        continue;
                    };
                    let named = openimis_extension(&old, GROUP_REFERENCE)
                        .and_then(|e| e.get("valueReference"))
                        .and_then(|r| self.target_of(r));
                    let already = openimis_extension(&old, GROUP_REFERENCE)
                        .and_then(|e| e.get("valueReference"))
                        .is_some_and(|r| self.names(r, id));
                    if named == Some(*id) || already {
                        continue;
                    }
                    if let Some(previous) = named
                        && let Some(f_old) = self.family_doc(&previous)?
                    {
                        if is_head(&old) && self.lists(&f_old, &m) {
                            return Err(refuse(format!(
                                "insuree Patient/{m} is the head of family Group/{previous}: \
                                 openIMIS does not move a head to another family \
                                 (change_family)"
                            )));
                        }
                        let mut f_new = f_old.clone();
                        self.drop_member(&mut f_new, &m);
                        if f_new != f_old {
                            edits.push((previous, f_old, f_new));
                        }
                    }
                    let mut new = old.clone();
                    set_group_reference(&mut new, this.clone());
                    edits.push((m, old, new));
                }
            }
            _ => {}
        }
        Ok(edits)
    }

    /// Families whose members include insuree `id`.
    fn referrers_of_patient(
        &self,
        id: &DocId,
        json: &Map<String, Value>,
    ) -> Result<Vec<DocId>, WriteError> {
        let origin = self
            .meta_of(id)?
            .map_or_else(|| self.me.system.clone(), |m| m.origin);
        let keys = identities(json, &origin, &id.to_string());
        let mut out = Vec::new();
        for k in keys {
            for d in self.referrers("Patient", &k.system, &k.value)? {
                if self.meta_of(&d)?.is_some_and(|m| m.ty == "Group") && !out.contains(&d) {
                    out.push(d);
                }
            }
        }
        Ok(out)
    }

    /// Whether the stored reference `e` names document `id` (resolved here, or by its id for a
    /// document not staged yet).
    fn names(&self, e: &Value, id: &DocId) -> bool {
        self.target_of(e) == Some(*id)
            || e.as_object()
                .and_then(logical_target)
                .is_some_and(|(_, k)| k.value == id.to_string())
    }

    /// Whether family `group` lists insuree `id` among its members.
    fn lists(&self, group: &Map<String, Value>, id: &DocId) -> bool {
        group
            .get("member")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|m| m.get("entity"))
            .any(|e| self.names(e, id))
    }

    fn drop_member(&self, group: &mut Map<String, Value>, id: &DocId) {
        let keep: Vec<Value> = group
            .get("member")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|m| !m.get("entity").is_some_and(|e| self.names(e, id)))
            .cloned()
            .collect();
        if keep.is_empty() {
            group.remove("member");
        } else {
            group.insert("member".into(), Value::Array(keep));
        }
    }

    /// Checks that this node's certificate allows every family edit, before anything of the
    /// write is staged (a write is whole or refused).
    pub(crate) fn authorize_family_edits(&self, edits: &[FamilyEdit]) -> Result<(), WriteError> {
        if !self.check_local {
            return Ok(());
        }
        for (id, old, new) in edits {
            let ty = self.meta_of(id)?.map(|m| m.ty).unwrap_or_default();
            crate::write::authorize(
                &self.trust,
                self.policy.as_ref(),
                &self.me,
                id,
                &ty,
                Some((
                    fieldmesh_fhir_docs::openimis::places(&ty, old).as_deref(),
                    old,
                )),
                new,
            )?;
        }
        Ok(())
    }

    /// Applies family edits ([`Engine::family_edits`], authorized by
    /// [`Engine::authorize_family_edits`]): each an ordinary signed change by this node.
    pub(crate) fn apply_family_edits(&mut self, edits: Vec<FamilyEdit>) -> Result<(), WriteError> {
        for (id, old, new) in edits {
            self.edit_stored(&id, &old, &new)?;
        }
        Ok(())
    }
}

/// Sets an insuree's `patient-group-reference` to `family`, keeping every other extension.
fn set_group_reference(patient: &mut Map<String, Value>, family: Value) {
    let list = patient
        .entry("extension")
        .or_insert_with(|| Value::Array(Vec::new()));
    if let Some(list) = list.as_array_mut() {
        match list.iter_mut().find(|e| {
            e.get("url")
                .and_then(Value::as_str)
                .is_some_and(|u| u.ends_with(GROUP_REFERENCE))
        }) {
            Some(e) => e["valueReference"] = family,
            None => list.push(json!({
                "url": format!("{}/StructureDefinition/{GROUP_REFERENCE}", fieldmesh_fhir_docs::openimis::IG),
                "valueReference": family,
            })),
        }
    }
}
