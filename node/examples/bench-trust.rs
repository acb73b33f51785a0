//! What verifying received changes costs, on one core.
//!
//! ```text
//! cargo run --release -p fieldmesh-node --example bench-trust [-- --changes 20000]
//! ```
//!
//! Builds `--changes` real Automerge documents (openIMIS Patients from `demo generate`, one change
//! each) authored by an enrolment officer's key, with their signed envelopes, and measures on one
//! thread:
//! - the signature check alone (the ZIP-215 rule of `fieldmesh_trust::signature`, over the
//!   domain-separated change hash), one at a time and in batches;
//! - the whole decision per change (signature, certificate chain and validity, revocations,
//!   capability, scope of the document), with signatures checked one at a time and in batches
//!   (as a receiver checks a sync batch);
//! - preparing a received document (Automerge load, read, index entries) with and without the
//!   trust check ([`fieldmesh_trust::check`]), which is what a cold sync does per document.

use std::time::Instant;

use anyhow::Result;
use fieldmesh_fhir_docs::openimis::OpenImis;
use fieldmesh_fhir_docs::{actor_for_key, document_to_json, new_document};
use fieldmesh_trust::ed25519_dalek::SigningKey;
use fieldmesh_trust::{Certificate, ChangeFacts, Envelope, Role, Trust, issue_certificate};
use serde_json::Value;

