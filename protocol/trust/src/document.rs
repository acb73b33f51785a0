//! Certificates and revocations as FHIR: each token rides in a `Basic` resource that central
//! authors and signs, and that syncs like any other document.

use serde_json::{Map, Value, json};

use crate::{Certificate, Revocation};

/// Code system of trust documents (`Basic.code`).
pub const TRUST_SYSTEM: &str = "urn:fieldmesh:trust";
/// Identifier system of certificate documents (value: the serial).
pub const CERTIFICATE_SYSTEM: &str = "urn:fieldmesh:certificate";
/// Identifier system of revocation documents (value: the number).
pub const REVOCATION_SYSTEM: &str = "urn:fieldmesh:revocation";
/// Identifier system naming the device key a certificate or revocation is about (value: the key,
/// hex): how a node finds, without reading every certificate, the only trust documents it shows
/// a peer that has no valid certificate (its own).
pub const SUBJECT_SYSTEM: &str = "urn:fieldmesh:subject";
/// Extension holding a trust token.
pub const TOKEN_EXTENSION: &str = "urn:fieldmesh:token";

/// The `Basic` resource that carries a certificate token.
pub fn certificate_resource(token: &str, cert: &Certificate) -> Value {
    trust_resource(
        "certificate",
        CERTIFICATE_SYSTEM,
        &cert.serial,
        &cert.subject,
        token,
    )
}

/// The `Basic` resource that carries a revocation token.
pub fn revocation_resource(token: &str, rev: &Revocation) -> Value {
    trust_resource(
        "revocation",
        REVOCATION_SYSTEM,
        &rev.number.to_string(),
        &rev.subject,
        token,
    )
}

fn trust_resource(code: &str, system: &str, value: &str, subject: &str, token: &str) -> Value {
    json!({
        "resourceType": "Basic",
        "identifier": [{"system": system, "value": value}, {"system": SUBJECT_SYSTEM, "value": subject}],
        "code": {"coding": [{"system": TRUST_SYSTEM, "code": code}]},
        "extension": [{"url": TOKEN_EXTENSION, "valueString": token}],
    })
}

/// The token a trust resource carries, if `json` is one: a certificate or revocation in a
/// `Basic`, or evidence of an equivocation in an `AuditEvent`.
pub fn token_of(json: &Map<String, Value>) -> Option<&str> {
    let url = match json.get("resourceType").and_then(Value::as_str)? {
        "Basic" => TOKEN_EXTENSION,
        "AuditEvent" => crate::evidence::EVIDENCE_EXTENSION,
        _ => return None,
    };
    json.get("extension")?
        .as_array()?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(url))?
        .get("valueString")?
        .as_str()
}
