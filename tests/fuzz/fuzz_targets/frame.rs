//! A sync frame from a peer: decoded, then fed to a session in each role.
#![no_main]

use fieldmesh_protocol::Local;
use fieldmesh_protocol::session::Role;
use fieldmesh_protocol::{Driver, Start, wire};
use libfuzzer_sys::fuzz_target;

fn start() -> Start {
    Start {
        local: Local {
            node: "fuzz".into(),
            store: [7; 16],
            seq: 3,
            checkpoint: None,
        },
        items: vec![([1; 16], vec![[2; 32]], 1), ([3; 16], Vec::new(), 2)],
        restricted: false,
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = wire::decode(data);
    let _ = fieldmesh_protocol::Checkpoint::from_bytes(data);
    for role in [Role::Initiator, Role::Responder] {
        let Ok(mut d) = Driver::new(role, start()) else {
            return;
        };
        let _ = d.start();
        // Frames are length-prefixed on the stream; here one input may hold several.
        let mut rest = data;
        while rest.len() >= 2 {
            let n = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
            let (frame, tail) = rest[2..].split_at(n);
            if d.receive(frame).is_err() {
                break;
            }
            rest = tail;
        }
    }
});
