//! The openIMIS profile: which resource types a node holds, and what makes a payload acceptable.
//!
//! Validation is deliberately lenient where the real openIMIS is (see `FHIR-MAPPING.md`): dateTimes
//! with a time but no timezone, Claims without `insurance`, identifier type codes `Code`/`MR`/`SB`,
//! and extension URLs with doubled slashes or the IG's older hyphenated spellings are all accepted
//! and kept as sent. What is refused is what is not FHIR at all: a value of the wrong JSON type, a
//! malformed date, an unknown resource type, a `null` outside a primitive-extension array, a missing
//! field that openIMIS cannot do without. Every problem names its field and the reason.

use serde_json::{Map, Value};

use crate::error::{Invalid, ValidationError};

/// The canonical URL of the price-list profile: a `List` authored by central whose `subject` is the
/// health facility (`Organization`) and whose entries point at `Medication` (items) and
/// `ActivityDefinition` (services), each entry optionally carrying a price override extension.
pub const PRICE_LIST_PROFILE: &str = "urn:fieldmesh:StructureDefinition/price-list";
/// Extension on a price-list entry: the facility's price for that item or service (`valueMoney`).
pub const PRICE_OVERRIDE_EXTENSION: &str = "urn:fieldmesh:StructureDefinition/price-override";

/// The resource types an openIMIS node holds, with the fields it cannot do without.
pub const RESOURCE_TYPES: &[(&str, &[&str])] = &[
    ("Patient", &["name", "birthDate"]),
    ("Group", &["type", "actual"]),
    ("Contract", &[]),
    ("Coverage", &["status", "beneficiary", "payor"]),
    ("Claim", &["patient", "created", "billablePeriod"]),
    ("ClaimResponse", &["outcome"]),
    ("Organization", &["name"]),
    ("Location", &["name"]),
    ("Practitioner", &[]),
    ("PractitionerRole", &[]),
    ("Medication", &[]),
    ("ActivityDefinition", &["status"]),
    ("InsurancePlan", &[]),
    ("CoverageEligibilityRequest", &["patient"]),
    ("CoverageEligibilityResponse", &["patient"]),
    ("PaymentNotice", &["amount"]),
    ("Invoice", &["status"]),
    ("List", &["status", "mode"]),
    ("Basic", &["code"]),
    ("AuditEvent", &["type", "recorded"]),
];

/// Whether a node holds resources of this type.
pub fn is_supported(ty: &str) -> bool {
    RESOURCE_TYPES.iter().any(|(t, _)| *t == ty)
}

/// Whether `ty` has the shape of a FHIR resource type name (`Patient`, `Encounter`, …); used to
/// recognise relative references to types this node does not hold.
pub fn is_resource_type(ty: &str) -> bool {
    let mut chars = ty.chars();
    chars.next().is_some_and(|c| c.is_ascii_uppercase()) && chars.all(|c| c.is_ascii_alphanumeric())
}

/// Fields holding a FHIR `date` (no time).
const DATE_FIELDS: &[&str] = &["birthDate", "valueDate"];
/// Fields holding a `date` or a `dateTime` (openIMIS also sends dateTimes without a timezone).
const DATETIME_FIELDS: &[&str] = &[
    "created",
    "start",
    "end",
    "date",
    "issued",
    "lastUpdated",
    "recorded",
    "deceasedDateTime",
    "valueDateTime",
    "servicedDate",
    "effectiveDateTime",
    "occurrenceDateTime",
    "paymentDate",
];
/// Fields holding a boolean.
const BOOL_FIELDS: &[&str] = &[
    "active",
    "actual",
    "valueBoolean",
    "deceasedBoolean",
    "multipleBirthBoolean",
    "experimental",
    "preferred",
];
/// Fields holding a JSON number.
const NUMBER_FIELDS: &[&str] = &[
    "valueDecimal",
    "valueInteger",
    "valueUnsignedInt",
    "valuePositiveInt",
    "sequence",
    "factor",
    "quantity_value",
];
/// Datatypes (by field name) whose `value` must be a number: Money, Quantity and friends.
const QUANTITY_FIELDS: &[&str] = &[
    "unitPrice",
    "net",
    "amount",
    "total",
    "quantity",
    "valueMoney",
    "valueQuantity",
    "numerator",
    "denominator",
    "benefit",
    "limit",
];

