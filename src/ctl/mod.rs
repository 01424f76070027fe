//! `capstan ctl`: the command-line client. It speaks only the etcd v3 API, through the
//! `etcd-client` crate, so it works against Capstan and etcd alike; its commands and
//! output follow etcdctl's (`put` prints OK, `get` prints key and value lines, `-w json`
//! prints the response with base64 keys and values).
//!
//! Cluster objects (Pods, Nodes, ReplicaSets) have kubectl's commands and output: see
//! `objects`.

pub use objects::route_object_get;

mod objects;

use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine;
use capstan_client::Objects;
use clap::{Args, Subcommand, ValueEnum};
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, LeaseTimeToLiveOptions, PutOptions,
    ResponseHeader, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use serde_json::{json, Value};

/// Applies an explicit range end, `--prefix` or `--from-key` to any etcd-client options
/// type (they share these method names but no trait).
macro_rules! with_key_range {
    ($options:expr, $range_end:expr, $range:expr) => {{
        let options = $options;
        match $range_end {
            Some(end) => options.with_range(end),
            None if $range.prefix => options.with_prefix(),
            None if $range.from_key => options.with_from_key(),
            None => options,
        }
    }};
}

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// Comma-separated gRPC endpoints of the cluster.
    #[arg(long, global = true, value_delimiter = ',', default_value = "127.0.0.1:2379")]
    pub endpoints: Vec<String>,
    /// Output format.
    #[arg(long, short = 'w', global = true, value_enum, default_value_t = Output::Simple)]
    pub write_out: Output,
    /// Timeout of each request, in seconds.
    #[arg(long, global = true, default_value_t = 5)]
    pub command_timeout_secs: u64,
    #[command(flatten)]
    pub credentials: crate::cli::CredentialArgs,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Simple,
    Json,
}

