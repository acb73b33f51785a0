//! Crash safety, tested the way sled tests itself: a child process writes continuously and is
//! killed with SIGKILL at a random moment, 100 times. After every kill the store opens, every write
//! the child acknowledged is there with its exact bytes, and the indexes agree with the documents.
//!
//! The child acknowledges a batch (prints one line per write) only after `commit` returned.
//! Set `FIELDMESH_CRASH_ROUNDS` to run more or fewer rounds, `FIELDMESH_CRASH_SEED` to replay.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use fieldmesh_storage::{DocData, DocWrite, IndexEntries, RedbStore, Store, StoreOptions, Write};

const CHILD_ENV: &str = "FIELDMESH_CRASH_CHILD_DIR";

fn doc_id(n: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[8..].copy_from_slice(&n.to_be_bytes());
    id
}

fn created_bytes(n: u64) -> Vec<u8> {
    format!("created-{n};")
        .repeat(20 + (n % 50) as usize)
        .into_bytes()
}

fn appended_bytes(n: u64, chunk: u32) -> Vec<u8> {
    format!("appended-{n}-{chunk};").into_bytes()
}

fn identifiers(n: u64, chunks: u32) -> Vec<(String, String)> {
    vec![
        ("urn:sys".into(), format!("n{n}")),
        ("urn:code".into(), format!("c{n}-{chunks}")),
    ]
}

/// The group a document points at once it has `chunks` chunks.
fn group_of(chunks: u32) -> String {
    if chunks == 1 {
        "g1".into()
    } else {
        format!("g{}", (chunks - 1) % 3)
    }
}

fn refs(chunks: u32) -> Vec<(String, String, String)> {
    vec![("Group".into(), "urn:sys".into(), group_of(chunks))]
}

/// SplitMix64: small, seedable, good enough to pick sizes and timings.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The writer: creates documents numbered from the count already in the store (batches are atomic,
/// so the count is the next number) and appends to earlier ones, acknowledging after each commit.
fn child(dir: &str) {
    let store = RedbStore::open(format!("{dir}/store.redb"), StoreOptions::default()).unwrap();
    let mut next = store.stats().unwrap().documents;
    let mut rng = Rng(std::process::id() as u64);
    let mut out = std::io::stdout().lock();
    loop {
        let mut writes = Vec::new();
        let mut acks = Vec::new();
        for _ in 0..1 + rng.below(16) {
            if next > 0 && rng.below(3) == 0 {
                let n = rng.below(next);
                if acks.iter().any(|a: &String| a.ends_with(&format!(" {n}"))) {
                    continue;
                }
                let chunks = store.doc_meta(&doc_id(n)).unwrap().unwrap().chunks;
                writes.push(Write::Doc(DocWrite {
                    id: doc_id(n),
                    ty: "Patient".into(),
                    origin: "urn:test".into(),
                    data: DocData::Append(appended_bytes(n, chunks)),
                    heads: vec![[chunks as u8; 32]],
                    updated: 0,
                    identifiers: identifiers(n, chunks + 1),
                    references: refs(chunks + 1),
                    previous: IndexEntries {
                        identifiers: identifiers(n, chunks),
                        references: refs(chunks),
                    },
                    envelopes: vec![chunks as u8],
                }));
                acks.push(format!("A {chunks} {n}"));
            } else {
                let n = next;
                next += 1;
                writes.push(Write::Doc(DocWrite {
                    id: doc_id(n),
                    ty: "Patient".into(),
                    origin: "urn:test".into(),
                    data: DocData::Full(created_bytes(n)),
                    heads: vec![[0; 32]],
                    updated: 0,
                    identifiers: identifiers(n, 1),
                    references: refs(1),
                    previous: IndexEntries::default(),
                    envelopes: vec![0],
                }));
                acks.push(format!("C 0 {n}"));
            }
        }
        store.commit(writes).unwrap();
        for a in acks {
            writeln!(out, "{a}").unwrap();
        }
        out.flush().unwrap();
    }
}

