//! The command line: `capstan plane | ctl | dev | bench | scheduler | agent`.

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
    /// Run a node agent: register this machine as a Node and run the pods bound to it.
    Agent(AgentArgs),
}

impl Cli {
    /// Servers log lifecycle events; the client logs only warnings. openraft logs, as an
    /// error, each refusal of a call it returns to its caller; the plane reports those
    /// itself (every initial member bootstraps, and all but the first are refused).
    pub fn default_log_filter(&self) -> &'static str {
        match self.command {
            Command::Ctl(_) | Command::Bench(_) => "warn",
            Command::Scheduler(_) | Command::Agent(_) => "info",
            _ => "info,openraft=warn,openraft::raft::impl_raft_blocking_write=off",
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
    /// Where to serve Prometheus metrics (`/metrics`) and health probes (`/health`,
    /// `/readyz`, `/livez`) over HTTP, as etcd's flag: `http://127.0.0.1:2381`.
    #[arg(long)]
    pub listen_metrics_urls: Option<String>,
    /// Serve clients over TLS with this certificate (PEM), as etcd's flag.
    #[arg(long)]
    pub cert_file: Option<PathBuf>,
    /// The key of --cert-file (PEM).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// The CA (PEM) client certificates must be signed by, with --client-cert-auth.
    #[arg(long)]
    pub trusted_ca_file: Option<PathBuf>,
    /// Refuse clients without a certificate signed by --trusted-ca-file.
    #[arg(long)]
    pub client_cert_auth: bool,
    /// Speak TLS with peers (https:// peer URLs) with this certificate (PEM), which the
    /// plane also shows its peers as a client certificate.
    #[arg(long)]
    pub peer_cert_file: Option<PathBuf>,
    /// The key of --peer-cert-file (PEM).
    #[arg(long)]
    pub peer_key_file: Option<PathBuf>,
    /// The CA (PEM) that signs the peers' certificates.
    #[arg(long)]
    pub peer_trusted_ca_file: Option<PathBuf>,
    /// Refuse peers without a certificate signed by --peer-trusted-ca-file.
    #[arg(long)]
    pub peer_client_cert_auth: bool,
    /// Client URLs announced to the cluster (default: http(s)://<listen-client>).
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
    /// How often the leader tells its followers it is alive.
    #[arg(long, default_value_t = 50)]
    pub heartbeat_interval_ms: u64,
    /// How long a follower hears nothing from the leader before it campaigns, as etcd's
    /// --election-timeout: each plane waits between this and about twice this.
    #[arg(long, default_value_t = 300)]
    pub election_timeout_ms: u64,
    /// Entries between Raft snapshots (etcd's --snapshot-count). A snapshot lets the log
    /// behind it go and copies nothing: the store is exported only for a follower that
    /// needs it.
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
    /// `periodic` keeps --auto-compaction-retention of history (a duration: `1h`, `30m`;
    /// a bare number is hours); `revision` keeps that many revisions (checked every 5 min).
    #[arg(long, default_value = "periodic")]
    pub auto_compaction_mode: String,
    /// How much history auto-compaction keeps; 0 (the default) turns it off.
    #[arg(long, default_value = "0")]
    pub auto_compaction_retention: String,
    /// The kind of auth token, as etcd's flag: `simple`, the one kind Capstan issues (a
    /// signed token every plane verifies, so a failover ends no session).
    #[arg(long, default_value = "simple")]
    pub auth_token: String,
    /// How long an auth token (from Authenticate) stays valid, in seconds; clients
    /// authenticate again when theirs expires.
    #[arg(long, default_value_t = crate::plane::auth::TOKEN_TTL_SECS_DEFAULT)]
    pub auth_token_ttl: u64,
    /// The bcrypt cost passwords are hashed with (4 to 31; each step doubles the work).
    #[arg(long, default_value_t = crate::plane::auth::BCRYPT_COST_DEFAULT)]
    pub bcrypt_cost: u32,
    /// Start a new cluster from a backup (`capstan ctl snapshot save FILE`): every initial
    /// member is started once with the same FILE and a new, empty --data-dir.
    #[arg(long, value_name = "FILE")]
    pub restore: Option<PathBuf>,
    /// Also run a scheduler candidate and the controllers (the elected one leads).
    #[arg(long)]
    pub scheduler: bool,
    /// `name:password` the in-plane scheduler authenticates as once auth is enabled (with
    /// --client-cert-auth, the plane's certificate's CN names it instead).
    #[arg(long, env = "CAPSTAN_SCHEDULER_USER", value_parser = parse_user, requires = "scheduler")]
    pub scheduler_user: Option<(String, String)>,
    /// Deliberately broken, to prove the chaos harness catches it: serve linearizable
    /// reads from this plane's state without read-index (stale under a partition).
    #[arg(long, hide = true)]
    pub unsafe_stale_reads: bool,
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
    #[command(flatten)]
    pub credentials: CredentialArgs,
    /// The name this candidate leads under (default: scheduler-<host>-<pid>).
    #[arg(long)]
    pub identity: Option<String>,
    #[command(flatten)]
    pub scheduler_args: SchedulerArgs,
}

/// A client's TLS and user, with etcdctl's flags.
#[derive(Args, Debug, Clone, Default)]
pub struct CredentialArgs {
    /// Verify the planes' certificates with this CA bundle (PEM); turns TLS on.
    #[arg(long, global = true)]
    pub cacert: Option<PathBuf>,
    /// This client's certificate (PEM), for planes that ask for one.
    #[arg(long = "cert", id = "tls_cert", global = true)]
    pub cert: Option<PathBuf>,
    /// The key of --cert (PEM). (Its id differs from the `key` that ctl's commands take.)
    #[arg(long = "key", id = "tls_key", global = true)]
    pub key: Option<PathBuf>,
    /// `name:password`, for a cluster with auth enabled (with --client-cert-auth, a
    /// certificate's CN names the user instead).
    #[arg(long, global = true, value_parser = parse_user)]
    pub user: Option<(String, String)>,
}

fn parse_user(text: &str) -> Result<(String, String), String> {
    match text.split_once(':') {
        Some((name, password)) if !name.is_empty() => Ok((name.to_string(), password.to_string())),
        _ => Err(format!("{text:?} is not name:password")),
    }
}

impl CredentialArgs {
    pub fn credentials(&self) -> capstan_client::Credentials {
        capstan_client::Credentials {
            ca: self.cacert.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            user: self.user.clone(),
        }
    }
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The Node's name (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Comma-separated client endpoints of the planes.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2379")]
    pub endpoints: Vec<String>,
    #[command(flatten)]
    pub credentials: CredentialArgs,
    /// Where pods' working directories and logs live (default: `<name>.agent`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// CPU capacity, a Kubernetes quantity (default: the machine's cores).
    #[arg(long)]
    pub cpu: Option<String>,
    /// Memory capacity, a Kubernetes quantity (default: the machine's memory).
    #[arg(long)]
    pub memory: Option<String>,
    /// How many pods the node runs at most.
    #[arg(long, default_value_t = 110)]
    pub pods: u32,
    /// Node labels, `key=value,...`.
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Taints set when the node registers, `key=value:Effect,...`.
    #[arg(long, value_delimiter = ',')]
    pub taints: Vec<String>,
    /// TTL of the node lease (the kubelet's is 40 s); the node turns NotReady this long
    /// after the agent stops renewing it.
    #[arg(long, default_value_t = 40)]
    pub node_lease_ttl_secs: u64,
    /// How often the lease is renewed (default: a quarter of its TTL).
    #[arg(long)]
    pub node_lease_renew_secs: Option<u64>,
    /// The address others reach this agent at (the Node's InternalIP).
    #[arg(long, default_value = "127.0.0.1")]
    pub address: String,
    /// Where the log service (`capstan ctl logs`) listens; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:10250")]
    pub listen_logs: SocketAddr,
    /// First delay before restarting a failed container; doubles up to 5 minutes.
    #[arg(long, default_value_t = 10_000)]
    pub restart_backoff_ms: u64,
    /// Where to serve Prometheus metrics (`/metrics`) and `/livez` over HTTP:
    /// `http://127.0.0.1:10255`.
    #[arg(long)]
    pub listen_metrics_urls: Option<String>,
}

impl AgentArgs {
    pub fn into_config(self) -> anyhow::Result<capstan_nodeagent::AgentConfig> {
        use capstan_proto::objects::Quantity;
        let name = match self.name {
            Some(name) => name,
            None => std::fs::read_to_string("/etc/hostname")
                .context("cannot read the host name; give --name")?
                .trim()
                .to_string(),
        };
        let (machine_cpu, machine_memory) = capstan_nodeagent::node::machine_capacity();
        let cpu = self.cpu.unwrap_or(machine_cpu);
        let memory = self.memory.unwrap_or(machine_memory);
        Quantity::new(&cpu).milli_value().context("--cpu")?;
        Quantity::new(&memory).value().context("--memory")?;
        let labels = self
            .labels
            .iter()
            .map(|label| match label.split_once('=') {
                Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
                _ => anyhow::bail!("--labels: {label:?} is not key=value"),
            })
            .collect::<anyhow::Result<_>>()?;
        let taints = self
            .taints
            .iter()
            .map(|taint| capstan_nodeagent::node::parse_taint(taint).map_err(|e| anyhow::anyhow!("--taints: {e}")))
            .collect::<anyhow::Result<_>>()?;
        if self.node_lease_ttl_secs < 2 {
            anyhow::bail!("--node-lease-ttl-secs must be at least 2, not {}", self.node_lease_ttl_secs);
        }
        let renew_secs =
            self.node_lease_renew_secs.unwrap_or(self.node_lease_ttl_secs / 4).clamp(1, self.node_lease_ttl_secs - 1);
        Ok(capstan_nodeagent::AgentConfig {
            data_dir: self.data_dir.unwrap_or_else(|| PathBuf::from(format!("{name}.agent"))),
            name,
            endpoints: self.endpoints,
            cpu,
            memory,
            pods: self.pods,
            labels,
            taints,
            lease_ttl: Duration::from_secs(self.node_lease_ttl_secs),
            renew_interval: Duration::from_secs(renew_secs),
            address: self.address,
            listen_logs: self.listen_logs,
            logs_port: 0,
            backoff_base: Duration::from_millis(self.restart_backoff_ms.max(1)),
            backoff_max: Duration::from_secs(300),
            metrics: capstan_nodeagent::metrics::AgentMetrics::default(),
            credentials: self.credentials.credentials(),
        })
    }
}

/// Runs a node agent until Ctrl-C or SIGTERM, with its metrics listener if asked for.
async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let listen_metrics = args.listen_metrics_urls.as_deref().map(crate::http::parse_listen_url).transpose()?;
    let config = args.into_config()?;
    if let Some(address) = listen_metrics {
        let listener = crate::http::bind(address).await?;
        let mut registry = prometheus_client::registry::Registry::with_prefix("capstan");
        config.metrics.register(registry.sub_registry_with_prefix("agent"));
        let registry = std::sync::Arc::new(registry);
        let router = axum::Router::new()
            .route("/metrics", axum::routing::get(move || async move { crate::http::metrics_response(&registry) }))
            .route("/livez", axum::routing::get(crate::http::livez));
        tokio::spawn(crate::http::serve(listener, router, std::future::pending()));
    }
    capstan_nodeagent::run(config, crate::shutdown_signal()).await.context("the agent failed")
}

