//! Queue management through the client: declare, passive declare, delete, purge, statistics
//! and listing.

use futures::StreamExt;
use hopper_client::{ConsumeOptions, DeleteOptions, Error, ErrorCode, PublishOptions, QueueOptions};
use hopper_tests::{connect, next_deliveries, publish_all, stats_eventually, within, Broker};

#[tokio::test]
async fn declare_is_idempotent() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let created =
        conn.declare_queue("jobs", QueueOptions { durable: true, ..Default::default() }).await.unwrap();
    assert_eq!(created.name, "jobs");
    assert!(created.durable);
    assert_eq!((created.ready, created.unacked, created.consumers, created.published_total), (0, 0, 0, 0));

    publish_all(&conn, "jobs", ["a", "b"]).await;
    let again =
        conn.declare_queue("jobs", QueueOptions { durable: true, ..Default::default() }).await.unwrap();
    assert_eq!((again.ready, again.published_total), (2, 2), "redeclaring keeps the queue and its messages");
    let other = connect(&broker).await;
    let from_other =
        other.declare_queue("jobs", QueueOptions { durable: true, ..Default::default() }).await.unwrap();
    assert_eq!(from_other.ready, 2);
    assert_eq!(conn.list_queues().await.unwrap().len(), 1);
}

#[tokio::test]
async fn passive_declare_checks_existence() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    match conn.queue_exists("ghost").await {
        Err(Error::Broker { code: ErrorCode::NotFound, .. }) => {}
        other => panic!("expected NOT_FOUND, got {other:?}"),
    }
    assert!(conn.list_queues().await.unwrap().is_empty(), "a passive declare creates nothing");
    conn.declare_queue("ghost", QueueOptions::default()).await.unwrap();
    let info = conn.queue_exists("ghost").await.unwrap();
    assert_eq!(info.name, "ghost");
}

#[tokio::test]
async fn delete_drops_the_queue_and_its_messages() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("doomed", QueueOptions::default()).await.unwrap();
    publish_all(&conn, "doomed", ["1", "2", "3"]).await;
    let mut consumer =
        conn.consume("doomed", ConsumeOptions { prefetch: 1, ..Default::default() }).await.unwrap();
    let _held = next_deliveries(&mut consumer, 1).await;

    // Ready and unacked messages both go with the queue.
    assert_eq!(conn.delete_queue("doomed", DeleteOptions::default()).await.unwrap(), 3);
    match within("the consumer to be cancelled", consumer.next()).await {
        Some(Err(Error::ConsumerCancelled(reason))) => assert!(reason.contains("doomed"), "{reason}"),
        other => panic!("expected ConsumerCancelled, got {other:?}"),
    }
    assert!(within("the consumer stream to end", consumer.next()).await.is_none());

    assert!(conn.list_queues().await.unwrap().is_empty());
    let gone = conn.publish("doomed", "late", PublishOptions::default()).await.unwrap_err();
    assert_eq!(gone.code(), Some(ErrorCode::NotFound));
    let gone = conn.delete_queue("doomed", DeleteOptions::default()).await.unwrap_err();
    assert_eq!(gone.code(), Some(ErrorCode::NotFound));

    // A queue declared again under the same name starts from scratch.
    let fresh = conn.declare_queue("doomed", QueueOptions::default()).await.unwrap();
    assert_eq!((fresh.ready, fresh.unacked, fresh.published_total, fresh.consumers), (0, 0, 0, 0));
}

#[tokio::test]
async fn conditional_delete_refuses_busy_queues() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("busy", QueueOptions::default()).await.unwrap();
    publish_all(&conn, "busy", ["x"]).await;
    let if_empty = DeleteOptions { if_empty: true, ..Default::default() };
    let err = conn.delete_queue("busy", if_empty.clone()).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PreconditionFailed), "{err}");

    let consumer = conn.consume("busy", ConsumeOptions::default()).await.unwrap();
    let if_unused = DeleteOptions { if_unused: true, ..Default::default() };
    let err = conn.delete_queue("busy", if_unused.clone()).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PreconditionFailed), "{err}");
    assert_eq!(conn.queue_stats("busy").await.unwrap().published_total, 1, "the queue is still there");

    consumer.cancel().await.unwrap();
    conn.purge_queue("busy").await.unwrap();
    let both = DeleteOptions { if_unused: true, if_empty: true };
    assert_eq!(conn.delete_queue("busy", both).await.unwrap(), 0);
}

#[tokio::test]
async fn purge_drops_ready_messages_only() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("p", QueueOptions::default()).await.unwrap();
    publish_all(&conn, "p", (0..10).map(|i| i.to_string())).await;
    let mut consumer = conn.consume("p", ConsumeOptions { prefetch: 3, ..Default::default() }).await.unwrap();
    let held = next_deliveries(&mut consumer, 3).await;
    stats_eventually(&conn, "p", |info| info.unacked == 3 && info.ready == 7).await;

    assert_eq!(conn.purge_queue("p").await.unwrap(), 7);
    let info = conn.queue_stats("p").await.unwrap();
    assert_eq!((info.ready, info.unacked), (0, 3), "{info:?}");
    // The unacked deliveries are still the consumer's to settle.
    held[2].ack_multiple().await.unwrap();
    stats_eventually(&conn, "p", |info| info.acked_total == 3 && info.unacked == 0).await;
    assert_eq!(conn.purge_queue("p").await.unwrap(), 0);
    let err = conn.purge_queue("missing").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
}

#[tokio::test]
async fn list_reports_every_queue_with_its_statistics() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    assert!(conn.list_queues().await.unwrap().is_empty());
    for (name, durable) in [("beta", true), ("alpha", false), ("gamma", false)] {
        conn.declare_queue(name, QueueOptions { durable, ..Default::default() }).await.unwrap();
    }
    publish_all(&conn, "alpha", ["1", "2", "3"]).await;
    publish_all(&conn, "beta", ["1"]).await;
    let mut consumer =
        conn.consume("alpha", ConsumeOptions { prefetch: 1, ..Default::default() }).await.unwrap();
    let held = next_deliveries(&mut consumer, 1).await;
    held[0].nack(true).await.unwrap();
    let redelivered = next_deliveries(&mut consumer, 1).await;
    assert!(redelivered[0].redelivered);
    stats_eventually(&conn, "alpha", |info| info.redelivered_total == 1).await;

    let list = conn.list_queues().await.unwrap();
    let names: Vec<&str> = list.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(names, ["alpha", "beta", "gamma"], "sorted by name");
    let alpha = &list[0];
    assert!(!alpha.durable);
    assert_eq!((alpha.ready, alpha.unacked, alpha.consumers), (2, 1, 1), "{alpha:?}");
    assert_eq!(
        (alpha.published_total, alpha.delivered_total, alpha.acked_total, alpha.redelivered_total),
        (3, 2, 0, 1),
        "{alpha:?}"
    );
    let beta = &list[1];
    assert!(beta.durable);
    assert_eq!((beta.ready, beta.unacked, beta.consumers, beta.published_total), (1, 0, 0, 1), "{beta:?}");
    assert_eq!(list[2].published_total, 0);
    // Stats for one queue agree with the list.
    assert_eq!(&conn.queue_stats("beta").await.unwrap(), beta);
}

#[tokio::test]
async fn stats_of_an_unknown_queue_are_not_found() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let err = conn.queue_stats("nope").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    assert!(err.to_string().contains("nope"), "{err}");
}
