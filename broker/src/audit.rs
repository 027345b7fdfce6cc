//! The audit trail: one JSON line per dead message in `<data_dir>/audit/audit.log`, rotated by
//! size, readable through the protocol (`hopper audit`).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::rotating::RotatingFile;

/// One dead-lettering (or drop) of a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Unix ms of the death.
    pub time_ms: u64,
    /// The queue the message died in.
    pub queue: String,
    /// The message's id; a string in the file, as in every JSON the broker writes.
    #[serde(with = "hopper_proto::json::id_string")]
    pub message_id: u64,
    /// rejected, delivery_limit, expired, maxlen or corrupt.
    pub reason: String,
    /// Its delivery count.
    pub count: u32,
    /// The consumer that held it at its last failure (0 if none).
    pub consumer_id: u64,
    /// That consumer's connection (0 if none).
    pub connection_id: u64,
    /// The error text of its last failure.
    pub error: String,
    /// The dead-letter queue it went to; empty when it was dropped.
    pub dead_letter: String,
    /// The exchange the message had been published to; empty for a publish to a queue.
    #[serde(default)]
    pub exchange: String,
    /// Its routing key.
    #[serde(default)]
    pub routing_key: String,
}

/// Appends audit events to a size-rotated file, and keeps an index of them in memory (time,
/// queue, where the line is), so a query reads only the lines it returns.
pub struct Audit {
    dir: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    /// The files.
    file: RotatingFile,
    /// Generation of the current file; `audit.log.N` holds generation `current - N`.
    current: u64,
    /// Every event in the files kept, oldest first.
    index: VecDeque<Entry>,
    /// Queue names, shared by their entries.
    names: HashMap<String, Arc<str>>,
}

/// Where one event's line is.
struct Entry {
    time_ms: u64,
    queue: Arc<str>,
    generation: u64,
    offset: u64,
    len: u32,
}

/// Rotated files kept besides the current one (`audit.log.1` is the newest of them).
const KEEP: u64 = 3;
const NAME: &str = "audit.log";

impl Audit {
    /// An audit trail in `dir` whose files rotate at `max_bytes`; indexes the files there.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Audit> {
        std::fs::create_dir_all(dir)?;
        let file = RotatingFile::new(dir, NAME, max_bytes, KEEP);
        let mut inner = Inner { file, current: KEEP, index: VecDeque::new(), names: HashMap::new() };
        for generation in 0..=KEEP {
            let file = match File::open(path_of(dir, KEEP, generation)) {
                Ok(file) => file,
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            };
            let mut offset = 0u64;
            for line in BufReader::new(file).split(b'\n') {
                let line = line?;
                if let Ok(event) = serde_json::from_slice::<AuditEvent>(&line) {
                    inner.add(&event, generation, offset, line.len() as u32);
                }
                offset += line.len() as u64 + 1;
            }
        }
        Ok(Audit { dir: dir.to_path_buf(), inner: Mutex::new(inner) })
    }

    /// Appends `event`. A failure to write is logged, never passed on: the audit trail must not
    /// stop message flow.
    pub fn record(&self, event: &AuditEvent) {
        if let Err(err) = self.append(event) {
            tracing::warn!(error = %err, "could not write the audit log");
        }
    }

    fn append(&self, event: &AuditEvent) -> io::Result<()> {
        let mut line = serde_json::to_vec(event).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut inner = self.inner.lock();
        let appended = inner.file.append(&line)?;
        if appended.rotated {
            inner.current += 1;
            let oldest = inner.current - KEEP;
            while inner.index.front().is_some_and(|e| e.generation < oldest) {
                inner.index.pop_front();
            }
        }
        let generation = inner.current;
        inner.add(event, generation, appended.offset, line.len() as u32 - 1);
        Ok(())
    }

    /// Events of `queue` (all when empty) at or after `since_ms`, oldest first, at most the
    /// `limit` newest. The index picks them; only their lines are read.
    pub fn query(&self, queue: &str, since_ms: u64, limit: usize) -> io::Result<Vec<AuditEvent>> {
        let inner = self.inner.lock();
        let mut picked: Vec<&Entry> = inner
            .index
            .iter()
            .rev()
            .filter(|e| (queue.is_empty() || &*e.queue == queue) && e.time_ms >= since_ms)
            .take(limit)
            .collect();
        picked.reverse();
        let mut files: HashMap<u64, File> = HashMap::new();
        let mut events = Vec::with_capacity(picked.len());
        for entry in picked {
            let file = match files.entry(entry.generation) {
                std::collections::hash_map::Entry::Occupied(file) => file.into_mut(),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(File::open(path_of(&self.dir, inner.current, entry.generation))?)
                }
            };
            let mut line = vec![0; entry.len as usize];
            file.read_exact_at(&mut line, entry.offset)?;
            if let Ok(event) = serde_json::from_slice(&line) {
                events.push(event);
            }
        }
        Ok(events)
    }
}

impl Inner {
    fn add(&mut self, event: &AuditEvent, generation: u64, offset: u64, len: u32) {
        let queue =
            self.names.entry(event.queue.clone()).or_insert_with(|| event.queue.as_str().into()).clone();
        self.index.push_back(Entry { time_ms: event.time_ms, queue, generation, offset, len });
    }
}

/// The file holding `generation` while `current` is the newest.
fn path_of(dir: &Path, current: u64, generation: u64) -> PathBuf {
    match current - generation {
        0 => dir.join(NAME),
        n => dir.join(format!("{NAME}.{n}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u64, queue: &str) -> AuditEvent {
        AuditEvent {
            time_ms: n,
            queue: queue.into(),
            message_id: n,
            reason: "rejected".into(),
            count: 1,
            consumer_id: 2,
            connection_id: 3,
            error: "bad payload".into(),
            dead_letter: "dlq".into(),
            exchange: "events".into(),
            routing_key: format!("{queue}.{n}"),
        }
    }

    #[test]
    fn events_are_queried_by_queue_time_and_limit_across_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(dir.path(), 600).unwrap();
        for n in 1..=20 {
            audit.record(&event(n, if n % 2 == 0 { "even" } else { "odd" }));
        }
        assert!(dir.path().join("audit.log.1").exists(), "rotated");
        let even = audit.query("even", 0, 1000).unwrap();
        assert!(even.iter().all(|e| e.queue == "even"));
        assert_eq!(even.last().map(|e| e.time_ms), Some(20));
        let recent = audit.query("", 15, 1000).unwrap();
        assert_eq!(recent.iter().map(|e| e.time_ms).collect::<Vec<_>>(), vec![15, 16, 17, 18, 19, 20]);
        assert_eq!(
            audit.query("", 0, 2).unwrap().iter().map(|e| e.time_ms).collect::<Vec<_>>(),
            vec![19, 20]
        );
    }

    #[test]
    fn a_reopened_trail_is_indexed_from_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(dir.path(), 600).unwrap();
        for n in 1..=20 {
            audit.record(&event(n, if n % 3 == 0 { "three" } else { "other" }));
        }
        let before = audit.query("three", 0, 1000).unwrap();
        drop(audit);
        let reopened = Audit::open(dir.path(), 600).unwrap();
        assert_eq!(reopened.query("three", 0, 1000).unwrap(), before);
        reopened.record(&event(21, "three"));
        let after = reopened.query("three", 0, 1000).unwrap();
        assert_eq!(after.last().map(|e| e.time_ms), Some(21));
        assert_eq!(after.len(), before.len() + 1);
    }
}