#[derive(Args, Debug, Clone, Default)]
pub struct RangeArgs {
    /// Treat the key as a prefix.
    #[arg(long)]
    pub prefix: bool,
    /// Everything from the key on.
    #[arg(long)]
    pub from_key: bool,
}

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// Put a key.
    Put {
        key: String,
        /// The value (read from standard input when absent).
        value: Option<String>,
        /// Attach the key to this lease (hex ID, as `lease grant` prints it).
        #[arg(long)]
        lease: Option<String>,
        #[arg(long)]
        prev_kv: bool,
        #[arg(long)]
        ignore_value: bool,
        #[arg(long)]
        ignore_lease: bool,
    },
    /// Get a key or a range of keys.
    Get {
        key: String,
        range_end: Option<String>,
        #[command(flatten)]
        range: RangeArgs,
        /// Read at this revision.
        #[arg(long, default_value_t = 0)]
        rev: i64,
        #[arg(long, default_value_t = 0)]
        limit: i64,
        #[arg(long)]
        keys_only: bool,
        #[arg(long)]
        count_only: bool,
        /// ascend or descend.
        #[arg(long)]
        order: Option<String>,
        /// key, version, create, modify or value.
        #[arg(long)]
        sort_by: Option<String>,
        /// l (linearizable) or s (serializable).
        #[arg(long, default_value = "l")]
        consistency: String,
        #[arg(long)]
        print_value_only: bool,
    },
    /// Delete a key or a range of keys.
    Del {
        key: String,
        range_end: Option<String>,
        #[command(flatten)]
        range: RangeArgs,
        #[arg(long)]
        prev_kv: bool,
    },
    /// Watch a key or range and print events until interrupted.
    Watch {
        key: String,
        range_end: Option<String>,
        #[command(flatten)]
        range: RangeArgs,
        /// Start from this revision (history replay).
        #[arg(long, default_value_t = 0)]
        rev: i64,
        #[arg(long)]
        prev_kv: bool,
        /// Exit after this many events (0: never).
        #[arg(long, default_value_t = 0)]
        max_events: usize,
    },
    /// Run a transaction, in etcdctl's format: compares, a blank line, success ops, a blank
    /// line, failure ops. Read from standard input, or from --file.
    Txn {
        #[arg(long, short = 'i')]
        interactive: bool,
        #[arg(long)]
        file: Option<std::path::PathBuf>,
    },
    /// Lease commands.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Compact the history up to a revision.
    Compact {
        revision: i64,
        #[arg(long)]
        physical: bool,
    },
    /// The status of each endpoint.
    Status,
    /// Member commands.
    #[command(subcommand)]
    Member(MemberCommand),
    /// Backups of the store.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Create or update cluster objects from manifests (YAML or JSON files, directories,
    /// or - for standard input), like kubectl apply.
    Apply {
        #[arg(long = "filename", short = 'f', required = true)]
        files: Vec<String>,
        #[command(flatten)]
        namespace: objects::NamespaceArgs,
    },
    /// `get pods|nodes|replicasets`: `get` with a resource type lands here.
    #[command(name = "get-objects", hide = true)]
    GetObjects(objects::GetArgs),
    /// Show one object in detail.
    Describe {
        kind: String,
        name: String,
        #[command(flatten)]
        namespace: objects::NamespaceArgs,
    },
    /// Delete objects by type and name, or those in manifests (-f).
    Delete {
        kind: Option<String>,
        names: Vec<String>,
        #[arg(long = "filename", short = 'f')]
        files: Vec<String>,
        #[command(flatten)]
        namespace: objects::NamespaceArgs,
    },
    /// Set a ReplicaSet's replica count: `scale rs NAME --replicas N`.
    Scale {
        kind: String,
        name: String,
        #[arg(long)]
        replicas: i32,
        #[command(flatten)]
        namespace: objects::NamespaceArgs,
    },
    /// Mark a node unschedulable.
    Cordon { node: String },
    /// Mark a node schedulable again.
    Uncordon { node: String },
    /// Cordon a node and evict its pods (their ReplicaSets replace them elsewhere).
    Drain {
        node: String,
        /// Also delete pods no ReplicaSet will replace.
        #[arg(long)]
        force: bool,
    },
    /// Print a container's log (from the agent of the pod's node).
    Logs {
        pod: String,
        #[arg(long, short = 'c')]
        container: Option<String>,
        /// Keep printing what the container writes.
        #[arg(long, short = 'f')]
        follow: bool,
        #[command(flatten)]
        namespace: objects::NamespaceArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum LeaseCommand {
    Grant {
        ttl_secs: i64,
    },
    Revoke {
        id: String,
    },
    #[command(name = "keep-alive", alias = "keepalive")]
    KeepAlive {
        id: String,
        #[arg(long)]
        once: bool,
    },
    #[command(name = "timetolive")]
    TimeToLive {
        id: String,
        #[arg(long)]
        keys: bool,
    },
    List,
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Save a backup of the store, as one plane holds it, to FILE (checked whole before
    /// it is kept); `capstan plane --restore FILE` starts a new cluster from it.
    Save { file: std::path::PathBuf },
}

#[derive(Subcommand, Debug)]
pub enum MemberCommand {
    /// List the members.
    List,
    /// Add a member; prints the flags to start it with.
    Add {
        name: String,
        /// The new member's peer URL.
        #[arg(long)]
        peer_urls: String,
        /// Add it as a learner, which replicates but does not vote until promoted.
        #[arg(long)]
        learner: bool,
    },
    /// Remove a member (hex ID).
    Remove { id: String },
    /// Change a member's peer URL.
    Update {
        id: String,
        #[arg(long)]
        peer_urls: String,
    },
    /// Make a learner that has caught up a voting member.
    Promote { id: String },
}

pub async fn run(args: CtlArgs) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(args.command_timeout_secs.max(1));
    let credentials = args.credentials.credentials();
    let mut client = capstan_client::connect_with(&args.endpoints, timeout, &credentials)
        .await
        .with_context(|| format!("cannot connect to {}", args.endpoints.join(",")))?;
    let json = args.write_out == Output::Json;
    match args.command {
        CtlCommand::Put { key, value, lease, prev_kv, ignore_value, ignore_lease } => {
            let value = match value {
                Some(value) => value,
                None if ignore_value => String::new(),
                None => read_stdin()?,
            };
            let mut options = PutOptions::new();
            if let Some(lease) = lease {
                options = options.with_lease(parse_lease_id(&lease)?);
            }
            if prev_kv {
                options = options.with_prev_key();
            }
            if ignore_value {
                options = options.with_ignore_value();
            }
            if ignore_lease {
                options = options.with_ignore_lease();
            }
            let response = client.put(key, value, Some(options)).await?;
            if json {
                print_json(
                    json!({"header": header_json(response.header()), "prev_kv": response.prev_key().map(kv_json)}),
                );
            } else {
                println!("OK");
                if let Some(previous) = response.prev_key() {
                    print_kv(previous);
                }
            }
        }
        CtlCommand::Get {
            key,
            range_end,
            range,
            rev,
            limit,
            keys_only,
            count_only,
            order,
            sort_by,
            consistency,
            print_value_only,
        } => {
            let mut options = with_key_range!(GetOptions::new().with_revision(rev).with_limit(limit), range_end, range);
            if keys_only {
                options = options.with_keys_only();
            }
            if count_only {
                options = options.with_count_only();
            }
            match consistency.as_str() {
                "l" => {}
                "s" => options = options.with_serializable(),
                other => bail!("--consistency must be l or s, not {other:?}"),
            }
            if order.is_some() || sort_by.is_some() {
                options =
                    options.with_sort(parse_sort_target(sort_by.as_deref())?, parse_sort_order(order.as_deref())?);
            }
            let response = client.get(key, Some(options)).await?;
            if json {
                print_json(json!({
                    "header": header_json(response.header()),
                    "kvs": response.kvs().iter().map(kv_json).collect::<Vec<_>>(),
                    "more": response.more(),
                    "count": response.count(),
                }));
            } else if count_only {
                println!("{}", response.count());
            } else {
                for kv in response.kvs() {
                    if print_value_only {
                        println!("{}", String::from_utf8_lossy(kv.value()));
                    } else {
                        print_kv(kv);
                    }
                }
            }
        }
        CtlCommand::Del { key, range_end, range, prev_kv } => {
            let mut options = with_key_range!(DeleteOptions::new(), range_end, range);
            if prev_kv {
                options = options.with_prev_key();
            }
            let response = client.delete(key, Some(options)).await?;
            if json {
                print_json(json!({"header": header_json(response.header()), "deleted": response.deleted(),
                    "prev_kvs": response.prev_kvs().iter().map(kv_json).collect::<Vec<_>>()}));
            } else {
                println!("{}", response.deleted());
                for kv in response.prev_kvs() {
                    print_kv(kv);
                }
            }
        }
        CtlCommand::Watch { key, range_end, range, rev, prev_kv, max_events } => {
            let mut options = with_key_range!(WatchOptions::new().with_start_revision(rev), range_end, range);
            if prev_kv {
                options = options.with_prev_key();
            }
            let mut stream = client.watch(key, Some(options)).await?;
            let mut seen = 0;
            while let Some(response) = stream.message().await? {
                if response.canceled() {
                    bail!(
                        "watch cancelled: {} (compact revision {})",
                        response.cancel_reason(),
                        response.compact_revision()
                    );
                }
                for event in response.events() {
                    if json {
                        print_json(json!({
                            "type": format!("{:?}", event.event_type()).to_uppercase(),
                            "kv": event.kv().map(kv_json),
                            "prev_kv": event.prev_kv().map(kv_json),
                        }));
                    } else {
                        println!("{}", format!("{:?}", event.event_type()).to_uppercase());
                        if let Some(previous) = event.prev_kv() {
                            print_kv(previous);
                        }
                        if let Some(kv) = event.kv() {
                            print_kv(kv);
                        }
                    }
                    seen += 1;
                    if max_events > 0 && seen >= max_events {
                        return Ok(());
                    }
                }
            }
        }
        CtlCommand::Txn { interactive, file } => {
            let text = match file {
                Some(path) => {
                    std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?
                }
                None => {
                    if interactive {
                        eprintln!("compares (one per line, blank line to end), then success ops, then failure ops:");
                    }
                    read_stdin()?
                }
            };
            let txn = parse_txn(&text)?;
            let response = client.txn(txn).await?;
            if json {
                print_json(json!({"header": header_json(response.header()), "succeeded": response.succeeded()}));
            } else {
                println!("{}", if response.succeeded() { "SUCCESS" } else { "FAILURE" });
                for op in response.op_responses() {
                    println!();
                    match op {
                        TxnOpResponse::Put(_) => println!("OK"),
                        TxnOpResponse::Get(get) => get.kvs().iter().for_each(print_kv),
                        TxnOpResponse::Delete(delete) => println!("{}", delete.deleted()),
                        TxnOpResponse::Txn(nested) => {
                            println!("{}", if nested.succeeded() { "SUCCESS" } else { "FAILURE" })
                        }
                    }
                }
            }
        }
        CtlCommand::Lease(command) => lease(&mut client, command, json).await?,
        CtlCommand::Compact { revision, physical } => {
            let options = physical.then(|| etcd_client::CompactionOptions::new().with_physical());
            client.compact(revision, options).await?;
            println!("compacted revision {revision}");
        }
        CtlCommand::Status => {
            for endpoint in &args.endpoints {
                let mut one =
                    capstan_client::connect_with(std::slice::from_ref(endpoint), timeout, &credentials).await?;
                let status = one.status().await?;
                if json {
                    print_json(json!({
                        "Endpoint": endpoint,
                        "Status": {
                            "header": header_json(status.header()),
                            "version": status.version(),
                            "dbSize": status.db_size(),
                            "leader": status.leader(),
                            "raftIndex": status.raft_index(),
                            "raftTerm": status.raft_term(),
                            "raftAppliedIndex": status.raft_applied_index(),
                        }
                    }));
                } else {
                    let member = status.header().map_or(0, |header| header.member_id());
                    println!(
                        "{endpoint}, {member:x}, {}, {} B, leader={}, raft_term={}, raft_index={}, applied_index={}",
                        status.version(),
                        status.db_size(),
                        status.leader() == member,
                        status.raft_term(),
                        status.raft_index(),
                        status.raft_applied_index()
                    );
                }
            }
        }
        CtlCommand::Member(command) => member(&mut client, command).await?,
        CtlCommand::Snapshot(SnapshotCommand::Save { file }) => save_snapshot(&mut client, &file).await?,
        CtlCommand::Apply { files, namespace } => objects::apply(&Objects::new(client), &files, &namespace).await?,
        CtlCommand::GetObjects(args) => objects::get(&Objects::new(client), &args).await?,
        CtlCommand::Describe { kind, name, namespace } => {
            objects::describe(&Objects::new(client), &kind, &name, &namespace).await?
        }
        CtlCommand::Delete { kind, names, files, namespace } => {
            objects::delete(&Objects::new(client), kind.as_deref(), &names, &files, &namespace).await?
        }
        CtlCommand::Scale { kind, name, replicas, namespace } => {
            objects::scale(&Objects::new(client), &kind, &name, replicas, &namespace).await?
        }
        CtlCommand::Cordon { node } => objects::cordon(&Objects::new(client), &node, true).await?,
        CtlCommand::Uncordon { node } => objects::cordon(&Objects::new(client), &node, false).await?,
        CtlCommand::Drain { node, force } => objects::drain(&Objects::new(client), &node, force).await?,
        CtlCommand::Logs { pod, container, follow, namespace } => {
            objects::logs(&Objects::new(client), &pod, container.as_deref(), follow, &namespace).await?
        }
    }
    Ok(())
}

/// Streams a backup into `FILE.part`, syncs and checks it, then renames it to `file`.
async fn save_snapshot(client: &mut Client, file: &std::path::Path) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut part_name = file.as_os_str().to_owned();
    part_name.push(".part");
    let part = std::path::PathBuf::from(part_name);
    let mut stream = client.snapshot().await.context("the snapshot was refused")?;
    let mut out = tokio::fs::File::create(&part).await.with_context(|| format!("cannot create {}", part.display()))?;
    let mut revision = 0;
    while let Some(chunk) = stream.message().await.context("the snapshot stream broke")? {
        revision = chunk.header().map_or(revision, |header| header.revision());
        out.write_all(chunk.blob()).await.with_context(|| format!("cannot write {}", part.display()))?;
    }
    out.sync_all().await.with_context(|| format!("cannot sync {}", part.display()))?;
    drop(out);
    if let Err(error) = capstan_store::check_backup(&part) {
        let _ = std::fs::remove_file(&part);
        bail!("the snapshot received is not whole: {error}");
    }
    std::fs::rename(&part, file).with_context(|| format!("cannot rename {} to {}", part.display(), file.display()))?;
    let bytes = std::fs::metadata(file).map_or(0, |meta| meta.len());
    println!("Snapshot saved at {} ({bytes} bytes, revision {revision})", file.display());
    Ok(())
}

