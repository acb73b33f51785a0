//! openIMIS: the deployment's roles, what each may write, where a document is, and synthetic data.
//!
//! - The **capability matrix**: which [`Role`] grants which [`Capability`], and which capability
//!   writing each resource type needs ([`Capability::for_type`]).
//! - **Where a document is** ([`places`]): the villages or facility a document names, matched
//!   against a certificate's scope by the trust decision (`fieldmesh-trust`), which takes this
//!   policy as a parameter.
//! - [`demo`]: realistic synthetic openIMIS data (locations, facilities, items, services, a
//!   product, families, policies, claims) for demos, tests, benchmarks and simulations.
//!
//! The FHIR shapes follow `FHIR-MAPPING.md` (openIMIS's own FHIR module and its test payloads).

pub mod claims;
pub mod dates;
pub mod demo;
pub mod flags;
pub mod numbers;
pub mod persons;
pub mod policy;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The openIMIS FHIR IG base URL (extensions and code systems).
pub const IG: &str = "https://openimis.github.io/openimis_fhir_r4_ig";

/// Extension pointing at the village of an address (openIMIS IG).
pub const LOCATION_EXTENSION: &str =
    "https://openimis.github.io/openimis_fhir_r4_ig/StructureDefinition/address-location-reference";

/// A role in a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The central server beside openIMIS: everything, and alone reference data.
    Central,
    /// A health-facility or district hub: relays, authors nothing but evidence of misbehaving
    /// keys.
    Hub,
    /// Enrolment officer: insurees, families, policies, contributions, payments in their villages.
    EnrolmentOfficer,
    /// Claim administrator: claims and eligibility requests at their facility.
    ClaimAdministrator,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [
        Role::Central,
        Role::Hub,
        Role::EnrolmentOfficer,
        Role::ClaimAdministrator,
    ];

    /// The role's name as written in certificates and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Role::Central => "central",
            Role::Hub => "hub",
            Role::EnrolmentOfficer => "enrolment-officer",
            Role::ClaimAdministrator => "claim-administrator",
        }
    }

    /// Parses a role name.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == s)
    }

    /// The capabilities the role grants (the capability matrix).
    pub fn grants(self) -> &'static [Capability] {
        match self {
            Role::Central => &Capability::ALL,
            Role::Hub => &[Capability::ReportEvidence],
            Role::EnrolmentOfficer => &[
                Capability::WriteInsurees,
                Capability::WritePolicies,
                Capability::WritePayments,
                Capability::ReportEvidence,
            ],
            Role::ClaimAdministrator => &[
                Capability::WriteClaims,
                Capability::RequestEligibility,
                Capability::ReportEvidence,
            ],
        }
    }

    /// Whether the role's writes are limited to its scope (central's are not).
    pub fn scoped(self) -> bool {
        !matches!(self, Role::Central)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What writing a resource type needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Capability {
    /// Patients (insurees) and Groups (families).
    WriteInsurees,
    /// Contracts (policies, with their contributions) and Coverage.
    WritePolicies,
    /// PaymentNotice and Invoice.
    WritePayments,
    /// Claims.
    WriteClaims,
    /// CoverageEligibilityRequest.
    RequestEligibility,
    /// ClaimResponse and CoverageEligibilityResponse (central's adjudication).
    Adjudicate,
    /// Locations, facilities, practitioners, items, services, products, price lists, and the
    /// certificates and revocations themselves.
    AuthorReferenceData,
    /// `AuditEvent`s carrying evidence that a key misbehaved (two different changes under one
    /// sequence number): self-proving, so any certified device may report one.
    ReportEvidence,
}

impl Capability {
    /// Every capability.
    pub const ALL: [Capability; 8] = [
        Capability::WriteInsurees,
        Capability::WritePolicies,
        Capability::WritePayments,
        Capability::WriteClaims,
        Capability::RequestEligibility,
        Capability::Adjudicate,
        Capability::AuthorReferenceData,
        Capability::ReportEvidence,
    ];

    /// The capability writing `ty` needs.
    pub fn for_type(ty: &str) -> Capability {
        match ty {
            "Patient" | "Group" => Capability::WriteInsurees,
            "Contract" | "Coverage" => Capability::WritePolicies,
            "PaymentNotice" | "Invoice" => Capability::WritePayments,
            "Claim" => Capability::WriteClaims,
            "CoverageEligibilityRequest" => Capability::RequestEligibility,
            "ClaimResponse" | "CoverageEligibilityResponse" => Capability::Adjudicate,
            "AuditEvent" => Capability::ReportEvidence,
            _ => Capability::AuthorReferenceData,
        }
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Capability::WriteInsurees => "write insurees and families",
            Capability::WritePolicies => "write policies and contributions",
            Capability::WritePayments => "write payments",
            Capability::WriteClaims => "write claims",
            Capability::RequestEligibility => "request eligibility",
            Capability::Adjudicate => "adjudicate claims",
            Capability::AuthorReferenceData => "author reference data",
            Capability::ReportEvidence => "report evidence",
        })
    }
}

