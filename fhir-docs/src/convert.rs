//! Lossless FHIR JSON ⇄ Automerge conversion.
//!
//! The root map of a document is the resource JSON. JSON objects become Automerge maps, arrays become
//! lists (order kept), strings become [`ScalarValue::Str`] (never `Text`: codes and dates are atoms,
//! not character sequences), booleans and `null` (allowed inside FHIR primitive-extension arrays such
//! as `_given`) map to their scalars.
//!
//! Numbers never pass through `f64` unless that is exact. FHIR decimals carry meaning in their text
//! (`10.50` has two significant decimals), so a JSON number is stored as:
//! - [`ScalarValue::Int`] when its text is a canonical 64-bit integer (`42`, `-7`);
//! - [`ScalarValue::F64`] when formatting the parsed `f64` gives back exactly the same text (`10.5`),
//!   so other Automerge implementations see an ordinary number;
//! - otherwise a scalar of the *unknown* type code [`DECIMAL_TYPE_CODE`] whose bytes are the exact
//!   decimal text (`10.50`, `1e3`, `0.30000000000000004000`). Automerge keeps unknown scalars
//!   verbatim through save, load, merge and sync, so every implementation loads the document.

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjType, ReadDoc, ScalarValue, hydrate};
use serde_json::{Map, Number, Value};

use crate::error::ConvertError;

/// Type code of the Automerge "unknown" scalar that carries a decimal's exact text.
///
/// Codes 10..=15 are reserved by the Automerge format for future types and preserved verbatim.
pub const DECIMAL_TYPE_CODE: u8 = 14;

/// Converts a JSON number to the scalar that stores it without loss (see the module docs).
pub fn number_to_scalar(n: &Number) -> ScalarValue {
    let text = n.to_string();
    if let Ok(i) = text.parse::<i64>()
        && i.to_string() == text
    {
        return ScalarValue::Int(i);
    }
    if let Ok(f) = text.parse::<f64>()
        && f.is_finite()
        && let Some(back) = Number::from_f64(f)
        && back.to_string() == text
    {
        return ScalarValue::F64(f);
    }
    ScalarValue::Unknown {
        type_code: DECIMAL_TYPE_CODE,
        bytes: text.into_bytes(),
    }
}

/// Converts a scalar back to JSON; the inverse of the JSON → scalar mapping.
pub fn scalar_to_json(s: &ScalarValue) -> Result<Value, ConvertError> {
    Ok(match s {
        ScalarValue::Str(s) => Value::String(s.to_string()),
        ScalarValue::Int(i) => Value::Number((*i).into()),
        ScalarValue::Uint(u) => Value::Number((*u).into()),
        ScalarValue::F64(f) => Number::from_f64(*f)
            .map(Value::Number)
            .ok_or(ConvertError::NonFiniteNumber)?,
        ScalarValue::Boolean(b) => Value::Bool(*b),
        ScalarValue::Null => Value::Null,
        ScalarValue::Unknown { type_code, bytes } if *type_code == DECIMAL_TYPE_CODE => {
            let text = std::str::from_utf8(bytes).map_err(|_| ConvertError::BadDecimal)?;
            let n: Number = text.parse().map_err(|_| ConvertError::BadDecimal)?;
            Value::Number(n)
        }
        ScalarValue::Counter(c) => Value::Number(i64::from(c).into()),
        ScalarValue::Timestamp(t) => Value::Number((*t).into()),
        ScalarValue::Bytes(_) | ScalarValue::Unknown { .. } => {
            return Err(ConvertError::UnsupportedScalar(format!("{s:?}")));
        }
    })
}

/// [`scalar_to_json`] of a scalar read in place (its text copied once, into the JSON).
fn scalar_ref_to_json(s: automerge::ScalarValueRef<'_>) -> Result<Value, ConvertError> {
    use automerge::ScalarValueRef as R;
    Ok(match s {
        R::Str(s) => Value::String(s.into_owned()),
        R::Int(i) => Value::Number(i.into()),
        R::Uint(u) => Value::Number(u.into()),
        R::Boolean(b) => Value::Bool(b),
        R::Null => Value::Null,
        R::Timestamp(t) => Value::Number(t.into()),
        other => scalar_to_json(&ScalarValue::from(other))?,
    })
}

