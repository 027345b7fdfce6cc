//! Settling deliveries: ack, ack_multiple, nack with and without requeue, reject, settling
//! twice, and the order in which requeued messages come back.

use futures::FutureExt;
use futures::StreamExt;
use hopper_client::{Connection, ConsumeOptions, Consumer, Error, PublishOptions, QueueOptions};
use hopper_tests::{
    body_text, connect, next_deliveries, next_delivery, publish_all, stats_eventually, Broker,
};

/// A broker with queue `q` holding `bodies`, and a consumer on it with a prefetch of 10.
async fn setup(bodies: &[&str]) -> (Broker, Connection, Consumer) {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("q", QueueOptions::default()).await.unwrap();
    publish_all(&conn, "q", bodies.iter().map(|b| b.to_string())).await;
    let consumer = conn.consume("q", ConsumeOptions { prefetch: 10, ..Default::default() }).await.unwrap();
    (broker, conn, consumer)
}

#[tokio::test]
async fn ack_removes_the_message() {
    let (_broker, conn, mut consumer) = setup(&["a"]).await;
    let delivery = next_delivery(&mut consumer).await;
    let info = stats_eventually(&conn, "q", |info| info.unacked == 1).await;
    assert_eq!((info.ready, info.acked_total), (0, 0));
    delivery.ack().await.unwrap();
    let info = stats_eventually(&conn, "q", |info| info.acked_total == 1).await;
    assert_eq!((info.ready, info.unacked, info.redelivered_total), (0, 0, 0), "{info:?}");
}

#[tokio::test]
async fn settling_twice_is_already_settled() {
    let (_broker, conn, mut consumer) = setup(&["a", "b"]).await;
    let delivery = next_delivery(&mut consumer).await;
    delivery.ack().await.unwrap();
    for second in [delivery.ack().boxed(), delivery.nack(true).boxed(), delivery.reject().boxed()] {
        match second.await {
            Err(Error::AlreadySettled { delivery_tag }) => assert_eq!(delivery_tag, delivery.delivery_tag),
            other => panic!("expected AlreadySettled, got {other:?}"),
        }
    }
    let rejected = next_delivery(&mut consumer).await;
    rejected.reject().await.unwrap();
    assert!(matches!(rejected.ack().await, Err(Error::AlreadySettled { .. })));
    // The refused second settles sent nothing: one ack, nothing requeued, nothing else.
    let info = stats_eventually(&conn, "q", |info| info.unacked == 0).await;
    assert_eq!((info.ready, info.acked_total, info.delivered_total), (0, 1, 2), "{info:?}");
    assert!(!conn.is_closed());
}

#[tokio::test]
async fn ack_multiple_settles_every_earlier_delivery() {
    let (_broker, conn, mut consumer) = setup(&["1", "2", "3", "4", "5"]).await;
    let d = next_deliveries(&mut consumer, 5).await;
    d[2].ack_multiple().await.unwrap();
    let info = stats_eventually(&conn, "q", |info| info.acked_total == 3).await;
    assert_eq!((info.unacked, info.ready), (2, 0), "{info:?}");

    // The ones ack_multiple covered are settled; the later ones are not.
    assert!(matches!(d[0].ack().await, Err(Error::AlreadySettled { .. })));
    assert!(matches!(d[1].nack(true).await, Err(Error::AlreadySettled { .. })));
    assert!(matches!(d[2].ack().await, Err(Error::AlreadySettled { .. })));
    d[3].ack().await.unwrap();
    d[4].ack_multiple().await.unwrap();
    let info = stats_eventually(&conn, "q", |info| info.acked_total == 5).await;
    assert_eq!((info.unacked, info.ready, info.redelivered_total), (0, 0, 0), "{info:?}");
}

#[tokio::test]
async fn nack_with_requeue_redelivers_the_message() {
    let (_broker, conn, mut consumer) = setup(&["again"]).await;
    let first = next_delivery(&mut consumer).await;
    assert_eq!((first.redelivered, first.delivery_count), (false, 1));
    first.nack(true).await.unwrap();
    let second = next_delivery(&mut consumer).await;
    assert_eq!(second.message_id, first.message_id);
    assert_eq!(body_text(&second), "again");
    assert_eq!((second.redelivered, second.delivery_count), (true, 2));
    assert_ne!(second.delivery_tag, first.delivery_tag, "a redelivery is a new delivery");
    let info = stats_eventually(&conn, "q", |info| info.redelivered_total == 1).await;
    assert_eq!((info.delivered_total, info.unacked, info.acked_total), (2, 1, 0), "{info:?}");
    second.ack().await.unwrap();
    stats_eventually(&conn, "q", |info| info.acked_total == 1 && info.unacked == 0 && info.ready == 0).await;
}

#[tokio::test]
async fn nack_without_requeue_drops_the_message() {
    let (_broker, conn, mut consumer) = setup(&["drop me"]).await;
    next_delivery(&mut consumer).await.nack(false).await.unwrap();
    assert_dropped(&conn, &mut consumer).await;
}

