//! A linearizability checker for histories of single-key register operations (read, write,
//! compare-and-set), in the manner of Wing & Gong with Lowe's memoisation (the algorithm
//! behind Knossos and porcupine).
//!
//! A history is checked one key at a time: operations on different keys of a key-value
//! store commute, so the history is linearizable when each key's sub-history is.
//!
//! The search keeps the not-yet-linearized operations as a list of call and return events
//! in time order. It repeatedly tries to linearize an operation whose call comes before
//! every pending return (so it could have taken effect first): if the register model
//! accepts it, the operation is lifted out of the list and the search goes on; when the
//! head of the list is a return whose operation was never linearized, that choice failed
//! and the search backtracks. A cache of (linearized set, register state) prunes states
//! reached before along another order.
//!
//! Worked example: write(1) over [0, 10], read→1 over [5, 6], read→none over [7, 8], the
//! register starting empty. Events in time order: call w, call r1, return r1, call r2,
//! return r2, return w. The search linearizes w (state 1) and r1 (reads 1: fine), then
//! tries r2: reading "none" in state 1 fails, and the next event is r2's return, so it
//! backtracks. Without r1 first, r1's return comes before r1 is placed; without w first,
//! r1 cannot read 1. Every order fails: once a read has seen the write, a read that starts
//! later cannot miss it.
//!
//! Indeterminate operations (the client timed out, so they may or may not have happened)
//! return at infinity: they may be linearized anywhere after their call, or never. Reads
//! that did not complete say nothing and should be left out of the history.

use std::collections::{BTreeMap, HashSet};
use std::hash::Hash;

/// What an operation did to a register, with what the client observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegisterOp<V> {
    /// A read that returned `observed` (`None`: the key did not exist).
    Read {
        observed: Option<V>,
    },
    Write {
        value: V,
    },
    /// Set to `new` if the value is `expected`; `succeeded` is what the client was told
    /// (ignored for an indeterminate operation).
    Cas {
        expected: V,
        new: V,
        succeeded: bool,
    },
}

/// One client operation: when it was called and when it returned, on any one clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation<V> {
    pub call: u64,
    /// `None`: the outcome is unknown (a timeout, a lost connection).
    pub ret: Option<u64>,
    pub op: RegisterOp<V>,
}

/// The checker's verdict on one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order explains the history. `stuck` is the operation (index into the key's
    /// history) whose return came while it could not be linearized, at the deepest point
    /// the search reached.
    NotLinearizable {
        stuck: usize,
    },
    /// The search exceeded its step budget without deciding.
    Unknown,
}

/// How many search steps one key may take before the checker gives up with `Unknown`.
pub const SEARCH_STEPS_MAX: u64 = 50_000_000;

/// Checks a whole history keyed by register: the first key (in order) that is not
/// linearizable, with its verdict; `Ok` when every key is.
pub fn check_keys<K: Ord + Clone, V: Clone + Eq + Hash>(
    history: &BTreeMap<K, Vec<Operation<V>>>,
) -> Result<(), (K, Verdict)> {
    for (key, operations) in history {
        match check_register(operations, None) {
            Verdict::Linearizable => {}
            verdict => return Err((key.clone(), verdict)),
        }
    }
    Ok(())
}

/// The register's state after `op` is applied to `state`, if `op` may be linearized there.
fn step<V: Clone + Eq>(state: &Option<V>, operation: &Operation<V>) -> Option<Option<V>> {
    let definite = operation.ret.is_some();
    match &operation.op {
        RegisterOp::Read { observed } => (observed == state).then(|| state.clone()),
        RegisterOp::Write { value } => Some(Some(value.clone())),
        RegisterOp::Cas { expected, new, succeeded } => {
            let matches = state.as_ref() == Some(expected);
            if !definite || *succeeded {
                // An indeterminate CAS that failed is the same as one that never happened,
                // which leaving it out covers.
                matches.then(|| Some(new.clone()))
            } else {
                (!matches).then(|| state.clone())
            }
        }
    }
}

/// The events of a history as a doubly linked list (index 0 is the head sentinel), so
/// that an operation can be lifted out and put back in O(1).
struct Events {
    /// For event `e` (1-based): the operation, and whether it is the call or the return.
    operation: Vec<usize>,
    is_call: Vec<bool>,
    next: Vec<usize>,
    prev: Vec<usize>,
    /// The call and return event of each operation.
    call_event: Vec<usize>,
    return_event: Vec<usize>,
}

const END: usize = usize::MAX;