/// Runs a standalone scheduler until Ctrl-C or SIGTERM.
async fn run_scheduler(args: StandaloneSchedulerArgs) -> anyhow::Result<()> {
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        format!("scheduler-{host}-{}", std::process::id())
    });
    let config = args.scheduler_args.config(identity)?;
    let client = capstan_client::connect_with(&args.endpoints, Duration::from_secs(5), &args.credentials.credentials())
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
        config.peer_tls = crate::tls::ServerTls::from_flags(
            "peer-",
            self.peer_cert_file,
            self.peer_key_file,
            self.peer_trusted_ca_file,
            self.peer_client_cert_auth,
        )?;
        config.client_tls = crate::tls::ServerTls::from_flags(
            "",
            self.cert_file,
            self.key_file,
            self.trusted_ca_file,
            self.client_cert_auth,
        )?;
        if !self.advertise_client_urls.is_empty() {
            config.advertise_client_urls = self.advertise_client_urls;
        } else if config.client_tls.is_some() {
            config.advertise_client_urls = vec![format!("https://{}", self.listen_client)];
        }
        if let Some(initial) = &self.initial_cluster {
            config.initial_cluster = parse_initial_cluster(initial)?;
        } else if config.peer_tls.is_some() {
            config.initial_cluster = vec![(self.name.clone(), format!("https://{}", self.listen_peer))];
        }
        check_peer_schemes(&config.initial_cluster, config.peer_tls.is_some())?;
        if let Some(url) = &self.listen_metrics_urls {
            config.listen_metrics = Some(crate::http::parse_listen_url(url)?);
        }
        if self.heartbeat_interval_ms == 0 || self.election_timeout_ms < 3 * self.heartbeat_interval_ms {
            anyhow::bail!(
                "--election-timeout-ms ({}) must be at least 3 x --heartbeat-interval-ms ({}), which must be positive",
                self.election_timeout_ms,
                self.heartbeat_interval_ms
            );
        }
        config.initial_cluster_state = self.initial_cluster_state;
        config.restore = self.restore;
        use crate::plane::auth::{BCRYPT_COST_MAX, BCRYPT_COST_MIN};
        if !(BCRYPT_COST_MIN..=BCRYPT_COST_MAX).contains(&self.bcrypt_cost) {
            anyhow::bail!("--bcrypt-cost must be {BCRYPT_COST_MIN} to {BCRYPT_COST_MAX}, not {}", self.bcrypt_cost);
        }
        check_auth_token(&self.auth_token)?;
        if self.auth_token_ttl == 0 {
            anyhow::bail!("--auth-token-ttl must be at least 1 second");
        }
        config.auth.bcrypt_cost = self.bcrypt_cost;
        config.auth.token_ttl = Duration::from_secs(self.auth_token_ttl);
        if self.auto_compaction_retention != "0" {
            config.auto_compaction = Some(crate::plane::compaction::AutoCompaction::parse(
                &self.auto_compaction_mode,
                &self.auto_compaction_retention,
            )?);
        }
        config.initial_cluster_token = self.initial_cluster_token;
        config.raft.heartbeat_interval_ms = self.heartbeat_interval_ms;
        config.raft.election_timeout_ms = self.election_timeout_ms;
        config.raft.snapshot_entries = self.snapshot_count.max(1);
        config.raft.log_entries_kept = self.snapshot_catchup_entries;
        config.quota_bytes = self.quota_backend_bytes;
        config.watch_progress_notify_interval = Duration::from_secs(self.watch_progress_notify_interval_secs.max(1));
        if self.scheduler {
            config.scheduler = Some(self.scheduler_args.config(self.name.clone())?);
            config.scheduler_user = self.scheduler_user;
        }
        if self.unsafe_stale_reads {
            tracing::warn!("--unsafe-stale-reads: linearizable reads may be stale; for testing the chaos harness only");
            config.unsafe_stale_reads = true;
        }
        Ok(config)
    }
}

