//! Bounds on what a document may be, checked before it is loaded.
//!
//! Automerge's columnar format lets a few kilobytes describe millions of operations (run-length
//! encoded columns), and a compressed change chunk may inflate without bound inside
//! `AutoCommit::load`. Bounding the *bytes* of a frame or a request therefore bounds nothing about
//! the memory a document takes once loaded. [`inspect`] walks the chunks of Automerge bytes
//! without materialising anything: it inflates compressed columns and chunks under a cap and
//! counts the rows of every column (decoding run lengths, not values into memory), so that the
//! number of changes and operations is known before a single object is built. [`check_json`]
//! does the same for a resource a client sends. The limits ([`DocLimits`]) are far above what a
//! real FHIR resource reaches, and what exceeds them is refused with the reason.

use std::io::Read;

use serde_json::Value;

/// Bounds on one document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DocLimits {
    /// Bytes of Automerge data as received.
    pub bytes: usize,
    /// Bytes once compressed parts are inflated.
    pub expanded: usize,
    /// Operations (rows of the largest operation column).
    pub ops: u64,
    /// Objects (maps, lists, texts) the operations make: each costs about a kilobyte once
    /// loaded, whatever its size, so a few hundred kilobytes of nested empty maps would take
    /// a hundred megabytes.
    pub objects: u64,
    /// Changes.
    pub changes: u64,
    /// Actors (authors) named by a chunk.
    pub actors: u64,
    /// Nesting of objects and arrays.
    pub depth: usize,
    /// Values (objects, arrays and scalars) of a resource as JSON.
    pub json_nodes: usize,
}

impl Default for DocLimits {
    /// A 35-field Patient is about 200 operations and 1.6 KB of JSON; an openIMIS Claim with
    /// contained resources a few thousand. These bounds leave two orders of magnitude.
    fn default() -> Self {
        Self {
            bytes: 4 << 20,
            expanded: 16 << 20,
            ops: 250_000,
            objects: 20_000,
            changes: 20_000,
            actors: 1_000,
            depth: 48,
            json_nodes: 250_000,
        }
    }
}

/// Why a document was refused before it was loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TooLarge {
    /// More bytes than allowed.
    #[error("the document is {size} bytes (limit {limit})")]
    Bytes {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Inflates past the limit.
    #[error("the document inflates to more than {limit} bytes")]
    Expanded {
        /// The limit.
        limit: usize,
    },
    /// More operations than allowed.
    #[error("the document holds more than {limit} operations")]
    Ops {
        /// The limit.
        limit: u64,
    },
    /// More objects than allowed.
    #[error("the document makes more than {limit} objects")]
    Objects {
        /// The limit.
        limit: u64,
    },
    /// More changes than allowed.
    #[error("the document holds more than {limit} changes")]
    Changes {
        /// The limit.
        limit: u64,
    },
    /// More actors than allowed.
    #[error("the document names more than {limit} authors")]
    Actors {
        /// The limit.
        limit: u64,
    },
    /// Nested deeper than allowed.
    #[error("the resource is nested more than {limit} levels deep")]
    Depth {
        /// The limit.
        limit: usize,
    },
    /// More JSON values than allowed.
    #[error("the resource holds more than {limit} values")]
    JsonNodes {
        /// The limit.
        limit: usize,
    },
    /// Not Automerge bytes this node reads.
    #[error("not an Automerge document this node accepts: {0}")]
    Malformed(&'static str),
}

/// What [`inspect`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shape {
    /// Changes.
    pub changes: u64,
    /// Operations.
    pub ops: u64,
    /// Objects made (maps, lists, texts, tables).
    pub objects: u64,
    /// Bytes once inflated.
    pub expanded: usize,
}

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
/// Columns a chunk may declare, at most (Automerge uses about 20).
const MAX_COLUMNS: u64 = 64;
/// Heads or dependencies a chunk may list, at most.
const MAX_HASHES: u64 = 4096;

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], TooLarge> {
        let n = usize::try_from(n).map_err(|_| TooLarge::Malformed("a length overflows"))?;
        if self.0.len() < n {
            return Err(TooLarge::Malformed("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn byte(&mut self) -> Result<u8, TooLarge> {
        Ok(self.take(1)?[0])
    }

    fn uleb(&mut self) -> Result<u64, TooLarge> {
        let mut out = 0u64;
        for i in 0..10 {
            let b = self.byte()?;
            out |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(out);
            }
        }
        Err(TooLarge::Malformed("a number is too long"))
    }

    fn sleb(&mut self) -> Result<i64, TooLarge> {
        let mut out = 0i64;
        let mut shift = 0;
        loop {
            let b = self.byte()?;
            if shift < 64 {
                out |= i64::from(b & 0x7f) << shift;
            }
            shift += 7;
            if b & 0x80 == 0 {
                if shift < 64 && b & 0x40 != 0 {
                    out |= -1i64 << shift;
                }
                return Ok(out);
            }
            if shift > 70 {
                return Err(TooLarge::Malformed("a number is too long"));
            }
        }
    }

    fn bounded(&mut self, limit: u64, what: TooLarge) -> Result<u64, TooLarge> {
        let n = self.uleb()?;
        if n > limit { Err(what) } else { Ok(n) }
    }
}

/// Inflates `data` (raw deflate) into at most `cap` bytes.
fn inflate(data: &[u8], cap: usize, limits: &DocLimits) -> Result<Vec<u8>, TooLarge> {
    let mut out = Vec::new();
    flate2::read::DeflateDecoder::new(data)
        .take(cap as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|_| TooLarge::Malformed("a compressed part is corrupt"))?;
    if out.len() > cap {
        return Err(TooLarge::Expanded {
            limit: limits.expanded,
        });
    }
    Ok(out)
}

/// The rows of one column, by its type (the low three bits of its specification), stopping
/// as soon as they pass `cap`.
fn rows(col_type: u32, data: &[u8], cap: u64) -> Result<u64, TooLarge> {
    let mut c = Cursor(data);
    let mut rows = 0u64;
    let over = |rows: u64| rows > cap;
    match col_type {
        // Boolean: alternating run lengths.
        4 => {
            while !c.0.is_empty() {
                rows = rows.saturating_add(c.uleb()?);
                if over(rows) {
                    break;
                }
            }
        }
        // Raw values: their count is given by the value-metadata column.
        7 => {}
        // Run-length encoded: group, actor, integer, delta, string, value metadata.
        _ => {
            let value = |c: &mut Cursor<'_>| -> Result<(), TooLarge> {
                match col_type {
                    3 => c.sleb().map(|_| ()),
                    5 => {
                        let n = c.uleb()?;
                        c.take(n).map(|_| ())
                    }
                    _ => c.uleb().map(|_| ()),
                }
            };
            while !c.0.is_empty() {
                let count = c.sleb()?;
                if count > 0 {
                    value(&mut c)?;
                    rows = rows.saturating_add(count.unsigned_abs());
                } else if count < 0 {
                    let n = count.unsigned_abs();
                    for _ in 0..n {
                        value(&mut c)?;
                    }
                    rows = rows.saturating_add(n);
                } else {
                    rows = rows.saturating_add(c.uleb()?);
                }
                if over(rows) {
                    break;
                }
            }
        }
    }
    Ok(rows)
}