impl Events {
    fn new<V>(operations: &[Operation<V>]) -> Events {
        // (time, phase, operation, is_call). At one instant calls come before returns: two
        // operations whose call and return share a timestamp count as concurrent, the
        // cautious reading (it can only allow more orders). A return recorded before its
        // call is taken as instant.
        let mut order: Vec<(u64, u8, usize, bool)> = Vec::with_capacity(operations.len() * 2);
        for (index, operation) in operations.iter().enumerate() {
            let ret = operation.ret.unwrap_or(u64::MAX).max(operation.call);
            order.push((operation.call, 0, index, true));
            order.push((ret, 1, index, false));
        }
        order.sort();
        let count = order.len();
        let mut events = Events {
            operation: vec![0; count + 1],
            is_call: vec![false; count + 1],
            next: (1..=count + 1).map(|next| if next > count { END } else { next }).collect(),
            prev: (0..=count).map(|index| index.wrapping_sub(1)).collect(),
            call_event: vec![0; operations.len()],
            return_event: vec![0; operations.len()],
        };
        for (position, (_, _, index, is_call)) in order.into_iter().enumerate() {
            let event = position + 1;
            events.operation[event] = index;
            events.is_call[event] = is_call;
            if is_call {
                events.call_event[index] = event;
            } else {
                events.return_event[index] = event;
            }
        }
        events
    }

    fn unlink(&mut self, event: usize) {
        let (prev, next) = (self.prev[event], self.next[event]);
        self.next[prev] = next;
        if next != END {
            self.prev[next] = prev;
        }
    }

    /// Puts back an event unlinked last (lifts are undone in reverse order).
    fn relink(&mut self, event: usize) {
        let (prev, next) = (self.prev[event], self.next[event]);
        self.next[prev] = event;
        if next != END {
            self.prev[next] = event;
        }
    }

    fn lift(&mut self, operation: usize) {
        self.unlink(self.call_event[operation]);
        self.unlink(self.return_event[operation]);
    }

    fn unlift(&mut self, operation: usize) {
        self.relink(self.return_event[operation]);
        self.relink(self.call_event[operation]);
    }
}