/// The types that name no place of their own and lie where the insurees, families or claims
/// they concern lie (policies, their coverage, payments, adjudications): they carry those
/// places, copied from the family, insuree or claim when the document is written, in
/// [`PLACE_EXTENSION`] extensions.
pub const DEPENDENT_TYPES: [&str; 6] = [
    "Contract",
    "Coverage",
    "PaymentNotice",
    "Invoice",
    "ClaimResponse",
    "CoverageEligibilityResponse",
];

/// Whether a document of type `ty` names places a [`DEPENDENT_TYPES`] document takes on:
/// insurees, families, claims, eligibility requests, and dependent documents themselves.
pub fn places_taken_from(ty: &str) -> bool {
    matches!(
        ty,
        "Patient" | "Group" | "Claim" | "CoverageEligibilityRequest"
    ) || DEPENDENT_TYPES.contains(&ty)
}

/// Pseudo resource type under which the engine indexes the places a document is held at (as
/// reference-index entries `(PLACE_INDEX, "", place)`): the one definition of where a
/// document is, used by authorization ([`places`]) and replication alike.
pub const PLACE_INDEX: &str = "urn:fieldmesh:place";

/// Pseudo resource type of the places a document was held at before it moved (an insuree who
/// changed village): devices of those places may still hold it and are told it left.
pub const LEFT_INDEX: &str = "urn:fieldmesh:left-place";

/// Pseudo resource type of the keys that authored changes of a document (hex): a node serving a
/// document serves the certificates of its authors with it, so that the receiver can check it.
pub const AUTHOR_INDEX: &str = "urn:fieldmesh:author";

/// The place of documents every certified device holds: reference data (locations, facilities,
/// practitioners, products, items, services), certificates, revocations and evidence.
pub const EVERYWHERE: &str = "*";

/// The places a document is held at: its [`places`]; for a location or a facility, itself (by
/// every name it goes by: a node holds the locations of its reach and their ancestors, see the
/// engine's `scope`); [`EVERYWHERE`] for a type that names none (the rest of the reference data:
/// practitioners, products, items, services; revocations, evidence). A document of a placed type
/// that names no place (only central may write one) is held at no place: only by nodes that hold
/// everything.
pub fn holding_places(ty: &str, json: &Map<String, Value>) -> Vec<String> {
    if matches!(ty, "Location" | "Organization") {
        let names = place_names(json);
        if !names.is_empty() {
            return names;
        }
    }
    places(ty, json).unwrap_or_else(|| vec![EVERYWHERE.to_string()])
}

