//! A log shared by many durable queues, split by who touches it:
//! - [`LogBuffer`] lives under one queue's lock: that queue's records appended since the last
//!   write, and how many of its messages each segment holds;
//! - [`LiveSegments`] counts the live messages of every queue per segment, which decides when
//!   a segment can go and when it is worth compacting;
//! - [`SegmentWriter`] belongs to the log's storage thread, the only writer of its files;
//! - [`SegmentReader`] is shared, for reading bodies that were paged out of memory, through a
//!   bounded set of open files.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
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

impl LiveCount {
    fn add(&mut self, location: Location) {
        self.messages += 1;
        self.bytes += u64::from(location.bytes());
    }

    fn remove(&mut self, location: Location) {
        self.messages = self.messages.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(u64::from(location.bytes()));
    }
}

/// A queue's buffer above this capacity is given back once written, so a burst does not pin
/// memory in a queue that goes quiet.
const KEEP_BUFFER: usize = 256 * 1024;

/// Live messages per segment, over every queue of one log. Counts only go up on the log's
/// storage thread (a write, a compaction copy); they go down wherever a message is settled.
#[derive(Debug, Default)]
pub struct LiveSegments {
    segments: RwLock<BTreeMap<u64, Arc<Counter>>>,
    /// The queues with live messages in each segment, for compaction to find them.
    holders: parking_lot::Mutex<HashMap<u64, HashSet<u64>>>,
}

#[derive(Debug, Default)]
struct Counter {
    messages: AtomicU64,
    bytes: AtomicU64,
}

impl Counter {
    /// Subtracts `live`, never below zero.
    fn sub(&self, live: LiveCount) {
        let less = |by: u64| move |n: u64| Some(n.saturating_sub(by));
        let _ = self.messages.fetch_update(Ordering::Relaxed, Ordering::Relaxed, less(live.messages));
        let _ = self.bytes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, less(live.bytes));
    }
}

impl LiveSegments {
    /// Starts counting segment `id` (empty).
    pub fn insert(&self, id: u64) {
        self.segments.write().entry(id).or_default();
    }

    /// Stops counting segment `id` (deleted).
    pub fn remove(&self, id: u64) {
        self.segments.write().remove(&id);
        self.holders.lock().remove(&id);
    }

    /// The queues with live messages in segment `id`.
    pub fn holders(&self, id: u64) -> Vec<u64> {
        self.holders.lock().get(&id).map(|q| q.iter().copied().collect()).unwrap_or_default()
    }

    fn hold(&self, segment: u64, queue: u64, holds: bool) {
        let mut holders = self.holders.lock();
        if holds {
            holders.entry(segment).or_default().insert(queue);
        } else if let Some(queues) = holders.get_mut(&segment) {
            queues.remove(&queue);
            if queues.is_empty() {
                holders.remove(&segment);
            }
        }
    }

    fn add(&self, location: Location) {
        if let Some(counter) = self.segments.read().get(&location.segment()) {
            counter.messages.fetch_add(1, Ordering::Relaxed);
            counter.bytes.fetch_add(u64::from(location.bytes()), Ordering::Relaxed);
        }
    }

    fn forget(&self, location: Location) {
        if let Some(counter) = self.segments.read().get(&location.segment()) {
            counter.sub(LiveCount { messages: 1, bytes: location.bytes().into() });
        }
    }

    /// Every segment, oldest first, with what is live in it.
    pub fn snapshot(&self) -> Vec<(u64, LiveCount)> {
        self.segments
            .read()
            .iter()
            .map(|(&id, c)| {
                let live = LiveCount {
                    messages: c.messages.load(Ordering::Relaxed),
                    bytes: c.bytes.load(Ordering::Relaxed),
                };
                (id, live)
            })
            .collect()
    }
}

/// The segments that can be deleted: a prefix of those with nothing live, never the active one.
/// Only a prefix, because a settle record for a message in an older segment lives in a newer
/// one, and must outlive the message's publish record.
pub fn deletable(segments: &[(u64, LiveCount)], active: u64) -> Vec<u64> {
    segments.iter().take_while(|(id, live)| live.messages == 0 && *id != active).map(|&(id, _)| id).collect()
}

