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
/// Extension holding a trust token.
pub const TOKEN_EXTENSION: &str = "urn:fieldmesh:token";

/// The `Basic` resource that carries a certificate token.
pub fn certificate_resource(token: &str, cert: &Certificate) -> Value {
    trust_resource("certificate", CERTIFICATE_SYSTEM, &cert.serial, token)
}

/// The `Basic` resource that carries a revocation token.
pub fn revocation_resource(token: &str, rev: &Revocation) -> Value {
    trust_resource(
        "revocation",
        REVOCATION_SYSTEM,
        &rev.number.to_string(),
        token,
    )
}

fn trust_resource(code: &str, system: &str, value: &str, token: &str) -> Value {
    json!({
        "resourceType": "Basic",
        "identifier": [{"system": system, "value": value}],
        "code": {"coding": [{"system": TRUST_SYSTEM, "code": code}]},
        "extension": [{"url": TOKEN_EXTENSION, "valueString": token}],
    })
}

/// The token a trust resource carries, if `json` is one.
pub fn token_of(json: &Map<String, Value>) -> Option<&str> {
    if json.get("resourceType").and_then(Value::as_str) != Some("Basic") {
        return None;
    }
    json.get("extension")?
        .as_array()?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(TOKEN_EXTENSION))?
        .get("valueString")?
        .as_str()
}
