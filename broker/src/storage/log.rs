//! A durable queue's log, split by who touches it:
//! - [`LogBuffer`] lives under the queue's lock: records appended since the last write, and the
//!   live-message count of every segment (what decides when a segment can go);
//! - [`SegmentWriter`] belongs to the queue's sync thread, the only writer of files;
//! - [`SegmentReader`] is shared, for reading bodies that were paged out of memory.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;

use super::record::{self, Record, StoredMessage};
use super::segment::{self, Location};
use crate::message::{Payload, QueuedMessage};

/// Messages still live in one segment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveCount {
    /// How many.
    pub messages: u64,
    /// Their records' bytes.
    pub bytes: u64,
}

/// Records waiting to be written, and per-segment accounting.
#[derive(Debug)]
pub struct LogBuffer {
    buf: Vec<u8>,
    /// Live messages (published, not settled) per segment, oldest first.
    live: BTreeMap<u64, LiveCount>,
    /// The segment the writer appends to; never deleted.
    active: u64,
    /// Segments with no live message left, to be deleted by the writer.
    doomed: Vec<u64>,
}

impl LogBuffer {
    /// A buffer for a log whose segments hold `live` messages each and whose newest segment is
    /// `active`.
    pub fn new(live: BTreeMap<u64, LiveCount>, active: u64) -> Self {
        let mut log = LogBuffer { buf: Vec::with_capacity(64 * 1024), live, active, doomed: Vec::new() };
        log.live.entry(active).or_default();
        log.collect_garbage();
        log
    }

    /// Appends a publish record; returns its byte range in the buffer.
    pub fn publish(&mut self, message: &QueuedMessage, payload: &Payload) -> std::ops::Range<usize> {
        let start = self.buf.len();
        encode_message(&mut self.buf, message, payload);
        start..self.buf.len()
    }

    /// Records a failed delivery and when the message is due again.
    pub fn failed(&mut self, message: &QueuedMessage) {
        if let Some(failure) = message.failure() {
            record::encode_failed(
                &mut self.buf,
                message.seq,
                message.delivery_count,
                message.due_ms(),
                failure,
            );
        }
    }

    /// Appends raw, already-encoded record bytes (compaction copies).
    pub fn append_raw(&mut self, bytes: &[u8]) -> std::ops::Range<usize> {
        let start = self.buf.len();
        self.buf.extend_from_slice(bytes);
        start..self.buf.len()
    }

    /// Records a delivery.
    pub fn delivered(&mut self, seq: u64, delivery_count: u32) {
        record::encode_delivered(&mut self.buf, seq, delivery_count);
    }

    /// Records that a message left the queue for good and releases its segment slot.
    pub fn settled(&mut self, seq: u64, location: Location) {
        record::encode_settle(&mut self.buf, seq);
        self.forget(location);
    }

    /// Counts a message written at `location`.
    pub fn add_live(&mut self, location: Location) {
        let live = self.live.entry(location.segment()).or_default();
        live.messages += 1;
        live.bytes += u64::from(location.bytes());
    }

    /// Uncounts the message at `location` (settled, or moved by compaction).
    pub fn forget(&mut self, location: Location) {
        if let Some(live) = self.live.get_mut(&location.segment()) {
            live.messages = live.messages.saturating_sub(1);
            live.bytes = live.bytes.saturating_sub(u64::from(location.bytes()));
        }
        self.collect_garbage();
    }

    /// True when records are waiting to be written.
    pub fn has_pending(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Bytes waiting to be written.
    pub fn pending_len(&self) -> usize {
        self.buf.len()
    }

    /// Takes the records waiting to be written, leaving `spare` (cleared) in their place.
    pub fn take(&mut self, spare: Vec<u8>) -> Vec<u8> {
        std::mem::replace(&mut self.buf, spare)
    }

    /// Puts back bytes that could not be written, in front of anything appended since.
    pub fn restore(&mut self, mut unwritten: Vec<u8>) {
        unwritten.extend_from_slice(&self.buf);
        self.buf = unwritten;
    }

    /// The segment being appended to.
    pub fn active(&self) -> u64 {
        self.active
    }

    /// Switches appends to a new segment.
    pub fn set_active(&mut self, segment: u64) {
        self.active = segment;
        self.live.entry(segment).or_default();
        self.collect_garbage();
    }

    /// Segments to delete now.
    pub fn take_doomed(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.doomed)
    }

