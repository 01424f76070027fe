//! The agent's Node: registration (create or update, with the machine's capacity), the
//! lease that proves the agent alive (`/registry/leases/nodes/<name>`, renewed at a
//! fraction of its TTL like the kubelet's 10 s of 40 s), and the node's conditions
//! (Ready, MemoryPressure, DiskPressure from the machine), posted whenever they change
//! or the node-lifecycle controller marked the node lost.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use capstan_client::{ClientError, Objects};
use capstan_proto::objects::{
    condition, set_condition, timestamp, Condition, DaemonEndpoints, Endpoint, Kind, Node, NodeAddress, Object,
    ObjectMeta, Quantity, Taint, CONDITION_FALSE, CONDITION_TRUE, NODE_LEASE_PREFIX, NODE_READY,
};
use etcd_client::PutOptions;

use crate::AgentConfig;

/// How soon a failed lease renewal is tried again.
const RENEW_RETRY_DELAY: Duration = Duration::from_millis(200);
/// The kubelet's default eviction thresholds, used here for the pressure conditions.
const MEMORY_AVAILABLE_MIN_BYTES: u64 = 100 << 20;
const DISK_AVAILABLE_MIN_PERCENT: u64 = 10;

/// Capacity of this machine: cores and memory, as Kubernetes quantities.
pub fn machine_capacity() -> (String, String) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memory = meminfo("MemTotal:").unwrap_or(0);
    (cores.to_string(), format!("{}Ki", memory / 1024))
}

/// A /proc/meminfo field, in bytes.
fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|line| line.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}

/// Percent of the data directory's file system still available.
fn disk_available_percent(path: &Path) -> Option<u64> {
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is a valid C string.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 || stats.f_blocks == 0 {
        return None;
    }
    Some(stats.f_bavail as u64 * 100 / stats.f_blocks as u64)
}

/// The conditions the agent reports now.
fn conditions(config: &AgentConfig) -> Vec<Condition> {
    let pressure = |type_: &str, under: bool, reason_ok: &str, reason_bad: &str| Condition {
        type_: type_.into(),
        status: if under { CONDITION_TRUE } else { CONDITION_FALSE }.into(),
        reason: if under { reason_bad } else { reason_ok }.into(),
        ..Default::default()
    };
    let memory_low = meminfo("MemAvailable:").is_some_and(|available| available < MEMORY_AVAILABLE_MIN_BYTES);
    let disk_low = disk_available_percent(&config.data_dir).is_some_and(|percent| percent < DISK_AVAILABLE_MIN_PERCENT);
    vec![
        Condition {
            type_: NODE_READY.into(),
            status: CONDITION_TRUE.into(),
            reason: "KubeletReady".into(),
            message: "capstan agent is posting ready status".into(),
            ..Default::default()
        },
        pressure("MemoryPressure", memory_low, "KubeletHasSufficientMemory", "KubeletHasInsufficientMemory"),
        pressure("DiskPressure", disk_low, "KubeletHasNoDiskPressure", "KubeletHasDiskPressure"),
    ]
}

/// Creates the Node, or brings an existing one's labels and status up to date. Taints
/// are set at registration only (like the kubelet's --register-with-taints), so taints and
/// cordons added later by operators survive agent restarts.
pub async fn register(objects: &Objects, config: &AgentConfig) -> Result<(), ClientError> {
    let now = timestamp(SystemTime::now());
    objects
        .modify_or_create(Kind::Node, "", &config.name, |current| {
            let mut node = match current {
                Some(Object::Node(node)) => node.clone(),
                _ => Node {
                    metadata: ObjectMeta { name: config.name.clone(), ..Default::default() },
                    spec: capstan_proto::objects::NodeSpec { unschedulable: false, taints: config.taints.clone() },
                    ..Default::default()
                },
            };
            node.metadata.labels.extend(config.labels.clone());
            node.metadata.labels.insert("kubernetes.io/hostname".into(), config.name.clone());
            let capacity: BTreeMap<String, Quantity> =
                [("cpu", config.cpu.clone()), ("memory", config.memory.clone()), ("pods", config.pods.to_string())]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), Quantity::new(v)))
                    .collect();
            node.status.allocatable = capacity.clone();
            node.status.capacity = capacity;
            node.status.addresses = vec![NodeAddress { type_: "InternalIP".into(), address: config.address.clone() }];
            node.status.daemon_endpoints =
                Some(DaemonEndpoints { kubelet_endpoint: Endpoint { port: config.logs_port } });
            for condition in conditions(config) {
                set_condition(&mut node.status.conditions, condition, &now);
            }
            let changed = current != Some(&Object::Node(node.clone()));
            Ok::<_, ClientError>((changed.then_some(Object::Node(node)), ()))
        })
        .await
}

