//! Durable queues: the journal that buffers log records under the queue's lock, and a write
//! thread that appends them to the log, makes newly written messages visible, syncs the batch
//! and confirms its publishes once they are on stable storage.
//!
//! Group commit falls out of the buffer: while one batch is written and synced, later records
//! gather, and the next fsync covers all of them. Consumers see a message as soon as it is
//! written, so fsync latency is paid by publish confirms, not by deliveries.

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

use super::{Confirm, Dead, Journal, Live, Outcome, Policy, Queue, QueueState, Subscriber};
use crate::error::BrokerError;
use crate::message::{DeathReason, Payload, QueuedMessage};
use crate::storage::log::{encode_message, LiveCount, LogBuffer, SegmentReader, SegmentWriter};
use crate::storage::{record, segment, FsyncPolicy, Location, QueueMeta, ReadError, StorageConfig};

/// Batches smaller than this wait [`COALESCE_FOR`] for more records before being written.
const COALESCE_BELOW: usize = 16 * 1024;
/// How long a small batch waits for more records.
const COALESCE_FOR: Duration = Duration::from_micros(200);

/// How long the sync thread waits before retrying after a failed write.
const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(100);

/// The parts of a durable queue that live outside its lock.
pub struct Durable {
    dir: PathBuf,
    config: StorageConfig,
    reader: SegmentReader,
    wake: Condvar,
    thread: Mutex<Option<std::thread::JoinHandle<bool>>>,
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
    stopping: bool,
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
    writer: SegmentWriter,
}

impl Parts {
    pub(super) fn into_inner(self) -> (QueueState<Subscriber>, DiskState, Durable, SegmentWriter) {
        (self.state, self.disk, self.durable, self.writer)
    }
}

/// The pieces of a new, empty durable queue in `dir`.
pub(super) fn create(dir: &Path, config: &StorageConfig, policy: Policy) -> io::Result<Parts> {
    let writer = SegmentWriter::open(dir, 1, 0, config.segment_bytes)?;
    let disk = DiskState::new(LogBuffer::new(BTreeMap::new(), 1));
    Ok(Parts { state: QueueState::new(policy), disk, durable: Durable::new(dir, config), writer })
}

/// Rebuilds a durable queue from its directory. Messages come back as index entries only;
/// bodies are read from disk when delivered.
///
/// After a crash (`crashed`), the deliveries of the last moments may not have been recorded, so
/// every recovered message is flagged as possibly delivered.
pub(super) fn recover(
    meta: &QueueMeta,
    dir: &Path,
    config: &StorageConfig,
    crashed: bool,
) -> io::Result<Parts> {
    let started = Instant::now();
    let scan = segment::scan(dir)?;
    for problem in &scan.problems {
        if problem.is_error {
            tracing::error!(queue = %meta.name, "{}", problem.message);
        } else {
            tracing::warn!(queue = %meta.name, "{}", problem.message);
        }
    }
    let mut live: BTreeMap<u64, LiveCount> =
        scan.segments.iter().map(|&(id, _)| (id, LiveCount::default())).collect();
    let mut state = QueueState::new(meta.settings.policy());
    state.set_next_seq(scan.next_seq);
    let messages = scan.messages.len();
    for found in scan.messages {
        let count = live.entry(found.location.segment()).or_default();
        count.messages += 1;
        count.bytes += u64::from(found.location.bytes());
        // Sized by its record, less the fixed fields: the body, headers and deaths it carries.
        let size = found.location.bytes().saturating_sub(record::FIXED_PUBLISH_BYTES);
        let mut message = QueuedMessage::stored(found.seq, found.delivery_count, size, found.location);
        message.maybe_delivered = crashed;
        state.restore(message.with_extra(found.expires_at_ms, found.due_ms, found.failure.map(|f| *f)));
    }
    let (active, len) = scan.segments.last().copied().unwrap_or((1, 0));
    let writer = SegmentWriter::open(dir, active, len, config.segment_bytes)?;
    let disk = DiskState::new(LogBuffer::new(live, active));
    tracing::info!(
        queue = %meta.name,
        messages,
        segments = scan.segments.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "durable queue recovered"
    );
    Ok(Parts { state, disk, durable: Durable::new(dir, config), writer })
}

