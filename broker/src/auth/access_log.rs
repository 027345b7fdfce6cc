//! The access audit log: one JSON line per refused login and per change to users, permissions
//! and tokens, in `<data_dir>/audit/access.log`, rotated by size. Who tried what, from where,
//! and who changed what, when; never a password or a token.

use std::io;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::rotating::RotatingFile;

/// File name, in the audit directory.
const NAME: &str = "access.log";
/// Size at which the file is rotated.
const MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Rotated files kept (`access.log.1` is the newest of them).
const KEEP: u64 = 3;

/// One line of the access log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessEvent {
    /// Unix ms.
    pub time_ms: u64,
    /// `login_refused`, `user_added`, `user_changed`, `user_deleted`, `permissions_set`,
    /// `token_created`, `token_deleted`.
    pub event: String,
    /// The user the event is about (the one who tried to log in, or the one changed).
    pub user: String,
    /// Who made the change; empty for a login.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub by: String,
    /// The address a refused login came from; empty for changes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer: String,
    /// What happened: the refusal's reason, or the change (tags, patterns, token name).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// Appends access events to a size-rotated file.
pub struct AccessLog {
    file: Mutex<RotatingFile>,
}

impl AccessLog {
    /// The access log in `dir` (created if needed).
    pub fn open(dir: &Path) -> io::Result<AccessLog> {
        std::fs::create_dir_all(dir)?;
        Ok(AccessLog { file: Mutex::new(RotatingFile::new(dir, NAME, MAX_BYTES, KEEP)) })
    }

    /// The file events are appended to.
    pub fn path(&self) -> PathBuf {
        self.file.lock().path()
    }

    /// Appends `event`. A failure to write is logged, never passed on: logins and changes go on.
    pub fn record(&self, event: &AccessEvent) {
        let appended = serde_json::to_vec(event).map_err(io::Error::other).and_then(|mut line| {
            line.push(b'\n');
            self.file.lock().append(&line)
        });
        if let Err(err) = appended {
            tracing::warn!(error = %err, "could not write the access log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_json_lines_without_empty_fields() {
        let dir = tempfile::tempdir().unwrap();
        let log = AccessLog::open(dir.path()).unwrap();
        let event = AccessEvent {
            time_ms: 1,
            event: "login_refused".into(),
            user: "app".into(),
            by: String::new(),
            peer: "10.0.0.1".into(),
            detail: "authentication failed".into(),
        };
        log.record(&event);
        log.record(&AccessEvent {
            event: "user_added".into(),
            by: "root".into(),
            peer: String::new(),
            ..event.clone()
        });
        let text = std::fs::read_to_string(log.path()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(!lines[0].contains("\"by\""), "{}", lines[0]);
        assert_eq!(serde_json::from_str::<AccessEvent>(lines[0]).unwrap(), event);
        assert!(lines[1].contains("\"by\":\"root\""), "{}", lines[1]);
    }
}
