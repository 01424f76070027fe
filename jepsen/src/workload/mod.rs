//! The workloads: each has its clients (which record what they did), a final read after
//! the heal where it needs one, and a checker over the history.

pub mod bank;
pub mod lock;
pub mod register;
pub mod scheduler;
pub mod set;
pub mod watch;