/// The operation column of actions (column 4, integers), deflated or not.
fn is_action_column(spec: u32) -> bool {
    spec & !0b1000 == (4 << 4) | 2
}

/// The rows of an action column that make an object (actions 0, 2, 4 and 6: map, list, text,
/// table), stopping as soon as they pass `cap`.
fn make_rows(data: &[u8], cap: u64) -> Result<u64, TooLarge> {
    let is_make = |a: u64| a < 7 && a.is_multiple_of(2);
    let mut c = Cursor(data);
    let mut makes = 0u64;
    while !c.0.is_empty() && makes <= cap {
        let count = c.sleb()?;
        if count > 0 {
            if is_make(c.uleb()?) {
                makes = makes.saturating_add(count.unsigned_abs());
            }
        } else if count < 0 {
            for _ in 0..count.unsigned_abs() {
                if is_make(c.uleb()?) {
                    makes += 1;
                }
            }
        } else {
            c.uleb()?; // a run of nulls
        }
    }
    Ok(makes)
}

/// Column specifications and lengths of a chunk.
fn columns(c: &mut Cursor<'_>) -> Result<Vec<(u32, u64)>, TooLarge> {
    let n = c.bounded(MAX_COLUMNS, TooLarge::Malformed("too many columns"))?;
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let spec = u32::try_from(c.uleb()?).map_err(|_| TooLarge::Malformed("column spec"))?;
        let len = c.uleb()?;
        out.push((spec, len));
    }
    Ok(out)
}

/// The most rows of any column of a group of columns, inflating deflated ones.
fn max_rows(
    c: &mut Cursor<'_>,
    cols: &[(u32, u64)],
    cap: u64,
    shape: &mut Shape,
    limits: &DocLimits,
) -> Result<u64, TooLarge> {
    let mut most = 0;
    for (spec, len) in cols {
        let data = c.take(*len)?;
        let inflated;
        let data = if spec & 0b1000 != 0 {
            inflated = inflate(data, limits.expanded.saturating_sub(shape.expanded), limits)?;
            shape.expanded += inflated.len();
            &inflated[..]
        } else {
            data
        };
        most = most.max(rows(spec & 0b111, data, cap)?);
        if most > cap {
            break;
        }
        if is_action_column(*spec) {
            shape.objects = shape
                .objects
                .saturating_add(make_rows(data, limits.objects)?);
            if shape.objects > limits.objects {
                return Err(TooLarge::Objects {
                    limit: limits.objects,
                });
            }
        }
    }
    Ok(most)
}

