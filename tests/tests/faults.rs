//! Faults of the disk under a running node, each as the audit found it:
//!
//! - a store damaged on disk (64 random bytes over a few pages of `store.redb`: a peer then
//!   received 0 of 184 documents, `fieldmesh check` panicked inside redb and the next start
//!   failed). Now the node starts and serves what it can read, `check` reports instead of
//!   panicking, `salvage` rebuilds the store from the readable documents, and what was lost
//!   comes back from a peer;
//! - a full disk (500 instead of 507, and broken until a restart after space came back);
//! - files readable by anyone (`store.redb` 0644, the data directory 0755).
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use std::process::Command;

use fieldmesh_tests::{Node, fieldmesh, run_ok};
use serde_json::json;

/// Writes `n` blocks of 64 pseudo-random bytes over `path` past its first 8 KiB (redb's header
/// and first pages), from `seed`.
fn damage(path: &std::path::Path, seed: u64, n: usize) {
    let mut data = std::fs::read(path).unwrap();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..n {
        let at = 8192 + (next() as usize) % (data.len() - 8192 - 64);
        for b in &mut data[at..at + 64] {
            *b = next() as u8;
        }
    }
    std::fs::write(path, data).unwrap();
}

/// `fieldmesh <args>`: exit code and everything printed.
fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(fieldmesh()).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Central `a` loaded with 30 demo families, and hub `b` holding a copy of everything: returns
/// a's data directory (a stopped), b running, and the number of documents a held.
fn central_and_its_copy(dir: &std::path::Path) -> (std::path::PathBuf, Node, u64) {
    let data_file = dir.join("data.ndjson");
    run_ok(&[
        "demo",
        "generate",
        "--families",
        "30",
        "--out",
        data_file.to_str().unwrap(),
    ])
    .unwrap();
    let a_data = dir.join("a");
    fieldmesh_tests::init(&a_data, "a", "central").unwrap();
    run_ok(&[
        "load",
        "--data",
        a_data.to_str().unwrap(),
        data_file.to_str().unwrap(),
    ])
    .unwrap();
    let a = Node::run(a_data.clone()).unwrap();
    let total = a.documents().unwrap();
    let b = Node::start_with_peers(dir, "b", "hub", &[&a.p2p]).unwrap();
    b.wait_for(
        60,
        "b to hold a's documents",
        |b| Ok(b.documents()? > total),
    )
    .unwrap();
    a.terminate(10).unwrap();
    (a_data, b, total)
}

#[test]
fn a_central_salvaged_afresh_starts_and_its_services_resume_when_its_certificate_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let (a_data, b, total) = central_and_its_copy(dir.path());
    // Nothing of the store can be read: salvage starts it afresh, without a's certificate.
    let store = a_data.join("store.redb");
    let len = std::fs::metadata(&store).unwrap().len() as usize;
    std::fs::write(&store, vec![0x5a; len]).unwrap();
    let a_path = a_data.to_str().unwrap();
    let (code, out) = run(&["salvage", "--data", a_path]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("cannot be opened"), "{out}");
    let a = Node::run_with(a_data.clone(), &["--peer", &b.p2p]).unwrap();
    a.wait_for(60, "a to get back what it lost from b", |a| {
        Ok(a.documents()? >= total)
    })
    .unwrap();
    a.wait_for(30, "central's services to start again", |a| {
        Ok(a.get("/status")?.1.get("central").is_some())
    })
    .unwrap();
}

#[test]
fn a_damaged_store_serves_what_it_can_read_and_salvage_recovers_the_rest_from_a_peer() {
    let dir = tempfile::tempdir().unwrap();
    let (a_data, b, total) = central_and_its_copy(dir.path());

    // Damage a's store file until `check` finds it (a block may land on free space).
    let a_path = a_data.to_str().unwrap();
    let mut seed = 1;
    let (code, report) = loop {
        damage(&a_data.join("store.redb"), seed, 4);
        let (code, report) = run(&["check", "--data", a_path]);
        assert_ne!(code, 101, "check panicked:\n{report}");
        if code != 0 {
            break (code, report);
        }
        seed += 1;
        assert!(seed < 20, "the damage never showed");
    };
    println!("check on the damaged store (exit {code}):\n{report}");
    assert!(report.contains("fieldmesh salvage"), "{report}");
    assert!(!report.contains("panicked"), "{report}");
    // Damage where redb keeps its own structures leaves a store that cannot be opened at all:
    // then there is nothing to serve, and salvage starts it afresh from its peers.
    let readable = report
        .lines()
        .find(|l| l.contains("documents it lists can be read"))
        .and_then(|l| l.split(" of the ").next())
        .and_then(|s| s.split_whitespace().last())
        .and_then(|n| n.parse::<u64>().ok());
    match readable {
        Some(readable) => serves_what_it_can_read(dir.path(), &a_data, readable, total),
        None => assert!(report.contains("cannot be opened"), "{report}"),
    }

    // Salvage, then a consistent store; what was lost comes back from b.
    let (code, out) = run(&["salvage", "--data", a_path]);
    println!("salvage (exit {code}):\n{out}");
    assert_eq!(code, 0, "{out}");
    let (code, out) = run(&["check", "--data", a_path]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("store is consistent"), "{out}");
    let a = Node::run_with(a_data.clone(), &["--peer", &b.p2p]).unwrap();
    a.wait_for(60, "a to get back what it lost from b", |a| {
        Ok(a.documents()? >= total)
    })
    .unwrap();
    assert!(
        std::fs::read_dir(&a_data).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("damaged")),
        "the damaged file is kept"
    );
}