#[tokio::test]
async fn reject_drops_the_message() {
    let (_broker, conn, mut consumer) = setup(&["drop me"]).await;
    next_delivery(&mut consumer).await.reject().await.unwrap();
    assert_dropped(&conn, &mut consumer).await;
}

/// The first message of `q` was settled negatively without requeue: it is gone for good.
async fn assert_dropped(conn: &Connection, consumer: &mut Consumer) {
    let info = stats_eventually(conn, "q", |info| info.unacked == 0).await;
    assert_eq!((info.ready, info.acked_total, info.redelivered_total), (0, 0, 0), "{info:?}");
    // Had it been requeued, it would come before this one.
    conn.publish("q", "next", PublishOptions::default()).await.unwrap();
    let next = next_delivery(consumer).await;
    assert_eq!((body_text(&next).as_str(), next.redelivered), ("next", false));
}

#[tokio::test]
async fn nack_multiple_with_requeue_returns_them_in_order() {
    let (_broker, _conn, mut consumer) = setup(&["1", "2", "3"]).await;
    let d = next_deliveries(&mut consumer, 3).await;
    d[2].nack_multiple(true).await.unwrap();
    let again = next_deliveries(&mut consumer, 3).await;
    let bodies: Vec<String> = again.iter().map(body_text).collect();
    assert_eq!(bodies, ["1", "2", "3"]);
    assert!(again.iter().all(|d| d.redelivered && d.delivery_count == 2), "{again:?}");
}

/// Requeued messages go back to their place in publish order, whatever order they were
/// settled in. Each nack frees a window slot, so the broker hands that message straight back
/// to the same consumer; the consumer then holds all five in scrambled delivery order, and
/// cancelling it requeues them together, which is when the order becomes visible.
#[tokio::test]
async fn requeued_messages_return_in_publish_order() {
    let (broker, _conn, mut first) = setup(&[]).await;
    let publisher = connect(&broker).await;
    let ids = publish_all(&publisher, "q", ["1", "2", "3", "4", "5"]).await;
    let delivered = next_deliveries(&mut first, 5).await;
    assert_eq!(delivered.iter().map(|d| d.message_id).collect::<Vec<_>>(), ids);

    let scrambled = [3, 1, 5, 2, 4];
    let mut redelivered = Vec::new();
    for n in scrambled {
        delivered[n - 1].nack(true).await.unwrap();
        let again = next_delivery(&mut first).await;
        assert_eq!((again.redelivered, again.delivery_count), (true, 2), "{again:?}");
        redelivered.push(again);
    }
    let mut bodies: Vec<String> = redelivered.iter().map(body_text).collect();
    bodies.sort();
    assert_eq!(bodies, ["1", "2", "3", "4", "5"], "each message came back once");

    assert_eq!(first.cancel().await.unwrap(), 5, "cancel requeues the five held deliveries");
    let conn = connect(&broker).await;
    let mut second = conn.consume("q", ConsumeOptions { prefetch: 5, ..Default::default() }).await.unwrap();
    let again = next_deliveries(&mut second, 5).await;
    let bodies: Vec<String> = again.iter().map(body_text).collect();
    assert_eq!(bodies, ["1", "2", "3", "4", "5"], "requeued messages are back in publish order");
    assert_eq!(again.iter().map(|d| d.message_id).collect::<Vec<_>>(), ids);
    assert!(again.iter().all(|d| d.redelivered && d.delivery_count == 3), "{again:?}");
}

#[tokio::test]
async fn requeued_messages_go_before_newer_ones() {
    let (_broker, conn, mut consumer) = setup(&["1", "2", "3", "4"]).await;
    let d = next_deliveries(&mut consumer, 4).await;
    let late = consumer.cancel().await.unwrap();
    assert_eq!(late, 4);
    conn.publish("q", "5", PublishOptions::default()).await.unwrap();
    drop(d);
    let mut consumer =
        conn.consume("q", ConsumeOptions { prefetch: 10, ..Default::default() }).await.unwrap();
    let again = next_deliveries(&mut consumer, 5).await;
    let bodies: Vec<String> = again.iter().map(body_text).collect();
    assert_eq!(bodies, ["1", "2", "3", "4", "5"]);
    let flags: Vec<bool> = again.iter().map(|d| d.redelivered).collect();
    assert_eq!(flags, [true, true, true, true, false]);
}

#[tokio::test]
async fn settling_after_cancel_is_refused_locally() {
    let (_broker, conn, mut consumer) = setup(&["a"]).await;
    let delivery = next_delivery(&mut consumer).await;
    assert_eq!(consumer.cancel().await.unwrap(), 1);
    match delivery.ack().await {
        Err(Error::ConsumerCancelled(_)) => {}
        other => panic!("expected ConsumerCancelled, got {other:?}"),
    }
    let info = stats_eventually(&conn, "q", |info| info.ready == 1).await;
    assert_eq!((info.unacked, info.consumers, info.acked_total), (0, 0, 0), "{info:?}");
}

