//! Runs the checker of every workload that appears in a history, and the verdicts.

use crate::history::Record;
use crate::workload::{bank, lock, register, scheduler, set, watch};

/// One checker's verdict: whether the history passed, a line for people, and the details
/// for report.json.
#[derive(Clone, Debug)]
pub struct Check {
    pub valid: bool,
    pub summary: String,
    pub detail: serde_json::Value,
}

impl Check {
    /// A verdict of a history that cannot be checked, because something it needs is missing.
    pub fn invalid(why: &str) -> Check {
        Check { valid: false, summary: why.to_string(), detail: serde_json::json!({ "error": why }) }
    }
}

type Checker = fn(&[Record]) -> Check;

/// The workloads and their checkers, by the workload name their operations carry.
const CHECKERS: [(&str, Checker); 6] = [
    ("register", register::check),
    ("set", set::check),
    ("bank", bank::check),
    ("watch", watch::check),
    ("lock", lock::check),
    ("scheduler", scheduler::check),
];

/// The verdict of each workload that has operations in `history`, in a fixed order.
pub fn check(history: &[Record]) -> Vec<(&'static str, Check)> {
    CHECKERS
        .iter()
        .filter(|(workload, _)| history.iter().any(|record| record.op.workload() == *workload))
        .map(|(workload, checker)| (*workload, checker(history)))
        .collect()
}
