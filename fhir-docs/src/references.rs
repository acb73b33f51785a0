//! Logical references.
//!
//! Documents store references as `{type, identifier}`: an id like `Patient/7f3…` means something only
//! on the node that made it, an identifier means the same everywhere. On write, a literal reference
//! (`"reference": "Patient/<local id>"`, or openIMIS's `Patient/<CHFID>`) is translated to a logical
//! one through a [`Resolver`]; on read, each logical reference that resolves on this node gets back
//! a `reference` of `<Type>/<local id>`, so clients see ids that work on the node they talk to.
//!
//! A reference that already carries an `identifier` (openIMIS writes `{reference, type,
//! identifier: {type, value}, display}`) keeps it exactly as sent: the identity this node stores
//! for it goes in a [`TARGET_EXTENSION`] on the reference instead, which reads drop again once
//! the reference resolves. Translating ids never drops what a client sent.

use serde_json::{Map, Value};

use crate::identifiers::{IdentKey, OPENIMIS_IDENTIFIER_TYPES, keys_of_identifier};
use crate::profile::is_resource_type;

/// Extension on a reference holding the identity (`valueIdentifier` with `system` and
/// `value`) stored for it when the client's own `identifier` is kept as sent.
pub const TARGET_EXTENSION: &str = "urn:fieldmesh:StructureDefinition/reference-target";

/// What reference translation needs to know about the node's store.
pub trait Resolver {
    /// The identity under which references to the local resource `<ty>/<id>` are stored, if `id`
    /// is the local id of a resource of that type on this node.
    fn local(&self, ty: &str, id: &str) -> Option<IdentKey>;
    /// The local id of the resource of type `ty` that carries the identifier `key`, if any.
    fn find(&self, ty: &str, key: &IdentKey) -> Option<String>;
}

/// Which of the documents carrying an identifier a reference to it means: the document whose own
/// id is the identifier's value (a UUID names one document everywhere, whatever identifiers
/// other documents claim), else the only one. Several others (a business number registered
/// twice) mean none: a duplicate never redirects a reference, it leaves it unresolved until
/// central settles which registration stands.
pub fn pick_target(ids: &[crate::DocId], value: &str) -> Option<crate::DocId> {
    if let Ok(u) = uuid::Uuid::parse_str(value)
        && let Some(own) = ids.iter().find(|d| d.0 == u)
    {
        return Some(*own);
    }
    match ids {
        [one] => Some(*one),
        _ => None,
    }
}

/// The logical target of a translated reference.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RefTarget {
    /// Target resource type.
    pub ty: String,
    /// Target identity.
    pub key: IdentKey,
}

/// Decides the identity stored for a literal reference `<ty>/<id>`: the local resource's identity
/// if `id` is a local id; otherwise, when `id` is a UUID, the identity that resource will have once
/// it arrives here under that id (`fallback_system`); otherwise an openIMIS business code (CHFID,
/// HF code, …), which is how the openIMIS claims app refers to resources.
fn logical_for(
    resolver: &dyn Resolver,
    ty: &str,
    id: &str,
    fallback_system: &str,
) -> Map<String, Value> {
    let mut ident = Map::new();
    if let Some(key) = resolver.local(ty, id) {
        ident.insert("system".into(), Value::String(key.system));
        ident.insert("value".into(), Value::String(key.value));
    } else if uuid::Uuid::parse_str(id).is_ok() {
        ident.insert("system".into(), Value::String(fallback_system.into()));
        ident.insert("value".into(), Value::String(id.into()));
    } else {
        ident.insert(
            "type".into(),
            serde_json::json!({"coding": [{"system": OPENIMIS_IDENTIFIER_TYPES, "code": "Code"}]}),
        );
        ident.insert("value".into(), Value::String(id.into()));
    }
    ident
}

/// Splits a relative literal reference `Type/id` (also `Type/id/_history/v`).
fn split_literal(reference: &str) -> Option<(&str, &str)> {
    let (ty, rest) = reference.split_once('/')?;
    let id = rest.split('/').next()?;
    (is_resource_type(ty) && !id.is_empty()).then_some((ty, id))
}

