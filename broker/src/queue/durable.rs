//! Durable queues on shared logs.
//!
//! A fixed set of storage threads serves every durable queue. Each thread owns one log (a run
//! of segment files); a queue is assigned to one log when it is declared and keeps it. Under
//! its own lock a queue only encodes records into its buffer and marks itself dirty with its
//! log. The log's thread then takes the buffers of every dirty queue, writes them with one
//! `write`, makes the new messages visible, and syncs once for all of them before sending
//! their confirms: group commit across queues. While one round is written and synced, the next
//! one gathers. An idle queue costs no thread and no open file.
//!
//! Compaction rides in the same rounds: the live messages of a mostly settled old segment are
//! copied forward a bounded slice at a time, in the batches that carry new records, so it never
//! holds up writes, confirms or deliveries.

mod sweeper;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};

use self::sweeper::Doomed;
use super::{Confirm, Dead, Journal, Outcome, Policy, Queue, QueueState, Subscriber};
use crate::error::BrokerError;
use crate::message::{DeathReason, Payload, QueuedMessage};
use crate::storage::log::{
    self as logs, encode_message, LiveSegments, LogBuffer, SegmentReader, SegmentWriter,
};
use crate::storage::segment::{self, Found, QueueScan};
use crate::storage::{record, FsyncPolicy, Location, QueueMeta, ReadError, StorageConfig, Store};

/// When fewer publish bytes than this are waiting, a round waits [`COALESCE_FOR`] for more.
const COALESCE_BELOW: u64 = 16 * 1024;
/// How long a small round waits for more records.
const COALESCE_FOR: Duration = Duration::from_micros(200);
/// How long a log waits before retrying after a failed write or sync.
const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(100);
/// Record bytes compaction copies forward per round, beside the round's own records.
const COMPACT_PER_ROUND: usize = 256 * 1024;
/// A round that takes this long (write, apply, sync) is logged at debug level.
const SLOW_ROUND: Duration = Duration::from_millis(20);
/// Most segments one compaction pass empties.
const COMPACT_SEGMENTS: usize = 16;
/// Most passes over the logs at shutdown to write what their confirms made other queues buffer.
const MAX_DRAIN_PASSES: usize = 16;
/// How long compaction waits after a pass that could not read some record it meant to copy.
const COMPACT_BACKOFF: Duration = Duration::from_secs(1);

/// The storage threads and their logs.
pub struct Storage {
    logs: Vec<Arc<SharedLog>>,
    /// New queues are spread over the first `spread` logs (the configured thread count); logs
    /// beyond them were made by a run with more threads and keep serving their queues.
    spread: usize,
    threads: Mutex<Vec<std::thread::JoinHandle<bool>>>,
    sweeper: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The stored messages of queues whose metadata could not be read: counted as live, so the
    /// segments holding them are kept until the queue can be read again.
    _pinned: Vec<LogBuffer>,
}

