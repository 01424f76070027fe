//! How the store lays its data out in RocksDB. Every key and value encoding lives here.
//!
//! Column families:
//!
//! | family       | key                                        | value                      |
//! |--------------|--------------------------------------------|----------------------------|
//! | `kv`         | escaped user key, `00 01`, !mod_revision   | [`Version`]                |
//! | `history`    | revision (8 bytes), sub-revision (4 bytes) | user key                   |
//! | `lease`      | lease ID (8 bytes)                         | granted TTL in seconds     |
//! | `lease_keys` | lease ID (8 bytes), user key               | empty                      |
//! | `meta`       | a name such as `revision`                  | per name                   |
//! | `auth`       | `user/` name, `role/` name, or a setting   | authpb `User`, `Role`, ... |
//!
//! Integers are big-endian so byte order is numeric order. A user key may contain any byte,
//! so it is escaped before the revision is appended: `00` becomes `00 ff` and the key ends
//! with `00 01`. That keeps byte order equal to user-key order. For example, keys `a` and
//! `a\0b` at revisions 7 and 5 become
//!
//! ```text
//! 61 00 01 | ff..f8   (a, rev 7: !7)
//! 61 00 ff 62 00 01 | ff..fa   (a\0b, rev 5)
//! ```
//!
//! and `a` sorts first, as it does as a user key. The revision is stored inverted, so the
//! versions of one key run newest first: seeking to (key, !R) lands on the newest version
//! at or below revision R.

use crate::error::{Result, StoreError};

pub const CF_KV: &str = "kv";
pub const CF_HISTORY: &str = "history";
pub const CF_LEASE: &str = "lease";
pub const CF_LEASE_KEYS: &str = "lease_keys";
pub const CF_META: &str = "meta";
pub const CF_AUTH: &str = "auth";
/// In snapshot order: a family's index is its number in the snapshot file, so new
/// families go at the end.
pub const STORE_COLUMN_FAMILIES: [&str; 6] = [CF_KV, CF_HISTORY, CF_LEASE, CF_LEASE_KEYS, CF_META, CF_AUTH];

pub const META_REVISION: &[u8] = b"revision";
pub const META_COMPACTED: &[u8] = b"compacted";
pub const META_COMPACT_SCHEDULED: &[u8] = b"compact_scheduled";
pub const META_FORMAT: &[u8] = b"format";
/// Written once when a store is created; a store without it is not Capstan's.
pub const FORMAT_V1: &[u8] = b"capstan-store-v1";

/// `auth` settings: whether auth is on (one byte), the auth revision (8 bytes), and the key
/// that signs tokens.
pub const AUTH_ENABLED: &[u8] = b"enabled";
pub const AUTH_REVISION: &[u8] = b"revision";
pub const AUTH_TOKEN_KEY: &[u8] = b"token_key";
pub const AUTH_USER_PREFIX: &[u8] = b"user/";
pub const AUTH_ROLE_PREFIX: &[u8] = b"role/";

pub fn auth_user_key(name: &str) -> Vec<u8> {
    [AUTH_USER_PREFIX, name.as_bytes()].concat()
}

pub fn auth_role_key(name: &str) -> Vec<u8> {
    [AUTH_ROLE_PREFIX, name.as_bytes()].concat()
}

const ESCAPE: u8 = 0x00;
const ESCAPED_ZERO: u8 = 0xff;
const TERMINATOR: u8 = 0x01;
/// One past the terminator: seeking here skips every version of a key.
const PAST_TERMINATOR: u8 = 0x02;
const REVISION_BYTES: usize = 8;

/// Appends the escaped form of `key`, without the terminator.
fn escape_into(key: &[u8], out: &mut Vec<u8>) {
    for &byte in key {
        out.push(byte);
        if byte == ESCAPE {
            out.push(ESCAPED_ZERO);
        }
    }
}

/// The prefix every version of `key` shares: escaped key and terminator.
pub fn kv_key_prefix(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 2 + REVISION_BYTES);
    escape_into(key, &mut out);
    out.push(ESCAPE);
    out.push(TERMINATOR);
    out
}

/// The `kv` key of `key` at `revision`.
pub fn kv_key(key: &[u8], revision: i64) -> Vec<u8> {
    let mut out = kv_key_prefix(key);
    out.extend_from_slice(&(!(revision as u64)).to_be_bytes());
    out
}

/// The lowest `kv` key of any version of a user key >= `key`.
pub fn kv_lower_bound(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 1);
    escape_into(key, &mut out);
    out
}

/// Where to seek to skip every remaining version of the key whose prefix is `prefix`.
pub fn kv_next_key_seek(prefix: &[u8]) -> Vec<u8> {
    let mut out = prefix.to_vec();
    if let Some(last) = out.last_mut() {
        *last = PAST_TERMINATOR;
    }
    out
}

/// Splits a raw `kv` key into its prefix (escaped key and terminator) and revision.
pub fn split_kv_key(raw: &[u8]) -> Result<(&[u8], i64)> {
    if raw.len() < 2 + REVISION_BYTES {
        return Err(StoreError::Corrupt(format!("kv key of {} bytes is too short", raw.len())));
    }
    let (prefix, revision) = raw.split_at(raw.len() - REVISION_BYTES);
    if prefix[prefix.len() - 2..] != [ESCAPE, TERMINATOR] {
        return Err(StoreError::Corrupt("kv key lacks its terminator".into()));
    }
    let revision = !u64::from_be_bytes(revision.try_into().expect("split at 8 bytes")) as i64;
    Ok((prefix, revision))
}

