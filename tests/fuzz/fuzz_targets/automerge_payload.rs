//! An Automerge payload from a peer or a file, bounded before it is loaded.
#![no_main]

use fieldmesh_fhir_docs::limits::{DocLimits, chunks, inspect};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = DocLimits::default();
    let _ = chunks(data);
    let small = DocLimits {
        ops: 1000,
        objects: 100,
        changes: 50,
        expanded: 1 << 20,
        ..limits
    };
    let _ = inspect(data, &small);
    let _ = inspect(data, &limits);
});
