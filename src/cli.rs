//! The command line: `capstan plane | ctl | dev | bench | scheduler`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::plane::PlaneConfig;

#[derive(Parser, Debug)]
#[command(name = "capstan", version, about = "Capstan: an etcd-compatible, Raft-replicated control plane")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run one control-plane replica.
    Plane(PlaneArgs),
    /// Talk to a cluster over the etcd v3 API.
    Ctl(crate::ctl::CtlArgs),
    /// Run a local cluster on 127.0.0.1 until Ctrl-C.
    Dev(crate::dev::DevArgs),
    /// Load a cluster (Capstan or etcd) over the etcd v3 API and report throughput and latency.
    Bench(crate::bench::BenchArgs),
    /// Run a scheduler candidate (with the controllers) against any planes, standalone.
    Scheduler(StandaloneSchedulerArgs),
}

impl Cli {
    /// Servers log lifecycle events; the client logs only warnings.
    pub fn default_log_filter(&self) -> &'static str {
        match self.command {
            Command::Ctl(_) | Command::Bench(_) => "warn",
            Command::Scheduler(_) => "info",
            _ => "info,openraft=warn",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct PlaneArgs {
    /// This plane's member name, unique in the cluster.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Where the plane keeps its data (default: `<name>.capstan`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address for etcd v3 gRPC clients.
    #[arg(long, default_value = "127.0.0.1:2379")]
    pub listen_client: SocketAddr,
    /// Address for Raft traffic from other planes.
    #[arg(long, default_value = "127.0.0.1:2380")]
    pub listen_peer: SocketAddr,
    /// Client URLs announced to the cluster (default: http://<listen-client>).
    #[arg(long, value_delimiter = ',')]
    pub advertise_client_urls: Vec<String>,
    /// Initial members as `name=peer-url,...` (default: this plane alone).
    #[arg(long)]
    pub initial_cluster: Option<String>,
    /// `new` bootstraps a cluster of the --initial-cluster members; `existing` joins a
    /// running cluster that already added this plane (`capstan ctl member add`).
    #[arg(long, value_enum, default_value = "new")]
    pub initial_cluster_state: crate::plane::ClusterState,
    /// Distinguishes clusters started from the same member list.
    #[arg(long, default_value = "capstan-cluster")]
    pub initial_cluster_token: String,
    #[arg(long, default_value_t = 100)]
    pub heartbeat_interval_ms: u64,
    /// The lower end of the randomised election timeout; the upper end is twice this.
    #[arg(long, default_value_t = 300)]
    pub election_timeout_ms: u64,
    /// Entries between Raft snapshots.
    #[arg(long, default_value_t = 10_000)]
    pub snapshot_count: u64,
    /// Entries kept behind a snapshot for slow followers (etcd's
    /// --experimental-snapshot-catchup-entries); a follower further behind gets a snapshot.
    #[arg(long, default_value_t = 5_000)]
    pub snapshot_catchup_entries: u64,
    /// Writes fail with NOSPACE once the store grows past this many bytes.
    #[arg(long, default_value_t = crate::plane::QUOTA_BYTES_DEFAULT)]
    pub quota_backend_bytes: u64,
    /// How often idle watches that asked for progress notifications get one, in seconds.
    #[arg(long, default_value_t = 600)]
    pub watch_progress_notify_interval_secs: u64,
    /// Also run a scheduler candidate and the controllers (the elected one leads).
    #[arg(long)]
    pub scheduler: bool,
    #[command(flatten)]
    pub scheduler_args: SchedulerArgs,
}

/// Timing of the scheduler and its controllers (Kubernetes' defaults).
#[derive(Args, Debug, Clone)]
pub struct SchedulerArgs {
    /// TTL of the scheduler leader's lease; a standby takes over at most this long after
    /// the leader dies. It renews every 2 s (or a third of the TTL, if shorter).
    #[arg(long, default_value_t = 15)]
    pub scheduler_lease_ttl_secs: u64,
    /// How long a Ready node may go without a lease before it is marked NotReady, when the
    /// scheduler never saw the lease (it just took over).
    #[arg(long, default_value_t = 40)]
    pub node_monitor_grace_secs: u64,
    /// How long a node stays NotReady before its pods are failed (reason NodeLost).
    #[arg(long, default_value_t = 300)]
    pub pod_eviction_timeout_secs: u64,
}

impl SchedulerArgs {
    pub fn config(&self, identity: String) -> anyhow::Result<capstan_scheduler::SchedulerConfig> {
        if self.scheduler_lease_ttl_secs < 2 {
            anyhow::bail!("--scheduler-lease-ttl-secs must be at least 2, not {}", self.scheduler_lease_ttl_secs);
        }
        let mut config = capstan_scheduler::SchedulerConfig::new(identity);
        config.lease_ttl = Duration::from_secs(self.scheduler_lease_ttl_secs);
        config.renew_interval = config.renew_interval.min(config.lease_ttl / 3);
        config.node_monitor_grace = Duration::from_secs(self.node_monitor_grace_secs);
        config.pod_eviction_timeout = Duration::from_secs(self.pod_eviction_timeout_secs);
        Ok(config)
    }
}

#[derive(Args, Debug)]
pub struct StandaloneSchedulerArgs {
    /// Comma-separated client endpoints of the planes.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2379")]
    pub endpoints: Vec<String>,
    /// The name this candidate leads under (default: scheduler-<host>-<pid>).
    #[arg(long)]
    pub identity: Option<String>,
    #[command(flatten)]
    pub scheduler_args: SchedulerArgs,
}

/// Runs a standalone scheduler until Ctrl-C or SIGTERM.
async fn run_scheduler(args: StandaloneSchedulerArgs) -> anyhow::Result<()> {
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        format!("scheduler-{host}-{}", std::process::id())
    });
    let config = args.scheduler_args.config(identity)?;
    let client = capstan_client::connect(&args.endpoints, Duration::from_secs(5))
        .await
        .with_context(|| format!("cannot connect to {}", args.endpoints.join(",")))?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        let _ = stop.send(true);
    });
    let metrics = capstan_scheduler::Metrics::default();
    capstan_scheduler::run(client, config, &metrics, stopped).await;
    Ok(())
}