/// Checks that `resource` is a FHIR resource this node accepts. `expected_type`, when given, is the
/// type named by the URL the resource was sent to.
pub fn validate(resource: &Value, expected_type: Option<&str>) -> Result<(), ValidationError> {
    let Some(obj) = resource.as_object() else {
        return Err(ValidationError::one(
            "(root)",
            "a FHIR resource must be a JSON object",
        ));
    };
    let ty = match obj.get("resourceType") {
        Some(Value::String(t)) => t.as_str(),
        Some(_) => return Err(ValidationError::one("resourceType", "must be a string")),
        None => {
            return Err(ValidationError::one(
                "resourceType",
                "is missing: every FHIR resource names its type",
            ));
        }
    };
    if let Some(expected) = expected_type
        && expected != ty
    {
        return Err(ValidationError::one(
            "resourceType",
            format!("is {ty:?} but the request is for {expected:?}"),
        ));
    }
    let Some((_, required)) = RESOURCE_TYPES.iter().find(|(t, _)| *t == ty) else {
        return Err(ValidationError::one(
            "resourceType",
            format!(
                "{ty:?} is not a resource type this node holds (it holds {})",
                RESOURCE_TYPES
                    .iter()
                    .map(|(t, _)| *t)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    };
    let mut problems = Vec::new();
    for field in *required {
        if !obj.contains_key(*field) {
            problems.push(Invalid {
                path: format!("{ty}.{field}"),
                reason: "is required by the openIMIS profile".into(),
            });
        }
    }
    if let Some(id) = obj.get("id") {
        match id.as_str() {
            Some(s) if is_valid_id(s) => {}
            _ => problems.push(Invalid {
                path: format!("{ty}.id"),
                reason: "must be 1–64 characters of A–Z, a–z, 0–9, '-' and '.'".into(),
            }),
        }
    }
    check_type_rules(ty, obj, &mut problems);
    for (key, value) in obj {
        check_element(&format!("{ty}.{key}"), key, value, &mut problems);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ValidationError(problems))
    }
}

fn check_type_rules(ty: &str, obj: &Map<String, Value>, problems: &mut Vec<Invalid>) {
    if ty == "Patient" {
        if let Some(g) = obj.get("gender")
            && !matches!(g.as_str(), Some("male" | "female" | "other" | "unknown"))
        {
            problems.push(Invalid {
                path: "Patient.gender".into(),
                reason: "must be one of male, female, other, unknown".into(),
            });
        }
        if let Some(names) = obj.get("name").and_then(Value::as_array) {
            for (i, n) in names.iter().enumerate() {
                if n.get("family").is_none() && n.get("given").is_none() && n.get("text").is_none()
                {
                    problems.push(Invalid {
                        path: format!("Patient.name[{i}]"),
                        reason: "needs a family name, given names or a text".into(),
                    });
                }
            }
        }
    }
}

/// Whether `s` is a valid FHIR `id`.
pub fn is_valid_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn check_element(path: &str, key: &str, value: &Value, problems: &mut Vec<Invalid>) {
    let mut bad = |reason: &str| {
        problems.push(Invalid {
            path: path.to_string(),
            reason: reason.to_string(),
        })
    };
    if !is_element_name(key) {
        bad("is not a FHIR element name");
        return;
    }
    match value {
        Value::Null => {
            bad("is null; FHIR leaves out empty elements instead");
            return;
        }
        Value::String(s) if s.is_empty() => bad("is an empty string; leave the element out"),
        Value::Object(m) if m.is_empty() => bad("is an empty object; leave the element out"),
        Value::Array(a) if a.is_empty() => bad("is an empty array; leave the element out"),
        _ => {}
    }
    // Primitive extensions (`_given`) may hold nulls inside their arrays.
    let nulls_allowed = key.starts_with('_');
    let scalar_check = |v: &Value, problems: &mut Vec<Invalid>, p: &str| {
        let reason = if DATE_FIELDS.contains(&key) {
            match v.as_str() {
                Some(s) if is_date(s) => None,
                _ => Some("must be a date: YYYY, YYYY-MM or YYYY-MM-DD"),
            }
        } else if DATETIME_FIELDS.contains(&key) {
            match v.as_str() {
                Some(s) if is_datetime(s) => None,
                _ => {
                    Some("must be a date or dateTime (YYYY-MM-DD or YYYY-MM-DDThh:mm:ss[Z|±hh:mm])")
                }
            }
        } else if BOOL_FIELDS.contains(&key) {
            (!v.is_boolean()).then_some("must be true or false")
        } else if NUMBER_FIELDS.contains(&key) {
            (!v.is_number()).then_some("must be a number")
        } else {
            None
        };
        if let Some(reason) = reason {
            problems.push(Invalid {
                path: p.to_string(),
                reason: reason.to_string(),
            });
        }
    };
    match value {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let p = format!("{path}[{i}]");
                match item {
                    Value::Null if nulls_allowed => {}
                    Value::Null => problems.push(Invalid {
                        path: p,
                        reason: "is null; only primitive-extension arrays (`_name`) may hold nulls"
                            .into(),
                    }),
                    Value::Object(m) => check_object(&p, key, m, problems),
                    Value::Array(_) => problems.push(Invalid {
                        path: p,
                        reason: "is an array inside an array, which FHIR JSON never has".into(),
                    }),
                    v => scalar_check(v, problems, &p),
                }
            }
        }
        Value::Object(m) => check_object(path, key, m, problems),
        v => scalar_check(v, problems, path),
    }
}