/// The oldest segments worth compacting (see [`compaction_candidate`]), at most `max`, oldest
/// first: consecutive ids, so one pass can empty a run of them.
pub fn compaction_run(
    segments: &[(u64, LiveCount)],
    active: u64,
    segment_bytes: u64,
    max: usize,
) -> Vec<u64> {
    let mut run = Vec::new();
    if compaction_candidate(segments, active, segment_bytes).is_none() {
        return run;
    }
    let mostly_dead = mostly_dead(segments, segment_bytes);
    for (at, &(id, live)) in segments.iter().enumerate() {
        let behind = segments.len() - at - 1;
        if run.len() == max || id == active || behind < 2 || !(mostly_dead || live.bytes * 4 <= segment_bytes)
        {
            break;
        }
        run.push(id);
    }
    run
}

/// Dead bytes a log may hold, in segments, before its live messages are moved forward
/// wholesale (see [`compaction_candidate`]).
pub const DEAD_SEGMENTS_ALLOWED: u64 = 16;

/// Whether the log holds more dead bytes than live ones, and more than
/// [`DEAD_SEGMENTS_ALLOWED`] segments of them.
fn mostly_dead(segments: &[(u64, LiveCount)], segment_bytes: u64) -> bool {
    let live: u64 = segments.iter().map(|(_, l)| l.bytes).sum();
    let dead = (segments.len() as u64 * segment_bytes).saturating_sub(live);
    dead >= live.max(DEAD_SEGMENTS_ALLOWED * segment_bytes)
}

/// The oldest segment if it is worth compacting: not the active one, at least two segments
/// behind it, something live in it, and either at most a quarter of a full segment's bytes live
/// in it, or the log is mostly dead. The second case is long-lived messages (a queue nobody
/// consumes, say) filling the start of a log that other queues keep writing through: only moving
/// them forward lets the dead segments behind them go. Every such move copies those messages
/// again, so it waits until the log holds at least as many dead bytes as live ones and
/// [`DEAD_SEGMENTS_ALLOWED`] segments of them: the copying costs at most the live bytes once per
/// that much new data.
pub fn compaction_candidate(segments: &[(u64, LiveCount)], active: u64, segment_bytes: u64) -> Option<u64> {
    let &(oldest, live) = segments.first()?;
    if oldest == active || segments.len() < 3 || live.messages == 0 {
        return None;
    }
    (live.bytes * 4 <= segment_bytes || mostly_dead(segments, segment_bytes)).then_some(oldest)
}

/// One queue's records waiting to be written, and where its live messages are.
#[derive(Debug)]
pub struct LogBuffer {
    buf: Vec<u8>,
    /// This queue's live messages (published, not settled) per segment.
    live: BTreeMap<u64, LiveCount>,
    /// The same, for every queue of the log.
    shared: Arc<LiveSegments>,
    /// The queue's id in the log.
    queue: u64,
}

impl LogBuffer {
    /// A buffer for queue `queue`, with no messages counted yet.
    pub fn new(queue: u64, shared: Arc<LiveSegments>) -> Self {
        LogBuffer { buf: Vec::new(), live: BTreeMap::new(), shared, queue }
    }

    /// Appends a publish record; returns its byte range in the buffer.
    pub fn publish(&mut self, message: &QueuedMessage, payload: &Payload) -> Range<usize> {
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
        if live.messages == 0 {
            self.shared.hold(location.segment(), self.queue, true);
        }
        live.add(location);
        self.shared.add(location);
    }

    /// Uncounts the message at `location` (settled, or moved by compaction).
    pub fn forget(&mut self, location: Location) {
        if let Some(live) = self.live.get_mut(&location.segment()) {
            live.remove(location);
            if live.messages == 0 {
                self.live.remove(&location.segment());
                self.shared.hold(location.segment(), self.queue, false);
            }
        }
        self.shared.forget(location);
    }

    /// Uncounts every message of the queue: it is being deleted.
    pub fn forget_all(&mut self) {
        let segments = self.shared.segments.read();
        for (segment, live) in std::mem::take(&mut self.live) {
            if let Some(counter) = segments.get(&segment) {
                counter.sub(live);
            }
            self.shared.hold(segment, self.queue, false);
        }
    }

    /// True if some of the queue's live messages are in `segment`.
    pub fn holds(&self, segment: u64) -> bool {
        self.live.contains_key(&segment)
    }

