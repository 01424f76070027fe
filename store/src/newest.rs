//! The newest version of the keys written lately, in memory. Every put reads the version it
//! replaces (for its create revision, version count, lease and the event's previous
//! value), and so does every compare of a txn. In RocksDB that is a seek through every
//! memtable and level, since the key's versions sort newest first under the user key and
//! Bloom filters cannot answer a seek; keys written again and again (leases, pod status,
//! counters) would pay it on every write.
//!
//! The apply path, the store's one writer, looks here after its own pending writes and
//! before RocksDB, and records each write's newest versions once the write is committed
//! and before its revision is published. Reads at a published revision look here too
//! (`Reader::version_at`): a key's newest version at or below the revision read is the
//! answer, so a key read soon after it was written (a lease, a pod's status) costs a map
//! lookup instead of a seek; a newer version, or none, sends the read to RocksDB. A
//! snapshot install replaces the whole store and so forgets everything, before it
//! publishes the new revision. Compaction needs nothing: it never removes a key's newest
//! version unless that is a tombstone, and a tombstone here reads as "no live version",
//! as its absence from RocksDB does.
//!
//! Two generations bound the memory: entries go into the young one, and when it holds
//! `YOUNG_BYTES_MAX` the old one is dropped and the young one takes its place. A key
//! written in either generation is found; one not written for two generations is read
//! from RocksDB again.

use std::collections::HashMap;

use crate::codec::Version;

/// What one generation holds at most, counted as `entry_bytes`. A store under load of
/// 100k keys of 100 bytes showed the two generations' real cost at about twice this.
const YOUNG_BYTES_MAX: usize = 2 << 20;
/// Per-entry bytes beyond the key and value: the map slot (the map keeps up to half its
/// slots empty), the two allocations' headers and rounding, the version's fixed fields.
const ENTRY_OVERHEAD_BYTES: usize = 192;
/// Larger versions are not kept: a few of them would push out every small one.
const ENTRY_BYTES_MAX: usize = YOUNG_BYTES_MAX / 64;

#[derive(Default)]
pub(crate) struct NewestVersions {
    young: HashMap<Vec<u8>, Version>,
    young_bytes: usize,
    old: HashMap<Vec<u8>, Version>,
}

fn entry_bytes(key: &[u8], version: &Version) -> usize {
    key.len() + version.value.len() + ENTRY_OVERHEAD_BYTES
}

impl NewestVersions {
    /// The newest committed version of `key`, when it was written lately; `None` says
    /// nothing about the key (read RocksDB).
    pub(crate) fn get(&self, key: &[u8]) -> Option<&Version> {
        self.young.get(key).or_else(|| self.old.get(key))
    }

    /// Records `version` as the newest committed version of `key`.
    pub(crate) fn record(&mut self, key: Vec<u8>, version: Version) {
        self.old.remove(&key);
        if let Some(stale) = self.young.remove(&key) {
            self.young_bytes -= entry_bytes(&key, &stale);
        }
        let bytes = entry_bytes(&key, &version);
        if bytes > ENTRY_BYTES_MAX {
            return;
        }
        if self.young_bytes + bytes > YOUNG_BYTES_MAX {
            self.old = std::mem::take(&mut self.young);
            self.young_bytes = 0;
        }
        self.young_bytes += bytes;
        self.young.insert(key, version);
    }

    /// Forgets every version, for a store whose content was replaced.
    pub(crate) fn clear(&mut self) {
        *self = NewestVersions::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(mod_revision: i64, value_bytes: usize) -> Version {
        Version {
            mod_revision,
            tombstone: false,
            create_revision: 1,
            version: mod_revision,
            lease: 0,
            value: vec![b'v'; value_bytes],
        }
    }

    /// Records other keys until the young generation turns old.
    fn fill_a_generation(newest: &mut NewestVersions, prefix: &str) {
        for index in 0.. {
            let before = newest.young_bytes;
            newest.record(format!("{prefix}/{index}").into_bytes(), version(10, ENTRY_BYTES_MAX / 2));
            if newest.young_bytes < before {
                return;
            }
        }
    }

    #[test]
    fn a_key_is_found_for_two_generations_and_then_read_again() {
        let mut newest = NewestVersions::default();
        newest.record(b"hot".to_vec(), version(2, 10));
        assert_eq!(newest.get(b"hot").map(|v| v.mod_revision), Some(2));
        fill_a_generation(&mut newest, "first");
        assert_eq!(newest.get(b"hot").map(|v| v.mod_revision), Some(2), "in the old generation");
        fill_a_generation(&mut newest, "second");
        assert!(newest.get(b"hot").is_none(), "two generations later it is gone");
        assert!(newest.young_bytes <= YOUNG_BYTES_MAX && newest.old.len() < 200);
    }

    #[test]
    fn rewriting_one_key_keeps_one_entry_and_its_newest_version() {
        let mut newest = NewestVersions::default();
        newest.record(b"other".to_vec(), version(1, 10));
        for revision in 2..100_000 {
            newest.record(b"hot".to_vec(), version(revision, 100));
        }
        assert_eq!(newest.young_bytes, entry_bytes(b"other", &version(1, 10)) + entry_bytes(b"hot", &version(2, 100)));
        assert_eq!(newest.get(b"hot").map(|v| v.mod_revision), Some(99_999));
        assert!(newest.get(b"other").is_some(), "the rewrites did not push it out");
    }

    #[test]
    fn a_version_too_large_to_keep_drops_the_one_it_replaces() {
        let mut newest = NewestVersions::default();
        newest.record(b"young".to_vec(), version(2, 10));
        newest.old.insert(b"old".to_vec(), version(1, 10));
        newest.record(b"young".to_vec(), version(3, ENTRY_BYTES_MAX));
        newest.record(b"old".to_vec(), version(4, ENTRY_BYTES_MAX));
        assert!(newest.get(b"young").is_none(), "a stale version would be read as the newest");
        assert!(newest.get(b"old").is_none());
        assert_eq!(newest.young_bytes, 0);
    }

    #[test]
    fn clear_forgets_everything() {
        let mut newest = NewestVersions::default();
        newest.record(b"a".to_vec(), version(2, 10));
        newest.old.insert(b"b".to_vec(), version(1, 10));
        newest.clear();
        assert!(newest.get(b"a").is_none() && newest.get(b"b").is_none());
    }
}