/// One log shared by many durable queues, and what its storage thread needs.
pub struct SharedLog {
    index: u32,
    dir: PathBuf,
    config: StorageConfig,
    reader: SegmentReader,
    live: Arc<LiveSegments>,
    members: Mutex<Members>,
    wake: Condvar,
    /// Signalled when a round finishes.
    rounds: Condvar,
    /// Set while syncs fail: publishes to its queues are refused until a sync succeeds.
    failure: RwLock<Option<String>>,
    fsyncs: AtomicU64,
    /// Emptied segments the sweeper deletes.
    doomed: Doomed,
    /// Bytes of publish records buffered since the last round started: a round waits for more
    /// when there are few.
    buffered: AtomicU64,
    /// Makes every sync fail while set: the tests' stand-in for a disk that refuses them.
    #[cfg(test)]
    fail_syncs: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Members {
    queues: HashMap<u64, Weak<Queue>>,
    /// Queues with records or confirms waiting, in the order they asked.
    dirty: Vec<u64>,
    /// Rounds started and finished, for [`SharedLog::flush`] and [`SharedLog::drain`].
    started: u64,
    finished: u64,
    /// A round is wanted even if no queue is dirty.
    round_wanted: bool,
    stopping: bool,
}

/// The parts of a durable queue that live outside its lock.
pub struct Durable {
    id: u64,
    dir: PathBuf,
    log: Arc<SharedLog>,
}

/// The parts that live under the queue's lock.
pub(super) struct DiskState {
    log: LogBuffer,
    /// Publishes in `log`'s buffer, not yet written; invisible to consumers until they are.
    pending: Vec<PendingPublish>,
    /// Responses to confirmed settlements, due once the records buffered before them are
    /// durable.
    settle_confirms: Vec<(Confirm, Outcome)>,
    /// Bytes of this queue's payloads held in memory ([`Payload::size`]).
    resident_bytes: usize,
    /// Already in its log's dirty list.
    scheduled: bool,
}

struct PendingPublish {
    message: QueuedMessage,
    range: Range<usize>,
    confirm: Confirm,
}

/// A durable queue's pieces before they are put together into a [`Queue`].
pub(super) struct Parts {
    state: QueueState<Subscriber>,
    disk: DiskState,
    durable: Durable,
}

impl Parts {
    pub(super) fn into_inner(self) -> (QueueState<Subscriber>, DiskState, Durable) {
        (self.state, self.disk, self.durable)
    }
}

/// A durable queue found on disk at start.
pub(super) struct Stored {
    pub(super) id: u64,
    pub(super) dir: PathBuf,
    pub(super) meta: QueueMeta,
}

impl Storage {
    /// Opens every log under `store`, starts a storage thread for each, and rebuilds the queues
    /// in `stored` from them. A queue whose log is still in its own directory (written before
    /// logs were shared) is moved into a shared log first. After a crash (`crashed`), the
    /// deliveries of the last moments may not have been recorded, so every recovered message is
    /// flagged as possibly delivered.
    ///
    /// Messages come back as index entries only; bodies are read from disk when delivered.
    pub(super) fn open(
        store: &Store,
        config: &StorageConfig,
        stored: &mut [Stored],
        unreadable: &[u64],
        crashed: bool,
    ) -> io::Result<(Storage, HashMap<u64, Parts>)> {
        let spread = config.threads.clamp(1, 64);
        let on_disk = store.logs()?;
        let count = on_disk.last().map_or(0, |&last| last as usize + 1).max(spread);
        let mut legacy: BTreeMap<u32, Vec<&mut Stored>> = BTreeMap::new();
        for queue in stored.iter_mut().filter(|q| q.meta.log.is_none()) {
            legacy.entry((queue.id % spread as u64) as u32).or_default().push(queue);
        }
        for (index, mut queues) in legacy {
            move_legacy_logs(store, config, index, &mut queues)?;
        }
        let per_log_files = (config.max_open_segments / count).max(1);
        let mut logs = Vec::with_capacity(count);
        let mut writers = Vec::with_capacity(count);
        let mut parts = HashMap::new();
        let mut pinned = Vec::new();
        for index in 0..count as u32 {
            let started = Instant::now();
            let dir = store.log_dir(index)?;
            let owners: HashMap<u64, &Stored> =
                stored.iter().filter(|q| q.meta.log == Some(index)).map(|q| (q.id, q)).collect();
            let accepts = |queue| owners.contains_key(&queue) || unreadable.contains(&queue);
            let scan = segment::scan(&dir, None, &accepts)?;
            for problem in &scan.problems {
                if problem.is_error {
                    tracing::error!(log = index, "{}", problem.message);
                } else {
                    tracing::warn!(log = index, "{}", problem.message);
                }
            }
            store.reserve_ids_up_to(scan.max_queue);
            let live = Arc::new(LiveSegments::default());
            for &(segment, _) in &scan.segments {
                live.insert(segment);
            }
            let (active, len) = scan.segments.last().copied().unwrap_or((1, 0));
            let writer = SegmentWriter::open(&dir, active, len, config.segment_bytes)?;
            live.insert(active);
            let log = Arc::new(SharedLog::new(index, dir, config, per_log_files, live.clone()));
            let mut queues = scan.queues;
            for id in unreadable {
                let Some(found) = queues.remove(id) else { continue };
                tracing::error!(
                    log = index,
                    queue = id,
                    messages = found.messages.len(),
                    "messages of a queue whose metadata cannot be read are kept in the log"
                );
                let mut buffer = LogBuffer::new(*id, live.clone());
                for message in &found.messages {
                    buffer.add_live(message.location);
                }
                pinned.push(buffer);
            }
            let mut messages = 0;
            for (&id, queue) in &owners {
                let found = queues.remove(&id).unwrap_or_default();
                messages += found.messages.len();
                parts.insert(id, Parts::recovered(&queue.meta, found, &log, id, &queue.dir, crashed));
            }
            if !owners.is_empty() {
                tracing::info!(
                    log = index,
                    queues = owners.len(),
                    messages,
                    segments = scan.segments.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "log recovered"
                );
            }
            logs.push(log);
            writers.push(writer);
        }
        let storage = Storage {
            logs,
            spread,
            threads: Mutex::new(Vec::new()),
            sweeper: Mutex::new(None),
            _pinned: pinned,
        };
        let out_of_threads = |what: String, err: io::Error| {
            io::Error::new(
                err.kind(),
                format!("cannot start {what}: {err}; the machine is out of threads or memory"),
            )
        };
        let (tell_sweeper, told) = std::sync::mpsc::channel();
        let logs = storage.logs.clone();
        let sweeper = std::thread::Builder::new()
            .name("segment-sweeper".into())
            .spawn(move || sweeper::run(logs, told))
            .map_err(|err| out_of_threads("the segment sweeper".into(), err))?;
        *storage.sweeper.lock() = Some(sweeper);
        for (log, writer) in storage.logs.iter().zip(writers) {
            let log = log.clone();
            let index = log.index;
            let sweep = tell_sweeper.clone();
            let handle = std::thread::Builder::new()
                .name(format!("storage-{index}"))
                .spawn(move || run(&log, writer, &sweep))
                .map_err(|err| out_of_threads(format!("storage thread {index}"), err))?;
            storage.threads.lock().push(handle);
        }
        Ok((storage, parts))
    }

    /// The log a new queue with id `id` writes to.
    pub(super) fn assign(&self, id: u64) -> u32 {
        (id % self.spread as u64) as u32
    }

    /// The pieces of a new, empty durable queue with id `id` in `dir`, on log `index`.
    pub(super) fn create(&self, id: u64, dir: &Path, index: u32, policy: Policy) -> Parts {
        let log = self.logs[index as usize].clone();
        let disk = DiskState::new(LogBuffer::new(id, log.live.clone()));
        Parts { state: QueueState::new(policy), disk, durable: Durable { id, dir: dir.to_path_buf(), log } }
    }

    /// Total fsyncs (and fdatasyncs) of every log since the start.
    pub fn fsyncs(&self) -> u64 {
        self.logs.iter().map(|l| l.fsyncs.load(Ordering::Relaxed)).sum()
    }

    /// Segment files open for reading, over every log.
    pub fn open_files(&self) -> usize {
        self.logs.iter().map(|l| l.reader.open_files()).sum()
    }

    /// Storage threads (one per log).
    pub fn threads(&self) -> usize {
        self.logs.len()
    }

    /// Why some log cannot sync, if one cannot.
    pub fn failure(&self) -> Option<String> {
        self.logs.iter().find_map(|l| l.failure().map(|err| format!("log {}: {err}", l.index)))
    }