/// Starts the queue's log thread, which writes and syncs its batches. The machine may be out
/// of threads: that is an error for the caller (the declare fails, recovery skips the queue),
/// never a panic.
pub(super) fn spawn_threads(queue: &Arc<Queue>, writer: SegmentWriter) -> std::io::Result<()> {
    let Some(durable) = queue.durable.as_ref() else { return Ok(()) };
    let short_name: String = queue.name.chars().take(8).collect();
    let worker = queue.clone();
    let handle = std::thread::Builder::new()
        .name(format!("log-{short_name}"))
        .spawn(move || write_loop(&worker, writer))?;
    *durable.thread.lock() = Some(handle);
    Ok(())
}

impl DiskState {
    fn new(log: LogBuffer) -> Self {
        DiskState {
            log,
            pending: Vec::new(),
            settle_confirms: Vec::new(),
            resident_bytes: 0,
            stopping: false,
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
    fn new(dir: &Path, config: &StorageConfig) -> Self {
        Durable {
            dir: dir.to_path_buf(),
            config: config.clone(),
            reader: SegmentReader::new(dir),
            wake: Condvar::new(),
            thread: Mutex::new(None),
        }
    }

    /// The queue's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(super) fn journal<'a>(
        &'a self,
        disk: &'a mut DiskState,
        deaths: &'a mut Vec<Dead>,
    ) -> DiskJournal<'a> {
        DiskJournal { disk, reader: &self.reader, budget: self.config.queue_memory_bytes, deaths }
    }

    /// Buffers a publish record; the message becomes visible once the log thread wrote it.
    pub(super) fn append_publish(&self, disk: &mut DiskState, message: QueuedMessage, confirm: Confirm) {
        let payload = message.payload.clone().expect("a published message has its payload");
        let range = disk.log.publish(&message, &payload);
        disk.pending.push(PendingPublish { message, range, confirm });
        self.wake.notify_one();
    }

    /// Holds `response` until the log thread has written (and, per policy, synced) everything
    /// buffered up to now.
    pub(super) fn defer_confirm(&self, disk: &mut DiskState, confirm: Confirm, response: Outcome) {
        disk.settle_confirms.push((confirm, response));
        self.wake.notify_one();
    }

    pub(super) fn wake_if_pending(&self, disk: &DiskState) {
        if disk.log.has_pending() {
            self.wake.notify_one();
        }
    }

