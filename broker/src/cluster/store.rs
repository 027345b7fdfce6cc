//! The metadata group's Raft log and state machine, kept in the cluster directory.
//!
//! The log is one append-only file of records, each `[len u32][crc32c u32][JSON]` (little
//! endian), holding entries, votes, the committed id, truncations and purges in the order
//! they happened; opening it replays them. A torn last record (a crash mid-write) ends the
//! replay and is cut off. A purge rewrites the file with only what is still needed, through a
//! temporary file renamed over it, so the file stays about as large as the unpurged log.
//!
//! The state machine is the broker itself: each committed command is applied to it through
//! [`GroupHost`], and a snapshot is what the host holds then (as JSON), written to
//! `snapshot.json` atomically. A node starts from its snapshot and the log entries after it.

// openraft's traits fix these error types, large as they are.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Cursor, Read, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{Command, GroupHost, MetaResponse, NodeId, QueueCommand, TypeConfig};

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// One record of the log file.
#[derive(Debug, Serialize, Deserialize)]
enum Op {
    Entry(Entry<TypeConfig>),
    Vote(Vote<NodeId>),
    Committed(Option<LogId<NodeId>>),
    /// Entries from this index on are gone (a conflicting suffix).
    Truncate(u64),
    /// Entries up to and including this id are gone (covered by a snapshot).
    Purge(LogId<NodeId>),
}

fn encode(op: &Op, out: &mut Vec<u8>) {
    let json = serde_json::to_vec(op).expect("log records serialize");
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&json).to_le_bytes());
    out.extend_from_slice(&json);
}

/// The records of `bytes` up to the first damaged one, and the length they take.
fn decode_all(bytes: &[u8]) -> (Vec<Op>, usize) {
    let mut ops = Vec::new();
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + 8) {
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        let Some(json) = bytes.get(at + 8..at + 8 + len) else { break };
        if crc32c::crc32c(json) != crc {
            break;
        }
        let Ok(op) = serde_json::from_slice(json) else { break };
        ops.push(op);
        at += 8 + len;
    }
    (ops, at)
}

fn write_error(e: &io::Error) -> StorageError<NodeId> {
    StorageIOError::write_logs(AnyError::new(e)).into()
}

/// What the log holds, in memory.
#[derive(Debug, Default)]
struct LogInner {
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    purged: Option<LogId<NodeId>>,
}

impl LogInner {
    fn apply(&mut self, op: Op) {
        match op {
            Op::Entry(entry) => {
                self.entries.insert(entry.log_id.index, entry);
            }
            Op::Vote(vote) => self.vote = Some(vote),
            Op::Committed(committed) => self.committed = committed,
            Op::Truncate(index) => {
                self.entries.split_off(&index);
            }
            Op::Purge(log_id) => {
                self.entries = self.entries.split_off(&(log_id.index + 1));
                self.purged = Some(log_id);
            }
        }
    }

    /// The records that rebuild this state on their own.
    fn as_ops(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(vote) = self.vote {
            encode(&Op::Vote(vote), &mut out);
        }
        if let Some(purged) = self.purged {
            encode(&Op::Purge(purged), &mut out);
        }
        encode(&Op::Committed(self.committed), &mut out);
        for entry in self.entries.values() {
            encode(&Op::Entry(entry.clone()), &mut out);
        }
        out
    }
}

struct LogFile {
    dir: PathBuf,
    file: File,
    inner: LogInner,
}

impl LogFile {
    fn append(&mut self, ops: Vec<Op>) -> io::Result<()> {
        let mut out = Vec::new();
        for op in &ops {
            encode(op, &mut out);
        }
        self.file.write_all(&out)?;
        self.file.sync_data()?;
        for op in ops {
            self.inner.apply(op);
        }
        Ok(())
    }

    /// Writes the current state as a fresh file and swaps it in.
    fn rewrite(&mut self) -> io::Result<()> {
        let path = self.dir.join("raft.log");
        let tmp = self.dir.join("raft.log.tmp");
        let mut file = File::create(&tmp)?;
        file.write_all(&self.inner.as_ops())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        File::open(&self.dir)?.sync_all()?;
        self.file = OpenOptions::new().append(true).open(&path)?;
        Ok(())
    }
}

/// The metadata group's Raft log.
#[derive(Clone)]
pub struct LogStore {
    log: Arc<Mutex<LogFile>>,
}

