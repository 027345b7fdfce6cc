//! Durable storage: the catalog of durable queues under `<data_dir>/queues/`, and each queue's
//! append-only segmented log (see docs/storage.md).

pub mod log;
pub mod record;
pub mod segment;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use log::ReadError;
pub use segment::Location;

use crate::routing::{Binding, ExchangeSpec};
use crate::settings::QueueSettings;

/// When the log is flushed to stable storage, relative to the publish confirm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// fsync before confirming (batched across concurrent publishes: group commit).
    #[default]
    Always,
    /// Confirm once written to the OS; fsync every `fsync_interval_ms`.
    Batch,
    /// Confirm once written to the OS; never fsync (survives a process crash, not power loss).
    Never,
}

impl std::str::FromStr for FsyncPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "batch" => Ok(FsyncPolicy::Batch),
            "never" => Ok(FsyncPolicy::Never),
            other => Err(format!("fsync must be always, batch or never, not '{other}'")),
        }
    }
}

/// Storage settings, taken from the broker's config.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// Flush policy.
    pub fsync: FsyncPolicy,
    /// Flush period under [`FsyncPolicy::Batch`].
    pub fsync_interval: Duration,
    /// Size at which a segment is closed and a new one started.
    pub segment_bytes: u64,
    /// Bytes of message bodies a durable queue keeps in memory; the rest stay on disk only.
    pub queue_memory_bytes: usize,
    /// Storage threads, each writing one shared log for the durable queues assigned to it.
    pub threads: usize,
    /// Segment files kept open for reading paged-out bodies, over all logs.
    pub max_open_segments: usize,
}

/// A durable queue as recorded in its directory's `queue.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueMeta {
    /// The queue's name.
    pub name: String,
    /// Its settings.
    pub settings: QueueSettings,
    /// Its depth alarm threshold (0 = none); not part of the settings, it can change.
    #[serde(default)]
    pub alarm_depth: u64,
    /// The shared log its records go to; absent for a queue whose log is still in its own
    /// directory (written before logs were shared), which is moved at the next start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<u32>,
}

/// The directory of durable queues.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    next_id: AtomicU64,
    /// Numbers the temporary files of metadata writes.
    next_tmp: AtomicU64,
}

/// A durable queue's directory, as [`Store::list`] finds it.
#[derive(Debug)]
pub struct Listed {
    /// The queue's id (its directory's name).
    pub id: u64,
    /// Its directory.
    pub dir: PathBuf,
    /// Its metadata, or why it cannot be read.
    pub meta: Result<QueueMeta, String>,
}

/// The durable exchanges and bindings, as `topology.json` holds them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedTopology {
    /// Durable exchanges.
    pub exchanges: Vec<ExchangeSpec>,
    /// Durable bindings: from a durable exchange to a durable queue or exchange.
    pub bindings: Vec<SavedBinding>,
}

/// One saved binding and its source exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedBinding {
    /// The exchange it binds.
    pub source: String,
    /// Where it leads, with its key and arguments.
    pub binding: Binding,
}

const META: &str = "queue.json";
const LOGS: &str = "logs";
const TOPOLOGY: &str = "topology.json";
const CLEAN: &str = "CLEAN";