#[test]
fn kill_9_loses_no_acknowledged_write() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(&dir);
        return;
    }
    let rounds: u32 = std::env::var("FIELDMESH_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let seed: u64 = std::env::var("FIELDMESH_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("crash test: {rounds} rounds, FIELDMESH_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    // doc number → the highest acknowledged chunk count.
    let mut acked: BTreeMap<u64, u32> = BTreeMap::new();
    let mut total_acks = 0usize;
    for round in 0..rounds {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "kill_9_loses_no_acknowledged_write",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::sync_channel::<String>(1024);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_millis(30 + rng.below(250));
        let mut lines = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(l) => lines.push(l),
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Lines already printed before the kill were acknowledged too.
        lines.extend(rx.iter());
        reader.join().unwrap();
        let mut this_round = Vec::new();
        for l in &lines {
            let mut p = l.split(' ');
            let (kind, chunks, n) = (p.next(), p.next(), p.next());
            let (Some(kind), Some(chunks), Some(n)) = (kind, chunks, n) else {
                continue;
            };
            if !matches!(kind, "A" | "C") {
                continue; // test-harness output
            }
            let n: u64 = n.parse().unwrap();
            let chunks: u32 = chunks.parse::<u32>().unwrap() + 1;
            this_round.push(n);
            let e = acked.entry(n).or_default();
            *e = (*e).max(chunks);
            total_acks += 1;
        }

        let t_open = Instant::now();
        let store = RedbStore::open(dir.path().join("store.redb"), StoreOptions::default())
            .unwrap_or_else(|e| {
                panic!("round {round}: the store does not open after SIGKILL: {e}")
            });
        let open_ms = t_open.elapsed().as_millis();
        let t_verify = Instant::now();
        let problems = store.verify().unwrap();
        if round % 10 == 0 {
            eprintln!(
                "round {round}: open {open_ms} ms, verify {} ms",
                t_verify.elapsed().as_millis()
            );
        }
        assert!(
            problems.is_empty(),
            "round {round} (seed {seed}): {problems:?}"
        );
        // Every document acknowledged this round, a sample of older ones, and all of them every
        // tenth round and at the end.
        let full = round % 10 == 9 || round + 1 == rounds;
        let sample: Vec<u64> = (0..200)
            .map(|_| rng.below(acked.len().max(1) as u64))
            .collect();
        for (i, (&n, &min_chunks)) in acked.iter().enumerate() {
            if !full && !this_round.contains(&n) && !sample.contains(&(i as u64)) {
                continue;
            }
            let meta = store.doc_meta(&doc_id(n)).unwrap().unwrap_or_else(|| {
                panic!("round {round} (seed {seed}): acknowledged document {n} is lost")
            });
            assert!(
                meta.chunks >= min_chunks,
                "round {round} (seed {seed}): document {n} has {} chunks, {min_chunks} acknowledged",
                meta.chunks
            );
            let mut expected = created_bytes(n);
            for c in 1..meta.chunks {
                expected.extend(appended_bytes(n, c));
            }
            assert_eq!(
                store.doc_bytes(&doc_id(n)).unwrap().unwrap(),
                expected,
                "document {n}"
            );
            assert_eq!(
                store.find("Patient", "urn:sys", &format!("n{n}")).unwrap(),
                vec![doc_id(n)]
            );
            let code = format!("c{n}-{}", meta.chunks);
            assert_eq!(
                store.find("Patient", "urn:code", &code).unwrap(),
                vec![doc_id(n)]
            );
        }
    }
    eprintln!(
        "crash test: {total_acks} acknowledged writes over {rounds} kills, {} documents, none lost",
        acked.len()
    );
    assert!(
        total_acks > rounds as usize,
        "the writer acknowledged almost nothing: the test tested nothing"
    );
}
