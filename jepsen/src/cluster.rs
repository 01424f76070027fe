//! Real `capstan plane` processes, one per network namespace, that the nemesis kills,
//! pauses, restarts, removes from the cluster and adds back. A restarted plane keeps its
//! data directory, as a rebooted machine would; a plane added back starts empty and joins.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use capstan_client::pki::ThrowawayPki;

use crate::client::Endpoints;
use crate::net::Network;

const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;

pub struct Cluster {
    pub network: Network,
    capstan: PathBuf,
    dir: PathBuf,
    plane_args: Vec<String>,
    /// Mutual TLS for clients and peers (`--tls`), with certificates made for the run.
    tls: Option<ThrowawayPki>,
    planes: Vec<Option<Child>>,
    /// Planes that were removed and added back: they start with `--initial-cluster-state
    /// existing` from then on.
    joined: Vec<bool>,
    /// Planes removed from the cluster and not yet added back: they must not restart.
    removed: Vec<bool>,
}

/// How long the harness waits on a plane's answer about the cluster.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the harness looks for a leader before it gives up.
const LEADER_WAIT: Duration = Duration::from_secs(5);

impl Cluster {
    /// Starts `nodes` planes, each in its own namespace of a fresh network; with `tls`,
    /// they speak mutual TLS to clients and to each other.
    pub fn start(
        capstan: &Path,
        dir: &Path,
        nodes: usize,
        plane_args: &[String],
        tls: bool,
    ) -> anyhow::Result<Cluster> {
        let network = Network::create(nodes)?;
        let tls = match tls {
            true => {
                let hosts: Vec<String> = (0..nodes).map(|node| network.address(node).to_string()).collect();
                Some(ThrowawayPki::ensure(&dir.join("tls"), &hosts).map_err(anyhow::Error::msg)?)
            }
            false => None,
        };
        let mut plane_args = plane_args.to_vec();
        plane_args.extend(tls.iter().flat_map(ThrowawayPki::plane_flags));
        let mut cluster = Cluster {
            network,
            capstan: capstan.to_path_buf(),
            dir: dir.to_path_buf(),
            plane_args,
            tls,
            planes: Vec::new(),
            joined: vec![false; nodes],
            removed: vec![false; nodes],
        };
        for node in 0..nodes {
            let child = cluster.spawn(node)?;
            cluster.planes.push(Some(child));
        }
        Ok(cluster)
    }