async fn member(client: &mut Client, command: MemberCommand) -> anyhow::Result<()> {
    let cluster = |header: Option<&etcd_client::ResponseHeader>| header.map_or(0, |header| header.cluster_id());
    match command {
        MemberCommand::List => {
            let response = client.member_list().await?;
            for member in response.members() {
                let started = if member.name().is_empty() { "unstarted" } else { "started" };
                println!(
                    "{:x}, {started}, {}, {}, {}, {}",
                    member.id(),
                    member.name(),
                    member.peer_urls().join(","),
                    member.client_urls().join(","),
                    member.is_learner()
                );
            }
        }
        MemberCommand::Add { name, peer_urls, learner } => {
            let mut options = etcd_client::MemberAddOptions::new();
            if learner {
                options = options.with_is_learner();
            }
            let response = client.member_add([peer_urls.as_str()], Some(options)).await?;
            let id = response.member().map_or(0, |member| member.id());
            println!("Member {id:16x} added to cluster {:16x}\n", cluster(response.header()));
            let initial_cluster: Vec<String> = response
                .member_list()
                .iter()
                .map(|member| {
                    let member_name = if member.id() == id { name.as_str() } else { member.name() };
                    format!("{member_name}={}", member.peer_urls().join(","))
                })
                .collect();
            println!("Start it with:");
            println!(
                "capstan plane --name {name} --initial-cluster {} --initial-cluster-state existing",
                initial_cluster.join(",")
            );
        }
        MemberCommand::Remove { id } => {
            let id = parse_member_id(&id)?;
            let response = client.member_remove(id).await?;
            println!("Member {id:16x} removed from cluster {:16x}", cluster(response.header()));
        }
        MemberCommand::Update { id, peer_urls } => {
            let id = parse_member_id(&id)?;
            let response = client.member_update(id, vec![peer_urls]).await?;
            println!("Member {id:16x} updated in cluster {:16x}", cluster(response.header()));
        }
        MemberCommand::Promote { id } => {
            let id = parse_member_id(&id)?;
            let response = client.member_promote(id).await?;
            println!("Member {id:16x} promoted in cluster {:16x}", cluster(response.header()));
        }
    }
    Ok(())
}

