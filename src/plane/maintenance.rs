//! etcd's Maintenance service: status, alarms, defragment, hash, and Snapshot: a backup
//! of the whole store at one moment, streamed in chunks. The stream is a Capstan snapshot
//! file (not etcd's bbolt file) sealed with a SHA-256 as etcd seals its own, so etcdctl
//! saves it too; `capstan ctl snapshot save` checks it and `capstan plane --restore`
//! starts a new cluster from it.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};

use capstan_proto::etcdserverpb::{self as pb, maintenance_server::Maintenance};

use super::Plane;

/// The etcd API version Capstan reports; clients use it to decide which features exist.
pub const ETCD_API_VERSION: &str = "3.5.0";

pub struct MaintenanceService(pub Arc<Plane>);

/// Where a plane writes a backup before it streams it (under its data directory; emptied
/// when the plane starts).
pub(super) const BACKUP_DIR: &str = "backups";

/// A backup file on disk, deleted when dropped.
struct BackupFile(std::path::PathBuf);

impl Drop for BackupFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
/// A backup travels in chunks of this size.
const BACKUP_CHUNK_BYTES: usize = 1 << 20;

/// Streams the backup file at `path` in chunks, each with how much is left; stops early
/// when the client has gone.
async fn send_backup(
    path: &std::path::Path,
    header: &Option<pb::ResponseHeader>,
    chunks: &tokio::sync::mpsc::Sender<Result<pb::SnapshotResponse, Status>>,
) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path).await?;
    let mut remaining = file.metadata().await?.len();
    while remaining > 0 {
        let mut blob = vec![0; BACKUP_CHUNK_BYTES.min(remaining as usize)];
        file.read_exact(&mut blob).await?;
        remaining -= blob.len() as u64;
        let chunk = pb::SnapshotResponse { header: *header, remaining_bytes: remaining, blob };
        if chunks.send(Ok(chunk)).await.is_err() {
            break;
        }
    }
    Ok(())
}

fn not_served(what: &str) -> Status {
    Status::unimplemented(format!("capstan: {what} is not served yet"))
}

impl Plane {
    pub(super) fn alarm_members(&self) -> Vec<pb::AlarmMember> {
        let alarms = self.alarms.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut members = Vec::new();
        if alarms.no_space {
            members.push(pb::AlarmMember { member_id: self.node_id, alarm: pb::AlarmType::Nospace as i32 });
        }
        members
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, request: Request<pb::AlarmRequest>) -> Result<Response<pb::AlarmResponse>, Status> {
        use pb::alarm_request::AlarmAction;
        let plane = &self.0;
        if request.get_ref().action != AlarmAction::Get as i32 {
            plane.require_admin(&request, "Alarm")?;
        }
        let request = request.into_inner();
        let nospace = request.alarm == pb::AlarmType::Nospace as i32 || request.alarm == pb::AlarmType::None as i32;
        match AlarmAction::try_from(request.action) {
            Ok(AlarmAction::Get) => {}
            Ok(AlarmAction::Activate) if nospace => {
                plane.alarms.lock().unwrap_or_else(|p| p.into_inner()).no_space = true
            }
            Ok(AlarmAction::Deactivate) if nospace => {
                tracing::info!("NOSPACE alarm disarmed");
                plane.alarms.lock().unwrap_or_else(|p| p.into_inner()).no_space = false;
            }
            _ => return Err(Status::invalid_argument("etcdserver: unsupported alarm action or type")),
        }
        Ok(Response::new(pb::AlarmResponse {
            header: plane.header(plane.store.revision()),
            alarms: plane.alarm_members(),
        }))
    }

    async fn status(&self, _request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let plane = &self.0;
        let metrics = plane.raft.metrics().borrow().clone();
        let db_size = plane.store.size_bytes() as i64;
        let voters: Vec<u64> = metrics.membership_config.membership().voter_ids().collect();
        let errors = plane.alarm_members().iter().map(|_| "NOSPACE".to_string()).collect();
        Ok(Response::new(pb::StatusResponse {
            header: plane.header(plane.store.revision()),
            version: ETCD_API_VERSION.to_string(),
            db_size,
            leader: metrics.current_leader.unwrap_or(0),
            raft_index: metrics.last_log_index.unwrap_or(0),
            raft_term: metrics.current_term,
            raft_applied_index: metrics.last_applied.map_or(0, |id| id.index),
            errors,
            db_size_in_use: db_size,
            is_learner: !voters.contains(&plane.node_id),
        }))
    }

    async fn defragment(
        &self,
        request: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        self.0.require_admin(&request, "Defragment")?;
        let plane = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let db = plane.store.db();
            for name in capstan_store::codec::STORE_COLUMN_FAMILIES {
                if let Some(family) = db.cf_handle(name) {
                    db.compact_range_cf(family, None::<&[u8]>, None::<&[u8]>);
                }
            }
        })
        .await
        .map_err(|error| Status::internal(error.to_string()))?;
        Ok(Response::new(pb::DefragmentResponse { header: self.0.header(self.0.store.revision()) }))
    }

    async fn hash(&self, _request: Request<pb::HashRequest>) -> Result<Response<pb::HashResponse>, Status> {
        Err(not_served("Hash"))
    }

    async fn hash_kv(&self, request: Request<pb::HashKvRequest>) -> Result<Response<pb::HashKvResponse>, Status> {
        self.0.require_admin(&request, "HashKV")?;
        let plane = self.0.clone();
        let revision = request.into_inner().revision;
        let hashed = tokio::task::spawn_blocking(move || {
            let reader = plane.store.reader();
            Ok::<_, capstan_store::StoreError>((reader.revision()?, reader.hash_kv(revision)?))
        })
        .await
        .map_err(|error| Status::internal(error.to_string()))?;
        let (current, (hash, compact_revision)) = hashed.map_err(|error| super::status::from_store(&error))?;
        Ok(Response::new(pb::HashKvResponse { header: self.0.header(current), hash, compact_revision }))
    }

    type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::SnapshotResponse, Status>> + Send>>;

    async fn snapshot(&self, request: Request<pb::SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        let plane = &self.0;
        plane.require_admin(&request, "Snapshot")?;
        let dir = plane.config.data_dir.join(BACKUP_DIR);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |t| t.as_nanos());
        let store = plane.store.clone();
        // The file goes with the guard: on an error, when the client gives up (even while
        // the export still runs), and when the stream ends.
        let exported = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            let file = BackupFile(dir.join(format!("backup-{nanos}")));
            let exported = store.export(&file.0, &[capstan_store::codec::META_REVISION])?;
            capstan_store::seal_backup(&file.0)?;
            Ok::<_, capstan_store::StoreError>((file, exported))
        })
        .await
        .map_err(|error| Status::internal(format!("the snapshot task failed: {error}")))?;
        let (file, exported) = exported.map_err(|error| super::status::from_store(&error))?;
        let revision = exported.meta[0]
            .as_deref()
            .and_then(|raw| raw.try_into().ok())
            .map_or(plane.store.revision(), i64::from_be_bytes);
        tracing::info!(revision, "streaming a snapshot");
        let header = plane.header(revision);
        let stopping = plane.stopping();
        let (chunks, stream) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            let sent = tokio::select! {
                sent = send_backup(&file.0, &header, &chunks) => sent,
                () = stopping => Ok(()),
            };
            drop(file);
            if let Err(error) = sent {
                let _ = chunks.send(Err(Status::internal(format!("cannot read the snapshot: {error}")))).await;
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(stream))))
    }

    async fn move_leader(
        &self,
        _request: Request<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        Err(not_served("MoveLeader"))
    }
}
