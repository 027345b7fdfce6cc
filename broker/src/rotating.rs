//! An append-only file rotated by size: `NAME` is written to; when a line would take it past
//! the limit, `NAME.1` … `NAME.KEEP` shift up by one (the oldest is dropped) and a new `NAME`
//! begins. The audit trail and the access log are written this way.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A size-rotated file; not synchronized, its owner holds it under a lock.
pub struct RotatingFile {
    dir: PathBuf,
    name: &'static str,
    max_bytes: u64,
    keep: u64,
    /// The current file and its length, once opened.
    file: Option<(File, u64)>,
}

/// Where a line went.
pub struct Appended {
    /// Its offset in the current file.
    pub offset: u64,
    /// True when the files rotated before it was written.
    pub rotated: bool,
}

impl RotatingFile {
    /// `dir/name`, rotated at `max_bytes`, keeping `keep` old files.
    pub fn new(dir: &Path, name: &'static str, max_bytes: u64, keep: u64) -> Self {
        RotatingFile { dir: dir.to_path_buf(), name, max_bytes, keep, file: None }
    }

    /// The current file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(self.name)
    }

    /// Appends `line` (which ends in a newline), rotating first if it would not fit.
    pub fn append(&mut self, line: &[u8]) -> io::Result<Appended> {
        let rotated = self.file.as_ref().is_some_and(|(_, len)| *len + line.len() as u64 > self.max_bytes);
        if rotated {
            self.file = None;
            self.rotate()?;
        }
        let (file, len) = match &mut self.file {
            Some(open) => open,
            None => {
                let file = OpenOptions::new().create(true).append(true).open(self.path())?;
                let len = file.metadata()?.len();
                self.file.insert((file, len))
            }
        };
        file.write_all(line)?;
        let offset = *len;
        *len += line.len() as u64;
        Ok(Appended { offset, rotated })
    }

    fn rotate(&self) -> io::Result<()> {
        for n in (1..self.keep).rev() {
            let from = self.dir.join(format!("{}.{n}", self.name));
            if from.exists() {
                std::fs::rename(&from, self.dir.join(format!("{}.{}", self.name, n + 1)))?;
            }
        }
        std::fs::rename(self.path(), self.dir.join(format!("{}.1", self.name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_past_the_limit_start_a_new_file_and_the_oldest_go() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = RotatingFile::new(dir.path(), "x.log", 10, 2);
        let first = file.append(b"aaaaaaa\n").unwrap();
        assert_eq!((first.offset, first.rotated), (0, false));
        for (i, line) in [b"bbbbbbb\n", b"ccccccc\n", b"ddddddd\n"].iter().enumerate() {
            let appended = file.append(*line).unwrap();
            assert!(appended.rotated, "line {i} does not fit after the one before");
            assert_eq!(appended.offset, 0);
        }
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).ok();
        assert_eq!(read("x.log").as_deref(), Some("ddddddd\n"));
        assert_eq!(read("x.log.1").as_deref(), Some("ccccccc\n"));
        assert_eq!(read("x.log.2").as_deref(), Some("bbbbbbb\n"));
        assert_eq!(read("x.log.3"), None, "only two old files are kept");
    }
}
