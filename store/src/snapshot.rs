//! Export and import of the whole store, for Raft snapshots and backups.
//!
//! The file is `MAGIC`, then records `[family u8][key len u32][key][value len u32][value]`,
//! then `END` and the FNV-1a 64 hash of everything before it. Import reads the file twice:
//! once to check it whole, then to replace the store's content, with a marker in `meta`
//! while it does, so a store whose import was cut short refuses to open rather than serve
//! half of two states.
//!
//! A backup (Maintenance Snapshot) is that file sealed as etcd seals its snapshot stream:
//! zero bytes up to a multiple of 512, then the SHA-256 of everything before. etcdctl
//! checks that shape when it saves; Capstan checks the digest and the file inside.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use rocksdb::WriteBatch;

use crate::codec::{self, STORE_COLUMN_FAMILIES};
use crate::error::{Result, StoreError};
use crate::read::Reader;
use crate::{cf, Store};

const MAGIC: &[u8; 8] = b"CAPSNAP1";
const END: u8 = 0xff;
/// Keys are bounded by etcd's request limit, so anything larger is corruption.
const SNAPSHOT_FIELD_BYTES_MAX: u32 = 64 << 20;
const IMPORT_BATCH_BYTES: usize = 8 << 20;
/// A sealed backup's length before its digest is a multiple of this (etcd's page math).
const BACKUP_ALIGN_BYTES: u64 = 512;
const SHA256_BYTES: u64 = 32;
pub(crate) const META_IMPORTING: &[u8] = b"importing_snapshot";

/// What [`Store::export`] wrote.
pub struct Exported {
    pub bytes: u64,
    /// The requested meta values, in the order asked, as of the export.
    pub meta: Vec<Option<Vec<u8>>>,
}

struct Hasher(u64);

impl Hasher {
    fn new() -> Hasher {
        Hasher(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.bytes += bytes.len() as u64;
        Ok(self.inner.write_all(bytes)?)
    }
}

impl Store {
    /// Writes the whole store, as of one consistent moment, to `path`, and returns its size
    /// with the values the `meta` names had at that same moment.
    pub fn export(&self, path: &Path, meta: &[&[u8]]) -> Result<Exported> {
        let reader = self.reader();
        let meta = meta.iter().map(|name| reader.meta(name)).collect::<Result<Vec<_>>>()?;
        let file = File::create(path)?;
        let mut out = HashingWriter { inner: BufWriter::new(file), hasher: Hasher::new(), bytes: 0 };
        out.put(MAGIC)?;
        for (index, family) in STORE_COLUMN_FAMILIES.iter().enumerate() {
            let mut iter = reader.iter(family, None);
            iter.seek_to_first();
            while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
                out.put(&[index as u8])?;
                out.put(&(key.len() as u32).to_be_bytes())?;
                out.put(key)?;
                out.put(&(value.len() as u32).to_be_bytes())?;
                out.put(value)?;
                iter.next();
            }
            iter.status()?;
        }
        out.put(&[END])?;
        let hash = out.hasher.0;
        out.inner.write_all(&hash.to_be_bytes())?;
        let mut file = out.inner.into_inner().map_err(|error| error.into_error())?;
        file.flush()?;
        file.sync_all()?;
        Ok(Exported { bytes: out.bytes + 8, meta })
    }

    /// Replaces the store's whole content with the snapshot at `path`, after checking it.
    pub fn import(&self, path: &Path) -> Result<()> {
        check_snapshot(path)?;
        self.import_checked(path, &[])
    }

    /// Replaces the store's content with a sealed backup's ([`seal_backup`]), without the
    /// `drop_meta` values it carries: they go in the same write that ends the import, so
    /// no crash leaves them behind. Returns the backup's SHA-256.
    pub fn import_backup(&self, path: &Path, drop_meta: &[&[u8]]) -> Result<BackupDigest> {
        let digest = check_backup(path)?;
        self.import_checked(path, drop_meta)?;
        Ok(digest)
    }

    /// Replaces the store's content with a snapshot file's, checked before.
    fn import_checked(&self, path: &Path, drop_meta: &[&[u8]]) -> Result<()> {
        let _write = self.revision_write();
        let db = self.db();
        let mut sync = rocksdb::WriteOptions::default();
        sync.set_sync(true);
        db.put_cf_opt(cf(db, codec::CF_META), META_IMPORTING, [1], &sync)?;
        self.clear()?;
        let mut batch = WriteBatch::default();
        read_records(path, &mut |family, key, value| {
            batch.put_cf(cf(db, family), key, value);
            if batch.size_in_bytes() >= IMPORT_BATCH_BYTES {
                db.write(std::mem::take(&mut batch))?;
            }
            Ok(())
        })?;
        for name in drop_meta {
            batch.delete_cf(cf(db, codec::CF_META), name);
        }
        batch.delete_cf(cf(db, codec::CF_META), META_IMPORTING);
        db.write_opt(batch, &sync)?;
        self.reload_counters()
    }

    /// Deletes every key of every store family (the importing marker is put back), and
    /// forgets the newest versions kept in memory.
    fn clear(&self) -> Result<()> {
        self.newest_versions().clear();
        let db = self.db();
        for family in STORE_COLUMN_FAMILIES {
            let reader = Reader::latest(db);
            let mut iter = reader.iter(family, None);
            iter.seek_to_last();
            iter.status()?;
            if let Some(last) = iter.key() {
                let mut end = last.to_vec();
                end.push(0);
                db.delete_range_cf(cf(db, family), Vec::<u8>::new(), end)?;
            }
        }
        db.put_cf(cf(db, codec::CF_META), META_IMPORTING, [1])?;
        Ok(())
    }
}