/// Translates every literal relative reference in `value` (at any depth, `contained` included) to a
/// logical reference. `bundle_ids` maps bundle-local `urn:uuid:` full URLs to `(type, local id)`.
/// Absolute URLs and `#contained` references are kept as they are.
pub fn to_logical(
    value: &mut Value,
    resolver: &dyn Resolver,
    fallback_system: &str,
    bundle_ids: &dyn Fn(&str) -> Option<(String, String)>,
) {
    walk_mut(value, &mut |obj| {
        let Some(reference) = obj.get("reference").and_then(Value::as_str) else {
            return;
        };
        let (ty, id) = if let Some(found) = bundle_ids(reference) {
            found
        } else if let Some((ty, id)) = split_literal(reference) {
            (ty.to_string(), id.to_string())
        } else {
            return;
        };
        let ident = logical_for(resolver, &ty, &id, fallback_system);
        obj.remove("reference");
        obj.insert("type".into(), Value::String(ty));
        if obj.get("identifier").is_some_and(Value::is_object) {
            set_target(obj, ident);
        } else {
            obj.insert("identifier".into(), Value::Object(ident));
        }
    });
}

/// Records `ident` as the identity of the reference `obj` in a [`TARGET_EXTENSION`], replacing
/// any it had and keeping every other extension.
fn set_target(obj: &mut Map<String, Value>, ident: Map<String, Value>) {
    let mut ext: Vec<Value> = match obj.remove("extension") {
        Some(Value::Array(a)) => a,
        Some(other) => vec![other],
        None => Vec::new(),
    };
    ext.retain(|e| e.get("url").and_then(Value::as_str) != Some(TARGET_EXTENSION));
    ext.push(serde_json::json!({"url": TARGET_EXTENSION, "valueIdentifier": ident}));
    obj.insert("extension".into(), Value::Array(ext));
}

/// The identity stored in a reference's [`TARGET_EXTENSION`], if it has one.
pub fn stored_target(obj: &Map<String, Value>) -> Option<&Map<String, Value>> {
    obj.get("extension")?
        .as_array()?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(TARGET_EXTENSION))?
        .get("valueIdentifier")?
        .as_object()
}

/// Drops the [`TARGET_EXTENSION`] of a reference (and `extension` if nothing else is left).
fn drop_target(obj: &mut Map<String, Value>) {
    let Some(Value::Array(ext)) = obj.get_mut("extension") else {
        return;
    };
    ext.retain(|e| e.get("url").and_then(Value::as_str) != Some(TARGET_EXTENSION));
    if ext.is_empty() {
        obj.remove("extension");
    }
}

/// The logical targets stored in a resource (for the reference index).
pub fn targets_in(resource: &Map<String, Value>) -> Vec<RefTarget> {
    let mut out = Vec::new();
    let mut add = |obj: &Map<String, Value>| {
        if let Some((ty, key)) = logical_target(obj) {
            out.push(RefTarget { ty, key });
        }
    };
    add(resource);
    for v in resource.values() {
        walk(v, &mut add);
    }
    out.sort();
    out.dedup();
    out
}

/// The `(type, identity)` of a logical reference object (as stored), preferring the most
/// specific key.
pub fn logical_target(obj: &Map<String, Value>) -> Option<(String, IdentKey)> {
    if obj.contains_key("reference") {
        return None;
    }
    let ty = obj.get("type").and_then(Value::as_str)?;
    if !is_resource_type(ty) {
        return None;
    }
    let ident = match stored_target(obj) {
        Some(stored) => stored,
        None => obj.get("identifier").and_then(Value::as_object)?,
    };
    // The first key with a system: the identifier's own system, else its openIMIS type code.
    keys_of_identifier(ident)
        .into_iter()
        .find(|k| !k.system.is_empty())
        .map(|k| (ty.to_string(), k))
}

/// Adds `reference: "<Type>/<local id>"` to every logical reference that resolves on this node
/// (dropping the [`TARGET_EXTENSION`] it then no longer needs: the reference reads as the client
/// sent it, with this node's id).
pub fn render(value: &mut Value, resolver: &dyn Resolver) {
    walk_mut(value, &mut |obj| {
        let Some((ty, key)) = logical_target(obj) else {
            return;
        };
        if let Some(id) = resolver.find(&ty, &key) {
            drop_target(obj);
            let mut out = Map::with_capacity(obj.len() + 1);
            out.insert("reference".into(), Value::String(format!("{ty}/{id}")));
            out.extend(std::mem::take(obj));
            *obj = out;
        }
    });
}