    /// The oldest segment if it is worth compacting: not the active one, at least two
    /// segments behind it, and at most a quarter of a full segment's bytes still live in it.
    pub fn compaction_candidate(&self, segment_bytes: u64) -> Option<u64> {
        let (&oldest, live) = self.live.iter().next()?;
        let worth = oldest != self.active && self.live.len() >= 3 && live.messages > 0;
        (worth && live.bytes * 4 <= segment_bytes).then_some(oldest)
    }

    /// Segments present, oldest first, with their live counts.
    pub fn segments(&self) -> impl Iterator<Item = (u64, LiveCount)> + '_ {
        self.live.iter().map(|(&id, &live)| (id, live))
    }

    /// Only a prefix of segments can be deleted: a settle record for a message in an older
    /// segment lives in a newer one, and must outlive the message's publish record.
    fn collect_garbage(&mut self) {
        while let Some((&oldest, live)) = self.live.iter().next() {
            if live.messages > 0 || oldest == self.active {
                break;
            }
            self.live.remove(&oldest);
            self.doomed.push(oldest);
        }
    }
}

/// Appends the publish record of `message` (whose payload is `payload`) to `dst`.
pub fn encode_message(dst: &mut Vec<u8>, message: &QueuedMessage, payload: &Payload) {
    record::encode_publish(
        dst,
        message.seq,
        message.delivery_count,
        message.expires_at_ms(),
        message.due_ms(),
        payload,
    );
}

/// Appends batches to the active segment and rolls over to new ones. Owned by one thread.
#[derive(Debug)]
pub struct SegmentWriter {
    dir: PathBuf,
    id: u64,
    file: Arc<File>,
    len: u64,
    segment_bytes: u64,
}

impl SegmentWriter {
    /// Opens segment `id` (creating it if `len` is 0) for appending at `len`.
    pub fn open(dir: &Path, id: u64, len: u64, segment_bytes: u64) -> io::Result<Self> {
        let (file, len) = if len == 0 {
            (segment::create(dir, id)?, segment::MAGIC.len() as u64)
        } else {
            (segment::open_append(dir, id)?, len)
        };
        Ok(SegmentWriter { dir: dir.to_path_buf(), id, file: Arc::new(file), len, segment_bytes })
    }

    /// The active segment.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Appends `bytes`; returns the offset they start at. On failure the segment is cut back to
    /// its previous length, so a partial batch never stays on disk.
    pub fn append(&mut self, bytes: &[u8]) -> io::Result<u64> {
        let offset = self.len;
        if let Err(err) = (&*self.file).write_all(bytes) {
            if let Err(truncate) = self.file.set_len(offset) {
                tracing::error!(segment = self.id, error = %truncate, "could not cut back a failed write");
            }
            return Err(err);
        }
        self.len += bytes.len() as u64;
        Ok(offset)
    }

    /// Flushes the active segment to stable storage.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// The active segment's file, for syncing it from another thread.
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// True when the active segment has reached its size.
    pub fn is_full(&self) -> bool {
        self.len >= self.segment_bytes
    }

    /// Starts the next segment and returns its id. The caller syncs the previous one (its
    /// handle stays valid).
    pub fn roll(&mut self) -> io::Result<u64> {
        let id = self.id + 1;
        self.file = Arc::new(segment::create(&self.dir, id)?);
        self.id = id;
        self.len = segment::MAGIC.len() as u64;
        Ok(id)
    }
}

