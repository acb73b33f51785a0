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

pub mod demo;

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
    /// A health-facility or district hub: relays, authors nothing.
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
            Role::Hub => &[],
            Role::EnrolmentOfficer => &[
                Capability::WriteInsurees,
                Capability::WritePolicies,
                Capability::WritePayments,
            ],
            Role::ClaimAdministrator => &[Capability::WriteClaims, Capability::RequestEligibility],
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
}

impl Capability {
    /// Every capability.
    pub const ALL: [Capability; 7] = [
        Capability::WriteInsurees,
        Capability::WritePolicies,
        Capability::WritePayments,
        Capability::WriteClaims,
        Capability::RequestEligibility,
        Capability::Adjudicate,
        Capability::AuthorReferenceData,
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
        })
    }
}

/// The places a document of type `ty` lies in, as the identifier values (UUIDs or openIMIS codes)
/// its place references carry: the villages of a Patient's or a family's addresses, the facility
/// (`provider`, `facility`) of a Claim or an eligibility request. `None` for types that name no
/// place (policies, payments: checked by type only).
pub fn places(ty: &str, json: &Map<String, Value>) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut push_ref = |r: &Value| {
        if let Some(v) = r.pointer("/identifier/value").and_then(Value::as_str) {
            out.push(v.to_string());
        }
        if let Some(s) = r.get("reference").and_then(Value::as_str)
            && let Some((_, id)) = s.rsplit_once('/')
        {
            out.push(id.to_string());
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
                for e in a
                    .get("extension")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if e.get("url").and_then(Value::as_str) == Some(LOCATION_EXTENSION)
                        && let Some(r) = e.get("valueReference")
                    {
                        push_ref(r);
                    }
                }
            }
        }
        "Claim" | "CoverageEligibilityRequest" => {
            for f in ["provider", "facility"] {
                if let Some(r) = json.get(f) {
                    push_ref(r);
                }
            }
        }
        _ => return None,
    }
    out.sort();
    out.dedup();
    Some(out)
}

/// The openIMIS policy as a value, for code that takes a deployment's policy as a parameter (the
/// trust decision does).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenImis;