    /// Writes out and syncs what every queue has buffered and stops the threads. Returns true
    /// if everything was written and synced.
    ///
    /// The logs are first drained until none has anything left: a confirm sent by one log's last
    /// round may buffer records in a queue of another (a dead-lettered message is settled in its
    /// old queue once its dead-letter queue holds it), and those must be written too.
    pub(super) fn stop(&self) -> bool {
        for _ in 0..MAX_DRAIN_PASSES {
            let mut busy = false;
            for log in &self.logs {
                busy |= log.drain();
            }
            if !busy {
                break;
            }
        }
        for log in &self.logs {
            log.members.lock().stopping = true;
            log.wake.notify_one();
        }
        let mut clean = true;
        for handle in self.threads.lock().drain(..) {
            clean &= handle.join().unwrap_or(false);
        }
        // With every storage thread gone, the sweeper's channel closes once it is done.
        if let Some(sweeper) = self.sweeper.lock().take() {
            let _ = sweeper.join();
        }
        clean
    }
}

impl SharedLog {
    fn new(
        index: u32,
        dir: PathBuf,
        config: &StorageConfig,
        max_open: usize,
        live: Arc<LiveSegments>,
    ) -> Self {
        SharedLog {
            index,
            reader: SegmentReader::new(&dir, max_open),
            dir,
            config: config.clone(),
            live,
            members: Mutex::default(),
            wake: Condvar::new(),
            rounds: Condvar::new(),
            failure: RwLock::new(None),
            fsyncs: AtomicU64::new(0),
            doomed: Doomed::default(),
            buffered: AtomicU64::new(0),
            #[cfg(test)]
            fail_syncs: Default::default(),
        }
    }

    /// Queues `id` for the next round. Called under the queue's lock; the storage thread never
    /// takes a queue's lock while it holds the members' lock.
    fn mark_dirty(&self, id: u64) {
        let mut members = self.members.lock();
        members.dirty.push(id);
        drop(members);
        self.wake.notify_one();
    }

    /// Waits until queue `id`'s buffered records have been written and synced.
    fn flush(&self, id: u64) {
        self.members.lock().dirty.push(id);
        self.drain();
    }

    /// Runs a round that starts after this call and waits for it. Returns whether any queue
    /// had something waiting.
    fn drain(&self) -> bool {
        let mut members = self.members.lock();
        if members.stopping {
            return false;
        }
        let busy = !members.dirty.is_empty();
        let wanted = members.started + 1;
        members.round_wanted = true;
        self.wake.notify_one();
        while members.finished < wanted && !members.stopping {
            self.rounds.wait(&mut members);
        }
        busy
    }

    /// Blocks until some queue is dirty, a round is wanted, the log stops, or `wait` (if any)
    /// has passed: a periodic sync or a retry is due.
    fn wait_for_work(&self, wait: Option<Duration>) {
        let mut members = self.members.lock();
        if members.dirty.is_empty() && !members.stopping && !members.round_wanted {
            match wait {
                Some(timeout) => {
                    self.wake.wait_for(&mut members, timeout);
                }
                None => self.wake.wait(&mut members),
            }
        }
    }

    /// Starts a round: the queues to serve and whether the log is stopping.
    fn next_round(&self) -> (Vec<Arc<Queue>>, bool) {
        let mut members = self.members.lock();
        let stopping = members.stopping;
        members.started += 1;
        members.round_wanted = false;
        let dirty = std::mem::take(&mut members.dirty);
        let mut queues = Vec::with_capacity(dirty.len());
        for id in dirty {
            if let Some(queue) = members.queues.get(&id).and_then(Weak::upgrade) {
                queues.push(queue);
            }
        }
        if stopping {
            // Everything buffered goes out before the thread ends.
            queues = members.queues.values().filter_map(Weak::upgrade).collect();
        }
        (queues, stopping)
    }

    fn finish_round(&self) {
        self.members.lock().finished += 1;
        self.rounds.notify_all();
    }

    /// Why publishes are refused, while syncs fail.
    fn failure(&self) -> Option<String> {
        self.failure.read().clone()
    }

    fn set_failure(&self, error: Option<String>) {
        let mut failure = self.failure.write();
        match (&*failure, &error) {
            (None, Some(err)) => {
                tracing::error!(log = self.index, dir = %self.dir.display(), error = %err, "log sync failed; publishes to its queues are refused until a sync succeeds")
            }
            (Some(_), None) => tracing::info!(log = self.index, "log syncs again; publishes are accepted"),
            _ => {}
        }
        *failure = error;
    }

    /// Flushes the active segment, counting the call.
    fn sync(&self, writer: &SegmentWriter) -> io::Result<()> {
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        #[cfg(test)]
        if self.fail_syncs.load(Ordering::Relaxed) {
            return Err(io::Error::other("injected sync failure"));
        }
        writer.sync()
    }
}

impl Parts {
    /// A queue rebuilt from what the scan of its log found.
    fn recovered(
        meta: &QueueMeta,
        found: QueueScan,
        log: &Arc<SharedLog>,
        id: u64,
        dir: &Path,
        crashed: bool,
    ) -> Parts {
        let mut state = QueueState::new(meta.settings.policy());
        state.set_next_seq(found.next_seq);
        let mut buffer = LogBuffer::new(id, log.live.clone());
        for found in found.messages {
            buffer.add_live(found.location);
            // Sized by its record, less the fixed fields: the body, headers and deaths it carries.
            let size = found.location.bytes().saturating_sub(record::FIXED_PUBLISH_BYTES);
            let mut message = QueuedMessage::stored(found.seq, found.delivery_count, size, found.location);
            message.maybe_delivered = crashed;
            state.restore(message.with_extra(found.expires_at_ms, found.due_ms, found.failure.map(|f| *f)));
        }
        let durable = Durable { id, dir: dir.to_path_buf(), log: log.clone() };
        Parts { state, disk: DiskState::new(buffer), durable }
    }
}

/// Moves the logs of `queues`, still in their own directories (the layout before logs were
/// shared), into shared log `index`: each queue's live records are copied there and synced,
/// then its `queue.json` is rewritten to name the log, then its old segments are deleted. A
/// crash before the rewrite leaves the queue where it was (the copies are passed over at the
/// next start, being of a queue that does not name that log); a crash after it leaves only old
/// files to delete.
fn move_legacy_logs(
    store: &Store,
    config: &StorageConfig,
    index: u32,
    queues: &mut [&mut Stored],
) -> io::Result<()> {
    let dir = store.log_dir(index)?;
    // Cuts a torn tail off the shared log before anything is appended behind it.
    let tail = segment::scan(&dir, None, &|_| false)?;
    let (active, len) = tail.segments.last().copied().unwrap_or((1, 0));
    let mut writer = SegmentWriter::open(&dir, active, len, config.segment_bytes)?;
    for queue in queues.iter_mut() {
        if let Err(err) = move_legacy_log(store, &mut writer, index, queue) {
            tracing::error!(queue = %queue.meta.name, dir = %queue.dir.display(), error = %err, "the queue's log could not be moved into a shared log; the queue is not started and its files are kept");
        }
    }
    Ok(())
}

/// Moves one queue's log; see [`move_legacy_logs`].
fn move_legacy_log(
    store: &Store,
    writer: &mut SegmentWriter,
    index: u32,
    queue: &mut Stored,
) -> io::Result<()> {
    {
        let old = segment::list(&queue.dir)?;
        if !old.is_empty() {
            let scan = segment::scan(&queue.dir, Some(queue.id), &|_| true)?;
            for problem in &scan.problems {
                tracing::warn!(queue = %queue.meta.name, "{}", problem.message);
            }
            let found = scan.queues.into_values().next().unwrap_or_default();
            let reader = SegmentReader::new(&queue.dir, 4);
            let mut batch = Vec::new();
            for message in &found.messages {
                if batch.is_empty() {
                    record::encode_queue(&mut batch, queue.id);
                }
                copy_legacy(&reader, message, &mut batch)?;
                if batch.len() >= 4 << 20 {
                    append_rolling(writer, &batch)?;
                    batch.clear();
                }
            }
            append_rolling(writer, &batch)?;
            writer.sync()?;
            tracing::info!(queue = %queue.meta.name, messages = found.messages.len(), log = index, "queue log moved into a shared log");
        }
        let mut meta = queue.meta.clone();
        meta.log = Some(index);
        store.rewrite(&queue.dir, &meta)?;
        queue.meta = meta;
        for id in old {
            std::fs::remove_file(segment::path(&queue.dir, id))?;
        }
    }
    Ok(())
}

/// Appends `batch` (which starts with a queue record) to the active segment, starting a new
/// one first if it is full.
fn append_rolling(writer: &mut SegmentWriter, batch: &[u8]) -> io::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    if writer.is_full() {
        writer.sync()?;
        writer.roll()?;
    }
    writer.append(batch).map(drop)
}

