//! The write and read paths of a resource.
//!
//! Write: [`prepare`] validates a client's resource, drops what the node owns (`id`,
//! `meta.versionId`, `meta.lastUpdated`), makes sure the resource carries the identifier of the node
//! that created it, and translates references to logical ones. Read: [`render`] puts back the local
//! `id`, a `meta.versionId` derived from the document's heads, and literal references.

use std::fmt;

use automerge::{ActorId, ChangeHash, ReadDoc};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::ValidationError;
use crate::identifiers::{IdentKey, ensure_identifier, identifier_keys};
use crate::profile::validate;
use crate::references::{RefTarget, Resolver, render as render_refs, targets_in, to_logical};

/// The id of a document: a UUID made where the resource was first created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DocId(pub uuid::Uuid);

impl DocId {
    /// A fresh random id.
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4())
    }

    /// Parses the hyphenated form.
    pub fn parse(s: &str) -> Option<Self> {
        uuid::Uuid::parse_str(s).ok().map(Self)
    }

    /// The 16 bytes of the UUID.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl Default for DocId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// The Automerge actor id of a node: its ed25519 public key, so every change names its author.
pub fn actor_for_key(public_key: &[u8; 32]) -> ActorId {
    ActorId::from(&public_key[..])
}

/// A resource ready to be stored.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Its resource type.
    pub ty: String,
    /// The JSON to store as the document root.
    pub json: Map<String, Value>,
    /// Every identity of the resource, for the identifier index.
    pub identifiers: Vec<IdentKey>,
    /// Every resource it points at, for the reference index.
    pub references: Vec<RefTarget>,
}

/// Validates and prepares a client's resource for storage.
///
/// `origin_system` is the identifier system of the node that created (or is creating) the document,
/// `id` its document id; `fallback_system` is used for references to UUIDs not (yet) known here.
pub fn prepare(
    resource: Value,
    expected_type: Option<&str>,
    origin_system: &str,
    id: &DocId,
    resolver: &dyn Resolver,
    bundle_ids: &dyn Fn(&str) -> Option<(String, String)>,
) -> Result<Prepared, ValidationError> {
    let mut resource = resource;
    normalise_quirks(&mut resource);
    validate(&resource, expected_type)?;
    to_logical(&mut resource, resolver, origin_system, bundle_ids);
    let Value::Object(mut json) = resource else {
        return Err(ValidationError::one("(root)", "must be a JSON object"));
    };
    json.remove("id");
    if let Some(Value::Object(meta)) = json.get_mut("meta") {
        meta.remove("versionId");
        meta.remove("lastUpdated");
        if meta.is_empty() {
            json.remove("meta");
        }
    }
    ensure_identifier(&mut json, origin_system, &id.to_string());
    let ty = json
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    // Index entries come from the whole resulting document, whichever form each reference was
    // sent in (a literal one translated here, or a logical one as the node served it).
    let references = targets_in(&json);
    Ok(Prepared {
        identifiers: identifier_keys(&json),
        ty,
        json,
        references,
    })
}

/// Turns what openIMIS accepts but FHIR does not into valid FHIR before validation: its own
/// tests post `Group.actual` as the string `"True"` (Django reads it as a boolean); it is
/// stored as the boolean it means.
pub fn normalise_quirks(resource: &mut Value) {
    if resource.get("resourceType").and_then(Value::as_str) == Some("Group")
        && let Some(actual) = resource.get_mut("actual")
        && let Some(text) = actual.as_str()
    {
        match text.to_ascii_lowercase().as_str() {
            "true" => *actual = Value::Bool(true),
            "false" => *actual = Value::Bool(false),
            _ => {}
        }
    }
}

/// Renders a stored resource for a client of this node.
pub fn render(
    mut stored: Map<String, Value>,
    local_id: &str,
    version_id: &str,
    last_updated: Option<&str>,
    resolver: &dyn Resolver,
) -> Value {
    let mut out = Map::with_capacity(stored.len() + 2);
    if let Some(rt) = stored.remove("resourceType") {
        out.insert("resourceType".into(), rt);
    }
    out.insert("id".into(), Value::String(local_id.into()));
    let mut meta = match stored.remove("meta") {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    meta.insert("versionId".into(), Value::String(version_id.into()));
    if let Some(t) = last_updated {
        meta.insert("lastUpdated".into(), Value::String(t.into()));
    }
    out.insert("meta".into(), Value::Object(meta));
    out.extend(stored);
    let mut value = Value::Object(out);
    render_refs(&mut value, resolver);
    value
}

/// A short, stable version id for a set of heads (used for `meta.versionId` and ETags): the first
/// 16 hex digits of SHA-256 over the sorted heads.
pub fn version_id(heads: &[ChangeHash]) -> String {
    let mut sorted: Vec<&ChangeHash> = heads.iter().collect();
    sorted.sort();
    let mut h = Sha256::new();
    for head in sorted {
        h.update(head.0);
    }
    hex::encode(&h.finalize()[..8])
}

/// Formats a Unix time (seconds) as a FHIR instant in UTC.
pub fn format_instant(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (H. Hinnant), valid for the whole i64 day range we can meet.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A field whose value was set concurrently on different replicas.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    /// Where, for example `name[0].family`.
    pub path: String,
    /// The value every replica shows (the deterministic winner).
    pub winner: Value,
    /// Every concurrent value, the winner included.
    pub values: Vec<Value>,
}

/// Every field that holds concurrent values, with all of them.
pub fn conflicts(doc: &impl ReadDoc) -> Vec<Conflict> {
    let mut out = Vec::new();
    collect_conflicts(doc, &automerge::ROOT, String::new(), &mut out);
    out
}

fn value_json(doc: &impl ReadDoc, v: &automerge::Value<'_>, id: &automerge::ObjId) -> Value {
    match v {
        automerge::Value::Scalar(s) => crate::convert::scalar_to_json(s).unwrap_or(Value::Null),
        automerge::Value::Object(ty) => {
            crate::convert::read_object(doc, id, *ty).unwrap_or(Value::Null)
        }
    }
}

fn collect_conflicts(
    doc: &impl ReadDoc,
    obj: &automerge::ObjId,
    path: String,
    out: &mut Vec<Conflict>,
) {
    if path.matches(['.', '[']).count() > crate::convert::MAX_DEPTH {
        return;
    }
    let props: Vec<(automerge::Prop, String)> = match doc.object_type(obj) {
        Ok(automerge::ObjType::List) => (0..doc.length(obj))
            .map(|i| (i.into(), format!("{path}[{i}]")))
            .collect(),
        Ok(_) => doc
            .map_range(obj, ..)
            .map(|item| {
                let key = item.key.to_string();
                let p = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                (key.into(), p)
            })
            .collect(),
        Err(_) => return,
    };
    for (prop, p) in props {
        let Ok(all) = doc.get_all(obj, prop.clone()) else {
            continue;
        };
        if all.len() > 1 {
            let values = all.iter().map(|(v, id)| value_json(doc, v, id)).collect();
            let winner = match doc.get(obj, prop.clone()) {
                Ok(Some((v, id))) => value_json(doc, &v, &id),
                _ => Value::Null,
            };
            out.push(Conflict {
                path: p.clone(),
                winner,
                values,
            });
        }
        if let Ok(Some((automerge::Value::Object(_), child))) = doc.get(obj, prop) {
            collect_conflicts(doc, &child, p, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants() {
        assert_eq!(format_instant(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_instant(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(format_instant(951_782_400), "2000-02-29T00:00:00Z");
    }
}