fn actors(c: &mut Cursor<'_>, limits: &DocLimits) -> Result<(), TooLarge> {
    let n = c.bounded(
        limits.actors,
        TooLarge::Actors {
            limit: limits.actors,
        },
    )?;
    for _ in 0..n {
        let len = c.uleb()?;
        c.take(len)?;
    }
    Ok(())
}

fn hashes(c: &mut Cursor<'_>) -> Result<(), TooLarge> {
    let n = c.bounded(MAX_HASHES, TooLarge::Malformed("too many hashes"))?;
    c.take(n * 32)?;
    Ok(())
}

fn document(contents: &[u8], shape: &mut Shape, limits: &DocLimits) -> Result<(), TooLarge> {
    let mut c = Cursor(contents);
    actors(&mut c, limits)?;
    hashes(&mut c)?;
    let change_cols = columns(&mut c)?;
    let op_cols = columns(&mut c)?;
    let changes = max_rows(&mut c, &change_cols, limits.changes, shape, limits)?;
    let ops = max_rows(&mut c, &op_cols, limits.ops, shape, limits)?;
    shape.changes = shape.changes.saturating_add(changes);
    shape.ops = shape.ops.saturating_add(ops);
    Ok(())
}

fn change(contents: &[u8], shape: &mut Shape, limits: &DocLimits) -> Result<(), TooLarge> {
    let mut c = Cursor(contents);
    hashes(&mut c)?;
    let actor = c.uleb()?;
    c.take(actor)?;
    c.uleb()?; // seq
    c.uleb()?; // start op
    c.sleb()?; // time
    let message = c.uleb()?;
    c.take(message)?;
    actors(&mut c, limits)?;
    let op_cols = columns(&mut c)?;
    let ops = max_rows(&mut c, &op_cols, limits.ops, shape, limits)?;
    shape.changes = shape.changes.saturating_add(1);
    shape.ops = shape.ops.saturating_add(ops);
    Ok(())
}

/// Counts the changes and operations of Automerge bytes (one or more chunks: a document, changes,
/// compressed changes) without loading them, and refuses what exceeds `limits`.
pub fn inspect(bytes: &[u8], limits: &DocLimits) -> Result<Shape, TooLarge> {
    if bytes.len() > limits.bytes {
        return Err(TooLarge::Bytes {
            size: bytes.len(),
            limit: limits.bytes,
        });
    }
    let mut shape = Shape::default();
    let mut c = Cursor(bytes);
    while !c.0.is_empty() {
        if c.take(4)? != MAGIC {
            return Err(TooLarge::Malformed("not an Automerge chunk"));
        }
        c.take(4)?; // checksum: Automerge checks it
        let kind = c.byte()?;
        let len = c.uleb()?;
        let contents = c.take(len)?;
        shape.expanded = shape.expanded.saturating_add(contents.len());
        match kind {
            0 => document(contents, &mut shape, limits)?,
            1 => change(contents, &mut shape, limits)?,
            2 => {
                let cap = limits.expanded.saturating_sub(shape.expanded);
                let inflated = inflate(contents, cap, limits)?;
                shape.expanded = shape.expanded.saturating_add(inflated.len());
                change(&inflated, &mut shape, limits)?;
            }
            3 => return Err(TooLarge::Malformed("bundle chunks are not accepted")),
            _ => return Err(TooLarge::Malformed("unknown chunk type")),
        }
        if shape.expanded > limits.expanded {
            return Err(TooLarge::Expanded {
                limit: limits.expanded,
            });
        }
        if shape.ops > limits.ops {
            return Err(TooLarge::Ops { limit: limits.ops });
        }
        if shape.changes > limits.changes {
            return Err(TooLarge::Changes {
                limit: limits.changes,
            });
        }
    }
    Ok(shape)
}

/// The chunks of Automerge bytes, each whole (header included) with its type (0 document,
/// 1 change, 2 compressed change), without reading their contents. Stops at the first malformed
/// header.
pub fn chunks(bytes: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    let mut c = Cursor(bytes);
    while !c.0.is_empty() {
        let start = c.0;
        let Ok(magic) = c.take(4) else { break };
        if magic != MAGIC || c.take(4).is_err() {
            break;
        }
        let (Ok(kind), Ok(len)) = (c.byte(), c.uleb()) else {
            break;
        };
        if c.take(len).is_err() {
            break;
        }
        let used = start.len() - c.0.len();
        out.push((kind, &start[..used]));
    }
    out
}