/// Appends a live message of an old per-queue log, as it stands, to `batch`.
fn copy_legacy(reader: &SegmentReader, found: &Found, batch: &mut Vec<u8>) -> io::Result<()> {
    let stored = match reader.read(found.seq, found.location) {
        Ok(stored) => stored,
        Err(ReadError::Unavailable(err)) => return Err(err),
        Err(ReadError::Corrupt(why)) => {
            tracing::error!(seq = found.seq, error = %why, "a damaged record could not be moved; its message is lost");
            return Ok(());
        }
    };
    record::encode_publish(
        batch,
        found.seq,
        found.delivery_count,
        found.expires_at_ms,
        found.due_ms,
        &stored.payload,
    );
    if let Some(failure) = &found.failure {
        record::encode_failed(batch, found.seq, found.delivery_count, found.due_ms, failure);
    }
    Ok(())
}

impl DiskState {
    fn new(log: LogBuffer) -> Self {
        DiskState {
            log,
            pending: Vec::new(),
            settle_confirms: Vec::new(),
            resident_bytes: 0,
            scheduled: false,
        }
    }

    /// Body bytes held in memory.
    pub(super) fn resident_bytes(&self) -> usize {
        self.resident_bytes
    }

    /// Bytes of records buffered and not yet written.
    pub(super) fn pending_bytes(&self) -> usize {
        self.log.pending_len()
    }

    /// Records that a stored message left the queue.
    pub(super) fn log_settled(&mut self, seq: u64, location: Location) {
        self.log.settled(seq, location);
    }
}

impl Durable {
    /// The queue's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The shared log the queue writes to.
    pub fn log_index(&self) -> u32 {
        self.log.index
    }

    /// Starts serving `queue` from its log.
    pub(super) fn attach(&self, queue: &Arc<Queue>) {
        self.log.members.lock().queues.insert(self.id, Arc::downgrade(queue));
    }

    /// Writes out what the queue has buffered, then stops serving it and gives its segment
    /// counts back: it is being deleted.
    pub(super) fn detach(&self, queue: &Queue) {
        self.log.flush(self.id);
        self.log.members.lock().queues.remove(&self.id);
        if let Some(disk) = queue.state.lock().disk.as_mut() {
            disk.log.forget_all();
        }
    }

    pub(super) fn journal<'a>(
        &'a self,
        disk: &'a mut DiskState,
        deaths: &'a mut Vec<Dead>,
    ) -> DiskJournal<'a> {
        DiskJournal { disk, reader: &self.log.reader, budget: self.log.config.queue_memory_bytes, deaths }
    }

    /// Why the queue cannot take publishes now, if its log's syncs are failing.
    pub(super) fn refusal(&self) -> Option<BrokerError> {
        self.log.failure().map(|err| {
            BrokerError::ResourceLimit(format!("message not stored: the queue's log cannot sync: {err}"))
        })
    }

    /// Buffers a publish record; the message becomes visible once its storage thread wrote it.
    pub(super) fn append_publish(&self, disk: &mut DiskState, mut message: QueuedMessage, confirm: Confirm) {
        let Some(payload) = message.payload.clone() else {
            confirm.send(Err(BrokerError::Internal("a published message has no payload".into())));
            return;
        };
        message.payload = Some(payload.clone());
        let range = disk.log.publish(&message, &payload);
        self.log.buffered.fetch_add(range.len() as u64, Ordering::Relaxed);
        disk.pending.push(PendingPublish { message, range, confirm });
        self.schedule(disk);
    }

    /// Holds `response` until the storage thread has written (and, per policy, synced) everything
    /// buffered up to now.
    pub(super) fn defer_confirm(&self, disk: &mut DiskState, confirm: Confirm, response: Outcome) {
        disk.settle_confirms.push((confirm, response));
        self.schedule(disk);
    }

    pub(super) fn wake_if_pending(&self, disk: &mut DiskState) {
        if disk.log.has_pending() || !disk.settle_confirms.is_empty() {
            self.schedule(disk);
        }
    }

    fn schedule(&self, disk: &mut DiskState) {
        if !disk.scheduled {
            disk.scheduled = true;
            self.log.mark_dirty(self.id);
        }
    }

    /// Reads the stored body of `message`, without the queue's lock.
    pub(super) fn load(&self, message: &QueuedMessage) -> Result<Arc<Payload>, ReadError> {
        self.log.reader.load(message)
    }

    /// The id of a message whose stored copy is damaged, if it can still be made out.
    pub(super) fn salvage_id(&self, message: &QueuedMessage) -> Option<u64> {
        self.log.reader.salvage_id(message.seq, message.location?)
    }
}

