//! `capstan dev`: a local cluster on 127.0.0.1 for trying Capstan out. For now it is one
//! plane, in this process, serving clients on 127.0.0.1:2379; Ctrl-C stops it and the data
//! stays in `--data-dir` for the next run.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use crate::plane::PlaneConfig;

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Where the local cluster keeps its data.
    #[arg(long, default_value = ".capstan-dev")]
    pub data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:2379")]
    pub listen_client: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:2380")]
    pub listen_peer: SocketAddr,
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let config = PlaneConfig::single("dev-1", args.data_dir.join("dev-1"), args.listen_client, args.listen_peer);
    let endpoint = args.listen_client;
    println!("capstan dev: one plane serving the etcd v3 API on {endpoint}; data in {}", args.data_dir.display());
    println!("  etcdctl --endpoints={endpoint} put hello world");
    println!("  capstan ctl --endpoints={endpoint} get hello");
    println!("Ctrl-C stops it.");
    crate::plane::run(config, crate::shutdown_signal()).await
}