async fn lease(client: &mut Client, command: LeaseCommand, json: bool) -> anyhow::Result<()> {
    match command {
        LeaseCommand::Grant { ttl_secs } => {
            let response = client.lease_grant(ttl_secs, None).await?;
            if json {
                print_json(
                    json!({"header": header_json(response.header()), "ID": response.id(), "TTL": response.ttl()}),
                );
            } else {
                println!("lease {:x} granted with TTL({}s)", response.id(), response.ttl());
            }
        }
        LeaseCommand::Revoke { id } => {
            let id = parse_lease_id(&id)?;
            client.lease_revoke(id).await?;
            println!("lease {id:x} revoked");
        }
        LeaseCommand::KeepAlive { id, once } => {
            let id = parse_lease_id(&id)?;
            let (mut keeper, mut responses) = client.lease_keep_alive(id).await?;
            loop {
                keeper.keep_alive().await?;
                let Some(response) = responses.message().await? else { bail!("keep-alive stream closed") };
                if response.ttl() <= 0 {
                    bail!("lease {id:x} expired or revoked");
                }
                println!("lease {id:x} keepalived with TTL({})", response.ttl());
                if once {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_secs((response.ttl() as u64 / 3).max(1))).await;
            }
        }
        LeaseCommand::TimeToLive { id, keys } => {
            let id = parse_lease_id(&id)?;
            let options = keys.then(|| LeaseTimeToLiveOptions::new().with_keys());
            let response = client.lease_time_to_live(id, options).await?;
            if json {
                print_json(
                    json!({"header": header_json(response.header()), "id": response.id(), "ttl": response.ttl(),
                    "granted-ttl": response.granted_ttl(), "keys": response.keys().iter().map(|key| b64(key)).collect::<Vec<_>>()}),
                );
            } else {
                let attached = if keys {
                    let names: Vec<String> =
                        response.keys().iter().map(|key| String::from_utf8_lossy(key).into_owned()).collect();
                    format!(", attached keys([{}])", names.join(" "))
                } else {
                    String::new()
                };
                println!(
                    "lease {id:x} granted with TTL({}s), remaining({}s){attached}",
                    response.granted_ttl(),
                    response.ttl()
                );
            }
        }
        LeaseCommand::List => {
            let response = client.leases().await?;
            println!("found {} leases", response.leases().len());
            for lease in response.leases() {
                println!("{:x}", lease.id());
            }
        }
    }
    Ok(())
}

