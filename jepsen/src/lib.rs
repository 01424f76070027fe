//! capstan-jepsen: the chaos harness (being built).
//!
//! - [`net`]: a network of Linux namespaces, one per node, with partitions.
//! - [`cluster`]: real `capstan plane` processes in them, killed and restarted.
//! - [`run`]: a register workload under a nemesis, its history checked.
//! - [`linearizability`]: the WGL checker, per key.
//! - [`set`]: the lost-writes checker of the set workload.
//!
//! Still to come: pause and membership nemeses, slow links, the bank, watch, lease
//! and scheduler workloads, and HTML reports.
//!
//! Invariant: it treats the cluster as a black box reached over the network API; it never
//! depends on capstan-store or capstan-raft.

pub mod cluster;
pub mod linearizability;
pub mod net;
pub mod run;
pub mod set;