/// The user key of a `kv` key prefix.
pub fn unescape_prefix(prefix: &[u8]) -> Result<Vec<u8>> {
    let body = &prefix[..prefix.len().saturating_sub(2)];
    let mut out = Vec::with_capacity(body.len());
    let mut bytes = body.iter();
    while let Some(&byte) = bytes.next() {
        out.push(byte);
        if byte == ESCAPE && bytes.next() != Some(&ESCAPED_ZERO) {
            return Err(StoreError::Corrupt("kv key has a bad escape".into()));
        }
    }
    Ok(out)
}

pub fn history_key(revision: i64, sub: u32) -> [u8; 12] {
    let mut out = [0; 12];
    out[..8].copy_from_slice(&(revision as u64).to_be_bytes());
    out[8..].copy_from_slice(&sub.to_be_bytes());
    out
}

pub fn split_history_key(raw: &[u8]) -> Result<(i64, u32)> {
    let raw: [u8; 12] =
        raw.try_into().map_err(|_| StoreError::Corrupt(format!("history key of {} bytes", raw.len())))?;
    let revision = u64::from_be_bytes(raw[..8].try_into().expect("8 bytes")) as i64;
    let sub = u32::from_be_bytes(raw[8..].try_into().expect("4 bytes"));
    Ok((revision, sub))
}

pub fn lease_key(id: i64) -> [u8; 8] {
    (id as u64).to_be_bytes()
}

pub fn lease_keys_key(id: i64, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.len());
    out.extend_from_slice(&lease_key(id));
    out.extend_from_slice(key);
    out
}

pub fn decode_i64(raw: &[u8], what: &str) -> Result<i64> {
    let raw: [u8; 8] =
        raw.try_into().map_err(|_| StoreError::Corrupt(format!("{what} is {} bytes, want 8", raw.len())))?;
    Ok(i64::from_be_bytes(raw))
}

/// One version of a key as stored in `kv`; `mod_revision` is part of the RocksDB key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub mod_revision: i64,
    /// A tombstone marks the delete that ended a key's life.
    pub tombstone: bool,
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
    pub value: Vec<u8>,
}

const VERSION_HEADER_BYTES: usize = 1 + 8 + 8 + 8;
const KIND_PUT: u8 = 0;
const KIND_TOMBSTONE: u8 = 1;

impl Version {
    pub fn tombstone(mod_revision: i64) -> Version {
        Version { mod_revision, tombstone: true, create_revision: 0, version: 0, lease: 0, value: Vec::new() }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(VERSION_HEADER_BYTES + self.value.len());
        out.push(if self.tombstone { KIND_TOMBSTONE } else { KIND_PUT });
        out.extend_from_slice(&self.create_revision.to_be_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.lease.to_be_bytes());
        out.extend_from_slice(&self.value);
        out
    }

    pub fn decode(mod_revision: i64, raw: &[u8]) -> Result<Version> {
        if raw.len() < VERSION_HEADER_BYTES {
            return Err(StoreError::Corrupt(format!("kv value of {} bytes is too short", raw.len())));
        }
        let tombstone = match raw[0] {
            KIND_PUT => false,
            KIND_TOMBSTONE => true,
            kind => return Err(StoreError::Corrupt(format!("kv value has unknown kind {kind}"))),
        };
        let field = |at: usize| i64::from_be_bytes(raw[at..at + 8].try_into().expect("8 bytes"));
        Ok(Version {
            mod_revision,
            tombstone,
            create_revision: field(1),
            version: field(9),
            lease: field(17),
            value: raw[VERSION_HEADER_BYTES..].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_keys_sort_like_user_keys() {
        let keys: [&[u8]; 7] = [b"", b"\0", b"\0\0", b"\x01", b"a", b"a\0b", b"ab"];
        for window in keys.windows(2) {
            assert!(window[0] < window[1]);
            let (low, high) = (kv_key(window[0], 1), kv_key(window[1], 9));
            assert!(low < high, "{:?} must sort before {:?}", window[0], window[1]);
            assert!(kv_next_key_seek(&kv_key_prefix(window[0])) <= kv_lower_bound(window[1]));
        }
    }

    #[test]
    fn newer_revisions_of_a_key_come_first() {
        assert!(kv_key(b"k", 9) < kv_key(b"k", 3));
        assert!(kv_key(b"k", 3) < kv_next_key_seek(&kv_key_prefix(b"k")));
    }

    #[test]
    fn kv_keys_round_trip() {
        for key in [&b"plain"[..], b"with\0zero", b"\0", b"\0\xff\0"] {
            let raw = kv_key(key, 42);
            let (prefix, revision) = split_kv_key(&raw).unwrap();
            assert_eq!(revision, 42);
            assert_eq!(unescape_prefix(prefix).unwrap(), key);
        }
    }

    #[test]
    fn corrupt_encodings_are_errors_not_panics() {
        assert!(split_kv_key(b"short").is_err());
        assert!(split_kv_key(b"no-terminator-here").is_err());
        assert!(Version::decode(1, &[7; 30]).is_err());
        assert!(Version::decode(1, &[0; 3]).is_err());
        assert!(split_history_key(b"bad").is_err());
        assert!(unescape_prefix(b"a\0xb\0\x01").is_err());
    }

    #[test]
    fn versions_round_trip() {
        let version = Version {
            mod_revision: 5,
            tombstone: false,
            create_revision: 2,
            version: 3,
            lease: 9,
            value: b"v".to_vec(),
        };
        assert_eq!(Version::decode(5, &version.encode()).unwrap(), version);
        let tombstone = Version::tombstone(6);
        assert_eq!(Version::decode(6, &tombstone.encode()).unwrap(), tombstone);
    }
}