/// Keeps the node's lease alive until `stop`. A lease that expired (the planes were out
/// of reach longer than its TTL) is replaced by a new one and the node's status is posted
/// again, since the node-lifecycle controller will have marked it NotReady; a key lost
/// while the lease lived on is put back ([`keep_key`]).
pub async fn heartbeat(objects: Objects, config: AgentConfig, mut stop: tokio::sync::watch::Receiver<bool>) {
    let key = format!("{NODE_LEASE_PREFIX}{}", config.name);
    let mut lease: Option<i64> = None;
    let mut tick = tokio::time::interval(config.renew_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => {
                if let Some(id) = lease {
                    // A clean stop: the node goes NotReady now, not a TTL later.
                    let _ = objects.client().lease_client().revoke(id).await;
                }
                return;
            }
        }
        let started = std::time::Instant::now();
        let renewed = match lease {
            Some(id) => capstan_client::renew_lease(objects.client(), id, config.renew_interval)
                .await
                .map(|ttl| (ttl > 0).then_some(id)),
            None => Ok(None),
        };
        match (&renewed, lease) {
            (Ok(_), Some(_)) => config.metrics.heartbeat_seconds.observe(started.elapsed().as_secs_f64()),
            (Err(_), _) => {
                config.metrics.heartbeat_failures.inc();
            }
            _ => {}
        }
        match renewed {
            Ok(Some(id)) => {
                if let Err(error) = keep_key(&objects, &key, id, &config).await {
                    tracing::warn!(%error, "cannot check the node lease key; retrying");
                }
            }
            Ok(None) => match acquire(&objects, &key, &config).await {
                Ok(id) => {
                    tracing::info!(node = %config.name, lease = format!("{id:x}"), "node lease held");
                    lease = Some(id);
                }
                Err(error) => tracing::warn!(%error, "cannot take the node lease; retrying"),
            },
            Err(error) => {
                // Try again soon, not a whole interval later: during a plane failover a
                // few quick tries land on the new leader well within the TTL.
                tracing::warn!(%error, "cannot renew the node lease; retrying");
                tick.reset_after(RENEW_RETRY_DELAY);
                continue;
            }
        }
        if let Err(error) = post_status_if_needed(&objects, &config).await {
            tracing::warn!(%error, "cannot post the node status; retrying");
        }
    }
}

/// Grants a lease and puts the node's key under it. When the put fails the lease is
/// revoked, so a put that reaches the store later (its answer was lost, not the write)
/// cannot leave the key on a lease nobody renews.
async fn acquire(objects: &Objects, key: &str, config: &AgentConfig) -> Result<i64, etcd_client::Error> {
    let id = objects.client().lease_client().grant(config.lease_ttl.as_secs().max(1) as i64, None).await?.id();
    if let Err(error) = put_key(objects, key, id, config).await {
        let _ = objects.client().lease_client().revoke(id).await;
        return Err(error);
    }
    Ok(id)
}

/// A renewed lease is not enough: the key may have been deleted, or be held under
/// another lease that will expire. Like the kubelet, which writes its Lease object on
/// every renewal, the agent puts the key back under its own lease when it is not there.
async fn keep_key(objects: &Objects, key: &str, lease: i64, config: &AgentConfig) -> Result<(), etcd_client::Error> {
    let current = objects.client().kv_client().get(key, None).await?;
    if current.kvs().first().is_some_and(|kv| kv.lease() == lease) {
        return Ok(());
    }
    tracing::warn!(node = %config.name, lease = format!("{lease:x}"), "the node lease key was lost; putting it back");
    put_key(objects, key, lease, config).await
}

async fn put_key(objects: &Objects, key: &str, lease: i64, config: &AgentConfig) -> Result<(), etcd_client::Error> {
    let options = PutOptions::new().with_lease(lease);
    objects.client().kv_client().put(key, config.name.as_str(), Some(options)).await.map(drop)
}

/// Posts the conditions when they differ from what the store has (or the node is gone,
/// deleted by an operator: it is registered again).
async fn post_status_if_needed(objects: &Objects, config: &AgentConfig) -> Result<(), ClientError> {
    let current = objects.get(Kind::Node, "", &config.name).await?;
    let up_to_date = match &current {
        Some(Object::Node(node)) => conditions(config).iter().all(|wanted| {
            condition(&node.status.conditions, &wanted.type_).is_some_and(|have| have.status == wanted.status)
        }),
        _ => false,
    };
    if !up_to_date {
        tracing::info!(node = %config.name, "posting node status");
        register(objects, config).await?;
    }
    Ok(())
}

/// Parses `key=value:Effect` (or `key:Effect`), kubectl's taint syntax.
pub fn parse_taint(text: &str) -> Result<Taint, String> {
    let (key_value, effect) = text.rsplit_once(':').ok_or_else(|| format!("taint {text:?}: want key=value:Effect"))?;
    let effect = match effect {
        "NoSchedule" => capstan_proto::objects::TaintEffect::NoSchedule,
        "PreferNoSchedule" => capstan_proto::objects::TaintEffect::PreferNoSchedule,
        "NoExecute" => capstan_proto::objects::TaintEffect::NoExecute,
        other => {
            return Err(format!("taint {text:?}: unknown effect {other:?} (NoSchedule, PreferNoSchedule, NoExecute)"))
        }
    };
    let (key, value) = key_value.split_once('=').unwrap_or((key_value, ""));
    if key.is_empty() {
        return Err(format!("taint {text:?}: the key is empty"));
    }
    Ok(Taint { key: key.into(), value: value.into(), effect })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taints_parse_like_kubectl() {
        let taint = parse_taint("gpu=yes:NoSchedule").unwrap();
        assert_eq!((taint.key.as_str(), taint.value.as_str()), ("gpu", "yes"));
        assert_eq!(parse_taint("edge:NoExecute").unwrap().value, "");
        assert!(parse_taint("gpu=yes").is_err());
        assert!(parse_taint("gpu=yes:Sometimes").unwrap_err().contains("unknown effect"));
    }

    #[test]
    fn the_machine_has_capacity() {
        let (cpu, memory) = machine_capacity();
        assert!(Quantity::new(cpu).milli_value().unwrap() >= 1000);
        assert!(Quantity::new(memory).value().unwrap() > 0);
    }
}
