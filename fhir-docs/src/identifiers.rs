//! Multi-system identifiers.
//!
//! A resource's `identifier[]` accumulates one entry per system that knows it: the node that created
//! it (`urn:fieldmesh:node:<name>` with the document's UUID), central's canonical id once assigned,
//! and openIMIS business identifiers (CHFID, claim code, HF code, …). openIMIS types the latter with
//! a `type.coding` from its identifier code system instead of a `system`, and real payloads use the
//! codes `Code`, `MR` and `SB` interchangeably for business codes; they are normalised here so that
//! `Patient/<CHFID>` and a claim's code reference resolve whichever code the sender used.
//!
//! Every identifier yields one or more [`IdentKey`]s, which the store indexes.

use serde_json::{Map, Value};

/// The openIMIS identifier type code system (`type.coding[].system`).
pub const OPENIMIS_IDENTIFIER_TYPES: &str =
    "https://openimis.github.io/openimis_fhir_r4_ig/CodeSystem/openimis-identifiers";

/// Pseudo-system under which identifiers typed with an openIMIS code are indexed:
/// `openimis-type:Code`, `openimis-type:UUID`, … (a code of `MR` or `SB` is indexed as `Code`).
pub const OPENIMIS_TYPE_PREFIX: &str = "openimis-type:";

/// The identifier system of a node named `name`.
pub fn node_system(name: &str) -> String {
    format!("urn:fieldmesh:node:{name}")
}

/// One indexable identity of a resource: an identifier system (or pseudo-system) and a value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdentKey {
    /// The `identifier.system`, an `openimis-type:<code>` pseudo-system, or `""` when the identifier
    /// has neither (it is then found by value only).
    pub system: String,
    /// The `identifier.value`.
    pub value: String,
}

impl IdentKey {
    /// A key for `system|value`.
    pub fn new(system: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            system: system.into(),
            value: value.into(),
        }
    }

    /// The pseudo-system key of an openIMIS business code (CHFID, claim code, HF code, …).
    pub fn openimis_code(value: impl Into<String>) -> Self {
        Self::new(format!("{OPENIMIS_TYPE_PREFIX}Code"), value)
    }
}

/// Whether `system` names the openIMIS identifier type code system (tolerating the IG's older
/// `CodeSystem-openimis-identifiers` spelling).
pub fn is_openimis_type_system(system: &str) -> bool {
    system.starts_with("https://openimis.github.io/openimis_fhir_r4_ig/CodeSystem")
        && system.ends_with("openimis-identifiers")
}

/// Normalises an openIMIS identifier type code: `MR` (claim code) and `SB` (CHFID) are business
/// codes like `Code`; `DBID` is the IG's name for `ACSN`.
pub fn normalise_type_code(code: &str) -> &str {
    match code {
        "Code" | "code" | "MR" | "SB" => "Code",
        "DBID" => "ACSN",
        other => other,
    }
}

/// The openIMIS type code of an identifier (`Code`, `UUID`, …), normalised, if it has one.
pub fn openimis_type_code(identifier: &Map<String, Value>) -> Option<&str> {
    let codings = identifier.get("type")?.get("coding")?.as_array()?;
    codings.iter().find_map(|c| {
        let system = c.get("system").and_then(Value::as_str).unwrap_or_default();
        let code = c.get("code").and_then(Value::as_str)?;
        (system.is_empty() || is_openimis_type_system(system)).then(|| normalise_type_code(code))
    })
}

/// The index keys of one `identifier` element.
pub fn keys_of_identifier(identifier: &Map<String, Value>) -> Vec<IdentKey> {
    let Some(value) = identifier.get("value").and_then(Value::as_str) else {
        return Vec::new();
    };
    let mut keys = Vec::with_capacity(2);
    let system = identifier.get("system").and_then(Value::as_str);
    keys.push(IdentKey::new(system.unwrap_or_default(), value));
    if let Some(code) = openimis_type_code(identifier) {
        keys.push(IdentKey::new(
            format!("{OPENIMIS_TYPE_PREFIX}{code}"),
            value,
        ));
    }
    keys
}

