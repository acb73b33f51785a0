//! Certificate, revocation and evidence tokens (from certificate files, `Basic` and `AuditEvent`
//! documents, and `Authorization` headers).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let root = [3u8; 32];
    let _ = fieldmesh_trust::verify_certificate(&root, token);
    let _ = fieldmesh_trust::verify_revocation(&root, token);
    let _ = fieldmesh_trust::verify_evidence(token);
    if let Ok(serde_json::Value::Object(json)) = serde_json::from_str(token) {
        let _ = fieldmesh_trust::token_of(&json);
    }
});
