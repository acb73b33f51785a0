//! `fieldmesh cert`: issue, install, revoke and show certificates.

use anyhow::{Context, Result, bail};
use fieldmesh_node::certs;
use fieldmesh_node::config::DataDir;
use fieldmesh_node::node;

use crate::CertCommand;

/// Runs a `fieldmesh cert` command.
pub fn run(cmd: CertCommand) -> Result<()> {
    match cmd {
        CertCommand::Issue {
            data,
            subject,
            user,
            role,
            location,
            facility,
            days,
            renewal,
            out,
        } => {
            let central = DataDir::open(&data)?;
            let file = certs::issue(
                &central,
                &certs::IssueRequest {
                    subject,
                    user,
                    roles: role,
                    locations: location,
                    facilities: facility,
                    days,
                    renewal,
                },
            )?;
            std::fs::write(&out, serde_json::to_vec_pretty(&file)?)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!("issued: {}", certs::describe(&file.certificate));
            match node::open_engine(&central) {
                Ok(mut engine) => {
                    certs::install(&mut engine, &file, "cert issue")?;
                    println!("central holds it and will sync it to every node");
                }
                Err(e)
                    if matches!(
                        e.downcast_ref::<fieldmesh_storage::StoreError>(),
                        Some(fieldmesh_storage::StoreError::InUse(_))
                    ) =>
                {
                    println!(
                        "central is running; it receives the certificate when the device syncs"
                    )
                }
                Err(e) => {
                    return Err(e.context(
                        "the certificate file is written, but central's store could not take it",
                    ));
                }
            }
            println!(
                "install it on the device: fieldmesh cert install --data DEVICE-DIR {}",
                out.display()
            );
            Ok(())
        }
        CertCommand::Install { data, file } => {
            let dir = DataDir::open(&data)?;
            let cert_file = certs::read_file(&file)?;
            let mut engine = node::open_engine(&dir)?;
            let cert = certs::install(
                &mut engine,
                &cert_file,
                &format!("certificate file {}", file.display()),
            )?;
            println!("installed: {}", certs::describe(&cert));
            if cert.subject != hex::encode(dir.public_key()) {
                println!(
                    "note: this certificate is for another device ({}); this node keeps it and passes it on",
                    certs::short_peer(&cert.subject)
                );
            }
            Ok(())
        }
        CertCommand::Revoke {
            data,
            subject,
            reason,
        } => {
            let central = DataDir::open(&data)?;
            if central.root_key()? != central.public_key() {
                bail!("revocations are issued on central, the root of trust");
            }
            let mut engine = node::open_engine(&central)?;
            let rev = certs::revoke(&mut engine, &central, &subject, &reason)?;
            println!(
                "revocation #{} of {subject} recorded; it reaches every node with the next syncs",
                rev.number
            );
            Ok(())
        }
        CertCommand::Show { data, all } => {
            let dir = DataDir::open(&data)?;
            let engine = node::open_engine(&dir)?;
            let trust = engine.trust();
            println!("root of trust (central): {}", dir.config.trust.root);
            let me = dir.public_key();
            if *trust.root() == me {
                println!("this node is central, the root of trust");
            }
            let mine = trust.certificates(&me);
            if mine.is_empty() && *trust.root() != me {
                println!(
                    "this node ({}) has no certificate: it can neither write nor be served",
                    dir.peer_id()
                );
            }
            for c in mine {
                println!("this node: {}", certs::describe(c));
            }
            if let Some(r) = trust.revoked(&me, u32::MAX) {
                println!("REVOKED (#{}): {}", r.number, r.reason);
            }
            if all {
                let (certs_all, revs) = trust.all();
                println!("{} certificate(s):", certs_all.len());
                for c in certs_all {
                    println!("  {}", certs::describe(c));
                }
                println!("{} revocation(s):", revs.len());
                for r in revs {
                    println!(
                        "  #{} {}: {}",
                        r.number,
                        certs::short_peer(&r.subject),
                        r.reason
                    );
                }
            }
            Ok(())
        }
    }
}
