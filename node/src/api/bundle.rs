//! Bundles the API answers with: searchsets and histories.

use fieldmesh_engine::Served;
use fieldmesh_fhir_docs::resource::format_instant;
use serde_json::{Map, Value, json};

fn entry(base: &str, s: Served, extra: Option<(&str, Value)>) -> Value {
    let ty = s
        .resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut e = Map::new();
    e.insert(
        "fullUrl".into(),
        Value::String(format!("{base}/{ty}/{}", s.id)),
    );
    e.insert("resource".into(), s.resource);
    if let Some((k, v)) = extra {
        e.insert(k.into(), v);
    }
    Value::Object(e)
}

fn bundle(kind: &str, entries: Vec<Value>) -> Value {
    let mut b = json!({
        "resourceType": "Bundle",
        "type": kind,
        "meta": {"lastUpdated": format_instant(fieldmesh_engine::now())},
        "total": entries.len(),
    });
    if !entries.is_empty() {
        b["entry"] = Value::Array(entries);
    }
    b
}

/// A searchset Bundle of what a search found.
pub fn searchset(base: &str, found: Vec<Served>) -> Value {
    let entries = found
        .into_iter()
        .map(|s| entry(base, s, Some(("search", json!({"mode": "match"})))))
        .collect();
    bundle("searchset", entries)
}

/// A history Bundle of a resource's versions, newest first.
pub fn history(base: &str, versions: Vec<Served>) -> Value {
    let entries = versions.into_iter().map(|s| entry(base, s, None)).collect();
    bundle("history", entries)
}