/// The document every benchmark change is signed for (signatures bind the document).
const DOC: fieldmesh_fhir_docs::DocId = fieldmesh_fhir_docs::DocId(uuid::Uuid::nil());

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<()> {
    let n = arg("--changes", 20_000);
    let root = SigningKey::from_bytes(&[1; 32]);
    let officer = SigningKey::from_bytes(&[2; 32]);
    let officer_pk = officer.verifying_key().to_bytes();
    // The demo data's families, all placed in one village the officer's certificate covers.
    let mut rng = fieldmesh_fhir_docs::openimis::demo::Rng::new(1);
    let villages = fieldmesh_fhir_docs::openimis::demo::reference_data(&mut rng).villages;
    let opts = fieldmesh_fhir_docs::openimis::demo::GenerateOptions {
        reference: false,
        claims: false,
        villages: vec![villages[0].1.clone()],
        ..Default::default()
    };
    let mut ndjson = Vec::new();
    fieldmesh_fhir_docs::openimis::demo::generate_with(1, (n / 4 + 10) as u64, &opts, &mut ndjson)?;
    let resources: Vec<Value> = String::from_utf8(ndjson)?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &Value| v["resourceType"] == "Patient" || v["resourceType"] == "Group")
        .take(n)
        .collect();
    let now = 1_790_000_000;
    let mut trust = Trust::new(root.verifying_key().to_bytes());
    trust.add_token(&issue_certificate(
        &root,
        &Certificate {
            serial: "bench".into(),
            subject: hex::encode(officer_pk),
            user: "EO0001".into(),
            roles: vec![Role::EnrolmentOfficer],
            locations: vec![villages[0].0.clone(), villages[0].1.clone()],
            facilities: vec![],
            not_before: now - 86_400,
            not_after: now + 86_400 * 365,
        },
    ))?;
    // Documents as the officer's node saves and sends them.
    let t = Instant::now();
    let mut docs = Vec::with_capacity(resources.len());
    for r in &resources {
        let mut doc = new_document(
            r.as_object().expect("object"),
            actor_for_key(&officer_pk),
            now,
        )?;
        let head = doc.get_heads()[0].0;
        let ty = r["resourceType"].as_str().unwrap_or_default();
        let env = Envelope::sign(&officer, DOC.as_bytes(), ty, head, 0);
        docs.push((
            r["resourceType"].as_str().unwrap_or_default().to_string(),
            doc.save_nocompress(),
            env,
        ));
    }
    let n = docs.len();
    println!(
        "{n} documents (Patients and Groups from demo generate, one change each) built and signed in {:.2} s ({:.0} signatures/s while building)",
        t.elapsed().as_secs_f64(),
        n as f64 / t.elapsed().as_secs_f64()
    );
    // Facts and JSON per document, outside the timings that do not include them.
    let prepared: Vec<(
        String,
        ChangeFacts,
        Envelope,
        serde_json::Map<String, Value>,
    )> = docs
        .iter()
        .map(|(ty, bytes, env)| {
            let mut doc = automerge::AutoCommit::load(bytes).expect("load");
            let m = doc.get_changes_meta(&[]).pop().expect("a change");
            let facts = ChangeFacts {
                hash: m.hash.0,
                actor: m.actor.to_bytes().to_vec(),
                seq: m.seq,
                time: m.timestamp,
                deps: vec![],
            };
            (
                ty.clone(),
                facts,
                *env,
                document_to_json(&doc).expect("json"),
            )
        })
        .collect();

    let t = Instant::now();
    let ok = prepared
        .iter()
        .filter(|(ty, f, e, _)| trust.verify_envelope(e, &f.actor, DOC.as_bytes(), ty))
        .count();
    let s = t.elapsed().as_secs_f64();
    assert_eq!(ok, n);
    println!(
        "| signature check, one at a time, one core | {:.0} changes/s | {:.1} µs each |",
        n as f64 / s,
        s * 1e6 / n as f64
    );

    // Parts of the signature check: decompressing the author's key, and the rest.
    let t = Instant::now();
    for (_, f, _, _) in &prepared {
        let k: [u8; 32] = f.actor.as_slice().try_into()?;
        std::hint::black_box(fieldmesh_trust::ed25519_dalek::VerifyingKey::from_bytes(
            &k,
        )?);
    }
    let decompress = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!("| of which decompressing the author's key | {decompress:.1} µs | |");

    let t = Instant::now();
    let accepted = prepared
        .iter()
        .filter(|(ty, f, e, json)| {
            trust
                .decide(&OpenImis, &DOC, ty, f, Some(e), &|_| false, None, json)
                .is_ok()
        })
        .count();
    let s = t.elapsed().as_secs_f64();
    assert_eq!(accepted, n, "every change is in the officer's scope");
    println!(
        "| whole decision (signature, certificate, revocations, capability, scope), one core | {:.0} changes/s | {:.1} µs each; target ≥ 20,000/s |",
        n as f64 / s,
        s * 1e6 / n as f64
    );

    // The same, with the signatures checked in batches first, as a receiver checks a sync batch.
    let t = Instant::now();
    let items: Vec<(&Envelope, &[u8], &[u8; 16], &str)> = prepared
        .iter()
        .map(|(ty, f, e, _)| (e, f.actor.as_slice(), DOC.as_bytes(), ty.as_str()))
        .collect();
    let holds = trust.verify_envelopes(&items);
    let batch_s = t.elapsed().as_secs_f64();
    assert!(holds.iter().all(|ok| *ok));
    println!(
        "| signature check in batches of {}, one core | {:.0} changes/s | {:.1} µs each |",
        fieldmesh_trust::signature::BATCH,
        n as f64 / batch_s,
        batch_s * 1e6 / n as f64
    );
    // The same number of signatures, each by a key of its own (no coalescing).
    let many: Vec<([u8; 32], String, Envelope)> = prepared
        .iter()
        .enumerate()
        .map(|(i, (ty, f, _, _))| {
            let mut seed = [7u8; 32];
            seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let k = SigningKey::from_bytes(&seed);
            (
                k.verifying_key().to_bytes(),
                ty.clone(),
                Envelope::sign(&k, DOC.as_bytes(), ty, f.hash, 0),
            )
        })
        .collect();
    let many_items: Vec<(&Envelope, &[u8], &[u8; 16], &str)> = many
        .iter()
        .map(|(k, ty, e)| (e, k.as_slice(), DOC.as_bytes(), ty.as_str()))
        .collect();
    let t = Instant::now();
    let holds = trust.verify_envelopes(&many_items);
    let s = t.elapsed().as_secs_f64();
    assert!(holds.iter().all(|ok| *ok));
    println!(
        "| signature check in batches, every signature by another key, one core | {:.0} changes/s | {:.1} µs each |",
        n as f64 / s,
        s * 1e6 / n as f64
    );
    let t = Instant::now();
    let holds = trust.verify_envelopes(&items);
    let accepted = prepared
        .iter()
        .zip(&holds)
        .filter(|((ty, f, e, json), ok)| {
            trust
                .decide_signed(
                    &OpenImis,
                    &DOC,
                    ty,
                    f,
                    Some(e),
                    &|_| **ok,
                    &|_| false,
                    &|_| false,
                )
                .and_then(|scoped| match scoped {
                    Some(authority) => authority
                        .in_scope(&OpenImis, ty, json)
                        .and_then(|()| fieldmesh_trust::claimed_identity(&DOC, None, json)),
                    None => Ok(()),
                })
                .is_ok()
        })
        .count();
    let s = t.elapsed().as_secs_f64();
    assert_eq!(accepted, n, "every change is in the officer's scope");
    println!(
        "| whole decision, signatures checked in batches, one core | {:.0} changes/s | {:.1} µs each; target ≥ 20,000/s |",
        n as f64 / s,
        s * 1e6 / n as f64
    );

    // A receiving node checks on every core (documents are prepared in parallel).
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let t = Instant::now();
    let decided = fieldmesh_engine::par_map(&prepared, threads, |(ty, f, e, json)| {
        trust
            .decide(&OpenImis, &DOC, ty, f, Some(e), &|_| false, None, json)
            .is_ok()
    })
    .unwrap_or_default();
    let s = t.elapsed().as_secs_f64();
    assert_eq!(decided.iter().filter(|ok| **ok).count(), n);
    println!(
        "| whole decision on all {threads} cores | {:.0} changes/s | |",
        n as f64 / s
    );

    // What a receiving node does per new document, with and without the trust check.
    let envs: Vec<Vec<u8>> = docs
        .iter()
        .map(|(_, _, e)| Envelope::encode_wire(&[*e]))
        .collect();
    let t = Instant::now();
    for (_, bytes, _) in &docs {
        let doc = automerge::AutoCommit::load(bytes)?;
        let json = document_to_json(&doc)?;
        std::hint::black_box(fieldmesh_engine::entries_of_json(&json));
    }
    let without = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for ((ty, bytes, _), env) in docs.iter().zip(&envs) {
        let doc = automerge::AutoCommit::load(bytes)?;
        let checked = fieldmesh_trust::check(&trust, &OpenImis, &DOC, ty, doc, None, env)?;
        assert!(checked.rejected.is_empty());
        std::hint::black_box(fieldmesh_engine::entries_of_json(&checked.json));
    }
    let with = t.elapsed().as_secs_f64();
    println!(
        "| preparing a received document, one core: without / with the trust check | {:.0} / {:.0} µs | the check adds {:.0} µs ({:.0}%) per document |",
        without * 1e6 / n as f64,
        with * 1e6 / n as f64,
        (with - without) * 1e6 / n as f64,
        (with - without) / without * 100.0
    );
    println!(
        "| estimated addition to a cold sync of 100,000 documents on 2 cores | {:.1} s | |",
        (with - without) / n as f64 * 100_000.0 / 2.0
    );
    Ok(())
}
