//! `fieldmesh load`: FHIR JSON files, Bundles and NDJSON as local writes.
//!
//! NDJSON is streamed line by line (a 100k-resource file is never held in memory). A Bundle's
//! entries are created together, its `urn:uuid:` full URLs translated to the ids they get here.
//! Resources whose `id` is a UUID keep it as their document id, so references between exported
//! resources keep working. Writes are committed in batches of [`BATCH`]; every resource that
//! fails validation is reported with its file, line and reason, and the rest are still loaded.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use fieldmesh_fhir_docs::DocId;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use fieldmesh_engine::{Engine, WriteError};

/// Resources per commit.
pub const BATCH: usize = 1000;

/// What a load did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Resources stored.
    pub loaded: u64,
    /// `(where, why)` of every resource refused.
    pub rejected: Vec<(String, String)>,
    /// Seconds spent.
    pub seconds: f64,
    /// Of which waiting for commits (compression, store writes, fsync) that did not overlap
    /// with reading and preparing.
    pub commit_seconds: f64,
}

struct Loader<'a> {
    engine: &'a mut Engine,
    summary: Summary,
    in_batch: usize,
    /// NDJSON lines waiting to be prepared together, with where they came from.
    lines: Vec<String>,
    places: Vec<String>,
    threads: usize,
}

impl Loader<'_> {
    /// Queues an NDJSON line; full batches are prepared on every core.
    fn line(&mut self, at: String, text: String) -> Result<()> {
        if text.contains("\"Bundle\"") {
            match serde_json::from_str::<Value>(&text) {
                Ok(v) if v.get("resourceType").and_then(Value::as_str) == Some("Bundle") => {
                    self.drain_lines()?;
                    return self.bundle(&at, v);
                }
                _ => {}
            }
        }
        self.lines.push(text);
        self.places.push(at);
        if self.lines.len() >= BATCH {
            self.drain_lines()?;
        }
        Ok(())
    }

    fn drain_lines(&mut self) -> Result<()> {
        if self.lines.is_empty() {
            return Ok(());
        }
        let results = self.engine.create_lines(&self.lines, self.threads);
        for (r, at) in results.into_iter().zip(self.places.drain(..)) {
            match r {
                Ok(_) => {
                    self.summary.loaded += 1;
                    self.in_batch += 1;
                }
                Err(WriteError::Invalid(e)) => self.summary.rejected.push((at, e.to_string())),
                Err(e) => return Err(e).context(format!("storing the resource at {at}")),
            }
        }
        self.lines.clear();
        // Commit this batch while the next one is read and prepared.
        let t = Instant::now();
        self.engine.flush_behind().context("committing a batch")?;
        self.summary.commit_seconds += t.elapsed().as_secs_f64();
        self.in_batch = 0;
        Ok(())
    }

    fn one(
        &mut self,
        at: String,
        resource: Value,
        bundle: &dyn Fn(&str) -> Option<(String, String)>,
    ) -> Result<()> {
        match self.engine.create(resource, None, true, bundle) {
            Ok(_) => {
                self.summary.loaded += 1;
                self.in_batch += 1;
            }
            Err(WriteError::Invalid(e)) => self.summary.rejected.push((at, e.to_string())),
            Err(e) => return Err(e).context(format!("storing the resource at {at}")),
        }
        if self.in_batch >= BATCH {
            self.flush()?;
        }
        Ok(())
    }

    /// Commits everything staged and waits until it is durable.
    fn flush(&mut self) -> Result<()> {
        let t = Instant::now();
        self.engine.flush().context("committing a batch")?;
        self.summary.commit_seconds += t.elapsed().as_secs_f64();
        self.in_batch = 0;
        Ok(())
    }

    fn bundle(&mut self, at: &str, bundle: Value) -> Result<()> {
        let entries = match bundle.get("entry") {
            Some(Value::Array(e)) => e.clone(),
            None => Vec::new(),
            Some(_) => {
                self.summary
                    .rejected
                    .push((at.into(), "Bundle.entry must be an array".into()));
                return Ok(());
            }
        };
        // First give every entry its id, so entries can point at each other in any order.
        let mut ids: HashMap<String, (String, String)> = HashMap::new();
        let mut resources = Vec::with_capacity(entries.len());
        for (i, entry) in entries.into_iter().enumerate() {
            let where_ = format!("{at} entry[{i}]");
            let Some(mut resource) = entry.get("resource").cloned() else {
                self.summary
                    .rejected
                    .push((where_, "the entry has no resource".into()));
                continue;
            };
            let ty = resource
                .get("resourceType")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let full_url = entry
                .get("fullUrl")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let given = resource
                .get("id")
                .and_then(Value::as_str)
                .and_then(DocId::parse)
                .or_else(|| full_url.strip_prefix("urn:uuid:").and_then(DocId::parse));
            let id = given.unwrap_or_default();
            if let Value::Object(m) = &mut resource {
                m.insert("id".into(), Value::String(id.to_string()));
            }
            if !full_url.is_empty() {
                ids.insert(full_url.to_string(), (ty, id.to_string()));
            }
            resources.push((where_, resource));
        }
        let lookup = |r: &str| ids.get(r).cloned();
        for (where_, resource) in resources {
            self.one(where_, resource, &lookup)?;
        }
        Ok(())
    }

    fn value(&mut self, at: String, value: Value) -> Result<()> {
        if value.get("resourceType").and_then(Value::as_str) == Some("Bundle") {
            self.bundle(&at, value)
        } else {
            self.one(at, value, &|_| None)
        }
    }
}

