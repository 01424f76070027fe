//! capstan-scheduler: the leader-elected scheduler and controllers (not built yet).
//!
//! It will watch the store over the etcd v3 API, bind pods to nodes with a fencing token
//! compared in every bind, and run the ReplicaSet and node-lifecycle controllers.
//!
//! Invariant: it reaches the planes only over the network API (an etcd v3 client); it
//! never depends on capstan-store or capstan-raft.