fn walk_mut(value: &mut Value, f: &mut dyn FnMut(&mut Map<String, Value>)) {
    match value {
        Value::Object(map) => {
            f(map);
            for v in map.values_mut() {
                walk_mut(v, f);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| walk_mut(v, f)),
        _ => {}
    }
}

fn walk(value: &Value, f: &mut dyn FnMut(&Map<String, Value>)) {
    match value {
        Value::Object(map) => {
            f(map);
            map.values().for_each(|v| walk(v, f));
        }
        Value::Array(items) => items.iter().for_each(|v| walk(v, f)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    struct Fake(HashMap<(String, IdentKey), String>);
    impl Resolver for Fake {
        fn local(&self, ty: &str, id: &str) -> Option<IdentKey> {
            self.0
                .iter()
                .find(|((t, _), v)| t == ty && v.as_str() == id)
                .map(|((_, k), _)| k.clone())
                .filter(|k| k.system.starts_with("urn:fieldmesh"))
        }
        fn find(&self, ty: &str, key: &IdentKey) -> Option<String> {
            self.0.get(&(ty.to_string(), key.clone())).cloned()
        }
    }

    #[test]
    fn literal_references_become_logical_and_render_back() {
        let id = "8a2a9a34-0b1c-4c0e-9f3b-1d2e3f4a5b6c";
        let mut map = HashMap::new();
        map.insert(
            ("Group".into(), IdentKey::new("urn:fieldmesh:node:a", id)),
            id.to_string(),
        );
        map.insert(
            (
                "Patient".into(),
                IdentKey::new("urn:fieldmesh:node:a", "p1"),
            ),
            "p1".to_string(),
        );
        map.insert(
            ("Patient".into(), IdentKey::openimis_code("070707081")),
            "p1".to_string(),
        );
        let r = Fake(map);
        let mut v = json!({"resourceType":"Claim",
            "patient":{"reference":"Patient/070707081"},
            "x":{"reference":format!("Group/{id}")},
            "y":{"reference":"#contained1"},
            "z":{"reference":"http://example.org/fhir/Patient/1"}});
        to_logical(&mut v, &r, "urn:fieldmesh:node:a", &|_| None);
        let targets = targets_in(v.as_object().unwrap());
        assert_eq!(targets.len(), 2);
        assert!(v["patient"].get("reference").is_none());
        assert_eq!(v["x"]["identifier"]["system"], "urn:fieldmesh:node:a");
        assert_eq!(v["y"]["reference"], "#contained1");
        assert_eq!(v["z"]["reference"], "http://example.org/fhir/Patient/1");
        render(&mut v, &r);
        assert_eq!(v["patient"]["reference"], "Patient/p1");
        assert_eq!(v["x"]["reference"], format!("Group/{id}"));
    }

    #[test]
    fn a_client_identifier_is_kept_and_the_stored_identity_beside_it() {
        let r = Fake(HashMap::from([(
            ("Patient".into(), IdentKey::openimis_code("070707081")),
            "p1".to_string(),
        )]));
        let uuid_type = json!({"coding": [{"system": OPENIMIS_IDENTIFIER_TYPES, "code": "UUID"}]});
        let sent = json!({"reference": "Patient/0b5c5d3e-1111-4a44-9e0e-000000000001",
            "type": "Patient", "display": "070707081",
            "identifier": {"type": uuid_type, "value": "0b5c5d3e-1111-4a44-9e0e-000000000001"}});
        let mut v = json!({"resourceType": "Claim", "patient": sent});
        to_logical(&mut v, &r, "urn:fieldmesh:node:a", &|_| None);
        // The client's identifier is untouched; the identity stored for the reference is the
        // UUID under the fallback system, in the target extension.
        assert_eq!(v["patient"]["identifier"], sent["identifier"]);
        assert_eq!(v["patient"]["display"], "070707081");
        let targets = targets_in(v.as_object().unwrap());
        assert_eq!(
            targets,
            vec![RefTarget {
                ty: "Patient".into(),
                key: IdentKey::new(
                    "urn:fieldmesh:node:a",
                    "0b5c5d3e-1111-4a44-9e0e-000000000001"
                )
            }]
        );
        // Unresolved here: the extension stays, so that a read-modify-write keeps the target.
        let mut unresolved = v.clone();
        render(&mut unresolved, &r);
        assert!(stored_target(unresolved["patient"].as_object().unwrap()).is_some());
        // Resolved: it reads exactly as sent, with this node's id.
        let mut code = json!({"resourceType": "Claim", "patient": {"reference": "Patient/070707081",
            "type": "Patient", "identifier": {"type": {"coding": [{"system": OPENIMIS_IDENTIFIER_TYPES, "code": "Code"}]}, "value": "070707081"}}});
        let sent_code = code["patient"].clone();
        to_logical(&mut code, &r, "urn:fieldmesh:node:a", &|_| None);
        render(&mut code, &r);
        let mut expected = sent_code;
        expected["reference"] = json!("Patient/p1");
        assert_eq!(code["patient"], expected);
    }
}