/// The journal of a durable queue: records go to the log buffer; bodies beyond the memory
/// budget are dropped from memory and read back from disk on delivery; dead messages are
/// collected for routing (their settle record is written once the dead-letter queue holds
/// them).
pub(super) struct DiskJournal<'a> {
    disk: &'a mut DiskState,
    reader: &'a SegmentReader,
    budget: usize,
    deaths: &'a mut Vec<Dead>,
}

impl DiskJournal<'_> {
    fn release(&mut self, message: &QueuedMessage) {
        if let Some(payload) = &message.payload {
            self.disk.resident_bytes = self.disk.resident_bytes.saturating_sub(payload.size());
        }
    }
}

impl Journal for DiskJournal<'_> {
    fn delivered(&mut self, message: &QueuedMessage) {
        self.disk.log.delivered(message.seq, message.delivery_count);
    }

    fn settled(&mut self, message: &QueuedMessage) {
        self.release(message);
        if let Some(location) = message.location {
            self.disk.log.settled(message.seq, location);
        }
    }

    fn requeued(&mut self, message: &mut QueuedMessage) {
        if self.disk.resident_bytes > self.budget {
            if let Some(payload) = message.payload.take() {
                self.disk.resident_bytes = self.disk.resident_bytes.saturating_sub(payload.size());
            }
        }
    }

    fn failed(&mut self, message: &QueuedMessage) {
        self.disk.log.failed(message);
    }

    fn dead(&mut self, message: QueuedMessage, reason: DeathReason) {
        // A body that is only on disk is read when the message is routed, outside the lock.
        self.release(&message);
        self.deaths.push(Dead { message, reason });
    }

    fn load(&mut self, message: &QueuedMessage) -> Result<Arc<Payload>, ReadError> {
        self.reader.load(message)
    }

    fn hold(&mut self, payload: &Payload) {
        self.disk.resident_bytes += payload.size();
    }
}

/// One queue's share of a round.
struct Chunk {
    queue: Arc<Queue>,
    /// Its buffered records, in the round's batch.
    range: Range<usize>,
    pending: Vec<PendingPublish>,
    settles: Vec<(Confirm, Outcome)>,
    copies: Vec<CopyForward>,
    /// Messages compaction wanted to copy and could not read.
    unreadable: usize,
}

/// A live message copied forward by compaction: its old place, and its copy in the batch.
struct CopyForward {
    seq: u64,
    from: Location,
    range: Range<usize>,
}

/// Compaction in progress: the segment being emptied and the queues still holding messages in
/// it.
struct Compaction {
    segments: RangeInclusive<u64>,
    queues: Vec<Arc<Queue>>,
    /// Some message could not be read to be copied: the segment stays, and the next pass waits.
    unreadable: bool,
}

type Confirmation = (Confirm, Result<Outcome, BrokerError>);

/// The storage thread of one log. Each round: take the records of every dirty queue (and a
/// slice of compaction copies), write them with one `write`, make the new messages visible,
/// fsync once and send the round's confirms; then delete emptied segments and roll. Returns
/// true if everything was written and synced when the log stopped.
fn run(log: &SharedLog, mut writer: SegmentWriter, sweep: &mpsc::Sender<u32>) -> bool {
    let policy = log.config.fsync;
    let mut batch: Vec<u8> = Vec::new();
    let mut unsynced = false;
    let mut last_sync = Instant::now();
    let mut write_failing = false;
    let mut clean = true;
    let mut compaction: Option<Compaction> = None;
    let mut compact_after = Instant::now();
    log.doomed.want_next(writer.id() + 1);
    loop {
        let retrying = write_failing || log.failure.read().is_some();
        let wait = if retrying {
            Some(RETRY_AFTER_FAILURE)
        } else if compaction.is_some() {
            Some(Duration::ZERO)
        } else if unsynced && policy == FsyncPolicy::Batch {
            Some((last_sync + log.config.fsync_interval).saturating_duration_since(Instant::now()))
        } else {
            None
        };
        log.wait_for_work(wait);
        let buffered = log.buffered.load(Ordering::Relaxed);
        if buffered > 0 && buffered < COALESCE_BELOW {
            // A small round: give publishers a moment to add to it, so a busy log writes in
            // fewer, larger batches instead of a syscall every few messages.
            std::thread::sleep(COALESCE_FOR);
        }
        log.buffered.store(0, Ordering::Relaxed);
        let (queues, stopping) = log.next_round();
        batch.clear();
        let collect_started = Instant::now();
        let mut chunks = Vec::with_capacity(queues.len());
        let mut budget = COMPACT_PER_ROUND;
        for queue in queues {
            chunks.extend(take(log, queue, &mut batch, None, &mut budget));
        }
        if let Some(work) = &mut compaction {
            while budget > 0 {
                let Some(queue) = work.queues.last().cloned() else { break };
                if let Some(chunk) = take(log, queue, &mut batch, Some(&work.segments), &mut budget) {
                    work.unreadable |= chunk.unreadable > 0;
                    chunks.push(chunk);
                }
                if budget > 0 {
                    // It had no more to copy than the budget left: every copy it needs is in
                    // this batch. Taken again in the same round, before the copies are applied,
                    // it would copy the same messages again.
                    work.queues.pop();
                }
            }
        }

        let round_started = Instant::now();
        let collected = round_started - collect_started;
        let written = if batch.is_empty() {
            Ok(writer.end())
        } else {
            writer.append(&batch).map_err(|e| e.to_string())
        };
        match &written {
            Ok(_) if !batch.is_empty() => {
                unsynced = true;
                write_failing = false;
            }
            Ok(_) => {}
            Err(err) => {
                if !write_failing {
                    tracing::error!(log = log.index, error = %err, "log write failed; publishes are refused until it succeeds");
                }
                write_failing = true;
            }
        }
        let mut confirms = Vec::new();
        for chunk in chunks {
            confirms.extend(apply(
                log,
                writer.id(),
                &batch,
                chunk,
                written.as_ref().copied().map_err(Clone::clone),
            ));
        }
        let applied = Instant::now();
        let synced = if policy == FsyncPolicy::Always && (unsynced || log.failure.read().is_some()) {
            let synced = log.sync(&writer).map_err(|e| e.to_string());
            unsynced = false;
            log.set_failure(synced.as_ref().err().cloned());
            clean &= synced.is_ok();
            synced
        } else {
            Ok(())
        };
        let synced_at = Instant::now();
        for (confirm, outcome) in confirms {
            confirm.send(match (&synced, outcome) {
                (Ok(()), outcome) => outcome,
                (Err(err), Ok(_)) => {
                    Err(BrokerError::ResourceLimit(format!("message not confirmed: fsync failed: {err}")))
                }
                (Err(_), refused) => refused,
            });
        }
        let sync_due = last_sync.elapsed() >= log.config.fsync_interval;
        if unsynced && (stopping || (policy == FsyncPolicy::Batch && sync_due)) {
            let synced = log.sync(&writer);
            if let Err(err) = &synced {
                tracing::error!(log = log.index, error = %err, "log sync failed");
            }
            clean &= synced.is_ok();
            unsynced = false;
            last_sync = Instant::now();
        }
        log.finish_round();
        let took = collect_started.elapsed();
        if took >= SLOW_ROUND {
            tracing::debug!(
                log = log.index,
                bytes = batch.len(),
                took_ms = took.as_millis() as u64,
                collect_ms = collected.as_millis() as u64,
                sync_ms = (synced_at - applied).as_millis() as u64,
                "slow round"
            );
        }
        if stopping {
            return clean && !write_failing;
        }
        let maintain_started = Instant::now();
        maintain(log, &mut writer, &mut compaction, &mut compact_after, sweep);
        let took = maintain_started.elapsed();
        if took >= SLOW_ROUND {
            tracing::debug!(log = log.index, took_ms = took.as_millis() as u64, "slow maintenance");
        }
    }
}

