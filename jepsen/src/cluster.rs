//! Real `capstan plane` processes, one per network namespace, that the nemesis kills and
//! restarts. Each keeps its data directory across restarts, as a rebooted machine would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::net::Network;

const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;

pub struct Cluster {
    pub network: Network,
    capstan: PathBuf,
    dir: PathBuf,
    plane_args: Vec<String>,
    planes: Vec<Option<Child>>,
}

impl Cluster {
    /// Starts `nodes` planes, each in its own namespace of a fresh network.
    pub fn start(capstan: &Path, dir: &Path, nodes: usize, plane_args: &[String]) -> anyhow::Result<Cluster> {
        let network = Network::create(nodes)?;
        let mut cluster = Cluster {
            network,
            capstan: capstan.to_path_buf(),
            dir: dir.to_path_buf(),
            plane_args: plane_args.to_vec(),
            planes: Vec::new(),
        };
        for node in 0..nodes {
            let child = cluster.spawn(node)?;
            cluster.planes.push(Some(child));
        }
        Ok(cluster)
    }

    /// Client endpoints, as etcd clients take them.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.planes.len()).map(|node| self.endpoint(node)).collect()
    }

    pub fn endpoint(&self, node: usize) -> String {
        format!("http://{}:{CLIENT_PORT}", self.network.address(node))
    }

    pub fn len(&self) -> usize {
        self.planes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.planes.is_empty()
    }

    fn spawn(&self, node: usize) -> anyhow::Result<Child> {
        let address = self.network.address(node);
        let initial = (0..self.network.nodes())
            .map(|n| format!("n{n}=http://{}:{PEER_PORT}", self.network.address(n)))
            .collect::<Vec<_>>()
            .join(",");
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

    pub fn restart(&mut self, node: usize) -> anyhow::Result<()> {
        if self.planes[node].is_none() {
            self.planes[node] = Some(self.spawn(node)?);
        }
        Ok(())
    }

    /// Which planes run now.
    pub fn running(&self) -> Vec<usize> {
        (0..self.planes.len()).filter(|node| self.planes[*node].is_some()).collect()
    }

    /// Waits until every plane answers a linearizable read.
    pub async fn wait_until_serving(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        for endpoint in self.endpoints() {
            loop {
                let options = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(1));
                let ready = async {
                    let mut client = etcd_client::Client::connect([endpoint.as_str()], Some(options)).await?;
                    client.get("jepsen/ready", None).await
                };
                if ready.await.is_ok() {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    anyhow::bail!("{endpoint} did not serve within {timeout:?}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in 0..self.planes.len() {
            self.kill(node);
        }
    }
}
