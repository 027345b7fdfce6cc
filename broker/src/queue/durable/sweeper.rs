//! Deletes emptied segments and makes each log's next segment beside the storage threads.
//! Unlinking a file, or creating one and syncing its directory, takes a while on a busy disk
//! (20 ms and more were seen), and a storage thread doing it between rounds kept its queues'
//! confirms waiting that long.

use std::collections::VecDeque;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use parking_lot::Mutex;

use super::SharedLog;
use crate::storage::segment;

/// Wait after a failed delete before the sweeper tries again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Segments of one log waiting to be deleted, oldest first. They go strictly in that order, so
/// what is on disk is always the newer part of the log: a settle record lives in a newer
/// segment than the publish record it settles, and must outlive it.
#[derive(Default)]
pub(super) struct Doomed {
    segments: Mutex<VecDeque<u64>>,
    /// Set while the sweeper has been told about this log and has not looked yet.
    told: AtomicBool,
    /// The id the log's next segment will have, and that segment once made (created, its
    /// magic written and its directory entry synced), for the storage thread to roll into.
    next: Mutex<(u64, Option<File>)>,
}

impl Doomed {
    /// Adds a segment, newer than every one added before.
    pub(super) fn push(&self, segment: u64) {
        self.segments.lock().push_back(segment);
    }

    /// True when there is work the sweeper has not been told about: tell it then.
    pub(super) fn should_tell(&self) -> bool {
        let work = !self.segments.lock().is_empty() || matches!(*self.next.lock(), (id, None) if id > 0);
        work && !self.told.swap(true, Ordering::AcqRel)
    }

    /// Asks for segment `id` to be made ahead, as the log's next one.
    pub(super) fn want_next(&self, id: u64) {
        *self.next.lock() = (id, None);
    }

    /// Segment `id`, the log's next one, if it was made ahead; from now on the segment after it
    /// is the one wanted. Under the same lock the sweeper holds while it makes one, so it never
    /// makes a segment the storage thread is making (or writing) itself.
    pub(super) fn take_next(&self, id: u64) -> Option<File> {
        let mut next = self.next.lock();
        let made = if next.0 == id { next.1.take() } else { None };
        *next = (id + 1, None);
        made
    }
}

/// The sweeper's loop: on each word from a storage thread (the index of its log), deletes what
/// that log has doomed, oldest first. Ends when every storage thread has stopped.
pub(super) fn run(logs: Vec<Arc<SharedLog>>, told: mpsc::Receiver<u32>) {
    // The channel holds at most one word per log: a storage thread only sends after `told`
    // flipped from false to true, and the sweeper flips it back before it looks.
    while let Ok(index) = told.recv() {
        let Some(log) = logs.get(index as usize) else { continue };
        log.doomed.told.store(false, Ordering::Release);
        loop {
            let Some(segment) = log.doomed.segments.lock().front().copied() else { break };
            match log.reader.delete(segment) {
                Ok(()) => {
                    log.doomed.segments.lock().pop_front();
                    tracing::debug!(log = log.index, segment, "segment deleted");
                }
                Err(err) => {
                    // Newer segments wait behind it; the log's next round tells again.
                    tracing::warn!(log = log.index, segment, error = %err, "could not delete segment");
                    std::thread::sleep(RETRY_AFTER);
                    break;
                }
            }
        }
        make_next(log);
    }
}

/// Makes the log's next segment if it is wanted and not made yet.
fn make_next(log: &SharedLog) {
    let mut next = log.doomed.next.lock();
    let id = match &*next {
        (id, None) if *id > 0 => *id,
        _ => return,
    };
    match segment::create(&log.dir, id) {
        Ok(file) => next.1 = Some(file),
        Err(err) => {
            // The storage thread makes it itself when it rolls, and says so if it cannot.
            tracing::debug!(log = log.index, segment = id, error = %err, "could not make the next segment ahead");
            drop(next);
            std::thread::sleep(RETRY_AFTER);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_in(dir: &std::path::Path) -> Arc<SharedLog> {
        let config = crate::config::Config::default().storage();
        Arc::new(SharedLog::new(0, dir.to_path_buf(), &config, 4, Arc::default()))
    }

    /// Tells the sweeper about `log` (once until it looks) and lets it do that one word's work.
    fn sweep(log: &Arc<SharedLog>) {
        assert!(log.doomed.should_tell());
        assert!(!log.doomed.should_tell(), "told once until the sweeper looks");
        let (tell, told) = mpsc::channel();
        tell.send(0).unwrap();
        drop(tell);
        run(vec![log.clone()], told);
    }

    #[test]
    fn a_segment_that_cannot_be_deleted_holds_back_the_newer_ones() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_in(dir.path());
        for id in 1..=3 {
            std::fs::write(segment::path(dir.path(), id), b"records").unwrap();
            log.doomed.push(id);
        }
        // A directory with something in it cannot be removed as a file.
        std::fs::remove_file(segment::path(dir.path(), 2)).unwrap();
        std::fs::create_dir(segment::path(dir.path(), 2)).unwrap();
        std::fs::write(segment::path(dir.path(), 2).join("x"), b"").unwrap();

        sweep(&log);
        let exists = |id| segment::path(dir.path(), id).exists();
        assert_eq!([exists(1), exists(2), exists(3)], [false, true, true], "only the oldest went");

        std::fs::remove_dir_all(segment::path(dir.path(), 2)).unwrap();
        sweep(&log);
        assert_eq!([exists(1), exists(2), exists(3)], [false, false, false]);
        assert!(!log.doomed.should_tell(), "nothing left to do");
    }

    #[test]
    fn the_next_segment_is_made_ahead_and_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_in(dir.path());
        log.doomed.want_next(8);
        sweep(&log);
        assert_eq!(
            std::fs::read(segment::path(dir.path(), 8)).unwrap(),
            segment::MAGIC,
            "made, with its magic"
        );
        assert!(!log.doomed.should_tell(), "made once");

        assert!(log.doomed.take_next(7).is_none(), "not the segment made");
        assert!(matches!(*log.doomed.next.lock(), (8, None)), "the one after 7 is wanted now");
        log.doomed.want_next(8);
        make_next(&log);
        assert!(log.doomed.take_next(8).is_some());
        assert!(log.doomed.take_next(8).is_none(), "taken once");
        assert!(matches!(*log.doomed.next.lock(), (9, None)), "9 is wanted next");
    }
}