impl Store {
    /// Opens (creating if needed) `<data_dir>/queues`, and finishes any queue deletion that a
    /// crash interrupted.
    pub fn open(data_dir: &Path) -> io::Result<Store> {
        let root = data_dir.join("queues");
        std::fs::create_dir_all(&root)?;
        let mut max_id = 0;
        for entry in std::fs::read_dir(&root)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".deleted") {
                std::fs::remove_dir_all(entry.path())?;
            } else if let Ok(id) = name.parse::<u64>() {
                max_id = max_id.max(id);
            }
        }
        Ok(Store { root, next_id: AtomicU64::new(max_id + 1), next_tmp: AtomicU64::new(0) })
    }

    /// Whether the previous run shut down cleanly (everything flushed); consumes the marker,
    /// so a crash during this run is detected at the next start.
    pub fn take_clean_shutdown(&self) -> io::Result<bool> {
        let marker = self.root.join(CLEAN);
        match std::fs::remove_file(&marker) {
            Ok(()) => {
                segment::sync_dir(&self.root)?;
                Ok(true)
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                // A fresh data directory has nothing that could have been half-delivered.
                Ok(self.list()?.is_empty())
            }
            Err(err) => Err(err),
        }
    }

    /// Records that every queue was flushed and closed.
    pub fn mark_clean_shutdown(&self) -> io::Result<()> {
        std::fs::write(self.root.join(CLEAN), b"")?;
        segment::sync_dir(&self.root)
    }

    /// The directory of shared log `index`, created if needed.
    pub fn log_dir(&self, index: u32) -> io::Result<PathBuf> {
        let logs = self.root.join(LOGS);
        let dir = logs.join(index.to_string());
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir)?;
            segment::sync_dir(&logs)?;
            segment::sync_dir(&self.root)?;
        }
        Ok(dir)
    }

    /// The indexes of the shared logs on disk, ascending.
    pub fn logs(&self) -> io::Result<Vec<u32>> {
        let mut found = Vec::new();
        match std::fs::read_dir(self.root.join(LOGS)) {
            Ok(entries) => {
                for entry in entries {
                    if let Ok(index) = entry?.file_name().to_string_lossy().parse::<u32>() {
                        found.push(index);
                    }
                }
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
        found.sort_unstable();
        Ok(found)
    }

    /// Makes sure no queue id up to `id` is given out again: records of a deleted queue may
    /// still be in a shared log.
    pub fn reserve_ids_up_to(&self, id: u64) {
        self.next_id.fetch_max(id.saturating_add(1), Ordering::Relaxed);
    }

    /// Every durable queue directory with its id and metadata, by id. Metadata that cannot be
    /// read is an error the caller reports before going on; the id is still known.
    pub fn list(&self) -> io::Result<Vec<Listed>> {
        let mut dirs: Vec<(u64, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            if let Ok(id) = entry.file_name().to_string_lossy().parse::<u64>() {
                dirs.push((id, entry.path()));
            }
        }
        dirs.sort();
        Ok(dirs
            .into_iter()
            .map(|(id, dir)| {
                let meta = std::fs::read_to_string(dir.join(META))
                    .map_err(|e| format!("{}: cannot read {META}: {e}", dir.display()))
                    .and_then(|text| {
                        serde_json::from_str(&text).map_err(|e| format!("{}: bad {META}: {e}", dir.display()))
                    });
                Listed { id, dir, meta }
            })
            .collect())
    }

    /// Creates the directory of a new durable queue, its metadata durably written, with the
    /// shared log `log_for` picks for its id. Returns the id and the directory.
    pub fn create(
        &self,
        meta: &mut QueueMeta,
        log_for: impl FnOnce(u64) -> u32,
    ) -> io::Result<(u64, PathBuf)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        meta.log = Some(log_for(id));
        let dir = self.root.join(id.to_string());
        std::fs::create_dir(&dir)?;
        self.rewrite(&dir, meta)?;
        segment::sync_dir(&self.root)?;
        Ok((id, dir))
    }

    /// Replaces a queue's metadata atomically (write, sync, rename, sync the directory). Each
    /// write has a temporary file of its own, so concurrent writers never share one; callers
    /// serialize writes of one queue so the last one wins.
    pub fn rewrite(&self, dir: &Path, meta: &QueueMeta) -> io::Result<()> {
        let unique = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!("queue.json.{unique}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(meta).map_err(io::Error::other)?)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, dir.join(META))?;
        segment::sync_dir(dir)
    }

    /// The saved exchanges and bindings (none for a new data directory).
    pub fn read_topology(&self) -> io::Result<SavedTopology> {
        match std::fs::read(self.root.join(TOPOLOGY)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("{TOPOLOGY} is not valid: {e}"))
            }),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(SavedTopology::default()),
            Err(err) => Err(err),
        }
    }

    /// Replaces the saved exchanges and bindings atomically (write, sync, rename, sync the
    /// directory); callers serialize the writes.
    pub fn write_topology(&self, topology: &SavedTopology) -> io::Result<()> {
        let unique = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let tmp = self.root.join(format!("{TOPOLOGY}.{unique}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(topology).map_err(io::Error::other)?)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, self.root.join(TOPOLOGY))?;
        segment::sync_dir(&self.root)
    }

    /// Removes a queue's directory. It is renamed first, so a crash midway never brings back a
    /// half-deleted queue.
    pub fn remove(&self, dir: &Path) -> io::Result<()> {
        let doomed = dir.with_extension("deleted");
        std::fs::rename(dir, &doomed)?;
        segment::sync_dir(&self.root)?;
        std::fs::remove_dir_all(&doomed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_round_trips_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let meta = QueueMeta {
            name: "jobs\u{e9}".into(),
            settings: QueueSettings { durable: true, ..Default::default() },
            alarm_depth: 0,
            log: None,
        };
        let mut meta = meta;
        let (_, queue_dir) = store.create(&mut meta, |id| id as u32 % 2).unwrap();
        assert_eq!(meta.log, Some(1), "the first queue gets id 1");
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((&listed[0].dir, listed[0].meta.as_ref().unwrap()), (&queue_dir, &meta));

        let reopened = Store::open(dir.path()).unwrap();
        let (_, second) = reopened.create(&mut meta.clone(), |_| 0).unwrap();
        assert_ne!(second, queue_dir, "ids are not reused");
        reopened.remove(&queue_dir).unwrap();
        assert_eq!(reopened.list().unwrap().len(), 1);
    }

    #[test]
    fn fsync_policy_parses() {
        assert_eq!("batch".parse::<FsyncPolicy>(), Ok(FsyncPolicy::Batch));
        assert!("sometimes".parse::<FsyncPolicy>().is_err());
    }
}
