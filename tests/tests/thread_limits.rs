//! Running out of threads, with a cgroup pids limit around `hopperd`: a broker that cannot get
//! the threads it starts with exits at once with one clear line, and a restart with room finds
//! everything it stored; a broker that reaches the limit while running keeps serving, since its
//! thread set is fixed and its blocking work waits for a thread it already has.
//!
//! The tests need a writable pids controller (cgroup v1 at `/sys/fs/cgroup/pids`, as root in a
//! container); without one they say so and stop.

use std::path::PathBuf;
use std::process::Stdio;

use hopper_client::{GetOptions, PublishOptions, QueueOptions};
use hopper_tests::{binary, connect, Broker};

/// A pids cgroup of its own, removed on drop.
struct PidsLimit {
    dir: PathBuf,
}

impl PidsLimit {
    /// A new cgroup `name` with room for `max` tasks, or `None` where cgroups cannot be made.
    fn new(name: &str, max: u64) -> Option<PidsLimit> {
        let dir = PathBuf::from("/sys/fs/cgroup/pids").join(format!("hopper-{name}-{}", std::process::id()));
        if let Err(err) = std::fs::create_dir(&dir) {
            eprintln!("no pids cgroup ({}: {err}); thread exhaustion not tried", dir.display());
            return None;
        }
        let limit = PidsLimit { dir };
        limit.set(max);
        Some(limit)
    }

    fn set(&self, max: u64) {
        std::fs::write(self.dir.join("pids.max"), max.to_string()).expect("set pids.max");
    }

    /// Tasks in the cgroup now.
    fn current(&self) -> u64 {
        let text = std::fs::read_to_string(self.dir.join("pids.current")).expect("read pids.current");
        text.trim().parse().expect("a number")
    }

    /// A command prefix that moves itself into the cgroup, then execs the rest.
    fn wrapper(&self) -> Vec<String> {
        let procs = self.dir.join("cgroup.procs");
        let script = format!("echo $$ > {} && exec \"$@\"", procs.display());
        vec!["sh".into(), "-c".into(), script, "sh".into()]
    }
}

impl Drop for PidsLimit {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// stderr without the allocator's own complaints about its background thread.
fn broker_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|line| !line.starts_with("<jemalloc>")).collect()
}

#[tokio::test]
async fn a_broker_without_threads_to_start_exits_with_one_line_and_a_restart_recovers() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start_in(data_dir.path(), &[]);
    let conn = connect(&broker).await;
    conn.declare_queue("kept", QueueOptions { durable: true, ..Default::default() }).await.unwrap();
    for body in ["a", "b", "c"] {
        conn.publish("kept", body, PublishOptions::default()).await.unwrap();
    }
    drop(conn);
    broker.kill();

    let Some(limit) = PidsLimit::new("start", 4) else { return };
    let wrapper = limit.wrapper();
    let output = tokio::process::Command::new(&wrapper[0])
        .args(&wrapper[1..])
        .arg(binary("hopperd"))
        .args(["--listen", "127.0.0.1:0", "--http", "off", "--data-dir"])
        .arg(data_dir.path())
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let lines = broker_lines(&stderr);
    assert_eq!(lines.len(), 1, "one line:\n{stderr}");
    assert!(lines[0].starts_with("hopperd: error: ") && lines[0].contains("out of threads"), "{stderr}");
    drop(limit);

    broker.restart();
    let conn = connect(&broker).await;
    let got = conn.get("kept", GetOptions { count: 10, ..Default::default() }).await.unwrap();
    let bodies: Vec<&[u8]> = got.iter().map(|d| &d.body[..]).collect();
    assert_eq!(bodies, [&b"a"[..], b"b", b"c"], "everything stored came back");
}

#[tokio::test]
async fn a_broker_at_its_thread_limit_keeps_serving_durable_queues() {
    let Some(limit) = PidsLimit::new("running", 1000) else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let wrapper = limit.wrapper();
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut broker = Broker::start_wrapped(&wrapper, data_dir.path(), &[]);
    let conn = connect(&broker).await;
    // The broker has made its threads; it gets not one more.
    limit.set(limit.current());

    for i in 0..20 {
        let name = format!("q{i}");
        conn.declare_queue(&name, QueueOptions { durable: true, ..Default::default() }).await.unwrap();
        conn.publish(&name, format!("m{i}"), PublishOptions::default()).await.unwrap();
    }
    for i in 0..20 {
        let got = conn.get(&format!("q{i}"), GetOptions::default()).await.unwrap();
        assert_eq!(got.len(), 1, "q{i}");
        assert_eq!(got[0].body, format!("m{i}").as_bytes());
    }
    conn.delete_queue("q0", Default::default()).await.unwrap();

    limit.set(1000);
    drop(conn);
    broker.terminate();
    assert!(!broker.stderr().contains("panicked"), "{}", broker.stderr());
}