/// The names a location or facility goes by: its id and its identifier values (a certificate
/// and a reference may use either).
pub fn place_names(json: &Map<String, Value>) -> Vec<String> {
    let mut out: Vec<String> = json
        .get("id")
        .and_then(Value::as_str)
        .map(String::from)
        .into_iter()
        .collect();
    for i in json
        .get("identifier")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(v) = i.get("value").and_then(Value::as_str) {
            out.push(v.to_string());
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The places a location or facility lies in: a `Location`'s `partOf`, an `Organization`'s
/// `partOf` and the locations of its addresses (openIMIS gives a health facility its district
/// that way). Empty for other types. A certificate naming a district or ward covers every
/// place below it.
pub fn parent_places(ty: &str, json: &Map<String, Value>) -> Vec<String> {
    const AREA: &[&str] = &["Location", "Organization"];
    let mut out = Vec::new();
    if !matches!(ty, "Location" | "Organization") {
        return out;
    }
    if let Some(r) = json.get("partOf") {
        push_places(r, AREA, &mut out);
    }
    if ty == "Organization" {
        for a in json
            .get("address")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for e in a
                .get("extension")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if e.get("url").and_then(Value::as_str) == Some(LOCATION_EXTENSION)
                    && let Some(r) = e.get("valueReference")
                {
                    push_places(r, AREA, &mut out);
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Extension on a document of a [`DEPENDENT_TYPES`] type naming a place of the family or
/// insuree it concerns (`valueReference`, as in the family's own address). Written by the node
/// that writes the document; every place of it must lie in the author's scope.
pub const PLACE_EXTENSION: &str = "urn:fieldmesh:StructureDefinition/place";

/// The references that name the places of a document of type `ty`, with the resource types a
/// relative reference may name there: the villages of a Patient's or a family's addresses, the
/// facility (`provider`, `facility`) of a Claim or an eligibility request, the declared places
/// of a [`DEPENDENT_TYPES`] document. `None` for types that name no place (reference data:
/// checked by type only). A place extension without a `valueReference` counts as a reference
/// naming nothing.
pub fn place_references<'a>(
    ty: &str,
    json: &'a Map<String, Value>,
) -> Option<Vec<(&'a Value, &'static [&'static str])>> {
    const NOTHING: Value = Value::Null;
    const VILLAGE: &[&str] = &["Location"];
    const FACILITY: &[&str] = &["Organization", "Location"];
    let extensions = |v: &'a Value| {
        v.get("extension")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
    };
    let mut out = Vec::new();
    let mut push_ext = |e: &'a Value, url: &str, types: &'static [&'static str]| {
        if e.get("url").and_then(Value::as_str) == Some(url) {
            out.push((e.get("valueReference").unwrap_or(&NOTHING), types));
        }
    };
    match ty {
        "Patient" | "Group" => {
            let addresses = json
                .get("address")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .chain(
                    json.get("extension")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|e| e.get("valueAddress")),
                );
            for a in addresses {
                for e in extensions(a) {
                    push_ext(e, LOCATION_EXTENSION, VILLAGE);
                }
            }
        }
        "Claim" | "CoverageEligibilityRequest" => {
            for f in ["provider", "facility"] {
                if let Some(r) = json.get(f) {
                    out.push((r, FACILITY));
                }
            }
        }
        t if DEPENDENT_TYPES.contains(&t) => {
            if let Some(ext) = json.get("extension").and_then(Value::as_array) {
                for e in ext {
                    push_ext(e, PLACE_EXTENSION, FACILITY);
                }
            }
        }
        // A facility's price list lies at the facility: its devices and the hub of its area
        // hold it, not every phone.
        "List" => {
            if !claims::is_price_list(json) {
                return None;
            }
            if let Some(r) = json.get("subject") {
                out.push((r, FACILITY));
            }
        }
        // Reference data central writes for some places only (a block of numbers leased to a
        // device lies at the device's places); other `Basic` documents (certificates,
        // revocations) name none.
        "Basic" => {
            let ext = json.get("extension").and_then(Value::as_array)?;
            for e in ext {
                push_ext(e, PLACE_EXTENSION, FACILITY);
            }
            if out.is_empty() {
                return None;
            }
        }
        _ => return None,
    }
    Some(out)
}

/// The place a reference names: the identifier's value, or the id of a relative `<Type>/<id>`
/// of one of `types`. Anything else (an absolute URL whose last segment looks like a code, a
/// reference to another type, a reference naming nothing) is kept whole, so that it is in no
/// certificate's scope. A reference with both names both.
fn push_places(r: &Value, types: &[&str], out: &mut Vec<String>) {
    let mut named = false;
    if let Some(v) = r.pointer("/identifier/value") {
        out.push(v.as_str().map_or_else(|| v.to_string(), String::from));
        named = true;
    }
    // The identity stored for a reference whose client identifier was kept as sent names a
    // place too.
    if let Some(v) = r
        .as_object()
        .and_then(crate::references::stored_target)
        .and_then(|t| t.get("value"))
    {
        out.push(v.as_str().map_or_else(|| v.to_string(), String::from));
        named = true;
    }
    if let Some(s) = r.get("reference") {
        let s = s.as_str().map_or_else(|| s.to_string(), String::from);
        let exact = s.split_once('/').and_then(|(ty, id)| {
            (types.contains(&ty) && !id.is_empty() && !id.contains(['/', '?', '#'])).then_some(id)
        });
        out.push(exact.map_or_else(|| s.clone(), String::from));
        named = true;
    }
    if !named {
        out.push(format!("unresolvable reference {r}"));
    }
}

/// The places a document of type `ty` lies in (see [`place_references`]), sorted and
/// deduplicated: every one must lie in a scoped author's scope. `None` for types that name no
/// place.
pub fn places(ty: &str, json: &Map<String, Value>) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for (r, types) in place_references(ty, json)? {
        push_places(r, types, &mut out);
    }
    out.sort();
    out.dedup();
    Some(out)
}

/// Sets the declared places of a [`DEPENDENT_TYPES`] document to `places` (the `valueReference`s
/// of the family's or insuree's own place extensions), replacing any it carried and keeping
/// every other extension.
pub fn declare_places(json: &mut Map<String, Value>, places: Vec<Value>) {
    let mut ext: Vec<Value> = match json.remove("extension") {
        Some(Value::Array(a)) => a,
        Some(other) => vec![other],
        None => Vec::new(),
    };
    ext.retain(|e| e.get("url").and_then(Value::as_str) != Some(PLACE_EXTENSION));
    // The same place read from JSON in two key orders (a staged document's as written, a stored
    // one's as Automerge keeps it) is one place.
    let mut seen = std::collections::HashSet::new();
    for p in places {
        let mut key = p.clone();
        key.sort_all_objects();
        if seen.insert(key.to_string()) {
            ext.push(serde_json::json!({"url": PLACE_EXTENSION, "valueReference": p}));
        }
    }
    if !ext.is_empty() {
        json.insert("extension".into(), Value::Array(ext));
    }
}

/// The openIMIS policy as a value, for code that takes a deployment's policy as a parameter (the
/// trust decision does).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenImis;