/// Builds the hydrate value of a JSON value (used to create whole subtrees in one batch).
pub fn json_to_hydrate(v: &Value) -> hydrate::Value {
    match v {
        Value::Null => hydrate::Value::Scalar(ScalarValue::Null),
        Value::Bool(b) => hydrate::Value::Scalar(ScalarValue::Boolean(*b)),
        Value::Number(n) => hydrate::Value::Scalar(number_to_scalar(n)),
        Value::String(s) => hydrate::Value::Scalar(ScalarValue::Str(s.as_str().into())),
        Value::Array(items) => {
            hydrate::Value::from(items.iter().map(json_to_hydrate).collect::<Vec<_>>())
        }
        Value::Object(map) => hydrate::Value::Map(json_map_to_hydrate(map)),
    }
}

fn json_map_to_hydrate(map: &Map<String, Value>) -> hydrate::Map {
    map.iter()
        .map(|(k, v)| (k.clone(), json_to_hydrate(v)))
        .collect::<std::collections::HashMap<String, hydrate::Value>>()
        .into()
}

/// Creates a new document whose root map holds `resource` (a JSON object), as one change.
pub fn new_document(
    resource: &Map<String, Value>,
    actor: automerge::ActorId,
    time: i64,
) -> Result<AutoCommit, ConvertError> {
    let mut doc = AutoCommit::new().with_actor(actor);
    doc.init_root_from_hydrate(&json_map_to_hydrate(resource))?;
    doc.commit_with(automerge::transaction::CommitOptions::default().with_time(time));
    Ok(doc)
}

/// How deeply objects and arrays may nest in a document (a FHIR resource nests about a dozen
/// levels; a document nested deeper is refused rather than read, whoever sent it).
pub const MAX_DEPTH: usize = 48;

/// Reads the whole document back as a JSON object (map keys in sorted order, arrays in order).
/// A document nested deeper than [`MAX_DEPTH`] is refused ([`ConvertError::TooDeep`]).
///
/// One pass over the whole document (`ReadDoc::iter`, parents before children), the objects
/// assembled at the end: a third of the cost of ranging over each object in turn
/// ([`document_to_json_by_object`], which documents holding `Text` or `Table` objects still
/// take).
pub fn document_to_json(doc: &impl ReadDoc) -> Result<Map<String, Value>, ConvertError> {
    match one_pass(doc)? {
        Some(json) => Ok(json),
        None => document_to_json_by_object(doc),
    }
}

/// [`document_to_json`] ranging over each object in turn.
pub fn document_to_json_by_object(doc: &impl ReadDoc) -> Result<Map<String, Value>, ConvertError> {
    match read_object(doc, &automerge::ROOT, ObjType::Map)? {
        Value::Object(m) => Ok(m),
        _ => Err(ConvertError::RootNotMap),
    }
}

/// An object being assembled.
enum Node {
    Map(Map<String, Value>),
    List(Vec<Value>),
}

/// Where an object sits in its parent.
enum Slot {
    Key(String),
    Index(usize),
}

