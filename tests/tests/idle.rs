//! An idle broker uses no CPU, whatever its fsync policy, after durable traffic.

use std::time::Duration;

use hopper_client::{PublishOptions, QueueOptions};
use hopper_tests::{connect, Broker};

/// CPU time (user + system) of process `pid` in clock ticks, from `/proc/<pid>/stat`.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/<pid>/stat");
    let fields: Vec<&str> = stat[stat.rfind(')').expect("a command name") + 1..].split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

#[tokio::test]
async fn an_idle_broker_does_not_spin_under_any_fsync_policy() {
    for policy in ["always", "batch", "never"] {
        let broker = Broker::start_with(&["--fsync", policy]);
        let conn = connect(&broker).await;
        conn.declare_queue("jobs", QueueOptions { durable: true, ..Default::default() }).await.unwrap();
        for i in 0..100 {
            conn.publish("jobs", format!("job {i}"), PublishOptions::default()).await.unwrap();
        }
        // Measuring idleness takes an idle stretch: this is the behaviour under test, not a
        // wait for something to happen.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = cpu_ticks(broker.pid());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let used = cpu_ticks(broker.pid()) - before;
        // A spinning thread burns about 100 ticks a second; an idle broker close to none.
        assert!(used < 20, "--fsync {policy}: {used} ticks of CPU in one idle second");
    }
}