impl PlaneArgs {
    pub fn into_config(self) -> anyhow::Result<PlaneConfig> {
        let mut config = PlaneConfig::single(
            &self.name,
            self.data_dir.clone().unwrap_or_else(|| PathBuf::from(format!("{}.capstan", self.name))),
            self.listen_client,
            self.listen_peer,
        );
        if !self.advertise_client_urls.is_empty() {
            config.advertise_client_urls = self.advertise_client_urls;
        }
        if let Some(initial) = &self.initial_cluster {
            config.initial_cluster = parse_initial_cluster(initial)?;
        }
        if self.heartbeat_interval_ms == 0 || self.election_timeout_ms < 3 * self.heartbeat_interval_ms {
            anyhow::bail!(
                "--election-timeout-ms ({}) must be at least 3 x --heartbeat-interval-ms ({}), which must be positive",
                self.election_timeout_ms,
                self.heartbeat_interval_ms
            );
        }
        config.initial_cluster_state = self.initial_cluster_state;
        config.initial_cluster_token = self.initial_cluster_token;
        config.raft.heartbeat_interval_ms = self.heartbeat_interval_ms;
        config.raft.election_timeout_ms_min = self.election_timeout_ms;
        config.raft.election_timeout_ms_max = self.election_timeout_ms * 2;
        config.raft.snapshot_entries = self.snapshot_count.max(1);
        config.raft.log_entries_kept = self.snapshot_catchup_entries;
        config.quota_bytes = self.quota_backend_bytes;
        config.watch_progress_notify_interval = Duration::from_secs(self.watch_progress_notify_interval_secs.max(1));
        if self.scheduler {
            config.scheduler = Some(self.scheduler_args.config(self.name.clone())?);
        }
        Ok(config)
    }
}

/// Parses `name=url,name=url`.
pub fn parse_initial_cluster(text: &str) -> anyhow::Result<Vec<(String, String)>> {
    text.split(',')
        .map(|member| {
            let (name, url) = member
                .split_once('=')
                .with_context(|| format!("--initial-cluster: {member:?} is not name=peer-url"))?;
            if name.is_empty() {
                anyhow::bail!("--initial-cluster: {member:?} is not name=peer-url");
            }
            crate::plane::check_peer_url(url).context("--initial-cluster")?;
            Ok((name.to_string(), url.to_string()))
        })
        .collect()
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Plane(args) => crate::plane::run(args.into_config()?, crate::shutdown_signal()).await,
        Command::Ctl(args) => crate::ctl::run(args).await,
        Command::Dev(args) => crate::dev::run(args).await,
        Command::Bench(args) => crate::bench::run(args).await,
        Command::Scheduler(args) => run_scheduler(args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_cluster_parses_and_rejects_garbage() {
        let parsed = parse_initial_cluster("a=http://1:2380,b=http://2:2380").unwrap();
        assert_eq!(parsed, vec![("a".into(), "http://1:2380".into()), ("b".into(), "http://2:2380".into())]);
        assert!(parse_initial_cluster("a").is_err());
        assert!(parse_initial_cluster("=http://x:1").is_err());
        assert!(parse_initial_cluster("a=").is_err());
        assert!(parse_initial_cluster("a=localhost:2380").is_err());
        assert!(parse_initial_cluster("a=http://host").is_err());
    }
}
