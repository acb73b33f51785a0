//! `fieldmesh quarantine`: the changes this node refused, with why and from whom.

use std::path::Path;

use anyhow::{Context, Result};
use fieldmesh_node::config::DataDir;
use fieldmesh_storage::{RedbStore, StoreOptions};
use serde_json::Value;

/// Lists what the node in `data` refused (asking its API if it is running).
pub fn run(data: &Path, limit: usize) -> Result<()> {
    let dir = DataDir::open(data)?;
    let items: Vec<(String, String, u64, u64)> =
        match RedbStore::open(dir.store_path(), StoreOptions::default()) {
            Ok(store) => {
                use fieldmesh_storage::Store as _;
                store
                    .quarantined(limit)?
                    .into_iter()
                    .map(|q| (q.reason, q.from, u64::from(q.changes), q.bytes))
                    .collect()
            }
            Err(fieldmesh_storage::StoreError::InUse(_)) => {
                // The node is running: ask its API.
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .build()
                    .into();
                let mut r = agent
                    .get(format!("http://{}/quarantine", dir.api_addr()))
                    .header("Authorization", format!("Bearer {}", dir.token()?))
                    .call()
                    .context("the node is running but its API does not answer")?;
                let v: Value = r.body_mut().read_json()?;
                v["records"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .take(limit)
                    .map(|c| {
                        (
                            c["reason"].as_str().unwrap_or_default().to_string(),
                            c["from"].as_str().unwrap_or_default().to_string(),
                            c["changes"].as_u64().unwrap_or_default(),
                            c["bytes"].as_u64().unwrap_or_default(),
                        )
                    })
                    .collect()
            }
            Err(e) => return Err(e.into()),
        };
    if items.is_empty() {
        println!("{}: nothing in quarantine", dir.config.name);
    } else {
        println!(
            "{}: {} refused payload(s), kept but never applied or forwarded:",
            dir.config.name,
            items.len()
        );
        for (reason, from, changes, bytes) in items {
            println!(
                "  {reason}\n      from {from}: {changes} change(s) refused, {bytes} bytes kept"
            );
        }
    }
    Ok(())
}