/// The document as JSON in one pass; `None` when it holds a `Text` or `Table` object.
fn one_pass(doc: &impl ReadDoc) -> Result<Option<Map<String, Value>>, ConvertError> {
    use std::collections::HashMap;
    use std::sync::Arc;

    use automerge::iter::DocItem;

    let mut nodes: Vec<Node> = vec![Node::Map(Map::new())];
    let mut depth: Vec<usize> = vec![1];
    let mut index: HashMap<automerge::ObjId, usize> = HashMap::new();
    index.insert(automerge::ROOT, 0);
    // (parent, slot, child), in the order the children were met.
    let mut links: Vec<(usize, Slot, usize)> = Vec::new();
    let mut current: Option<(Arc<automerge::ObjId>, usize)> = None;
    for item in doc.iter() {
        let at = match &current {
            Some((obj, at)) if Arc::ptr_eq(obj, &item.obj) => *at,
            _ => {
                let at = *index.get(&*item.obj).ok_or(ConvertError::RootNotMap)?;
                current = Some((Arc::clone(&item.obj), at));
                at
            }
        };
        let (value, child, slot) = match item.item {
            DocItem::Map(m) => {
                let child = matches!(m.value, automerge::ValueRef::Object(_)).then(|| m.id());
                (m.value, child, Slot::Key(m.key.into_owned()))
            }
            DocItem::List(l) => {
                let child = matches!(l.value, automerge::ValueRef::Object(_)).then(|| l.id());
                (l.value, child, Slot::Index(l.index))
            }
            DocItem::Text(_) => return Ok(None),
        };
        let json = match (value, child) {
            (automerge::ValueRef::Scalar(s), _) => scalar_ref_to_json(s)?,
            (automerge::ValueRef::Object(ty), Some(id)) => {
                let node = match ty {
                    ObjType::Map => Node::Map(Map::new()),
                    ObjType::List => Node::List(Vec::new()),
                    // The document iterator walks a table as a list: read object by object.
                    ObjType::Table | ObjType::Text => return Ok(None),
                };
                let d = depth[at] + 1;
                if d > MAX_DEPTH {
                    return Err(ConvertError::TooDeep(MAX_DEPTH));
                }
                let n = nodes.len();
                nodes.push(node);
                depth.push(d);
                index.insert(id, n);
                let placeholder = match &slot {
                    Slot::Key(k) => Slot::Key(k.clone()),
                    Slot::Index(i) => Slot::Index(*i),
                };
                links.push((at, placeholder, n));
                Value::Null
            }
            (automerge::ValueRef::Object(_), None) => return Err(ConvertError::RootNotMap),
        };
        place(&mut nodes[at], slot, json)?;
    }
    // Children were met after their parents: fill the deepest first.
    for (parent, slot, child) in links.into_iter().rev() {
        let value = match std::mem::replace(&mut nodes[child], Node::List(Vec::new())) {
            Node::Map(m) => Value::Object(m),
            Node::List(l) => Value::Array(l),
        };
        place(&mut nodes[parent], slot, value)?;
    }
    match nodes.into_iter().next() {
        Some(Node::Map(m)) => Ok(Some(m)),
        _ => Err(ConvertError::RootNotMap),
    }
}

/// Puts `value` at `slot` of `node` (over the placeholder a child left there).
fn place(node: &mut Node, slot: Slot, value: Value) -> Result<(), ConvertError> {
    match (node, slot) {
        (Node::Map(m), Slot::Key(k)) => {
            // Over a placeholder, the value keeps the placeholder's place in the key order.
            m.insert(k, value);
            Ok(())
        }
        (Node::List(l), Slot::Index(i)) => {
            if i == l.len() {
                l.push(value);
            } else if i < l.len() {
                l[i] = value;
            } else {
                l.resize(i, Value::Null);
                l.push(value);
            }
            Ok(())
        }
        _ => Err(ConvertError::RootNotMap),
    }
}

/// Reads only the root fields `keys` of a document (those it has), as JSON: what a service that
/// looks at a few fields needs, for a fraction of [`document_to_json`]'s work on a large
/// resource. An edit computed from such a partial view touches only those fields.
pub fn document_fields(
    doc: &impl ReadDoc,
    keys: &[&str],
) -> Result<Map<String, Value>, ConvertError> {
    let mut out = Map::new();
    for key in keys {
        let Some((value, id)) = doc.get(automerge::ROOT, *key)? else {
            continue;
        };
        let child = matches!(value, automerge::Value::Object(_)).then_some(id);
        out.insert(
            (*key).to_string(),
            read_item(doc, value.into_owned(), child, 1)?,
        );
    }
    Ok(out)
}

/// Reads the object `obj` (of type `ty`) as JSON, nested at most [`MAX_DEPTH`] levels.
pub fn read_object(
    doc: &impl ReadDoc,
    obj: &automerge::ObjId,
    ty: ObjType,
) -> Result<Value, ConvertError> {
    read_nested(doc, obj, ty, 1)
}

/// Values are taken from the range iterators directly (one pass per object); looking each key up
/// again with `get` cost several times more.
fn read_nested(
    doc: &impl ReadDoc,
    obj: &automerge::ObjId,
    ty: ObjType,
    depth: usize,
) -> Result<Value, ConvertError> {
    if depth > MAX_DEPTH {
        return Err(ConvertError::TooDeep(MAX_DEPTH));
    }
    match ty {
        ObjType::Map | ObjType::Table => {
            let mut out = Map::new();
            for item in doc.map_range(obj, ..) {
                let key = item.key.to_string();
                let child = matches!(item.value, automerge::ValueRef::Object(_)).then(|| item.id());
                let value: automerge::Value<'static> = item.value.into();
                out.insert(key, read_item(doc, value, child, depth)?);
            }
            Ok(Value::Object(out))
        }
        ObjType::List => {
            let mut out = Vec::with_capacity(doc.length(obj));
            for item in doc.list_range(obj, ..) {
                let child = matches!(item.value, automerge::ValueRef::Object(_)).then(|| item.id());
                let value: automerge::Value<'static> = item.value.into();
                out.push(read_item(doc, value, child, depth)?);
            }
            Ok(Value::Array(out))
        }
        ObjType::Text => Ok(Value::String(doc.text(obj)?)),
    }
}