/// Every identity document `id` goes by: its identifiers ([`identifier_keys`]) and the one of
/// the node that created it (`origin`, the id): what references to it may name, sorted and
/// without duplicates.
pub fn identities(resource: &Map<String, Value>, origin: &str, id: &str) -> Vec<IdentKey> {
    let mut keys = identifier_keys(resource);
    keys.push(IdentKey::new(origin, id));
    keys.sort();
    keys.dedup();
    keys
}

/// Every index key of a resource, from its top-level `identifier[]`, without duplicates.
pub fn identifier_keys(resource: &Map<String, Value>) -> Vec<IdentKey> {
    let mut keys: Vec<IdentKey> = resource
        .get("identifier")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .flat_map(keys_of_identifier)
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Adds `{system, value}` to the resource's `identifier[]` unless an entry with that system and
/// value is already there. Returns whether it was added.
pub fn ensure_identifier(resource: &mut Map<String, Value>, system: &str, value: &str) -> bool {
    let list = resource
        .entry("identifier")
        .or_insert_with(|| Value::Array(Vec::new()));
    let Value::Array(items) = list else {
        return false;
    };
    let present = items.iter().any(|i| {
        i.get("system").and_then(Value::as_str) == Some(system)
            && i.get("value").and_then(Value::as_str) == Some(value)
    });
    if !present {
        let mut entry = Map::new();
        entry.insert("system".into(), Value::String(system.into()));
        entry.insert("value".into(), Value::String(value.into()));
        items.push(Value::Object(entry));
    }
    !present
}

/// A parsed `identifier` search parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentifierQuery {
    /// `identifier=system|value` (with `system` empty for `|value`: identifiers without a system).
    Exact(IdentKey),
    /// `identifier=value`: any system.
    ValueOnly(String),
}

/// Parses the value of a FHIR `identifier` search parameter, or of `identifier:of-type`
/// (`typeSystem|code|value`) when `of_type` is set.
pub fn parse_identifier_query(raw: &str, of_type: bool) -> Option<IdentifierQuery> {
    if of_type {
        let mut parts = raw.splitn(3, '|');
        let (_system, code, value) = (parts.next()?, parts.next()?, parts.next()?);
        if value.is_empty() {
            return None;
        }
        return Some(IdentifierQuery::Exact(IdentKey::new(
            format!("{OPENIMIS_TYPE_PREFIX}{}", normalise_type_code(code)),
            value,
        )));
    }
    match raw.split_once('|') {
        Some((_, "")) => None,
        Some((system, value)) => Some(IdentifierQuery::Exact(IdentKey::new(system, value))),
        None if raw.is_empty() => None,
        None => Some(IdentifierQuery::ValueOnly(raw.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn openimis_codes_are_normalised() {
        let r = json!({"identifier":[
            {"type":{"coding":[{"system":OPENIMIS_IDENTIFIER_TYPES,"code":"MR"}]},"value":"CLM-1"},
            {"type":{"coding":[{"system":"https://openimis.github.io/openimis_fhir_r4_ig/CodeSystem-openimis-identifiers","code":"UUID"}]},"value":"u"},
            {"system":"urn:fieldmesh:node:a","value":"x"}]});
        let keys = identifier_keys(r.as_object().unwrap());
        assert!(keys.contains(&IdentKey::openimis_code("CLM-1")));
        assert!(keys.contains(&IdentKey::new("openimis-type:UUID", "u")));
        assert!(keys.contains(&IdentKey::new("urn:fieldmesh:node:a", "x")));
        assert!(keys.contains(&IdentKey::new("", "CLM-1")));
    }

    #[test]
    fn queries_parse() {
        assert_eq!(
            parse_identifier_query("s|v", false),
            Some(IdentifierQuery::Exact(IdentKey::new("s", "v")))
        );
        assert_eq!(
            parse_identifier_query("v", false),
            Some(IdentifierQuery::ValueOnly("v".into()))
        );
        assert_eq!(
            parse_identifier_query(&format!("{OPENIMIS_IDENTIFIER_TYPES}|SB|123"), true),
            Some(IdentifierQuery::Exact(IdentKey::openimis_code("123")))
        );
        assert_eq!(parse_identifier_query("s|", false), None);
    }
}
