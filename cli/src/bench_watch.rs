//! What `hopper bench` watches besides its own messages: the broker process (peak memory, CPU
//! time, and after `--declare` its memory, threads and open files) and the queue's depth over
//! time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use hopper_client::Connection;
use serde::Serialize;

use crate::output::BrokerFootprint;

/// Samples a process's resident memory in the background and keeps the peak.
pub struct RssSampler {
    pid: u32,
    peak_kib: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    /// How often the resident memory is read.
    const INTERVAL: Duration = Duration::from_millis(50);

    /// Takes a first sample, failing if the process cannot be read, and starts sampling.
    pub fn start(pid: u32) -> anyhow::Result<RssSampler> {
        let first = read_rss_kib(pid)
            .with_context(|| format!("--rss-pid: cannot read the resident memory of process {pid}"))?;
        let peak_kib = Arc::new(AtomicU64::new(first));
        let peak = Arc::clone(&peak_kib);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Self::INTERVAL);
            loop {
                tick.tick().await;
                // A process that went away mid-run keeps the peak seen so far.
                if let Ok(kib) = read_rss_kib(pid) {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
            }
        });
        Ok(RssSampler { pid, peak_kib, task })
    }

    /// Stops sampling after one last sample and returns the peak in MiB.
    pub async fn finish(self) -> f64 {
        self.task.abort();
        let _ = self.task.await;
        if let Ok(kib) = read_rss_kib(self.pid) {
            self.peak_kib.fetch_max(kib, Ordering::Relaxed);
        }
        kib_to_mib(self.peak_kib.load(Ordering::Relaxed))
    }
}

/// The resident memory of process `pid` in KiB, from `/proc/<pid>/status`.
fn read_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vm_rss_kib(&status).ok_or_else(|| anyhow!("{path} has no VmRSS line"))
}

/// The `VmRSS:   123456 kB` value of a `/proc/<pid>/status` text, in KiB (the kernel's "kB").
fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|line| line.strip_prefix("VmRSS:"))?;
    let mut fields = line.split_whitespace();
    let value = fields.next()?.parse().ok()?;
    matches!(fields.next(), Some("kB") | None).then_some(value)
}

/// The `Threads:  12` value of a `/proc/<pid>/status` text.
fn parse_threads(status: &str) -> Option<u64> {
    status.lines().find_map(|line| line.strip_prefix("Threads:"))?.trim().parse().ok()
}

/// The resident memory, threads and open files of process `pid` now, from
/// `/proc/<pid>/status` and `/proc/<pid>/fd` (which only the process's own user may list).
pub fn read_footprint(pid: u32) -> anyhow::Result<BrokerFootprint> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let rss_kib = parse_vm_rss_kib(&status).ok_or_else(|| anyhow!("{path} has no VmRSS line"))?;
    let threads = parse_threads(&status).ok_or_else(|| anyhow!("{path} has no Threads line"))?;
    let fd_dir = format!("/proc/{pid}/fd");
    let open_files = std::fs::read_dir(&fd_dir).with_context(|| format!("listing {fd_dir}"))?.count();
    Ok(BrokerFootprint {
        broker_rss_mb: kib_to_mib(rss_kib),
        broker_threads: threads,
        broker_open_files: open_files as u64,
    })
}

/// KiB to MiB, rounded to one decimal.
fn kib_to_mib(kib: u64) -> f64 {
    (kib as f64 / 1024.0 * 10.0).round() / 10.0
}

/// CPU time (user + system) process `pid` has used so far, from `/proc/<pid>/stat`.
pub fn read_cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = parse_cpu_ticks(&stat).ok_or_else(|| anyhow!("{path} has no utime/stime"))?;
    // The kernel's USER_HZ is 100 on every Linux architecture in use.
    Ok(Duration::from_millis(ticks * 10))
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name in
/// parentheses may contain spaces, so fields are counted after its closing parenthesis.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name come field 3 (state) onwards: utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// One reading of a queue's depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DepthSample {
    /// Milliseconds since the run started.
    pub t_ms: u64,
    /// Ready messages.
    pub ready: u64,
    /// Unacked deliveries.
    pub unacked: u64,
    /// Delayed messages.
    pub delayed: u64,
}

/// Reads a queue's depth at a fixed interval in the background.
pub struct DepthSampler {
    samples: Arc<SampleStore>,
    task: tokio::task::JoinHandle<()>,
}

/// Collected samples; taken a few times a second, so a plain mutex does.
#[derive(Default)]
struct SampleStore(std::sync::Mutex<Vec<DepthSample>>);

impl DepthSampler {
    /// Starts sampling `queue` every `every` over `conn`, with times relative to `start`.
    pub fn start(conn: Connection, queue: String, every: Duration, start: Instant) -> DepthSampler {
        let samples = Arc::new(SampleStore::default());
        let kept = Arc::clone(&samples);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Ok(info) = conn.queue_stats(&queue).await else { return };
                let sample = DepthSample {
                    t_ms: start.elapsed().as_millis() as u64,
                    ready: info.ready,
                    unacked: info.unacked,
                    delayed: info.delayed,
                };
                kept.0.lock().expect("samples lock").push(sample);
            }
        });
        DepthSampler { samples, task }
    }

    /// Stops sampling and returns the samples.
    pub async fn finish(self) -> Vec<DepthSample> {
        self.task.abort();
        let _ = self.task.await;
        std::mem::take(&mut *self.samples.0.lock().expect("samples lock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_from_a_status_text() {
        let status = "Name:\thopperd\nVmPeak:\t  999999 kB\nVmRSS:\t   51200 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss_kib(status), Some(51_200));
        // Kernel threads have no VmRSS line.
        assert_eq!(parse_vm_rss_kib("Name:\tkthreadd\nThreads:\t1\n"), None);
        assert_eq!(parse_vm_rss_kib("VmRSS:\t  lots kB\n"), None);
        assert_eq!(parse_vm_rss_kib("VmRSS:\t  12 MB\n"), None);
        assert_eq!(kib_to_mib(51_200), 50.0);
        assert_eq!(kib_to_mib(1_500), 1.5);
        assert_eq!(kib_to_mib(0), 0.0);
    }

    #[test]
    fn rss_of_this_process_can_be_read() {
        assert!(read_rss_kib(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn threads_are_read_from_a_status_text() {
        assert_eq!(parse_threads("Name:\thopperd\nThreads:\t17\nSigQ:\t0/1\n"), Some(17));
        assert_eq!(parse_threads("Name:\thopperd\n"), None);
        assert_eq!(parse_threads("Threads:\tmany\n"), None);
    }

    #[test]
    fn footprint_of_this_process_counts_its_threads_and_files() {
        let footprint = read_footprint(std::process::id()).unwrap();
        assert!(footprint.broker_rss_mb > 0.0);
        assert!(footprint.broker_threads >= 1, "{footprint:?}");
        // The listing of /proc/<pid>/fd holds a descriptor of its own while it counts.
        assert!(footprint.broker_open_files >= 1, "{footprint:?}");
        assert!(read_footprint(u32::MAX).is_err());
    }

    #[test]
    fn cpu_ticks_are_read_after_the_command_name() {
        let stat = "4242 (hop perd) S 1 4242 4242 0 -1 4194560 1234 0 0 0 150 25 0 0 20 0 9 0 100 0";
        assert_eq!(parse_cpu_ticks(stat), Some(175));
        assert_eq!(parse_cpu_ticks("garbage"), None);
        assert!(read_cpu_time(std::process::id()).is_ok());
    }
}