/// A batch of `(line number, line)` and the bytes read for it.
type LineBatch = std::io::Result<(Vec<(u64, String)>, u64)>;

/// Reads non-empty NDJSON lines in batches of [`BATCH`] (with their line numbers and the bytes
/// read) until the file ends or the receiver goes away.
fn read_batches(mut reader: impl BufRead, tx: &std::sync::mpsc::SyncSender<LineBatch>) {
    let mut n = 0u64;
    loop {
        let mut batch = Vec::with_capacity(BATCH);
        let mut bytes = 0u64;
        while batch.len() < BATCH {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) => break,
                Ok(read) => {
                    n += 1;
                    bytes += read as u64;
                    let trimmed = line.trim();
                    if !trimmed.is_empty() {
                        if trimmed.len() != line.len() {
                            line = trimmed.to_string();
                        }
                        batch.push((n, line));
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
        let last = batch.len() < BATCH;
        if (!batch.is_empty() || bytes > 0) && tx.send(Ok((batch, bytes))).is_err() {
            return;
        }
        if last {
            return;
        }
    }
}

fn looks_like_ndjson(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("ndjson" | "jsonl")
    )
}

/// Loads `files` into the engine; commits as it goes.
pub fn load_files(
    engine: &mut Engine,
    files: &[impl AsRef<Path>],
    progress: bool,
) -> Result<Summary> {
    let started = Instant::now();
    engine.set_keep_flushed(false);
    let total: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f.as_ref()).ok())
        .map(|m| m.len())
        .sum();
    let bar = if progress {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut loader = Loader {
        engine,
        summary: Summary::default(),
        in_batch: 0,
        lines: Vec::with_capacity(BATCH),
        places: Vec::with_capacity(BATCH),
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
    };
    for file in files {
        let path = file.as_ref();
        let name = path.display().to_string();
        let f = File::open(path).with_context(|| format!("cannot open {name}"))?;
        let mut reader = BufReader::with_capacity(1 << 20, f);
        if looks_like_ndjson(path) {
            // A reader thread stays one batch ahead, so the cores never wait for the file.
            let (tx, rx) = std::sync::mpsc::sync_channel::<LineBatch>(1);
            let reading = std::thread::Builder::new()
                .name("fieldmesh-read".into())
                .spawn(move || read_batches(reader, &tx))
                .context("cannot start the reader thread")?;
            for batch in rx {
                let (lines, bytes) = batch.with_context(|| format!("reading {name}"))?;
                bar.inc(bytes);
                for (n, text) in lines {
                    loader.line(format!("{name}:{n}"), text)?;
                }
                bar.set_message(format!("{} loaded", loader.summary.loaded));
            }
            let _ = reading.join();
        } else {
            let mut text = String::new();
            reader
                .read_to_string(&mut text)
                .with_context(|| format!("reading {name}: is it UTF-8 text?"))?;
            bar.inc(text.len() as u64);
            match serde_json::from_str::<Value>(&text) {
                Ok(v) => loader.value(name.clone(), v)?,
                Err(e) if e.is_syntax() && e.line() > 1 && text.lines().count() > 1 => {
                    // Several JSON documents, one per line: NDJSON without the extension.
                    for (i, l) in text.lines().enumerate() {
                        if l.trim().is_empty() {
                            continue;
                        }
                        match serde_json::from_str::<Value>(l) {
                            Ok(v) => loader.value(format!("{name}:{}", i + 1), v)?,
                            Err(e) => loader.summary.rejected.push((
                                format!("{name}:{}", i + 1),
                                format!("not valid JSON: {e}"),
                            )),
                        }
                    }
                }
                Err(e) => loader
                    .summary
                    .rejected
                    .push((name.clone(), format!("not valid JSON: {e}"))),
            }
        }
    }
    loader.drain_lines()?;
    loader.flush()?;
    bar.finish_and_clear();
    let mut summary = loader.summary;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}
