//! Signed envelopes as a peer sends them (wire form) and as the store keeps them.
#![no_main]

use fieldmesh_trust::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Envelope::decode_all(data);
    let _ = Envelope::stored_to_wire(data, |_| true);
    let author = [9u8; 32];
    let mut hash = [0u8; 32];
    if data.len() >= 8 {
        hash[..8].copy_from_slice(&data[..8]);
    }
    let changes = [(hash, &author[..]), ([1; 32], &author[..])];
    let _ = Envelope::match_wire(data, &changes, &[5; 16], "Patient");
});
