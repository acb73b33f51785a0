//! `fieldmesh init`: create a node.

use std::path::Path;

use anyhow::Result;
use fieldmesh_node::config::{DataDir, Role};

/// Creates a node in `data` and says what to do next.
pub fn run(
    data: &Path,
    role: Role,
    name: &str,
    system: Option<String>,
    root: Option<&str>,
) -> Result<()> {
    let dir = DataDir::init(data, name, role, system, root)?;
    println!("created {role} node {name} in {}", data.display());
    println!("peer id: {}", dir.peer_id());
    println!("identifier system: {}", dir.config.system);
    if role == Role::Central {
        println!(
            "this node is the root of trust; give hubs and devices --root {}",
            dir.peer_id()
        );
    } else {
        println!(
            "it can write and sync once it holds a certificate: on central, `fieldmesh cert issue --subject {} ...`, then `fieldmesh cert install --data {} FILE`",
            dir.peer_id(),
            data.display()
        );
    }
    println!("API token: fieldmesh token --data {}", data.display());
    println!("start it with: fieldmesh run --data {}", data.display());
    Ok(())
}