fn check_object(path: &str, key: &str, m: &Map<String, Value>, problems: &mut Vec<Invalid>) {
    if key == "extension" || key == "modifierExtension" {
        match m.get("url") {
            Some(Value::String(u)) if !u.is_empty() => {}
            _ => problems.push(Invalid {
                path: format!("{path}.url"),
                reason: "every extension needs a url".into(),
            }),
        }
    }
    if key == "identifier" && m.get("value").is_some_and(|v| !v.is_string()) {
        problems.push(Invalid {
            path: format!("{path}.value"),
            reason: "an identifier value must be a string".into(),
        });
    }
    if key == "contained" {
        match m.get("resourceType").and_then(Value::as_str) {
            Some(t) if is_resource_type(t) => {}
            _ => problems.push(Invalid {
                path: format!("{path}.resourceType"),
                reason: "a contained resource must name its type".into(),
            }),
        }
    }
    if QUANTITY_FIELDS.contains(&key)
        && let Some(v) = m.get("value")
        && (v.is_string() || v.is_boolean())
    {
        problems.push(Invalid {
            path: format!("{path}.value"),
            reason: "must be a number".into(),
        });
    }
    // `reference` is a string in a Reference; a few elements are named `reference` and hold
    // References themselves (Contract.term.offer.party.reference), so only scalars are checked.
    if m.get("reference")
        .is_some_and(|r| r.is_number() || r.is_boolean())
    {
        problems.push(Invalid {
            path: format!("{path}.reference"),
            reason: "a reference must be a string".into(),
        });
    }
    for (k, v) in m {
        if key == "contained" && k == "resourceType" {
            continue;
        }
        check_element(&format!("{path}.{k}"), k, v, problems);
    }
}

