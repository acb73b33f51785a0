//! Applying an update as the smallest set of Automerge edits.
//!
//! A FHIR `PUT` carries the whole new resource. Replacing the document's root would make every
//! update conflict with every concurrent update. Instead the stored and the new JSON are compared
//! and only what differs becomes an Automerge operation: a changed field is one `put`, a removed
//! field one `delete`, an object that changed inside is edited in place (so two devices that change
//! different fields of the same `name[0]` both keep their edit), and arrays keep their common prefix
//! and suffix, editing elements in place where both sides hold objects.

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjId, ObjType, Prop, ReadDoc};
use serde_json::{Map, Value};

use crate::convert::{json_to_hydrate, number_to_scalar};
use crate::error::ConvertError;

/// Edits `doc` so that its root reads as `new`, given that it currently reads as `old`.
///
/// Returns the number of operations issued (0 when nothing changed). The caller commits.
pub fn apply_diff(
    doc: &mut AutoCommit,
    old: &Map<String, Value>,
    new: &Map<String, Value>,
) -> Result<usize, ConvertError> {
    let mut ops = 0;
    diff_map(doc, &automerge::ROOT, old, new, &mut ops)?;
    Ok(ops)
}

fn diff_map(
    doc: &mut AutoCommit,
    obj: &ObjId,
    old: &Map<String, Value>,
    new: &Map<String, Value>,
    ops: &mut usize,
) -> Result<(), ConvertError> {
    for key in old.keys().filter(|k| !new.contains_key(*k)) {
        doc.delete(obj, key.as_str())?;
        *ops += 1;
    }
    for (key, nv) in new {
        match old.get(key) {
            Some(ov) if ov == nv => {}
            Some(ov) => edit(doc, obj, key.as_str().into(), ov, nv, ops)?,
            None => {
                put(doc, obj, key.as_str().into(), nv, false)?;
                *ops += 1;
            }
        }
    }
    Ok(())
}

/// Turns the value at `prop` from `ov` into `nv` (they differ), recursing into containers of the
/// same kind so that unchanged parts keep their identity.
fn edit(
    doc: &mut AutoCommit,
    obj: &ObjId,
    prop: Prop,
    ov: &Value,
    nv: &Value,
    ops: &mut usize,
) -> Result<(), ConvertError> {
    match (ov, nv) {
        (Value::Object(om), Value::Object(nm)) => {
            if let Some((automerge::Value::Object(ObjType::Map), child)) =
                doc.get(obj, prop.clone())?
            {
                return diff_map(doc, &child, om, nm, ops);
            }
        }
        (Value::Array(oa), Value::Array(na)) => {
            if let Some((automerge::Value::Object(ObjType::List), child)) =
                doc.get(obj, prop.clone())?
            {
                return diff_list(doc, &child, oa, na, ops);
            }
        }
        _ => {}
    }
    put(doc, obj, prop, nv, false)?;
    *ops += 1;
    Ok(())
}

fn diff_list(
    doc: &mut AutoCommit,
    list: &ObjId,
    old: &[Value],
    new: &[Value],
    ops: &mut usize,
) -> Result<(), ConvertError> {
    let prefix = old.iter().zip(new).take_while(|(a, b)| a == b).count();
    let max_suffix = old.len().min(new.len()) - prefix;
    let suffix = old
        .iter()
        .rev()
        .zip(new.iter().rev())
        .take(max_suffix)
        .take_while(|(a, b)| a == b)
        .count();
    let old_mid = &old[prefix..old.len() - suffix];
    let new_mid = &new[prefix..new.len() - suffix];
    let paired = old_mid.len().min(new_mid.len());
    for i in 0..paired {
        edit(
            doc,
            list,
            (prefix + i).into(),
            &old_mid[i],
            &new_mid[i],
            ops,
        )?;
    }
    for (i, nv) in new_mid.iter().enumerate().skip(paired) {
        put(doc, list, (prefix + i).into(), nv, true)?;
        *ops += 1;
    }
    for _ in paired..old_mid.len() {
        doc.delete(list, prefix + paired)?;
        *ops += 1;
    }
    Ok(())
}

/// Writes `v` at `prop`; `insert` inserts into a list instead of overwriting.
fn put(
    doc: &mut AutoCommit,
    obj: &ObjId,
    prop: Prop,
    v: &Value,
    insert: bool,
) -> Result<(), ConvertError> {
    let scalar = match v {
        Value::Object(_) | Value::Array(_) => {
            doc.batch_create_object(obj, prop, &json_to_hydrate(v), insert)?;
            return Ok(());
        }
        Value::Null => automerge::ScalarValue::Null,
        Value::Bool(b) => automerge::ScalarValue::Boolean(*b),
        Value::Number(n) => number_to_scalar(n),
        Value::String(s) => automerge::ScalarValue::Str(s.as_str().into()),
    };
    match (prop, insert) {
        (Prop::Seq(i), true) => doc.insert(obj, i, scalar)?,
        (prop, _) => doc.put(obj, prop, scalar)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::{document_to_json, new_document};
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn diff_reaches_the_new_value() {
        let a = obj(
            json!({"resourceType":"Patient","name":[{"family":"A","given":["x","y"]}],"gender":"male","x":[1,2,3,4]}),
        );
        let b = obj(
            json!({"resourceType":"Patient","name":[{"family":"B","given":["x","z","y"]}],"birthDate":"2000-01-01","x":[1,9,4,5]}),
        );
        let mut doc = new_document(&a, automerge::ActorId::random(), 0).unwrap();
        let n = apply_diff(&mut doc, &a, &b).unwrap();
        assert!(n > 0);
        assert_eq!(document_to_json(&doc).unwrap(), b);
        assert_eq!(apply_diff(&mut doc, &b, &b).unwrap(), 0);
    }

    #[test]
    fn a_one_field_update_is_small() {
        let a = obj(
            json!({"resourceType":"Patient","name":[{"family":"A","given":["x"]}],"gender":"male"}),
        );
        let mut b = a.clone();
        b.insert("gender".into(), json!("female"));
        let mut doc = new_document(&a, automerge::ActorId::random(), 0).unwrap();
        let heads = doc.get_heads();
        assert_eq!(apply_diff(&mut doc, &a, &b).unwrap(), 1);
        doc.commit();
        assert!(doc.save_after(&heads).len() < 200);
    }
}
