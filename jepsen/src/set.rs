//! The set checker: clients add unique elements; after the run and the heal, one final
//! read lists what the cluster holds. No acknowledged add may be missing, and nothing may
//! appear that no one tried to add; adds whose outcome was unknown may go either way.

use std::collections::BTreeSet;

/// One attempted add and whether the cluster acknowledged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Add {
    pub element: String,
    /// `false`: the outcome is unknown (a timeout), not a refusal.
    pub acknowledged: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetVerdict {
    pub acknowledged: usize,
    /// Indeterminate adds that turned out to have happened.
    pub recovered: usize,
    /// Acknowledged adds missing from the final read: lost writes.
    pub lost: Vec<String>,
    /// Elements in the final read that no client tried to add.
    pub unexpected: Vec<String>,
}

impl SetVerdict {
    pub fn valid(&self) -> bool {
        self.lost.is_empty() && self.unexpected.is_empty()
    }
}

pub fn check_set(adds: &[Add], final_read: &BTreeSet<String>) -> SetVerdict {
    let attempted: BTreeSet<&str> = adds.iter().map(|add| add.element.as_str()).collect();
    let mut verdict = SetVerdict::default();
    for add in adds {
        match (add.acknowledged, final_read.contains(&add.element)) {
            (true, true) => verdict.acknowledged += 1,
            (true, false) => {
                verdict.acknowledged += 1;
                verdict.lost.push(add.element.clone());
            }
            (false, true) => verdict.recovered += 1,
            (false, false) => {}
        }
    }
    verdict.unexpected = final_read.iter().filter(|element| !attempted.contains(element.as_str())).cloned().collect();
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(element: &str, acknowledged: bool) -> Add {
        Add { element: element.into(), acknowledged }
    }

    fn read(elements: &[&str]) -> BTreeSet<String> {
        elements.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn every_acknowledged_add_must_survive() {
        let adds = [add("a", true), add("b", true), add("c", false), add("d", false)];
        let good = check_set(&adds, &read(&["a", "b", "c"]));
        assert!(good.valid());
        assert_eq!((good.acknowledged, good.recovered), (2, 1));
        let bad = check_set(&adds, &read(&["a", "c"]));
        assert!(!bad.valid());
        assert_eq!(bad.lost, vec!["b"]);
    }

    #[test]
    fn nothing_may_appear_from_nowhere() {
        let verdict = check_set(&[add("a", true)], &read(&["a", "z"]));
        assert!(!verdict.valid());
        assert_eq!(verdict.unexpected, vec!["z"]);
    }
}
