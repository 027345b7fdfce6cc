//! RabbitMQ's Python clients against Hopper's AMQP listener: pika running RabbitMQ's six
//! tutorials and the features around them (`tests/python/tutorials.py`, `features.py`), a
//! Celery worker retrying a task (`celery_retry.py`), and messages crossing between pika and
//! the `hopper` CLI (`cross_protocol.py`).
//!
//! The clients are installed once, from `tests/python/requirements.txt`, into a virtualenv
//! under the target directory (`python3 -m venv` and pip, so `python3` and PyPI must be
//! reachable); a changed requirements file gets a virtualenv of its own. Each scenario is one
//! run of a script with the broker's AMQP URL; it exits 0 when everything it checked held, and
//! its output (and the broker's log) is shown when it did not.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use hopper_tests::{run, run_cli, Broker, CliOutput};

/// Where the Python scenarios live.
fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// The virtualenv's interpreter, made (once per process, and once per requirements file
/// across processes) on first use.
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(make_venv)
}

/// Makes the virtualenv for `requirements.txt` unless it is there already, and returns its
/// interpreter.
///
/// It is built under a temporary name and renamed into place when complete, so a process that
/// sees the directory sees a whole virtualenv, and two test processes that build it at once
/// both end up using the one renamed first. The interpreter is called as `python -m ...`,
/// never through the scripts in `bin/`, whose `#!` lines would name the temporary directory.
fn make_venv() -> PathBuf {
    let requirements = scripts().join("requirements.txt");
    let text = std::fs::read(&requirements).expect("read tests/python/requirements.txt");
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let venv = root.join(format!("python-venv-{:08x}", crc32c::crc32c(&text)));
    let interpreter = venv.join("bin").join("python");
    if interpreter.is_file() {
        return interpreter;
    }
    // One whose interpreter is gone (the Python it was made from was removed) is made again.
    if venv.exists() {
        let _ = std::fs::remove_dir_all(&venv);
    }
    std::fs::create_dir_all(root).expect("create the target's tmp directory");
    let building = tempfile::Builder::new()
        .prefix("python-venv-building-")
        .tempdir_in(root)
        .expect("create a directory to build the virtualenv in");
    let fresh = building.path().join("venv");
    let created = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&fresh)
        .output()
        .unwrap_or_else(|err| panic!("run python3 -m venv (is Python 3 installed?): {err}"));
    assert!(created.status.success(), "python3 -m venv failed:\n{}", describe(&created));
    let installed = Command::new(fresh.join("bin").join("python"))
        .args(["-m", "pip", "install", "--quiet", "--no-input", "--disable-pip-version-check", "-r"])
        .arg(&requirements)
        .output()
        .expect("run pip");
    assert!(
        installed.status.success(),
        "pip install -r {} failed:\n{}",
        requirements.display(),
        describe(&installed)
    );
    // Losing the race to another process is fine: its virtualenv is as good as this one.
    if std::fs::rename(&fresh, &venv).is_err() {
        assert!(interpreter.is_file(), "could not move the new virtualenv to {}", venv.display());
    }
    interpreter
}

