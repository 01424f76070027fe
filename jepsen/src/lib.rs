//! capstan-jepsen: the chaos harness.
//!
//! - [`net`]: a network of Linux namespaces, one per plane, with nftables and tc faults.
//! - [`cluster`]: real `capstan plane` processes in them, killed, paused, restarted,
//!   removed from the cluster and added back.
//! - [`nemesis`]: the faults, injected on a schedule and healed.
//! - [`workload`]: register, set, bank, watch, lock and scheduler clients and their
//!   checkers; [`linearizability`] is the register's WGL checker.
//! - [`history`]: what every client and the nemesis did, as JSON lines; [`check`] runs
//!   the checkers over it; [`report`] draws the timeline and plots.
//! - [`run`]: one whole run.
//!
//! Invariant: it treats the cluster as a black box reached over the network API (the etcd
//! API, and the object types and client of `capstan-proto` and `capstan-client` for the
//! scheduler workload); it never depends on capstan-store, capstan-raft or the planes.

pub mod check;
pub mod client;
pub mod cluster;
pub mod history;
pub mod linearizability;
pub mod nemesis;
pub mod net;
pub mod report;
pub mod run;
pub mod workload;