/// Takes a queue's buffered records into `batch`, with, when `compact` names segments, copies
/// of its live messages there (within `budget` bytes). The copies follow the records taken in
/// the same lock, so a settle buffered after them comes after them in the log too.
fn take(
    log: &SharedLog,
    queue: Arc<Queue>,
    batch: &mut Vec<u8>,
    compact: Option<&RangeInclusive<u64>>,
    budget: &mut usize,
) -> Option<Chunk> {
    let durable = queue.durable.as_ref()?;
    let mut guard = queue.state.lock();
    let live = &mut *guard;
    let disk = live.disk.as_mut()?;
    disk.scheduled = false;
    let victims: Vec<QueuedMessage> = match compact {
        Some(segments) if segments.clone().any(|s| disk.log.holds(s)) => {
            // At least one message, however large, so that every segment can be emptied.
            let mut room = *budget;
            live.state
                .messages()
                .filter(|m| m.location.is_some_and(|l| segments.contains(&l.segment())))
                .take_while(|m| {
                    let more = room > 0;
                    room = room.saturating_sub(m.location.map_or(0, |l| l.bytes() as usize));
                    more
                })
                .map(|m| QueuedMessage { payload: None, ..m.into_owned() })
                .collect()
        }
        _ => Vec::new(),
    };
    if !disk.log.has_pending() && disk.settle_confirms.is_empty() && victims.is_empty() {
        return None;
    }
    if disk.log.has_pending() || !victims.is_empty() {
        record::encode_queue(batch, durable.id);
    }
    let range = disk.log.drain_into(batch);
    let pending = std::mem::take(&mut disk.pending);
    let settles = std::mem::take(&mut disk.settle_confirms);
    drop(guard);
    let mut copies = Vec::with_capacity(victims.len());
    let mut unreadable = 0;
    for victim in victims {
        let Some(from) = victim.location else { continue };
        // An unreadable copy stays where it is: its segment is kept, and delivery deals with it.
        let Ok(stored) = log.reader.read(victim.seq, from) else {
            unreadable += 1;
            continue;
        };
        let start = batch.len();
        encode_message(batch, &victim, &stored.payload);
        *budget = budget.saturating_sub(batch.len() - start);
        copies.push(CopyForward { seq: victim.seq, from, range: start..batch.len() });
    }
    Some(Chunk { queue, range, pending, settles, copies, unreadable })
}

/// Under the queue's lock: make the written publishes ready and move compacted messages to
/// their copies (or, if the write failed, put the other records back for another try and
/// refuse the publishes). Returns the chunk's confirms.
fn apply(
    log: &SharedLog,
    segment: u64,
    batch: &[u8],
    chunk: Chunk,
    written: Result<u64, String>,
) -> Vec<Confirmation> {
    let Chunk { queue, range, pending, settles, copies, .. } = chunk;
    let Some(durable) = queue.durable.as_ref() else { return Vec::new() };
    let mut confirms = Vec::with_capacity(pending.len() + settles.len());
    let mut deaths = Vec::new();
    let mut guard = queue.state.lock();
    let live = &mut *guard;
    let Some(disk) = live.disk.as_mut() else { return Vec::new() };
    match written {
        Ok(offset) => {
            let base = offset + range.start as u64;
            for publish in pending {
                let PendingPublish { mut message, range, confirm } = publish;
                let location = Location::new(segment, base + range.start as u64, range.len() as u32);
                disk.log.add_live(location);
                let Some(payload) = message.payload.take() else { continue };
                let size = payload.size();
                let resident = disk.resident_bytes + size <= log.config.queue_memory_bytes;
                if resident {
                    disk.resident_bytes += size;
                }
                let id = payload.id;
                message.payload = resident.then_some(payload);
                message.location = Some(location);
                live.state.unreserve(u64::from(message.size));
                live.state.admit(message);
                confirms.push((confirm, Ok(Outcome::Published { message_id: id, routed: 1 })));
            }
            for copy in copies {
                // Settled while it was copied: its settle record follows the copy in the log.
                let Some(message) = live.state.find_mut(copy.seq) else { continue };
                if message.location != Some(copy.from) {
                    continue;
                }
                let to = Location::new(segment, offset + copy.range.start as u64, copy.range.len() as u32);
                message.location = Some(to);
                disk.log.add_live(to);
                disk.log.forget(copy.from);
            }
            confirms.extend(settles.into_iter().map(|(confirm, body)| (confirm, Ok(body))));
            let now = super::now_ms();
            let mut journal = durable.journal(disk, &mut deaths);
            live.state.enforce_bounds(&mut journal);
            live.state.dispatch(now, &mut journal);
        }
        Err(error) => {
            let bytes = &batch[range];
            let mut others = Vec::new();
            let mut at = 0;
            for publish in &pending {
                others.extend_from_slice(&bytes[at..publish.range.start]);
                at = publish.range.end;
            }
            others.extend_from_slice(&bytes[at..]);
            // Publishes buffered while this batch was out now sit behind the records put
            // back: their ranges move with them.
            let shift = others.len();
            for later in &mut disk.pending {
                later.range = later.range.start + shift..later.range.end + shift;
            }
            disk.log.restore(others);
            // Their records go round again with the failed batch.
            disk.settle_confirms.splice(0..0, settles);
            durable.wake_if_pending(disk);
            for publish in pending {
                live.state.unreserve(u64::from(publish.message.size));
                let error =
                    BrokerError::ResourceLimit(format!("message not stored: disk write failed: {error}"));
                confirms.push((publish.confirm, Err(error)));
            }
        }
    }
    let next = live.state.next_timer();
    drop(guard);
    queue.after_unlock(deaths, next);
    confirms
}

