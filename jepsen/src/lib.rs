//! capstan-jepsen: the chaos harness (being built: so far its history checkers).
//!
//! It will run real planes in network namespaces, inject failures, record histories and
//! check them (linearizability, watches, scheduler invariants).
//!
//! Invariant: it treats the cluster as a black box reached over the network API; it never
//! depends on capstan-store or capstan-raft.

pub mod linearizability;
