//! The audit trail: one JSON line per dead message in `<data_dir>/audit/audit.log`, rotated by
//! size, readable through the protocol (`hopper audit`).

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

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
}

/// Appends audit events to a size-rotated file.
pub struct Audit {
    dir: PathBuf,
    file: Mutex<Option<(File, u64)>>,
    max_bytes: u64,
}

/// Rotated files kept besides the current one (`audit.log.1` is the newest of them).
const KEEP: usize = 3;
const NAME: &str = "audit.log";

impl Audit {
    /// An audit trail in `dir` whose files rotate at `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Audit> {
        std::fs::create_dir_all(dir)?;
        Ok(Audit { dir: dir.to_path_buf(), file: Mutex::new(None), max_bytes })
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
        let mut slot = self.file.lock();
        if slot.as_ref().is_some_and(|(_, len)| *len + line.len() as u64 > self.max_bytes) {
            *slot = None;
            self.rotate()?;
        }
        if slot.is_none() {
            let file = OpenOptions::new().create(true).append(true).open(self.dir.join(NAME))?;
            let len = file.metadata()?.len();
            *slot = Some((file, len));
        }
        let (file, len) = slot.as_mut().expect("opened above");
        file.write_all(&line)?;
        *len += line.len() as u64;
        Ok(())
    }

    fn rotate(&self) -> io::Result<()> {
        for n in (1..KEEP).rev() {
            let from = self.dir.join(format!("{NAME}.{n}"));
            if from.exists() {
                std::fs::rename(&from, self.dir.join(format!("{NAME}.{}", n + 1)))?;
            }
        }
        std::fs::rename(self.dir.join(NAME), self.dir.join(format!("{NAME}.1")))
    }

    /// Events of `queue` (all when empty) at or after `since_ms`, oldest first, at most the
    /// `limit` newest.
    pub fn query(&self, queue: &str, since_ms: u64, limit: usize) -> io::Result<Vec<AuditEvent>> {
        let mut files: Vec<PathBuf> =
            (1..=KEEP).rev().map(|n| self.dir.join(format!("{NAME}.{n}"))).collect();
        files.push(self.dir.join(NAME));
        let mut events = Vec::new();
        for path in files {
            let file = match File::open(&path) {
                Ok(file) => file,
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            };
            for line in BufReader::new(file).lines() {
                let Ok(event) = serde_json::from_str::<AuditEvent>(&line?) else { continue };
                if (queue.is_empty() || event.queue == queue) && event.time_ms >= since_ms {
                    events.push(event);
                }
            }
        }
        let skip = events.len().saturating_sub(limit);
        Ok(events.split_off(skip))
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
}