/// The damaged node starts and serves what it can read to a new peer. The peer is given a's
/// certificate (the damage may have taken a's own copy, which a would otherwise show it).
fn serves_what_it_can_read(
    dir: &std::path::Path,
    a_data: &std::path::Path,
    readable: u64,
    total: u64,
) {
    let a = Node::run(a_data.to_path_buf()).unwrap();
    let c_data = dir.join("c");
    fieldmesh_tests::init(&c_data, "c", "hub").unwrap();
    run_ok(&[
        "cert",
        "install",
        "--data",
        c_data.to_str().unwrap(),
        dir.join("a.cert.json").to_str().unwrap(),
    ])
    .unwrap();
    let c = Node::start_with_peers(dir, "c", "hub", &[&a.p2p]).unwrap();
    let want = (readable * 9 / 10).max(1);
    c.wait_for(60, "c to receive a's readable documents", |c| {
        Ok(c.documents()? >= want)
    })
    .unwrap();
    println!(
        "a new peer received {} documents from the damaged store ({readable} readable; {total} before the damage)",
        c.documents().unwrap()
    );
    c.terminate(10).unwrap();
    a.terminate(10).unwrap();
}

/// A tmpfs of a few megabytes, unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &std::path::Path, mib: u32) -> Option<Self> {
        std::fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(at.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_answers_507_loses_nothing_acknowledged_and_recovers_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(&dir.path().join("disk"), 4) else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let node = Node::start(&disk.0, "n", "device").unwrap();
    let before = node.documents().unwrap();
    // Leave well under a megabyte free.
    let filler = disk.0.join("filler");
    let free = {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&disk.0)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse::<usize>()
            .unwrap()
    };
    std::fs::write(&filler, vec![0u8; free.saturating_sub(768 * 1024)]).unwrap();
    let patient = |i: usize| json!({"resourceType": "Patient", "name": [{"family": format!("Full{i}"), "given": ["x".repeat(1500)]}], "birthDate": "1990-01-01"});
    let (mut created, mut refused) = (0u64, None);
    for i in 0..5000 {
        let (status, _, body) = node.post("/fhir/Patient", &patient(i)).unwrap();
        match status {
            201 => created += 1,
            _ => {
                refused = Some((status, body));
                break;
            }
        }
    }
    let (status, body) = refused.expect("the disk never filled");
    println!("disk full after {created} writes: {status} {body}");
    assert_eq!(status, 507, "{body}");
    assert!(body.to_string().contains("disk is full"), "{body}");
    // Still full: 507 again; reads go on; nothing unacknowledged is visible.
    assert_eq!(node.post("/fhir/Patient", &patient(9999)).unwrap().0, 507);
    assert_eq!(node.documents().unwrap(), before + created);
    // Space comes back: writes succeed again, no restart.
    std::fs::remove_file(&filler).unwrap();
    let (status, _, body) = node.post("/fhir/Patient", &patient(10_000)).unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(node.documents().unwrap(), before + created + 1);
    let (_, data) = node.terminate(10).unwrap();
    let (code, out) = run(&["check", "--data", data.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    drop(disk);
}

#[cfg(unix)]
#[test]
fn the_data_directory_and_the_store_are_the_owners_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    fieldmesh_tests::init(&data, "n", "device").unwrap();
    let node = Node::run(data.clone()).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("store.redb")), 0o600);
    assert_eq!(mode(&data.join("node.key")), 0o600);
    node.terminate(10).unwrap();
    // A directory made before the rule is tightened when the node next opens it.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        data.join("store.redb"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    run_ok(&["check", "--data", data.to_str().unwrap()]).unwrap();
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("store.redb")), 0o600);
}