/// Checks one register's history, starting from `initial`.
pub fn check_register<V: Clone + Eq + Hash>(operations: &[Operation<V>], initial: Option<V>) -> Verdict {
    let mut events = Events::new(operations);
    let words = operations.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, Option<V>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<V>)> = Vec::new();
    let mut state = initial;
    let mut cursor = events.next[0];
    let (mut deepest, mut stuck) = (0, 0);
    let mut steps = 0u64;
    loop {
        steps += 1;
        if steps > SEARCH_STEPS_MAX {
            return Verdict::Unknown;
        }
        if cursor == END {
            return Verdict::Linearizable;
        }
        let operation = events.operation[cursor];
        if events.is_call[cursor] {
            if let Some(next_state) = step(&state, &operations[operation]) {
                linearized[operation / 64] |= 1 << (operation % 64);
                if seen.insert((linearized.clone(), next_state.clone())) {
                    stack.push((operation, std::mem::replace(&mut state, next_state)));
                    events.lift(operation);
                    cursor = events.next[0];
                    continue;
                }
                linearized[operation / 64] &= !(1 << (operation % 64));
            }
            cursor = events.next[cursor];
            continue;
        }
        // A return: its operation could not be placed before this point.
        if operations[operation].ret.is_none() {
            // Only indeterminate operations are left, and they need not have happened.
            return Verdict::Linearizable;
        }
        if stack.len() >= deepest {
            (deepest, stuck) = (stack.len(), operation);
        }
        let Some((undone, previous_state)) = stack.pop() else {
            return Verdict::NotLinearizable { stuck };
        };
        state = previous_state;
        linearized[undone / 64] &= !(1 << (undone % 64));
        events.unlift(undone);
        cursor = events.next[events.call_event[undone]];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(call: u64, ret: u64, op: RegisterOp<u32>) -> Operation<u32> {
        Operation { call, ret: Some(ret), op }
    }
    fn read(call: u64, ret: u64, observed: Option<u32>) -> Operation<u32> {
        op(call, ret, RegisterOp::Read { observed })
    }
    fn write(call: u64, ret: u64, value: u32) -> Operation<u32> {
        op(call, ret, RegisterOp::Write { value })
    }
    fn cas(call: u64, ret: u64, expected: u32, new: u32, succeeded: bool) -> Operation<u32> {
        op(call, ret, RegisterOp::Cas { expected, new, succeeded })
    }
    fn check(operations: &[Operation<u32>]) -> Verdict {
        check_register(operations, None)
    }

    #[test]
    fn sequential_histories_follow_the_register() {
        assert_eq!(check(&[]), Verdict::Linearizable);
        assert_eq!(check(&[write(0, 1, 1), read(2, 3, Some(1)), cas(4, 5, 1, 2, true)]), Verdict::Linearizable);
        assert_eq!(check(&[write(0, 1, 1), cas(2, 3, 5, 2, false), read(4, 5, Some(1))]), Verdict::Linearizable);
        assert_eq!(check(&[read(0, 1, None), write(2, 3, 7), read(4, 5, Some(7))]), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_caught() {
        let history = [write(0, 1, 1), read(2, 3, None)];
        assert_eq!(check(&history), Verdict::NotLinearizable { stuck: 1 });
        // The worked example in the module documentation.
        let history = [write(0, 10, 1), read(5, 6, Some(1)), read(7, 8, None)];
        assert!(matches!(check(&history), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn concurrent_operations_may_take_effect_in_either_order() {
        // Two overlapping writes; reads after both see one of them, consistently.
        let history = [write(0, 10, 1), write(1, 9, 2), read(11, 12, Some(1)), read(13, 14, Some(1))];
        assert_eq!(check(&history), Verdict::Linearizable);
        let flip_flop = [write(0, 10, 1), write(1, 9, 2), read(11, 12, Some(1)), read(13, 14, Some(2))];
        assert!(matches!(check(&flip_flop), Verdict::NotLinearizable { .. }));
        // A read overlapping a write may see it or not.
        assert_eq!(check(&[write(0, 10, 1), read(2, 3, None), read(4, 5, Some(1))]), Verdict::Linearizable);
        // ... but not see it and then miss it.
        assert!(matches!(
            check(&[write(0, 10, 1), read(2, 3, Some(1)), read(4, 5, None)]),
            Verdict::NotLinearizable { .. }
        ));
    }

    #[test]
    fn compare_and_set_outcomes_must_agree_with_the_value() {
        assert!(matches!(check(&[write(0, 1, 1), cas(2, 3, 1, 2, false)]), Verdict::NotLinearizable { .. }));
        assert!(matches!(check(&[write(0, 1, 1), cas(2, 3, 9, 2, true)]), Verdict::NotLinearizable { .. }));
        // Two CAS from the same value cannot both succeed.
        let lost_update = [write(0, 1, 1), cas(2, 5, 1, 2, true), cas(3, 6, 1, 3, true)];
        assert!(matches!(check(&lost_update), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn indeterminate_operations_may_or_may_not_have_happened() {
        let lost = |value| Operation { call: 2, ret: None, op: RegisterOp::Write { value } };
        // Happened: a later read sees it.
        assert_eq!(check(&[write(0, 1, 1), lost(2), read(5, 6, Some(2))]), Verdict::Linearizable);
        // Did not happen: a later read does not see it.
        assert_eq!(check(&[write(0, 1, 1), lost(2), read(5, 6, Some(1))]), Verdict::Linearizable);
        // But it cannot take effect before it was called.
        assert!(matches!(check(&[write(0, 1, 1), read(1, 2, Some(2)), lost(3)]), Verdict::NotLinearizable { .. }));
        // Nor un-happen: once seen, it stays until overwritten.
        let seen_then_gone = [write(0, 1, 1), lost(2), read(5, 6, Some(2)), read(7, 8, Some(1))];
        assert!(matches!(check(&seen_then_gone), Verdict::NotLinearizable { .. }));
        // An indeterminate CAS that succeeded.
        let maybe_cas = Operation { call: 2, ret: None, op: RegisterOp::Cas { expected: 1, new: 3, succeeded: false } };
        assert_eq!(check(&[write(0, 1, 1), maybe_cas, read(5, 6, Some(3))]), Verdict::Linearizable);
    }

    #[test]
    fn keys_are_checked_apart() {
        let mut history = BTreeMap::new();
        history.insert("a", vec![write(0, 1, 1), read(2, 3, Some(1))]);
        history.insert("b", vec![read(0, 1, None)]);
        assert_eq!(check_keys(&history), Ok(()));
        history.insert("c", vec![write(0, 1, 5), read(2, 3, Some(4))]);
        assert!(matches!(check_keys(&history), Err(("c", Verdict::NotLinearizable { .. }))));
    }

    #[test]
    fn many_concurrent_writers_are_checked_quickly() {
        // 4 clients, 200 operations each, overlapping in pairs: the cache keeps it small.
        let mut history = Vec::new();
        let mut value = 0;
        for round in 0..200u64 {
            let base = round * 10;
            for client in 0..4u64 {
                value += 1;
                history.push(write(base + client, base + 5 + client, value));
            }
            history.push(read(base + 9, base + 9, Some(value)));
        }
        // The read at the end of each round sees the write that returned last... which is
        // a valid linearization only if that write is linearized last: it overlaps the
        // others, so it is.
        assert_eq!(check(&history), Verdict::Linearizable);
    }
}
