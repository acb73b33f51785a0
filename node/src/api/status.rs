//! `/status` (the node, its standing, its peers) and `/quarantine` (refused changes).

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{ApiError, AppState};

/// The types `/status` counts under `held`.
const HELD_TYPES: &[&str] = &[
    "Patient",
    "Group",
    "Contract",
    "Claim",
    "ClaimResponse",
    "List",
    "InsurancePlan",
    "Location",
    "Organization",
    "Medication",
    "ActivityDefinition",
    "Practitioner",
];

/// Refused changes `/quarantine` lists, at most.
const QUARANTINE_LIMIT: usize = 1000;

pub(super) async fn status(State(st): State<AppState>) -> Result<Response, ApiError> {
    let stats = st.engine.stats().await?;
    let trust = st.engine.trust_summary();
    let scope = match st.engine.scope().await {
        Ok(v) => v,
        Err(e) => json!({"error": e.to_string()}),
    };
    // Open route: which resources are flagged and how, never their content or the numbers.
    let local = match st.engine.local_status().await {
        Ok(mut v) => {
            if let Some(list) = v.get_mut("flagged").and_then(Value::as_array_mut) {
                for f in list.iter_mut() {
                    if let Some(o) = f.as_object_mut() {
                        o.remove("reason");
                        o.remove("number");
                    }
                }
            }
            v
        }
        Err(e) => json!({"error": e.to_string()}),
    };
    // What this node holds, by type (the openIMIS resources a person asks about).
    let held = st
        .engine
        .read(|r| {
            let mut out = serde_json::Map::new();
            for ty in HELD_TYPES {
                let n = r.count_of_type(ty)?;
                if n > 0 {
                    out.insert((*ty).to_string(), json!(n));
                }
            }
            Ok(Value::Object(out))
        })
        .await
        .unwrap_or_else(|e| json!({"error": e.to_string()}));
    let i = &st.info;
    let peers = st.peers.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let connected: Vec<Value> = peers
        .iter()
        .filter(|(_, p)| p.connected)
        .map(|(id, p)| {
            let mut v = serde_json::to_value(p).unwrap_or(Value::Null);
            v["peer_id"] = Value::String(id.clone());
            v
        })
        .collect();
    Ok(Json(json!({
        "name": i.name,
        "role": i.role,
        "system": i.system,
        "peer_id": i.peer_id,
        "documents": stats.documents,
        "held": held,
        "peers": connected.len(),
        "connected_peers": connected,
        "known_peers": peers,
        "quarantined": stats.quarantined,
        "trust": trust,
        "scope": scope,
        "flagged": local["flagged"],
        "leased_numbers_left": local["leased_numbers_left"],
        "central": local.get("central"),
        "last_seq": stats.last_seq,
        "version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response())
}

/// `GET /flags`: the resources central flagged that this node holds, with the reasons an
/// app shows the officer (a number used twice, a number that fails the rule, a person
/// registered twice).
pub(super) async fn flags(State(st): State<AppState>) -> Result<Response, ApiError> {
    let local = st.engine.local_status().await?;
    let list = local["flagged"].clone();
    let n = list.as_array().map_or(0, Vec::len);
    Ok(Json(json!({"flagged": n, "resources": list})).into_response())
}

/// `POST /numbers/{kind}` (`chfid` or `claim-code`): the next number of this device's leases,
/// durably marked used before the answer, for an officer to write on a card.
pub(super) async fn reserve_number(
    State(st): State<AppState>,
    axum::extract::Path(kind): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let Some(k) = fieldmesh_fhir_docs::openimis::numbers::NumberKind::parse(&kind) else {
        return Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "not-found",
            format!("no kind of number {kind:?}: ask for /numbers/chfid or /numbers/claim-code"),
        ));
    };
    match st.engine.reserve(k).await? {
        Some(number) => Ok((
            axum::http::StatusCode::CREATED,
            Json(json!({"kind": k.name(), "number": number})),
        )
            .into_response()),
        None => Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "business-rule",
            format!(
                "this device holds no leased {} left: sync with the hub or central, which leases a new block to every certified device",
                k.label()
            ),
        )),
    }
}

pub(super) async fn quarantine(State(st): State<AppState>) -> Result<Response, ApiError> {
    let items = st.engine.quarantined(QUARANTINE_LIMIT).await?;
    let list: Vec<Value> = items
        .iter()
        .map(|q| {
            json!({
                "seq": q.seq,
                "reason": q.reason,
                "from": q.from,
                "doc": q.doc.map(|d| uuid::Uuid::from_bytes(d).to_string()),
                "resourceType": q.ty,
                "changes": q.changes,
                "bytes": q.bytes,
                "payload": hex::encode(q.payload),
            })
        })
        .collect();
    Ok(Json(json!({"quarantined": list.len(), "records": list})).into_response())
}