/// Starts a new segment when the active one is full, deletes the segments nothing live is left
/// in, and picks the next segment to compact.
fn maintain(
    log: &SharedLog,
    writer: &mut SegmentWriter,
    compaction: &mut Option<Compaction>,
    compact_after: &mut Instant,
    sweep: &mpsc::Sender<u32>,
) {
    if writer.is_full() {
        if log.config.fsync != FsyncPolicy::Always {
            // Under `always` every batch was synced as it was written.
            if let Err(err) = log.sync(writer) {
                tracing::error!(log = log.index, error = %err, "log sync failed");
            }
        }
        let id = writer.id() + 1;
        let rolled = match log.doomed.take_next(id) {
            Some(file) => {
                writer.adopt(id, file);
                Ok(id)
            }
            None => writer.roll(),
        };
        match rolled {
            Ok(id) => log.live.insert(id),
            Err(err) => tracing::error!(log = log.index, error = %err, "could not start a new segment"),
        }
    }
    let segments = log.live.snapshot();
    if segments.len() < 2 {
        return;
    }
    for segment in logs::deletable(&segments, writer.id()) {
        log.live.remove(segment);
        log.doomed.push(segment);
    }
    if log.doomed.should_tell() {
        // The sweeper outlives every storage thread, so the send cannot fail.
        let _ = sweep.send(log.index);
    }
    if let Some(work) = compaction {
        if !work.queues.is_empty() {
            return;
        }
        if work.unreadable {
            *compact_after = Instant::now() + COMPACT_BACKOFF;
        }
        *compaction = None;
    }
    if Instant::now() < *compact_after {
        return;
    }
    let segments = log.live.snapshot();
    let run = logs::compaction_run(&segments, writer.id(), log.config.segment_bytes, COMPACT_SEGMENTS);
    let (Some(&first), Some(&last)) = (run.first(), run.last()) else { return };
    let mut holders: Vec<u64> = run.iter().flat_map(|&segment| log.live.holders(segment)).collect();
    holders.sort_unstable();
    holders.dedup();
    let queues: Vec<Arc<Queue>> = {
        let members = log.members.lock();
        holders.iter().filter_map(|id| members.queues.get(id).and_then(Weak::upgrade)).collect()
    };
    tracing::debug!(log = log.index, first, last, queues = queues.len(), "compacting the oldest segments");
    *compaction = Some(Compaction { segments: first..=last, queues, unreadable: false });
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use crate::audit::Audit;
    use crate::config::Config;
    use crate::queue::Registry;
    use crate::settings::QueueSettings;

    fn open(dir: &Path, threads: usize) -> Arc<Registry> {
        open_with(dir, Config { storage_threads: threads, ..Config::default() })
    }

    fn open_with(dir: &Path, config: Config) -> Arc<Registry> {
        let config = Config { data_dir: dir.to_path_buf(), ..config };
        let store = Store::open(dir).unwrap();
        let audit = Audit::open(&dir.join("audit"), 1 << 20).unwrap();
        Registry::recover(store, config.storage(), audit, tokio::runtime::Handle::current()).unwrap()
    }

    fn durable() -> QueueSettings {
        QueueSettings { durable: true, ..QueueSettings::default() }
    }

    /// Publishes `body` to `queue`; returns the confirm's receiver.
    fn publish(queue: &Queue, body: &'static str) -> mpsc::Receiver<Result<Outcome, BrokerError>> {
        let (tx, rx) = mpsc::channel();
        let payload = Arc::new(Payload { body: body.into(), ..Payload::default() });
        let confirm = Confirm::Callback(Box::new(move |result| {
            let _ = tx.send(result);
        }));
        if let Err(err) = queue.publish(payload, 0, 0, confirm) {
            let (tx, refused) = mpsc::channel();
            tx.send(Err(err)).unwrap();
            return refused;
        }
        rx
    }

    fn confirmed(rx: mpsc::Receiver<Result<Outcome, BrokerError>>) -> Result<Outcome, BrokerError> {
        rx.recv_timeout(Duration::from_secs(10)).expect("an answer")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_sync_refuses_publishes_until_a_sync_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let registry = open(dir.path(), 1);
        let queue = registry.declare("q", durable()).unwrap().queue;
        assert!(confirmed(publish(&queue, "before")).is_ok());
        let log = registry.storage().logs[0].clone();

        log.fail_syncs.store(true, Ordering::Relaxed);
        let refused = confirmed(publish(&queue, "unsynced")).unwrap_err();
        assert!(refused.to_string().contains("fsync failed"), "{refused}");
        let refused = confirmed(publish(&queue, "while failing")).unwrap_err();
        assert!(refused.to_string().contains("cannot sync: injected sync failure"), "{refused}");
        assert!(registry.storage().failure().is_some_and(|e| e.contains("injected")));

        log.fail_syncs.store(false, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(10);
        while registry.storage().failure().is_some() {
            assert!(Instant::now() < deadline, "the log never synced again");
            std::thread::yield_now();
        }
        assert!(confirmed(publish(&queue, "after")).is_ok());
        registry.close();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_queues_share_one_log_and_come_back_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let registry = open(dir.path(), 1);
        let queues: Vec<Arc<Queue>> =
            (0..200).map(|i| registry.declare(&format!("q{i}"), durable()).unwrap().queue).collect();
        let receipts: Vec<_> = queues.iter().map(|q| publish(q, "m")).collect();
        for rx in receipts {
            assert!(confirmed(rx).is_ok());
        }
        assert_eq!(registry.storage().threads(), 1);
        drop(queues);
        registry.close();
        drop(registry);

        let registry = open(dir.path(), 1);
        for i in 0..200 {
            assert_eq!(registry.get(&format!("q{i}")).unwrap().snapshot().ready, 1, "queue q{i}");
        }
        registry.close();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_queue_log_in_its_own_directory_moves_into_a_shared_log() {
        let dir = tempfile::tempdir().unwrap();
        let queue_dir = dir.path().join("queues").join("3");
        std::fs::create_dir_all(&queue_dir).unwrap();
        let meta = QueueMeta { name: "old".into(), settings: durable(), alarm_depth: 7, log: None };
        std::fs::write(queue_dir.join("queue.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
        // The earlier layout: segments in the queue's directory, records naming no queue.
        let mut bytes = segment::MAGIC.to_vec();
        for (seq, body) in [(0u64, "settled"), (1, "first"), (2, "second")] {
            let payload = Payload { id: 10 + seq, body: body.into(), ..Payload::default() };
            record::encode_publish(&mut bytes, seq, 0, 0, 0, &payload);
        }
        record::encode_settle(&mut bytes, 0);
        record::encode_delivered(&mut bytes, 2, 3);
        std::fs::write(segment::path(&queue_dir, 1), &bytes).unwrap();

        for start in 0..2 {
            let registry = open(dir.path(), 2);
            let queue = registry.get("old").unwrap();
            let peeked = queue.with_state(|state, journal, _| state.peek(10, journal)).unwrap();
            let seen: Vec<(u64, u32, &[u8])> =
                peeked.iter().map(|(m, p)| (p.id, m.delivery_count, &p.body[..])).collect();
            assert_eq!(seen, vec![(11, 0, &b"first"[..]), (12, 3, &b"second"[..])], "start {start}");
            assert_eq!(queue.alarm_depth(), 7);
            assert!(segment::list(&queue_dir).unwrap().is_empty(), "the old segments are gone");
            let meta: QueueMeta =
                serde_json::from_slice(&std::fs::read(queue_dir.join("queue.json")).unwrap()).unwrap();
            assert_eq!(meta.log, Some(1), "queue 3 of 2 threads goes to log 1");
            drop(queue);
            registry.close();
        }
        let fresh = open(dir.path(), 2);
        let created = fresh.declare("new", durable()).unwrap().queue;
        assert_eq!(created.durable.as_ref().unwrap().id, 4, "ids go on after the moved queue's");
        fresh.close();
    }

    /// Waits until `done` holds, for at most 10 s.
    fn eventually(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::yield_now();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_clean_shutdown_writes_the_settles_that_dead_lettering_buffers_in_another_log() {
        let dir = tempfile::tempdir().unwrap();
        let registry = open(dir.path(), 2);
        let dead = registry.declare("dead", durable()).unwrap().queue;
        let jobs = QueueSettings { dead_letter: "dead".into(), message_ttl_ms: 1, ..durable() };
        let jobs = registry.declare("jobs", jobs).unwrap().queue;
        assert_ne!(
            jobs.durable.as_ref().unwrap().log_index(),
            dead.durable.as_ref().unwrap().log_index(),
            "the two queues are on different logs"
        );
        for _ in 0..20 {
            assert!(confirmed(publish(&jobs, "expires")).is_ok());
        }
        eventually("every message reaches the dead-letter queue", || dead.snapshot().ready == 20);
        drop((dead, jobs));
        registry.close();
        drop(registry);

        let registry = open(dir.path(), 2);
        let counts = |name: &str| registry.get(name).unwrap().snapshot().ready;
        assert_eq!((counts("jobs"), counts("dead")), (0, 20), "nothing dead-lettered twice");
        registry.close();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_messages_of_a_queue_whose_metadata_cannot_be_read_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let small = || Config { storage_threads: 1, segment_bytes: 4096, ..Config::default() };
        let registry = open_with(dir.path(), small());
        let broken = registry.declare("broken", durable()).unwrap().queue;
        let fine = registry.declare("fine", durable()).unwrap().queue;
        assert!(confirmed(publish(&broken, "precious")).is_ok());
        for _ in 0..100 {
            assert!(confirmed(publish(&fine, "filler filler filler filler filler filler filler")).is_ok());
        }
        let meta_path = broken.durable.as_ref().unwrap().dir().join("queue.json");
        drop((broken, fine));
        registry.close();
        drop(registry);
        let meta = std::fs::read(&meta_path).unwrap();
        std::fs::write(&meta_path, b"{").unwrap();

        let registry = open_with(dir.path(), small());
        assert!(registry.get("broken").is_err(), "not started");
        let fine = registry.get("fine").unwrap();
        fine.with_state(|state, journal, _| state.purge(journal)).unwrap();
        eventually("the purge is written", || {
            fine.with_state(|_, _, _| ()).is_ok() && fine.snapshot().ready == 0
        });
        drop(fine);
        registry.close();
        drop(registry);

        std::fs::write(&meta_path, meta).unwrap();
        let registry = open_with(dir.path(), small());
        assert_eq!(
            registry.get("broken").unwrap().snapshot().ready,
            1,
            "its message outlived the purge next to it"
        );
        registry.close();
    }
}
