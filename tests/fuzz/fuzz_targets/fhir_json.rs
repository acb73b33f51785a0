//! A FHIR resource as an app sends it: parsed, bounded, validated, prepared, made a document and
//! read back.
#![no_main]

use fieldmesh_fhir_docs::limits::{DocLimits, check_json};
use fieldmesh_fhir_docs::references::Resolver;
use fieldmesh_fhir_docs::{DocId, IdentKey, actor_for_key, document_to_json, new_document};
use libfuzzer_sys::fuzz_target;

struct Nothing;

impl Resolver for Nothing {
    fn local(&self, _: &str, _: &str) -> Option<IdentKey> {
        None
    }
    fn find(&self, _: &str, _: &IdentKey) -> Option<String> {
        None
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if check_json(&value, &DocLimits::default()).is_err() {
        return;
    }
    let id = DocId::new();
    let Ok(prepared) = fieldmesh_fhir_docs::resource::prepare(
        value,
        None,
        "urn:fieldmesh:node:fuzz",
        &id,
        &Nothing,
        &|_| None,
    ) else {
        return;
    };
    let Ok(doc) = new_document(&prepared.json, actor_for_key(&[4; 32]), 0) else {
        return;
    };
    let back = document_to_json(&doc).expect("a document made from a resource reads back");
    assert_eq!(back, prepared.json, "round trip");
});