#[tokio::test]
async fn dropping_a_consumer_requeues_its_deliveries() {
    let (_broker, conn, mut consumer) = setup(&["a", "b", "c"]).await;
    let held = next_deliveries(&mut consumer, 3).await;
    drop(consumer);
    drop(held);
    let info = stats_eventually(&conn, "q", |info| info.consumers == 0 && info.ready == 3).await;
    assert_eq!(info.unacked, 0, "{info:?}");
    let mut consumer = conn.consume("q", ConsumeOptions::default()).await.unwrap();
    let again = next_deliveries(&mut consumer, 3).await;
    assert!(again.iter().all(|d| d.redelivered), "{again:?}");
    assert!(consumer.next().now_or_never().is_none());
}

/// With confirmed settlements, each settle call returns once the broker answered it, for
/// transient queues at once and for durable ones after their log write.
#[tokio::test]
async fn confirmed_settlements_are_answered_for_transient_and_durable_queues() {
    for durable in [false, true] {
        let broker = Broker::start();
        let conn = connect(&broker).await;
        conn.declare_queue("q", QueueOptions { durable, ..Default::default() }).await.unwrap();
        publish_all(&conn, "q", ["a", "b", "c"].map(String::from)).await;
        let options = ConsumeOptions { prefetch: 10, confirm_settlements: true, ..Default::default() };
        let mut consumer = conn.consume("q", options).await.unwrap();
        let d = next_deliveries(&mut consumer, 3).await;
        let answered = async {
            d[0].ack().await.unwrap();
            d[1].nack(true).await.unwrap();
            d[2].reject().await.unwrap();
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), answered).await.expect("SettleOk arrived");
        let info = conn.queue_stats("q").await.unwrap();
        assert_eq!(info.acked_total, 1, "durable={durable}: {info:?}");
        assert_eq!(body_text(&next_delivery(&mut consumer).await), "b", "durable={durable}");
    }
}

/// Acks read together are applied together; each still stands alone: a bad one in the middle
/// is answered under its own request id and changes nothing for its neighbours, and acks
/// followed at once by a close are applied before the connection's deliveries go back.
#[tokio::test]
async fn a_burst_of_acks_is_applied_with_each_one_answered_on_its_own() {
    use bytes::BytesMut;
    use hopper_proto::{encode_frame, pb, Body, Frame};
    use hopper_tests::RawConn;

    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("q", QueueOptions::default()).await.unwrap();
    publish_all(&conn, "q", (0..20).map(|i| format!("m{i}"))).await;

    let mut raw = RawConn::connect_hello(broker.addr()).await;
    let consume = pb::Consume { queue: "q".into(), prefetch_count: 20, ..Default::default() };
    let Body::ConsumeOk(ok) = raw.call(Body::Consume(consume)).await else { panic!("not subscribed") };
    let mut tags = Vec::new();
    while tags.len() < 20 {
        if let Some(Body::Deliver(deliver)) = raw.recv_skipping_heartbeats().await.and_then(|f| f.body) {
            tags.push(deliver.delivery_tag);
        }
    }

    // Tags 1..=10 one by one, an unknown tag in the middle, then a close in the same write.
    let mut wire = BytesMut::new();
    let ack = |raw: &mut RawConn, delivery_tag: u64, wire: &mut BytesMut| {
        let request_id = raw.next_request_id();
        let body = Body::Ack(pb::Ack { consumer_id: ok.consumer_id, delivery_tag, ..Default::default() });
        encode_frame(&Frame::new(request_id, body), u32::MAX, wire).expect("encode");
        request_id
    };
    for &tag in &tags[..5] {
        ack(&mut raw, tag, &mut wire);
    }
    let unknown = ack(&mut raw, 999, &mut wire);
    for &tag in &tags[5..10] {
        ack(&mut raw, tag, &mut wire);
    }
    raw.send_bytes(&wire).await;
    let (code, message) = raw.error_response(unknown).await;
    assert_eq!(code, pb::ErrorCode::NotFound, "{message}");
    assert!(message.contains("unknown delivery tag 999"), "{message}");

    let mut wire = BytesMut::new();
    for &tag in &tags[10..15] {
        ack(&mut raw, tag, &mut wire);
    }
    let close = Body::Close(pb::Close { reason: "done".into(), ..Default::default() });
    encode_frame(&Frame::new(0, close), u32::MAX, &mut wire).expect("encode");
    raw.send_bytes(&wire).await;
    raw.expect_eof().await;

    // Fifteen acked; the five left unacked are back, ready again.
    let info = stats_eventually(&conn, "q", |info| info.consumers == 0 && info.ready == 5).await;
    assert_eq!((info.acked_total, info.unacked), (15, 0), "{info:?}");
}
