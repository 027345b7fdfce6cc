//! `hopper bench --declare N`: how fast the broker declares many queues and what holding them
//! costs it; with `--check`, how long a (re)starting broker takes until every one of them
//! answers its stats. Also how the message bench declares and deletes its own queues: over a
//! few connections with a bounded number in flight.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::{stream, Stream, StreamExt, TryStreamExt};
use hopper_client::{Connection, DeleteOptions, QueueOptions};

use crate::bench_watch::read_footprint;
use crate::output::{self, BrokerFootprint, CheckReport, DeclareReport};

/// Connections a declare or check run spreads its requests over at most. The broker answers
/// one connection's declares and deletes one at a time (they are blocking file work), so the
/// connections are what runs in parallel there; the requests in flight beyond them keep each
/// connection's next request waiting at the broker rather than on a round trip.
const MAX_CONNECTIONS: u32 = 8;
/// Declares and deletes of the message bench's own queues awaiting their answer at once, so
/// that a thousand queues are set up in a few round trips' time.
pub(super) const SETUP_IN_FLIGHT: u32 = 64;
/// How long `--check` waits for the broker to accept a connection and every queue to answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between attempts while `--check` waits for the broker or for a queue.
const RETRY_EVERY: Duration = Duration::from_millis(50);

/// What `--declare` was asked to do.
#[derive(Debug, Clone, Copy)]
pub(super) struct DeclareRun {
    /// Queues `bench-decl-0` .. `bench-decl-<count - 1>`.
    pub count: u64,
    /// Requests awaiting their answer at once.
    pub in_flight: u32,
    /// Declare the queues durable.
    pub durable: bool,
    /// Ask every queue's stats instead of declaring them.
    pub check: bool,
    /// Process whose memory, threads and open files to report afterwards.
    pub rss_pid: Option<u32>,
    /// Print the report as one JSON object.
    pub json: bool,
}

/// The name of the `index`-th queue of a declare run.
fn queue_name(index: u64) -> String {
    format!("bench-decl-{index}")
}

/// Connections a run with `in_flight` requests outstanding uses.
fn connections_for(in_flight: u32) -> u32 {
    in_flight.clamp(1, MAX_CONNECTIONS)
}

/// Runs `--declare` (or `--declare --check`) against the broker at `server` and prints the
/// report.
pub(super) async fn run(server: &str, run: DeclareRun) -> anyhow::Result<()> {
    if run.check {
        check(server, run).await
    } else {
        declare(server, run).await
    }
}

/// Declares the queues and reports the rate. They are left in place, for a restart to find.
async fn declare(server: &str, run: DeclareRun) -> anyhow::Result<()> {
    // A pid that cannot be read should fail the run before it does its work, not after.
    if let Some(pid) = run.rss_pid {
        read_footprint(pid).with_context(|| format!("--rss-pid {pid}"))?;
    }
    let connections = connections_for(run.in_flight);
    let mut conns = Vec::new();
    for i in 0..connections {
        conns.push(crate::connect(server, &format!("bench declare {i}")).await?);
    }
    let started = Instant::now();
    let options = QueueOptions { durable: run.durable, ..Default::default() };
    declare_queues(&conns, (0..run.count).map(queue_name), run.in_flight, options).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let broker = footprint(run.rss_pid)?;
    close_all(&conns).await;
    let report = DeclareReport {
        declared: run.count,
        durable: run.durable,
        in_flight: run.in_flight,
        connections,
        elapsed_s: elapsed,
        declares_per_s: if elapsed > 0.0 { run.count as f64 / elapsed } else { 0.0 },
        broker,
    };
    if run.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", output::declare_listing(&report));
    }
    Ok(())
}

/// Waits for the broker to take a connection, then asks every queue for its stats; reports the
/// time from the start until the last one answered. Fails (after printing the report) when
/// the broker took no connection within [`CHECK_TIMEOUT`] or some queue did not answer.
async fn check(server: &str, run: DeclareRun) -> anyhow::Result<()> {
    let started = Instant::now();
    let deadline = started + CHECK_TIMEOUT;
    let first = connect_when_up(server, deadline).await?;
    let connect_s = started.elapsed().as_secs_f64();
    let connections = connections_for(run.in_flight);
    let mut conns = vec![first];
    for i in 1..connections {
        conns.push(crate::connect(server, &format!("bench check {i}")).await?);
    }
    let (answered, first_error) =
        // The broker recovers every queue before it accepts connections: a queue that does not
        // answer now is missing.
        each_queue(&conns, (0..run.count).map(queue_name), run.in_flight, |conn, name| async move {
            conn.queue_stats(&name).await.map(drop).map_err(|err| format!("{name}: {err}"))
        })
        .fold((0u64, None), |(answered, first_error), result| async move {
            match result {
                Ok(()) => (answered + 1, first_error),
                Err(err) => (answered, first_error.or(Some(err))),
            }
        })
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let broker = footprint(run.rss_pid)?;
    close_all(&conns).await;
    let report = CheckReport {
        queues: run.count,
        answered,
        in_flight: run.in_flight,
        connections,
        connect_s,
        elapsed_s: elapsed,
        first_error,
        broker,
    };
    if run.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", output::check_listing(&report));
    }
    if answered < run.count {
        bail!("only {answered} of {} queues answered", run.count);
    }
    Ok(())
}

