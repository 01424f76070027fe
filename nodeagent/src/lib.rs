//! capstan-nodeagent: the node agent (not built yet).
//!
//! It will register its Node, keep a lease alive, run the pods bound to it as supervised
//! processes and report their status.
//!
//! Invariant: it reaches the planes only over the network API (an etcd v3 client); it
//! never depends on capstan-store or capstan-raft.