/// Checks a snapshot file whole (format and checksum, nothing after it) without loading it.
pub fn check_snapshot(path: &Path) -> Result<()> {
    let read = read_records(path, &mut |_, _, _| Ok(()))?;
    if read != std::fs::metadata(path)?.len() {
        return Err(StoreError::SnapshotInvalid(format!("{}: data after the checksum", path.display())));
    }
    Ok(())
}

/// Seals the snapshot file at `path` as a backup: zero padding to a multiple of 512 bytes,
/// then the SHA-256 of all before it. Returns the sealed length.
pub fn seal_backup(path: &Path) -> Result<u64> {
    use sha2::Digest;
    let length = std::fs::metadata(path)?.len();
    let padding = (BACKUP_ALIGN_BYTES - length % BACKUP_ALIGN_BYTES) % BACKUP_ALIGN_BYTES;
    let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
    file.write_all(&vec![0; padding as usize])?;
    let mut digest = sha2::Sha256::new();
    std::io::copy(&mut File::open(path)?, &mut digest)?;
    file.write_all(&digest.finalize())?;
    file.sync_all()?;
    Ok(length + padding + SHA256_BYTES)
}

/// The SHA-256 that seals a backup: it names the backup's content.
pub type BackupDigest = [u8; SHA256_BYTES as usize];

/// Checks a sealed backup whole: its shape, its SHA-256, the snapshot inside, and that
/// only zero padding follows the snapshot. Returns the SHA-256.
pub fn check_backup(path: &Path) -> Result<BackupDigest> {
    use sha2::Digest;
    let invalid = |detail: &str| StoreError::SnapshotInvalid(format!("{}: {detail}", path.display()));
    let length = std::fs::metadata(path)?.len();
    if length % BACKUP_ALIGN_BYTES != SHA256_BYTES {
        return Err(invalid(&format!("{length} bytes is not the length of a sealed backup (truncated?)")));
    }
    let sealed = length - SHA256_BYTES;
    let mut file = File::open(path)?;
    let mut digest = sha2::Sha256::new();
    std::io::copy(&mut (&mut file).take(sealed), &mut digest)?;
    let mut expected: BackupDigest = [0; SHA256_BYTES as usize];
    file.read_exact(&mut expected)?;
    if digest.finalize().as_slice() != expected {
        return Err(invalid("SHA-256 mismatch"));
    }
    let read = read_records(path, &mut |_, _, _| Ok(()))?;
    // The padding is shorter than the alignment, and all zero.
    if read > sealed || sealed - read >= BACKUP_ALIGN_BYTES {
        return Err(invalid("data after the snapshot"));
    }
    let mut padding = vec![0; (sealed - read) as usize];
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(read))?;
    file.read_exact(&mut padding)?;
    if padding.iter().any(|byte| *byte != 0) {
        return Err(invalid("data after the snapshot"));
    }
    Ok(expected)
}

/// Called with each record's column family, key and value.
type RecordVisitor<'a> = dyn FnMut(&str, &[u8], &[u8]) -> Result<()> + 'a;

/// A snapshot file being read, hashing what it reads.
struct SnapshotReader {
    input: BufReader<File>,
    hasher: Hasher,
    path: String,
    /// Bytes read (and hashed) so far.
    read: u64,
}

impl SnapshotReader {
    fn invalid(&self, detail: &str) -> StoreError {
        StoreError::SnapshotInvalid(format!("{}: {detail}", self.path))
    }

    fn bytes(&mut self, length: usize) -> Result<Vec<u8>> {
        let mut buffer = vec![0; length];
        self.input.read_exact(&mut buffer).map_err(|_| self.invalid("truncated"))?;
        self.hasher.update(&buffer);
        self.read += length as u64;
        Ok(buffer)
    }

    fn field(&mut self) -> Result<Vec<u8>> {
        let length = u32::from_be_bytes(self.bytes(4)?.try_into().expect("4 bytes"));
        if length > SNAPSHOT_FIELD_BYTES_MAX {
            return Err(self.invalid(&format!("a field of {length} bytes")));
        }
        self.bytes(length as usize)
    }
}

/// Reads every record of a snapshot file, then checks its hash; an error for anything
/// malformed. `visit` sees records before the hash is checked: check first with a no-op.
/// Returns how many bytes the snapshot took (what follows is the caller's to judge).
fn read_records(path: &Path, visit: &mut RecordVisitor) -> Result<u64> {
    let mut reader = SnapshotReader {
        input: BufReader::new(File::open(path)?),
        hasher: Hasher::new(),
        path: path.display().to_string(),
        read: 0,
    };
    if reader.bytes(MAGIC.len())? != MAGIC {
        return Err(reader.invalid("not a Capstan snapshot"));
    }
    loop {
        let family = reader.bytes(1)?[0];
        if family == END {
            break;
        }
        let Some(name) = STORE_COLUMN_FAMILIES.get(usize::from(family)) else {
            return Err(reader.invalid(&format!("unknown column family {family}")));
        };
        let key = reader.field()?;
        let value = reader.field()?;
        visit(name, &key, &value)?;
    }
    let expected = reader.hasher.0;
    let mut trailer = [0; 8];
    reader.input.read_exact(&mut trailer).map_err(|_| reader.invalid("no checksum"))?;
    if u64::from_be_bytes(trailer) != expected {
        return Err(reader.invalid("checksum mismatch"));
    }
    Ok(reader.read + trailer.len() as u64)
}