fn read_stdin() -> anyhow::Result<String> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("cannot read standard input")?;
    Ok(text.trim_end_matches('\n').to_string())
}

fn parse_member_id(text: &str) -> anyhow::Result<u64> {
    u64::from_str_radix(text.trim_start_matches("0x"), 16)
        .with_context(|| format!("bad member ID {text:?} (hex expected)"))
}

fn parse_lease_id(text: &str) -> anyhow::Result<i64> {
    i64::from_str_radix(text.trim_start_matches("0x"), 16)
        .with_context(|| format!("bad lease ID {text:?} (hex expected)"))
}

fn parse_sort_target(text: Option<&str>) -> anyhow::Result<SortTarget> {
    Ok(match text.unwrap_or("key").to_ascii_lowercase().as_str() {
        "key" => SortTarget::Key,
        "version" => SortTarget::Version,
        "create" => SortTarget::Create,
        "modify" | "mod" => SortTarget::Mod,
        "value" => SortTarget::Value,
        other => bail!("--sort-by must be key, version, create, modify or value, not {other:?}"),
    })
}

fn parse_sort_order(text: Option<&str>) -> anyhow::Result<SortOrder> {
    Ok(match text.unwrap_or("ascend").to_ascii_lowercase().as_str() {
        "ascend" => SortOrder::Ascend,
        "descend" => SortOrder::Descend,
        other => bail!("--order must be ascend or descend, not {other:?}"),
    })
}

