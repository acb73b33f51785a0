//! Flags central puts on a resource for the person who entered it: a business number used
//! twice, a number that fails the deployment's rule, a person registered twice, a receipt used
//! twice within a product.
//!
//! A flag is an extension on the resource itself, so it syncs back to the device that wrote the
//! resource with the next session and an app shows it with the resource:
//!
//! ```json
//! {"url": "urn:fieldmesh:StructureDefinition/flag", "extension": [
//!   {"url": "code", "valueCode": "number-taken"},
//!   {"url": "reason", "valueString": "insurance number 100000016 was registered first for …"},
//!   {"url": "other", "valueReference": {"type": "Patient", "identifier": {…}}},
//!   {"url": "value", "valueString": "100000016"}]}
//! ```
//!
//! The engine indexes flagged resources (reference-index entries under [`FLAG_INDEX`], by code),
//! so a node lists its flagged resources on `/status` without reading documents.

use serde_json::{Map, Value, json};

/// The flag extension's URL.
pub const FLAG_EXTENSION: &str = "urn:fieldmesh:StructureDefinition/flag";

/// Pseudo resource type under which the engine indexes flagged resources (as reference-index
/// entries `(FLAG_INDEX, "", code)`).
pub const FLAG_INDEX: &str = "urn:fieldmesh:flag";

/// What a flag says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FlagCode {
    /// This resource's business number was registered first for another resource: it needs a
    /// new number (the later registration is the one flagged).
    NumberTaken,
    /// A later registration used this resource's number too (it was flagged); nothing to do
    /// here but know it.
    NumberReused,
    /// The business number fails the deployment's rule (length, check digit).
    NumberInvalid,
    /// This person was registered before: the resource is linked `replaced-by` the earlier
    /// registration (`Patient.link`).
    DuplicatePerson,
    /// A contribution of this policy carries a receipt another policy of the same product
    /// carried first (openIMIS: a receipt is unique within a product).
    ReceiptTaken,
}

impl FlagCode {
    /// Every code.
    pub const ALL: [FlagCode; 5] = [
        FlagCode::NumberTaken,
        FlagCode::NumberReused,
        FlagCode::NumberInvalid,
        FlagCode::DuplicatePerson,
        FlagCode::ReceiptTaken,
    ];

    /// The code as written in the flag.
    pub fn name(self) -> &'static str {
        match self {
            FlagCode::NumberTaken => "number-taken",
            FlagCode::NumberReused => "number-reused",
            FlagCode::NumberInvalid => "number-invalid",
            FlagCode::DuplicatePerson => "duplicate-person",
            FlagCode::ReceiptTaken => "receipt-taken",
        }
    }

    /// Parses a code.
    pub fn parse(s: &str) -> Option<FlagCode> {
        FlagCode::ALL.into_iter().find(|c| c.name() == s)
    }
}

/// One flag on a resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Flag {
    /// What it says.
    pub code: FlagCode,
    /// Why, for a person.
    pub reason: String,
    /// The other resource concerned, as a logical reference, if any.
    pub other: Option<Value>,
    /// The value concerned (the business number), if any.
    pub value: Option<String>,
}

impl Flag {
    fn to_json(&self) -> Value {
        let mut ext = vec![
            json!({"url": "code", "valueCode": self.code.name()}),
            json!({"url": "reason", "valueString": self.reason}),
        ];
        if let Some(o) = &self.other {
            ext.push(json!({"url": "other", "valueReference": o}));
        }
        if let Some(v) = &self.value {
            ext.push(json!({"url": "value", "valueString": v}));
        }
        json!({"url": FLAG_EXTENSION, "extension": ext})
    }

    fn from_json(e: &Value) -> Option<Flag> {
        if e.get("url").and_then(Value::as_str) != Some(FLAG_EXTENSION) {
            return None;
        }
        let subs = e.get("extension")?.as_array()?;
        let sub = |url: &str| {
            subs.iter()
                .find(|s| s.get("url").and_then(Value::as_str) == Some(url))
        };
        Some(Flag {
            code: FlagCode::parse(sub("code")?.get("valueCode")?.as_str()?)?,
            reason: sub("reason")
                .and_then(|s| s.get("valueString"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            other: sub("other").and_then(|s| s.get("valueReference")).cloned(),
            value: sub("value")
                .and_then(|s| s.get("valueString"))
                .and_then(Value::as_str)
                .map(String::from),
        })
    }
}

/// The flags a resource carries.
pub fn flags_of(json: &Map<String, Value>) -> Vec<Flag> {
    json.get("extension")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Flag::from_json)
        .collect()
}

/// Sets the resource's flags to `flags` (sorted by code), keeping every other extension.
/// Returns whether anything changed.
pub fn set_flags(json: &mut Map<String, Value>, mut flags: Vec<Flag>) -> bool {
    flags.sort_by(|a, b| (a.code, &a.reason).cmp(&(b.code, &b.reason)));
    flags.dedup();
    if flags_of(json) == flags {
        return false;
    }
    let mut ext: Vec<Value> = match json.remove("extension") {
        Some(Value::Array(a)) => a,
        Some(other) => vec![other],
        None => Vec::new(),
    };
    ext.retain(|e| e.get("url").and_then(Value::as_str) != Some(FLAG_EXTENSION));
    ext.extend(flags.iter().map(Flag::to_json));
    if !ext.is_empty() {
        json.insert("extension".into(), Value::Array(ext));
    }
    true
}

/// The index entries of a resource's flags (one per code).
pub fn flag_entries(json: &Map<String, Value>) -> Vec<(String, String, String)> {
    let mut out: Vec<(String, String, String)> = flags_of(json)
        .into_iter()
        .map(|f| {
            (
                FLAG_INDEX.to_string(),
                String::new(),
                f.code.name().to_string(),
            )
        })
        .collect();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_round_trip_and_keep_other_extensions() {
        let mut r =
            json!({"resourceType": "Patient", "extension": [{"url": "x", "valueBoolean": true}]})
                .as_object()
                .cloned()
                .unwrap_or_default();
        let f = Flag {
            code: FlagCode::NumberTaken,
            reason: "taken".into(),
            other: Some(json!({"type": "Patient", "identifier": {"system": "s", "value": "v"}})),
            value: Some("100000004".into()),
        };
        assert!(set_flags(&mut r, vec![f.clone()]));
        assert!(!set_flags(&mut r, vec![f.clone()]));
        assert_eq!(flags_of(&r), vec![f]);
        assert_eq!(flag_entries(&r).len(), 1);
        assert!(set_flags(&mut r, vec![]));
        assert_eq!(r["extension"], json!([{"url": "x", "valueBoolean": true}]));
    }
}
