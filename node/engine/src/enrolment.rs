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

use fieldmesh_fhir_docs::identifiers::OPENIMIS_IDENTIFIER_TYPES;
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
    engine: &'a mut Engine,
    /// The first store failure met (the lookup answers "not held" and the write fails with it).
    pub(crate) failed: Option<WriteError>,
}

impl<'a> Held<'a> {
    pub(crate) fn new(engine: &'a mut Engine) -> Self {
        Self {
            engine,
            failed: None,
        }
    }
}

impl Held<'_> {
    fn json(&mut self, id: &DocId) -> Option<(String, Map<String, Value>)> {
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

impl Lookup for Held<'_> {
    fn resolve(&mut self, reference: &Map<String, Value>) -> Option<(String, Map<String, Value>)> {
        let (ty, key) = logical_target(reference)?;
        let id = DocId::parse(&Resolver::find(&*self.engine, &ty, &key)?)?;
        let (found_ty, json) = self.json(&id)?;
        (found_ty == ty).then(|| (id.to_string(), json))
    }

    fn contracts_naming(&mut self, ty: &str, id: &str) -> Vec<(String, Map<String, Value>)> {
        let Some(doc_id) = DocId::parse(id) else {
            return Vec::new();
        };
        let Some((_, target)) = self.json(&doc_id) else {
            return Vec::new();
        };
        let mut keys = fieldmesh_fhir_docs::identifiers::identifier_keys(&target);
        if let Ok(Some(meta)) = self.engine.meta_of(&doc_id) {
            keys.push(fieldmesh_fhir_docs::IdentKey::new(meta.origin, id));
        }
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
        ids.into_iter()
            .filter_map(|c| match self.json(&c)? {
                (t, json) if t == "Contract" => Some((c.to_string(), json)),
                _ => None,
            })
            .collect()
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
        if prepared.ty != "Contract" {
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

/// The committed store as the policy rules see it (reads for clients).
struct Committed<'a>(&'a Reader);

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
        let mut keys = fieldmesh_fhir_docs::identifiers::identifier_keys(&target);
        keys.push(fieldmesh_fhir_docs::IdentKey::new(
            meta.origin.clone(),
            doc_id.to_string(),
        ));
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
