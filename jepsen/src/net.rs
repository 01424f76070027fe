//! A test network of Linux network namespaces: one per node, each with an `eth0` on a
//! bridge in a hub namespace, and a veth from the harness (the root namespace) to the
//! same bridge, so the harness reaches every node and the nodes reach each other on a
//! private /24. Faults live inside the nodes' namespaces, where nothing else sees them:
//! - partitions and packet loss are nftables rules (table `inet jepsen`) that drop what
//!   comes in, so a cut link loses packets silently, as a real one does;
//! - slow links are a tc qdisc on `eth0`: netem delay where the kernel has netem, else a
//!   token bucket (tbf) that queues at a low rate (this machine's kernel lacks netem);
//! - a narrow link into one node is a token bucket on the bridge's port to it.
//!
//! Everything is named after the run (`cj<id>-...`) and removed on drop.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context};

pub struct Network {
    /// `cj<id>`, the prefix of every namespace and interface.
    prefix: String,
    /// The third octet of the run's subnet, 10.77.<subnet>.0/24.
    subnet: u8,
    nodes: usize,
}

/// Runs `tool ARGS` (ip, tc), failing with its stderr.
fn ip(tool: &str, args: &[&str]) -> anyhow::Result<()> {
    let output =
        Command::new(tool).args(args).output().with_context(|| format!("cannot run {tool} (iproute2 and nftables)"))?;
    if !output.status.success() {
        bail!("{tool} {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

impl Network {
    /// Creates the namespaces and links for `nodes` nodes. Needs root.
    pub fn create(nodes: usize) -> anyhow::Result<Network> {
        if !(1..=200).contains(&nodes) {
            bail!("a test network has 1 to 200 nodes, not {nodes}");
        }
        // One number names the namespaces and the subnet: the first whose hub namespace
        // does not exist yet, so runs side by side (in one process or several) never share
        // either, and no run removes another's.
        let first = std::process::id() % 250;
        for step in 0..250 {
            let id = (first + step) % 250 + 1;
            // Taken by another run: move on (and build no Network for it, whose drop
            // would remove the other run's namespaces).
            if ip("ip", &["netns", "add", &format!("cj{id}-hub")]).is_err() {
                continue;
            }
            let network = Network { prefix: format!("cj{id}"), subnet: id as u8, nodes };
            if let Err(error) = network.build() {
                return Err(error.context("cannot build the test network (this needs root, iproute2 and nftables)"));
            }
            return Ok(network);
        }
        bail!("no free test network: 250 runs' namespaces exist (see `ip netns list`)")
    }

    fn build(&self) -> anyhow::Result<()> {
        let hub = self.hub();
        ip("ip", &["-n", &hub, "link", "set", "lo", "up"])?;
        ip("ip", &["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip("ip", &["-n", &hub, "link", "set", "br0", "up"])?;
        let harness = self.harness_link();
        ip("ip", &["link", "add", &harness, "type", "veth", "peer", "name", "harness", "netns", &hub])?;
        ip("ip", &["addr", "add", &format!("{}/24", self.harness_address()), "dev", &harness])?;
        ip("ip", &["link", "set", &harness, "up"])?;
        ip("ip", &["-n", &hub, "link", "set", "harness", "master", "br0", "up"])?;
        for node in 0..self.nodes {
            let namespace = self.namespace(node);
            let port = format!("n{node}");
            ip("ip", &["netns", "add", &namespace])?;
            ip("ip", &["-n", &namespace, "link", "set", "lo", "up"])?;
            ip("ip", &["-n", &namespace, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", &hub])?;
            ip("ip", &["-n", &namespace, "addr", "add", &format!("{}/24", self.address(node)), "dev", "eth0"])?;
            ip("ip", &["-n", &namespace, "link", "set", "eth0", "up"])?;
            ip("ip", &["-n", &hub, "link", "set", &port, "master", "br0", "up"])?;
            self.nft(node, "add table inet jepsen")?;
            self.nft(node, "add chain inet jepsen input { type filter hook input priority 0; policy accept; }")?;
        }
        Ok(())
    }

    fn hub(&self) -> String {
        format!("{}-hub", self.prefix)
    }

    fn harness_link(&self) -> String {
        format!("{}h", self.prefix)
    }

    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// The namespace node `index` runs in.
    pub fn namespace(&self, index: usize) -> String {
        format!("{}-n{index}", self.prefix)
    }

    /// Node `index`'s address (10.77.<subnet>.<index + 1>).
    pub fn address(&self, index: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, index as u8 + 1)
    }

    fn harness_address(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, 254)
    }

    /// Cuts the links between each pair in `cut`, both ways. The harness still reaches
    /// every node, as a client anywhere would.
    pub fn cut(&self, cut: &[(usize, usize)]) -> anyhow::Result<()> {
        for node in 0..self.nodes {
            let unreachable: Vec<String> = cut
                .iter()
                .filter_map(|&(a, b)| match (a == node, b == node) {
                    (true, false) => Some(b),
                    (false, true) => Some(a),
                    _ => None,
                })
                .map(|other| self.address(other).to_string())
                .collect();
            if !unreachable.is_empty() {
                self.nft(node, &format!("add rule inet jepsen input ip saddr {{ {} }} drop", unreachable.join(", ")))?;
            }
        }
        Ok(())
    }

    /// Drops `percent` of the packets every node receives, at random.
    pub fn lose(&self, percent: u8) -> anyhow::Result<()> {
        for node in 0..self.nodes {
            self.nft(node, &format!("add rule inet jepsen input numgen random mod 100 < {percent} drop"))?;
        }
        Ok(())
    }

    /// Slows every node's link: netem delay (50 ms ± 25 ms) where the kernel has it,
    /// else a 1 Mbit/s token bucket. Returns which.
    pub fn slow(&self) -> anyhow::Result<&'static str> {
        let netem = ["delay", "50ms", "25ms", "distribution", "normal"];
        let tbf = ["tbf", "rate", "1mbit", "burst", "16kb", "latency", "500ms"];
        let mut how = "netem";
        for node in 0..self.nodes {
            let namespace = self.namespace(node);
            let qdisc = |kind: &[&str]| {
                let mut args = vec!["-n", &namespace, "qdisc", "replace", "dev", "eth0", "root"];
                args.extend_from_slice(kind);
                ip("tc", &args)
            };
            if how == "netem" && qdisc(&[&["netem"][..], &netem[..]].concat()).is_ok() {
                continue;
            }
            how = "tbf";
            qdisc(&tbf)?;
        }
        Ok(how)
    }

    /// Narrows the link into node `index` to `rate` (tc's spelling, as `8mbit`): whatever
    /// any node or the harness sends it queues at that rate. The queue holds 5 s of it, so
    /// the link is slow rather than lossy.
    pub fn narrow(&self, index: usize, rate: &str) -> anyhow::Result<()> {
        let port = format!("n{index}");
        let tbf = ["tbf", "rate", rate, "burst", "16kb", "latency", "5s"];
        ip("tc", &[&["-n", &self.hub(), "qdisc", "replace", "dev", &port, "root"][..], &tbf[..]].concat())
    }

    /// Removes every fault: the nftables rules and the qdiscs.
    pub fn heal(&self) -> anyhow::Result<()> {
        for node in 0..self.nodes {
            self.nft(node, "flush chain inet jepsen input")?;
            // Deleting the root qdisc of a link that has none fails; that is healed already.
            let _ = ip("tc", &["-n", &self.namespace(node), "qdisc", "del", "dev", "eth0", "root"]);
            let _ = ip("tc", &["-n", &self.hub(), "qdisc", "del", "dev", &format!("n{node}"), "root"]);
        }
        Ok(())
    }

    fn nft(&self, node: usize, command: &str) -> anyhow::Result<()> {
        ip("ip", &["netns", "exec", &self.namespace(node), "nft", command])
    }

    fn remove(&self) {
        for node in 0..self.nodes {
            let _ = ip("ip", &["netns", "delete", &self.namespace(node)]);
        }
        let _ = ip("ip", &["netns", "delete", &self.hub()]);
        let _ = ip("ip", &["link", "delete", &self.harness_link()]);
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.remove();
    }
}