/// etcd's `--auth-token` takes `simple` or `jwt,<options>`. Capstan's tokens already are
/// what etcd users pick JWT for (stateless, verified by any member, surviving a failover),
/// so a JWT configuration is refused with that reason rather than silently ignored.
fn check_auth_token(kind: &str) -> anyhow::Result<()> {
    match kind.split(',').next().unwrap_or_default() {
        "simple" => Ok(()),
        "jwt" => anyhow::bail!(
            "--auth-token jwt is not supported: Capstan's simple tokens are signed and checked by every plane, so \
             they survive a leader change as etcd's JWT tokens do; use --auth-token simple (the default)"
        ),
        _ => anyhow::bail!("--auth-token must be simple, not {kind:?}"),
    }
}

/// Peers speak TLS exactly when the plane has a peer certificate, so every peer URL must
/// say so: a mismatch would only show later as peers that never connect.
fn check_peer_schemes(initial_cluster: &[(String, String)], peer_tls: bool) -> anyhow::Result<()> {
    let wanted = if peer_tls { "https://" } else { "http://" };
    if let Some((name, url)) = initial_cluster.iter().find(|(_, url)| !url.starts_with(wanted)) {
        if peer_tls {
            anyhow::bail!(
                "--initial-cluster: {name}={url} is not https://, but --peer-cert-file makes peers speak TLS"
            );
        }
        anyhow::bail!("--initial-cluster: {name}={url} is https://, which needs --peer-cert-file and --peer-key-file");
    }
    Ok(())
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
        Command::Agent(args) => run_agent(args).await,
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

    #[test]
    fn auth_token_takes_simple_and_refuses_jwt_with_the_reason() {
        assert!(check_auth_token("simple").is_ok());
        let jwt = check_auth_token("jwt,pub-key=a.pub,priv-key=a,sign-method=RS256").unwrap_err().to_string();
        assert!(jwt.contains("not supported") && jwt.contains("--auth-token simple"), "{jwt}");
        assert!(check_auth_token("bogus").unwrap_err().to_string().contains("\"bogus\""));
    }

    #[test]
    fn the_in_plane_scheduler_user_needs_the_scheduler() {
        let plane = |extra: &[&str]| {
            let args = [&["capstan", "plane", "--name", "p"][..], extra].concat();
            Cli::try_parse_from(args)
        };
        assert!(plane(&["--scheduler-user", "scheduler:pw"]).is_err());
        assert!(plane(&["--scheduler", "--scheduler-user", "nopassword"]).is_err());
        let Command::Plane(args) = plane(&["--scheduler", "--scheduler-user", "scheduler:pw"]).unwrap().command else {
            panic!("not a plane")
        };
        assert_eq!(args.scheduler_user, Some(("scheduler".to_string(), "pw".to_string())));
    }
}