/// Checks the size of a resource sent as JSON: its depth and its number of values.
pub fn check_json(resource: &Value, limits: &DocLimits) -> Result<(), TooLarge> {
    let mut nodes = 0usize;
    let mut stack: Vec<(&Value, usize)> = vec![(resource, 1)];
    while let Some((v, depth)) = stack.pop() {
        nodes += 1;
        if nodes > limits.json_nodes {
            return Err(TooLarge::JsonNodes {
                limit: limits.json_nodes,
            });
        }
        if depth > limits.depth {
            return Err(TooLarge::Depth {
                limit: limits.depth,
            });
        }
        match v {
            Value::Object(m) => stack.extend(m.values().map(|c| (c, depth + 1))),
            Value::Array(a) => stack.extend(a.iter().map(|c| (c, depth + 1))),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ObjType, ROOT};

    fn list_doc(n: usize) -> AutoCommit {
        let mut doc = AutoCommit::new();
        let list = doc.put_object(ROOT, "x", ObjType::List).expect("list");
        let values = std::iter::repeat_n(automerge::ScalarValue::Int(0), n);
        doc.splice(&list, 0, 0, values).expect("splice");
        doc.commit();
        doc
    }

    #[test]
    fn counts_match_what_automerge_loads() {
        let mut doc = list_doc(1000);
        let limits = DocLimits::default();
        for bytes in [doc.save(), doc.save_nocompress()] {
            let shape = inspect(&bytes, &limits).expect("within limits");
            assert_eq!(shape.changes, 1);
            assert!(shape.ops >= 1001 && shape.ops <= 1002, "{shape:?}");
        }
        // Incremental changes, one chunk each.
        let heads = doc.get_heads();
        doc.put(ROOT, "y", "z").expect("put");
        doc.commit();
        let after = doc.save_after(&heads);
        let shape = inspect(&after, &limits).expect("within limits");
        assert_eq!((shape.changes, shape.ops), (1, 1));
    }

    #[test]
    fn a_few_kilobytes_that_would_be_many_operations_are_refused() {
        let mut doc = list_doc(300_000);
        let bytes = doc.save();
        assert!(bytes.len() < 64 * 1024, "{} bytes", bytes.len());
        let limits = DocLimits {
            ops: 250_000,
            ..DocLimits::default()
        };
        assert_eq!(
            inspect(&bytes, &limits),
            Err(TooLarge::Ops { limit: 250_000 })
        );
    }

    #[test]
    fn many_small_objects_are_refused() {
        let mut doc = AutoCommit::new();
        let mut obj = ROOT;
        for _ in 0..25_000 {
            obj = doc.put_object(&obj, "a", ObjType::Map).expect("map");
        }
        doc.commit();
        let limits = DocLimits::default();
        for bytes in [doc.save(), doc.save_nocompress()] {
            assert_eq!(
                inspect(&bytes, &limits),
                Err(TooLarge::Objects { limit: 20_000 })
            );
        }
        let change = doc.get_changes(&[])[0].raw_bytes().to_vec();
        assert_eq!(
            inspect(&change, &limits),
            Err(TooLarge::Objects { limit: 20_000 })
        );
        // A list, a text and a map of each kind are counted.
        let mut doc = AutoCommit::new();
        doc.put_object(ROOT, "l", ObjType::List).expect("list");
        doc.put_object(ROOT, "t", ObjType::Text).expect("text");
        doc.put_object(ROOT, "m", ObjType::Map).expect("map");
        doc.put(ROOT, "s", "x").expect("scalar");
        doc.commit();
        assert_eq!(inspect(&doc.save(), &limits).map(|s| s.objects), Ok(3));
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        let limits = DocLimits::default();
        assert!(inspect(b"not automerge", &limits).is_err());
        assert!(
            inspect(
                &[0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 0, 0xff, 0xff],
                &limits
            )
            .is_err()
        );
        let mut doc = list_doc(10);
        let bytes = doc.save();
        for cut in 1..bytes.len() {
            let _ = inspect(&bytes[..cut], &limits);
        }
    }

    #[test]
    fn json_depth_and_size_are_bounded() {
        let limits = DocLimits::default();
        let mut deep = serde_json::json!(1);
        for _ in 0..60 {
            deep = serde_json::json!({ "a": deep });
        }
        assert_eq!(
            check_json(&deep, &limits),
            Err(TooLarge::Depth { limit: 48 })
        );
        let wide = Value::Array(vec![Value::Null; 300_000]);
        assert!(matches!(
            check_json(&wide, &limits),
            Err(TooLarge::JsonNodes { .. })
        ));
        assert_eq!(
            check_json(&serde_json::json!({"resourceType": "Patient"}), &limits),
            Ok(())
        );
    }
}
