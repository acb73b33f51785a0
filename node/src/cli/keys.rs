//! `fieldmesh id` and `fieldmesh token`: a node's peer id and API token.

use std::path::Path;

use anyhow::Result;
use fieldmesh_node::config::DataDir;

/// Prints the node's peer id.
pub fn id(data: &Path) -> Result<()> {
    println!("{}", DataDir::open(data)?.peer_id());
    Ok(())
}

/// Prints the bearer token of the node's API.
pub fn token(data: &Path) -> Result<()> {
    println!("{}", DataDir::open(data)?.token()?);
    Ok(())
}