    /// Client endpoints, and the credentials to use them with.
    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            urls: (0..self.planes.len()).map(|node| self.endpoint(node)).collect(),
            credentials: self.tls.as_ref().map(ThrowawayPki::client_credentials).unwrap_or_default(),
        }
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn endpoint(&self, node: usize) -> String {
        format!("{}://{}:{CLIENT_PORT}", self.scheme(), self.network.address(node))
    }

    pub fn len(&self) -> usize {
        self.planes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.planes.is_empty()
    }

    fn peer_url(&self, node: usize) -> String {
        format!("{}://{}:{PEER_PORT}", self.scheme(), self.network.address(node))
    }

    fn spawn(&self, node: usize) -> anyhow::Result<Child> {
        let address = self.network.address(node);
        let initial =
            (0..self.network.nodes()).map(|n| format!("n{n}={}", self.peer_url(n))).collect::<Vec<_>>().join(",");
        let state = if self.joined[node] { "existing" } else { "new" };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("n{node}.log")))
            .context("cannot open a plane's log")?;
        Command::new("ip")
            .args(["netns", "exec", &self.network.namespace(node)])
            .arg(&self.capstan)
            .args(["plane", "--name", &format!("n{node}"), "--data-dir"])
            .arg(self.dir.join(format!("n{node}")))
            .args(["--listen-client", &format!("{address}:{CLIENT_PORT}")])
            .args(["--listen-peer", &format!("{address}:{PEER_PORT}")])
            .args(["--initial-cluster", &initial, "--initial-cluster-token", "jepsen"])
            .args(["--initial-cluster-state", state])
            .args(&self.plane_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start a plane")
    }

    /// SIGKILL: the plane dies with whatever it had not made durable.
    pub fn kill(&mut self, node: usize) {
        self.pause(node, false);
        if let Some(mut child) = self.planes[node].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`): a paused plane holds its connections and
    /// its leadership but answers nothing, like a machine stalled in a long GC or swap.
    pub fn pause(&mut self, node: usize, paused: bool) {
        if let Some(child) = &self.planes[node] {
            let signal = if paused { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: signalling our own child, which has not been reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        }
    }

    /// Starts a plane that was killed (not one that was removed).
    pub fn restart(&mut self, node: usize) -> anyhow::Result<()> {
        if self.planes[node].is_none() && !self.removed[node] {
            self.planes[node] = Some(self.spawn(node)?);
        }
        Ok(())
    }

    /// The plane that leads, as the running planes report it; None when none knows one
    /// within a few seconds (an election takes about that long).
    pub async fn leader(&self) -> Option<usize> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            for node in self.running() {
                let asked = async {
                    let mut client = self.admin_client(node).await?;
                    let leader = client.status().await?.leader();
                    let members = client.member_list().await?;
                    let member = members.members().iter().find(|member| member.id() == leader);
                    anyhow::Ok(member.and_then(|member| member.name().strip_prefix('n')?.parse::<usize>().ok()))
                };
                if let Ok(Ok(Some(leader))) = tokio::time::timeout(ADMIN_TIMEOUT, asked).await {
                    return Some(leader);
                }
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs a membership change through the first other running plane that carries it out.
    async fn through_another<F, Fut>(&self, node: usize, change: F) -> anyhow::Result<()>
    where
        F: Fn(etcd_client::Client) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let mut last_error = anyhow::anyhow!("no other plane runs");
        for other in self.running().into_iter().filter(|other| *other != node) {
            let attempt = async { change(self.admin_client(other).await?).await };
            match tokio::time::timeout(ADMIN_TIMEOUT * 5, attempt).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(error)) => last_error = error,
                Err(_) => last_error = anyhow::anyhow!("n{other} did not answer in time"),
            }
        }
        Err(last_error)
    }

    /// Removes `node` from the cluster through another plane, then stops it and deletes
    /// its data: it comes back only through [`Cluster::add_back`].
    pub async fn remove_member(&mut self, node: usize) -> anyhow::Result<()> {
        let peer_url = self.peer_url(node);
        let remove = |mut client: etcd_client::Client| {
            let peer_url = peer_url.clone();
            async move {
                let members = client.member_list().await?;
                let member = members.members().iter().find(|member| member.peer_urls().contains(&peer_url));
                let id = member.map(|member| member.id()).context("not a member")?;
                client.member_remove(id).await?;
                anyhow::Ok(())
            }
        };
        self.through_another(node, remove).await.with_context(|| format!("cannot remove n{node}"))?;
        self.removed[node] = true;
        self.kill(node);
        let data = self.dir.join(format!("n{node}"));
        std::fs::remove_dir_all(&data).with_context(|| format!("cannot delete {}", data.display()))
    }

    /// Adds a removed `node` back as a new member and starts it empty; it joins the
    /// cluster and catches up from the leader.
    pub async fn add_back(&mut self, node: usize) -> anyhow::Result<()> {
        let peer_url = self.peer_url(node);
        let add = |mut client: etcd_client::Client| {
            let peer_url = peer_url.clone();
            async move {
                client.member_add([peer_url.as_str()], None).await?;
                anyhow::Ok(())
            }
        };
        self.through_another(node, add).await.with_context(|| format!("cannot add n{node} back"))?;
        self.joined[node] = true;
        self.removed[node] = false;
        self.restart(node)
    }

    /// Which planes run now.
    pub fn running(&self) -> Vec<usize> {
        (0..self.planes.len()).filter(|node| self.planes[*node].is_some()).collect()
    }

    /// Waits until every plane answers a linearizable read.
    pub async fn wait_until_serving(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        for node in 0..self.planes.len() {
            loop {
                let ready = async {
                    let mut client = self.admin_client(node).await?;
                    client.get("jepsen/ready", None).await
                };
                if ready.await.is_ok() {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    anyhow::bail!("{} did not serve within {timeout:?}", self.endpoint(node));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    async fn admin_client(&self, node: usize) -> Result<etcd_client::Client, etcd_client::Error> {
        self.endpoints().one(node).connect(ADMIN_TIMEOUT).await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in 0..self.planes.len() {
            self.kill(node);
        }
    }
}