/// Why a stored message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The read failed for a reason that may pass; the record may well be intact.
    #[error("{0}")]
    Unavailable(io::Error),
    /// The record's bytes are damaged: the message's body is gone.
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

/// Read access to a queue's segments, for loading paged-out bodies.
#[derive(Debug)]
pub struct SegmentReader {
    dir: PathBuf,
    files: RwLock<HashMap<u64, Arc<File>>>,
}

impl SegmentReader {
    /// A reader over the segments in `dir`.
    pub fn new(dir: &Path) -> Self {
        SegmentReader { dir: dir.to_path_buf(), files: RwLock::new(HashMap::new()) }
    }

    /// Reads and decodes the publish record of message `seq` at `location`.
    ///
    /// A record that is cut short, fails its checksum, does not parse or belongs to another
    /// message is [`ReadError::Corrupt`]: its bytes are known to be damaged. Anything else (no
    /// file descriptor left, an I/O error, a missing file) is [`ReadError::Unavailable`]: the
    /// record may be intact, and reading it again later may succeed.
    pub fn read(&self, seq: u64, location: Location) -> Result<StoredMessage, ReadError> {
        let file = self.file(location.segment()).map_err(ReadError::Unavailable)?;
        let mut bytes = vec![0; location.bytes() as usize];
        if let Err(err) = file.read_exact_at(&mut bytes, location.offset()) {
            return Err(match err.kind() {
                io::ErrorKind::UnexpectedEof => {
                    ReadError::Corrupt("the segment ends before the record".into())
                }
                _ => ReadError::Unavailable(err),
            });
        }
        match record::decode(&bytes) {
            Ok((Record::Publish(message), _)) if message.seq == seq => Ok(message),
            Ok((Record::Publish(message), _)) => {
                Err(ReadError::Corrupt(format!("found the record of message seq {} instead", message.seq)))
            }
            Ok(_) => Err(ReadError::Corrupt("not a publish record".into())),
            Err(err) => Err(ReadError::Corrupt(err.to_string())),
        }
    }

    /// Reads the payload of `message` from its stored copy.
    pub fn load(&self, message: &QueuedMessage) -> Result<Arc<Payload>, ReadError> {
        let location =
            message.location.ok_or_else(|| ReadError::Corrupt("the message has no stored copy".into()))?;
        Ok(Arc::new(self.read(message.seq, location)?.payload))
    }

    /// The message id in the damaged record of message `seq` at `location`, if it can still be
    /// made out (see [`record::salvage_id`]).
    pub fn salvage_id(&self, seq: u64, location: Location) -> Option<u64> {
        let file = self.file(location.segment()).ok()?;
        let mut bytes = vec![0; location.bytes() as usize];
        let read = file.read_at(&mut bytes, location.offset()).ok()?;
        record::salvage_id(bytes.get(record::HEADER..read)?, seq)
    }