fn read_item(
    doc: &impl ReadDoc,
    value: automerge::Value<'static>,
    child: Option<automerge::ObjId>,
    depth: usize,
) -> Result<Value, ConvertError> {
    match (value, child) {
        (automerge::Value::Scalar(s), _) => scalar_to_json(&s),
        (automerge::Value::Object(ty), Some(id)) => read_nested(doc, &id, ty, depth + 1),
        (automerge::Value::Object(_), None) => Err(ConvertError::RootNotMap),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn roundtrip(v: Value) -> Value {
        let Value::Object(m) = v else {
            panic!("not an object")
        };
        let mut doc = new_document(&m, automerge::ActorId::random(), 0).unwrap();
        let bytes = doc.save();
        let loaded = AutoCommit::load(&bytes).unwrap();
        Value::Object(document_to_json(&loaded).unwrap())
    }

    #[test]
    fn decimals_keep_their_text() {
        let src = r#"{"resourceType":"Claim","total":{"value":10.50,"currency":"TZS"},
            "item":[{"unitPrice":{"value":1500.00}},{"unitPrice":{"value":10.5}},{"factor":1e3},
            {"q":0.30000000000000004000},{"n":-0},{"big":123456789012345678901234567890}]}"#;
        let v: Value = serde_json::from_str(src).unwrap();
        let back = roundtrip(v.clone());
        assert_eq!(back, v);
        let text = serde_json::to_string(&back).unwrap();
        assert!(text.contains("10.50"), "{text}");
        assert!(text.contains("1500.00"), "{text}");
        // serde_json spells exponents with an explicit sign; the value and its digits are kept.
        assert!(text.contains("1e+3"), "{text}");
        assert!(text.contains("123456789012345678901234567890"), "{text}");
    }

    #[test]
    fn scalars_are_typed() {
        assert_eq!(
            number_to_scalar(&"42".parse().unwrap()),
            ScalarValue::Int(42)
        );
        assert_eq!(
            number_to_scalar(&"10.5".parse().unwrap()),
            ScalarValue::F64(10.5)
        );
        assert!(matches!(
            number_to_scalar(&"10.50".parse().unwrap()),
            ScalarValue::Unknown {
                type_code: DECIMAL_TYPE_CODE,
                ..
            }
        ));
    }

    #[test]
    fn unicode_and_nulls_survive() {
        let v = json!({"resourceType":"Patient","name":[{"family":"Abdoulaye Maïga","given":["Zoé","عبد الله"]}],
            "_birthDate": {"extension": []}, "x": {"_given": [null, {"id": "a"}]}});
        assert_eq!(roundtrip(v.clone()), v);
    }

    #[test]
    fn a_document_nested_past_the_limit_is_refused_not_overflowed() {
        let mut doc = AutoCommit::new();
        let mut obj = automerge::ROOT;
        for _ in 0..(MAX_DEPTH + 50) {
            obj = doc.put_object(&obj, "a", ObjType::Map).unwrap();
        }
        doc.commit();
        let loaded = AutoCommit::load(&doc.save()).unwrap();
        assert!(matches!(
            document_to_json(&loaded),
            Err(ConvertError::TooDeep(MAX_DEPTH))
        ));
    }

    #[test]
    fn strings_are_scalars_not_text() {
        let m = json!({"resourceType":"Patient","birthDate":"1990-01-01"});
        let Value::Object(m) = m else { unreachable!() };
        let doc = new_document(&m, automerge::ActorId::random(), 0).unwrap();
        let (v, _) = doc.get(automerge::ROOT, "birthDate").unwrap().unwrap();
        assert!(matches!(v, automerge::Value::Scalar(_)));
    }
}