/// A key line and a value line, as etcdctl prints them (the value is empty for keys-only).
fn print_kv(kv: &KeyValue) {
    println!("{}", String::from_utf8_lossy(kv.key()));
    println!("{}", String::from_utf8_lossy(kv.value()));
}

fn print_json(value: Value) {
    println!("{value}");
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn header_json(header: Option<&ResponseHeader>) -> Value {
    match header {
        Some(header) => json!({
            "cluster_id": header.cluster_id(),
            "member_id": header.member_id(),
            "revision": header.revision(),
            "raft_term": header.raft_term(),
        }),
        None => Value::Null,
    }
}

fn kv_json(kv: &KeyValue) -> Value {
    json!({
        "key": b64(kv.key()),
        "create_revision": kv.create_revision(),
        "mod_revision": kv.mod_revision(),
        "version": kv.version(),
        "value": b64(kv.value()),
        "lease": kv.lease(),
    })
}

/// Splits a line into words; double-quoted words may hold spaces and `\"` escapes.
fn words(line: &str) -> anyhow::Result<Vec<String>> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&next) = chars.peek() {
        if next.is_whitespace() {
            chars.next();
            continue;
        }
        let mut word = String::new();
        if next == '"' {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => word.extend(chars.next()),
                    Some('"') => break,
                    Some(other) => word.push(other),
                    None => bail!("unterminated quote in {line:?}"),
                }
            }
        } else {
            while let Some(&next) = chars.peek() {
                if next.is_whitespace() {
                    break;
                }
                word.push(next);
                chars.next();
            }
        }
        words.push(word);
    }
    Ok(words)
}