    /// Flushes what is buffered and stops the log thread. Returns true if everything was
    /// written and synced.
    pub(super) fn stop(&self, queue: &Queue) -> bool {
        if let Some(disk) = queue.state.lock().disk.as_mut() {
            disk.stopping = true;
        }
        self.wake.notify_one();
        match self.thread.lock().take() {
            Some(handle) => handle.join().unwrap_or(false),
            None => true,
        }
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

impl Durable {
    /// Reads the stored body of `message`, without the queue's lock.
    pub(super) fn load(&self, message: &QueuedMessage) -> Result<Arc<Payload>, ReadError> {
        self.reader.load(message)
    }

    /// The id of a message whose stored copy is damaged, if it can still be made out.
    pub(super) fn salvage_id(&self, message: &QueuedMessage) -> Option<u64> {
        self.reader.salvage_id(message.seq, message.location?)
    }
}

/// The write thread: append a batch, make its messages visible, fsync it and send its confirms
/// (at once, when the policy does not wait for fsync); then delete emptied segments, roll and
/// compact. Group commit: while one batch is written and synced, the next one gathers in the
/// buffer, so one fsync covers every publish that arrived meanwhile.
fn write_loop(queue: &Queue, mut writer: SegmentWriter) -> bool {
    let durable = queue.durable.as_ref().expect("durable queue");
    let policy = durable.config.fsync;
    let mut spare = Vec::with_capacity(64 * 1024);
    let mut unsynced = false;
    let mut last_sync = Instant::now();
    let mut failing = false;
    let mut all_synced = true;
    loop {
        let mut guard = queue.state.lock();
        // Only `batch` has a sync falling due while idle; under `never` the unsynced bytes wait
        // for the final sync at stop.
        let sync_pending = unsynced && policy == FsyncPolicy::Batch;
        let stopping = wait_for_work(durable, &mut guard, sync_pending, last_sync, failing);
        if !stopping && guard.disk.as_ref().is_some_and(|d| d.log.pending_len() < COALESCE_BELOW) {
            // A small batch: give publishers a moment to add to it, so a busy queue writes in
            // fewer, larger batches instead of a syscall every few messages.
            drop(guard);
            std::thread::sleep(COALESCE_FOR);
            guard = queue.state.lock();
        }
        let disk = guard.disk.as_mut().expect("durable queue");
        let bytes = disk.log.take(std::mem::take(&mut spare));
        let pending = std::mem::take(&mut disk.pending);
        let settles = std::mem::take(&mut disk.settle_confirms);
        drop(guard);

        let mut written = Err(String::new());
        if !bytes.is_empty() {
            match writer.append(&bytes) {
                Ok(offset) => {
                    unsynced = true;
                    failing = false;
                    written = Ok(offset);
                }
                Err(err) => {
                    if !failing {
                        tracing::error!(queue = %queue.name, error = %err, "log write failed; publishes are refused until it succeeds");
                    }
                    failing = true;
                    written = Err(err.to_string());
                }
            }
        }
        let wrote = written.is_ok() || bytes.is_empty();
        let mut confirms = apply_batch(queue, durable, &writer, &bytes, pending, written);
        if wrote {
            confirms.extend(settles.into_iter().map(|(confirm, body)| (confirm, Ok(body))));
        } else if let Some(disk) = queue.state.lock().disk.as_mut() {
            // Their records go round again with the failed batch.
            disk.settle_confirms.splice(0..0, settles);
        }
        match policy {
            FsyncPolicy::Always if wrote => {
                let synced = writer.file().sync_data().map_err(|e| e.to_string());
                if let Err(err) = &synced {
                    all_synced = false;
                    tracing::error!(queue = %queue.name, error = %err, "log fsync failed; its publishes are not confirmed");
                }
                for (confirm, outcome) in confirms {
                    confirm.send(match &synced {
                        Ok(()) => outcome,
                        Err(err) => Err(BrokerError::ResourceLimit(format!(
                            "message not confirmed: fsync failed: {err}"
                        ))),
                    });
                }
                unsynced = false;
            }
            _ => {
                for (confirm, result) in confirms {
                    confirm.send(result);
                }
            }
        }
        let sync_due = last_sync.elapsed() >= durable.config.fsync_interval;
        if unsynced && (stopping || (policy == FsyncPolicy::Batch && sync_due)) {
            if let Err(err) = writer.sync() {
                tracing::error!(queue = %queue.name, error = %err, "log sync failed");
            }
            unsynced = false;
            last_sync = Instant::now();
        }
        spare = bytes;
        spare.clear();
        maintain(queue, durable, &mut writer);
        if stopping {
            return !failing && all_synced;
        }
    }
}

/// Blocks until there is something to write, a batch sync is due, or the queue stops.
fn wait_for_work(
    durable: &Durable,
    guard: &mut MutexGuard<'_, Live>,
    unsynced: bool,
    last_sync: Instant,
    failing: bool,
) -> bool {
    loop {
        let disk = guard.disk.as_ref().expect("durable queue");
        if disk.stopping {
            return true;
        }
        if (disk.log.has_pending() || !disk.settle_confirms.is_empty()) && !failing {
            return false;
        }
        if failing {
            durable.wake.wait_for(guard, RETRY_AFTER_FAILURE);
            return false;
        }
        if unsynced {
            let due = last_sync + durable.config.fsync_interval;
            let now = Instant::now();
            if now >= due || durable.wake.wait_for(guard, due - now).timed_out() {
                return false;
            }
        } else {
            durable.wake.wait(guard);
        }
    }
}

type Confirmation = (Confirm, Result<Outcome, BrokerError>);

/// Under the lock: make the written publishes ready (or, if the write failed, put the other
/// records back for another try and refuse the publishes).
fn apply_batch(
    queue: &Queue,
    durable: &Durable,
    writer: &SegmentWriter,
    bytes: &[u8],
    pending: Vec<PendingPublish>,
    written: Result<u64, String>,
) -> Vec<Confirmation> {
    let mut confirms = Vec::with_capacity(pending.len());
    let mut deaths = Vec::new();
    let mut guard = queue.state.lock();
    let live = &mut *guard;
    let disk = live.disk.as_mut().expect("durable queue");
    match written {
        Ok(offset) => {
            let segment = writer.id();
            for publish in pending {
                let PendingPublish { mut message, range, confirm } = publish;
                let location = Location::new(segment, offset + range.start as u64, range.len() as u32);
                disk.log.add_live(location);
                let payload = message.payload.take().expect("a published message has its payload");
                let size = payload.size();
                let resident = disk.resident_bytes + size <= durable.config.queue_memory_bytes;
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
            let now = super::now_ms();
            let mut journal = durable.journal(disk, &mut deaths);
            live.state.enforce_bounds(&mut journal);
            live.state.dispatch(now, &mut journal);
        }
        Err(error) if !bytes.is_empty() => {
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
            for publish in pending {
                live.state.unreserve(u64::from(publish.message.size));
                let error =
                    BrokerError::ResourceLimit(format!("message not stored: disk write failed: {error}"));
                confirms.push((publish.confirm, Err(error)));
            }
        }
        Err(_) => {}
    }
    let next = live.state.next_timer();
    drop(guard);
    queue.after_unlock(deaths, next);
    confirms
}

/// Deletes segments with nothing live, starts a new segment when the active one is full, and
/// compacts the oldest segment when little of it is still live.
fn maintain(queue: &Queue, durable: &Durable, writer: &mut SegmentWriter) {
    if writer.is_full() {
        if durable.config.fsync != FsyncPolicy::Always {
            // Under `always` every batch was synced as it was written.
            if let Err(err) = writer.sync() {
                tracing::error!(queue = %queue.name, error = %err, "log sync failed");
            }
        }
        match writer.roll() {
            Ok(id) => {
                if let Some(disk) = queue.state.lock().disk.as_mut() {
                    disk.log.set_active(id);
                }
            }
            Err(err) => tracing::error!(queue = %queue.name, error = %err, "could not start a new segment"),
        }
    }
    compact(queue, durable, writer);
    let doomed = queue.state.lock().disk.as_mut().map(|d| d.log.take_doomed()).unwrap_or_default();
    for segment in doomed {
        match durable.reader.delete(segment) {
            Ok(()) => tracing::debug!(queue = %queue.name, segment, "segment deleted"),
            Err(err) => {
                tracing::warn!(queue = %queue.name, segment, error = %err, "could not delete segment")
            }
        }
    }
}

/// Copies the live messages of the oldest segment to the active one when at most a quarter of
/// its bytes are still live, so one slow message cannot pin a long run of settled segments.
fn compact(queue: &Queue, durable: &Durable, writer: &mut SegmentWriter) {
    let victims: Vec<QueuedMessage> = {
        let guard = queue.state.lock();
        let Some(disk) = guard.disk.as_ref() else { return };
        let Some(oldest) = disk.log.compaction_candidate(durable.config.segment_bytes) else { return };
        guard
            .state
            .messages()
            .filter(|m| m.location.is_some_and(|l| l.segment() == oldest))
            .map(|m| QueuedMessage { payload: None, ..m.clone() })
            .collect()
    };
    let mut bytes = Vec::new();
    let mut copies = Vec::with_capacity(victims.len());
    for victim in victims {
        let location = victim.location.expect("filtered on location");
        // An unreadable copy stays where it is: its segment is kept, and delivery deals with it.
        let Ok(stored) = durable.reader.read(victim.seq, location) else { continue };
        let start = bytes.len();
        encode_message(&mut bytes, &victim, &stored.payload);
        copies.push((victim.seq, location.segment(), start..bytes.len()));
    }
    let offset = match writer.append(&bytes).and_then(|offset| writer.sync().map(|()| offset)) {
        Ok(offset) => offset,
        Err(err) => {
            tracing::warn!(queue = %queue.name, error = %err, "compaction write failed; will retry");
            return;
        }
    };
    let segment = writer.id();
    let mut guard = queue.state.lock();
    let live = &mut *guard;
    let Some(disk) = live.disk.as_mut() else { return };
    let moved = copies.len();
    for (seq, old_segment, range) in copies {
        // Settled while we copied: its settle record follows the copy in the log.
        let Some(message) = live.state.find_mut(seq) else { continue };
        if message.location.map(|l| l.segment()) != Some(old_segment) {
            continue;
        }
        let old =
            message.location.replace(Location::new(segment, offset + range.start as u64, range.len() as u32));
        disk.log.add_live(message.location.expect("just set"));
        if let Some(old) = old {
            disk.log.forget(old);
        }
    }
    tracing::debug!(queue = %queue.name, moved, "oldest segment compacted");
}