fn is_element_name(key: &str) -> bool {
    let body = key.strip_prefix('_').unwrap_or(key);
    let mut chars = body.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn digits(s: &str, n: usize) -> bool {
    s.len() == n && s.bytes().all(|b| b.is_ascii_digit())
}

/// Whether `s` is a FHIR `date` (`YYYY`, `YYYY-MM` or `YYYY-MM-DD`, with month 1–12, day 1–31).
pub fn is_date(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    match parts.as_slice() {
        [y] => digits(y, 4),
        [y, m] => digits(y, 4) && digits(m, 2) && in_range(m, 1, 12),
        [y, m, d] => {
            digits(y, 4) && digits(m, 2) && digits(d, 2) && in_range(m, 1, 12) && in_range(d, 1, 31)
        }
        _ => false,
    }
}

fn in_range(s: &str, lo: u32, hi: u32) -> bool {
    s.parse::<u32>().is_ok_and(|v| (lo..=hi).contains(&v))
}

/// Whether `s` is a FHIR `date` or `dateTime`; a time without a timezone is accepted because the
/// real openIMIS sends and accepts it.
pub fn is_datetime(s: &str) -> bool {
    let Some((date, time)) = s.split_once('T') else {
        return is_date(s);
    };
    if date.len() != 10 || !is_date(date) {
        return false;
    }
    let (clock, zone) = match time.find(['Z', '+', '-']) {
        Some(i) => time.split_at(i),
        None => (time, ""),
    };
    let clock_ok = {
        let (hms, frac) = clock.split_once('.').unwrap_or((clock, "0"));
        let p: Vec<&str> = hms.split(':').collect();
        p.len() == 3
            && p.iter().all(|x| digits(x, 2))
            && in_range(p[0], 0, 23)
            && in_range(p[1], 0, 59)
            && in_range(p[2], 0, 60)
            && !frac.is_empty()
            && frac.bytes().all(|b| b.is_ascii_digit())
    };
    let zone_ok = match zone {
        "" | "Z" => true,
        z => {
            let body = &z[1..];
            body.split_once(':')
                .is_some_and(|(h, m)| digits(h, 2) && digits(m, 2) && in_range(h, 0, 14))
        }
    };
    clock_ok && zone_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dates() {
        for ok in ["2020", "2020-02", "2020-02-29"] {
            assert!(is_date(ok), "{ok}");
        }
        for bad in ["20", "2020-13", "2020-1-1", "2020-02-32", "", "2020-02-02T"] {
            assert!(!is_date(bad), "{bad}");
        }
        for ok in [
            "2020-01-01T00:00:00",
            "2020-01-01T10:11:12.123Z",
            "2020-01-01T10:11:12+03:00",
            "2021",
        ] {
            assert!(is_datetime(ok), "{ok}");
        }
        for bad in [
            "2020-01-01T25:00:00",
            "2020-01-01T10:11",
            "2020-01-01T10:11:12+3",
        ] {
            assert!(!is_datetime(bad), "{bad}");
        }
    }

    fn reasons(v: Value) -> Vec<String> {
        match validate(&v, None) {
            Ok(()) => vec![],
            Err(e) => e.0.into_iter().map(|i| i.path).collect(),
        }
    }

    #[test]
    fn rejections_name_the_field() {
        assert_eq!(
            reasons(json!({"resourceType":"Patient","name":[{"family":"A"}]})),
            ["Patient.birthDate"]
        );
        assert_eq!(
            reasons(
                json!({"resourceType":"Patient","name":[{"family":"A"}],"birthDate":"1990-13-01"})
            ),
            ["Patient.birthDate"]
        );
        assert_eq!(
            reasons(
                json!({"resourceType":"Patient","name":[{"family":"A"}],"birthDate":"1990","gender":"M"})
            ),
            ["Patient.gender"]
        );
        assert_eq!(
            reasons(
                json!({"resourceType":"Claim","patient":{"reference":"Patient/1"},"created":"2020-01-01",
                "billablePeriod":{"start":"2020-01-01"},"item":[{"unitPrice":{"value":"12"}}]})
            ),
            ["Claim.item[0].unitPrice.value"]
        );
        assert_eq!(
            reasons(json!({"resourceType":"Spaceship"})),
            ["resourceType"]
        );
        assert_eq!(
            reasons(
                json!({"resourceType":"Location","name":"x","extension":[{"valueString":"a"}]})
            ),
            ["Location.extension[0].url"]
        );
        assert!(validate(&json!([1]), None).is_err());
    }

    #[test]
    fn openimis_quirks_are_accepted() {
        let v = json!({"resourceType":"Patient","name":[{"family":"Maïga","given":["Zoé"]}],"birthDate":"1990-01-01",
            "_birthDate": {"extension":[{"url":"x","valueString":"y"}]},
            "name_extra_is_fine": "x",
            "extension":[{"url":"https://openimis.github.io/openimis_fhir_r4_ig/StructureDefinition-patient-is-head","valueBoolean":true}],
            "meta":{"lastUpdated":"2020-01-01T00:00:00"}});
        assert_eq!(validate(&v, Some("Patient")), Ok(()));
        assert!(validate(&v, Some("Claim")).is_err());
    }
}