/// What a finished command printed, for a failure message.
fn describe(output: &std::process::Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A broker with its AMQP listener on a free port.
fn broker() -> Broker {
    Broker::start_with(&["--amqp-listen", "127.0.0.1:0"])
}

/// The broker's AMQP URL as pika takes it: guest on the vhost `/`.
fn amqp_url(broker: &Broker) -> String {
    format!("amqp://guest:guest@{}/%2F", broker.amqp_addr())
}

/// Runs `scenario` of `script` against `broker` and fails the test, showing the script's output
/// and the broker's log, unless it passed.
async fn scenario(broker: &Broker, script: &str, scenario: &str) {
    let mut command = Command::new(python());
    command
        .arg(scripts().join(script))
        .args([scenario, &amqp_url(broker)])
        .current_dir(scripts())
        // No __pycache__ in the source tree; output as it happens.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    let output = run(command).await;
    assert!(
        output.success(),
        "{script} {scenario} failed:\n{output}\n---- hopperd's log ----\n{}",
        broker.stderr()
    );
}

/// Runs the `scenario` of `script` on a broker of its own.
async fn alone(script: &str, name: &str) {
    // The virtualenv first: on the first run it takes a while, and no broker need wait for it.
    python();
    scenario(&broker(), script, name).await;
}

/// Runs `hopper args...` against `broker` and fails the test unless it exited 0.
async fn hopper(broker: &Broker, args: &[&str]) -> CliOutput {
    let output = run_cli(broker, args).await;
    output.assert_success();
    output
}

#[tokio::test]
async fn tutorial_1_hello_world() {
    alone("tutorials.py", "hello_world").await;
}

#[tokio::test]
async fn tutorial_2_work_queues_with_a_prefetch_of_one_and_manual_acks() {
    alone("tutorials.py", "work_queues").await;
}

#[tokio::test]
async fn tutorial_3_publish_subscribe_with_server_named_exclusive_queues() {
    alone("tutorials.py", "publish_subscribe").await;
}

#[tokio::test]
async fn tutorial_4_routing_with_a_direct_exchange() {
    alone("tutorials.py", "routing").await;
}

#[tokio::test]
async fn tutorial_5_topics() {
    alone("tutorials.py", "topics").await;
}

#[tokio::test]
async fn tutorial_6_rpc_with_reply_to_and_correlation_id() {
    alone("tutorials.py", "rpc").await;
}

#[tokio::test]
async fn publisher_confirms() {
    alone("features.py", "publisher_confirms").await;
}

#[tokio::test]
async fn basic_get_and_get_empty() {
    alone("features.py", "basic_get").await;
}

#[tokio::test]
async fn a_nack_with_requeue_redelivers_flagged_redelivered() {
    alone("features.py", "nack_requeue").await;
}

#[tokio::test]
async fn a_rejected_message_is_dead_lettered_with_x_death() {
    alone("features.py", "dead_letter").await;
}

#[tokio::test]
async fn an_expired_message_is_dead_lettered_with_x_death() {
    alone("features.py", "expired_dead_letter").await;
}

#[tokio::test]
async fn an_unroutable_mandatory_publish_comes_back() {
    alone("features.py", "mandatory_return").await;
}

#[tokio::test]
async fn a_full_reject_publish_queue_nacks_the_publish() {
    alone("features.py", "reject_publish_overflow").await;
}

#[tokio::test]
async fn a_celery_task_retries_then_succeeds() {
    alone("celery_retry.py", "retry_until_success").await;
}

#[tokio::test]
async fn a_celery_task_waiting_for_its_countdown_does_not_hold_up_the_next() {
    alone("celery_retry.py", "countdown_does_not_hold_up_the_next").await;
}

#[tokio::test]
async fn deliveries_of_a_cancelled_consumer_can_still_be_acked() {
    alone("features.py", "ack_after_cancel").await;
}

#[tokio::test]
async fn pikas_consumer_cancel_after_a_requeue_loses_nothing() {
    alone("features.py", "requeue_while_consuming_then_cancel").await;
}

#[tokio::test]
async fn dead_lettering_through_the_default_exchange_reaches_the_named_queue() {
    alone("features.py", "dead_letter_through_the_default_exchange").await;
}

#[tokio::test]
async fn header_values_keep_their_types() {
    alone("features.py", "header_types").await;
}

#[tokio::test]
async fn a_dead_lettered_message_carries_the_first_death_headers() {
    alone("features.py", "first_death_headers").await;
}

#[tokio::test]
async fn published_with_pika_consumed_with_hopper_consume_and_back() {
    let broker = broker();
    scenario(&broker, "cross_protocol.py", "publish_orders").await;
    let consumed = hopper(&broker, &["consume", "orders", "--count", "3", "--json"]).await;
    let messages = consumed.json_lines();
    assert_eq!(messages.len(), 3, "{consumed}");
    for (n, message) in messages.iter().enumerate() {
        assert_eq!(message["body"], format!("{{\"n\": {n}}}"), "{consumed}");
        assert_eq!(message["content_type"], "application/json", "{consumed}");
        assert_eq!(message["headers"]["tenant"], "acme", "{consumed}");
        assert_eq!(message["headers"]["amqp-correlation-id"], format!("order-{n}"), "{consumed}");
        assert_eq!(message["redelivered"], false, "{consumed}");
    }
    let stats = hopper(&broker, &["queue", "stats", "orders", "--json"]).await.json();
    assert_eq!(
        (&stats["durable"], &stats["ready"], &stats["acked"]),
        (&true.into(), &0.into(), &3.into()),
        "{stats}"
    );

    // And the other way: a header named after a property becomes that property for pika.
    hopper(
        &broker,
        &[
            "publish",
            "orders",
            "--content-type",
            "text/plain",
            "--header",
            "amqp-correlation-id=cli-1",
            "--header",
            "tenant=acme",
            "from the cli",
        ],
    )
    .await;
    scenario(&broker, "cross_protocol.py", "consume_from_cli").await;
}

#[tokio::test]
async fn dead_lettered_with_pika_replayed_with_hopper_queue_move() {
    let broker = broker();
    scenario(&broker, "cross_protocol.py", "dead_letter_jobs").await;
    let moved = hopper(&broker, &["queue", "move", "jobs.dead"]).await;
    assert!(moved.stdout.starts_with("moved 2 messages from jobs.dead"), "{moved}");
    assert!(moved.stdout.trim_end().ends_with("finished"), "{moved}");
    scenario(&broker, "cross_protocol.py", "consume_replayed_jobs").await;
}
