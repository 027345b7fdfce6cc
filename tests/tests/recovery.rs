//! A recovering connection given two brokers: when its broker is killed it moves to the other,
//! subscribes its consumer there again, sends on the publishes it had not got confirmed, and
//! says so through its events.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use hopper_client::{
    ConnectOptions, ConsumeOptions, Error, PublishOptions, QueueOptions, Recovering, RecoveringConsumer,
    RecoveryEvent, RecoveryOptions,
};
use hopper_tests::{connect, within, Broker};

fn fast() -> RecoveryOptions {
    RecoveryOptions { first_delay: Duration::from_millis(10), max_delay: Duration::from_millis(200) }
}

async fn next_event(events: &mut tokio::sync::broadcast::Receiver<RecoveryEvent>) -> RecoveryEvent {
    within("a recovery event", events.recv()).await.expect("the event stream is open")
}

/// Receives and acks until `received` holds `count` bodies.
async fn receive_until(consumer: &mut RecoveringConsumer, received: &mut BTreeSet<String>, count: usize) {
    while received.len() < count {
        let delivery = within("a delivery", consumer.next()).await.unwrap().unwrap();
        received.insert(String::from_utf8(delivery.body.to_vec()).unwrap());
        delivery.ack().await.unwrap();
    }
}

#[tokio::test]
async fn a_worker_moves_to_the_next_broker_and_keeps_consuming() {
    let mut first = Broker::start();
    let second = Broker::start();
    for broker in [&first, &second] {
        connect(broker).await.declare_queue("jobs", QueueOptions::default()).await.unwrap();
    }
    let addrs = vec![first.addr().to_string(), second.addr().to_string()];
    let client =
        Recovering::connect(addrs, ConnectOptions::default(), fast()).await.expect("connects to the first");
    let mut events = client.events();
    let options = ConsumeOptions { prefetch: 10, ..ConsumeOptions::default() };
    let mut consumer = client.consume("jobs", options).await.unwrap();

    let mut received = BTreeSet::new();
    for n in 0..5 {
        client.publish("jobs", format!("before {n}"), PublishOptions::default()).await.unwrap();
    }
    receive_until(&mut consumer, &mut received, 5).await;

    first.kill();
    assert!(matches!(next_event(&mut events).await, RecoveryEvent::Lost { .. }));
    loop {
        match next_event(&mut events).await {
            RecoveryEvent::Recovered { generation } => {
                assert_eq!(generation, 2);
                break;
            }
            RecoveryEvent::AttemptFailed { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let (generation, _) = client.connection().await.unwrap();
    assert_eq!(generation, 2);

    for n in 0..5 {
        client.publish("jobs", format!("after {n}"), PublishOptions::default()).await.unwrap();
    }
    receive_until(&mut consumer, &mut received, 10).await;
    let expected: BTreeSet<String> =
        (0..5).flat_map(|n| [format!("before {n}"), format!("after {n}")]).collect();
    assert_eq!(received, expected);
    let stats = connect(&second).await.queue_stats("jobs").await.unwrap();
    assert_eq!((stats.ready, stats.unacked), (0, 0), "everything consumed on the second broker");
}

#[tokio::test]
async fn a_publish_waits_for_the_next_connection_and_a_refusal_is_returned() {
    let mut first = Broker::start();
    let second = Broker::start();
    connect(&second).await.declare_queue("jobs", QueueOptions::default()).await.unwrap();
    let addrs = vec![first.addr().to_string(), second.addr().to_string()];
    let client = Recovering::connect(addrs, ConnectOptions::default(), fast()).await.unwrap();
    let mut events = client.events();

    let refused = client.publish("missing", "x", PublishOptions::default()).await;
    assert!(matches!(refused, Err(Error::Broker { .. })), "a broker's refusal is not retried: {refused:?}");

    first.kill();
    // Sent whether or not the loss was noticed yet: it lands on the second broker.
    within("a publish across the loss", client.publish("jobs", "kept", PublishOptions::default()))
        .await
        .unwrap();
    assert!(matches!(next_event(&mut events).await, RecoveryEvent::Lost { .. }));
    let stats = connect(&second).await.queue_stats("jobs").await.unwrap();
    assert_eq!(stats.ready, 1);

    client.close().await.unwrap();
    let after = client.publish("jobs", "late", PublishOptions::default()).await;
    assert!(matches!(after, Err(Error::Closed(_))), "{after:?}");
}

#[tokio::test]
async fn dropping_the_last_handle_closes_the_connection() {
    let broker = Broker::start();
    let watcher = connect(&broker).await;
    let client = Recovering::connect(vec![broker.addr().to_string()], ConnectOptions::default(), fast())
        .await
        .unwrap();
    let other = client.clone();
    assert_eq!(watcher.status().await.unwrap().connections, 2);
    drop(client);
    assert_eq!(watcher.status().await.unwrap().connections, 2, "a clone still holds it");
    drop(other);
    hopper_tests::eventually("the connection to close", hopper_tests::DEADLINE, || async {
        watcher.status().await.unwrap().connections == 1
    })
    .await;
}
