//! Raft snapshots as etcd takes them: a promise, not a copy.
//!
//! The store is durable on its own (every apply is a RocksDB write in the WAL that the
//! log's syncs make durable), so a snapshot exists only to let the log behind it go. Taking
//! one therefore writes nothing but a WAL sync: the state machine notes the log id it has
//! applied (`StateMachine::build_snapshot`). Only a follower too far behind for the log
//! needs the data, and it gets the store as it stands when the leader sends it
//! ([`LiveStore::export`]): the export carries its own applied log id and membership, at
//! or past the snapshot's, and the follower installs it under those. It then skips the
//! entries up to them that the leader goes on to send, as openraft does for every entry
//! at or below its commit.
//!
//! Writing the whole store out at every snapshot cost a copy of the store per plane each
//! `--snapshot-count` entries: 200 MB per plane after 20 s of put 16:256 (every version
//! of every key), written while the next writes' fsyncs waited behind it.

use std::path::{Path, PathBuf};

use openraft::{ErrorVerb, SnapshotMeta};
use tempfile::NamedTempFile;
use tokio::io::AsyncWriteExt;

use capstan_store::Store;

use crate::error::DecodeError;
use crate::state_machine::{decode_applied, snapshot_error, META_APPLIED, META_BATCH_PROGRESS, META_MEMBERSHIP};
use crate::types::{NodeId, PeerNode, StorageError};

/// openraft's `SnapshotData`.
#[derive(Debug)]
pub enum SnapshotData {
    /// This plane's own snapshot: its store, exported when it is sent.
    Live(LiveStore),
    /// A snapshot arriving from the leader, written to a file as it comes.
    Received(ReceivedFile),
}

/// A plane's store and where its snapshot exports go.
#[derive(Clone)]
pub struct LiveStore {
    pub(crate) store: Store,
    pub(crate) dir: PathBuf,
}

impl std::fmt::Debug for LiveStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveStore").field("dir", &self.dir).finish()
    }
}

impl LiveStore {
    /// Writes the store as it stands to a new file (removed when the file is dropped), and
    /// returns it with the meta it was taken at: the log id applied then, and the
    /// membership. Blocks for as long as writing the whole store takes.
    pub fn export(&self) -> Result<(NamedTempFile, SnapshotMeta<NodeId, PeerNode>), StorageError> {
        let write_error = |error| snapshot_error(ErrorVerb::Write, error);
        let file = temp_file(&self.dir, "sending-").map_err(write_error)?;
        // The export and the applied state come from one RocksDB snapshot.
        let exported = self
            .store
            .export(file.path(), &[META_APPLIED, META_MEMBERSHIP, META_BATCH_PROGRESS])
            .map_err(|error| snapshot_error(ErrorVerb::Write, error))?;
        let (last_log_id, last_membership) =
            decode_applied(exported.meta[0].as_deref(), exported.meta[1].as_deref())
                .map_err(|error| snapshot_error(ErrorVerb::Read, DecodeError::from(error)))?;
        tracing::info!(bytes = exported.bytes, "exported the store for a snapshot");
        Ok((file, SnapshotMeta { last_log_id, snapshot_id: snapshot_id(&last_log_id), last_membership }))
    }
}

/// A snapshot's name: the log id it covers.
pub(crate) fn snapshot_id(last_log_id: &Option<openraft::LogId<NodeId>>) -> String {
    match last_log_id {
        Some(id) => format!("{}-{}-{}", id.leader_id.term, id.leader_id.node_id, id.index),
        None => "empty".to_string(),
    }
}

/// A new file in `dir`, removed when dropped.
fn temp_file(dir: &Path, prefix: &str) -> std::io::Result<NamedTempFile> {
    tempfile::Builder::new().prefix(prefix).suffix(".snap").tempfile_in(dir)
}

/// A snapshot arriving from the leader: its bytes so far, in a file removed when this is
/// dropped (installed or not).
#[derive(Debug)]
pub struct ReceivedFile {
    path: tempfile::TempPath,
    file: tokio::fs::File,
}

impl ReceivedFile {
    pub(crate) fn create(dir: &Path) -> std::io::Result<ReceivedFile> {
        let (file, path) = temp_file(dir, "receiving-")?.into_parts();
        Ok(ReceivedFile { path, file: tokio::fs::File::from_std(file) })
    }

    /// Appends the next bytes of the snapshot.
    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes).await
    }

    /// Makes what arrived durable and checks that it is one whole, undamaged export (a
    /// stream cut short ends like a whole one), before anything is installed from it.
    pub async fn finish(&mut self) -> Result<(), capstan_store::StoreError> {
        self.file.flush().await?;
        self.file.sync_all().await?;
        let path = self.path.to_path_buf();
        tokio::task::spawn_blocking(move || capstan_store::check_snapshot(&path))
            .await
            .map_err(|error| capstan_store::StoreError::Io(std::io::Error::other(error)))?
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}
