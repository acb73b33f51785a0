//! `/status` (the node, its standing, its peers) and `/quarantine` (refused changes).

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{ApiError, AppState};

/// Refused changes `/quarantine` lists, at most.
const QUARANTINE_LIMIT: usize = 1000;

pub(super) async fn status(State(st): State<AppState>) -> Result<Response, ApiError> {
    let stats = st.engine.stats().await?;
    let trust = st.engine.trust_summary();
    let scope = match st.engine.scope().await {
        Ok(v) => v,
        Err(e) => json!({"error": e.to_string()}),
    };
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
        "peers": connected.len(),
        "connected_peers": connected,
        "known_peers": peers,
        "quarantined": stats.quarantined,
        "trust": trust,
        "scope": scope,
        "last_seq": stats.last_seq,
        "version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response())
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