    /// Deletes a segment file and forgets its handle.
    pub fn delete(&self, segment: u64) -> io::Result<()> {
        self.files.write().remove(&segment);
        match std::fs::remove_file(segment::path(&self.dir, segment)) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
            _ => Ok(()),
        }
    }

    fn file(&self, segment: u64) -> io::Result<Arc<File>> {
        if let Some(file) = self.files.read().get(&segment) {
            return Ok(file.clone());
        }
        let file = Arc::new(File::open(segment::path(&self.dir, segment))?);
        self.files.write().insert(segment, file.clone());
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(segment: u64, len: u32) -> Location {
        Location::new(segment, 8, len)
    }

    fn one(len: u64) -> LiveCount {
        LiveCount { messages: 1, bytes: len }
    }

    #[test]
    fn only_a_prefix_of_empty_segments_is_deleted() {
        let mut log =
            LogBuffer::new(BTreeMap::from([(1, one(10)), (2, one(10)), (3, LiveCount::default())]), 3);
        log.forget(at(2, 10));
        assert!(log.take_doomed().is_empty(), "segment 1 still holds a message");
        log.forget(at(1, 10));
        assert_eq!(log.take_doomed(), vec![1, 2]);
        assert_eq!(log.segments().collect::<Vec<_>>(), vec![(3, LiveCount::default())]);
    }

    #[test]
    fn the_active_segment_is_never_deleted() {
        let mut log = LogBuffer::new(BTreeMap::from([(5, one(10))]), 5);
        log.forget(at(5, 10));
        assert!(log.take_doomed().is_empty());
        log.set_active(6);
        assert_eq!(log.take_doomed(), vec![5]);
    }

    #[test]
    fn compaction_wants_an_old_mostly_dead_segment() {
        let mut log = LogBuffer::new(BTreeMap::new(), 1);
        log.add_live(at(1, 100));
        log.set_active(2);
        assert_eq!(log.compaction_candidate(1000), None, "needs two segments behind it");
        log.set_active(3);
        assert_eq!(log.compaction_candidate(1000), Some(1));
        assert_eq!(log.compaction_candidate(399), None, "more than a quarter live");
    }

    #[test]
    fn writer_appends_rolls_and_reader_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = SegmentWriter::open(dir.path(), 1, 0, 32).unwrap();
        let mut buf = Vec::new();
        let payload = Payload { id: 9, body: bytes::Bytes::from_static(b"body"), ..Payload::default() };
        let mut log = LogBuffer::new(BTreeMap::new(), 1);
        let message = QueuedMessage::transient(4, std::sync::Arc::new(payload.clone()));
        let range = log.publish(&message, &payload);
        buf.extend_from_slice(&log.take(Vec::new()));
        let offset = writer.append(&buf).unwrap();
        assert_eq!(offset, segment::MAGIC.len() as u64);
        let location = Location::new(1, offset + range.start as u64, range.len() as u32);
        let reader = SegmentReader::new(dir.path());
        let stored = reader.read(4, location).unwrap();
        assert_eq!((stored.seq, stored.payload.id, &stored.payload.body[..]), (4, 9, &b"body"[..]));
        assert!(writer.is_full());
        assert_eq!(writer.roll().unwrap(), 2);
        assert_eq!(segment::list(dir.path()).unwrap(), vec![1, 2]);
        reader.delete(1).unwrap();
        assert_eq!(segment::list(dir.path()).unwrap(), vec![2]);
    }

    /// One stored message (seq 4, id 9) in segment 1 of a new directory, and its location.
    fn one_stored() -> (tempfile::TempDir, Location) {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = SegmentWriter::open(dir.path(), 1, 0, 1 << 20).unwrap();
        let payload = Payload { id: 9, body: bytes::Bytes::from_static(b"a body"), ..Payload::default() };
        let mut log = LogBuffer::new(BTreeMap::new(), 1);
        let range = log.publish(&QueuedMessage::transient(4, std::sync::Arc::new(payload.clone())), &payload);
        let offset = writer.append(&log.take(Vec::new())).unwrap();
        (dir, Location::new(1, offset + range.start as u64, range.len() as u32))
    }

    #[test]
    fn damaged_records_are_corrupt_and_failed_reads_are_not() {
        let (dir, location) = one_stored();
        let reader = SegmentReader::new(dir.path());
        assert!(matches!(reader.read(5, location), Err(ReadError::Corrupt(_))), "another message's record");

        let path = segment::path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();
        let err = reader.read(4, location).unwrap_err();
        assert!(matches!(&err, ReadError::Corrupt(text) if text.contains("checksum")), "{err}");
        assert_eq!(reader.salvage_id(4, location), Some(9), "the id survives a damaged body");
        assert_eq!(reader.salvage_id(5, location), None);

        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(last as u64).unwrap();
        assert!(matches!(reader.read(4, location), Err(ReadError::Corrupt(_))), "cut short");

        let missing = Location::new(2, 8, location.bytes());
        assert!(matches!(reader.read(4, missing), Err(ReadError::Unavailable(_))), "no such segment (yet)");
    }
}