    /// True when records are waiting to be written.
    pub fn has_pending(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Bytes waiting to be written.
    pub fn pending_len(&self) -> usize {
        self.buf.len()
    }

    /// Moves the records waiting to be written to the end of `batch`; returns where they are.
    pub fn drain_into(&mut self, batch: &mut Vec<u8>) -> Range<usize> {
        let start = batch.len();
        batch.extend_from_slice(&self.buf);
        self.buf.clear();
        if self.buf.capacity() > KEEP_BUFFER {
            self.buf = Vec::new();
        }
        start..batch.len()
    }

    /// Puts back bytes that could not be written, in front of anything appended since.
    pub fn restore(&mut self, mut unwritten: Vec<u8>) {
        unwritten.extend_from_slice(&self.buf);
        self.buf = unwritten;
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
    file: File,
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
        Ok(SegmentWriter { dir: dir.to_path_buf(), id, file, len, segment_bytes })
    }

    /// The active segment.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Appends `bytes`; returns the offset they start at. On failure the segment is cut back to
    /// its previous length, so a partial batch never stays on disk.
    pub fn append(&mut self, bytes: &[u8]) -> io::Result<u64> {
        let offset = self.len;
        if let Err(err) = (&self.file).write_all(bytes) {
            if let Err(truncate) = self.file.set_len(offset) {
                tracing::error!(segment = self.id, error = %truncate, "could not cut back a failed write");
            }
            return Err(err);
        }
        self.len += bytes.len() as u64;
        Ok(offset)
    }

    /// The offset the next append starts at.
    pub fn end(&self) -> u64 {
        self.len
    }

    /// Flushes the active segment to stable storage.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// True when the active segment has reached its size.
    pub fn is_full(&self) -> bool {
        self.len >= self.segment_bytes
    }

    /// Starts the next segment and returns its id. The caller syncs the current one first: its
    /// handle is closed.
    pub fn roll(&mut self) -> io::Result<u64> {
        let id = self.id + 1;
        self.adopt(id, segment::create(&self.dir, id)?);
        Ok(id)
    }

    /// Continues in `file`, the segment `id` (the next one) made by [`segment::create`]
    /// beforehand. The caller syncs the current one first: its handle is closed.
    pub fn adopt(&mut self, id: u64, file: std::fs::File) {
        debug_assert_eq!(id, self.id + 1);
        self.file = file;
        self.id = id;
        self.len = segment::MAGIC.len() as u64;
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

/// Read access to a log's segments, for loading paged-out bodies. At most `max_open` segment
/// files are kept open; opening another closes the one read least recently.
#[derive(Debug)]
pub struct SegmentReader {
    dir: PathBuf,
    max_open: usize,
    files: RwLock<HashMap<u64, OpenSegment>>,
    clock: AtomicU64,
}

#[derive(Debug)]
struct OpenSegment {
    file: Arc<File>,
    last_read: AtomicU64,
}

impl SegmentReader {
    /// A reader over the segments in `dir`, keeping at most `max_open` files open (at least 1).
    pub fn new(dir: &Path, max_open: usize) -> Self {
        SegmentReader {
            dir: dir.to_path_buf(),
            max_open: max_open.max(1),
            files: RwLock::new(HashMap::new()),
            clock: AtomicU64::new(0),
        }
    }

    /// Segment files open for reading.
    pub fn open_files(&self) -> usize {
        self.files.read().len()
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
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        if let Some(open) = self.files.read().get(&segment) {
            open.last_read.store(now, Ordering::Relaxed);
            return Ok(open.file.clone());
        }
        let file = Arc::new(File::open(segment::path(&self.dir, segment))?);
        let mut files = self.files.write();
        while files.len() >= self.max_open {
            let Some(&coldest) =
                files.iter().min_by_key(|(_, f)| f.last_read.load(Ordering::Relaxed)).map(|(id, _)| id)
            else {
                break;
            };
            // A read in progress holds its own handle; the file closes when it is done.
            files.remove(&coldest);
        }
        files.insert(segment, OpenSegment { file: file.clone(), last_read: AtomicU64::new(now) });
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

    fn sorted(mut ids: Vec<u64>) -> Vec<u64> {
        ids.sort_unstable();
        ids
    }

    fn live(counts: &[(u64, u64)]) -> Vec<(u64, LiveCount)> {
        counts.iter().map(|&(id, bytes)| (id, LiveCount { messages: u64::from(bytes > 0), bytes })).collect()
    }

    #[test]
    fn only_a_prefix_of_empty_segments_is_deleted_and_never_the_active_one() {
        assert_eq!(deletable(&live(&[(1, 10), (2, 0), (3, 0)]), 3), Vec::<u64>::new(), "1 still holds one");
        assert_eq!(deletable(&live(&[(1, 0), (2, 0), (3, 0)]), 3), vec![1, 2]);
        assert_eq!(deletable(&live(&[(1, 0), (2, 10), (3, 0)]), 3), vec![1]);
    }

    #[test]
    fn compaction_wants_an_old_mostly_dead_segment() {
        assert_eq!(compaction_candidate(&live(&[(1, 100), (2, 0)]), 2, 1000), None, "two segments behind it");
        assert_eq!(compaction_candidate(&live(&[(1, 100), (2, 0), (3, 0)]), 3, 1000), Some(1));
        assert_eq!(compaction_candidate(&live(&[(1, 100), (2, 0), (3, 0)]), 3, 399), None, "a quarter live");
        assert_eq!(compaction_candidate(&live(&[(1, 0), (2, 0), (3, 0)]), 3, 1000), None, "nothing to copy");
        let mut pinned = live(&[(1, 1000), (2, 0), (3, 0)]);
        assert_eq!(compaction_candidate(&pinned, 3, 1000), None, "too little dead to move live data");
        pinned.extend((4..=20).map(|id| (id, LiveCount::default())));
        pinned.push((21, LiveCount { messages: 1, bytes: 300 }));
        assert_eq!(
            compaction_candidate(&pinned, 21, 1000),
            Some(1),
            "a full oldest segment pins a mostly dead log"
        );
        let backlog = live(&[(1, 1000), (2, 900), (3, 800), (4, 300)]);
        assert_eq!(compaction_candidate(&backlog, 4, 1000), None, "a log mostly live is left alone");
        assert_eq!(compaction_run(&pinned, 21, 1000, 16), (1..=16).collect::<Vec<_>>());
        assert_eq!(compaction_run(&pinned, 21, 1000, 1), vec![1]);
        assert!(compaction_run(&backlog, 4, 1000, 16).is_empty());
    }

    #[test]
    fn queues_count_into_the_shared_segments_and_a_deleted_queue_gives_its_counts_back() {
        let shared = Arc::new(LiveSegments::default());
        shared.insert(1);
        shared.insert(2);
        let mut a = LogBuffer::new(1, shared.clone());
        let mut b = LogBuffer::new(2, shared.clone());
        a.add_live(at(1, 10));
        b.add_live(at(1, 20));
        b.add_live(at(2, 5));
        assert_eq!(shared.snapshot(), vec![(1, LiveCount { messages: 2, bytes: 30 }), (2, one(5))]);
        assert_eq!(sorted(shared.holders(1)), vec![1, 2]);
        a.settled(0, at(1, 10));
        assert!(!a.holds(1) && b.holds(1));
        assert_eq!(shared.holders(1), vec![2]);
        b.forget_all();
        assert_eq!(shared.snapshot(), vec![(1, LiveCount::default()), (2, LiveCount::default())]);
        assert!(shared.holders(1).is_empty() && shared.holders(2).is_empty());
    }

    #[test]
    fn writer_appends_rolls_and_reader_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = SegmentWriter::open(dir.path(), 1, 0, 32).unwrap();
        let mut buf = Vec::new();
        let payload = Payload { id: 9, body: bytes::Bytes::from_static(b"body"), ..Payload::default() };
        let mut log = LogBuffer::new(1, Arc::default());
        let message = QueuedMessage::transient(4, std::sync::Arc::new(payload.clone()));
        let range = log.publish(&message, &payload);
        log.drain_into(&mut buf);
        let offset = writer.append(&buf).unwrap();
        assert_eq!(offset, segment::MAGIC.len() as u64);
        let location = Location::new(1, offset + range.start as u64, range.len() as u32);
        let reader = SegmentReader::new(dir.path(), 4);
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
        let mut log = LogBuffer::new(1, Arc::default());
        let range = log.publish(&QueuedMessage::transient(4, std::sync::Arc::new(payload.clone())), &payload);
        let mut batch = Vec::new();
        log.drain_into(&mut batch);
        let offset = writer.append(&batch).unwrap();
        (dir, Location::new(1, offset + range.start as u64, range.len() as u32))
    }

    #[test]
    fn the_reader_keeps_at_most_its_cap_of_files_open() {
        let (dir, location) = one_stored();
        std::fs::copy(segment::path(dir.path(), 1), segment::path(dir.path(), 2)).unwrap();
        let elsewhere = Location::new(2, location.offset(), location.bytes());
        let reader = SegmentReader::new(dir.path(), 1);
        for _ in 0..3 {
            assert_eq!(reader.read(4, location).unwrap().payload.id, 9);
            assert_eq!(reader.read(4, elsewhere).unwrap().payload.id, 9);
            assert_eq!(reader.open_files(), 1);
        }
    }

    #[test]
    fn damaged_records_are_corrupt_and_failed_reads_are_not() {
        let (dir, location) = one_stored();
        let reader = SegmentReader::new(dir.path(), 4);
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