/// Connects, retrying every [`RETRY_EVERY`] while the broker is not (yet) accepting
/// connections, until `deadline`.
async fn connect_when_up(server: &str, deadline: Instant) -> anyhow::Result<Connection> {
    loop {
        match crate::connect(server, "bench check 0").await {
            Ok(conn) => return Ok(conn),
            Err(err) if Instant::now() + RETRY_EVERY >= deadline => {
                return Err(
                    err.context(format!("the broker did not accept a connection within {CHECK_TIMEOUT:?}"))
                );
            }
            Err(_) => tokio::time::sleep(RETRY_EVERY).await,
        }
    }
}

/// The connections the message bench declares and deletes its `queues` over: `admin`, and
/// for many queues a few more, since the broker takes one connection's declares in turn.
pub(super) async fn setup_connections(
    server: &str,
    admin: &Connection,
    queues: usize,
) -> anyhow::Result<Vec<Connection>> {
    let wanted = connections_for(SETUP_IN_FLIGHT).min(u32::try_from(queues).unwrap_or(u32::MAX));
    let mut conns = vec![admin.clone()];
    for i in 1..wanted {
        conns.push(crate::connect(server, &format!("bench setup {i}")).await?);
    }
    Ok(conns)
}

/// Declares the queues `names` over `conns`, `in_flight` at a time; the first refusal fails
/// the run.
pub(super) async fn declare_queues(
    conns: &[Connection],
    names: impl Iterator<Item = String>,
    in_flight: u32,
    options: QueueOptions,
) -> anyhow::Result<()> {
    each_queue(conns, names, in_flight, |conn, name| {
        let options = options.clone();
        async move { conn.declare_queue(&name, options).await.with_context(|| format!("declaring '{name}'")) }
    })
    .try_for_each(|_| async { Ok(()) })
    .await
}

/// Deletes `queues` over `conns`, warning about each one that could not be deleted.
pub(super) async fn delete_queues(conns: &[Connection], queues: &[String]) {
    each_queue(conns, queues.iter().cloned(), SETUP_IN_FLIGHT, |conn, name| async move {
        if let Err(err) = conn.delete_queue(&name, DeleteOptions::default()).await {
            eprintln!("hopper: warning: could not delete queue '{name}': {err}");
        }
    })
    .collect::<()>()
    .await;
}

/// The `--rss-pid` process's footprint now, if one was named.
fn footprint(pid: Option<u32>) -> anyhow::Result<Option<BrokerFootprint>> {
    pid.map(|pid| read_footprint(pid).with_context(|| format!("--rss-pid {pid}"))).transpose()
}

/// Closes every connection; a failure to close changes nothing about the measurement.
pub(super) async fn close_all(conns: &[Connection]) {
    for conn in conns {
        let _ = conn.close().await;
    }
}

/// Calls `call` once for every name, dealing the names out over `conns` in turn, with at
/// most `in_flight` calls awaiting their answer at once; yields the answers as they come.
/// Names are taken lazily, so a long list costs no more memory than `in_flight` calls.
pub(super) fn each_queue<'a, C, Fut>(
    conns: &'a [C],
    names: impl Iterator<Item = String> + 'a,
    in_flight: u32,
    call: impl Fn(&'a C, String) -> Fut + 'a,
) -> impl Stream<Item = Fut::Output> + 'a
where
    Fut: Future + 'a,
{
    let in_flight = usize::try_from(in_flight).unwrap_or(usize::MAX).max(1);
    stream::iter(conns.iter().cycle().zip(names))
        .map(move |(conn, name)| call(conn, name))
        .buffer_unordered(in_flight)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_connections_carry_the_requests_in_flight() {
        assert_eq!(connections_for(1), 1);
        assert_eq!(connections_for(4), 4);
        assert_eq!(connections_for(64), MAX_CONNECTIONS);
        assert_eq!(connections_for(0), 1);
        assert_eq!(queue_name(17), "bench-decl-17");
    }

    #[tokio::test]
    async fn each_queue_deals_names_over_the_connections_and_bounds_the_calls_in_flight() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let running = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        let conns = [0u32, 1, 2];
        let names = (0..20).map(|i| format!("q{i}"));
        let mut calls: Vec<(u32, String)> = each_queue(&conns, names, 4, |conn, name| {
            let (running, most) = (&running, &most);
            async move {
                most.fetch_max(running.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                tokio::task::yield_now().await;
                running.fetch_sub(1, Ordering::SeqCst);
                (*conn, name)
            }
        })
        .collect()
        .await;
        assert_eq!(most.load(Ordering::SeqCst), 4);
        calls.sort_by_key(|(_, name)| name[1..].parse::<u32>().unwrap());
        assert_eq!(calls.len(), 20);
        for (i, (conn, name)) in calls.iter().enumerate() {
            assert_eq!((*conn, name.as_str()), (i as u32 % 3, format!("q{i}").as_str()));
        }
        let none: Vec<()> =
            each_queue(&[] as &[u32], (0..5).map(queue_name), 4, |_, _| async {}).collect().await;
        assert!(none.is_empty(), "no connection, no call");
    }
}
