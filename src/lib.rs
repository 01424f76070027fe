//! capstan: the one binary of the Capstan control plane and the plane server inside it.
//!
//! - [`plane`]: a control-plane replica serving the etcd v3 API over the Raft-replicated
//!   store (`capstan plane`).
//! - [`ctl`]: the command-line client, speaking only the etcd v3 API (`capstan ctl`).
//! - [`dev`]: the embedded local cluster (`capstan dev`).
//! - [`bench`]: load over the etcd v3 API, for Capstan and etcd alike (`capstan bench`).
//! - [`cli`]: command-line parsing shared by `main`.
//! - [`socket`]: the TCP connections under the plane's gRPC servers and the bench's clients.
//!
//! Invariant: `ctl` and `bench` reach planes only over the network API, through the `etcd-client`
//! crate, exactly as a user's program would.

pub mod bench;
pub mod cli;
pub mod ctl;
pub mod dev;
pub mod http;
pub mod plane;
pub mod socket;
pub mod tls;

/// Resolves when the process receives Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