/// Parses etcdctl's txn format: `value("k") = "v"`, `mod("k") > "5"`, `create("k")`,
/// `version("k")`, `lease("k")` compares; `put k v`, `get k [end] [--prefix]`,
/// `del k [end] [--prefix]` ops; sections separated by blank lines.
pub fn parse_txn(text: &str) -> anyhow::Result<Txn> {
    let mut sections: Vec<Vec<&str>> = vec![Vec::new()];
    for line in text.lines() {
        if line.trim().is_empty() {
            if sections.len() < 3 {
                sections.push(Vec::new());
            }
        } else {
            sections.last_mut().expect("never empty").push(line.trim());
        }
    }
    sections.resize(3, Vec::new());
    let compares = sections[0].iter().map(|line| parse_compare(line)).collect::<anyhow::Result<Vec<_>>>()?;
    let success = sections[1].iter().map(|line| parse_op(line)).collect::<anyhow::Result<Vec<_>>>()?;
    let failure = sections[2].iter().map(|line| parse_op(line)).collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Txn::new().when(compares).and_then(success).or_else(failure))
}

fn parse_compare(line: &str) -> anyhow::Result<Compare> {
    let bad = || anyhow::anyhow!("bad compare {line:?}: want target(\"key\") op \"value\"");
    let open = line.find('(').ok_or_else(bad)?;
    let close = line.rfind(')').ok_or_else(bad)?;
    let target = line[..open].trim();
    let key = words(&line[open + 1..close])?.pop().ok_or_else(bad)?;
    let rest = words(&line[close + 1..])?;
    let [op, value] = rest.as_slice() else { return Err(bad()) };
    let op = match op.as_str() {
        "=" | "==" => CompareOp::Equal,
        "!=" => CompareOp::NotEqual,
        "<" => CompareOp::Less,
        ">" => CompareOp::Greater,
        _ => return Err(bad()),
    };
    let number = || value.parse::<i64>().with_context(|| format!("{line:?}: {value:?} is not a number"));
    Ok(match target {
        "value" | "val" | "v" => Compare::value(key, op, value.as_bytes()),
        "mod" | "m" => Compare::mod_revision(key, op, number()?),
        "create" | "c" => Compare::create_revision(key, op, number()?),
        "version" | "ver" => Compare::version(key, op, number()?),
        "lease" => Compare::lease(key, op, parse_lease_id(value)?),
        _ => return Err(bad()),
    })
}

fn parse_op(line: &str) -> anyhow::Result<TxnOp> {
    let words = words(line)?;
    let prefix = words.iter().any(|word| word == "--prefix");
    let args: Vec<&String> = words.iter().filter(|word| !word.starts_with("--")).collect();
    Ok(match args.as_slice() {
        [verb, key, value] if verb.as_str() == "put" => TxnOp::put(key.as_str(), value.as_str(), None),
        [verb, key, rest @ ..] if verb.as_str() == "get" => {
            let range = RangeArgs { prefix, from_key: false };
            TxnOp::get(
                key.as_str(),
                Some(with_key_range!(GetOptions::new(), rest.first().map(|end| end.as_str()), range)),
            )
        }
        [verb, key, rest @ ..] if verb.as_str() == "del" => {
            let range = RangeArgs { prefix, from_key: false };
            let options = with_key_range!(DeleteOptions::new(), rest.first().map(|end| end.as_str()), range);
            TxnOp::delete(key.as_str(), Some(options))
        }
        _ => bail!("bad txn op {line:?}: want put KEY VALUE, get KEY [END], or del KEY [END]"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txn_text_parses_like_etcdctl() {
        let text =
            "mod(\"key1\") > \"0\"\nvalue(\"k 2\") = \"v\"\n\nput key1 \"new value\"\nget key2 --prefix\n\ndel key1\n";
        assert!(parse_txn(text).is_ok());
        assert!(parse_txn("nonsense\n").is_err());
        assert!(parse_txn("mod(\"k\") > \"x\"\n").is_err());
        assert!(parse_txn("\n\nfrobnicate k\n").is_err());
    }

    #[test]
    fn words_respect_quotes() {
        assert_eq!(words("put a \"b c\"").unwrap(), vec!["put", "a", "b c"]);
        assert!(words("put \"open").is_err());
    }

    #[test]
    fn lease_ids_are_hex() {
        assert_eq!(parse_lease_id("ff").unwrap(), 255);
        assert!(parse_lease_id("zz").is_err());
    }
}