impl LogStore {
    /// Opens (or creates) the log in `dir`, replaying it.
    pub fn open(dir: &Path) -> io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("raft.log");
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut file) => {
                file.read_to_end(&mut bytes)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let (ops, valid) = decode_all(&bytes);
        if valid < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = bytes.len() - valid,
                "the cluster log ends in a torn record; cut off"
            );
        }
        let mut inner = LogInner::default();
        for op in ops {
            inner.apply(op);
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        file.set_len(valid as u64)?;
        File::open(dir)?.sync_all()?;
        Ok(LogStore { log: Arc::new(Mutex::new(LogFile { dir: dir.to_path_buf(), file, inner })) })
    }

    fn write(&self, ops: Vec<Op>) -> StorageResult<()> {
        self.log.lock().append(ops).map_err(|e| write_error(&e))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let log = self.log.lock();
        Ok(log.inner.entries.range(range).map(|(_, entry)| entry.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let log = self.log.lock();
        let last = log.inner.entries.values().next_back().map(|entry| entry.log_id);
        Ok(LogState { last_purged_log_id: log.inner.purged, last_log_id: last.or(log.inner.purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.log
            .lock()
            .append(vec![Op::Vote(*vote)])
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)).into())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        Ok(self.log.lock().inner.vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        self.write(vec![Op::Committed(committed)])
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self.log.lock().inner.committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let ops = entries.into_iter().map(Op::Entry).collect();
        let result = self.log.lock().append(ops);
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let error = write_error(&e);
                callback.log_io_completed(Err(e));
                Err(error)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.write(vec![Op::Truncate(log_id.index)])
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let mut log = self.log.lock();
        log.inner.apply(Op::Purge(log_id));
        log.rewrite().map_err(|e| write_error(&e))
    }
}

/// A snapshot as stored: what the host held, what it covers, and the membership then.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    data: serde_json::Value,
}

/// What the state machine has applied, in memory.
#[derive(Debug, Default)]
struct MachineInner {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, openraft::BasicNode>,
    snapshot: Option<StoredSnapshot>,
    snapshots_built: u64,
}

/// A group's state machine: the broker, as its [`GroupHost`] sees it.
#[derive(Clone)]
pub struct StateMachine {
    dir: PathBuf,
    group: String,
    inner: Arc<Mutex<MachineInner>>,
    host: Arc<dyn GroupHost>,
    /// The metadata group, for the queue group: a publish is applied once the metadata that
    /// declared its queue is.
    metadata: Option<openraft::Raft<TypeConfig>>,
}

/// The metadata entry a queue group entry must wait for: the newest its publishes name.
fn metadata_needed(command: &Command) -> Option<u64> {
    let publish_index = |command: &QueueCommand| match command {
        QueueCommand::Publish { meta_index, .. } => Some(*meta_index),
        QueueCommand::Left { .. } => None,
    };
    match command {
        Command::Queues(commands) => commands.iter().filter_map(publish_index).max(),
        Command::Meta(_) => None,
    }
}

/// Longest wait of a publish for its queue's metadata.
const METADATA_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl StateMachine {
    /// Opens the state machine of `dir`; with a snapshot there, `host` is first made to hold
    /// exactly what it held.
    pub fn open(
        dir: &Path,
        group: String,
        host: Arc<dyn GroupHost>,
        metadata: Option<openraft::Raft<TypeConfig>>,
    ) -> io::Result<StateMachine> {
        let mut inner = MachineInner::default();
        match std::fs::read(dir.join("snapshot.json")) {
            Ok(bytes) => {
                let snapshot: StoredSnapshot = serde_json::from_slice(&bytes)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("snapshot.json: {e}")))?;
                inner.last_applied = snapshot.meta.last_log_id;
                inner.membership = snapshot.meta.last_membership.clone();
                host.reset(&snapshot.data);
                inner.snapshot = Some(snapshot);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(StateMachine { dir: dir.to_path_buf(), group, inner: Arc::new(Mutex::new(inner)), host, metadata })
    }

    fn save_snapshot(&self, snapshot: &StoredSnapshot) -> io::Result<()> {
        let path = self.dir.join("snapshot.json");
        let tmp = self.dir.join("snapshot.json.tmp");
        let mut file = File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(snapshot).map_err(io::Error::other)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        File::open(&self.dir)?.sync_all()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        // The state machine applies nothing while it builds: the host holds exactly what
        // the entries up to `last_applied` made.
        let data = self.host.export();
        let snapshot = {
            let mut inner = self.inner.lock();
            inner.snapshots_built += 1;
            let snapshot_id = match inner.last_applied {
                Some(id) => format!("{}-{}-{}", id.leader_id, id.index, inner.snapshots_built),
                None => format!("none-{}", inner.snapshots_built),
            };
            StoredSnapshot {
                meta: SnapshotMeta {
                    last_log_id: inner.last_applied,
                    last_membership: inner.membership.clone(),
                    snapshot_id,
                },
                data,
            }
        };
        self.save_snapshot(&snapshot).map_err(|e| {
            StorageIOError::write_snapshot(Some(snapshot.meta.signature()), AnyError::new(&e))
        })?;
        let data = serde_json::to_vec(&snapshot.data).expect("a snapshot serializes");
        self.inner.lock().snapshot = Some(snapshot.clone());
        Ok(Snapshot { meta: snapshot.meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, openraft::BasicNode>)> {
        let inner = self.inner.lock();
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<MetaResponse>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        for entry in entries {
            let response = match &entry.payload {
                EntryPayload::Blank => MetaResponse::Done(false),
                EntryPayload::Normal(command) => {
                    if let (Some(metadata), Some(meta_index)) = (&self.metadata, metadata_needed(command)) {
                        let wait = metadata.wait(Some(METADATA_WAIT));
                        if wait
                            .applied_index_at_least(Some(meta_index), "the queue's metadata")
                            .await
                            .is_err()
                        {
                            tracing::warn!(
                                meta_index,
                                "a replicated publish waited too long for its queue's metadata"
                            );
                        }
                    }
                    self.host.apply(command)
                }
                EntryPayload::Membership(membership) => {
                    self.inner.lock().membership =
                        StoredMembership::new(Some(entry.log_id), membership.clone());
                    MetaResponse::Done(false)
                }
            };
            self.inner.lock().last_applied = Some(entry.log_id);
            responses.push(response);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data: serde_json::Value = serde_json::from_slice(snapshot.get_ref())
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e)))?;
        let stored = StoredSnapshot { meta: meta.clone(), data };
        self.save_snapshot(&stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e)))?;
        self.host.reset(&stored.data);
        tracing::info!(group = %self.group, last_log_id = ?meta.last_log_id, "took over the leader's snapshot");
        let mut inner = self.inner.lock();
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.snapshot = Some(stored);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let inner = self.inner.lock();
        Ok(inner.snapshot.as_ref().map(|stored| Snapshot {
            meta: stored.meta.clone(),
            snapshot: Box::new(Cursor::new(serde_json::to_vec(&stored.data).expect("a snapshot serializes"))),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn indexes(store: &LogStore) -> Vec<u64> {
        store.log.lock().inner.entries.keys().copied().collect()
    }

    #[test]
    fn a_reopened_log_has_what_was_written_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = LogStore::open(dir.path()).unwrap();
            store.write((1..=5).map(|i| Op::Entry(entry(1, i))).collect()).unwrap();
            store.write(vec![Op::Truncate(4), Op::Vote(Vote::new(2, 3))]).unwrap();
        }
        let path = dir.path().join("raft.log");
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        drop(file);
        let store = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&store), [1, 2, 3]);
        assert_eq!(store.log.lock().inner.vote, Some(Vote::new(2, 3)));
        // The cut tail is gone from the file: what is appended next is read back.
        store.write(vec![Op::Entry(entry(2, 4))]).unwrap();
        drop(store);
        assert_eq!(indexes(&LogStore::open(dir.path()).unwrap()), [1, 2, 3, 4]);
    }

    #[test]
    fn a_purge_rewrites_the_file_without_the_purged_entries() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path()).unwrap();
        store.write((1..=100).map(|i| Op::Entry(entry(1, i))).collect()).unwrap();
        let before = std::fs::metadata(dir.path().join("raft.log")).unwrap().len();
        futures::executor::block_on(store.purge(entry(1, 90).log_id)).unwrap();
        let after = std::fs::metadata(dir.path().join("raft.log")).unwrap().len();
        assert!(after * 5 < before, "{after} bytes after the purge, {before} before");
        let reopened = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&reopened), (91..=100).collect::<Vec<_>>());
        assert_eq!(reopened.log.lock().inner.purged, Some(entry(1, 90).log_id));
    }
}
