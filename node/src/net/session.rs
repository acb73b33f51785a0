//! One sync session on a libp2p stream: the protocol's [`Driver`] carried out with the engine
//! thread, under deadlines.
//!
//! Frames are length-prefixed on the stream; a length over [`MAX_FRAME`] is refused before
//! anything is allocated. Received batches merge while the next frames are read (at most
//! [`MERGES_IN_FLIGHT`] at once); the checkpoint is recorded only once every merge of the session
//! is durable. Every frame must arrive within [`Limits::frame`] and the whole session within
//! [`Limits::session`]: a peer that opens a stream and goes silent ends in a clear error, and the
//! node goes on syncing with the others.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use fieldmesh_engine::MergeReport;
use fieldmesh_protocol::{Driver, Limits, MAX_FRAME, Role, Step, Totals};
use fieldmesh_trust::PeerKey;
use futures::{AsyncReadExt, AsyncWriteExt};

use crate::engine_thread::EngineHandle;

/// Received batches being merged at once, at most: the engine thread prepares the next while the
/// last is committed, and answers each once it is durable (each batch is one frame, at most
/// 8 MiB).
pub const MERGES_IN_FLIGHT: usize = 4;

async fn write_frame(w: &mut (impl AsyncWriteExt + Unpin), frame: &[u8]) -> Result<()> {
    let len = u32::try_from(frame.len()).context("frame too large")?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(frame).await?;
    Ok(())
}

async fn read_frame(r: &mut (impl AsyncReadExt + Unpin)) -> Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)
        .await
        .context("the peer closed the stream")?;
    let len = u32::from_be_bytes(len) as usize;
    anyhow::ensure!(
        len <= MAX_FRAME,
        "the peer sent a {len}-byte frame (limit {MAX_FRAME})"
    );
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)
        .await
        .context("the peer closed the stream mid-frame")?;
    Ok(buf)
}

type Merging = tokio::task::JoinHandle<
    Result<MergeReport, crate::engine_thread::HandleError<fieldmesh_engine::MergeError>>,
>;

/// Runs one session with `peer` on `stream`, within the session deadline.
pub async fn drive(
    stream: libp2p::Stream,
    peer: PeerKey,
    role: Role,
    name: String,
    engine: EngineHandle,
    limits: Limits,
) -> Result<Totals> {
    let deadline = Duration::from_millis(limits.session);
    match tokio::time::timeout(deadline, run(stream, peer, role, name, engine, limits)).await {
        Ok(r) => r,
        Err(_) => Err(anyhow!(
            "the session took longer than {} s and was ended",
            deadline.as_secs()
        )),
    }
}

async fn run(
    stream: libp2p::Stream,
    peer: PeerKey,
    role: Role,
    name: String,
    engine: EngineHandle,
    limits: Limits,
) -> Result<Totals> {
    let start = engine.sync_start(peer, name).await?;
    let mut driver = Driver::new(role, start)?;
    let (mut r, mut w) = stream.split();
    let frame_wait = Duration::from_millis(limits.frame);
    let mut merging: VecDeque<Merging> = VecDeque::new();
    let mut todo: VecDeque<Step> = driver.start()?.into();
    loop {
        while let Some(step) = todo.pop_front() {
            match step {
                Step::Send(frame) => write_frame(&mut w, &frame).await?,
                Step::Read(ids) => {
                    let docs = engine.payloads(peer, ids).await?;
                    // The frames carrying them go out before the steps after this one.
                    for s in driver.docs_read(docs).into_iter().rev() {
                        todo.push_front(s);
                    }
                }
                Step::Outside(theirs) => {
                    let differ = engine.outside(peer, theirs).await?;
                    for s in driver.outside_held(differ).into_iter().rev() {
                        todo.push_front(s);
                    }
                }
                Step::Merge(docs) => {
                    if merging.len() >= MERGES_IN_FLIGHT
                        && let Some(oldest) = merging.pop_front()
                    {
                        let report = oldest.await.context("a merge task failed")??;
                        todo.extend(settled(&mut driver, report));
                    }
                    // Queued here, in the order the frames came; only the answer is awaited
                    // apart.
                    let answer = engine.queue_merge(docs, peer).await?;
                    merging.push_back(tokio::spawn(answer));
                }
                Step::Complete(checkpoint) => {
                    // Everything received is durable: from now on the peers can start from here.
                    if let Some(c) = checkpoint {
                        engine.record_checkpoint(peer, c).await?;
                    }
                    w.flush().await?;
                    let _ = w.close().await;
                    return Ok(driver.totals());
                }
            }
        }
        if driver.is_finished() {
            // Nothing more comes from the peer: wait for the merges, which complete the session.
            let Some(next) = merging.pop_front() else {
                return Err(anyhow!("the session ended without completing"));
            };
            let report = next.await.context("a merge task failed")??;
            todo.extend(settled(&mut driver, report));
            continue;
        }
        w.flush().await?;
        let frame = match tokio::time::timeout(frame_wait, read_frame(&mut r)).await {
            Ok(f) => f?,
            Err(_) => {
                return Err(anyhow!(
                    "the peer stopped answering: no frame for {} s",
                    frame_wait.as_secs()
                ));
            }
        };
        todo.extend(driver.receive(&frame)?);
    }
}

fn settled(driver: &mut Driver, report: MergeReport) -> Vec<Step> {
    if report.refused > 0 {
        tracing::warn!(
            refused = report.refused,
            "documents refused in a sync session"
        );
    }
    driver.outside_found((report.stale + report.outside) as u64);
    driver.merged(report.changed)
}
